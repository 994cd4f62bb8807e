//! Page-aligned I/O buffers: O_DIRECT needs them, and they hand off to `Bytes` without a copy.
use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

pub const ALIGN: usize = 4096;

/// A zero-initialised, 4 KiB-aligned heap buffer of fixed length.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
    /// Allocated size: `len` rounded up to a pool size class for large buffers.
    cap: usize,
}

/// Buffers of at least this size are recycled. glibc serves such aligned allocations with a
/// fresh mmap each time (its adaptive threshold settles just below them), so without reuse
/// every 1 MiB read paid page faults and a TLB shootdown.
const POOL_MIN: usize = 64 * 1024;
const POOL_MAX: usize = 32 << 20;
/// Bytes kept idle in the pool at most.
const POOL_BYTES: usize = 64 << 20;

struct Pool {
    /// One free list per power-of-two class from POOL_MIN to POOL_MAX.
    free: Vec<Vec<usize>>,
    bytes: usize,
}

static POOL: parking_lot::Mutex<Pool> = parking_lot::Mutex::new(Pool {
    free: Vec::new(),
    bytes: 0,
});

fn class_of(cap: usize) -> usize {
    (cap.trailing_zeros() - POOL_MIN.trailing_zeros()) as usize
}

fn capacity_for(len: usize) -> usize {
    if (POOL_MIN..=POOL_MAX).contains(&len) {
        len.next_power_of_two()
    } else {
        len
    }
}

/// Small buffers (4 KiB reads above all) are kept per thread: glibc's aligned allocator
/// splits and coalesces a block for each one, which cost ~5% of a 4 KiB read.
const LOCAL_MAX: usize = 32 * 1024;
const LOCAL_PER_CLASS: usize = 32;

struct Local([Vec<usize>; LOCAL_MAX / ALIGN]);

impl Drop for Local {
    fn drop(&mut self) {
        for (k, list) in self.0.iter().enumerate() {
            let layout = Layout::from_size_align((k + 1) * ALIGN, ALIGN).expect("buffer layout");
            for &addr in list {
                // SAFETY: allocated by `obtain` with this exact layout and owned by the cache.
                unsafe { dealloc(addr as *mut u8, layout) }
            }
        }
    }
}

thread_local! {
    static LOCAL: std::cell::RefCell<Local> =
        std::cell::RefCell::new(Local(std::array::from_fn(|_| Vec::new())));
}

fn local_class(cap: usize) -> Option<usize> {
    (cap <= LOCAL_MAX && cap.is_multiple_of(ALIGN)).then(|| cap / ALIGN - 1)
}

/// A pooled or fresh allocation of `cap` bytes; `true` if it may hold old contents.
fn obtain(cap: usize, zeroed: bool) -> (NonNull<u8>, bool) {
    if let Some(class) = local_class(cap)
        && let Some(addr) = LOCAL
            .try_with(|l| l.borrow_mut().0[class].pop())
            .ok()
            .flatten()
    {
        return (
            NonNull::new(addr as *mut u8).expect("cached pointer is non-null"),
            true,
        );
    }
    if (POOL_MIN..=POOL_MAX).contains(&cap) {
        let mut p = POOL.lock();
        let class = class_of(cap);
        if let Some(addr) = p.free.get_mut(class).and_then(Vec::pop) {
            p.bytes -= cap;
            return (
                NonNull::new(addr as *mut u8).expect("pooled pointer is non-null"),
                true,
            );
        }
    }
    let layout = Layout::from_size_align(cap, ALIGN).expect("buffer layout");
    // SAFETY: layout has non-zero size (callers handle len 0).
    let raw = unsafe {
        if zeroed {
            alloc_zeroed(layout)
        } else {
            std::alloc::alloc(layout)
        }
    };
    (
        NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout)),
        false,
    )
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out `&[u8]`.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    pub fn zeroed(len: usize) -> AlignedBuf {
        Self::new(len, true)
    }

    /// A buffer whose every byte the caller promises to write (by I/O or [`Self::zero_range`])
    /// before reading any of it: skips zeroing memory that is about to be overwritten.
    pub fn for_overwrite(len: usize) -> AlignedBuf {
        Self::new(len, false)
    }

    fn new(len: usize, zeroed: bool) -> AlignedBuf {
        if len == 0 {
            return AlignedBuf {
                ptr: NonNull::dangling(),
                len: 0,
                cap: 0,
            };
        }
        let cap = capacity_for(len);
        let (ptr, dirty) = obtain(cap, zeroed);
        let mut b = AlignedBuf { ptr, len, cap };
        if zeroed && dirty {
            b.zero_range(0, len);
        }
        b
    }

    /// Zero `[start, end)` without forming a reference to possibly uninitialised bytes.
    pub fn zero_range(&mut self, start: usize, end: usize) {
        assert!(start <= end && end <= self.len, "zero range out of bounds");
        // SAFETY: in bounds (asserted) of our allocation.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(start), 0, end - start) }
    }

    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from_owner(self)
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len initialised bytes (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and we hold the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.cap == 0 {
            return;
        }
        if let Some(class) = local_class(self.cap) {
            let addr = self.ptr.as_ptr() as usize;
            let kept = LOCAL
                .try_with(|l| {
                    let mut l = l.borrow_mut();
                    let list = &mut l.0[class];
                    (list.len() < LOCAL_PER_CLASS)
                        .then(|| list.push(addr))
                        .is_some()
                })
                .unwrap_or(false);
            if kept {
                return;
            }
        }
        if (POOL_MIN..=POOL_MAX).contains(&self.cap) {
            let mut p = POOL.lock();
            if p.bytes + self.cap <= POOL_BYTES {
                let class = class_of(self.cap);
                if p.free.len() <= class {
                    p.free.resize_with(class + 1, Vec::new);
                }
                p.free[class].push(self.ptr.as_ptr() as usize);
                p.bytes += self.cap;
                return;
            }
        }
        let layout = Layout::from_size_align(self.cap, ALIGN).expect("buffer layout");
        // SAFETY: allocated by `obtain` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}
