//! Fixtures for tests and benchmarks: a deterministic test tree and a way to compare trees.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::Digest;

/// Deterministic pseudo-random bytes.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Builds the standard test tree under `root` (a folder named like the last component).
pub fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("nested/deeper/deepest")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::create_dir_all(root.join("ünïcødé 目录")).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(root.join("small.txt"), b"hello, storinator\n").unwrap();
    std::fs::write(
        root.join("ünïcødé 目录/файл.txt"),
        "unicode content ✓".as_bytes(),
    )
    .unwrap();
    std::fs::write(
        root.join("nested/deeper/deepest/leaf.bin"),
        bytes(70_000, 1),
    )
    .unwrap();
    // Spans several 256 KiB packs.
    std::fs::write(root.join("nested/large.bin"), bytes(1_500_000, 2)).unwrap();
    // Duplicate content: stored once.
    std::fs::write(root.join("nested/large-copy.bin"), bytes(1_500_000, 2)).unwrap();
    for i in 0..30 {
        std::fs::write(
            root.join(format!("nested/deeper/f{i:02}.txt")),
            format!("file number {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("nested/large.bin", root.join("link-to-large")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("absolute-link")).unwrap();
    std::fs::set_permissions(
        root.join("small.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("nested/deeper"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let old = filetime::FileTime::from_unix_time(1_600_000_000, 123_456_789);
    filetime::set_file_mtime(root.join("small.txt"), old).unwrap();
    filetime::set_file_mtime(root.join("empty-dir"), old).unwrap();
}

/// Everything about a tree that a restore must reproduce: kind, content, mode, mtime.
pub fn describe_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).follow_links(false) {
        let e = e.unwrap();
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        let desc = if m.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(e.path()).unwrap().display())
        } else if m.is_dir() {
            format!(
                "dir {:o} {}.{}",
                m.mode() & 0o7777,
                m.mtime(),
                m.mtime_nsec()
            )
        } else {
            let data = std::fs::read(e.path()).unwrap();
            format!(
                "file {:o} {}.{} {}",
                m.mode() & 0o7777,
                m.mtime(),
                m.mtime_nsec(),
                hex::encode(sha2::Sha256::digest(&data))
            )
        };
        out.insert(rel, desc);
    }
    out
}

/// Files in `dir` (recursively) whose name marks them as restore temporaries.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".storinator-"))
        .map(|e| e.path().to_path_buf())
        .collect()
}

/// A storage backend wrapped for tests: uploads can be slowed down (so progress is visible)
/// or made to fail after a number of successes (crash and resume tests), and every upload is
/// recorded. The counters are `Arc`s so a "restarted" process can share them.
pub struct InstrumentedStorage<S> {
    pub inner: S,
    pub delay_ms: std::sync::Arc<std::sync::atomic::AtomicU64>,
    pub fail_puts_after: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    pub puts: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl<S> InstrumentedStorage<S> {
    pub fn new(inner: S) -> Self {
        InstrumentedStorage {
            inner,
            delay_ms: Default::default(),
            fail_puts_after: std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(usize::MAX)),
            puts: Default::default(),
        }
    }

    /// The same instrumentation (delay, failure point, upload log) over another backend.
    pub fn sharing<T>(inner: S, other: &InstrumentedStorage<T>) -> Self {
        InstrumentedStorage {
            inner,
            delay_ms: other.delay_ms.clone(),
            fail_puts_after: other.fail_puts_after.clone(),
            puts: other.puts.clone(),
        }
    }

    /// Uploads that succeeded so far.
    pub fn put_count(&self) -> usize {
        self.puts.lock().unwrap().len()
    }
}

#[async_trait::async_trait]
impl<S: storinator_shared::Storage> storinator_shared::Storage for InstrumentedStorage<S> {
    fn describe(&self) -> String {
        format!("instrumented {}", self.inner.describe())
    }
    fn spool_dir(&self) -> &Path {
        self.inner.spool_dir()
    }
    async fn put_file(
        &self,
        name: &str,
        path: &Path,
    ) -> Result<storinator_shared::Location, storinator_shared::StorageError> {
        use std::sync::atomic::Ordering;
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        if self.put_count() >= self.fail_puts_after.load(Ordering::SeqCst) {
            return Err(storinator_shared::StorageError::Fatal(
                "injected upload failure".into(),
            ));
        }
        let loc = self.inner.put_file(name, path).await?;
        self.puts.lock().unwrap().push(name.to_string());
        Ok(loc)
    }
    async fn put_bytes(
        &self,
        name: &str,
        data: Vec<u8>,
    ) -> Result<storinator_shared::Location, storinator_shared::StorageError> {
        self.inner.put_bytes(name, data).await
    }
    async fn get_range(
        &self,
        obj: &storinator_shared::ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, storinator_shared::StorageError> {
        self.inner.get_range(obj, offset, len).await
    }
    async fn list(
        &self,
    ) -> Result<Vec<storinator_shared::ObjectInfo>, storinator_shared::StorageError> {
        self.inner.list().await
    }
    async fn remove(
        &self,
        obj: &storinator_shared::ObjectRef,
    ) -> Result<(), storinator_shared::StorageError> {
        self.inner.remove(obj).await
    }
    async fn remove_many(
        &self,
        objs: &[storinator_shared::ObjectRef],
    ) -> Result<(), storinator_shared::StorageError> {
        self.inner.remove_many(objs).await
    }
}
