//! Weight buffers for the decode kernels on transparent huge pages.
//!
//! A decode step streams every weight once. With 4 KiB pages the CPU's stream prefetcher
//! stops at every page boundary and each page costs a TLB entry; 2 MiB pages remove
//! both. Linux backs anonymous memory with huge pages only where a program asks
//! (`/sys/kernel/mm/transparent_hugepage/enabled` = `madvise`, as on this machine), and
//! only for whole 2 MiB-aligned pages, which ordinary allocations of a few MB barely
//! contain. [`HugeBuffer`] is 2 MiB-aligned, a whole number of 2 MiB pages, and asks
//! (`madvise(MADV_HUGEPAGE)`) before its first write. (With `enabled` set to `always`
//! for a test, SmolLM2's decode went from 35.8 to 41.1 tokens/s, medians of 4.)
//! Elsewhere, or where the kernel refuses, it is an ordinary aligned buffer.

use std::ptr::NonNull;
use std::sync::Arc;

/// The huge page size of x86-64 and arm64 Linux.
pub const HUGE_PAGE: usize = 2 << 20;

/// A zero-initialised, 2 MiB-aligned buffer of f32 on huge pages where the OS offers
/// them; `len` values are visible, the mapping is rounded up to whole huge pages.
pub struct HugeBuffer {
    ptr: NonNull<f32>,
    len: usize,
    /// What to release: the OS mapping (Linux) or the allocation.
    region: Region,
}

// SAFETY: the buffer is plain owned memory.
unsafe impl Send for HugeBuffer {}
unsafe impl Sync for HugeBuffer {}

impl HugeBuffer {
    /// A buffer of `len` zeros.
    pub fn zeroed(len: usize) -> HugeBuffer {
        let bytes = (len * 4).div_ceil(HUGE_PAGE).max(1) * HUGE_PAGE;
        let (raw, region) = Region::map(bytes);
        let ptr = NonNull::new(raw as *mut f32).expect("a mapping is never null");
        HugeBuffer { ptr, len, region }
    }

    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `len` initialised (zeroed) f32 at an aligned, owned pointer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as above, and `&mut self` is exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for HugeBuffer {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: the `len` f32 as bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr() as *const u8, self.len * 4) }
    }
}

/// Hand the heap's free pages back to the system (glibc's `malloc_trim`; nothing
/// elsewhere). glibc keeps freed memory below the top of its heap resident, and once a
/// large block has been freed it serves blocks of up to that size from the heap rather
/// than from their own mappings: after a load whose transient data dwarfs what it keeps
/// (a 262,144-token tokenizer's parse), or while weights are moved out of the heap one by
/// one (onto huge pages for decoding), every freed page would stay in the peak RSS.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: glibc's malloc_trim takes any pad and only returns free pages.
        unsafe {
            malloc_trim(0);
        }
    }
}

/// Many read-only buffers on shared huge pages: each [`alloc`](HugeArena::alloc) takes
/// the next values of a 64 MiB [`HugeBuffer`] (a new one when the current is full; a
/// buffer of its own for anything larger). A model's weights one [`HugeBuffer`] each
/// were rounded up to whole 2 MiB pages, every one of them resident once touched: for
/// SmolLM2-135M's 210 matrices of 0.4-3.5 MB, about 170 MB of padding.
#[derive(Default)]
pub struct HugeArena {
    /// The buffer being filled and how many of its values are taken.
    current: Option<(Arc<HugeBuffer>, usize)>,
}

/// Values of a [`HugeArena`]'s buffer (which it keeps alive), read-only.
pub struct HugeSlice {
    buffer: Arc<HugeBuffer>,
    start: usize,
    len: usize,
}

impl HugeSlice {
    pub fn as_slice(&self) -> &[f32] {
        &self.buffer.as_slice()[self.start..self.start + self.len]
    }
}

impl AsRef<[u8]> for HugeSlice {
    fn as_ref(&self) -> &[u8] {
        let values = self.as_slice();
        // SAFETY: the same values as bytes.
        unsafe { std::slice::from_raw_parts(values.as_ptr() as *const u8, values.len() * 4) }
    }
}

impl HugeArena {
    /// Values per shared buffer (64 MiB).
    pub const CHUNK: usize = 32 * HUGE_PAGE / 4;

    pub fn new() -> Self {
        Self::default()
    }

    /// `len` values, zeros until `fill` writes them, then read-only. Each starts on a
    /// 64-byte line.
    pub fn alloc(&mut self, len: usize, fill: impl FnOnce(&mut [f32])) -> HugeSlice {
        if len > Self::CHUNK {
            let mut own = HugeBuffer::zeroed(len);
            fill(own.as_mut_slice());
            return HugeSlice {
                buffer: Arc::new(own),
                start: 0,
                len,
            };
        }
        let fits = |(buffer, used): &(Arc<HugeBuffer>, usize)| used + len <= buffer.len;
        if !self.current.as_ref().is_some_and(fits) {
            self.current = Some((Arc::new(HugeBuffer::zeroed(Self::CHUNK)), 0));
        }
        let (buffer, used) = self.current.as_mut().expect("a buffer with room");
        let start = *used;
        // SAFETY: values `start..start + len` of the buffer are inside it (checked above)
        // and referenced nowhere else: every slice handed out so far covers values
        // below `start`, and later ones begin at or after `start + len`.
        let dst = unsafe { std::slice::from_raw_parts_mut(buffer.ptr.as_ptr().add(start), len) };
        fill(dst);
        *used = (start + len).div_ceil(16) * 16;
        HugeSlice {
            buffer: buffer.clone(),
            start,
            len,
        }
    }
}

impl Drop for HugeBuffer {
    fn drop(&mut self) {
        self.region.release();
    }
}

#[cfg(target_os = "linux")]
mod os {
    unsafe extern "C" {
        pub fn mmap(
            addr: *mut std::ffi::c_void,
            len: usize,
            prot: i32,
            flags: i32,
            fd: i32,
            off: i64,
        ) -> *mut std::ffi::c_void;
        pub fn munmap(addr: *mut std::ffi::c_void, len: usize) -> i32;
        pub fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    pub const PROT_READ: i32 = 1;
    pub const PROT_WRITE: i32 = 2;
    pub const MAP_PRIVATE: i32 = 2;
    pub const MAP_ANONYMOUS: i32 = 0x20;
    pub const MADV_HUGEPAGE: i32 = 14;
}

/// An anonymous mapping (Linux: fresh zero pages, advised for huge pages before their
/// first touch; calloc'd memory is already touched, so the advice would come too late).
struct Region {
    base: *mut u8,
    bytes: usize,
}

impl Region {
    /// `bytes` (a multiple of [`HUGE_PAGE`]) of zeros at a 2 MiB-aligned address.
    #[cfg(target_os = "linux")]
    fn map(bytes: usize) -> (*mut u8, Region) {
        use os::*;
        // Over-map by one huge page and keep the aligned part (the rest stays mapped,
        // untouched, and is released with it).
        let total = bytes + HUGE_PAGE;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            mmap(
                std::ptr::null_mut(),
                total,
                PROT_READ | PROT_WRITE,
                MAP_PRIVATE | MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if base as isize == -1 {
            std::alloc::handle_alloc_error(std::alloc::Layout::from_size_align(total, HUGE_PAGE).expect("layout"));
        }
        let base = base as *mut u8;
        let aligned = (base as usize).div_ceil(HUGE_PAGE) * HUGE_PAGE;
        // SAFETY: inside the mapping just made. A refusal (THP off) is harmless.
        unsafe { madvise(aligned as *mut std::ffi::c_void, bytes, MADV_HUGEPAGE) };
        (aligned as *mut u8, Region { base, bytes: total })
    }

    #[cfg(not(target_os = "linux"))]
    fn map(bytes: usize) -> (*mut u8, Region) {
        let layout = std::alloc::Layout::from_size_align(bytes, HUGE_PAGE).expect("layout");
        // SAFETY: nonzero size.
        let base = unsafe { std::alloc::alloc_zeroed(layout) };
        if base.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        (base, Region { base, bytes })
    }

    fn release(&mut self) {
        #[cfg(target_os = "linux")]
        // SAFETY: the mapping made in `map`, released once.
        unsafe {
            os::munmap(self.base as *mut std::ffi::c_void, self.bytes);
        }
        #[cfg(not(target_os = "linux"))]
        // SAFETY: allocated in `map` with this layout.
        unsafe {
            std::alloc::dealloc(
                self.base,
                std::alloc::Layout::from_size_align(self.bytes, HUGE_PAGE).expect("layout"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_aligned_and_sized() {
        for len in [0, 1, 1000, 3 << 20] {
            let mut b = HugeBuffer::zeroed(len);
            assert_eq!(b.as_slice().len(), len);
            assert_eq!(b.as_ref().len(), len * 4);
            assert!(b.as_slice().iter().all(|&x| x == 0.0));
            assert_eq!(b.as_slice().as_ptr() as usize % HUGE_PAGE, 0);
            if len > 0 {
                b.as_mut_slice()[len - 1] = 2.5;
                assert_eq!(b.as_slice()[len - 1], 2.5);
            }
        }
    }
}

#[cfg(test)]
mod arena_tests {
    use super::*;

    #[test]
    fn arena_slices_keep_their_values_and_share_buffers() {
        let mut arena = HugeArena::new();
        let a = arena.alloc(5, |v| v.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32));
        let b = arena.alloc(3, |v| v.fill(7.0));
        // too big to share: its own buffer
        let big = arena.alloc(HugeArena::CHUNK + 1, |v| v[HugeArena::CHUNK] = 1.0);
        // the rest of the first buffer is still used
        let c = arena.alloc(HugeArena::CHUNK - 32, |v| v[0] = 9.0);
        // no room left in it: a new buffer
        let d = arena.alloc(64, |v| v[63] = 2.0);
        assert_eq!(a.as_slice(), &[0.0, 1.0, 2.0, 3.0, 4.0]);
        assert_eq!(b.as_slice(), &[7.0; 3]);
        assert!(Arc::ptr_eq(&a.buffer, &b.buffer) && Arc::ptr_eq(&a.buffer, &c.buffer));
        assert_eq!((b.start, c.start), (16, 32), "each on a 64-byte line");
        assert_eq!(c.as_slice()[0], 9.0);
        assert!(!Arc::ptr_eq(&c.buffer, &d.buffer) && !Arc::ptr_eq(&a.buffer, &big.buffer));
        assert_eq!(
            (big.as_slice().len(), big.as_slice()[HugeArena::CHUNK]),
            (HugeArena::CHUNK + 1, 1.0)
        );
        assert_eq!(d.as_slice()[63], 2.0);
        assert_eq!(AsRef::<[u8]>::as_ref(&b).len(), 12);
        drop(arena);
        assert_eq!(a.as_slice()[4], 4.0, "slices outlive the arena");
    }
}
