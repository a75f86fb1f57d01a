//! How the C allocator treats the memory libtorch frees.
//!
//! libtorch's CPU tensors come from `malloc`, and a training step frees and allocates the same
//! activation and gradient buffers again on every batch. glibc serves blocks above its mmap
//! threshold (128 KiB, rising only as far as the largest block freed so far) with fresh `mmap`s and
//! gives free memory back to the kernel above its trim threshold, so each step paid a page fault
//! and a zeroed page per 4 KiB of those buffers: 1.3-1.6 million faults and 16 % of the samples in
//! the kernel over three ResNet50 epochs at 128 px. Keeping freed memory in the heap for the next
//! step cut the faults to 0.5-0.8 million and raised throughput from 28.5-33.5 to 34.0-34.8
//! images/s (bench/results/allocator.md; bench/results/train-throughput.md gives PyTorch the same
//! settings).

/// Blocks up to this size come from the heap and are reused once freed; glibc's largest allowed
/// threshold on 64-bit machines.
const MMAP_THRESHOLD: i32 = 32 << 20;
/// Free memory at the top of the heap is given back to the kernel only beyond this.
const TRIM_THRESHOLD: i32 = i32::MAX;
/// Extra memory the heap asks for whenever it grows, so that it grows rarely.
const TOP_PAD: i32 = 256 << 20;

/// The glibc variables that set the same options: a user who sets any of them keeps theirs.
const USER_SETTINGS: [&str; 4] = ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES"];

/// Makes the C allocator keep freed memory for the next allocation instead of returning it to
/// the kernel (a process then holds its peak memory until it exits, which is what a training
/// step needs again anyway). Does nothing when the user tuned glibc's allocator through its
/// environment variables, or off glibc. Says whether it changed the settings.
pub fn reuse_freed_memory() -> bool {
    if USER_SETTINGS.iter().any(|name| std::env::var_os(name).is_some()) {
        return false;
    }
    set_options()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_options() -> bool {
    // SAFETY: mallopt only changes allocator parameters; it is safe to call at any time.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 && libc::mallopt(libc::M_TOP_PAD, TOP_PAD) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_options() -> bool {
    false
}
