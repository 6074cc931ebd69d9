//! kill -9 drill on the first backup of new owners (the built binary, a directory store): a
//! first backup creates the owner's key, stores it, records it and only then seals data with
//! it. Each cycle starts a new owner's first backup and kills it at a random moment, early in
//! its life where the key is made; after every kill a new machine (an empty catalog, the same
//! store) recovers with no problem at all (every pack in storage opens with a key that storage
//! holds), every key the catalog records is in storage, and the owner's next backup finishes
//! and restores byte for byte.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use storinator_testkit::fixtures::{bytes, describe_tree};

fn worker(dir: &Path, data: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_storinator-worker"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("STORINATOR_DATA_DIR", data)
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

fn run(c: &mut Command) -> (bool, String) {
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn run_ok(c: &mut Command) -> String {
    let (ok, text) = run(c);
    assert!(ok, "{c:?}: {text}");
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

fn stored_owner_keys(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir.join("store"))
        .unwrap()
        .filter_map(|e| {
            let name = e.unwrap().file_name().to_string_lossy().into_owned();
            let id = name.strip_prefix("key-owner-")?.strip_suffix(".enc")?;
            Some(id.to_string())
        })
        .collect();
    out.sort();
    out
}

/// What a new machine sees: an empty catalog recovers from the store with no problem.
fn recovers_cleanly(dir: &Path, what: &str) {
    let fresh = dir.join("fresh");
    let _ = std::fs::remove_dir_all(&fresh);
    std::fs::create_dir_all(&fresh).unwrap();
    let (ok, text) = run(worker(dir, &fresh).arg("recover"));
    assert!(ok, "recover on a new machine ({what}): {text}");
    std::fs::remove_dir_all(&fresh).unwrap();
}

fn restore_matches(dir: &Path, src: &Path, owner: &str) {
    let out = dir.join("restored");
    let _ = std::fs::remove_dir_all(&out);
    run_ok(
        worker(dir, &dir.join("data"))
            .arg("restore")
            .arg(src)
            .arg("--to")
            .arg(&out)
            .arg("--owner")
            .arg(owner),
    );
    assert_eq!(
        describe_tree(&out.join("data")),
        describe_tree(src),
        "{owner}'s backup restores byte for byte"
    );
    std::fs::remove_dir_all(&out).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_backup_killed_anywhere_leaves_no_data_under_a_key_storage_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::create_dir_all(d.join("store")).unwrap();
    let src: PathBuf = d.join("src/data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..8u64 {
        std::fs::write(src.join(format!("f{i}.bin")), bytes(40_000, 70 + i)).unwrap();
    }
    run_ok(worker(d, &data).arg("init"));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    println!("drill seed {seed}");
    let mut rng = Lcg(seed);
    // How long a whole first backup takes: kills are drawn within it.
    let started = Instant::now();
    run_ok(
        worker(d, &data)
            .arg("backup")
            .arg(&src)
            .arg("--owner")
            .arg("tg:1"),
    );
    let whole_ms = (started.elapsed().as_millis() as u64).max(10);
    let (mut kills, mut before_key, mut key_unrecorded) = (0u32, 0u32, 0u32);
    for cycle in 0..10u64 {
        let owner = format!("tg:{}", 100 + cycle);
        let keys_before = stored_owner_keys(d);
        // Most kills early, where the key is made and the first blobs are sealed.
        let delay = Duration::from_millis(rng.next() % (whole_ms * 2 / 3).max(5));
        let mut child = worker(d, &data)
            .arg("backup")
            .arg(&src)
            .arg("--owner")
            .arg(&owner)
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
            assert!(
                child.wait().unwrap().success(),
                "the backup failed on its own"
            );
        }
        let keys_after = stored_owner_keys(d);
        if keys_after == keys_before {
            before_key += 1;
        }
        // No pack in storage is sealed with a key storage lacks: a new machine recovers all.
        recovers_cleanly(d, &format!("cycle {cycle}, killed after {delay:?}"));
        // Every key the catalog records is in storage (stored first, recorded after).
        let catalog = storinator_shared::Catalog::open(&format!(
            "sqlite://{}",
            data.join("storinator.db").display()
        ))
        .await
        .unwrap();
        let recorded = catalog.owner_keys(Some(&owner)).await.unwrap();
        for r in &recorded {
            assert!(
                keys_after.contains(&r.key_id),
                "cycle {cycle}: key {} is recorded but not stored",
                r.key_id
            );
        }
        if recorded.is_empty() && keys_after.len() > keys_before.len() {
            key_unrecorded += 1;
        }
        drop(catalog);
        // The owner's next backup finishes (reclaiming what the kill left) and restores.
        run_ok(
            worker(d, &data)
                .arg("backup")
                .arg(&src)
                .arg("--owner")
                .arg(&owner),
        );
        restore_matches(d, &src, &owner);
    }
    println!(
        "{kills} first backups killed in 10 cycles ({before_key} before the key was stored, \
         {key_unrecorded} between storing and recording it; whole backup {whole_ms} ms)"
    );
    assert!(kills >= 5, "only {kills} of 10 backups were killed");
    recovers_cleanly(d, "at the end");
}
