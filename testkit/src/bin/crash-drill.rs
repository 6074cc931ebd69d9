//! The crash drill: `kill -9` the release worker at random points of its operations, resume,
//! and check that nothing was lost or leaked.
//!
//! ```text
//! cargo build --release -p storinator-worker -p storinator-testkit
//! target/release/crash-drill --store dir --kills backup=30,restore=10,verify=10,recover=10
//! target/release/crash-drill --store telegram --kills backup=30,restore=10,verify=10,recover=10
//! target/release/crash-drill --store dir --kills prune=20
//! target/release/crash-drill --db postgres --store dir --kills backup=15,prune=15
//! ```
//!
//! For every operation, the first run is a clean one that measures how long the operation
//! takes; then each cycle starts it again, kills it with SIGKILL after a random part of that
//! time, runs it again to completion and checks:
//!
//! - a restore of the latest snapshot is identical to the source (content, modes, mtimes);
//! - `verify --read-data` is clean (every chunk authenticates, no object in storage that the
//!   catalog does not know, no unfinished pack left by a dead run);
//! - no orphan objects: storage holds exactly the catalog's packs and the key;
//! - no temporary files: the spool is empty, no restore temporary is left in any target;
//! - stored bytes did not grow beyond one pack per kill, against a reference repository that
//!   received the same changes and backups without kills (same key, so the same chunks).
//!
//! `prune` cycles first make garbage (a changed tree, a backup, `forget --keep-last 2`), so
//! each prune has packs to delete and packs to repack; after each resume every remaining
//! snapshot restores identical to the tree it was taken of, and nothing is left to free. At
//! the end a final prune runs, and storage and catalog must agree with nothing left to free.
//!
//! A kill that came after the process had already finished is counted as missed and the
//! cycle is run again, up to three times the kills asked for. The exit code is 0 only when
//! every check held. A new operation is one more entry in [`OPS`].
//!
//! The catalogs are SQLite files by default; `--db postgres` puts each in a database of its
//! own on a throwaway PostgreSQL cluster that the drill starts (see [`Catalogs`]) and stops at
//! its end, or at SIGINT, SIGTERM or SIGHUP (a drill killed with SIGKILL leaves it to be
//! reaped by the next cluster start on the machine).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use sha2::Digest;
use storinator_testkit::pg::PgCluster;

#[derive(Parser)]
#[command(about = "kill -9 the storinator worker at random points and check what it leaves")]
struct Args {
    /// Where packs go: `dir` (a directory store) or `telegram` (the loopback Telegram).
    #[arg(long, default_value = "dir")]
    store: String,
    /// Where the catalogs live: `sqlite` (files in the work dir) or `postgres` (databases of
    /// a throwaway cluster the drill starts; `--keep` does not keep them).
    #[arg(long, value_enum, default_value_t = DbKind::Sqlite)]
    db: DbKind,
    /// Kills per operation, e.g. `backup=30,restore=10,verify=10,recover=10,prune=20`.
    #[arg(
        long,
        default_value = "backup=30,restore=10,verify=10,recover=10,prune=20"
    )]
    kills: String,
    /// The worker binary (default: `storinator-worker` next to this program).
    #[arg(long)]
    worker: Option<PathBuf>,
    /// The loopback Telegram binary (default: `loopback-telegram` next to this program).
    #[arg(long)]
    loopback: Option<PathBuf>,
    /// Size of the source tree, MiB.
    #[arg(long, default_value_t = 16)]
    mib: u64,
    /// New data per backup cycle, MiB.
    #[arg(long, default_value_t = 4)]
    change_mib: u64,
    /// Pack size, KiB (small packs: a backup is many uploads, so kills land between them).
    #[arg(long, default_value_t = 1024)]
    pack_kib: u64,
    /// Random seed (default: from the clock; printed, so a run can be repeated).
    #[arg(long)]
    seed: Option<u64>,
    /// Keep the drill's files in this directory (default: a temporary one, removed).
    #[arg(long)]
    keep: Option<PathBuf>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DbKind {
    Sqlite,
    Postgres,
}

/// A catalog the drill's commands use: a SQLite file, or a database of the drill's cluster.
#[derive(Clone, PartialEq, Eq)]
enum CatalogAt {
    File(PathBuf),
    Postgres(String),
}

impl CatalogAt {
    fn url(&self) -> String {
        match self {
            CatalogAt::File(path) => format!("sqlite://{}", path.display()),
            CatalogAt::Postgres(url) => url.clone(),
        }
    }

    /// False for a SQLite file not made yet (a recover killed before it opened its catalog):
    /// opening it would create it. A PostgreSQL database exists from the moment it is named.
    fn exists(&self) -> bool {
        match self {
            CatalogAt::File(path) => path.exists(),
            CatalogAt::Postgres(_) => true,
        }
    }

    async fn open(&self) -> Result<storinator_shared::Catalog> {
        Ok(storinator_shared::Catalog::open(&self.url()).await?)
    }
}

/// Makes the drill's catalogs, on the database chosen with `--db`.
enum Catalogs {
    /// Files in the work dir.
    Sqlite,
    /// Databases of the cluster in [`CLUSTER`], one per catalog.
    Postgres,
}

/// The drill's PostgreSQL cluster: a static, so the signal thread can stop it.
static CLUSTER: Mutex<Option<PgCluster>> = Mutex::new(None);

fn with_cluster<T>(f: impl FnOnce(&PgCluster) -> T) -> Result<T> {
    let held = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    let cluster = held
        .as_ref()
        .ok_or_else(|| anyhow!("the PostgreSQL cluster is stopped"))?;
    Ok(f(cluster))
}

/// Stops the cluster (if running) and deletes its folder.
fn stop_cluster() {
    let mut held = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
    drop(held.take());
}

/// Stops the cluster when dropped: at the drill's end, however `main` returns.
struct ClusterGuard;

impl Drop for ClusterGuard {
    fn drop(&mut self) {
        stop_cluster();
    }
}

impl Catalogs {
    /// Starts the cluster for `--db postgres`, with a thread that stops it if the drill is
    /// interrupted (the worker children of a Ctrl-C die with it; the cluster's server runs in
    /// a session of its own and would not).
    fn start(kind: DbKind) -> Result<(Catalogs, Option<ClusterGuard>)> {
        if kind == DbKind::Sqlite {
            return Ok((Catalogs::Sqlite, None));
        }
        stop_on_signals()?;
        let cluster = PgCluster::start().context("starting the PostgreSQL cluster")?;
        println!(
            "catalogs on PostgreSQL: a throwaway cluster on 127.0.0.1:{} in {}",
            cluster.port(),
            cluster.dir().display()
        );
        *CLUSTER.lock().unwrap_or_else(|e| e.into_inner()) = Some(cluster);
        Ok((Catalogs::Postgres, Some(ClusterGuard)))
    }

    /// A new, empty catalog: the file `file` or a database named `name`.
    fn create(&self, file: PathBuf, name: &str) -> Result<CatalogAt> {
        match self {
            Catalogs::Sqlite => Ok(CatalogAt::File(file)),
            Catalogs::Postgres => Ok(CatalogAt::Postgres(with_cluster(|c| {
                c.create_database(name)
            })??)),
        }
    }

    /// A copy of catalog `from` as it is now, while nothing has it open: the SQLite file with
    /// its WAL copied to `file`, or a database `name` made from it as a template (the same
    /// rows, keys and sequences).
    fn copy(&self, from: &CatalogAt, file: PathBuf, name: &str) -> Result<CatalogAt> {
        match (self, from) {
            (Catalogs::Sqlite, CatalogAt::File(db)) => {
                for suffix in ["", "-wal", "-shm"] {
                    let from = PathBuf::from(format!("{}{suffix}", db.display()));
                    if from.exists() {
                        std::fs::copy(&from, format!("{}{suffix}", file.display()))?;
                    }
                }
                Ok(CatalogAt::File(file))
            }
            (Catalogs::Postgres, CatalogAt::Postgres(url)) => {
                let template = url
                    .rsplit_once('/')
                    .map(|(_, db)| db.to_string())
                    .ok_or_else(|| anyhow!("no database name in {url}"))?;
                Ok(CatalogAt::Postgres(with_cluster(|c| {
                    c.create_database_from(name, &template)
                })??))
            }
            _ => bail!("a catalog copied across databases"),
        }
    }
}

/// On SIGINT, SIGTERM or SIGHUP: stop the cluster, then exit as the signal would have (the
/// work dir is left, as it is without a cluster).
fn stop_on_signals() -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered here, before the cluster starts: a signal from now on reaches the thread.
    let (mut int, mut term, mut hup) = {
        let _in = rt.enter();
        (
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        )
    };
    std::thread::spawn(move || {
        let (name, code) = rt.block_on(async {
            tokio::select! {
                _ = int.recv() => ("SIGINT", 130),
                _ = term.recv() => ("SIGTERM", 143),
                _ = hup.recv() => ("SIGHUP", 129),
            }
        });
        // The lock stays held to the exit: the main thread, whose commands now fail, waits
        // on it (its `ClusterGuard`) instead of exiting first with their errors while the
        // cluster's folder is half deleted.
        let mut held = CLUSTER.lock().unwrap_or_else(|e| e.into_inner());
        // A SIGTERM reaches the drill alone: its worker would go on retrying a database that
        // is going away (and the loopback Telegram would stay).
        kill_children();
        drop(held.take());
        eprintln!("crash drill: {name}: the PostgreSQL cluster is stopped");
        std::process::exit(code);
    });
    Ok(())
}

/// SIGKILLs this process's children (the running worker, the loopback Telegram).
fn kill_children() {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in procs.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        // `pid (comm) state ppid …`; comm may hold spaces and parentheses.
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(me)
            && let Some(pid) = rustix::process::Pid::from_raw(pid)
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
    }
}

/// An operation the drill kills. `prepare` runs before each cycle (a backup needs changes to
/// back up); `command` is the operation's command line (the first start and the resume are
/// the same command); `check` is what must hold for this operation after the resume, on top
/// of the checks common to all operations.
struct Op {
    name: &'static str,
    prepare: fn(&mut Drill) -> Result<()>,
    command: fn(&Drill) -> Vec<String>,
    /// Exit codes that mean the operation succeeded.
    success: &'static [i32],
    check: fn(&mut Drill) -> Result<()>,
    /// Runs once after the last cycle (its own checks included).
    finish: fn(&mut Drill) -> Result<()>,
    /// Kill points are drawn from the moment the operation's run registered (its spool
    /// folder appears) to its clean end, not from the process start: for operations so quick
    /// that starting the process is most of their time.
    after_start: bool,
}

const OPS: &[Op] = &[
    Op {
        name: "backup",
        prepare: prepare_backup,
        command: |d| vec!["backup".into(), d.src.display().to_string()],
        // 3: saved, with warnings.
        success: &[0, 3],
        check: |_| Ok(()),
        finish: |_| Ok(()),
        after_start: false,
    },
    Op {
        name: "restore",
        prepare: prepare_restore,
        command: |d| {
            vec![
                "restore".into(),
                d.src.display().to_string(),
                "--to".into(),
                d.target().display().to_string(),
            ]
        },
        success: &[0],
        check: check_restore,
        finish: |_| Ok(()),
        after_start: false,
    },
    Op {
        name: "verify",
        prepare: |_| Ok(()),
        command: |_| vec!["verify".into(), "--read-data".into()],
        success: &[0],
        check: |_| Ok(()),
        finish: |_| Ok(()),
        after_start: false,
    },
    Op {
        name: "recover",
        prepare: prepare_recover,
        command: |_| vec!["recover".into()],
        success: &[0],
        check: check_recover,
        finish: |_| Ok(()),
        after_start: false,
    },
    Op {
        name: "prune",
        prepare: prepare_prune,
        // Rewrites most sparse packs: every cycle repacks, not only deletes.
        command: |_| {
            vec![
                "prune".into(),
                "--repack-below".into(),
                PRUNE_REPACK_BELOW.into(),
            ]
        },
        success: &[0],
        check: check_prune,
        finish: finish_prune,
        after_start: true,
    },
];

/// What the drill saw for one operation.
#[derive(Default)]
struct Tally {
    kills: u64,
    missed: u64,
    failures: Vec<String>,
    excess_bytes: i64,
    seconds: f64,
    clean_ms: u64,
    /// Of `clean_ms`, the time before the run registered (see [`Op::after_start`]).
    floor_ms: u64,
    /// Killed cycles after whose resume the latest snapshot restored identical (and, for a
    /// restore, the resumed restore's own target too).
    identical: u64,
    /// What the kills left that the resumes reclaimed (checked gone by `check_orphans` and
    /// `check_no_temp_files`).
    left: Leftovers,
}

/// What a killed run left behind, counted right after the kill.
#[derive(Default, Clone, Copy)]
struct Leftovers {
    /// Unfinished packs the catalog records for the dead run.
    packs: u64,
    /// Of those, the ones whose object had reached storage: orphans without the record
    /// (directory store only: the loopback's chat is checked by `verify`).
    objects: u64,
    /// Spool folders of dead runs.
    spools: u64,
    /// Restore temporaries (`.NAME.storinator-*.tmp`).
    temps: u64,
}

struct Drill {
    work: PathBuf,
    worker: PathBuf,
    env: Vec<(String, String)>,
    /// The folder backed up.
    src: PathBuf,
    pack_size: u64,
    change: u64,
    rng: u64,
    /// Data dir and store of the reference repository (clean backups only).
    reference: PathBuf,
    /// Makes the catalogs below.
    catalogs: Catalogs,
    /// The catalog the next command uses (a recover cycle points it at a fresh one).
    database: CatalogAt,
    /// The repository's own catalog.
    main_database: CatalogAt,
    /// The reference repository's catalog (made by `init`).
    reference_database: Option<CatalogAt>,
    spool: PathBuf,
    /// Dir store root, if the store is a directory.
    dir_store: Option<PathBuf>,
    cycle: u64,
    backup_kills: u64,
    /// Backups run so far (the reference ran as many).
    backups: u64,
    /// Most snapshots a recover found beyond the catalog's: complete snapshots whose backup
    /// was killed after its last pack was stored but before it recorded them.
    extra_recovered: usize,
    /// The tree each snapshot was taken of (`describe`), for the snapshots the prune cycles
    /// keep: what every one of them must restore to.
    expected: BTreeMap<String, BTreeMap<String, String>>,
    _loopback: Option<KillOnDrop>,
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    let plan = parse_kills(&args.kills)?;
    let _tmp;
    let work = match &args.keep {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.canonicalize()?
        }
        None => {
            _tmp = tempfile::tempdir()?;
            _tmp.path().canonicalize()?
        }
    };
    println!(
        "crash drill: store {}, seed {seed}, work dir {}",
        args.store,
        work.display()
    );
    // Declared after the work dir: dropped (the cluster stopped) before it is removed.
    let (catalogs, _cluster) = Catalogs::start(args.db)?;
    let mut drill = Drill::new(&args, work, seed, catalogs)?;
    let mut results = Vec::new();
    for (name, kills) in plan {
        let op = OPS
            .iter()
            .find(|o| o.name == name)
            .ok_or_else(|| anyhow!("unknown operation {name:?} in --kills"))?;
        let tally = drill.run_op(op, kills)?;
        results.push((name, kills, tally));
    }
    print_summary(&args.store, args.db, &results, drill.pack_size);
    println!(
        "recover found up to {} snapshot(s) beyond the catalog's (backups killed after storing \
         their snapshot object, before recording it)",
        drill.extra_recovered
    );
    let failed: usize = results.iter().map(|(_, _, t)| t.failures.len()).sum();
    if failed > 0 {
        bail!("{failed} check(s) failed");
    }
    Ok(())
}

fn parse_kills(s: &str) -> Result<Vec<(String, u64)>> {
    s.split(',')
        .map(|p| {
            let (name, n) = p
                .split_once('=')
                .ok_or_else(|| anyhow!("--kills wants op=N, got {p:?}"))?;
            Ok((name.trim().to_string(), n.trim().parse()?))
        })
        .collect()
}

fn sibling(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe()?;
    Ok(me.with_file_name(name))
}

impl Drill {
    fn new(args: &Args, work: PathBuf, seed: u64, catalogs: Catalogs) -> Result<Drill> {
        let worker = match &args.worker {
            Some(w) => w.clone(),
            None => sibling("storinator-worker")?,
        };
        ensure!(
            worker.exists(),
            "no worker binary at {}\nhint: cargo build --release -p storinator-worker",
            worker.display()
        );
        let data = work.join("data");
        std::fs::create_dir_all(&data)?;
        let mut env = vec![
            (
                "STORINATOR_DATA_DIR".to_string(),
                data.display().to_string(),
            ),
            ("STORINATOR_PASSPHRASE".into(), "crash drill".into()),
            ("STORINATOR_INSECURE_FAST_KDF".into(), "1".into()),
            (
                "STORINATOR_PACK_SIZE".into(),
                (args.pack_kib * 1024).to_string(),
            ),
        ];
        let (dir_store, loopback, spool) = match args.store.as_str() {
            "dir" => {
                let store = work.join("store");
                env.push((
                    "STORINATOR_STORAGE".into(),
                    format!("dir:{}", store.display()),
                ));
                (Some(store.clone()), None, store.join(".spool"))
            }
            "telegram" => {
                let lb = match &args.loopback {
                    Some(p) => p.clone(),
                    None => sibling("loopback-telegram")?,
                };
                let (child, session) = start_loopback(&lb, &work)?;
                env.extend([
                    ("STORINATOR_STORAGE".to_string(), "telegram".to_string()),
                    (
                        "STORINATOR_SESSION_FILE".into(),
                        session.display().to_string(),
                    ),
                    ("TELEGRAM_API_ID".into(), "1".into()),
                    // Well-formed (the worker checks the form); the loopback accepts any.
                    (
                        "TELEGRAM_API_HASH".into(),
                        "00112233445566778899aabbccddeeff".into(),
                    ),
                ]);
                (None, Some(KillOnDrop(child)), data.join("spool"))
            }
            other => bail!("--store must be dir or telegram, not {other:?}"),
        };
        let main_database = catalogs.create(data.join("storinator.db"), "main")?;
        let mut drill = Drill {
            src: work.join("src/data"),
            catalogs,
            database: main_database.clone(),
            main_database,
            reference_database: None,
            reference: work.join("reference"),
            work,
            worker,
            env,
            pack_size: args.pack_kib * 1024,
            change: args.change_mib << 20,
            rng: seed | 1,
            spool,
            dir_store,
            cycle: 0,
            backup_kills: 0,
            backups: 1,
            extra_recovered: 0,
            expected: BTreeMap::new(),
            _loopback: loopback,
        };
        drill.init(args.mib << 20)?;
        Ok(drill)
    }

    /// Creates the key, the source tree and the reference repository (a copy of the catalog
    /// right after `init`: the same key, so the same chunks).
    fn init(&mut self, size: u64) -> Result<()> {
        let out = self.command(&["init".into()]).output()?;
        ensure!(
            out.status.success(),
            "init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ref_data = self.reference.join("data");
        std::fs::create_dir_all(&ref_data)?;
        let reference =
            self.catalogs
                .copy(&self.database, ref_data.join("storinator.db"), "reference")?;
        self.reference_database = Some(reference.clone());
        let files = (size / (512 << 10)).max(4);
        for i in 0..files {
            let len = 256 * 1024 + self.next() % (512 * 1024);
            let path = self.src.join(format!("d{}/f{i:03}.bin", i % 5));
            std::fs::create_dir_all(path.parent().unwrap())?;
            std::fs::write(&path, self.noise(len as usize))?;
        }
        std::fs::write(self.src.join("notes.txt"), b"crash drill\n")?;
        std::os::unix::fs::symlink("notes.txt", self.src.join("link"))?;
        // A first full backup in both repositories: the drill's backups are incremental. The
        // first makes the owner's key; the reference is given it, so it seals the same chunks.
        let backup = ["backup".to_string(), self.src.display().to_string()];
        run_to_end(self.command(&backup), &[0, 3]).context("first backup")?;
        let ours = self.database.clone();
        block_on(async {
            let to = reference.open().await?;
            for row in ours.open().await?.owner_keys(None).await? {
                to.add_owner_key(&row).await?;
            }
            Ok::<_, anyhow::Error>(())
        })
        .context("giving the reference the owner's key")?;
        run_to_end(self.reference_command(&backup), &[0, 3]).context("reference backup")
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn noise(&mut self, len: usize) -> Vec<u8> {
        let mut x = self.next() | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect()
    }

    fn command(&self, args: &[String]) -> Command {
        let mut c = Command::new(&self.worker);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("DATABASE_URL", self.database.url())
            .args(args)
            .current_dir(&self.work)
            .stdin(Stdio::null());
        c
    }

    /// The reference repository's command: same source, its own catalog and a dir store.
    fn reference_command(&self, args: &[String]) -> Command {
        let mut c = self.command(args);
        let data = self.reference.join("data");
        let catalog = self
            .reference_database
            .as_ref()
            .expect("made by init, before any reference command");
        c.env("STORINATOR_DATA_DIR", &data)
            .env("DATABASE_URL", catalog.url())
            .env(
                "STORINATOR_STORAGE",
                format!("dir:{}", self.reference.join("store").display()),
            );
        c
    }

    /// Where the restore cycles restore to.
    fn target(&self) -> PathBuf {
        self.work.join(format!("restore-{}", self.cycle))
    }

    fn run_op(&mut self, op: &Op, kills: u64) -> Result<Tally> {
        let tally = self.run_cycles(op, kills);
        self.database = self.main_database.clone();
        tally
    }

    fn run_cycles(&mut self, op: &Op, kills: u64) -> Result<Tally> {
        let started = Instant::now();
        let mut tally = Tally::default();
        print!("{:<8} ", op.name);
        // A clean run: how long the operation takes (the range kill points are drawn from).
        (op.prepare)(self)?;
        let (clean_ms, start_ms) = self
            .run_watching_start(self.command(&(op.command)(self)), op.success)
            .with_context(|| format!("clean {}", op.name))?;
        tally.clean_ms = clean_ms.max(1);
        if op.after_start {
            tally.floor_ms = start_ms.unwrap_or(0).min(tally.clean_ms - 1);
        }
        self.check_all(op, &mut tally, 0)?;
        let mut attempts = 0;
        while tally.kills < kills && attempts < kills * 3 {
            attempts += 1;
            self.cycle += 1;
            (op.prepare)(self)?;
            let span = (tally.clean_ms - tally.floor_ms) * 1000;
            let delay = Duration::from_micros(self.next() % span);
            let failures_before = tally.failures.len();
            let mut child = self
                .command(&(op.command)(self))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            if op.after_start {
                self.wait_for_start(&mut child)?;
            }
            std::thread::sleep(delay);
            let killed = child.try_wait()?.is_none();
            if killed {
                child.kill()?;
                child.wait()?;
                tally.kills += 1;
                if op.name == "backup" {
                    self.backup_kills += 1;
                }
                let left = self.leftovers()?;
                tally.left.packs += left.packs;
                tally.left.objects += left.objects;
                tally.left.spools += left.spools;
                tally.left.temps += left.temps;
            } else {
                tally.missed += 1;
            }
            match run_to_end(self.command(&(op.command)(self)), op.success) {
                Ok(()) => {
                    let identical = self.check_all(op, &mut tally, self.cycle)?;
                    if killed && identical {
                        tally.identical += 1;
                    }
                }
                Err(e) => tally
                    .failures
                    .push(format!("cycle {}: resumed {}: {e:#}", self.cycle, op.name)),
            }
            let failed = tally.failures.len() > failures_before;
            print!("{}", if failed { "x" } else { "." });
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
        if let Err(e) = (op.finish)(self) {
            tally
                .failures
                .push(format!("{} at the end: {e:#}", op.name));
        }
        println!(
            " {}: {} kills, {} missed",
            op.name, tally.kills, tally.missed
        );
        tally.seconds = started.elapsed().as_secs_f64();
        Ok(tally)
    }

    /// The operation's own check and the common ones; failures are recorded, not fatal.
    /// True when the operation's check and the restore of the latest snapshot held.
    fn check_all(&mut self, op: &Op, tally: &mut Tally, cycle: u64) -> Result<bool> {
        let mut checks: Vec<(&str, Result<()>)> = vec![(op.name, (op.check)(self))];
        checks.push(("restore identical", self.check_latest_restores()));
        let identical = checks.iter().all(|(_, r)| r.is_ok());
        checks.push(("verify --read-data", self.check_verify()));
        checks.push(("no orphans", self.check_orphans()));
        checks.push(("no temporary files", self.check_no_temp_files()));
        match self.excess_bytes() {
            Ok(excess) => {
                tally.excess_bytes = excess;
                // One pack per kill; and compressed snapshot objects (times, counts) differ
                // from the reference's by a few bytes per backup.
                let allowed =
                    (self.backup_kills * self.pack_size + self.backups * METADATA_SLACK) as i64;
                if excess > allowed {
                    checks.push((
                        "stored bytes",
                        Err(anyhow!(
                            "{excess} bytes more than the reference, {allowed} allowed ({} kills, {} backups)",
                            self.backup_kills,
                            self.backups
                        )),
                    ));
                }
            }
            Err(e) => checks.push(("stored bytes", Err(e))),
        }
        for (what, r) in checks {
            if let Err(e) = r {
                tally
                    .failures
                    .push(format!("{} cycle {cycle}: {what}: {e:#}", op.name));
            }
        }
        Ok(identical)
    }

    /// True once a run's spool folder exists and is locked (`run-<id>`; the spool is empty
    /// between operations).
    fn run_started(&self) -> bool {
        std::fs::read_dir(&self.spool).is_ok_and(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("run-"))
        })
    }

    /// Runs a command to its end like [`run_to_end`]; returns its time and when its run
    /// registered (ms).
    fn run_watching_start(&self, mut cmd: Command, success: &[i32]) -> Result<(u64, Option<u64>)> {
        let t = Instant::now();
        // A file, not a pipe: a chatty operation must not block on a full pipe.
        let log = self.work.join("operation.log");
        let mut child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()?;
        let mut started = None;
        let limit = Duration::from_secs(600);
        let status = loop {
            if started.is_none() && self.run_started() {
                started = Some(t.elapsed().as_millis() as u64);
            }
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if t.elapsed() > limit {
                let _ = child.kill();
                bail!("no end after {limit:?}");
            }
            std::thread::sleep(Duration::from_micros(200));
        };
        let elapsed = t.elapsed().as_millis() as u64;
        ensure!(
            status.code().is_some_and(|c| success.contains(&c)),
            "{:?} exited with {status}:\n{}",
            cmd.get_args().collect::<Vec<_>>(),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        Ok((elapsed, started))
    }

    /// Waits (bounded) until the operation's run registered or the process ended.
    fn wait_for_start(&self, child: &mut Child) -> Result<()> {
        let t = Instant::now();
        while !self.run_started() && child.try_wait()?.is_none() {
            ensure!(
                t.elapsed() < Duration::from_secs(60),
                "the run never started"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// What the process just killed left for the resume to reclaim.
    fn leftovers(&self) -> Result<Leftovers> {
        let unfinished = if self.database.exists() {
            block_on(async { Ok(self.database.open().await?.unfinished_packs().await?) })?
        } else {
            Vec::new()
        };
        let objects = match &self.dir_store {
            Some(store) => unfinished
                .iter()
                .filter(|(id, _)| store.join(format!("{id}.enc")).exists())
                .count(),
            None => 0,
        };
        let spools = match std::fs::read_dir(&self.spool) {
            Ok(rd) => rd.flatten().count(),
            Err(_) => 0,
        };
        Ok(Leftovers {
            packs: unfinished.len() as u64,
            objects: objects as u64,
            spools: spools as u64,
            temps: temp_files(&self.work).len() as u64,
        })
    }

    fn check_latest_restores(&self) -> Result<()> {
        let to = self.work.join("check-restore");
        let _ = std::fs::remove_dir_all(&to);
        run_to_end(
            self.command(&[
                "restore".into(),
                self.src.display().to_string(),
                "--to".into(),
                to.display().to_string(),
            ]),
            &[0],
        )?;
        same_tree(&self.src, &to.join("data"))?;
        std::fs::remove_dir_all(&to)?;
        Ok(())
    }

    fn check_verify(&self) -> Result<()> {
        run_to_end(self.command(&["verify".into(), "--read-data".into()]), &[0])
    }

    /// Storage holds exactly the catalog's packs and the key; nothing is unfinished.
    fn check_orphans(&self) -> Result<()> {
        let (packs, unfinished) = block_on(async {
            let c = self.database.open().await?;
            Ok::<_, anyhow::Error>((c.packs().await?, c.unfinished_packs().await?))
        })?;
        ensure!(unfinished.is_empty(), "unfinished packs: {unfinished:?}");
        let Some(store) = &self.dir_store else {
            // Telegram: `verify` lists what the chat holds that the catalog does not.
            return Ok(());
        };
        let mut objects: Vec<String> = std::fs::read_dir(store)?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.') && !n.starts_with("key-") && !is_tombstone(n))
            .collect();
        let mut known: Vec<String> = packs.iter().map(|p| format!("{}.enc", p.id)).collect();
        objects.sort();
        known.sort();
        ensure!(
            objects == known,
            "storage and catalog differ: only in storage {:?}, only in the catalog {:?}",
            objects
                .iter()
                .filter(|o| !known.contains(o))
                .collect::<Vec<_>>(),
            known
                .iter()
                .filter(|k| !objects.contains(k))
                .collect::<Vec<_>>()
        );
        Ok(())
    }

    fn check_no_temp_files(&self) -> Result<()> {
        let spool: Vec<_> = match std::fs::read_dir(&self.spool) {
            Ok(rd) => rd.flatten().map(|e| e.file_name()).collect(),
            Err(_) => Vec::new(),
        };
        // A kill between a run creating its folder and locking it leaves `.new-run-<id>`; the
        // next run's sweep removes it (no run is being created then), so it is a failure too.
        ensure!(spool.is_empty(), "spool not empty: {spool:?}");
        let temps = temp_files(&self.work);
        ensure!(temps.is_empty(), "restore temporaries left: {temps:?}");
        Ok(())
    }

    /// Bytes in this repository's storage beyond the reference's: on disk for a directory
    /// store; for Telegram, the catalog's packs (the chat holds exactly those: `verify`).
    fn excess_bytes(&self) -> Result<i64> {
        let ours = match &self.dir_store {
            Some(store) => disk_bytes(store)?,
            None => catalog_bytes(&self.main_database)?,
        };
        let reference = disk_bytes(&self.reference.join("store"))?;
        Ok(ours as i64 - reference as i64)
    }
}

/// Restore temporaries (`.NAME.storinator-XXXX.tmp`) below `dir`.
fn temp_files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy();
            n.contains(".storinator-") && n.ends_with(".tmp")
        })
        .map(|e| e.into_path())
        .collect()
}

/// A forget's sealed tombstone (`forget-<id>.enc`): stored for good, not a pack.
fn is_tombstone(name: &str) -> bool {
    name.starts_with("forget-") && name.ends_with(".enc")
}

/// Bytes of the packs in a directory store (not its spool, the key or tombstones).
fn disk_bytes(store: &Path) -> Result<u64> {
    let mut total = 0;
    for e in std::fs::read_dir(store)?.flatten() {
        let m = e.metadata()?;
        let name = e.file_name().to_string_lossy().into_owned();
        if m.is_file()
            && !name.starts_with('.')
            && !name.starts_with("key-")
            && !is_tombstone(&name)
        {
            total += m.len();
        }
    }
    Ok(total)
}

/// Sum of the pack sizes a catalog knows (storage holds exactly these: `check_orphans`).
fn catalog_bytes(db: &CatalogAt) -> Result<u64> {
    block_on(async { Ok(db.open().await?.packs().await?.iter().map(|p| p.size).sum()) })
}

fn block_on<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// Runs a command to its end (bounded), failing with its output unless it exits with one of
/// `success`.
fn run_to_end(mut cmd: Command, success: &[i32]) -> Result<()> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let status = wait_bounded(&mut child, Duration::from_secs(600))?;
    let out = child.wait_with_output()?;
    if status.code().is_some_and(|c| success.contains(&c)) {
        return Ok(());
    }
    bail!(
        "{:?} exited with {status}:\n{}{}",
        cmd.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Result<ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(s) = child.try_wait()? {
            return Ok(s);
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            bail!("no end after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Bytes per backup by which the repository may differ from the reference without a leak.
const METADATA_SLACK: u64 = 1024;

/// Backup: change part of the source, and back the change up cleanly in the reference.
fn prepare_backup(d: &mut Drill) -> Result<()> {
    d.backups += 1;
    let mut files: Vec<PathBuf> = walkdir::WalkDir::new(&d.src)
        .into_iter()
        .flatten()
        .filter(|e| e.file_type().is_file() && e.path().extension().is_some_and(|x| x == "bin"))
        .map(|e| e.into_path())
        .collect();
    files.sort();
    let mut changed = 0;
    while changed < d.change && !files.is_empty() {
        let i = (d.next() % files.len() as u64) as usize;
        let len = 256 * 1024 + d.next() % (512 * 1024);
        let data = d.noise(len as usize);
        std::fs::write(files.swap_remove(i), &data)?;
        changed += len;
    }
    std::fs::write(d.src.join("notes.txt"), format!("cycle {}\n", d.cycle))?;
    run_to_end(
        d.reference_command(&["backup".into(), d.src.display().to_string()]),
        &[0, 3],
    )
    .context("reference backup")
}

fn prepare_restore(d: &mut Drill) -> Result<()> {
    let _ = std::fs::remove_dir_all(d.target());
    Ok(())
}

/// The re-run restore completed the target: identical, nothing half-written.
fn check_restore(d: &mut Drill) -> Result<()> {
    let same = same_tree(&d.src, &d.target().join("data"));
    let temps = temp_files(&d.target());
    std::fs::remove_dir_all(d.target())?;
    same?;
    ensure!(temps.is_empty(), "restore temporaries left: {temps:?}");
    Ok(())
}

/// Recover: into a fresh catalog each cycle.
fn prepare_recover(d: &mut Drill) -> Result<()> {
    d.database = d.catalogs.create(
        d.work.join(format!("data/recovered-{}.db", d.cycle)),
        &format!("recovered_{}", d.cycle),
    )?;
    Ok(())
}

/// The recovered catalog has every snapshot of the original (and perhaps ones a killed backup
/// stored but never recorded); the common checks then run against it. Afterwards the drill
/// goes back to the original catalog.
fn check_recover(d: &mut Drill) -> Result<()> {
    let recovered = snapshot_ids(d)?;
    let recovered_db = d.database.clone();
    d.database = d.main_database.clone();
    let original = snapshot_ids(d)?;
    let lost: Vec<_> = original
        .keys()
        .filter(|k| !recovered.contains_key(*k))
        .collect();
    d.database = recovered_db;
    ensure!(lost.is_empty(), "snapshots not recovered: {lost:?}");
    d.extra_recovered = d.extra_recovered.max(recovered.len() - original.len());
    Ok(())
}

/// `prune --repack-below` in the drill.
const PRUNE_REPACK_BELOW: &str = "90";

/// Prune: garbage to collect. The latest snapshot's tree is the source as it is now
/// (remembered if it is not yet); then the source changes, is backed up, and all but the two
/// newest snapshots are forgotten.
fn prepare_prune(d: &mut Drill) -> Result<()> {
    let before = snapshot_ids(d)?;
    let latest = latest_snapshot(d)?;
    if !d.expected.contains_key(&latest) {
        d.expected.insert(latest, describe(&d.src)?);
    }
    prepare_backup(d)?;
    run_to_end(
        d.command(&["backup".into(), d.src.display().to_string()]),
        &[0, 3],
    )
    .context("backup before prune")?;
    let new = snapshot_ids(d)?
        .into_keys()
        .filter(|k| !before.contains_key(k))
        .collect::<Vec<_>>();
    ensure!(new.len() == 1, "one new snapshot expected, got {new:?}");
    d.expected.insert(new[0].clone(), describe(&d.src)?);
    run_to_end(
        d.command(&[
            "forget".into(),
            d.src.display().to_string(),
            "--keep-last".into(),
            "2".into(),
        ]),
        &[0],
    )
    .context("forget before prune")?;
    let left = snapshot_ids(d)?;
    d.expected.retain(|k, _| left.contains_key(k));
    Ok(())
}

/// The newest snapshot's short id.
fn latest_snapshot(d: &Drill) -> Result<String> {
    let out = d.command(&["snapshots".into(), "--json".into()]).output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    list.iter()
        .max_by_key(|s| s["started_at"].as_i64().unwrap_or(0))
        .and_then(|s| s["short_id"].as_str())
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no snapshot"))
}

/// After a (resumed) prune: every remaining snapshot restores identical to its tree, and a
/// prune would free nothing more.
fn check_prune(d: &mut Drill) -> Result<()> {
    let left = snapshot_ids(d)?;
    for id in left.keys() {
        let tree = d
            .expected
            .get(id)
            .ok_or_else(|| anyhow!("snapshot {id} is left but the drill does not know its tree"))?;
        let to = d.work.join(format!("check-prune-{id}"));
        let _ = std::fs::remove_dir_all(&to);
        run_to_end(
            d.command(&[
                "restore".into(),
                d.src.display().to_string(),
                "--to".into(),
                to.display().to_string(),
                "--snapshot".into(),
                id.clone(),
            ]),
            &[0],
        )
        .with_context(|| format!("restoring snapshot {id}"))?;
        let got = describe(&to.join("data"))?;
        std::fs::remove_dir_all(&to)?;
        if &got != tree {
            let differ: Vec<_> = tree
                .keys()
                .chain(got.keys())
                .filter(|k| tree.get(*k) != got.get(*k))
                .take(5)
                .collect();
            bail!("snapshot {id} does not restore identical: {differ:?}");
        }
    }
    nothing_to_free(d)
}

/// `stats` (the prune's own estimate): no unused pack, no sparse pack, nothing to free.
fn nothing_to_free(d: &Drill) -> Result<()> {
    let out = d.command(&["stats".into(), "--json".into()]).output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let u: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let figures = (
        u["unused_packs"].as_u64(),
        u["sparse_packs"].as_u64(),
        u["prune_would_free"].as_u64(),
    );
    ensure!(
        figures == (Some(0), Some(0), Some(0)),
        "a prune would still free something: {u}"
    );
    Ok(())
}

/// A final prune (default options): storage and catalog agree, nothing is left to free, and
/// every remaining snapshot still restores.
fn finish_prune(d: &mut Drill) -> Result<()> {
    run_to_end(d.command(&["prune".into()]), &[0]).context("final prune")?;
    d.check_orphans()?;
    d.check_verify()?;
    check_prune(d)
}

fn snapshot_ids(d: &Drill) -> Result<BTreeMap<String, String>> {
    let out = d.command(&["snapshots".into(), "--json".into()]).output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout)?;
    Ok(list
        .iter()
        .map(|s| {
            (
                s["short_id"].as_str().unwrap_or("").to_string(),
                s["root"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect())
}

/// Fails unless the trees match: kinds, content, modes, mtimes, symlink targets.
fn same_tree(a: &Path, b: &Path) -> Result<()> {
    let (x, y) = (describe(a)?, describe(b)?);
    if x == y {
        return Ok(());
    }
    let differ: Vec<_> = x
        .keys()
        .chain(y.keys())
        .filter(|k| x.get(*k) != y.get(*k))
        .take(5)
        .map(|k| format!("{k}: {:?} vs {:?}", x.get(k), y.get(k)))
        .collect();
    bail!("{} and {} differ: {differ:?}", a.display(), b.display())
}

fn describe(root: &Path) -> Result<BTreeMap<String, String>> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).follow_links(false) {
        let e = e?;
        let rel = e.path().strip_prefix(root)?.to_string_lossy().into_owned();
        let m = std::fs::symlink_metadata(e.path())?;
        let what = if m.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(e.path())?.display())
        } else if m.is_dir() {
            format!(
                "dir {:o} {}.{}",
                m.mode() & 0o7777,
                m.mtime(),
                m.mtime_nsec()
            )
        } else {
            let sha = sha2::Sha256::digest(std::fs::read(e.path())?);
            format!(
                "file {:o} {}.{} {}",
                m.mode() & 0o7777,
                m.mtime(),
                m.mtime_nsec(),
                hex::encode(sha)
            )
        };
        out.insert(rel, what);
    }
    Ok(out)
}

/// Starts the loopback Telegram and waits for its session file.
fn start_loopback(bin: &Path, work: &Path) -> Result<(Child, PathBuf)> {
    ensure!(
        bin.exists(),
        "no loopback Telegram at {}\nhint: cargo build --release -p storinator-testkit",
        bin.display()
    );
    let session = work.join("data/worker.session");
    let mut child = Command::new(bin)
        .arg("--session")
        .arg(&session)
        .arg("--data-dir")
        .arg(work.join("telegram"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let t = Instant::now();
    while !session.exists() {
        let problem = if child.try_wait()?.is_some() {
            Some("the loopback Telegram exited at start")
        } else if t.elapsed() > Duration::from_secs(20) {
            Some("the loopback Telegram wrote no session")
        } else {
            None
        };
        if let Some(p) = problem {
            let _ = child.kill();
            bail!(p);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Let the file be completely written.
    std::thread::sleep(Duration::from_millis(100));
    Ok((child, session))
}

fn print_summary(store: &str, db: DbKind, results: &[(String, u64, Tally)], pack_size: u64) {
    let on = match db {
        DbKind::Sqlite => "",
        DbKind::Postgres => ", catalogs on PostgreSQL",
    };
    println!(
        "\ncrash drill on the {store} store (pack size {} KiB{on}):",
        pack_size / 1024
    );
    println!(
        "{:<9} {:>6} {:>7} {:>9} {:>6} {:>7} {:>6} {:>6} {:>9} {:>8} {:>13} {:>8}",
        "operation",
        "kills",
        "missed",
        "identical",
        "packs",
        "objects",
        "spools",
        "temps",
        "kill ms",
        "failures",
        "excess bytes",
        "seconds"
    );
    for (name, _, t) in results {
        println!(
            "{:<9} {:>6} {:>7} {:>9} {:>6} {:>7} {:>6} {:>6} {:>9} {:>8} {:>13} {:>8.1}",
            name,
            t.kills,
            t.missed,
            t.identical,
            t.left.packs,
            t.left.objects,
            t.left.spools,
            t.left.temps,
            format!("{}-{}", t.floor_ms, t.clean_ms),
            t.failures.len(),
            t.excess_bytes,
            t.seconds
        );
    }
    println!(
        "kill ms: when in a clean run kill points were drawn (for prune: from its run's \
         registration to its end); \
         identical: killed cycles whose resume restored identical; packs (objects), spools, \
         temps: unfinished packs (of them, with an object in storage), spool entries and \
         restore temporaries the kills left, all gone after the resumes (else a failure)"
    );
    for (_, _, t) in results {
        for f in &t.failures {
            println!("FAILED {f}");
        }
    }
}
