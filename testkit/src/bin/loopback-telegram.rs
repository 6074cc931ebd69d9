//! Runs the loopback Telegram on 127.0.0.1 and writes a worker session for it.
//!
//! ```text
//! loopback-telegram --session ./data/worker.session [--port 0] [--data-dir DIR]
//!                   [--channel TITLE]... [--message-rate N] [--bandwidth BYTES_PER_SEC]
//! ```
//! Point the worker at it with `STORINATOR_SESSION_FILE=<session>`; to store in the
//! channel instead of Saved Messages, set `STORINATOR_STORAGE_CHAT` to the printed id.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use storinator_testkit::mtproto::{LoopbackOptions, LoopbackTelegram};

#[derive(Parser)]
#[command(about = "A loopback Telegram (MTProto) for the storinator worker")]
struct Args {
    /// Where to write the worker session file (mode 0600).
    #[arg(long)]
    session: PathBuf,
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Directory for documents; a temporary one if omitted.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Private channel titles to create (default: one, "storinator-storage").
    #[arg(long = "channel")]
    channels: Vec<String>,
    /// Message-class calls allowed per minute before FLOOD_WAIT (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    message_rate: u32,
    /// Cap on part/download bytes per second (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    bandwidth: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let mut opts = LoopbackOptions {
        data_dir: args.data_dir,
        port: args.port,
        message_rate: (args.message_rate > 0).then(|| (args.message_rate, Duration::from_secs(60))),
        bandwidth: (args.bandwidth > 0).then_some(args.bandwidth),
        ..Default::default()
    };
    if !args.channels.is_empty() {
        opts.channels = args.channels;
    }
    let server = LoopbackTelegram::start(opts)
        .await
        .context("starting the loopback telegram")?;
    if let Some(dir) = args.session.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    server
        .write_session(&args.session)
        .with_context(|| format!("writing session {}", args.session.display()))?;
    println!("loopback telegram listening on {}", server.addr());
    println!("session written to {}", args.session.display());
    for c in server.channels() {
        println!(
            "channel {:?}: STORINATOR_STORAGE_CHAT=-100{}",
            c.title, c.id
        );
    }
    // Ctrl-C or SIGTERM (docker stop) both end it cleanly, flushing the state file.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    let counters = server.counters().snapshot();
    server.shutdown().await;
    println!("calls: {counters:?}");
    Ok(())
}
