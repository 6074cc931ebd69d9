//! Upload and download throughput of the Telegram backend through the real grammers client
//! against the loopback Telegram running as a separate process, on emulated links: for each
//! shared bandwidth cap and each round-trip time, one pack is uploaded and read back, and the
//! rate is printed against the cap. CPU seconds per GiB are measured apart for the client
//! (getrusage) and the server (/proc/<pid>/stat).
//!
//! ```text
//! cargo build --release -p storinator-testkit --bin loopback-telegram
//! cargo run --release -p storinator-worker --example tg_bench -- \
//!     [--rtt-ms 0,50,100] [--cap-mbs 100,20] [--conn-mbps 200] [--jitter-ms 0] \
//!     [--seconds 6] [--mib N] [--concurrency 32] [--server target/release/loopback-telegram]
//! ```
//! `--cap-mbs 0` runs without a shared cap (then `--mib`, default 512, sets the size); with a
//! cap the pack is about `--seconds` worth of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use storinator_shared::storage::{ObjectRef, Storage};
use storinator_worker::telegram::{SchedulerStats, TelegramConfig, TelegramStorage};

fn cpu_self() -> f64 {
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage only writes the struct we hand it.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (t(11) + t(12)) / ticks
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn list(name: &str, default: &str) -> Vec<f64> {
    arg(name)
        .unwrap_or_else(|| default.into())
        .split(',')
        .map(|v| v.trim().parse().unwrap_or_else(|_| panic!("{name}: {v}")))
        .collect()
}

struct Link {
    rtt_ms: u64,
    jitter_ms: u64,
    conn_mbps: f64,
    /// Shared cap, bytes per second (0: none).
    cap: u64,
}

/// Starts the loopback Telegram on `link`; returns it and the session it wrote.
async fn start_server(bin: &str, dir: &Path, link: &Link) -> anyhow::Result<(Child, PathBuf)> {
    let session = dir.join("bench.session");
    let mut cmd = Command::new(bin);
    cmd.arg("--session")
        .arg(&session)
        .arg("--data-dir")
        .arg(dir.join("server"))
        .args(["--rtt-ms", &link.rtt_ms.to_string()])
        .args(["--jitter-ms", &link.jitter_ms.to_string()])
        .args(["--conn-mbps", &link.conn_mbps.to_string()])
        .args(["--bandwidth", &link.cap.to_string()])
        .stdout(Stdio::null());
    let server = cmd
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

fn write_pack(path: &Path, mib: u64) -> anyhow::Result<()> {
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut s = 0x1234_5678_9abc_def1u64;
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

struct Run {
    up_mbs: f64,
    down_mbs: f64,
    up_cpu: f64,
    down_cpu: f64,
    server_cpu: f64,
    stats: SchedulerStats,
}

async fn one_run(bin: &str, link: &Link, mib: u64, window: usize) -> anyhow::Result<Run> {
    let dir = tempfile::tempdir()?;
    let (mut server, session) = start_server(bin, dir.path(), link).await?;
    let mut cfg = TelegramConfig::new(1, "bench", session, dir.path().join("spool"));
    cfg.part_concurrency = window;
    // `--gzip` uploads the way grammers does by default, to measure what skipping it saves.
    cfg.compress_parts = std::env::args().any(|a| a == "--gzip");
    let storage = TelegramStorage::connect(cfg).await?;
    let size = mib * 1024 * 1024;
    let path = storage.spool_dir().join("pack");
    write_pack(&path, mib)?;
    let gib = size as f64 / (1u64 << 30) as f64;
    let mb = size as f64 / 1e6;
    let name = "0000000000000000000000000000bench.enc";

    let (c0, s0, w0) = (cpu_self(), cpu_of(server.id()), Instant::now());
    let loc = storage.put_file(name, &path).await?;
    let (c1, up) = (cpu_self(), w0.elapsed().as_secs_f64());

    // Read back the way a restore does: ranges of up to 4 MiB (restore's largest read),
    // as many requested as the storage's read-ahead, used in order.
    let w1 = Instant::now();
    let obj = ObjectRef::new(name, loc);
    let step = 4 * 1024 * 1024;
    let read_ahead = storage.read_ahead();
    let mut ranges = (0..size)
        .step_by(step as usize)
        .map(|off| (off, step.min(size - off)));
    let mut inflight = std::collections::VecDeque::new();
    let mut requested = 0u64;
    let mut check = 0u64;
    loop {
        while inflight.is_empty() || requested < read_ahead {
            let Some((off, len)) = ranges.next() else {
                break;
            };
            let (storage, obj) = (storage.clone(), obj.clone());
            requested += len;
            inflight.push_back(tokio::spawn(async move {
                (off, len, storage.get_range(&obj, off, len).await)
            }));
        }
        let Some(read) = inflight.pop_front() else {
            break;
        };
        let (off, len, bytes) = read.await?;
        requested -= len;
        let bytes = bytes?;
        anyhow::ensure!(bytes.len() as u64 == len, "short read at {off}");
        // A spot check; byte identity is what the integration tests assert.
        check = check.wrapping_add(u64::from(bytes[0]) + u64::from(bytes[bytes.len() - 1]));
    }
    let (c2, s2, down) = (cpu_self(), cpu_of(server.id()), w1.elapsed().as_secs_f64());
    let stats = storage.scheduler().stats();
    drop(storage);
    let _ = server.kill();
    let _ = server.wait();
    std::hint::black_box(check);
    Ok(Run {
        up_mbs: mb / up,
        down_mbs: mb / down,
        up_cpu: (c1 - c0) / gib,
        down_cpu: (c2 - c1) / gib,
        server_cpu: (s2 - s0) / (2.0 * gib),
        stats,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Default: the server binary of the same build, next to `examples/`.
    let server_bin = arg("--server").unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.join("loopback-telegram")))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "target/release/loopback-telegram".into())
    });
    let window: usize = arg("--concurrency").map_or(
        storinator_worker::telegram::scheduler::DEFAULT_PART_WINDOW,
        |v| v.parse().expect("--concurrency N"),
    );
    let rtts = list("--rtt-ms", "0,50,100");
    let caps = list("--cap-mbs", "100,20");
    let conn_mbps: f64 = arg("--conn-mbps").map_or(200.0, |v| v.parse().expect("--conn-mbps"));
    let jitter_ms: u64 = arg("--jitter-ms").map_or(0, |v| v.parse().expect("--jitter-ms"));
    let seconds: f64 = arg("--seconds").map_or(6.0, |v| v.parse().expect("--seconds"));
    let fixed_mib: Option<u64> = arg("--mib").map(|v| v.parse().expect("--mib N"));
    println!(
        "part window up to {window}, per-connection cap {conn_mbps} Mbit/s ({:.1} MB/s), jitter {jitter_ms} ms",
        conn_mbps / 8.0
    );
    for &cap_mbs in &caps {
        for &rtt in &rtts {
            let cap = (cap_mbs * 1e6) as u64;
            let mib = fixed_mib.unwrap_or(if cap_mbs > 0.0 {
                (cap_mbs * seconds * 1e6 / (1 << 20) as f64).ceil() as u64
            } else {
                512
            });
            let link = Link {
                rtt_ms: rtt as u64,
                jitter_ms,
                conn_mbps,
                cap,
            };
            let r = one_run(&server_bin, &link, mib, window).await?;
            let of_cap = |v: f64| {
                if cap_mbs > 0.0 {
                    format!(" ({:3.0} % of cap)", 100.0 * v / cap_mbs)
                } else {
                    String::new()
                }
            };
            println!(
                "cap {:>5} MB/s  rtt {:3} ms  {mib:4} MiB: upload {:6.1} MB/s{}  download {:6.1} MB/s{}  client {:.2}/{:.2} CPU s/GiB  server {:.2}  peak parts {} (per conn {}), conns {}, cuts {}",
                if cap_mbs > 0.0 {
                    format!("{cap_mbs}")
                } else {
                    "none".into()
                },
                rtt as u64,
                r.up_mbs,
                of_cap(r.up_mbs),
                r.down_mbs,
                of_cap(r.down_mbs),
                r.up_cpu,
                r.down_cpu,
                r.server_cpu,
                r.stats.peak_parts_in_flight,
                r.stats.peak_parts_per_connection,
                r.stats.part_connections,
                r.stats.window_cuts,
            );
        }
    }
    Ok(())
}
