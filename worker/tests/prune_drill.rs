//! kill -9 drill on `storinator-worker prune` (the built binary, a directory store): each
//! cycle makes garbage (a changed tree, a new backup, forget the older snapshot), starts a
//! prune and kills it at a random moment; after every kill the kept snapshot restores byte for
//! byte. At the end a prune runs to completion: storage and catalog agree, no pack without a
//! live chunk is left, verify --read-data is clean.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use storinator_shared::Catalog;
use storinator_testkit::fixtures::{bytes, describe_tree};

fn worker(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_storinator-worker"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("STORINATOR_DATA_DIR", dir.join("data"))
        .env(
            "STORINATOR_STORAGE",
            format!("dir:{}", dir.join("store").display()),
        )
        .env("STORINATOR_PASSPHRASE", "pw for tests")
        .env("STORINATOR_INSECURE_FAST_KDF", "1")
        .env("STORINATOR_PACK_SIZE", "65536")
        .current_dir(dir);
    c
}

fn run_ok(c: &mut Command) -> String {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{c:?}: {text}");
    text
}

/// A small deterministic generator (the seed is printed, so a failing run can be replayed).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

/// Rewrites one file in three and adds a few: every cycle leaves whole packs and parts of
/// packs unused once the previous snapshot is forgotten.
fn change_tree(src: &Path, cycle: u64) {
    std::fs::create_dir_all(src).unwrap();
    for i in 0..30u64 {
        if cycle == 0 || (i + cycle).is_multiple_of(3) {
            std::fs::write(
                src.join(format!("f{i:02}.bin")),
                bytes(6_000 + (i as usize * 997) % 20_000, cycle * 100 + i),
            )
            .unwrap();
        }
    }
    std::fs::write(
        src.join(format!("new{cycle:02}.bin")),
        bytes(70_000, 9_000 + cycle),
    )
    .unwrap();
    if cycle > 1 {
        let _ = std::fs::remove_file(src.join(format!("new{:02}.bin", cycle - 2)));
    }
}

fn restore_matches(dir: &Path, src: &Path, what: &str) {
    let out = dir.join("restored");
    let _ = std::fs::remove_dir_all(&out);
    run_ok(worker(dir).arg("restore").arg(src).arg("--to").arg(&out));
    assert_eq!(
        describe_tree(&out.join("data")),
        describe_tree(src),
        "the kept snapshot restores byte for byte ({what})"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

fn store_packs(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir.join("store"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".enc")?;
            (id.len() == 32).then(|| id.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_killed_at_random_points_never_damages_a_snapshot_and_the_next_one_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("data")).unwrap();
    std::fs::create_dir_all(d.join("store")).unwrap();
    let src = d.join("src/data");
    run_ok(worker(d).arg("init"));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("drill seed {seed}");
    let mut rng = Lcg(seed);
    // Kill within this window; it shrinks when prunes finish before the kill.
    let mut window_ms = 400u64;
    let (mut kills, mut finished) = (0u32, 0u32);
    let mut cycle = 0u64;
    while kills < 20 {
        assert!(
            cycle < 80,
            "only {kills} prunes were killed in {cycle} cycles"
        );
        change_tree(&src, cycle);
        run_ok(worker(d).arg("backup").arg(&src));
        run_ok(
            worker(d)
                .arg("forget")
                .arg(&src)
                .arg("--keep-last")
                .arg("1"),
        );
        let delay = Duration::from_millis(rng.next() % window_ms.max(1));
        let started = Instant::now();
        let mut child = worker(d)
            .arg("prune")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        if child.try_wait().unwrap().is_none() {
            child.kill().unwrap(); // SIGKILL
            child.wait().unwrap();
            kills += 1;
        } else {
            assert!(child.wait().unwrap().success(), "prune failed on its own");
            finished += 1;
            window_ms = (started.elapsed().as_millis() as u64).max(5);
        }
        restore_matches(d, &src, &format!("cycle {cycle}, killed after {delay:?}"));
        cycle += 1;
    }
    println!("{kills} prunes killed, {finished} finished, in {cycle} cycles");

    // `stats` (no key) says what the next prune frees.
    let stats = run_ok(worker(d).arg("stats").arg("--json"));
    let stats: serde_json::Value = serde_json::from_str(&stats).unwrap();
    assert_eq!(stats["roots"].as_array().unwrap().len(), 1, "{stats}");

    // The next prune finishes the work: nothing unused, nothing unknown, nothing damaged.
    let text = run_ok(worker(d).arg("prune"));
    println!("{text}");
    run_ok(worker(d).arg("prune"));
    let catalog = Catalog::open_file(&d.join("data/storinator.db"))
        .await
        .unwrap();
    let in_catalog: BTreeSet<String> = catalog
        .packs()
        .await
        .unwrap()
        .into_iter()
        .map(|p| {
            assert_eq!(p.state, "stored", "{p:?}");
            p.id
        })
        .collect();
    assert_eq!(store_packs(d), in_catalog, "storage and catalog agree");
    let usage = catalog.pack_usage(i64::MAX).await.unwrap();
    assert!(
        usage.iter().all(|p| p.live_chunks > 0),
        "no unused pack is left: {usage:?}"
    );
    let verify = run_ok(worker(d).arg("verify").arg("--read-data"));
    assert!(verify.contains("no problems"), "{verify}");
    restore_matches(d, &src, "after the last prune");
    let stats = run_ok(worker(d).arg("stats"));
    assert!(stats.contains("prune would free 0 B"), "{stats}");
    let snapshots = run_ok(worker(d).arg("snapshots").arg("--json"));
    let n: Vec<serde_json::Value> = serde_json::from_str(&snapshots).unwrap();
    assert_eq!(n.len(), 1, "{snapshots}");
}
