//! Engine benchmark: first backup, unchanged re-backup and restore of a deterministic mixed
//! tree to the directory store, with the machine's raw AES-256-CBC + SHA-256 speed measured
//! in the same run as the reference.
//!
//! `cargo bench -p storinator-shared --bench engine` (1 GiB tree). Knobs:
//! `STORINATOR_BENCH_MIB` (tree size), `STORINATOR_BENCH_COMPRESSION` (`off`, `zstd:N`),
//! `STORINATOR_BENCH_DIR` (where the tree, store and restore go; default the temp dir).

use std::sync::Arc;
use std::time::Instant;

use aes::cipher::{BlockModeEncrypt, KeyIvInit, block_padding::NoPadding};
use sha2::{Digest, Sha256};
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, DirStorage, EngineSettings, KdfParams, NoProgress, Repo,
    RestoreOptions,
};

const MIB: u64 = 1 << 20;

fn main() {
    let mib: u64 = std::env::var("STORINATOR_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let compression = match std::env::var("STORINATOR_BENCH_COMPRESSION") {
        Ok(v) => {
            storinator_shared::config::parse_compression(&v).expect("STORINATOR_BENCH_COMPRESSION")
        }
        Err(_) => {
            EngineSettings::from_config(
                &storinator_shared::Config::from_lookup(|_| None).expect("default config"),
            )
            .compression
        }
    };
    let base = match std::env::var("STORINATOR_BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d).unwrap(),
        Err(_) => tempfile::tempdir().unwrap(),
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2);
    let engine_threads: usize = std::env::var("STORINATOR_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(threads);

    println!(
        "T-Storinator engine bench: {mib} MiB mixed tree, compression {compression:?}, {threads} threads"
    );
    let (one, all) = reference_speed(threads);
    println!(
        "reference  AES-256-CBC + SHA-256, 1 core:  {:>7.3} GB/s",
        one / 1e9
    );
    println!(
        "reference  AES-256-CBC + SHA-256, {threads} cores: {:>7.3} GB/s (independent streams)",
        all / 1e9
    );

    let src = base.path().join("tree");
    let tree = storinator_testkit::trees::mixed(&src, mib * MIB);
    let (files, bytes) = (tree.files, tree.bytes);
    println!(
        "tree       {files} files, {:.1} MiB (peak RSS so far {} MiB)",
        bytes as f64 / MIB as f64,
        peak_rss_mib()
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let catalog = Catalog::open_file(&base.path().join("catalog.db")).await.unwrap();
        let storage = Arc::new(DirStorage::open(base.path().join("store")).unwrap());
        Repo::init(&catalog, storage.as_ref(), "bench", KdfParams::fast_for_tests()).await.unwrap();
        let settings = EngineSettings { compression, threads: engine_threads, ..EngineSettings::default() };
        let repo = Repo::open(catalog, storage, "bench", settings).await.unwrap();
        let opts = BackupOptions { path: src.clone(), owner: "local".into(), encrypt: true };

        reset_peak_rss();
        let cpu = cpu_seconds();
        let t = Instant::now();
        let first = repo.backup(&opts, &NoProgress, &CancelFlag::new()).await.unwrap();
        let secs = t.elapsed().as_secs_f64();
        let backup_bps = bytes as f64 / secs;
        println!(
            "backup     first:     {:>7.3} GB/s  ({:.2}s, {} packs, {:.1} MiB stored)  = {:.2}x reference ({threads} cores)",
            backup_bps / 1e9,
            secs,
            first.packs,
            first.snapshot.bytes_stored as f64 / MIB as f64,
            backup_bps / all
        );
        println!(
            "           CPU {:.2}s ({:.2} cores busy), peak RSS {} MiB",
            cpu_seconds() - cpu,
            (cpu_seconds() - cpu) / secs,
            peak_rss_mib()
        );

        let t = Instant::now();
        let again = repo.backup(&opts, &NoProgress, &CancelFlag::new()).await.unwrap();
        println!(
            "backup     unchanged: {:>7.3} s  ({} new chunks, {} bytes read)",
            t.elapsed().as_secs_f64(),
            again.new_data_chunks,
            again.snapshot.bytes_read
        );

        let out = base.path().join("restore");
        reset_peak_rss();
        let cpu = cpu_seconds();
        let t = Instant::now();
        let r = repo
            .restore(
                &RestoreOptions {
                    path: src.to_string_lossy().into_owned(),
                    to: out.clone(),
                    snapshot: None,
                    owner: "local".into(),
                    overwrite: false,
                    within: None,
                    same_owner: None,
                },
                &NoProgress,
                &CancelFlag::new(),
            )
            .await
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        let restore_bps = r.bytes as f64 / secs;
        println!(
            "restore    full:      {:>7.3} GB/s  ({:.2}s, {} files)  = {:.2}x reference, {:.2}x first backup",
            restore_bps / 1e9,
            secs,
            r.files,
            restore_bps / all,
            restore_bps / backup_bps
        );
        println!(
            "           CPU {:.2}s ({:.2} cores busy), peak RSS {} MiB",
            cpu_seconds() - cpu,
            (cpu_seconds() - cpu) / secs,
            peak_rss_mib()
        );
    });
}

/// Raw AES-256-CBC encryption plus SHA-256 of 64 MiB per thread, in GB/s (1 thread, n threads).
fn reference_speed(threads: usize) -> (f64, f64) {
    fn stream(bytes: usize) -> f64 {
        // A 16 MiB buffer passed over repeatedly: the reference is CPU speed, not memory size.
        let mut buf = vec![7u8; 16 << 20];
        let key = [1u8; 32];
        let iv = [2u8; 16];
        let t = Instant::now();
        for i in 0..bytes >> 20 {
            let off = (i % 16) << 20;
            let chunk = &mut buf[off..off + (1 << 20)];
            let enc = cbc::Encryptor::<aes::Aes256>::new(&key.into(), &iv.into());
            let n = chunk.len();
            enc.encrypt_padded::<NoPadding>(chunk, n).unwrap();
            std::hint::black_box(Sha256::digest(&*chunk));
        }
        t.elapsed().as_secs_f64()
    }
    const BYTES: usize = 256 << 20;
    stream(16 << 20); // warm up
    let one = BYTES as f64 / stream(BYTES);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| stream(BYTES));
        }
    });
    let all = (BYTES * threads) as f64 / t.elapsed().as_secs_f64();
    (one, all)
}

/// CPU seconds (user + system) this process has used so far.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which ends with ')'): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// Resets the kernel's peak-RSS mark (VmHWM) so each phase is measured on its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(0)
}
