//! A/B of the two several-row paths of `layers::linear` at a few rows: the tiled GEMM
//! (`kernels::gemm`) against the one-row kernels run per row over cache-sized weight slices
//! (`kernels::gemv::gemv_rows`), per weight format, on an `[out, in]` matrix; with the one-row
//! gemv for scale. Run by hand (release) when tuning `gemv::few_rows`; a benchmark, never a
//! test. Interleaved repetitions, medians.

use llmarch::kernels::gemm::gemm;
use llmarch::kernels::gemv::{gemv, gemv_rows, Q8_0Matrix, WeightRows};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    llmarch::kernels::parallel::init();
    let (out, n) = (8192usize, 2048usize); // 64 MB of f32: no cache holds it
    let w: Vec<f32> = (0..out * n)
        .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 5e3)
        .collect();
    let bf: Vec<half::bf16> = w.iter().map(|&x| half::bf16::from_f32(x)).collect();
    let q8 = Q8_0Matrix::quantize(&w, out, n)?;
    let formats: [(&str, WeightRows); 3] = [
        ("f32", WeightRows::F32(&w)),
        ("bf16", WeightRows::Bf16(&bf)),
        ("q8_0", WeightRows::Q8_0(&q8)),
    ];
    println!(
        "[{out}, {n}] weights · ms per call, median of 15 · RAYON_NUM_THREADS={}",
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default()
    );
    println!(
        "{:>5} {:>4} {:>8} {:>10} {:>10}",
        "dtype", "rows", "gemv×1", "gemm", "gemv_rows"
    );
    for (name, wr) in formats {
        let x = vec![0.01f32; 9 * n];
        let mut y = vec![0f32; 9 * out];
        let mut one = vec![];
        for _ in 0..16 {
            let t = Instant::now();
            gemv(wr, &x[..n], &mut y[..out])?;
            one.push(t.elapsed().as_secs_f64());
        }
        let one = median(one[1..].to_vec()) * 1e3;
        for m in [2usize, 3, 4, 5, 6, 8, 9] {
            let (mut a, mut b) = (vec![], vec![]);
            for _ in 0..16 {
                let t = Instant::now();
                gemm(wr, &x[..m * n], m, &mut y[..m * out])?;
                a.push(t.elapsed().as_secs_f64());
                let t = Instant::now();
                gemv_rows(wr, &x[..m * n], m, &mut y[..m * out])?;
                b.push(t.elapsed().as_secs_f64());
            }
            println!(
                "{name:>5} {m:>4} {one:>8.2} {:>10.2} {:>10.2}",
                median(a[1..].to_vec()) * 1e3,
                median(b[1..].to_vec()) * 1e3
            );
        }
    }
    Ok(())
}
