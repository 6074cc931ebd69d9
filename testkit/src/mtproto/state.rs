//! The account's cloud: chats, messages, documents, uploads in progress and the update logs
//! that pts numbers index.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum ChatKey {
    Saved,
    Channel(i64),
}

pub(crate) struct Doc {
    pub access_hash: i64,
    pub file_reference: Vec<u8>,
    pub size: u64,
    pub name: String,
    pub mime: String,
    pub date: i32,
    pub path: PathBuf,
    /// The data centre the document lives on.
    pub dc: i32,
    /// Served through a CDN to clients that support it.
    pub cdn: bool,
}

pub(crate) struct Msg {
    pub date: i32,
    pub text: String,
    pub doc: Option<i64>,
    /// When messages.search starts to see it (the search index lags).
    pub indexed_at: Instant,
}

/// One pts-numbered change: `pts` is the value after it, covering `count` numbers.
#[derive(Clone, Debug)]
pub(crate) struct LogEntry {
    pub pts: i32,
    pub count: i32,
    pub event: Event,
}

#[derive(Clone, Debug)]
pub(crate) enum Event {
    New(i32),
    Deleted(Vec<i32>),
}

#[derive(Default)]
pub(crate) struct Chat {
    pub msgs: BTreeMap<i32, Msg>,
    /// A channel's own pts (unused for Saved Messages, which count on the account's pts).
    pub pts: i32,
    /// A channel's own message ids (Saved Messages share the account's sequence).
    pub next_id: i32,
    /// A channel's update log.
    pub log: Vec<LogEntry>,
}

pub(crate) struct Upload {
    pub big: bool,
    pub declared_total: Option<i32>,
    pub parts: BTreeMap<i32, u64>,
    pub file: Arc<std::fs::File>,
    pub path: PathBuf,
    pub touched: Instant,
}

#[derive(Default)]
pub(crate) struct State {
    pub chats: HashMap<ChatKey, Chat>,
    pub docs: HashMap<i64, Doc>,
    /// Uploads in progress, by (data centre, file_id): parts live where they were sent.
    pub uploads: HashMap<(i32, i64), Upload>,
    pub random_ids: HashMap<(ChatKey, i64), i32>,
    /// Message ids of the account's private chats (Saved Messages).
    pub user_msg_id: i32,
    /// The account's pts and its update log.
    pub pts: i32,
    pub log: Vec<LogEntry>,
    /// Bytes of parts accepted so far (for the free-account throttle).
    pub uploaded_bytes: u64,
}

impl State {
    /// Records a change to chat `k` and returns its pts: a channel's own, or the account's.
    pub fn log(&mut self, k: ChatKey, count: i32, event: Event) -> i32 {
        match k {
            ChatKey::Saved => {
                self.pts += count;
                let pts = self.pts;
                self.log.push(LogEntry { pts, count, event });
                pts
            }
            ChatKey::Channel(_) => {
                let c = self.chats.entry(k).or_default();
                c.pts += count;
                let pts = c.pts;
                c.log.push(LogEntry { pts, count, event });
                pts
            }
        }
    }

    /// The next message id in chat `k`.
    pub fn next_msg_id(&mut self, k: ChatKey) -> i32 {
        match k {
            ChatKey::Saved => {
                self.user_msg_id += 1;
                self.user_msg_id
            }
            ChatKey::Channel(_) => {
                let c = self.chats.entry(k).or_default();
                c.next_id += 1;
                c.next_id
            }
        }
    }

    /// Deletes messages `ids` of chat `k` and their documents; returns the ids that existed.
    pub fn delete_msgs(&mut self, k: ChatKey, ids: &[i32]) -> Vec<i32> {
        let mut gone = Vec::new();
        let mut docs = Vec::new();
        if let Some(chat) = self.chats.get_mut(&k) {
            for id in ids {
                if let Some(m) = chat.msgs.remove(id) {
                    gone.push(*id);
                    docs.extend(m.doc);
                }
            }
        }
        for d in docs {
            if let Some(doc) = self.docs.remove(&d) {
                let _ = std::fs::remove_file(&doc.path);
            }
        }
        gone
    }

    /// The chat and message holding document `name`.
    pub fn find_named(&self, name: &str) -> Option<(ChatKey, i32, i64)> {
        for (k, chat) in &self.chats {
            for (id, m) in &chat.msgs {
                if let Some(d) = m.doc
                    && self.docs.get(&d).is_some_and(|d| d.name == name)
                {
                    return Some((*k, *id, d));
                }
            }
        }
        None
    }
}
