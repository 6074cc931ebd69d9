//! Loopback Telegram for tests and the demo: a fake Bot API server (`botapi`) and a loopback
//! MTProto server (`mtproto`) that the real grammers client talks to. Nothing here reaches
//! the network: every server binds 127.0.0.1. Also fixtures for tests and the trees the
//! benchmarks measure (`trees`).

pub mod botapi;
pub mod db;
pub mod fixtures;
pub mod fuzz;
pub mod mtproto;
pub mod pg;
pub mod trees;
