//! Reads and lookups: ranged reads in aligned windows, from the data centre each document
//! lives on (FILE_MIGRATE moves a read there), with file references refreshed when they
//! expire; finding an object's message by location, search or history; listing; deleting.
//!
//! CDN redirects: Telegram redirects a read to a CDN data centre only when the request says
//! `cdn_supported`, and storinator never says so. Packs are sealed and authenticated by
//! storinator itself, so a CDN would add a second encryption layer, file hashes and more
//! connections for nothing. A redirect anyway (a server not following the protocol) fails
//! the read with an error that says so, rather than being followed or looping.

use std::collections::HashMap;
use std::sync::Arc;

use grammers_tl_types::{self as tl, Deserializable, Serializable};
use storinator_shared::error::StorageError;
use storinator_shared::storage::{ObjectInfo, ObjectRef, check_name};
use tokio::task::JoinSet;

use super::errors::{self, Action};
use super::scheduler::CallClass;
use super::storage::{CallError, Doc, Inner, StorageChat, doc_of, messages_of, msg_id, rpc_error};

const MAX_WINDOW: u64 = 512 * 1024;
/// Most message ids in one deleteMessages or getMessages call (Telegram's server-side limit
/// for deleting at once is 100).
const DELETE_BATCH: usize = storinator_shared::storage::REMOVE_BATCH;
/// How many times a read refetches the message after its file reference expired.
const MAX_REFERENCE_REFRESHES: u32 = 3;
/// How many FILE_MIGRATE answers one read follows (a document moves rarely; more means the
/// data centres disagree, which retrying later may fix).
const MAX_MIGRATIONS: u32 = 3;

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

fn input_channel(channel_id: i64, access_hash: i64) -> tl::enums::InputChannel {
    tl::enums::InputChannel::Channel(tl::types::InputChannel {
        channel_id,
        access_hash,
    })
}

impl Inner {
    pub(super) async fn delete_messages(&self, ids: Vec<i32>) -> Result<(), StorageError> {
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
        Ok(self.fetch_messages(vec![msg_id]).await?.into_iter().next())
    }

    /// The documents (with their names) of the messages `ids` that still exist, in one call.
    async fn fetch_messages(&self, ids: Vec<i32>) -> Result<Vec<(String, Doc)>, StorageError> {
        let ids = ids
            .into_iter()
            .map(|id| tl::enums::InputMessage::Id(tl::types::InputMessageId { id }))
            .collect();
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
        Ok(messages_of(res).iter().filter_map(doc_of).collect())
    }

    /// Pages through `page(offset_id)` (newest first) until a message holds `name`.
    async fn scan_for<R>(
        &self,
        name: &str,
        page: impl Fn(i32) -> R,
    ) -> Result<Option<Doc>, StorageError>
    where
        R: tl::RemoteCall<Return = tl::enums::messages::Messages>,
    {
        let mut offset_id = 0;
        loop {
            let msgs = messages_of(self.call(CallClass::Message, &page(offset_id)).await?);
            if msgs.is_empty() {
                return Ok(None);
            }
            if let Some(d) = msgs
                .iter()
                .filter_map(doc_of)
                .find_map(|(n, d)| (n == name).then_some(d))
            {
                return Ok(Some(d));
            }
            offset_id = msgs.iter().map(msg_id).min().unwrap_or(0);
            if offset_id <= 1 {
                return Ok(None);
            }
        }
    }

    /// The message holding `name`. Search first (cheap), but Telegram's search index lags
    /// behind new messages, so a miss is confirmed by reading the history, newest first
    /// (where a send retried moments ago sits).
    pub(super) async fn find_named(&self, name: &str) -> Result<Option<Doc>, StorageError> {
        let search = |offset_id| tl::functions::messages::Search {
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
        if let Some(d) = self.scan_for(name, search).await? {
            return Ok(Some(d));
        }
        let history = |offset_id| tl::functions::messages::GetHistory {
            peer: self.chat.input_peer(),
            offset_id,
            offset_date: 0,
            add_offset: 0,
            limit: 100,
            max_id: 0,
            min_id: 0,
            hash: 0,
        };
        self.scan_for(name, history).await
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
        match self.find_named(&obj.name).await? {
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

    /// Reads one window of `doc`, on the data centre it lives on.
    async fn read_window(
        self: &Arc<Self>,
        name: &str,
        doc: Doc,
        start: u64,
        limit: u64,
    ) -> Result<Vec<u8>, StorageError> {
        let mut doc = doc;
        let (mut refreshes, mut migrations) = (0, 0);
        loop {
            let req = tl::functions::upload::GetFile {
                precise: false,
                // See the module's note on CDNs.
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
            let want = doc.size.saturating_sub(start).min(limit) as usize;
            let what = format!("reading {name} at {start}");
            let answer = self
                .transfer(doc.dc, Arc::new(req.to_bytes()), want as u64, &what)
                .await
                .and_then(|a| {
                    tl::enums::upload::File::from_bytes(&a).map_err(|e| {
                        CallError::Storage(StorageError::Transient(format!(
                            "{what}: unreadable answer: {e}"
                        )))
                    })
                });
            let e = match answer {
                Ok(tl::enums::upload::File::File(f)) => {
                    if f.bytes.len() != want {
                        return Err(StorageError::Transient(format!(
                            "short read of {name} at {start}: got {} of {want} bytes",
                            f.bytes.len()
                        )));
                    }
                    return Ok(f.bytes);
                }
                Ok(tl::enums::upload::File::CdnRedirect(r)) => {
                    return Err(StorageError::Fatal(format!(
                        "telegram redirected the read of {name} to CDN data centre {} although storinator does not ask for CDNs (cdn_supported is off): the read is refused rather than followed\nhint: this is a Telegram-side anomaly; try again later",
                        r.dc_id
                    )));
                }
                Err(CallError::Rpc(e)) => e,
                Err(CallError::Storage(e)) => return Err(e),
            };
            match errors::classify(&e) {
                Action::RefreshReference => {
                    refreshes += 1;
                    if refreshes > MAX_REFERENCE_REFRESHES {
                        return Err(StorageError::Transient(format!(
                            "file reference of {name} keeps failing: {}",
                            errors::describe(&e)
                        )));
                    }
                    doc = self.refresh(name, &doc).await?;
                }
                Action::MigrateDc => {
                    migrations += 1;
                    let Some(dc) = e.value.filter(|_| migrations <= MAX_MIGRATIONS) else {
                        return Err(StorageError::Transient(format!(
                            "{name} keeps moving between data centres: {}",
                            errors::describe(&e)
                        )));
                    };
                    tracing::debug!(name, dc, "document lives on another data centre");
                    doc.dc = dc as i32;
                    if let Some(c) = self.cache.lock().unwrap().get_mut(name) {
                        c.dc = doc.dc;
                    }
                }
                Action::NotFound => return Err(StorageError::NotFound { name: name.into() }),
                _ => return Err(rpc_error(&e, Some(&format!("reading {name}")))),
            }
        }
    }

    pub(super) async fn get(
        self: &Arc<Self>,
        obj: &ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        check_name(&obj.name)?;
        // This range's windows go before those of ranges asked for after it (a restore uses
        // its ranges in the order it asked for them).
        let order = self.sched.part_order();
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
        let mut queued = self.sched.queue_parts(windows.len());
        // Windows go out as the part window lets them (other reads and uploads of this
        // storage share it) and are appended in order.
        while emitted < windows.len() {
            tokio::select! {
                biased;
                done = set.join_next(), if !set.is_empty() => {
                    let (i, r) = done
                        .expect("tasks in flight")
                        .map_err(|e| StorageError::Fatal(format!("download task: {e}")))?;
                    results[i] = Some(r?);
                }
                slot = queued.slot(order), if next < windows.len() => {
                    let (s, l) = windows[next];
                    let me = self.clone();
                    let name = obj.name.clone();
                    // Later windows start from what earlier ones learned (a move, a reference).
                    let d = self
                        .cache
                        .lock()
                        .unwrap()
                        .get(&obj.name)
                        .cloned()
                        .unwrap_or_else(|| doc.clone());
                    let i = next;
                    set.spawn(async move {
                        let _slot = slot;
                        (i, me.read_window(&name, d, s, l).await)
                    });
                    next += 1;
                }
            }
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

    pub(super) async fn list_all(&self) -> Result<Vec<ObjectInfo>, StorageError> {
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

    /// Deletes several objects with as few message-class calls as Telegram allows: the
    /// remembered message ids are checked in one getMessages per 100 (a message id is only
    /// trusted when its document still carries the object's name: deleting a stranger's
    /// message by a stale id would be unrecoverable), objects not found that way are looked
    /// up one by one, and the messages go in deleteMessages calls of at most 100 ids, the
    /// server's limit for one call.
    pub(super) async fn remove_objs(&self, objs: &[ObjectRef]) -> Result<(), StorageError> {
        for o in objs {
            check_name(&o.name)?;
        }
        let mut ids = Vec::new();
        let mut unresolved = Vec::new();
        let wanted: Vec<(i32, &ObjectRef)> = objs
            .iter()
            .filter_map(|o| {
                let cached = self.cache.lock().unwrap().get(&o.name).map(|d| d.msg_id);
                match cached.or_else(|| self.msg_id_from_location(&o.location)) {
                    Some(id) => Some((id, o)),
                    None => {
                        unresolved.push(o);
                        None
                    }
                }
            })
            .collect();
        for batch in wanted.chunks(DELETE_BATCH) {
            let found = self
                .fetch_messages(batch.iter().map(|(id, _)| *id).collect())
                .await?;
            for (id, o) in batch {
                if found.iter().any(|(n, d)| d.msg_id == *id && *n == o.name) {
                    ids.push(*id);
                } else {
                    unresolved.push(o);
                }
            }
        }
        for o in unresolved {
            // Not found: already gone.
            if let Some(d) = self.find_named(&o.name).await? {
                ids.push(d.msg_id);
            }
        }
        for batch in ids.chunks(DELETE_BATCH) {
            self.delete_messages(batch.to_vec()).await?;
        }
        let mut cache = self.cache.lock().unwrap();
        for o in objs {
            cache.remove(&o.name);
        }
        Ok(())
    }

    pub(super) async fn remove_obj(&self, obj: &ObjectRef) -> Result<(), StorageError> {
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
}
