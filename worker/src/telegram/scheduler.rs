//! Rate-aware scheduling of Telegram calls.
//!
//! Telegram meters two things separately: message-level calls (sendMedia, getHistory, ...;
//! about 100 per minute) and file part transfers (paced by FLOOD_WAIT feedback). Message calls
//! go through a token bucket; both classes can be paused by a FLOOD_WAIT for exactly as long as
//! the server asked. Part transfers run under a window of parts in flight, shared by every
//! upload and read of the storage (see [`Window`]): it grows while parts go through and
//! halves on a flood wait or a failed part, so a link with a long round trip is kept full
//! without hammering Telegram. Time comes from `tokio::time`, so tests run under
//! `start_paused` and finish instantly.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use super::window::{Slot, Window};

/// The default bound of the part window: 32 parts of 512 KiB, 16 MiB in flight. Over a
/// 150 ms round trip (Telegram from far away) that is about 110 MB/s, more than most servers'
/// uplinks; Telegram Desktop's downloader allows the same 16 MiB in flight per data centre
/// (8 connections of 2 MiB each). Memory: about twice that in buffers at the peak.
pub const DEFAULT_PART_WINDOW: usize = 32;

/// Which budget a call draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallClass {
    /// sendMedia, getHistory, getMessages, search, deleteMessages.
    Message,
    /// saveFilePart, saveBigFilePart, getFile.
    Transfer,
}

/// Tunables of the scheduler.
#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    /// Message-class calls allowed per minute (token bucket refill rate and burst).
    pub message_calls_per_minute: u32,
    /// Upper bound on part transfers in flight (the window's bound).
    pub max_part_concurrency: usize,
    /// Assumed transfer rate before anything was measured, bytes per second.
    pub assumed_bytes_per_sec: f64,
    /// First and largest pause after a dropped connection or timeout.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            message_calls_per_minute: 100,
            max_part_concurrency: DEFAULT_PART_WINDOW,
            assumed_bytes_per_sec: 4.0 * 1024.0 * 1024.0,
            backoff_base: Duration::from_millis(250),
            backoff_max: Duration::from_secs(30),
        }
    }
}

/// What a job will cost, reported before it starts.
#[derive(Clone, Debug, PartialEq)]
pub struct Estimate {
    pub message_calls: u64,
    pub part_calls: u64,
    pub seconds: f64,
}

/// Counters a job or benchmark can report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SchedulerStats {
    pub flood_waits: u64,
    pub flood_wait_seconds: u64,
    pub reconnects: u64,
    pub retries: u64,
    pub upload_restarts: u64,
    /// FLOOD_PREMIUM_WAIT answers: Telegram slowing a free account's uploads down.
    pub premium_waits: u64,
    /// Times the part window was halved (flood waits, failed parts).
    pub window_cuts: u64,
    /// The most parts in flight at once, and on one connection.
    pub peak_parts_in_flight: u64,
    pub peak_parts_per_connection: u64,
    /// Part connections opened.
    pub part_connections: u64,
    /// The most part connections that were opening in the background at once.
    pub peak_connections_opening: u64,
    /// Part bytes answered so far (uploaded or downloaded).
    pub part_bytes: u64,
}

/// How long the measured transfer rate looks back.
const RATE_WINDOW: Duration = Duration::from_secs(60);

/// Bytes moved recently, to measure the rate actually achieved (waits included).
#[derive(Default)]
struct Meter {
    samples: VecDeque<(Instant, u64)>,
}

impl Meter {
    fn add(&mut self, now: Instant, bytes: u64) {
        self.samples.push_back((now, bytes));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// Bytes per second moved since `start` (at most a minute back, at least a second).
    fn rate_since(&self, start: Instant, now: Instant) -> f64 {
        let start = start.max(now.checked_sub(RATE_WINDOW).unwrap_or(start));
        let bytes: u64 = self
            .samples
            .iter()
            .filter(|(t, _)| *t >= start)
            .map(|(_, b)| b)
            .sum();
        bytes as f64 / now.duration_since(start).as_secs_f64().max(1.0)
    }
}

/// A stretch of FLOOD_PREMIUM_WAIT answers: when it began, when the last came and what it
/// asked for.
#[derive(Clone, Copy)]
struct Episode {
    first: Instant,
    last: Instant,
    wait: Duration,
}

impl Episode {
    /// Still throttled: a premium wait within the last two minutes (or three of its waits).
    fn current(&self, now: Instant) -> bool {
        now.duration_since(self.last) <= Duration::from_secs(120).max(self.wait * 3)
    }
}

struct Bucket {
    tokens: f64,
    last: Instant,
}

pub struct Scheduler {
    cfg: SchedulerConfig,
    bucket: Mutex<Bucket>,
    paused: Mutex<[Option<Instant>; 2]>,
    window: Arc<Window>,
    /// Measured transfer rate (bytes/s, EWMA), stored as f64 bits.
    rate_bits: AtomicU64,
    stats: Mutex<SchedulerStats>,
    meter: Mutex<Meter>,
    premium: Mutex<Option<Episode>>,
    /// Part connections opening in the background now.
    opening: AtomicU64,
}

/// Parts a transfer announced and has not sent yet (see [`Scheduler::queue_parts`]).
pub struct Queued<'a> {
    sched: &'a Scheduler,
    left: usize,
}

impl Queued<'_> {
    /// Waits for room for the next announced part, behind the parts of transfers with an
    /// earlier place in line (see [`Scheduler::part_order`]). The part stops counting as
    /// announced in the step that puts it in flight. Cancel-safe: dropping the future leaves
    /// the part announced.
    pub async fn slot(&mut self, order: u64) -> Slot {
        let slot = if self.left > 0 {
            self.sched.window.announced_slot_in_order(order).await
        } else {
            self.sched.window.slot_in_order(order).await
        };
        self.left = self.left.saturating_sub(1);
        slot
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        self.sched.window.withdraw(self.left);
    }
}

pub const PART_SIZE: u64 = 512 * 1024;

fn idx(c: CallClass) -> usize {
    match c {
        CallClass::Message => 0,
        CallClass::Transfer => 1,
    }
}

impl Scheduler {
    pub fn new(cfg: SchedulerConfig) -> Self {
        let burst = f64::from(cfg.message_calls_per_minute.max(1));
        Scheduler {
            window: Window::new(cfg.max_part_concurrency),
            rate_bits: AtomicU64::new(cfg.assumed_bytes_per_sec.to_bits()),
            cfg,
            bucket: Mutex::new(Bucket {
                tokens: burst,
                last: Instant::now(),
            }),
            paused: Mutex::new([None, None]),
            stats: Mutex::new(SchedulerStats::default()),
            meter: Mutex::new(Meter::default()),
            premium: Mutex::new(None),
            opening: AtomicU64::new(0),
        }
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Waits until a call of `class` may go out: past any flood pause and, for message
    /// calls, holding a token.
    pub async fn acquire(&self, class: CallClass) {
        loop {
            let pause = self.paused.lock().unwrap()[idx(class)];
            if let Some(until) = pause
                && until > Instant::now()
            {
                tokio::time::sleep_until(until).await;
                continue;
            }
            if class == CallClass::Transfer {
                return;
            }
            let wait = {
                let mut b = self.bucket.lock().unwrap();
                let per_sec = f64::from(self.cfg.message_calls_per_minute.max(1)) / 60.0;
                let burst = f64::from(self.cfg.message_calls_per_minute.max(1));
                let now = Instant::now();
                b.tokens =
                    (b.tokens + now.duration_since(b.last).as_secs_f64() * per_sec).min(burst);
                b.last = now;
                if b.tokens >= 1.0 {
                    b.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - b.tokens) / per_sec)
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// The server said FLOOD_WAIT_X: pause the whole class for X seconds.
    pub fn flood_wait(&self, class: CallClass, seconds: u32) {
        let until = Instant::now() + Duration::from_secs(u64::from(seconds.max(1)));
        {
            let mut p = self.paused.lock().unwrap();
            let slot = &mut p[idx(class)];
            *slot = Some(slot.map_or(until, |u| u.max(until)));
        }
        if class == CallClass::Transfer {
            self.window.on_trouble();
        }
        let mut s = self.stats.lock().unwrap();
        s.flood_waits += 1;
        s.flood_wait_seconds += u64::from(seconds);
    }

    /// The server said FLOOD_PREMIUM_WAIT_X: a transfer wait like any other, remembered so
    /// the job can say that Telegram is slowing this account down.
    pub fn premium_wait(&self, seconds: u32) {
        self.flood_wait(CallClass::Transfer, seconds);
        let now = Instant::now();
        let wait = Duration::from_secs(u64::from(seconds.max(1)));
        let mut p = self.premium.lock().unwrap();
        *p = Some(match *p {
            Some(e) if e.current(now) => Episode {
                last: now,
                wait,
                ..e
            },
            _ => Episode {
                first: now,
                last: now,
                wait,
            },
        });
        drop(p);
        self.stats.lock().unwrap().premium_waits += 1;
    }

    /// While Telegram throttles this account, the transfer rate measured since the
    /// throttling began (over the last minute at most), waits included.
    pub fn premium_throttle(&self) -> Option<f64> {
        let e = (*self.premium.lock().unwrap())?;
        let now = Instant::now();
        e.current(now)
            .then(|| self.meter.lock().unwrap().rate_since(e.first, now))
    }

    /// Waits for room in the part window (see [`Window`]); the part is in flight until the
    /// slot is dropped.
    pub async fn part_slot(&self) -> Slot {
        self.window.slot().await
    }

    /// A place in line for a transfer starting now (see [`Window::order`]).
    pub fn part_order(&self) -> u64 {
        self.window.order()
    }

    /// Announces `parts` a transfer is about to send, so that connections open for them
    /// before the window has grown (see [`Scheduler::parts_wanted`]). Each part gets its room
    /// with [`Queued::slot`]; what is left is withdrawn when the guard drops.
    pub fn queue_parts(&self, parts: usize) -> Queued<'_> {
        self.window.announce(parts);
        Queued {
            sched: self,
            left: parts,
        }
    }

    /// Parts worth having connections for: those in flight and those announced, within the
    /// window's bound (every transfer announces its parts, so a one-part object opens one
    /// connection however large the window).
    pub fn parts_wanted(&self) -> usize {
        // One read of both: the part-connection count once came out one too high (five
        // connections for sixteen parts) when a part was seen in flight and still announced.
        self.window
            .demand()
            .min(self.cfg.max_part_concurrency)
            .max(1)
    }

    /// A part transfer went through: measure it and let the window grow.
    pub fn transfer_ok(&self, bytes: u64, took: Duration) {
        self.meter.lock().unwrap().add(Instant::now(), bytes);
        self.stats.lock().unwrap().part_bytes += bytes;
        self.window.on_success(took);
        let secs = took.as_secs_f64();
        if secs > 0.0 {
            // Per-part rate times parts in flight approximates the aggregate.
            let sample = bytes as f64 / secs * self.window.size() as f64;
            let old = f64::from_bits(self.rate_bits.load(Ordering::Relaxed));
            let new = old * 0.8 + sample * 0.2;
            self.rate_bits.store(new.to_bits(), Ordering::Relaxed);
        }
    }

    /// A part transfer failed (timeout, lost connection, Telegram's own trouble): shrink.
    pub fn transfer_failed(&self) {
        self.window.on_trouble();
    }

    /// Parts allowed in flight now.
    pub fn part_concurrency(&self) -> usize {
        self.window.size()
    }

    /// Parts in flight now.
    pub fn parts_in_flight(&self) -> usize {
        self.window.in_flight()
    }

    /// A part was handed to a connection that then held `on_connection` of them.
    pub fn note_part_sent(&self, on_connection: usize) {
        let mut s = self.stats.lock().unwrap();
        s.peak_parts_per_connection = s.peak_parts_per_connection.max(on_connection as u64);
    }

    /// A part connection started (`+1`) or finished (`-1`) opening in the background.
    pub fn note_connection_opening(&self, delta: i64) {
        let now = self
            .opening
            .fetch_add(delta as u64, Ordering::Relaxed)
            .wrapping_add(delta as u64);
        let mut s = self.stats.lock().unwrap();
        s.peak_connections_opening = s.peak_connections_opening.max(now);
    }

    pub fn note_part_connection(&self) {
        self.stats.lock().unwrap().part_connections += 1;
    }

    /// The pause before retry number `attempt` (1-based) after a dropped connection or a
    /// timeout: exponential, capped, the one place such waits are decided.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .cfg
            .backoff_base
            .saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        exp.min(self.cfg.backoff_max)
    }

    pub fn note_reconnect(&self) {
        self.stats.lock().unwrap().reconnects += 1;
    }
    pub fn note_retry(&self) {
        self.stats.lock().unwrap().retries += 1;
    }
    pub fn note_upload_restart(&self) {
        self.stats.lock().unwrap().upload_restarts += 1;
    }
    pub fn stats(&self) -> SchedulerStats {
        let mut s = self.stats.lock().unwrap().clone();
        s.window_cuts = self.window.cuts();
        s.peak_parts_in_flight = self.window.peak() as u64;
        s
    }

    /// API calls and time to upload `bytes` spread over `packs` packs under current limits.
    pub fn estimate(&self, bytes: u64, packs: u64) -> Estimate {
        estimate_with(
            bytes,
            packs,
            self.cfg.message_calls_per_minute,
            f64::from_bits(self.rate_bits.load(Ordering::Relaxed)),
        )
    }
}

/// The estimator on its own: one sendMedia per pack, one part call per started 512 KiB of
/// each pack; the time is whichever budget is the bottleneck.
pub fn estimate_with(
    bytes: u64,
    packs: u64,
    calls_per_minute: u32,
    bytes_per_sec: f64,
) -> Estimate {
    let packs = packs.max(u64::from(bytes > 0));
    // Each pack's last part is partial, so count whole parts plus at most one per pack.
    let part_calls = bytes
        .div_ceil(PART_SIZE)
        .max(packs)
        .min(bytes.div_ceil(PART_SIZE) + packs);
    let message_calls = packs;
    // The bucket allows a full minute's burst at once.
    let burst = u64::from(calls_per_minute.max(1));
    let msg_secs =
        message_calls.saturating_sub(burst) as f64 * 60.0 / f64::from(calls_per_minute.max(1));
    let xfer_secs = bytes as f64 / bytes_per_sec.max(1.0);
    Estimate {
        message_calls,
        part_calls,
        seconds: msg_secs.max(xfer_secs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn announced_parts_are_wanted_within_the_bound_until_sent_or_withdrawn() {
        let s = Scheduler::new(SchedulerConfig {
            max_part_concurrency: 32,
            ..Default::default()
        });
        assert_eq!(s.parts_wanted(), 1, "nothing announced: one connection");
        let mut big = s.queue_parts(1000);
        assert_eq!(s.parts_wanted(), 32, "a big transfer: the bound at once");
        {
            let _small = s.queue_parts(1);
            assert_eq!(s.parts_wanted(), 32);
        }
        let order = s.part_order();
        for _ in 0..995 {
            drop(big.slot(order).await);
        }
        assert_eq!(s.parts_wanted(), 5, "five left to send");
        let _slot = big.slot(order).await;
        assert_eq!(s.parts_wanted(), 5, "four announced and one in flight");
        let _other = s.part_slot().await;
        assert_eq!(s.parts_wanted(), 6, "a part never announced adds itself");
        drop(big);
        assert_eq!(s.parts_wanted(), 2, "withdrawn: the two in flight");
        let mut one = s.queue_parts(1);
        let first = one.slot(order).await;
        drop(one.slot(order).await);
        drop(one);
        drop(first);
        assert_eq!(
            s.window.demand(),
            2,
            "an announced part leaves the count once"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn bucket_limits_message_calls_per_minute() {
        let s = Scheduler::new(SchedulerConfig {
            message_calls_per_minute: 60,
            ..Default::default()
        });
        let t0 = Instant::now();
        for _ in 0..60 {
            s.acquire(CallClass::Message).await;
        }
        assert!(t0.elapsed() < Duration::from_millis(10), "burst is free");
        for _ in 0..30 {
            s.acquire(CallClass::Message).await;
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_secs(29) && took <= Duration::from_secs(31),
            "30 more calls at 1/s took {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn flood_wait_pauses_only_its_class() {
        let s = Scheduler::new(SchedulerConfig::default());
        s.flood_wait(CallClass::Message, 42);
        let t0 = Instant::now();
        s.acquire(CallClass::Transfer).await;
        assert!(t0.elapsed() < Duration::from_millis(1));
        s.acquire(CallClass::Message).await;
        assert!(t0.elapsed() >= Duration::from_secs(42));
        assert_eq!(s.stats().flood_waits, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn transfer_flood_halves_the_window_and_successes_regrow_it() {
        let s = Scheduler::new(SchedulerConfig {
            max_part_concurrency: 8,
            ..Default::default()
        });
        for _ in 0..4 {
            s.transfer_ok(PART_SIZE, Duration::from_millis(10));
        }
        assert_eq!(s.part_concurrency(), 8);
        s.flood_wait(CallClass::Transfer, 1);
        assert_eq!(s.part_concurrency(), 4);
        // A message-class flood leaves the part window alone.
        tokio::time::advance(Duration::from_secs(2)).await;
        s.flood_wait(CallClass::Message, 1);
        assert_eq!(s.part_concurrency(), 4);
        for _ in 0..5 {
            s.transfer_ok(PART_SIZE, Duration::from_millis(10));
        }
        assert_eq!(s.part_concurrency(), 5);
        assert_eq!(s.stats().window_cuts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn premium_waits_mark_the_account_throttled_with_the_measured_rate() {
        let s = Scheduler::new(SchedulerConfig::default());
        assert_eq!(s.premium_throttle(), None);
        s.transfer_ok(PART_SIZE, Duration::from_millis(5));
        s.premium_wait(3);
        tokio::time::advance(Duration::from_secs(3)).await;
        s.transfer_ok(PART_SIZE, Duration::from_millis(5));
        tokio::time::advance(Duration::from_secs(3)).await;
        s.transfer_ok(PART_SIZE, Duration::from_millis(5));
        // Three parts in six seconds, waits included.
        let rate = s.premium_throttle().unwrap();
        assert!((rate - 3.0 * PART_SIZE as f64 / 6.0).abs() < 1.0, "{rate}");
        assert_eq!(s.stats().premium_waits, 1);
        assert_eq!(s.stats().flood_waits, 1);
        // Long after the last premium wait the account is no longer reported throttled.
        tokio::time::advance(Duration::from_secs(200)).await;
        assert_eq!(s.premium_throttle(), None);
    }

    #[test]
    fn backoff_is_bounded() {
        let s = Scheduler::new(SchedulerConfig::default());
        assert_eq!(s.backoff(1), Duration::from_millis(250));
        assert_eq!(s.backoff(3), Duration::from_secs(1));
        assert_eq!(s.backoff(40), Duration::from_secs(30));
    }

    #[test]
    fn estimate_counts_calls_and_picks_the_bottleneck() {
        // 10 GiB in 1.9 GiB packs: 6 sends, 20480 parts (+ partial last parts).
        let gib = 1024 * 1024 * 1024u64;
        let e = estimate_with(10 * gib, 6, 100, 10.0 * 1024.0 * 1024.0);
        assert_eq!(e.message_calls, 6);
        assert!(e.part_calls >= 20480 && e.part_calls <= 20486, "{e:?}");
        assert!((e.seconds - 1024.0).abs() < 1.0, "{e:?}");
        // Many tiny packs: the message budget dominates.
        let e = estimate_with(1000 * 1024, 1000, 100, 1e9);
        assert!((e.seconds - 540.0).abs() < 1.0, "{e:?}");
        assert_eq!(estimate_with(0, 0, 100, 1.0).message_calls, 0);
    }
}
