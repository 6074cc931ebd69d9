//! Several storage hosts on one job database (a real SQLite file, one connection pool per
//! worker as separate processes would have, an injected clock): registration and heartbeats,
//! routing by the registered roots, claims only by a worker of the job's host (atomic and
//! fenced, under concurrency), a dead worker's job going to another worker of the same host,
//! and schedules that carry their host.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use storinator_shared::ops::hosts::{Registration, RootKind, RouteError, route};
use storinator_shared::ops::rules::FireRules;
use storinator_shared::ops::schedules::{NewSchedule, RunOutcome, parse_when};
use storinator_shared::{
    Catalog, JobArgs, JobError, JobPolicy, JobResult, JobState, Jobs, ManualClock, Schedules,
};

const T0: i64 = 1_800_000_000_000;
const LEASE: i64 = 10_000;

struct World {
    dir: tempfile::TempDir,
    clock: ManualClock,
    jobs: Jobs,
}

impl World {
    async fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let clock = ManualClock::new(T0);
        let jobs = World::open(&dir, &clock).await;
        World { dir, clock, jobs }
    }

    async fn open(dir: &tempfile::TempDir, clock: &ManualClock) -> Jobs {
        let catalog = Catalog::open(&storinator_testkit::db::url_for(&dir.path().join("st.db")))
            .await
            .unwrap();
        Jobs::new(catalog.pool().clone())
            .with_clock(Arc::new(clock.clone()))
            .with_policy(JobPolicy {
                lease_ms: LEASE,
                backoff_base_ms: 1_000,
                backoff_max_ms: 4_000,
                max_attempts: 3,
            })
    }

    /// The job table as another process sees it: its own pool on the same file.
    async fn other(&self) -> Jobs {
        World::open(&self.dir, &self.clock).await
    }
}

fn reg(name: &str, backup: &[&str], restore: &[&str]) -> Registration {
    Registration {
        name: name.into(),
        backup_roots: backup.iter().map(|s| s.to_string()).collect(),
        restore_roots: restore.iter().map(|s| s.to_string()).collect(),
    }
}

fn backup(path: &str) -> JobArgs {
    JobArgs::Backup {
        path: path.into(),
        encrypt: true,
    }
}

fn done() -> JobResult {
    JobResult::Backup {
        snapshot: "s".into(),
        files: 0,
        dirs: 0,
        bytes: 0,
        bytes_stored: 0,
        new_chunks: 0,
        warnings: 0,
        duration_ms: 0,
    }
}

#[tokio::test]
async fn hosts_register_their_roots_and_heartbeat() {
    let w = World::new().await;
    assert!(w.jobs.hosts().await.unwrap().is_empty());
    w.jobs
        .register_host(&reg("web2", &["/srv/data"], &["/restore"]))
        .await
        .unwrap();
    w.clock.advance(1_000);
    w.jobs
        .register_host(&reg("web1", &["/srv", "/home"], &["/srv"]))
        .await
        .unwrap();
    let hosts = w.jobs.hosts().await.unwrap();
    let names: Vec<&str> = hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["web1", "web2"], "by name");
    assert_eq!(hosts[0].backup_roots, ["/home", "/srv"]);
    assert_eq!(hosts[0].restore_roots, ["/srv"]);
    assert_eq!(hosts[0].last_seen, T0 + 1_000);
    assert_eq!(hosts[1].backup_roots, ["/srv/data"]);
    assert_eq!(hosts[1].restore_roots, ["/restore"]);

    // A heartbeat moves last_seen only; a re-registration replaces the roots.
    w.clock.advance(30_000);
    assert!(w.jobs.host_heartbeat("web2").await.unwrap());
    w.jobs
        .register_host(&reg("web1", &["/opt"], &[]))
        .await
        .unwrap();
    let hosts = w.jobs.hosts().await.unwrap();
    assert_eq!(hosts[1].last_seen, T0 + 31_000);
    assert_eq!(hosts[1].registered_at, T0);
    assert_eq!(hosts[0].backup_roots, ["/opt"]);
    assert!(hosts[0].restore_roots.is_empty());
    assert_eq!(hosts[0].registered_at, T0 + 1_000, "registered once");
    // A host nobody registered: the worker is told to register again.
    assert!(!w.jobs.host_heartbeat("web3").await.unwrap());
    // A host with no roots is still listed (its worker is alive, it just serves nothing).
    w.jobs.register_host(&reg("bare", &[], &[])).await.unwrap();
    let hosts = w.jobs.hosts().await.unwrap();
    assert_eq!(hosts.len(), 3);
    assert!(hosts[0].name == "bare" && hosts[0].backup_roots.is_empty());
}

#[tokio::test]
async fn routing_reads_the_registered_roots() {
    let w = World::new().await;
    let hosts = w.jobs.hosts().await.unwrap();
    // Nobody registered: any worker (an installation from before hosts).
    assert_eq!(
        route(&hosts, None, "/srv/data", RootKind::Backup).unwrap(),
        None
    );
    w.jobs
        .register_host(&reg("web1", &["/srv"], &["/srv"]))
        .await
        .unwrap();
    let hosts = w.jobs.hosts().await.unwrap();
    // One host serving it: that host.
    assert_eq!(
        route(&hosts, None, "/srv/data", RootKind::Backup)
            .unwrap()
            .as_deref(),
        Some("web1")
    );
    w.jobs
        .register_host(&reg("web2", &["/srv/data"], &["/tmp/r"]))
        .await
        .unwrap();
    let hosts = w.jobs.hosts().await.unwrap();
    // Two hosts serving the same path: the user must name one.
    match route(&hosts, None, "/srv/data/x", RootKind::Backup) {
        Err(RouteError::Ambiguous { candidates, .. }) => assert_eq!(candidates, ["web1", "web2"]),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        route(&hosts, Some("web2"), "/srv/data/x", RootKind::Backup)
            .unwrap()
            .as_deref(),
        Some("web2")
    );
    // Only web1 serves /srv/other.
    assert_eq!(
        route(&hosts, None, "/srv/other", RootKind::Backup)
            .unwrap()
            .as_deref(),
        Some("web1")
    );
    // Restore roots are their own kind.
    assert_eq!(
        route(&hosts, None, "/tmp/r/x", RootKind::Restore)
            .unwrap()
            .as_deref(),
        Some("web2")
    );
    // A path nobody serves: named, with every host and its folders.
    let e = route(&hosts, None, "/var/lib", RootKind::Backup)
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "no storage host serves /var/lib\nhint: hosts and their folders: web1 (/srv); web2 (/srv/data)"
    );
}

#[tokio::test]
async fn the_first_host_adopts_schedules_made_before_hosts_a_second_one_does_not() {
    let w = World::new().await;
    let schedules = Schedules::new(w.jobs.clone(), jiff::tz::TimeZone::UTC);
    let new = |path: &str| NewSchedule {
        owner: "tg:7".into(),
        user_id: 7,
        chat_id: 7,
        path: path.into(),
        when: parse_when("hourly").unwrap(),
        encrypt: true,
        retention: None,
        host: None,
    };
    let old = schedules.create(&new("/srv/a")).await.unwrap();
    assert_eq!(old.host, None);
    w.jobs
        .register_host(&reg("web1", &["/srv"], &[]))
        .await
        .unwrap();
    assert_eq!(
        schedules
            .get(old.id)
            .await
            .unwrap()
            .unwrap()
            .host
            .as_deref(),
        Some("web1"),
        "a single host's old schedules become its own"
    );
    // Once two hosts exist, a schedule of no host stays so (nobody can tell whose it is).
    let later = schedules.create(&new("/srv/b")).await.unwrap();
    w.jobs
        .register_host(&reg("web2", &["/srv"], &[]))
        .await
        .unwrap();
    w.jobs
        .register_host(&reg("web1", &["/srv"], &[]))
        .await
        .unwrap();
    assert_eq!(schedules.get(later.id).await.unwrap().unwrap().host, None);
}

/// Two workers of each of two hosts race for a mixed queue (jobs of web1, of web2, and of no
/// host), each claiming and finishing until the queue is empty: every job runs exactly
/// once, a host's jobs only on that host's workers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_claim_only_their_hosts_jobs_each_exactly_once() {
    let w = World::new().await;
    let mut expected: BTreeMap<i64, Option<&str>> = BTreeMap::new();
    for i in 0..30 {
        let host = [Some("web1"), Some("web2"), None][i % 3];
        let job = w
            .jobs
            .enqueue_on(7, 7, &backup(&format!("/srv/{i}")), host)
            .await
            .unwrap();
        assert_eq!(job.host.as_deref(), host);
        expected.insert(job.id, host);
    }
    let mut tasks = Vec::new();
    for (worker, host) in [
        ("a1", "web1"),
        ("a2", "web1"),
        ("b1", "web2"),
        ("b2", "web2"),
    ] {
        let jobs = w.other().await;
        tasks.push(tokio::spawn(async move {
            let mut ran = Vec::new();
            loop {
                match jobs.claim_on(worker, Some(host)).await {
                    Ok(Some((job, lease))) => {
                        jobs.finish(&lease, &done()).await.unwrap();
                        ran.push((job.id, job.host, host));
                    }
                    Ok(None) => break,
                    // A claim that lost the race for SQLite's write lock did nothing: retry.
                    Err(JobError::Db(_)) => tokio::task::yield_now().await,
                    Err(e) => panic!("{e}"),
                }
            }
            ran
        }));
    }
    let mut seen = BTreeSet::new();
    let mut by_host: BTreeMap<&str, usize> = BTreeMap::new();
    for t in tasks {
        for (id, job_host, worker_host) in t.await.unwrap() {
            assert!(seen.insert(id), "job {id} ran twice");
            if let Some(h) = &job_host {
                assert_eq!(h, worker_host, "job {id} of {h} ran on {worker_host}");
            }
            assert_eq!(job_host.as_deref(), expected[&id]);
            *by_host.entry(worker_host).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 30, "every job ran");
    assert!(
        by_host["web1"] >= 10 && by_host["web2"] >= 10,
        "{by_host:?}"
    );
    for id in expected.keys() {
        let j = w.jobs.get(*id).await.unwrap().unwrap();
        assert_eq!(j.state, JobState::Done);
        assert_eq!(j.attempt, 1, "claimed once");
    }
    // A worker of no particular host takes only jobs of no host.
    let web1 = w
        .jobs
        .enqueue_on(7, 7, &backup("/srv/x"), Some("web1"))
        .await
        .unwrap();
    assert!(w.jobs.claim("nobody").await.unwrap().is_none());
    let any = w.jobs.enqueue(7, 7, &backup("/srv/y")).await.unwrap();
    assert_eq!(w.jobs.claim("nobody").await.unwrap().unwrap().0.id, any.id);
    assert_eq!(
        w.jobs
            .claim_on("b1", Some("web2"))
            .await
            .unwrap()
            .map(|(j, _)| j.id),
        None
    );
    assert_eq!(
        w.jobs
            .claim_on("a1", Some("web1"))
            .await
            .unwrap()
            .unwrap()
            .0
            .id,
        web1.id
    );
}

/// A worker of web1 dies holding a job: after its lease, a worker of web2 still can't take
/// it, another worker of web1 does (attempt 2), and the dead worker's lease is fenced off.
#[tokio::test]
async fn a_dead_workers_job_goes_to_another_worker_of_the_same_host() {
    let w = World::new().await;
    let job = w
        .jobs
        .enqueue_on(7, 7, &backup("/srv/data"), Some("web1"))
        .await
        .unwrap();
    let web2 = w.other().await;
    let (_, dead) = w.jobs.claim_on("a1", Some("web1")).await.unwrap().unwrap();
    assert!(web2.claim_on("b1", Some("web2")).await.unwrap().is_none());
    w.clock.advance(LEASE + 1);
    assert!(
        web2.claim_on("b1", Some("web2")).await.unwrap().is_none(),
        "another host's worker never takes it, leased or not"
    );
    let (again, lease) = w.jobs.claim_on("a2", Some("web1")).await.unwrap().unwrap();
    assert_eq!(again.id, job.id);
    assert_eq!(lease.attempt, 2);
    assert!(matches!(
        w.jobs.heartbeat(&dead).await,
        Err(JobError::LeaseLost { .. })
    ));
    w.jobs.finish(&lease, &done()).await.unwrap();
    assert_eq!(
        w.jobs
            .get(job.id)
            .await
            .unwrap()
            .unwrap()
            .lease_owner
            .as_deref(),
        Some("a2")
    );
}

/// A daemon fires only its host's schedules and those of no host; the job carries the
/// schedule's host, or for a schedule of no host the firing daemon's.
#[tokio::test]
async fn scheduled_jobs_carry_their_host() {
    let w = World::new().await;
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().canonicalize().unwrap().display().to_string();
    let schedules = Schedules::new(w.jobs.clone(), jiff::tz::TimeZone::UTC);
    let new = |host: Option<&str>| NewSchedule {
        owner: "local".into(),
        user_id: 0,
        chat_id: 0,
        path: folder.clone(),
        when: parse_when("every 1h").unwrap(),
        encrypt: true,
        retention: None,
        host: host.map(str::to_string),
    };
    let on_web1 = schedules.create(&new(Some("web1"))).await.unwrap();
    assert_eq!(on_web1.host.as_deref(), Some("web1"));
    let anywhere = schedules.create(&new(None)).await.unwrap();
    w.clock.advance(3_600_000);
    let rules = |host: &str| FireRules {
        host: Some(host.into()),
        ..FireRules::default()
    };
    // web2's daemon fires the schedule of no host (for itself), not web1's.
    let fired = schedules.fire_due(&rules("web2")).await.unwrap();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].schedule_id, anywhere.id);
    let job = w.jobs.get(fired[0].job_id.unwrap()).await.unwrap().unwrap();
    assert_eq!(job.host.as_deref(), Some("web2"));
    // web1's daemon fires its own.
    let fired = schedules.fire_due(&rules("web1")).await.unwrap();
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0].schedule_id, on_web1.id);
    assert_eq!(fired[0].outcome, RunOutcome::Queued);
    let job = w.jobs.get(fired[0].job_id.unwrap()).await.unwrap().unwrap();
    assert_eq!(job.host.as_deref(), Some("web1"));
    assert_eq!(job.schedule_id, Some(on_web1.id));
    assert!(
        w.jobs.claim_on("b1", Some("web2")).await.unwrap().is_some(),
        "web2 runs its own"
    );
    assert!(
        w.jobs.claim_on("b1", Some("web2")).await.unwrap().is_none(),
        "and not web1's"
    );
}

/// The overwrite a user confirms after a restore conflict runs on the host the conflict
/// was found on.
#[tokio::test]
async fn a_confirmed_overwrite_stays_on_its_host() {
    let w = World::new().await;
    let restore = JobArgs::Restore {
        path: "/srv/data".into(),
        to: None,
        snapshot: None,
        overwrite: false,
    };
    w.jobs
        .enqueue_on(7, 7, &restore, Some("web2"))
        .await
        .unwrap();
    let (job, lease) = w.jobs.claim_on("b1", Some("web2")).await.unwrap().unwrap();
    let conflicts = JobResult::Conflicts {
        count: 1,
        sample: vec!["data/a".into()],
        snapshot: Some("abcd".into()),
    };
    w.jobs
        .fail(&lease, "1 file differs", Some(&conflicts), false)
        .await
        .unwrap();
    let outcome = w
        .jobs
        .answer_conflict(job.id, 7, storinator_shared::Answer::Overwrite)
        .await
        .unwrap();
    let storinator_shared::AnswerOutcome::Overwriting(new) = outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(new.host.as_deref(), Some("web2"));
}

#[tokio::test]
async fn a_host_gone_for_good_is_forgotten_once_its_jobs_are_settled() {
    let w = World::new().await;
    w.jobs
        .register_host(&reg("old", &["/srv"], &["/srv"]))
        .await
        .unwrap();
    w.jobs
        .register_host(&reg("new", &["/srv"], &[]))
        .await
        .unwrap();
    let job = w
        .jobs
        .enqueue_on(7, 7, &backup("/srv/a"), Some("old"))
        .await
        .unwrap();
    let e = w.jobs.forget_host("old").await.unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "host old still has 1 job queued or running (#{})\nhint: cancel them first (/cancel <id>), or let them finish",
            job.id
        )
    );
    w.jobs.request_cancel(job.id, 7).await.unwrap();
    assert!(w.jobs.forget_host("old").await.unwrap());
    assert!(!w.jobs.forget_host("old").await.unwrap(), "gone already");
    let hosts = w.jobs.hosts().await.unwrap();
    assert_eq!(hosts.len(), 1);
    // /srv is no longer ambiguous.
    assert_eq!(
        route(&hosts, None, "/srv/a", RootKind::Backup)
            .unwrap()
            .as_deref(),
        Some("new")
    );
}
