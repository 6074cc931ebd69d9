//! `storinator-worker schedule ...` and `storinator-worker scrub`: the same schedules and scrub
//! as the chat's `/schedule` and `/scrub`, answered from the same `shared` queries.

use std::process::ExitCode;

use anyhow::{Context, anyhow};
use storinator_shared::ops::alerts::{AlertPolicy, Alerts, ScrubStatus};
use storinator_shared::ops::schedules::{NewSchedule, parse_retention, parse_when};
use storinator_shared::{
    Catalog, Config, Jobs, ScheduleError, Schedules, ScrubOptions, human_bytes,
};

use crate::cli::{Pass, ScheduleCommand, open_repo};
use crate::ui::Bar;

async fn schedules(cfg: &Config) -> anyhow::Result<Schedules> {
    let catalog = Catalog::open(&cfg.database_url).await?;
    Ok(Schedules::new(
        Jobs::new(catalog.pool().clone()),
        cfg.unattended.timezone.clone(),
    ))
}

fn not_found(e: ScheduleError, owner: &str) -> anyhow::Error {
    match e {
        ScheduleError::NotFound(id) => anyhow!(
            "{owner} has no schedule #{id}\nhint: `storinator-worker schedule list` shows them"
        ),
        e => e.into(),
    }
}

pub async fn run(owner: &str, cfg: &Config, command: ScheduleCommand) -> anyhow::Result<ExitCode> {
    let schedules = schedules(cfg).await?;
    let tz = cfg.unattended.timezone.clone();
    match command {
        ScheduleCommand::Add {
            path,
            when,
            keep,
            no_encrypt,
        } => {
            let canon = path
                .canonicalize()
                .with_context(|| format!("cannot schedule {}", path.display()))?;
            if !canon.is_dir() {
                return Err(anyhow!("cannot schedule {}: not a folder", path.display()));
            }
            let canon = canon
                .to_str()
                .ok_or_else(|| {
                    anyhow!(
                        "cannot schedule {}: path is not valid UTF-8",
                        path.display()
                    )
                })?
                .to_string();
            let when = parse_when(&when.join(" "))?;
            let retention = keep.as_deref().map(parse_retention).transpose()?;
            let (user_id, chat_id) = match owner.strip_prefix("tg:").map(str::parse::<i64>) {
                Some(Ok(id)) => (id, id),
                Some(Err(_)) => return Err(anyhow!("invalid --owner {owner:?}")),
                None => (0, 0),
            };
            let s = schedules
                .create(&NewSchedule {
                    owner: owner.to_string(),
                    user_id,
                    chat_id,
                    path: canon,
                    when,
                    encrypt: !no_encrypt,
                    retention,
                    // Made on this host, for its folder: its daemons fire it.
                    host: Some(cfg.host.clone()),
                })
                .await?;
            println!(
                "schedule #{} added: {} {}, first run {} (the daemon, `storinator-worker run`, fires it)",
                s.id,
                s.path,
                s.spec,
                storinator_shared::ops::schedules::format_local(s.next_slot, &tz)
            );
        }
        ScheduleCommand::List => {
            let alerts = Alerts::new(schedules, AlertPolicy::default());
            let list = alerts.statuses(owner).await?;
            if list.is_empty() {
                println!("no schedules for {owner}");
            }
            for st in list {
                println!("{}", st.line(&tz));
            }
        }
        ScheduleCommand::Rm { id } => {
            let s = schedules
                .remove(id, owner)
                .await
                .map_err(|e| not_found(e, owner))?;
            println!("schedule #{} removed ({} {})", s.id, s.path, s.spec);
        }
        ScheduleCommand::Pause { id } => {
            let s = schedules
                .set_paused(id, owner, true)
                .await
                .map_err(|e| not_found(e, owner))?;
            println!("schedule #{} paused ({} {})", s.id, s.path, s.spec);
        }
        ScheduleCommand::Resume { id } => {
            let s = schedules
                .set_paused(id, owner, false)
                .await
                .map_err(|e| not_found(e, owner))?;
            println!(
                "schedule #{} resumed; next run {}",
                s.id,
                storinator_shared::ops::schedules::format_local(s.next_slot, &tz)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn scrub(
    pass: &Pass,
    cfg: &Config,
    bytes: Option<&str>,
    status: bool,
) -> anyhow::Result<ExitCode> {
    let tz = &cfg.unattended.timezone;
    let budget = match bytes {
        Some(b) => storinator_shared::config::parse_size(b)
            .map_err(|e| anyhow!("invalid --bytes {b:?}: {e}"))?,
        None => cfg.unattended.scrub_bytes_per_day,
    };
    if status {
        let catalog = Catalog::open(&cfg.database_url).await?;
        for line in ScrubStatus::load(&catalog, budget)
            .await?
            .lines(tz, usize::MAX)
        {
            println!("{line}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let repo = open_repo(pass, cfg).await?;
    let bar = Bar::new(&format!("scrubbing {}", human_bytes(budget)));
    let opts = ScrubOptions {
        budget,
        now_ms: storinator_shared::catalog::now_ms(),
        heal: true,
    };
    let result = repo
        .scrub(&opts, &bar, &storinator_shared::CancelFlag::new())
        .await;
    bar.finish();
    let report = result?;
    for f in &report.findings {
        eprintln!("damage: {}", f.reason);
    }
    for f in &report.affected {
        let snaps = f.snapshots.join(", ");
        if f.healed {
            println!("healed: {} (snapshots {snaps})", f.disk_path());
        } else {
            eprintln!(
                "not healed: {} (snapshots {snaps}): {}",
                f.disk_path(),
                f.why.as_deref().unwrap_or("")
            );
        }
    }
    for m in &report.metadata {
        eprintln!("damaged metadata: {m}");
    }
    println!("scrub: {}", report.line());
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
