//! kill -9 drill on `storinator-worker backup` with two lanes and STORINATOR_COPIES=2 (the
//! built binary, two directory lanes): each cycle changes the tree, starts a backup and kills
//! it at a random moment, then runs the backup again to completion. After every resume the
//! snapshot restores byte for byte and both lanes hold exactly the catalog's packs (every pack
//! in both, nothing left over). At the end a forget and a prune delete every copy of what they
//! drop, and verify --read-data (which reads every copy) is clean.

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
            format!(
                "a=dir:{}, b=dir:{}",
                dir.join("lane-a").display(),
                dir.join("lane-b").display()
            ),
        )
        .env("STORINATOR_COPIES", "2")
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

/// Rewrites a few files and adds one: every backup has new packs to store.
fn change_tree(src: &Path, cycle: u64) {
    std::fs::create_dir_all(src).unwrap();
    for i in 0..12u64 {
        if cycle == 0 || (i + cycle).is_multiple_of(4) {
            std::fs::write(
                src.join(format!("f{i}.bin")),
                bytes(48 << 10, cycle * 100 + i),
            )
            .unwrap();
        }
    }
    std::fs::write(
        src.join(format!("new{cycle}.bin")),
        bytes(96 << 10, 7 + cycle),
    )
    .unwrap();
}

fn restore_matches(dir: &Path, src: &Path, what: &str) {
    let out = dir.join("restored");
    let _ = std::fs::remove_dir_all(&out);
    run_ok(worker(dir).arg("restore").arg(src).arg("--to").arg(&out));
    assert_eq!(
        describe_tree(&out.join("data")),
        describe_tree(src),
        "the snapshot restores byte for byte ({what})"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

fn lane_packs(dir: &Path, lane: &str) -> BTreeSet<String> {
    std::fs::read_dir(dir.join(lane))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let id = name.strip_suffix(".enc")?;
            (id.len() == 32).then(|| id.to_string())
        })
        .collect()
}

/// Files left in the spool (the packs and their per-lane links of runs that died included).
fn spool_files(dir: &Path) -> Vec<std::path::PathBuf> {
    fn walk(p: &Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&e.path(), out),
                Ok(_) => out.push(e.path()),
                Err(_) => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(&dir.join("data/spool"), &mut out);
    out
}

async fn catalog_packs(dir: &Path) -> BTreeSet<String> {
    let catalog = Catalog::open_file(&dir.join("data/storinator.db"))
        .await
        .unwrap();
    catalog
        .packs()
        .await
        .unwrap()
        .into_iter()
        .map(|p| {
            assert_eq!(p.state, "stored", "{p:?}");
            assert!(p.location.starts_with("lanes:a="), "{p:?}");
            assert!(p.location.contains(",b="), "{p:?}");
            p.id
        })
        .collect()
}

async fn lanes_match_catalog(dir: &Path, what: &str) {
    use std::os::unix::fs::MetadataExt;
    let want = catalog_packs(dir).await;
    assert_eq!(lane_packs(dir, "lane-a"), want, "lane a ({what})");
    assert_eq!(lane_packs(dir, "lane-b"), want, "lane b ({what})");
    // Two copies, not two names of one file: damage to one must not reach the other.
    for id in &want {
        let ino = |lane: &str| {
            std::fs::metadata(dir.join(lane).join(format!("{id}.enc")))
                .unwrap()
                .ino()
        };
        assert_ne!(ino("lane-a"), ino("lane-b"), "pack {id} ({what})");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copies_2_backup_killed_at_random_points_resumes_to_a_complete_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("data")).unwrap();
    let src = d.join("src/data");
    run_ok(worker(d).arg("init"));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("drill seed {seed}");
    let mut rng = seed | 1;
    let mut window_ms = 300u64;
    let (mut kills, mut finished) = (0u32, 0u32);
    let mut cycle = 0u64;
    while kills < 8 {
        assert!(
            cycle < 40,
            "only {kills} backups were killed in {cycle} cycles"
        );
        change_tree(&src, cycle);
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(rng % window_ms.max(1));
        let started = Instant::now();
        let mut child = worker(d)
            .arg("backup")
            .arg(&src)
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
            assert!(child.wait().unwrap().success(), "backup failed on its own");
            finished += 1;
            window_ms = (started.elapsed().as_millis() as u64).max(5);
        }
        // The resume: a backup run to completion.
        run_ok(worker(d).arg("backup").arg(&src));
        let what = format!("cycle {cycle}, killed after {delay:?}");
        restore_matches(d, &src, &what);
        lanes_match_catalog(d, &what).await;
        let left = spool_files(d);
        assert!(left.is_empty(), "the spool is empty ({what}): {left:?}");
        cycle += 1;
    }
    println!("{kills} backups killed, {finished} finished, in {cycle} cycles");

    // Forget and prune delete every copy of what they drop.
    run_ok(
        worker(d)
            .arg("forget")
            .arg(&src)
            .arg("--keep-last")
            .arg("1"),
    );
    let before = catalog_packs(d).await;
    run_ok(worker(d).arg("prune"));
    let after = catalog_packs(d).await;
    assert!(after.len() < before.len(), "the prune deleted packs");
    lanes_match_catalog(d, "after the prune").await;
    let verify = run_ok(worker(d).arg("verify").arg("--read-data"));
    assert!(verify.contains("no problems"), "{verify}");
    restore_matches(d, &src, "after the prune");
}
