//! Fused kernels for the CUDA path (`fused.cu`, compiled to PTX by `build.rs`). A decode step on
//! a GPU is bound by the cost of each tensor op, not by memory: candle launches one kernel, with
//! its own allocation, per op (about 1,300 per Gemma 4 E2B token, 35 layers, before these). Each
//! kernel here does in one launch what a chain of ops did, with the chain's roundings (checked
//! against it by `examples/op_cost.rs` on a GPU: bit for bit at bf16, but for the RoPE products'
//! roundings):
//! - [`gated`]: a gated MLP's `act(gate) · up`: four launches (cast, activation, cast, product);
//! - [`softmax`]: attention's softmax of 16-bit scores in f32 with its additive mask: three;
//! - [`residual_norm`]: the residual add between two RMS norms (and Gemma 4's layer scalar):
//!   two to four;
//! - [`norm_rope`]: the per-head q/k norm, the heads' transpose and the rotation: three;
//! - [`attention`]: a decode step's attention over a few keys: five.
//!
//! Each returns `None` where it does not apply (another device, a build without `cuda`, an
//! unsupported dtype or layout), and the caller runs candle's ops. Metal and the generic CPU path
//! take those ops; the CUDA fixtures run (`scripts/cuda_fixtures.py`) checks the kernels against
//! the reference in whole models.

use anyhow::Result;
use candle_core::Tensor;

/// `act(gate) · up` (GELU-tanh, or SiLU with `silu`) in one kernel, for CUDA tensors of one
/// shape and dtype (f32, bf16, f16); `None` elsewhere.
pub fn gated(silu: bool, gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if gate.device().is_cuda() && gate.shape() == up.shape() && gate.dtype() == up.dtype() {
        let (gate, up) = (gate.contiguous()?, up.contiguous()?);
        return Ok(Some(gate.apply_op2_no_bwd(&up, &cuda::Gated { silu })?));
    }
    let _ = (silu, gate, up);
    Ok(None)
}

/// Softmax over the last dimension of `scores · scale` `[.., n, t]` plus `mask` `[n, t]` (f32,
/// additive, broadcast over the leading dimensions): the scaling in the scores' dtype (no op for
/// 1), then one kernel computing the rest in f32 and returning the scores' dtype, for CUDA
/// tensors; `None` elsewhere.
pub fn softmax(scores: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if scores.device().is_cuda() && scores.rank() >= 2 {
        let scores = if scale == 1.0 {
            scores.contiguous()?
        } else {
            (scores * scale)?
        };
        let mask = match mask {
            Some(m) => Some(m.to_dtype(candle_core::DType::F32)?.contiguous()?),
            None => None,
        };
        let op = cuda::Softmax { mask };
        return Ok(Some(scores.apply_op1_no_bwd(&op)?));
    }
    let _ = (scores, scale, mask);
    Ok(None)
}

/// `h' = h + norm1(x)` (`h + x` without `norm1`), times `scale` `[1]` where given, and, with
/// `norm2`, `y = norm2(h')`, in one kernel for bf16/f16/f32 CUDA tensors `[.., dim]` of one
/// shape; each norm `(scale [dim], eps)` as candle's RMSNorm kernel computes it (f32, rounded
/// once), the sum rounded once. `None` elsewhere.
pub fn residual_norm(
    h: &Tensor,
    x: &Tensor,
    norm1: Option<(&Tensor, f64)>,
    scale: Option<&Tensor>,
    norm2: Option<(&Tensor, f64)>,
) -> Result<Option<(Tensor, Option<Tensor>)>> {
    #[cfg(feature = "cuda")]
    if h.device().is_cuda() && h.shape() == x.shape() && h.dtype() == x.dtype() && h.rank() >= 1 {
        let op = cuda::ResidualNorm {
            norm1: norm1.map(|(w, e)| (w.clone(), e)),
            scale: scale.cloned(),
            norm2: norm2.map(|(w, e)| (w.clone(), e)),
        };
        let both = h.contiguous()?.apply_op2_no_bwd(&x.contiguous()?, &op)?; // [1 or 2, ..]
        let y = match norm2 {
            Some(_) => Some(both.get(1)?),
            None => None,
        };
        return Ok(Some((both.get(0)?, y)));
    }
    let _ = (h, x, norm1, scale, norm2);
    Ok(None)
}

/// Keys at most for [`attention`]. Its kernel gives each query row one block of threads, whose
/// warps take the keys one at a time: on an H200 it took 80 µs of GPU time for 8 rows over 300
/// keys (bf16, head dim 256), about 0.27 µs per key, against the chain's five launches (about
/// 40 µs of host time on a step bound by launches). Over the 2048 keys after a long prompt it
/// made Gemma 4 E2B's decode 0.67× the chain's. So it runs where the keys are few; a kernel that
/// splits the keys over blocks (flash decoding) is what longer contexts need.
pub const ATTENTION_MAX_KEYS: usize = 128;

/// Query positions at most for [`attention`] (a decode step, a draft's verification): a prompt
/// chunk's products are cuBLAS's work (tensor cores), not launch-bound.
pub const ATTENTION_MAX_QUERIES: usize = 16;

/// `softmax(q·kᵀ·scale + mask)·v` in one kernel, with the roundings of [`attention`]'s chain of
/// candle ops (scores rounded to the dtype, scaled in it unless `scale` is 1, the softmax in
/// f32, probabilities rounded): q `[b, hkv, rows, d]` (a KV head's `rows` = its query heads ×
/// `n` positions), k `[b, hkv, t, d]` and v `[b, hkv, t, dv]` with contiguous rows (views of the
/// KV store's buffers), mask `[n, t]` f32 additive → `[b, hkv, rows, dv]`. CUDA tensors with at
/// most [`ATTENTION_MAX_KEYS`] keys and [`ATTENTION_MAX_QUERIES`] positions; `None` elsewhere.
///
/// [`attention`]: crate::layers::attention::attend
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    n: usize,
    scale: f64,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if q.device().is_cuda() && q.rank() == 4 && k.rank() == 4 && v.rank() == 4 {
        let (b, hkv, rows, d) = q.dims4()?;
        let t = k.dim(2)?;
        let rows_ok = |x: &Tensor| {
            let s = x.stride();
            s[3] == 1 && s[2] == x.dim(3).unwrap_or(0)
        };
        let fits = k.dims()[..3] == [b, hkv, t]
            && v.dims()[..3] == [b, hkv, t]
            && k.dim(3)? == d
            && (1..=ATTENTION_MAX_KEYS).contains(&t)
            && (1..=ATTENTION_MAX_QUERIES).contains(&n)
            && rows.is_multiple_of(n)
            && q.dtype() == k.dtype()
            && k.dtype() == v.dtype()
            && rows_ok(k)
            && rows_ok(v)
            && mask.is_none_or(|m| m.dims() == [n, t]);
        if fits {
            let mask = match mask {
                Some(m) => Some(m.to_dtype(candle_core::DType::F32)?.contiguous()?),
                None => None,
            };
            let op = cuda::Attention {
                mask,
                n,
                scale: scale as f32,
            };
            return Ok(Some(q.contiguous()?.apply_op3_no_bwd(k, v, &op)?));
        }
    }
    let _ = (q, k, v, mask, n, scale);
    Ok(None)
}

/// Per-head RMS norm (`norm`: `(scale [d], eps)`; none: no norm) then RoPE over the first `r`
/// dims of each head (pairs `i`, `i + r/2`; `cos`, `sin` `[n, r/2]` in x's dtype), with the heads
/// moved before the positions: x `[b, n, h, d]` → `[b, h, n, d]`, in one kernel for CUDA
/// tensors (three to four launches: norm, transpose, rotation); `None` elsewhere.
pub fn norm_rope(
    x: &Tensor,
    norm: Option<(&Tensor, f64)>,
    cos: &Tensor,
    sin: &Tensor,
    r: usize,
) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if x.device().is_cuda() && x.rank() == 4 {
        let (_, n, _, d) = x.dims4()?;
        let same = |t: &Tensor| t.dtype() == x.dtype();
        let fits = r.is_multiple_of(2)
            && r <= d
            && cos.dims() == [n, r / 2]
            && sin.dims() == [n, r / 2]
            && same(cos)
            && same(sin)
            && norm.is_none_or(|(w, _)| w.dims() == [d] && same(w));
        if fits {
            let op = cuda::NormRope {
                norm: norm.map(|(w, e)| (w.clone(), e)),
                cos: cos.contiguous()?,
                sin: sin.contiguous()?,
                r,
            };
            return Ok(Some(x.contiguous()?.apply_op1_no_bwd(&op)?));
        }
    }
    let _ = (x, norm, cos, sin, r);
    Ok(None)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDType, CudaStorageSlice, WrapErr};
    use candle_core::{
        bail, CpuStorage, CudaDevice, CudaStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result,
        Shape, Storage, Tensor,
    };

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

    /// The contiguous elements of `s` under `l`.
    fn view<'a, T>(
        s: &'a CudaSlice<T>,
        l: &Layout,
    ) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
        match l.contiguous_offsets() {
            Some((a, b)) => Ok(s.slice(a..b)),
            None => bail!("internal: a fused kernel's input is not contiguous"),
        }
    }

    fn name(base: &str, s: &CudaStorageSlice) -> Result<String> {
        Ok(match s {
            CudaStorageSlice::F32(_) => format!("{base}_f32"),
            CudaStorageSlice::BF16(_) => format!("{base}_bf16"),
            CudaStorageSlice::F16(_) => format!("{base}_f16"),
            _ => bail!("internal: {base} takes f32, bf16 or f16"),
        })
    }

    pub struct Gated {
        pub silu: bool,
    }

    impl CustomOp2 for Gated {
        fn name(&self) -> &'static str {
            "fused-gated"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("internal: the fused gated kernel runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            g: &CudaStorage,
            lg: &Layout,
            u: &CudaStorage,
            lu: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            fn run<T: DeviceRepr>(
                dev: &CudaDevice,
                name: &str,
                g: &CudaSlice<T>,
                lg: &Layout,
                u: &CudaSlice<T>,
                lu: &Layout,
            ) -> Result<CudaSlice<T>> {
                let n = lg.shape().elem_count();
                let (g, u) = (view(g, lg)?, view(u, lu)?);
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<T>(n)? };
                let f = dev.get_or_load_custom_func(name, "llmarch_fused", PTX)?;
                let mut b = f.builder();
                let n32 = n as u32;
                b.arg(&g).arg(&u).arg(&out).arg(&n32);
                // SAFETY: the kernel's signature is (const T*, const T*, T*, unsigned int).
                unsafe { b.launch(LaunchConfig::for_num_elems(n32)) }.w()?;
                Ok(out)
            }
            let dev = g.device();
            let name = name(if self.silu { "silu_mul" } else { "gelu_mul" }, &g.slice)?;
            let slice = match (&g.slice, &u.slice) {
                (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => {
                    CudaStorageSlice::F32(run(dev, &name, a, lg, b, lu)?)
                }
                (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => {
                    CudaStorageSlice::BF16(run(dev, &name, a, lg, b, lu)?)
                }
                (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => {
                    CudaStorageSlice::F16(run(dev, &name, a, lg, b, lu)?)
                }
                _ => bail!("internal: the fused gated kernel's inputs differ in dtype"),
            };
            Ok((
                CudaStorage {
                    slice,
                    device: dev.clone(),
                },
                lg.shape().clone(),
            ))
        }
    }

    pub struct Softmax {
        /// `[n, t]` f32, contiguous.
        pub mask: Option<Tensor>,
    }

    impl CustomOp1 for Softmax {
        fn name(&self) -> &'static str {
            "fused-softmax"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("internal: the fused softmax runs on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
            let dims = lx.dims();
            let (n, t) = (dims[dims.len() - 2], dims[dims.len() - 1]);
            let rows = lx.shape().elem_count() / t.max(1);
            let mask = match &self.mask {
                Some(m) => {
                    if m.dims() != [n, t] {
                        bail!(
                            "internal: a softmax mask of {:?} for scores of {dims:?}",
                            m.dims()
                        );
                    }
                    Some(m.storage_and_layout())
                }
                None => None,
            };
            let mask_view = match &mask {
                Some((storage, layout)) => match &**storage {
                    Storage::Cuda(s) => Some(view(s.as_cuda_slice::<f32>()?, layout)?),
                    _ => bail!("internal: a softmax mask off the scores' device"),
                },
                None => None,
            };
            let dev = x.device();
            fn run<T: DeviceRepr>(
                dev: &CudaDevice,
                name: &str,
                x: &CudaSlice<T>,
                lx: &Layout,
                mask: Option<&candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>>,
                (rows, n, t): (usize, usize, usize),
            ) -> Result<CudaSlice<T>> {
                let x = view(x, lx)?;
                // SAFETY: every element is written by the kernel.
                let out = unsafe { dev.alloc::<T>(rows * t)? };
                let f = dev.get_or_load_custom_func(name, "llmarch_fused", PTX)?;
                let mut b = f.builder();
                let null = 0u64;
                let (t32, n32) = (t as u32, n as u32);
                b.arg(&x);
                match mask {
                    Some(m) => b.arg(m),
                    None => b.arg(&null),
                };
                b.arg(&out).arg(&t32).arg(&n32);
                let cfg = LaunchConfig {
                    grid_dim: (rows as u32, 1, 1),
                    block_dim: (256, 1, 1),
                    shared_mem_bytes: 0,
                };
                // SAFETY: the kernel's signature is (const T*, const float*, T*, unsigned int,
                // unsigned int); a null mask pointer means no mask.
                unsafe { b.launch(cfg) }.w()?;
                Ok(out)
            }
            let name = name("softmax", &x.slice)?;
            let shape = (rows, n, t);
            let m = mask_view.as_ref();
            let slice = match &x.slice {
                CudaStorageSlice::F32(s) => {
                    CudaStorageSlice::F32(run(dev, &name, s, lx, m, shape)?)
                }
                CudaStorageSlice::BF16(s) => {
                    CudaStorageSlice::BF16(run(dev, &name, s, lx, m, shape)?)
                }
                CudaStorageSlice::F16(s) => {
                    CudaStorageSlice::F16(run(dev, &name, s, lx, m, shape)?)
                }
                _ => bail!("internal: the fused softmax takes f32, bf16 or f16"),
            };
            Ok((
                CudaStorage {
                    slice,
                    device: dev.clone(),
                },
                lx.shape().clone(),
            ))
        }
    }

    /// A norm's scale as the kernel takes it: its elements, layout and eps.
    type ScaleView<'a, T> = Option<(&'a CudaSlice<T>, &'a Layout, f32)>;

    fn scale_slice<'a, T: CudaDType, G: std::ops::Deref<Target = Storage>>(
        s: &'a Option<((G, &'a Layout), f32)>,
    ) -> Result<ScaleView<'a, T>> {
        Ok(match s {
            Some(((st, l), e)) => match &**st {
                Storage::Cuda(c) => Some((c.as_cuda_slice::<T>()?, *l, *e)),
                _ => bail!("internal: a norm scale off the activations' device"),
            },
            None => None,
        })
    }

    pub struct ResidualNorm {
        /// `(scale [dim], eps)`, the scale in the activations' dtype.
        pub norm1: Option<(Tensor, f64)>,
        /// `[1]`: multiplies the sum.
        pub scale: Option<Tensor>,
        pub norm2: Option<(Tensor, f64)>,
    }

    impl CustomOp2 for ResidualNorm {
        fn name(&self) -> &'static str {
            "fused-residual-norm"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("internal: the fused residual norm runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            h: &CudaStorage,
            lh: &Layout,
            x: &CudaStorage,
            lx: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let dim = *lh.dims().last().unwrap_or(&1);
            let rows = lh.shape().elem_count() / dim.max(1);
            let outputs = if self.norm2.is_some() { 2 } else { 1 };
            for (w, _) in self.norm1.iter().chain(&self.norm2) {
                if w.dims() != [dim] {
                    bail!("internal: a norm scale of {:?} for rows of {dim}", w.dims());
                }
            }
            let s1 = self
                .norm1
                .as_ref()
                .map(|(w, e)| (w.storage_and_layout(), *e as f32));
            let s2 = self
                .norm2
                .as_ref()
                .map(|(w, e)| (w.storage_and_layout(), *e as f32));
            if let Some(s) = &self.scale {
                if s.dims() != [1] {
                    bail!("internal: a residual scale of {:?}", s.dims());
                }
            }
            let s3 = self.scale.as_ref().map(|t| (t.storage_and_layout(), 0.0));
            let dev = h.device();
            #[allow(clippy::too_many_arguments)]
            fn run<T: DeviceRepr>(
                dev: &CudaDevice,
                name: &str,
                (h, lh): (&CudaSlice<T>, &Layout),
                (x, lx): (&CudaSlice<T>, &Layout),
                w1: ScaleView<'_, T>,
                w2: ScaleView<'_, T>,
                scale: ScaleView<'_, T>,
                (rows, dim, outputs): (usize, usize, usize),
            ) -> Result<CudaSlice<T>> {
                let (h, x) = (view(h, lh)?, view(x, lx)?);
                let w1v = w1.map(|(s, l, _)| view(s, l)).transpose()?;
                let w2v = w2.map(|(s, l, _)| view(s, l)).transpose()?;
                let scale = scale.map(|(s, l, _)| view(s, l)).transpose()?;
                // SAFETY: the kernel writes every element of each output it is given.
                let out = unsafe { dev.alloc::<T>(outputs * rows * dim)? };
                {
                    let out_y = (outputs == 2).then(|| out.slice(rows * dim..));
                    let f = dev.get_or_load_custom_func(name, "llmarch_fused", PTX)?;
                    let mut b = f.builder();
                    let null = 0u64;
                    b.arg(&h).arg(&x);
                    for w in [&w1v, &w2v, &scale] {
                        match w {
                            Some(w) => b.arg(w),
                            None => b.arg(&null),
                        };
                    }
                    b.arg(&out);
                    match &out_y {
                        Some(y) => b.arg(y),
                        None => b.arg(&null),
                    };
                    let (dim32, e1, e2) =
                        (dim as u32, w1.map_or(0.0, |w| w.2), w2.map_or(0.0, |w| w.2));
                    b.arg(&dim32).arg(&e1).arg(&e2);
                    let cfg = LaunchConfig {
                        grid_dim: (rows as u32, 1, 1),
                        block_dim: (if dim >= 2048 { 512 } else { 256 }, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: the kernel's signature is (const T* h, const T* x, const T* w1,
                    // const T* w2, const T* scale, T* out_h, T* out_y, unsigned int, float,
                    // float); null norm scales mean no norm, a null scale none, a null out_y no
                    // second norm.
                    unsafe { b.launch(cfg) }.w()?;
                }
                Ok(out)
            }
            macro_rules! go {
                ($variant:ident, $t:ty, $a:expr, $b:expr) => {{
                    CudaStorageSlice::$variant(run(
                        dev,
                        &name("residual_norm", &h.slice)?,
                        ($a, lh),
                        ($b, lx),
                        scale_slice::<$t, _>(&s1)?,
                        scale_slice::<$t, _>(&s2)?,
                        scale_slice::<$t, _>(&s3)?,
                        (rows, dim, outputs),
                    )?)
                }};
            }
            let slice = match (&h.slice, &x.slice) {
                (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b)) => go!(F32, f32, a, b),
                (CudaStorageSlice::BF16(a), CudaStorageSlice::BF16(b)) => {
                    go!(BF16, half::bf16, a, b)
                }
                (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b)) => go!(F16, half::f16, a, b),
                _ => bail!("internal: the fused residual norm's inputs differ in dtype"),
            };
            let mut dims = vec![outputs];
            dims.extend_from_slice(lh.dims());
            Ok((
                CudaStorage {
                    slice,
                    device: dev.clone(),
                },
                Shape::from(dims),
            ))
        }
    }

    /// The sizes [`Attention`]'s kernel takes: query rows in all (`blocks`, one block each) and
    /// per KV head (`rows`), keys `t`, head dims `d` and `dv`, mask rows `n`, KV heads.
    struct AttendDims {
        blocks: usize,
        rows: usize,
        t: usize,
        d: usize,
        dv: usize,
        n: usize,
        heads: usize,
    }

    pub struct Attention {
        /// `[n, t]` f32, contiguous.
        pub mask: Option<Tensor>,
        pub n: usize,
        pub scale: f32,
    }

    impl CustomOp3 for Attention {
        fn name(&self) -> &'static str {
            "fused-attention"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            bail!("internal: the fused attention runs on CUDA only")
        }

        fn cuda_fwd(
            &self,
            q: &CudaStorage,
            lq: &Layout,
            k: &CudaStorage,
            lk: &Layout,
            v: &CudaStorage,
            lv: &Layout,
        ) -> Result<(CudaStorage, Shape)> {
            let (b, heads, rows, d) = lq.shape().dims4()?;
            let (t, dv) = (lk.dims()[2], lv.dims()[3]);
            let mask = self.mask.as_ref().map(|m| m.storage_and_layout());
            let mask_view = match &mask {
                Some((storage, layout)) => match &**storage {
                    Storage::Cuda(s) => Some(view(s.as_cuda_slice::<f32>()?, layout)?),
                    _ => bail!("internal: an attention mask off the queries' device"),
                },
                None => None,
            };
            let dev = q.device();
            let blocks = b * heads * rows;
            // SAFETY: the kernel writes every score before it reads it.
            let scratch = unsafe { dev.alloc::<f32>(blocks * t)? };
            let name = name("attend_rows", &q.slice)?;
            #[allow(clippy::too_many_arguments)]
            fn run<T: DeviceRepr>(
                dev: &CudaDevice,
                name: &str,
                (q, lq): (&CudaSlice<T>, &Layout),
                (k, lk): (&CudaSlice<T>, &Layout),
                (v, lv): (&CudaSlice<T>, &Layout),
                mask: Option<&candle_core::cuda_backend::cudarc::driver::CudaView<'_, f32>>,
                scratch: &CudaSlice<f32>,
                AttendDims {
                    blocks,
                    rows,
                    t,
                    d,
                    dv,
                    n,
                    heads,
                }: AttendDims,
                (scale, scaled): (f32, i32),
            ) -> Result<CudaSlice<T>> {
                let q = view(q, lq)?;
                // Keys and values from their views' first element; their strides go along.
                let k0 = k.slice(lk.start_offset()..);
                let v0 = v.slice(lv.start_offset()..);
                // SAFETY: every output element is written by the kernel.
                let out = unsafe { dev.alloc::<T>(blocks * dv)? };
                {
                    let f = dev.get_or_load_custom_func(name, "llmarch_fused", PTX)?;
                    let mut bld = f.builder();
                    let null = 0u64;
                    bld.arg(&q).arg(&k0).arg(&v0);
                    match mask {
                        Some(m) => bld.arg(m),
                        None => bld.arg(&null),
                    };
                    bld.arg(&out).arg(scratch);
                    let u = |x: usize| x as u32;
                    let (rows, t, d, dv, n, heads) = (u(rows), u(t), u(d), u(dv), u(n), u(heads));
                    let (ks, vs) = (lk.stride(), lv.stride());
                    let (k_bs, k_hs, v_bs, v_hs) =
                        (ks[0] as u64, ks[1] as u64, vs[0] as u64, vs[1] as u64);
                    bld.arg(&rows).arg(&t).arg(&d).arg(&dv).arg(&n).arg(&heads);
                    bld.arg(&k_bs).arg(&k_hs).arg(&v_bs).arg(&v_hs);
                    bld.arg(&scale).arg(&scaled);
                    let cfg = LaunchConfig {
                        grid_dim: (blocks as u32, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: the kernel's signature is attend_rows_T (fused.cu): pointers q, k,
                    // v, mask (null: none), out, scratch; then rows, t, d, dv, n, heads (u32),
                    // the key and value batch and head strides (u64), scale (f32), scaled (i32).
                    unsafe { bld.launch(cfg) }.w()?;
                }
                Ok(out)
            }
            let dims = AttendDims {
                blocks,
                rows,
                t,
                d,
                dv,
                n: self.n,
                heads,
            };
            let sc = (self.scale, i32::from(self.scale != 1.0));
            let m = mask_view.as_ref();
            let slice = match (&q.slice, &k.slice, &v.slice) {
                (CudaStorageSlice::F32(a), CudaStorageSlice::F32(b), CudaStorageSlice::F32(c)) => {
                    CudaStorageSlice::F32(run(
                        dev,
                        &name,
                        (a, lq),
                        (b, lk),
                        (c, lv),
                        m,
                        &scratch,
                        dims,
                        sc,
                    )?)
                }
                (
                    CudaStorageSlice::BF16(a),
                    CudaStorageSlice::BF16(b),
                    CudaStorageSlice::BF16(c),
                ) => CudaStorageSlice::BF16(run(
                    dev,
                    &name,
                    (a, lq),
                    (b, lk),
                    (c, lv),
                    m,
                    &scratch,
                    dims,
                    sc,
                )?),
                (CudaStorageSlice::F16(a), CudaStorageSlice::F16(b), CudaStorageSlice::F16(c)) => {
                    CudaStorageSlice::F16(run(
                        dev,
                        &name,
                        (a, lq),
                        (b, lk),
                        (c, lv),
                        m,
                        &scratch,
                        dims,
                        sc,
                    )?)
                }
                _ => bail!("internal: the fused attention's inputs differ in dtype"),
            };
            Ok((
                CudaStorage {
                    slice,
                    device: dev.clone(),
                },
                Shape::from((b, heads, rows, dv)),
            ))
        }
    }

    pub struct NormRope {
        /// `(scale [d], eps)` in x's dtype.
        pub norm: Option<(Tensor, f64)>,
        /// `[n, r/2]` each, contiguous, in x's dtype.
        pub cos: Tensor,
        pub sin: Tensor,
        pub r: usize,
    }

    impl CustomOp1 for NormRope {
        fn name(&self) -> &'static str {
            "fused-norm-rope"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            bail!("internal: the fused norm and RoPE run on CUDA only")
        }

        fn cuda_fwd(&self, x: &CudaStorage, lx: &Layout) -> Result<(CudaStorage, Shape)> {
            let (b, n, h, d) = lx.shape().dims4()?;
            let w = self
                .norm
                .as_ref()
                .map(|(w, e)| (w.storage_and_layout(), *e as f32));
            let cos = Some((self.cos.storage_and_layout(), 0.0));
            let sin = Some((self.sin.storage_and_layout(), 0.0));
            let eps = w.as_ref().map_or(0.0, |(_, e)| *e);
            let dev = x.device();
            let name = name("norm_rope", &x.slice)?;
            let dims = (b * n * h, n, h, d, self.r, eps);
            #[allow(clippy::type_complexity)]
            fn run<T: DeviceRepr>(
                dev: &CudaDevice,
                name: &str,
                (x, lx): (&CudaSlice<T>, &Layout),
                w: ScaleView<'_, T>,
                cos: ScaleView<'_, T>,
                sin: ScaleView<'_, T>,
                (rows, n, h, d, r, eps): (usize, usize, usize, usize, usize, f32),
            ) -> Result<CudaSlice<T>> {
                let x = view(x, lx)?;
                let w = w.map(|(s, l, _)| view(s, l)).transpose()?;
                let (Some(cos), Some(sin)) = (cos, sin) else {
                    bail!("internal: RoPE tables missing");
                };
                let (cos, sin) = (view(cos.0, cos.1)?, view(sin.0, sin.1)?);
                // SAFETY: every output element is written by the kernel.
                let out = unsafe { dev.alloc::<T>(rows * d)? };
                {
                    let f = dev.get_or_load_custom_func(name, "llmarch_fused", PTX)?;
                    let mut bld = f.builder();
                    let null = 0u64;
                    bld.arg(&x);
                    match &w {
                        Some(w) => bld.arg(w),
                        None => bld.arg(&null),
                    };
                    bld.arg(&cos).arg(&sin).arg(&out);
                    let (n, h, d, r) = (n as u32, h as u32, d as u32, r as u32);
                    bld.arg(&n).arg(&h).arg(&d).arg(&r).arg(&eps);
                    let cfg = LaunchConfig {
                        grid_dim: (rows as u32, 1, 1),
                        block_dim: (if d >= 512 { 256 } else { 128 }, 1, 1),
                        shared_mem_bytes: 0,
                    };
                    // SAFETY: the kernel's signature is norm_rope_T (fused.cu): x, w (null: no
                    // norm), cos, sin, out; n, h, d, r (u32); eps (f32).
                    unsafe { bld.launch(cfg) }.w()?;
                }
                Ok(out)
            }
            macro_rules! go {
                ($variant:ident, $t:ty, $a:expr) => {
                    CudaStorageSlice::$variant(run(
                        dev,
                        &name,
                        ($a, lx),
                        scale_slice::<$t, _>(&w)?,
                        scale_slice::<$t, _>(&cos)?,
                        scale_slice::<$t, _>(&sin)?,
                        dims,
                    )?)
                };
            }
            let slice = match &x.slice {
                CudaStorageSlice::F32(a) => go!(F32, f32, a),
                CudaStorageSlice::BF16(a) => go!(BF16, half::bf16, a),
                CudaStorageSlice::F16(a) => go!(F16, half::f16, a),
                _ => bail!("internal: the fused norm and RoPE take f32, bf16 or f16"),
            };
            Ok((
                CudaStorage {
                    slice,
                    device: dev.clone(),
                },
                Shape::from((b, h, n, d)),
            ))
        }
    }
}
