//! Shared set-up for the Telegram backend tests: a loopback Telegram and a real grammers
//! client connected to it through `TelegramStorage`.
#![allow(dead_code)]

use std::time::Duration;

use storinator_shared::storage::{ObjectRef, Storage};
use storinator_testkit::mtproto::{LoopbackOptions, LoopbackTelegram};
use storinator_worker::telegram::{TelegramConfig, TelegramStorage};

pub struct Fixture {
    pub server: LoopbackTelegram,
    pub storage: TelegramStorage,
    pub dir: tempfile::TempDir,
}

/// Starts a loopback Telegram and connects a storage to it. `channel` picks the server's
/// first channel as storage chat instead of Saved Messages.
pub async fn start(opts: LoopbackOptions, channel: bool) -> Fixture {
    start_with(opts, channel, |_| {}).await
}

pub async fn start_with(
    opts: LoopbackOptions,
    channel: bool,
    tweak: impl FnOnce(&mut TelegramConfig),
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let server = LoopbackTelegram::start(opts).await.unwrap();
    let session = dir.path().join("worker.session");
    server.write_session(&session).unwrap();
    let mut cfg = TelegramConfig::new(1, "loopback", session, dir.path().join("spool"));
    cfg.request_timeout = Duration::from_secs(5);
    if channel {
        cfg.storage_chat = Some(format!("-100{}", server.channels()[0].id));
    }
    tweak(&mut cfg);
    let storage = TelegramStorage::connect(cfg).await.unwrap();
    Fixture {
        server,
        storage,
        dir,
    }
}

/// Deterministic pseudo-random bytes (incompressible, like encrypted packs).
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

/// Writes `bytes` into the storage's spool dir and uploads it as `name`.
pub async fn put(storage: &TelegramStorage, name: &str, bytes: &[u8]) -> String {
    let spool = storage.spool_dir().to_path_buf();
    std::fs::create_dir_all(&spool).unwrap();
    let p = spool.join(format!("{name}.part"));
    std::fs::write(&p, bytes).unwrap();
    storage.put_file(name, &p).await.unwrap()
}

pub async fn get_all(storage: &TelegramStorage, name: &str, loc: &str, len: u64) -> Vec<u8> {
    storage
        .get_range(&ObjectRef::new(name, loc), 0, len)
        .await
        .unwrap()
}

/// A second storage on the fixture's server and session, as a fresh process would open it
/// (nothing cached, its own connections and part window).
pub async fn open_storage(dir: &tempfile::TempDir, server: &LoopbackTelegram) -> TelegramStorage {
    let _ = server;
    let mut cfg = TelegramConfig::new(
        1,
        "loopback",
        dir.path().join("worker.session"),
        dir.path().join("spool2"),
    );
    cfg.request_timeout = Duration::from_secs(5);
    TelegramStorage::connect(cfg).await.unwrap()
}
