//! The `storinator-worker` command line.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use storinator_shared::{
    BackupOptions, CancelFlag, Catalog, Config, EngineSettings, Error, KdfParams, Repo,
    RestoreOptions, Storage, Unlocking, format_entry, format_time, human_bytes, plural,
};

use crate::ui::Bar;

/// Encrypted, deduplicated backups of server folders into Telegram.
///
/// Settings come from the environment (and a `.env` file): see .env.example. Every command
/// runs without prompts when STORINATOR_PASSPHRASE (or --passphrase-file) is set.
#[derive(Parser, Debug)]
#[command(
    name = "storinator-worker",
    version,
    propagate_version = true,
    after_long_help = STORAGE_HELP
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// What `--help` says about STORINATOR_STORAGE and STORINATOR_COPIES.
const STORAGE_HELP: &str = "\
Storage (STORINATOR_STORAGE, STORINATOR_COPIES):
  STORINATOR_STORAGE=telegram            the worker's account (STORINATOR_STORAGE_CHAT)
  STORINATOR_STORAGE=dir:<path>          a local directory
  Several lanes, comma-separated, each named <name>=<where>, <where> being one of
    telegram | telegram:<chat> | telegram:<session file>[:<chat>] | dir:<path>
  e.g. STORINATOR_STORAGE='main=telegram, second=telegram:/srv/st/second.session'
  Each lane has its own rate limits; new packs go to the lane with the most headroom.
  STORINATOR_COPIES=2 keeps each pack in two lanes: losing one lane loses nothing.
  Sign another account's lane in with `storinator-worker login --lane <name>`.";

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Log more (repeat for even more); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

/// For the commands that unlock the key.
#[derive(Args, Debug, Clone, Default)]
pub struct Pass {
    /// Read the passphrase from the first line of this file (instead of
    /// STORINATOR_PASSPHRASE or a prompt).
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// For the commands that act on one owner's backups.
#[derive(Args, Debug, Clone)]
pub struct Owner {
    /// Whose backups to act on: `local` (the CLI's own) or `tg:<telegram user id>` (a chat
    /// user's).
    #[arg(long, default_value = "local", value_name = "OWNER", value_parser = parse_owner)]
    pub owner: String,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create the installation key (once per installation; each owner gets its own at its first backup).
    ///
    /// A random master key is generated and stored wrapped under your passphrase (Argon2id)
    /// in the catalog and in storage. Keep the passphrase safe: without it nobody, you
    /// included, can read the backups.
    Init {
        #[command(flatten)]
        pass: Pass,
    },
    /// Back up a folder into a new snapshot.
    ///
    /// Stored paths start at the folder's own name (/srv/data -> data/...). Files unchanged
    /// since the last snapshot (same size, mtime and inode) are not read again; chunks
    /// already stored are not uploaded again. Exit code 3: the snapshot was saved but some
    /// files could not be read (listed as warnings).
    Backup {
        /// The folder to back up.
        path: PathBuf,
        /// Store this snapshot without encryption (readable without the key, still
        /// authenticated with it).
        #[arg(long)]
        no_encrypt: bool,
        #[command(flatten)]
        owner: Owner,
        #[command(flatten)]
        pass: Pass,
    },
    /// Restore a folder or file from a snapshot.
    ///
    /// PATH is a path as it was backed up (/srv/data/photos) or any folder or file under
    /// it. The selected item is restored as <DIR>/<its name>. Existing identical files are
    /// left alone; differing ones stop the restore unless --overwrite is given.
    Restore {
        /// What to restore, as it was backed up.
        path: String,
        /// Directory to restore into (created if missing).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Snapshot id (or a unique prefix); default: the latest containing PATH.
        #[arg(long, value_name = "ID")]
        snapshot: Option<String>,
        /// Replace existing files whose content differs.
        #[arg(long)]
        overwrite: bool,
        /// Don't restore recorded owners even as root (files then belong to the restoring
        /// user, and setuid/setgid bits are left out). Without root, owners are never
        /// restored.
        #[arg(long)]
        no_same_owner: bool,
        #[command(flatten)]
        owner: Owner,
        #[command(flatten)]
        pass: Pass,
    },
    /// List snapshots, optionally only those of PATH.
    Snapshots {
        /// Only snapshots of this backed-up folder, or of folders above or below it.
        path: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        owner: Owner,
    },
    /// List the contents of a backed-up folder (no passphrase needed).
    Ls {
        /// A path as it was backed up.
        path: String,
        /// Snapshot id (or a unique prefix); default: the latest containing PATH.
        #[arg(long, value_name = "ID")]
        snapshot: Option<String>,
        /// List everything below PATH, not just its children.
        #[arg(short, long)]
        recursive: bool,
        #[command(flatten)]
        owner: Owner,
    },
    /// Forget snapshots of PATH by a keep policy (restic's rules; periods in
    /// STORINATOR_TIMEZONE).
    ///
    /// A snapshot kept by any rule is kept; --dry-run lists what stays (and why) and what
    /// goes. The storage they used is freed by `prune`. A forgotten snapshot stays forgotten
    /// after `recover`. The last snapshot of a folder is only forgotten with --allow-empty.
    Forget {
        /// The backed-up folder.
        path: String,
        #[command(flatten)]
        keep: crate::retention_cli::KeepArgs,
        /// Show what would be forgotten, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Allow forgetting every snapshot of PATH.
        #[arg(long)]
        allow_empty: bool,
        #[command(flatten)]
        owner: Owner,
        #[command(flatten)]
        pass: Pass,
    },
    /// Delete packs no snapshot uses and rewrite sparse ones (safe alongside backups).
    Prune {
        #[command(flatten)]
        args: crate::retention_cli::PruneArgs,
        #[command(flatten)]
        pass: Pass,
    },
    /// Show what the repository stores: bytes and packs, per backed-up folder, the dedup
    /// ratio and what a prune would free now (no passphrase needed).
    Stats {
        /// Only this owner's folders (`local` or `tg:<id>`); default: everyone's.
        #[arg(long, value_name = "OWNER", value_parser = parse_owner)]
        owner: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the storage hosts that share this job database: the folders each serves and
    /// when one of its workers was last seen (the chat's /hosts).
    Hosts {
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Remove this host, gone for good (renamed or retired), so its folders stop being
        /// routed to it. Stop its workers first; refused while it has queued or running jobs.
        #[arg(long, value_name = "HOST")]
        forget: Option<String>,
    },
    /// Check that every pack the catalog references is in storage and intact.
    ///
    /// Without --read-data: presence, size and each pack's trailer. With it: every chunk is
    /// downloaded and authenticated. Exit code 1 when problems are found; each names the
    /// affected files.
    Verify {
        /// Also download every chunk and authenticate it (reads all stored data).
        #[arg(long)]
        read_data: bool,
        #[command(flatten)]
        pass: Pass,
    },
    /// Sign the worker's Telegram account in (phone, code, 2FA password).
    ///
    /// Needs TELEGRAM_API_ID and TELEGRAM_API_HASH (from https://my.telegram.org). The
    /// session is saved with mode 0600 at STORINATOR_SESSION_FILE (default
    /// <data dir>/worker.session). Run it once, interactively, on the storage host.
    Login {
        /// The lane of STORINATOR_STORAGE whose session to sign in (default: the worker's
        /// own session, STORINATOR_SESSION_FILE).
        #[arg(long)]
        lane: Option<String>,
    },
    /// Rebuild the catalog from storage alone (a new machine after a disaster).
    ///
    /// Needs only the storage settings and the passphrase: reads the wrapped key, every
    /// pack's trailer and every snapshot from storage.
    Recover {
        #[command(flatten)]
        pass: Pass,
    },
    /// Run the job daemon: claim the jobs the bot queues and run them until SIGTERM/SIGINT.
    ///
    /// On a signal it stops claiming, brings running jobs to a safe point, leaves them
    /// queued for the next run, and exits 0.
    Run {
        /// Jobs run at once.
        #[arg(long, env = "STORINATOR_WORKER_CONCURRENCY", default_value_t = 2)]
        concurrency: usize,
        #[command(flatten)]
        pass: Pass,
    },
    /// Manage the key.
    Key {
        #[command(subcommand)]
        command: KeyCommand,
    },
    /// Backups that run themselves: add, list, remove, pause and resume schedules.
    ///
    /// Schedules are fired by `storinator-worker run` (exactly once per slot, one catch-up
    /// after downtime), in STORINATOR_TIMEZONE. They belong to --owner (default `local`).
    Schedule {
        #[command(subcommand)]
        command: ScheduleCommand,
        #[command(flatten)]
        owner: Owner,
    },
    /// Read packs back within a budget, authenticate every chunk, heal damage from the files
    /// on disk.
    ///
    /// The daily scrub of `run` does the same with STORINATOR_SCRUB_BYTES_PER_DAY. Exit code
    /// 1 when damage remains that could not be healed; each affected file is named.
    Scrub {
        /// Bytes to read (like 512MiB or 2GiB); default STORINATOR_SCRUB_BYTES_PER_DAY.
        #[arg(long, value_name = "SIZE")]
        bytes: Option<String>,
        /// Only show the rotation: when every pack was last read.
        #[arg(long)]
        status: bool,
        #[command(flatten)]
        pass: Pass,
    },
}

#[derive(Subcommand, Debug)]
pub enum ScheduleCommand {
    /// Add a schedule: `schedule add /srv/data daily 03:00 --keep "daily 7 weekly 4"`.
    ///
    /// WHEN is hourly, daily [HH:MM], weekly <day> [HH:MM], every <N>h, or a cron expression
    /// (quote it: "0 3 * * 1-5").
    Add {
        /// The folder to back up.
        path: PathBuf,
        /// When to back it up.
        #[arg(required = true, num_args = 1..)]
        when: Vec<String>,
        /// Retention policy kept with the schedule, like "daily 7 weekly 4 monthly 12".
        #[arg(long, value_name = "POLICY")]
        keep: Option<String>,
        /// Store the snapshots without encryption.
        #[arg(long)]
        no_encrypt: bool,
    },
    /// List the schedules with their next run, last result and last snapshot.
    List,
    /// Remove a schedule.
    Rm { id: i64 },
    /// Pause a schedule (its slots pass without a backup and without alerts).
    Pause { id: i64 },
    /// Resume a paused schedule from its next slot.
    Resume { id: i64 },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// Change the passphrase (re-wraps the key; no data is re-encrypted).
    ///
    /// The new passphrase comes from STORINATOR_NEW_PASSPHRASE or a prompt.
    Passwd {
        #[command(flatten)]
        pass: Pass,
    },
}

fn parse_owner(s: &str) -> Result<String, String> {
    storinator_shared::check_owner(s)
        .map(|()| s.to_string())
        .map_err(|e| e.to_string())
}

/// Exit code for "snapshot saved, but some files were left out".
pub const EXIT_WARNINGS: u8 = 3;

/// How glibc's malloc serves the engine (called once, before any thread starts):
///
/// - Two arenas, not the default of eight per core. The engine's threads (readers, sealers,
///   writers, the runtime's) each allocate and free chunk-sized buffers; every arena keeps
///   what was freed in it, so the process's peak memory grew with the number of threads that
///   ever ran rather than with what it holds. Measured on a first backup of 300,000 small
///   files: 111 MB peak with the default, 82 MB with two arenas, at the same speed.
/// - Blocks of 4 MiB and more straight from the kernel, and back to it when freed. By default
///   glibc raises that threshold to the size of each such block freed (up to 32 MiB), so
///   later blocks of several MiB come from the heap, where what is freed stays resident
///   (while a backup reads, its anonymous memory swung between 53 and 99 MB). A first backup of 1,000,000 small files peaked at 107 to
///   131 MiB (over the 128 MiB goal in 2 runs of 14) and at 84 to 95 MiB with the threshold
///   fixed at 4 MiB. Lower costs the large files: chunks (256 KiB to 4 MiB) would each be
///   mapped and faulted in afresh; at 1 MiB a 2 GiB file's backup took 16 % longer.
pub fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}

/// The fixed threshold of [`tune_malloc`].
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub const MMAP_THRESHOLD: libc::c_int = 4 << 20;

pub fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    init_tracing(cli.global.verbose + 1);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_tracing(verbose: u8) {
    // grammers logs its own connection trouble as warnings; the worker reports what failed
    // (and what to check) itself, so those only show from -v on.
    let default = match verbose {
        0 => "error",
        1 => {
            "warn,grammers_mtsender=error,grammers_mtproto=error,grammers_client=error,grammers_session=error"
        }
        2 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colours only for a person at a terminal; journald and log files get plain text.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Opens the configured storage: one backend, or the lanes of `STORINATOR_STORAGE`.
pub async fn open_storage(cfg: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    crate::lanes::open(cfg).await
}

/// The passphrase: --passphrase-file, then STORINATOR_PASSPHRASE(_FILE), then a prompt.
fn passphrase(pass: &Pass, cfg: &Config, confirm: bool) -> anyhow::Result<String> {
    if let Some(file) = &pass.passphrase_file {
        return Ok(storinator_shared::config::read_passphrase_file(
            "--passphrase-file",
            file,
        )?);
    }
    if let Some(p) = &cfg.passphrase {
        return Ok(p.expose().to_string());
    }
    prompt("passphrase", confirm)
}

fn prompt(what: &str, confirm: bool) -> anyhow::Result<String> {
    if !std::io::stdin().is_terminal() {
        bail!(
            "no {what} given\nhint: set STORINATOR_PASSPHRASE or pass --passphrase-file for non-interactive use"
        );
    }
    let p = rpassword::prompt_password(format!("{what}: ")).context("reading the passphrase")?;
    if p.is_empty() {
        bail!("the {what} is empty");
    }
    if confirm
        && rpassword::prompt_password(format!("repeat {what}: "))
            .context("reading the passphrase")?
            != p
    {
        bail!("the two entries differ");
    }
    Ok(p)
}

pub(crate) async fn open_repo(pass: &Pass, cfg: &Config) -> anyhow::Result<Repo> {
    Ok(begin_open_repo(pass, cfg).await?.finish().await?)
}

/// [`open_repo`] with the key still being unwrapped: for a command that has work needing
/// only the catalog to do meanwhile.
async fn begin_open_repo(pass: &Pass, cfg: &Config) -> anyhow::Result<Unlocking> {
    let catalog = Catalog::open(&cfg.database_url).await?;
    let storage = open_storage(cfg).await?;
    let pass = passphrase(pass, cfg, false)?;
    Ok(Repo::begin_open(catalog, storage, &pass, EngineSettings::from_config(cfg)).await?)
}

/// Cancels the flag on Ctrl-C so long commands stop at a safe point.
fn cancel_on_ctrl_c() -> CancelFlag {
    let cancel = CancelFlag::new();
    let c = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("\ninterrupted: stopping at the next safe point (finished packs are kept)");
            c.cancel();
        }
    });
    cancel
}

pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let cfg = Config::from_env()?;
    match cli.command {
        Command::Init { pass } => {
            let catalog = Catalog::open(&cfg.database_url).await?;
            let storage = open_storage(&cfg).await?;
            if let Some(existing) = catalog
                .user_key(storinator_shared::engine::repo::KEY_USER)
                .await?
            {
                return Err(Error::KeyExists {
                    key_id: existing.key_id,
                }
                .into());
            }
            let pass = passphrase(&pass, &cfg, true)?;
            let key = Repo::init(&catalog, storage.as_ref(), &pass, kdf_params()).await?;
            println!(
                "created key {} (stored wrapped in the catalog and in {})",
                key.key_id,
                storage.describe()
            );
            println!("keep your passphrase safe: it is the only way to read these backups");
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup {
            path,
            no_encrypt,
            owner,
            pass,
        } => {
            // Another run backing up the same folder (the daemon, another cron job): say so
            // and stop, rather than queue up behind it.
            let repo = open_repo(&pass, &cfg).await?.with_lock_wait(false);
            let cancel = cancel_on_ctrl_c();
            let bar = Bar::new(&format!("backing up {}", path.display()));
            let opts = BackupOptions {
                path: path.clone(),
                owner: owner.owner.clone(),
                encrypt: !no_encrypt,
            };
            let result = repo.backup(&opts, &bar, &cancel).await;
            bar.finish();
            let summary = result.with_context(|| format!("backup of {} failed", path.display()))?;
            for w in &summary.warnings {
                eprintln!("warning: {}: {}", w.path, w.message);
            }
            println!("{}", summary.line());
            if summary.warnings.is_empty() {
                Ok(ExitCode::SUCCESS)
            } else {
                let n = summary.warnings.len() as u64;
                eprintln!(
                    "snapshot saved, but {} left out or changed while read (see warnings)",
                    plural(n, "item was", "items were")
                );
                Ok(ExitCode::from(EXIT_WARNINGS))
            }
        }
        Command::Restore {
            path,
            to,
            snapshot,
            overwrite,
            no_same_owner,
            owner,
            pass,
        } => {
            // The checking pass runs while the key is unwrapped.
            let repo = begin_open_repo(&pass, &cfg).await?;
            let cancel = cancel_on_ctrl_c();
            let bar = Bar::new(&format!("restoring {path}"));
            let opts = RestoreOptions {
                path: path.clone(),
                to,
                snapshot,
                owner: owner.owner.clone(),
                overwrite,
                // The operator names the target: no roots to keep it in.
                within: None,
                same_owner: no_same_owner.then_some(false),
            };
            let result = repo.restore(&opts, &bar, &cancel).await;
            bar.finish();
            match result {
                Ok(summary) => {
                    for note in summary.notes() {
                        eprintln!("{note}");
                    }
                    println!("{}", summary.line());
                    Ok(ExitCode::SUCCESS)
                }
                Err(Error::RestoreFailed { failures }) => {
                    for (p, why) in &failures {
                        eprintln!("failed: {p}: {why}");
                    }
                    Err(anyhow!(
                        "restore of {path}: {} could not be restored (listed above); the rest was restored, and no file was written unverified",
                        plural(failures.len() as u64, "item", "items")
                    ))
                }
                Err(e) => Err(anyhow::Error::new(e).context(format!("restore of {path} failed"))),
            }
        }
        Command::Hosts { json, forget } => {
            let catalog = Catalog::open(&cfg.database_url).await?;
            let jobs = storinator_shared::Jobs::new(catalog.pool().clone());
            if let Some(name) = forget {
                if !jobs.forget_host(&name).await? {
                    bail!(
                        "no storage host is called {name}\nhint: `storinator-worker hosts` lists them"
                    );
                }
                println!("forgot host {name}; its folders are no longer routed to it");
                return Ok(ExitCode::SUCCESS);
            }
            let hosts = jobs.hosts().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&hosts)?);
            } else if hosts.is_empty() {
                println!(
                    "no storage host has registered yet (a worker registers when `storinator-worker run` starts)"
                );
            } else {
                let now = jobs.now_ms();
                println!(
                    "{:<20}  {:<16}  {:<24}  restores into",
                    "host", "last seen", "backs up"
                );
                for h in hosts {
                    println!(
                        "{:<20}  {:<16}  {:<24}  {}",
                        h.name,
                        storinator_shared::ops::hosts::seen_ago(now, h.last_seen),
                        h.backup_roots.join(", "),
                        h.restore_roots.join(", ")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Snapshots { path, json, owner } => {
            let catalog = Catalog::open(&cfg.database_url).await?;
            let list =
                storinator_shared::list_snapshots(&catalog, &owner.owner, path.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.is_empty() {
                println!(
                    "no snapshots{}",
                    path.map(|p| format!(" of {p}")).unwrap_or_default()
                );
            } else {
                println!(
                    "{:<12}  {:<16}  {:>8}  {:>10}  {:>10}  root",
                    "id", "time (UTC)", "files", "size", "new"
                );
                for s in list {
                    println!(
                        "{:<12}  {:<16}  {:>8}  {:>10}  {:>10}  {}{}",
                        s.short_id,
                        format_time(s.finished_at),
                        s.files,
                        human_bytes(s.bytes),
                        human_bytes(s.bytes_stored),
                        s.root,
                        if s.encrypted { "" } else { " (unencrypted)" }
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls {
            path,
            snapshot,
            recursive,
            owner,
        } => {
            // A listing needs no key: the catalog answers, as it does for the chat's /ls.
            let catalog = Catalog::open(&cfg.database_url).await?;
            let (snap, entries) = storinator_shared::ls(
                &catalog,
                &owner.owner,
                &path,
                snapshot.as_deref(),
                recursive,
            )
            .await?;
            println!(
                "snapshot {} of {} ({})",
                snap.short_id,
                snap.root,
                format_time(snap.finished_at)
            );
            for e in &entries {
                println!("{}", format_entry(e));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Forget {
            path,
            keep,
            dry_run,
            allow_empty,
            owner,
            pass,
        } => {
            crate::retention_cli::forget(
                &cfg,
                &owner.owner,
                &pass,
                &path,
                &keep,
                dry_run,
                allow_empty,
            )
            .await
        }
        Command::Prune { args, pass } => crate::retention_cli::prune(&cfg, &pass, &args).await,
        Command::Stats { owner, json } => {
            crate::retention_cli::stats(&cfg, owner.as_deref(), json).await
        }
        Command::Verify { read_data, pass } => {
            let repo = open_repo(&pass, &cfg).await?;
            let bar = Bar::new("verifying");
            let report = repo.verify(read_data, &bar).await;
            bar.finish();
            let report = report?;
            for p in &report.problems {
                eprintln!("problem: {p}");
            }
            println!(
                "checked {}{} ({} read): {}",
                plural(report.packs_checked, "pack", "packs"),
                if read_data {
                    format!(", {}", plural(report.blobs_checked, "chunk", "chunks"))
                } else {
                    String::new()
                },
                human_bytes(report.bytes_read),
                if report.problems.is_empty() {
                    "no problems".to_string()
                } else {
                    plural(report.problems.len() as u64, "problem", "problems")
                }
            );
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Login { lane } => {
            let tcfg = match lane {
                None => crate::telegram::TelegramConfig::from_config(&cfg)?,
                Some(name) => {
                    let Some(spec) = cfg.lanes.iter().find(|l| l.name == name) else {
                        let names: Vec<&str> = cfg.lanes.iter().map(|l| l.name.as_str()).collect();
                        anyhow::bail!(
                            "no lane named {name:?} in STORINATOR_STORAGE\nhint: its lanes are {}",
                            names.join(", ")
                        );
                    };
                    crate::lanes::telegram_config(&cfg, spec)?.ok_or_else(|| {
                        anyhow::anyhow!("lane {name:?} is not a Telegram lane: nothing to sign in")
                    })?
                }
            };
            let session = tcfg.session_path.clone();
            crate::telegram::login_interactive(&tcfg, &session).await?;
            println!("signed in; session saved at {}", session.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Recover { pass } => {
            let catalog = Catalog::open(&cfg.database_url).await?;
            let storage = open_storage(&cfg).await?;
            let pass = passphrase(&pass, &cfg, false)?;
            let bar = Bar::new("recovering");
            let result = storinator_shared::recover(
                catalog,
                storage,
                &pass,
                EngineSettings::from_config(&cfg),
                &bar,
            )
            .await;
            bar.finish();
            let (_, report) = result?;
            for p in &report.problems {
                eprintln!("problem: {p}");
            }
            println!(
                "recovered {} ({}) and {} into {}",
                plural(report.packs, "pack", "packs"),
                plural(report.chunks, "chunk", "chunks"),
                plural(report.snapshots, "snapshot", "snapshots"),
                cfg.database_url
            );
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Run { concurrency, pass } => {
            let catalog = Catalog::open(&cfg.database_url).await?;
            // With Telegram storage the same account also sends `/get` files over the Bot
            // API's 50 MB to its Saved Messages.
            let (storage, account) = crate::lanes::open_with_account(&cfg).await?;
            let courier = account.map(|tg| Arc::new(tg) as Arc<dyn crate::daemon::Courier>);
            let pass = passphrase(&pass, &cfg, false)?;
            let repo =
                Repo::open(catalog, storage, &pass, EngineSettings::from_config(&cfg)).await?;
            let jobs = storinator_shared::Jobs::new(repo.catalog.pool().clone());
            let daemon_cfg = crate::daemon::DaemonConfig {
                concurrency,
                restore_roots: cfg.restore_roots.clone(),
                outbox_dir: cfg.outbox_dir(),
                courier,
                host: Some(host_registration(&cfg)),
                // Leases name the host, so the job table shows where each job runs.
                worker_id: format!("{}-{}", cfg.host, std::process::id()),
                ..Default::default()
            };
            let unattended = crate::daemon::Unattended::from_config(&cfg, &jobs)?;
            crate::daemon::run_with(
                Arc::new(repo),
                jobs,
                daemon_cfg,
                Some(unattended),
                crate::daemon::shutdown_signal(),
            )
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Schedule { command, owner } => {
            crate::schedule_cli::run(&owner.owner, &cfg, command).await
        }
        Command::Scrub {
            bytes,
            status,
            pass,
        } => crate::schedule_cli::scrub(&pass, &cfg, bytes.as_deref(), status).await,
        Command::Key {
            command: KeyCommand::Passwd { pass },
        } => {
            let catalog = Catalog::open(&cfg.database_url).await?;
            let storage = open_storage(&cfg).await?;
            let old = passphrase(&pass, &cfg, false)?;
            let new = match std::env::var("STORINATOR_NEW_PASSPHRASE") {
                Ok(p) if !p.is_empty() => p,
                _ => prompt("new passphrase", true)?,
            };
            let key = Repo::change_passphrase(&catalog, storage.as_ref(), &old, &new, kdf_params())
                .await?;
            println!(
                "passphrase changed for key {}; remember to update STORINATOR_PASSPHRASE",
                key.key_id
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Argon2id cost: interactive strength, unless tests ask for the fast setting.
fn kdf_params() -> KdfParams {
    if std::env::var("STORINATOR_INSECURE_FAST_KDF").as_deref() == Ok("1") {
        KdfParams::fast_for_tests()
    } else {
        KdfParams::interactive()
    }
}

/// What `run` registers for its host: `STORINATOR_HOST` and the canonical roots (as
/// schedules check them when they fire).
fn host_registration(cfg: &Config) -> storinator_shared::ops::hosts::Registration {
    let canonical = |roots: &[PathBuf]| {
        roots
            .iter()
            .map(|r| {
                r.canonicalize()
                    .unwrap_or_else(|_| r.clone())
                    .display()
                    .to_string()
            })
            .collect()
    };
    storinator_shared::ops::hosts::Registration {
        name: cfg.host.clone(),
        backup_roots: canonical(&cfg.backup_roots),
        restore_roots: canonical(&cfg.restore_roots),
    }
}
