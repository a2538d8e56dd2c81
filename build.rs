//! With the `cuda` feature: compiles `src/kernels/fused.cu` to PTX with nvcc (the toolkit candle's
//! own kernels are built with) for compute_75, the oldest GPUs CUDA 13 supports; the driver
//! compiles that PTX for the GPU at hand when the module loads. Other builds do nothing here.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/kernels/fused.cu");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out =
        PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("fused.ptx");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = Command::new(&nvcc)
        .args(["--ptx", "-arch=compute_75", "src/kernels/fused.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run `{nvcc}` (the CUDA compiler) to build src/kernels/fused.cu: {e}\n\
                 hint: put the CUDA toolkit's bin folder on PATH, or set NVCC"
            )
        });
    assert!(status.success(), "`{nvcc}` failed on src/kernels/fused.cu");
}
