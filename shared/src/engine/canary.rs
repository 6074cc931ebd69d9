//! The canary: each lane probed (daily by the daemon). A probe lists the lane and compares the
//! listing with the copies the catalog places there. A lane that does not answer is `silent`;
//! one that answers but no longer holds copies is `lost` (and the lost copies are stored again
//! from another lane where one holds them). The result is recorded per lane; the bot tells
//! chat users about each change (see `ops::alerts`).

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::repo::Repo;
use crate::catalog::{LaneProbe, LaneState};
use crate::error::{Error, StorageError};
use crate::storage::ObjectInfo;

/// How long a lane may take to list its objects before it counts as silent.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(10 * 60);
/// How often each lane is probed.
pub const PROBE_EVERY_MS: i64 = 24 * 60 * 60 * 1000;
/// The lane name of a store that is not split in lanes.
pub const SINGLE_LANE: &str = "storage";
/// Pack ids named in a `lost` lane's detail.
const NAMED: usize = 5;

/// Whether a probe is due at `now`: some configured lane was never probed, or the oldest
/// probe is a day old.
pub async fn due(repo: &Repo, now: i64) -> Result<bool, Error> {
    let names: Vec<String> = match repo.storage.as_lanes() {
        Some(lanes) => lanes.lanes().iter().map(|l| l.name().to_string()).collect(),
        None => vec![SINGLE_LANE.to_string()],
    };
    let health = repo.catalog.lane_health().await?;
    Ok(names.iter().any(|n| {
        health
            .iter()
            .find(|h| &h.probe.lane == n)
            .is_none_or(|h| now - h.checked_at >= PROBE_EVERY_MS)
    }))
}

/// Probes every lane and records what it found at `now` (Unix ms).
pub async fn probe(repo: &Repo, now: i64) -> Result<Vec<LaneProbe>, Error> {
    // The catalog first, then the listings: a pack stored in between is listed too.
    let expected = expected_per_lane(repo).await?;
    let lists: Vec<(String, Result<Vec<ObjectInfo>, StorageError>)> = match repo.storage.as_lanes()
    {
        Some(lanes) => {
            let timed = tokio::time::timeout(PROBE_TIMEOUT, lanes.list_each()).await;
            match timed {
                Ok(lists) => lists,
                Err(_) => lanes
                    .lanes()
                    .iter()
                    .map(|l| (l.name().to_string(), Err(timeout())))
                    .collect(),
            }
        }
        None => {
            let listed = tokio::time::timeout(PROBE_TIMEOUT, repo.storage.list()).await;
            vec![(
                SINGLE_LANE.to_string(),
                listed.unwrap_or_else(|_| Err(timeout())),
            )]
        }
    };
    let mut out = Vec::new();
    for (lane, listed) in lists {
        let want = expected.get(&lane).cloned().unwrap_or_default();
        let listed_names: Option<HashSet<String>> = listed
            .as_ref()
            .ok()
            .map(|l| l.iter().map(|o| o.name.clone()).collect());
        if let (Some(lanes), Some(names)) = (repo.storage.as_lanes(), &listed_names) {
            for n in want.iter().filter(|n| !names.contains(*n)) {
                lanes.note_miss(n, &lane);
            }
        }
        let p = judge(&lane, &want, listed);
        if p.state == LaneState::Ok {
            tracing::info!(lane = p.lane, "lane probe: ok");
        } else {
            tracing::warn!(
                lane = p.lane,
                "lane probe: {}: {}",
                p.state.as_str(),
                p.detail
            );
        }
        repo.catalog.record_lane_probe(&p, now).await?;
        out.push(p);
    }
    // Copies a lane lost are stored again from another lane, where one holds them.
    for note in super::copies::heal(repo).await? {
        tracing::info!("{note}");
    }
    Ok(out)
}

fn timeout() -> StorageError {
    StorageError::Transient(format!(
        "listing took longer than {} s",
        PROBE_TIMEOUT.as_secs()
    ))
}

/// Object names of the stored packs the catalog places in each lane.
async fn expected_per_lane(repo: &Repo) -> Result<BTreeMap<String, Vec<String>>, Error> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in repo.catalog.packs().await? {
        if p.state != "stored" {
            continue;
        }
        let name = format!("{}.enc", p.id);
        match repo.storage.as_lanes() {
            Some(lanes) => {
                for c in lanes.copies_in(&p.location) {
                    out.entry(c.lane).or_default().push(name.clone());
                }
            }
            None => out.entry(SINGLE_LANE.into()).or_default().push(name),
        }
    }
    Ok(out)
}

/// The state of a lane from its listing and the copies it should hold.
fn judge(lane: &str, want: &[String], listed: Result<Vec<ObjectInfo>, StorageError>) -> LaneProbe {
    let copies = want.len() as u64;
    let listed = match listed {
        Ok(l) => l,
        Err(e) => {
            return LaneProbe {
                lane: lane.to_string(),
                state: LaneState::Silent,
                detail: e.to_string(),
                copies,
                missing: 0,
            };
        }
    };
    let names: HashSet<&str> = listed.iter().map(|o| o.name.as_str()).collect();
    let gone: Vec<&String> = want
        .iter()
        .filter(|n| !names.contains(n.as_str()))
        .collect();
    if gone.is_empty() {
        return LaneProbe {
            lane: lane.to_string(),
            state: LaneState::Ok,
            detail: String::new(),
            copies,
            missing: 0,
        };
    }
    let mut shown: Vec<String> = gone
        .iter()
        .take(NAMED)
        .map(|n| n.trim_end_matches(".enc").chars().take(12).collect())
        .collect();
    if gone.len() > NAMED {
        shown.push(format!("and {} more", gone.len() - NAMED));
    }
    LaneProbe {
        lane: lane.to_string(),
        state: LaneState::Lost,
        detail: format!(
            "{} of its {} packs are missing: {}",
            gone.len(),
            copies,
            shown.join(", ")
        ),
        copies,
        missing: gone.len() as u64,
    }
}
