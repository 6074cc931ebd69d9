//! The worker's malloc tuning (`cli::tune_malloc`), in a process of its own: the settings
//! are the whole process's.

/// After the tuning, a block the size of the threshold comes from the kernel even once a
/// larger one was freed. Untuned, glibc would have raised its threshold to the freed block's
/// size and served this one from the heap, where it stays resident after it is freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn blocks_from_the_threshold_up_are_mapped_even_after_a_larger_one_was_freed() {
    storinator_worker::cli::tune_malloc();
    let threshold = storinator_worker::cli::MMAP_THRESHOLD as usize;
    let mapped = || {
        // SAFETY: mallinfo2 only reads the allocator's counters.
        unsafe { libc::mallinfo2() }.hblkhd
    };

    let larger = std::hint::black_box(vec![1u8; 2 * threshold]);
    drop(larger);
    let before = mapped();
    let block = std::hint::black_box(vec![2u8; threshold]);
    assert!(
        mapped() >= before + threshold,
        "a {threshold}-byte block came from the heap: {} mapped bytes before, {} after",
        before,
        mapped()
    );
    drop(block);
    assert!(
        mapped() < before + threshold,
        "the block went back when freed"
    );
}
