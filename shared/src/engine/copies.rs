//! Mirrored copies: healing a copy that a read found missing or damaged.
//!
//! Reads through [`Lanes`] fall back to another copy on their own and remember the copy that
//! failed; [`heal`] then stores that pack again (from a copy whose trailer authenticates with
//! the key) in the lane that lost it, or in another lane when that one does not answer, and
//! records the new location in the catalog. Restore, verify and the scrub call it when they
//! are done.

use std::path::Path;

use super::repo::Repo;
use crate::error::Error;
use crate::format::keyring::KeyRing;
use crate::format::pack::{self, PACK_TAIL_LEN};

/// Heals every copy reads found missing or damaged since the last call. Returns one line per
/// pack: healed (and where), or why not. Nothing to do without lanes.
pub async fn heal(repo: &Repo) -> Result<Vec<String>, Error> {
    let Some(lanes) = repo.storage.as_lanes() else {
        return Ok(Vec::new());
    };
    let mut notes = Vec::new();
    for (name, lane) in lanes.take_misses() {
        let Some(id) = pack::PackId::from_object_name(&name) else {
            continue;
        };
        let Some(p) = repo.catalog.pack(&id.0).await? else {
            continue;
        };
        if p.state != "stored" {
            continue;
        }
        let ring = repo.ring_all().await?;
        let check = |path: &Path| check_pack_file(&ring, &name, path);
        match lanes.heal(&name, p.size, &p.location, &lane, &check).await {
            Ok(Some(location)) => {
                repo.catalog
                    .set_pack_location(&p.id, &p.location, &location)
                    .await?;
                let now: Vec<String> = lanes
                    .copies_in(&location)
                    .into_iter()
                    .map(|c| c.lane)
                    .collect();
                tracing::info!("healed {name}: copies now in lanes {}", now.join(", "));
                notes.push(format!(
                    "pack {name}: the copy in lane {lane} failed; stored again, copies now in lanes {}",
                    now.join(", ")
                ));
            }
            Ok(None) => notes.push(format!(
                "pack {name}: the copy in lane {lane} failed, and no lane could take a new one"
            )),
            Err(e) => notes.push(format!(
                "pack {name}: the copy in lane {lane} failed, and healing it failed: {e}"
            )),
        }
    }
    Ok(notes)
}

/// Authenticates a whole pack read from a copy: its trailer with the key, and every blob the
/// trailer lists against its MAC.
fn check_pack_file(ring: &KeyRing, name: &str, path: &Path) -> Result<(), String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let size = data.len() as u64;
    if size < PACK_TAIL_LEN {
        return Err("too small to be a pack".into());
    }
    let tlen = pack::decode_tail(name, &data[(size - PACK_TAIL_LEN) as usize..], size)
        .map_err(|e| e.to_string())?;
    let body_len = size - PACK_TAIL_LEN - tlen;
    let sealed = &data[body_len as usize..(size - PACK_TAIL_LEN) as usize];
    let (slot, trailer) = ring
        .open_trailer(name, sealed, body_len)
        .map_err(|e| e.to_string())?;
    let keys = &ring.get(slot).keys;
    for e in &trailer.entries {
        let blob = usize::try_from(e.offset)
            .ok()
            .and_then(|start| data.get(start..start.checked_add(e.length as usize)?))
            .filter(|_| e.offset + u64::from(e.length) <= body_len)
            .ok_or_else(|| format!("chunk {} lies outside the pack", &e.id.to_hex()[..12]))?;
        crate::format::crypto::open_chunk(keys, blob, pack::MAX_BLOB, &e.id)
            .map_err(|err| format!("chunk {}: {err}", &e.id.to_hex()[..12]))?;
    }
    Ok(())
}
