//! Buffers for weights the CPU kernels stream every token, backed by 2 MB pages where the OS
//! offers them ([`WeightBuf`]).
//!
//! Notable: a decode step reads every weight once, front to back. On 4 KB pages that is one
//! TLB miss (a page-table walk) per 4 KB read, and the walks stall the streams: the q4_0 bench
//! model decoded 20-30 % faster with its quantized weights in 2 MB pages (glibc's
//! `glibc.malloc.hugetlb=1`, measured side by side). Linux only hands out 2 MB pages to
//! anonymous memory marked `MADV_HUGEPAGE` (the usual `transparent_hugepage=madvise`) that has
//! not been touched yet, and a matrix of the 0.2 B bench model is well under 2 MB, so buffers
//! are cut from shared regions: 256 MB of address space mapped at a time, marked before use,
//! each buffer bump-allocated at the next 64-byte boundary. A region lives while any buffer cut
//! from it does; untouched address space costs no memory. Elsewhere (or where marking fails)
//! the same regions simply use the OS's pages.

use anyhow::{Context, Result};
use half::{bf16, f16};
use memmap2::MmapMut;
use std::sync::{Arc, Mutex, Weak};

/// Address space mapped per shared region; a buffer of more than a quarter of it gets its own.
const REGION_BYTES: usize = 256 << 20;
/// Huge-page size on x86-64 and on aarch64 with 4 KB base pages.
const HUGE_PAGE: usize = 2 << 20;
/// Alignment of every buffer (a cache line, and the widest vector load).
const ALIGN: usize = 64;

/// Element types a [`WeightBuf`] may hold: plain numbers for which all-zero bytes are zero.
///
/// # Safety
/// Every bit pattern, all zeros included, must be a valid value of the type.
pub unsafe trait Zeroable: Copy + Send + Sync + 'static {}
// SAFETY: plain numbers: every bit pattern is a value.
unsafe impl Zeroable for u8 {}
// SAFETY: as above.
unsafe impl Zeroable for i8 {}
// SAFETY: as above.
unsafe impl Zeroable for f32 {}
// SAFETY: as above.
unsafe impl Zeroable for f16 {}
// SAFETY: as above.
unsafe impl Zeroable for bf16 {}

/// One anonymous mapping that buffers are cut from.
struct Region {
    map: MmapMut,
}

impl Region {
    /// Maps `bytes` (plus room to start on a huge-page boundary) and marks it for huge pages.
    fn new(bytes: usize) -> Result<Arc<Region>> {
        let map = MmapMut::map_anon(bytes + HUGE_PAGE)
            .with_context(|| format!("mapping {} MB for weights", bytes >> 20))?;
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage); // best effort: small pages otherwise
        Ok(Arc::new(Region { map }))
    }

    /// Offset of the first huge-page boundary in the mapping.
    fn first_offset(&self) -> usize {
        self.map.as_ptr().align_offset(HUGE_PAGE)
    }
}

/// The region new buffers are cut from, and how far into it.
static CURRENT: Mutex<Option<(Weak<Region>, usize)>> = Mutex::new(None);

/// A fixed-length buffer of weights, zeroed at creation, in huge pages where the OS gives them
/// (see the module header). Derefs to a slice.
pub struct WeightBuf<T> {
    /// Keeps the mapping alive.
    _region: Arc<Region>,
    ptr: *mut T,
    len: usize,
}

// SAFETY: a `WeightBuf` owns its range of the region exclusively (ranges never overlap), so it
// may move between and be shared by threads as a `Vec<T>` would.
unsafe impl<T: Send> Send for WeightBuf<T> {}
unsafe impl<T: Sync> Sync for WeightBuf<T> {}

impl<T: Zeroable> WeightBuf<T> {
    /// `len` zeros.
    pub fn zeroed(len: usize) -> Result<Self> {
        let bytes = (len * std::mem::size_of::<T>()).max(1);
        let (region, offset) = if bytes > REGION_BYTES / 4 {
            let region = Region::new(bytes)?;
            let offset = region.first_offset();
            (region, offset)
        } else {
            let mut current = CURRENT.lock().unwrap_or_else(|e| e.into_inner());
            let live = current.as_ref().and_then(|(weak, used)| {
                let region = weak.upgrade()?;
                let at = used.next_multiple_of(ALIGN);
                (at + bytes <= region.map.len()).then_some((region, at))
            });
            let (region, at) = match live {
                Some(live) => live,
                None => {
                    let region = Region::new(REGION_BYTES)?;
                    let at = region.first_offset();
                    (region, at)
                }
            };
            *current = Some((Arc::downgrade(&region), at + bytes));
            (region, at)
        };
        // SAFETY: `offset + bytes` lies within the mapping (sized for it above), which is
        // 64-byte aligned at `offset` and zero-filled; no other buffer holds this range.
        let ptr = unsafe { region.map.as_ptr().add(offset) as *mut T };
        Ok(WeightBuf {
            _region: region,
            ptr,
            len,
        })
    }

    /// `len` elements read by `fill` into the buffer's bytes (e.g. from a file, without mapping
    /// it).
    pub fn filled_by(
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
    ) -> Result<Self> {
        let buf = Self::zeroed(len)?;
        let bytes = len * std::mem::size_of::<T>();
        // SAFETY: the buffer owns `bytes` initialised bytes at `ptr`, and every bit pattern is
        // a valid `T` (plain numbers, see `Zeroable`).
        fill(unsafe { std::slice::from_raw_parts_mut(buf.ptr as *mut u8, bytes) })?;
        Ok(buf)
    }

    /// The buffer's bytes (native order).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: `len` initialised elements of plain numbers, viewed as bytes.
        unsafe { std::slice::from_raw_parts(self.ptr as *const u8, std::mem::size_of_val(&**self)) }
    }

    /// A copy of `data`.
    pub fn from_slice(data: &[T]) -> Result<Self> {
        let mut buf = Self::zeroed(data.len())?;
        buf.copy_from_slice(data);
        Ok(buf)
    }
}

impl<T> std::ops::Deref for WeightBuf<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: `ptr` points at `len` initialised (zeroed or written) elements this buffer owns.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T> std::ops::DerefMut for WeightBuf<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: as for `deref`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Zeroable> Clone for WeightBuf<T> {
    fn clone(&self) -> Self {
        Self::from_slice(self).expect("mapping memory for a weight copy")
    }
}

impl<T> std::fmt::Debug for WeightBuf<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBuf({} elements)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_aligned_disjoint_and_outlive_their_region_handle() {
        let mut a = WeightBuf::<u8>::zeroed(1000).unwrap();
        let mut b = WeightBuf::<f32>::zeroed(300).unwrap();
        assert!(a.iter().all(|&v| v == 0) && b.iter().all(|&v| v == 0.0));
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        a.fill(7);
        b.fill(1.5);
        assert!(a.iter().all(|&v| v == 7) && b.iter().all(|&v| v == 1.5));
        let big = WeightBuf::<u8>::zeroed(REGION_BYTES / 4 + 1).unwrap();
        assert_eq!(big.as_ptr() as usize % HUGE_PAGE, 0);
        let c = b.clone();
        drop(b);
        assert!(c.iter().all(|&v| v == 1.5) && c.len() == 300);
        assert!(WeightBuf::<i8>::zeroed(0).unwrap().is_empty());
    }
}
