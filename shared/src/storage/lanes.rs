//! Lanes: several backends used as one store (several Telegram accounts or chats, a directory
//! on a NAS), each pack kept in `copies` of them.
//!
//! A lane is one backend with its own rate limits (a Telegram session has its own scheduler
//! budgets). New packs go to the lanes expected to finish them soonest: the bytes a lane has
//! queued, over the rate its recent uploads achieved, cut down while its provider pushes back
//! (FLOOD_PREMIUM_WAIT, repeated FLOOD_WAIT) or while it fails, until it recovers. With
//! `copies` > 1 every pack goes to that many distinct lanes at once (hard links of the one
//! spool file, so a copy costs no disk), and `put_file` returns only when every copy is stored.
//!
//! [`Lanes`] is itself a [`Storage`]: the engine stores and reads through it as through any
//! backend. The location it returns names every copy (`lanes:<lane>=<location>,...`), so the
//! catalog's `location` column records each pack's lanes; a location without that prefix is a
//! pack stored before lanes existed, in the first lane. Reads go to whichever lane holds a
//! copy, lanes that answer first, and fall back to the next copy; a copy found missing that
//! way is remembered so the engine can heal it ([`Lanes::take_misses`]).
//!
//! A lane whose backend cannot be reached at start (an account deleted, a server down) does not
//! stop the others: it is connected lazily, and tried again at most every
//! [`RECONNECT_AFTER`].

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    Location, ObjectInfo, ObjectRef, Pushback, REMOVE_BATCH, Storage, check_name, with_retry,
};
use crate::error::StorageError;
use crate::progress::{Throttle, TransferEstimate};

/// How long a lane's provider must stay quiet (no FLOOD_PREMIUM_WAIT, no new FLOOD_WAIT) before
/// the lane gets its full share again.
pub const RECOVERY: Duration = Duration::from_secs(10 * 60);
/// How long a lane that failed is tried last, and how often a lane that could not connect is
/// tried again.
pub const RECONNECT_AFTER: Duration = Duration::from_secs(2 * 60);
/// Share of new packs left to a lane under FLOOD_PREMIUM_WAIT.
const PREMIUM_SHARE: f64 = 0.25;
/// Share left to a lane that failed recently: it is tried only when no other lane is left.
const FAILED_SHARE: f64 = 0.001;

/// Connects a lane's backend (for Telegram: loads the session, checks the sign-in and the
/// storage chat).
#[async_trait]
pub trait Connector: Send + Sync + 'static {
    async fn connect(&self) -> Result<Arc<dyn Storage>, StorageError>;
}

/// One copy of an object: the lane that holds it and where, as that lane's backend remembers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredCopy {
    pub lane: String,
    pub location: Location,
}

/// Where to read a copy from: a configured lane and the object in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadTarget {
    pub lane: String,
    pub obj: ObjectRef,
}

/// What a lane has been doing, for choosing where new packs go.
#[derive(Default)]
struct Health {
    /// Bytes assigned to the lane and not stored yet.
    queued: u64,
    /// Bytes per second the lane moves (moving average of its finished uploads, each
    /// scaled by the uploads it shared the lane with, see [`Health::upload_ended`]).
    rate: Option<f64>,
    /// Uploads in flight now, and the upload-seconds they have spent so far (the time
    /// integral of that count, brought up to date at each start and end).
    uploading: usize,
    upload_seconds: f64,
    counted_to: Option<Instant>,
    /// The backend's push-back counters when last looked at.
    seen: Pushback,
    /// FLOOD_WAITs seen within the recovery window.
    floods: VecDeque<Instant>,
    /// The last FLOOD_PREMIUM_WAIT seen.
    premium_at: Option<Instant>,
    /// The last failure, until a call succeeds again.
    failed: Option<(Instant, String)>,
    /// The seeds (the wrapped keys) this process has stored in, or found in, this lane.
    seeded: std::collections::HashSet<String>,
}

impl Health {
    /// Brings the upload-seconds up to `now`.
    fn count_to(&mut self, now: Instant) {
        if let Some(from) = self.counted_to {
            self.upload_seconds += self.uploading as f64 * now.duration_since(from).as_secs_f64();
        }
        self.counted_to = Some(now);
    }

    /// An upload starts: returns its start and the upload-seconds so far.
    fn upload_started(&mut self, now: Instant) -> (Instant, f64) {
        self.count_to(now);
        self.uploading += 1;
        (now, self.upload_seconds)
    }

    /// An upload of `size` bytes that started at `start` (see [`Health::upload_started`])
    /// ended; with `ok`, it tells the lane's rate. Alone on the lane it took `took`: the lane
    /// moved `size` in that time. Beside others (a lane uploads several packs at once, and
    /// they share its link), it took longer for the same bytes because the lane was moving
    /// theirs too: the lane's rate is its own times the uploads it had beside it on average,
    /// or a lane taking two at a time would look half as fast as it is, and get half the
    /// work it should. An upload asleep in a retry's backoff or a flood wait counts as
    /// sharing too, so a lane being pushed back is measured a little fast; such a lane's
    /// share is cut anyway (see [`Lane::share`]).
    fn upload_ended(
        &mut self,
        now: Instant,
        (start, seconds_at_start): (Instant, f64),
        size: u64,
        ok: bool,
    ) {
        self.count_to(now);
        self.uploading = self.uploading.saturating_sub(1);
        if !ok {
            return;
        }
        let took = now.duration_since(start).as_secs_f64().max(1e-3);
        let sharing = ((self.upload_seconds - seconds_at_start) / took).max(1.0);
        let sample = size as f64 * sharing / took;
        self.rate = Some(self.rate.map_or(sample, |r| r * 0.7 + sample * 0.3));
    }
}

/// An upload counted on its lane (see [`Health::upload_started`]) until it ends, however it
/// ends (a dropped upload too).
struct Uploading<'a> {
    health: &'a Mutex<Health>,
    start: Option<(Instant, f64)>,
}

impl<'a> Uploading<'a> {
    fn start(health: &'a Mutex<Health>) -> Uploading<'a> {
        let start = health.lock().unwrap().upload_started(Instant::now());
        Uploading {
            health,
            start: Some(start),
        }
    }

    /// The upload of `size` bytes went through: the lane learns its rate from it.
    fn succeeded(mut self, size: u64) {
        if let Some(start) = self.start.take() {
            self.health
                .lock()
                .unwrap()
                .upload_ended(Instant::now(), start, size, true);
        }
    }
}

impl Drop for Uploading<'_> {
    fn drop(&mut self) {
        if let Some(start) = self.start.take() {
            self.health
                .lock()
                .unwrap()
                .upload_ended(Instant::now(), start, 0, false);
        }
    }
}

/// One backend of a [`Lanes`] store.
pub struct Lane {
    name: String,
    /// What the configuration says it is, shown while it is not connected.
    label: String,
    backend: Mutex<Option<Arc<dyn Storage>>>,
    connector: Option<Box<dyn Connector>>,
    connecting: tokio::sync::Mutex<()>,
    health: Mutex<Health>,
}

impl Lane {
    /// A lane whose backend is ready.
    pub fn ready(name: impl Into<String>, storage: Arc<dyn Storage>) -> Lane {
        let label = storage.describe();
        Lane {
            name: name.into(),
            label,
            backend: Mutex::new(Some(storage)),
            connector: None,
            connecting: tokio::sync::Mutex::new(()),
            health: Mutex::default(),
        }
    }

    /// A lane connected on first use (and again after a failed attempt, at most every
    /// [`RECONNECT_AFTER`]). `failure` is why an attempt at start failed, if one did.
    pub fn lazy(
        name: impl Into<String>,
        label: impl Into<String>,
        connector: Box<dyn Connector>,
        failure: Option<String>,
    ) -> Lane {
        Lane {
            name: name.into(),
            label: label.into(),
            backend: Mutex::new(None),
            connector: Some(connector),
            connecting: tokio::sync::Mutex::new(()),
            health: Mutex::new(Health {
                failed: failure.map(|f| (Instant::now(), f)),
                ..Health::default()
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The backend's description once connected, else the configured label.
    pub fn describe(&self) -> String {
        match self.connected() {
            Some(b) => b.describe(),
            None => self.label.clone(),
        }
    }

    /// The backend, if connected.
    pub fn connected(&self) -> Option<Arc<dyn Storage>> {
        self.backend.lock().unwrap().clone()
    }

    /// Why the lane last failed, while it has not succeeded since.
    pub fn last_failure(&self) -> Option<String> {
        self.health
            .lock()
            .unwrap()
            .failed
            .as_ref()
            .map(|f| f.1.clone())
    }

    /// The backend, connecting it if needed.
    pub async fn backend(&self) -> Result<Arc<dyn Storage>, StorageError> {
        if let Some(b) = self.connected() {
            return Ok(b);
        }
        let Some(connector) = &self.connector else {
            return Err(StorageError::Fatal(format!(
                "lane {} has no backend",
                self.name
            )));
        };
        let _one = self.connecting.lock().await;
        if let Some(b) = self.connected() {
            return Ok(b);
        }
        let recent = self
            .health
            .lock()
            .unwrap()
            .failed
            .as_ref()
            .filter(|(at, _)| at.elapsed() < RECONNECT_AFTER)
            .map(|(_, why)| why.clone());
        if let Some(why) = recent {
            return Err(StorageError::Transient(format!(
                "lane {} is not connected: {why}",
                self.name
            )));
        }
        match connector.connect().await {
            Ok(b) => {
                tracing::info!(lane = self.name, "lane connected");
                *self.backend.lock().unwrap() = Some(b.clone());
                self.health.lock().unwrap().failed = None;
                Ok(b)
            }
            Err(e) => {
                self.note_failure(&e);
                Err(e)
            }
        }
    }

    fn note_failure(&self, e: &StorageError) {
        // A missing object says nothing about the lane itself.
        if !matches!(e, StorageError::NotFound { .. }) {
            self.health.lock().unwrap().failed = Some((Instant::now(), e.to_string()));
        }
    }

    fn note_success(&self) {
        self.health.lock().unwrap().failed = None;
    }

    /// Reads a range of an object in this lane (waiting out rate limits, retrying transient
    /// failures a bounded number of times).
    pub async fn get_range(
        &self,
        obj: &ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        let b = self.backend().await?;
        // No retry here: another copy may answer at once; the engine retries when none does.
        let r = b.get_range(obj, offset, len).await;
        match &r {
            Ok(_) => self.note_success(),
            Err(e) => self.note_failure(e),
        }
        r
    }

    /// Every object in this lane.
    pub async fn list(&self) -> Result<Vec<ObjectInfo>, StorageError> {
        let b = self.backend().await?;
        let r = with_retry(&format!("listing lane {}", self.name), || b.list()).await;
        match &r {
            Ok(_) => self.note_success(),
            Err(e) => self.note_failure(e),
        }
        r
    }

    /// Stores a small object in this lane.
    pub async fn put_bytes(&self, name: &str, data: &[u8]) -> Result<Location, StorageError> {
        let b = self.backend().await?;
        let r = with_retry(&format!("storing {name} in lane {}", self.name), || {
            b.put_bytes(name, data.to_vec())
        })
        .await;
        match &r {
            Ok(_) => self.note_success(),
            Err(e) => self.note_failure(e),
        }
        r
    }

    /// Deletes objects from this lane (at most [`REMOVE_BATCH`]; missing ones are not an
    /// error).
    pub async fn remove_many(&self, objs: &[ObjectRef]) -> Result<(), StorageError> {
        let b = self.backend().await?;
        let r = with_retry(&format!("deleting in lane {}", self.name), || {
            b.remove_many(objs)
        })
        .await;
        match &r {
            Ok(_) => self.note_success(),
            Err(e) => self.note_failure(e),
        }
        r
    }

    /// Stores each seed (the wrapped keys: the installation's and the owners') in this lane
    /// unless it already holds it, once per process: `recover` must work from any one lane.
    async fn ensure_seed(
        &self,
        b: &Arc<dyn Storage>,
        seeds: &[(String, Vec<u8>)],
    ) -> Result<(), StorageError> {
        for (seed_name, data) in seeds {
            if self.health.lock().unwrap().seeded.contains(seed_name) {
                continue;
            }
            let held = b.get_range(&ObjectRef::new(seed_name, ""), 0, 1).await;
            if matches!(held, Err(StorageError::NotFound { .. })) {
                with_retry(
                    &format!("storing {seed_name} in lane {}", self.name),
                    || b.put_bytes(seed_name, data.clone()),
                )
                .await?;
            } else {
                held?;
            }
            self.health.lock().unwrap().seeded.insert(seed_name.clone());
        }
        Ok(())
    }

    /// Uploads the file at `path` (consumed on success), first storing `seed` if this lane
    /// does not hold it yet, and learns the lane's rate from it.
    async fn put_file(
        &self,
        name: &str,
        path: &Path,
        size: u64,
        seeds: &[(String, Vec<u8>)],
    ) -> Result<Location, StorageError> {
        let result: Result<Location, StorageError> = async {
            let b = self.backend().await?;
            self.ensure_seed(&b, seeds).await?;
            let uploading = Uploading::start(&self.health);
            let loc = with_retry(&format!("uploading {name} to lane {}", self.name), || {
                b.put_file(name, path)
            })
            .await?;
            uploading.succeeded(size);
            Ok(loc)
        }
        .await;
        let mut h = self.health.lock().unwrap();
        h.queued = h.queued.saturating_sub(size);
        match result {
            Ok(loc) => {
                h.failed = None;
                Ok(loc)
            }
            Err(e) => {
                h.failed = Some((Instant::now(), e.to_string()));
                Err(e)
            }
        }
    }

    /// Looks at the backend's push-back counters and remembers what is new.
    fn sample_pushback(&self, now: Instant) {
        let Some(b) = self.connected() else { return };
        let p = b.pushback();
        let throttled = b.throttle().is_some();
        let mut h = self.health.lock().unwrap();
        for _ in h.seen.flood_waits..p.flood_waits {
            h.floods.push_back(now);
        }
        if p.premium_waits > h.seen.premium_waits || throttled {
            h.premium_at = Some(now);
        }
        h.seen = p;
        while h
            .floods
            .front()
            .is_some_and(|t| now.duration_since(*t) > RECOVERY)
        {
            h.floods.pop_front();
        }
    }

    /// The share of new work this lane gets now (1: full), and its measured rate.
    fn share(&self, now: Instant) -> (f64, Option<f64>, u64) {
        let h = self.health.lock().unwrap();
        let mut share = 1.0;
        if h.failed
            .as_ref()
            .is_some_and(|(at, _)| now.duration_since(*at) < RECONNECT_AFTER)
        {
            share *= FAILED_SHARE;
        }
        if h.premium_at
            .is_some_and(|at| now.duration_since(at) < RECOVERY)
        {
            share *= PREMIUM_SHARE;
        }
        // One flood wait is ordinary pacing; repeated ones mean the lane is pushed hard.
        let floods = h.floods.len();
        if floods >= 2 {
            share /= floods as f64;
        }
        (share, h.rate, h.queued)
    }
}

/// Several lanes used as one store.
pub struct Lanes {
    lanes: Vec<Arc<Lane>>,
    copies: usize,
    spool: PathBuf,
    /// An object every lane must hold before its first pack (the wrapped key, so that
    /// `recover` works from any one lane).
    seed: Mutex<Vec<(String, Vec<u8>)>>,
    /// Copies a read found missing or damaged while another copy answered: `(object, lane)`.
    misses: Mutex<Vec<(String, String)>>,
}

/// The prefix of a location naming the copies of an object in several lanes.
const PREFIX: &str = "lanes:";

impl Lanes {
    /// Several lanes, each pack stored in `copies` of them; packs wait in `spool` before they
    /// are uploaded.
    pub fn new(lanes: Vec<Lane>, copies: usize, spool: PathBuf) -> Result<Lanes, StorageError> {
        if lanes.is_empty() {
            return Err(StorageError::Fatal("no storage lane is configured".into()));
        }
        if copies == 0 || copies > lanes.len() {
            return Err(StorageError::Fatal(format!(
                "{copies} copies need at least {copies} lanes, and {} {} configured\nhint: name more lanes in STORINATOR_STORAGE or lower STORINATOR_COPIES",
                lanes.len(),
                if lanes.len() == 1 { "is" } else { "are" }
            )));
        }
        for (i, l) in lanes.iter().enumerate() {
            if !valid_lane_name(&l.name) {
                return Err(StorageError::Fatal(format!(
                    "invalid lane name {:?}: 1 to 32 letters, digits, - or _",
                    l.name
                )));
            }
            if lanes[..i].iter().any(|o| o.name == l.name) {
                return Err(StorageError::Fatal(format!(
                    "two storage lanes are named {:?}",
                    l.name
                )));
            }
        }
        Ok(Lanes {
            lanes: lanes.into_iter().map(Arc::new).collect(),
            copies,
            spool,
            seed: Mutex::new(Vec::new()),
            misses: Mutex::new(Vec::new()),
        })
    }

    pub fn lanes(&self) -> &[Arc<Lane>] {
        &self.lanes
    }

    pub fn lane(&self, name: &str) -> Option<&Arc<Lane>> {
        self.lanes.iter().find(|l| l.name == name)
    }

    /// Copies kept of every pack.
    pub fn copies(&self) -> usize {
        self.copies
    }

    /// Adds (or replaces, by name) an object every lane must hold before its first pack: the
    /// wrapped installation key and every owner key.
    pub fn set_seed(&self, name: &str, data: Vec<u8>) {
        let mut seeds = self.seed.lock().unwrap();
        seeds.retain(|(n, _)| n != name);
        seeds.push((name.to_string(), data));
    }

    /// The copies a location names. A location without the lanes prefix is a pack stored
    /// before lanes existed, in the first lane; an empty one names no copy (ask every lane).
    pub fn copies_in(&self, location: &str) -> Vec<StoredCopy> {
        if location.is_empty() {
            return Vec::new();
        }
        let Some(list) = location.strip_prefix(PREFIX) else {
            return vec![StoredCopy {
                lane: self.lanes[0].name.clone(),
                location: location.to_string(),
            }];
        };
        list.split(',')
            .filter_map(|c| c.split_once('='))
            .map(|(lane, loc)| StoredCopy {
                lane: lane.to_string(),
                location: unescape(loc),
            })
            .collect()
    }

    /// The location naming `copies`.
    pub fn location_of(copies: &[StoredCopy]) -> Location {
        let list: Vec<String> = copies
            .iter()
            .map(|c| format!("{}={}", c.lane, escape(&c.location)))
            .collect();
        format!("{PREFIX}{}", list.join(","))
    }

    /// One reference per copy of `obj`, each reading only that copy: for checking every copy
    /// (verify, the scrub) or reading past a damaged one (restore).
    pub fn copy_refs(&self, obj: &ObjectRef) -> Vec<(String, ObjectRef)> {
        self.copies_in(&obj.location)
            .into_iter()
            .map(|c| {
                let lane = c.lane.clone();
                (lane, ObjectRef::new(&obj.name, Lanes::location_of(&[c])))
            })
            .collect()
    }

    /// Remembers that `lane`'s copy of `name` is missing or damaged, for [`Lanes::take_misses`].
    pub fn note_miss(&self, name: &str, lane: &str) {
        let mut m = self.misses.lock().unwrap();
        let key = (name.to_string(), lane.to_string());
        if !m.contains(&key) {
            m.push(key);
        }
    }

    /// Copies reads found missing or damaged since the last call: `(object, lane)`.
    pub fn take_misses(&self) -> Vec<(String, String)> {
        std::mem::take(&mut *self.misses.lock().unwrap())
    }

    /// The `n` lanes (not in `exclude`) expected to finish `size` more bytes soonest. Their
    /// queues grow by `size` (the upload takes it off again).
    fn choose(&self, size: u64, n: usize, exclude: &[usize]) -> Vec<usize> {
        let now = Instant::now();
        let candidates: Vec<(usize, f64, Option<f64>, u64)> = self
            .lanes
            .iter()
            .enumerate()
            .filter(|(i, _)| !exclude.contains(i))
            .map(|(i, l)| {
                l.sample_pushback(now);
                let (share, rate, queued) = l.share(now);
                (i, share, rate, queued)
            })
            .collect();
        // A lane not measured yet is assumed as fast as the measured ones on average.
        let known: Vec<f64> = candidates.iter().filter_map(|c| c.2).collect();
        let assumed = if known.is_empty() {
            1.0
        } else {
            known.iter().sum::<f64>() / known.len() as f64
        };
        let mut scored: Vec<(f64, usize)> = candidates
            .iter()
            .map(|&(i, share, rate, queued)| {
                let speed = rate.unwrap_or(assumed).max(1e-9) * share;
                ((queued + size) as f64 / speed, i)
            })
            .collect();
        scored.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let picked: Vec<usize> = scored.into_iter().take(n).map(|(_, i)| i).collect();
        for &i in &picked {
            self.lanes[i].health.lock().unwrap().queued += size;
        }
        picked
    }

    /// Uploads the file at `path` (kept) to lane `i` through a hard link of it.
    async fn upload_to(
        &self,
        i: usize,
        name: &str,
        path: &Path,
        size: u64,
    ) -> Result<StoredCopy, StorageError> {
        let lane = &self.lanes[i];
        // Beside the pack, in its run's spool folder: a crash leaves it where the next run
        // cleans up.
        let file = path.file_name().and_then(|f| f.to_str()).unwrap_or(name);
        let copy = path.with_file_name(format!(".{file}.lane{i}"));
        let own_inode = lane.connected().is_some_and(|b| b.adopts_file());
        let made = if own_inode {
            std::fs::copy(path, &copy)
                .map(|_| ())
                .map_err(|e| StorageError::io(&copy, e))
        } else {
            link_or_copy(path, &copy)
        };
        if let Err(e) = made {
            let mut h = lane.health.lock().unwrap();
            h.queued = h.queued.saturating_sub(size);
            return Err(e);
        }
        let seed = self.seed.lock().unwrap().clone();
        let r = lane.put_file(name, &copy, size, &seed).await;
        let _ = std::fs::remove_file(&copy);
        Ok(StoredCopy {
            lane: lane.name.clone(),
            location: r.map_err(|e| in_lane(lane, e))?,
        })
    }

    /// Stores the file at `path` (kept) in `copies` lanes, those with the most headroom; a
    /// lane that fails is replaced by the next best. Either every copy is stored, or none is
    /// left behind (copies that landed are deleted again, best effort) and the error names
    /// each lane's failure.
    async fn put_copies(&self, name: &str, path: &Path) -> Result<Vec<StoredCopy>, StorageError> {
        let size = std::fs::metadata(path)
            .map_err(|e| StorageError::io(path, e))?
            .len();
        let mut tried: Vec<usize> = Vec::new();
        let mut stored: Vec<StoredCopy> = Vec::new();
        let mut failures: Vec<StorageError> = Vec::new();
        while stored.len() < self.copies {
            let picks = self.choose(size, self.copies - stored.len(), &tried);
            if picks.is_empty() {
                break;
            }
            tried.extend(&picks);
            let uploads = picks.iter().map(|&i| self.upload_to(i, name, path, size));
            for r in futures_util::future::join_all(uploads).await {
                match r {
                    Ok(c) => stored.push(c),
                    Err(e) => {
                        tracing::warn!("storing {name}: {e}");
                        failures.push(e);
                    }
                }
            }
        }
        if stored.len() == self.copies {
            // Keep the configured lane order: the first copy is the preferred read.
            stored.sort_by_key(|c| self.lanes.iter().position(|l| l.name == c.lane));
            return Ok(stored);
        }
        for c in &stored {
            if let Some(l) = self.lane(&c.lane) {
                let _ = l
                    .remove_many(&[ObjectRef::new(name, c.location.clone())])
                    .await;
            }
        }
        let why: Vec<String> = failures.iter().map(ToString::to_string).collect();
        let msg = format!(
            "stored {} of {} copies of {name}: {}",
            stored.len(),
            self.copies,
            why.join("; ")
        );
        Err(if failures.iter().all(StorageError::is_retryable) {
            StorageError::Transient(msg)
        } else {
            StorageError::Fatal(msg)
        })
    }

    /// Stores one more copy of `name` (size `size`, held in other lanes at `location`) in
    /// place of `lane`'s copy, which a read found missing or damaged: in `lane` again when it
    /// answers, else in a lane that holds no copy. The bytes are read whole from a copy whose
    /// trailer `check` accepts. Returns the new location, or `None` when no lane can take it.
    pub async fn heal(
        &self,
        name: &str,
        size: u64,
        location: &str,
        lane: &str,
        check: &(dyn Fn(&Path) -> Result<(), String> + Send + Sync),
    ) -> Result<Option<Location>, StorageError> {
        let copies = self.copies_in(location);
        let mut holders: Vec<StoredCopy> =
            copies.iter().filter(|c| c.lane != lane).cloned().collect();
        // The source: the first other copy that reads whole and passes the check.
        std::fs::create_dir_all(&self.spool).map_err(|e| StorageError::io(&self.spool, e))?;
        let tmp = self.spool.join(format!("heal-{name}"));
        let mut found = false;
        for c in &holders {
            let Some(l) = self.lane(&c.lane) else {
                continue;
            };
            let Ok(data) = l
                .get_range(&ObjectRef::new(name, c.location.clone()), 0, size)
                .await
            else {
                continue;
            };
            std::fs::write(&tmp, &data).map_err(|e| StorageError::io(&tmp, e))?;
            match check(&tmp) {
                Ok(()) => {
                    found = true;
                    break;
                }
                Err(why) => tracing::warn!(lane = c.lane, "copy of {name} fails: {why}"),
            }
        }
        if !found {
            let _ = std::fs::remove_file(&tmp);
            return Ok(None);
        }
        // Where the new copy goes: the same lane when it answers, else a lane without a copy.
        let mut order: Vec<usize> = Vec::new();
        if let Some(i) = self.lanes.iter().position(|l| l.name == lane) {
            order.push(i);
        }
        order.extend(
            (0..self.lanes.len()).filter(|&i| !copies.iter().any(|c| c.lane == self.lanes[i].name)),
        );
        let mut result = None;
        for i in order {
            // A damaged copy in the lane that takes the new one goes first.
            if let Some(old) = copies.iter().find(|c| c.lane == self.lanes[i].name) {
                let old = ObjectRef::new(name, old.location.clone());
                if let Err(e) = self.lanes[i].remove_many(&[old]).await {
                    tracing::warn!("healing {name}: {e}");
                    continue;
                }
            }
            self.lanes[i].health.lock().unwrap().queued += size;
            match self.upload_to(i, name, &tmp, size).await {
                Ok(c) => {
                    holders.push(c);
                    holders.sort_by_key(|c| self.lanes.iter().position(|l| l.name == c.lane));
                    result = Some(Lanes::location_of(&holders));
                    break;
                }
                Err(e) => tracing::warn!("healing {name}: {e}"),
            }
        }
        let _ = std::fs::remove_file(&tmp);
        Ok(result)
    }

    /// The copies of `obj` worth reading, best first: lanes that answer before lanes that
    /// failed lately. Copies in lanes that are no longer configured are left out; when none
    /// is left (no location, or only lanes since renamed), every lane is asked by name.
    fn read_order(&self, obj: &ObjectRef) -> Vec<(usize, ObjectRef)> {
        let now = Instant::now();
        let mut known: Vec<(bool, usize, ObjectRef)> = self
            .copies_in(&obj.location)
            .into_iter()
            .filter_map(|c| {
                let i = self.lanes.iter().position(|l| l.name == c.lane)?;
                let failing = self.lanes[i].share(now).0 <= FAILED_SHARE;
                Some((failing, i, ObjectRef::new(&obj.name, c.location)))
            })
            .collect();
        if known.is_empty() {
            return (0..self.lanes.len())
                .map(|i| (i, ObjectRef::new(&obj.name, "")))
                .collect();
        }
        known.sort_by_key(|k| (k.0, k.1));
        known.into_iter().map(|k| (k.1, k.2)).collect()
    }

    /// Which lanes hold which objects: `(lane, objects)` per lane that answered, and the
    /// failure of each lane that did not.
    pub async fn list_each(&self) -> Vec<(String, Result<Vec<ObjectInfo>, StorageError>)> {
        let lists = self
            .lanes
            .iter()
            .map(|l| async move { (l.name.clone(), l.list().await.map_err(|e| in_lane(l, e))) });
        futures_util::future::join_all(lists).await
    }
}

#[async_trait]
impl Storage for Lanes {
    fn describe(&self) -> String {
        let list: Vec<String> = self
            .lanes
            .iter()
            .map(|l| format!("{} ({})", l.name, l.describe()))
            .collect();
        format!(
            "lanes {}; {} cop{}",
            list.join(", "),
            self.copies,
            if self.copies == 1 { "y" } else { "ies" }
        )
    }

    fn spool_dir(&self) -> &Path {
        &self.spool
    }

    async fn put_file(&self, name: &str, path: &Path) -> Result<Location, StorageError> {
        check_name(name)?;
        let copies = self.put_copies(name, path).await?;
        std::fs::remove_file(path).map_err(|e| StorageError::io(path, e))?;
        Ok(Lanes::location_of(&copies))
    }

    /// Small objects (the wrapped key, tombstones) go to every lane: each lane alone must
    /// be enough to recover from.
    async fn put_bytes(&self, name: &str, data: Vec<u8>) -> Result<Location, StorageError> {
        check_name(name)?;
        let mut out = Vec::new();
        for l in &self.lanes {
            let location = l.put_bytes(name, &data).await.map_err(|e| in_lane(l, e))?;
            out.push(StoredCopy {
                lane: l.name.clone(),
                location,
            });
        }
        Ok(Lanes::location_of(&out))
    }

    async fn get_range(
        &self,
        obj: &ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        let mut failed: Vec<(usize, StorageError)> = Vec::new();
        for (i, r) in self.read_order(obj) {
            match self.lanes[i].get_range(&r, offset, len).await {
                Ok(d) => {
                    // A copy the catalog names but its lane lacks: heal it later.
                    let named = !obj.location.is_empty();
                    for (j, e) in &failed {
                        if named && matches!(e, StorageError::NotFound { .. }) {
                            self.note_miss(&obj.name, &self.lanes[*j].name);
                        }
                    }
                    return Ok(d);
                }
                Err(e) => failed.push((i, in_lane(&self.lanes[i], e))),
            }
        }
        // Every copy failed: missing everywhere is NotFound; otherwise the failure worth
        // retrying, if any.
        if failed
            .iter()
            .all(|(_, e)| matches!(e, StorageError::NotFound { .. }))
        {
            return Err(StorageError::NotFound {
                name: obj.name.clone(),
            });
        }
        let pos = failed
            .iter()
            .position(|(_, e)| e.is_retryable())
            .or_else(|| {
                failed
                    .iter()
                    .position(|(_, e)| !matches!(e, StorageError::NotFound { .. }))
            })
            .unwrap_or(0);
        Err(failed.swap_remove(pos).1)
    }

    /// Every object in the lanes that answer, each with the location of its copies. A lane
    /// that does not answer is left out with a warning (the canary reports it); when none
    /// answers, the first failure is the error.
    async fn list(&self) -> Result<Vec<ObjectInfo>, StorageError> {
        let mut merged: std::collections::BTreeMap<String, (u64, Vec<StoredCopy>)> =
            std::collections::BTreeMap::new();
        let mut first_err = None;
        let mut answered = 0;
        for (lane, r) in self.list_each().await {
            match r {
                Ok(objs) => {
                    answered += 1;
                    for o in objs {
                        let e = merged.entry(o.name).or_insert((o.size, Vec::new()));
                        e.1.push(StoredCopy {
                            lane: lane.clone(),
                            location: o.location,
                        });
                    }
                }
                Err(e) => {
                    tracing::warn!("listing: {e}");
                    first_err.get_or_insert(e);
                }
            }
        }
        if answered == 0 {
            return Err(first_err.expect("at least one lane"));
        }
        Ok(merged
            .into_iter()
            .map(|(name, (size, copies))| ObjectInfo {
                name,
                size,
                location: Lanes::location_of(&copies),
            })
            .collect())
    }

    async fn remove(&self, obj: &ObjectRef) -> Result<(), StorageError> {
        self.remove_many(std::slice::from_ref(obj)).await
    }

    /// Deletes every copy: each lane gets one batch of its copies. A location naming no copy
    /// is deleted by name in every lane.
    async fn remove_many(&self, objs: &[ObjectRef]) -> Result<(), StorageError> {
        let mut per_lane: Vec<Vec<ObjectRef>> = vec![Vec::new(); self.lanes.len()];
        for o in objs {
            let copies = self.copies_in(&o.location);
            if copies.is_empty() {
                for batch in per_lane.iter_mut() {
                    batch.push(ObjectRef::new(&o.name, ""));
                }
            }
            for c in copies {
                match self.lanes.iter().position(|l| l.name == c.lane) {
                    Some(i) => per_lane[i].push(ObjectRef::new(&o.name, c.location)),
                    None => tracing::warn!(
                        "{} has a copy in lane {}, which is no longer configured; it is left there",
                        o.name,
                        c.lane
                    ),
                }
            }
        }
        let deletes = per_lane
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.is_empty())
            .map(|(i, batch)| async move {
                for chunk in batch.chunks(REMOVE_BATCH) {
                    self.lanes[i]
                        .remove_many(chunk)
                        .await
                        .map_err(|e| in_lane(&self.lanes[i], e))?;
                }
                Ok::<(), StorageError>(())
            });
        for r in futures_util::future::join_all(deletes).await {
            r?;
        }
        Ok(())
    }

    /// The expected cost of uploading `bytes` in `objects` packs: every copy is uploaded, the
    /// work spread over the lanes that are connected.
    fn estimate(&self, bytes: u64, objects: u64) -> Option<TransferEstimate> {
        let ready: Vec<Arc<dyn Storage>> =
            self.lanes.iter().filter_map(|l| l.connected()).collect();
        if ready.is_empty() {
            return None;
        }
        let n = ready.len() as u64;
        let copies = self.copies as u64;
        let mut total: Option<TransferEstimate> = None;
        for b in &ready {
            let Some(e) = b.estimate((bytes * copies).div_ceil(n), (objects * copies).div_ceil(n))
            else {
                continue;
            };
            total = Some(match total {
                None => e,
                Some(t) => TransferEstimate {
                    message_calls: t.message_calls + e.message_calls,
                    part_calls: t.part_calls + e.part_calls,
                    seconds: t.seconds.max(e.seconds),
                },
            });
        }
        total
    }

    /// The first lane whose provider is slowing it down, named.
    fn throttle(&self) -> Option<Throttle> {
        self.lanes.iter().find_map(|l| {
            let mut t = l.connected()?.throttle()?;
            t.reason = format!("lane {}: {}", l.name, t.reason);
            Some(t)
        })
    }

    fn pushback(&self) -> Pushback {
        self.lanes
            .iter()
            .filter_map(|l| l.connected())
            .map(|b| b.pushback())
            .fold(Pushback::default(), |a, p| Pushback {
                flood_waits: a.flood_waits + p.flood_waits,
                premium_waits: a.premium_waits + p.premium_waits,
            })
    }

    /// As many packs at once as the lanes take together, each pack taking `copies` of them:
    /// that spreads the work, and a lane that keeps its link busy with two packs (Telegram:
    /// the next pack's parts fill the window while the last one is published) keeps doing so
    /// behind the lanes. A lane not connected counts for one.
    fn parallel_uploads(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| l.connected().map_or(1, |b| b.parallel_uploads().max(1)))
            .sum::<usize>()
            .div_ceil(self.copies)
            .max(1)
    }

    /// Each read goes to one lane, and the lanes' links are apart: what they each want.
    fn read_ahead(&self) -> u64 {
        self.lanes
            .iter()
            .filter_map(|l| l.connected())
            .map(|b| b.read_ahead())
            .sum::<u64>()
            .max(super::DEFAULT_READ_AHEAD)
    }

    fn as_lanes(&self) -> Option<&Lanes> {
        Some(self)
    }
}

/// Lane names: what the catalog records for every copy and alerts call a lane.
pub fn valid_lane_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Names the lane in an error.
fn in_lane(lane: &Lane, e: StorageError) -> StorageError {
    match e {
        StorageError::Transient(m) if !m.starts_with("lane ") => {
            StorageError::Transient(format!("lane {}: {m}", lane.name))
        }
        StorageError::Fatal(m) if !m.starts_with("lane ") => {
            StorageError::Fatal(format!("lane {}: {m}", lane.name))
        }
        e => e,
    }
}

fn escape(loc: &str) -> String {
    loc.replace('%', "%25").replace(',', "%2C")
}

fn unescape(loc: &str) -> String {
    loc.replace("%2C", ",").replace("%25", "%")
}

/// A second name for the same bytes: a hard link (no copy), or a copy across file systems.
pub fn link_or_copy(from: &Path, to: &Path) -> Result<(), StorageError> {
    let _ = std::fs::remove_file(to);
    if std::fs::hard_link(from, to).is_ok() {
        return Ok(());
    }
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| StorageError::io(to, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemoryStorage;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A memory store that reports push-back on demand.
    struct Pushy {
        inner: MemoryStorage,
        floods: AtomicU64,
        premium: AtomicU64,
        /// Packs it takes at once.
        uploads: usize,
    }

    #[async_trait]
    impl Storage for Pushy {
        fn describe(&self) -> String {
            "pushy".into()
        }
        fn spool_dir(&self) -> &Path {
            self.inner.spool_dir()
        }
        async fn put_file(&self, name: &str, path: &Path) -> Result<Location, StorageError> {
            self.inner.put_file(name, path).await
        }
        async fn put_bytes(&self, name: &str, data: Vec<u8>) -> Result<Location, StorageError> {
            self.inner.put_bytes(name, data).await
        }
        async fn get_range(
            &self,
            obj: &ObjectRef,
            offset: u64,
            len: u64,
        ) -> Result<Vec<u8>, StorageError> {
            self.inner.get_range(obj, offset, len).await
        }
        async fn list(&self) -> Result<Vec<ObjectInfo>, StorageError> {
            self.inner.list().await
        }
        async fn remove(&self, obj: &ObjectRef) -> Result<(), StorageError> {
            self.inner.remove(obj).await
        }
        fn pushback(&self) -> Pushback {
            Pushback {
                flood_waits: self.floods.load(Ordering::Relaxed),
                premium_waits: self.premium.load(Ordering::Relaxed),
            }
        }
        fn parallel_uploads(&self) -> usize {
            self.uploads
        }
    }

    fn lanes(n: usize, copies: usize, dir: &Path) -> (Lanes, Vec<Arc<Pushy>>) {
        lanes_taking(&vec![1; n], copies, dir)
    }

    /// Lanes whose stores take `uploads[i]` packs at once.
    fn lanes_taking(uploads: &[usize], copies: usize, dir: &Path) -> (Lanes, Vec<Arc<Pushy>>) {
        let stores: Vec<Arc<Pushy>> = uploads
            .iter()
            .enumerate()
            .map(|(i, &uploads)| {
                Arc::new(Pushy {
                    inner: MemoryStorage::new(dir.join(format!("spool{i}"))),
                    floods: AtomicU64::new(0),
                    premium: AtomicU64::new(0),
                    uploads,
                })
            })
            .collect();
        let l = stores
            .iter()
            .enumerate()
            .map(|(i, s)| Lane::ready(format!("l{i}"), s.clone() as Arc<dyn Storage>))
            .collect();
        std::fs::create_dir_all(dir.join("spool")).unwrap();
        (Lanes::new(l, copies, dir.join("spool")).unwrap(), stores)
    }

    /// Queues `n` packs without finishing any (equal measured rates): where they go shows
    /// each lane's share.
    fn queue(l: &Lanes, n: usize, size: u64) -> Vec<usize> {
        for lane in &l.lanes {
            let mut h = lane.health.lock().unwrap();
            h.queued = 0;
            h.rate = Some(1e6);
        }
        (0..n).map(|_| l.choose(size, 1, &[])[0]).collect()
    }

    fn count(picks: &[usize], lane: usize) -> usize {
        picks.iter().filter(|&&i| i == lane).count()
    }

    #[tokio::test(start_paused = true)]
    async fn new_packs_go_to_the_lane_with_the_most_headroom() {
        let dir = tempfile::tempdir().unwrap();
        let (l, _) = lanes(2, 1, dir.path());
        // Nothing measured, nothing queued: the first lane; with a pack queued there, the other.
        assert_eq!(l.choose(100, 1, &[]), vec![0]);
        assert_eq!(l.choose(100, 1, &[]), vec![1]);
        assert_eq!(l.choose(100, 1, &[]), vec![0]);
        // A lane with a long queue gets nothing until the other's queue is as long.
        l.lanes[0].health.lock().unwrap().queued = 10_000;
        l.lanes[1].health.lock().unwrap().queued = 0;
        let picks: Vec<usize> = (0..5).map(|_| l.choose(1000, 1, &[])[0]).collect();
        assert_eq!(picks, vec![1; 5]);
        // A lane measured twice as fast finishes a queue twice as long as soon.
        for lane in &l.lanes {
            lane.health.lock().unwrap().queued = 0;
        }
        l.lanes[0].health.lock().unwrap().rate = Some(2e6);
        l.lanes[1].health.lock().unwrap().rate = Some(1e6);
        let picks: Vec<usize> = (0..30).map(|_| l.choose(1000, 1, &[])[0]).collect();
        assert!((19..=21).contains(&count(&picks, 0)), "{picks:?}");
        // Copies go to distinct lanes.
        let (l3, _) = lanes(3, 2, dir.path());
        let two = l3.choose(10, 2, &[]);
        assert_eq!(two.len(), 2);
        assert_ne!(two[0], two[1]);
        assert_eq!(l3.choose(10, 2, &two), vec![2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_lane_pushed_back_gets_less_until_it_recovers() {
        let dir = tempfile::tempdir().unwrap();
        let (l, stores) = lanes(2, 1, dir.path());
        assert_eq!(count(&queue(&l, 20, 1000), 1), 10);

        // FLOOD_PREMIUM_WAIT on lane 1: it gets a quarter of lane 0's share.
        stores[1].premium.store(1, Ordering::Relaxed);
        let picks = queue(&l, 50, 1000);
        assert!((9..=10).contains(&count(&picks, 1)), "{picks:?}");

        // Quiet for the recovery time: even again.
        tokio::time::advance(RECOVERY + Duration::from_secs(1)).await;
        assert_eq!(count(&queue(&l, 20, 1000), 1), 10);

        // One FLOOD_WAIT is pacing; repeated ones (four here) cut the share to a quarter.
        stores[0].floods.store(1, Ordering::Relaxed);
        assert_eq!(count(&queue(&l, 20, 1000), 0), 10);
        stores[0].floods.store(4, Ordering::Relaxed);
        let picks = queue(&l, 50, 1000);
        assert!((9..=10).contains(&count(&picks, 0)), "{picks:?}");
        tokio::time::advance(RECOVERY + Duration::from_secs(1)).await;
        assert_eq!(count(&queue(&l, 20, 1000), 0), 10);
    }

    #[tokio::test]
    async fn lanes_keep_the_storage_contract() {
        let dir = tempfile::tempdir().unwrap();
        let (l, _) = lanes(3, 2, dir.path());
        crate::storage::conformance::run(&l).await;
    }

    #[tokio::test]
    async fn copies_land_in_distinct_lanes_reads_fall_back_and_deletes_take_every_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (l, stores) = lanes(3, 2, dir.path());
        l.set_seed("key-1.enc", b"key".to_vec());
        let p = dir.path().join("spool/pack");
        std::fs::write(&p, vec![7u8; 5000]).unwrap();
        let loc = l.put_file("aa.enc", &p).await.unwrap();
        assert!(!p.exists(), "the spool file is consumed");
        let copies = l.copies_in(&loc);
        assert_eq!(copies.len(), 2, "{loc}");
        assert_ne!(copies[0].lane, copies[1].lane);
        let held = |i: usize| -> Vec<String> {
            stores[i]
                .inner
                .snapshot()
                .into_iter()
                .map(|o| o.0)
                .collect()
        };
        for c in &copies {
            let i: usize = c.lane[1..].parse().unwrap();
            assert_eq!(held(i), vec!["aa.enc", "key-1.enc"], "lane {}", c.lane);
        }
        let left: Vec<_> = std::fs::read_dir(dir.path().join("spool"))
            .unwrap()
            .collect();
        assert!(left.is_empty(), "no link is left in the spool: {left:?}");

        // One copy lost: the other answers, and the lost one is remembered for healing.
        let first: usize = copies[0].lane[1..].parse().unwrap();
        stores[first]
            .inner
            .remove(&ObjectRef::new("aa.enc", ""))
            .await
            .unwrap();
        let obj = ObjectRef::new("aa.enc", loc.clone());
        assert_eq!(l.get_range(&obj, 10, 3).await.unwrap(), vec![7u8; 3]);
        assert_eq!(
            l.take_misses(),
            vec![("aa.enc".to_string(), copies[0].lane.clone())]
        );
        // Each copy read alone: the lost one is NotFound.
        let refs = l.copy_refs(&obj);
        assert!(matches!(
            l.get_range(&refs[0].1, 0, 1).await,
            Err(StorageError::NotFound { .. })
        ));
        assert!(l.get_range(&refs[1].1, 0, 1).await.is_ok());

        // Healing puts it back in its lane.
        let healed = l
            .heal("aa.enc", 5000, &loc, &copies[0].lane, &|_: &Path| Ok(()))
            .await
            .unwrap()
            .expect("a lane takes it");
        assert_eq!(l.copies_in(&healed).len(), 2);
        assert_eq!(held(first), vec!["aa.enc", "key-1.enc"]);

        // A delete takes every copy.
        l.remove_many(&[ObjectRef::new("aa.enc", healed)])
            .await
            .unwrap();
        for i in 0..3 {
            assert!(!held(i).contains(&"aa.enc".to_string()), "lane {i}");
        }
    }

    #[tokio::test]
    async fn a_location_from_before_lanes_is_the_first_lanes() {
        let dir = tempfile::tempdir().unwrap();
        let (l, stores) = lanes(2, 1, dir.path());
        stores[0]
            .inner
            .put_bytes("old.enc", b"old".to_vec())
            .await
            .unwrap();
        assert_eq!(
            l.copies_in("old.enc"),
            vec![StoredCopy {
                lane: "l0".into(),
                location: "old.enc".into()
            }]
        );
        let got = l
            .get_range(&ObjectRef::new("old.enc", "old.enc"), 0, 3)
            .await
            .unwrap();
        assert_eq!(got, b"old");
        // A lane renamed in the configuration: its copies are still found by name.
        let renamed = ObjectRef::new("old.enc", "lanes:gone=old.enc");
        assert_eq!(l.get_range(&renamed, 0, 3).await.unwrap(), b"old");
        // Locations survive the encoding whatever they hold.
        let odd = vec![StoredCopy {
            lane: "l1".into(),
            location: "a,b%2C=c".into(),
        }];
        assert_eq!(l.copies_in(&Lanes::location_of(&odd)), odd);
    }

    struct Unreachable;

    #[async_trait]
    impl Connector for Unreachable {
        async fn connect(&self) -> Result<Arc<dyn Storage>, StorageError> {
            Err(StorageError::Fatal("401 USER_DEACTIVATED".into()))
        }
    }

    #[tokio::test]
    async fn lanes_that_never_connected_fail_fast_and_name_themselves() {
        let dir = tempfile::tempdir().unwrap();
        let lazy = |n: &str| {
            Lane::lazy(
                n,
                format!("telegram session /{n}.session"),
                Box::new(Unreachable),
                Some("401 USER_DEACTIVATED".into()),
            )
        };
        let l = Lanes::new(vec![lazy("a"), lazy("b")], 1, dir.path().into()).unwrap();
        assert_eq!(
            l.estimate(1 << 30, 10),
            None,
            "nothing connected: no estimate"
        );
        let e = l
            .get_range(&ObjectRef::new("aa.enc", "lanes:a=1,b=2"), 0, 1)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("lane "), "{e}");
        assert!(
            l.list().await.is_err(),
            "no lane answers: the listing fails"
        );
        assert!(l.describe().contains("a (telegram session /a.session)"));
    }

    #[test]
    fn lanes_upload_as_many_packs_as_their_stores_take_together() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (&[1, 1][..], 1, 2),
            (&[1, 1, 1][..], 2, 2),
            (&[2, 2][..], 1, 4),
            (&[2, 2][..], 2, 2),
            (&[2, 1, 1][..], 2, 2),
        ];
        for (i, (uploads, copies, want)) in cases.into_iter().enumerate() {
            let (l, _) = lanes_taking(uploads, copies, &dir.path().join(i.to_string()));
            assert_eq!(l.parallel_uploads(), want, "{uploads:?} × {copies} copies");
        }
    }

    #[tokio::test]
    async fn too_few_lanes_for_the_copies_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let s: Arc<dyn Storage> = Arc::new(MemoryStorage::new(dir.path()));
        let e = Lanes::new(vec![Lane::ready("a", s)], 2, dir.path().into())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("2 copies need at least 2 lanes"), "{e}");
        assert!(e.contains("STORINATOR_COPIES"), "{e}");
    }

    /// Two lanes that each move 1 MB/s: one uploads its packs one at a time, the other two at
    /// a time (each then at half the speed). Both are measured at 1 MB/s; measured per upload,
    /// the second looked half as fast and got half the work it should.
    #[tokio::test(start_paused = true)]
    async fn a_lane_uploading_several_at_once_is_measured_at_its_whole_rate() {
        let step = Duration::from_secs(1);
        let serial = Mutex::new(Health::default());
        for _ in 0..3 {
            let u = Uploading::start(&serial);
            tokio::time::advance(step).await;
            u.succeeded(1_000_000);
        }
        let parallel = Mutex::new(Health::default());
        for _ in 0..3 {
            let (a, b) = (Uploading::start(&parallel), Uploading::start(&parallel));
            tokio::time::advance(step * 2).await;
            a.succeeded(1_000_000);
            b.succeeded(1_000_000);
        }
        for h in [&serial, &parallel] {
            let rate = h.lock().unwrap().rate.unwrap();
            assert!((rate - 1e6).abs() < 1.0, "{rate}");
        }
        // An upload that fails or is dropped stops counting, and tells nothing of the rate.
        {
            let _dropped = Uploading::start(&parallel);
            tokio::time::advance(step * 10).await;
        }
        let h = parallel.lock().unwrap();
        assert_eq!(h.uploading, 0);
        assert!((h.rate.unwrap() - 1e6).abs() < 1.0);
    }
}
