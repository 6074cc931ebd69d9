//! The canary in the daemon: with two lanes (folders) and two copies, every lane is probed when
//! the daemon starts and again once a day by the manual clock (not before); a lane that lost a
//! pack, then one that stops answering (its folder gone), gets an alert naming it, each told
//! once; the lost copy is stored again. Waits are bounded.

use std::sync::Arc;
use std::time::Duration;

use jiff::tz::TimeZone;
use storinator_shared::catalog::{LaneHealth, LaneState};
use storinator_shared::ops::alerts::{AlertPolicy, Alerts};
use storinator_shared::ops::rules::FireRules;
use storinator_shared::storage::{Lane, Lanes};
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, ChunkerParams, DirStorage, EngineSettings, Jobs, KdfParams,
    ManualClock, NoProgress, Repo, Schedules, Storage,
};
use storinator_worker::daemon::{self, DaemonConfig, Unattended};

const PASS: &str = "pw";
const DAY: i64 = 24 * 3_600_000;
const START: i64 = 1_800_000_000_000;

fn lanes(dir: &std::path::Path) -> Arc<dyn Storage> {
    let lane = |n: &str| {
        let s: Arc<dyn Storage> =
            Arc::new(DirStorage::open(dir.join(format!("lane-{n}"))).unwrap());
        Lane::ready(n, s)
    };
    Arc::new(Lanes::new(vec![lane("a"), lane("b")], 2, dir.join("spool")).unwrap())
}

/// Waits until the lanes' recorded health satisfies `ok`.
async fn wait_for(catalog: &Catalog, what: &str, ok: impl Fn(&[LaneHealth]) -> bool) {
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let h = catalog.lane_health().await.unwrap();
            if ok(&h) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let h = catalog.lane_health().await.unwrap();
    assert!(waited.is_ok(), "{what}: {h:?}");
}

fn state(h: &[LaneHealth], lane: &str) -> Option<(LaneState, i64)> {
    h.iter()
        .find(|x| x.probe.lane == lane)
        .map(|x| (x.probe.state, x.checked_at))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_probes_each_lane_daily_and_a_lost_or_silent_lane_is_alerted_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src/data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4u8 {
        std::fs::write(src.join(format!("f{i}")), vec![i; 90_000]).unwrap();
    }
    let db = format!("sqlite://{}", d.join("st.db").display());
    let catalog = Catalog::open(&db).await.unwrap();
    let storage = lanes(d);
    Repo::init(
        &catalog,
        storage.as_ref(),
        PASS,
        KdfParams::fast_for_tests(),
    )
    .await
    .unwrap();
    let settings = EngineSettings {
        pack_size: 64 * 1024,
        chunker: ChunkerParams::small(),
        threads: 1,
        ..EngineSettings::default()
    };
    let repo = Repo::open(catalog.clone(), storage, PASS, settings)
        .await
        .unwrap();
    repo.backup(
        &BackupOptions {
            path: src.clone(),
            owner: "local".into(),
            encrypt: true,
        },
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
    .unwrap();

    let clock = ManualClock::new(START);
    let jobs = Jobs::new(catalog.pool().clone()).with_clock(Arc::new(clock.clone()));
    let schedules = Schedules::new(jobs.clone(), TimeZone::UTC);
    let alerts = Alerts::new(schedules.clone(), AlertPolicy::default());
    let unattended = Unattended {
        schedules,
        rules: FireRules {
            backup_roots: vec![d.to_path_buf()],
            allowed_users: vec![7],
            jitter_ms: 0,
            host: None,
        },
        tick: Duration::from_millis(20),
        healthcheck: None,
        scrub_at: None,
        scrub_bytes: 1 << 20,
        canary: true,
    };
    let cfg = DaemonConfig {
        worker_id: "w".into(),
        poll_interval: Duration::from_millis(20),
        ..Default::default()
    };
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(daemon::run_with(
        Arc::new(repo),
        jobs,
        cfg,
        Some(unattended),
        async move {
            let _ = rx.await;
        },
    ));

    // At start: both lanes probed, both well; nothing to tell.
    wait_for(&catalog, "first probe", |h| {
        state(h, "a") == Some((LaneState::Ok, START))
            && state(h, "b") == Some((LaneState::Ok, START))
    })
    .await;
    assert!(alerts.lane_alerts().await.unwrap().is_empty());

    // Lane b loses a pack. Not a day yet: no probe.
    let pack = std::fs::read_dir(d.join("lane-b"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.ends_with(".enc") && !n.starts_with("key-"))
        .unwrap();
    std::fs::remove_file(d.join("lane-b").join(&pack)).unwrap();
    clock.set(START + DAY - 60_000);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let h = catalog.lane_health().await.unwrap();
    assert_eq!(state(&h, "b"), Some((LaneState::Ok, START)), "{h:?}");

    // A day on: lane b is found short of the pack, told once, and the copy is stored again.
    clock.set(START + DAY);
    wait_for(&catalog, "second probe", |h| {
        state(h, "b") == Some((LaneState::Lost, START + DAY))
    })
    .await;
    let told = alerts.lane_alerts().await.unwrap();
    assert_eq!(told.len(), 1, "{told:?}");
    assert_eq!(told[0].probe.lane, "b");
    assert_eq!(told[0].probe.missing, 1);
    alerts.ack_lane(&told[0]).await.unwrap();
    assert!(alerts.lane_alerts().await.unwrap().is_empty(), "told once");
    // The probe's finding is recorded first, then the copy is healed: wait for the heal.
    let healed = d.join("lane-b").join(&pack);
    let waited = tokio::time::timeout(Duration::from_secs(30), async {
        while !healed.exists() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "the lost copy healed");

    // Lane a stops answering (its folder is gone); lane b is whole again.
    std::fs::remove_dir_all(d.join("lane-a")).unwrap();
    clock.set(START + 2 * DAY);
    wait_for(&catalog, "third probe", |h| {
        state(h, "a") == Some((LaneState::Silent, START + 2 * DAY))
            && state(h, "b") == Some((LaneState::Ok, START + 2 * DAY))
    })
    .await;
    let told = alerts.lane_alerts().await.unwrap();
    let lanes: Vec<(&str, LaneState)> = told
        .iter()
        .map(|t| (t.probe.lane.as_str(), t.probe.state))
        .collect();
    assert_eq!(
        lanes,
        vec![("a", LaneState::Silent), ("b", LaneState::Ok)],
        "{told:?}"
    );

    let _ = tx.send(());
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("daemon stops")
        .unwrap()
        .unwrap();
}
