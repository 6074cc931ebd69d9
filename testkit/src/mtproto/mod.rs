//! Loopback MTProto server: a small Telegram that the unmodified grammers client talks to.
//!
//! It serves several data centres, each on its own port of 127.0.0.1 with its own
//! authorization key. The server never runs a key exchange (it would need Telegram's RSA
//! private key): it owns one 256-byte key per data centre and writes a session file (see
//! [`LoopbackTelegram::write_session`]) that carries them, as a client that already generated
//! its keys would have. A key starts unauthorised unless it belongs to the signed-in home data
//! centre; another data centre accepts it after `auth.importAuthorization`, as Telegram does.
//!
//! What it implements, by module: the MTProto session layer (`mtp`: salts, new sessions,
//! service messages, layer and initConnection), the network (`net`: round-trip time, jitter,
//! bandwidth per connection and shared), sign-in (`auth`, `srp`: login codes, data-centre
//! migration, two-step verification with SRP-2048, authorization export and import), files
//! (`files`: parts, md5 checksums, documents, ranged reads, FILE_MIGRATE, CDN redirects),
//! history (`history`: paging, search with index lag, dialogs, channels), updates (`updates`:
//! pts, getDifference, getChannelDifference) and the state file (`persist`). Telegram's limits
//! are enforced; every call is counted by method; faults can be injected on demand.

mod auth;
mod conn;
mod dispatch;
mod faults;
mod files;
mod history;
mod ige;
mod mtp;
pub mod net;
mod persist;
mod server;
mod srp;
mod state;
mod tlbuild;
mod updates;
pub mod wire;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use faults::{Counters, Fault, Faults, Fired, MESSAGE_CLASS};
pub use net::NetProfile;
use server::Server;

/// A channel of the loopback account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChannelInfo {
    pub id: i64,
    pub access_hash: i64,
    pub title: String,
    pub username: Option<String>,
    pub role: ChannelRole,
}

/// What the account is in a channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ChannelRole {
    /// Created it: may post, the storage chat of choice.
    Creator,
    /// An administrator with the right to post.
    Admin,
    /// A subscriber: may read, posting answers 403 CHAT_WRITE_FORBIDDEN.
    Member,
    /// Not (or no longer) in it: every call answers CHANNEL_PRIVATE.
    Left,
}

/// A channel to create at start.
#[derive(Clone, Debug)]
pub struct ChannelSpec {
    pub title: String,
    pub username: Option<String>,
    pub role: ChannelRole,
}

impl ChannelSpec {
    pub fn new(title: impl Into<String>, role: ChannelRole) -> Self {
        ChannelSpec {
            title: title.into(),
            username: None,
            role,
        }
    }

    pub fn username(mut self, name: impl Into<String>) -> Self {
        self.username = Some(name.into());
        self
    }
}

impl From<&str> for ChannelSpec {
    fn from(title: &str) -> Self {
        ChannelSpec::new(title, ChannelRole::Creator)
    }
}

impl From<String> for ChannelSpec {
    fn from(title: String) -> Self {
        ChannelSpec::new(title, ChannelRole::Creator)
    }
}

/// How `auth.sendCode` says the login code was delivered (`auth.sentCode` types, plus the
/// other two answers Telegram may give).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SentCodeKind {
    App,
    Sms,
    Call,
    FlashCall,
    MissedCall,
    Email,
    SetUpEmailRequired,
    FragmentSms,
    FirebaseSms,
    SmsWord,
    SmsPhrase,
    /// `auth.sentCodeSuccess`: signed in without a code.
    Success,
    /// `auth.sentCodePaymentRequired`: Telegram wants a payment before sending a code.
    PaymentRequired,
}

/// Telegram's throttling of free accounts after a volume (FLOOD_PREMIUM_WAIT_X): once
/// `after_bytes` were uploaded, parts are accepted at no more than `bytes_per_sec`; a part
/// that comes sooner is answered `420 FLOOD_PREMIUM_WAIT_X`, X the seconds until it would fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PremiumThrottle {
    pub after_bytes: u64,
    pub bytes_per_sec: u64,
}

/// How the loopback Telegram behaves.
#[derive(Clone, Debug)]
pub struct LoopbackOptions {
    /// Where documents (and uploads in progress) are kept; `None` = a temporary directory
    /// removed on shutdown. With a directory, the keys, account and chats persist there
    /// (`state.json`), so a restart on the same port keeps earlier sessions and data valid.
    pub data_dir: Option<PathBuf>,
    /// Port of the home data centre on 127.0.0.1; 0 picks a free one. The others always
    /// pick free ports (clients learn them from help.getConfig).
    pub port: u16,
    /// Data centre ids; the first is the account's home. At least one.
    pub dcs: Vec<i32>,
    /// Channels of the account (storage chat candidates).
    pub channels: Vec<ChannelSpec>,
    /// Message-class budget: at most `calls` per `per`; beyond it the server answers
    /// FLOOD_WAIT_X with X the seconds until the window frees up.
    pub message_rate: Option<(u32, Duration)>,
    /// Cap on part and download bytes per second, across all connections.
    pub bandwidth: Option<u64>,
    /// Round-trip time, jitter and bandwidth of each connection.
    pub net: NetProfile,
    /// How long uploaded parts live before a send referring to them gets
    /// FILE_PART_X_MISSING.
    pub part_ttl: Duration,
    /// Premium accounts may upload 4000 MiB (8000 parts) instead of 2000 MiB.
    pub premium: bool,
    /// Start signed out: every call but the sign-in ones answers 401 AUTH_KEY_UNREGISTERED
    /// until auth.signIn with [`LOGIN_CODE`] (any phone number) and, with a `password`, the
    /// SRP check. The written session then carries the keys but no user.
    pub require_login: bool,
    /// The data centre of the account's phone number: auth.sendCode on another one answers
    /// `303 PHONE_MIGRATE_X`, and signing in there makes it the account's home.
    pub phone_dc: Option<i32>,
    /// Two-step verification password (checked with SRP-2048) and its hint.
    pub password: Option<String>,
    pub password_hint: Option<String>,
    /// What auth.sendCode answers.
    pub sent_code: SentCodeKind,
    /// How long a login code stays valid (PHONE_CODE_EXPIRED after).
    pub code_ttl: Duration,
    /// How long a new message stays invisible to messages.search (Telegram's index lags).
    pub search_lag: Duration,
    /// Put new documents on this data centre instead of the one they were sent from.
    pub upload_dc: Option<i32>,
    pub premium_throttle: Option<PremiumThrottle>,
}

/// The login code the loopback server accepts.
pub const LOGIN_CODE: &str = "12345";

impl Default for LoopbackOptions {
    fn default() -> Self {
        LoopbackOptions {
            data_dir: None,
            port: 0,
            dcs: vec![2, 4],
            channels: vec!["storinator-storage".into()],
            message_rate: None,
            bandwidth: None,
            net: NetProfile::default(),
            part_ttl: Duration::from_secs(3600),
            premium: false,
            require_login: false,
            phone_dc: None,
            password: None,
            password_hint: None,
            sent_code: SentCodeKind::App,
            code_ttl: Duration::from_secs(300),
            search_lag: Duration::ZERO,
            upload_dc: None,
            premium_throttle: None,
        }
    }
}

/// A running loopback Telegram.
pub struct LoopbackTelegram {
    server: Arc<Server>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

impl LoopbackTelegram {
    pub async fn start(opts: LoopbackOptions) -> std::io::Result<Self> {
        if opts.dcs.is_empty() {
            return Err(std::io::Error::other("LoopbackOptions::dcs is empty"));
        }
        let (dir, tmp) = match &opts.data_dir {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let mut listeners = Vec::new();
        for (i, dc) in opts.dcs.iter().enumerate() {
            let port = if i == 0 { opts.port } else { 0 };
            let l = TcpListener::bind(("127.0.0.1", port)).await?;
            listeners.push((*dc, l.local_addr()?.port(), l));
        }
        let ports = listeners.iter().map(|(dc, port, _)| (*dc, *port)).collect();
        let server = Arc::new(Server::new(&dir, opts, ports)?);
        let (stop, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        for (dc, _, l) in listeners {
            tasks.push(tokio::spawn(conn::accept_loop(
                l,
                server.clone(),
                dc,
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(server::flush_loop(server.clone(), stop_rx)));
        Ok(LoopbackTelegram {
            server,
            stop,
            tasks,
            _tmp: tmp,
        })
    }

    /// Address of the account's home data centre.
    pub fn addr(&self) -> SocketAddr {
        self.dc_addr(self.server.home_dc())
            .expect("home dc listens")
    }

    /// Address of data centre `dc`.
    pub fn dc_addr(&self, dc: i32) -> Option<SocketAddr> {
        self.server
            .dc(dc)
            .map(|d| SocketAddr::from(([127, 0, 0, 1], d.port)))
    }

    /// The account's home data centre (changes after a PHONE_MIGRATE sign-in).
    pub fn home_dc(&self) -> i32 {
        self.server.home_dc()
    }

    /// Writes a session file the worker's Telegram backend loads: every data centre on
    /// 127.0.0.1 with its authorization key, the home data centre, the self user once signed
    /// in, and the channels. The format is the worker's (`worker/src/telegram/session.rs`),
    /// JSON, mode 0600, written under a fresh temporary name and renamed into place.
    pub fn write_session(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let json = self.server.session_json();
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(json.as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }

    pub fn faults(&self) -> &Faults {
        &self.server.faults
    }

    pub fn counters(&self) -> &Counters {
        &self.server.counters
    }

    pub fn self_user_id(&self) -> i64 {
        self.server.self_id
    }

    /// The home data centre's authorization key.
    pub fn auth_key(&self) -> [u8; 256] {
        self.auth_key_of(self.server.home_dc())
            .expect("home dc has a key")
    }

    /// The authorization key of data centre `dc`.
    pub fn auth_key_of(&self, dc: i32) -> Option<[u8; 256]> {
        self.server.dc(dc).map(|d| d.key.data)
    }

    pub fn self_access_hash(&self) -> i64 {
        self.server.self_hash
    }

    pub fn channels(&self) -> Vec<ChannelInfo> {
        self.server.channels.lock().unwrap().clone()
    }

    /// Changes what the account is in channel `id`: `Member` takes away the right to post
    /// (CHAT_WRITE_FORBIDDEN), `Left` all access (CHANNEL_PRIVATE).
    pub fn set_channel_role(&self, id: i64, role: ChannelRole) -> bool {
        self.server.set_channel_role(id, role)
    }

    /// Forget every uploaded part, as Telegram does after a while.
    pub fn expire_uploaded_parts(&self) {
        self.server.expire_parts();
    }

    /// Rotate every document's file_reference: older references get FILE_REFERENCE_EXPIRED.
    pub fn expire_file_references(&self) {
        self.server.rotate_file_references();
    }

    /// Delete the message holding document `name` behind the client's back. Returns whether
    /// one was found.
    pub fn delete_document_named(&self, name: &str) -> bool {
        self.server.delete_named(name)
    }

    /// Move document `name` to data centre `dc`: reads on any other one answer
    /// FILE_MIGRATE_X. Returns whether the document exists.
    pub fn move_document(&self, name: &str, dc: i32) -> bool {
        self.server.move_document(name, dc)
    }

    /// Put documents sent from now on on data centre `dc` (`None`: where they were sent).
    pub fn place_documents_on(&self, dc: Option<i32>) {
        *self.server.upload_dc.lock().unwrap() = dc;
    }

    /// Mark document `name` as served by a CDN: reads that say `cdn_supported` get
    /// upload.fileCdnRedirect. Returns whether the document exists.
    pub fn serve_from_cdn(&self, name: &str) -> bool {
        self.server.serve_from_cdn(name)
    }

    /// The data centre document `name` lives on.
    pub fn document_dc(&self, name: &str) -> Option<i32> {
        self.server.document_dc(name)
    }

    /// Terminate the account's sessions, as "terminate all other sessions" on a phone does:
    /// every key then answers 401 SESSION_REVOKED until it signs in again.
    pub fn revoke_sessions(&self) {
        self.server.revoke_sessions();
    }

    /// Delete the account, as a ban or the user's own deletion does: every call then answers
    /// 401 USER_DEACTIVATED and every message and document of the account is gone.
    pub fn delete_account(&self) {
        self.server.delete_account();
    }

    /// Make data centre `dc`'s key answer 406 AUTH_KEY_DUPLICATED, as Telegram does when
    /// one key is used from two places at once.
    pub fn duplicate_auth_key(&self, dc: i32) {
        self.server.duplicate_key(dc);
    }

    /// Forget the authorization imported on data centre `dc`: its key answers 401
    /// AUTH_KEY_UNREGISTERED again until the next auth.importAuthorization.
    pub fn forget_imported_authorization(&self, dc: i32) {
        if dc != self.server.home_dc() {
            self.server.set_key_auth(dc, server::KeyAuth::Unauthorized);
        }
    }

    /// Freeze the account: writes answer 420 FROZEN_METHOD_INVALID.
    pub fn freeze_account(&self, frozen: bool) {
        self.server
            .frozen
            .store(frozen, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn set_search_lag(&self, lag: Duration) {
        *self.server.search_lag.lock().unwrap() = lag;
    }

    pub fn set_premium_throttle(&self, t: Option<PremiumThrottle>) {
        self.server.set_premium_throttle(t);
    }

    /// Change every connection's round-trip time, jitter and bandwidth.
    pub fn set_net(&self, p: NetProfile) {
        *self.server.net.lock().unwrap() = p;
    }

    /// Change the cap shared by all connections (bytes per second; `None` lifts it).
    pub fn set_bandwidth(&self, bytes_per_sec: Option<u64>) {
        self.server.shared_cap.set(bytes_per_sec);
    }

    /// Move to new server salts: messages under the old ones get bad_server_salt.
    pub fn rotate_salts(&self) {
        self.server.rotate_salts();
    }

    /// Move the server's clock (message dates, code expiry) forward.
    pub fn advance_clock(&self, by: Duration) {
        self.server.advance_clock(by);
    }

    /// Expire every login code sent so far (auth.signIn then answers PHONE_CODE_EXPIRED).
    pub fn expire_login_codes(&self) {
        self.server.expire_login_codes();
    }

    /// Close every open client connection.
    pub fn drop_connections(&self) {
        self.server.drop_all.send_modify(|g| *g += 1);
    }

    /// (chat, message id, file name, size) of every stored document.
    pub fn documents(&self) -> Vec<(String, i32, String, u64)> {
        self.server.list_documents()
    }

    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        self.drop_connections();
        for t in self.tasks.drain(..) {
            let _ = t.await;
        }
    }
}

impl Drop for LoopbackTelegram {
    fn drop(&mut self) {
        self.server.flush();
        let _ = self.stop.send(true);
        self.server.drop_all.send_modify(|g| *g += 1);
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}
