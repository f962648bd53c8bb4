//! Single flight for small fills (metadata, SHA256SUMS): concurrent misses for one key share one
//! upstream call. The work runs in its own task, so a client that goes away does not cancel it
//! for the others.

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

type Inflight<T> = Arc<Mutex<HashMap<String, Shared<BoxFuture<'static, T>>>>>;

pub struct Flights<T: Clone + Send + Sync + 'static> {
    inflight: Inflight<T>,
    joined: Option<prometheus::IntCounter>,
}

impl<T: Clone + Send + Sync + 'static> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            inflight: Arc::new(Mutex::new(HashMap::new())),
            joined: None,
        }
    }
}

impl<T: Clone + Send + Sync + 'static> Flights<T> {
    /// Counts callers that joined a run already in progress.
    pub fn count_joins(mut self, counter: prometheus::IntCounter) -> Self {
        self.joined = Some(counter);
        self
    }

    /// Starts `work` for `key` in the background unless a run for it is in progress; does not
    /// wait for it.
    pub fn start<F>(&self, key: &str, work: F, on_panic: T)
    where
        F: Future<Output = T> + Send + 'static,
    {
        // The work runs in its own task; this caller does not need the handle to its result.
        drop(self.register(key, work, on_panic));
    }

    /// Runs `work` for `key` unless a run for it is in progress, in which case waits for that one.
    /// `on_panic` is what waiters get if the work panics.
    pub async fn run<F>(&self, key: &str, work: F, on_panic: T) -> T
    where
        F: Future<Output = T> + Send + 'static,
    {
        self.register(key, work, on_panic).await
    }

    fn register<F>(&self, key: &str, work: F, on_panic: T) -> Shared<BoxFuture<'static, T>>
    where
        F: Future<Output = T> + Send + 'static,
    {
        {
            let mut map = self.inflight.lock().expect("flights lock");
            if let Some(existing) = map.get(key) {
                if let Some(c) = &self.joined {
                    c.inc();
                }
                existing.clone()
            } else {
                let inflight = self.inflight.clone();
                let owned_key = key.to_owned();
                let task = crate::runtime::spawn(async move {
                    let out = work.await;
                    inflight.lock().expect("flights lock").remove(&owned_key);
                    out
                });
                let fut: BoxFuture<'static, T> = async move {
                    match task.await {
                        Ok(v) => v,
                        Err(_) => on_panic,
                    }
                }
                .boxed();
                let shared = fut.shared();
                map.insert(key.to_owned(), shared.clone());
                shared
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test]
    async fn concurrent_callers_share_one_run_and_later_callers_start_another() {
        let flights: Arc<Flights<usize>> = Arc::new(Flights::default());
        let runs = Arc::new(AtomicUsize::new(0));
        let mut handles = Vec::new();
        for _ in 0..20 {
            let (flights, runs) = (flights.clone(), runs.clone());
            handles.push(tokio::spawn(async move {
                let work = {
                    let runs = runs.clone();
                    async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        runs.fetch_add(1, Ordering::SeqCst) + 1
                    }
                };
                flights.run("k", work, 0).await
            }));
        }
        for h in handles {
            assert_eq!(h.await.unwrap(), 1);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        let again = flights.run("k", async { 7 }, 0).await;
        assert_eq!(again, 7);
    }
}
