//! Decode-step gemv throughput per weight format, for tuning `src/kernels/gemv.rs` and
//! `src/kernels/int8.rs` (a benchmark, not a test): `cargo run --release --example gemv_bench`
//! runs the one-row products of a decode step of the 0.2 B bench model (10 layers of
//! q/k/v/o and a gated MLP, 1024 wide, plus a 32768-row head; ~65 MB at q4_0, more than the L3
//! cache) and prints the best of 7 steps as time per step and weight GB/s, formats interleaved.
//! `LLMARCH_KERNELS` picks the kernels as for `llmarch`.

use half::bf16;
use llmarch::kernels::gemv::{gemv, Q4_0Matrix, Q8_0Matrix, WeightRows};
use std::time::Instant;

fn main() {
    let layer = [
        (1024usize, 1024usize),
        (256, 1024),
        (256, 1024),
        (1024, 1024),
        (2048, 1024),
        (2048, 1024),
        (1024, 2048),
    ];
    let mut shapes: Vec<(usize, usize)> = (0..10).flat_map(|_| layer).collect();
    shapes.push((32768, 1024));
    if let Ok(s) = std::env::var("SHAPE") {
        let (n, k) = s.split_once('x').unwrap();
        shapes = vec![(n.parse().unwrap(), k.parse().unwrap()); 40];
    }
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let mats: Vec<_> = shapes
        .iter()
        .map(|&(n, k)| {
            let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
            let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let q8 = Q8_0Matrix::quantize(&w, n, k).unwrap();
            let q4 = Q4_0Matrix::quantize(&w, n, k).unwrap();
            (wb, q8, q4)
        })
        .collect();
    let x: Vec<f32> = (0..2048).map(|_| rnd()).collect();
    let mut y = vec![0f32; 32768];
    let names = ["bf16", "q8_0", "q4_0"];
    let mut best = [f64::MAX; 3];
    let mut all = [vec![], vec![], vec![]];
    let mut bytes = [0usize; 3];
    for _ in 0..21 {
        for (f, b) in best.iter_mut().enumerate() {
            let t = Instant::now();
            bytes[f] = 0;
            for ((wb, q8, q4), &(n, k)) in mats.iter().zip(&shapes) {
                let w = match f {
                    0 => WeightRows::Bf16(wb),
                    1 => WeightRows::Q8_0(q8),
                    _ => WeightRows::Q4_0(q4),
                };
                bytes[f] += match f {
                    0 => 2 * n * k,
                    1 => q8.bytes(),
                    _ => q4.bytes(),
                };
                gemv(w, &x[..k], &mut y[..n]).unwrap();
            }
            *b = b.min(t.elapsed().as_secs_f64());
            all[f].push(t.elapsed().as_secs_f64());
        }
    }
    for (((name, b), bytes), all) in names.iter().zip(best).zip(bytes).zip(&mut all) {
        all.sort_by(f64::total_cmp);
        let med = all[all.len() / 2];
        println!(
            "{name:5} best {:.2} ms/step ({:.1} GB/s), median {:.2} ms/step",
            b * 1e3,
            bytes as f64 / b / 1e9,
            med * 1e3
        );
    }
}
