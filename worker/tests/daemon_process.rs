//! `storinator-worker run` as a process: it picks up jobs queued in the shared SQLite file,
//! unlocking the key once for all of them, and SIGTERM makes it exit 0 promptly.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use storinator_shared::{Catalog, JobArgs, JobState, Jobs};

fn worker(dir: &std::path::Path) -> Command {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_completes_a_queued_job_and_exits_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::create_dir_all(dir.path().join("store")).unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    std::fs::write(src.join("sub/a.txt"), b"alpha").unwrap();
    let st = worker(dir.path()).arg("init").output().unwrap();
    assert!(
        st.status.success(),
        "init: {}",
        String::from_utf8_lossy(&st.stderr)
    );

    let url = format!(
        "sqlite://{}",
        dir.path().join("data/storinator.db").display()
    );
    let catalog = Catalog::open(&url).await.unwrap();
    let jobs = Jobs::new(catalog.pool().clone());
    let mut queued = Vec::new();
    for _ in 0..3 {
        let job = jobs
            .enqueue(
                7,
                7,
                &JobArgs::Backup {
                    path: src.display().to_string(),
                    encrypt: true,
                },
            )
            .await
            .unwrap();
        queued.push(job.id);
    }

    let mut child = worker(dir.path())
        .args(["run", "-v"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in queued {
        loop {
            let j = jobs.get(id).await.unwrap().unwrap();
            if j.state == JobState::Done {
                break;
            }
            assert!(Instant::now() < deadline, "job not done: {j:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "worker ignored SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("worker daemon stopped"), "{err}");
    // Argon2id once for the process, not once per job.
    assert_eq!(err.matches("unlocking the key").count(), 1, "{err}");
}
