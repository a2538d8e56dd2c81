//! GEMM throughput per weight format, for tuning `src/kernels/gemm.rs` (a benchmark, not a
//! test): `cargo run --release --example gemm_bench [ROWS] [cold]` prints GFLOP/s for a prompt
//! chunk of ROWS (default 512) against E2B-like matrix shapes, the best of 7 interleaved calls
//! each, so formats measured in one run compare on a shared machine. `LLMARCH_KERNELS` picks the
//! kernels as for `llmarch` (e.g. `avx512`: f32 products for bf16 weights). `cold` writes 64 MB
//! before every call, so the weights come from memory as in a model's forward pass (each weight
//! read once per prompt chunk) rather than from the caches of the call before.

use half::bf16;
use llmarch::kernels::gemm::gemm;
use llmarch::kernels::gemv::{Q4_0Matrix, Q8_0Matrix, WeightRows};
use std::time::Instant;

fn main() {
    let m: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse().unwrap())
        .unwrap_or(512);
    let cold = std::env::args().nth(2).is_some_and(|a| a == "cold");
    let mut flush = vec![0u8; if cold { 64 << 20 } else { 0 }];
    let shapes = [(2048usize, 1024usize), (1024, 2048), (1024, 1024)];
    let mut seed = 1u64;
    let mut rnd = || {
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    for &(n, k) in &shapes {
        let w: Vec<f32> = (0..n * k).map(|_| rnd()).collect();
        let x: Vec<f32> = (0..m * k).map(|_| rnd()).collect();
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let q8 = Q8_0Matrix::quantize(&w, n, k).unwrap();
        let q4 = Q4_0Matrix::quantize(&w, n, k).unwrap();
        let mut y = vec![0f32; m * n];
        let kinds = [
            ("f32", WeightRows::F32(&w)),
            ("bf16", WeightRows::Bf16(&wb)),
            ("q8_0", WeightRows::Q8_0(&q8)),
            ("q4_0", WeightRows::Q4_0(&q4)),
        ];
        let mut best = [f64::MAX; 4];
        for _ in 0..7 {
            for (b, (_, wr)) in best.iter_mut().zip(&kinds) {
                flush.iter_mut().for_each(|v| *v = v.wrapping_add(1));
                let t = Instant::now();
                gemm(*wr, &x, m, &mut y).unwrap();
                *b = b.min(t.elapsed().as_secs_f64());
            }
        }
        for (b, (name, _)) in best.iter().zip(&kinds) {
            println!(
                "{name:5} m={m} n={n} k={k}: {:.1} GFLOP/s",
                2.0 * (m * n * k) as f64 / b / 1e9
            );
        }
    }
}
