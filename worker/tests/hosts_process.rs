//! Several storage hosts behind one bot, as processes: `storinator-worker run` processes
//! with their own `STORINATOR_HOST` and roots share one job database (SQLite, and again on a
//! throwaway PostgreSQL cluster, the database made for several machines) and one store;
//! the real bot (in-process, against the fake Bot API) routes chat commands by the roots the
//! workers registered. Each host's jobs run on its own workers only, and a worker killed with
//! `kill -9` mid-job leaves its job to another worker of the same host, never to another
//! host's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use storinator_bot::BotConfig;
use storinator_shared::{Catalog, Job, JobArgs, JobState, Jobs};
use storinator_testkit::botapi::{self, FakeBotApi};
use storinator_testkit::fixtures::words;
use storinator_testkit::pg::PgCluster;
use tokio::sync::oneshot;

const USER: i64 = 7;
const WAIT: Duration = Duration::from_secs(90);

struct Site {
    dir: tempfile::TempDir,
    /// The folder under which each host's roots are.
    top: PathBuf,
    db_url: String,
    jobs: Jobs,
    children: Vec<Child>,
    /// The PostgreSQL server of a site on PostgreSQL (stopped after the workers).
    _pg: Option<PgCluster>,
}

#[derive(Clone, Copy)]
enum Db {
    Sqlite,
    Postgres,
}

impl Site {
    /// A database and a store with a key, and the folders: `web1/`, `web2/` (one host each)
    /// and `shared/` (both hosts serve it).
    async fn new(db: Db) -> Site {
        let dir = tempfile::tempdir().unwrap();
        let top = dir.path().canonicalize().unwrap().join("top");
        for d in ["web1/data", "web2/data", "shared/data", "elsewhere"] {
            std::fs::create_dir_all(top.join(d)).unwrap();
        }
        std::fs::write(top.join("web1/data/a.txt"), b"on web1").unwrap();
        std::fs::write(top.join("web2/data/b.txt"), b"on web2").unwrap();
        std::fs::write(top.join("shared/data/c.txt"), b"on both").unwrap();
        let (db_url, pg) = match db {
            Db::Sqlite => (
                format!("sqlite://{}", dir.path().join("storinator.db").display()),
                None,
            ),
            Db::Postgres => {
                let pg = PgCluster::start().unwrap();
                (pg.create_database("storinator").unwrap(), Some(pg))
            }
        };
        let mut site = Site {
            jobs: Jobs::new(Catalog::open(&db_url).await.unwrap().pool().clone()),
            dir,
            top,
            db_url,
            children: Vec::new(),
            _pg: pg,
        };
        let st = site.worker("web1").arg("init").output().unwrap();
        assert!(
            st.status.success(),
            "init: {}",
            String::from_utf8_lossy(&st.stderr)
        );
        site.jobs = Jobs::new(Catalog::open(&site.db_url).await.unwrap().pool().clone());
        site
    }

    /// `storinator-worker` of `host`, serving `top/<host>` and `top/shared`. Workers of one
    /// host share its data folder (spool, run locks), as on one machine.
    fn worker(&self, host: &str) -> Command {
        let data = self.dir.path().join(format!("data-{host}"));
        std::fs::create_dir_all(&data).unwrap();
        let roots = format!(
            "{},{}",
            self.top.join(host).display(),
            self.top.join("shared").display()
        );
        let mut c = Command::new(env!("CARGO_BIN_EXE_storinator-worker"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("STORINATOR_DATA_DIR", &data)
            .env("DATABASE_URL", &self.db_url)
            .env(
                "STORINATOR_STORAGE",
                format!("dir:{}", self.dir.path().join("store").display()),
            )
            .env("STORINATOR_PASSPHRASE", "pw for tests")
            .env("STORINATOR_INSECURE_FAST_KDF", "1")
            .env("STORINATOR_HOST", host)
            .env("STORINATOR_BACKUP_ROOTS", roots)
            .env("STORINATOR_SCRUB_AT", "off")
            .current_dir(self.dir.path());
        c
    }

    /// Starts `storinator-worker run` for `host` with `extra` settings; returns its pid.
    fn run(&mut self, host: &str, extra: &[(&str, &str)]) -> u32 {
        let mut c = self.worker(host);
        for (k, v) in extra {
            c.env(k, v);
        }
        let child = c
            .args(["run", "--concurrency", "1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let pid = child.id();
        self.children.push(child);
        pid
    }

    async fn wait_hosts(&self, n: usize) {
        let deadline = Instant::now() + WAIT;
        while self.jobs.hosts().await.unwrap().len() < n {
            assert!(Instant::now() < deadline, "hosts did not register");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_final(&self, id: i64) -> Job {
        let deadline = Instant::now() + WAIT;
        loop {
            let j = self.jobs.get(id).await.unwrap().unwrap();
            if j.state.is_final() {
                return j;
            }
            assert!(Instant::now() < deadline, "job not finished: {j:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn path(&self, p: &str) -> String {
        self.top.join(p).display().to_string()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -{sig} {pid}");
}

/// The host a job ran on, from its lease (`<host>-<pid>`).
fn ran_on(j: &Job) -> &str {
    let owner = j.lease_owner.as_deref().expect("leased");
    owner.rsplit_once('-').expect("<host>-<pid>").0
}

async fn start_bot(
    api: &FakeBotApi,
    site: &Site,
) -> (
    oneshot::Sender<()>,
    tokio::task::JoinHandle<anyhow::Result<()>>,
) {
    let vars = [
        (
            "TELOXIDE_TOKEN",
            "110201543:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw".to_string(),
        ),
        ("TELOXIDE_API_URL", api.url()),
        ("STORINATOR_ALLOWED_USERS", USER.to_string()),
        ("STORINATOR_BACKUP_ROOTS", site.top.display().to_string()),
        ("DATABASE_URL", site.db_url.clone()),
        ("STORINATOR_DATA_DIR", site.dir.path().display().to_string()),
        ("STORINATOR_BOT_EDIT_INTERVAL_MS", "150".into()),
        ("STORINATOR_BOT_TICK_MS", "50".into()),
        ("STORINATOR_BOT_POLL_TIMEOUT_S", "1".into()),
    ];
    let mut cfg =
        BotConfig::from_lookup(|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()))
            .unwrap();
    cfg.limits = storinator_bot::Limits::telegram().faster(5);
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(storinator_bot::run(cfg, async move {
        let _ = rx.await;
    }));
    api.wait_for(WAIT, |a| {
        (!a.calls_of("getUpdates").is_empty()).then_some(())
    })
    .await
    .expect("bot polls");
    (tx, task)
}

/// Sends `text` and returns the bot's first message after it that answers it: an earlier
/// job's final notice ("✅ Backup #3 done: …") can go out between the command and its answer,
/// since the jobs run on their own hosts meanwhile.
async fn ask(api: &FakeBotApi, text: &str) -> String {
    let before = api.bot_messages(USER).len();
    api.push_message(USER, USER, text);
    api.wait_for(WAIT, |a| {
        a.bot_messages(USER)
            .into_iter()
            .skip(before)
            // As first sent: a progress message's last edit reads like a final notice.
            .find(|m| !is_final_notice(m.edits.first().unwrap_or(&m.text)))
    })
    .await
    .unwrap_or_else(|| panic!("no answer to {text}"))
    .text
}

/// Whether a bot message is a job's final notice (`render::final_notice`): "✅ Backup #3
/// done: …", "❌ Restore #4 failed: …", "🛑 Verify #5 cancelled.".
fn is_final_notice(text: &str) -> bool {
    let Some(rest) = ["✅ ", "❌ ", "🛑 "]
        .iter()
        .find_map(|mark| text.strip_prefix(mark))
    else {
        return false;
    };
    let Some((kind, tail)) = rest.split_once(" #") else {
        return false;
    };
    let after_id = tail.trim_start_matches(|c: char| c.is_ascii_digit());
    [
        "Backup", "Restore", "Verify", "File", "Scrub", "Forget", "Prune",
    ]
    .contains(&kind)
        && after_id.len() < tail.len()
        && [" done", " failed", " cancelled"]
            .iter()
            .any(|end| after_id.starts_with(end))
}

#[test]
fn final_notices_are_told_from_answers() {
    assert!(is_final_notice("✅ Backup #3 done: snapshot ab12, 2 files"));
    assert!(is_final_notice("❌ Backup #12 failed: outside the folders"));
    assert!(is_final_notice("🛑 Verify #5 cancelled."));
    assert!(!is_final_notice("❌ no storage host serves /x"));
    assert!(!is_final_notice("⏳ Backup #3 queued"));
    assert!(!is_final_notice("✅ Backup # done"));
}

/// The newest job of the user (the one a command just queued).
async fn newest(site: &Site) -> Job {
    site.jobs
        .list_for_user(USER, 1)
        .await
        .unwrap()
        .pop()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_bot_two_hosts_each_hosts_jobs_run_on_its_own_worker() {
    one_bot_two_hosts(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_one_bot_two_hosts_each_hosts_jobs_run_on_its_own_worker() {
    one_bot_two_hosts(Db::Postgres).await;
}

async fn one_bot_two_hosts(db: Db) {
    let mut site = Site::new(db).await;
    let api = FakeBotApi::start_with(botapi::Limits::telegram().faster(5))
        .await
        .unwrap();
    let (stop_bot, bot) = start_bot(&api, &site).await;
    site.run("web1", &[]);
    site.run("web2", &[]);
    site.wait_hosts(2).await;

    let hosts = ask(&api, "/hosts").await;
    assert!(hosts.contains("Storage hosts (2)"), "{hosts}");
    for (h, root) in [("web1", "web1"), ("web2", "web2")] {
        let line = hosts
            .lines()
            .find(|l| l.starts_with(&format!("• {h} ")))
            .unwrap_or_else(|| panic!("{hosts}"));
        assert!(line.contains(&site.path(root)), "{line}");
        assert!(line.contains(&site.path("shared")), "{line}");
        assert!(line.contains("seen "), "{line}");
    }

    // Each host's own folder goes to that host, without naming it.
    let mut ran = Vec::new();
    for host in ["web1", "web2"] {
        let text = ask(
            &api,
            &format!("/backup {}", site.path(&format!("{host}/data"))),
        )
        .await;
        assert!(!text.contains("🚫"), "{text}");
        let job = newest(&site).await;
        assert_eq!(job.host.as_deref(), Some(host));
        ran.push(job.id);
    }
    // A folder both serve: the user must say which, and then it goes there.
    let shared = site.path("shared/data");
    let text = ask(&api, &format!("/backup {shared}")).await;
    assert!(
        text.contains(&format!("{shared} is on 2 hosts: web1, web2")),
        "{text}"
    );
    assert!(text.contains(&format!("web1:{shared}")), "{text}");
    let before = newest(&site).await.id;
    ask(&api, &format!("/backup web2:{shared}")).await;
    let job = newest(&site).await;
    assert!(job.id > before);
    assert_eq!(job.host.as_deref(), Some("web2"));
    ran.push(job.id);
    // A folder no host serves, named with the hosts that exist.
    let nowhere = site.path("elsewhere");
    let text = ask(&api, &format!("/backup {nowhere}")).await;
    assert!(
        text.contains(&format!("no storage host serves {nowhere}")),
        "{text}"
    );
    assert!(text.contains("web1 (") && text.contains("web2 ("), "{text}");

    for id in &ran {
        let j = site.wait_final(*id).await;
        assert_eq!(j.state, JobState::Done, "{j:?}");
        assert_eq!(ran_on(&j), j.host.as_deref().unwrap(), "{j:?}");
    }

    // A job that reached the wrong host anyway (a stale route) is refused by its worker,
    // which checks the folder against its own roots.
    let stray = site
        .jobs
        .enqueue_on(
            USER,
            USER,
            &JobArgs::Backup {
                path: site.path("web1/data"),
                encrypt: true,
            },
            Some("web2"),
        )
        .await
        .unwrap();
    let j = site.wait_final(stray.id).await;
    assert_eq!(j.state, JobState::Failed, "{j:?}");
    assert!(
        j.error
            .as_deref()
            .is_some_and(|e| e.contains("outside the folders I may back up")),
        "{j:?}"
    );

    // The command line lists the same hosts.
    let out = site
        .worker("web1")
        .args(["hosts", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web1", "web2"]);
    assert_eq!(
        listed[1]["backup_roots"],
        serde_json::json!([site.path("shared"), site.path("web2")])
    );
    let out = site.worker("web1").arg("hosts").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.starts_with("web2 ") && l.contains(" s ago")),
        "{text}"
    );
    let out = site
        .worker("web1")
        .args(["hosts", "--forget", "web9"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no storage host is called web9"), "{err}");

    // A restore of web2's folder runs on web2 and writes there.
    let back = site.path("web2/back");
    let text = ask(
        &api,
        &format!("/restore {} to {back}", site.path("web2/data")),
    )
    .await;
    assert!(!text.contains("🚫"), "{text}");
    let job = newest(&site).await;
    assert_eq!(job.host.as_deref(), Some("web2"));
    let j = site.wait_final(job.id).await;
    assert_eq!(j.state, JobState::Done, "{j:?}");
    assert_eq!(ran_on(&j), "web2");
    assert_eq!(
        std::fs::read(Path::new(&back).join("data/b.txt")).unwrap(),
        b"on web2"
    );

    let _ = stop_bot.send(());
    tokio::time::timeout(Duration::from_secs(10), bot)
        .await
        .expect("bot stops")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_job_leaves_it_to_its_own_host() {
    killed_mid_job(Db::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_worker_killed_mid_job_leaves_it_to_its_own_host() {
    killed_mid_job(Db::Postgres).await;
}

async fn killed_mid_job(db: Db) {
    let mut site = Site::new(db).await;
    let src = site.top.join("web1/big");
    std::fs::create_dir_all(&src).unwrap();
    // Twelve one-chunk files, each in a pack of its own (64 KiB packs).
    for i in 0..12u64 {
        std::fs::write(src.join(format!("part{i:02}.txt")), words(i, 250_000)).unwrap();
    }
    let slow = [
        ("STORINATOR_PACK_SIZE", "64KiB"),
        ("STORINATOR_COMPRESSION", "zstd:19"),
    ];
    let job = site
        .jobs
        .enqueue_on(
            USER,
            USER,
            &JobArgs::Backup {
                path: src.display().to_string(),
                encrypt: true,
            },
            Some("web1"),
        )
        .await
        .unwrap();
    // web2's worker is up all along; web1's first worker takes the job.
    site.run("web2", &slow);
    site.wait_hosts(1).await;
    let a1 = site.run("web1", &slow);
    let store = site.dir.path().join("store");
    let packs = || {
        std::fs::read_dir(&store)
            .map(|d| {
                d.filter(|e| {
                    let n = e.as_ref().unwrap().file_name();
                    let n = n.to_string_lossy();
                    n.ends_with(".enc") && !n.starts_with("key-")
                })
                .count()
            })
            .unwrap_or(0)
    };
    // Catch it with packs stored and more to come, freeze it there, and kill it.
    let deadline = Instant::now() + WAIT;
    while packs() < 2 {
        assert!(Instant::now() < deadline, "no packs uploaded");
        std::thread::sleep(Duration::from_millis(2));
    }
    signal(a1, "STOP");
    let j = site.jobs.get(job.id).await.unwrap().unwrap();
    assert_eq!(j.state, JobState::Running, "caught mid-job: {j:?}");
    assert_eq!(ran_on(&j), "web1");
    signal(a1, "KILL");

    // The lease is the daemon's 30 s: rather than wait it out, end it now, as time would.
    // Then web2's worker, polling every second, must still leave the job alone.
    sqlx::query("UPDATE jobs SET lease_until = 0 WHERE id = $1")
        .bind(job.id)
        .execute(site.jobs.pool())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let j = site.jobs.get(job.id).await.unwrap().unwrap();
    assert_eq!(
        (j.state, j.attempt, j.lease_owner.clone()),
        (JobState::Running, 1, Some(format!("web1-{a1}"))),
        "another host's worker took the job of a dead worker: {j:?}"
    );
    // Another worker of web1 resumes it.
    let a2 = site.run("web1", &[]);
    let j = site.wait_final(job.id).await;
    assert_eq!(j.state, JobState::Done, "{j:?}");
    assert_eq!(j.attempt, 2);
    assert_eq!(j.lease_owner, Some(format!("web1-{a2}")));
    let snaps = storinator_shared::list_snapshots(
        &Catalog::open(&site.db_url).await.unwrap(),
        "tg:7",
        Some(&src.display().to_string()),
    )
    .await
    .unwrap();
    assert_eq!(snaps.len(), 1, "{snaps:?}");
    assert_eq!(snaps[0].files, 12);
}
