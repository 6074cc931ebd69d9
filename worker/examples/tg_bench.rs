//! Upload and download throughput of the Telegram backend through the real grammers client
//! against the loopback Telegram running as a separate process, with CPU seconds per GiB for
//! the client (getrusage) and the server (/proc/<pid>/stat) measured apart.
//!
//! ```text
//! cargo build -p storinator-testkit --bin loopback-telegram
//! cargo run -p storinator-worker --example tg_bench -- [--mib 512] [--server target/debug/loopback-telegram]
//! ```

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use storinator_shared::storage::{ObjectRef, Storage};
use storinator_worker::telegram::{TelegramConfig, TelegramStorage};

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

fn cfg_gzip() -> bool {
    std::env::args().any(|a| a == "--gzip")
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mib: u64 = arg("--mib").map_or(512, |v| v.parse().expect("--mib N"));
    // Default: the binary of the same build, next to `examples/`.
    let server_bin = arg("--server").unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| Some(p.parent()?.parent()?.join("loopback-telegram")))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "target/debug/loopback-telegram".into())
    });
    let concurrency: usize =
        arg("--concurrency").map_or(4, |v| v.parse().expect("--concurrency N"));
    let dir = tempfile::tempdir()?;
    let session = dir.path().join("bench.session");
    let mut server = Command::new(&server_bin)
        .arg("--session")
        .arg(&session)
        .arg("--data-dir")
        .arg(dir.path().join("server"))
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {server_bin}: {e} (build it first)"))?;
    let t0 = Instant::now();
    while !session.exists() {
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "server did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut cfg = TelegramConfig::new(1, "bench", session, dir.path().join("spool"));
    cfg.part_concurrency = concurrency;
    // `--gzip` uploads the way grammers does by default, to measure what skipping it saves.
    cfg.compress_parts = std::env::args().any(|a| a == "--gzip");
    let storage = TelegramStorage::connect(cfg).await?;

    let size = mib * 1024 * 1024;
    let path: PathBuf = storage.spool_dir().join("pack");
    {
        use std::io::Write;
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path)?);
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
    }
    let gib = size as f64 / (1u64 << 30) as f64;
    let mb = size as f64 / 1e6;
    let name = "0000000000000000000000000000bench.enc";

    let (c0, s0, w0) = (cpu_self(), cpu_of(server.id()), Instant::now());
    let loc = storage.put_file(name, &path).await?;
    let (c1, s1, up) = (cpu_self(), cpu_of(server.id()), w0.elapsed().as_secs_f64());

    let w1 = Instant::now();
    let obj = ObjectRef::new(name, loc);
    let step = 64 * 1024 * 1024;
    let mut off = 0;
    let mut check = 0u64;
    while off < size {
        let len = step.min(size - off);
        let bytes = storage.get_range(&obj, off, len).await?;
        // Cheap spot check (a full pass at opt-level 0 would dominate the measurement);
        // byte-identity is what the integration tests assert.
        anyhow::ensure!(bytes.len() as u64 == len, "short read at {off}");
        check = check.wrapping_add(u64::from(bytes[0]) + u64::from(bytes[bytes.len() - 1]));
        off += len;
    }
    let (c2, s2, down) = (cpu_self(), cpu_of(server.id()), w1.elapsed().as_secs_f64());
    let _ = server.kill();
    let _ = server.wait();

    println!(
        "payload: {mib} MiB in one pack, {concurrency} part streams, part gzip {} (checksum {check:x})",
        if cfg_gzip() { "on" } else { "off" }
    );
    println!(
        "upload:   {:7.1} MB/s  client {:.2} CPU s/GiB  server {:.2} CPU s/GiB",
        mb / up,
        (c1 - c0) / gib,
        (s1 - s0) / gib
    );
    println!(
        "download: {:7.1} MB/s  client {:.2} CPU s/GiB  server {:.2} CPU s/GiB",
        mb / down,
        (c2 - c1) / gib,
        (s2 - s1) / gib
    );
    println!("scheduler: {:?}", storage.scheduler().stats());
    Ok(())
}
