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
//!     [--seconds 6] [--mib N] [--concurrency 32] [--server target/release/loopback-telegram] \
//!     [--packs 1] [--parallel N] [--timeline]
//! ```
//! `--packs N` uploads the same bytes as N packs, as many at once as the storage takes (a
//! backup's packer does the same); `--timeline` prints where the upload's time went: when the
//! first part was answered, how the rate ramped up, the steady rate, when each pack's parts
//! were all answered and when it was published.
//! `--cap-mbs 0` runs without a shared cap (then `--mib`, default 512, sets the size); with a
//! cap the pack is about `--seconds` worth of it.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
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

/// Upload and download throughput of the Telegram backend against the loopback Telegram on
/// emulated links (see the top of worker/examples/tg_bench.rs).
#[derive(clap::Parser)]
struct Args {
    /// Round-trip times to emulate, in ms, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "0,50,100")]
    rtt_ms: Vec<u64>,
    /// Shared bandwidth caps in MB/s, comma-separated (0: no cap)
    #[arg(long, value_delimiter = ',', default_value = "100,20")]
    cap_mbs: Vec<f64>,
    /// Per-connection cap in Mbit/s
    #[arg(long, default_value_t = 200.0)]
    conn_mbps: f64,
    /// Random extra delay per message, up to this many ms
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Size the pack to about this many seconds of the cap
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
    /// The pack's size in MiB (instead of --seconds; without a cap, default 512)
    #[arg(long, value_name = "N")]
    mib: Option<u64>,
    /// Parts in flight at most (default: the storage's window)
    #[arg(long, value_name = "N")]
    concurrency: Option<usize>,
    /// The loopback-telegram to run (default: the one of this build)
    #[arg(long, value_name = "PATH")]
    server: Option<String>,
    /// Upload the same bytes as N packs
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    packs: u64,
    /// Packs uploaded at once (default: as many as the storage takes)
    #[arg(long, value_name = "N")]
    parallel: Option<usize>,
    /// Print where the upload's time went
    #[arg(long)]
    timeline: bool,
    /// Compress parts the way grammers does by default, to measure what skipping it saves
    #[arg(long)]
    gzip: bool,
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

struct KillOnDrop(Child);

impl KillOnDrop {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
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

async fn one_run(
    args: &Args,
    bin: &str,
    link: &Link,
    mib: u64,
    window: usize,
) -> anyhow::Result<Run> {
    let (packs, timeline) = (args.packs as usize, args.timeline);
    let dir = tempfile::tempdir()?;
    let (server, session) = start_server(bin, dir.path(), link).await?;
    // Stopped however the run ends.
    let server = KillOnDrop(server);
    let mut cfg = TelegramConfig::new(1, "bench", session, dir.path().join("spool"));
    cfg.part_concurrency = window;
    // `--gzip` uploads the way grammers does by default, to measure what skipping it saves.
    cfg.compress_parts = args.gzip;
    let storage = TelegramStorage::connect(cfg).await?;
    let size = mib * 1024 * 1024;
    let path = storage.spool_dir().join("pack");
    write_pack(&path, mib)?;
    let gib = size as f64 / (1u64 << 30) as f64;
    let mb = size as f64 / 1e6;

    // The same bytes as `packs` packs, uploaded the way a backup's packer does: as many at
    // once as the storage takes, each started when one finishes.
    let names: Vec<String> = (0..packs).map(|i| format!("{i:032x}.enc")).collect();
    let pack_paths: Vec<PathBuf> = if packs == 1 {
        vec![path.clone()]
    } else {
        let per = size.div_ceil(packs as u64);
        let all = std::fs::read(&path)?;
        let mut v = Vec::new();
        for (i, piece) in all.chunks(per as usize).enumerate() {
            let p = storage.spool_dir().join(format!("pack{i}"));
            std::fs::write(&p, piece)?;
            v.push(p);
        }
        v
    };
    let first_size = std::fs::metadata(&pack_paths[0])?.len();
    let sampler = Sampler::start(storage.clone());
    let (c0, s0, w0) = (cpu_self(), cpu_of(server.id()), Instant::now());
    // `--parallel N` overrides the storage's packs at once, to compare.
    let parallel = args.parallel.unwrap_or(storage.parallel_uploads()).max(1);
    let mut uploads = futures_util::stream::iter(names.iter().zip(&pack_paths).map(|(n, p)| {
        let storage = storage.clone();
        async move {
            let t0 = w0.elapsed();
            let loc = storage.put_file(n, p).await;
            (n.clone(), t0, w0.elapsed(), loc)
        }
    }))
    .buffered(parallel);
    let mut packs_done = Vec::new();
    while let Some((n, t0, t1, loc)) = uploads.next().await {
        packs_done.push((n, t0, t1, loc?));
    }
    drop(uploads);
    let (c1, up) = (cpu_self(), w0.elapsed().as_secs_f64());
    let samples = sampler.stop().await;
    if timeline {
        print_timeline(&samples, &packs_done, link, size);
    }
    let loc = packs_done[0].3.clone();
    let name = packs_done[0].0.clone();
    let size = first_size;

    // Read back the way a restore does: ranges of up to 4 MiB (restore's largest read),
    // as many requested as the storage's read-ahead, used in order.
    let w1 = Instant::now();
    let obj = ObjectRef::new(&name, loc);
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
    drop(server);
    std::hint::black_box(check);
    Ok(Run {
        up_mbs: mb / up,
        down_mbs: size as f64 / 1e6 / down,
        up_cpu: (c1 - c0) / gib,
        down_cpu: (c2 - c1) / (size as f64 / (1u64 << 30) as f64),
        server_cpu: (s2 - s0) / (gib + size as f64 / (1u64 << 30) as f64),
        stats,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Default: the server binary of the same build, next to `examples/`.
    let args = <Args as clap::Parser>::parse();
    let server_bin = args.server.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.join("loopback-telegram")))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "target/release/loopback-telegram".into())
    });
    let window = args
        .concurrency
        .unwrap_or(storinator_worker::telegram::scheduler::DEFAULT_PART_WINDOW);
    let (conn_mbps, jitter_ms, seconds) = (args.conn_mbps, args.jitter_ms, args.seconds);
    println!(
        "part window up to {window}, per-connection cap {conn_mbps} Mbit/s ({:.1} MB/s), jitter {jitter_ms} ms",
        conn_mbps / 8.0
    );
    for &cap_mbs in &args.cap_mbs {
        for &rtt in &args.rtt_ms {
            let cap = (cap_mbs * 1e6) as u64;
            let mib = args.mib.unwrap_or(if cap_mbs > 0.0 {
                (cap_mbs * seconds * 1e6 / (1 << 20) as f64).ceil() as u64
            } else {
                512
            });
            let link = Link {
                rtt_ms: rtt,
                jitter_ms,
                conn_mbps,
                cap,
            };
            let r = one_run(&args, &server_bin, &link, mib, window).await?;
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
                rtt,
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

/// One look at the transfer: when, part bytes answered so far, parts in flight, window.
#[derive(Clone, Copy)]
struct Sample {
    at: Duration,
    bytes: u64,
    in_flight: usize,
    window: usize,
}

/// Samples the scheduler every 5 ms while an upload runs.
struct Sampler {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(storage: TelegramStorage) -> Sampler {
        let (stop, mut stopped) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let t0 = Instant::now();
            let base = storage.scheduler().stats().part_bytes;
            let mut v = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(5));
            loop {
                tokio::select! {
                    _ = &mut stopped => break,
                    _ = tick.tick() => {
                        let s = storage.scheduler();
                        v.push(Sample {
                            at: t0.elapsed(),
                            bytes: s.stats().part_bytes - base,
                            in_flight: s.parts_in_flight(),
                            window: s.part_concurrency(),
                        });
                    }
                }
            }
            v
        });
        Sampler { stop, task }
    }

    async fn stop(self) -> Vec<Sample> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// Where the upload's time went, against the ideal (every byte at the cap from the start).
fn print_timeline(
    samples: &[Sample],
    packs: &[(
        String,
        Duration,
        Duration,
        storinator_shared::storage::Location,
    )],
    link: &Link,
    size: u64,
) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let cap = link.cap as f64;
    let when = |bytes: u64| samples.iter().find(|s| s.bytes >= bytes).map(|s| s.at);
    let first = when(1).unwrap_or_default();
    let all = when(size).unwrap_or_default();
    let end = packs.last().map(|p| p.2).unwrap_or_default();
    println!(
        "  timeline: first part answered {:.0} ms, all parts answered {:.0} ms, done {:.0} ms, ideal {:.0} ms",
        ms(first),
        ms(all),
        ms(end),
        if cap > 0.0 {
            size as f64 / cap * 1e3
        } else {
            0.0
        }
    );
    // The rate in 100 ms buckets for the first second and a half, as a share of the cap.
    let mut line = String::from("  ramp (% of cap per 100 ms):");
    let at = |t: Duration| {
        samples
            .iter()
            .take_while(|s| s.at <= t)
            .last()
            .map_or(0, |s| s.bytes)
    };
    for i in 0..15u32 {
        let (a, b) = (
            Duration::from_millis(100) * i,
            Duration::from_millis(100) * (i + 1),
        );
        let rate = (at(b) - at(a)) as f64 / 0.1;
        line += &format!(
            " {:.0}",
            if cap > 0.0 {
                100.0 * rate / cap
            } else {
                rate / 1e6
            }
        );
    }
    println!("{line}");
    // The steady rate: from 1 s in to 200 ms before the last part was answered.
    let (a, b) = (
        Duration::from_secs(1),
        all.saturating_sub(Duration::from_millis(200)),
    );
    if b > a && cap > 0.0 {
        let rate = (at(b) - at(a)) as f64 / (b - a).as_secs_f64();
        let mid: Vec<&Sample> = samples.iter().filter(|s| s.at >= a && s.at <= b).collect();
        let avg = |f: fn(&Sample) -> usize| {
            mid.iter().map(|s| f(s) as f64).sum::<f64>() / mid.len().max(1) as f64
        };
        println!(
            "  steady {:.0} % of cap, {:.1} parts in flight on average (window {:.1})",
            100.0 * rate / cap,
            avg(|s| s.in_flight),
            avg(|s| s.window)
        );
    }
    for (name, t0, t1, _) in packs {
        // The moment this pack's last part was answered is not visible from here; the gaps
        // between packs are (the rate dips there).
        println!(
            "  pack {}: {:.0} .. {:.0} ms",
            &name[24..32],
            ms(*t0),
            ms(*t1)
        );
    }
    // Dips: 100 ms buckets under 80 % of the cap after the ramp.
    if cap > 0.0 {
        let mut dips = Vec::new();
        let mut t = Duration::from_millis(600);
        while t + Duration::from_millis(100) < all {
            let rate = (at(t + Duration::from_millis(100)) - at(t)) as f64 / 0.1;
            if rate < 0.8 * cap {
                dips.push(format!("{:.0}ms:{:.0}%", ms(t), 100.0 * rate / cap));
            }
            t += Duration::from_millis(100);
        }
        println!(
            "  dips after 600 ms: {}",
            if dips.is_empty() {
                "none".into()
            } else {
                dips.join(" ")
            }
        );
    }
}
