//! Connections, request dispatch and the little Telegram behind them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use grammers_tl_types::{self as tl, Cursor, Deserializable, Identifiable, Serializable};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use super::wire::{self, ServerKey};
use super::{Counters, Fault, Faults, LoopbackOptions, MESSAGE_CLASS, tlbuild};

const PART_STRIDE: u64 = 512 * 1024;
const SMALL_FILE_MAX: u64 = 10 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// A private channel owned by the loopback account.
#[derive(Clone, Debug)]
pub struct ChannelInfo {
    pub id: i64,
    pub access_hash: i64,
    pub title: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum ChatKey {
    Saved,
    Channel(i64),
}

struct Doc {
    access_hash: i64,
    file_reference: Vec<u8>,
    size: u64,
    name: String,
    mime: String,
    date: i32,
    path: PathBuf,
}

struct Msg {
    date: i32,
    text: String,
    doc: Option<i64>,
}

#[derive(Default)]
struct Chat {
    msgs: BTreeMap<i32, Msg>,
    pts: i32,
    next_id: i32,
}

struct Upload {
    big: bool,
    declared_total: Option<i32>,
    parts: BTreeMap<i32, u64>,
    file: Arc<std::fs::File>,
    path: PathBuf,
    touched: Instant,
}

#[derive(Default)]
struct State {
    chats: HashMap<ChatKey, Chat>,
    docs: HashMap<i64, Doc>,
    uploads: HashMap<i64, Upload>,
    random_ids: HashMap<(ChatKey, i64), i32>,
    user_msg_id: i32,
    pts: i32,
}

pub(crate) struct Shared {
    dir: PathBuf,
    opts: LoopbackOptions,
    port: u16,
    key: ServerKey,
    pub(crate) self_id: i64,
    self_hash: i64,
    pub(crate) channels: Vec<ChannelInfo>,
    pub(crate) faults: Faults,
    pub(crate) counters: Arc<Counters>,
    state: Mutex<State>,
    pub(crate) drop_all: watch::Sender<u64>,
    rate: Mutex<VecDeque<Instant>>,
    persist: bool,
    dirty: std::sync::atomic::AtomicBool,
    signed_in: std::sync::atomic::AtomicBool,
    bw_next: Mutex<Option<tokio::time::Instant>>,
    seq: AtomicI64,
}

fn rnd_i64() -> i64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("os random source");
    i64::from_le_bytes(b) & i64::MAX
}

fn now_unix() -> i32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i32)
        .unwrap_or(0)
}

enum Outcome {
    Reply(Vec<u8>),
    Error(i32, String),
    Hang,
    Drop,
}

fn err(code: i32, msg: impl Into<String>) -> Outcome {
    Outcome::Error(code, msg.into())
}

impl Shared {
    pub(crate) fn new(
        dir: &Path,
        opts: LoopbackOptions,
        port: u16,
        faults: Faults,
        counters: Arc<Counters>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir.join("docs"))?;
        std::fs::create_dir_all(dir.join("uploads"))?;
        // With a data dir of its own the server keeps its key, account and chats across
        // restarts (sessions written before stay valid); uploads in progress are lost, as
        // expired parts would be.
        let persist = opts.data_dir.is_some();
        let saved = if persist { persist::load(dir)? } else { None };
        let mut channels: Vec<ChannelInfo> = saved
            .as_ref()
            .map(|s| s.channels.clone())
            .unwrap_or_default();
        for title in &opts.channels {
            if !channels.iter().any(|c| &c.title == title) {
                channels.push(ChannelInfo {
                    id: 1_500_000_000 + channels.len() as i64,
                    access_hash: rnd_i64(),
                    title: title.clone(),
                });
            }
        }
        let (key, self_hash, signed_in, state) = match saved {
            Some(s) => (ServerKey::new(s.key), s.self_hash, s.signed_in, s.state),
            None => (
                ServerKey::random(),
                rnd_i64(),
                !opts.require_login,
                State::default(),
            ),
        };
        Ok(Shared {
            signed_in: std::sync::atomic::AtomicBool::new(signed_in),
            persist,
            dirty: std::sync::atomic::AtomicBool::new(true),
            dir: dir.to_path_buf(),
            opts,
            port,
            key,
            self_id: 777_000_123,
            self_hash,
            channels,
            faults,
            counters,
            state: Mutex::new(state),
            drop_all: watch::channel(0).0,
            rate: Mutex::new(VecDeque::new()),
            bw_next: Mutex::new(None),
            seq: AtomicI64::new(0),
        })
    }

    pub(crate) fn session_json(&self, addr: SocketAddr) -> String {
        let channels: Vec<_> = self
            .channels
            .iter()
            .map(
                |c| serde_json::json!({"id": c.id, "access_hash": c.access_hash, "title": c.title}),
            )
            .collect();
        serde_json::json!({
            "version": 1,
            "home_dc": 2,
            "dcs": [{"id": 2, "addr": addr.to_string(), "auth_key": hex::encode(self.key.data)}],
            "self_user": self.signed_in.load(Ordering::Relaxed).then(
                || serde_json::json!({"id": self.self_id, "access_hash": self.self_hash})
            ),
            "channels": channels,
        })
        .to_string()
    }

    /// Writes the state file if something changed (only with a data dir of our own).
    pub(crate) fn flush(&self) {
        if !self.persist || !self.dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let st = self.state.lock().unwrap();
        let snapshot = persist::Snapshot {
            key: self.key.data,
            self_hash: self.self_hash,
            signed_in: self.signed_in.load(Ordering::Relaxed),
            channels: self.channels.clone(),
            state: &st,
        };
        if let Err(e) = persist::save(&self.dir, &snapshot) {
            tracing::warn!(
                "saving loopback telegram state in {}: {e}",
                self.dir.display()
            );
            self.dirty.store(true, Ordering::Relaxed);
        }
    }

    pub(crate) fn auth_key(&self) -> [u8; 256] {
        self.key.data
    }

    pub(crate) fn self_access_hash(&self) -> i64 {
        self.self_hash
    }

    pub(crate) fn expire_parts(&self) {
        let mut st = self.state.lock().unwrap();
        for (_, u) in st.uploads.drain() {
            let _ = std::fs::remove_file(&u.path);
        }
    }

    pub(crate) fn rotate_file_references(&self) {
        let mut st = self.state.lock().unwrap();
        for d in st.docs.values_mut() {
            d.file_reference = rnd_i64().to_le_bytes().to_vec();
        }
        self.dirty.store(true, Ordering::Relaxed);
    }

    pub(crate) fn delete_named(&self, name: &str) -> bool {
        let mut st = self.state.lock().unwrap();
        let mut hit = None;
        for (k, chat) in &st.chats {
            for (id, m) in &chat.msgs {
                if let Some(d) = m.doc
                    && st.docs.get(&d).is_some_and(|d| d.name == name)
                {
                    hit = Some((*k, *id));
                }
            }
        }
        match hit {
            Some((k, id)) => {
                delete_msgs(&mut st, k, &[id]);
                self.dirty.store(true, Ordering::Relaxed);
                true
            }
            None => false,
        }
    }

    pub(crate) fn list_documents(&self) -> Vec<(String, i32, String, u64)> {
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

    fn next_msg_id(&self) -> i64 {
        // Server message ids: about unix time * 2^32, ≡ 1 mod 4 for responses.
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let secs = i64::from(now_unix());
        (secs << 32) | ((n & 0x3fff_ffff) << 2) | 1
    }

    async fn throttle(&self, bytes: u64) {
        let Some(rate) = self.opts.bandwidth else {
            return;
        };
        let until = {
            let mut next = self.bw_next.lock().unwrap();
            let now = tokio::time::Instant::now();
            let start = next.map_or(now, |n| n.max(now));
            let end = start + Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
            *next = Some(end);
            end
        };
        tokio::time::sleep_until(until).await;
    }

    /// Message-class budget; `Some(seconds)` when exhausted.
    fn rate_check(&self) -> Option<u64> {
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

    fn resolve_peer(&self, peer: &tl::enums::InputPeer) -> Result<ChatKey, Outcome> {
        match peer {
            tl::enums::InputPeer::PeerSelf => Ok(ChatKey::Saved),
            tl::enums::InputPeer::User(u) if u.user_id == self.self_id => Ok(ChatKey::Saved),
            tl::enums::InputPeer::Channel(c) => self.resolve_channel(c.channel_id, c.access_hash),
            _ => Err(err(400, "PEER_ID_INVALID")),
        }
    }

    fn resolve_channel(&self, id: i64, hash: i64) -> Result<ChatKey, Outcome> {
        match self.channels.iter().find(|c| c.id == id) {
            Some(c) if c.access_hash == hash => Ok(ChatKey::Channel(id)),
            _ => Err(err(400, "CHANNEL_INVALID")),
        }
    }

    fn peer_of(&self, k: ChatKey) -> tl::enums::Peer {
        match k {
            ChatKey::Saved => tl::enums::Peer::User(tl::types::PeerUser {
                user_id: self.self_id,
            }),
            ChatKey::Channel(id) => {
                tl::enums::Peer::Channel(tl::types::PeerChannel { channel_id: id })
            }
        }
    }

    fn render_msg(&self, st: &State, k: ChatKey, id: i32, m: &Msg) -> tl::enums::Message {
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
            }),
        )
    }

    fn users(&self) -> Vec<tl::enums::User> {
        vec![tlbuild::self_user(self.self_id, self.self_hash)]
    }

    fn chats_for(&self, k: ChatKey) -> Vec<tl::enums::Chat> {
        match k {
            ChatKey::Saved => vec![],
            ChatKey::Channel(id) => self
                .channels
                .iter()
                .filter(|c| c.id == id)
                .map(|c| tlbuild::channel(c.id, c.access_hash, &c.title))
                .collect(),
        }
    }

    /// A page of a chat's history, newest first, with Telegram's paging arguments.
    #[allow(clippy::too_many_arguments)]
    fn page(
        &self,
        k: ChatKey,
        offset_id: i32,
        add_offset: i32,
        limit: i32,
        max_id: i32,
        min_id: i32,
        filter: impl Fn(&State, &Msg) -> bool,
    ) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        let empty = Chat::default();
        let chat = st.chats.get(&k).unwrap_or(&empty);
        let matching: Vec<(i32, &Msg)> = chat
            .msgs
            .iter()
            .rev()
            .filter(|(_, m)| filter(&st, m))
            .map(|(id, m)| (*id, m))
            .collect();
        let count = matching.len() as i32;
        let limit = if limit <= 0 { 20 } else { limit.min(100) } as usize;
        let page: Vec<_> = matching
            .into_iter()
            .filter(|(id, _)| offset_id <= 0 || *id < offset_id)
            .filter(|(id, _)| max_id <= 0 || *id < max_id)
            .filter(|(id, _)| *id > min_id)
            .skip(add_offset.max(0) as usize)
            .take(limit)
            .map(|(id, m)| self.render_msg(&st, k, id, m))
            .collect();
        let users = self.users();
        let chats = self.chats_for(k);
        match k {
            ChatKey::Channel(_) => tl::enums::messages::Messages::ChannelMessages(
                tl::types::messages::ChannelMessages {
                    inexact: false,
                    pts: chat.pts,
                    count,
                    offset_id_offset: None,
                    messages: page,
                    topics: vec![],
                    chats,
                    users,
                },
            )
            .to_bytes(),
            ChatKey::Saved if (page.len() as i32) < count => {
                tl::enums::messages::Messages::Slice(tl::types::messages::MessagesSlice {
                    inexact: false,
                    count,
                    next_rate: None,
                    offset_id_offset: None,
                    search_flood: None,
                    messages: page,
                    topics: vec![],
                    chats,
                    users,
                })
                .to_bytes()
            }
            ChatKey::Saved => {
                tl::enums::messages::Messages::Messages(tl::types::messages::Messages {
                    messages: page,
                    topics: vec![],
                    chats,
                    users,
                })
                .to_bytes()
            }
        }
    }

    fn get_messages(&self, k: ChatKey, ids: &[tl::enums::InputMessage]) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        let msgs = ids
            .iter()
            .map(|im| {
                let id = match im {
                    tl::enums::InputMessage::Id(i) => i.id,
                    _ => 0,
                };
                match st.chats.get(&k).and_then(|c| c.msgs.get(&id)) {
                    Some(m) => self.render_msg(&st, k, id, m),
                    None => {
                        tl::enums::Message::Empty(tl::types::MessageEmpty { id, peer_id: None })
                    }
                }
            })
            .collect();
        let users = self.users();
        let chats = self.chats_for(k);
        match k {
            ChatKey::Channel(_) => {
                let pts = st.chats.get(&k).map_or(0, |c| c.pts);
                tl::enums::messages::Messages::ChannelMessages(
                    tl::types::messages::ChannelMessages {
                        inexact: false,
                        pts,
                        count: ids.len() as i32,
                        offset_id_offset: None,
                        messages: msgs,
                        topics: vec![],
                        chats,
                        users,
                    },
                )
                .to_bytes()
            }
            ChatKey::Saved => {
                tl::enums::messages::Messages::Messages(tl::types::messages::Messages {
                    messages: msgs,
                    topics: vec![],
                    chats,
                    users,
                })
                .to_bytes()
            }
        }
    }

    /// All dialogs in one answer (the loopback account has a handful): Saved Messages and
    /// each channel, with their top messages.
    fn dialogs(&self) -> Vec<u8> {
        let st = self.state.lock().unwrap();
        let mut keys = vec![ChatKey::Saved];
        keys.extend(self.channels.iter().map(|c| ChatKey::Channel(c.id)));
        let mut dialogs = Vec::new();
        let mut messages = Vec::new();
        for k in keys {
            let top = st
                .chats
                .get(&k)
                .and_then(|c| c.msgs.iter().next_back())
                .map(|(id, m)| (*id, m));
            if let Some((id, m)) = top {
                messages.push(self.render_msg(&st, k, id, m));
            }
            dialogs.push(tl::enums::Dialog::Dialog(tl::types::Dialog {
                pinned: false,
                unread_mark: false,
                view_forum_as_messages: false,
                peer: self.peer_of(k),
                top_message: top.map_or(0, |(id, _)| id),
                read_inbox_max_id: 0,
                read_outbox_max_id: 0,
                unread_count: 0,
                unread_mentions_count: 0,
                unread_reactions_count: 0,
                unread_poll_votes_count: 0,
                notify_settings: tl::enums::PeerNotifySettings::Settings(
                    tl::types::PeerNotifySettings {
                        show_previews: None,
                        silent: None,
                        mute_until: None,
                        ios_sound: None,
                        android_sound: None,
                        other_sound: None,
                        stories_muted: None,
                        stories_hide_sender: None,
                        stories_ios_sound: None,
                        stories_android_sound: None,
                        stories_other_sound: None,
                    },
                ),
                pts: match k {
                    ChatKey::Saved => None,
                    ChatKey::Channel(_) => Some(st.chats.get(&k).map_or(0, |c| c.pts)),
                },
                draft: None,
                folder_id: None,
                ttl_period: None,
            }));
        }
        let chats = self
            .channels
            .iter()
            .map(|c| tlbuild::channel(c.id, c.access_hash, &c.title))
            .collect();
        tl::enums::messages::Dialogs::Dialogs(tl::types::messages::Dialogs {
            dialogs,
            messages,
            chats,
            users: self.users(),
        })
        .to_bytes()
    }

    fn save_part(
        &self,
        big: bool,
        file_id: i64,
        part: i32,
        total: Option<i32>,
        bytes: &[u8],
    ) -> Outcome {
        let max_parts: i32 = if self.opts.premium { 8000 } else { 4000 };
        if part < 0 || part >= max_parts || total.is_some_and(|t| part >= t) {
            return err(400, "FILE_PART_INVALID");
        }
        if let Some(t) = total
            && (t <= 0 || t > max_parts)
        {
            return err(400, "FILE_PARTS_INVALID");
        }
        if bytes.is_empty() {
            return err(400, "FILE_PART_EMPTY");
        }
        if bytes.len() as u64 > PART_STRIDE {
            return err(400, "FILE_PART_TOO_BIG");
        }
        let file = {
            let mut st = self.state.lock().unwrap();
            self.purge_expired(&mut st);
            if let std::collections::hash_map::Entry::Vacant(slot) = st.uploads.entry(file_id) {
                let path = self
                    .dir
                    .join("uploads")
                    .join(format!("{file_id}-{}", rnd_i64()));
                let f = match std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .read(true)
                    .write(true)
                    .open(&path)
                {
                    Ok(f) => f,
                    Err(_) => return err(500, "INTERNAL_STORAGE_ERROR"),
                };
                slot.insert(Upload {
                    big,
                    declared_total: total,
                    parts: BTreeMap::new(),
                    file: Arc::new(f),
                    path,
                    touched: Instant::now(),
                });
            }
            let up = st.uploads.get_mut(&file_id).unwrap();
            if up.big != big || up.declared_total != total {
                return err(400, "FILE_PARTS_INVALID");
            }
            up.touched = Instant::now();
            up.parts.insert(part, bytes.len() as u64);
            up.file.clone()
        };
        if file.write_all_at(bytes, part as u64 * PART_STRIDE).is_err() {
            return err(500, "INTERNAL_STORAGE_ERROR");
        }
        Outcome::Reply(true.to_bytes())
    }

    fn purge_expired(&self, st: &mut State) {
        let ttl = self.opts.part_ttl;
        let dead: Vec<i64> = st
            .uploads
            .iter()
            .filter(|(_, u)| u.touched.elapsed() > ttl)
            .map(|(k, _)| *k)
            .collect();
        for k in dead {
            if let Some(u) = st.uploads.remove(&k) {
                let _ = std::fs::remove_file(&u.path);
            }
        }
    }

    fn send_media(&self, req: tl::functions::messages::SendMedia) -> Outcome {
        let k = match self.resolve_peer(&req.peer) {
            Ok(k) => k,
            Err(o) => return o,
        };
        let tl::enums::InputMedia::UploadedDocument(media) = req.media else {
            return err(400, "MEDIA_INVALID");
        };
        let (file_id, parts, big, input_name) = match media.file {
            tl::enums::InputFile::File(f) => (f.id, f.parts, false, f.name),
            tl::enums::InputFile::Big(f) => (f.id, f.parts, true, f.name),
            _ => return err(400, "MEDIA_INVALID"),
        };
        let name = media
            .attributes
            .iter()
            .find_map(|a| match a {
                tl::enums::DocumentAttribute::Filename(f) => Some(f.file_name.clone()),
                _ => None,
            })
            .unwrap_or(input_name);
        let mut st = self.state.lock().unwrap();
        if st.random_ids.contains_key(&(k, req.random_id)) {
            return err(500, "RANDOM_ID_DUPLICATE");
        }
        self.purge_expired(&mut st);
        let Some(up) = st.uploads.get(&file_id) else {
            return err(400, "FILE_PART_0_MISSING");
        };
        if up.big != big || parts <= 0 || up.declared_total.is_some_and(|t| t != parts) {
            return err(400, "FILE_PARTS_INVALID");
        }
        if let Some(missing) = (0..parts).find(|p| !up.parts.contains_key(p)) {
            return err(400, format!("FILE_PART_{missing}_MISSING"));
        }
        if up.parts.keys().any(|p| *p >= parts) {
            return err(400, "FILE_PARTS_INVALID");
        }
        let part_size = up.parts[&0];
        let last = up.parts[&(parts - 1)];
        let uniform = (0..parts - 1).all(|p| up.parts[&p] == part_size);
        if parts > 1
            && (!uniform
                || !part_size.is_multiple_of(1024)
                || !PART_STRIDE.is_multiple_of(part_size)
                || last > part_size)
        {
            return err(400, "FILE_PART_SIZE_INVALID");
        }
        let size = part_size * (parts as u64 - 1) + last;
        if !big && size > SMALL_FILE_MAX {
            return err(400, "FILE_PARTS_INVALID");
        }
        let up = st.uploads.remove(&file_id).unwrap();
        let doc_id = rnd_i64();
        let path = self.dir.join("docs").join(doc_id.to_string());
        let stored = if part_size == PART_STRIDE || parts == 1 {
            up.file
                .set_len(size)
                .and_then(|_| std::fs::rename(&up.path, &path))
        } else {
            compact(&up, parts, part_size, &path)
        };
        if stored.is_err() {
            return err(500, "INTERNAL_STORAGE_ERROR");
        }
        let date = now_unix();
        st.docs.insert(
            doc_id,
            Doc {
                access_hash: rnd_i64(),
                file_reference: rnd_i64().to_le_bytes().to_vec(),
                size,
                name,
                mime: media.mime_type,
                date,
                path,
            },
        );
        let id = match k {
            ChatKey::Saved => {
                st.user_msg_id += 1;
                st.user_msg_id
            }
            ChatKey::Channel(_) => {
                let c = st.chats.entry(k).or_default();
                c.next_id += 1;
                c.next_id
            }
        };
        st.pts += 1;
        let pts = st.pts;
        let chat = st.chats.entry(k).or_default();
        chat.pts += 1;
        let chat_pts = chat.pts;
        chat.msgs.insert(
            id,
            Msg {
                date,
                text: req.message,
                doc: Some(doc_id),
            },
        );
        st.random_ids.insert((k, req.random_id), id);
        self.dirty.store(true, Ordering::Relaxed);
        let msg = self.render_msg(&st, k, id, &st.chats[&k].msgs[&id]);
        let new = match k {
            ChatKey::Saved => tl::enums::Update::NewMessage(tl::types::UpdateNewMessage {
                message: msg,
                pts,
                pts_count: 1,
            }),
            ChatKey::Channel(_) => {
                tl::enums::Update::NewChannelMessage(tl::types::UpdateNewChannelMessage {
                    message: msg,
                    pts: chat_pts,
                    pts_count: 1,
                })
            }
        };
        Outcome::Reply(
            tl::enums::Updates::Updates(tl::types::Updates {
                updates: vec![
                    tl::enums::Update::MessageId(tl::types::UpdateMessageId {
                        id,
                        random_id: req.random_id,
                    }),
                    new,
                ],
                users: self.users(),
                chats: self.chats_for(k),
                date,
                seq: 0,
            })
            .to_bytes(),
        )
    }

    fn delete(&self, k: ChatKey, ids: &[i32]) -> Outcome {
        let mut st = self.state.lock().unwrap();
        let n = delete_msgs(&mut st, k, ids);
        self.dirty.store(true, Ordering::Relaxed);
        let pts = match k {
            ChatKey::Saved => {
                st.pts += n;
                st.pts
            }
            ChatKey::Channel(_) => {
                let c = st.chats.entry(k).or_default();
                c.pts += n;
                c.pts
            }
        };
        Outcome::Reply(
            tl::enums::messages::AffectedMessages::Messages(
                tl::types::messages::AffectedMessages { pts, pts_count: n },
            )
            .to_bytes(),
        )
    }

    async fn get_file(&self, req: tl::functions::upload::GetFile, corrupt: bool) -> Outcome {
        let tl::enums::InputFileLocation::InputDocumentFileLocation(loc) = req.location else {
            return err(400, "LOCATION_INVALID");
        };
        let (offset, limit) = (req.offset, req.limit as i64);
        let aligned = if req.precise {
            offset % 1024 == 0 && limit % 1024 == 0 && limit <= MIB as i64
        } else {
            offset % 4096 == 0
                && limit % 4096 == 0
                && limit > 0
                && (MIB as i64) % limit == 0
                && offset / MIB as i64 == (offset + limit - 1) / MIB as i64
        };
        if offset < 0 || (!req.precise && offset % 4096 != 0) {
            return err(400, "OFFSET_INVALID");
        }
        if limit <= 0 || !aligned {
            return err(400, "LIMIT_INVALID");
        }
        let (path, size) = {
            let st = self.state.lock().unwrap();
            match st.docs.get(&loc.id) {
                // A document whose message is gone has no valid reference left.
                None => return err(400, "FILE_REFERENCE_EXPIRED"),
                Some(d) if d.access_hash != loc.access_hash => {
                    return err(400, "FILE_ID_INVALID");
                }
                Some(d) if d.file_reference != loc.file_reference => {
                    return err(400, "FILE_REFERENCE_EXPIRED");
                }
                Some(d) => (d.path.clone(), d.size),
            }
        };
        let offset = offset as u64;
        let n = size.saturating_sub(offset).min(limit as u64) as usize;
        let mut bytes = vec![0u8; n];
        if n > 0 {
            let read = std::fs::File::open(&path).and_then(|f| f.read_exact_at(&mut bytes, offset));
            if read.is_err() {
                return err(500, "INTERNAL_STORAGE_ERROR");
            }
        }
        self.throttle(n as u64).await;
        if corrupt && !bytes.is_empty() {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
        }
        Outcome::Reply(upload_file_bytes(&bytes))
    }
}

/// upload.file#96a18d5 type:storage.filePartial mtime:0 bytes:bytes, serialized by hand: the
/// generated serializer pushes every byte through `Extend`, too slow for a benchmark server.
fn upload_file_bytes(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 24);
    out.extend_from_slice(&tl::types::upload::File::CONSTRUCTOR_ID.to_le_bytes());
    out.extend_from_slice(&tl::types::storage::FilePartial::CONSTRUCTOR_ID.to_le_bytes());
    out.extend_from_slice(&0i32.to_le_bytes());
    let len = data.len();
    let header = if len < 254 {
        out.push(len as u8);
        1
    } else {
        out.push(0xfe);
        out.extend_from_slice(&(len as u32).to_le_bytes()[..3]);
        4
    };
    out.extend_from_slice(data);
    let pad = (4 - (header + len) % 4) % 4;
    out.extend_from_slice(&[0u8; 3][..pad]);
    out
}

fn compact(up: &Upload, parts: i32, part_size: u64, dest: &Path) -> std::io::Result<()> {
    let out = std::fs::File::create(dest)?;
    let mut buf = vec![0u8; part_size as usize];
    for p in 0..parts {
        let len = up.parts[&p] as usize;
        up.file
            .read_exact_at(&mut buf[..len], p as u64 * PART_STRIDE)?;
        out.write_all_at(&buf[..len], p as u64 * part_size)?;
    }
    let _ = std::fs::remove_file(&up.path);
    Ok(())
}

fn delete_msgs(st: &mut State, k: ChatKey, ids: &[i32]) -> i32 {
    let mut n = 0;
    let mut docs = Vec::new();
    if let Some(chat) = st.chats.get_mut(&k) {
        for id in ids {
            if let Some(m) = chat.msgs.remove(id) {
                n += 1;
                docs.extend(m.doc);
            }
        }
    }
    for d in docs {
        if let Some(doc) = st.docs.remove(&d) {
            let _ = std::fs::remove_file(&doc.path);
        }
    }
    n
}

pub(crate) async fn accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) {
    let mut flush = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = stop.changed() => {
                shared.flush();
                break;
            }
            _ = flush.tick() => shared.flush(),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                shared.counters.bump("connections");
                tokio::spawn(connection(stream, shared.clone()));
            }
        }
    }
}

/// Messages queued for the writer: the body of one server message and whether it is
/// content-related (odd seq_no).
type OutMsg = (Vec<u8>, bool);

async fn connection(stream: TcpStream, shared: Arc<Shared>) {
    let (mut rd, mut wr) = stream.into_split();
    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<OutMsg>();
    let (kill_tx, mut kill_rx) = watch::channel(false);
    let mut drop_all = shared.drop_all.subscribe();
    let session = Arc::new(AtomicI64::new(0));

    let writer = {
        let shared = shared.clone();
        let session = session.clone();
        tokio::spawn(async move {
            let mut seq_out = 0i32;
            let mut content = 0i32;
            while let Some((body, content_related)) = out_rx.recv().await {
                let seq_no = if content_related {
                    content += 1;
                    content * 2 - 1
                } else {
                    content * 2
                };
                let mut plain = Vec::with_capacity(body.len() + 32);
                plain.extend_from_slice(&0i64.to_le_bytes()); // salt (always 0)
                plain.extend_from_slice(&session.load(Ordering::Relaxed).to_le_bytes());
                plain.extend_from_slice(&shared.next_msg_id().to_le_bytes());
                plain.extend_from_slice(&seq_no.to_le_bytes());
                plain.extend_from_slice(&(body.len() as i32).to_le_bytes());
                plain.extend_from_slice(&body);
                let packet = wire::encrypt_for_client(&shared.key, plain);
                if wire::write_frame(&mut wr, &mut seq_out, &packet)
                    .await
                    .is_err()
                {
                    break;
                }
            }
        })
    };

    let mut seq_in = 0i32;
    loop {
        let frame = tokio::select! {
            f = wire::read_frame(&mut rd, &mut seq_in) => f,
            _ = kill_rx.changed() => break,
            _ = drop_all.changed() => break,
        };
        let Ok(mut frame) = frame else { break };
        let Ok(plain) = wire::decrypt_from_client(&shared.key, &mut frame) else {
            break;
        };
        let Ok((sid, top)) = wire::parse_plaintext(plain) else {
            break;
        };
        // The client panics on a foreign session id: echo whatever it uses.
        session.store(sid, Ordering::Relaxed);
        let mut msgs = Vec::new();
        if wire::flatten(top, &mut msgs).is_err() {
            break;
        }
        for m in msgs {
            handle_message(&shared, m, &out_tx, &kill_tx);
        }
    }
    drop(out_tx);
    writer.abort();
}

const MSGS_ACK: u32 = 0x62d6b459;
const PING: u32 = 0x7abe77ec;
const PING_DELAY_DISCONNECT: u32 = 0xf3427b8c;
const GET_FUTURE_SALTS: u32 = 0xb921bd04;
const DESTROY_SESSION: u32 = 0xe7512126;
const INVOKE_WITH_LAYER: u32 = 0xda9b0d0d;
const INIT_CONNECTION: u32 = 0xc1cd5ea9;
const INVOKE_WITHOUT_UPDATES: u32 = 0xbf9459b7;

fn handle_message(
    shared: &Arc<Shared>,
    m: wire::ClientMessage,
    out: &mpsc::UnboundedSender<OutMsg>,
    kill: &watch::Sender<bool>,
) {
    match wire::constructor(&m.body) {
        Some(MSGS_ACK) | Some(DESTROY_SESSION) | None => {}
        Some(PING) | Some(PING_DELAY_DISCONNECT) => {
            shared.counters.bump("ping");
            let ping_id = m
                .body
                .get(4..12)
                .map_or(0, |b| i64::from_le_bytes(b.try_into().unwrap()));
            let pong = tl::enums::Pong::Pong(tl::types::Pong {
                msg_id: m.msg_id,
                ping_id,
            });
            let _ = out.send((pong.to_bytes(), false));
        }
        Some(GET_FUTURE_SALTS) => {
            // Two zero salts keep grammers from asking again and from switching salts.
            let now = now_unix();
            let salt = |s| tl::types::FutureSalt {
                valid_since: s,
                valid_until: s + 3600,
                salt: 0,
            };
            let body = tl::enums::FutureSalts::Salts(tl::types::FutureSalts {
                req_msg_id: m.msg_id,
                now,
                salts: tl::RawVec(vec![salt(now), salt(now + 3600)]),
            })
            .to_bytes();
            let _ = out.send((body, false));
        }
        Some(_) => {
            let shared = shared.clone();
            let out = out.clone();
            let kill = kill.clone();
            tokio::spawn(async move {
                let outcome = dispatch(&shared, &m.body, m.gzipped).await;
                let result = match outcome {
                    Outcome::Reply(b) => b,
                    Outcome::Error(code, message) => {
                        tl::enums::RpcError::Error(tl::types::RpcError {
                            error_code: code,
                            error_message: message,
                        })
                        .to_bytes()
                    }
                    Outcome::Hang => return,
                    Outcome::Drop => {
                        let _ = kill.send(true);
                        return;
                    }
                };
                let mut body = Vec::with_capacity(result.len() + 12);
                body.extend_from_slice(&wire::RPC_RESULT.to_le_bytes());
                body.extend_from_slice(&m.msg_id.to_le_bytes());
                body.extend_from_slice(&result);
                let _ = out.send((body, true));
            });
        }
    }
}

/// Strips invokeWithLayer / initConnection / invokeWithoutUpdates wrappers.
fn unwrap_query(body: &[u8]) -> Result<&[u8], String> {
    match wire::constructor(body) {
        Some(INVOKE_WITH_LAYER) if body.len() >= 8 => unwrap_query(&body[8..]),
        Some(INVOKE_WITHOUT_UPDATES) => unwrap_query(&body[4..]),
        Some(INIT_CONNECTION) => {
            let mut c = Cursor::from_slice(&body[4..]);
            let flags = u32::deserialize(&mut c).map_err(|e| e.to_string())?;
            if flags & 3 != 0 {
                return Err("initConnection with proxy/params is not supported".into());
            }
            i32::deserialize(&mut c).map_err(|e| e.to_string())?;
            for _ in 0..6 {
                String::deserialize(&mut c).map_err(|e| e.to_string())?;
            }
            let at = 4 + c.pos();
            unwrap_query(&body[at..])
        }
        _ => Ok(body),
    }
}

fn decode<T: Deserializable>(q: &[u8]) -> Result<T, Outcome> {
    T::from_bytes(&q[4..]).map_err(|_| err(400, "INPUT_REQUEST_INVALID"))
}

macro_rules! decode_or_return {
    ($t:ty, $q:expr) => {
        match decode::<$t>($q) {
            Ok(v) => v,
            Err(o) => return o,
        }
    };
}

async fn dispatch(shared: &Arc<Shared>, body: &[u8], gzipped: bool) -> Outcome {
    let q = match unwrap_query(body) {
        Ok(q) if q.len() >= 4 => q,
        _ => return err(400, "INPUT_REQUEST_INVALID"),
    };
    let id = wire::constructor(q).unwrap();
    let method = tl::name_for_id(id);
    let n = shared.counters.bump(method);
    if gzipped {
        shared.counters.bump(&format!("gzip:{method}"));
    }
    let mut corrupt = false;
    match shared.faults.pick(method, n) {
        None => {}
        Some(Fault::RpcError { code, message }) => return Outcome::Error(code, message),
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        Some(Fault::Hang) => return Outcome::Hang,
        Some(Fault::DropConnection) => return Outcome::Drop,
        Some(Fault::CorruptDownload) => corrupt = true,
    }
    if MESSAGE_CLASS.contains(&method)
        && let Some(secs) = shared.rate_check()
    {
        return err(420, format!("FLOOD_WAIT_{secs}"));
    }
    use tl::functions as f;
    let auth_call = id == f::help::GetConfig::CONSTRUCTOR_ID
        || id == f::auth::SendCode::CONSTRUCTOR_ID
        || id == f::auth::SignIn::CONSTRUCTOR_ID;
    if !auth_call && !shared.signed_in.load(Ordering::Relaxed) {
        return err(401, "AUTH_KEY_UNREGISTERED");
    }
    match id {
        f::auth::SendCode::CONSTRUCTOR_ID => Outcome::Reply(
            tl::enums::auth::SentCode::Code(tl::types::auth::SentCode {
                r#type: tl::enums::auth::SentCodeType::App(tl::types::auth::SentCodeTypeApp {
                    length: super::LOGIN_CODE.len() as i32,
                }),
                phone_code_hash: "loopback".into(),
                next_type: None,
                timeout: None,
            })
            .to_bytes(),
        ),
        f::auth::SignIn::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::auth::SignIn, q);
            if r.phone_code.as_deref() != Some(super::LOGIN_CODE) {
                return err(400, "PHONE_CODE_INVALID");
            }
            shared.signed_in.store(true, Ordering::Relaxed);
            shared.dirty.store(true, Ordering::Relaxed);
            Outcome::Reply(
                tl::enums::auth::Authorization::Authorization(tl::types::auth::Authorization {
                    setup_password_required: false,
                    otherwise_relogin_days: None,
                    tmp_sessions: None,
                    future_auth_token: None,
                    user: tlbuild::self_user(shared.self_id, shared.self_hash),
                })
                .to_bytes(),
            )
        }
        f::help::GetConfig::CONSTRUCTOR_ID => {
            Outcome::Reply(tlbuild::config(shared.port, now_unix()).to_bytes())
        }
        f::updates::GetState::CONSTRUCTOR_ID => {
            let st = shared.state.lock().unwrap();
            Outcome::Reply(
                tl::enums::updates::State::State(tl::types::updates::State {
                    pts: st.pts,
                    qts: 0,
                    date: now_unix(),
                    seq: 0,
                    unread_count: 0,
                })
                .to_bytes(),
            )
        }
        f::users::GetUsers::CONSTRUCTOR_ID => {
            let req = decode_or_return!(f::users::GetUsers, q);
            let users: Vec<tl::enums::User> = req
                .id
                .iter()
                .filter(|u| match u {
                    tl::enums::InputUser::UserSelf => true,
                    tl::enums::InputUser::User(u) => u.user_id == shared.self_id,
                    _ => false,
                })
                .flat_map(|_| shared.users())
                .collect();
            Outcome::Reply(users.to_bytes())
        }
        f::upload::SaveFilePart::CONSTRUCTOR_ID => {
            let req = decode_or_return!(f::upload::SaveFilePart, q);
            shared.throttle(req.bytes.len() as u64).await;
            shared.save_part(false, req.file_id, req.file_part, None, &req.bytes)
        }
        f::upload::SaveBigFilePart::CONSTRUCTOR_ID => {
            let req = decode_or_return!(f::upload::SaveBigFilePart, q);
            shared.throttle(req.bytes.len() as u64).await;
            shared.save_part(
                true,
                req.file_id,
                req.file_part,
                Some(req.file_total_parts),
                &req.bytes,
            )
        }
        f::messages::SendMedia::CONSTRUCTOR_ID => {
            let req = decode_or_return!(f::messages::SendMedia, q);
            shared.send_media(req)
        }
        f::messages::GetHistory::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::messages::GetHistory, q);
            match shared.resolve_peer(&r.peer) {
                Ok(k) => Outcome::Reply(shared.page(
                    k,
                    r.offset_id,
                    r.add_offset,
                    r.limit,
                    r.max_id,
                    r.min_id,
                    |_, _| true,
                )),
                Err(o) => o,
            }
        }
        f::messages::Search::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::messages::Search, q);
            let needle = r.q.to_lowercase();
            let docs_only = matches!(
                r.filter,
                tl::enums::MessagesFilter::InputMessagesFilterDocument
            );
            match shared.resolve_peer(&r.peer) {
                Ok(k) => Outcome::Reply(shared.page(
                    k,
                    r.offset_id,
                    r.add_offset,
                    r.limit,
                    r.max_id,
                    r.min_id,
                    move |st, m| {
                        let name = m
                            .doc
                            .and_then(|d| st.docs.get(&d))
                            .map(|d| d.name.to_lowercase());
                        if docs_only && name.is_none() {
                            return false;
                        }
                        needle.is_empty()
                            || m.text.to_lowercase().contains(&needle)
                            || name.is_some_and(|n| n.contains(&needle))
                    },
                )),
                Err(o) => o,
            }
        }
        f::messages::GetMessages::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::messages::GetMessages, q);
            Outcome::Reply(shared.get_messages(ChatKey::Saved, &r.id))
        }
        f::channels::GetMessages::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::channels::GetMessages, q);
            match input_channel(shared, &r.channel) {
                Ok(k) => Outcome::Reply(shared.get_messages(k, &r.id)),
                Err(o) => o,
            }
        }
        f::messages::DeleteMessages::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::messages::DeleteMessages, q);
            shared.delete(ChatKey::Saved, &r.id)
        }
        f::channels::DeleteMessages::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::channels::DeleteMessages, q);
            match input_channel(shared, &r.channel) {
                Ok(k) => shared.delete(k, &r.id),
                Err(o) => o,
            }
        }
        f::messages::GetDialogs::CONSTRUCTOR_ID => Outcome::Reply(shared.dialogs()),
        f::upload::GetFile::CONSTRUCTOR_ID => {
            let r = decode_or_return!(f::upload::GetFile, q);
            shared.get_file(r, corrupt).await
        }
        _ => err(400, format!("METHOD_NOT_IMPLEMENTED_{method}")),
    }
}

fn input_channel(shared: &Shared, c: &tl::enums::InputChannel) -> Result<ChatKey, Outcome> {
    match c {
        tl::enums::InputChannel::Channel(c) => shared.resolve_channel(c.channel_id, c.access_hash),
        _ => Err(err(400, "CHANNEL_INVALID")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hand_serialized_upload_file_matches_generated() {
        for len in [0usize, 1, 253, 254, 4096, 524_288] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            let generated = tl::enums::upload::File::File(tl::types::upload::File {
                r#type: tl::enums::storage::FileType::FilePartial,
                mtime: 0,
                bytes: data.clone(),
            })
            .to_bytes();
            assert_eq!(upload_file_bytes(&data), generated, "len {len}");
        }
    }
}

/// The state file (`state.json` in the data dir).
mod persist {
    use super::*;
    use serde::{Deserialize, Serialize};

    pub struct Snapshot<'a> {
        pub key: [u8; 256],
        pub self_hash: i64,
        pub signed_in: bool,
        pub channels: Vec<ChannelInfo>,
        pub state: &'a State,
    }

    pub struct Loaded {
        pub key: [u8; 256],
        pub self_hash: i64,
        pub signed_in: bool,
        pub channels: Vec<ChannelInfo>,
        pub state: State,
    }

    #[derive(Serialize, Deserialize)]
    struct File {
        key: String,
        self_hash: i64,
        signed_in: bool,
        channels: Vec<(i64, i64, String)>,
        docs: Vec<FileDoc>,
        chats: Vec<FileChat>,
        random_ids: Vec<(String, i64, i32)>,
        user_msg_id: i32,
        pts: i32,
    }

    #[derive(Serialize, Deserialize)]
    struct FileDoc {
        id: i64,
        access_hash: i64,
        file_reference: String,
        size: u64,
        name: String,
        mime: String,
        date: i32,
    }

    #[derive(Serialize, Deserialize)]
    struct FileChat {
        chat: String,
        pts: i32,
        next_id: i32,
        msgs: Vec<(i32, i32, String, Option<i64>)>,
    }

    fn chat_name(k: ChatKey) -> String {
        match k {
            ChatKey::Saved => "saved".into(),
            ChatKey::Channel(id) => format!("c{id}"),
        }
    }

    fn chat_key(s: &str) -> Option<ChatKey> {
        if s == "saved" {
            Some(ChatKey::Saved)
        } else {
            s.strip_prefix('c')?.parse().ok().map(ChatKey::Channel)
        }
    }

    pub fn save(dir: &Path, s: &Snapshot<'_>) -> std::io::Result<()> {
        let f = File {
            key: hex::encode(s.key),
            self_hash: s.self_hash,
            signed_in: s.signed_in,
            channels: s
                .channels
                .iter()
                .map(|c| (c.id, c.access_hash, c.title.clone()))
                .collect(),
            docs: s
                .state
                .docs
                .iter()
                .map(|(id, d)| FileDoc {
                    id: *id,
                    access_hash: d.access_hash,
                    file_reference: hex::encode(&d.file_reference),
                    size: d.size,
                    name: d.name.clone(),
                    mime: d.mime.clone(),
                    date: d.date,
                })
                .collect(),
            chats: s
                .state
                .chats
                .iter()
                .map(|(k, c)| FileChat {
                    chat: chat_name(*k),
                    pts: c.pts,
                    next_id: c.next_id,
                    msgs: c
                        .msgs
                        .iter()
                        .map(|(id, m)| (*id, m.date, m.text.clone(), m.doc))
                        .collect(),
                })
                .collect(),
            random_ids: s
                .state
                .random_ids
                .iter()
                .map(|((k, r), id)| (chat_name(*k), *r, *id))
                .collect(),
            user_msg_id: s.state.user_msg_id,
            pts: s.state.pts,
        };
        let tmp = dir.join("state.json.tmp");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            // It holds the authorization key.
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            out.write_all(&serde_json::to_vec(&f).map_err(std::io::Error::other)?)?;
        }
        std::fs::rename(tmp, dir.join("state.json"))
    }

    pub fn load(dir: &Path) -> std::io::Result<Option<Loaded>> {
        let bytes = match std::fs::read(dir.join("state.json")) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let bad = |what: &str| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {what}", dir.join("state.json").display()),
            )
        };
        let f: File = serde_json::from_slice(&bytes).map_err(|e| bad(&e.to_string()))?;
        let key: [u8; 256] = hex::decode(&f.key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| bad("bad key"))?;
        let mut state = State {
            user_msg_id: f.user_msg_id,
            pts: f.pts,
            ..State::default()
        };
        for d in f.docs {
            state.docs.insert(
                d.id,
                Doc {
                    access_hash: d.access_hash,
                    file_reference: hex::decode(&d.file_reference)
                        .map_err(|e| bad(&e.to_string()))?,
                    size: d.size,
                    name: d.name,
                    mime: d.mime,
                    date: d.date,
                    path: dir.join("docs").join(d.id.to_string()),
                },
            );
        }
        for c in f.chats {
            let k = chat_key(&c.chat).ok_or_else(|| bad("bad chat"))?;
            let chat = state.chats.entry(k).or_default();
            chat.pts = c.pts;
            chat.next_id = c.next_id;
            for (id, date, text, doc) in c.msgs {
                chat.msgs.insert(id, Msg { date, text, doc });
            }
        }
        for (k, r, id) in f.random_ids {
            let k = chat_key(&k).ok_or_else(|| bad("bad chat"))?;
            state.random_ids.insert((k, r), id);
        }
        Ok(Some(Loaded {
            key,
            self_hash: f.self_hash,
            signed_in: f.signed_in,
            channels: f
                .channels
                .into_iter()
                .map(|(id, access_hash, title)| ChannelInfo {
                    id,
                    access_hash,
                    title,
                })
                .collect(),
            state,
        }))
    }
}
