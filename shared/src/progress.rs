//! Progress reporting: the engine counts, a [`Progress`] implementation shows.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

/// What a long job is doing now.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Starting,
    Scanning,
    Uploading,
    Committing,
    Downloading,
    Verifying,
    /// Deleting and rewriting packs (`prune`).
    Pruning,
    Done,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Scanning => "scanning",
            Phase::Uploading => "backing up",
            Phase::Committing => "committing",
            Phase::Downloading => "restoring",
            Phase::Verifying => "verifying",
            Phase::Pruning => "pruning",
            Phase::Done => "done",
        }
    }
}

/// A point-in-time view of a job's progress.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProgressReport {
    pub phase: Phase,
    pub files_done: u64,
    pub files_total: u64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Bytes handed to storage (after dedup, compression and encryption).
    pub bytes_stored: u64,
}

/// What moving some bytes through a storage backend is expected to cost, under its current
/// limits (Telegram: message-class calls, part calls and the rate they are allowed at).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TransferEstimate {
    pub message_calls: u64,
    pub part_calls: u64,
    pub seconds: f64,
}

/// Storage slowed down by its provider for a long while (Telegram's FLOOD_PREMIUM_WAIT on a
/// free account), as a job's progress shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Throttle {
    /// For people: who limits what ("Telegram is limiting this account's upload speed ...").
    pub reason: String,
    /// Upload rate measured since the throttling began (a minute back at most), waits
    /// included.
    pub bytes_per_sec: f64,
    /// Bytes of uploads under way that are not sent yet.
    pub pending_bytes: u64,
    /// Seconds left for the job at the measured rate (see [`Throttle::eta_for`]).
    #[serde(default)]
    pub eta_secs: Option<u64>,
}

impl Throttle {
    /// Seconds until a job reporting `p` is done at the measured rate: what is being sent plus
    /// what is left to read, scaled by how much of what it read so far needed storing.
    pub fn eta_for(&self, p: &ProgressReport) -> Option<u64> {
        if self.bytes_per_sec <= 0.0 {
            return None;
        }
        let stored_per_read = if p.bytes_done > 0 {
            p.bytes_stored as f64 / p.bytes_done as f64
        } else {
            1.0
        };
        let left = p.bytes_total.saturating_sub(p.bytes_done) as f64 * stored_per_read;
        Some(((self.pending_bytes as f64 + left) / self.bytes_per_sec).ceil() as u64)
    }
}

/// Receives progress. Called often (every few hundred milliseconds and at phase changes):
/// implementations throttle as they need. Every method has a no-op default.
pub trait Progress: Send + Sync {
    fn report(&self, _report: &ProgressReport) {}

    /// The storage backend's estimate of the transfer ahead, sent once the job knows how
    /// much it has to move (after scanning).
    fn estimate(&self, _estimate: &TransferEstimate) {}

    /// The storage is throttled (`Some`, with the measured rate) or no longer is (`None`).
    fn throttled(&self, _throttle: Option<&Throttle>) {}
}

/// Shows nothing.
pub struct NoProgress;
impl Progress for NoProgress {}

/// Lock-free counters the engine's threads bump; `report()` reads them.
#[derive(Default)]
pub struct Counters {
    phase: Mutex<Phase>,
    pub files_done: AtomicU64,
    pub files_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub bytes_stored: AtomicU64,
}

impl Counters {
    pub fn set_phase(&self, phase: Phase) {
        *self.phase.lock().unwrap() = phase;
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn report(&self) -> ProgressReport {
        ProgressReport {
            phase: *self.phase.lock().unwrap(),
            files_done: self.files_done.load(Ordering::Relaxed),
            files_total: self.files_total.load(Ordering::Relaxed),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            bytes_stored: self.bytes_stored.load(Ordering::Relaxed),
        }
    }
}

/// A cancellation flag checked by the engine at safe points (between chunks and files).
#[derive(Clone, Default)]
pub struct CancelFlag(std::sync::Arc<std::sync::atomic::AtomicBool>);

impl CancelFlag {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// `1 file`, `2 files`: counts as people write them, in the chat and on the command line.
pub fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// The one dedup figure everything shows: the snapshot's bytes over the bytes this run
/// stored (`1.14×`). A run that stored next to nothing (an unchanged tree still writes its
/// small listing) gets a bounded figure instead of a meaningless one in the hundred thousands.
pub fn dedup_figure(bytes: u64, stored: u64) -> String {
    if stored == 0 {
        return "nothing new to store".into();
    }
    let ratio = bytes as f64 / stored as f64;
    if ratio >= 100.0 {
        "100× or more".into()
    } else {
        format!("{ratio:.2}×")
    }
}

/// `1.5 MiB`-style sizes.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;

    #[test]
    fn throttle_eta_counts_what_is_in_flight_and_what_is_left() {
        let t = Throttle {
            reason: "slow".into(),
            bytes_per_sec: 1000.0,
            pending_bytes: 5000,
            eta_secs: None,
        };
        // Half of what was read needed storing: 20 000 left to read is 10 000 to send.
        let p = ProgressReport {
            bytes_done: 40_000,
            bytes_total: 60_000,
            bytes_stored: 20_000,
            ..Default::default()
        };
        assert_eq!(t.eta_for(&p), Some(15));
        let stopped = Throttle {
            bytes_per_sec: 0.0,
            ..t
        };
        assert_eq!(stopped.eta_for(&p), None);
    }
}
