//! `verify`: is everything the catalog points at really in storage, and intact?

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use super::repo::{Repo, VerifyReport};
use crate::error::Error;
use crate::format::crypto;
use crate::format::pack::{self, PACK_TAIL_LEN};
use crate::progress::{Counters, Phase, Progress};
use crate::storage::{ObjectRef, with_retry};

/// Bytes per range read when reading whole packs.
const READ_WINDOW: u64 = 8 << 20;

/// Checks every stored pack: present, right size, trailer agreeing with the catalog, and with
/// `read_data` every blob's MAC and id. A missing pack is marked so that the next backup
/// stores its chunks again.
pub(crate) async fn run(
    repo: &Repo,
    read_data: bool,
    progress: &dyn Progress,
) -> Result<VerifyReport, Error> {
    let counters = Counters::default();
    counters.set_phase(Phase::Verifying);
    let listed: HashMap<String, (u64, String)> = repo
        .storage
        .list()
        .await?
        .into_iter()
        .map(|o| (o.name, (o.size, o.location)))
        .collect();
    let packs: Vec<_> = repo
        .catalog
        .packs()
        .await?
        .into_iter()
        .filter(|p| p.state != "uploading")
        .collect();
    counters
        .files_total
        .store(packs.len() as u64, Ordering::Relaxed);
    counters.bytes_total.store(
        if read_data {
            packs.iter().map(|p| p.size).sum()
        } else {
            0
        },
        Ordering::Relaxed,
    );
    progress.report(&counters.report());
    let mut report = VerifyReport::default();
    for p in packs {
        let name = format!("{}.enc", p.id);
        report.packs_checked += 1;
        Counters::add(&counters.files_done, 1);
        let problem = match listed.get(&name) {
            None => Some(format!("pack {name} is missing from storage")),
            Some((size, _)) if *size != p.size => Some(format!(
                "pack {name} has {size} bytes in storage, the catalog expects {}",
                p.size
            )),
            Some((_, location)) => {
                let obj = ObjectRef::new(&name, location.clone());
                check_pack(repo, &obj, p.size, read_data, &mut report, &counters)
                    .await
                    .err()
            }
        };
        if let Some(problem) = problem {
            let affected = repo.catalog.paths_using_pack(&p.id, 6).await?;
            let mut msg = problem;
            if !affected.is_empty() {
                let list: Vec<String> = affected
                    .iter()
                    .take(5)
                    .map(|(root, path)| format!("{root}: {path}"))
                    .collect();
                msg.push_str(&format!(
                    "; affects {}{}",
                    list.join(", "),
                    if affected.len() > 5 { ", ..." } else { "" }
                ));
            }
            if !listed.contains_key(&name) {
                repo.catalog.set_pack_state(&p.id, "missing").await?;
            }
            report.problems.push(msg);
        } else if p.state == "missing" {
            // It came back (a transient listing problem): trust it again.
            repo.catalog.set_pack_state(&p.id, "stored").await?;
        }
        progress.report(&counters.report());
    }
    counters.set_phase(Phase::Done);
    progress.report(&counters.report());
    Ok(report)
}

async fn check_pack(
    repo: &Repo,
    obj: &ObjectRef,
    size: u64,
    read_data: bool,
    report: &mut VerifyReport,
    counters: &Counters,
) -> Result<(), String> {
    let err = |e: &dyn std::fmt::Display| format!("pack {}: {e}", obj.name);
    if size < PACK_TAIL_LEN {
        return Err(err(&"too small to be a pack"));
    }
    let tail = with_retry("reading a pack", || {
        repo.storage
            .get_range(obj, size - PACK_TAIL_LEN, PACK_TAIL_LEN)
    })
    .await
    .map_err(|e| err(&e))?;
    let tlen = pack::decode_tail(&obj.name, &tail, size).map_err(|e| e.to_string())?;
    let body_len = size - PACK_TAIL_LEN - tlen;
    let sealed = with_retry("reading a pack", || {
        repo.storage.get_range(obj, body_len, tlen)
    })
    .await
    .map_err(|e| err(&e))?;
    let (entries, authenticated) =
        match pack::open_trailer(repo.keys(), &obj.name, &sealed, body_len) {
            Ok(t) => (t.entries, true),
            // A format-1 unencrypted pack this catalog recorded: its trailer carries only a
            // checksum, so it is compared with the catalog below, which vouches for it.
            Err(crate::error::PackError::Unauthenticated { .. }) => (
                pack::open_format1_trailer(&obj.name, &sealed, body_len)
                    .map_err(|e| e.to_string())?,
                false,
            ),
            Err(e) => return Err(e.to_string()),
        };
    report.bytes_read += tlen + PACK_TAIL_LEN;
    // Every blob the catalog places in this pack must be in the trailer, at the same place.
    let pack_id = obj.name.trim_end_matches(".enc");
    let in_catalog = repo
        .catalog
        .blobs_in_pack(pack_id)
        .await
        .map_err(|e| err(&e))?;
    let by_id: HashMap<[u8; 32], &pack::PackEntry> = entries.iter().map(|e| (e.id.0, e)).collect();
    for (id, offset, length) in &in_catalog {
        let ok = id
            .as_slice()
            .try_into()
            .ok()
            .and_then(|k: [u8; 32]| by_id.get(&k))
            .is_some_and(|e| e.offset == *offset as u64 && u64::from(e.length) == *length as u64);
        if !ok {
            return Err(err(&format!(
                "trailer does not list chunk {} where the catalog has it",
                hex::encode(&id[..6])
            )));
        }
    }
    if !read_data {
        return Ok(());
    }
    let mut offset = 0;
    // Only the blobs an authenticated source lists are read: the trailer's, or for a format-1
    // unencrypted pack the catalog's.
    let vouched: std::collections::HashSet<&[u8]> =
        in_catalog.iter().map(|(id, _, _)| id.as_slice()).collect();
    let mut sorted: Vec<&pack::PackEntry> = entries
        .iter()
        .filter(|e| authenticated || vouched.contains(e.id.0.as_slice()))
        .collect();
    sorted.sort_by_key(|e| e.offset);
    let mut i = 0;
    while i < sorted.len() {
        // Read a window of whole blobs.
        let start = sorted[i].offset;
        let mut j = i;
        while j < sorted.len()
            && (j == i || sorted[j].offset + u64::from(sorted[j].length) - start <= READ_WINDOW)
        {
            j += 1;
        }
        let end = sorted[j - 1].offset + u64::from(sorted[j - 1].length);
        let data = with_retry("reading a pack", || {
            repo.storage.get_range(obj, start, end - start)
        })
        .await
        .map_err(|e| err(&e))?;
        report.bytes_read += data.len() as u64;
        Counters::add(&counters.bytes_done, data.len() as u64);
        for e in &sorted[i..j] {
            let s = (e.offset - start) as usize;
            let sealed = &data[s..s + e.length as usize];
            crypto::open_chunk(repo.keys(), sealed, pack::MAX_BLOB, &e.id)
                .map_err(|x| err(&format!("chunk {}: {x}", &e.id.to_hex()[..12])))?;
            report.blobs_checked += 1;
        }
        offset = end;
        i = j;
    }
    let _ = offset;
    Ok(())
}
