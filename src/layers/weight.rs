//! Reading one named tensor from a `VarBuilder`, with errors that name it.
//!
//! candle's safetensors backends already refuse a tensor of the wrong shape ("shape mismatch for
//! NAME, expected: [..], got: [..]"), but the message carries a backtrace when `RUST_BACKTRACE`
//! is set and a missing tensor reads only "cannot find tensor". These helpers turn both into one
//! line naming the full tensor path, and for a wrong shape both shapes.

use anyhow::{anyhow, Result};
use candle_core::{DType, Shape, Tensor};
use candle_nn::{Init, VarBuilder};

/// The full name of `name` under `vb`'s prefix.
pub fn full_name(vb: &VarBuilder, name: &str) -> String {
    let prefix = vb.prefix();
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

/// Tensor `name` under `vb`, which must have `shape`; converted to `vb`'s dtype.
pub fn get(vb: &VarBuilder, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
    let shape: Shape = shape.into();
    let full = full_name(vb, name);
    if !vb.contains_tensor(name) {
        return Err(anyhow!("tensor `{full}` is missing from the checkpoint"));
    }
    vb.get(shape.clone(), name)
        .map_err(|e| describe(e, &full, &shape))
}

/// Tensor `name` under `vb` with `shape`, read straight into f32 whatever `vb`'s dtype: for
/// parameters the reference keeps in f32 in a 16-bit model (`_keep_in_fp32_modules_strict`), so
/// they are not rounded to the model dtype on the way.
pub fn get_f32(vb: &VarBuilder, shape: impl Into<Shape>, name: &str) -> Result<Tensor> {
    let shape: Shape = shape.into();
    let full = full_name(vb, name);
    if !vb.contains_tensor(name) {
        return Err(anyhow!("tensor `{full}` is missing from the checkpoint"));
    }
    vb.get_with_hints_dtype(shape.clone(), name, Init::Const(0.0), DType::F32)
        .map_err(|e| describe(e, &full, &shape))
}

/// Like [`get`], but `None` when the checkpoint does not hold the tensor.
pub fn get_opt(vb: &VarBuilder, shape: impl Into<Shape>, name: &str) -> Result<Option<Tensor>> {
    if vb.contains_tensor(name) {
        get(vb, shape, name).map(Some)
    } else {
        Ok(None)
    }
}

fn describe(e: candle_core::Error, full: &str, expected: &Shape) -> anyhow::Error {
    let mut e = &e;
    while let candle_core::Error::WithBacktrace { inner, .. } = e {
        e = inner;
    }
    match e {
        candle_core::Error::UnexpectedShape { got, .. } => anyhow!(
            "tensor `{full}` has shape {:?}, but this model needs {:?}",
            got.dims(),
            expected.dims()
        ),
        other => anyhow!("tensor `{full}`: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::collections::HashMap;

    #[test]
    fn wrong_shape_and_missing_tensor_are_named() {
        let mut ts = HashMap::new();
        ts.insert(
            "m.a.weight".to_string(),
            Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap(),
        );
        let vb = VarBuilder::from_tensors(ts, DType::F32, &Device::Cpu).pp("m");
        let vb = vb.pp("a");
        let e = get(&vb, (3, 2), "weight").unwrap_err().to_string();
        assert!(e.contains("`m.a.weight`"), "{e}");
        assert!(e.contains("[2, 3]") && e.contains("[3, 2]"), "{e}");
        let e = get(&vb, (3,), "bias").unwrap_err().to_string();
        assert!(e.contains("`m.a.bias` is missing"), "{e}");
        assert!(get_opt(&vb, (3,), "bias").unwrap().is_none());
        assert_eq!(get(&vb, (2, 3), "weight").unwrap().dims(), &[2, 3]);
    }
}
