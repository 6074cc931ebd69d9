//! The state file (`state.json` in the data dir): keys, the account, channels, chats,
//! documents and update logs, so a restarted loopback Telegram keeps sessions and data valid.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use super::server::KeyAuth;
use super::state::{ChatKey, Doc, Event, LogEntry, Msg, State};
use super::{ChannelInfo, ChannelRole};

pub(crate) struct Snapshot<'a> {
    pub dc_keys: Vec<(i32, [u8; 256])>,
    pub keys: HashMap<i32, KeyAuth>,
    pub home: i32,
    pub self_hash: i64,
    pub channels: Vec<ChannelInfo>,
    pub state: &'a State,
}

pub(crate) struct Loaded {
    pub dc_keys: HashMap<i32, [u8; 256]>,
    pub keys: HashMap<i32, KeyAuth>,
    pub home: i32,
    pub self_hash: i64,
    pub channels: Vec<ChannelInfo>,
    pub state: State,
}

#[derive(Serialize, Deserialize)]
struct File {
    #[serde(default)]
    dcs: Vec<FileDc>,
    #[serde(default)]
    home: Option<i32>,
    /// Format 1 had one key and one flag.
    #[serde(default, skip_serializing)]
    key: Option<String>,
    #[serde(default, skip_serializing)]
    signed_in: Option<bool>,
    self_hash: i64,
    channels: Vec<FileChannel>,
    docs: Vec<FileDoc>,
    chats: Vec<FileChat>,
    random_ids: Vec<(String, i64, i32)>,
    user_msg_id: i32,
    pts: i32,
    #[serde(default)]
    log: Vec<FileLog>,
}

#[derive(Serialize, Deserialize)]
struct FileDc {
    id: i32,
    key: String,
    auth: KeyAuth,
}

fn creator() -> ChannelRole {
    ChannelRole::Creator
}

#[derive(Serialize, Deserialize)]
struct FileChannel {
    id: i64,
    access_hash: i64,
    title: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default = "creator")]
    role: ChannelRole,
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
    #[serde(default)]
    dc: Option<i32>,
    #[serde(default)]
    cdn: bool,
}

#[derive(Serialize, Deserialize)]
struct FileChat {
    chat: String,
    pts: i32,
    next_id: i32,
    msgs: Vec<(i32, i32, String, Option<i64>)>,
    #[serde(default)]
    log: Vec<FileLog>,
}

/// (pts, count, deleted ids or empty, new message id or 0).
#[derive(Serialize, Deserialize)]
struct FileLog(i32, i32, Vec<i32>, i32);

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

fn log_out(log: &[LogEntry]) -> Vec<FileLog> {
    log.iter()
        .map(|e| match &e.event {
            Event::New(id) => FileLog(e.pts, e.count, vec![], *id),
            Event::Deleted(ids) => FileLog(e.pts, e.count, ids.clone(), 0),
        })
        .collect()
}

fn log_in(log: Vec<FileLog>) -> Vec<LogEntry> {
    log.into_iter()
        .map(|FileLog(pts, count, deleted, new)| LogEntry {
            pts,
            count,
            event: if new != 0 {
                Event::New(new)
            } else {
                Event::Deleted(deleted)
            },
        })
        .collect()
}

pub(crate) fn save(dir: &Path, s: &Snapshot<'_>) -> std::io::Result<()> {
    let st = s.state;
    let f = File {
        dcs: s
            .dc_keys
            .iter()
            .map(|(id, key)| FileDc {
                id: *id,
                key: hex::encode(key),
                auth: s.keys.get(id).copied().unwrap_or(KeyAuth::Unauthorized),
            })
            .collect(),
        home: Some(s.home),
        key: None,
        signed_in: None,
        self_hash: s.self_hash,
        channels: s
            .channels
            .iter()
            .map(|c| FileChannel {
                id: c.id,
                access_hash: c.access_hash,
                title: c.title.clone(),
                username: c.username.clone(),
                role: c.role,
            })
            .collect(),
        docs: st
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
                dc: Some(d.dc),
                cdn: d.cdn,
            })
            .collect(),
        chats: st
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
                log: log_out(&c.log),
            })
            .collect(),
        random_ids: st
            .random_ids
            .iter()
            .map(|((k, r), id)| (chat_name(*k), *r, *id))
            .collect(),
        user_msg_id: st.user_msg_id,
        pts: st.pts,
        log: log_out(&st.log),
    };
    // It holds the authorization keys: a private file under a fresh name, then renamed.
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(&serde_json::to_vec(&f).map_err(std::io::Error::other)?)?;
    tmp.persist(dir.join("state.json")).map_err(|e| e.error)?;
    Ok(())
}

pub(crate) fn load(dir: &Path) -> std::io::Result<Option<Loaded>> {
    let path = dir.join("state.json");
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let bad = |what: &str| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: {what}", path.display()),
        )
    };
    let key_of = |hex_key: &str| -> std::io::Result<[u8; 256]> {
        hex::decode(hex_key)
            .ok()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| bad("bad key"))
    };
    let f: File = serde_json::from_slice(&bytes).map_err(|e| bad(&e.to_string()))?;
    let mut dc_keys = HashMap::new();
    let mut keys = HashMap::new();
    for d in &f.dcs {
        dc_keys.insert(d.id, key_of(&d.key)?);
        keys.insert(d.id, d.auth);
    }
    if let Some(k) = &f.key
        && dc_keys.is_empty()
    {
        dc_keys.insert(2, key_of(k)?);
        let auth = if f.signed_in == Some(true) {
            KeyAuth::Authorized
        } else {
            KeyAuth::Unauthorized
        };
        keys.insert(2, auth);
    }
    let home = f.home.unwrap_or(2);
    let mut state = State {
        user_msg_id: f.user_msg_id,
        pts: f.pts,
        log: log_in(f.log),
        ..State::default()
    };
    for d in f.docs {
        state.docs.insert(
            d.id,
            Doc {
                access_hash: d.access_hash,
                file_reference: hex::decode(&d.file_reference).map_err(|e| bad(&e.to_string()))?,
                size: d.size,
                name: d.name,
                mime: d.mime,
                date: d.date,
                path: dir.join("docs").join(d.id.to_string()),
                dc: d.dc.unwrap_or(home),
                cdn: d.cdn,
            },
        );
    }
    let now = Instant::now();
    for c in f.chats {
        let k = chat_key(&c.chat).ok_or_else(|| bad("bad chat"))?;
        let chat = state.chats.entry(k).or_default();
        chat.pts = c.pts;
        chat.next_id = c.next_id;
        chat.log = log_in(c.log);
        for (id, date, text, doc) in c.msgs {
            chat.msgs.insert(
                id,
                Msg {
                    date,
                    text,
                    doc,
                    indexed_at: now,
                },
            );
        }
    }
    for (k, r, id) in f.random_ids {
        let k = chat_key(&k).ok_or_else(|| bad("bad chat"))?;
        state.random_ids.insert((k, r), id);
    }
    Ok(Some(Loaded {
        dc_keys,
        keys,
        home,
        self_hash: f.self_hash,
        channels: f
            .channels
            .into_iter()
            .map(|c| ChannelInfo {
                id: c.id,
                access_hash: c.access_hash,
                title: c.title,
                username: c.username,
                role: c.role,
            })
            .collect(),
        state,
    }))
}
