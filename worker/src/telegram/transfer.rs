//! Part transfers (upload.saveFilePart, saveBigFilePart, getFile) on their own connections.
//!
//! Every part in flight holds a slot of the storage's window (see `window`); the parts go out
//! on pipelined connections (see `pipe`) to the data centre they concern, several per data
//! centre: one more is opened whenever each has [`PARTS_PER_CONNECTION`] parts on it and the
//! parts wanted allow more (8 connections for the default window of 32), several at once
//! (a new one spends a round trip on TCP's handshake, and another settling the server salt
//! unless the data centre's salts are known (see `salts`), before its first parts go with the
//! initConnection riding on them: one after the other, eight would take up to 16, over a far
//! link more than a second at a fraction of the speed). Several connections matter because
//! Telegram (like any TCP path) limits what one connection carries; several parts per
//! connection because each part otherwise costs a whole round trip. A part goes to the
//! connection with the fewest parts on it, or waits for one opening rather than crowd a full
//! one. Failures follow the storage's one retry policy: waits pause the class
//! and shrink the window, transient failures are retried on a fresh connection with backoff.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use grammers_session::Session;
use grammers_tl_types::{self as tl, Serializable};
use storinator_shared::error::StorageError;
use tokio::sync::Notify;
use tokio::time::{Instant, timeout};

use super::errors;
use super::pipe::{Body, Pipe, PipeError, Seat};
use super::salts::{self, SaltBook};
use super::scheduler::CallClass;
use super::storage::{CallError, Failure, Inner};

/// Parts on one connection before another connection is worth opening (2 MiB of 512 KiB
/// parts, what Telegram Desktop's downloader keeps waiting per connection at most; it uses
/// up to 8 connections per data centre, as the default window here does).
pub(super) const PARTS_PER_CONNECTION: usize = 4;

/// How many connections to have open for `parts` in flight: [`PARTS_PER_CONNECTION`] each.
pub(super) fn connections_for(parts: usize) -> usize {
    parts.div_ceil(PARTS_PER_CONNECTION).max(1)
}

/// The part connections of each data centre.
#[derive(Default)]
pub(super) struct Pipes {
    /// Open and opening under one lock: a connection is added before it stops counting as
    /// opening, so whoever reads both at once may count it twice but never misses it (read
    /// apart, a connection that finished in between went uncounted and a fifth opened for
    /// four wanted).
    by_dc: Mutex<HashMap<i32, DcPipes>>,
    /// Woken whenever a connection finishes opening (or fails to).
    changed: Notify,
    /// The salts each data centre gave (see `salts`).
    pub(super) salts: Arc<SaltBook>,
    /// Data centres whose salts are being fetched again.
    refreshing: Mutex<HashSet<i32>>,
}

/// One data centre's part connections.
#[derive(Default)]
struct DcPipes {
    open: Vec<Arc<Pipe>>,
    /// Connections opening now.
    opening: usize,
}

/// Where a part goes, given the parts on each open connection (see [`Inner::pipe_for`]).
#[derive(Debug, PartialEq)]
enum Placement {
    /// On the connection at this index: it has room, or no more connections are wanted.
    Take(usize),
    /// Every open connection is full and more are wanted: wait for one opening now.
    Wait,
    /// Every open connection is full, more are wanted and none is opening: on the least busy
    /// one at this index (more should open).
    Busy(usize),
    /// None open and none opening: open one.
    Open,
}

/// The least loaded connection if it has room or no more are wanted; otherwise wait for one
/// opening; a busy one only when none is opening.
fn place(loads: &[usize], wanted: usize, opening: usize) -> Placement {
    let best = (0..loads.len()).min_by_key(|&i| loads[i]);
    match best {
        Some(i) if loads[i] < PARTS_PER_CONNECTION || loads.len() >= wanted => Placement::Take(i),
        _ if opening > 0 => Placement::Wait,
        Some(i) => Placement::Busy(i),
        None => Placement::Open,
    }
}

impl Pipes {
    /// Where a part for `dc` goes now (see [`place`]), with its place on the connection to
    /// take: taken under the same lock as the loads were read, so two parts placed at once
    /// never both see the same room.
    fn place(&self, dc: i32, wanted: usize) -> (Placement, Option<Seat>) {
        let mut by_dc = self.by_dc.lock().unwrap();
        let dc = by_dc.entry(dc).or_default();
        dc.open.retain(|p| !p.is_closed());
        let loads: Vec<usize> = dc.open.iter().map(|p| p.load()).collect();
        let placement = place(&loads, wanted, dc.opening);
        let seat = match placement {
            Placement::Take(i) | Placement::Busy(i) => Some(Pipe::seat(&dc.open[i])),
            Placement::Wait | Placement::Open => None,
        };
        (placement, seat)
    }

    /// Counts one more connection to `dc` as opening, unless those open and opening already
    /// make `wanted`.
    fn start_opening(&self, dc: i32, wanted: usize) -> bool {
        let mut by_dc = self.by_dc.lock().unwrap();
        let dc = by_dc.entry(dc).or_default();
        let open = dc.open.iter().filter(|p| !p.is_closed()).count();
        if open + dc.opening >= wanted {
            return false;
        }
        dc.opening += 1;
        true
    }

    /// One connection to `dc` finished opening (or failed to).
    fn done_opening(&self, dc: i32) {
        {
            let mut by_dc = self.by_dc.lock().unwrap();
            let dc = by_dc.entry(dc).or_default();
            dc.opening = dc.opening.saturating_sub(1);
        }
        self.changed.notify_waiters();
    }

    /// Adds a newly opened connection to `dc`.
    fn add(&self, dc: i32, pipe: Arc<Pipe>) {
        self.by_dc
            .lock()
            .unwrap()
            .entry(dc)
            .or_default()
            .open
            .push(pipe);
    }

    /// Adds a connection a part opened for itself, with that part's place on it taken before
    /// any other part can see it.
    fn add_seated(&self, dc: i32, pipe: Arc<Pipe>) -> Seat {
        let mut by_dc = self.by_dc.lock().unwrap();
        let seat = Pipe::seat(&pipe);
        by_dc.entry(dc).or_default().open.push(pipe);
        seat
    }

    /// Stops giving `pipe` new parts (it timed out and may be wedged); the parts already on
    /// it finish or fail there.
    fn retire(&self, dc: i32, pipe: &Arc<Pipe>) {
        if let Some(dc) = self.by_dc.lock().unwrap().get_mut(&dc) {
            dc.open.retain(|p| !Arc::ptr_eq(p, pipe));
        }
    }
}

/// Counts a connection as opening until dropped (however the opening ends).
struct Opening<'a> {
    pipes: &'a Pipes,
    dc: i32,
}

impl Drop for Opening<'_> {
    fn drop(&mut self) {
        self.pipes.done_opening(self.dc);
    }
}

impl Inner {
    /// Sends one serialized part-class request to data centre `dc` and returns the raw
    /// answer. The caller holds a window slot for it. `bytes` is the payload the part moves,
    /// for the transfer rate; `what` names the part in errors.
    pub(super) async fn transfer(
        self: &Arc<Self>,
        dc: i32,
        body: Body,
        bytes: u64,
        what: &str,
    ) -> Result<Vec<u8>, CallError> {
        self.on_dc(Some(dc), |dc| {
            let dc = dc.unwrap_or_else(|| self.home_dc());
            let body = body.clone();
            async move {
                self.with_policy(CallClass::Transfer, what, || {
                    self.part_attempt(dc, &body, bytes)
                })
                .await
            }
        })
        .await
    }

    /// One attempt at a part: a connection, the call, its answer within the timeout.
    async fn part_attempt(
        self: &Arc<Self>,
        dc: i32,
        body: &Body,
        bytes: u64,
    ) -> Result<Vec<u8>, Failure> {
        let seat = self.pipe_for(dc).await?;
        self.sched.note_part_sent(seat.load_when_taken());
        let pipe = seat.pipe().clone();
        let started = Instant::now();
        match timeout(self.cfg.request_timeout, seat.call(body.clone())).await {
            Ok(Ok(answer)) => {
                self.sched.transfer_ok(bytes, started.elapsed());
                Ok(answer)
            }
            Ok(Err(PipeError::Rpc(e))) => Err(Failure::Rpc(e)),
            Ok(Err(PipeError::Lost(why))) => {
                self.sched.note_reconnect();
                Err(Failure::Again(why))
            }
            Ok(Err(PipeError::Closed)) => Err(Failure::Again("connection closed".into())),
            Err(_) => {
                // The connection may be wedged: no new parts on it.
                self.pipes.retire(dc, &pipe);
                self.sched.note_reconnect();
                Err(Failure::Again(format!(
                    "no answer within {:?}",
                    self.cfg.request_timeout
                )))
            }
        }
    }

    /// A connection to `dc` for one more part: the least busy one, if it has room or no more
    /// connections are wanted. Otherwise more open in the background (see
    /// [`Inner::open_in_background`]) and the part waits for the next one to open rather than
    /// crowd a busy one: connections opened together finish opening together, and parts
    /// piled on the first one would cross the link at one connection's speed while the others
    /// stand idle (Telegram limits what one connection carries). A part takes a busy
    /// connection only when none is opening; with none open either, it opens one itself and
    /// meets that attempt's error.
    ///
    /// A new connection spends a round trip on TCP's handshake, and one more learning the
    /// server salt unless the data centre's salts are known (see `salts`), while a growing
    /// window doubles every round trip: so connections open for the parts transfers have
    /// announced (within the window's bound), all at once, or they would trail the window
    /// (see [`super::scheduler::Scheduler::parts_wanted`]).
    async fn pipe_for(self: &Arc<Self>, dc: i32) -> Result<Seat, Failure> {
        self.refresh_salts_if_unknown(dc);
        // A part asks for connections once; if it wakes to find none open and none opening
        // (they failed), it opens one itself, which reports the failure to the retry policy.
        let mut waited = false;
        loop {
            // Registered before looking, so an opening that ends meanwhile still wakes it.
            let changed = self.pipes.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let wanted = connections_for(self.sched.parts_wanted());
            let mut placed = self.pipes.place(dc, wanted);
            if !waited && !matches!(placed.0, Placement::Take(_)) {
                // Give up a busy connection's seat before looking again, or the part would
                // see (and count) itself there.
                drop(placed);
                self.open_in_background(dc, wanted);
                placed = self.pipes.place(dc, wanted);
            }
            match placed {
                (Placement::Wait, _) => {
                    changed.await;
                    waited = true;
                }
                (_, Some(seat)) => return Ok(seat),
                (_, None) => return self.open_here(dc).await,
            }
        }
    }

    /// Opens a connection to `dc` for the calling part, counted as opening meanwhile.
    async fn open_here(&self, dc: i32) -> Result<Seat, Failure> {
        self.pipes.start_opening(dc, usize::MAX);
        let _counted = Opening {
            pipes: &self.pipes,
            dc,
        };
        let pipe = self.open_counted(dc).await?;
        Ok(self.pipes.add_seated(dc, pipe))
    }

    /// With no salt of `dc` known (never fetched, run out, or refused), fetches them again in
    /// the background, once at a time: the connections opening meanwhile learn theirs the slow
    /// way.
    fn refresh_salts_if_unknown(self: &Arc<Self>, dc: i32) {
        if self.pipes.salts.current(dc).is_some()
            || !self.pipes.refreshing.lock().unwrap().insert(dc)
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let at = (dc != me.home_dc()).then_some(dc);
            me.fetch_salts(at).await;
            me.pipes.refreshing.lock().unwrap().remove(&dc);
        });
    }

    /// Asks data centre `dc` (`None`: the home one) for its coming server salts and keeps
    /// them for part connections. One attempt: without them connections only start slower.
    pub(super) async fn fetch_salts(&self, dc: Option<i32>) {
        let req = tl::functions::GetFutureSalts {
            num: salts::ASK_FOR,
        };
        let invoke = async {
            match dc {
                None => self.client.invoke(&req).await,
                Some(dc) => self.client.invoke_in_dc(dc, &req).await,
            }
        };
        let at = dc.unwrap_or_else(|| self.home_dc());
        match timeout(self.cfg.request_timeout, invoke).await {
            Ok(Ok(answer)) => self.pipes.salts.learn(at, answer),
            Ok(Err(e)) => tracing::debug!(dc = at, "no future salts: {e}"),
            Err(_) => tracing::debug!(dc = at, "no future salts within the timeout"),
        }
    }

    /// Opens a connection to `dc` for parts, counted in the statistics.
    async fn open_counted(&self, dc: i32) -> Result<Arc<Pipe>, Failure> {
        let pipe = match timeout(self.cfg.request_timeout, self.open_pipe(dc)).await {
            Ok(r) => Arc::new(r?),
            Err(_) => {
                return Err(Failure::Again(format!(
                    "connecting to data centre {dc} timed out"
                )));
            }
        };
        self.sched.note_part_connection();
        Ok(pipe)
    }

    /// Opens connections to `dc` in the background until those open and opening make `wanted`
    /// (so they open together, see [`Inner::pipe_for`]); a failure only means the parts stay
    /// on the connections there are.
    fn open_in_background(self: &Arc<Self>, dc: i32, wanted: usize) {
        while self.pipes.start_opening(dc, wanted) {
            self.sched.note_connection_opening(1);
            let me = self.clone();
            tokio::spawn(async move {
                let counted = Opening {
                    pipes: &me.pipes,
                    dc,
                };
                let why = match me.open_counted(dc).await {
                    Ok(pipe) => {
                        me.pipes.add(dc, pipe);
                        None
                    }
                    Err(Failure::Again(why)) => Some(why),
                    Err(Failure::Fatal(e)) => Some(e.to_string()),
                    Err(Failure::Rpc(e)) => Some(errors::describe(&e)),
                };
                if let Some(why) = why {
                    tracing::debug!(dc, "another part connection did not open: {why}");
                }
                drop(counted);
                me.sched.note_connection_opening(-1);
            });
        }
    }

    /// Connects to `dc` with the session's key for it and initialises the connection.
    async fn open_pipe(&self, dc: i32) -> Result<Pipe, Failure> {
        let option = self
            .session
            .dc_option(dc)
            .ok()
            .flatten()
            .filter(|o| o.auth_key.is_some());
        let Some(option) = option else {
            return Err(Failure::Fatal(StorageError::Fatal(format!(
                "the session has no authorization key for data centre {dc}\nhint: run `storinator-worker login`"
            ))));
        };
        let addr = SocketAddr::V4(option.ipv4);
        Pipe::connect(
            dc,
            addr,
            option.auth_key.unwrap(),
            self.init_prefix(),
            self.pipes.salts.clone(),
            self.cfg.compress_parts,
        )
        .await
        .map_err(|e| Failure::Again(format!("connect to {addr}: {e}")))
    }

    /// invokeWithLayer(initConnection(...)) without its query, for a new connection's first
    /// calls to carry (see `pipe`): both wrappers end with their query, so it is the wrapper
    /// around help.getConfig less getConfig's constructor (it has no fields).
    fn init_prefix(&self) -> Vec<u8> {
        use tl::Identifiable;
        let init = tl::functions::InvokeWithLayer {
            layer: tl::LAYER,
            query: tl::functions::InitConnection {
                api_id: self.cfg.api_id,
                device_model: "storinator".into(),
                system_version: std::env::consts::OS.into(),
                app_version: env!("CARGO_PKG_VERSION").into(),
                system_lang_code: "en".into(),
                lang_pack: "".into(),
                lang_code: "en".into(),
                proxy: None,
                params: None,
                query: tl::functions::help::GetConfig {},
            },
        };
        let mut bytes = init.to_bytes();
        let tail = bytes.split_off(bytes.len() - 4);
        debug_assert_eq!(
            tail,
            tl::functions::help::GetConfig::CONSTRUCTOR_ID.to_le_bytes()
        );
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_takes_the_least_loaded_connection_with_room() {
        assert_eq!(place(&[3, 1, 2], 4, 0), Placement::Take(1));
        // Full, but all the connections wanted are open: the least loaded.
        assert_eq!(place(&[5, 4, 6, 4], 4, 0), Placement::Take(1));
    }

    #[test]
    fn a_part_waits_for_a_connection_opening_rather_than_crowd_a_full_one() {
        // Connections opened together finish together: piling the parts on the first one
        // open would send them at one connection's speed.
        assert_eq!(place(&[4], 4, 3), Placement::Wait);
        assert_eq!(place(&[], 4, 4), Placement::Wait);
        // Nothing opening (they failed): a busy one, or open one.
        assert_eq!(place(&[4, 5], 4, 0), Placement::Busy(0));
        assert_eq!(place(&[], 4, 0), Placement::Open);
    }

    /// A connection to a listener that never answers (kept alive beside it), as a part
    /// connection of data centre 2.
    async fn idle_pipe(pipes: &Pipes) -> (Arc<Pipe>, tokio::net::TcpListener) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pipe = Pipe::connect(2, addr, [7; 256], Vec::new(), pipes.salts.clone(), false)
            .await
            .unwrap();
        (Arc::new(pipe), listener)
    }

    /// Two idle part connections of data centre 2, added to a pool.
    async fn two_idle_pipes() -> (Pipes, Vec<tokio::net::TcpListener>) {
        let pipes = Pipes::default();
        let mut listeners = Vec::new();
        for _ in 0..2 {
            let (pipe, listener) = idle_pipe(&pipes).await;
            pipes.add(2, pipe);
            listeners.push(listener);
        }
        (pipes, listeners)
    }

    #[tokio::test]
    async fn connections_open_only_until_open_and_opening_make_those_wanted() {
        let (pipes, _listener) = two_idle_pipes().await;
        assert!(pipes.start_opening(2, 4));
        assert!(pipes.start_opening(2, 4));
        assert!(
            !pipes.start_opening(2, 4),
            "two open and two opening make four"
        );
        // One finishes: added first, counted as opening until its guard drops, so that a look
        // at both in between counts it twice rather than not at all. (This checks the counting
        // rule; the race it guards against, a connection finishing between two reads under two
        // locks, is ruled out by the one lock and has no deterministic test here.)
        let (pipe, _third) = idle_pipe(&pipes).await;
        pipes.add(2, pipe);
        assert!(!pipes.start_opening(2, 4));
        pipes.done_opening(2);
        assert!(!pipes.start_opening(2, 4), "three open and one opening");
        pipes.done_opening(2);
        assert!(
            pipes.start_opening(2, 4),
            "three open, none opening: one more"
        );
    }

    #[tokio::test]
    async fn a_part_placed_counts_on_its_connection_before_it_is_sent() {
        // Parts placed one after the other, none sent yet: each sees the places taken before
        // it. (When the count began only at sending, two parts placed at once could both see
        // room on one connection: five parts on a connection of four in CI.)
        let (pipes, _listener) = two_idle_pipes().await;
        let mut seats = Vec::new();
        for _ in 0..8 {
            let (placement, seat) = pipes.place(2, 2);
            assert!(matches!(placement, Placement::Take(_)), "{placement:?}");
            seats.push(seat.unwrap());
        }
        let mut loads: Vec<usize> = seats.iter().map(|s| s.load_when_taken()).collect();
        loads.sort();
        assert_eq!(
            loads,
            [1, 1, 2, 2, 3, 3, 4, 4],
            "spread over both, one at a time"
        );
        // A ninth part: both are full and no more are wanted, so the least loaded takes it.
        let (placement, _ninth) = pipes.place(2, 2);
        assert!(matches!(placement, Placement::Take(_)), "{placement:?}");
        // A place given up frees its room.
        drop(seats.pop());
        drop(seats.pop());
        let (_, seat) = pipes.place(2, 2);
        assert!(seat.unwrap().load_when_taken() <= 4);
        // A connection that opened for a part comes with that part's place already taken.
        let (pipe, _third) = idle_pipe(&pipes).await;
        let first = pipes.add_seated(2, pipe);
        assert_eq!(first.load_when_taken(), 1);
        assert_eq!(first.pipe().load(), 1);
    }
}
