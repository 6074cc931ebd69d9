//! A pipelined MTProto connection for part transfers.
//!
//! grammers' `Sender` keeps any number of requests in flight, but only its `SenderPool` can
//! feed it more than one at a time, and the pool gzips every request of 512 bytes or more (at
//! the best compression level: for encrypted parts, pure CPU waste) and keeps one connection
//! per data centre. A transfer over a link with a round-trip time needs several requests in
//! flight per connection and several connections, so this module drives grammers' own MTProto
//! layer (`mtp::Encrypted`, the `Full` transport) with its own I/O loop: any number of calls
//! go out back to back, their answers are matched to them by message id, and messages the
//! server refused for a bad salt or a bad message id are sent again, as grammers does.
//!
//! A new connection must begin with initConnection (wrapped in invokeWithLayer). Sent as a
//! call of its own, it cost a round trip before any part could go; instead each call made
//! before the connection has answered one is wrapped in it (initConnection's `query` is the
//! call itself, and the answer is the call's), as the first call of a connection is in
//! Telegram's own clients. A connection opened with a salt the data centre gave for its key
//! (see `salts`) sends its calls at once; one opened without (its first message then goes
//! under salt 0) sends only one call until the server has said anything (its first answer is
//! bad_server_salt, then grammers fetches the future salts): parts sent under the wrong salt
//! would be refused after crossing the link.
//!
//! One task owns the socket. Callers hand it calls through a channel and wait for their
//! answer; when the connection fails every call on it fails with [`PipeError::Lost`], and a
//! call handed to a connection that already ended fails with [`PipeError::Closed`] (it never
//! left). A connection with nothing to do for a minute closes itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use grammers_crypto::DequeBuffer;
use grammers_mtproto::MsgId;
use grammers_mtproto::mtp::{self, Deserialization, Mtp};
use grammers_mtproto::transport::{self, Transport};
use grammers_mtsender::RpcError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::salts::SaltBook;

/// The most one transport packet may hold, either way (Telegram's limit is about 1 MiB).
const MAX_PACKET: usize = 1024 * 1024 + 8 * 1024;
/// Room in front of a packet for the headers the MTProto layer and the transport prepend.
const HEADROOM: usize = mtp::MAX_TRANSPORT_HEADER_LEN
    + mtp::ENCRYPTED_PACKET_HEADER_LEN
    + mtp::PLAIN_PACKET_HEADER_LEN
    + mtp::MESSAGE_CONTAINER_HEADER_LEN;
/// bad_msg_notification's code for a message under a wrong server salt.
const BAD_SERVER_SALT: i32 = 48;
/// A connection idle this long closes (Telegram drops idle connections after a while anyway;
/// a fresh one costs a round trip).
const IDLE_CLOSE: Duration = Duration::from_secs(60);

/// A serialized request, shared between the caller (which may retry it elsewhere) and the
/// connection (which may have to send it again).
pub(super) type Body = Arc<Vec<u8>>;

/// Why a call on a pipe did not get an answer.
#[derive(Debug)]
pub(super) enum PipeError {
    /// Telegram answered with an error.
    Rpc(RpcError),
    /// The connection failed while the call was on it: it may or may not have reached
    /// Telegram.
    Lost(String),
    /// The connection had ended before the call was handed to it: the call never left.
    Closed,
}

struct Call {
    body: Body,
    reply: oneshot::Sender<Result<Vec<u8>, PipeError>>,
}

/// One connection with any number of calls in flight.
pub(super) struct Pipe {
    calls: mpsc::UnboundedSender<Call>,
    load: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Counts a call as on its pipe until it is answered or abandoned.
struct OnPipe(Arc<AtomicUsize>);

impl Drop for OnPipe {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pipe {
    /// Opens a TCP connection to data centre `dc` at `addr` speaking MTProto under `key`.
    /// `init` is the invokeWithLayer(initConnection(...)) prefix each call carries until the
    /// connection has answered one (see the module's comment). The connection starts under
    /// the salt `salts` knows for `dc`, if any, and makes `salts` forget the data centre's
    /// salts if the server refuses one. `gzip` compresses requests of 512 bytes or more the
    /// way grammers does by default (only to measure what that would cost).
    pub(super) async fn connect(
        dc: i32,
        addr: SocketAddr,
        key: [u8; 256],
        init: Vec<u8>,
        salts: Arc<SaltBook>,
        gzip: bool,
    ) -> std::io::Result<Pipe> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let salt = salts.current(dc);
        let mtp = mtp::Encrypted::build()
            .compression_threshold(gzip.then_some(512))
            .first_salt(salt.unwrap_or(0))
            .finish(key);
        let (tx, rx) = mpsc::unbounded_channel();
        let load = Arc::new(AtomicUsize::new(0));
        let driver = Driver {
            stream,
            mtp,
            transport: transport::Full::new(),
            calls: Vec::new(),
            write: DequeBuffer::with_capacity(MAX_PACKET, HEADROOM),
            written: 0,
            read: vec![0; MAX_PACKET],
            read_len: 0,
            init,
            inited: false,
            heard: salt.is_some(),
            salt_from_book: salt.is_some().then_some((dc, salts)),
        };
        let task = tokio::spawn(driver.run(rx));
        Ok(Pipe {
            calls: tx,
            load,
            task,
        })
    }

    /// Calls handed to this connection and not answered yet.
    pub(super) fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    /// The connection ended (failed, or closed when idle).
    pub(super) fn is_closed(&self) -> bool {
        self.calls.is_closed()
    }

    /// Takes a place for one call on `pipe`: the call counts in the pipe's load from now, not
    /// from when it is sent, so parts choosing a connection at the same moment see each
    /// other's choice (the chooser takes the place while it still holds the lock it looked at
    /// the loads under, see `transfer`).
    pub(super) fn seat(pipe: &Arc<Pipe>) -> Seat {
        let load = pipe.load.fetch_add(1, Ordering::Relaxed) + 1;
        Seat {
            pipe: pipe.clone(),
            load,
            _on: OnPipe(pipe.load.clone()),
        }
    }
}

/// One call's place on a pipe (see [`Pipe::seat`]), counted in its load until the call is
/// answered or abandoned.
pub(super) struct Seat {
    pipe: Arc<Pipe>,
    load: usize,
    _on: OnPipe,
}

impl Seat {
    pub(super) fn pipe(&self) -> &Arc<Pipe> {
        &self.pipe
    }

    /// The calls on the pipe, this one included, when the place was taken.
    pub(super) fn load_when_taken(&self) -> usize {
        self.load
    }

    /// Sends `body` and waits for its answer (the raw result body). Dropping the future
    /// abandons the call (its answer, if any, is thrown away).
    pub(super) async fn call(self, body: Body) -> Result<Vec<u8>, PipeError> {
        let (reply, answer) = oneshot::channel();
        if self.pipe.calls.send(Call { body, reply }).is_err() {
            return Err(PipeError::Closed);
        }
        answer
            .await
            .unwrap_or_else(|_| Err(PipeError::Lost("the connection ended".into())))
    }
}

#[derive(Clone, Copy)]
enum State {
    /// Waiting to be written.
    Queued,
    /// In the write buffer (`container` is the id of the packet's container, or the message's
    /// own id when it went alone).
    Serialized { msg: MsgId, container: MsgId },
    /// Written to the socket.
    Sent { msg: MsgId, container: MsgId },
}

struct InFlight {
    call: Call,
    state: State,
    /// Sent wrapped in the connection's initConnection.
    wrapped: bool,
}

impl InFlight {
    fn msg(&self) -> Option<MsgId> {
        match self.state {
            State::Queued => None,
            State::Serialized { msg, .. } | State::Sent { msg, .. } => Some(msg),
        }
    }

    fn answer(self, result: Result<Vec<u8>, PipeError>) {
        let _ = self.call.reply.send(result);
    }
}

/// The task that owns the socket.
struct Driver {
    stream: TcpStream,
    mtp: mtp::Encrypted,
    transport: transport::Full,
    calls: Vec<InFlight>,
    write: DequeBuffer<u8>,
    /// Bytes of `write` already on the socket.
    written: usize,
    read: Vec<u8>,
    /// Bytes of `read` received and not consumed yet.
    read_len: usize,
    /// invokeWithLayer(initConnection(...)) without its query: the prefix of a wrapped call.
    init: Vec<u8>,
    /// A wrapped call was answered: the connection is initialised.
    inited: bool,
    /// The server has sent something (so the salt is being settled), or the connection began
    /// under a salt the data centre gave: calls need not go one at a time.
    heard: bool,
    /// The data centre and the book whose salt this connection began under.
    salt_from_book: Option<(i32, Arc<SaltBook>)>,
}

impl Driver {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Call>) {
        let why = self.drive(&mut rx).await;
        tracing::debug!("part connection ended: {why}");
        for c in self.calls.drain(..) {
            c.answer(Err(PipeError::Lost(why.clone())));
        }
        rx.close();
        while let Ok(c) = rx.try_recv() {
            let _ = c.reply.send(Err(PipeError::Closed));
        }
    }

    /// Moves bytes until the connection fails or idles out; returns why it ended.
    async fn drive(&mut self, rx: &mut mpsc::UnboundedReceiver<Call>) -> String {
        loop {
            if self.write.is_empty() {
                self.fill();
            }
            let idle = self.calls.is_empty() && self.write.is_empty();
            let (mut rd, mut wr) = self.stream.split();
            let step = tokio::select! {
                call = rx.recv() => match call {
                    Some(call) => {
                        self.calls.push(InFlight {
                            call,
                            state: State::Queued,
                            wrapped: false,
                        });
                        Ok(())
                    }
                    None => Err("closed by its owner".to_string()),
                },
                n = rd.read(&mut self.read[self.read_len..]) => match n {
                    Ok(0) => Err("telegram closed the connection".to_string()),
                    Ok(n) => self.on_read(n),
                    Err(e) => Err(format!("read: {e}")),
                },
                n = wr.write(&self.write[self.written..]), if !self.write.is_empty() => match n {
                    Ok(n) => {
                        self.on_written(n);
                        Ok(())
                    }
                    Err(e) => Err(format!("write: {e}")),
                },
                _ = tokio::time::sleep(IDLE_CLOSE), if idle => Err("idle".to_string()),
            };
            if let Err(why) = step {
                return why;
            }
        }
    }

    /// Serializes queued calls into one packet (as many as fit), plus whatever the protocol
    /// owes the server (acknowledgements, a salts request). Calls are wrapped in the
    /// initConnection until one of them is answered; before the server has said anything,
    /// only one call is out.
    fn fill(&mut self) {
        let probing = !self.heard;
        if probing && self.calls.iter().any(|c| !matches!(c.state, State::Queued)) {
            return;
        }
        for c in self
            .calls
            .iter_mut()
            .filter(|c| matches!(c.state, State::Queued))
        {
            let wrapped;
            let pushed = if self.inited {
                wrapped = false;
                self.mtp.push(&mut self.write, &c.call.body)
            } else {
                wrapped = true;
                let mut body = Vec::with_capacity(self.init.len() + c.call.body.len());
                body.extend_from_slice(&self.init);
                body.extend_from_slice(&c.call.body);
                self.mtp.push(&mut self.write, &body)
            };
            match pushed {
                Some(msg) => {
                    c.state = State::Serialized {
                        msg,
                        container: msg,
                    };
                    c.wrapped = wrapped;
                }
                None => break,
            }
            if probing {
                break;
            }
        }
        if let Some(container) = self.mtp.finalize(&mut self.write) {
            for c in &mut self.calls {
                if let State::Serialized { container: k, .. } = &mut c.state {
                    *k = container;
                }
            }
            self.transport.pack(&mut self.write);
        }
    }

    fn on_written(&mut self, n: usize) {
        self.written += n;
        if self.written < self.write.len() {
            return;
        }
        self.write.clear();
        self.written = 0;
        for c in &mut self.calls {
            if let State::Serialized { msg, container } = c.state {
                c.state = State::Sent { msg, container };
            }
        }
    }

    fn on_read(&mut self, n: usize) -> Result<(), String> {
        self.read_len += n;
        let mut at = 0;
        while at < self.read_len {
            let unpacked = match self.transport.unpack(&mut self.read[at..self.read_len]) {
                Ok(u) => u,
                Err(transport::Error::MissingBytes) => break,
                Err(e) => return Err(e.to_string()),
            };
            let payload = &mut self.read[at..][unpacked.data_range];
            let results = self
                .mtp
                .deserialize(payload)
                .map_err(|e| format!("bad message from telegram: {e}"))?;
            self.heard = true;
            for r in results {
                self.on_message(r);
            }
            at += unpacked.next_offset;
        }
        self.read.copy_within(at..self.read_len, 0);
        self.read_len -= at;
        if self.read_len == self.read.len() {
            return Err("a message larger than the connection's buffer".into());
        }
        Ok(())
    }

    fn take(&mut self, msg: MsgId) -> Option<InFlight> {
        let i = self.calls.iter().position(|c| c.msg() == Some(msg))?;
        Some(self.calls.swap_remove(i))
    }

    fn on_message(&mut self, d: Deserialization) {
        match d {
            Deserialization::RpcResult(r) => {
                if let Some(c) = self.take(r.msg_id) {
                    // initConnection went through with it: no more wrapping.
                    self.inited |= c.wrapped;
                    c.answer(Ok(r.body));
                }
            }
            Deserialization::OwnUpdate { msg_id, update } => {
                if let Some(c) = self.take(msg_id) {
                    c.answer(Ok(update));
                }
            }
            Deserialization::RpcError(e) => {
                if let Some(c) = self.take(e.msg_id) {
                    let mut err = RpcError::from(e.error);
                    if let Some(id) = c.call.body.get(..4) {
                        err = err.with_caused_by(u32::from_le_bytes(id.try_into().unwrap()));
                    }
                    c.answer(Err(PipeError::Rpc(err)));
                }
            }
            Deserialization::BadMessage(bad) => {
                if bad.code == BAD_SERVER_SALT
                    && let Some((dc, salts)) = self.salt_from_book.take()
                {
                    tracing::debug!(dc, "the salt the data centre gave was refused");
                    salts.forget(dc);
                }
                let mut i = 0;
                while i < self.calls.len() {
                    let hit = match self.calls[i].state {
                        State::Serialized { msg, container } | State::Sent { msg, container } => {
                            msg == bad.msg_id || container == bad.msg_id
                        }
                        State::Queued => false,
                    };
                    if !hit {
                        i += 1;
                    } else if bad.retryable() {
                        // A stale salt or a clock off: the layer corrected itself; send again.
                        self.calls[i].state = State::Queued;
                        i += 1;
                    } else {
                        let c = self.calls.swap_remove(i);
                        c.answer(Err(PipeError::Lost(format!(
                            "telegram refused the message: {}",
                            bad.description()
                        ))));
                    }
                }
            }
            Deserialization::Failure(f) => {
                if let Some(c) = self.take(f.msg_id) {
                    c.answer(Err(PipeError::Lost(format!(
                        "unreadable answer: {}",
                        f.error
                    ))));
                }
            }
            // Part connections subscribe to nothing; updates are of no use here.
            Deserialization::Update(_) => {}
        }
    }
}
