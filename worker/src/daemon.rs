//! `storinator-worker run`: the job daemon. Claims jobs from the job table, runs them with
//! the engine (bounded concurrency), heartbeats, writes progress about once a second and
//! records the outcome.
//!
//! Shutdown (SIGTERM/SIGINT → the `shutdown` future): no new claims; running jobs are told to
//! stop at their next safe point (finished packs are kept) and are released back to the queue
//! without spending a retry, so the next run resumes them.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use storinator_shared::{
    BackupOptions, CancelFlag, Error, Job, JobArgs, JobError, JobResult, Jobs, Lease, Progress,
    ProgressReport, Repo, RestoreOptions, Signal, Storage, Throttle, TransferEstimate,
};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// Daemon tunables.
#[derive(Clone, Debug)]
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
        }
    }
}

/// Run the daemon until `shutdown` completes and every running job reached a safe point.
pub async fn run(
    repo: Arc<Repo>,
    jobs: Jobs,
    cfg: DaemonConfig,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    let permits = Arc::new(Semaphore::new(cfg.concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut running = JoinSet::new();
    tokio::pin!(shutdown);
    tracing::info!(
        worker = cfg.worker_id,
        concurrency = cfg.concurrency,
        "worker daemon started"
    );

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
        match jobs.claim(&cfg.worker_id).await {
            Ok(Some((job, lease))) => {
                tracing::info!(
                    job = job.id,
                    attempt = lease.attempt,
                    kind = job.args.kind(),
                    "claimed job"
                );
                let (repo, jobs, cfg, stop) =
                    (repo.clone(), jobs.clone(), cfg.clone(), stop_rx.clone());
                running.spawn(async move {
                    run_job(&repo, &jobs, &cfg, job, lease, stop).await;
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
    let owner = format!("tg:{}", job.user_id);
    let outcome = execute(repo, &job.args, &owner, latest.as_ref(), &cancel).await;
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
        (_, Some(StopReason::LeaseLost)) => Ok(()),
        (Ok(result), _) => {
            tracing::info!(job = job.id, "job done");
            jobs.finish(&lease, &result).await
        }
        (Err(Error::Cancelled), Some(StopReason::User)) => {
            tracing::info!(job = job.id, "job cancelled by its user");
            jobs.cancelled(&lease).await
        }
        (Err(Error::Cancelled), _) => {
            tracing::info!(
                job = job.id,
                "job stopped for shutdown; released for the next run"
            );
            jobs.release(&lease).await
        }
        (Err(Error::Conflicts { paths }), _) => {
            let sample = paths
                .iter()
                .take(10)
                .map(|p| p.display().to_string())
                .collect();
            let result = JobResult::Conflicts {
                count: paths.len() as u64,
                sample,
            };
            let msg = format!("{} existing files differ from the backup", paths.len());
            jobs.fail(&lease, &msg, Some(&result), false)
                .await
                .map(|_| ())
        }
        (Err(e), _) => {
            let retry = e.is_retryable();
            tracing::warn!(job = job.id, retry, "job failed: {e}");
            jobs.fail(&lease, &e.to_string(), None, retry)
                .await
                .map(|_| ())
        }
    };
    if let Err(e) = recorded {
        tracing::warn!(job = job.id, "recording the outcome failed: {e}");
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn execute(
    repo: &Repo,
    args: &JobArgs,
    owner: &str,
    progress: &dyn Progress,
    cancel: &CancelFlag,
) -> Result<JobResult, Error> {
    // The job table names users by number; a row written by anything but the bot may not.
    storinator_shared::check_owner(owner)?;
    match args {
        JobArgs::Backup { path, encrypt } => {
            let opts = BackupOptions {
                path: PathBuf::from(path),
                owner: owner.to_string(),
                encrypt: *encrypt,
            };
            let s = repo.backup(&opts, progress, cancel).await?;
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
            // Without a target the item goes back where it came from (differing files then
            // need the user's confirmation).
            let to = match to {
                Some(t) => PathBuf::from(t),
                None => Path::new(path)
                    .parent()
                    .map(Path::to_path_buf)
                    .unwrap_or_else(|| "/".into()),
            };
            let opts = RestoreOptions {
                path: path.clone(),
                to,
                snapshot: snapshot.clone(),
                owner: owner.to_string(),
                overwrite: *overwrite,
            };
            let s = repo.restore(&opts, progress, cancel).await?;
            Ok(JobResult::Restore {
                files: s.files,
                bytes: s.bytes,
                unchanged: s.unchanged,
                errors: Vec::new(),
                duration_ms: s.duration_ms,
            })
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
    }
}
