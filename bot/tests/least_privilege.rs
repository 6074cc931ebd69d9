//! The bot as a process: it reads its own `bot.env`, never the worker's `.env`, and refuses to
//! start when the worker's secrets are in its environment (design invariant 9).

use std::process::Command;
use std::time::Duration;

use storinator_testkit::botapi::FakeBotApi;

fn bot(dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_storinator-bot"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .current_dir(dir);
    c
}

#[test]
fn the_bot_refuses_to_start_with_the_passphrase_or_api_hash() {
    let dir = tempfile::tempdir().unwrap();
    for (var, value) in [
        ("STORINATOR_PASSPHRASE", "hunter2"),
        ("TELEGRAM_API_HASH", "0123456789abcdef0123456789abcdef"),
    ] {
        let out = bot(dir.path())
            .env(
                "TELOXIDE_TOKEN",
                "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw",
            )
            .env("TELOXIDE_API_URL", "http://127.0.0.1:9/")
            .env("STORINATOR_ALLOWED_USERS", "7")
            .env("STORINATOR_BACKUP_ROOTS", dir.path())
            .env("STORINATOR_DATA_DIR", dir.path())
            .env(var, value)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(var) && err.contains("only the worker may hold it"),
            "{err}"
        );
        assert!(!err.contains(value), "{err}");
        assert!(
            !dir.path().join("storinator.db").exists(),
            "it got as far as the database"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bot_reads_bot_env_and_never_the_workers_dot_env() {
    let api = FakeBotApi::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    // The worker's file beside it: had the bot read it, it would refuse to start.
    std::fs::write(
        dir.path().join(".env"),
        "STORINATOR_PASSPHRASE=hunter2\nTELEGRAM_API_HASH=0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("bot.env"),
        format!(
            "TELOXIDE_TOKEN=110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw\nTELOXIDE_API_URL={}\nSTORINATOR_ALLOWED_USERS=7\nSTORINATOR_BACKUP_ROOTS={d}\nSTORINATOR_DATA_DIR={d}\nSTORINATOR_BOT_POLL_TIMEOUT_S=1\n",
            api.url()
        ),
    )
    .unwrap();
    let mut child = bot(dir.path()).spawn().unwrap();
    let polled = api
        .wait_for(Duration::from_secs(30), |a| {
            (!a.calls_of("getUpdates").is_empty()).then_some(())
        })
        .await;
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let status = child.wait().unwrap();
    assert!(polled.is_some(), "the bot never polled: it did not start");
    assert!(status.success(), "{status:?}");
}
