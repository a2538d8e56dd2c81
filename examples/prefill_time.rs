//! The time of a prompt's forward pass inside one process, repeated (a benchmark, not a test):
//! `cargo run --release --example prefill_time MODEL [--tokens N] [--reps R] [--dtype T]` prints
//! each forward's milliseconds and tok/s, the first one included. `llmarch run` reports a fresh
//! process's first forward; llama-bench times forwards after a warm-up in its process, which
//! these later lines compare with.

use clap::Parser;
use llmarch::arch::Rows;
use llmarch::cli::shared::{self, DeviceArgs};
use llmarch::cli::Ctx;
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
    let ctx = Ctx {
        quiet: true,
        verbose: false,
        parse: Default::default(),
    };
    let precision = args.device.resolve(&ctx)?;
    let (model_ref, spec, family) = shared::runnable_spec(&ctx, &args.model)?;
    let (files, _) = shared::files_and_tokenizer(&ctx, &model_ref)?;
    let model = shared::build_model_in(&files, family, &ctx, &precision)?.model;
    let vocab = spec.vocab_size as u64;
    let ids: Vec<u32> = (0..args.tokens as u64)
        .map(|i| if i == 0 { 2 } else { (i * 7919) % (vocab - 200) + 100 } as u32)
        .collect();
    for _ in 0..args.reps {
        let mut cache = model.new_cache();
        let t = Instant::now();
        model.forward_logits(&ids, &mut cache, Rows::Last)?;
        let s = t.elapsed().as_secs_f64();
        println!("{:.2} ms {:.1} tok/s", s * 1e3, args.tokens as f64 / s);
    }
    Ok(())
}
