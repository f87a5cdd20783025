//! The C allocator's policy for a process that runs training steps.
//!
//! A step's kernels allocate and free the same multi-megabyte scratch
//! buffers (attention's per-head copies, score blocks) hundreds of times.
//! glibc serves each of those from a fresh `mmap` and gives it back on
//! `free`, or trims the heap top, so every step faults the same pages in
//! again: about 300,000 page faults on the issue-6 workload's 6 steps
//! (docs/PERFORMANCE.md). Keeping freed memory for reuse removes them
//! without raising the peak RSS, since the next step needs the same sizes.

/// Tells glibc to serve allocations up to 32 MiB (its maximum) from the heap
/// and never to trim it. Other C libraries keep their own policy.
pub fn retain_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only changes the allocator's tunables; both
        // values are in range. A refusal (0) leaves the default policy.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}
