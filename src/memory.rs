//! Handing memory the allocator holds free back to the system.
//!
//! glibc's allocator returns freed memory to the system only from the top of each arena. A
//! long-lived allocation made between short-lived ones (a version list refreshed in the memory
//! layer, a pooled connection, a metric's new label set) pins everything below it, so after a
//! burst the freed holes stay resident. In the soak (B12 in `BENCHMARKS.md`: a million mixed
//! requests) the live heap stayed at 4.2-4.6 MB from the first 100,000 requests to the last
//! (heaptrack), while the resident memory grew by 3 MiB, all of it free chunks:
//! `malloc_trim(0)` at the end took it from 23.9 back to 20.8 MiB. A serving process therefore
//! trims every [`RELEASE_EVERY`]. A trim walks the free lists of each arena under its lock:
//! 0.1-1 ms under the soak's load. Every 10 s the resident memory still rose by up to 2.3 MiB
//! between two trims; every 2 s, by up to 1 MiB.

use std::time::Duration;

/// How often a serving process hands free memory back.
pub const RELEASE_EVERY: Duration = Duration::from_secs(2);

/// Hands the allocator's free memory back to the system: the top of each arena and every whole
/// free page inside one. True when some was released. Does nothing where the allocator is not
/// glibc's.
pub fn release_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        #[allow(unsafe_code)]
        // SAFETY: malloc_trim takes no pointers; it works on glibc's own arenas under their
        // locks and is safe to call from any thread at any time.
        unsafe {
            libc::malloc_trim(0) == 1
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Calls [`release_free_memory`] every [`RELEASE_EVERY`] on the blocking pool, forever.
pub async fn release_periodically() {
    let mut every = tokio::time::interval(RELEASE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let _ = tokio::task::spawn_blocking(release_free_memory).await;
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn anon_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    #[test]
    fn free_holes_below_a_live_allocation_go_back_to_the_system() {
        // 64 MiB in 4 KiB blocks, each written to, then all freed but every 64th: the holes
        // between the survivors are free but stay resident until trimmed.
        let mut blocks: Vec<Box<[u8]>> = (0..16 * 1024)
            .map(|i| vec![(i % 251) as u8 + 1; 4096].into_boxed_slice())
            .collect();
        let kept: Vec<Box<[u8]>> = blocks
            .drain(..)
            .enumerate()
            .filter_map(|(i, b)| (i % 64 == 0).then_some(b))
            .collect();
        let before = anon_kib();
        assert!(release_free_memory(), "nothing was released");
        let after = anon_kib();
        assert!(
            before.saturating_sub(after) >= 32 * 1024,
            "resident anonymous memory went from {before} KiB to {after} KiB"
        );
        // The survivors are intact.
        for (n, b) in kept.iter().enumerate() {
            assert!(b.iter().all(|&x| x == ((n * 64) % 251) as u8 + 1));
        }
    }
}
