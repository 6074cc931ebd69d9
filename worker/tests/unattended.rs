//! The worker daemon unattended: two real daemons on one database fire each slot once, a
//! killed and restarted daemon does not repeat a slot, the healthcheck URL is pushed after
//! scheduled backups (a local HTTP server records the requests), and the daily scrub runs as
//! a scheduled job. Time is a manual clock shared by the daemons; waits are bounded.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jiff::tz::TimeZone;
use storinator_shared::ops::rules::FireRules;
use storinator_shared::ops::schedules::{NewSchedule, parse_when};
use storinator_shared::{
    Catalog, ChunkerParams, DirStorage, EngineSettings, JobState, Jobs, KdfParams, ManualClock,
    Repo, Schedules, Storage,
};
use storinator_worker::daemon::{self, DaemonConfig, Unattended};
use storinator_worker::healthcheck::Healthcheck;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

const PASS: &str = "pw";
const HOUR: i64 = 3_600_000;
const WAIT: Duration = Duration::from_secs(60);

fn at(s: &str) -> i64 {
    let dt: jiff::civil::DateTime = s.parse().unwrap();
    dt.to_zoned(TimeZone::get("Europe/Berlin").unwrap())
        .unwrap()
        .timestamp()
        .as_millisecond()
}

struct World {
    dir: tempfile::TempDir,
    db: String,
    clock: ManualClock,
    jobs: Jobs,
    schedules: Schedules,
    data: PathBuf,
}

type Daemon = (oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>);

impl World {
    async fn new(start: i64) -> World {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("root/data");
        std::fs::create_dir_all(data.join("sub")).unwrap();
        std::fs::write(data.join("sub/a.txt"), b"alpha").unwrap();
        std::fs::write(data.join("b.bin"), vec![7u8; 50_000]).unwrap();
        let data = data.canonicalize().unwrap();
        let db = format!("sqlite://{}", dir.path().join("st.db").display());
        let catalog = Catalog::open(&db).await.unwrap();
        let store = DirStorage::open(dir.path().join("store")).unwrap();
        Repo::init(&catalog, &store, PASS, KdfParams::fast_for_tests())
            .await
            .unwrap();
        let clock = ManualClock::new(start);
        let jobs = Jobs::new(catalog.pool().clone()).with_clock(Arc::new(clock.clone()));
        let schedules = Schedules::new(jobs.clone(), TimeZone::get("Europe/Berlin").unwrap());
        World {
            dir,
            db,
            clock,
            jobs,
            schedules,
            data,
        }
    }

    async fn add(&self, when: &str) -> i64 {
        self.add_keeping(when, None).await
    }

    /// A schedule of user 7 for the data folder, with a keep policy (`keep last 2`) if given.
    async fn add_keeping(&self, when: &str, keep: Option<&str>) -> i64 {
        self.schedules
            .create(&NewSchedule {
                owner: "tg:7".into(),
                user_id: 7,
                chat_id: 7,
                path: self.data.display().to_string(),
                when: parse_when(when).unwrap(),
                encrypt: true,
                retention: keep
                    .map(|k| storinator_shared::ops::schedules::parse_retention(k).unwrap()),
                host: None,
            })
            .await
            .unwrap()
            .id
    }

    /// A daemon as a fresh process would start it: its own pool, repo and scheduler.
    async fn daemon(
        &self,
        id: &str,
        healthcheck: Option<&str>,
        scrub_at: Option<(u8, u8)>,
    ) -> Daemon {
        let storage = Arc::new(DirStorage::open(self.dir.path().join("store")).unwrap());
        self.daemon_on(id, healthcheck, scrub_at, storage).await
    }

    /// The same over a given store.
    async fn daemon_on(
        &self,
        id: &str,
        healthcheck: Option<&str>,
        scrub_at: Option<(u8, u8)>,
        storage: Arc<dyn Storage>,
    ) -> Daemon {
        let catalog = Catalog::open(&self.db).await.unwrap();
        let settings = EngineSettings {
            pack_size: 64 * 1024,
            chunker: ChunkerParams::small(),
            threads: 1,
            ..EngineSettings::default()
        };
        let jobs = Jobs::new(catalog.pool().clone()).with_clock(Arc::new(self.clock.clone()));
        let repo = Repo::open(catalog, storage, PASS, settings).await.unwrap();
        let unattended = Unattended {
            schedules: Schedules::new(jobs.clone(), TimeZone::get("Europe/Berlin").unwrap()),
            rules: FireRules {
                backup_roots: vec![self.data.parent().unwrap().to_path_buf()],
                allowed_users: vec![7],
                jitter_ms: 0,
                host: None,
            },
            tick: Duration::from_millis(20),
            healthcheck: healthcheck.map(|u| Healthcheck::new(u).unwrap()),
            scrub_at,
            scrub_bytes: 1 << 20,
            canary: false,
        };
        let cfg = DaemonConfig {
            worker_id: id.to_string(),
            concurrency: 2,
            poll_interval: Duration::from_millis(20),
            progress_interval: Duration::from_millis(50),
            restore_roots: Vec::new(),
            ..Default::default()
        };
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(daemon::run_with(
            Arc::new(repo),
            jobs,
            cfg,
            Some(unattended),
            async move {
                let _ = rx.await;
            },
        ));
        (tx, task)
    }

    /// Waits until `n` jobs exist and none is queued or running.
    async fn settle(&self, n: i64) {
        let pool = self.jobs.pool().clone();
        tokio::time::timeout(WAIT, async {
            loop {
                let (all, active): (i64, i64) = sqlx::query_as(
                    "SELECT count(*), count(*) FILTER (WHERE state IN ('queued', 'running')) FROM jobs",
                )
                .fetch_one(&pool)
                .await
                .unwrap();
                if all >= n && active == 0 {
                    assert_eq!(all, n, "more jobs than slots");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{n} jobs did not finish"));
    }

    async fn snapshots(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM snapshots")
            .fetch_one(self.jobs.pool())
            .await
            .unwrap()
    }
}

async fn stop(d: Daemon) {
    let _ = d.0.send(());
    tokio::time::timeout(Duration::from_secs(30), d.1)
        .await
        .expect("daemon stops")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_fire_each_slot_once_and_a_restarted_one_does_not_repeat() {
    let w = World::new(at("2026-05-04 10:15")).await;
    let id = w.add("hourly").await;
    let a = w.daemon("a", None, None).await;
    let mut b = Some(w.daemon("b", None, None).await);
    for k in 1..=4i64 {
        w.clock.set(at("2026-05-04 10:00") + k * HOUR);
        // Give both schedulers several ticks at this instant.
        tokio::time::sleep(Duration::from_millis(120)).await;
        w.settle(k).await;
        if k == 2 {
            // Kill b outright (no shutdown), start it again as a new process would.
            let (_tx, task) = b.take().unwrap();
            task.abort();
            let _ = task.await;
            b = Some(w.daemon("b2", None, None).await);
            tokio::time::sleep(Duration::from_millis(120)).await;
            w.settle(k).await;
        }
    }
    assert_eq!(w.snapshots().await, 4, "one snapshot per slot");
    let runs = w.schedules.runs(id, 100).await.unwrap();
    assert_eq!(runs.len(), 4);
    let done: i64 =
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE state = 'done' AND schedule_id = $1")
            .bind(id)
            .fetch_one(w.jobs.pool())
            .await
            .unwrap();
    assert_eq!(done, 4);
    stop(a).await;
    stop(b.unwrap()).await;
}

/// A tiny HTTP server that records request paths and answers 200.
async fn monitor() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let head = String::from_utf8_lossy(&got).to_string();
                let line = head.lines().next().unwrap_or("").to_string();
                log.lock().unwrap().push(line);
                let _ = sock
                    .write_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nOK",
                    )
                    .await;
            });
        }
    });
    (format!("http://{addr}/ping/abc-123"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_healthcheck_url_hears_each_scheduled_backup_and_each_failure() {
    let (url, seen) = monitor().await;
    let w = World::new(at("2026-05-04 10:15")).await;
    w.add("hourly").await;
    // A manual job is not a scheduled backup: no ping for it.
    w.jobs
        .enqueue(
            7,
            7,
            &storinator_shared::JobArgs::Backup {
                path: w.data.display().to_string(),
                encrypt: true,
            },
        )
        .await
        .unwrap();
    let d = w.daemon("a", Some(&url), None).await;
    w.settle(1).await;
    w.clock.set(at("2026-05-04 11:00"));
    w.settle(2).await;
    let wait_for = |n: usize| {
        let seen = seen.clone();
        async move {
            tokio::time::timeout(WAIT, async {
                loop {
                    if seen.lock().unwrap().len() >= n {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
            .await
            .expect("the monitor was pinged")
        }
    };
    wait_for(1).await;
    assert_eq!(seen.lock().unwrap()[0], "GET /ping/abc-123 HTTP/1.1");
    // The folder vanishes: the next slot is refused, and the monitor hears `/fail`.
    std::fs::rename(&w.data, w.dir.path().join("moved")).unwrap();
    w.clock.set(at("2026-05-04 12:00"));
    wait_for(2).await;
    assert_eq!(seen.lock().unwrap()[1], "GET /ping/abc-123/fail HTTP/1.1");
    stop(d).await;
    // A scheduled backup that runs and fails is a `/fail` too: the slot fires while the
    // daemon is down, then the folder is replaced by a file before a daemon picks the job up.
    std::fs::rename(w.dir.path().join("moved"), &w.data).unwrap();
    w.clock.set(at("2026-05-04 13:00"));
    let fired = w.schedules.fire_due(&FireRules::default()).await.unwrap();
    assert_eq!(fired.len(), 1);
    std::fs::remove_dir_all(&w.data).unwrap();
    std::fs::write(&w.data, b"not a folder any more").unwrap();
    let d = w.daemon("b", Some(&url), None).await;
    w.settle(3).await;
    let failed = w.jobs.get(fired[0].job_id.unwrap()).await.unwrap().unwrap();
    assert_eq!(failed.state, JobState::Failed, "{failed:?}");
    wait_for(3).await;
    assert_eq!(seen.lock().unwrap()[2], "GET /ping/abc-123/fail HTTP/1.1");
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(seen.lock().unwrap().len(), 3, "{:?}", seen.lock().unwrap());
    stop(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_scrub_runs_as_a_scheduled_job_once_a_day() {
    let w = World::new(at("2026-05-04 03:50")).await;
    // Something to scrub.
    let id = w.add("hourly").await;
    let d = w.daemon("a", None, Some((4, 0))).await;
    // The daemon sets the scrub schedule up as it starts (its first slot: 04:00 today).
    let pool = w.jobs.pool().clone();
    tokio::time::timeout(WAIT, async {
        while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM schedules WHERE kind = 'scrub'")
            .fetch_one(&pool)
            .await
            .unwrap()
            == 0
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the daemon set up the daily scrub");
    w.clock.set(at("2026-05-04 04:00"));
    // The backup and the scrub both fire at 04:00.
    w.settle(2).await;
    let scrubs: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, state FROM jobs WHERE kind = 'scrub' ORDER BY id")
            .fetch_all(w.jobs.pool())
            .await
            .unwrap();
    assert_eq!(scrubs.len(), 1);
    let job = w.jobs.get(scrubs[0].0).await.unwrap().unwrap();
    assert_eq!(job.state, JobState::Done, "{job:?}");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM scrub_runs")
        .fetch_one(w.jobs.pool())
        .await
        .unwrap();
    assert_eq!(runs, 1);
    // Later the same day: no second scrub. The next day: one more.
    w.clock.set(at("2026-05-04 05:00"));
    w.settle(3).await;
    w.clock.set(at("2026-05-05 04:00"));
    // 05:00 → next day 04:00: one hourly catch-up and the scrub.
    w.settle(5).await;
    let scrubs: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'scrub'")
        .fetch_one(w.jobs.pool())
        .await
        .unwrap();
    assert_eq!(scrubs, 2);
    let _ = id;
    stop(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedules_keep_policy_is_applied_after_each_backup() {
    let w = World::new(at("2026-05-04 10:15")).await;
    let id = w.add_keeping("hourly", Some("keep last 2")).await;
    // Shown where schedules are listed (`/schedules`, `schedule list`).
    let alerts = storinator_shared::ops::alerts::Alerts::new(
        w.schedules.clone(),
        storinator_shared::ops::alerts::AlertPolicy::default(),
    );
    let line = alerts.statuses("tg:7").await.unwrap()[0].line(w.schedules.tz());
    assert!(line.contains("keep last 2"), "{line}");

    let d = w.daemon("a", None, None).await;
    let mut made = Vec::new();
    for k in 1..=4i64 {
        w.clock.set(at("2026-05-04 10:00") + k * HOUR);
        w.settle(k).await;
        let job = w.schedules.last_job(id).await.unwrap().unwrap();
        assert_eq!(job.state, JobState::Done, "{:?}", job.error);
        let Some(storinator_shared::JobResult::Backup { snapshot, .. }) = job.result else {
            panic!("{:?}", job.result)
        };
        made.push(snapshot);
        // Done means the policy was applied: never more than two snapshots.
        assert_eq!(w.snapshots().await, k.min(2), "after backup {k}");
    }
    stop(d).await;
    let catalog = Catalog::open(&w.db).await.unwrap();
    let mut left: Vec<String> = storinator_shared::list_snapshots(&catalog, "tg:7", None)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.short_id)
        .collect();
    left.sort();
    let mut newest = made[2..].to_vec();
    newest.sort();
    assert_eq!(left, newest, "the policy's snapshots stay: the two newest");
    // Each forget stored a sealed tombstone (a later `recover` honours them).
    let tombstones = std::fs::read_dir(w.dir.path().join("store"))
        .unwrap()
        .flat_map(|e| {
            let p = e.unwrap().path();
            if p.is_dir() {
                std::fs::read_dir(p)
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect()
            } else {
                vec![p]
            }
        })
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("forget-")
        })
        .count();
    assert_eq!(tombstones, 2);
}

/// A keep policy that fails after a scheduled backup (its tombstone cannot be stored) leaves
/// the backup done and nothing forgotten, and raises an alert for the schedule's owner, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_keep_policy_after_a_scheduled_backup_raises_an_alert() {
    use storinator_shared::ops::alerts::{AlertKind, AlertPolicy, Alerts};
    let w = World::new(at("2026-05-04 10:15")).await;
    let id = w.add_keeping("hourly", Some("keep last 1")).await;
    let alerts = Alerts::new(w.schedules.clone(), AlertPolicy::default());
    let forget_alerts = || async {
        alerts
            .pending()
            .await
            .unwrap()
            .into_iter()
            .filter(|a| matches!(a.kind, AlertKind::ForgetFailed { .. }))
            .collect::<Vec<_>>()
    };
    let store = storinator_testkit::fixtures::InstrumentedStorage::new(
        DirStorage::open(w.dir.path().join("store")).unwrap(),
    );
    let refuse = store.refuse_named.clone();
    let d = w.daemon_on("a", None, None, Arc::new(store)).await;
    // The first backup: nothing to forget yet.
    w.clock.set(at("2026-05-04 11:00"));
    w.settle(1).await;
    // The second: the policy would forget the first, but its tombstone is refused.
    *refuse.lock().unwrap() = Some("forget-".into());
    w.clock.set(at("2026-05-04 12:00"));
    w.settle(2).await;
    stop(d).await;
    let job = w.schedules.last_job(id).await.unwrap().unwrap();
    assert_eq!(
        job.state,
        JobState::Done,
        "the backup stands: {:?}",
        job.error
    );
    assert_eq!(w.snapshots().await, 2, "nothing was forgotten");
    let told = forget_alerts().await;
    assert_eq!(told.len(), 1, "{told:?}");
    let AlertKind::ForgetFailed { job_id, error, .. } = &told[0].kind else {
        unreachable!()
    };
    assert_eq!(*job_id, job.id);
    assert!(
        error.contains("keep last 1") && error.contains("injected refusal of forget-"),
        "{error}"
    );
    assert_eq!(told[0].schedule.id, id);
    // Told once.
    alerts.ack(&told[0]).await.unwrap();
    assert!(forget_alerts().await.is_empty());
}
