//! Lanes over two loopback Telegram accounts (two servers): each pack mirrored in both with
//! STORINATOR_COPIES=2, one account deleted, the restore read from the other and byte-identical,
//! the canary's alert naming the lost lane, `recover` from the surviving lane alone; a copy lost
//! behind the client's back healed by a restore; two backups at once spread over two lanes.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use storinator_shared::catalog::LaneState;
use storinator_shared::engine::canary;
use storinator_shared::ops::alerts::{AlertPolicy, Alerts};
use storinator_shared::ops::schedules::Schedules;
use storinator_shared::storage::Lanes;
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, ChunkerParams, Config, EngineSettings, Jobs, KdfParams,
    NoProgress, Repo, RestoreOptions, Storage,
};
use storinator_testkit::fixtures::{bytes, describe_tree, make_tree};
use storinator_testkit::mtproto::{LoopbackOptions, LoopbackTelegram};

const PASS: &str = "loopback passphrase";
const DAY_MS: i64 = 24 * 60 * 60 * 1000;

struct Env {
    a: LoopbackTelegram,
    b: LoopbackTelegram,
    dir: tempfile::TempDir,
}

impl Env {
    async fn start() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let a = LoopbackTelegram::start(LoopbackOptions::default())
            .await
            .unwrap();
        let b = LoopbackTelegram::start(LoopbackOptions::default())
            .await
            .unwrap();
        a.write_session(&dir.path().join("a.session")).unwrap();
        b.write_session(&dir.path().join("b.session")).unwrap();
        Env { a, b, dir }
    }

    /// The worker's configuration with `storage` as STORINATOR_STORAGE (`{dir}` is the test's
    /// folder).
    fn config(&self, storage: &str, copies: usize) -> Config {
        let storage = storage.replace("{dir}", &self.dir.path().to_string_lossy());
        let vars: HashMap<&str, String> = [
            (
                "STORINATOR_DATA_DIR",
                self.dir.path().join("data").to_string_lossy().into_owned(),
            ),
            ("STORINATOR_STORAGE", storage),
            ("STORINATOR_COPIES", copies.to_string()),
            ("TELEGRAM_API_ID", "1".into()),
            (
                "TELEGRAM_API_HASH",
                "00112233445566778899aabbccddeeff".into(),
            ),
            ("STORINATOR_TELEGRAM_TIMEOUT_SECS", "5".into()),
        ]
        .into_iter()
        .collect();
        Config::from_lookup(|k| vars.get(k).cloned()).unwrap()
    }

    async fn repo(&self, storage: Arc<dyn Storage>, db: &str, init: bool) -> Repo {
        let catalog = Catalog::open_file(&self.dir.path().join(db)).await.unwrap();
        if init {
            Repo::init(
                &catalog,
                storage.as_ref(),
                PASS,
                KdfParams::fast_for_tests(),
            )
            .await
            .unwrap();
        }
        Repo::open(catalog, storage, PASS, settings())
            .await
            .unwrap()
    }
}

fn settings() -> EngineSettings {
    EngineSettings {
        pack_size: 1 << 20,
        compression: Some(1),
        chunker: ChunkerParams::small(),
        threads: 2,
        hostname: "test".into(),
    }
}

fn backup(src: &Path) -> BackupOptions {
    BackupOptions {
        path: src.to_path_buf(),
        owner: "local".into(),
        encrypt: true,
    }
}

fn restore(src: &Path, to: &Path) -> RestoreOptions {
    RestoreOptions {
        path: src.to_string_lossy().into_owned(),
        to: to.to_path_buf(),
        snapshot: None,
        owner: "local".into(),
        overwrite: false,
        within: None,
        same_owner: None,
    }
}

async fn bounded<T>(secs: u64, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test took too long")
}

fn tree(root: &Path, seed: u64) {
    make_tree(root);
    std::fs::write(root.join("big.bin"), bytes(3 << 20, seed)).unwrap();
}

/// Names of the documents a loopback account holds.
fn documents(server: &LoopbackTelegram) -> BTreeSet<String> {
    server.documents().into_iter().map(|d| d.2).collect()
}

async fn restores_identically(repo: &Repo, src: &Path, out: &Path) {
    let _ = std::fs::remove_dir_all(out);
    repo.restore(&restore(src, out), &NoProgress, &CancelFlag::new())
        .await
        .unwrap();
    assert_eq!(describe_tree(src), describe_tree(&out.join("data")));
}

async fn pack_names(repo: &Repo) -> BTreeSet<String> {
    repo.catalog
        .packs()
        .await
        .unwrap()
        .into_iter()
        .map(|p| format!("{}.enc", p.id))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_copies_survive_a_deleted_account_and_recover_works_from_the_other_lane() {
    bounded(180, async {
        let env = Env::start().await;
        let cfg = env.config("a=telegram:{dir}/a.session,b=telegram:{dir}/b.session", 2);
        let storage = storinator_worker::lanes::open(&cfg).await.unwrap();
        let repo = env.repo(storage.clone(), "catalog.db", true).await;
        let src = env.dir.path().join("src/data");
        tree(&src, 1);
        let s = repo
            .backup(&backup(&src), &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        assert!(s.packs >= 3, "{} packs", s.packs);

        // Every pack is in both accounts, and the catalog records both lanes.
        let lanes = storage.as_lanes().expect("two lanes");
        let packs = pack_names(&repo).await;
        for p in repo.catalog.packs().await.unwrap() {
            let in_lanes: Vec<String> = lanes
                .copies_in(&p.location)
                .into_iter()
                .map(|c| c.lane)
                .collect();
            assert_eq!(in_lanes, ["a", "b"], "{}", p.location);
        }
        for server in [&env.a, &env.b] {
            let docs = documents(server);
            assert!(packs.is_subset(&docs), "{packs:?} vs {docs:?}");
            assert!(docs.iter().any(|d| d.starts_with("key-")), "{docs:?}");
        }
        let v = repo.verify(true, &NoProgress).await.unwrap();
        assert!(v.problems.is_empty(), "{:?}", v.problems);

        // The canary: both lanes answer; a first "ok" is no news.
        let now = 1_800_000_000_000;
        let probes = canary::probe(&repo, now).await.unwrap();
        assert!(
            probes.iter().all(|p| p.state == LaneState::Ok),
            "{probes:?}"
        );
        let alerts = Alerts::new(
            Schedules::new(
                Jobs::new(repo.catalog.pool().clone()),
                jiff::tz::TimeZone::UTC,
            ),
            AlertPolicy::default(),
        );
        assert!(alerts.lane_alerts().await.unwrap().is_empty());
        assert!(!canary::due(&repo, now + DAY_MS - 1).await.unwrap());
        assert!(canary::due(&repo, now + DAY_MS).await.unwrap());

        // Account a is deleted (banned): nothing is lost.
        env.a.delete_account();
        restores_identically(&repo, &src, &env.dir.path().join("out1")).await;

        // The next daily probe finds lane a silent, and the bot has an alert naming it.
        let probes = canary::probe(&repo, now + DAY_MS).await.unwrap();
        let a = probes.iter().find(|p| p.lane == "a").unwrap();
        assert_eq!(a.state, LaneState::Silent, "{a:?}");
        assert!(a.detail.contains("USER_DEACTIVATED"), "{a:?}");
        let told = alerts.lane_alerts().await.unwrap();
        assert_eq!(told.len(), 1, "{told:?}");
        assert_eq!(told[0].probe.lane, "a");
        alerts.ack_lane(&told[0]).await.unwrap();
        assert!(alerts.lane_alerts().await.unwrap().is_empty(), "told once");

        // verify names the lane whose copies are gone.
        let v = repo.verify(false, &NoProgress).await.unwrap();
        assert!(
            v.problems.iter().any(|p| p.contains("lane a")),
            "{:?}",
            v.problems
        );

        // A new process configured with both lanes still opens (lane a is connected lazily)
        // and restores.
        let again = storinator_worker::lanes::open(&cfg).await.unwrap();
        let repo2 = env.repo(again, "catalog.db", false).await;
        restores_identically(&repo2, &src, &env.dir.path().join("out2")).await;

        // recover from the surviving lane alone: a new catalog, STORINATOR_STORAGE = b only.
        let only_b = env.config("telegram:{dir}/b.session", 1);
        let storage_b = storinator_worker::lanes::open(&only_b).await.unwrap();
        assert!(
            storage_b.as_lanes().is_none(),
            "one lane is the plain backend"
        );
        let catalog = Catalog::open_file(&env.dir.path().join("recovered.db"))
            .await
            .unwrap();
        let (recovered, report) =
            storinator_shared::recover(catalog, storage_b, PASS, settings(), &NoProgress)
                .await
                .unwrap();
        assert_eq!(report.packs as usize, packs.len(), "{report:?}");
        restores_identically(&recovered, &src, &env.dir.path().join("out3")).await;

        env.a.shutdown().await;
        env.b.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_lost_in_one_lane_is_read_from_the_other_and_healed() {
    bounded(120, async {
        let env = Env::start().await;
        let cfg = env.config("a=telegram:{dir}/a.session,b=telegram:{dir}/b.session", 2);
        let storage = storinator_worker::lanes::open(&cfg).await.unwrap();
        let repo = env.repo(storage.clone(), "catalog.db", true).await;
        let src = env.dir.path().join("src/data");
        tree(&src, 2);
        repo.backup(&backup(&src), &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        let packs = pack_names(&repo).await;
        // Lane a loses two packs behind the client's back.
        let lost: Vec<&String> = packs.iter().take(2).collect();
        for name in &lost {
            assert!(env.a.delete_document_named(name), "{name}");
        }
        assert!(!documents(&env.a).contains(lost[0].as_str()));

        restores_identically(&repo, &src, &env.dir.path().join("out")).await;
        // The restore stored the lost copies again in lane a, and the catalog knows where.
        let docs = documents(&env.a);
        for name in &lost {
            assert!(docs.contains(name.as_str()), "{name} healed into lane a");
        }
        let lanes = storage.as_lanes().unwrap();
        for p in repo.catalog.packs().await.unwrap() {
            let copies = lanes.copies_in(&p.location);
            assert_eq!(copies.len(), 2, "{}", p.location);
        }
        let v = repo.verify(true, &NoProgress).await.unwrap();
        assert!(v.problems.is_empty(), "{:?}", v.problems);

        // The canary finds a lost copy too, says so, and heals it.
        let name = packs.iter().nth(2).unwrap();
        assert!(env.b.delete_document_named(name));
        let probes = canary::probe(&repo, 1_800_000_000_000).await.unwrap();
        let b = probes.iter().find(|p| p.lane == "b").unwrap();
        assert_eq!((b.state, b.missing), (LaneState::Lost, 1), "{b:?}");
        assert!(documents(&env.b).contains(name.as_str()), "healed");

        env.a.shutdown().await;
        env.b.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backups_at_once_spread_over_two_lanes() {
    bounded(120, async {
        let env = Env::start().await;
        let cfg = env.config("a=telegram:{dir}/a.session,b=telegram:{dir}/b.session", 1);
        let storage = storinator_worker::lanes::open(&cfg).await.unwrap();
        // Two packs at once on each of the two Telegram lanes.
        assert_eq!(storage.parallel_uploads(), 4);
        let repo = env.repo(storage.clone(), "catalog.db", true).await;
        let (src1, src2) = (
            env.dir.path().join("one/data"),
            env.dir.path().join("two/data"),
        );
        tree(&src1, 3);
        tree(&src2, 4);
        let cancel = CancelFlag::new();
        let (o1, o2) = (backup(&src1), backup(&src2));
        let (r1, r2) = tokio::join!(
            repo.backup(&o1, &NoProgress, &cancel),
            repo.backup(&o2, &NoProgress, &cancel)
        );
        let (r1, r2) = (r1.unwrap(), r2.unwrap());
        assert!(r1.packs + r2.packs >= 6, "{} + {}", r1.packs, r2.packs);

        // One copy each, in one lane or the other; both lanes took packs.
        let lanes = storage.as_lanes().unwrap();
        let mut per_lane: HashMap<String, usize> = HashMap::new();
        for p in repo.catalog.packs().await.unwrap() {
            let copies = lanes.copies_in(&p.location);
            assert_eq!(copies.len(), 1, "{}", p.location);
            *per_lane.entry(copies[0].lane.clone()).or_default() += 1;
        }
        assert!(
            per_lane.get("a").copied().unwrap_or(0) >= 2
                && per_lane.get("b").copied().unwrap_or(0) >= 2,
            "{per_lane:?}"
        );
        restores_identically(&repo, &src1, &env.dir.path().join("out1")).await;
        restores_identically(&repo, &src2, &env.dir.path().join("out2")).await;
        let v = repo.verify(true, &NoProgress).await.unwrap();
        assert!(v.problems.is_empty(), "{:?}", v.problems);
        let _: &Lanes = lanes;

        env.a.shutdown().await;
        env.b.shutdown().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_prefers_the_lane_with_headroom() {
    bounded(120, async {
        let env = Env::start().await;
        // Account a is capped at 1 MB/s; b is not.
        env.a.set_bandwidth(Some(1_000_000));
        let cfg = env.config("a=telegram:{dir}/a.session,b=telegram:{dir}/b.session", 1);
        let storage = storinator_worker::lanes::open(&cfg).await.unwrap();
        let repo = env.repo(storage.clone(), "catalog.db", true).await;
        let src = env.dir.path().join("src/data");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::write(src.join("big.bin"), bytes(8 << 20, 9)).unwrap();
        repo.backup(&backup(&src), &NoProgress, &CancelFlag::new())
            .await
            .unwrap();
        let lanes = storage.as_lanes().unwrap();
        let mut per_lane: HashMap<String, usize> = HashMap::new();
        for p in repo.catalog.packs().await.unwrap() {
            for c in lanes.copies_in(&p.location) {
                *per_lane.entry(c.lane).or_default() += 1;
            }
        }
        let (a, b) = (
            per_lane.get("a").copied().unwrap_or(0),
            per_lane.get("b").copied().unwrap_or(0),
        );
        assert!(a + b >= 8, "{per_lane:?}");
        assert!(
            b >= 3 * a.max(1),
            "the uncapped lane takes most packs: {per_lane:?}"
        );
        restores_identically(&repo, &src, &env.dir.path().join("out")).await;
        env.a.shutdown().await;
        env.b.shutdown().await;
    })
    .await;
}
