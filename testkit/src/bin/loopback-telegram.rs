//! Runs the loopback Telegram on 127.0.0.1 and writes a worker session for it.
//!
//! ```text
//! loopback-telegram --session ./data/worker.session [--port 0] [--data-dir DIR]
//!                   [--channel TITLE]... [--message-rate N] [--bandwidth BYTES_PER_SEC]
//!                   [--rtt-ms MS] [--jitter-ms MS] [--conn-mbps MBIT_PER_SEC]
//! ```
//! Point the worker at it with `STORINATOR_SESSION_FILE=<session>`; to store in the
//! channel instead of Saved Messages, set `STORINATOR_STORAGE_CHAT` to the printed id.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use storinator_testkit::mtproto::{LoopbackOptions, LoopbackTelegram, NetProfile};

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
    /// Cap on part/download bytes per second across all connections (0 = unlimited).
    #[arg(long, default_value_t = 0)]
    bandwidth: u64,
    /// Round-trip time of every connection, in milliseconds (real Telegram: 50 to 150).
    #[arg(long, default_value_t = 0)]
    rtt_ms: u64,
    /// Extra one-way delay drawn per message from [0, jitter], in milliseconds.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Bandwidth cap of each connection, each direction, in megabits per second (0 = none).
    #[arg(long, default_value_t = 0.0)]
    conn_mbps: f64,
}

impl Args {
    fn net(&self) -> NetProfile {
        NetProfile {
            rtt: Duration::from_millis(self.rtt_ms),
            jitter: Duration::from_millis(self.jitter_ms),
            conn_bytes_per_sec: (self.conn_mbps > 0.0).then(|| NetProfile::mbps(self.conn_mbps)),
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    let mut opts = LoopbackOptions {
        net: args.net(),
        data_dir: args.data_dir,
        port: args.port,
        message_rate: (args.message_rate > 0).then(|| (args.message_rate, Duration::from_secs(60))),
        bandwidth: (args.bandwidth > 0).then_some(args.bandwidth),
        ..Default::default()
    };
    if !args.channels.is_empty() {
        opts.channels = args.channels.into_iter().map(Into::into).collect();
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
    for dc in [2, 4] {
        if let Some(a) = server.dc_addr(dc) {
            println!("  data centre {dc}: {a}");
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_flags_make_the_profile() {
        let a = Args::parse_from([
            "loopback-telegram",
            "--session",
            "s",
            "--rtt-ms",
            "80",
            "--jitter-ms",
            "10",
            "--conn-mbps",
            "40",
        ]);
        assert_eq!(
            a.net(),
            NetProfile {
                rtt: Duration::from_millis(80),
                jitter: Duration::from_millis(10),
                conn_bytes_per_sec: Some(5_000_000),
            }
        );
        let a = Args::parse_from(["loopback-telegram", "--session", "s"]);
        assert_eq!(a.net(), NetProfile::default());
    }
}
