//! `storinator-demo`: watch a full backup and restore from a Telegram chat, on this machine
//! alone.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Watch a full backup and restore from a Telegram chat, on this machine alone.
///
/// Starts a loopback Telegram (Bot API and MTProto) in-process, runs the real bot and worker
/// against it, creates a sample folder (or uses --path), plays /backup, /snapshots and
/// /restore in the chat, prints the chat as it happens, checks the restored tree byte for
/// byte and prints a summary. No Telegram account, no network, no configuration needed.
#[derive(Parser, Debug)]
#[command(name = "storinator-demo", version, about, long_about)]
struct Args {
    /// Back up this folder instead of a generated sample.
    #[arg(long, value_name = "DIR")]
    path: Option<PathBuf>,
    /// Keep the demo's files (sample, catalog, loopback cloud, restore) in DIR instead of a
    /// temporary folder removed at the end.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Cap the loopback Telegram's bandwidth (MiB/s) to watch progress on a small folder;
    /// 0 = uncapped.
    #[arg(long, value_name = "MIB_PER_S", default_value_t = 24)]
    bandwidth: u64,
    /// Round-trip time of each loopback connection, in milliseconds (Telegram is 50 to
    /// 150 ms away).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    rtt_ms: u64,
    /// Extra random delay per message, up to this many milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 0)]
    jitter_ms: u64,
    /// Bandwidth cap of each loopback connection, in megabits per second (0 = none).
    #[arg(long, value_name = "MBIT_PER_S", default_value_t = 0.0)]
    conn_mbps: f64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    // The demo prints a chat; only errors should interrupt it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let opts = storinator_demo::DemoOptions {
        path: args.path,
        workdir: args.keep,
        bandwidth: (args.bandwidth > 0).then_some(args.bandwidth << 20),
        net: storinator_testkit::mtproto::NetProfile {
            rtt: std::time::Duration::from_millis(args.rtt_ms),
            jitter: std::time::Duration::from_millis(args.jitter_ms),
            conn_bytes_per_sec: (args.conn_mbps > 0.0)
                .then(|| storinator_testkit::mtproto::NetProfile::mbps(args.conn_mbps)),
        },
    };
    match rt.block_on(storinator_demo::run(opts)) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
