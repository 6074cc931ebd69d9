//! The T-Storinator engine, shared by the bot and the worker.
//!
//! One module per concept: `crypto` (keys, sealing), `chunker`, `pack`, `storage`, `catalog`
//! (SQLite), `backup`, `restore`, `progress`, `config`. No Telegram client code lives here.

pub mod error;
pub mod progress;
pub mod storage;

pub use error::StorageError;
pub use progress::{CancelFlag, Counters, NoProgress, Phase, Progress, ProgressReport};
pub use storage::{DirStorage, Location, MemoryStorage, ObjectInfo, ObjectRef, Storage};
