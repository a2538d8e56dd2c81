//! Weights served straight from the memory-mapped checkpoint, in the dtype they are stored in.
//!
//! A bf16 checkpoint run with f32 activations needs no copy of its matrices: the CPU kernels
//! ([`crate::kernels::gemv`], [`crate::kernels::gemm`]) widen bf16/f16 in registers, so they can read the mapped
//! file bytes directly. Resident memory then holds only the pages the forward pass touches, and
//! lookup tables (token embeddings, Gemma 4's per-layer embedding table) are read one row per
//! token ([`MappedTensor::gather_rows`]): a 2.35 B-entry PLE table costs the rows a prompt uses,
//! not 4.7 GB.
//!
//! A [`MappedTensor`] keeps its mapping alive (an `Arc`), checks that its bytes are aligned for
//! its dtype (safetensors does not promise it; an unaligned tensor is simply not served from the
//! mapping and is loaded as a copy instead), and hands out typed slices.

use crate::kernels::gemv::{WeightRows, Widen};
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};
use std::sync::Arc;

/// Bytes that stay in place for the life of the model: a read-only file mapping.
pub trait Mapping: Send + Sync {
    fn bytes(&self) -> &[u8];
    /// Best effort: map the pages of `range` into this process now (`populate`), so the first
    /// forward pass does not fault them in one by one, or drop them from it (a matrix read once
    /// to be quantized; they read back from the file if touched again).
    fn advise(&self, range: std::ops::Range<usize>, populate: bool);
    /// Copy `buf.len()` bytes at `offset` into `buf` without mapping them (a row of a lookup
    /// table: touching the mapping would map whole page-cache folios, up to megabytes per row).
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> std::io::Result<()> {
        buf.copy_from_slice(&self.bytes()[offset..offset + buf.len()]);
        Ok(())
    }
}

/// A file mapped read-only, with the file kept open to read rows from it directly.
pub struct MappedFile {
    map: memmap2::Mmap,
    file: std::fs::File,
}

impl MappedFile {
    /// Map `file` read-only, marked `MADV_HUGEPAGE`: pages the model reads from disk then come
    /// into the page cache as 2 MB folios, which the kernel maps with one page-table entry each.
    /// A decode step streams every weight once, and with 4 KB entries it misses the TLB once per
    /// 4 KB: bf16 decode on the bench model measured 16-30 % faster from a file read this way
    /// (the page cache keeps the folios for later runs; a file already cached in small folios
    /// stays as it is).
    ///
    /// # Safety
    /// The file must not be truncated or written while mapped (the HF cache never rewrites a
    /// blob in place).
    pub unsafe fn map(file: std::fs::File) -> std::io::Result<Self> {
        let map = memmap2::Mmap::map(&file)?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage); // best effort
        Ok(MappedFile { map, file })
    }
}

impl std::ops::Deref for MappedFile {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map
    }
}

impl Mapping for MappedFile {
    fn bytes(&self) -> &[u8] {
        &self.map
    }

    fn advise(&self, range: std::ops::Range<usize>, populate: bool) {
        #[cfg(target_os = "linux")]
        {
            let len = range.end.saturating_sub(range.start);
            let _ = if populate {
                self.map
                    .advise_range(memmap2::Advice::PopulateRead, range.start, len)
            } else {
                // SAFETY: a read-only file mapping: dropped pages read back from the file.
                unsafe {
                    self.map.unchecked_advise_range(
                        memmap2::UncheckedAdvice::DontNeed,
                        range.start,
                        len,
                    )
                }
            };
        }
        #[cfg(not(target_os = "linux"))]
        let _ = (range, populate);
    }

    #[cfg(unix)]
    fn read_at(&self, offset: usize, buf: &mut [u8]) -> std::io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(&self.file, buf, offset as u64)
    }
}

/// A shared [`Mapping`].
pub type SharedBytes = Arc<dyn Mapping>;

/// A dense F32, BF16 or F16 tensor inside a mapping.
#[derive(Clone)]
pub struct MappedTensor {
    bytes: SharedBytes,
    start: usize,
    end: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// The checkpoint's name for it, where the source gave one (keys the quantized cache).
    name: Option<Arc<str>>,
}

impl std::fmt::Debug for MappedTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedTensor")
            .field("dtype", &self.dtype)
            .field("shape", &self.shape)
            .finish()
    }
}

impl MappedTensor {
    /// `bytes[start..end]` as a `dtype` tensor of `shape`; `None` when the dtype is not F32, BF16
    /// or F16, or the bytes are not aligned for it (then the caller loads a copy).
    pub fn new(
        bytes: SharedBytes,
        start: usize,
        end: usize,
        dtype: DType,
        shape: Vec<usize>,
    ) -> Result<Option<Self>> {
        let size = match dtype {
            DType::F32 => 4,
            DType::BF16 | DType::F16 => 2,
            _ => return Ok(None),
        };
        let all = bytes.bytes();
        let elems: usize = shape.iter().product();
        if end > all.len() || end < start || end - start != elems * size {
            bail!(
                "internal: mapped range {start}..{end} of {} bytes does not hold {dtype:?} {shape:?}",
                all.len()
            );
        }
        if !(all.as_ptr() as usize + start).is_multiple_of(size) {
            return Ok(None);
        }
        Ok(Some(MappedTensor {
            bytes,
            start,
            end,
            dtype,
            shape,
            name: None,
        }))
    }

    /// This tensor, known by `name` (its full name in the checkpoint).
    pub fn with_name(self, name: &str) -> Self {
        MappedTensor {
            name: Some(name.into()),
            ..self
        }
    }

    /// Its full name in the checkpoint, if the source gave one.
    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Map the tensor's pages now (a matrix every forward reads whole).
    pub fn populate(&self) {
        self.bytes.advise(self.start..self.end, true);
    }

    /// Drop the tensor's pages from this process (read once, e.g. to quantize it).
    pub fn release(&self) {
        self.bytes.advise(self.start..self.end, false);
    }

    /// Drop the pages of rows `rows` of the `[rows, cols]` matrix from this process.
    pub fn release_rows(&self, rows: std::ops::Range<usize>) {
        let row = self.dims2().1 * self.dtype.size_in_bytes();
        let (a, b) = (self.start + rows.start * row, self.start + rows.end * row);
        self.bytes.advise(a..b.min(self.end), false);
    }

    /// `(rows, row length)` of a matrix, or of the tensor flattened to rows of its last dim.
    pub fn dims2(&self) -> (usize, usize) {
        let cols = self.shape.last().copied().unwrap_or(1);
        (self.shape.iter().product::<usize>() / cols.max(1), cols)
    }

    /// The elements as the kernels read them.
    pub fn rows(&self) -> WeightRows<'_> {
        let b = &self.bytes.bytes()[self.start..self.end];
        let n = b.len() / self.dtype.size_in_bytes();
        // SAFETY: `new` checked that the range lies in the mapping, holds exactly `n` elements
        // of the dtype, and starts aligned for it; every bit pattern is a valid f32/bf16/f16;
        // the mapping is read-only and lives as long as `self.bytes`.
        unsafe {
            match self.dtype {
                DType::F32 => WeightRows::F32(std::slice::from_raw_parts(b.as_ptr().cast(), n)),
                DType::BF16 => WeightRows::Bf16(std::slice::from_raw_parts(b.as_ptr().cast(), n)),
                _ => WeightRows::F16(std::slice::from_raw_parts(b.as_ptr().cast(), n)),
            }
        }
    }

    /// Rows `ids` of the `[rows, cols]` table widened to f32 and multiplied by `scale`:
    /// `[ids.len(), cols]` row-major. Each row is read from the file on its own
    /// ([`Mapping::read_at`]): the table's pages are never mapped into this process.
    pub fn gather_rows(&self, ids: &[u32], scale: f32) -> Result<Vec<f32>> {
        let (rows, cols) = self.dims2();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= rows) {
            bail!("token id {bad} is outside the embedding table ({rows} rows)");
        }
        let size = self.dtype.size_in_bytes();
        let mut raw = vec![0u8; cols * size];
        let mut out = vec![0f32; ids.len() * cols];
        for (dst, &id) in out.chunks_exact_mut(cols).zip(ids) {
            self.bytes
                .read_at(self.start + id as usize * cols * size, &mut raw)
                .map_err(|e| anyhow::anyhow!("reading row {id} of the embedding table: {e}"))?;
            let src = raw.chunks_exact(size);
            match self.dtype {
                DType::F32 => dst.iter_mut().zip(src).for_each(|(d, b)| {
                    *d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * scale;
                }),
                DType::BF16 => dst.iter_mut().zip(src).for_each(|(d, b)| {
                    *d = bf16::from_le_bytes([b[0], b[1]]).widen() * scale;
                }),
                _ => dst.iter_mut().zip(src).for_each(|(d, b)| {
                    *d = f16::from_le_bytes([b[0], b[1]]).widen() * scale;
                }),
            }
        }
        Ok(out)
    }

    /// A dense copy in `dtype` on `device` (for paths that need a candle tensor).
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let b = &self.bytes.bytes()[self.start..self.end];
        Ok(Tensor::from_raw_buffer(b, self.dtype, &self.shape, device)?.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Owned bytes in an 8-aligned buffer, so the offset alone decides the alignment.
    struct Aligned(Vec<u64>, usize);
    impl Mapping for Aligned {
        fn bytes(&self) -> &[u8] {
            // SAFETY: the first `self.1` bytes of the u64 buffer.
            unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.1) }
        }
        fn advise(&self, _: std::ops::Range<usize>, _: bool) {}
    }

    /// `values` stored as `dtype`, `offset` bytes into a mapping-like buffer.
    fn mapped(values: &[f32], dtype: DType, offset: usize, shape: Vec<usize>) -> MappedTensor {
        let raw: Vec<u8> = values
            .iter()
            .flat_map(|&v| match dtype {
                DType::F32 => v.to_le_bytes().to_vec(),
                DType::BF16 => bf16::from_f32(v).to_le_bytes().to_vec(),
                _ => f16::from_f32(v).to_le_bytes().to_vec(),
            })
            .collect();
        let len = offset + raw.len();
        let mut words = vec![0u64; len.div_ceil(8)];
        // SAFETY: the first `len` bytes of the u64 buffer.
        let buf = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr().cast::<u8>(), len) };
        buf[offset..].copy_from_slice(&raw);
        let bytes: SharedBytes = Arc::new(Aligned(words, len));
        MappedTensor::new(bytes, offset, len, dtype, shape)
            .unwrap()
            .expect("aligned")
    }

    /// Rows read from the mapping equal the materialised table, whatever the stored dtype.
    #[test]
    fn gathered_rows_equal_the_materialised_table_in_every_dtype() {
        let values: Vec<f32> = (0..24).map(|i| (i as f32 - 7.5) * 0.25).collect();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let m = mapped(&values, dtype, 8, vec![6, 4]);
            let table = m.to_tensor(DType::F32, &Device::Cpu).unwrap();
            let ids = [5u32, 0, 3, 3];
            let got = m.gather_rows(&ids, 2.0).unwrap();
            let idx = Tensor::new(&ids, &Device::Cpu).unwrap();
            let want: Vec<f32> = (table.embedding(&idx).unwrap() * 2.0)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(got, want, "{dtype:?}");
            assert!(m.gather_rows(&[6], 1.0).is_err(), "row 6 of 6");
        }
    }

    #[test]
    fn unaligned_bytes_are_not_served() {
        let bytes: SharedBytes = Arc::new(Aligned(vec![0u64; 8], 64));
        let base = bytes.bytes().as_ptr() as usize;
        let odd = if base.is_multiple_of(2) { 1 } else { 0 };
        let m = MappedTensor::new(bytes.clone(), odd, odd + 8, DType::BF16, vec![4]).unwrap();
        assert!(m.is_none());
        assert!(MappedTensor::new(bytes, 0, 10, DType::BF16, vec![4]).is_err());
    }
}
