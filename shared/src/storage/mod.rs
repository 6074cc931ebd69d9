//! The storage trait: where packs (and the wrapped key) live.
//!
//! Storage is deliberately small (put / get a range / list / remove) and knows nothing of
//! paths, chunks or keys: everything it is handed is already sealed, and every object name is
//! opaque (`<pack-id>.enc`, `key-<id>.enc`). Encryption is a layer above it, in `pack` and
//! `crypto`.

mod dir;
pub mod lanes;
mod memory;

use std::path::Path;

use async_trait::async_trait;

pub use dir::DirStorage;
pub use lanes::{Connector, Lane, Lanes, StoredCopy};
pub use memory::MemoryStorage;

use crate::error::StorageError;
pub use crate::progress::TransferEstimate;

/// Where a stored object lives, as the backend wants to remember it (for Telegram: chat and
/// message id). Opaque to the engine; persisted in the catalog next to the pack.
pub type Location = String;

/// One object as listed by [`Storage::list`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    pub location: Location,
}

/// A handle to a stored object: its name plus the location the catalog remembered (which may
/// be empty or stale; backends fall back to looking the name up).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    pub name: String,
    pub location: Location,
}

impl ObjectRef {
    pub fn new(name: impl Into<String>, location: impl Into<String>) -> Self {
        ObjectRef {
            name: name.into(),
            location: location.into(),
        }
    }
}

/// A place to keep sealed objects.
///
/// Implementations must be idempotent under retry: putting the same name twice (for example
/// after a crash between the upload and the catalog commit) must not leave two live objects
/// the engine can't tell apart. `list` is allowed to be slow (it scans); the engine only uses
/// it for `verify` and `recover`.
#[async_trait]
pub trait Storage: Send + Sync + 'static {
    /// A short human description, for messages ("dir:/backups", "telegram:saved messages").
    fn describe(&self) -> String;

    /// Directory where the packer writes a pack before handing it to [`Storage::put_file`].
    /// The directory store returns a folder on its own file system, so a put is a rename.
    fn spool_dir(&self) -> &Path;

    /// Store the finished file at `path` under `name`. The file is consumed: on success it no
    /// longer exists at `path`.
    async fn put_file(&self, name: &str, path: &Path) -> Result<Location, StorageError>;

    /// Store a small object held in memory (the wrapped key).
    async fn put_bytes(&self, name: &str, data: Vec<u8>) -> Result<Location, StorageError>;

    /// Read `len` bytes of `obj` starting at `offset`. Reading past the end is an error.
    async fn get_range(
        &self,
        obj: &ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError>;

    /// Every object in the store.
    async fn list(&self) -> Result<Vec<ObjectInfo>, StorageError>;

    /// Delete an object; deleting a missing object is not an error.
    async fn remove(&self, obj: &ObjectRef) -> Result<(), StorageError>;

    /// Delete several objects (at most [`REMOVE_BATCH`]); missing ones are not an error. When
    /// it returns, the deletions are durable. Backends with a batch call override it (Telegram
    /// deletes up to 100 messages per call).
    async fn remove_many(&self, objs: &[ObjectRef]) -> Result<(), StorageError> {
        for o in objs {
            self.remove(o).await?;
        }
        Ok(())
    }

    /// The expected cost of transferring `bytes` in `objects` objects, for backends with
    /// rate limits worth announcing before a job starts. Local backends have none.
    fn estimate(&self, _bytes: u64, _objects: u64) -> Option<TransferEstimate> {
        None
    }

    /// Whether the backend is being slowed down by its provider right now (Telegram
    /// throttling a free account), with the rate it measures. Jobs show it in their progress.
    fn throttle(&self) -> Option<crate::progress::Throttle> {
        None
    }

    /// How often the provider has pushed back so far (Telegram's FLOOD_WAIT and
    /// FLOOD_PREMIUM_WAIT answers), so that [`Lanes`] give a lane under pressure less work
    /// until it recovers. Local backends never push back.
    fn pushback(&self) -> Pushback {
        Pushback::default()
    }

    /// Whether [`Storage::put_file`] keeps the spool file itself as the stored object (a
    /// rename). Lanes then give such a backend its own copy of a pack, never a hard link
    /// shared with another lane's copy: copies must not share one inode.
    fn adopts_file(&self) -> bool {
        false
    }

    /// Packs worth uploading at once (several lanes take one each).
    fn parallel_uploads(&self) -> usize {
        1
    }

    /// Bytes of range reads worth having requested at once (a restore keeps this much read
    /// ahead). A backend far away needs more than its bandwidth-delay product requested, or
    /// the link idles between reads: the default suits local disks.
    fn read_ahead(&self) -> u64 {
        DEFAULT_READ_AHEAD
    }

    /// The lanes, when this store is several (copies to check, heal and probe one by one).
    fn as_lanes(&self) -> Option<&Lanes> {
        None
    }
}

/// A backend's push-back counters since it started (see [`Storage::pushback`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pushback {
    pub flood_waits: u64,
    pub premium_waits: u64,
}

/// [`Storage::read_ahead`] of a backend that does not say (local disks: a few reads at once).
pub const DEFAULT_READ_AHEAD: u64 = 16 << 20;

/// Most objects handed to one [`Storage::remove_many`] call (Telegram's limit for one
/// messages.deleteMessages / channels.deleteMessages).
pub const REMOVE_BATCH: usize = 100;

/// Checks an object name handed to a backend: names are ours (`[A-Za-z0-9._-]`), never a path.
pub fn check_name(name: &str) -> Result<(), StorageError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StorageError::Fatal(format!("invalid object name {name:?}")))
    }
}

pub mod conformance {
    //! The behaviour every backend must have: backends (here and in other crates) run this
    //! against their implementation in a test.
    use super::*;

    /// Panics (like an assertion) on the first behaviour that differs from the contract.
    pub async fn run(store: &dyn Storage) {
        let spool = store.spool_dir().to_path_buf();
        std::fs::create_dir_all(&spool).unwrap();
        let p = spool.join("upload-test");
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let loc = store.put_file("aa.enc", &p).await.unwrap();
        assert!(!p.exists(), "put_file must consume the spool file");
        let r = ObjectRef::new("aa.enc", loc.clone());
        assert_eq!(store.get_range(&r, 0, 10).await.unwrap(), &data[..10]);
        assert_eq!(store.get_range(&r, 9990, 10).await.unwrap(), &data[9990..]);
        assert!(
            store.get_range(&r, 9995, 10).await.is_err(),
            "read past the end must fail"
        );
        // A stale or empty location still finds the object by name.
        let by_name = ObjectRef::new("aa.enc", "");
        assert_eq!(
            store.get_range(&by_name, 100, 5).await.unwrap(),
            &data[100..105]
        );
        store
            .put_bytes("key-1.enc", b"hello".to_vec())
            .await
            .unwrap();
        let mut names: Vec<_> = store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|o| (o.name, o.size))
            .collect();
        names.sort();
        assert_eq!(
            names,
            vec![("aa.enc".to_string(), 10_000), ("key-1.enc".to_string(), 5)]
        );
        store.remove(&r).await.unwrap();
        store.remove(&r).await.unwrap();
        // A batch: present and missing objects alike.
        for n in ["b1.enc", "b2.enc"] {
            store.put_bytes(n, b"x".to_vec()).await.unwrap();
        }
        let batch: Vec<ObjectRef> = ["b1.enc", "b2.enc", "gone.enc"]
            .iter()
            .map(|n| ObjectRef::new(*n, ""))
            .collect();
        store.remove_many(&batch).await.unwrap();
        let left: Vec<String> = store
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|o| o.name)
            .collect();
        assert_eq!(left, vec!["key-1.enc".to_string()]);
        let missing = store.get_range(&r, 0, 1).await.unwrap_err();
        assert!(
            matches!(missing, StorageError::NotFound { .. }),
            "{missing:?}"
        );
        assert!(store.put_bytes("../x", vec![]).await.is_err());
    }
}

/// Attempts for transient failures (dropped connections, timeouts) before giving up.
const RETRY_ATTEMPTS: u32 = 5;
/// Longest backoff between transient retries.
const RETRY_MAX_BACKOFF: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs a storage call, retrying what may succeed later: rate limits wait as long as the
/// server asks (they never fail the job), transient errors back off exponentially a bounded
/// number of times. This is the one place the engine backs off.
pub async fn with_retry<T, F, Fut>(what: &str, mut call: F) -> Result<T, StorageError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StorageError>>,
{
    let mut transient = 0u32;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(StorageError::FloodWait { seconds }) => {
                tracing::warn!("{what}: rate limited, waiting {seconds}s");
                tokio::time::sleep(std::time::Duration::from_secs(u64::from(seconds))).await;
            }
            Err(e) if e.is_retryable() && transient + 1 < RETRY_ATTEMPTS => {
                let wait = std::time::Duration::from_secs(1 << transient).min(RETRY_MAX_BACKOFF);
                tracing::warn!("{what}: {e}; retrying in {}s", wait.as_secs());
                tokio::time::sleep(wait).await;
                transient += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod retry_tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test(start_paused = true)]
    async fn flood_waits_beyond_any_attempt_budget_never_give_up() {
        // Four times the transient budget in flood waits, then success: waited out, not failed.
        let n = RETRY_ATTEMPTS * 4;
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let v = with_retry("test", || async {
            if calls.fetch_add(1, Ordering::SeqCst) < n {
                Err(StorageError::FloodWait { seconds: 30 })
            } else {
                Ok(7)
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 7);
        assert_eq!(calls.load(Ordering::SeqCst), n + 1);
        assert!(start.elapsed() >= std::time::Duration::from_secs(30 * u64::from(n)));
    }

    #[tokio::test(start_paused = true)]
    async fn flood_waits_are_waited_out_and_transients_bounded() {
        let calls = AtomicU32::new(0);
        let start = tokio::time::Instant::now();
        let v = with_retry("test", || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => Err(StorageError::FloodWait { seconds: 42 }),
                1 => Err(StorageError::Transient("dropped".into())),
                _ => Ok(7),
            }
        })
        .await
        .unwrap();
        assert_eq!(v, 7);
        assert!(start.elapsed() >= std::time::Duration::from_secs(43));

        let calls = AtomicU32::new(0);
        let err = with_retry("test", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(StorageError::Transient("down".into()))
        })
        .await
        .unwrap_err();
        assert!(err.is_retryable());
        assert_eq!(calls.load(Ordering::SeqCst), RETRY_ATTEMPTS);

        let calls = AtomicU32::new(0);
        with_retry("test", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(StorageError::Fatal("no".into()))
        })
        .await
        .unwrap_err();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "fatal errors are not retried"
        );
    }
}
