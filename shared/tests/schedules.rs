//! Schedules on a real SQLite file with an injected clock: the right instants across DST,
//! exactly once per slot with two schedulers, one catch-up after downtime, skipped slots,
//! refusals, jitter, and the grouping of repeated failures.

use std::collections::BTreeMap;
use std::sync::Arc;

use jiff::tz::TimeZone;
use storinator_shared::ops::alerts::{AlertKind, AlertPolicy, Alerts};
use storinator_shared::ops::rules::FireRules;
use storinator_shared::ops::schedules::{NewSchedule, RunOutcome, parse_when};
use storinator_shared::{Catalog, JobResult, Jobs, ManualClock, Schedule, Schedules};

const MIN: i64 = 60_000;
const HOUR: i64 = 60 * MIN;

fn berlin() -> TimeZone {
    TimeZone::get("Europe/Berlin").unwrap()
}

/// Unix ms of a wall-clock time in Berlin.
fn at(s: &str) -> i64 {
    let dt: jiff::civil::DateTime = s.parse().unwrap();
    dt.to_zoned(berlin()).unwrap().timestamp().as_millisecond()
}

fn local(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms)
        .unwrap()
        .to_zoned(berlin())
        .strftime("%Y-%m-%d %H:%M %Z")
        .to_string()
}

struct World {
    dir: tempfile::TempDir,
    clock: ManualClock,
    jobs: Jobs,
    schedules: Schedules,
    folder: String,
}

impl World {
    async fn new(start: i64) -> World {
        let dir = tempfile::tempdir().unwrap();
        let catalog = Catalog::open(&storinator_testkit::db::url_for(&dir.path().join("st.db")))
            .await
            .unwrap();
        let clock = ManualClock::new(start);
        let jobs = Jobs::new(catalog.pool().clone()).with_clock(Arc::new(clock.clone()));
        let schedules = Schedules::new(jobs.clone(), berlin());
        let folder = dir.path().join("data");
        std::fs::create_dir_all(&folder).unwrap();
        let folder = folder.canonicalize().unwrap().display().to_string();
        World {
            dir,
            clock,
            jobs,
            schedules,
            folder,
        }
    }

    /// A second scheduler on its own connection pool, as another daemon process would have.
    async fn other_scheduler(&self) -> Schedules {
        let catalog = Catalog::open(&storinator_testkit::db::url_for(
            &self.dir.path().join("st.db"),
        ))
        .await
        .unwrap();
        let jobs = Jobs::new(catalog.pool().clone()).with_clock(Arc::new(self.clock.clone()));
        Schedules::new(jobs, berlin())
    }

    async fn add(&self, when: &str) -> Schedule {
        self.schedules
            .create(&NewSchedule {
                owner: "tg:7".into(),
                user_id: 7,
                chat_id: 7,
                path: self.folder.clone(),
                when: parse_when(when).unwrap(),
                encrypt: true,
                retention: None,
                host: None,
            })
            .await
            .unwrap()
    }

    /// A worker that finishes every claimable job at once.
    async fn finish_all(&self) {
        while let Some((_, lease)) = self.jobs.claim("w").await.unwrap() {
            self.jobs.finish(&lease, &backup_result()).await.unwrap();
        }
    }

    async fn job_count(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(self.jobs.pool())
            .await
            .unwrap()
    }
}

fn backup_result() -> JobResult {
    JobResult::Backup {
        snapshot: "abc".into(),
        files: 1,
        dirs: 1,
        bytes: 1,
        bytes_stored: 1,
        new_chunks: 1,
        warnings: 0,
        duration_ms: 1,
    }
}

fn rules() -> FireRules {
    FireRules::default()
}

/// Steps the clock from `from` to `to` in `step`s, firing and finishing jobs at each step, and
/// returns each schedule's fired slots (local time) with the delay between slot and firing.
async fn drive(w: &World, from: i64, to: i64, step: i64) -> BTreeMap<i64, Vec<String>> {
    let mut out: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    let mut t = from;
    while t <= to {
        w.clock.set(t);
        for f in w.schedules.fire_due(&rules()).await.unwrap() {
            assert_eq!(f.outcome, RunOutcome::Queued, "{f:?}");
            assert!(!f.catch_up, "no slot was passed over: {f:?}");
            assert!(
                t - f.slot < step,
                "slot {} fired late at {}",
                local(f.slot),
                local(t)
            );
            out.entry(f.schedule_id).or_default().push(local(f.slot));
        }
        w.finish_all().await;
        t += step;
    }
    out
}

#[tokio::test]
async fn every_form_fires_at_the_right_instants_across_both_dst_changes() {
    // Europe/Berlin: forward 2026-03-29 02:00 → 03:00, back 2026-10-25 03:00 → 02:00.
    let w = World::new(at("2026-03-28 12:00")).await;
    let hourly = w.add("hourly").await;
    let daily = w.add("daily 02:30").await;
    let weekly = w.add("weekly sun 02:30").await;
    let every = w.add("every 6h").await;
    let cron = w.add("\"30 2 * * *\"").await;
    let fired = drive(&w, at("2026-03-28 12:00"), at("2026-03-29 12:00"), 10 * MIN).await;
    let h = &fired[&hourly.id];
    // 24 wall-clock hours, one of which does not exist.
    assert_eq!(h.len(), 23, "{h:?}");
    assert!(h.contains(&"2026-03-29 01:00 CET".to_string()));
    assert!(!h.iter().any(|s| s.starts_with("2026-03-29 02:")));
    assert!(h.contains(&"2026-03-29 03:00 CEST".to_string()));
    // 02:30 does not exist that night: the first valid time after it, once.
    assert_eq!(fired[&daily.id], ["2026-03-29 03:00 CEST"]);
    assert_eq!(fired[&weekly.id], ["2026-03-29 03:00 CEST"]);
    assert_eq!(fired[&cron.id], ["2026-03-29 03:00 CEST"]);
    // Every 6 h is elapsed time: 18:00 CET, 00:00 CET, 06:00 CET (= 07:00 CEST).
    assert_eq!(
        fired[&every.id],
        [
            "2026-03-28 18:00 CET",
            "2026-03-29 00:00 CET",
            "2026-03-29 07:00 CEST"
        ]
    );

    let w = World::new(at("2026-10-24 12:00")).await;
    let hourly = w.add("hourly").await;
    let daily = w.add("daily 02:30").await;
    let weekly = w.add("weekly sun 02:30").await;
    let every = w.add("every 6h").await;
    let cron = w.add("\"30 2 * * *\"").await;
    let fired = drive(&w, at("2026-10-24 12:00"), at("2026-10-25 12:00"), 10 * MIN).await;
    let h = &fired[&hourly.id];
    // 24 wall-clock hours, one of which happens twice: 25 real hours, 25 slots.
    assert_eq!(h.len(), 25, "{h:?}");
    assert!(h.contains(&"2026-10-25 02:00 CEST".to_string()));
    assert!(h.contains(&"2026-10-25 02:00 CET".to_string()));
    // 02:30 happens twice that night: it runs once.
    assert_eq!(fired[&daily.id], ["2026-10-25 02:30 CEST"]);
    assert_eq!(fired[&weekly.id], ["2026-10-25 02:30 CEST"]);
    assert_eq!(fired[&cron.id], ["2026-10-25 02:30 CEST"]);
    // 25 real hours from 12:00 CEST to 12:00 CET: four 6-hour slots.
    assert_eq!(
        fired[&every.id],
        [
            "2026-10-24 18:00 CEST",
            "2026-10-25 00:00 CEST",
            "2026-10-25 05:00 CET",
            "2026-10-25 11:00 CET"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_schedulers_fire_each_slot_exactly_once() {
    let w = World::new(at("2026-05-04 10:15")).await;
    let other = w.other_scheduler().await;
    let s = w.add("hourly").await;
    for _ in 0..12 {
        w.clock.advance(HOUR);
        // Both daemons look at the same moment, several times.
        let mut tasks = Vec::new();
        for i in 0..6 {
            let sched = if i % 2 == 0 {
                w.schedules.clone()
            } else {
                other.clone()
            };
            tasks.push(tokio::spawn(async move {
                sched.fire_due(&FireRules::default()).await.unwrap()
            }));
        }
        let mut fired = 0;
        for t in tasks {
            fired += t.await.unwrap().len();
        }
        assert_eq!(fired, 1, "one of the racing schedulers fires the slot");
        w.finish_all().await;
    }
    assert_eq!(w.job_count().await, 12);
    let runs = w.schedules.runs(s.id, 100).await.unwrap();
    assert_eq!(runs.len(), 12);
    assert!(runs.iter().all(|r| r.outcome == RunOutcome::Queued));

    // A daemon restarted with a stale view (its next slot still the one just fired) does not
    // fire that slot again: the (schedule, slot) key is taken.
    let last = runs[0].slot;
    sqlx::query("UPDATE schedules SET next_slot = $1 WHERE id = $2")
        .bind(last)
        .bind(s.id)
        .execute(w.jobs.pool())
        .await
        .unwrap();
    assert!(other.fire_due(&rules()).await.unwrap().is_empty());
    assert_eq!(w.job_count().await, 12);
    let again = w.schedules.get(s.id).await.unwrap().unwrap();
    assert!(again.next_slot > last, "the next slot moved on");
}

#[tokio::test]
async fn a_day_of_downtime_gives_one_catch_up_job() {
    let w = World::new(at("2026-05-04 10:15")).await;
    let hourly = w.add("hourly").await;
    let daily = w.add("daily 03:00").await;
    // The daemon was down from 10:15 until 10:45 the next day.
    w.clock.set(at("2026-05-05 10:45"));
    let fired = w.schedules.fire_due(&rules()).await.unwrap();
    assert_eq!(
        fired.len(),
        2,
        "one job per schedule, not a burst: {fired:?}"
    );
    let h = fired.iter().find(|f| f.schedule_id == hourly.id).unwrap();
    assert_eq!(local(h.slot), "2026-05-05 10:00 CEST", "the latest slot");
    assert!(h.catch_up);
    assert_eq!(h.missed, 23, "11:00 .. 09:00 passed unhandled");
    let d = fired.iter().find(|f| f.schedule_id == daily.id).unwrap();
    assert_eq!(local(d.slot), "2026-05-05 03:00 CEST");
    assert!(!d.catch_up, "no daily slot passed over");
    assert_eq!(w.job_count().await, 2);
    assert!(w.schedules.fire_due(&rules()).await.unwrap().is_empty());
    let s = w.schedules.get(hourly.id).await.unwrap().unwrap();
    assert_eq!(s.missed, 23);
    assert_eq!(local(s.next_slot), "2026-05-05 11:00 CEST");
    // Back to normal at the next slot.
    w.finish_all().await;
    w.clock.set(at("2026-05-05 11:00"));
    let fired = w.schedules.fire_due(&rules()).await.unwrap();
    assert_eq!(fired.len(), 1);
    assert!(!fired[0].catch_up);
}

#[tokio::test]
async fn a_slot_is_skipped_and_counted_while_the_previous_job_runs() {
    let w = World::new(at("2026-05-04 10:15")).await;
    let s = w.add("hourly").await;
    w.clock.set(at("2026-05-04 11:00"));
    let f = w.schedules.fire_due(&rules()).await.unwrap();
    assert_eq!(f[0].outcome, RunOutcome::Queued);
    let (job, lease) = w.jobs.claim("w").await.unwrap().unwrap();
    assert_eq!(job.schedule_id, Some(s.id), "the job names its schedule");
    // The backup is still running at 12:00 and 13:00.
    for t in ["2026-05-04 12:00", "2026-05-04 13:00"] {
        w.clock.set(at(t));
        w.jobs.heartbeat(&lease).await.unwrap();
        let f = w.schedules.fire_due(&rules()).await.unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].outcome, RunOutcome::Skipped, "{t}");
    }
    assert_eq!(w.job_count().await, 1);
    assert_eq!(w.schedules.get(s.id).await.unwrap().unwrap().skipped, 2);
    w.jobs.finish(&lease, &backup_result()).await.unwrap();
    w.clock.set(at("2026-05-04 14:00"));
    let f = w.schedules.fire_due(&rules()).await.unwrap();
    assert_eq!(f[0].outcome, RunOutcome::Queued);
    assert_eq!(w.job_count().await, 2);
}

#[tokio::test]
async fn firing_rechecks_the_rules_and_spreads_jobs_with_jitter() {
    let w = World::new(at("2026-05-04 10:15")).await;
    let s = w.add("hourly").await;
    // The user was removed from the allowed users since the schedule was made.
    let strict = FireRules {
        allowed_users: vec![8],
        ..FireRules::default()
    };
    w.clock.set(at("2026-05-04 11:00"));
    let f = w.schedules.fire_due(&strict).await.unwrap();
    assert_eq!(f[0].outcome, RunOutcome::Refused);
    assert!(
        f[0].detail.as_deref().unwrap().contains("no longer"),
        "{f:?}"
    );
    assert_eq!(w.job_count().await, 0);
    // The folder vanished.
    std::fs::remove_dir(&w.folder).unwrap();
    w.clock.set(at("2026-05-04 12:00"));
    let f = w.schedules.fire_due(&rules()).await.unwrap();
    assert_eq!(f[0].outcome, RunOutcome::Refused);
    assert!(f[0].detail.as_deref().unwrap().contains("does not exist"));
    std::fs::create_dir_all(&w.folder).unwrap();

    // Jitter: each job waits a random time below the bound.
    let w = World::new(at("2026-05-04 10:15")).await;
    for _ in 0..8 {
        w.add("hourly").await;
    }
    let jitter = FireRules {
        jitter_ms: 10 * MIN,
        ..FireRules::default()
    };
    w.clock.set(at("2026-05-04 11:00"));
    let mut delays = Vec::new();
    for f in w.schedules.fire_due(&jitter).await.unwrap() {
        let job = w.jobs.get(f.job_id.unwrap()).await.unwrap().unwrap();
        let delay = job.not_before - at("2026-05-04 11:00");
        assert!((0..10 * MIN).contains(&delay), "{delay}");
        delays.push(delay);
    }
    assert_eq!(delays.len(), 8);
    let first = delays.iter().min().copied().unwrap();
    w.clock.set(at("2026-05-04 11:00") + first);
    assert!(
        w.jobs.claim("w").await.unwrap().is_some(),
        "the earliest is due"
    );
    assert!(
        w.jobs.claim("w").await.unwrap().is_none()
            || delays.iter().filter(|d| **d == first).count() > 1,
        "the others wait for their delay"
    );
    delays.sort();
    delays.dedup();
    assert!(delays.len() > 1, "random delays: {delays:?}");
    let _ = s;
}

#[tokio::test]
async fn repeated_failures_are_grouped_and_recovery_is_told() {
    let w = World::new(at("2026-05-04 10:15")).await;
    let s = w.add("hourly").await;
    let alerts = Alerts::new(w.schedules.clone(), AlertPolicy::default());
    let failed = |a: &[storinator_shared::ops::alerts::Alert]| {
        a.iter()
            .filter(|a| matches!(a.kind, AlertKind::Failed { .. }))
            .cloned()
            .collect::<Vec<_>>()
    };
    let mut told = Vec::new();
    for (i, t) in ["11:00", "12:00", "13:00", "14:00"].iter().enumerate() {
        w.clock.set(at(&format!("2026-05-04 {t}")));
        w.schedules.fire_due(&rules()).await.unwrap();
        let (_, lease) = w.jobs.claim("w").await.unwrap().unwrap();
        w.jobs
            .fail(&lease, &format!("disk full ({})", i + 1), None, false)
            .await
            .unwrap();
        for a in failed(&alerts.pending().await.unwrap()) {
            alerts.ack(&a).await.unwrap();
            told.push(a.kind);
        }
    }
    // One message for the first failure; the next three are held back.
    assert_eq!(told.len(), 1, "{told:?}");
    let AlertKind::Failed { streak, first } = &told[0] else {
        unreachable!()
    };
    assert!(*first);
    assert_eq!(streak.count, 1);
    assert_eq!(streak.last_error, "disk full (1)");
    // A day after the first message: one grouped message for everything since.
    w.clock.set(at("2026-05-05 11:05"));
    let grouped = failed(&alerts.pending().await.unwrap());
    assert_eq!(grouped.len(), 1);
    let AlertKind::Failed { streak, first } = &grouped[0].kind else {
        unreachable!()
    };
    assert!(!first);
    assert_eq!(streak.count, 4);
    assert_eq!(local(streak.since), "2026-05-04 11:00 CEST");
    assert_eq!(streak.last_error, "disk full (4)");
    alerts.ack(&grouped[0]).await.unwrap();
    assert!(failed(&alerts.pending().await.unwrap()).is_empty());
    let st = alerts.status(&s).await.unwrap();
    assert!(
        st.line(&berlin()).contains("failing: 4 times since"),
        "{}",
        st.line(&berlin())
    );
    // A success ends the streak, and says so once.
    w.clock.set(at("2026-05-05 12:00"));
    w.schedules.fire_due(&rules()).await.unwrap();
    w.finish_all().await;
    let back: Vec<_> = alerts
        .pending()
        .await
        .unwrap()
        .into_iter()
        .filter(|a| matches!(a.kind, AlertKind::Recovered { .. }))
        .collect();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].kind, AlertKind::Recovered { failures: 4 });
    alerts.ack(&back[0]).await.unwrap();
    assert!(alerts.pending().await.unwrap().iter().all(|a| !matches!(
        a.kind,
        AlertKind::Recovered { .. } | AlertKind::Failed { .. }
    )));
}
