//! The ops layer: work between processes. The job table through which the bot asks and the
//! worker answers (`jobs`), schedules that queue jobs by themselves (`schedules`, with the
//! checks a schedule repeats when it fires in `rules`), and what the bot says unasked about
//! them (`alerts`: missed backups, grouped failures, scrub damage, the weekly digest).
//!
//! Layer rules: ops may import every layer below it (`engine`, `catalog`, `storage`, `format`
//! and the foundation modules); nothing below imports ops.

pub mod alerts;
pub mod hosts;
pub mod jobs;
pub mod prompts;
pub mod rules;
pub mod schedules;
