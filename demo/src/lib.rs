//! `storinator-demo`: a full chat session against a loopback Telegram, no account and no
//! network needed. A crate of its own, so the production worker and bot binaries carry
//! neither the loopback Telegram nor each other. The real bot (teloxide) talks to a fake Bot API server, the real worker
//! daemon uploads through the real grammers client to a loopback MTProto server; this module
//! plays the user's side of the chat and prints it as it happens.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use storinator_shared::{
    Catalog, EngineSettings, Jobs, KdfParams, Repo, Storage, dedup_figure, human_bytes, plural,
};
use storinator_testkit::botapi::FakeBotApi;
use storinator_testkit::fixtures::describe_tree;
use storinator_testkit::mtproto::{LoopbackOptions, LoopbackTelegram};

use storinator_worker::daemon::{self, Courier, DaemonConfig};
use storinator_worker::telegram::{TelegramConfig, TelegramStorage};

/// The loopback Bot API accepts any well-formed token.
const DEMO_TOKEN: &str = "4242:DemoTokenForTheLoopbackBotApiOnly0000";

/// The chat user the demo plays.
const USER: i64 = 4242;
const PASSPHRASE: &str = "demo passphrase: use a long random one for real backups";

/// Demo options.
#[derive(Clone, Debug, Default)]
pub struct DemoOptions {
    /// Back up this folder instead of a generated sample.
    pub path: Option<PathBuf>,
    /// Keep the demo's files here (default: a temporary directory removed at the end).
    pub workdir: Option<PathBuf>,
    /// Loopback bandwidth cap in bytes per second (None: as fast as the machine goes).
    pub bandwidth: Option<u64>,
    /// Round-trip time, jitter and per-connection bandwidth of the loopback's network.
    pub net: storinator_testkit::mtproto::NetProfile,
}

/// What the demo measured.
#[derive(Debug)]
pub struct DemoReport {
    pub bytes: u64,
    pub files: u64,
    pub stored: u64,
    pub backup_secs: f64,
    pub restore_secs: f64,
    pub mtproto_calls: std::collections::BTreeMap<String, u64>,
    pub bot_api_calls: usize,
    pub transcript: String,
}

/// Runs the demo, printing the chat to stdout.
pub async fn run(opts: DemoOptions) -> anyhow::Result<DemoReport> {
    let temp = tempfile::tempdir().context("creating the demo directory")?;
    let work = match &opts.workdir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.canonicalize()?
        }
        None => temp.path().canonicalize()?,
    };
    let source = match &opts.path {
        Some(p) => {
            let p = p
                .canonicalize()
                .with_context(|| format!("demo --path {}", p.display()))?;
            if !p.is_dir() {
                bail!("demo --path {}: not a directory", p.display());
            }
            p
        }
        None => {
            let p = work.join("sample/photos-and-docs");
            make_sample(&p)?;
            p
        }
    };
    let restore_to = work.join("restored");
    std::fs::create_dir_all(&restore_to)?;

    println!("T-Storinator demo: everything runs on this machine, against a loopback Telegram.");
    println!("  workdir:  {}", work.display());
    println!("  folder:   {}", source.display());

    // Loopback Telegram: MTProto for the worker, Bot API for the bot.
    let mtproto = LoopbackTelegram::start(LoopbackOptions {
        data_dir: Some(work.join("telegram-cloud")),
        bandwidth: opts.bandwidth,
        net: opts.net,
        ..Default::default()
    })
    .await
    .context("starting the loopback MTProto server")?;
    let botapi = FakeBotApi::start()
        .await
        .context("starting the fake Bot API server")?;
    println!(
        "  loopback MTProto on {}, Bot API on {}",
        mtproto.addr(),
        botapi.url()
    );

    // The worker: session, storage, key, daemon.
    let session = work.join("worker.session");
    mtproto.write_session(&session)?;
    let tcfg = TelegramConfig::new(1, "loopback", session, work.join("spool"));
    let telegram = TelegramStorage::connect(tcfg).await?;
    let courier: Arc<dyn Courier> = Arc::new(telegram.clone());
    let storage: Arc<dyn Storage> = Arc::new(telegram);
    let db_url = storinator_shared::config::sqlite_url(&work.join("storinator.db"));
    let catalog = Catalog::open(&db_url).await?;
    if catalog
        .user_key(storinator_shared::engine::repo::KEY_USER)
        .await?
        .is_none()
    {
        // The demo uses a fast key derivation; `storinator-worker init` uses Argon2id at 64 MiB.
        Repo::init(
            &catalog,
            storage.as_ref(),
            PASSPHRASE,
            KdfParams::fast_for_tests(),
        )
        .await?;
    }
    let repo = Arc::new(
        Repo::open(
            catalog.clone(),
            storage,
            PASSPHRASE,
            EngineSettings::default(),
        )
        .await?,
    );
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let daemon = tokio::spawn(daemon::run(
        repo.clone(),
        Jobs::new(catalog.pool().clone()),
        DaemonConfig {
            poll_interval: Duration::from_millis(200),
            restore_roots: vec![restore_to.clone()],
            outbox_dir: work.join("outbox"),
            courier: Some(courier),
            host: None,
            host_heartbeat: Duration::from_secs(30),
            ..Default::default()
        },
        stopped(stop_rx.clone()),
    ));

    // The bot, configured as a user would in .env.
    let env: HashMap<&str, String> = HashMap::from([
        ("TELOXIDE_TOKEN", DEMO_TOKEN.to_string()),
        ("TELOXIDE_API_URL", botapi.url()),
        ("STORINATOR_ALLOWED_USERS", USER.to_string()),
        (
            "STORINATOR_BACKUP_ROOTS",
            source.parent().unwrap_or(&source).display().to_string(),
        ),
        ("STORINATOR_RESTORE_ROOTS", restore_to.display().to_string()),
        ("DATABASE_URL", db_url.clone()),
        ("STORINATOR_DATA_DIR", work.display().to_string()),
        ("STORINATOR_BOT_EDIT_INTERVAL_MS", "1000".to_string()),
        ("STORINATOR_BOT_TICK_MS", "250".to_string()),
        ("STORINATOR_BOT_POLL_TIMEOUT_S", "1".to_string()),
    ]);
    let bot_cfg = storinator_bot::BotConfig::from_lookup(|k| env.get(k).cloned())?;
    let bot = tokio::spawn(storinator_bot::run(bot_cfg, stopped(stop_rx.clone())));

    let mut chat = ChatPrinter::default();
    let result = play(&botapi, &mut chat, &source, &restore_to).await;
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(15), bot).await;
    let _ = tokio::time::timeout(Duration::from_secs(30), daemon).await;
    let (backup_secs, restore_secs) = result?;

    // Byte for byte.
    let name = source.file_name().unwrap_or_default();
    let restored = restore_to.join(name);
    let (a, b) = (describe_tree(&source), describe_tree(&restored));
    if a != b {
        let diff: Vec<_> = a
            .iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, _)| k.clone())
            .take(5)
            .collect();
        bail!("the restored tree differs from the original at {diff:?}");
    }
    let snaps = repo.snapshots(&format!("tg:{USER}"), None).await?;
    let last = snaps.last().context("no snapshot recorded")?;
    let report = DemoReport {
        bytes: last.bytes,
        files: last.files,
        stored: snaps.iter().map(|s| s.bytes_stored).sum(),
        backup_secs,
        restore_secs,
        // API methods only (not the per-data-centre and session-level tallies).
        mtproto_calls: mtproto
            .counters()
            .snapshot()
            .into_iter()
            .filter(|(k, _)| k.contains('.') && !k.contains(':'))
            .collect(),
        bot_api_calls: botapi.calls().len(),
        transcript: botapi.transcript_text(USER),
    };
    println!();
    println!(
        "✔ restored tree is identical to {} ({} entries compared: content, mode, mtime, links)",
        source.display(),
        a.len()
    );
    println!("summary");
    println!(
        "  backed up   {} in {}; stored {} in Telegram (dedup {})",
        human_bytes(report.bytes),
        plural(report.files, "file", "files"),
        human_bytes(last.bytes_stored),
        dedup_figure(last.bytes, last.bytes_stored)
    );
    println!(
        "  backup      {:.1}s from command to summary ({}/s)",
        backup_secs,
        human_bytes((report.bytes as f64 / backup_secs.max(0.001)) as u64)
    );
    println!(
        "  restore     {:.1}s from command to summary ({}/s)",
        restore_secs,
        human_bytes((report.bytes as f64 / restore_secs.max(0.001)) as u64)
    );
    match opts.bandwidth {
        Some(b) => println!(
            "              (the loopback Telegram was capped at {}/s so the progress is visible; --bandwidth 0 lifts the cap)",
            human_bytes(b)
        ),
        None if opts.net.rtt.is_zero() && opts.net.conn_bytes_per_sec.is_none() => {
            println!("              (loopback Telegram uncapped: these figures are this machine's)")
        }
        None => {}
    }
    if opts.net != storinator_testkit::mtproto::NetProfile::default() {
        let n = opts.net;
        println!(
            "              (network: {} ms round trip, {} ms jitter, {} per connection)",
            n.rtt.as_millis(),
            n.jitter.as_millis(),
            n.conn_bytes_per_sec
                .map_or("no cap".into(), |b| format!("{}/s", human_bytes(b)))
        );
    }
    let message_class: u64 = mtproto.counters().message_class_calls();
    println!(
        "  MTProto     {} (Telegram allows about 100 a minute), {} in all:",
        plural(message_class, "message-class call", "message-class calls"),
        plural(report.mtproto_calls.values().sum(), "call", "calls")
    );
    for (method, n) in &report.mtproto_calls {
        println!("                {n:>6}  {method}");
    }
    println!(
        "  Bot API     {}",
        plural(report.bot_api_calls as u64, "call", "calls")
    );
    mtproto.shutdown().await;
    println!();
    match &opts.workdir {
        Some(d) => println!("The demo's files are kept in {}.", d.display()),
        None => println!(
            "Removed the demo's workdir {} (sample, catalog, loopback cloud, restore); --keep DIR keeps it.",
            work.display()
        ),
    }
    println!(
        "Next step: a real deployment with your own Telegram account and bot, README.md section \"Real deployment\" (build, credentials, .env, login, init, run)."
    );
    Ok(report)
}

/// The user's side of the chat.
async fn play(
    api: &FakeBotApi,
    chat: &mut ChatPrinter,
    source: &Path,
    restore_to: &Path,
) -> anyhow::Result<(f64, f64)> {
    say(api, chat, "/start").await;
    wait_text(api, chat, "/backup", Duration::from_secs(20)).await?;

    let t = Instant::now();
    say(api, chat, &format!("/backup {}", source.display())).await;
    wait_done(api, chat, "Backup #", Duration::from_secs(600)).await?;
    let backup_secs = t.elapsed().as_secs_f64();

    say(api, chat, &format!("/snapshots {}", source.display())).await;
    wait_text(api, chat, "📚", Duration::from_secs(20)).await?;

    let sub = source.display().to_string();
    let t = Instant::now();
    say(
        api,
        chat,
        &format!("/restore {sub} to {}", restore_to.display()),
    )
    .await;
    wait_done(api, chat, "Restore #", Duration::from_secs(600)).await?;
    let restore_secs = t.elapsed().as_secs_f64();
    Ok((backup_secs, restore_secs))
}

async fn say(api: &FakeBotApi, chat: &mut ChatPrinter, text: &str) {
    chat.flush(api);
    println!("\n👤 you: {text}");
    api.push_message(USER, USER, text);
}

/// Waits for a bot message (sent after the last user message) containing `needle`.
async fn wait_text(
    api: &FakeBotApi,
    chat: &mut ChatPrinter,
    needle: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let seen = chat.seen_messages;
    loop {
        chat.flush(api);
        if api
            .bot_messages(USER)
            .iter()
            .skip(seen)
            .any(|m| m.text.contains(needle))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the bot did not answer with {needle:?} within {}s",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for the job message titled `title` to reach a final state.
async fn wait_done(
    api: &FakeBotApi,
    chat: &mut ChatPrinter,
    title: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        chat.flush(api);
        let msgs = api.bot_messages(USER);
        if let Some(m) = msgs.iter().rev().find(|m| m.text.contains(title)) {
            // Done once the short notice that ends every job has arrived.
            if m.text.starts_with('✅') && m.text.contains(" done: ") {
                return Ok(());
            }
            if m.text.starts_with('❌') || m.text.starts_with('✋') || m.text.starts_with('🛑')
            {
                bail!("the job did not succeed:\n{}", m.text);
            }
        }
        if Instant::now() > deadline {
            bail!("{title} did not finish within {}s", timeout.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Prints bot messages and their edits as they appear.
#[derive(Default)]
struct ChatPrinter {
    shown: HashMap<i32, usize>,
    seen_messages: usize,
}

impl ChatPrinter {
    fn flush(&mut self, api: &FakeBotApi) {
        let msgs = api.bot_messages(USER);
        self.seen_messages = msgs.len();
        for m in msgs {
            let history = m.history();
            let shown = self.shown.entry(m.message_id).or_insert(0);
            for (i, text) in history.iter().enumerate().skip(*shown) {
                let tag = if i == 0 {
                    "🤖 bot"
                } else {
                    "🤖 bot (edited)"
                };
                println!("{tag}: {}", indent(text));
            }
            *shown = history.len();
        }
    }
}

fn indent(text: &str) -> String {
    text.replace('\n', "\n      ")
}

/// A sample folder: photos (incompressible), documents (text), a duplicate, an empty
/// folder, an empty file and a symlink.
fn make_sample(root: &Path) -> anyhow::Result<()> {
    if root.exists() {
        return Ok(());
    }
    std::fs::create_dir_all(root.join("photos/2026"))?;
    std::fs::create_dir_all(root.join("docs/notes"))?;
    std::fs::create_dir_all(root.join("empty-folder"))?;
    for i in 0..6u64 {
        std::fs::write(
            root.join(format!("photos/2026/IMG_{i:04}.jpg")),
            storinator_testkit::fixtures::bytes(5_000_000 + i as usize * 700_000, i + 1),
        )?;
    }
    std::fs::copy(
        root.join("photos/2026/IMG_0001.jpg"),
        root.join("photos/IMG_0001 (copy).jpg"),
    )?;
    for i in 0..200 {
        let text =
            format!("Note {i}: the quick brown fox jumps over the lazy dog.\n").repeat(20 + i % 50);
        std::fs::write(root.join(format!("docs/notes/note-{i:03}.txt")), text)?;
    }
    std::fs::write(root.join("docs/empty.txt"), b"")?;
    std::fs::write(
        root.join("docs/README.md"),
        "# My files\nBacked up by T-Storinator.\n",
    )?;
    std::os::unix::fs::symlink("docs/README.md", root.join("README-link"))?;
    Ok(())
}
