//! `storinator-worker login` as a process on a terminal (a pseudo-terminal here): the
//! two-step verification password is read with echo off, so it never shows on the screen;
//! and with no network the error names the address it could not reach, without the client
//! library's own warnings.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use storinator_testkit::mtproto::{LOGIN_CODE, LoopbackOptions, LoopbackTelegram};

const PASSWORD: &str = "correct-horse-battery";

fn worker(dir: &std::path::Path, session: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_storinator-worker"));
    c.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("STORINATOR_DATA_DIR", dir)
        .env("STORINATOR_SESSION_FILE", session)
        .env("TELEGRAM_API_ID", "1")
        .env("TELEGRAM_API_HASH", "00112233445566778899aabbccddeeff")
        .current_dir(dir)
        .arg("login");
    c
}

/// A pseudo-terminal: (master, slave).
fn pty() -> (OwnedFd, OwnedFd) {
    // SAFETY: plain libc calls on fds we own; each result is checked.
    unsafe {
        let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(m >= 0, "posix_openpt");
        assert_eq!(libc::grantpt(m), 0);
        assert_eq!(libc::unlockpt(m), 0);
        let mut name = [0 as libc::c_char; 128];
        assert_eq!(libc::ptsname_r(m, name.as_mut_ptr(), name.len()), 0);
        let s = libc::open(name.as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        assert!(s >= 0, "open slave");
        (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s))
    }
}

fn echo_is_off(master: &OwnedFd) -> bool {
    // SAFETY: tcgetattr fills a termios we own.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(master.as_raw_fd(), &mut t) == 0 && t.c_lflag & libc::ECHO == 0
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_password_is_not_echoed() {
    let dir = tempfile::tempdir().unwrap();
    let server = LoopbackTelegram::start(LoopbackOptions {
        require_login: true,
        password: Some(PASSWORD.into()),
        ..Default::default()
    })
    .await
    .unwrap();
    let session = dir.path().join("worker.session");
    server.write_session(&session).unwrap();

    let (master, slave) = pty();
    let mut cmd = worker(dir.path(), &session);
    cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: async-signal-safe calls only, between fork and exec: a session of its own with
    // the pseudo-terminal as controlling terminal (where the password prompt reads from).
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(cmd);

    // Everything the terminal shows.
    let screen = Arc::new(Mutex::new(String::new()));
    let reader = {
        let screen = screen.clone();
        let mut m = std::fs::File::from(master.try_clone().unwrap());
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = m.read(&mut buf) {
                if n == 0 {
                    break;
                }
                screen
                    .lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        })
    };
    let mut keyboard = std::fs::File::from(master.try_clone().unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let seen = screen.clone();
    let wait_for = move |needle: &str| loop {
        if seen.lock().unwrap().contains(needle) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no {needle:?} on screen:\n{}",
            seen.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let answers = tokio::task::spawn_blocking(move || {
        wait_for("Phone number");
        keyboard.write_all(b"+10000000000\n").unwrap();
        wait_for("Login code");
        keyboard
            .write_all(format!("{LOGIN_CODE}\n").as_bytes())
            .unwrap();
        wait_for("password");
        // Type only once the program turned echo off (or gave up waiting: then it never
        // will, and the password shows).
        let t = Instant::now();
        while !echo_is_off(&master) && t.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(10));
        }
        keyboard
            .write_all(format!("{PASSWORD}\n").as_bytes())
            .unwrap();
    });
    answers.await.unwrap();
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    // The reader ends when the last holder of the terminal is gone (the child has exited):
    // wait for it, so the screen holds everything the program printed, errors included.
    reader.join().unwrap();
    let screen = screen.lock().unwrap().clone();
    assert!(status.success(), "{screen}");
    assert!(screen.contains("Signed in"), "{screen}");
    assert!(
        screen.contains("+10000000000"),
        "the phone number is echoed: {screen}"
    );
    assert!(!screen.contains(PASSWORD), "the password showed:\n{screen}");
}

#[test]
fn no_network_names_the_address_without_library_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let session = dir.path().join("worker.session");
    let key = "ab".repeat(256);
    let run = |port: u16| {
        std::fs::write(
            &session,
            format!(
                r#"{{"version":1,"home_dc":2,"dcs":[{{"id":2,"addr":"127.0.0.1:{port}","auth_key":"{key}"}}]}}"#
            ),
        )
        .unwrap();
        let out = worker(dir.path(), &session)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // Nothing listens there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let err = run(port);
    assert!(
        err.contains(&format!("could not reach Telegram at 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("hint: check"), "{err}");
    assert!(!err.contains("WARN") && !err.contains('\u{1b}'), "{err}");
    // Something accepts and hangs up at once (a firewall, a captive portal): grammers' own
    // warning about the dropped requests stays out of the way.
    let rude = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = rude.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in rude.incoming() {
            drop(s);
        }
    });
    let err = run(port);
    assert!(
        err.contains(&format!("could not reach Telegram at 127.0.0.1:{port}")),
        "{err}"
    );
    assert!(
        !err.contains("WARN") && !err.contains("marking all"),
        "{err}"
    );
}
