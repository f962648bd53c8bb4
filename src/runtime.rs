//! Where work runs. Plain-HTTP connections are served by one single-threaded runtime per
//! connection thread (`server.connection_threads`), as nginx serves them with one process per
//! core: a request read, routed and answered on one thread wakes no other thread, where the
//! shared work-stealing runtime woke a second worker for most requests (a futex wake and a
//! context switch each; 30 % of the CPU time of a cached hit on a two-core VM).
//!
//! Work a request starts that may outlive it (a fill, a write behind the answer, a timer) goes
//! to the shared runtime through [`spawn`], so shutdown waits for it as before and a fill is
//! not tied to the thread of the client that started it; the blocking work of a fill (hashing,
//! syncing) runs on the shared runtime's blocking pool with it. What a connection awaits
//! itself (the positioned reads of a stored file it sends) runs on its own thread's pool: 100
//! readers of one fill (B4) took 3.2-3.5 s when each read crossed to the shared pool and
//! 2.8-3.1 s on their own threads' pools.

use std::cell::RefCell;
use std::future::Future;
use tokio::runtime::Handle;
use tokio::task::JoinHandle;

thread_local! {
    /// On a connection thread: the shared runtime of the server it serves.
    static SHARED: RefCell<Option<Handle>> = const { RefCell::new(None) };
}

/// Marks the current thread as a connection thread of the server running on `shared`.
pub(crate) fn enter_connection_thread(shared: Handle) {
    SHARED.with(|s| *s.borrow_mut() = Some(shared));
}

fn shared() -> Option<Handle> {
    SHARED.with(|s| s.borrow().clone())
}

/// `tokio::spawn`, onto the shared runtime when called from a connection thread.
pub(crate) fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match shared() {
        Some(handle) => handle.spawn(future),
        None => tokio::spawn(future),
    }
}

/// Awaits `future` on the shared runtime when called from a connection thread, here otherwise;
/// `Err` only if it panicked there. For outgoing requests (to S3, to upstreams): the HTTP
/// client's connections run as tasks of the runtime that opened them and are pooled for every
/// caller, and connection threads end first at shutdown, while the last writes are still being
/// made. A request made over a connection a connection thread had opened failed with
/// "dispatch task is gone". Dropping the returned future stops the work.
pub(crate) async fn on_shared<F>(future: F) -> Result<F::Output, tokio::task::JoinError>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let Some(handle) = shared() else {
        return Ok(future.await);
    };
    struct AbortOnDrop(tokio::task::AbortHandle);
    impl Drop for AbortOnDrop {
        fn drop(&mut self) {
            self.0.abort();
        }
    }
    let task = handle.spawn(future);
    let _guard = AbortOnDrop(task.abort_handle());
    task.await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_thread_sends_work_to_the_shared_runtime() {
        let shared = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shared-worker")
            .enable_all()
            .build()
            .unwrap();
        let handle = shared.handle().clone();
        let names = std::thread::spawn(move || {
            let local = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let name = || std::thread::current().name().map(str::to_owned);
            local.block_on(async move {
                let before = spawn(async move { name() }).await.unwrap();
                enter_connection_thread(handle);
                let after = spawn(async move { name() }).await.unwrap();
                (before, after)
            })
        })
        .join()
        .unwrap();
        // Before: the thread's own runtime (the spawning thread itself, unnamed here).
        assert_ne!(names.0.as_deref(), Some("shared-worker"));
        assert_eq!(names.1.as_deref(), Some("shared-worker"));
    }

    #[test]
    fn tasks_started_by_work_on_shared_outlive_the_connection_thread() {
        let shared = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("shared-worker")
            .enable_all()
            .build()
            .unwrap();
        let handle = shared.handle().clone();
        // What an HTTP client does when it opens a connection: a task of the current runtime
        // that serves the connection for as long as it is pooled.
        type Ask = tokio::sync::oneshot::Sender<String>;
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Ask>();
        let opened_by = |mut rx: tokio::sync::mpsc::UnboundedReceiver<Ask>| async move {
            tokio::spawn(async move {
                while let Some(answer) = rx.recv().await {
                    let _ = answer.send(std::thread::current().name().unwrap_or("").to_owned());
                }
            });
        };
        std::thread::spawn(move || {
            let local = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            local.block_on(async move {
                enter_connection_thread(handle);
                on_shared(opened_by(rx)).await.unwrap();
            });
            // The connection thread's runtime ends here.
        })
        .join()
        .unwrap();
        let (answer, heard) = tokio::sync::oneshot::channel();
        tx.send(answer)
            .expect("the connection's task is still there");
        assert_eq!(heard.blocking_recv().unwrap(), "shared-worker");
        drop(shared);
    }
}
