//! Files: upload parts (with Telegram's size and count rules, expiry, and the free-account
//! throttle), sending a document (md5_checksum, random_id de-duplication), and ranged reads
//! (alignment rules, FILE_MIGRATE to the document's data centre, CDN redirects, file
//! references).

use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use grammers_tl_types::{self as tl, Identifiable, Serializable};
use tokio::time::Instant;

use super::dispatch::Injected;
use super::server::{Outcome, Server, err, rnd_bytes, rnd_i64};
use super::state::{ChatKey, Doc, Event, Msg, Upload};

const PART_STRIDE: u64 = 512 * 1024;
const SMALL_FILE_MAX: u64 = 10 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

impl Server {
    /// The free-account throttle: `Some(seconds)` to wait before this part fits.
    fn premium_wait(&self, bytes: u64) -> Option<u64> {
        if self.opts.premium {
            return None;
        }
        let uploaded = self.state.lock().unwrap().uploaded_bytes;
        let mut t = self.throttle.lock().unwrap();
        let (Some(limit), next) = &mut *t else {
            return None;
        };
        if uploaded < limit.after_bytes {
            return None;
        }
        let now = Instant::now();
        let at = next.unwrap_or(now);
        if at > now {
            return Some((at - now).as_secs_f64().ceil().max(1.0) as u64);
        }
        *next =
            Some(now + Duration::from_secs_f64(bytes as f64 / limit.bytes_per_sec.max(1) as f64));
        None
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn save_part(
        &self,
        dc: i32,
        big: bool,
        file_id: i64,
        part: i32,
        total: Option<i32>,
        mut bytes: Vec<u8>,
        injected: Injected,
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
        if let Some(secs) = self.premium_wait(bytes.len() as u64) {
            return err(420, format!("FLOOD_PREMIUM_WAIT_{secs}"));
        }
        self.shared_cap.take(bytes.len() as u64).await;
        if injected.corrupt_upload {
            let mid = bytes.len() / 2;
            bytes[mid] ^= 0xff;
        }
        let file = {
            let mut st = self.state.lock().unwrap();
            self.purge_expired(&mut st);
            if let std::collections::hash_map::Entry::Vacant(slot) = st.uploads.entry((dc, file_id))
            {
                let path = self
                    .dir
                    .join("uploads")
                    .join(format!("{file_id}-{}", rnd_i64()));
                let f = match std::fs::OpenOptions::new()
                    .create_new(true)
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
            let up = st.uploads.get_mut(&(dc, file_id)).unwrap();
            if up.big != big || up.declared_total != total {
                return err(400, "FILE_PARTS_INVALID");
            }
            up.touched = Instant::now();
            up.parts.insert(part, bytes.len() as u64);
            let f = up.file.clone();
            st.uploaded_bytes += bytes.len() as u64;
            f
        };
        if file
            .write_all_at(&bytes, part as u64 * PART_STRIDE)
            .is_err()
        {
            return err(500, "INTERNAL_STORAGE_ERROR");
        }
        Outcome::Reply(true.to_bytes())
    }

    fn purge_expired(&self, st: &mut super::state::State) {
        let ttl = self.opts.part_ttl;
        let dead: Vec<(i32, i64)> = st
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

    pub(crate) fn send_media(&self, dc: i32, req: tl::functions::messages::SendMedia) -> Outcome {
        let k = match self.resolve_peer(&req.peer) {
            Ok(k) => k,
            Err(o) => return o,
        };
        if let ChatKey::Channel(id) = k
            && self
                .channel(id)
                .is_some_and(|c| c.role == super::ChannelRole::Member)
        {
            return err(403, "CHAT_WRITE_FORBIDDEN");
        }
        let media = match req.media {
            tl::enums::InputMedia::UploadedDocument(m) => m,
            tl::enums::InputMedia::Empty => return err(400, "MEDIA_EMPTY"),
            _ => return err(400, "MEDIA_INVALID"),
        };
        let (file_id, parts, big, input_name, md5) = match media.file {
            tl::enums::InputFile::File(f) => (f.id, f.parts, false, f.name, f.md5_checksum),
            tl::enums::InputFile::Big(f) => (f.id, f.parts, true, f.name, String::new()),
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
        let Some(up) = st.uploads.get(&(dc, file_id)) else {
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
        if !md5.is_empty() {
            match md5_of(up, parts, part_size) {
                Ok(sum) if sum.eq_ignore_ascii_case(&md5) => {}
                Ok(_) => return err(400, "MD5_CHECKSUM_INVALID"),
                Err(_) => return err(500, "INTERNAL_STORAGE_ERROR"),
            }
        }
        let up = st.uploads.remove(&(dc, file_id)).unwrap();
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
        let date = self.now_unix();
        let doc_dc = self.upload_dc.lock().unwrap().unwrap_or(dc);
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
                dc: doc_dc,
                cdn: false,
            },
        );
        let id = st.next_msg_id(k);
        let lag = *self.search_lag.lock().unwrap();
        st.chats.entry(k).or_default().msgs.insert(
            id,
            Msg {
                date,
                text: req.message,
                doc: Some(doc_id),
                indexed_at: Instant::now() + lag,
            },
        );
        // A message in a channel moves the channel's pts; Saved Messages move the account's.
        let pts = st.log(k, 1, Event::New(id));
        st.random_ids.insert((k, req.random_id), id);
        self.touch();
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
                    pts,
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

    pub(crate) async fn get_file(
        &self,
        dc: i32,
        req: tl::functions::upload::GetFile,
        injected: Injected,
    ) -> Outcome {
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
        if loc.file_reference.is_empty() {
            // What Telegram tells a client that predates file references.
            return err(406, "FILEREF_UPGRADE_NEEDED");
        }
        let (path, size, doc_dc, cdn) = {
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
                Some(d) => (d.path.clone(), d.size, d.dc, d.cdn),
            }
        };
        if doc_dc != dc {
            return err(303, format!("FILE_MIGRATE_{doc_dc}"));
        }
        if injected.cdn_redirect || (cdn && req.cdn_supported) {
            return Outcome::Reply(
                tl::enums::upload::File::CdnRedirect(tl::types::upload::FileCdnRedirect {
                    dc_id: 203,
                    file_token: rnd_bytes(16),
                    encryption_key: rnd_bytes(32),
                    encryption_iv: rnd_bytes(16),
                    file_hashes: vec![],
                })
                .to_bytes(),
            );
        }
        let offset = offset as u64;
        let n = size.saturating_sub(offset).min(limit as u64) as usize;
        let mut bytes = vec![0u8; n];
        if n > 0 {
            let read = std::fs::File::open(&path).and_then(|f| f.read_exact_at(&mut bytes, offset));
            if read.is_err() {
                return err(500, "INTERNAL_STORAGE_ERROR");
            }
        }
        self.shared_cap.take(n as u64).await;
        if injected.corrupt_download {
            // One byte in every 512: whatever part of the answer the client keeps (a range
            // read uses only some of it), it holds a flipped byte.
            for b in bytes.iter_mut().step_by(512) {
                *b ^= 0xff;
            }
        }
        Outcome::Reply(upload_file_bytes(&bytes))
    }
}

/// The md5 of an upload's bytes, lowercase hex, as `inputFile.md5_checksum` carries it.
fn md5_of(up: &Upload, parts: i32, part_size: u64) -> std::io::Result<String> {
    let mut ctx = md5::Context::new();
    let mut buf = vec![0u8; part_size as usize];
    for p in 0..parts {
        let len = up.parts[&p] as usize;
        up.file
            .read_exact_at(&mut buf[..len], p as u64 * PART_STRIDE)?;
        ctx.consume(&buf[..len]);
    }
    Ok(format!("{:x}", ctx.finalize()))
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
