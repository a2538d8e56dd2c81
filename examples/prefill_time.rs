//! The time of a prompt's forward pass inside one process, repeated (a benchmark, not a test):
//! `cargo run --release --example prefill_time MODEL [--tokens N] [--reps R] [--dtype T]` prints
//! each forward's milliseconds and tok/s, the first one included. `llmarch run` reports a fresh
//! process's first forward; llama-bench times forwards after a warm-up in its process, which
//! these later lines compare with.

use clap::Parser;
use llmarch::arch::Rows;
use llmarch::cli::shared::{self, DeviceArgs};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// A model folder (or alias / repo).
    model: String,
    #[command(flatten)]
    device: DeviceArgs,
    /// Prompt tokens (bench/vs-llamacpp.sh's ids: BOS, then a fixed spread below the vocabulary).
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// Forwards timed, each from an empty cache.
    #[arg(long, default_value_t = 6)]
    reps: usize,
}

fn main() -> anyhow::Result<()> {
    llmarch::kernels::parallel::init();
    let args = Args::parse();
    let (model, spec) = shared::quiet_model(&args.model, &args.device)?;
    let ids = shared::bench_ids(args.tokens, spec.vocab_size);
    for _ in 0..args.reps {
        let mut cache = model.new_cache();
        let t = Instant::now();
        model.forward_logits(&ids, &mut cache, Rows::Last)?;
        let s = t.elapsed().as_secs_f64();
        println!("{:.2} ms {:.1} tok/s", s * 1e3, args.tokens as f64 / s);
    }
    Ok(())
}
