//! The T-Storinator engine, shared by the bot and the worker.
//!
//! One module per concept: `crypto` (keys, sealing), `chunker`, `pack`, `storage`, `catalog`
//! (SQLite), `backup`, `restore`, `progress`, `config`. No Telegram client code lives here.

pub mod crypto;
pub mod error;
pub mod progress;
pub mod storage;

pub use crypto::{
    ChunkId, CryptoError, ID_LEN, KdfParams, Keys, MasterSecret, SealMode, WrappedKey, open,
    plain_chunk_id, seal, seal_into, sealed_is_encrypted, sealed_len_bound,
};
pub use error::StorageError;
pub use progress::{CancelFlag, Counters, NoProgress, Phase, Progress, ProgressReport};
pub use storage::{DirStorage, Location, MemoryStorage, ObjectInfo, ObjectRef, Storage};
