//! How the store is doing: reads, writes, and the local spool that artifact fills write to (the
//! cache directory's `staging/`, local even when the store is a bucket), each apart. A full or
//! read-only disk stops writes but not reads: cached objects keep being served while new ones
//! pass through. Each side that failed is
//! skipped for a short cool-down (so a dead store costs one timeout, not one per request) and
//! reported as degraded, with a reason class, until a call on that side succeeds again.

use serde::Serialize;
use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long one side of the store is skipped after it failed. `/readyz` always asks it.
pub const COOLDOWN: Duration = Duration::from_secs(5);
/// While a side stays degraded, it is logged again at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Why the store failed, as a small fixed set (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// ENOSPC: the filesystem is full.
    NoSpace,
    /// EDQUOT: the user's quota is used up.
    Quota,
    /// EROFS: the filesystem is mounted read-only.
    ReadOnly,
    /// EACCES, EPERM.
    Permission,
    /// EIO and any other local I/O error.
    Io,
    /// The object store answered with an error or not at all (S3).
    Store,
}

impl Reason {
    pub const ALL: [Reason; 6] = [
        Reason::NoSpace,
        Reason::Quota,
        Reason::ReadOnly,
        Reason::Permission,
        Reason::Io,
        Reason::Store,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::NoSpace => "no_space",
            Reason::Quota => "quota",
            Reason::ReadOnly => "read_only",
            Reason::Permission => "permission",
            Reason::Io => "io",
            Reason::Store => "store",
        }
    }

    pub fn of_io(e: &io::Error) -> Reason {
        match e.kind() {
            io::ErrorKind::StorageFull => Reason::NoSpace,
            io::ErrorKind::QuotaExceeded => Reason::Quota,
            io::ErrorKind::ReadOnlyFilesystem => Reason::ReadOnly,
            io::ErrorKind::PermissionDenied => Reason::Permission,
            _ => Reason::Io,
        }
    }

    /// The class of an error from the object store: the first I/O error in its chain of
    /// sources (the local backend wraps them), else a store error.
    pub fn of_error(e: &(dyn std::error::Error + 'static)) -> Reason {
        let mut next = Some(e);
        while let Some(err) = next {
            if let Some(io) = err.downcast_ref::<io::Error>() {
                return Reason::of_io(io);
            }
            next = err.source();
        }
        Reason::Store
    }
}

/// What kind of storage call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// Reads of the store.
    Read,
    /// Writes of the store.
    Write,
    /// Writes of the local spool files artifact fills stream into.
    Spool,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Read => "read",
            Side::Write => "write",
            Side::Spool => "spool",
        }
    }
}

/// One side's failure, as `/readyz` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Degradation {
    pub side: Side,
    pub reason: Reason,
    /// The last error, as logged.
    pub error: String,
    /// Seconds since this side first failed (without a success since).
    pub for_secs: u64,
}

struct Failure {
    since: Instant,
    last: Instant,
    logged: Instant,
    reason: Reason,
    error: String,
}

/// The health of each side.
#[derive(Default)]
pub struct Health {
    read: Mutex<Option<Failure>>,
    write: Mutex<Option<Failure>>,
    spool: Mutex<Option<Failure>>,
}

/// What changed with one outcome, for the caller's log and metrics.
pub enum Change {
    None,
    /// The side failed (first time, a new reason, or a minute since it was last logged).
    Failed {
        reason: Reason,
        first: bool,
    },
    /// The side works again after `reason`.
    Recovered {
        reason: Reason,
    },
}

impl Health {
    fn side(&self, side: Side) -> &Mutex<Option<Failure>> {
        match side {
            Side::Read => &self.read,
            Side::Write => &self.write,
            Side::Spool => &self.spool,
        }
    }

    /// False while `side` is in its cool-down after a failure.
    pub fn usable(&self, side: Side) -> bool {
        match &*self.side(side).lock().expect("health lock") {
            Some(f) => f.last.elapsed() >= COOLDOWN,
            None => true,
        }
    }

    /// Whether `side` failed and has not succeeded since.
    pub fn degraded(&self, side: Side) -> bool {
        self.side(side).lock().expect("health lock").is_some()
    }

    pub fn failed(&self, side: Side, reason: Reason, error: String) -> Change {
        let now = Instant::now();
        let mut slot = self.side(side).lock().expect("health lock");
        match &mut *slot {
            Some(f) => {
                let log = f.reason != reason || f.logged.elapsed() >= LOG_EVERY;
                let old = f.reason;
                f.last = now;
                f.reason = reason;
                f.error = error;
                if log {
                    f.logged = now;
                    return Change::Failed {
                        reason,
                        first: old != reason,
                    };
                }
                Change::None
            }
            None => {
                *slot = Some(Failure {
                    since: now,
                    last: now,
                    logged: now,
                    reason,
                    error,
                });
                Change::Failed {
                    reason,
                    first: true,
                }
            }
        }
    }

    pub fn succeeded(&self, side: Side) -> Change {
        match self.side(side).lock().expect("health lock").take() {
            Some(f) => Change::Recovered { reason: f.reason },
            None => Change::None,
        }
    }

    /// Every side that is degraded now.
    pub fn report(&self) -> Vec<Degradation> {
        [Side::Read, Side::Write, Side::Spool]
            .into_iter()
            .filter_map(|side| {
                let slot = self.side(side).lock().expect("health lock");
                slot.as_ref().map(|f| Degradation {
                    side,
                    reason: f.reason,
                    error: f.error.clone(),
                    for_secs: f.since.elapsed().as_secs(),
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_classed_by_kind_and_through_wrapping_errors() {
        let full = io::Error::from_raw_os_error(28); // ENOSPC
        assert_eq!(Reason::of_io(&full), Reason::NoSpace);
        assert_eq!(
            Reason::of_io(&io::Error::from_raw_os_error(30)),
            Reason::ReadOnly
        );
        assert_eq!(
            Reason::of_io(&io::Error::from_raw_os_error(122)),
            Reason::Quota
        );
        assert_eq!(
            Reason::of_io(&io::Error::from_raw_os_error(13)),
            Reason::Permission
        );
        assert_eq!(Reason::of_io(&io::Error::from_raw_os_error(5)), Reason::Io);
        // An error that carries the I/O error as its source, as object_store's local backend does.
        #[derive(Debug, thiserror::Error)]
        #[error("unable to copy data to file")]
        struct Wrapped(#[source] io::Error);
        let wrapped = Wrapped(io::Error::from_raw_os_error(28));
        assert_eq!(Reason::of_error(&wrapped), Reason::NoSpace);
        let remote = io::Error::other("x");
        assert_eq!(Reason::of_error(&remote), Reason::Io);
        #[derive(Debug, thiserror::Error)]
        #[error("503 Slow Down")]
        struct Remote;
        assert_eq!(Reason::of_error(&Remote), Reason::Store);
    }

    #[test]
    fn sides_fail_and_recover_apart() {
        let h = Health::default();
        assert!(h.usable(Side::Write) && !h.degraded(Side::Write));
        assert!(matches!(
            h.failed(Side::Write, Reason::NoSpace, "full".into()),
            Change::Failed { first: true, .. }
        ));
        // A second failure within the minute is not logged again.
        assert!(matches!(
            h.failed(Side::Write, Reason::NoSpace, "full".into()),
            Change::None
        ));
        // A new reason is.
        assert!(matches!(
            h.failed(Side::Write, Reason::ReadOnly, "ro".into()),
            Change::Failed { first: true, .. }
        ));
        assert!(!h.usable(Side::Write) && h.degraded(Side::Write));
        assert!(h.usable(Side::Read) && !h.degraded(Side::Read));
        let report = h.report();
        assert_eq!(report.len(), 1);
        assert_eq!(report[0].side, Side::Write);
        assert_eq!(report[0].reason, Reason::ReadOnly);
        assert!(matches!(
            h.succeeded(Side::Write),
            Change::Recovered {
                reason: Reason::ReadOnly
            }
        ));
        assert!(h.usable(Side::Write) && h.report().is_empty());
        assert!(matches!(h.succeeded(Side::Write), Change::None));
    }
}
