//! Small objects written behind the answer: a version list, a download answer, SHA256SUMS and
//! its signature, a module's location or git resolution go out to the client as soon as they
//! are fetched and checked, while the store's write (a spool file, `fdatasync`, a rename and
//! directory syncs on disk; two PUTs on S3) runs in the background.
//!
//! Until its write is done an object is served from memory by this process, so nothing a
//! client was answered is missing from the next request's point of view (a download answer
//! handed out is found by the artifact route that follows it). Writes of one key run in the
//! order they were asked for (one lane per key), the objects of one call in their order (a
//! signature before its SHA256SUMS), several keys at once across lanes. A delete, a listing
//! and a shutdown first wait for the writes already asked for, so a purged object does not
//! come back and an inventory sees what was answered. A write that fails is logged, and the
//! object is fetched again when next asked for, as before.

use super::{ObjectMeta, Storage, StorageKey};
use bytes::Bytes;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use tokio::sync::{mpsc, oneshot};

/// Background writers; a key always goes to the same one.
const LANES: usize = 4;

struct Pending {
    meta: Arc<ObjectMeta>,
    data: Bytes,
    generation: u64,
}

enum Job {
    /// Write these objects, in this order (each only if it was not replaced or deleted since).
    Write(Vec<(StorageKey, u64)>),
    /// Answer once every job before this one is done.
    Barrier(oneshot::Sender<()>),
}

#[derive(Default)]
pub(super) struct WriteBehind {
    pending: Mutex<HashMap<StorageKey, Pending>>,
    generation: AtomicU64,
    lanes: OnceLock<Vec<mpsc::UnboundedSender<Job>>>,
}

fn lane_of(key: &StorageKey) -> usize {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % LANES as u64) as usize
}

impl WriteBehind {
    /// An object asked to be written and not written yet.
    pub(super) fn get(&self, key: &StorageKey) -> Option<(Arc<ObjectMeta>, Bytes)> {
        let pending = self.pending.lock().expect("write-behind lock");
        pending.get(key).map(|p| (p.meta.clone(), p.data.clone()))
    }

    /// Forgets an object's write that has not started (a delete wins over it).
    pub(super) fn forget(&self, key: &StorageKey) {
        self.pending.lock().expect("write-behind lock").remove(key);
    }

    /// Waits until every write asked for so far is done.
    pub(super) async fn settle(&self) {
        let Some(lanes) = self.lanes.get() else {
            return;
        };
        let mut answers = Vec::with_capacity(lanes.len());
        for lane in lanes {
            let (tx, rx) = oneshot::channel();
            if lane.send(Job::Barrier(tx)).is_ok() {
                answers.push(rx);
            }
        }
        for rx in answers {
            let _ = rx.await;
        }
    }
}

impl Storage {
    /// Stores small objects in the background, in this order; from now on this process reads
    /// them as stored. See the module documentation.
    pub fn put_bytes_behind(&self, objects: Vec<(StorageKey, Bytes, ObjectMeta)>) {
        let Some(first) = objects.first() else {
            return;
        };
        let lane = lane_of(&first.0);
        let behind = &self.0.behind;
        let mut job = Vec::with_capacity(objects.len());
        {
            let mut pending = behind.pending.lock().expect("write-behind lock");
            for (key, data, meta) in objects {
                let generation = behind.generation.fetch_add(1, Ordering::Relaxed);
                pending.insert(
                    key.clone(),
                    Pending {
                        meta: Arc::new(meta),
                        data,
                        generation,
                    },
                );
                job.push((key, generation));
            }
        }
        let lanes = behind.lanes.get_or_init(|| {
            (0..LANES)
                .map(|_| {
                    let (tx, rx) = mpsc::unbounded_channel();
                    crate::runtime::spawn(write_lane(Arc::downgrade(&self.0), rx));
                    tx
                })
                .collect()
        });
        // The lane ends only with the store itself.
        let _ = lanes[lane].send(Job::Write(job));
    }

    /// Waits for the writes [`Storage::put_bytes_behind`] was asked for so far (before a
    /// listing, a delete, or the end of the process).
    pub async fn settle_writes(&self) {
        self.0.behind.settle().await;
    }
}

async fn write_lane(store: Weak<super::Inner>, mut jobs: mpsc::UnboundedReceiver<Job>) {
    while let Some(job) = jobs.recv().await {
        let objects = match job {
            Job::Barrier(done) => {
                let _ = done.send(());
                continue;
            }
            Job::Write(objects) => objects,
        };
        let Some(inner) = store.upgrade() else {
            return;
        };
        let storage = Storage(inner);
        for (key, generation) in objects {
            let current = {
                let pending = storage.0.behind.pending.lock().expect("write-behind lock");
                pending
                    .get(&key)
                    .filter(|p| p.generation == generation)
                    .map(|p| (p.meta.clone(), p.data.clone()))
            };
            // Replaced (a later write of the key follows in this lane) or deleted.
            let Some((meta, data)) = current else {
                continue;
            };
            if let Err(e) = storage.put_bytes(&key, &data, &meta).await {
                tracing::warn!(key = %key, error = %e, "storage write failed; answer not cached");
            }
            let mut pending = storage.0.behind.pending.lock().expect("write-behind lock");
            if pending
                .get(&key)
                .is_some_and(|p| p.generation == generation)
            {
                pending.remove(&key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;
    use futures_util::StreamExt;
    use sha2::{Digest, Sha256};

    fn object(key: &StorageKey, data: &'static [u8]) -> (StorageKey, Bytes, ObjectMeta) {
        let meta = ObjectMeta::new(
            data.len() as u64,
            Sha256::digest(data).into(),
            "application/json",
        );
        (key.clone(), Bytes::from_static(data), meta)
    }

    async fn fresh(dir: &std::path::Path) -> Storage {
        Storage::local(dir, Arc::new(Metrics::new())).await.unwrap()
    }

    #[tokio::test]
    async fn objects_written_behind_are_read_at_once_and_are_on_disk_after_settling() {
        let dir = tempfile::tempdir().unwrap();
        let store = fresh(dir.path()).await;
        let sums = StorageKey::from_segments(["providers", "h", "ns", "t", "1.0.0", "SHA256SUMS"]);
        let sig =
            StorageKey::from_segments(["providers", "h", "ns", "t", "1.0.0", "SHA256SUMS.sig"]);
        store.put_bytes_behind(vec![object(&sig, b"signature"), object(&sums, b"sums")]);
        // Readable by this process right away, whichever way it is read.
        assert_eq!(
            &store.get_bytes(&sums).await.unwrap().unwrap().1[..],
            b"sums"
        );
        assert_eq!(store.meta(&sig).await.unwrap().unwrap().size, 9);
        let opened = store.open(&sig).await.unwrap().unwrap();
        let mut body = opened.stream(3, 9).await.unwrap();
        assert_eq!(&body.next().await.unwrap().unwrap()[..], b"nature");

        store.settle_writes().await;
        assert!(store.0.behind.pending.lock().unwrap().is_empty());
        let other = fresh(dir.path()).await;
        assert_eq!(
            &other.get_bytes(&sums).await.unwrap().unwrap().1[..],
            b"sums"
        );
        assert_eq!(
            &other.get_bytes(&sig).await.unwrap().unwrap().1[..],
            b"signature"
        );
        assert_eq!(other.list("providers").await.unwrap(), vec![sums, sig]);
    }

    #[tokio::test]
    async fn the_last_write_of_a_key_wins_and_a_delete_is_never_undone() {
        let dir = tempfile::tempdir().unwrap();
        let store = fresh(dir.path()).await;
        let key = StorageKey::from_segments(["providers", "h", "ns", "t", "versions"]);
        for data in [&b"one"[..], b"two", b"three"] {
            store.put_bytes_behind(vec![object(&key, data)]);
        }
        assert_eq!(
            &store.get_bytes(&key).await.unwrap().unwrap().1[..],
            b"three"
        );
        store.settle_writes().await;
        assert_eq!(
            &fresh(dir.path())
                .await
                .get_bytes(&key)
                .await
                .unwrap()
                .unwrap()
                .1[..],
            b"three"
        );

        let gone = StorageKey::from_segments(["providers", "h", "ns", "t", "gone"]);
        store.put_bytes_behind(vec![object(&gone, b"soon deleted")]);
        store.delete(&gone).await.unwrap();
        assert!(store.get_bytes(&gone).await.unwrap().is_none());
        store.settle_writes().await;
        assert!(store.get_bytes(&gone).await.unwrap().is_none());
        assert!(
            fresh(dir.path())
                .await
                .get_bytes(&gone)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_listing_includes_what_was_answered_moments_ago() {
        let dir = tempfile::tempdir().unwrap();
        let store = fresh(dir.path()).await;
        let keys: Vec<StorageKey> = (0..20)
            .map(|i| StorageKey::from_segments(["modules", "h", "ns", "m", &format!("v{i:02}")]))
            .collect();
        for key in &keys {
            store.put_bytes_behind(vec![object(key, b"{}")]);
        }
        assert_eq!(store.list("modules").await.unwrap(), keys);
    }
}
