//! The first ten minutes of a new user, as the binary meets them: help that describes every
//! option and offers none that mean nothing, plain logs when stderr is not a terminal, a
//! `.env` that can't be read stops the program naming it, example values are refused, and the
//! data folder and catalog are created private.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output};

fn worker(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_storinator-worker"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", dir)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[test]
fn help_describes_every_option_and_offers_none_that_mean_nothing() {
    let d = tempfile::tempdir().unwrap();
    let ls = text(&worker(d.path(), &["ls", "--help"]));
    let described = |help: &str, option: &str| {
        help.lines()
            .skip_while(|l| !l.trim_start().starts_with(option))
            .take(2)
            .collect::<String>()
            .len()
            > option.len() + 20
    };
    assert!(described(&ls, "--snapshot <ID>"), "{ls}");
    let verify = text(&worker(d.path(), &["verify", "--help"]));
    assert!(described(&verify, "--read-data"), "{verify}");
    let snaps = text(&worker(d.path(), &["snapshots", "--help"]));
    assert!(described(&snaps, "[PATH]"), "{snaps}");
    let login = text(&worker(d.path(), &["login", "--help"]));
    assert!(
        !login.contains("--owner") && !login.contains("--passphrase-file"),
        "{login}"
    );
    let init = text(&worker(d.path(), &["init", "--help"]));
    assert!(
        !init.contains("--owner") && init.contains("--passphrase-file"),
        "{init}"
    );
    let top = text(&worker(d.path(), &["--help"]));
    assert!(
        !top.contains("demo"),
        "the demo is its own binary now: {top}"
    );
}

#[test]
fn logs_are_plain_when_stderr_is_not_a_terminal_and_the_data_dir_is_private() {
    let d = tempfile::tempdir().unwrap();
    let data = d.path().join("data");
    let o = Command::new(env!("CARGO_BIN_EXE_storinator-worker"))
        .args(["-vvv", "snapshots"])
        .env_clear()
        .env("STORINATOR_DATA_DIR", &data)
        .current_dir(d.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("DEBUG"), "debug logs expected: {err}");
    assert!(!err.contains('\x1b'), "ANSI escapes in piped logs: {err:?}");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    assert_eq!(mode(&data.join("storinator.db")), 0o600);
}

#[test]
fn an_unreadable_env_file_stops_the_program_naming_it() {
    let d = tempfile::tempdir().unwrap();
    // A folder where the file should be: unreadable even for root.
    std::fs::create_dir(d.path().join(".env")).unwrap();
    let o = worker(d.path(), &["snapshots"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains(".env"), "{err}");
    assert_eq!(err.matches("cannot read").count(), 1, "said once: {err}");
    assert!(
        !d.path().join(".local/share/t-storinator").exists(),
        "nothing was created on defaults"
    );
}

#[test]
fn example_values_from_env_example_are_refused() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(
        d.path().join(".env"),
        "STORINATOR_DATA_DIR=./data\nTELEGRAM_API_ID=1234567\nTELEGRAM_API_HASH=0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let o = worker(d.path(), &["snapshots"]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("TELEGRAM_API_ID") && err.contains("example value"),
        "{err}"
    );
}
