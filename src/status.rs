//! What the status page shows besides the metrics: the latest problems clients met (upstream
//! failures, refused verifications, sealed misses) with the message they saw, and a short
//! history of the cache counters for "the last hour" and "requests per second". Both are
//! bounded and kept in memory by each process.

use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Problems kept; older ones are dropped.
const PROBLEMS_KEPT: usize = 200;

/// One problem a client met.
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// `upstream`, `verification`, `offline`, `storage`, `internal` or `transfer`.
    pub class: &'static str,
    /// The HTTP status the client got, or `null` for a transfer cut after its headers.
    pub status: Option<u16>,
    /// The request line's path (or the storage key of a fill).
    pub path: String,
    /// The configured upstream the request was for, when the route names one.
    pub upstream: Option<String>,
    /// What the client was told.
    pub message: String,
}

/// The latest problems, newest last.
#[derive(Default)]
pub struct Problems {
    list: Mutex<VecDeque<Problem>>,
    recorded: std::sync::atomic::AtomicU64,
}

impl Problems {
    pub fn record(&self, p: Problem) {
        let mut list = self.list.lock().expect("problems lock");
        if list.len() == PROBLEMS_KEPT {
            list.pop_front();
        }
        list.push_back(p);
        self.recorded
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The latest `limit` problems, newest first.
    pub fn latest(&self, limit: usize) -> Vec<Problem> {
        let list = self.list.lock().expect("problems lock");
        list.iter().rev().take(limit).cloned().collect()
    }

    /// Problems recorded since start, including those no longer kept.
    pub fn total(&self) -> u64 {
        self.recorded.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The counters the history keeps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Counters {
    pub requests: u64,
    pub hits: u64,
    pub misses: u64,
    /// Body bytes sent from the cache (what upstream did not have to send again).
    pub bytes_from_cache: u64,
    pub bytes_from_upstream: u64,
}

impl Counters {
    fn minus(&self, earlier: &Counters) -> Counters {
        Counters {
            requests: self.requests.saturating_sub(earlier.requests),
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            bytes_from_cache: self
                .bytes_from_cache
                .saturating_sub(earlier.bytes_from_cache),
            bytes_from_upstream: self
                .bytes_from_upstream
                .saturating_sub(earlier.bytes_from_upstream),
        }
    }
}

/// How often the history takes a sample.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How far back the history reaches.
const SPAN: Duration = Duration::from_secs(3600);

/// Samples of the counters, oldest first, reaching back [`SPAN`].
#[derive(Default)]
pub struct History {
    samples: Mutex<VecDeque<(Instant, Counters)>>,
}

/// Counts over a window that ends now.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Window {
    /// How long the window really is (shorter than asked while the process is young).
    pub seconds: f64,
    pub counts: Counters,
}

impl History {
    /// Adds a sample taken now.
    pub fn sample(&self, now: Instant, c: Counters) {
        let mut s = self.samples.lock().expect("history lock");
        while s
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > SPAN + SAMPLE_EVERY)
        {
            s.pop_front();
        }
        s.push_back((now, c));
    }

    /// What changed between the oldest sample at most `span` old and `current` (now). `None`
    /// before the first sample.
    pub fn window(&self, now: Instant, current: Counters, span: Duration) -> Option<Window> {
        let s = self.samples.lock().expect("history lock");
        let (t, earlier) = s
            .iter()
            .find(|(t, _)| now.duration_since(*t) <= span)
            .or(s.back())?;
        Some(Window {
            seconds: now.duration_since(*t).as_secs_f64(),
            counts: current.minus(earlier),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(requests: u64, hits: u64) -> Counters {
        Counters {
            requests,
            hits,
            ..Counters::default()
        }
    }

    #[test]
    fn problems_keep_the_latest_newest_first() {
        let p = Problems::default();
        for i in 0..(PROBLEMS_KEPT + 5) {
            p.record(Problem {
                at: i as u64,
                class: "upstream",
                status: Some(502),
                path: format!("/p/{i}"),
                upstream: None,
                message: "m".into(),
            });
        }
        let latest = p.latest(3);
        assert_eq!(
            latest.iter().map(|p| p.at).collect::<Vec<_>>(),
            vec![204, 203, 202]
        );
        assert_eq!(p.latest(1000).len(), PROBLEMS_KEPT);
        assert_eq!(p.total(), (PROBLEMS_KEPT + 5) as u64);
    }

    #[test]
    fn a_window_subtracts_the_oldest_sample_inside_it() {
        let h = History::default();
        let start = Instant::now();
        assert_eq!(h.window(start, c(5, 1), SPAN), None);
        for i in 0..400u64 {
            h.sample(start + SAMPLE_EVERY * i as u32, c(i * 10, i));
        }
        let now = start + SAMPLE_EVERY * 400;
        // The last minute: samples 394..=399 are inside it; 394 is the oldest.
        let w = h
            .window(now, c(4000, 400), Duration::from_secs(60))
            .unwrap();
        assert_eq!(w.counts, c(4000 - 3940, 400 - 394));
        assert_eq!(w.seconds, 60.0);
        // An hour reaches back 360 samples; older ones were dropped.
        let w = h.window(now, c(4000, 400), SPAN).unwrap();
        assert_eq!(w.counts.requests, 4000 - 400);
        assert!(h.samples.lock().unwrap().len() <= 362);
    }

    #[test]
    fn a_young_process_reports_the_window_it_has() {
        let h = History::default();
        let start = Instant::now();
        h.sample(start, c(0, 0));
        let w = h
            .window(start + Duration::from_secs(5), c(50, 2), SPAN)
            .unwrap();
        assert_eq!(w.seconds, 5.0);
        assert_eq!(w.counts, c(50, 2));
    }
}
