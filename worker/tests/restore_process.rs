//! `storinator-worker restore` as a process: killed mid-file (the next restore removes exactly
//! the temporary files it left, and says so), and run by an unprivileged user (issue 16 items 7
//! to 9, issue 15 item 6).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};
use storinator_testkit::fixtures::temp_files;

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

/// A repository in `dir` (data, store) with `src` backed up.
fn repo_with(dir: &Path, src: &Path) {
    std::fs::create_dir_all(dir.join("data")).unwrap();
    std::fs::create_dir_all(dir.join("store")).unwrap();
    run_ok(worker(dir).arg("init"));
    run_ok(worker(dir).arg("backup").arg(src));
}

#[test]
fn a_restore_killed_mid_file_leaves_temp_files_the_next_restore_removes_and_names() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src/data");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(
        src.join("sub/big.bin"),
        storinator_testkit::fixtures::bytes(48 << 20, 3),
    )
    .unwrap();
    std::fs::write(src.join("small.txt"), b"small").unwrap();
    repo_with(dir.path(), &src);

    // kill -9 as soon as a temporary file shows up in the target.
    let out = dir.path().join("out");
    let mut child = worker(dir.path())
        .arg("restore")
        .arg(&src)
        .arg("--to")
        .arg(&out)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let left = loop {
        let t = temp_files(&out);
        if !t.is_empty() {
            child.kill().unwrap();
            child.wait().unwrap();
            break temp_files(&out);
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the restore finished before a temporary file was seen"
        );
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(1));
    };
    // Writers work side by side, one folder each: a temporary file per folder at most.
    assert!((1..=2).contains(&left.len()), "{left:?}");
    // Look-alikes of the user's own are not the restore's to remove.
    let lookalikes = [
        out.join("data/sub/.storinator-00000000-0000000000000000.tmp"),
        out.join("data/sub/.big.bin.storinator-0a1b2c3d4e5f.tmp"),
    ];
    for l in &lookalikes {
        std::fs::write(l, b"mine").unwrap();
    }

    let text = run_ok(
        worker(dir.path())
            .arg("restore")
            .arg(&src)
            .arg("--to")
            .arg(&out),
    );
    assert!(
        text.contains(&format!(
            "removed {} temporary file(s) left by an interrupted restore",
            left.len()
        )),
        "{text}"
    );
    for l in &left {
        assert!(text.contains(&l.display().to_string()), "{text}");
    }
    let mut remaining = temp_files(&out);
    remaining.sort();
    let mut expected = lookalikes.to_vec();
    expected.sort();
    assert_eq!(remaining, expected);
    for l in &lookalikes {
        assert_eq!(std::fs::read(l).unwrap(), b"mine");
    }
    assert_eq!(
        std::fs::read(out.join("data/sub/big.bin")).unwrap(),
        std::fs::read(src.join("sub/big.bin")).unwrap()
    );
}

const NOBODY: u32 = 65534;

/// As an unprivileged user: a mode-000 folder restores (created writable, its mode applied
/// after its contents), the setuid bit is stripped with a warning (the owner can't be
/// restored), and a folder it may not write to fails its own files only.
#[test]
fn an_unprivileged_restore_strips_setuid_restores_mode_000_folders_and_goes_on_past_failures() {
    if !rustix::process::geteuid().is_root() {
        eprintln!("skipped: needs root to start the unprivileged child (setpriv)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let src = dir.path().join("src/data");
    for d in ["locked", "sub", "blocked"] {
        std::fs::create_dir_all(src.join(d)).unwrap();
    }
    std::fs::write(src.join("locked/inner.txt"), b"inner").unwrap();
    std::fs::write(src.join("sub/ok.txt"), b"ok").unwrap();
    std::fs::write(src.join("blocked/f.txt"), b"f").unwrap();
    std::fs::write(src.join("tool"), b"#!/bin/sh\n").unwrap();
    std::fs::set_permissions(src.join("tool"), std::fs::Permissions::from_mode(0o4755)).unwrap();
    std::fs::set_permissions(src.join("locked"), std::fs::Permissions::from_mode(0o000)).unwrap();
    repo_with(dir.path(), &src);
    // The unprivileged user may use the repository...
    for p in ["data", "store"] {
        let st = Command::new("chown")
            .args(["-R", &format!("{NOBODY}:{NOBODY}")])
            .arg(dir.path().join(p))
            .status()
            .unwrap();
        assert!(st.success());
    }
    // ...and write into its target, except a folder of root's that is already there.
    let out = dir.path().join("out");
    std::fs::create_dir_all(out.join("data/blocked")).unwrap();
    std::os::unix::fs::chown(&out, Some(NOBODY), Some(NOBODY)).unwrap();
    std::os::unix::fs::chown(out.join("data"), Some(NOBODY), Some(NOBODY)).unwrap();

    let mut setpriv = Command::new("setpriv");
    setpriv
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            env!("CARGO_BIN_EXE_storinator-worker"),
            "restore",
        ])
        .arg(&src)
        .arg("--to")
        .arg(&out)
        .env_clear();
    for (k, v) in worker(dir.path()).get_envs() {
        if let Some(v) = v {
            setpriv.env(k, v);
        }
    }
    let output = setpriv.current_dir(dir.path()).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    // Exactly the file in the folder it may not write to failed...
    // (and the recorded mode of that folder, which is root's)...
    assert_eq!(output.status.code(), Some(1), "{text}");
    assert!(text.contains("2 items could not be restored"), "{text}");
    assert!(text.contains("failed: data/blocked/f.txt: "), "{text}");
    assert!(text.contains("failed: data/blocked: "), "{text}");
    // ...and everything else is there, as the backup had it.
    let m = |p: &str| std::fs::symlink_metadata(out.join(p)).unwrap();
    assert_eq!(m("data/locked").mode() & 0o7777, 0o000);
    assert_eq!(
        std::fs::read(out.join("data/locked/inner.txt")).unwrap(),
        b"inner"
    );
    assert_eq!(std::fs::read(out.join("data/sub/ok.txt")).unwrap(), b"ok");
    assert_eq!(m("data/sub/ok.txt").uid(), NOBODY);
    let tool = m("data/tool");
    assert_eq!(
        (tool.uid(), tool.mode() & 0o7777),
        (NOBODY, 0o755),
        "{text}"
    );
    assert!(
        text.contains("data/tool: setuid/setgid bits not restored"),
        "{text}"
    );
    assert!(temp_files(&out).is_empty(), "{:?}", temp_files(&out));
}
