//! What speculative decoding's machinery costs on a model: the time of a verify pass over N+1
//! tokens against one decode step (N = 1..8), at a context of `--context` tokens, each followed
//! by the rollback it needs, and the decode speed that follows at acceptance rates 0-100%.
//! Run by `bench/speculative.sh` (release build); a benchmark, never a test.
//!
//! Model of a step with N drafts and per-token acceptance α: the first rejection comes after
//! a accepted drafts with probability α^a(1-α) (a < N), all N are accepted with α^N. A step
//! yields a+1 tokens and costs the verify pass V(N), plus, after a rejection, what giving back
//! the rejected rows costs: nothing where the cache is only rows (the accepted rows are kept,
//! `KvStore::keep_prefix`), else the rollback and a forward of the a+1 kept tokens F(a+1) (F(1)
//! is one decode step, F(m) = V(m-1)). Drafting is free (prompt lookup); a drafter model would
//! add its own cost per drafted token. Forwards run as `generate` runs a verify pass
//! (`as_decode_steps`: every row computed as a decode step computes it); `--as-prompt` times
//! them as a prompt chunk instead (the GEMM for f32 weights, attention over all rows at once).

use clap::Parser;
use llmarch::arch::Rows;
use llmarch::cli::shared::{self, DeviceArgs};
use llmarch::cli::Ctx;
use llmarch::kernels::as_decode_steps;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// A model folder (or alias / repo).
    model: String,
    #[command(flatten)]
    device: DeviceArgs,
    /// Tokens in the cache before timing.
    #[arg(long, default_value_t = 128)]
    context: usize,
    /// Timed repetitions per measurement (the median is kept).
    #[arg(long, default_value_t = 9)]
    reps: usize,
    /// Largest number of drafts.
    #[arg(long, default_value_t = 8)]
    max_drafts: usize,
    /// Time forwards as a prompt chunk, not as a verify pass.
    #[arg(long)]
    as_prompt: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    let built = shared::build_model_in(&files, family, &ctx, &precision)?;
    let model = built.model;
    let vocab = spec.vocab_size as u64;
    let ids = |n: usize, salt: u64| -> Vec<u32> {
        (0..n as u64)
            .map(|i| ((i * 7919 + salt * 104_729 + 13) % vocab) as u32)
            .collect()
    };
    let mut cache = model.new_cache();
    model.forward_logits(&ids(args.context, 0), &mut cache, Rows::None)?;

    // F(m): a forward of m tokens returning every row, then the rollback (what a step costs).
    let forward = |m: usize| -> anyhow::Result<f64> {
        let mut cache = cache.clone();
        let mut times = vec![];
        for r in 0..args.reps + 1 {
            let cp = cache.checkpoint();
            let t = Instant::now();
            let tokens = ids(m, r as u64 + 1);
            if args.as_prompt {
                model.forward_logits(&tokens, &mut cache, Rows::All)?;
            } else {
                as_decode_steps(|| model.forward_logits(&tokens, &mut cache, Rows::All))?;
            }
            cache.rollback(&cp)?;
            if r > 0 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        Ok(median(times))
    };
    let f: Vec<f64> = (1..=args.max_drafts + 1)
        .map(forward)
        .collect::<anyhow::Result<_>>()?;
    let step = f[0];
    // Whether a rejection keeps the accepted rows (else: rollback and refeed).
    let keeps_rows = {
        let mut c = cache.clone();
        let cp = c.checkpoint();
        model.forward_logits(&ids(2, 0), &mut c, Rows::All)?;
        c.keep_prefix(&cp, 1)?
    };
    println!(
        "{} · {} weights · context {} · RAYON_NUM_THREADS={} · median of {}",
        model_ref.display_name(),
        built.weights,
        args.context,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "unset".into()),
        args.reps
    );
    println!(
        "decode step (1 token): {:.2} ms = {:.1} tok/s; forwards timed as {}; a rejection {}",
        step * 1e3,
        1.0 / step,
        if args.as_prompt {
            "a prompt chunk"
        } else {
            "a verify pass"
        },
        if keeps_rows {
            "keeps the accepted rows"
        } else {
            "rolls back and feeds the accepted tokens again"
        }
    );
    let rates: [f64; 6] = [0.0, 0.25, 0.5, 0.75, 0.9, 1.0];
    print!("{:>3} {:>10} {:>7} |", "N", "verify ms", "×step");
    for a in rates {
        print!(" {:>7}", format!("α={a}"));
    }
    println!("   (decode tok/s at acceptance α)");
    for n in 1..=args.max_drafts {
        let v = f[n];
        print!("{n:>3} {:>10.2} {:>7.2} |", v * 1e3, v / step);
        for alpha in rates {
            let (mut tokens, mut cost) = (0.0, v);
            for (a, fa) in f.iter().enumerate().take(n) {
                let p = alpha.powi(a as i32) * (1.0 - alpha);
                tokens += p * (a + 1) as f64;
                if !keeps_rows {
                    cost += p * fa;
                }
            }
            let all = alpha.powi(n as i32);
            tokens += all * (n + 1) as f64;
            print!(" {:>7.1}", tokens / cost);
        }
        println!();
    }
    Ok(())
}
