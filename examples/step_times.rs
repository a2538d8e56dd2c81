//! The time of each decode step after a prompt, inside one process (a benchmark, not a test):
//! `cargo run --release --example step_times MODEL [--tokens N] [--steps S] [--dtype T]` prefills
//! N tokens as `run` does (chunks, the cache told how many tokens to expect) and prints each of
//! the next S single-token forwards in milliseconds, so a step that does more than the others
//! (a buffer or table grown, a copy of the cache) stands out.

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
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Decode steps timed after the prompt.
    #[arg(long, default_value_t = 8)]
    steps: usize,
}

fn main() -> anyhow::Result<()> {
    llmarch::kernels::parallel::init();
    let args = Args::parse();
    let (model, spec) = shared::quiet_model(&args.model, &args.device)?;
    let n = args.tokens + args.steps;
    let ids = shared::bench_ids(n, spec.vocab_size);
    let mut cache = model.new_cache();
    cache.reserve(n);
    let t = Instant::now();
    llmarch::generate::prefill(&*model, &mut cache, &ids[..args.tokens], false, &mut |_| {
        Ok(true)
    })?;
    println!(
        "prefill of {} tokens: {:.2} s",
        args.tokens,
        t.elapsed().as_secs_f64()
    );
    for (s, id) in ids[args.tokens..].chunks(1).enumerate() {
        let t = Instant::now();
        let logits = model.forward_logits(id, &mut cache, Rows::Last)?;
        let queued = t.elapsed().as_secs_f64() * 1e3;
        logits.device().synchronize()?;
        let done = t.elapsed().as_secs_f64() * 1e3;
        // On a GPU the ops are queued first and run after: the two times differ by how far the
        // device lags the host at the step's end.
        println!("step {s}: {done:.2} ms ({queued:.2} ms queued)");
    }
    Ok(())
}
