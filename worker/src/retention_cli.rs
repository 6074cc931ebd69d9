//! `storinator-worker forget` and `prune`: retention from the command line, answered by the
//! engine in `shared` (the chat asks the same functions).

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use storinator_shared::engine::forget::ForgetItem;
use storinator_shared::engine::policy::parse_duration;
use storinator_shared::ops::schedules::format_local;
use storinator_shared::{
    CancelFlag, Config, ForgetOptions, KeepPolicy, NoProgress, PruneOptions, human_bytes, plural,
};

use crate::cli::{Pass, open_repo};

/// The keep rules of `forget` (restic's names).
#[derive(Args, Debug, Clone, Default)]
pub struct KeepArgs {
    /// Keep the N newest snapshots.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest snapshot of each of the last N days that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest snapshot of each of the last N ISO weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest snapshot of each of the last N months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest snapshot of each of the last N years that have one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every snapshot taken within DURATION of the newest one (like 30d, 2w, 1y6m, 12h).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub keep_within: Option<i64>,
}

impl KeepArgs {
    fn policy(&self) -> KeepPolicy {
        KeepPolicy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
            within_ms: self.keep_within,
        }
    }
}

/// `prune`'s options.
#[derive(Args, Debug, Clone)]
pub struct PruneArgs {
    /// Say what would be deleted and rewritten, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Move at most this many live bytes by repacking in this run (like 500M, 2G).
    #[arg(long, value_name = "BYTES", value_parser = storinator_shared::config::parse_size)]
    pub max_repack: Option<u64>,
    /// Rewrite packs whose live share is below this percentage.
    #[arg(long, value_name = "PERCENT", default_value = "50", value_parser = storinator_shared::config::parse_percent)]
    pub repack_below: f64,
}

pub async fn forget(
    cfg: &Config,
    owner: &str,
    pass: &Pass,
    path: &str,
    keep: &KeepArgs,
    dry_run: bool,
    allow_empty: bool,
) -> anyhow::Result<ExitCode> {
    let repo = open_repo(pass, cfg).await?;
    let tz = cfg.unattended.timezone.clone();
    let opts = ForgetOptions {
        owner: owner.to_string(),
        path: path.to_string(),
        policy: keep.policy(),
        tz: tz.clone(),
        dry_run,
        allow_empty,
        only: None,
    };
    let report = repo
        .forget(&opts, &CancelFlag::new())
        .await
        .with_context(|| format!("forget of {path} failed"))?;
    let line = |verb: &str, i: &ForgetItem| {
        let why = if i.reasons.is_empty() {
            String::new()
        } else {
            format!("  {}", i.reasons.join(", "))
        };
        println!(
            "{verb:<6}  {}  {}{why}",
            i.snapshot.short_id,
            format_local(i.snapshot.started_at, &tz)
        );
    };
    println!(
        "{} (owner {}): {}{}",
        report.root,
        report.owner,
        opts.policy,
        if dry_run { " (dry run)" } else { "" }
    );
    for i in &report.keep {
        line("keep", i);
    }
    for i in &report.remove {
        line(if dry_run { "would forget" } else { "forget" }, i);
    }
    let n = report.remove.len() as u64;
    if dry_run {
        println!(
            "would forget {}, keep {}",
            plural(n, "snapshot", "snapshots"),
            report.keep.len()
        );
    } else {
        println!(
            "forgot {}, kept {}; run `storinator-worker prune` to free their storage",
            plural(n, "snapshot", "snapshots"),
            report.keep.len()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn prune(cfg: &Config, pass: &Pass, args: &PruneArgs) -> anyhow::Result<ExitCode> {
    let repo = open_repo(pass, cfg).await?;
    let opts = PruneOptions {
        dry_run: args.dry_run,
        max_repack: args.max_repack,
        repack_below: args.repack_below,
    };
    let r = repo
        .prune(&opts, &NoProgress, &CancelFlag::new())
        .await
        .context("prune failed")?;
    let (del, rep) = if r.dry_run {
        ("would delete", "would rewrite")
    } else {
        ("deleted", "rewrote")
    };
    println!(
        "{} in storage ({}) considered",
        plural(r.packs, "pack", "packs"),
        human_bytes(r.bytes)
    );
    println!(
        "{del} {} no snapshot uses ({})",
        plural(r.unused_packs, "pack", "packs"),
        human_bytes(r.unused_bytes)
    );
    println!(
        "{rep} {} below {}% live ({} of live data moved into {})",
        plural(r.repacked_packs, "sparse pack", "sparse packs"),
        args.repack_below,
        human_bytes(r.repacked_bytes),
        plural(r.new_packs, "new pack", "new packs")
    );
    if r.sparse_left > 0 {
        println!(
            "left {} for a later prune (over --max-repack, or holding unauthenticated old-format data)",
            plural(r.sparse_left, "sparse pack", "sparse packs")
        );
    }
    if r.resumed_packs > 0 {
        println!(
            "finished deleting {} an interrupted prune had condemned",
            plural(r.resumed_packs, "pack", "packs")
        );
    }
    if r.recent_packs > 0 {
        println!(
            "skipped {} newer than a backup still running",
            plural(r.recent_packs, "pack", "packs")
        );
    }
    println!(
        "{} {}",
        if r.dry_run { "would free" } else { "freed" },
        human_bytes(r.freed())
    );
    Ok(ExitCode::SUCCESS)
}

/// `storinator-worker stats`: stored bytes and packs, per folder, dedup, what prune would free.
pub async fn stats(cfg: &Config, owner: Option<&str>, json: bool) -> anyhow::Result<ExitCode> {
    let catalog = storinator_shared::Catalog::open(&cfg.database_url).await?;
    let u = storinator_shared::engine::prune::usage(&catalog, owner, cfg.pack_size).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&u)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "stored: {} in {} (one message each)",
        human_bytes(u.stored_bytes),
        plural(u.packs, "pack", "packs")
    );
    println!(
        "dedup ratio: {:.2}x (all snapshots in full / stored)",
        u.dedup_ratio
    );
    for r in &u.roots {
        println!(
            "{} (owner {}): {}, latest {}, {} added by its backups",
            r.root,
            r.owner,
            plural(r.snapshots, "snapshot", "snapshots"),
            human_bytes(r.latest_bytes),
            human_bytes(r.added_bytes)
        );
    }
    println!(
        "prune would free {} ({} unused, {} to rewrite)",
        human_bytes(u.prune_would_free),
        plural(u.unused_packs, "pack", "packs"),
        plural(u.sparse_packs, "sparse pack", "sparse packs")
    );
    if u.listings_unknown > 0 {
        println!(
            "note: {} from an older version; the figure is exact after the next prune",
            plural(u.listings_unknown, "snapshot", "snapshots")
        );
    }
    Ok(ExitCode::SUCCESS)
}
