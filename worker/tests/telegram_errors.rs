//! Every error of the worker's table (`errors::KNOWN`), answered by the loopback Telegram and
//! met by the real grammers client: each row does what the table says. Then the errors the
//! loopback produces by itself (a frozen account, a revoked or duplicated session, lost chat
//! access, a wrong md5, a lost answer with a lagging search index, a throttled free account).

mod telegram_support;

use std::time::Duration;

use storinator_shared::error::StorageError;
use storinator_shared::storage::{ObjectRef, Storage};
use storinator_testkit::mtproto::{ChannelRole, Fault, LoopbackOptions, PremiumThrottle};
use storinator_worker::telegram::errors::{Action, KNOWN};
use telegram_support::*;

/// Telegram's message for a row, with `n` for its number.
fn message(name: &str, n: &str) -> String {
    name.split('_')
        .map(|p| if p == "X" { n } else { p })
        .collect::<Vec<_>>()
        .join("_")
}

fn pack(i: usize) -> String {
    format!("{i:032x}.enc")
}

// Paused time: the waits in the table (seconds each) pass instantly; every byte still goes
// through the loopback server and the grammers client.
#[tokio::test(start_paused = true)]
async fn every_known_error_does_what_the_table_says() {
    let f = start(LoopbackOptions::default(), false).await;
    let c = f.server.counters();
    let bytes = data(70_000, 3);
    for (i, k) in KNOWN.iter().enumerate() {
        if k.action == Action::Login {
            continue; // telegram_login.rs meets these during sign-in.
        }
        let number = if k.action == Action::MigrateDc {
            "4"
        } else {
            "2"
        };
        let fault = Fault::rpc(
            if k.code == 0 { 500 } else { k.code },
            message(k.name, number),
        );
        let name = pack(i);
        let stats = f.storage.scheduler().stats();
        let (sends, refetches, dc4_reads) = (
            c.get("messages.sendMedia"),
            c.get("messages.getMessages"),
            c.get("dc4:upload.getFile"),
        );
        let fired_before = f.server.faults().fired().len();
        match k.action {
            Action::Wait | Action::Retry | Action::Reupload | Action::FindEarlierSend => {
                f.server.faults().on_call("messages.sendMedia", 1, fault);
                let loc = put(&f.storage, &name, &bytes).await;
                assert_eq!(
                    get_all(&f.storage, &name, &loc, 70_000).await,
                    bytes,
                    "{}",
                    k.name
                );
                let now = f.storage.scheduler().stats();
                match k.action {
                    Action::Wait => {
                        assert_eq!(now.flood_waits, stats.flood_waits + 1, "{}", k.name)
                    }
                    Action::Retry => assert_eq!(now.retries, stats.retries + 1, "{}", k.name),
                    Action::Reupload => {
                        assert_eq!(now.upload_restarts, stats.upload_restarts + 1, "{}", k.name)
                    }
                    _ => assert_eq!(c.get("messages.sendMedia"), sends + 2, "{}", k.name),
                }
            }
            Action::SessionInvalid | Action::AccessLost | Action::Fatal => {
                f.server.faults().on_call("messages.sendMedia", 1, fault);
                let spool = f.storage.spool_dir().join(&name);
                std::fs::write(&spool, &bytes).unwrap();
                let err = f.storage.put_file(&name, &spool).await.unwrap_err();
                assert!(matches!(err, StorageError::Fatal(_)), "{}: {err:?}", k.name);
                let text = err.to_string();
                let says = match k.action {
                    Action::SessionInvalid => "the session is no longer valid",
                    Action::AccessLost => "the account lost access to the storage chat",
                    _ => k.meaning,
                };
                assert!(
                    text.contains(says) && text.contains(&k.name.replace("_X", "")),
                    "{}: {text}",
                    k.name
                );
                assert_eq!(
                    c.get("messages.sendMedia"),
                    sends + 1,
                    "{} is not retried",
                    k.name
                );
            }
            Action::RefreshReference | Action::MigrateDc | Action::NotFound => {
                let loc = put(&f.storage, &name, &bytes).await;
                f.server.faults().on_call("upload.getFile", 1, fault);
                let got = f
                    .storage
                    .get_range(&ObjectRef::new(name.as_str(), loc.as_str()), 0, 70_000)
                    .await;
                match k.action {
                    Action::RefreshReference => {
                        assert_eq!(got.unwrap(), bytes, "{}", k.name);
                        assert_eq!(c.get("messages.getMessages"), refetches + 1, "{}", k.name);
                    }
                    Action::MigrateDc => {
                        // Sent to dc 4, which sends it back home: followed both ways.
                        assert_eq!(got.unwrap(), bytes, "{}", k.name);
                        assert!(c.get("dc4:upload.getFile") > dc4_reads, "{}", k.name);
                    }
                    _ => assert!(
                        matches!(got, Err(StorageError::NotFound { .. })),
                        "{}: {got:?}",
                        k.name
                    ),
                }
            }
            Action::Login => unreachable!(),
        }
        assert_eq!(
            f.server.faults().fired().len(),
            fired_before + 1,
            "{}: the scripted fault fired once",
            k.name
        );
        f.server.faults().clear();
    }
}

async fn expect_fatal(f: &Fixture, name: &str, says: &[&str]) -> u64 {
    let spool = f.storage.spool_dir().join(name);
    std::fs::create_dir_all(f.storage.spool_dir()).unwrap();
    std::fs::write(&spool, b"pack bytes").unwrap();
    let err = tokio::time::timeout(Duration::from_secs(20), f.storage.put_file(name, &spool))
        .await
        .expect("a fatal error ends the call instead of looping")
        .unwrap_err();
    assert!(matches!(err, StorageError::Fatal(_)), "{err:?}");
    let text = err.to_string();
    for s in says {
        assert!(text.contains(s), "{text}");
    }
    f.server.counters().get("upload.saveFilePart")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_account_fails_once_with_an_explanation() {
    let f = start(LoopbackOptions::default(), false).await;
    f.server.freeze_account(true);
    let parts = expect_fatal(&f, &pack(1), &["frozen", "FROZEN_METHOD_INVALID"]).await;
    assert_eq!(parts, 1, "420 FROZEN_METHOD_INVALID is not a wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_and_duplicated_sessions_say_to_log_in() {
    let f = start(LoopbackOptions::default(), false).await;
    f.server.revoke_sessions();
    expect_fatal(
        &f,
        &pack(1),
        &[
            "no longer valid",
            "SESSION_REVOKED",
            "storinator-worker login",
        ],
    )
    .await;
    let f = start(LoopbackOptions::default(), false).await;
    f.server.duplicate_auth_key(2);
    expect_fatal(
        &f,
        &pack(2),
        &[
            "no longer valid",
            "AUTH_KEY_DUPLICATED",
            "storinator-worker login",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_storage_channel_is_named_as_such() {
    let f = start(LoopbackOptions::default(), true).await;
    let id = f.server.channels()[0].id;
    f.server.set_channel_role(id, ChannelRole::Member);
    expect_fatal(
        &f,
        &pack(1),
        &["lost access to the storage chat", "CHAT_WRITE_FORBIDDEN"],
    )
    .await;
    f.server.set_channel_role(id, ChannelRole::Left);
    expect_fatal(
        &f,
        &pack(2),
        &["lost access to the storage chat", "CHANNEL_PRIVATE"],
    )
    .await;

    // A session whose access hash for the channel is stale: refused at connect.
    let f = start(LoopbackOptions::default(), false).await;
    let session = f.dir.path().join("stale.session");
    f.server.write_session(&session).unwrap();
    let mut json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&session).unwrap()).unwrap();
    json["channels"][0]["access_hash"] = serde_json::json!(12345);
    std::fs::write(&session, json.to_string()).unwrap();
    let mut cfg = storinator_worker::telegram::TelegramConfig::new(
        1,
        "x",
        session,
        f.dir.path().join("spool-stale"),
    );
    cfg.storage_chat = Some(format!("-100{}", f.server.channels()[0].id));
    let e = storinator_worker::telegram::TelegramStorage::connect(cfg)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("lost access to the storage chat") && e.contains("CHANNEL_INVALID"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_md5_uploads_the_object_again() {
    let f = start(LoopbackOptions::default(), false).await;
    f.server
        .faults()
        .on_call("upload.saveFilePart", 1, Fault::CorruptUpload);
    let bytes = data(700_000, 4);
    let loc = put(&f.storage, &pack(1), &bytes).await;
    assert_eq!(get_all(&f.storage, &pack(1), &loc, 700_000).await, bytes);
    assert_eq!(f.server.faults().fired_on("upload.saveFilePart"), 1);
    assert_eq!(f.storage.scheduler().stats().upload_restarts, 1);
    assert_eq!(f.server.counters().get("upload.saveFilePart"), 4);
    assert_eq!(f.server.documents().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_answer_with_a_lagging_search_index_uploads_nothing_again() {
    let f = start(
        LoopbackOptions {
            search_lag: Duration::from_secs(3600),
            ..Default::default()
        },
        false,
    )
    .await;
    // The send goes through, its answer is lost; the retry gets RANDOM_ID_DUPLICATE and the
    // search does not see the message yet.
    f.server
        .faults()
        .on_call("messages.sendMedia", 1, Fault::LoseAnswer);
    let name = pack(7);
    let bytes = data(11 * 1024 * 1024, 5);
    let loc = put(&f.storage, &name, &bytes).await;
    let c = f.server.counters();
    assert_eq!(
        c.get("upload.saveBigFilePart"),
        22,
        "the pack was uploaded once"
    );
    assert_eq!(c.get("messages.sendMedia"), 2);
    assert_eq!(f.server.faults().fired_on("messages.sendMedia"), 1);
    assert!(c.get("messages.search") >= 1 && c.get("messages.getHistory") >= 1);
    assert_eq!(f.server.documents().len(), 1);

    // A worker that crashed after the send and uploads the pack again on restart: the
    // duplicate send is recognised the same way, no second document.
    let session = f.dir.path().join("again.session");
    f.server.write_session(&session).unwrap();
    let cfg = storinator_worker::telegram::TelegramConfig::new(
        1,
        "x",
        session,
        f.dir.path().join("spool-again"),
    );
    let again = storinator_worker::telegram::TelegramStorage::connect(cfg)
        .await
        .unwrap();
    assert_eq!(put(&again, &name, &bytes).await, loc);
    assert_eq!(f.server.documents().len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_throttled_free_account_keeps_going_and_reports_the_rate() {
    let f = start(
        LoopbackOptions {
            premium_throttle: Some(PremiumThrottle {
                after_bytes: 1024 * 1024,
                bytes_per_sec: 1024 * 1024,
            }),
            ..Default::default()
        },
        false,
    )
    .await;
    assert!(f.storage.throttle().is_none());
    let bytes = data(8 * 1024 * 1024, 6);
    let started = tokio::time::Instant::now();
    let loc = put(&f.storage, &pack(1), &bytes).await;
    let took = started.elapsed();
    assert_eq!(
        get_all(&f.storage, &pack(1), &loc, bytes.len() as u64).await,
        bytes
    );
    let stats = f.storage.scheduler().stats();
    assert!(stats.premium_waits >= 1, "{stats:?}");
    // 7 MiB over the volume at 1 MiB/s: the upload took about that long, and says so.
    assert!(took >= Duration::from_secs(6), "{took:?}");
    let t = f.storage.throttle().expect("throttled");
    assert!(
        t.reason.contains("limiting this account's upload speed"),
        "{}",
        t.reason
    );
    let mib = t.bytes_per_sec / (1024.0 * 1024.0);
    assert!((0.5..=2.0).contains(&mib), "measured {mib} MiB/s");
    assert_eq!(t.pending_bytes, 0);
}
