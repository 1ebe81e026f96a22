//! Model-sized f32 buffers (error feedback, dense accumulators, decoded updates) backed by
//! transparent huge pages where the kernel offers them.
//!
//! Why: the first touch of a fresh buffer costs one page fault per 4 KiB page. On the
//! machines measured here that is ~0.8 s per GiB (`tools/python/tests` machine: numpy zeros +
//! fill of 1 GiB, 0.75–0.95 s with 4 KiB pages, 0.13–0.15 s once 2 MiB pages are advised).
//! A miner's first window allocates its whole error-feedback state (36 GB per rank of a 72 B
//! model on 8 GPUs: ~30 s of faults with small pages), and every aggregation allocates a
//! dense accumulator per tensor. `MADV_HUGEPAGE` before the first touch makes each fault
//! map 2 MiB; the advice is only advice (a kernel with THP off ignores it) and changes no
//! value: the memory is the allocator's zeroed pages either way.

/// Buffers smaller than this are left alone: the advice would only fragment memory.
const HUGE_FROM: usize = 4 << 20;

/// `n` zeros, advised onto huge pages before anything touches them.
pub fn zeroed_f32(n: usize) -> Vec<f32> {
    let v = vec![0f32; n];
    advise_huge(&v);
    v
}

/// An empty vector with room for `n` values, advised onto huge pages (for buffers filled
/// by `extend`).
pub fn with_capacity_f32(n: usize) -> Vec<f32> {
    let v = Vec::with_capacity(n);
    advise_huge(&v);
    v
}

/// Advises the whole pages of `v`'s allocation onto huge pages (Linux; a no-op elsewhere).
pub fn advise_huge<T>(v: &Vec<T>) {
    let bytes = v.capacity() * std::mem::size_of::<T>();
    if bytes < HUGE_FROM {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        const PAGE: usize = 4096;
        let start = (v.as_ptr() as usize).next_multiple_of(PAGE);
        let end = (v.as_ptr() as usize + bytes) & !(PAGE - 1);
        if end > start {
            // SAFETY: [start, end) lies inside `v`'s allocation, which stays alive for the
            // call; MADV_HUGEPAGE changes how pages are backed, never their contents.
            let rc = unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE)
            };
            if rc != 0 {
                tracing::trace!("madvise(MADV_HUGEPAGE) refused: small pages it is");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeros_of_the_asked_length_whatever_the_advice() {
        for n in [0, 1, 1000, (HUGE_FROM / 4) + 3, 3 << 20] {
            let v = zeroed_f32(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x.to_bits() == 0));
            let w = with_capacity_f32(n);
            assert!(w.is_empty() && w.capacity() >= n);
        }
    }
}
