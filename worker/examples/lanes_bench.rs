//! Upload throughput of one lane against two: each lane is its own loopback Telegram account
//! (a separate `loopback-telegram` process) with its own bandwidth cap, as Telegram caps each
//! account; packs are uploaded through [`Lanes`] the way a backup does (one pack in flight per
//! lane, placed by headroom). Runs alternate one lane, two lanes, one, two, ... so that the
//! machine's load hits both alike, and each pair's ratio is printed.
//!
//! ```text
//! cargo build --release -p storinator-testkit --bin loopback-telegram
//! cargo run --release -p storinator-worker --example lanes_bench -- \
//!     [--cap-mbs 10] [--conn-mbps 200] [--rtt-ms 20] [--packs 8] [--pack-mib 16] [--pairs 2] \
//!     [--server target/release/loopback-telegram]
//! ```

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt};
use storinator_shared::storage::{Lane, Lanes, Storage};
use storinator_worker::telegram::{TelegramConfig, TelegramStorage};

/// Upload throughput of one lane against two (see the top of worker/examples/lanes_bench.rs).
#[derive(clap::Parser)]
struct Args {
    /// Each account's bandwidth cap in MB/s
    #[arg(long, default_value_t = 10.0)]
    cap_mbs: f64,
    /// Per-connection cap in Mbit/s
    #[arg(long, default_value_t = 200.0)]
    conn_mbps: f64,
    /// Round-trip time to emulate, in ms
    #[arg(long, default_value_t = 20)]
    rtt_ms: u64,
    /// Packs per run
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u64).range(1..))]
    packs: u64,
    /// Each pack's size in MiB
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u64).range(1..))]
    pack_mib: u64,
    /// Pairs of runs (one lane, then two)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pairs: u64,
    /// The loopback-telegram to run (default: the one of this build)
    #[arg(long, value_name = "PATH")]
    server: Option<String>,
}

/// One loopback account with its own cap.
async fn start_server(
    bin: &str,
    dir: &Path,
    cap: u64,
    conn_mbps: f64,
    rtt_ms: u64,
) -> anyhow::Result<(Child, PathBuf)> {
    let session = dir.join("bench.session");
    let server = Command::new(bin)
        .arg("--session")
        .arg(&session)
        .arg("--data-dir")
        .arg(dir.join("server"))
        .args(["--rtt-ms", &rtt_ms.to_string()])
        .args(["--conn-mbps", &conn_mbps.to_string()])
        .args(["--bandwidth", &cap.to_string()])
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {bin}: {e} (build it first)"))?;
    let t0 = Instant::now();
    while !session.exists() {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((server, session))
}

fn write_pack(path: &Path, mib: u64, seed: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut s = 0x1234_5678_9abc_def1u64 ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..mib {
        for chunk in block.chunks_mut(8) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            chunk.copy_from_slice(&s.to_le_bytes());
        }
        f.write_all(&block)?;
    }
    f.flush()?;
    Ok(())
}

struct Setup {
    bin: String,
    cap: u64,
    conn_mbps: f64,
    rtt_ms: u64,
    packs: u64,
    pack_mib: u64,
}

/// Uploads `packs` packs through `lanes` lanes; returns MB/s and the packs each lane took.
async fn one_run(s: &Setup, lanes: usize) -> anyhow::Result<(f64, Vec<usize>)> {
    let dir = tempfile::tempdir()?;
    let mut servers = Vec::new();
    let mut members = Vec::new();
    for i in 0..lanes {
        let d = dir.path().join(format!("account{i}"));
        std::fs::create_dir_all(&d)?;
        let (server, session) = start_server(&s.bin, &d, s.cap, s.conn_mbps, s.rtt_ms).await?;
        servers.push(server);
        let cfg = TelegramConfig::new(1, "bench", session, d.join("spool"));
        let tg: Arc<dyn Storage> = Arc::new(TelegramStorage::connect(cfg).await?);
        members.push(Lane::ready(format!("l{i}"), tg));
    }
    let spool = dir.path().join("spool");
    std::fs::create_dir_all(&spool)?;
    let store = Lanes::new(members, 1, spool.clone())?;
    let paths: Vec<PathBuf> = (0..s.packs)
        .map(|i| {
            let p = spool.join(format!("pack{i}"));
            write_pack(&p, s.pack_mib, i).map(|_| p)
        })
        .collect::<anyhow::Result<_>>()?;
    let parallel = store.parallel_uploads();
    let started = Instant::now();
    let mut inflight = FuturesUnordered::new();
    let mut next = paths.iter().enumerate();
    let mut per_lane = vec![0usize; lanes];
    loop {
        while inflight.len() < parallel {
            let Some((i, p)) = next.next() else { break };
            let name = format!("{i:032x}.enc");
            let store = &store;
            inflight.push(async move { store.put_file(&name, p).await });
        }
        let Some(done) = inflight.next().await else {
            break;
        };
        let loc = done?;
        for c in store.copies_in(&loc) {
            per_lane[c.lane[1..].parse::<usize>()?] += 1;
        }
    }
    let took = started.elapsed().as_secs_f64();
    drop(inflight);
    drop(store);
    for mut server in servers {
        let _ = server.kill();
        let _ = server.wait();
    }
    let mb = (s.packs * s.pack_mib * 1024 * 1024) as f64 / 1e6;
    Ok((mb / took, per_lane))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let default_bin = std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.join("loopback-telegram")))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "target/release/loopback-telegram".into());
    let args = <Args as clap::Parser>::parse();
    let cap_mbs = args.cap_mbs;
    let s = Setup {
        bin: args.server.unwrap_or(default_bin),
        cap: (cap_mbs * 1e6) as u64,
        conn_mbps: args.conn_mbps,
        rtt_ms: args.rtt_ms,
        packs: args.packs,
        pack_mib: args.pack_mib,
    };
    let pairs = args.pairs as usize;
    println!(
        "per-account cap {cap_mbs} MB/s, per-connection cap {} Mbit/s, rtt {} ms, {} packs of {} MiB",
        s.conn_mbps, s.rtt_ms, s.packs, s.pack_mib
    );
    let mut ratios = Vec::new();
    for pair in 0..pairs {
        let (one, _) = one_run(&s, 1).await?;
        let (two, split) = one_run(&s, 2).await?;
        let ratio = two / one;
        ratios.push(ratio);
        println!(
            "pair {}: one lane {one:6.2} MB/s, two lanes {two:6.2} MB/s (packs per lane {split:?}): {ratio:.2}x",
            pair + 1
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!(
        "two lanes / one lane: min {:.2}x, median {:.2}x, max {:.2}x",
        ratios[0],
        ratios[ratios.len() / 2],
        ratios[ratios.len() - 1]
    );
    Ok(())
}
