//! `storinator-worker` as a person runs it: real processes, a directory store, exit codes as
//! the README documents them (0 success, 1 error or problems found, 2 bad command line, 3
//! snapshot saved with warnings), `key passwd`, `restore --overwrite` and `recover` on a new
//! machine, run twice.
//!
//! When the tests run as root the worker is started as an unprivileged user (nobody), so a
//! file with mode 000 really is unreadable to it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A storage host: a data dir (catalog) and a directory store, under one temp dir.
struct Host {
    dir: tempfile::TempDir,
    data: PathBuf,
    store: PathBuf,
    pass: String,
}

/// What a finished command left behind.
#[derive(Debug)]
struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    fn both(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// The uid the worker runs as: root's files are readable to root whatever their mode, so a
/// root test run drops to nobody.
fn worker_uid() -> Option<u32> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    (unsafe { libc::geteuid() } == 0).then_some(65534)
}

/// Lets the worker's user into `p` and write there (temp dirs are 0700).
fn open_up(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o777)).unwrap();
}

/// Makes `p` the worker user's own, as if that user had created it.
fn give_to_worker(p: &Path) {
    if let Some(uid) = worker_uid() {
        std::os::unix::fs::chown(p, Some(uid), Some(uid)).unwrap();
    }
}

impl Host {
    fn new() -> Host {
        Host::sharing_store(None, "first passphrase")
    }

    /// A new machine: its own data dir, the store of `other` (or a fresh one).
    fn sharing_store(other: Option<&Host>, pass: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        open_up(dir.path());
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        open_up(&data);
        let store = match other {
            Some(o) => o.store.clone(),
            None => {
                let s = dir.path().join("store");
                std::fs::create_dir_all(&s).unwrap();
                open_up(&s);
                s
            }
        };
        Host {
            dir,
            data,
            store,
            pass: pass.to_string(),
        }
    }

    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_storinator-worker"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("STORINATOR_DATA_DIR", &self.data)
            .env(
                "STORINATOR_STORAGE",
                format!("dir:{}", self.store.display()),
            )
            .env("STORINATOR_PASSPHRASE", &self.pass)
            .env("STORINATOR_INSECURE_FAST_KDF", "1")
            .current_dir(self.dir.path());
        if let Some(uid) = worker_uid() {
            c.uid(uid).gid(uid);
        }
        c
    }

    fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Out {
        let mut c = self.command();
        c.args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let o = c.output().unwrap();
        Out {
            code: o.status.code().expect("exited, not killed"),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    fn run(&self, args: &[&str]) -> Out {
        self.run_with(args, &[])
    }

    /// Runs and insists on the exit code.
    fn expect(&self, code: i32, args: &[&str]) -> Out {
        let o = self.run(args);
        assert_eq!(o.code, code, "{args:?}:\n{}", o.both());
        o
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small folder to back up, readable by the worker's user.
fn sample(root: &Path) {
    std::fs::create_dir_all(root.join("sub")).unwrap();
    std::fs::write(root.join("a.txt"), b"alpha\n").unwrap();
    std::fs::write(root.join("sub/b.bin"), vec![7u8; 300_000]).unwrap();
}

#[test]
fn exit_codes_are_the_documented_ones() {
    let h = Host::new();
    h.expect(0, &["init"]);

    // 2: the command line itself is wrong.
    for bad in [
        &["frobnicate"][..],
        &["backup"],
        &["restore", "data"],
        &["backup", "/x", "--no-such-flag"],
    ] {
        let o = h.run(bad);
        assert_eq!(o.code, 2, "{bad:?}: {}", o.both());
        assert!(o.stderr.contains("Usage"), "{bad:?}: {}", o.stderr);
    }

    // 0: a clean backup.
    let src = h.path("src/data");
    sample(&src);
    let o = h.expect(0, &["backup", s(&src)]);
    assert!(o.stdout.contains("snapshot "), "{}", o.stdout);

    // 1: an error, named.
    let o = h.expect(1, &["backup", s(&h.path("src/missing"))]);
    assert!(o.stderr.contains("src/missing"), "{}", o.stderr);
    // (`ls` reads only the catalog; `verify` needs the key.)
    let o = h.run_with(&["verify"], &[("STORINATOR_PASSPHRASE", "not it")]);
    assert_eq!(o.code, 1, "{}", o.both());
    assert!(o.stderr.contains("wrong passphrase"), "{}", o.stderr);

    // 3: the snapshot is saved, but some items were left out; each is listed.
    let odd = h.path("src/odd");
    sample(&odd);
    let fifo = odd.join("a-fifo");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let _socket = std::os::unix::net::UnixListener::bind(odd.join("a-socket")).unwrap();
    std::fs::write(odd.join("locked.txt"), b"secret").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            odd.join("locked.txt"),
            std::fs::Permissions::from_mode(0o000),
        )
        .unwrap();
    }
    {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::OsStr::from_bytes(b"caf\xe9.txt");
        std::fs::write(odd.join(name), b"latin-1 name").unwrap();
    }
    let o = h.expect(3, &["backup", s(&odd)]);
    for (path, why) in [
        ("odd/a-fifo", "fifo"),
        ("odd/a-socket", "socket"),
        ("odd/locked.txt", "denied"),
        ("odd/caf\u{fffd}.txt", "UTF-8"),
    ] {
        assert!(
            o.stderr
                .lines()
                .any(|l| l.starts_with(&format!("warning: {path}: ")) && l.contains(why)),
            "no warning for {path} ({why}):\n{}",
            o.stderr
        );
    }
    assert!(o.stderr.contains("snapshot saved"), "{}", o.stderr);
    assert!(o.stdout.contains("snapshot "), "{}", o.stdout);
    let listed = h.expect(0, &["ls", s(&odd), "-r"]).stdout;
    assert!(
        listed.contains("a.txt") && listed.contains("b.bin"),
        "{listed}"
    );
    assert!(!listed.contains("locked.txt"), "{listed}");

    // Restore: a differing file stops it (1) until --overwrite (0).
    let out = h.path("restored");
    std::fs::create_dir_all(out.join("data")).unwrap();
    std::fs::write(out.join("data/a.txt"), b"local edit\n").unwrap();
    for p in [&out, &out.join("data"), &out.join("data/a.txt")] {
        give_to_worker(p);
    }
    let o = h.expect(1, &["restore", s(&src), "--to", s(&out)]);
    assert!(o.stderr.contains("would overwrite 1"), "{}", o.stderr);
    assert!(o.stderr.contains("--overwrite"), "{}", o.stderr);
    assert_eq!(
        std::fs::read(out.join("data/a.txt")).unwrap(),
        b"local edit\n"
    );
    assert!(
        !out.join("data/sub").exists(),
        "nothing written before asking"
    );
    h.expect(0, &["restore", s(&src), "--to", s(&out), "--overwrite"]);
    assert_eq!(std::fs::read(out.join("data/a.txt")).unwrap(), b"alpha\n");
    assert_eq!(
        std::fs::read(out.join("data/sub/b.bin")).unwrap(),
        vec![7u8; 300_000]
    );

    // verify: 0 while storage is whole, 1 with each problem listed once a pack is gone.
    h.expect(0, &["verify", "--read-data"]);
    let pack = std::fs::read_dir(&h.store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.ends_with(".enc") && !n.starts_with("key-")
        })
        .unwrap();
    std::fs::remove_file(&pack).unwrap();
    let o = h.expect(1, &["verify"]);
    let name = pack.file_name().unwrap().to_str().unwrap();
    assert!(
        o.stderr
            .lines()
            .any(|l| l.starts_with("problem: ") && l.contains(name) && l.contains("missing")),
        "{}",
        o.stderr
    );
}

#[test]
fn key_passwd_then_only_the_new_passphrase_unlocks() {
    let h = Host::new();
    h.expect(0, &["init"]);
    let o = h.expect(1, &["init"]);
    assert!(o.stderr.contains("a key already exists"), "{}", o.stderr);
    let src = h.path("src/data");
    sample(&src);
    h.expect(0, &["backup", s(&src)]);
    let packs_before = std::fs::read_dir(&h.store).unwrap().count();

    let o = h.run_with(
        &["key", "passwd"],
        &[("STORINATOR_NEW_PASSPHRASE", "second passphrase")],
    );
    assert_eq!(o.code, 0, "{}", o.both());
    assert!(o.stdout.contains("passphrase changed"), "{}", o.stdout);
    assert_eq!(
        std::fs::read_dir(&h.store).unwrap().count(),
        packs_before,
        "no pack rewritten, no second key object"
    );

    // The old passphrase no longer opens anything; the new one does, from the environment
    // or from a file (which wins over the environment).
    let o = h.expect(1, &["verify"]);
    assert!(o.stderr.contains("wrong passphrase"), "{}", o.stderr);
    let new = [("STORINATOR_PASSPHRASE", "second passphrase")];
    let o = h.run_with(&["verify"], &new);
    assert_eq!(o.code, 0, "{}", o.both());
    let file = h.path("pass.txt");
    std::fs::write(&file, "second passphrase\n").unwrap();
    open_up(&file);
    let out = h.path("out");
    std::fs::create_dir_all(&out).unwrap();
    open_up(&out);
    h.expect(
        0,
        &[
            "restore",
            s(&src),
            "--to",
            s(&out),
            "--passphrase-file",
            s(&file),
        ],
    );
    assert_eq!(std::fs::read(out.join("data/a.txt")).unwrap(), b"alpha\n");

    // A new machine recovers with the new passphrase only.
    let fresh = Host::sharing_store(Some(&h), "first passphrase");
    let o = fresh.expect(1, &["recover"]);
    assert!(o.stderr.contains("wrong passphrase"), "{}", o.stderr);
    let o = fresh.run_with(&["recover"], &new);
    assert_eq!(o.code, 0, "{}", o.both());
}

/// The snapshot ids `snapshots --json` lists.
fn snapshot_ids(h: &Host) -> Vec<String> {
    let o = h.expect(0, &["snapshots", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s["short_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn recover_on_a_new_machine_is_safe_to_run_twice() {
    let old = Host::new();
    old.expect(0, &["init"]);
    let src = old.path("src/data");
    sample(&src);
    old.expect(0, &["backup", s(&src)]);
    std::fs::write(src.join("a.txt"), b"alpha, edited\n").unwrap();
    old.expect(0, &["backup", s(&src)]);
    let ids = snapshot_ids(&old);
    assert_eq!(ids.len(), 2);

    let new = Host::sharing_store(Some(&old), &old.pass);
    // Before recover the new machine knows nothing.
    let o = new.expect(1, &["ls", s(&src)]);
    assert!(o.stderr.contains("is not in any backup"), "{}", o.stderr);
    let o = new.expect(1, &["verify"]);
    assert!(o.stderr.contains("no key in the catalog"), "{}", o.stderr);
    let first = new.expect(0, &["recover"]);
    assert!(first.stdout.contains("and 2 snapshots"), "{}", first.stdout);
    assert_eq!(snapshot_ids(&new), ids);
    let store_before: Vec<_> = std::fs::read_dir(&old.store)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let second = new.expect(0, &["recover"]);
    assert!(
        second.stdout.contains("and 0 snapshots"),
        "{}",
        second.stdout
    );
    assert_eq!(snapshot_ids(&new), ids, "nothing doubled");
    let store_after: Vec<_> = std::fs::read_dir(&old.store)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        store_before, store_after,
        "recover writes nothing to storage"
    );

    // Both snapshots restore on the new machine.
    for (id, want) in [(&ids[0], &b"alpha\n"[..]), (&ids[1], b"alpha, edited\n")] {
        let out = new.path(&format!("out-{id}"));
        std::fs::create_dir_all(&out).unwrap();
        open_up(&out);
        new.expect(0, &["restore", s(&src), "--to", s(&out), "--snapshot", id]);
        assert_eq!(std::fs::read(out.join("data/a.txt")).unwrap(), want);
    }
    // And the new machine backs up on top of them without storing the data again.
    let o = new.expect(0, &["backup", s(&src)]);
    assert!(o.stdout.contains("0 new chunks"), "{}", o.stdout);
}
