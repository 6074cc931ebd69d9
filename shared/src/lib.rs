//! The T-Storinator engine, shared by the bot and the worker. No Telegram client code lives
//! here.
//!
//! The crate is layered; a module only imports from its own layer or the ones below it
//! (`tests/layering.rs` checks this):
//!
//! | layer | what it is for |
//! |---|---|
//! | `error`, `config`, `clock`, `progress` | the crate's vocabulary: errors, settings, time, progress |
//! | [`format`] | bytes in, bytes out: crypto, chunking, packs, stored snapshot objects; no I/O beyond a pack file, no database |
//! | [`storage`], [`catalog`] | where packs live (the storage trait and its backends); the schema and its queries (SQLite or PostgreSQL) |
//! | [`engine`] | the operations on a repository: backup, restore, verify, recover |
//! | [`ops`] | work between processes: the job table, schedules, alerts and the digest |

pub mod catalog;
pub mod clock;
pub mod config;
pub mod engine;
pub mod error;
pub mod format;
pub mod ops;
pub mod progress;
pub mod storage;

pub use catalog::browse::{Page, Version};
pub use catalog::{
    AffectedFile, Catalog, EntryKind, EntryRow, ScrubReport, SnapshotInfo, check_owner,
};
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use config::{Config, ConfigError, Secret, StorageSpec};
pub use engine::backup::{BackupOptions, BackupSummary, Warning};
pub use engine::forget::{ForgetOptions, ForgetReport};
pub use engine::policy::KeepPolicy;
pub use engine::prune::{PruneOptions, PruneReport, UsageReport};
pub use engine::recover::{RecoverReport, recover};
pub use engine::repo::{
    EngineSettings, Repo, Unlocking, VerifyReport, format_entry, format_time, list_snapshots, ls,
};
pub use engine::restore::{RestoreOptions, RestoreSummary};
pub use engine::scrub::ScrubOptions;
pub use error::{Error, StorageError};
pub use format::chunker::ChunkerParams;
pub use format::crypto::{ChunkId, KdfParams, Keys, WrappedKey};
pub use ops::jobs::{
    Answer, AnswerOutcome, BOT_UPLOAD_LIMIT, CancelOutcome, Job, JobArgs, JobError, JobId,
    JobPolicy, JobResult, JobState, Jobs, Lease, Signal,
};
pub use ops::prompts::{NewForgetPrompt, NewPrunePrompt, PromptOutcome};
pub use ops::schedules::{Schedule, ScheduleError, Schedules};
pub use progress::{
    CancelFlag, Counters, NoProgress, Phase, Progress, ProgressReport, Throttle, TransferEstimate,
    dedup_figure, human_bytes, plural,
};
pub use storage::{DirStorage, Location, MemoryStorage, ObjectInfo, ObjectRef, Storage};
