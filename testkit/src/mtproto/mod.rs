//! Loopback MTProto server: a small Telegram that the unmodified grammers client talks to.
//!
//! The server never runs a key exchange: it owns a 256-byte authorization key and writes a
//! session file (see [`LoopbackTelegram::write_session`]) that carries that key and a DC
//! option on 127.0.0.1, so the client goes straight to encrypted traffic. It implements the
//! methods the worker's storage backend uses, with Telegram's limits enforced (part sizes and
//! counts, part expiry, random_id de-duplication, paging, getFile alignment), keeps documents
//! on disk, counts every call by method and can inject faults on demand.

mod ige;
mod server;
mod tlbuild;
pub mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use server::ChannelInfo;
use server::Shared;

/// Methods Telegram meters as message-level calls (about 100 per minute per account).
pub const MESSAGE_CLASS: &[&str] = &[
    "messages.sendMedia",
    "messages.getHistory",
    "messages.getMessages",
    "messages.search",
    "messages.deleteMessages",
    "messages.getDialogs",
    "channels.deleteMessages",
    "channels.getMessages",
];

/// How the loopback Telegram behaves.
#[derive(Clone, Debug)]
pub struct LoopbackOptions {
    /// Where documents (and uploads in progress) are kept; `None` = a temporary directory
    /// removed on shutdown. With a directory, the key, account and chats persist there
    /// (`state.json`), so a restart on the same port keeps earlier sessions and data valid.
    pub data_dir: Option<PathBuf>,
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Titles of private channels owned by the account (storage chat candidates).
    pub channels: Vec<String>,
    /// Message-class budget: at most `calls` per `per`; beyond it the server answers
    /// FLOOD_WAIT_X with X the seconds until the window frees up.
    pub message_rate: Option<(u32, Duration)>,
    /// Cap on part and download bytes per second, across all connections.
    pub bandwidth: Option<u64>,
    /// How long uploaded parts live before a send referring to them gets
    /// FILE_PART_X_MISSING.
    pub part_ttl: Duration,
    /// Premium accounts may upload 4000 MiB (8000 parts) instead of 2000 MiB.
    pub premium: bool,
    /// Start signed out: every call but help.getConfig and auth.* answers 401
    /// AUTH_KEY_UNREGISTERED until auth.signIn with [`LOGIN_CODE`] (any phone number).
    /// The written session then carries the key but no user. (No 2FA: SRP is not
    /// implemented.)
    pub require_login: bool,
}

/// The login code the loopback server accepts.
pub const LOGIN_CODE: &str = "12345";

impl Default for LoopbackOptions {
    fn default() -> Self {
        LoopbackOptions {
            data_dir: None,
            port: 0,
            channels: vec!["storinator-storage".into()],
            message_rate: None,
            bandwidth: None,
            part_ttl: Duration::from_secs(3600),
            premium: false,
            require_login: false,
        }
    }
}

/// What an injected fault does to the call it hits.
#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer with this rpc_error instead of running the method.
    RpcError { code: i32, message: String },
    /// Run the method after sleeping this long.
    Delay(Duration),
    /// Never answer this call (the connection stays up).
    Hang,
    /// Close the TCP connection instead of answering.
    DropConnection,
    /// Run the method but flip bytes in the returned file data (upload.getFile only).
    CorruptDownload,
}

impl Fault {
    pub fn rpc(code: i32, message: impl Into<String>) -> Self {
        Fault::RpcError {
            code,
            message: message.into(),
        }
    }
    pub fn flood_wait(seconds: u32) -> Self {
        Fault::rpc(420, format!("FLOOD_WAIT_{seconds}"))
    }
    pub fn flood_premium_wait(seconds: u32) -> Self {
        Fault::rpc(420, format!("FLOOD_PREMIUM_WAIT_{seconds}"))
    }
}

#[derive(Debug)]
struct Rule {
    method: String,
    /// Absolute call numbers (per method, 1-based) this rule hits: [first, first+count).
    window: Option<(u64, u64)>,
    probability: f64,
    remaining: u32,
    fault: Fault,
}

/// Scripted faults. Rules are matched in insertion order; the first that applies wins.
#[derive(Default)]
pub struct Faults {
    rules: Mutex<Vec<Rule>>,
    rng: Mutex<u64>,
    counters: Arc<Counters>,
    fired: Mutex<Vec<Fired>>,
}

/// A fault the server served: which call of which method it hit.
#[derive(Clone, Debug)]
pub struct Fired {
    pub method: String,
    /// The call's number among all calls of `method` (1-based, since the server started).
    pub call: u64,
    pub fault: Fault,
}

impl Faults {
    /// Hit the `nth` call (1 = the next one) of `method` counted from now.
    pub fn on_call(&self, method: &str, nth: u64, fault: Fault) {
        self.on_calls(method, nth, 1, fault)
    }

    /// Hit `count` consecutive calls of `method` starting with the `nth` from now.
    pub fn on_calls(&self, method: &str, nth: u64, count: u64, fault: Fault) {
        let base = self.counters.get(method);
        self.rules.lock().unwrap().push(Rule {
            method: method.into(),
            window: Some((base + nth.max(1), count)),
            probability: 1.0,
            remaining: u32::MAX,
            fault,
        });
    }

    /// Hit each call of `method` (`"*"` = any) with probability `p`, at most `max_times`.
    pub fn with_probability(&self, method: &str, p: f64, max_times: u32, fault: Fault) {
        self.rules.lock().unwrap().push(Rule {
            method: method.into(),
            window: None,
            probability: p,
            remaining: max_times,
            fault,
        });
    }

    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
    }

    /// Every fault served so far, in order. A test that scripts a fault checks here that it
    /// really fired (a rule on a method the client never calls proves nothing).
    pub fn fired(&self) -> Vec<Fired> {
        self.fired.lock().unwrap().clone()
    }

    /// How many faults were served on `method`.
    pub fn fired_on(&self, method: &str) -> usize {
        self.fired
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.method == method)
            .count()
    }

    /// Decides the fault for call number `n` of `method`.
    pub(crate) fn pick(&self, method: &str, n: u64) -> Option<Fault> {
        let mut rules = self.rules.lock().unwrap();
        for rule in rules.iter_mut() {
            if rule.remaining == 0 || (rule.method != "*" && rule.method != method) {
                continue;
            }
            if let Some((first, count)) = rule.window
                && !(n >= first && n < first + count)
            {
                continue;
            }
            if rule.probability < 1.0 && self.next_f64() >= rule.probability {
                continue;
            }
            rule.remaining -= 1;
            self.fired.lock().unwrap().push(Fired {
                method: method.to_string(),
                call: n,
                fault: rule.fault.clone(),
            });
            return Some(rule.fault.clone());
        }
        None
    }

    fn next_f64(&self) -> f64 {
        // xorshift64*: deterministic enough for tests, no extra dependency.
        let mut s = self.rng.lock().unwrap();
        if *s == 0 {
            *s = 0x9E37_79B9_7F4A_7C15;
        }
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Calls received, by TL method name (e.g. `messages.sendMedia`), plus `connections`,
/// `ping`, and `gzip:<method>` for calls that arrived gzip_packed.
#[derive(Default, Debug)]
pub struct Counters {
    map: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    /// Increments and returns the new count.
    pub(crate) fn bump(&self, method: &str) -> u64 {
        let mut m = self.map.lock().unwrap();
        let c = m.entry(method.to_string()).or_insert(0);
        *c += 1;
        *c
    }
    pub fn get(&self, method: &str) -> u64 {
        self.map.lock().unwrap().get(method).copied().unwrap_or(0)
    }
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.map.lock().unwrap().clone()
    }
    /// Sum over the message-class methods.
    pub fn message_class_calls(&self) -> u64 {
        let m = self.map.lock().unwrap();
        MESSAGE_CLASS
            .iter()
            .map(|k| m.get(*k).copied().unwrap_or(0))
            .sum()
    }
}

/// A running loopback Telegram.
pub struct LoopbackTelegram {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

impl LoopbackTelegram {
    pub async fn start(opts: LoopbackOptions) -> std::io::Result<Self> {
        let (dir, tmp) = match &opts.data_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let listener = TcpListener::bind(("127.0.0.1", opts.port)).await?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let faults = Faults {
            counters: counters.clone(),
            ..Faults::default()
        };
        let shared = Arc::new(Shared::new(&dir, opts, addr.port(), faults, counters)?);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(server::accept_loop(listener, shared.clone(), stop_rx));
        Ok(LoopbackTelegram {
            shared,
            addr,
            stop,
            task: Some(task),
            _tmp: tmp,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Writes a session file the worker's Telegram backend loads: the DC option on
    /// 127.0.0.1 with the server's authorization key, the self user and the channels.
    /// The format is the worker's (`worker/src/telegram/session.rs`), JSON, mode 0600.
    pub fn write_session(&self, path: &Path) -> std::io::Result<()> {
        let json = self.shared.session_json(self.addr);
        let tmp = path.with_extension("tmp");
        {
            use std::io::Write;
            let mut o = std::fs::OpenOptions::new();
            o.write(true).create(true).truncate(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            let mut f = o.open(&tmp)?;
            f.write_all(json.as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)
    }

    pub fn faults(&self) -> &Faults {
        &self.shared.faults
    }

    pub fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    pub fn self_user_id(&self) -> i64 {
        self.shared.self_id
    }

    /// The permanent authorization key sessions must carry to talk to this server.
    pub fn auth_key(&self) -> [u8; 256] {
        self.shared.auth_key()
    }

    pub fn self_access_hash(&self) -> i64 {
        self.shared.self_access_hash()
    }

    pub fn channels(&self) -> Vec<ChannelInfo> {
        self.shared.channels.clone()
    }

    /// Forget every uploaded part, as Telegram does after a while.
    pub fn expire_uploaded_parts(&self) {
        self.shared.expire_parts();
    }

    /// Rotate every document's file_reference: older references get FILE_REFERENCE_EXPIRED.
    pub fn expire_file_references(&self) {
        self.shared.rotate_file_references();
    }

    /// Delete the message holding document `name` behind the client's back. Returns whether
    /// one was found.
    pub fn delete_document_named(&self, name: &str) -> bool {
        self.shared.delete_named(name)
    }

    /// Close every open client connection.
    pub fn drop_connections(&self) {
        self.shared.drop_all.send_modify(|g| *g += 1);
    }

    /// (chat, message id, file name, size) of every stored document.
    pub fn documents(&self) -> Vec<(String, i32, String, u64)> {
        self.shared.list_documents()
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.drop_connections();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }
}

impl Drop for LoopbackTelegram {
    fn drop(&mut self) {
        self.shared.flush();
        let _ = self.stop.send(true);
        self.shared.drop_all.send_modify(|g| *g += 1);
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
