//! Read buffers for streaming files to clients (cached artifacts, and fills in progress).
//!
//! Every file stream reads in chunks sized from one memory budget shared by all streams: the
//! size of the next read depends on how many bytes of read buffers are out at that moment
//! (read and not yet written to a socket). Few busy clients get large reads (fewer trips to the
//! blocking pool, fewer wake-ups), many slow clients hold small buffers, so memory stays flat.
//! Counting buffers rather than streams matters under a stampede: a hundred clients tailing a
//! fill hold no buffer while they wait for bytes, and small reads there cost half the speed.
//!
//! The buffers themselves are pooled: when the socket layer drops a chunk, its buffer goes back
//! to the pool and the next read reuses it. `perf` on a cached 64 MiB download showed a
//! seventh of the CPU time in page faults on fresh buffers and returning them to the kernel,
//! and each read taking seven system calls (growing reads into uninitialised memory). A pooled
//! buffer was zeroed once, when it was made, so a read goes straight into it with one `pread`.

use bytes::Bytes;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Bytes of read buffers out at once that reads aim to stay within.
const READ_BUDGET: usize = 8 << 20;
/// The smallest and largest read; sizes are powers of two in between.
const MIN_READ: usize = 64 << 10;
const MAX_READ: usize = 1 << 20;
/// Idle buffers kept for reuse, at most.
const POOL_MAX: usize = READ_BUDGET;

/// Bytes of read buffers handed out and not yet dropped.
static OUTSTANDING: AtomicUsize = AtomicUsize::new(0);

/// The size of the next read: a quarter of what is left of the budget, as a power of two from
/// 64 KiB to 1 MiB, and at most `max_len`. The bytes are counted as out before the read starts
/// (a burst of new clients sees each other's reads). Reads shrink as buffers pile up behind slow
/// sockets; once the budget is spent every read is the smallest, so memory grows by 64 KiB per
/// slow client at most. Returns the length to read; its buffer's class size is what is counted.
fn reserve(max_len: u64) -> usize {
    let mut out = OUTSTANDING.load(Ordering::Relaxed);
    loop {
        let len = (share(out) as u64).min(max_len) as usize;
        let size = class_of(len).1;
        match OUTSTANDING.compare_exchange_weak(
            out,
            out + size,
            Ordering::Relaxed,
            Ordering::Relaxed,
        ) {
            Ok(_) => return len,
            Err(now) => out = now,
        }
    }
}

fn share(outstanding: usize) -> usize {
    let quarter = READ_BUDGET.saturating_sub(outstanding) / 4;
    if quarter >= MAX_READ {
        MAX_READ
    } else if quarter <= MIN_READ {
        MIN_READ
    } else {
        1 << (usize::BITS - 1 - quarter.leading_zeros())
    }
}

/// Idle buffers by size class (`MIN_READ << i`).
struct Pool {
    classes: Vec<Vec<Vec<u8>>>,
    bytes: usize,
}

static POOL: Mutex<Pool> = Mutex::new(Pool {
    classes: Vec::new(),
    bytes: 0,
});

fn class_of(len: usize) -> (usize, usize) {
    let size = len.max(MIN_READ).next_power_of_two();
    ((size / MIN_READ).trailing_zeros() as usize, size)
}

/// A zeroed buffer of the class that holds `len` bytes: from the pool, or new.
/// (The caller has counted it in [`OUTSTANDING`].)
fn take(len: usize) -> Vec<u8> {
    let (class, size) = class_of(len);
    {
        let mut pool = POOL.lock().expect("buffer pool lock");
        if let Some(buf) = pool.classes.get_mut(class).and_then(Vec::pop) {
            pool.bytes -= buf.len();
            return buf;
        }
    }
    vec![0; size]
}

/// Returns a buffer to the pool unless the pool is full.
fn give(buf: Vec<u8>) {
    let (class, size) = class_of(buf.len());
    OUTSTANDING.fetch_sub(size, Ordering::Relaxed);
    let mut pool = POOL.lock().expect("buffer pool lock");
    if pool.bytes + size > POOL_MAX {
        return;
    }
    if pool.classes.len() <= class {
        pool.classes.resize_with(class + 1, Vec::new);
    }
    pool.bytes += size;
    pool.classes[class].push(buf);
}

/// A pooled buffer for one read of `len` bytes; it goes back to the pool when dropped (or, once
/// read into, when the last `Bytes` pointing into it is dropped).
pub(crate) struct ReadBuf {
    buf: Vec<u8>,
    len: usize,
}

impl AsRef<[u8]> for ReadBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Drop for ReadBuf {
    fn drop(&mut self) {
        give(std::mem::take(&mut self.buf));
    }
}

/// The buffer for the next read of at most `max_len` bytes (at least one), sized by
/// [`reserve`]. Taken on the async side, so every buffer comes from the allocator arenas of
/// the few runtime threads rather than those of whichever blocking thread reads into it
/// (sixteen arenas each keeping its own free memory doubled the peak memory of 200 clients).
pub(crate) fn buffer(max_len: u64) -> ReadBuf {
    let len = reserve(max_len.max(1));
    ReadBuf {
        buf: take(len),
        len,
    }
}

impl ReadBuf {
    /// Fills the buffer from `file` at `pos` (one `pread` as a rule). A file that ends before
    /// that is an error: stored objects never change size.
    pub(crate) fn read_at(mut self, file: &std::fs::File, pos: u64) -> io::Result<Bytes> {
        let len = self.len;
        match file.read_exact_at(&mut self.buf[..len], pos) {
            Ok(()) => Ok(Bytes::from_owner(self)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "stored object ended early",
            )),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn buffer_read(f: &std::fs::File, pos: u64, max_len: u64) -> io::Result<Bytes> {
        buffer(max_len).read_at(f, pos)
    }

    #[test]
    fn reads_shrink_as_buffers_pile_up() {
        assert_eq!(share(0), MAX_READ);
        assert_eq!(share(4 << 20), MAX_READ);
        assert_eq!(share(5 << 20), 512 << 10);
        assert_eq!(share(7 << 20), 256 << 10);
        assert_eq!(share(15 << 19), 128 << 10);
        assert_eq!(share(READ_BUDGET), MIN_READ);
        assert_eq!(share(10 * READ_BUDGET), MIN_READ);
        let mut last = MAX_READ;
        for out in (0..2 * READ_BUDGET).step_by(4096) {
            let s = share(out);
            assert!(s.is_power_of_two() && s <= last, "{out}");
            last = s;
        }
    }

    #[test]
    fn reads_are_exact_and_buffers_are_reused_without_leaking_old_bytes() {
        let mut f = tempfile::tempfile().unwrap();
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let a = buffer_read(&f, 0, 200_000).unwrap();
        assert_eq!(&a[..], &data[..200_000]);
        drop(a);
        // A shorter read into (possibly) the same buffer sees only its own bytes.
        let b = buffer_read(&f, 299_990, 10).unwrap();
        assert_eq!(&b[..], &data[299_990..]);
        let c = buffer_read(&f, 100, 150_000).unwrap();
        assert_eq!(&c[..], &data[100..150_100]);
        // Slices keep the buffer alive.
        let tail = c.slice(149_000..);
        drop(c);
        assert_eq!(&tail[..], &data[149_100..150_100]);
        let err = buffer_read(&f, 299_000, 2_000).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn the_pool_keeps_at_most_its_budget_and_every_buffer_is_accounted_for() {
        let f = tempfile::tempfile().unwrap();
        f.set_len(4 << 20).unwrap();
        for _ in 0..3 {
            let held: Vec<Bytes> = (0..40)
                .map(|i| buffer_read(&f, i * 4096, 4 << 20).unwrap())
                .collect();
            // The first reads are large, later ones shrink as buffers are out.
            assert_eq!(held[0].len(), MAX_READ);
            assert_eq!(held[39].len(), MIN_READ);
            assert!(OUTSTANDING.load(Ordering::Relaxed) <= READ_BUDGET + 40 * MIN_READ);
            drop(held);
            assert!(POOL.lock().unwrap().bytes <= POOL_MAX);
            assert_eq!(OUTSTANDING.load(Ordering::Relaxed), 0);
        }
    }
}
