//! The server's shared state and the helpers every concept module uses: data centres and
//! their keys, the account, channels, the clock, rendering of messages and peers.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grammers_tl_types as tl;
use tokio::sync::watch;
use tokio::time::Instant;

use super::faults::{Counters, Faults};
use super::net::{NetProfile, SharedCap};
use super::state::{ChatKey, Msg, State};
use super::wire::ServerKey;
use super::{ChannelInfo, ChannelRole, LoopbackOptions, PremiumThrottle, auth, mtp, persist};
use super::{tlbuild, updates};

/// One data centre: where it listens and the key clients use with it.
pub(crate) struct DcInfo {
    pub id: i32,
    pub port: u16,
    pub key: ServerKey,
}

/// What a data centre's authorization key may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) enum KeyAuth {
    /// Not bound to the account: only sign-in calls (401 AUTH_KEY_UNREGISTERED otherwise).
    Unauthorized,
    /// The login code was right; the two-step password is still due.
    PasswordNeeded,
    Authorized,
    /// The user terminated this session elsewhere (401 SESSION_REVOKED).
    Revoked,
    /// Used from two places at once (406 AUTH_KEY_DUPLICATED on everything).
    Duplicated,
    /// The account was deleted (or banned): 401 USER_DEACTIVATED on everything.
    Deactivated,
}

/// The result of running one method.
pub(crate) enum Outcome {
    Reply(Vec<u8>),
    Error(i32, String),
    Hang,
    Drop,
}

pub(crate) fn err(code: i32, msg: impl Into<String>) -> Outcome {
    Outcome::Error(code, msg.into())
}

pub(crate) fn rnd_i64() -> i64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("os random source");
    i64::from_le_bytes(b) & i64::MAX
}

pub(crate) fn rnd_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("os random source");
    b
}

pub(crate) struct Server {
    pub dir: PathBuf,
    pub opts: LoopbackOptions,
    pub dcs: Vec<DcInfo>,
    home: AtomicI32,
    pub self_id: i64,
    pub self_hash: i64,
    pub channels: Mutex<Vec<ChannelInfo>>,
    pub faults: Faults,
    pub counters: Arc<Counters>,
    pub state: Mutex<State>,
    pub keys: Mutex<HashMap<i32, KeyAuth>>,
    pub login: Mutex<auth::Login>,
    pub sessions: Mutex<HashMap<(i32, i64), mtp::SessionInfo>>,
    pub drop_all: watch::Sender<u64>,
    pub net: Mutex<NetProfile>,
    pub shared_cap: SharedCap,
    rate: Mutex<VecDeque<Instant>>,
    persist: bool,
    pub dirty: AtomicBool,
    msg_seq: AtomicI64,
    clock_offset: AtomicI64,
    pub salt_epoch: AtomicU64,
    pub frozen: AtomicBool,
    pub search_lag: Mutex<Duration>,
    pub upload_dc: Mutex<Option<i32>>,
    /// The free-account throttle and when it accepts the next part.
    pub throttle: Mutex<(Option<PremiumThrottle>, Option<Instant>)>,
}

impl Server {
    pub(crate) fn new(
        dir: &Path,
        opts: LoopbackOptions,
        ports: Vec<(i32, u16)>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("docs"))?;
        std::fs::create_dir_all(dir.join("uploads"))?;
        // With a data dir of its own the server keeps its keys, account and chats across
        // restarts (sessions written before stay valid); uploads in progress are lost, as
        // expired parts would be.
        let persist = opts.data_dir.is_some();
        let saved = if persist { persist::load(dir)? } else { None };
        let first = opts.dcs[0];
        let (mut dc_keys, mut keys, home, self_hash, mut channels, state) = match saved {
            Some(s) => (s.dc_keys, s.keys, s.home, s.self_hash, s.channels, s.state),
            None => (
                HashMap::new(),
                HashMap::new(),
                first,
                rnd_i64(),
                Vec::new(),
                State::default(),
            ),
        };
        let dcs = ports
            .into_iter()
            .map(|(id, port)| DcInfo {
                id,
                port,
                key: dc_keys
                    .remove(&id)
                    .map(ServerKey::new)
                    .unwrap_or_else(ServerKey::random),
            })
            .collect::<Vec<_>>();
        for d in &dcs {
            keys.entry(d.id)
                .or_insert(if d.id == home && !opts.require_login {
                    KeyAuth::Authorized
                } else {
                    KeyAuth::Unauthorized
                });
        }
        // A restarted server keeps its channels and adds only titles it did not have.
        let fresh = channels.is_empty();
        for spec in &opts.channels {
            if fresh || !channels.iter().any(|c: &ChannelInfo| c.title == spec.title) {
                channels.push(ChannelInfo {
                    id: 1_500_000_000 + channels.len() as i64,
                    access_hash: rnd_i64(),
                    title: spec.title.clone(),
                    username: spec.username.clone(),
                    role: spec.role,
                });
            }
        }
        let counters = Arc::new(Counters::default());
        Ok(Server {
            dir: dir.to_path_buf(),
            dcs,
            home: AtomicI32::new(home),
            self_id: 777_000_123,
            self_hash,
            channels: Mutex::new(channels),
            faults: Faults::new(counters.clone()),
            counters,
            state: Mutex::new(state),
            keys: Mutex::new(keys),
            login: Mutex::new(auth::Login::default()),
            sessions: Mutex::new(HashMap::new()),
            drop_all: watch::channel(0).0,
            net: Mutex::new(opts.net),
            shared_cap: SharedCap::new(opts.bandwidth),
            rate: Mutex::new(VecDeque::new()),
            persist,
            dirty: AtomicBool::new(true),
            msg_seq: AtomicI64::new(0),
            clock_offset: AtomicI64::new(0),
            salt_epoch: AtomicU64::new(0),
            frozen: AtomicBool::new(false),
            search_lag: Mutex::new(opts.search_lag),
            upload_dc: Mutex::new(opts.upload_dc),
            throttle: Mutex::new((opts.premium_throttle, None)),
            opts,
        })
    }

    pub fn home_dc(&self) -> i32 {
        self.home.load(Ordering::Relaxed)
    }

    pub fn set_home_dc(&self, dc: i32) {
        self.home.store(dc, Ordering::Relaxed);
        self.touch();
    }

    pub fn dc(&self, id: i32) -> Option<&DcInfo> {
        self.dcs.iter().find(|d| d.id == id)
    }

    pub fn key_auth(&self, dc: i32) -> KeyAuth {
        self.keys
            .lock()
            .unwrap()
            .get(&dc)
            .copied()
            .unwrap_or(KeyAuth::Unauthorized)
    }

    pub fn set_key_auth(&self, dc: i32, auth: KeyAuth) {
        self.keys.lock().unwrap().insert(dc, auth);
        self.touch();
    }

    pub fn touch(&self) {
        self.dirty.store(true, Ordering::Relaxed);
    }

    /// Unix time as the server sees it (tests can move it forward).
    pub fn now_unix(&self) -> i32 {
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        (real + self.clock_offset.load(Ordering::Relaxed)) as i32
    }

    pub fn advance_clock(&self, by: Duration) {
        self.clock_offset
            .fetch_add(by.as_secs() as i64, Ordering::Relaxed);
    }

    /// A server message id: about unix time × 2^32, ≡ 1 mod 4 for answers to the client and
    /// ≡ 3 mod 4 for messages the server starts (notifications, updates).
    pub fn next_msg_id(&self, server_initiated: bool) -> i64 {
        let n = self.msg_seq.fetch_add(1, Ordering::Relaxed);
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        (secs << 32) | ((n & 0x3fff_ffff) << 2) | if server_initiated { 3 } else { 1 }
    }

    pub fn rotate_salts(&self) {
        self.salt_epoch.fetch_add(1, Ordering::Relaxed);
    }

    /// Message-class budget; `Some(seconds)` when exhausted.
    pub fn rate_check(&self) -> Option<u64> {
        let (calls, per) = self.opts.message_rate?;
        let mut q = self.rate.lock().unwrap();
        let now = Instant::now();
        while q.front().is_some_and(|t| now.duration_since(*t) >= per) {
            q.pop_front();
        }
        if q.len() >= calls as usize {
            let wait = per.saturating_sub(now.duration_since(q[0]));
            return Some(wait.as_secs_f64().ceil().max(1.0) as u64);
        }
        q.push_back(now);
        None
    }

    pub fn session_json(&self) -> String {
        let channels: Vec<_> = self
            .channels
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.role != ChannelRole::Left)
            .map(
                |c| serde_json::json!({"id": c.id, "access_hash": c.access_hash, "title": c.title}),
            )
            .collect();
        let dcs: Vec<_> = self
            .dcs
            .iter()
            .map(|d| {
                serde_json::json!({
                    "id": d.id,
                    "addr": format!("127.0.0.1:{}", d.port),
                    "auth_key": hex::encode(d.key.data),
                })
            })
            .collect();
        let home = self.home_dc();
        let signed_in = self.key_auth(home) == KeyAuth::Authorized;
        serde_json::json!({
            "version": 1,
            "home_dc": home,
            "dcs": dcs,
            "self_user": signed_in.then(
                || serde_json::json!({"id": self.self_id, "access_hash": self.self_hash})
            ),
            "channels": channels,
        })
        .to_string()
    }

    /// Writes the state file if something changed (only with a data dir of our own).
    pub fn flush(&self) {
        if !self.persist || !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let st = self.state.lock().unwrap();
        let snapshot = persist::Snapshot {
            dc_keys: self.dcs.iter().map(|d| (d.id, d.key.data)).collect(),
            keys: self.keys.lock().unwrap().clone(),
            home: self.home_dc(),
            self_hash: self.self_hash,
            channels: self.channels.lock().unwrap().clone(),
            state: &st,
        };
        if let Err(e) = persist::save(&self.dir, &snapshot) {
            tracing::warn!(
                "saving loopback telegram state in {}: {e}",
                self.dir.display()
            );
            self.touch();
        }
    }

    pub fn channel(&self, id: i64) -> Option<ChannelInfo> {
        self.channels
            .lock()
            .unwrap()
            .iter()
            .find(|c| c.id == id)
            .cloned()
    }

    pub fn set_channel_role(&self, id: i64, role: ChannelRole) -> bool {
        let mut chans = self.channels.lock().unwrap();
        match chans.iter_mut().find(|c| c.id == id) {
            Some(c) => {
                c.role = role;
                self.touch();
                true
            }
            None => false,
        }
    }

    pub fn resolve_peer(&self, peer: &tl::enums::InputPeer) -> Result<ChatKey, Outcome> {
        match peer {
            tl::enums::InputPeer::PeerSelf => Ok(ChatKey::Saved),
            tl::enums::InputPeer::User(u) if u.user_id == self.self_id => Ok(ChatKey::Saved),
            tl::enums::InputPeer::Channel(c) => self.resolve_channel(c.channel_id, c.access_hash),
            _ => Err(err(400, "PEER_ID_INVALID")),
        }
    }

    pub fn resolve_input_channel(&self, c: &tl::enums::InputChannel) -> Result<ChatKey, Outcome> {
        match c {
            tl::enums::InputChannel::Channel(c) => {
                self.resolve_channel(c.channel_id, c.access_hash)
            }
            _ => Err(err(400, "CHANNEL_INVALID")),
        }
    }

    pub fn resolve_channel(&self, id: i64, hash: i64) -> Result<ChatKey, Outcome> {
        match self.channel(id) {
            Some(c) if c.access_hash != hash => Err(err(400, "CHANNEL_INVALID")),
            Some(c) if c.role == ChannelRole::Left => Err(err(400, "CHANNEL_PRIVATE")),
            Some(_) => Ok(ChatKey::Channel(id)),
            None => Err(err(400, "CHANNEL_INVALID")),
        }
    }

    pub fn peer_of(&self, k: ChatKey) -> tl::enums::Peer {
        match k {
            ChatKey::Saved => tl::enums::Peer::User(tl::types::PeerUser {
                user_id: self.self_id,
            }),
            ChatKey::Channel(id) => {
                tl::enums::Peer::Channel(tl::types::PeerChannel { channel_id: id })
            }
        }
    }

    pub fn render_msg(&self, st: &State, k: ChatKey, id: i32, m: &Msg) -> tl::enums::Message {
        let doc = m.doc.and_then(|d| st.docs.get(&d).map(|doc| (d, doc)));
        let from = match k {
            ChatKey::Saved => Some(self.self_id),
            ChatKey::Channel(_) => None,
        };
        tlbuild::message(
            id,
            self.peer_of(k),
            from,
            m.date,
            &m.text,
            doc.map(|(d, doc)| tlbuild::DocFields {
                id: d,
                access_hash: doc.access_hash,
                file_reference: doc.file_reference.clone(),
                date: doc.date,
                size: doc.size as i64,
                name: &doc.name,
                mime: &doc.mime,
                dc: doc.dc,
            }),
        )
    }

    pub fn users(&self) -> Vec<tl::enums::User> {
        vec![tlbuild::self_user(self.self_id, self.self_hash)]
    }

    pub fn chats_for(&self, k: ChatKey) -> Vec<tl::enums::Chat> {
        match k {
            ChatKey::Saved => vec![],
            ChatKey::Channel(id) => self
                .channel(id)
                .map(|c| tlbuild::channel(&c))
                .into_iter()
                .collect(),
        }
    }

    /// Every channel the account is in, as TL chats.
    pub fn member_chats(&self) -> Vec<tl::enums::Chat> {
        self.channels
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.role != ChannelRole::Left)
            .map(tlbuild::channel)
            .collect()
    }

    pub fn expire_parts(&self) {
        let mut st = self.state.lock().unwrap();
        for (_, u) in st.uploads.drain() {
            let _ = std::fs::remove_file(&u.path);
        }
    }

    pub fn rotate_file_references(&self) {
        let mut st = self.state.lock().unwrap();
        for d in st.docs.values_mut() {
            d.file_reference = rnd_i64().to_le_bytes().to_vec();
        }
        self.touch();
    }

    pub fn delete_named(&self, name: &str) -> bool {
        let mut st = self.state.lock().unwrap();
        match st.find_named(name) {
            Some((k, id, _)) => {
                let gone = st.delete_msgs(k, &[id]);
                updates::log_delete(&mut st, k, gone);
                self.touch();
                true
            }
            None => false,
        }
    }

    fn with_named_doc(&self, name: &str, f: impl FnOnce(&mut super::state::Doc)) -> bool {
        let mut st = self.state.lock().unwrap();
        let Some((_, _, d)) = st.find_named(name) else {
            return false;
        };
        if let Some(doc) = st.docs.get_mut(&d) {
            f(doc);
        }
        self.touch();
        true
    }

    pub fn move_document(&self, name: &str, dc: i32) -> bool {
        self.with_named_doc(name, |d| d.dc = dc)
    }

    pub fn serve_from_cdn(&self, name: &str) -> bool {
        self.with_named_doc(name, |d| d.cdn = true)
    }

    pub fn document_dc(&self, name: &str) -> Option<i32> {
        let st = self.state.lock().unwrap();
        let (_, _, d) = st.find_named(name)?;
        st.docs.get(&d).map(|d| d.dc)
    }

    pub fn revoke_sessions(&self) {
        let mut keys = self.keys.lock().unwrap();
        for v in keys.values_mut() {
            if *v == KeyAuth::Authorized {
                *v = KeyAuth::Revoked;
            }
        }
        self.touch();
    }

    /// The account is deleted: every key answers 401 USER_DEACTIVATED and the account's
    /// cloud (every chat's messages and documents, uploads in progress) is gone.
    pub fn delete_account(&self) {
        for v in self.keys.lock().unwrap().values_mut() {
            *v = KeyAuth::Deactivated;
        }
        {
            let mut st = self.state.lock().unwrap();
            let chats: Vec<_> = st
                .chats
                .iter()
                .map(|(k, c)| (*k, c.msgs.keys().copied().collect::<Vec<i32>>()))
                .collect();
            for (k, ids) in chats {
                st.delete_msgs(k, &ids);
            }
            st.uploads.clear();
        }
        self.touch();
    }

    pub fn duplicate_key(&self, dc: i32) {
        self.set_key_auth(dc, KeyAuth::Duplicated);
    }

    pub fn set_premium_throttle(&self, t: Option<PremiumThrottle>) {
        *self.throttle.lock().unwrap() = (t, None);
    }

    pub fn expire_login_codes(&self) {
        self.login.lock().unwrap().expire_all();
    }

    pub fn list_documents(&self) -> Vec<(String, i32, String, u64)> {
        let st = self.state.lock().unwrap();
        let mut out = Vec::new();
        for (k, chat) in &st.chats {
            for (id, m) in &chat.msgs {
                if let Some(d) = m.doc.and_then(|d| st.docs.get(&d)) {
                    let chat = match k {
                        ChatKey::Saved => "saved".to_string(),
                        ChatKey::Channel(c) => format!("channel:{c}"),
                    };
                    out.push((chat, *id, d.name.clone(), d.size));
                }
            }
        }
        out.sort();
        out
    }
}

/// Writes the state file every quarter second until told to stop (and once more then).
pub(crate) async fn flush_loop(server: Arc<Server>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.changed() => {
                server.flush();
                break;
            }
            _ = tick.tick() => server.flush(),
        }
    }
}
