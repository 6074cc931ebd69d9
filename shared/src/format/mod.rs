//! The format layer: bytes in, bytes out. Sealing and keys (`crypto`), content-defined
//! chunking (`chunker`), packs and their trailers (`pack`), and the stored snapshot objects
//! (`snapshot`). Everything T-Storinator writes to storage is encoded and decoded here.
//!
//! Layer rules: no database, no storage backend, no engine; the only module of ours it imports
//! is `error`. The one I/O it does is writing a pack file to the spool (`pack::PackWriter`).

pub mod chunker;
pub mod crypto;
pub mod keyring;
pub mod pack;
pub mod snapshot;

pub use snapshot::{EntryKind, ListingEntry, SnapshotObject};
