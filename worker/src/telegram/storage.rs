//! The storage backend on grammers: packs become documents in the storage chat.
//!
//! Message-level calls (sendMedia, getMessages, search, getHistory, delete) and downloads go
//! through grammers-client's `Client`. File parts go through dedicated grammers-mtsender
//! connections built with compression off: the client gzips every request of 512 bytes or
//! more, which for encrypted parts is pure CPU waste. Every call has a timeout and our own
//! retry policy (the client is configured with `NoRetries`), flood waits pause the class they
//! hit and are retried without limit, and everything else transient is retried with the
//! scheduler's bounded backoff.

use std::collections::HashMap;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use grammers_client::Client;
use grammers_client::sender::{ConnectionParams, NoRetries, SenderPool};
use grammers_mtproto::{mtp, transport};
use grammers_mtsender::{InvocationError, RpcError, Sender, ServerAddr};
use grammers_tl_types::{self as tl, RemoteCall};
use sha2::{Digest, Sha256};
use storinator_shared::error::StorageError;
use storinator_shared::storage::check_name;
use storinator_shared::storage::{Location, ObjectInfo, ObjectRef, Storage};
use tokio::task::JoinSet;
use tokio::time::{Instant, timeout};

use super::TelegramConfig;
use super::scheduler::{CallClass, PART_SIZE, Scheduler, SchedulerConfig};
use super::session::FileSession;

const SMALL_FILE_MAX: u64 = 10 * 1024 * 1024;
const MAX_WINDOW: u64 = 512 * 1024;
/// How many times a pack upload is restarted from scratch after its parts expired.
const MAX_UPLOAD_RESTARTS: u32 = 5;
/// How many times a download refetches the message after FILE_REFERENCE_EXPIRED.
const MAX_REFERENCE_REFRESHES: u32 = 3;

type PartSender = Sender<transport::Full, mtp::Encrypted>;

/// Where packs live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageChat {
    SavedMessages,
    Channel { id: i64, access_hash: i64 },
}

impl StorageChat {
    fn input_peer(&self) -> tl::enums::InputPeer {
        match self {
            StorageChat::SavedMessages => tl::enums::InputPeer::PeerSelf,
            StorageChat::Channel { id, access_hash } => {
                tl::enums::InputPeer::Channel(tl::types::InputPeerChannel {
                    channel_id: *id,
                    access_hash: *access_hash,
                })
            }
        }
    }

    fn location_prefix(&self) -> String {
        match self {
            StorageChat::SavedMessages => "me".into(),
            StorageChat::Channel { id, .. } => format!("c{id}"),
        }
    }
}

/// A document as we need it to read it.
#[derive(Clone, Debug)]
struct Doc {
    msg_id: i32,
    id: i64,
    access_hash: i64,
    file_reference: Vec<u8>,
    size: u64,
}

/// The outcome of one call after our retry policy.
#[derive(Debug)]
enum CallError {
    /// An RPC error that retrying does not fix; the caller decides what it means.
    Rpc(RpcError),
    Storage(StorageError),
}

impl From<CallError> for StorageError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Rpc(r) if r.code == 401 => StorageError::Fatal(format!(
                "telegram no longer accepts this session ({r}): run `storinator-worker login` again"
            )),
            CallError::Rpc(r) => StorageError::Fatal(format!("telegram refused the call: {r}")),
            CallError::Storage(s) => s,
        }
    }
}

fn is_flood(e: &RpcError) -> Option<u32> {
    if e.code == 420 || e.name == "FLOOD_WAIT" || e.name == "FLOOD_PREMIUM_WAIT" {
        Some(e.value.unwrap_or(1))
    } else {
        None
    }
}

fn is_transient_rpc(e: &RpcError) -> bool {
    (e.code >= 500 && e.name != "RANDOM_ID_DUPLICATE")
        || e.code == -503
        || e.name == "RPC_CALL_FAIL"
        || e.name == "TIMEOUT"
}

fn input_channel(channel_id: i64, access_hash: i64) -> tl::enums::InputChannel {
    tl::enums::InputChannel::Channel(tl::types::InputChannel {
        channel_id,
        access_hash,
    })
}

/// The random_id of a send, derived from the object name so that a retried send (even after a
/// crash) carries the same id and Telegram refuses the duplicate. `salt` moves on only when
/// the name is reused after a delete.
pub fn random_id_for(name: &str, salt: u32) -> i64 {
    let mut h = Sha256::new();
    h.update(b"storinator-send:");
    h.update(name.as_bytes());
    if salt > 0 {
        h.update(salt.to_le_bytes());
    }
    let d = h.finalize();
    i64::from_le_bytes(d[..8].try_into().unwrap())
}

fn random_i64() -> i64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("os random source");
    i64::from_le_bytes(b)
}

/// getFile windows covering [offset, end): each window is a power-of-two size between 4 KiB
/// and 512 KiB at an offset that is a multiple of its size, which satisfies Telegram's rules
/// (offset and limit divisible by 4 KiB, 1 MiB divisible by limit, no window crossing a
/// 1 MiB boundary). Telegram would serve 1 MiB, but grammers asserts that no incoming
/// message exceeds its container limit (about 1,044,448 bytes), so a 1 MiB answer would
/// panic its connection task.
pub fn plan_windows(offset: u64, end: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = offset;
    while pos < end {
        let boundary = (pos / MAX_WINDOW + 1) * MAX_WINDOW;
        let target = end.min(boundary);
        let mut l = 4096;
        while l < MAX_WINDOW && pos - pos % l + l < target {
            l *= 2;
        }
        let start = pos - pos % l;
        out.push((start, l));
        pos = start + l;
    }
    out
}

pub(crate) struct Inner {
    client: Client,
    pool_task: tokio::task::JoinHandle<()>,
    session: Arc<FileSession>,
    cfg: TelegramConfig,
    chat: StorageChat,
    sched: Scheduler,
    idle_senders: Mutex<Vec<PartSender>>,
    cache: Mutex<HashMap<String, Doc>>,
    refresh_lock: tokio::sync::Mutex<()>,
}

/// Telegram as a [`Storage`]: one document per object in the storage chat.
#[derive(Clone)]
pub struct TelegramStorage {
    inner: Arc<Inner>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.client.disconnect();
        self.pool_task.abort();
    }
}

/// What STORINATOR_STORAGE_CHAT asks for: `None` = Saved Messages, else a channel id (bare
/// or `-100` bot-API style) or title.
fn chat_spec(spec: Option<&str>) -> Option<(Option<i64>, String)> {
    let spec = spec.map(str::trim).unwrap_or("");
    if spec.is_empty() || ["me", "self", "saved"].contains(&spec.to_ascii_lowercase().as_str()) {
        return None;
    }
    let id = spec
        .strip_prefix("-100")
        .unwrap_or(spec)
        .parse::<i64>()
        .ok();
    Some((id, spec.to_string()))
}

fn channel_in_session(id: Option<i64>, spec: &str, session: &FileSession) -> Option<StorageChat> {
    session
        .channels()
        .into_iter()
        .find(|c| Some(c.id) == id || c.title == spec)
        .map(|c| StorageChat::Channel {
            id: c.id,
            access_hash: c.access_hash,
        })
}

impl TelegramStorage {
    /// Loads the session, connects and checks that it is signed in.
    pub async fn connect(cfg: TelegramConfig) -> Result<TelegramStorage, StorageError> {
        let session = Arc::new(
            FileSession::load_or_new(&cfg.session_path)
                .map_err(|e| StorageError::Fatal(e.to_string()))?,
        );
        if session.self_user_id().is_none() {
            return Err(StorageError::Fatal(format!(
                "session {} is not signed in: run `storinator-worker login` first",
                cfg.session_path.display()
            )));
        }
        let spec = chat_spec(cfg.storage_chat.as_deref());
        let known = match &spec {
            None => Some(StorageChat::SavedMessages),
            Some((id, text)) => channel_in_session(*id, text, &session),
        };
        std::fs::create_dir_all(&cfg.spool_dir).map_err(|e| StorageError::io(&cfg.spool_dir, e))?;
        let params = ConnectionParams {
            retry_policy: Box::new(NoRetries),
            device_model: "storinator".into(),
            app_version: env!("CARGO_PKG_VERSION").into(),
            ..Default::default()
        };
        let pool = SenderPool::with_configuration(session.clone(), cfg.api_id, params);
        let client = Client::new(pool.handle);
        // The worker never reads updates; dropping the receiver makes the pool discard them.
        drop(pool.updates);
        let pool_task = tokio::spawn(pool.runner.run());
        let sched = Scheduler::new(SchedulerConfig {
            message_calls_per_minute: cfg.message_calls_per_minute,
            max_part_concurrency: cfg.part_concurrency.max(1),
            ..Default::default()
        });
        let storage = TelegramStorage {
            inner: Arc::new(Inner {
                client,
                pool_task,
                session,
                cfg,
                // Placeholder until the channel is looked up below.
                chat: known.clone().unwrap_or(StorageChat::SavedMessages),
                sched,
                idle_senders: Mutex::new(Vec::new()),
                cache: Mutex::new(HashMap::new()),
                refresh_lock: tokio::sync::Mutex::new(()),
            }),
        };
        // One cheap call proves the key and the login before any job relies on them.
        storage
            .inner
            .call(
                CallClass::Transfer,
                &tl::functions::users::GetUsers {
                    id: vec![tl::enums::InputUser::UserSelf],
                },
            )
            .await?;
        match (known, spec) {
            (Some(_), _) | (None, None) => Ok(storage),
            (None, Some((id, text))) => {
                let chat = storage.inner.find_channel_in_dialogs(id, &text).await?;
                let mut storage = storage;
                Arc::get_mut(&mut storage.inner)
                    .expect("storage not shared before connect returns")
                    .chat = chat;
                Ok(storage)
            }
        }
    }

    pub fn scheduler(&self) -> &Scheduler {
        &self.inner.sched
    }

    pub fn chat(&self) -> &StorageChat {
        &self.inner.chat
    }

    /// API calls and duration to upload `bytes` in `packs` packs under current limits.
    pub fn estimate(&self, bytes: u64, packs: u64) -> super::Estimate {
        self.inner.sched.estimate(bytes, packs)
    }
}

impl Inner {
    /// Invokes `req` through the client with a timeout, retrying flood waits (always) and
    /// transient failures (bounded, with backoff).
    async fn call<R: RemoteCall>(&self, class: CallClass, req: &R) -> Result<R::Return, CallError> {
        let mut attempt = 0u32;
        loop {
            self.sched.acquire(class).await;
            let res = timeout(self.cfg.request_timeout, self.client.invoke(req)).await;
            let why = match res {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(InvocationError::Rpc(e))) => {
                    if let Some(secs) = is_flood(&e) {
                        self.sched.flood_wait(class, secs);
                        continue;
                    }
                    if !is_transient_rpc(&e) {
                        return Err(CallError::Rpc(e));
                    }
                    e.to_string()
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", self.cfg.request_timeout),
            };
            attempt += 1;
            if attempt >= self.cfg.max_attempts {
                return Err(CallError::Storage(StorageError::Transient(format!(
                    "{} failed {attempt} times, last: {why}",
                    R::CONSTRUCTOR_ID_NAME()
                ))));
            }
            self.sched.note_retry();
            tokio::time::sleep(self.sched.backoff(attempt)).await;
        }
    }

    /// Looks the storage channel up in the account's dialogs (the session only knows
    /// channels it has seen) and remembers it in the session.
    async fn find_channel_in_dialogs(
        &self,
        id: Option<i64>,
        spec: &str,
    ) -> Result<StorageChat, StorageError> {
        let (mut offset_date, mut offset_id) = (0, 0);
        for _ in 0..50 {
            let req = tl::functions::messages::GetDialogs {
                exclude_pinned: false,
                folder_id: None,
                offset_date,
                offset_id,
                offset_peer: tl::enums::InputPeer::Empty,
                limit: 100,
                hash: 0,
            };
            let (dialogs, messages, chats, last_page) = match self
                .call(CallClass::Message, &req)
                .await?
            {
                tl::enums::messages::Dialogs::Dialogs(d) => (d.dialogs, d.messages, d.chats, true),
                tl::enums::messages::Dialogs::Slice(d) => {
                    let last = d.dialogs.len() < 100;
                    (d.dialogs, d.messages, d.chats, last)
                }
                tl::enums::messages::Dialogs::NotModified(_) => (vec![], vec![], vec![], true),
            };
            for chat in &chats {
                if let tl::enums::Chat::Channel(c) = chat
                    && (Some(c.id) == id || c.title == spec)
                    && let Some(access_hash) = c.access_hash
                {
                    let found = super::session::FileChannel {
                        id: c.id,
                        access_hash,
                        title: c.title.clone(),
                    };
                    self.session
                        .remember_channel(&found)
                        .map_err(|e| StorageError::Fatal(e.to_string()))?;
                    return Ok(StorageChat::Channel {
                        id: c.id,
                        access_hash,
                    });
                }
            }
            // Next page: older than the oldest top message of this one.
            let oldest = messages
                .iter()
                .filter_map(|m| match m {
                    tl::enums::Message::Message(m) => Some((m.date, m.id)),
                    _ => None,
                })
                .min();
            match oldest {
                Some((date, mid)) if !last_page && !dialogs.is_empty() => {
                    offset_date = date;
                    offset_id = mid;
                }
                _ => break,
            }
        }
        Err(StorageError::Fatal(format!(
            "storage chat {spec:?} (STORINATOR_STORAGE_CHAT) is not a channel of this account"
        )))
    }

    async fn open_part_sender(&self) -> Result<PartSender, String> {
        let (addr, key) = self
            .session
            .home_dc()
            .ok_or("session has no authorization key for its home dc")?;
        let mtp = mtp::Encrypted::build()
            .compression_threshold(self.cfg.compress_parts.then_some(512))
            .finish(key);
        let mut sender = Sender::connect(
            transport::Full::new(),
            mtp,
            ServerAddr::Tcp {
                address: addr.into(),
            },
        )
        .await
        .map_err(|e| format!("connect to {addr}: {e}"))?;
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
        sender
            .invoke(&init)
            .await
            .map_err(|e| format!("init connection: {e}"))?;
        Ok(sender)
    }

    /// Sends one part on a dedicated connection, reconnecting and retrying as needed.
    async fn send_part(
        &self,
        conn: &mut Option<PartSender>,
        file_id: i64,
        part: i32,
        total: Option<i32>,
        bytes: Vec<u8>,
    ) -> Result<(), StorageError> {
        let len = bytes.len() as u64;
        let body = part_request(file_id, part, total, &bytes);
        drop(bytes);
        let mut attempt = 0u32;
        'retry: loop {
            self.sched.acquire(CallClass::Transfer).await;
            let why = 'attempt: {
                if conn.is_none() {
                    match timeout(self.cfg.request_timeout, self.open_part_sender()).await {
                        Ok(Ok(s)) => *conn = Some(s),
                        Ok(Err(e)) => break 'attempt e,
                        Err(_) => break 'attempt "connect timed out".to_string(),
                    }
                }
                let sender = conn.as_mut().unwrap();
                let started = Instant::now();
                let res = timeout(self.cfg.request_timeout, invoke_raw_bool(sender, &body)).await;
                match res {
                    Ok(Ok(true)) => {
                        self.sched.transfer_ok(len, started.elapsed());
                        return Ok(());
                    }
                    Ok(Ok(false)) => "server did not store the part".to_string(),
                    Ok(Err(InvocationError::Rpc(e))) => {
                        if let Some(secs) = is_flood(&e) {
                            self.sched.flood_wait(CallClass::Transfer, secs);
                            continue 'retry;
                        }
                        if !is_transient_rpc(&e) {
                            return Err(StorageError::Fatal(format!(
                                "telegram refused part {part} of upload {file_id:x}: {e}"
                            )));
                        }
                        e.to_string()
                    }
                    Ok(Err(e)) => {
                        *conn = None;
                        e.to_string()
                    }
                    Err(_) => {
                        // The connection may be wedged; a fresh one is cheap.
                        *conn = None;
                        format!("no answer within {:?}", self.cfg.request_timeout)
                    }
                }
            };
            if conn.is_none() {
                self.sched.note_reconnect();
            }
            attempt += 1;
            if attempt >= self.cfg.max_attempts {
                return Err(StorageError::Transient(format!(
                    "part {part} of upload {file_id:x} failed {attempt} times, last: {why}"
                )));
            }
            self.sched.note_retry();
            tokio::time::sleep(self.sched.backoff(attempt)).await;
        }
    }

    /// Uploads the file's parts under `file_id`; returns the part count.
    async fn upload_parts(
        self: &Arc<Self>,
        path: &Path,
        size: u64,
        file_id: i64,
    ) -> Result<i32, StorageError> {
        let parts = size.div_ceil(PART_SIZE) as i32;
        let big = size > SMALL_FILE_MAX;
        let file = Arc::new(std::fs::File::open(path).map_err(|e| StorageError::io(path, e))?);
        let next = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let workers = self.sched.part_concurrency().min(parts as usize).max(1);
        let mut set = JoinSet::new();
        for worker in 0..workers {
            let me = self.clone();
            let file = file.clone();
            let next = next.clone();
            let path = path.to_path_buf();
            set.spawn(async move {
                let mut conn = me.idle_senders.lock().unwrap().pop();
                let res = async {
                    loop {
                        // A flood wait halves the allowed streams: extra workers bow out.
                        if worker > 0 && worker >= me.sched.part_concurrency() {
                            return Ok(());
                        }
                        let p = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        if p >= parts {
                            return Ok(());
                        }
                        let off = p as u64 * PART_SIZE;
                        let len = (size - off).min(PART_SIZE) as usize;
                        let mut buf = vec![0u8; len];
                        file.read_exact_at(&mut buf, off)
                            .map_err(|e| StorageError::io(&path, e))?;
                        me.send_part(&mut conn, file_id, p, big.then_some(parts), buf)
                            .await?;
                    }
                }
                .await;
                if let Some(c) = conn {
                    me.idle_senders.lock().unwrap().push(c);
                }
                res
            });
        }
        let mut first_err = None;
        while let Some(r) = set.join_next().await {
            let r = r.unwrap_or_else(|e| Err(StorageError::Fatal(format!("upload task: {e}"))));
            if let Err(e) = r {
                // Stop the others: the pack will be retried as a whole.
                next.store(parts, std::sync::atomic::Ordering::Relaxed);
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(parts),
        }
    }

    fn location_of(&self, msg_id: i32) -> Location {
        format!("{}:{msg_id}", self.chat.location_prefix())
    }

    fn msg_id_from_location(&self, loc: &str) -> Option<i32> {
        let (prefix, id) = loc.split_once(':')?;
        (prefix == self.chat.location_prefix())
            .then(|| id.parse().ok())
            .flatten()
    }

    async fn put_path(self: &Arc<Self>, name: &str, path: &Path) -> Result<Location, StorageError> {
        check_name(name)?;
        let size = std::fs::metadata(path)
            .map_err(|e| StorageError::io(path, e))?
            .len();
        if size == 0 {
            return Err(StorageError::Fatal(format!(
                "object {name} is empty: telegram cannot store empty documents"
            )));
        }
        let max_parts: u64 = if self.cfg.premium { 8000 } else { 4000 };
        if size > max_parts * PART_SIZE {
            return Err(StorageError::Fatal(format!(
                "object {name} is {size} bytes, over the account's upload limit of {} bytes",
                max_parts * PART_SIZE
            )));
        }
        let mut salt = 0u32;
        let mut restarts = 0u32;
        let mut superseded = Vec::new();
        let mut uploaded: Option<(i64, i32)> = None;
        loop {
            let (file_id, parts) = match uploaded {
                Some(u) => u,
                None => {
                    let file_id = random_i64();
                    let parts = self.upload_parts(path, size, file_id).await?;
                    uploaded = Some((file_id, parts));
                    (file_id, parts)
                }
            };
            let input_file = if size > SMALL_FILE_MAX {
                tl::enums::InputFile::Big(tl::types::InputFileBig {
                    id: file_id,
                    parts,
                    name: name.into(),
                })
            } else {
                tl::enums::InputFile::File(tl::types::InputFile {
                    id: file_id,
                    parts,
                    name: name.into(),
                    md5_checksum: String::new(),
                })
            };
            let req = tl::functions::messages::SendMedia {
                silent: true,
                background: false,
                clear_draft: false,
                noforwards: false,
                update_stickersets_order: false,
                invert_media: false,
                allow_paid_floodskip: false,
                peer: self.chat.input_peer(),
                reply_to: None,
                media: tl::enums::InputMedia::UploadedDocument(
                    tl::types::InputMediaUploadedDocument {
                        nosound_video: false,
                        force_file: true,
                        spoiler: false,
                        file: input_file,
                        thumb: None,
                        mime_type: "application/octet-stream".into(),
                        attributes: vec![tl::enums::DocumentAttribute::Filename(
                            tl::types::DocumentAttributeFilename {
                                file_name: name.into(),
                            },
                        )],
                        stickers: None,
                        video_cover: None,
                        video_timestamp: None,
                        ttl_seconds: None,
                    },
                ),
                // No caption: the name is already all the chat learns.
                message: String::new(),
                random_id: random_id_for(name, salt),
                reply_markup: None,
                entities: None,
                schedule_date: None,
                schedule_repeat_period: None,
                send_as: None,
                quick_reply_shortcut: None,
                effect: None,
                allow_paid_stars: None,
                suggested_post: None,
            };
            match self.call(CallClass::Message, &req).await {
                Ok(updates) => {
                    let doc = doc_from_updates(&updates, name).ok_or_else(|| {
                        StorageError::Transient(format!(
                            "sent {name} but the answer carried no document"
                        ))
                    })?;
                    let loc = self.location_of(doc.msg_id);
                    self.cache.lock().unwrap().insert(name.to_string(), doc);
                    if !superseded.is_empty() {
                        self.delete_messages(superseded).await?;
                    }
                    return Ok(loc);
                }
                Err(CallError::Rpc(e))
                    if e.name == "FILE_PART_MISSING"
                        || e.name.starts_with("FILE_PART_") && e.name.ends_with("_MISSING") =>
                {
                    // Parts expire; the unit of resume is the whole pack.
                    restarts += 1;
                    self.sched.note_upload_restart();
                    if restarts > MAX_UPLOAD_RESTARTS {
                        return Err(StorageError::Transient(format!(
                            "upload of {name} kept losing its parts ({e})"
                        )));
                    }
                    uploaded = None;
                }
                Err(CallError::Rpc(e)) if e.name == "RANDOM_ID_DUPLICATE" => {
                    match self.find_by_name(name).await? {
                        // An earlier attempt went through (we lost the answer, or crashed).
                        Some(doc) if self.same_content(name, &doc, path, size).await? => {
                            let loc = self.location_of(doc.msg_id);
                            self.cache.lock().unwrap().insert(name.to_string(), doc);
                            return Ok(loc);
                        }
                        // The name holds other bytes (a re-wrapped key): store the new
                        // object under a new id, then retire the old one.
                        Some(doc) => superseded.push(doc.msg_id),
                        // The name was used before and deleted since.
                        None => {}
                    }
                    salt += 1;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Whether the stored `doc` already holds the file at `path`. Packs are named by random
    /// ids, so for them equal size is enough; small objects (keys, which are re-written under
    /// the same name when the passphrase changes) are compared byte for byte.
    async fn same_content(
        self: &Arc<Self>,
        name: &str,
        doc: &Doc,
        path: &Path,
        size: u64,
    ) -> Result<bool, StorageError> {
        if doc.size != size {
            return Ok(false);
        }
        if size > 1024 * 1024 {
            return Ok(true);
        }
        let local = std::fs::read(path).map_err(|e| StorageError::io(path, e))?;
        self.cache
            .lock()
            .unwrap()
            .insert(name.to_string(), doc.clone());
        let remote = self
            .get(&ObjectRef::new(name, self.location_of(doc.msg_id)), 0, size)
            .await?;
        Ok(remote == local)
    }

    async fn delete_messages(&self, ids: Vec<i32>) -> Result<(), StorageError> {
        match &self.chat {
            StorageChat::SavedMessages => {
                self.call(
                    CallClass::Message,
                    &tl::functions::messages::DeleteMessages {
                        revoke: true,
                        id: ids,
                    },
                )
                .await?;
            }
            StorageChat::Channel { id, access_hash } => {
                self.call(
                    CallClass::Message,
                    &tl::functions::channels::DeleteMessages {
                        channel: input_channel(*id, *access_hash),
                        id: ids,
                    },
                )
                .await?;
            }
        }
        Ok(())
    }

    async fn fetch_message(&self, msg_id: i32) -> Result<Option<(String, Doc)>, StorageError> {
        let ids = vec![tl::enums::InputMessage::Id(tl::types::InputMessageId {
            id: msg_id,
        })];
        let res = match &self.chat {
            StorageChat::SavedMessages => {
                self.call(
                    CallClass::Message,
                    &tl::functions::messages::GetMessages { id: ids },
                )
                .await?
            }
            StorageChat::Channel { id, access_hash } => {
                self.call(
                    CallClass::Message,
                    &tl::functions::channels::GetMessages {
                        channel: input_channel(*id, *access_hash),
                        id: ids,
                    },
                )
                .await?
            }
        };
        Ok(messages_of(res).into_iter().find_map(|m| doc_of(&m)))
    }

    async fn find_by_name(&self, name: &str) -> Result<Option<Doc>, StorageError> {
        let mut offset_id = 0;
        loop {
            let req = tl::functions::messages::Search {
                peer: self.chat.input_peer(),
                q: name.into(),
                from_id: None,
                saved_peer_id: None,
                saved_reaction: None,
                top_msg_id: None,
                filter: tl::enums::MessagesFilter::InputMessagesFilterDocument,
                min_date: 0,
                max_date: 0,
                offset_id,
                add_offset: 0,
                limit: 100,
                max_id: 0,
                min_id: 0,
                hash: 0,
            };
            let msgs = messages_of(self.call(CallClass::Message, &req).await?);
            if msgs.is_empty() {
                return Ok(None);
            }
            for m in &msgs {
                if let Some((n, d)) = doc_of(m)
                    && n == name
                {
                    return Ok(Some(d));
                }
            }
            offset_id = msgs.iter().map(msg_id).min().unwrap_or(0);
            if offset_id <= 1 {
                return Ok(None);
            }
        }
    }

    async fn locate(&self, obj: &ObjectRef) -> Result<Doc, StorageError> {
        if let Some(d) = self.cache.lock().unwrap().get(&obj.name) {
            return Ok(d.clone());
        }
        if let Some(id) = self.msg_id_from_location(&obj.location)
            && let Some((n, d)) = self.fetch_message(id).await?
            && n == obj.name
        {
            self.cache.lock().unwrap().insert(n, d.clone());
            return Ok(d);
        }
        match self.find_by_name(&obj.name).await? {
            Some(d) => {
                self.cache
                    .lock()
                    .unwrap()
                    .insert(obj.name.clone(), d.clone());
                Ok(d)
            }
            None => Err(StorageError::NotFound {
                name: obj.name.clone(),
            }),
        }
    }

    /// Re-reads the message to get a fresh file reference. Concurrent window reads that hit
    /// the same expiry share one refetch.
    async fn refresh(&self, name: &str, old: &Doc) -> Result<Doc, StorageError> {
        let _one_at_a_time = self.refresh_lock.lock().await;
        if let Some(d) = self.cache.lock().unwrap().get(name)
            && d.file_reference != old.file_reference
        {
            return Ok(d.clone());
        }
        self.cache.lock().unwrap().remove(name);
        match self.fetch_message(old.msg_id).await? {
            Some((n, d)) if n == name => {
                self.cache.lock().unwrap().insert(n, d.clone());
                Ok(d)
            }
            _ => Err(StorageError::NotFound { name: name.into() }),
        }
    }

    async fn read_window(
        self: &Arc<Self>,
        name: &str,
        doc: Doc,
        start: u64,
        limit: u64,
    ) -> Result<Vec<u8>, StorageError> {
        let mut doc = doc;
        let mut refreshes = 0;
        loop {
            let req = tl::functions::upload::GetFile {
                precise: false,
                cdn_supported: false,
                location: tl::enums::InputFileLocation::InputDocumentFileLocation(
                    tl::types::InputDocumentFileLocation {
                        id: doc.id,
                        access_hash: doc.access_hash,
                        file_reference: doc.file_reference.clone(),
                        thumb_size: String::new(),
                    },
                ),
                offset: start as i64,
                limit: limit as i32,
            };
            let started = Instant::now();
            match self.call(CallClass::Transfer, &req).await {
                Ok(tl::enums::upload::File::File(f)) => {
                    let want = doc.size.saturating_sub(start).min(limit) as usize;
                    if f.bytes.len() != want {
                        return Err(StorageError::Transient(format!(
                            "short read of {name} at {start}: got {} of {want} bytes",
                            f.bytes.len()
                        )));
                    }
                    self.sched.transfer_ok(want as u64, started.elapsed());
                    return Ok(f.bytes);
                }
                Ok(tl::enums::upload::File::CdnRedirect(_)) => {
                    return Err(StorageError::Fatal(format!(
                        "telegram redirected {name} to a cdn, which is not supported"
                    )));
                }
                Err(CallError::Rpc(e)) if e.name.starts_with("FILE_REFERENCE_") => {
                    refreshes += 1;
                    if refreshes > MAX_REFERENCE_REFRESHES {
                        return Err(StorageError::Transient(format!(
                            "file reference of {name} keeps expiring"
                        )));
                    }
                    doc = self.refresh(name, &doc).await?;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    async fn get(
        self: &Arc<Self>,
        obj: &ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        check_name(&obj.name)?;
        let doc = self.locate(obj).await?;
        let end = offset
            .checked_add(len)
            .filter(|e| *e <= doc.size)
            .ok_or_else(|| {
                StorageError::Fatal(format!(
                    "read of {} past its end: {offset}+{len} > {}",
                    obj.name, doc.size
                ))
            })?;
        if len == 0 {
            return Ok(Vec::new());
        }
        let windows = plan_windows(offset, end);
        let mut out = Vec::with_capacity(len as usize);
        let mut set: JoinSet<(usize, Result<Vec<u8>, StorageError>)> = JoinSet::new();
        let mut results: Vec<Option<Vec<u8>>> = vec![None; windows.len()];
        let mut next = 0;
        let mut emitted = 0;
        let max_inflight = self.sched.part_concurrency().max(1);
        // Windows are fetched a few at a time and appended in order, so memory stays at
        // about (in flight) MiB beyond the requested range itself.
        while emitted < windows.len() {
            while next < windows.len() && set.len() < max_inflight {
                let (s, l) = windows[next];
                let me = self.clone();
                let name = obj.name.clone();
                let d = doc.clone();
                let i = next;
                set.spawn(async move { (i, me.read_window(&name, d, s, l).await) });
                next += 1;
            }
            let (i, r) = set
                .join_next()
                .await
                .expect("tasks in flight")
                .map_err(|e| StorageError::Fatal(format!("download task: {e}")))?;
            results[i] = Some(r?);
            while emitted < windows.len()
                && let Some(bytes) = results[emitted].take()
            {
                let (s, _) = windows[emitted];
                let from = offset.max(s) - s;
                let to = (end.min(s + bytes.len() as u64) - s) as usize;
                out.extend_from_slice(&bytes[from as usize..to]);
                emitted += 1;
            }
        }
        Ok(out)
    }

    async fn list_all(&self) -> Result<Vec<ObjectInfo>, StorageError> {
        let mut out = Vec::new();
        let mut fresh = HashMap::new();
        let mut offset_id = 0;
        loop {
            let req = tl::functions::messages::GetHistory {
                peer: self.chat.input_peer(),
                offset_id,
                offset_date: 0,
                add_offset: 0,
                limit: 100,
                max_id: 0,
                min_id: 0,
                hash: 0,
            };
            let msgs = messages_of(self.call(CallClass::Message, &req).await?);
            if msgs.is_empty() {
                break;
            }
            for m in &msgs {
                if let Some((name, d)) = doc_of(m)
                    && check_name(&name).is_ok()
                {
                    out.push(ObjectInfo {
                        name: name.clone(),
                        size: d.size,
                        location: self.location_of(d.msg_id),
                    });
                    fresh.insert(name, d);
                }
            }
            let lowest = msgs.iter().map(msg_id).min().unwrap_or(0);
            if lowest <= 1 {
                break;
            }
            offset_id = lowest;
        }
        *self.cache.lock().unwrap() = fresh;
        out.reverse();
        Ok(out)
    }

    async fn remove_obj(&self, obj: &ObjectRef) -> Result<(), StorageError> {
        check_name(&obj.name)?;
        let doc = match self.locate(obj).await {
            Ok(d) => d,
            Err(StorageError::NotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        self.delete_messages(vec![doc.msg_id]).await?;
        self.cache.lock().unwrap().remove(&obj.name);
        Ok(())
    }
}

/// Sends an already-serialized request on a dedicated sender and reads a Bool answer.
async fn invoke_raw_bool(sender: &mut PartSender, body: &[u8]) -> Result<bool, InvocationError> {
    sender.invoke(&RawBoolCall(body)).await
}

/// A request whose bytes are already serialized (the part body is built once, outside the
/// retry loop) and whose answer is a Bool.
struct RawBoolCall<'a>(&'a [u8]);

impl tl::Serializable for RawBoolCall<'_> {
    fn serialize(&self, buf: &mut impl Extend<u8>) {
        buf.extend(self.0.iter().copied());
    }

    fn to_bytes(&self) -> Vec<u8> {
        self.0.to_vec()
    }
}

impl tl::RemoteCall for RawBoolCall<'_> {
    type Return = bool;
}

/// Serializes upload.saveBigFilePart (with `total`) or upload.saveFilePart by hand: the
/// generated serializer pushes the part byte by byte through `Extend`, which costs more CPU
/// than encrypting it.
fn part_request(file_id: i64, part: i32, total: Option<i32>, bytes: &[u8]) -> Vec<u8> {
    use tl::Identifiable;
    let mut out = Vec::with_capacity(bytes.len() + 32);
    match total {
        Some(t) => {
            out.extend_from_slice(
                &tl::functions::upload::SaveBigFilePart::CONSTRUCTOR_ID.to_le_bytes(),
            );
            out.extend_from_slice(&file_id.to_le_bytes());
            out.extend_from_slice(&part.to_le_bytes());
            out.extend_from_slice(&t.to_le_bytes());
        }
        None => {
            out.extend_from_slice(
                &tl::functions::upload::SaveFilePart::CONSTRUCTOR_ID.to_le_bytes(),
            );
            out.extend_from_slice(&file_id.to_le_bytes());
            out.extend_from_slice(&part.to_le_bytes());
        }
    }
    // TL `bytes`: short form for < 254 bytes, else 0xfe and a 3-byte length; padded to 4.
    let len = bytes.len();
    let header = if len < 254 {
        out.push(len as u8);
        1
    } else {
        out.push(0xfe);
        out.extend_from_slice(&(len as u32).to_le_bytes()[..3]);
        4
    };
    out.extend_from_slice(bytes);
    let pad = (4 - (header + len) % 4) % 4;
    out.extend_from_slice(&[0u8; 3][..pad]);
    out
}

trait ConstructorName {
    #[allow(non_snake_case)]
    fn CONSTRUCTOR_ID_NAME() -> &'static str;
}

impl<T: RemoteCall> ConstructorName for T {
    fn CONSTRUCTOR_ID_NAME() -> &'static str {
        std::any::type_name::<T>()
            .rsplit("::")
            .next()
            .unwrap_or("request")
    }
}

fn msg_id(m: &tl::enums::Message) -> i32 {
    match m {
        tl::enums::Message::Message(m) => m.id,
        tl::enums::Message::Service(m) => m.id,
        tl::enums::Message::Empty(m) => m.id,
    }
}

fn messages_of(res: tl::enums::messages::Messages) -> Vec<tl::enums::Message> {
    use tl::enums::messages::Messages as M;
    match res {
        M::Messages(m) => m.messages,
        M::Slice(m) => m.messages,
        M::ChannelMessages(m) => m.messages,
        M::NotModified(_) => vec![],
    }
}

fn doc_of(m: &tl::enums::Message) -> Option<(String, Doc)> {
    let tl::enums::Message::Message(m) = m else {
        return None;
    };
    let Some(tl::enums::MessageMedia::Document(md)) = &m.media else {
        return None;
    };
    let Some(tl::enums::Document::Document(d)) = &md.document else {
        return None;
    };
    let name = d.attributes.iter().find_map(|a| match a {
        tl::enums::DocumentAttribute::Filename(f) => Some(f.file_name.clone()),
        _ => None,
    })?;
    Some((
        name,
        Doc {
            msg_id: m.id,
            id: d.id,
            access_hash: d.access_hash,
            file_reference: d.file_reference.clone(),
            size: d.size.max(0) as u64,
        },
    ))
}

fn doc_from_updates(u: &tl::enums::Updates, name: &str) -> Option<Doc> {
    let updates: &[tl::enums::Update] = match u {
        tl::enums::Updates::Updates(u) => &u.updates,
        tl::enums::Updates::Combined(u) => &u.updates,
        _ => return None,
    };
    updates.iter().find_map(|up| {
        let m = match up {
            tl::enums::Update::NewMessage(n) => &n.message,
            tl::enums::Update::NewChannelMessage(n) => &n.message,
            _ => return None,
        };
        doc_of(m).filter(|(n, _)| n == name).map(|(_, d)| d)
    })
}

#[async_trait]
impl Storage for TelegramStorage {
    fn describe(&self) -> String {
        match &self.inner.chat {
            StorageChat::SavedMessages => "telegram:saved messages".into(),
            StorageChat::Channel { id, .. } => format!("telegram:channel -100{id}"),
        }
    }

    fn spool_dir(&self) -> &Path {
        &self.inner.cfg.spool_dir
    }

    async fn put_file(&self, name: &str, path: &Path) -> Result<Location, StorageError> {
        let loc = self.inner.put_path(name, path).await?;
        std::fs::remove_file(path).map_err(|e| StorageError::io(path, e))?;
        Ok(loc)
    }

    async fn put_bytes(&self, name: &str, data: Vec<u8>) -> Result<Location, StorageError> {
        check_name(name)?;
        let tmp: PathBuf = self
            .inner
            .cfg
            .spool_dir
            .join(format!(".put-{name}-{:x}", random_i64()));
        std::fs::write(&tmp, &data).map_err(|e| StorageError::io(&tmp, e))?;
        let res = self.inner.put_path(name, &tmp).await;
        let _ = std::fs::remove_file(&tmp);
        res
    }

    async fn get_range(
        &self,
        obj: &ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        self.inner.get(obj, offset, len).await
    }

    async fn list(&self) -> Result<Vec<ObjectInfo>, StorageError> {
        self.inner.list_all().await
    }

    fn estimate(&self, bytes: u64, objects: u64) -> Option<storinator_shared::TransferEstimate> {
        let e = self.inner.sched.estimate(bytes, objects);
        Some(storinator_shared::TransferEstimate {
            message_calls: e.message_calls,
            part_calls: e.part_calls,
            seconds: e.seconds,
        })
    }

    async fn remove(&self, obj: &ObjectRef) -> Result<(), StorageError> {
        self.inner.remove_obj(obj).await
    }
}

/// `/get` for files over the Bot API's 50 MB: the worker's own account sends the restored
/// file to its Saved Messages under its real name. Uploaded like a pack (parts, flood waits,
/// retries), sent once: a fresh random id per call, since each `/get` is a new message.
#[async_trait]
impl crate::daemon::Courier for TelegramStorage {
    async fn send_to_saved_messages(
        &self,
        path: &Path,
        name: &str,
        caption: &str,
    ) -> Result<(), StorageError> {
        let inner = &self.inner;
        let size = std::fs::metadata(path)
            .map_err(|e| StorageError::io(path, e))?
            .len();
        let max = if inner.cfg.premium { 8000 } else { 4000 } * PART_SIZE;
        if size == 0 || size > max {
            return Err(StorageError::Fatal(format!(
                "{name} is {size} bytes: telegram accepts documents of 1 to {max} bytes"
            )));
        }
        let file_id = random_i64();
        let parts = inner.upload_parts(path, size, file_id).await?;
        let file = if size > SMALL_FILE_MAX {
            tl::enums::InputFile::Big(tl::types::InputFileBig {
                id: file_id,
                parts,
                name: name.into(),
            })
        } else {
            tl::enums::InputFile::File(tl::types::InputFile {
                id: file_id,
                parts,
                name: name.into(),
                md5_checksum: String::new(),
            })
        };
        let media = tl::types::InputMediaUploadedDocument {
            nosound_video: false,
            force_file: true,
            spoiler: false,
            file,
            thumb: None,
            mime_type: "application/octet-stream".into(),
            attributes: vec![tl::enums::DocumentAttribute::Filename(
                tl::types::DocumentAttributeFilename {
                    file_name: name.into(),
                },
            )],
            stickers: None,
            video_cover: None,
            video_timestamp: None,
            ttl_seconds: None,
        };
        let req = tl::functions::messages::SendMedia {
            silent: false,
            background: false,
            clear_draft: false,
            noforwards: false,
            update_stickersets_order: false,
            invert_media: false,
            allow_paid_floodskip: false,
            peer: tl::enums::InputPeer::PeerSelf,
            reply_to: None,
            media: tl::enums::InputMedia::UploadedDocument(media),
            message: caption.into(),
            random_id: random_i64(),
            reply_markup: None,
            entities: None,
            schedule_date: None,
            schedule_repeat_period: None,
            send_as: None,
            quick_reply_shortcut: None,
            effect: None,
            allow_paid_stars: None,
            suggested_post: None,
        };
        inner.call(CallClass::Message, &req).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn windows_follow_telegram_alignment_rules() {
        for (off, len) in [
            (0u64, 10u64),
            (9990, 10),
            (4095, 2),
            (MIB - 10, 20),
            (123_456, 3 * MIB + 17),
            (0, 2 * MIB),
        ] {
            let w = plan_windows(off, off + len);
            let mut covered = off;
            for (s, l) in &w {
                assert_eq!(s % 4096, 0);
                assert_eq!(l % 4096, 0);
                assert_eq!(MIB % l, 0);
                assert_eq!(s / MIB, (s + l - 1) / MIB, "window crosses 1 MiB");
                assert!(*s <= covered, "gap before {s}");
                covered = covered.max(s + l);
            }
            assert!(covered >= off + len);
        }
        assert!(
            plan_windows(0, 3 * MIB)
                .iter()
                .all(|(_, l)| *l <= MAX_WINDOW)
        );
        // A 10-byte read costs one 4 KiB window, not a megabyte.
        assert_eq!(plan_windows(9990, 10_000), vec![(8192, 4096)]);
    }

    #[test]
    fn hand_serialized_parts_match_the_generated_serializer() {
        use tl::Serializable;
        for len in [1usize, 3, 253, 254, 255, 1024, 524_288, 524_287] {
            let bytes: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let big = tl::functions::upload::SaveBigFilePart {
                file_id: 7,
                file_part: 3,
                file_total_parts: 9,
                bytes: bytes.clone(),
            };
            assert_eq!(
                part_request(7, 3, Some(9), &bytes),
                big.to_bytes(),
                "len {len}"
            );
            let small = tl::functions::upload::SaveFilePart {
                file_id: 7,
                file_part: 3,
                bytes: bytes.clone(),
            };
            assert_eq!(
                part_request(7, 3, None, &bytes),
                small.to_bytes(),
                "len {len}"
            );
        }
    }

    #[test]
    fn random_ids_are_stable_per_name() {
        assert_eq!(random_id_for("ab.enc", 0), random_id_for("ab.enc", 0));
        assert_ne!(random_id_for("ab.enc", 0), random_id_for("ab.enc", 1));
        assert_ne!(random_id_for("ab.enc", 0), random_id_for("ac.enc", 0));
    }
}
