//! The engine layer: the operations on a repository. `repo` (an unlocked repository: catalog,
//! storage, keys), `backup` (walk and commit) with its `pipeline` (read, chunk, seal) and
//! `packer` (fill, finish and upload packs), `restore`, `verify`, `scrub` (read back within a
//! budget and heal) and `recover`; `run` (a writing run: its spool folder, its registration,
//! liveness, locks and reclaiming what dead runs left).
//!
//! Layer rules: the engine may import `catalog`, `storage`, `format` and the foundation
//! modules (`error`, `config`, `clock`, `progress`), never `ops`.

pub mod backup;
pub mod canary;
pub mod copies;
mod dedup;
pub mod forget;
mod packer;
mod pipeline;
pub mod policy;
pub mod prune;
mod ranges;
pub mod recover;
pub mod repo;
pub mod restore;
mod run;
pub mod scrub;
mod spool;
mod target;
mod verify;
mod walk;
