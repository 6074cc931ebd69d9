//! Uploads: parts on the part connections (see `transfer`), then one messages.sendMedia per
//! object.
//!
//! The unit of resume is the whole pack: parts expire, and an upload Telegram cannot use
//! (missing parts, a wrong md5_checksum, MEDIA_EMPTY) starts over from its first part, a
//! bounded number of times. A send is idempotent: its random_id comes from the object name,
//! so a send retried after a lost answer or a crash is refused as RANDOM_ID_DUPLICATE and
//! the earlier message is looked up instead of uploading the pack again (by search, and
//! through the history when the search index has not caught up yet).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use grammers_tl_types::{self as tl, Deserializable, RemoteCall};
use sha2::{Digest, Sha256};
use storinator_shared::error::StorageError;
use storinator_shared::storage::{Location, ObjectRef, check_name};
use tokio::task::JoinSet;

use super::errors::{self, Action};
use super::scheduler::{CallClass, PART_SIZE};
use super::storage::{CallError, Doc, Inner, doc_of, rpc_error};

const SMALL_FILE_MAX: u64 = 10 * 1024 * 1024;
/// How many times a pack upload is restarted from scratch after Telegram could not use it.
const MAX_UPLOAD_RESTARTS: u32 = 5;

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

pub(super) fn random_i64() -> i64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("os random source");
    i64::from_le_bytes(b)
}

/// The short name of a request type, for messages.
pub(super) fn request_name<R: RemoteCall>() -> &'static str {
    std::any::type_name::<R>()
        .rsplit("::")
        .next()
        .unwrap_or("request")
}

/// Keeps the count of bytes still to send for one upload, returning what is left to the
/// storage-wide count when the upload ends, however it ends.
struct Pending<'a> {
    total: &'a AtomicU64,
    left: AtomicU64,
}

impl<'a> Pending<'a> {
    fn new(total: &'a AtomicU64, size: u64) -> Self {
        total.fetch_add(size, Ordering::Relaxed);
        Pending {
            total,
            left: AtomicU64::new(size),
        }
    }

    fn sent(&self, n: u64) {
        self.left.fetch_sub(n, Ordering::Relaxed);
        self.total.fetch_sub(n, Ordering::Relaxed);
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        self.total
            .fetch_sub(self.left.load(Ordering::Relaxed), Ordering::Relaxed);
    }
}

impl Inner {
    /// Uploads the file's parts under `file_id`; returns the part count. Parts go out as the
    /// window lets them (read from the file only then, so memory stays at the window), on the
    /// home data centre's part connections; the first part that cannot be sent stops the rest.
    async fn upload_parts(
        self: &Arc<Self>,
        path: &Path,
        size: u64,
        file_id: i64,
    ) -> Result<i32, StorageError> {
        let parts = size.div_ceil(PART_SIZE) as i32;
        let total = (size > SMALL_FILE_MAX).then_some(parts);
        let file = std::fs::File::open(path).map_err(|e| StorageError::io(path, e))?;
        let pending = Pending::new(&self.pending_upload, size);
        let mut set: JoinSet<Result<u64, StorageError>> = JoinSet::new();
        let mut queued = self.sched.queue_parts(parts as usize);
        // This pack's parts go before those of packs started after it.
        let order = self.sched.part_order();
        let mut next = 0i32;
        loop {
            tokio::select! {
                biased;
                done = set.join_next(), if !set.is_empty() => {
                    let sent = done.expect("tasks in flight").unwrap_or_else(|e| {
                        Err(StorageError::Fatal(format!("upload task: {e}")))
                    });
                    match sent {
                        Ok(n) => pending.sent(n),
                        Err(e) => {
                            // The pack is retried as a whole: stop the other parts.
                            set.shutdown().await;
                            return Err(e);
                        }
                    }
                }
                slot = queued.slot(order), if next < parts => {
                    let off = next as u64 * PART_SIZE;
                    let len = (size - off).min(PART_SIZE) as usize;
                    let mut buf = vec![0u8; len];
                    file.read_exact_at(&mut buf, off)
                        .map_err(|e| StorageError::io(path, e))?;
                    let body = Arc::new(part_request(file_id, next, total, &buf));
                    drop(buf);
                    let me = self.clone();
                    let what = format!("part {next} of upload {file_id:x}");
                    set.spawn(async move {
                        let _slot = slot;
                        let answer = me.transfer(me.home_dc(), body, len as u64, &what).await?;
                        match bool::from_bytes(&answer) {
                            Ok(true) => Ok(len as u64),
                            Ok(false) => Err(StorageError::Transient(format!(
                                "{what}: telegram did not store the part"
                            ))),
                            Err(e) => Err(StorageError::Transient(format!(
                                "{what}: unreadable answer: {e}"
                            ))),
                        }
                    });
                    next += 1;
                }
                else => return Ok(parts),
            }
        }
    }

    pub(super) async fn put_path(
        self: &Arc<Self>,
        name: &str,
        path: &Path,
    ) -> Result<Location, StorageError> {
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
        // Small files carry their md5, which Telegram checks (MD5_CHECKSUM_INVALID).
        let md5 = if size <= SMALL_FILE_MAX {
            let bytes = std::fs::read(path).map_err(|e| StorageError::io(path, e))?;
            format!("{:x}", md5::compute(&bytes))
        } else {
            String::new()
        };
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
            let req = send_request(self, name, file_id, parts, size, &md5, salt);
            let e = match self.call(CallClass::Message, &req).await {
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
                Err(CallError::Rpc(e)) => e,
                Err(CallError::Storage(e)) => return Err(e),
            };
            match errors::classify(&e) {
                Action::Reupload => {
                    restarts += 1;
                    self.sched.note_upload_restart();
                    if restarts > MAX_UPLOAD_RESTARTS {
                        return Err(StorageError::Transient(format!(
                            "upload of {name} kept failing: {}",
                            errors::describe(&e)
                        )));
                    }
                    tracing::info!(name, "{}; uploading it again", errors::describe(&e));
                    uploaded = None;
                }
                Action::FindEarlierSend => {
                    match self.find_named(name).await? {
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
                _ => return Err(rpc_error(&e, Some(&format!("sending {name}")))),
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
}

impl Inner {
    /// `/get` for files over the Bot API's 50 MB: the restored file goes to the account's
    /// Saved Messages under its real name, with a caption. Uploaded like a pack (parts, flood
    /// waits, retries), sent once: a fresh random id, since each `/get` is a new message.
    pub(super) async fn send_to_saved_messages(
        self: &Arc<Self>,
        path: &Path,
        name: &str,
        caption: &str,
    ) -> Result<(), StorageError> {
        let size = std::fs::metadata(path)
            .map_err(|e| StorageError::io(path, e))?
            .len();
        let max = if self.cfg.premium { 8000 } else { 4000 } * PART_SIZE;
        if size == 0 || size > max {
            return Err(StorageError::Fatal(format!(
                "{name} is {size} bytes: telegram accepts documents of 1 to {max} bytes"
            )));
        }
        let file_id = random_i64();
        let parts = self.upload_parts(path, size, file_id).await?;
        let mut req = send_request(self, name, file_id, parts, size, "", 0);
        req.peer = tl::enums::InputPeer::PeerSelf;
        req.silent = false;
        req.message = caption.into();
        req.random_id = random_i64();
        self.call(CallClass::Message, &req).await?;
        Ok(())
    }
}

fn send_request(
    inner: &Inner,
    name: &str,
    file_id: i64,
    parts: i32,
    size: u64,
    md5: &str,
    salt: u32,
) -> tl::functions::messages::SendMedia {
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
            md5_checksum: md5.into(),
        })
    };
    tl::functions::messages::SendMedia {
        silent: true,
        background: false,
        clear_draft: false,
        noforwards: false,
        update_stickersets_order: false,
        invert_media: false,
        allow_paid_floodskip: false,
        peer: inner.chat.input_peer(),
        reply_to: None,
        media: tl::enums::InputMedia::UploadedDocument(tl::types::InputMediaUploadedDocument {
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
        }),
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
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn pending_bytes_return_whatever_the_upload_did() {
        let total = AtomicU64::new(10);
        {
            let p = Pending::new(&total, 100);
            assert_eq!(total.load(Ordering::Relaxed), 110);
            p.sent(30);
            assert_eq!(total.load(Ordering::Relaxed), 80);
        }
        assert_eq!(total.load(Ordering::Relaxed), 10);
    }
}
