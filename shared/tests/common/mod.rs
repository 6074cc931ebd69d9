//! Fixtures shared by the engine's integration tests.
#![allow(dead_code, unused_imports)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use storinator_shared::{Catalog, ChunkerParams, EngineSettings, KdfParams, MemoryStorage, Repo};

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
        let storage = Arc::new(InstrumentedStorage::new(MemoryStorage::new(
            dir.path().join("spool"),
        )));
        let repo = Fixture::open_repo(dir.path(), storage.clone(), true).await;
        Fixture { dir, storage, repo }
    }

    pub async fn open_repo(dir: &Path, storage: Arc<CountingStorage>, init: bool) -> Repo {
        let catalog = Catalog::open(&storinator_testkit::db::url_for(&dir.join("catalog.db")))
            .await
            .unwrap();
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

// Each test crate uses its own subset.
#[allow(unused_imports)]
pub use storinator_shared::format::pack::BlobKind;
// Each test crate uses its own subset.
#[allow(unused_imports)]
pub use storinator_testkit::fixtures::{
    InstrumentedStorage, bytes, describe_tree, duplicate_data_chunks, make_tree, pack_entries,
    stored_packs, temp_files,
};

/// The engine tests' storage: memory, instrumented.
pub type CountingStorage = InstrumentedStorage<MemoryStorage>;
