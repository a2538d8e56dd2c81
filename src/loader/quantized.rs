//! Block-scaled FP8 and FP4 weights as DeepSeek ships them, dequantized at load. Reference:
//! transformers 5.23.0 `integrations/finegrained_fp8.py` (`Fp8Dequantize`, `FP8Experts`).
//!
//! - **FP8** (`quantization_config.quant_method = "fp8"`, `fmt = "e4m3"`): the weight `[N, K]` is
//!   `F8_E4M3`, and `weight_scale_inv` `[⌈N/bn⌉, ⌈K/bk⌉]` holds one scale per block of
//!   `weight_block_size` = `[bn, bk]` (128×128 on the Hub): `w = fp8 · scale[row / bn][col / bk]`.
//! - **FP4** (`expert_dtype = "fp4"`, the routed experts): two e2m1 values per byte, stored as
//!   `I8`/`U8` `[N, K/2]`, the low nibble first (column `2j`), the high one second (`2j + 1`); one
//!   scale per 32 values along K: `weight_scale_inv` `[N, K/32]`.
//!
//! Scales are `F32`, `BF16`, `F16`, or UE8M0 (`F8_E8M0`, or `U8` as some MXFP8 files store it):
//! a bare exponent, `2^(byte − 127)`.

use anyhow::{anyhow, bail, Result};
use half::{bf16, f16};
use serde_json::Value;

/// How a stored tensor's bytes become numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantized {
    /// `F8_E4M3`, one value per byte.
    Fp8E4m3,
    /// Two e2m1 values per byte (`I8`/`U8`).
    Fp4Packed,
}

/// The dtypes a scale tensor may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleDtype {
    F32,
    Bf16,
    F16,
    /// `2^(byte − 127)`.
    E8m0,
}

impl ScaleDtype {
    pub fn from_safetensors(dtype: &str) -> Option<Self> {
        Some(match dtype {
            "F32" => ScaleDtype::F32,
            "BF16" => ScaleDtype::Bf16,
            "F16" => ScaleDtype::F16,
            "F8_E8M0" | "U8" => ScaleDtype::E8m0,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            ScaleDtype::F32 => 4,
            ScaleDtype::Bf16 | ScaleDtype::F16 => 2,
            ScaleDtype::E8m0 => 1,
        }
    }

    fn decode(self, b: &[u8]) -> f32 {
        match self {
            ScaleDtype::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            ScaleDtype::Bf16 => bf16::from_le_bytes([b[0], b[1]]).to_f32(),
            ScaleDtype::F16 => f16::from_le_bytes([b[0], b[1]]).to_f32(),
            ScaleDtype::E8m0 => e8m0(b[0]),
        }
    }
}

/// The checkpoint's FP8 block size, from `config.json`'s `quantization_config`; `None` when the
/// checkpoint is not quantized. Other quantization methods are refused (llmarch would read their
/// packed bytes as garbage).
pub fn fp8_block(config: &Value) -> Result<Option<(usize, usize)>> {
    let q = match config.get("quantization_config") {
        None | Some(Value::Null) => return Ok(None),
        Some(q) => q,
    };
    let method = q.get("quant_method").and_then(|m| m.as_str()).unwrap_or("");
    if method != "fp8" {
        bail!(
            "config.json: `quantization_config.quant_method` = `{method}` is not supported (llmarch loads fp8 block-scaled checkpoints, and unquantized ones)"
        );
    }
    if let Some(fmt) = q.get("fmt").and_then(|f| f.as_str()) {
        if fmt != "e4m3" {
            bail!("config.json: `quantization_config.fmt` = `{fmt}` is not supported (e4m3)");
        }
    }
    match q.get("weight_block_size") {
        None | Some(Value::Null) => Ok(Some((128, 128))),
        Some(v) => {
            let dims: Option<Vec<usize>> = v.as_array().map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64().map(|x| x as usize))
                    .collect()
            });
            match dims.as_deref() {
                Some(&[n, k]) if n > 0 && k > 0 => Ok(Some((n, k))),
                _ => bail!(
                    "config.json: `quantization_config.weight_block_size` = {v} must be two positive sizes"
                ),
            }
        }
    }
}

/// FP8 e4m3fn (bias 7, no infinities; `S.1111.111` is NaN).
pub fn e4m3(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let mant = (b & 0x07) as f32;
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * mant / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    }
}

/// UE8M0: `2^(b − 127)`; 0xff is NaN.
pub fn e8m0(b: u8) -> f32 {
    if b == 0xff {
        f32::NAN
    } else {
        2f32.powi(b as i32 - 127)
    }
}

/// The e2m1 value of a nibble (the reference's `_FP4_E2M1_LUT`).
const FP4_E2M1: [f32; 16] = [
    0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
];

/// FP4 scales cover this many values along K.
pub const FP4_GROUP: usize = 32;

/// The logical `[.., N, K]` shape of a stored quantized weight.
pub fn logical_shape(kind: Quantized, stored: &[usize]) -> Vec<usize> {
    let mut s = stored.to_vec();
    if kind == Quantized::Fp4Packed {
        if let Some(k) = s.last_mut() {
            *k *= 2;
        }
    }
    s
}

/// The scale grid `[.., sn, sk]` a weight of logical shape `[.., N, K]` needs.
pub fn scale_shape(kind: Quantized, logical: &[usize], fp8_block: (usize, usize)) -> Vec<usize> {
    let (bn, bk) = match kind {
        Quantized::Fp8E4m3 => fp8_block,
        Quantized::Fp4Packed => (1, FP4_GROUP),
    };
    let mut s = logical.to_vec();
    let r = s.len();
    if r >= 2 {
        s[r - 2] = s[r - 2].div_ceil(bn);
        s[r - 1] = s[r - 1].div_ceil(bk);
    }
    s
}

/// Dequantize `bytes` (a weight of logical shape `shape`, last two dims `[N, K]`) with its scale
/// grid `scales` (`scale_dtype`, shape from [`scale_shape`]) into f32.
pub fn dequantize(
    kind: Quantized,
    bytes: &[u8],
    shape: &[usize],
    scales: &[u8],
    scale_dtype: ScaleDtype,
    fp8_block: (usize, usize),
) -> Result<Vec<f32>> {
    let r = shape.len();
    if r < 2 {
        bail!("a quantized weight needs at least 2 dims, got {shape:?}");
    }
    let (n, k) = (shape[r - 2], shape[r - 1]);
    let mats: usize = shape[..r - 2].iter().product();
    let grid = scale_shape(kind, shape, fp8_block);
    let (sn, sk) = (grid[r - 2], grid[r - 1]);
    let (bn, bk) = match kind {
        Quantized::Fp8E4m3 => fp8_block,
        Quantized::Fp4Packed => (1, FP4_GROUP),
    };
    let ss = scale_dtype.size();
    let want_w = match kind {
        Quantized::Fp8E4m3 => mats * n * k,
        Quantized::Fp4Packed => mats * n * k / 2,
    };
    if kind == Quantized::Fp4Packed && k % 2 != 0 {
        bail!("an FP4 weight needs an even K, got {k}");
    }
    if bytes.len() != want_w || scales.len() != mats * sn * sk * ss {
        return Err(anyhow!(
            "internal: {} weight bytes and {} scale bytes for shape {shape:?}",
            bytes.len(),
            scales.len()
        ));
    }
    let mut out = vec![0f32; mats * n * k];
    let fp8: Vec<f32> = (0..=255u8).map(e4m3).collect();
    for (r, row) in out.chunks_mut(k).enumerate() {
        // Row `r` of matrix `r / n`: its scales, one per `bk` columns.
        let (m, row_in) = (r / n, r % n);
        let srow = &scales[(m * sn + row_in / bn) * sk * ss..][..sk * ss];
        for (b, block) in row.chunks_mut(bk).enumerate() {
            let scale = scale_dtype.decode(&srow[b * ss..][..ss]);
            let c0 = b * bk;
            match kind {
                Quantized::Fp8E4m3 => {
                    let src = &bytes[r * k + c0..][..block.len()];
                    for (o, &q) in block.iter_mut().zip(src) {
                        *o = fp8[q as usize] * scale;
                    }
                }
                Quantized::Fp4Packed => {
                    // `k` and `bk` are even: pairs of columns share a byte.
                    let src = &bytes[(r * k + c0) / 2..][..block.len() / 2];
                    for (o, &q) in block.chunks_mut(2).zip(src) {
                        o[0] = FP4_E2M1[(q & 0x0f) as usize] * scale;
                        o[1] = FP4_E2M1[(q >> 4) as usize] * scale;
                    }
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn e4m3_values() {
        assert_eq!(e4m3(0x00), 0.0);
        assert_eq!(e4m3(0x38), 1.0); // exp 7, mant 0
        assert_eq!(e4m3(0xb8), -1.0);
        assert_eq!(e4m3(0x7e), 448.0); // the largest
        assert_eq!(e4m3(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert!(e4m3(0x7f).is_nan());
        assert_eq!(e8m0(127), 1.0);
        assert_eq!(e8m0(120), 2f32.powi(-7));
    }

    #[test]
    fn fp8_blocks_and_fp4_nibbles() {
        // FP8 [2, 3] with blocks [1, 2]: scales [2, 2].
        let w = [0x38u8, 0x40, 0x38, 0xb8, 0x38, 0x38]; // 1, 2, 1 / -1, 1, 1
        let s: Vec<u8> = [1f32, 10.0, 100.0, 1000.0]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect();
        let y = dequantize(Quantized::Fp8E4m3, &w, &[2, 3], &s, ScaleDtype::F32, (1, 2)).unwrap();
        assert_eq!(y, vec![1.0, 2.0, 10.0, -100.0, 100.0, 1000.0]);
        // FP4 [1, 64]: byte 0x21 → (0.5, 1.0); scales 2^0 then 2^1.
        let mut w = vec![0u8; 32];
        w[0] = 0x21;
        w[16] = 0xf7; // (6.0, -6.0) in the second group
        let y = dequantize(
            Quantized::Fp4Packed,
            &w,
            &[1, 64],
            &[127, 128],
            ScaleDtype::E8m0,
            (128, 128),
        )
        .unwrap();
        assert_eq!(&y[..2], &[0.5, 1.0]);
        assert_eq!(&y[32..34], &[12.0, -12.0]);
        assert_eq!(logical_shape(Quantized::Fp4Packed, &[4, 16]), vec![4, 32]);
        assert_eq!(
            scale_shape(Quantized::Fp8E4m3, &[200, 300], (128, 128)),
            vec![2, 3]
        );
    }

    #[test]
    fn block_size_from_config() {
        assert_eq!(fp8_block(&json!({})).unwrap(), None);
        let q = json!({"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 32]}});
        assert_eq!(fp8_block(&q).unwrap(), Some((16, 32)));
        let bad = json!({"quantization_config": {"quant_method": "gptq"}});
        assert!(fp8_block(&bad).unwrap_err().to_string().contains("gptq"));
    }
}
