//! `storinator-worker schedule add|list|rm|pause|resume` and `storinator-worker scrub` as
//! processes on a directory store.

use std::path::Path;
use std::process::{Command, Output};

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
        .env("STORINATOR_TIMEZONE", "Europe/Berlin")
        .env("STORINATOR_PACK_SIZE", "64KiB")
        .current_dir(dir);
    c
}

fn run(dir: &Path, args: &[&str]) -> Output {
    worker(dir).args(args).output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(
        o.status.success(),
        "{args:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(dir: &Path, args: &[&str]) -> String {
    let o = run(dir, args);
    assert!(!o.status.success(), "{args:?} should fail");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn schedule_commands_manage_the_owners_schedules() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let s = src.to_str().unwrap();
    let out = ok(
        d,
        &[
            "schedule",
            "add",
            s,
            "daily",
            "03:00",
            "--keep",
            "daily 7 weekly 4",
        ],
    );
    assert!(
        out.contains("schedule #1 added") && out.contains("daily 03:00"),
        "{out}"
    );
    assert!(
        out.contains("CEST") || out.contains("CET"),
        "a time in the zone: {out}"
    );
    let out = ok(d, &["schedule", "add", s, "0 3 * * 1-5", "--no-encrypt"]);
    assert!(out.contains("schedule #2 added"), "{out}");
    let err = fails(d, &["schedule", "add", s, "fortnightly"]);
    assert!(err.contains("hint:"), "{err}");
    let err = fails(d, &["schedule", "add", s, "daily", "--keep", "forever"]);
    assert!(
        err.contains("retention unit") || err.contains("keep"),
        "{err}"
    );
    let err = fails(d, &["schedule", "add", "/no/such/folder", "hourly"]);
    assert!(err.contains("/no/such/folder"), "{err}");

    let list = ok(d, &["schedule", "list"]);
    assert!(
        list.contains("#1 ") && list.contains("keep daily 7 weekly 4"),
        "{list}"
    );
    assert!(
        list.contains("#2 ") && list.contains("unencrypted"),
        "{list}"
    );
    assert!(list.contains("no snapshot yet"), "{list}");
    assert!(ok(d, &["schedule", "pause", "1"]).contains("paused"));
    assert!(ok(d, &["schedule", "list"]).contains("· paused"));
    assert!(ok(d, &["schedule", "resume", "1"]).contains("next run"));
    assert!(ok(d, &["schedule", "rm", "2"]).contains("removed"));
    let err = fails(d, &["schedule", "rm", "2"]);
    assert!(
        err.contains("local has no schedule #2") && err.contains("hint:"),
        "{err}"
    );
    // Another owner's view.
    let other = ok(d, &["schedule", "--owner", "tg:9", "list"]);
    assert!(other.contains("no schedules for tg:9"), "{other}");
    assert!(fails(d, &["schedule", "--owner", "tg:9", "pause", "1"]).contains("no schedule #1"));
}

#[test]
fn scrub_reads_within_its_budget_shows_the_rotation_and_heals() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6u64 {
        // Incompressible, so the packs are as large as the files.
        let mut x = (i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let data: Vec<u8> = (0..60_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(src.join(format!("f{i}.bin")), data).unwrap();
    }
    ok(d, &["init"]);
    ok(d, &["backup", src.to_str().unwrap()]);
    let out = ok(d, &["scrub", "--bytes", "64KiB"]);
    assert!(
        out.contains("scrub: read") && out.contains("no damage"),
        "{out}"
    );
    let status = ok(d, &["scrub", "--status", "--bytes", "64KiB"]);
    assert!(
        status.contains("last read") && status.contains("never read"),
        "{status}"
    );
    assert!(status.contains("64.0 KiB a day"), "{status}");

    // Damage a pack: the next full scrub names the files and heals them from disk.
    let pack = std::fs::read_dir(d.join("store"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.extension().is_some_and(|x| x == "enc")
                && !p.file_name().unwrap().to_string_lossy().starts_with("key-")
        })
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[200] ^= 0xff;
    std::fs::write(&pack, bytes).unwrap();
    let out = ok(d, &["scrub", "--bytes", "10MiB"]);
    assert!(out.contains("healed: "), "{out}");
    assert!(out.contains("damage found and healed"), "{out}");
    // The next scrub reads what the catalog points at: clean; the restore is whole.
    let out = ok(d, &["scrub", "--bytes", "10MiB"]);
    assert!(out.contains("no damage"), "{out}");
    ok(
        d,
        &[
            "restore",
            src.to_str().unwrap(),
            "--to",
            d.join("out").to_str().unwrap(),
        ],
    );
    for i in 0..6 {
        let name = format!("f{i}.bin");
        assert_eq!(
            std::fs::read(d.join("out/src").join(&name)).unwrap(),
            std::fs::read(src.join(&name)).unwrap()
        );
    }
}
