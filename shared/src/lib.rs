//! The T-Storinator engine, shared by the bot and the worker.
//!
//! One module per concept: `config`, `crypto` (keys, sealing), `chunker`, `pack`, `storage`
//! (the trait and its local backends), `catalog` (SQLite), `backup`, `restore`, `verify`,
//! `recover`, `progress`. No Telegram client code lives here.

pub mod backup;
pub mod catalog;
pub mod chunker;
pub mod clock;
pub mod config;
pub mod crypto;
pub mod error;
pub mod jobs;
pub mod pack;
pub mod progress;
pub mod recover;
pub mod repo;
pub mod restore;
pub mod storage;
mod verify;

pub use backup::{BackupOptions, BackupSummary, Warning, human_bytes};
pub use catalog::{Catalog, EntryKind, EntryRow, SnapshotInfo};
pub use chunker::ChunkerParams;
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use config::{Config, ConfigError, Secret, StorageSpec};
pub use crypto::{ChunkId, KdfParams, Keys, WrappedKey};
pub use error::{Error, StorageError};
pub use jobs::{
    CancelOutcome, Job, JobArgs, JobError, JobId, JobPolicy, JobResult, JobState, Jobs, Lease,
    Signal,
};
pub use progress::{CancelFlag, Counters, NoProgress, Phase, Progress, ProgressReport, Throttle};
pub use recover::{RecoverReport, recover};
pub use repo::{EngineSettings, Repo, VerifyReport, format_entry, format_time, list_snapshots};
pub use restore::{RestoreOptions, RestoreSummary};
pub use storage::{
    DirStorage, Location, MemoryStorage, ObjectInfo, ObjectRef, Storage, TransferEstimate,
};

impl Repo {
    /// Checks that everything the catalog references is in storage (and, with `read_data`,
    /// intact).
    pub async fn verify(
        &self,
        read_data: bool,
        progress: &dyn Progress,
    ) -> Result<VerifyReport, Error> {
        verify::run(self, read_data, progress).await
    }
}
