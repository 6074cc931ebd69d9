//! The speed bench against restic: for each tree shape, the first backup, an unchanged
//! re-backup and a restore by `storinator-worker` (directory store) and by `restic` (local
//! repository), each a process of its own, in rounds that alternate which of the two goes
//! first. For every phase: wall time, CPU seconds per GiB of the tree and peak RSS of each,
//! storinator's time divided by restic's, and the catalog's bytes per file (the SQLite files
//! after a checkpoint). Both run with their real key derivation and default compression.
//! Each round first copies the tree with `cp -a` onto the same disk, printed as a ratio to
//! restic's restore: for one large file, the floor of the restore ratio on this machine.
//!
//! ```text
//! bench/run                     # builds, installs restic if missing, runs this and tg_bench
//! target/release/examples/vs_restic [--dir DIR] [--shapes small100k,mixed1g,file8g]
//!     [--rounds 2] [--no-restic] [--period-gib N] [--restore-dir DIR] [--worker PATH]
//!     [--restic PATH]
//! ```
//! Shapes: `small100k` (100,000 files of 1-16 KiB), `mixed1g` (1 GiB: one large file, 230
//! medium ones, about 3,100 of 4-64 KiB), `file8g` and `file16g` (one file; any `fileNg` for N GiB), `small1m`
//! (1,000,000 files of 1-2 KiB), `small1k` (1,000 files of 1-16 KiB, to try the bench out). `--period-gib N` makes the one-file shapes repeat every N GiB
//! so that the stores need only N GiB each (the rest deduplicates). Each tree is built in
//! `--dir` (default: the temp dir), and everything is deleted after its shape.
//!
//! Restored trees of many files are kept until their shape is done, not deleted between runs:
//! on ext4 without a journal (these VMs) the kernel skips inodes freed in the last minutes
//! when it allocates new ones (`recently_deleted`, up to six minutes while the inode table is
//! dirty), so a restore that follows the deletion of 100,000 files paid up to several ms per
//! file created, more each round, whichever tool it was.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use storinator_testkit::trees::{self, TreeStats};

const GIB: f64 = (1u64 << 30) as f64;

/// Storinator against restic: first backup, unchanged re-backup and restore per tree shape
/// (see the top of worker/examples/vs_restic.rs).
#[derive(clap::Parser)]
struct Args {
    /// Where the trees, stores and restores go (default: the temp dir)
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Tree shapes, comma-separated: small1k, small100k, small1m, mixed1g, fileNg (one file
    /// of N GiB)
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "small100k,mixed1g,file8g",
        value_parser = shape
    )]
    shapes: Vec<Shape>,
    /// Rounds per shape (each alternates which tool goes first)
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Run storinator only
    #[arg(long)]
    no_restic: bool,
    /// Make the one-file shapes repeat every N GiB, so each store needs only N GiB
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    period_gib: Option<u64>,
    /// The storinator-worker to run (default: the one of this build)
    #[arg(long, value_name = "PATH")]
    worker: Option<PathBuf>,
    /// Restore (and copy the tree) into this folder instead of beside the stores: a tmpfs
    /// such as /dev/shm leaves out the disk, and ext4's cost of allocating inodes freed in the
    /// last minutes (see the top of this file), which made restores of many files vary by
    /// several times from run to run
    #[arg(long, value_name = "DIR")]
    restore_dir: Option<PathBuf>,
    /// The restic to run
    #[arg(long, value_name = "PATH", default_value = "restic")]
    restic: PathBuf,
}

/// What one process cost.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    wall: f64,
    cpu: f64,
    rss_mib: f64,
}

/// Runs `cmd` to completion, its output appended to `log`, and measures it with wait4
/// (the kernel's own accounting of that process: CPU time and peak resident set).
///
/// Dirty pages are written back first (`sync`), so that no phase of either tool pays for
/// what the phase before it, or the tree's build, left for the kernel to write.
fn measure(cmd: &mut Command, log: &Path, ok_codes: &[i32]) -> anyhow::Result<Sample> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    let t = Instant::now();
    let child = cmd
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .map_err(|e| anyhow::anyhow!("starting {cmd:?}: {e}"))?;
    let mut status = 0i32;
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 writes only the status and the rusage we hand it, for our own child.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut ru) };
    anyhow::ensure!(pid > 0, "wait4: {}", std::io::Error::last_os_error());
    let wall = t.elapsed().as_secs_f64();
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    anyhow::ensure!(
        ok_codes.contains(&code),
        "{cmd:?} exited with {code}; see {}",
        log.display()
    );
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Sample {
        wall,
        cpu: tv(ru.ru_utime) + tv(ru.ru_stime),
        rss_mib: ru.ru_maxrss as f64 / 1024.0,
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Tool {
    Storinator,
    Restic,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Storinator => "storinator",
            Tool::Restic => "restic",
        }
    }
}

struct Bins {
    worker: PathBuf,
    restic: PathBuf,
}

/// The three phases of one tool on one tree, in a repository of its own under `work`.
struct Phases {
    backup: Sample,
    rebackup: Sample,
    restore: Sample,
    /// Catalog bytes (storinator) after the two snapshots.
    catalog: u64,
}

fn storinator(bins: &Bins, work: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut c = Command::new(&bins.worker);
    c.current_dir(work)
        .env("STORINATOR_DATA_DIR", work.join("data"))
        .env(
            "STORINATOR_STORAGE",
            format!("dir:{}", work.join("store").display()),
        )
        .env("STORINATOR_PASSPHRASE", "bench passphrase")
        .env_remove("STORINATOR_INSECURE_FAST_KDF");
    for a in args {
        c.arg(a.as_ref());
    }
    c
}

fn restic(bins: &Bins, work: &Path, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut c = Command::new(&bins.restic);
    c.current_dir(work)
        .env("RESTIC_REPOSITORY", work.join("repo"))
        .env("RESTIC_PASSWORD", "bench passphrase")
        .env("RESTIC_CACHE_DIR", work.join("cache"))
        .arg("--quiet");
    for a in args {
        c.arg(a.as_ref());
    }
    c
}

/// Sum of the SQLite catalog's files after a checkpoint (which folds the WAL into the main
/// file).
async fn catalog_bytes(data: &Path) -> anyhow::Result<u64> {
    let db = data.join("storinator.db");
    let url = format!("sqlite://{}", db.display());
    let catalog = storinator_shared::Catalog::open(&url).await?;
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(catalog.pool())
        .await?;
    catalog.pool().close().await;
    let mut total = 0;
    for suffix in ["", "-wal", "-shm"] {
        let mut p = OsString::from(db.as_os_str());
        p.push(suffix);
        total += std::fs::metadata(PathBuf::from(p)).map_or(0, |m| m.len());
    }
    Ok(total)
}

/// Where a run restores to: `out`, then moved to `keep` (deleted with the shape) when given,
/// so that the next runs don't allocate over thousands of just-freed inodes; else deleted.
struct Restored<'a> {
    out: &'a Path,
    keep: Option<&'a Path>,
}

/// Runs the three phases of `tool`, restoring as `restored` says.
async fn run_tool(
    tool: Tool,
    bins: &Bins,
    tree: &Path,
    work: &Path,
    restored: Restored<'_>,
) -> anyhow::Result<Phases> {
    std::fs::create_dir_all(work)?;
    let log = work.with_extension("log");
    let out = restored.out;
    let phases = match tool {
        Tool::Storinator => {
            std::fs::create_dir_all(work.join("data"))?;
            std::fs::create_dir_all(work.join("store"))?;
            measure(&mut storinator(bins, work, &[&"init"]), &log, &[0])?;
            // Exit code 3: saved, with warnings.
            let backup = measure(
                &mut storinator(bins, work, &[&"backup", &tree]),
                &log,
                &[0, 3],
            )?;
            let rebackup = measure(
                &mut storinator(bins, work, &[&"backup", &tree]),
                &log,
                &[0, 3],
            )?;
            let restore = measure(
                &mut storinator(bins, work, &[&"restore", &tree, &"--to", &out]),
                &log,
                &[0],
            )?;
            Phases {
                backup,
                rebackup,
                restore,
                catalog: catalog_bytes(&work.join("data")).await?,
            }
        }
        Tool::Restic => {
            measure(&mut restic(bins, work, &[&"init"]), &log, &[0])?;
            let backup = measure(&mut restic(bins, work, &[&"backup", &tree]), &log, &[0])?;
            let rebackup = measure(&mut restic(bins, work, &[&"backup", &tree]), &log, &[0])?;
            let restore = measure(
                &mut restic(bins, work, &[&"restore", &"latest", &"--target", &out]),
                &log,
                &[0],
            )?;
            Phases {
                backup,
                rebackup,
                restore,
                catalog: 0,
            }
        }
    };
    match restored.keep {
        Some(keep) => std::fs::rename(out, keep)?,
        None => std::fs::remove_dir_all(out)?,
    }
    std::fs::remove_dir_all(work)?;
    Ok(phases)
}

/// A tree shape, by the name it is given and printed under.
#[derive(Clone)]
struct Shape {
    name: String,
    kind: ShapeKind,
}

#[derive(Clone, Copy)]
enum ShapeKind {
    /// `files` files of `min`..`max` bytes, from noise seeded with `seed`.
    Small {
        files: u64,
        min: u64,
        max: u64,
        seed: u64,
    },
    Mixed1g,
    /// One file of this many GiB.
    File(u64),
}

/// `--shapes`' names, checked before any tree is built.
fn shape(s: &str) -> Result<Shape, String> {
    let small = |files, max, seed| ShapeKind::Small {
        files,
        min: 1024,
        max,
        seed,
    };
    let kind = match s {
        "small1k" => small(1_000, 16 * 1024, 1),
        "small100k" => small(100_000, 16 * 1024, 100),
        "small1m" => small(1_000_000, 2048, 1000),
        "mixed1g" => ShapeKind::Mixed1g,
        // `file8g`, `file16g`, or any `fileNg`.
        other => match other
            .strip_prefix("file")
            .and_then(|g| g.strip_suffix('g'))
            .and_then(|g| g.parse::<u64>().ok())
        {
            Some(g) if g > 0 => ShapeKind::File(g),
            _ => {
                return Err(format!(
                    "unknown shape {s:?}\nhint: small1k, small100k, small1m, mixed1g or fileNg (N GiB)"
                ));
            }
        },
    };
    Ok(Shape {
        name: s.to_string(),
        kind,
    })
}

fn build_tree(shape: ShapeKind, root: &Path, period: u64) -> TreeStats {
    match shape {
        ShapeKind::Small {
            files,
            min,
            max,
            seed,
        } => trees::small_files(root, files, min, max, seed),
        ShapeKind::Mixed1g => trees::mixed(root, 1 << 30),
        ShapeKind::File(g) => {
            trees::large_file(&root.join("disk.img"), g << 30, period.min(g << 30))
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let here = std::env::current_exe()?;
    let release = here
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."));
    let args = <Args as clap::Parser>::parse();
    let bins = Bins {
        worker: args
            .worker
            .unwrap_or_else(|| release.join("storinator-worker")),
        restic: args.restic,
    };
    let with_restic = !args.no_restic;
    let rounds = args.rounds as usize;
    let period = args.period_gib.map_or(u64::MAX, |g| g << 30);
    let base = match &args.dir {
        Some(d) => {
            tempfile::tempdir_in(d).map_err(|e| anyhow::anyhow!("--dir {}: {e}", d.display()))?
        }
        None => tempfile::tempdir()?,
    };
    let restore_base = match &args.restore_dir {
        Some(d) => Some(
            tempfile::tempdir_in(d)
                .map_err(|e| anyhow::anyhow!("--restore-dir {}: {e}", d.display()))?,
        ),
        None => None,
    };
    println!(
        "storinator {} vs {}; {rounds} rounds; load average {}",
        bins.worker.display(),
        if with_restic {
            String::from_utf8_lossy(&Command::new(&bins.restic).arg("version").output()?.stdout)
                .trim()
                .to_string()
        } else {
            "nothing (--no-restic)".into()
        },
        load_average()
    );
    for Shape { name: shape, kind } in &args.shapes {
        let tree = base.path().join(shape);
        let stats = build_tree(*kind, &tree, period);
        let gib = stats.bytes as f64 / GIB;
        println!(
            "\n== {shape}: {} files, {:.2} GiB (load average {})",
            stats.files,
            gib,
            load_average()
        );
        let tools: &[Tool] = if with_restic {
            &[Tool::Storinator, Tool::Restic]
        } else {
            &[Tool::Storinator]
        };
        let mut results: Vec<(Tool, Phases)> = Vec::new();
        // Restored trees of many files, deleted with the shape (see the top of this file).
        let kept = base.path().join(format!("{shape}-restored"));
        std::fs::create_dir_all(&kept)?;
        let mut copies = Vec::new();
        for round in 0..rounds {
            let copy = match &restore_base {
                Some(r) => copy_tree(&tree, r.path(), round, false)?,
                None => copy_tree(&tree, &kept, round, stats.files >= 1000)?,
            };
            println!(
                "round {} copy of the tree (cp -a) {:7.2} s",
                round + 1,
                copy.wall
            );
            copies.push(copy);
            let order: Vec<Tool> = if round % 2 == 0 {
                tools.to_vec()
            } else {
                tools.iter().rev().copied().collect()
            };
            for tool in order {
                let work = base.path().join(format!("{}-{round}", tool.name()));
                let name = format!("{}-{round}", tool.name());
                let (out, keep) = match &restore_base {
                    Some(r) => (r.path().join(&name), None),
                    None => (
                        work.join("restored"),
                        (stats.files >= 1000).then(|| kept.join(&name)),
                    ),
                };
                let restored = Restored {
                    out: &out,
                    keep: keep.as_deref(),
                };
                let p = run_tool(tool, &bins, &tree, &work, restored).await?;
                println!(
                    "round {} {:<10} backup {:7.2} s {:6.2} CPU s/GiB {:6.0} MiB | re-backup {:7.2} s {:6.0} MiB | restore {:7.2} s {:6.2} CPU s/GiB {:6.0} MiB{}",
                    round + 1,
                    tool.name(),
                    p.backup.wall,
                    p.backup.cpu / gib,
                    p.backup.rss_mib,
                    p.rebackup.wall,
                    p.rebackup.rss_mib,
                    p.restore.wall,
                    p.restore.cpu / gib,
                    p.restore.rss_mib,
                    if tool == Tool::Storinator {
                        format!(
                            " | catalog {:.0} bytes/file",
                            p.catalog as f64 / stats.files as f64
                        )
                    } else {
                        String::new()
                    }
                );
                results.push((tool, p));
            }
        }
        if with_restic {
            print_ratios(&results, &copies);
        }
        std::fs::remove_dir_all(&tree)?;
        std::fs::remove_dir_all(&kept)?;
    }
    Ok(())
}

/// The tree copied with `cp -a` (read from the page cache, written to this disk or to
/// `--restore-dir`), into `kept` and left there (`keep`) or deleted at once. A restore of one large file writes every byte the
/// copy does, through the same page cache, and does more (decrypting, hashing): when the copy
/// takes more than half of restic's restore, half of restic's time is out of reach here. (Not
/// so for many small files: `cp` creates them one at a time, a restore several at once.)
fn copy_tree(tree: &Path, kept: &Path, round: usize, keep: bool) -> anyhow::Result<Sample> {
    let to = kept.join(format!("copy-{round}"));
    let mut cp = Command::new("cp");
    cp.arg("-a").arg("--reflink=never").arg(tree).arg(&to);
    let copy = measure(&mut cp, &kept.join("cp.log"), &[0])?;
    if !keep {
        std::fs::remove_dir_all(&to)?;
    }
    Ok(copy)
}

/// Storinator ÷ restic per round (paired within the round), per phase; and the tree's copy
/// ÷ restic's restore (see [`copy_tree`]).
fn print_ratios(results: &[(Tool, Phases)], copies: &[Sample]) {
    let of = |t: Tool| -> Vec<&Phases> {
        results
            .iter()
            .filter(|(x, _)| *x == t)
            .map(|(_, p)| p)
            .collect()
    };
    let (s, r) = (of(Tool::Storinator), of(Tool::Restic));
    let floor: Vec<f64> = copies
        .iter()
        .zip(&r)
        .map(|(c, b)| c.wall / b.restore.wall)
        .collect();
    println!(
        "ratio cp -a/restic restore                  time {}  (median {:.2})",
        floor
            .iter()
            .map(|v| format!("{v:.2}"))
            .collect::<Vec<_>>()
            .join(" "),
        median(floor.clone())
    );
    type Pick = fn(&Phases) -> Sample;
    let phases: [(&str, Pick); 3] = [
        ("first backup", |p| p.backup),
        ("unchanged re-backup", |p| p.rebackup),
        ("restore", |p| p.restore),
    ];
    for (name, pick) in phases {
        let time: Vec<f64> = s
            .iter()
            .zip(&r)
            .map(|(a, b)| pick(a).wall / pick(b).wall)
            .collect();
        let cpu: Vec<f64> = s
            .iter()
            .zip(&r)
            .map(|(a, b)| pick(a).cpu / pick(b).cpu)
            .collect();
        println!(
            "ratio storinator/restic {name:<20} time {}  (median {:.2}); CPU {} (median {:.2})",
            time.iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            median(time.clone()),
            cpu.iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
            median(cpu.clone()),
        );
    }
}
