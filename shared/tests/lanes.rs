//! Mirrored copies in the engine, over two in-memory lanes: a restore reads past a damaged
//! copy (one flipped byte) and heals it; verify and the scrub read every copy, so damage in one
//! copy is found (and healed) even while the other copy would have served every read.

mod common;

use std::sync::Arc;

use common::{PASS, bytes, describe_tree, settings};
use storinator_shared::storage::{Lane, Lanes};
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, KdfParams, MemoryStorage, NoProgress, Repo, RestoreOptions,
    ScrubOptions, Storage,
};

struct Two {
    dir: tempfile::TempDir,
    mem: [Arc<MemoryStorage>; 2],
    repo: Repo,
}

async fn two_lanes() -> Two {
    let dir = tempfile::tempdir().unwrap();
    let mem = [0, 1].map(|i| Arc::new(MemoryStorage::new(dir.path().join(format!("spool{i}")))));
    let lanes = Lanes::new(
        vec![
            Lane::ready("a", mem[0].clone() as Arc<dyn Storage>),
            Lane::ready("b", mem[1].clone() as Arc<dyn Storage>),
        ],
        2,
        dir.path().join("spool"),
    )
    .unwrap();
    let storage: Arc<dyn Storage> = Arc::new(lanes);
    let catalog = Catalog::open(&storinator_testkit::db::url_for(
        &dir.path().join("catalog.db"),
    ))
    .await
    .unwrap();
    Repo::init(
        &catalog,
        storage.as_ref(),
        PASS,
        KdfParams::fast_for_tests(),
    )
    .await
    .unwrap();
    let repo = Repo::open(catalog, storage, PASS, settings())
        .await
        .unwrap();
    let src = dir.path().join("src/data");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..6u64 {
        std::fs::write(src.join(format!("f{i}")), bytes(200 << 10, i)).unwrap();
    }
    backup(&repo, src).await;
    Two { dir, mem, repo }
}

/// An encrypted backup of `src` for `local`.
async fn backup(repo: &Repo, src: std::path::PathBuf) {
    repo.backup(
        &BackupOptions {
            path: src,
            owner: "local".into(),
            encrypt: true,
        },
        &NoProgress,
        &CancelFlag::new(),
    )
    .await
    .unwrap();
}

impl Two {
    fn src(&self) -> std::path::PathBuf {
        self.dir.path().join("src/data")
    }

    async fn restores_identically(&self, to: &str) {
        let out = self.dir.path().join(to);
        self.restore(&self.src(), &out).await;
        assert_eq!(describe_tree(&self.src()), describe_tree(&out.join("data")));
    }

    /// Restores `src` (the path it was backed up from) into `out`.
    async fn restore(&self, src: &std::path::Path, out: &std::path::Path) {
        self.repo
            .restore(
                &RestoreOptions {
                    path: src.to_string_lossy().into_owned(),
                    to: out.to_path_buf(),
                    snapshot: None,
                    owner: "local".into(),
                    overwrite: false,
                    within: None,
                    same_owner: None,
                },
                &NoProgress,
                &CancelFlag::new(),
            )
            .await
            .unwrap();
    }

    /// The packs of lane `i` with their bytes.
    async fn lane_bytes(&self, i: usize, name: &str) -> Vec<u8> {
        let size = self.mem[i]
            .snapshot()
            .into_iter()
            .find(|o| o.0 == name)
            .unwrap()
            .1;
        self.mem[i]
            .get_range(&storinator_shared::ObjectRef::new(name, ""), 0, size as u64)
            .await
            .unwrap()
    }

    /// A scrub reading everything, healing, at `now_ms`.
    async fn scrub(&self, now_ms: i64) -> storinator_shared::ScrubReport {
        self.repo
            .scrub(
                &ScrubOptions {
                    budget: 1 << 30,
                    now_ms,
                    heal: true,
                },
                &NoProgress,
                &CancelFlag::new(),
            )
            .await
            .unwrap()
    }

    async fn first_pack(&self) -> String {
        let p = &self.repo.catalog.packs().await.unwrap()[0];
        format!("{}.enc", p.id)
    }
}

#[tokio::test]
async fn a_restore_reads_past_a_damaged_copy_and_heals_it() {
    let t = two_lanes().await;
    let name = t.first_pack().await;
    let good = t.lane_bytes(1, &name).await;
    assert_eq!(t.lane_bytes(0, &name).await, good, "two identical copies");
    // A byte of the first blob of lane a's copy flips: reads go there first.
    assert!(t.mem[0].corrupt(&name, 40));
    assert_ne!(t.lane_bytes(0, &name).await, good);

    t.restores_identically("out").await;
    assert_eq!(
        t.lane_bytes(0, &name).await,
        good,
        "the damaged copy was stored again"
    );
    let v = t.repo.verify(true, &NoProgress).await.unwrap();
    assert!(v.problems.is_empty(), "{:?}", v.problems);
}

/// Lane a's copy of a pack holds two of its blobs swapped: each authentic (every MAC passes),
/// each another chunk than the catalog says. A restore reads lane a first without checking
/// ids, finds the two files' SHA-256 differ, reads them again checking ids, takes lane b's
/// copy, and stores the good copy in lane a again.
#[tokio::test]
async fn a_copy_holding_authentic_blobs_of_other_chunks_gives_way_and_is_healed() {
    let t = two_lanes().await;
    // Small files of one length (one chunk each, incompressible): blobs of one length.
    let src = t.dir.path().join("src/small");
    std::fs::create_dir_all(&src).unwrap();
    for i in 0..4u64 {
        std::fs::write(src.join(format!("s{i}")), bytes(3000, 100 + i)).unwrap();
    }
    backup(&t.repo, src.clone()).await;
    let blobs: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT p.id, c.\"offset\", c.length FROM chunks c JOIN packs p ON p.no = c.pack_no \
         WHERE c.raw_length = 3000 ORDER BY c.\"offset\"",
    )
    .fetch_all(t.repo.catalog.pool())
    .await
    .unwrap();
    let [(ref pack, a, len), (ref pack_b, b, len_b), ..] = blobs[..] else {
        panic!("the small files' blobs: {blobs:?}")
    };
    assert_eq!((pack, len), (pack_b, len_b), "{blobs:?}");
    let name = format!("{pack}.enc");
    let good = t.lane_bytes(0, &name).await;
    let (a, b, len) = (a as usize, b as usize, len as usize);
    let mut swapped = good.clone();
    swapped[a..a + len].copy_from_slice(&good[b..b + len]);
    swapped[b..b + len].copy_from_slice(&good[a..a + len]);
    t.mem[0].put_bytes(&name, swapped).await.unwrap();

    let out = t.dir.path().join("out-small");
    t.restore(&src, &out).await;
    assert_eq!(describe_tree(&src), describe_tree(&out.join("small")));
    assert_eq!(
        t.lane_bytes(0, &name).await,
        good,
        "the wrong copy was stored again"
    );
}

#[tokio::test]
async fn verify_and_the_scrub_check_every_copy_and_heal_a_bad_one() {
    let t = two_lanes().await;
    let name = t.first_pack().await;
    let good = t.lane_bytes(0, &name).await;

    // Damage in lane b's copy: every read through the lanes would be served by lane a.
    assert!(t.mem[1].corrupt(&name, 40));
    let v = t.repo.verify(true, &NoProgress).await.unwrap();
    assert!(
        v.problems
            .iter()
            .any(|p| p.contains(&name) && p.contains("lane b") && p.contains("stored again")),
        "{:?}",
        v.problems
    );
    assert_eq!(t.lane_bytes(1, &name).await, good, "verify healed it");

    // The same for the scrub, with a copy that went missing.
    t.mem[1]
        .remove(&storinator_shared::ObjectRef::new(&name, ""))
        .await
        .unwrap();
    let r = t.scrub(1_800_000_000_000).await;
    assert!(
        r.copies
            .iter()
            .any(|c| c.contains(&name) && c.contains("lane b")),
        "{r:?}"
    );
    assert!(r.is_clean(), "{r:?}");
    assert_eq!(t.lane_bytes(1, &name).await, good, "the scrub healed it");

    // And damage the scrub reads in one copy only: found, healed, no chunk counted damaged.
    assert!(t.mem[0].corrupt(&name, 40));
    let r = t.scrub(1_800_000_100_000).await;
    assert!(
        r.copies
            .iter()
            .any(|c| c.contains(&name) && c.contains("lane a")),
        "{r:?}"
    );
    assert!(r.findings.is_empty() && r.is_clean(), "{r:?}");
    assert_eq!(t.lane_bytes(0, &name).await, good);
}
