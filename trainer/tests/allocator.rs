//! The allocator settings every trainer command starts with, in a process of their own (they
//! and the environment are process-wide). What they buy is measured in
//! bench/results/train-throughput.md, not here.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn the_allocator_is_tuned_unless_the_user_tuned_it_through_glibcs_variables() {
    use medmerge_trainer::allocator::reuse_freed_memory;
    std::env::set_var("MALLOC_TRIM_THRESHOLD_", "131072");
    assert!(!reuse_freed_memory(), "a user's MALLOC_TRIM_THRESHOLD_ is kept");
    std::env::remove_var("MALLOC_TRIM_THRESHOLD_");
    std::env::set_var("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072");
    assert!(!reuse_freed_memory(), "a user's GLIBC_TUNABLES are kept");
    std::env::remove_var("GLIBC_TUNABLES");
    assert!(reuse_freed_memory(), "glibc accepts every setting (a threshold above its limit would be refused)");
}
