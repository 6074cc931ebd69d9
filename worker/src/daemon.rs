//! `storinator-worker run`: the job daemon. Claims jobs from the job table, runs them with
//! the engine (bounded concurrency), heartbeats, writes progress about once a second and
//! records the outcome.
//!
//! Shutdown (SIGTERM/SIGINT → the `shutdown` future): no new claims; running jobs are told to
//! stop at their next safe point (finished packs are kept) and are released back to the queue
//! without spending a retry, so the next run resumes them.
//!
//! With [`Unattended`] settings the daemon also fires due schedules (each slot exactly once,
//! whatever the number of daemons: see `ops::schedules`), runs the daily scrub as a scheduled
//! job, and pings the healthcheck URL after each scheduled backup.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use storinator_shared::engine::restore::resolve;
use storinator_shared::ops::hosts::Registration;
use storinator_shared::ops::rules::FireRules;
use storinator_shared::ops::schedules::RunOutcome;
use storinator_shared::{
    BackupOptions, CancelFlag, Error, ForgetOptions, Job, JobArgs, JobError, JobResult, JobState,
    Jobs, KeepPolicy, Lease, Progress, ProgressReport, PruneOptions, Repo, RestoreOptions,
    Schedules, ScrubOptions, Signal, Storage, Throttle, TransferEstimate,
};

use crate::healthcheck::Healthcheck;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Daemon tunables.
#[derive(Clone)]
pub struct DaemonConfig {
    /// Lease owner name; unique per process so leases of a dead process are recognisable.
    pub worker_id: String,
    /// Jobs run at once.
    pub concurrency: usize,
    /// Pause between claim attempts when the queue is empty.
    pub poll_interval: Duration,
    /// How often a running job writes progress (or, with nothing new, a heartbeat). Must be
    /// well below the job table's lease time.
    pub progress_interval: Duration,
    /// Folders restores from the chat may write into (`STORINATOR_RESTORE_ROOTS`, default
    /// `STORINATOR_BACKUP_ROOTS`). The worker enforces them itself, on the directory handle the
    /// restore writes through: the bot's check of a path can be outrun by a symlink swapped in
    /// before the job runs. Empty: restore jobs are refused.
    pub restore_roots: Vec<PathBuf>,
    /// Where files restored for `/get` wait (0700) until the bot has sent them.
    pub outbox_dir: PathBuf,
    /// Sends files over the Bot API's limit through the worker's own Telegram account
    /// (`None` with directory storage: such files are refused with a hint).
    pub courier: Option<Arc<dyn Courier>>,
    /// The storage host this daemon serves (`STORINATOR_HOST` and its roots): registered with
    /// a heartbeat, and only its jobs (and those of no host) are claimed. `None`: a daemon of
    /// no particular host, which claims only jobs of no host (see `ops::hosts`).
    pub host: Option<Registration>,
    /// How often the host's heartbeat (`last_seen`, shown by `/hosts`) is renewed.
    pub host_heartbeat: Duration,
}

impl std::fmt::Debug for DaemonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DaemonConfig")
            .field("worker_id", &self.worker_id)
            .field("concurrency", &self.concurrency)
            .field("outbox_dir", &self.outbox_dir)
            .field("courier", &self.courier.is_some())
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// Sends a file through the worker's own Telegram account, to its Saved Messages: the way
/// `/get` delivers files over the Bot API's 50 MB.
#[async_trait::async_trait]
pub trait Courier: Send + Sync {
    async fn send_to_saved_messages(
        &self,
        path: &Path,
        name: &str,
        caption: &str,
    ) -> Result<(), storinator_shared::StorageError>;
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            worker_id: format!(
                "{}-{}",
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "worker".into()),
                std::process::id()
            ),
            concurrency: 2,
            poll_interval: Duration::from_secs(1),
            progress_interval: Duration::from_secs(1),
            restore_roots: Vec::new(),
            outbox_dir: std::env::temp_dir().join("storinator-outbox"),
            courier: None,
            host: None,
            host_heartbeat: Duration::from_secs(30),
        }
    }
}

/// What the daemon does unattended: schedules, the daily scrub, the healthcheck push.
#[derive(Clone)]
pub struct Unattended {
    /// The schedules table (its job table's clock and the schedule time zone).
    pub schedules: Schedules,
    /// What a schedule must still satisfy when it fires.
    pub rules: FireRules,
    /// How often due schedules are looked for.
    pub tick: Duration,
    /// Pinged after each scheduled backup (`/fail` appended after a failure).
    pub healthcheck: Option<Healthcheck>,
    /// When the daily scrub runs (`None`: never), and how many bytes it reads.
    pub scrub_at: Option<(u8, u8)>,
    pub scrub_bytes: u64,
    /// Probe every storage lane daily (the canary, see `engine::canary`), on the schedules'
    /// clock, looking every `tick`.
    pub canary: bool,
}

impl Unattended {
    /// The settings of `cfg` over the job table `jobs`.
    pub fn from_config(cfg: &storinator_shared::Config, jobs: &Jobs) -> anyhow::Result<Self> {
        let u = &cfg.unattended;
        Ok(Unattended {
            schedules: Schedules::new(jobs.clone(), u.timezone.clone()),
            rules: FireRules::from_config(cfg),
            tick: Duration::from_secs(5),
            healthcheck: u
                .healthcheck_url
                .as_deref()
                .map(Healthcheck::new)
                .transpose()?,
            scrub_at: u.scrub_at,
            scrub_bytes: u.scrub_bytes_per_day,
            canary: true,
        })
    }
}

/// Run the daemon until `shutdown` completes and every running job reached a safe point.
pub async fn run(
    repo: Arc<Repo>,
    jobs: Jobs,
    cfg: DaemonConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    run_with(repo, jobs, cfg, None, shutdown).await
}

/// [`run`], also firing schedules and running the scrub when `unattended` is given.
pub async fn run_with(
    repo: Arc<Repo>,
    jobs: Jobs,
    cfg: DaemonConfig,
    unattended: Option<Unattended>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut running = JoinSet::new();
    tokio::pin!(shutdown);
    let host = cfg.host.as_ref().map(|h| h.name.clone());
    let _host_beat = match &cfg.host {
        Some(reg) => {
            jobs.register_host(reg).await?;
            Some(AbortOnDrop(tokio::spawn(host_heartbeat(
                jobs.clone(),
                reg.clone(),
                cfg.host_heartbeat,
            ))))
        }
        None => None,
    };
    tracing::info!(
        worker = cfg.worker_id,
        host,
        concurrency = cfg.concurrency,
        "worker daemon started"
    );
    let scheduler = match &unattended {
        Some(u) => {
            if let Err(e) = u.schedules.ensure_scrub(u.scrub_at).await {
                tracing::warn!("setting up the daily scrub failed: {e}");
            }
            Some(AbortOnDrop(tokio::spawn(fire_schedules(u.clone()))))
        }
        None => None,
    };
    let _canary = match &unattended {
        Some(u) if u.canary => Some(AbortOnDrop(tokio::spawn(canary(
            repo.clone(),
            u.schedules.clone(),
            u.tick,
        )))),
        _ => None,
    };
    let ctx = Arc::new(JobContext {
        healthcheck: unattended.as_ref().and_then(|u| u.healthcheck.clone()),
        scrub_bytes: unattended
            .as_ref()
            .map(|u| u.scrub_bytes)
            .unwrap_or(storinator_shared::config::DEFAULT_SCRUB_BYTES_PER_DAY),
        restore_roots: cfg.restore_roots.clone(),
        backup_roots: cfg
            .host
            .as_ref()
            .map(|h| h.backup_roots.iter().map(PathBuf::from).collect())
            .unwrap_or_default(),
        tz: unattended
            .as_ref()
            .map(|u| u.schedules.tz().clone())
            .unwrap_or(jiff::tz::TimeZone::UTC),
        schedules: unattended.as_ref().map(|u| u.schedules.clone()),
    });

    loop {
        // Reap finished job tasks so the set doesn't grow.
        while let Some(done) = running.try_join_next() {
            if let Err(e) = done {
                tracing::error!("job task panicked: {e}");
            }
        }
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = permits.clone().acquire_owned() => p.expect("semaphore is never closed"),
        };
        match jobs.claim_on(&cfg.worker_id, host.as_deref()).await {
            Ok(Some((job, lease))) => {
                tracing::info!(
                    job = job.id,
                    attempt = lease.attempt,
                    kind = job.args.kind(),
                    "claimed job"
                );
                let (repo, jobs, cfg, stop, ctx) = (
                    repo.clone(),
                    jobs.clone(),
                    cfg.clone(),
                    stop_rx.clone(),
                    ctx.clone(),
                );
                running.spawn(async move {
                    run_job(&repo, &jobs, &cfg, &ctx, job, lease, stop).await;
                    drop(permit);
                });
            }
            Ok(None) => {
                drop(permit);
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(cfg.poll_interval) => {}
                }
            }
            Err(e) => {
                drop(permit);
                tracing::warn!("claiming a job failed: {e}");
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(cfg.poll_interval) => {}
                }
            }
        }
    }

    drop(scheduler);
    tracing::info!(
        running = running.len(),
        "shutting down: stopping running jobs at a safe point"
    );
    let _ = stop_tx.send(true);
    while let Some(done) = running.join_next().await {
        if let Err(e) = done {
            tracing::error!("job task panicked: {e}");
        }
    }
    tracing::info!("worker daemon stopped");
    Ok(())
}

/// Renews the host's heartbeat every `every` until aborted; registers again if the host row
/// is gone. Errors are logged and retried next time.
async fn host_heartbeat(jobs: Jobs, reg: Registration, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is now: registration just marked the host seen
    loop {
        tick.tick().await;
        let renewed = match jobs.host_heartbeat(&reg.name).await {
            Ok(true) => Ok(()),
            Ok(false) => jobs.register_host(&reg).await,
            Err(e) => Err(e),
        };
        if let Err(e) = renewed {
            tracing::warn!(host = reg.name, "renewing the host's heartbeat failed: {e}");
        }
    }
}

/// Probes the storage lanes when a day has passed since the last probe (by the schedules'
/// clock, so tests move it), looking every tick until aborted. Errors are logged and retried
/// next tick.
async fn canary(repo: Arc<Repo>, schedules: Schedules, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = schedules.now_ms();
        match storinator_shared::engine::canary::due(&repo, now).await {
            Ok(false) => {}
            Ok(true) => {
                if let Err(e) = storinator_shared::engine::canary::probe(&repo, now).await {
                    tracing::warn!("probing the storage lanes failed: {e}");
                }
            }
            Err(e) => tracing::warn!("reading lane health failed: {e}"),
        }
    }
}

/// Fires due schedules every tick until aborted. Errors are logged and retried next tick.
async fn fire_schedules(u: Unattended) {
    let mut tick = tokio::time::interval(u.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match u.schedules.fire_due(&u.rules).await {
            Ok(fired) => {
                for f in fired.iter().filter(|f| f.outcome == RunOutcome::Refused) {
                    tracing::warn!(
                        schedule = f.schedule_id,
                        "scheduled backup refused: {}",
                        f.detail.as_deref().unwrap_or("")
                    );
                    if let Some(h) = &u.healthcheck {
                        h.ping(false).await;
                    }
                }
            }
            Err(e) => tracing::warn!("firing schedules failed: {e}"),
        }
    }
}

/// What jobs need besides the repository and the job table.
struct JobContext {
    healthcheck: Option<Healthcheck>,
    /// The scrub's budget when a scrub job names none.
    scrub_bytes: u64,
    /// See [`DaemonConfig::restore_roots`].
    restore_roots: Vec<PathBuf>,
    /// The host's backup roots: a chat user's backup is checked against them here, where
    /// the folder is (the bot, routing by registered roots, may not see it). Empty: no check.
    backup_roots: Vec<PathBuf>,
    /// The schedules' time zone: keep policies count days and weeks in it (UTC without
    /// unattended settings).
    tz: jiff::tz::TimeZone,
    /// The schedules table, for a scheduled backup's keep policy (`None`: no schedules run).
    schedules: Option<Schedules>,
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("signal received");
}

/// The engine's latest progress, its transfer estimate until the job table has it, and
/// whether storage is throttling the job.
#[derive(Default)]
struct Latest(
    Mutex<Option<ProgressReport>>,
    Mutex<Option<TransferEstimate>>,
    Mutex<Option<Throttle>>,
);

impl Progress for Latest {
    fn report(&self, report: &ProgressReport) {
        *self.0.lock().unwrap() = Some(report.clone());
    }

    fn estimate(&self, estimate: &TransferEstimate) {
        *self.1.lock().unwrap() = Some(estimate.clone());
    }

    fn throttled(&self, throttle: Option<&Throttle>) {
        *self.2.lock().unwrap() = throttle.cloned();
    }
}

/// Storage's throttle as the job sees it: the ETA recomputed for what the job has left.
fn job_throttle(storage: &dyn Storage, progress: Option<&ProgressReport>) -> Option<Throttle> {
    let mut t = storage.throttle()?;
    t.eta_secs = progress.and_then(|p| t.eta_for(p));
    Some(t)
}

/// Why the engine was asked to stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StopReason {
    User,
    Shutdown,
    LeaseLost,
}

async fn run_job(
    repo: &Repo,
    jobs: &Jobs,
    cfg: &DaemonConfig,
    ctx: &JobContext,
    job: Job,
    lease: Lease,
    mut stop: watch::Receiver<bool>,
) {
    let cancel = CancelFlag::new();
    let latest = Arc::new(Latest::default());
    let reason: Arc<Mutex<Option<StopReason>>> = Arc::default();

    // Heartbeat + progress writer, and the watcher for cancel / shutdown / lost lease.
    let beat = {
        let (jobs, lease, cancel, latest, reason, storage) = (
            jobs.clone(),
            lease.clone(),
            cancel.clone(),
            latest.clone(),
            reason.clone(),
            repo.storage.clone(),
        );
        let interval = cfg.progress_interval;
        tokio::spawn(async move {
            let mut written: Option<ProgressReport> = None;
            let mut throttle_written: Option<Throttle> = None;
            let stop_with = |r: StopReason| {
                reason.lock().unwrap().get_or_insert(r);
                cancel.cancel();
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    changed = stop.changed() => {
                        if changed.is_err() || *stop.borrow() {
                            stop_with(StopReason::Shutdown);
                        }
                    }
                }
                let estimate = latest.1.lock().unwrap().take();
                if let Some(e) = estimate {
                    let value = serde_json::to_value(&e).unwrap_or_default();
                    if let Err(err) = jobs.set_estimate(&lease, &value).await {
                        tracing::warn!("recording the estimate failed: {err}");
                    }
                }
                let now = latest.0.lock().unwrap().clone();
                latest.throttled(job_throttle(storage.as_ref(), now.as_ref()).as_ref());
                let throttle = latest.2.lock().unwrap().clone();
                if throttle != throttle_written {
                    if throttle_written.is_none()
                        && let Some(t) = &throttle
                    {
                        tracing::warn!(
                            job = lease.job_id,
                            rate = t.bytes_per_sec,
                            eta_secs = t.eta_secs,
                            "{}",
                            t.reason
                        );
                    }
                    match jobs.set_throttle(&lease, throttle.as_ref()).await {
                        Ok(()) => throttle_written = throttle,
                        Err(err) => tracing::warn!("recording the throttle failed: {err}"),
                    }
                }
                let res = match &now {
                    Some(r) if written.as_ref() != Some(r) => jobs.report_progress(&lease, r).await,
                    _ => jobs.heartbeat(&lease).await,
                };
                match res {
                    Ok(Signal::Continue) => written = now,
                    Ok(Signal::Cancel) => {
                        written = now;
                        stop_with(StopReason::User);
                    }
                    Err(JobError::LeaseLost { .. }) => {
                        tracing::warn!(job = lease.job_id, "lease lost; abandoning the job");
                        stop_with(StopReason::LeaseLost);
                        return;
                    }
                    Err(e) => tracing::warn!(job = lease.job_id, "heartbeat failed: {e}"),
                }
            }
        })
    };

    // If this task is dropped mid-job (runtime shutdown, abort), the heartbeat must stop too,
    // so the lease expires and another worker resumes the job.
    let beat = AbortOnDrop(beat);
    let owner = job.owner_name();
    let now_ms = jobs.now_ms();
    let outcome = execute(
        repo,
        cfg,
        ctx,
        &job,
        &owner,
        now_ms,
        latest.as_ref(),
        &cancel,
    )
    .await;
    drop(beat);
    let stopped = *reason.lock().unwrap();
    // A job quicker than one heartbeat still records its estimate.
    let pending = latest.1.lock().unwrap().take();
    if let Some(e) = pending
        && stopped != Some(StopReason::LeaseLost)
    {
        let _ = jobs
            .set_estimate(&lease, &serde_json::to_value(&e).unwrap_or_default())
            .await;
    }

    let recorded = match (outcome, stopped) {
        (_, Some(StopReason::LeaseLost)) => Ok(None),
        (Ok(result @ JobResult::Conflicts { .. }), _) => {
            let JobResult::Conflicts { count, .. } = &result else {
                unreachable!("matched above")
            };
            let msg = format!("{count} existing files differ from the backup");
            jobs.fail(&lease, &msg, Some(&result), false)
                .await
                .map(Some)
        }
        (Ok(result), _) => {
            tracing::info!(job = job.id, "job done");
            jobs.finish(&lease, &result)
                .await
                .map(|_| Some(JobState::Done))
        }
        (Err(Error::Cancelled), Some(StopReason::User)) => {
            tracing::info!(job = job.id, "job cancelled by its user");
            jobs.cancelled(&lease).await.map(|_| None)
        }
        (Err(Error::Cancelled), _) => {
            tracing::info!(
                job = job.id,
                "job stopped for shutdown; released for the next run"
            );
            jobs.release(&lease).await.map(|_| None)
        }
        (Err(e), _) => {
            let retry = e.is_retryable();
            tracing::warn!(job = job.id, retry, "job failed: {e}");
            jobs.fail(&lease, &e.to_string(), None, retry)
                .await
                .map(Some)
        }
    };
    match recorded {
        Err(e) => tracing::warn!(job = job.id, "recording the outcome failed: {e}"),
        // A scheduled backup's final outcome goes to the monitor (a retry is not final).
        Ok(Some(state @ (JobState::Done | JobState::Failed)))
            if job.schedule_id.is_some() && matches!(job.args, JobArgs::Backup { .. }) =>
        {
            if let Some(h) = &ctx.healthcheck {
                h.ping(state == JobState::Done).await;
            }
        }
        Ok(_) => {}
    }
}

/// After a successful scheduled backup: forget by the schedule's keep policy, if it has one
/// (forget, not prune: freeing storage stays an operator's decision).
/// The backup stands whatever happens here; a failure is recorded for the bot to tell the
/// schedule's owner (the next backup tries again). Never every snapshot of the root (no
/// `allow_empty`; a policy keeps the newest).
async fn apply_schedule_policy(
    repo: &Repo,
    ctx: &JobContext,
    job: &Job,
    owner: &str,
    cancel: &CancelFlag,
) {
    let (Some(schedules), Some(id), JobArgs::Backup { path, .. }) =
        (&ctx.schedules, job.schedule_id, &job.args)
    else {
        return;
    };
    let policy = match schedules.get(id).await {
        Ok(Some(s)) => s.retention,
        Ok(None) => None,
        Err(e) => {
            tracing::warn!(
                job = job.id,
                schedule = id,
                "reading the keep policy failed: {e}"
            );
            None
        }
    };
    let Some(policy) = policy else { return };
    let opts = ForgetOptions {
        owner: owner.to_string(),
        path: path.clone(),
        policy: policy.clone(),
        tz: ctx.tz.clone(),
        dry_run: false,
        allow_empty: false,
        only: None,
    };
    match repo.forget(&opts, cancel).await {
        Ok(r) => tracing::info!(
            job = job.id,
            schedule = id,
            forgotten = r.remove.len(),
            kept = r.keep.len(),
            "applied the schedule's {policy}"
        ),
        // Stopped for shutdown: nothing failed; the next backup applies the policy.
        Err(Error::Cancelled) => {}
        Err(e) => {
            tracing::warn!(
                job = job.id,
                schedule = id,
                "applying the schedule's {policy} failed: {e}"
            );
            let error = format!("{policy}: {e}");
            if let Err(e) = schedules.record_forget_failure(id, job.id, &error).await {
                tracing::warn!(job = job.id, "recording the failed keep policy failed: {e}");
            }
        }
    }
}

/// Where a chat restore writes: `to`, or without it the folder the item came from (differing
/// files then need the user's confirmation). Both must be absolute and free of `.` and `..`;
/// the engine then keeps the target inside the restore roots.
fn restore_target(path: &str, to: Option<&str>, roots: &[PathBuf]) -> Result<PathBuf, Error> {
    if roots.is_empty() {
        return Err(Error::Invalid(
            "this worker has no restore roots, so it refuses restores from the chat\nhint: set STORINATOR_RESTORE_ROOTS (or STORINATOR_BACKUP_ROOTS) in the worker's environment".into(),
        ));
    }
    let plain = |p: &Path| {
        p.is_absolute()
            && p.to_str()
                .is_some_and(|s| s.split('/').all(|c| c != "." && c != ".."))
    };
    let target = match to {
        Some(t) => PathBuf::from(t),
        None => {
            let p = Path::new(path);
            if !plain(p) {
                return Err(Error::Invalid(format!(
                    "{path:?} is not a plain absolute path: no restore in place"
                )));
            }
            p.parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| "/".into())
        }
    };
    if !plain(&target) {
        return Err(Error::Invalid(format!(
            "restore target {} is not a plain absolute path (no \".\" or \"..\")",
            target.display()
        )));
    }
    Ok(target)
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[allow(clippy::too_many_arguments)] // the job, its context and the engine hooks, each used
async fn execute(
    repo: &Repo,
    cfg: &DaemonConfig,
    ctx: &JobContext,
    job: &Job,
    owner: &str,
    now_ms: i64,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<JobResult, Error> {
    // The job table names users by number; a row written by anything but the bot may not.
    // Repository-wide jobs act on nobody's backups (the daily scrub is owned by `system`).
    if !matches!(job.args, JobArgs::Scrub { .. } | JobArgs::Verify { .. }) {
        storinator_shared::check_owner(owner)?;
    }
    match &job.args {
        JobArgs::Scrub { bytes } => {
            let started = std::time::Instant::now();
            let opts = ScrubOptions {
                budget: bytes.unwrap_or(ctx.scrub_bytes),
                now_ms,
                heal: true,
            };
            let r = repo.scrub(&opts, progress, cancel).await?;
            Ok(JobResult::Scrub {
                bytes_read: r.bytes_read,
                chunks_checked: r.chunks_checked,
                damaged: r.healed_chunks + r.unhealed_chunks,
                healed: r.healed_chunks,
                unhealed: r.unhealed_chunks,
                duration_ms: started.elapsed().as_millis() as u64,
            })
        }
        JobArgs::Backup { path, encrypt } => {
            // A chat user's folder must be inside this host's roots, after resolving `..`
            // and symlinks (the CLI's own backups are not bound to the chat's roots).
            let path = if owner.starts_with("tg:") && !ctx.backup_roots.is_empty() {
                storinator_shared::ops::rules::check_backup_path(path, &ctx.backup_roots)
                    .map_err(Error::Invalid)?
            } else {
                PathBuf::from(path)
            };
            let opts = BackupOptions {
                path,
                owner: owner.to_string(),
                encrypt: *encrypt,
            };
            let s = repo.backup(&opts, progress, cancel).await?;
            // Before the job is recorded done, so "done" means the policy was applied too.
            apply_schedule_policy(repo, ctx, job, owner, cancel).await;
            Ok(JobResult::Backup {
                snapshot: s.snapshot.short_id.clone(),
                files: s.snapshot.files,
                dirs: s.snapshot.dirs,
                bytes: s.snapshot.bytes,
                bytes_stored: s.snapshot.bytes_stored,
                new_chunks: s.new_data_chunks,
                warnings: s.warnings.len() as u64,
                duration_ms: s.duration_ms,
            })
        }
        JobArgs::Restore {
            path,
            to,
            snapshot,
            overwrite,
        } => {
            // Pin the snapshot first: a conflict prompt must overwrite with what it asked
            // about, not with whatever is latest when the user answers.
            let pinned = resolve(&repo.catalog, owner, path, snapshot.as_deref())
                .await?
                .snapshot
                .short_id;
            let to = restore_target(path, to.as_deref(), &ctx.restore_roots)?;
            let opts = RestoreOptions {
                path: path.clone(),
                to,
                snapshot: Some(pinned.clone()),
                owner: owner.to_string(),
                overwrite: *overwrite,
                within: Some(ctx.restore_roots.clone()),
                same_owner: None,
            };
            match repo.restore(&opts, progress, cancel).await {
                Ok(s) => {
                    for note in s.notes() {
                        tracing::warn!(job = owner, "{note}");
                    }
                    Ok(JobResult::Restore {
                        files: s.files,
                        bytes: s.bytes,
                        unchanged: s.unchanged,
                        errors: Vec::new(),
                        duration_ms: s.duration_ms,
                    })
                }
                Err(Error::Conflicts { paths }) => Ok(JobResult::Conflicts {
                    count: paths.len() as u64,
                    sample: paths
                        .iter()
                        .take(10)
                        .map(|p| p.display().to_string())
                        .collect(),
                    snapshot: Some(pinned),
                }),
                Err(e) => Err(e),
            }
        }
        JobArgs::Verify { .. } => {
            let started = std::time::Instant::now();
            let r = repo.verify(false, progress).await?;
            Ok(JobResult::Verify {
                objects: r.packs_checked,
                errors: r.problems,
                duration_ms: started.elapsed().as_millis() as u64,
            })
        }
        JobArgs::Forget {
            path,
            policy,
            snapshots,
        } => forget(repo, ctx, owner, path, policy, snapshots, cancel).await,
        JobArgs::Prune {
            max_repack,
            repack_below,
        } => {
            // Repository-wide, alongside backups (see `engine::prune`): no lock is taken.
            let started = std::time::Instant::now();
            let opts = PruneOptions {
                dry_run: false,
                max_repack: *max_repack,
                repack_below: *repack_below,
            };
            let r = repo.prune(&opts, progress, cancel).await?;
            Ok(JobResult::Prune {
                deleted_packs: r.deleted_objects,
                repacked_packs: r.repacked_packs,
                new_packs: r.new_packs,
                moved_bytes: r.repacked_bytes,
                freed_bytes: r.freed(),
                resumed_packs: r.resumed_packs,
                sparse_left: r.sparse_left,
                duration_ms: started.elapsed().as_millis() as u64,
            })
        }
        JobArgs::Get { path, snapshot } => {
            crate::get::run(
                repo,
                cfg,
                job.id,
                owner,
                path,
                snapshot.as_deref(),
                progress,
                cancel,
            )
            .await
        }
    }
}

/// A forget confirmed in the chat: the policy of the prompt, forgetting at most the snapshots
/// the user saw. Never the last snapshot of a root (no `allow_empty` from the chat).
async fn forget(
    repo: &Repo,
    ctx: &JobContext,
    owner: &str,
    path: &str,
    policy: &str,
    snapshots: &[String],
    cancel: &CancelFlag,
) -> Result<JobResult, Error> {
    let opts = ForgetOptions {
        owner: owner.to_string(),
        path: path.to_string(),
        policy: KeepPolicy::parse(policy).map_err(Error::Invalid)?,
        tz: ctx.tz.clone(),
        dry_run: false,
        allow_empty: false,
        only: Some(snapshots.to_vec()),
    };
    let r = repo.forget(&opts, cancel).await?;
    Ok(JobResult::Forget {
        forgotten: r.remove.len() as u64,
        kept: r.keep.len() as u64,
        tombstone: r.tombstone,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_restore_targets_are_plain_absolute_paths_and_need_roots() {
        let roots = vec![PathBuf::from("/srv")];
        assert_eq!(
            restore_target("/srv/data/photos", None, &roots).unwrap(),
            PathBuf::from("/srv/data")
        );
        assert_eq!(
            restore_target("/srv/x", Some("/srv/out"), &roots).unwrap(),
            PathBuf::from("/srv/out")
        );
        for (path, to) in [
            ("/srv/../etc/cron.d/x", None),
            ("/srv/./x/y", None),
            ("relative/x", None),
            ("/srv/x", Some("/srv/out/../../etc")),
            ("/srv/x", Some("out")),
        ] {
            assert!(restore_target(path, to, &roots).is_err(), "{path} {to:?}");
        }
        assert!(restore_target("/srv/.config/x", None, &roots).is_ok());
        let e = restore_target("/srv/x", Some("/srv/out"), &[]).unwrap_err();
        assert!(e.to_string().contains("STORINATOR_RESTORE_ROOTS"), "{e}");
    }
}
