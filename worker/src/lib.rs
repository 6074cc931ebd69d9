//! The storage-host side of T-Storinator: the CLI commands, the job daemon and the Telegram
//! storage backend. `main.rs` is a thin wrapper over this library.

pub mod cli;
pub mod daemon;
mod get;
pub mod healthcheck;
pub mod lanes;
pub mod retention_cli;
pub mod schedule_cli;
pub mod telegram;
pub mod ui;
