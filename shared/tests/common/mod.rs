//! Fixtures shared by the engine's integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_trait::async_trait;
use storinator_shared::{
    Catalog, ChunkerParams, EngineSettings, KdfParams, Location, MemoryStorage, ObjectInfo,
    ObjectRef, Repo, Storage, StorageError,
};

pub const PASS: &str = "correct horse battery staple";

/// A repository in a temp dir: catalog file, in-memory storage, small packs and chunks.
pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub storage: Arc<CountingStorage>,
    pub repo: Repo,
}

pub fn settings() -> EngineSettings {
    EngineSettings {
        pack_size: 256 * 1024,
        compression: Some(1),
        chunker: ChunkerParams::small(),
        threads: 2,
        hostname: "test".into(),
    }
}

impl Fixture {
    pub async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let storage = Arc::new(CountingStorage::new(MemoryStorage::new(
            dir.path().join("spool"),
        )));
        let repo = Fixture::open_repo(dir.path(), storage.clone(), true).await;
        Fixture { dir, storage, repo }
    }

    pub async fn open_repo(dir: &Path, storage: Arc<CountingStorage>, init: bool) -> Repo {
        let catalog = Catalog::open_file(&dir.join("catalog.db")).await.unwrap();
        if init {
            Repo::init(
                &catalog,
                storage.as_ref(),
                PASS,
                KdfParams::fast_for_tests(),
            )
            .await
            .unwrap();
        }
        Repo::open(catalog, storage, PASS, settings())
            .await
            .unwrap()
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

/// Storage wrapper that counts puts and can be told to fail after N of them.
pub struct CountingStorage {
    pub inner: MemoryStorage,
    pub puts: AtomicUsize,
    pub fail_puts_after: AtomicUsize,
}

impl CountingStorage {
    pub fn new(inner: MemoryStorage) -> Self {
        CountingStorage {
            inner,
            puts: AtomicUsize::new(0),
            fail_puts_after: AtomicUsize::new(usize::MAX),
        }
    }
    pub fn puts(&self) -> usize {
        self.puts.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Storage for CountingStorage {
    fn describe(&self) -> String {
        "counting".into()
    }
    fn spool_dir(&self) -> &Path {
        self.inner.spool_dir()
    }
    async fn put_file(&self, name: &str, path: &Path) -> Result<Location, StorageError> {
        if self.puts.load(Ordering::SeqCst) >= self.fail_puts_after.load(Ordering::SeqCst) {
            return Err(StorageError::Fatal("injected upload failure".into()));
        }
        self.puts.fetch_add(1, Ordering::SeqCst);
        self.inner.put_file(name, path).await
    }
    async fn put_bytes(&self, name: &str, data: Vec<u8>) -> Result<Location, StorageError> {
        self.inner.put_bytes(name, data).await
    }
    async fn get_range(
        &self,
        obj: &ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        self.inner.get_range(obj, offset, len).await
    }
    async fn list(&self) -> Result<Vec<ObjectInfo>, StorageError> {
        self.inner.list().await
    }
    async fn remove(&self, obj: &ObjectRef) -> Result<(), StorageError> {
        self.inner.remove(obj).await
    }
}

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
            use sha2::Digest;
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
