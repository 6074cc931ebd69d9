//! `storinator-worker run` as a process: it picks up jobs queued in the shared SQLite file,
//! unlocking the key once for all of them, and SIGTERM makes it exit 0 promptly, also in the
//! middle of a job (whose finished packs are kept and not uploaded again by the next run).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use storinator_shared::{Catalog, DirStorage, EngineSettings, JobArgs, JobState, Jobs, Repo};
use storinator_testkit::fixtures::{duplicate_data_chunks, stored_packs, words};

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

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig}");
}

/// Pack files in the store (not the key object).
fn packs_in(store: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(store)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".enc") && !n.starts_with("key-"))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_job_keeps_finished_packs_and_the_next_run_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("store");
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::create_dir_all(&store).unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    // Twelve one-chunk files, each in a pack of its own (64 KiB packs).
    for i in 0..12u64 {
        std::fs::write(src.join(format!("part{i:02}.txt")), words(i, 250_000)).unwrap();
    }
    let slow = |mut c: Command| {
        c.env("STORINATOR_PACK_SIZE", "64KiB")
            .env("STORINATOR_COMPRESSION", "zstd:19");
        c
    };
    let st = worker(dir.path()).arg("init").output().unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let url = format!(
        "sqlite://{}",
        dir.path().join("data/storinator.db").display()
    );
    let catalog = Catalog::open(&url).await.unwrap();
    let jobs = Jobs::new(catalog.pool().clone());
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

    let mut child = slow(worker(dir.path()))
        .args(["run", "-v"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Catch the job with two packs stored and more to come: freeze the process there, so
    // the signal arrives mid-job however fast or slow the machine is.
    let deadline = Instant::now() + Duration::from_secs(120);
    while packs_in(&store).len() < 2 {
        assert!(Instant::now() < deadline, "no packs uploaded");
        assert_ne!(
            jobs.get(job.id).await.unwrap().unwrap().state,
            JobState::Done,
            "the job finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    signal(child.id(), "STOP");
    let finished = packs_in(&store);
    assert!(finished.len() < 12, "{finished:?}");
    signal(child.id(), "TERM");
    signal(child.id(), "CONT");
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "worker ignored SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("released for the next run"), "{err}");

    // The job is back in the queue, not failed and not charged an attempt; every pack that
    // was finished is still in storage and in the catalog.
    let j = jobs.get(job.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Queued, "{j:?}");
    assert!(j.error.is_none(), "{j:?}");
    assert_eq!(j.attempt, 1);
    assert_eq!(j.max_attempts, jobs.policy().max_attempts + 1);
    let kept = packs_in(&store);
    for p in &finished {
        assert!(kept.contains(p), "finished pack {p} was removed");
    }
    let repo = Repo::open(
        Catalog::open(&url).await.unwrap(),
        std::sync::Arc::new(DirStorage::open(&store).unwrap()),
        "pw for tests",
        EngineSettings::default(),
    )
    .await
    .unwrap();
    let stored: Vec<String> = repo
        .catalog
        .packs()
        .await
        .unwrap()
        .iter()
        .filter(|p| p.state == "stored")
        .map(|p| format!("{}.enc", p.id))
        .collect();
    for p in &finished {
        assert!(stored.contains(p), "{p} not recorded as stored");
    }

    // The next run finishes the job without uploading any finished chunk again.
    let mut child = slow(worker(dir.path()))
        .args(["run"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let j = loop {
        let j = jobs.get(job.id).await.unwrap().unwrap();
        if j.state.is_final() {
            break j;
        }
        assert!(Instant::now() < deadline, "job not done: {j:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    signal(child.id(), "TERM");
    assert_eq!(child.wait().unwrap().code(), Some(0));
    assert_eq!(j.state, JobState::Done, "{j:?}");
    assert_eq!(j.attempt, 2);
    let packs = stored_packs(repo.storage.as_ref(), &repo.ring_all().await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        duplicate_data_chunks(&packs),
        vec![],
        "chunks uploaded twice"
    );
    let out = dir.path().join("out");
    let st = worker(dir.path())
        .args(["restore", "--owner", "tg:7", src.to_str().unwrap(), "--to"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    for i in 0..12u64 {
        let name = format!("part{i:02}.txt");
        assert_eq!(
            std::fs::read(out.join("src").join(&name)).unwrap(),
            words(i, 250_000),
            "{name}"
        );
    }
}
