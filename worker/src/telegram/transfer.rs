//! Part transfers (upload.saveFilePart, saveBigFilePart, getFile) on their own connections.
//!
//! Every part in flight holds a slot of the storage's window (see `window`); the parts go out
//! on pipelined connections (see `pipe`) to the data centre they concern, several per data
//! centre: one more is opened whenever each has [`PARTS_PER_CONNECTION`] parts on it and the
//! parts wanted allow more (8 connections for the default window of 32), several at once
//! (a new one spends two round trips settling the server salt before its first part goes, the
//! initConnection riding on that part: one after the other, eight would take 16, over a far
//! link more than two seconds at a fraction of the speed). Several connections matter
//! because Telegram (like any TCP path) limits what one connection carries; several parts per connection
//! because each part otherwise costs a whole round trip. A part goes to the connection with the
//! fewest parts on it. Failures follow the storage's one retry policy: waits pause the class
//! and shrink the window, transient failures are retried on a fresh connection with backoff.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use grammers_session::Session;
use grammers_tl_types::{self as tl, Serializable};
use storinator_shared::error::StorageError;
use tokio::time::{Instant, timeout};

use super::errors;
use super::pipe::{Body, Pipe, PipeError};
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
    by_dc: Mutex<HashMap<i32, Vec<Arc<Pipe>>>>,
    /// With no connection open, one part opens it while the others wait.
    opening: tokio::sync::Mutex<()>,
    /// Connections of each data centre opening now.
    opening_now: Mutex<HashMap<i32, usize>>,
}

impl Pipes {
    /// The least loaded open connection to `dc`, if it has room or no more are wanted;
    /// `any` takes it whatever its load.
    fn pick(&self, dc: i32, wanted: usize, any: bool) -> Option<Arc<Pipe>> {
        let mut by_dc = self.by_dc.lock().unwrap();
        let pipes = by_dc.entry(dc).or_default();
        pipes.retain(|p| !p.is_closed());
        let best = pipes.iter().min_by_key(|p| p.load())?;
        (any || best.load() < PARTS_PER_CONNECTION || pipes.len() >= wanted).then(|| best.clone())
    }

    /// Counts one more connection to `dc` as opening, unless those open and opening already
    /// make `wanted`.
    fn start_opening(&self, dc: i32, wanted: usize) -> bool {
        let open = self
            .by_dc
            .lock()
            .unwrap()
            .get(&dc)
            .map_or(0, |p| p.iter().filter(|p| !p.is_closed()).count());
        let mut opening_now = self.opening_now.lock().unwrap();
        let opening = opening_now.entry(dc).or_default();
        if open + *opening >= wanted {
            return false;
        }
        *opening += 1;
        true
    }

    /// One connection to `dc` finished opening (or failed to).
    fn done_opening(&self, dc: i32) {
        let mut opening_now = self.opening_now.lock().unwrap();
        let opening = opening_now.entry(dc).or_default();
        *opening = opening.saturating_sub(1);
    }

    fn add(&self, dc: i32, pipe: Arc<Pipe>) {
        self.by_dc.lock().unwrap().entry(dc).or_default().push(pipe);
    }

    /// Stops giving `pipe` new parts (it timed out and may be wedged); the parts already on
    /// it finish or fail there.
    fn retire(&self, dc: i32, pipe: &Arc<Pipe>) {
        if let Some(pipes) = self.by_dc.lock().unwrap().get_mut(&dc) {
            pipes.retain(|p| !Arc::ptr_eq(p, pipe));
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
        let pipe = self.pipe_for(dc).await?;
        self.sched.note_part_sent(pipe.load() + 1);
        let started = Instant::now();
        match timeout(self.cfg.request_timeout, pipe.call(body.clone())).await {
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

    /// A connection to `dc` for one more part. When every connection is busy and the window
    /// allows more, another one opens in the background while the part goes on the least busy
    /// one; only with no connection at all does the part wait for one to open.
    ///
    /// A new connection spends two round trips before its parts go (the first message learns
    /// the server salt, grammers' MTProto layer then fetches future salts; the initConnection
    /// rides on the first parts, see `pipe`), while a growing window doubles every round trip:
    /// so connections open for the parts transfers have announced (within the window's bound),
    /// all at once, or they would trail the window (see
    /// [`super::scheduler::Scheduler::parts_wanted`]).
    async fn pipe_for(self: &Arc<Self>, dc: i32) -> Result<Arc<Pipe>, Failure> {
        let wanted = connections_for(self.sched.parts_wanted());
        if let Some(p) = self.pipes.pick(dc, wanted, false) {
            return Ok(p);
        }
        if let Some(p) = self.pipes.pick(dc, wanted, true) {
            self.open_in_background(dc, wanted);
            return Ok(p);
        }
        let _one_at_a_time = self.pipes.opening.lock().await;
        if let Some(p) = self.pipes.pick(dc, wanted, true) {
            return Ok(p);
        }
        // None open: this part waits for one, and the others wanted open beside it.
        self.pipes.start_opening(dc, usize::MAX);
        let _counted = Opening {
            pipes: &self.pipes,
            dc,
        };
        for _ in 1..wanted {
            self.open_in_background(dc, wanted);
        }
        self.open_and_add(dc).await
    }

    async fn open_and_add(&self, dc: i32) -> Result<Arc<Pipe>, Failure> {
        let pipe = match timeout(self.cfg.request_timeout, self.open_pipe(dc)).await {
            Ok(r) => Arc::new(r?),
            Err(_) => {
                return Err(Failure::Again(format!(
                    "connecting to data centre {dc} timed out"
                )));
            }
        };
        self.sched.note_part_connection();
        self.pipes.add(dc, pipe.clone());
        Ok(pipe)
    }

    /// Opens one more connection to `dc` unless those open and opening already make `wanted`
    /// (so while the window grows, several open at once); a failure only means the parts stay
    /// on the connections there are.
    fn open_in_background(self: &Arc<Self>, dc: i32, wanted: usize) {
        if !self.pipes.start_opening(dc, wanted) {
            return;
        }
        self.sched.note_connection_opening(1);
        let me = self.clone();
        tokio::spawn(async move {
            let counted = Opening {
                pipes: &me.pipes,
                dc,
            };
            let why = match me.open_and_add(dc).await {
                Ok(_) => None,
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
            addr,
            option.auth_key.unwrap(),
            self.init_prefix(),
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
