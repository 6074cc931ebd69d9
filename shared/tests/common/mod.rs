//! Fixtures shared by the engine's integration tests.
#![allow(dead_code)]

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

pub use storinator_testkit::fixtures::{bytes, describe_tree, make_tree, temp_files};
