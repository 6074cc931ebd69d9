//! The T-Storinator engine, shared by the bot and the worker.
//!
//! One module per concept: `crypto` (keys, sealing), `chunker`, `pack`, `storage`, `catalog`
//! (SQLite), `backup`, `restore`, `progress`, `config`. No Telegram client code lives here.

pub mod clock;
pub mod error;
pub mod jobs;
pub mod progress;
pub mod storage;

pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use error::StorageError;
pub use jobs::{
    CancelOutcome, Job, JobArgs, JobError, JobId, JobPolicy, JobResult, JobState, Jobs, Lease,
    Signal,
};
pub use progress::{CancelFlag, Counters, NoProgress, Phase, Progress, ProgressReport};
pub use storage::{DirStorage, Location, MemoryStorage, ObjectInfo, ObjectRef, Storage};
