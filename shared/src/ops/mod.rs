//! The ops layer: work between processes. The job table through which the bot asks and the
//! worker answers (`jobs`).
//!
//! Layer rules: ops may import every layer below it (`engine`, `catalog`, `storage`, `format`
//! and the foundation modules); nothing below imports ops.

pub mod jobs;
