//! The passphrase and the keys never show up where people and other programs look: logs (at
//! RUST_LOG=trace), error messages, the job table and chat messages. A whole session is run
//! (CLI commands as processes, the worker daemon as a process, the bot against the fake Bot
//! API, a passphrase change, a recovery) and everything it left behind is searched for the
//! passphrases and for the key bytes in every usual spelling.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use storinator_shared::{Catalog, JobState, Jobs, Keys};
use storinator_testkit::botapi::FakeBotApi;
use tokio::sync::oneshot;

const PASS: &str = "Tr0ub4dor-first-passphrase-never-shown";
const NEW_PASS: &str = "correct-horse-second-passphrase-never-shown";
const USER: i64 = 7;
const WAIT: Duration = Duration::from_secs(60);

/// Everything the session printed, logged, stored or sent, by where it came from.
#[derive(Default)]
struct Haystack(Vec<(String, Vec<u8>)>);

impl Haystack {
    fn add(&mut self, what: impl Into<String>, bytes: impl Into<Vec<u8>>) {
        self.0.push((what.into(), bytes.into()));
    }
}

/// The ways a 32-byte key tends to end up in text: hex, base64, Rust's `Debug` of an array,
/// and the raw bytes.
fn spellings(key: &[u8]) -> Vec<Vec<u8>> {
    let debug = format!(
        "[{}",
        key[..8]
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let b64 = base64(
        key,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/",
    );
    let b64url = base64(
        key,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    );
    vec![
        hex::encode(key).into_bytes(),
        hex::encode_upper(key).into_bytes(),
        // Without the last, padded group: matches with and without padding.
        b64.as_bytes()[..40].to_vec(),
        b64url.as_bytes()[..40].to_vec(),
        debug.into_bytes(),
        key.to_vec(),
    ]
}

fn base64(data: &[u8], alphabet: &[u8; 64]) -> String {
    let mut out = String::new();
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..=c.len() {
            out.push(alphabet[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Collects what the in-process bot logs.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Session {
    dir: tempfile::TempDir,
    /// The folder chat backups and restores may name.
    root: PathBuf,
    data: PathBuf,
    store: PathBuf,
    found: Haystack,
}

impl Session {
    fn worker(&self, data: &Path, pass: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_storinator-worker"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", "trace")
            .env("STORINATOR_DATA_DIR", data)
            .env(
                "STORINATOR_STORAGE",
                format!("dir:{}", self.store.display()),
            )
            .env("STORINATOR_PASSPHRASE", pass)
            .env("STORINATOR_BACKUP_ROOTS", &self.root)
            .env("STORINATOR_INSECURE_FAST_KDF", "1")
            .current_dir(self.dir.path());
        c
    }

    /// Runs a CLI command at trace level and keeps everything it printed.
    fn cli(&mut self, pass: &str, args: &[&str], env: &[(&str, &str)]) -> i32 {
        let mut c = self.worker(&self.data.clone(), pass);
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        let what = format!("storinator-worker {}", args.join(" "));
        self.found.add(format!("{what} (stdout)"), o.stdout);
        self.found.add(format!("{what} (stderr)"), o.stderr);
        o.status.code().unwrap()
    }
}

async fn wait_job(jobs: &Jobs, id: i64) -> storinator_shared::Job {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let j = jobs.get(id).await.unwrap().unwrap();
        if j.state.is_final() {
            return j;
        }
        assert!(tokio::time::Instant::now() < deadline, "job {id}: {j:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passphrase_and_keys_never_appear_in_logs_errors_jobs_or_chat() {
    let bot_log = Captured::default();
    let sink = bot_log.clone();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("trace"))
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .init();

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("root")).unwrap();
    let root = dir.path().join("root").canonicalize().unwrap();
    let data_src = root.join("data");
    std::fs::create_dir_all(data_src.join("docs")).unwrap();
    std::fs::write(data_src.join("docs/a.txt"), b"alpha").unwrap();
    std::fs::write(data_src.join("b.bin"), vec![3u8; 200_000]).unwrap();
    let mut s = Session {
        root: root.clone(),
        data: dir.path().join("data"),
        store: dir.path().join("store"),
        dir,
        found: Haystack::default(),
    };
    std::fs::create_dir_all(&s.data).unwrap();
    std::fs::create_dir_all(&s.store).unwrap();
    assert_eq!(s.cli(PASS, &["init"], &[]), 0);

    // The key bytes, as only a test build can see them.
    let db = format!("sqlite://{}", s.data.join("storinator.db").display());
    let catalog = Catalog::open(&db).await.unwrap();
    let wrapped = catalog
        .user_key(storinator_shared::engine::repo::KEY_USER)
        .await
        .unwrap()
        .unwrap();
    let master = wrapped.unwrap(PASS).unwrap();
    let mut secrets: Vec<(String, Vec<u8>)> = vec![
        ("the passphrase".into(), PASS.as_bytes().to_vec()),
        ("the new passphrase".into(), NEW_PASS.as_bytes().to_vec()),
    ];
    let subkeys = Keys::derive(&master).bytes_for_tests();
    for (name, key) in [
        ("the master key", master.bytes_for_tests()),
        ("the encryption key", subkeys[0]),
        ("the MAC key", subkeys[1]),
        ("the chunk-id key", subkeys[2]),
    ] {
        for (i, sp) in spellings(&key).into_iter().enumerate() {
            secrets.push((format!("{name} (spelling {i})"), sp));
        }
    }

    // The bot refuses to start holding the passphrase, without repeating it.
    let api = FakeBotApi::start().await.unwrap();
    let vars = [
        (
            "TELOXIDE_TOKEN",
            "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw".to_string(),
        ),
        ("TELOXIDE_API_URL", api.url()),
        ("STORINATOR_ALLOWED_USERS", USER.to_string()),
        ("STORINATOR_BACKUP_ROOTS", root.display().to_string()),
        ("DATABASE_URL", db.clone()),
        ("STORINATOR_DATA_DIR", s.data.display().to_string()),
        ("STORINATOR_BOT_EDIT_INTERVAL_MS", "100".into()),
        ("STORINATOR_BOT_TICK_MS", "25".into()),
        ("STORINATOR_BOT_POLL_TIMEOUT_S", "1".into()),
    ];
    let refused = storinator_bot::BotConfig::from_lookup(|k| {
        if k == "STORINATOR_PASSPHRASE" {
            return Some(PASS.to_string());
        }
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })
    .expect_err("the bot refuses the passphrase");
    s.found.add("the bot's refusal", refused.to_string());
    let cfg = storinator_bot::BotConfig::from_lookup(|k| {
        vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
    })
    .unwrap();
    let (stop_bot, bot_stopped) = oneshot::channel::<()>();
    let bot = tokio::spawn(storinator_bot::run(cfg, async move {
        let _ = bot_stopped.await;
    }));

    // The worker daemon as a process, logging everything.
    let worker_log = s.dir.path().join("worker.log");
    let mut daemon = s
        .worker(&s.data.clone(), PASS)
        .args(["run"])
        .stdout(Stdio::from(std::fs::File::create(&worker_log).unwrap()))
        .stderr(Stdio::from(
            std::fs::File::options()
                .append(true)
                .open(&worker_log)
                .unwrap(),
        ))
        .spawn()
        .unwrap();

    // A chat session: backup, restore, verify and the read-only commands.
    let jobs = Jobs::new(catalog.pool().clone());
    let out = root.join("restored");
    let said = |text: &str| api.push_message(USER, USER, text);
    for (text, is_job) in [
        ("/start".to_string(), false),
        (format!("/backup {}", data_src.display()), true),
        (
            format!("/restore {} to {}", data_src.display(), out.display()),
            true,
        ),
        ("/verify".to_string(), true),
        ("/snapshots".to_string(), false),
        (format!("/ls {}", data_src.display()), false),
        ("/jobs".to_string(), false),
        ("/status".to_string(), false),
        ("/help".to_string(), false),
    ] {
        let before = api.bot_messages(USER).len();
        let jobs_before = jobs.list_for_user(USER, 100).await.unwrap().len();
        said(&text);
        api.wait_for(WAIT, |a| {
            (a.bot_messages(USER).len() > before).then_some(())
        })
        .await
        .unwrap_or_else(|| panic!("no answer to {text}"));
        if is_job {
            // (The message seen may be the previous job's closing notice, sent late: wait
            // for the job row itself.)
            let deadline = std::time::Instant::now() + WAIT;
            let list = loop {
                let list = jobs.list_for_user(USER, 100).await.unwrap();
                if list.len() > jobs_before || std::time::Instant::now() > deadline {
                    break list;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert_eq!(list.len(), jobs_before + 1, "{text} queued no job");
            let j = wait_job(&jobs, list[0].id).await;
            assert_eq!(j.state, JobState::Done, "{text}: {j:?}");
        }
    }
    assert_eq!(
        std::fs::read(out.join("data/docs/a.txt")).unwrap(),
        b"alpha"
    );

    // The CLI: reads, a refused passphrase, a refused second key, a passphrase change and a
    // recovery on a new machine with the new passphrase.
    let src = data_src.display().to_string();
    let cli_out = s.dir.path().join("cli-out").display().to_string();
    for (pass, args, code) in [
        (PASS, vec!["backup", src.as_str()], 0),
        (PASS, vec!["snapshots"], 0),
        (PASS, vec!["ls", src.as_str(), "-r"], 0),
        (
            PASS,
            vec!["restore", src.as_str(), "--to", cli_out.as_str()],
            0,
        ),
        (PASS, vec!["verify", "--read-data"], 0),
        ("wrong passphrase", vec!["verify"], 1),
        (PASS, vec!["init"], 1),
    ] {
        assert_eq!(s.cli(pass, &args, &[]), code, "{args:?}");
    }
    assert_eq!(
        s.cli(
            PASS,
            &["key", "passwd"],
            &[("STORINATOR_NEW_PASSPHRASE", NEW_PASS)]
        ),
        0
    );
    assert_eq!(
        s.cli(PASS, &["verify"], &[]),
        1,
        "the old passphrase is refused"
    );
    let fresh = s.dir.path().join("new-machine");
    std::fs::create_dir_all(&fresh).unwrap();
    let o = s.worker(&fresh, NEW_PASS).arg("recover").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    s.found.add("recover (stdout)", o.stdout);
    s.found.add("recover (stderr)", o.stderr);

    // Stop both programs, then gather what they left.
    assert!(
        Command::new("kill")
            .args(["-TERM", &daemon.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(daemon.wait().unwrap().code(), Some(0));
    let _ = stop_bot.send(());
    tokio::time::timeout(WAIT, bot)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let worker_log = std::fs::read(&worker_log).unwrap();
    assert!(
        find(&worker_log, b"TRACE") || find(&worker_log, b"DEBUG"),
        "the worker logged at trace level"
    );
    s.found.add("the worker daemon's log", worker_log);
    let bot_log = bot_log.0.lock().unwrap().clone();
    assert!(find(&bot_log, b"TRACE"), "the bot logged at trace level");
    s.found.add("the bot's log", bot_log);
    for call in api.calls() {
        s.found.add(
            format!("Bot API call {}", call.method),
            call.params.to_string(),
        );
    }
    let rows = sqlx::query("SELECT * FROM jobs")
        .fetch_all(catalog.pool())
        .await
        .unwrap();
    assert!(rows.len() >= 3);
    for row in &rows {
        use sqlx::{Column, Row};
        for col in row.columns() {
            let i = col.ordinal();
            let text = row
                .try_get::<Option<String>, _>(i)
                .ok()
                .flatten()
                .map(String::into_bytes)
                .or_else(|| row.try_get::<Option<Vec<u8>>, _>(i).ok().flatten())
                .unwrap_or_default();
            s.found
                .add(format!("job table column {}", col.name()), text);
        }
    }

    // Every owner's key too (the chat user's and `local`'s, made by their first backups).
    let wrap = storinator_shared::format::crypto::KeyWrap::derive(&master);
    let owner_rows = catalog.owner_keys(None).await.unwrap();
    assert!(owner_rows.len() >= 2, "{owner_rows:?}");
    for row in owner_rows {
        let key = wrap.open(&row.key_id, &row.sealed).unwrap();
        let sub = key.keys().bytes_for_tests();
        for (name, bytes) in [
            ("master key", key.bytes_for_tests()),
            ("encryption key", sub[0]),
            ("MAC key", sub[1]),
            ("chunk-id key", sub[2]),
        ] {
            for (i, sp) in spellings(&bytes).into_iter().enumerate() {
                secrets.push((format!("{}'s {name} (spelling {i})", row.owner), sp));
            }
        }
    }

    let mut leaks = Vec::new();
    for (what, hay) in &s.found.0 {
        for (name, needle) in &secrets {
            if find(hay, needle) {
                leaks.push(format!("{name} in {what}"));
            }
        }
    }
    assert!(leaks.is_empty(), "secrets leaked:\n{}", leaks.join("\n"));
    let total: usize = s.found.0.iter().map(|(_, h)| h.len()).sum();
    println!(
        "searched {} sources, {total} bytes, for {} spellings of secrets",
        s.found.0.len(),
        secrets.len()
    );
}
