//! Linear projections: the one door every weight matmul goes through.
//!
//! Weights are kept as Hugging Face stores them, `[out, in]`, and applied as `x · Wᵀ (+ b)`.
//!
//! Notable:
//! - CPU kernels of our own: one activation row (the decode step) goes to the row-parallel
//!   gemv of [`crate::kernels::gemv`], which streams each weight byte once at close to memory bandwidth;
//!   several rows (prefill) go to the packing-free tiled GEMM of [`crate::kernels::gemm`]. candle's GEMM
//!   reaches a fraction of the bandwidth at batch 1 and repacks the transposed weight on every
//!   call. Other devices, non-contiguous weights and CPUs without AVX2 (for the GEMM) keep
//!   candle's matmul. All paths accumulate in f32 and agree to f32 rounding.
//!   `LLMARCH_KERNELS=candle` forces candle's matmul for dense weights (for benchmarks).
//! - bf16/f16 weights are read as they are stored and widened in registers, so decode moves half
//!   the bytes of f32; the output comes back in the activation's dtype.
//! - How a matrix is held is chosen once for a whole model build ([`with_weight_format`]):
//!   as the `VarBuilder` loads it (a copy in the load dtype; the GPU path), straight from the
//!   checkpoint's memory map in the dtype it is stored in ([`WeightFormat::Mapped`]: no copy,
//!   the CPU default), or quantized at load ([`Quantization`]: GGML's q8_0, 1.06 bytes per
//!   weight, or q4_0, 0.56). Quantized matrices are made from the mapped bytes a block at a
//!   time, in parallel: no f32 copy of a matrix is ever held. A tied output head reads (or
//!   quantizes) the embedding table itself. Routers stay unquantized
//!   ([`Linear::load_unquantized`]): their output picks experts. Accuracy: within the format's
//!   own rounding of the f32 product (q8_0 ~0.5 %, q4_0 ~8 % relative RMS for Gaussian
//!   weights), tested below.

use super::mapped::MappedTensor;
use super::weight;
use crate::kernels::gemm;
use crate::kernels::gemv::{self, Q4_0Matrix, Q8_0Matrix, WeightRows};
use anyhow::{bail, Context, Result};
use candle_core::{CpuStorage, DType, Device, Storage, Tensor, D};
use candle_nn::VarBuilder;
use std::cell::RefCell;
use std::sync::{Arc, OnceLock};

/// Quantization applied to weights as they are loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// GGML q8_0: blocks of 32 int8 with one f16 scale.
    Q8_0,
    /// GGML q4_0: blocks of 32 4-bit codes with one f16 scale.
    Q4_0,
}

/// How the weight matrices of a model are held once loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// As the `VarBuilder` loads them: a copy in its dtype (GPUs, `--dtype f32`).
    Loaded,
    /// Read from the checkpoint's mapping. `None`: in the dtype they are stored in; `Some(d)`:
    /// in `d`, converted once at load where they are stored otherwise.
    Mapped(Option<DType>),
    /// Quantized at load (matrices whose input width is not a multiple of 32 stay mapped).
    Quantized(Quantization),
}

/// Where mapped weights come from: the loader's validated safetensors mappings.
pub trait MappedSource: Send + Sync {
    /// Tensor `name` (full name) as stored, if it can be served from the mapping (dense F32,
    /// BF16 or F16, aligned); an error when it exists with another shape than `shape`.
    fn mapped(&self, name: &str, shape: &[usize]) -> Result<Option<MappedTensor>>;

    /// A `q` copy of tensor `name` (`[out, in]` = `shape`) that an earlier run kept, if the
    /// source has a valid one (see [`crate::loader::quant_cache`]).
    fn cached(
        &self,
        _name: &str,
        _q: Quantization,
        _shape: (usize, usize),
    ) -> Option<QuantizedMatrix> {
        None
    }

    /// Hears of every matrix quantized from this source, made now or [`MappedSource::cached`],
    /// to keep them for later runs.
    fn quantized(&self, _name: &str, _matrix: &QuantizedMatrix) {}
}

/// A quantized `[out, in]` matrix, shared.
#[derive(Debug, Clone)]
pub enum QuantizedMatrix {
    Q8_0(Arc<Q8_0Matrix>),
    Q4_0(Arc<Q4_0Matrix>),
}

impl From<QuantizedMatrix> for Weight {
    fn from(m: QuantizedMatrix) -> Weight {
        match m {
            QuantizedMatrix::Q8_0(m) => Weight::Q8_0(m),
            QuantizedMatrix::Q4_0(m) => Weight::Q4_0(m),
        }
    }
}

/// What [`with_weight_format`] sets for the builds on this thread.
#[derive(Clone)]
struct LoadScope {
    format: WeightFormat,
    source: Option<Arc<dyn MappedSource>>,
}

thread_local! {
    static LOAD_SCOPE: RefCell<LoadScope> = const {
        RefCell::new(LoadScope { format: WeightFormat::Loaded, source: None })
    };
}

/// Runs `build` with every [`Linear`] it loads held as `format` says, mapped weights coming from
/// `source` (without one, [`WeightFormat::Mapped`] loads copies and quantization quantizes
/// them). The setting is per thread and restored afterwards, even on panic.
pub fn with_weight_format<R>(
    format: WeightFormat,
    source: Option<Arc<dyn MappedSource>>,
    build: impl FnOnce() -> R,
) -> R {
    struct Restore(Option<LoadScope>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Some(s) = self.0.take() {
                LOAD_SCOPE.with(|c| *c.borrow_mut() = s);
            }
        }
    }
    let scope = LoadScope { format, source };
    let _restore = Restore(Some(LOAD_SCOPE.with(|c| c.replace(scope))));
    build()
}

/// [`with_weight_format`] quantizing to `q` (or as loaded, `None`), with no mapping: every
/// matrix is quantized from its loaded copy.
pub fn with_load_quantization<R>(q: Option<Quantization>, build: impl FnOnce() -> R) -> R {
    let format = q.map_or(WeightFormat::Loaded, WeightFormat::Quantized);
    with_weight_format(format, None, build)
}

fn load_scope() -> LoadScope {
    LOAD_SCOPE.with(|c| c.borrow().clone())
}

/// Tensor `name` from the enclosing [`with_weight_format`]'s mapping, when it serves weights
/// from one (mapped or quantized formats) and can serve this tensor; e.g. a lookup table.
pub fn mapped_in_scope(name: &str, shape: &[usize]) -> Result<Option<MappedTensor>> {
    let scope = load_scope();
    match (&scope.source, scope.format) {
        (Some(src), WeightFormat::Mapped(_) | WeightFormat::Quantized(_)) => {
            src.mapped(name, shape)
        }
        _ => Ok(None),
    }
}

/// Whether our CPU kernels run for dense weights (`LLMARCH_KERNELS=candle` turns them off).
fn kernels_enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("LLMARCH_KERNELS").map_or(true, |v| v != "candle"))
}

/// `x · wᵀ` for `x` `[.., in]` and `w` `[out, in]`: `[.., out]`.
pub fn matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (rows, in_dim) = rows_of(x)?;
    let out_dim = w.dim(0)?;
    let x2 = x.reshape((rows, in_dim))?; // [rows, in]
    let fast = if kernels_enabled() {
        dense_kernel(&x2, w)?
    } else {
        None
    };
    let y = match fast {
        Some(y) => y,
        None => plain_matmul_t(&x2, w)?,
    }; // [rows, out]
    Ok(y.reshape(out_shape(x, out_dim))?)
}

/// `(rows, in)` of an activation `[.., in]`.
fn rows_of(x: &Tensor) -> Result<(usize, usize)> {
    let in_dim = match x.dims().last() {
        Some(&d) if d > 0 => d,
        _ => bail!(
            "linear: activation of shape {:?} has no input width",
            x.dims()
        ),
    };
    Ok((x.elem_count() / in_dim, in_dim))
}

fn out_shape(x: &Tensor, out_dim: usize) -> Vec<usize> {
    let mut shape = x.dims().to_vec();
    if let Some(last) = shape.last_mut() {
        *last = out_dim;
    }
    shape
}

/// candle's GEMM: `x` `[rows, in]` · `wᵀ` → `[rows, out]` (a weight held in another dtype
/// than the activations is converted first).
fn plain_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.matmul(&w.to_dtype(x.dtype())?.t()?)?)
}

/// Our kernels over a dense CPU weight: `x` `[rows, in]` → `[rows, out]` in `x`'s dtype, or
/// `None` when they do not apply (not a contiguous f32/bf16/f16 CPU matrix, or no GEMM kernel
/// for this CPU); then candle's matmul runs.
fn dense_kernel(x: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let Ok((out_dim, in_dim)) = w.dims2() else {
        return Ok(None);
    };
    let (rows, x_in) = x.dims2()?;
    if !crate::kernels::fast_cpu(w.device()) || in_dim != x_in {
        return Ok(None);
    }
    let (storage, layout) = w.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Ok(None);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Ok(None);
    };
    let weights = match cpu {
        CpuStorage::F32(v) => WeightRows::F32(&v[start..end]),
        CpuStorage::BF16(v) => WeightRows::Bf16(&v[start..end]),
        CpuStorage::F16(v) => WeightRows::F16(&v[start..end]),
        _ => return Ok(None),
    };
    run_kernel(weights, x, rows, out_dim)
}

/// `x` `[rows, in]` through the gemv (one row, or a few rows at once) or the GEMM; `None` when the GEMM has no kernel
/// for this CPU.
fn run_kernel(
    w: WeightRows<'_>,
    x: &Tensor,
    rows: usize,
    out_dim: usize,
) -> Result<Option<Tensor>> {
    let mut y = vec![0f32; rows * out_dim];
    let done = super::with_f32_slice(x, |xs| -> Result<bool> {
        if rows == 0 {
            // nothing to compute: an empty [0, out]
        } else if takes_gemm(w, rows) {
            return gemm::gemm(w, xs, rows, &mut y);
        } else if rows == 1 {
            gemv::gemv(w, xs, &mut y)?;
        } else {
            gemv::gemv_rows(w, xs, rows, &mut y)?;
        }
        Ok(true)
    })??;
    if !done {
        return Ok(None);
    }
    let y = Tensor::from_vec(y, (rows, out_dim), x.device())?; // [rows, out]
    Ok(Some(y.to_dtype(x.dtype())?))
}

/// Whether `rows` (≥ 1) activation rows go through `w` as a GEMM (a prompt chunk) rather than
/// the gemv: one row; a few rows of narrow weights (nothing is widened to f32); any rows of a
/// verify pass, so each row gets the one-row gemv's bits, as a decode step does.
fn takes_gemm(w: WeightRows<'_>, rows: usize) -> bool {
    rows > 1 && !crate::kernels::in_decode_steps() && !gemv::few_rows(w, rows)
}

/// The stored form of a weight.
#[derive(Debug, Clone)]
enum Weight {
    /// `[out, in]` as a candle tensor.
    Dense(Tensor),
    /// `[out, in]` in the checkpoint's memory map, on the CPU.
    Mapped(Arc<MappedTensor>),
    /// q8_0 rows, on the CPU.
    Q8_0(Arc<Q8_0Matrix>),
    /// q4_0 rows, on the CPU.
    Q4_0(Arc<Q4_0Matrix>),
}

/// A `[out, in]` weight and an optional `[out]` bias.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

/// Projections of one input run together: a layer's q/k/v, an MLP's gate and up. On the CPU's
/// fast path they stay apart, and [`Linear::forward_many`] takes them in one pass over their
/// weights. On the device path (a GPU, the generic path) the weights are stacked `[Σ out, in]`
/// once, at load, so a forward is one product instead of one per projection (a GPU decode step
/// is bound by its launches); the outputs are views of its columns (no copy for one row).
#[derive(Debug)]
pub enum LinearGroup {
    Apart(Vec<Linear>),
    Stacked { linear: Linear, outs: Vec<usize> },
}

impl LinearGroup {
    /// Stacks `parts` where the device path runs them and they are plain tensors of one dtype
    /// and input width, without bias; keeps them apart otherwise.
    pub fn new(parts: Vec<Linear>) -> Result<Self> {
        let dense: Option<Vec<&Tensor>> = parts
            .iter()
            .map(|l| match (&l.weight, &l.bias) {
                (Weight::Dense(w), None) => Some(w),
                _ => None,
            })
            .collect();
        let Some(ws) = dense.filter(|ws| {
            ws.len() > 1
                && !crate::kernels::fast_cpu(ws[0].device())
                && ws.iter().all(|w| {
                    w.rank() == 2
                        && w.dtype() == ws[0].dtype()
                        && w.dim(1).ok() == ws[0].dim(1).ok()
                })
        }) else {
            return Ok(LinearGroup::Apart(parts));
        };
        let outs = ws
            .iter()
            .map(|w| w.dim(0))
            .collect::<candle_core::Result<_>>()?;
        let stacked = Tensor::cat(&ws, 0)?; // [Σ out, in]
        Ok(LinearGroup::Stacked {
            linear: Linear::from_weight(stacked, None),
            outs,
        })
    }

    /// `x` `[.., in]` → one `[.., out]` per projection, in order.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        match self {
            LinearGroup::Apart(ls) => Linear::forward_many(&ls.iter().collect::<Vec<_>>(), x),
            LinearGroup::Stacked { linear, outs } => {
                let y = linear.forward(x)?; // [.., Σ out]
                let mut at = 0;
                outs.iter()
                    .map(|&o| {
                        at += o;
                        Ok(y.narrow(D::Minus1, at - o, o)?)
                    })
                    .collect()
            }
        }
    }
}

impl Linear {
    /// Read `weight` `[out, in]` (and `bias` `[out]` when `bias`) under `vb`, held as the
    /// enclosing [`with_weight_format`] says.
    pub fn load(vb: &VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let name = weight::full_name(vb, "weight");
        let bias = if bias {
            Some(weight::get(vb, out_dim, "bias")?)
        } else {
            None
        };
        let linear = match mapped_in_scope(&name, &[out_dim, in_dim])? {
            Some(m) => Linear {
                weight: Weight::Mapped(Arc::new(m)),
                bias,
            },
            None => Linear::from_weight(weight::get(vb, (out_dim, in_dim), "weight")?, bias),
        };
        linear
            .held_as(load_scope().format)
            .with_context(|| format!("tensor `{name}`"))
    }

    /// [`Linear::load`], never quantized, even inside a quantizing [`with_weight_format`]: for
    /// routers, whose output is a discrete choice (which experts run) that a rounding error
    /// would flip (llama.cpp keeps them unquantized too), and which are small.
    pub fn load_unquantized(
        vb: &VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
    ) -> Result<Self> {
        let scope = load_scope();
        let format = match scope.format {
            WeightFormat::Quantized(_) => WeightFormat::Mapped(None),
            f => f,
        };
        with_weight_format(format, scope.source, || {
            Linear::load(vb, in_dim, out_dim, bias)
        })
    }

    /// A projection over an existing weight.
    pub fn from_weight(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            weight: Weight::Dense(weight),
            bias,
        }
    }

    /// A projection over a mapped table (a tied output head), held as the enclosing
    /// [`with_weight_format`] says (a quantized copy, or the mapping itself).
    pub fn from_mapped(weight: MappedTensor, bias: Option<Tensor>) -> Result<Self> {
        Linear {
            weight: Weight::Mapped(Arc::new(weight)),
            bias,
        }
        .held_as(load_scope().format)
    }

    /// [`Linear::from_weight`], quantized or converted as the enclosing [`with_weight_format`]
    /// says (the original tensor is left as it is, e.g. for the embedding lookup it is shared
    /// with).
    pub fn quantized_from_weight(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Linear::from_weight(weight, bias).held_as(load_scope().format)
    }

    /// This projection held as `format`: quantized (input widths that are a multiple of 32),
    /// converted to a mapped format's dtype, or as it is. A matrix that stays in the mapping has
    /// its pages mapped now; one quantized from the mapping gives its pages back.
    fn held_as(self, format: WeightFormat) -> Result<Self> {
        let held = match format {
            // (From the mapping, `quantize` gives each slab's pages back as it goes.)
            WeightFormat::Quantized(q) if self.in_dim()?.is_multiple_of(gemv::Q8_BLOCK) => {
                return self.quantize(q);
            }
            WeightFormat::Mapped(Some(dtype)) => match &self.weight {
                Weight::Mapped(m) if m.dtype() != dtype => {
                    let w = m.to_tensor(dtype, &Device::Cpu)?;
                    m.release();
                    Linear {
                        weight: Weight::Dense(w),
                        bias: self.bias,
                    }
                }
                Weight::Dense(w) if w.dtype() != dtype => Linear {
                    weight: Weight::Dense(w.to_dtype(dtype)?),
                    bias: self.bias,
                },
                _ => self,
            },
            _ => self,
        };
        if let Weight::Mapped(m) = &held.weight {
            m.populate();
        }
        Ok(held)
    }

    /// This projection with `bias` `[out]` added (replacing any).
    pub fn with_bias(self, bias: Option<Tensor>) -> Self {
        Linear { bias, ..self }
    }

    /// The dense `[out, in]` weight as a candle tensor; `None` when mapped or quantized.
    pub fn weight(&self) -> Option<&Tensor> {
        match &self.weight {
            Weight::Dense(w) => Some(w),
            _ => None,
        }
    }

    /// How the weight is held: `f32`, `bf16`, `f16`, `q8_0` or `q4_0`.
    pub fn format_name(&self) -> String {
        match &self.weight {
            Weight::Dense(w) => format!("{:?}", w.dtype()).to_lowercase(),
            Weight::Mapped(m) => format!("{:?}", m.dtype()).to_lowercase(),
            Weight::Q8_0(_) => "q8_0".into(),
            Weight::Q4_0(_) => "q4_0".into(),
        }
    }

    fn in_dim(&self) -> Result<usize> {
        Ok(match &self.weight {
            Weight::Dense(w) => w.dim(1)?,
            Weight::Mapped(m) => m.dims2().1,
            Weight::Q8_0(m) => m.in_dim(),
            Weight::Q4_0(m) => m.in_dim(),
        })
    }

    /// This projection with its weight quantized to q8_0 (see [`gemv::Q8_0Matrix`]). CPU only;
    /// the input width must be a multiple of 32. Already quantized: unchanged.
    pub fn quantize_q8_0(self) -> Result<Self> {
        self.quantize(Quantization::Q8_0)
    }

    /// This projection with its weight quantized to `q`, straight from the weight's own dtype
    /// (no f32 copy of a mapped or 16-bit matrix is made). CPU only; the input width must be a
    /// multiple of 32. Already quantized: unchanged.
    pub fn quantize(self, q: Quantization) -> Result<Self> {
        /// The matrix `w` quantized to `q`; `done` hears of each finished slab of rows.
        fn make(
            q: Quantization,
            w: WeightRows<'_>,
            (out, n): (usize, usize),
            done: &mut dyn FnMut(std::ops::Range<usize>),
        ) -> Result<QuantizedMatrix> {
            macro_rules! by_dtype {
                ($w:expr) => {
                    match q {
                        Quantization::Q8_0 => QuantizedMatrix::Q8_0(Arc::new(
                            Q8_0Matrix::quantize_with($w, out, n, done)?,
                        )),
                        Quantization::Q4_0 => QuantizedMatrix::Q4_0(Arc::new(
                            Q4_0Matrix::quantize_with($w, out, n, done)?,
                        )),
                    }
                };
            }
            Ok(match w {
                WeightRows::F32(w) => by_dtype!(w),
                WeightRows::Bf16(w) => by_dtype!(w),
                WeightRows::F16(w) => by_dtype!(w),
                _ => bail!("internal: quantizing an already quantized matrix"),
            })
        }
        let weight = match &self.weight {
            Weight::Q8_0(_) | Weight::Q4_0(_) => return Ok(self),
            // From the mapping, slab by slab, each slab's pages given back once quantized: a
            // 262,144-row tied head never sits in memory whole. Or as an earlier run kept it.
            Weight::Mapped(m) => {
                let cache = load_scope().source.zip(m.name());
                let kept = cache
                    .as_ref()
                    .and_then(|(s, name)| s.cached(name, q, m.dims2()));
                let made = match kept {
                    Some(kept) => kept,
                    None => make(q, m.rows(), m.dims2(), &mut |rows| m.release_rows(rows))?,
                };
                if let Some((s, name)) = &cache {
                    s.quantized(name, &made);
                }
                made.into()
            }
            Weight::Dense(w) => {
                if !w.device().is_cpu() {
                    bail!("quantized weights run on the CPU only");
                }
                let shape = w.dims2()?;
                // A contiguous weight is read in place: no second copy of the matrix, however
                // large (a tied head is the whole embedding table).
                let (storage, layout) = w.storage_and_layout();
                let none = &mut |_| {};
                match (&*storage, layout.contiguous_offsets()) {
                    (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
                        make(q, WeightRows::F32(&v[a..b]), shape, none)?.into()
                    }
                    (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => {
                        make(q, WeightRows::Bf16(&v[a..b]), shape, none)?.into()
                    }
                    (Storage::Cpu(CpuStorage::F16(v)), Some((a, b))) => {
                        make(q, WeightRows::F16(&v[a..b]), shape, none)?.into()
                    }
                    _ => {
                        drop(storage);
                        let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                        make(q, WeightRows::F32(&values), shape, none)?.into()
                    }
                }
            }
        };
        Ok(Linear {
            weight,
            bias: self.bias,
        })
    }

    /// `[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match self.stored() {
            Ok((w, shape)) => rows_matmul_t(x, w, shape)?,
            Err(w) => matmul_t(x, w)?,
        };
        self.add_bias(y)
    }

    /// `x` `[.., in]` through several projections that read it (a layer's q/k/v, an MLP's gate
    /// and up): on the CPU, one parallel pass over all their weights, `x` prepared once (one row:
    /// [`gemv::gemv_many`], `x` quantized once; a prompt chunk: [`gemm::gemm_many`], `x` rounded
    /// to bf16 once); otherwise one after the other.
    pub fn forward_many(ls: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let (rows, in_dim) = rows_of(x)?;
        let ws: Option<Vec<_>> = ls.iter().map(|l| l.stored().ok()).collect();
        let Some(ws) = ws.filter(|ws| {
            crate::kernels::fast_cpu(x.device())
                && rows > 0
                && ws.iter().all(|(_, (_, i))| *i == in_dim)
                // One row to the gemv, or every weight to the GEMM (as `run_kernel` chooses).
                && (rows == 1 || ws.iter().all(|(w, _)| takes_gemm(*w, rows)))
        }) else {
            return ls.iter().map(|l| l.forward(x)).collect();
        };
        let mut outs: Vec<Vec<f32>> = ws.iter().map(|(_, (o, _))| vec![0f32; rows * o]).collect();
        let mut ys: Vec<&mut [f32]> = outs.iter_mut().map(|v| v.as_mut_slice()).collect();
        let weights: Vec<WeightRows<'_>> = ws.iter().map(|(w, _)| *w).collect();
        let done = super::with_f32_slice(x, |xs| -> Result<bool> {
            if rows == 1 {
                gemv::gemv_many(&weights, xs, &mut ys)?;
                Ok(true)
            } else {
                gemm::gemm_many(&weights, xs, rows, &mut ys)
            }
        })??;
        if !done {
            return ls.iter().map(|l| l.forward(x)).collect();
        }
        outs.into_iter()
            .zip(ls)
            .map(|(y, l)| {
                let shape = out_shape(x, y.len() / rows);
                l.add_bias(Tensor::from_vec(y, shape, x.device())?.to_dtype(x.dtype())?)
            })
            .collect()
    }

    /// The weight as rows our kernels read, with its `(out, in)`, or the candle tensor it is.
    fn stored(&self) -> std::result::Result<(WeightRows<'_>, (usize, usize)), &Tensor> {
        match &self.weight {
            Weight::Dense(w) => Err(w),
            Weight::Mapped(m) => Ok((m.rows(), m.dims2())),
            Weight::Q8_0(m) => Ok((WeightRows::Q8_0(m), (m.out_dim(), m.in_dim()))),
            Weight::Q4_0(m) => Ok((WeightRows::Q4_0(m), (m.out_dim(), m.in_dim()))),
        }
    }

    fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(y.dtype())?)?,
            None => y,
        })
    }
}

/// The output head `[vocab, hidden]`: the token embedding `embedding` when the config ties them,
/// else `weight` under `lm_head` (the checkpoint's untied head). Held as the enclosing
/// [`with_weight_format`] says either way.
pub fn output_head(
    tied: bool,
    embedding: &super::embedding::ScaledEmbedding,
    lm_head: Option<VarBuilder>,
    hidden: usize,
    vocab: usize,
) -> Result<Linear> {
    if tied {
        // The lookup keeps reading the table; the head reads it too (or a quantized copy).
        return embedding.as_linear(None);
    }
    let vb = lm_head.ok_or_else(|| {
        anyhow::anyhow!("the config unties the output head (`tie_word_embeddings` is false) but the checkpoint has no `lm_head.weight`")
    })?;
    Linear::load(&vb, hidden, vocab, false)
}

/// `x · Wᵀ` for a CPU weight the kernels read directly (mapped or quantized), in `x`'s dtype:
/// our kernels, or (a CPU without the GEMM kernel) tiles of widened rows through candle's matmul.
fn rows_matmul_t(
    x: &Tensor,
    w: WeightRows<'_>,
    (out_dim, in_dim): (usize, usize),
) -> Result<Tensor> {
    let (rows, x_in) = rows_of(x)?;
    if in_dim != x_in || !x.device().is_cpu() {
        bail!(
            "CPU linear [{out_dim}, {in_dim}] applied to activations {:?} on {:?}",
            x.dims(),
            x.device().location()
        );
    }
    let x2 = x.reshape((rows, in_dim))?; // [rows, in]
    let y = match run_kernel(w, &x2, rows, out_dim)? {
        Some(y) => y,
        None => {
            // ~2 MB of f32 weights per tile.
            let tile = ((2 << 20) / (4 * in_dim)).clamp(1, out_dim);
            let x2 = x2.to_dtype(DType::F32)?;
            let mut parts = vec![];
            for start in (0..out_dim).step_by(tile) {
                let n = tile.min(out_dim - start);
                let mut wt = vec![0f32; n * in_dim];
                w.widen_block(in_dim, (start, n), (0, in_dim), &mut wt);
                let wt = Tensor::from_vec(wt, (n, in_dim), &Device::Cpu)?; // [n, in]
                parts.push(x2.matmul(&wt.t()?)?); // [rows, n]
            }
            Tensor::cat(&parts, 1)?.to_dtype(x.dtype())? // [rows, out]
        }
    };
    Ok(y.reshape(out_shape(x, out_dim))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::gemv::tests::activations_as_multiplied;
    use crate::kernels::gemv::Isa;
    use candle_core::Device;

    #[test]
    fn applies_the_transposed_weight_and_bias() {
        let dev = Device::Cpu;
        let w = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap(); // [3, 2]
        let b = Tensor::new(&[0.5f32, 0.0, -1.0], &dev).unwrap();
        let x = Tensor::new(&[[[1f32, 1.0], [0.0, 2.0]]], &dev).unwrap(); // [1, 2, 2]
        let lin = Linear::from_weight(w, Some(b));
        let y: Vec<Vec<Vec<f32>>> = lin.forward(&x).unwrap().to_vec3().unwrap();
        assert_eq!(y, vec![vec![vec![3.5, 7.0, 10.0], vec![4.5, 8.0, 11.0]]]);
        // One row: the gemv path, same numbers.
        let x1 = x.narrow(1, 1, 1).unwrap(); // [1, 1, 2]
        let y: Vec<Vec<Vec<f32>>> = lin.forward(&x1).unwrap().to_vec3().unwrap();
        assert_eq!(y, vec![vec![vec![4.5, 8.0, 11.0]]]);
        // No rows: an empty result, as candle's matmul gives.
        let x0 = x.narrow(1, 0, 0).unwrap(); // [1, 0, 2]
        assert_eq!(lin.forward(&x0).unwrap().dims(), &[1, 0, 3]);
        let q = Linear::from_weight(Tensor::ones((3, 32), DType::F32, &dev).unwrap(), None);
        let x0 = Tensor::zeros((1, 0, 32), DType::F32, &dev).unwrap();
        let q = q.quantize_q8_0().unwrap();
        assert_eq!(q.forward(&x0).unwrap().dims(), &[1, 0, 3]);
    }

    /// Largest `|a − b|` relative to the largest `|b|`.
    fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
        let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        let d = (a - &b).unwrap().abs().unwrap().max(0).unwrap();
        let m = b.abs().unwrap().max(0).unwrap();
        d.to_scalar::<f32>().unwrap() / m.to_scalar::<f32>().unwrap().max(1e-30)
    }

    const SHAPES: &[(usize, usize)] = &[(1, 1), (3, 7), (5, 17), (33, 100), (130, 1023), (9, 2050)];

    #[test]
    fn the_kernels_match_candles_matmul_at_every_batch() {
        let dev = Device::Cpu;
        for &(out, n) in SHAPES {
            let w = Tensor::randn(0f32, 1.0, (out, n), &dev).unwrap();
            for rows in [1, 2, 5] {
                // A non-contiguous [1, rows, n] activation: every other column of [.., 2n].
                let wide = Tensor::randn(0f32, 1.0, (1, rows, n, 2), &dev).unwrap();
                let x = wide.narrow(3, 0, 1).unwrap().squeeze(3).unwrap(); // [1, rows, n]
                let x2 = x.reshape((rows, n)).unwrap();
                let what = format!("[{rows}, {n}] · [{out}, {n}]ᵀ");
                let fast = matmul_t(&x, &w).unwrap();
                assert_eq!(fast.dims(), &[1, rows, out]);
                let plain = plain_matmul_t(&x2, &w)
                    .unwrap()
                    .reshape((1, rows, out))
                    .unwrap();
                let d = rel_diff(&fast, &plain);
                assert!(d < 1e-5, "f32 {what}: {d:e}");
                if rows == 1 || gemv::Isa::get() != gemv::Isa::Portable {
                    assert!(
                        dense_kernel(&x2, &w).unwrap().is_some(),
                        "{what}: no kernel ran"
                    );
                }

                for dt in [DType::BF16, DType::F16] {
                    let (wd, xd) = (w.to_dtype(dt).unwrap(), x.to_dtype(dt).unwrap());
                    let fast = matmul_t(&xd, &wd).unwrap();
                    assert_eq!(fast.dtype(), dt);
                    // The same narrow values multiplied in f32, then rounded once.
                    let want = plain_matmul_t(
                        &xd.reshape((rows, n)).unwrap().to_dtype(DType::F32).unwrap(),
                        &wd.to_dtype(DType::F32).unwrap(),
                    )
                    .unwrap()
                    .reshape((1, rows, out))
                    .unwrap();
                    let d = rel_diff(&fast, &want);
                    let tol = if dt == DType::BF16 {
                        2f32.powi(-8)
                    } else {
                        2f32.powi(-11)
                    };
                    assert!(d <= tol, "{dt:?} {what}: {d:e}");
                }
            }
        }
    }

    /// Under `as_decode_steps` (a verify pass) each row of a several-row product has the bits
    /// of that row alone (a decode step), for f32 and bf16 weights, past eight rows.
    #[test]
    fn verify_pass_rows_have_a_decode_steps_bits() {
        let dev = Device::Cpu;
        let bits = |t: &Tensor| -> Vec<u32> {
            let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            v.into_iter().map(f32::to_bits).collect()
        };
        for &(out, n) in &[(33, 100), (130, 1023), (9, 2050)] {
            let w = Tensor::randn(0f32, 1.0, (out, n), &dev).unwrap();
            for w in [w.clone(), w.to_dtype(DType::BF16).unwrap()] {
                for rows in [2, 5, 11] {
                    let x = Tensor::randn(0f32, 1.0, (rows, n), &dev).unwrap();
                    let all = crate::kernels::as_decode_steps(|| dense_kernel(&x, &w));
                    let all = all.unwrap().expect("a kernel ran");
                    for r in 0..rows {
                        let one = dense_kernel(&x.narrow(0, r, 1).unwrap(), &w).unwrap();
                        let what = format!("{:?} [{out}, {n}], row {r} of {rows}", w.dtype());
                        assert_eq!(bits(&all.get(r).unwrap()), bits(&one.unwrap()), "{what}");
                    }
                }
            }
        }
    }

    #[test]
    fn a_weight_view_with_an_offset_takes_the_kernel_and_a_transposed_one_does_not() {
        let dev = Device::Cpu;
        let all = Tensor::randn(0f32, 1.0, (3, 40, 24), &dev).unwrap();
        let w = all.get(1).unwrap(); // [40, 24], storage offset 960
        let x = Tensor::randn(0f32, 1.0, (1, 24), &dev).unwrap();
        let y = dense_kernel(&x, &w).unwrap().unwrap();
        assert!(rel_diff(&y, &plain_matmul_t(&x, &w).unwrap()) < 1e-5);
        let wt = all.get(1).unwrap().t().unwrap(); // [24, 40], strided
        let x = Tensor::randn(0f32, 1.0, (1, 40), &dev).unwrap();
        assert!(dense_kernel(&x, &wt).unwrap().is_none());
        let y = matmul_t(&x, &wt).unwrap();
        assert!(rel_diff(&y, &plain_matmul_t(&x, &wt).unwrap()) < 1e-6);
    }

    #[test]
    fn q8_0_linear_matches_its_dequantized_weight_at_every_batch() {
        let dev = Device::Cpu;
        let (out, n) = (70, 96);
        let w = Tensor::randn(0f32, 1.0, (out, n), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, out, &dev).unwrap();
        let q = Linear::from_weight(w.clone(), Some(b.clone()))
            .quantize_q8_0()
            .unwrap();
        assert!(q.weight().is_none());
        let Weight::Q8_0(m) = &q.weight else {
            panic!("not quantized")
        };
        let deq = m.dequantize();
        let deq = Tensor::from_vec(deq, (out, n), &dev).unwrap();
        // Quantization error stays within q8_0's step (~1% of each block's largest weight).
        assert!(rel_diff(&deq, &w) < 0.01);
        let dense = Linear::from_weight(deq, Some(b));
        for rows in [1, 2, 5] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, n), &dev).unwrap();
            // The activations as the q8_0 kernels multiply them (rounded to q8 with AVX512-VNNI).
            let xm: Vec<f32> = x
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
                .chunks(n)
                .flat_map(|r| activations_as_multiplied(Isa::get(), r))
                .collect();
            let xm = Tensor::from_vec(xm, (1, rows, n), &dev).unwrap();
            let (yq, yd) = (q.forward(&x).unwrap(), dense.forward(&xm).unwrap());
            assert_eq!(yq.dims(), &[1, rows, out]);
            assert!(rel_diff(&yq, &yd) < 1e-5, "{rows} rows");
        }
        // bf16 activations come back in bf16 (a bf16 model has no f32 bias).
        let q = Linear::from_weight(w, None).quantize_q8_0().unwrap();
        for rows in [1, 3] {
            let x = Tensor::randn(0f32, 1.0, (1, rows, n), &dev)
                .unwrap()
                .to_dtype(DType::BF16)
                .unwrap();
            assert_eq!(q.forward(&x).unwrap().dtype(), DType::BF16);
        }
    }

    #[test]
    fn load_quantization_applies_inside_the_scope_and_skips_odd_widths() {
        let dev = Device::Cpu;
        let mut ts = std::collections::HashMap::new();
        ts.insert(
            "a.weight".to_string(),
            Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap(),
        );
        ts.insert(
            "b.weight".to_string(),
            Tensor::randn(0f32, 1.0, (8, 33), &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
        let (a, b) = with_load_quantization(Some(Quantization::Q8_0), || {
            (
                Linear::load(&vb.pp("a"), 64, 8, false).unwrap(),
                Linear::load(&vb.pp("b"), 33, 8, false).unwrap(),
            )
        });
        assert!(a.weight().is_none(), "64 wide: quantized");
        assert!(b.weight().is_some(), "33 wide: kept dense");
        assert!(Linear::load(&vb.pp("a"), 64, 8, false)
            .unwrap()
            .weight()
            .is_some());
    }
}

/// q8_0 projections against the f32 ones they were quantized from: the error must stay at
/// q8_0's own (~0.5 % relative RMS for Gaussian weights), on both paths (one row: the gemv;
/// several: the GEMM), at widths with one and several GEMM panels, odd output widths, and
/// from several threads at once. A wrong scale, block or row (a misindexed `scales`, a panel
/// offset dropped, a task boundary shifted) shows up as tens of percent.
#[cfg(test)]
mod q8_0_accuracy_tests {
    use super::*;
    use crate::kernels::gemv::tests::normal;
    use candle_core::Device;

    /// `‖a − b‖ / ‖b‖` over every element.
    fn rel_rms(a: &Tensor, b: &Tensor) -> f64 {
        let v = |t: &Tensor| -> Vec<f32> {
            t.to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        gemv::tests::rel_rms(&v(a), &v(b))
    }

    /// (out, in): odd outputs, one block, several blocks, an odd block count across three GEMM
    /// panels (2080 = 65 blocks), two panels (1536), six panels (6144), many gemv tasks.
    const SHAPES: &[(usize, usize)] = &[
        (33, 32),
        (7, 64),
        (65, 96),
        (257, 1536),
        (31, 2080),
        (19, 6144),
        (1027, 256),
    ];

    /// The bound: q8_0's rounding gives 0.45-0.6 % here; any misplaced scale or block gives
    /// far more.
    const TOL: f64 = 0.01;

    #[test]
    fn q8_0_forward_stays_within_quantization_error_of_the_f32_forward() {
        let dev = Device::Cpu;
        for (s, &(out, n)) in SHAPES.iter().enumerate() {
            let w = Tensor::from_vec(normal(out * n, 0.02, s as u64), (out, n), &dev).unwrap();
            let b = Tensor::from_vec(normal(out, 0.02, 99), out, &dev).unwrap();
            let dense = Linear::from_weight(w.clone(), Some(b.clone()));
            let q = Linear::from_weight(w, Some(b)).quantize_q8_0().unwrap();
            assert!(q.weight().is_none());
            for rows in [1, 2, 5, 17, 64] {
                // At least ~60 outputs per case so the ratio is not one noisy number.
                if out * rows < 60 {
                    continue;
                }
                let x = normal(rows * n, 1.0, 1000 + s as u64 * 7 + rows as u64);
                let x = Tensor::from_vec(x, (1, rows, n), &dev).unwrap();
                let (yq, yd) = (q.forward(&x).unwrap(), dense.forward(&x).unwrap());
                assert_eq!(yq.dims(), &[1, rows, out]);
                let e = rel_rms(&yq, &yd);
                assert!(
                    e < TOL,
                    "[{rows}, {n}] · [{out}, {n}]ᵀ: q8_0 is {:.2} % off the f32 product",
                    100.0 * e
                );
                // One row at a time (the gemv) gives the rows of the several-row GEMM.
                if rows > 1 && rows <= 5 {
                    for r in 0..rows {
                        let one = q.forward(&x.narrow(1, r, 1).unwrap()).unwrap();
                        let e = rel_rms(&one, &yq.narrow(1, r, 1).unwrap());
                        assert!(e < 1e-5, "[{out}, {n}] row {r} of {rows}: {e:e}");
                    }
                }
            }
        }
    }

    #[test]
    fn q8_0_forward_from_several_threads_at_once_gives_the_same_numbers() {
        let dev = Device::Cpu;
        let (out, n) = (257, 1536);
        let w = Tensor::from_vec(normal(out * n, 0.02, 5), (out, n), &dev).unwrap();
        let q = Linear::from_weight(w, None).quantize_q8_0().unwrap();
        let xs: Vec<Tensor> = [1, 3, 8]
            .iter()
            .map(|&rows| {
                Tensor::from_vec(normal(rows * n, 1.0, rows as u64), (rows, n), &dev).unwrap()
            })
            .collect();
        let want: Vec<Vec<f32>> = xs
            .iter()
            .map(|x| {
                q.forward(x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        std::thread::scope(|s| {
            for t in 0..4 {
                let (q, xs, want) = (&q, &xs, &want);
                s.spawn(move || {
                    for i in 0..30 {
                        let k = (t + i) % xs.len();
                        let y: Vec<f32> = q
                            .forward(&xs[k])
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        assert_eq!(y, want[k], "thread {t}, call {i}");
                    }
                });
            }
        });
    }

    #[test]
    fn routers_stay_dense_inside_load_quantization() {
        let dev = Device::Cpu;
        let mut ts = std::collections::HashMap::new();
        ts.insert(
            "r.weight".to_string(),
            Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap(),
        );
        let vb = VarBuilder::from_tensors(ts, DType::F32, &dev);
        let (r, p) = with_load_quantization(Some(Quantization::Q8_0), || {
            (
                Linear::load_unquantized(&vb.pp("r"), 64, 8, false).unwrap(),
                Linear::load(&vb.pp("r"), 64, 8, false).unwrap(),
            )
        });
        assert!(r.weight().is_some() && p.weight().is_none());
        // ... and the scope is back afterwards.
        let p = with_load_quantization(Some(Quantization::Q8_0), || {
            let _ = Linear::load_unquantized(&vb.pp("r"), 64, 8, false).unwrap();
            Linear::load(&vb.pp("r"), 64, 8, false).unwrap()
        });
        assert!(p.weight().is_none());
        // A tied head is quantized inside the scope, the embedding it reads is not touched.
        let emb = super::super::embedding::ScaledEmbedding::from_tensor(
            Tensor::randn(0f32, 1.0, (16, 32), &dev).unwrap(),
            1.0,
        )
        .unwrap();
        let head = with_load_quantization(Some(Quantization::Q8_0), || {
            output_head(true, &emb, None, 32, 16).unwrap()
        });
        assert!(head.weight().is_none());
        assert!(output_head(true, &emb, None, 32, 16)
            .unwrap()
            .weight()
            .is_some());
    }
}
