//! The storage backend on grammers: packs become documents in the storage chat.
//!
//! Message-level calls (sendMedia, getMessages, search, getHistory, delete) and downloads go
//! through grammers-client's `Client`, which keeps one connection per data centre: documents
//! living on another data centre than the account's are read there, after the authorization
//! was carried over once (export on the home data centre, import on the other). File parts go
//! through dedicated grammers-mtsender connections built with compression off: the client
//! gzips every request of 512 bytes or more, which for encrypted parts is pure CPU waste.
//!
//! Every call has a timeout and our own retry policy (the client is configured with
//! `NoRetries`); what an error means is decided by one table (`errors`): waits pause the
//! class they hit for as long as Telegram asks, transient failures are retried with the
//! scheduler's bounded backoff, the rest fail with an explanation. Uploads live in `upload`,
//! reads and lookups in `download`.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use grammers_client::Client;
use grammers_client::sender::{ConnectionParams, NoRetries, SenderPool};
use grammers_mtsender::{InvocationError, RpcError};
use grammers_session::Session;
use grammers_tl_types::{self as tl, RemoteCall};
use storinator_shared::error::StorageError;
use storinator_shared::storage::check_name;
use storinator_shared::storage::{Location, ObjectInfo, ObjectRef, Storage};
use tokio::time::timeout;

pub use super::download::plan_windows;
pub use super::upload::random_id_for;

use super::TelegramConfig;
use super::chat::{self, ChatSpec};
use super::errors::{self, Action};
use super::scheduler::{CallClass, Scheduler, SchedulerConfig};
use super::session::FileSession;

/// Packs uploaded at once (see [`Storage::parallel_uploads`] for [`TelegramStorage`]).
pub const PARALLEL_UPLOADS: usize = 2;

/// Where packs live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StorageChat {
    SavedMessages,
    Channel { id: i64, access_hash: i64 },
}

impl StorageChat {
    pub(super) fn input_peer(&self) -> tl::enums::InputPeer {
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
pub(super) struct Doc {
    pub msg_id: i32,
    pub id: i64,
    pub access_hash: i64,
    pub file_reference: Vec<u8>,
    pub size: u64,
    /// The data centre it lives on.
    pub dc: i32,
}

/// Why one attempt at a call failed, for the retry policy.
pub(super) enum Failure {
    /// Telegram answered with an error: the error table decides.
    Rpc(RpcError),
    /// Worth another attempt (dropped connection, timeout).
    Again(String),
    /// Not worth another attempt.
    Fatal(StorageError),
}

/// The outcome of one call after our retry policy.
#[derive(Debug)]
pub(super) enum CallError {
    /// An RPC error that retrying does not fix; the caller decides what it means.
    Rpc(RpcError),
    Storage(StorageError),
}

impl From<CallError> for StorageError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Rpc(r) => rpc_error(&r, None),
            CallError::Storage(s) => s,
        }
    }
}

impl From<StorageError> for CallError {
    fn from(e: StorageError) -> Self {
        CallError::Storage(e)
    }
}

/// The storage error for an RPC error nobody handled, explained by the error table;
/// `what` names the operation.
pub(super) fn rpc_error(r: &RpcError, what: Option<&str>) -> StorageError {
    let call = r
        .caused_by
        .map(|id| format!(" ({})", tl::name_for_id(id)))
        .unwrap_or_default();
    let about = what.map(|w| format!("{w}: ")).unwrap_or_default();
    let said = errors::describe(r);
    match errors::classify(r) {
        Action::SessionInvalid => StorageError::Fatal(format!(
            "the session is no longer valid: {about}{said}{call}\nhint: run `storinator-worker login`"
        )),
        Action::AccessLost => StorageError::Fatal(format!(
            "the account lost access to the storage chat: {about}{said}{call}\nhint: check STORINATOR_STORAGE_CHAT and that this account can still post there"
        )),
        Action::Login => StorageError::Fatal(format!(
            "telegram wants the account signed in again: {about}{said}{call}\nhint: run `storinator-worker login`"
        )),
        Action::Fatal | Action::NotFound => {
            StorageError::Fatal(format!("telegram refused {about}{said}{call}"))
        }
        Action::Wait
        | Action::Retry
        | Action::Reupload
        | Action::RefreshReference
        | Action::MigrateDc
        | Action::FindEarlierSend => StorageError::Transient(format!("{about}{said}{call}")),
    }
}

pub(super) struct Inner {
    pub client: Client,
    pub pool_task: tokio::task::JoinHandle<()>,
    pub session: Arc<FileSession>,
    pub cfg: TelegramConfig,
    pub chat: StorageChat,
    pub sched: Scheduler,
    pub pipes: super::transfer::Pipes,
    pub cache: Mutex<HashMap<String, Doc>>,
    pub refresh_lock: tokio::sync::Mutex<()>,
    /// Data centres other than the home one that accept this account's calls already.
    pub dcs_authorized: tokio::sync::Mutex<HashSet<i32>>,
    /// Bytes of uploads under way not sent yet.
    pub pending_upload: AtomicU64,
}

/// Telegram as a [`Storage`]: one document per object in the storage chat.
#[derive(Clone)]
pub struct TelegramStorage {
    pub(super) inner: Arc<Inner>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.client.disconnect();
        self.pool_task.abort();
    }
}

impl TelegramStorage {
    /// Loads the session, connects, checks that it is signed in and that the storage chat is
    /// one the account may use.
    pub async fn connect(cfg: TelegramConfig) -> Result<TelegramStorage, StorageError> {
        let spec = chat::parse(cfg.storage_chat.as_deref())?;
        let session = Arc::new(
            FileSession::load_or_new(&cfg.session_path)
                .map_err(|e| StorageError::Fatal(e.to_string()))?,
        );
        if session.self_user_id().is_none() {
            return Err(StorageError::Fatal(format!(
                "session {} is not signed in\nhint: run `storinator-worker login` first",
                cfg.session_path.display()
            )));
        }
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
        let mut inner = Inner {
            client,
            pool_task,
            session,
            cfg,
            chat: StorageChat::SavedMessages,
            sched,
            pipes: Default::default(),
            cache: Mutex::new(HashMap::new()),
            refresh_lock: tokio::sync::Mutex::new(()),
            dcs_authorized: tokio::sync::Mutex::new(HashSet::new()),
            pending_upload: AtomicU64::new(0),
        };
        // One cheap call proves the key and the login before any job relies on them; beside
        // it, the home data centre's coming salts, so part connections start under a good one
        // (see `salts`) at no extra round trip.
        let get_me = tl::functions::users::GetUsers {
            id: vec![tl::enums::InputUser::UserSelf],
        };
        let (me, ()) = tokio::join!(
            inner.call(CallClass::Transfer, &get_me),
            inner.fetch_salts(None),
        );
        me?;
        let raw = inner.cfg.storage_chat.clone().unwrap_or_default();
        inner.chat = match spec {
            ChatSpec::SavedMessages => StorageChat::SavedMessages,
            ChatSpec::Id(id) => inner.channel_by_id(id, &raw).await?,
            ChatSpec::Username(name) => inner.channel_by_username(&name, &raw).await?,
        };
        Ok(TelegramStorage {
            inner: Arc::new(inner),
        })
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
    pub(super) fn home_dc(&self) -> i32 {
        self.session.home_dc_id().unwrap_or(2)
    }

    /// Invokes `req` on the home data centre (see [`Inner::call_in`]).
    pub(super) async fn call<R: RemoteCall>(
        &self,
        class: CallClass,
        req: &R,
    ) -> Result<R::Return, CallError> {
        self.call_in(None, class, req).await
    }

    /// Invokes `req` on data centre `dc` (`None` or the home one: the home), carrying the
    /// authorization there first if needed; a data centre that forgot it gets it again once.
    pub(super) async fn call_in<R: RemoteCall>(
        &self,
        dc: Option<i32>,
        class: CallClass,
        req: &R,
    ) -> Result<R::Return, CallError> {
        self.on_dc(dc, |dc| self.call_with_policy(dc, class, req))
            .await
    }

    /// Runs `op` against data centre `dc` (`None` or the home one: the home, passed to `op`
    /// as `None`), carrying the authorization there first; if that data centre answers that
    /// it does not know the key any more, the authorization is carried again, once.
    pub(super) async fn on_dc<T, F, Fut>(&self, dc: Option<i32>, mut op: F) -> Result<T, CallError>
    where
        F: FnMut(Option<i32>) -> Fut,
        Fut: Future<Output = Result<T, CallError>>,
    {
        let dc = dc.filter(|d| *d != self.home_dc());
        let mut reauthorized = false;
        loop {
            if let Some(dc) = dc {
                self.authorize_dc(dc).await?;
            }
            match op(dc).await {
                Err(CallError::Rpc(e))
                    if dc.is_some() && !reauthorized && e.name == "AUTH_KEY_UNREGISTERED" =>
                {
                    reauthorized = true;
                    self.dcs_authorized.lock().await.remove(&dc.unwrap_or(0));
                }
                other => return other,
            }
        }
    }

    /// Makes data centre `dc` accept this account: auth.exportAuthorization on the home data
    /// centre, auth.importAuthorization on `dc`. Once per data centre and process.
    async fn authorize_dc(&self, dc: i32) -> Result<(), CallError> {
        let mut done = self.dcs_authorized.lock().await;
        if done.contains(&dc) {
            return Ok(());
        }
        let tl::enums::auth::ExportedAuthorization::Authorization(exported) = self
            .call_with_policy(
                None,
                CallClass::Transfer,
                &tl::functions::auth::ExportAuthorization { dc_id: dc },
            )
            .await?;
        // Beside the import, that data centre's salts for the part connections to come.
        let import = tl::functions::auth::ImportAuthorization {
            id: exported.id,
            bytes: exported.bytes,
        };
        let (imported, ()) = tokio::join!(
            self.call_with_policy(Some(dc), CallClass::Transfer, &import),
            self.fetch_salts(Some(dc)),
        );
        imported?;
        tracing::debug!(dc, "authorization imported");
        done.insert(dc);
        Ok(())
    }

    /// Invokes `req` through the client with a timeout and the retry policy.
    async fn call_with_policy<R: RemoteCall>(
        &self,
        dc: Option<i32>,
        class: CallClass,
        req: &R,
    ) -> Result<R::Return, CallError> {
        let what = super::upload::request_name::<R>();
        self.with_policy(class, what, || async {
            let invoke = async {
                match dc {
                    None => self.client.invoke(req).await,
                    Some(dc) => self.client.invoke_in_dc(dc, req).await,
                }
            };
            match timeout(self.cfg.request_timeout, invoke).await {
                Ok(Ok(v)) => Ok(v),
                Ok(Err(InvocationError::Rpc(e))) => Err(Failure::Rpc(e)),
                Ok(Err(e)) => Err(Failure::Again(e.to_string())),
                Err(_) => Err(Failure::Again(format!(
                    "no answer within {:?}",
                    self.cfg.request_timeout
                ))),
            }
        })
        .await
    }

    /// The one retry policy: runs `attempt` until it succeeds, waiting out waits (always;
    /// they do not count as attempts) and retrying transient failures with the scheduler's
    /// bounded backoff. Other RPC errors go back to the caller. A failed part transfer also
    /// shrinks the part window.
    pub(super) async fn with_policy<T, F, Fut>(
        &self,
        class: CallClass,
        what: &str,
        mut attempt: F,
    ) -> Result<T, CallError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut attempts = 0u32;
        loop {
            self.sched.acquire(class).await;
            let why = match attempt().await {
                Ok(v) => return Ok(v),
                Err(Failure::Rpc(e)) => match errors::classify(&e) {
                    Action::Wait => {
                        self.wait(class, &e);
                        continue;
                    }
                    Action::Retry => errors::describe(&e),
                    _ => return Err(CallError::Rpc(e)),
                },
                Err(Failure::Again(why)) => why,
                Err(Failure::Fatal(e)) => return Err(CallError::Storage(e)),
            };
            if class == CallClass::Transfer {
                self.sched.transfer_failed();
            }
            attempts += 1;
            if attempts >= self.cfg.max_attempts {
                return Err(CallError::Storage(StorageError::Transient(format!(
                    "{what} failed {attempts} times, last: {why}"
                ))));
            }
            self.sched.note_retry();
            tokio::time::sleep(self.sched.backoff(attempts)).await;
        }
    }

    /// Pauses `class` as a *_WAIT_X answer asks; FLOOD_PREMIUM_WAIT also marks the account
    /// as throttled, which jobs show in their progress.
    pub(super) fn wait(&self, class: CallClass, e: &RpcError) {
        let secs = e.value.unwrap_or(1);
        if e.name == "FLOOD_PREMIUM_WAIT" {
            self.sched.premium_wait(secs);
        } else {
            self.sched.flood_wait(class, secs);
        }
    }

    /// The storage channel with id `id`: checked against Telegram (channels.getChannels with
    /// the access hash the session knows), or found in the dialogs if the session does not
    /// know it yet, and remembered in the session.
    async fn channel_by_id(&self, id: i64, spec: &str) -> Result<StorageChat, StorageError> {
        let known = self.session.channels().into_iter().find(|c| c.id == id);
        let chat = match known {
            Some(c) => {
                let res = self
                    .call(
                        CallClass::Message,
                        &tl::functions::channels::GetChannels {
                            id: vec![tl::enums::InputChannel::Channel(tl::types::InputChannel {
                                channel_id: c.id,
                                access_hash: c.access_hash,
                            })],
                        },
                    )
                    .await
                    .map_err(|e| match e {
                        CallError::Rpc(r) => rpc_error(&r, Some("checking the storage channel")),
                        CallError::Storage(s) => s,
                    })?;
                chats_of(res).into_iter().find(|c| chat_id(c) == Some(id))
            }
            None => self.find_in_dialogs(id).await?,
        };
        let chat = chat.ok_or_else(|| {
            StorageError::Fatal(format!(
                "STORINATOR_STORAGE_CHAT={spec:?} is not a channel of this account\nhint: use the id of a channel this account created (-100…), or its @username"
            ))
        })?;
        self.adopt(&chat, spec)
    }

    /// The storage channel `@name`, looked up with contacts.resolveUsername.
    async fn channel_by_username(
        &self,
        name: &str,
        spec: &str,
    ) -> Result<StorageChat, StorageError> {
        let tl::enums::contacts::ResolvedPeer::Peer(r) = self
            .call(
                CallClass::Message,
                &tl::functions::contacts::ResolveUsername {
                    username: name.into(),
                    referer: None,
                },
            )
            .await
            .map_err(|e| match e {
                CallError::Rpc(r) => rpc_error(&r, Some(&format!("looking up @{name}"))),
                CallError::Storage(s) => s,
            })?;
        let tl::enums::Peer::Channel(p) = r.peer else {
            return Err(StorageError::Fatal(format!(
                "STORINATOR_STORAGE_CHAT={spec:?} is a user, not a channel"
            )));
        };
        let chat = r
            .chats
            .into_iter()
            .find(|c| chat_id(c) == Some(p.channel_id))
            .ok_or_else(|| {
                StorageError::Transient(format!("telegram resolved @{name} without its channel"))
            })?;
        self.adopt(&chat, spec)
    }

    /// Checks `chat` as the storage chat and remembers it in the session.
    fn adopt(&self, chat: &tl::enums::Chat, spec: &str) -> Result<StorageChat, StorageError> {
        let c = chat::check(chat, spec)?;
        let title = match chat {
            tl::enums::Chat::Channel(ch) => ch.title.clone(),
            _ => String::new(),
        };
        self.session
            .remember_channel(&super::session::FileChannel {
                id: c.id,
                access_hash: c.access_hash,
                title,
            })
            .map_err(|e| StorageError::Fatal(e.to_string()))?;
        Ok(StorageChat::Channel {
            id: c.id,
            access_hash: c.access_hash,
        })
    }

    /// Looks channel `id` up in the account's dialogs (the session only knows channels it
    /// has seen).
    async fn find_in_dialogs(&self, id: i64) -> Result<Option<tl::enums::Chat>, StorageError> {
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
            if let Some(c) = chats.into_iter().find(|c| chat_id(c) == Some(id)) {
                return Ok(Some(c));
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
        Ok(None)
    }

    pub(super) fn location_of(&self, msg_id: i32) -> Location {
        format!("{}:{msg_id}", self.chat.location_prefix())
    }

    pub(super) fn msg_id_from_location(&self, loc: &str) -> Option<i32> {
        let (prefix, id) = loc.split_once(':')?;
        (prefix == self.chat.location_prefix())
            .then(|| id.parse().ok())
            .flatten()
    }
}

fn chat_id(c: &tl::enums::Chat) -> Option<i64> {
    match c {
        tl::enums::Chat::Channel(c) => Some(c.id),
        tl::enums::Chat::ChannelForbidden(c) => Some(c.id),
        _ => None,
    }
}

fn chats_of(res: tl::enums::messages::Chats) -> Vec<tl::enums::Chat> {
    match res {
        tl::enums::messages::Chats::Chats(c) => c.chats,
        tl::enums::messages::Chats::Slice(c) => c.chats,
    }
}

pub(super) fn msg_id(m: &tl::enums::Message) -> i32 {
    match m {
        tl::enums::Message::Message(m) => m.id,
        tl::enums::Message::Service(m) => m.id,
        tl::enums::Message::Empty(m) => m.id,
    }
}

pub(super) fn messages_of(res: tl::enums::messages::Messages) -> Vec<tl::enums::Message> {
    use tl::enums::messages::Messages as M;
    match res {
        M::Messages(m) => m.messages,
        M::Slice(m) => m.messages,
        M::ChannelMessages(m) => m.messages,
        M::NotModified(_) => vec![],
    }
}

pub(super) fn doc_of(m: &tl::enums::Message) -> Option<(String, Doc)> {
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
            dc: d.dc_id,
        },
    ))
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
            .join(format!(".put-{name}-{:x}", super::upload::random_i64()));
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

    fn throttle(&self) -> Option<storinator_shared::Throttle> {
        let rate = self.inner.sched.premium_throttle()?;
        Some(storinator_shared::Throttle {
            reason: "Telegram is limiting this account's upload speed (FLOOD_PREMIUM_WAIT: free accounts are slowed down after a volume; Telegram Premium lifts it)".into(),
            bytes_per_sec: rate,
            pending_bytes: self
                .inner
                .pending_upload
                .load(std::sync::atomic::Ordering::Relaxed),
            eta_secs: None,
        })
    }

    async fn remove(&self, obj: &ObjectRef) -> Result<(), StorageError> {
        self.inner.remove_obj(obj).await
    }

    async fn remove_many(&self, objs: &[ObjectRef]) -> Result<(), StorageError> {
        self.inner.remove_objs(objs).await
    }

    /// Two packs at once: the part window is shared and gives room in the order transfers
    /// started, so the second pack's parts only take the room the first one leaves while its
    /// last parts are answered and its sendMedia publishes it. Uploaded one after the other,
    /// the link would idle for about two round trips at every pack boundary. A third pack
    /// would only wait behind the other two (and hold another pack in the spool folder).
    fn parallel_uploads(&self) -> usize {
        PARALLEL_UPLOADS
    }

    /// Twice what the part window lets into flight: a restore's reads finish in any order
    /// but are used in order, so with only a window's worth requested the window would idle
    /// while a finished read waits for the one before it.
    fn read_ahead(&self) -> u64 {
        2 * self.inner.sched.config().max_part_concurrency as u64 * super::scheduler::PART_SIZE
    }

    fn pushback(&self) -> storinator_shared::storage::Pushback {
        let s = self.inner.sched.stats();
        storinator_shared::storage::Pushback {
            // A premium wait counts as a flood wait in the scheduler too: count it once.
            flood_waits: s.flood_waits.saturating_sub(s.premium_waits),
            premium_waits: s.premium_waits,
        }
    }
}

/// `/get` for files over the Bot API's 50 MB: the worker's own account sends the restored
/// file to its Saved Messages (see `Inner::send_to_saved_messages`).
#[async_trait]
impl crate::daemon::Courier for TelegramStorage {
    async fn send_to_saved_messages(
        &self,
        path: &Path,
        name: &str,
        caption: &str,
    ) -> Result<(), StorageError> {
        self.inner.send_to_saved_messages(path, name, caption).await
    }
}
