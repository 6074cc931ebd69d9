//! The store of `STORINATOR_STORAGE`: one backend, or several lanes (Telegram sessions and
//! chats, directories) each with its own rate limits, packs kept in `STORINATOR_COPIES` of them.
//!
//! With one lane nothing changes: it is connected at start and a failure stops the command,
//! as it always did. With several, every Telegram lane is connected at start, at once; one
//! that fails (an account deleted or banned, a session logged out, a channel gone) is logged
//! and left to connect later, so that losing one account never stops the others. Only when no
//! lane connects does the command fail.

use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use storinator_shared::config::{LaneSpec, StorageSpec};
use storinator_shared::error::StorageError;
use storinator_shared::storage::{Connector, Lane, Lanes};
use storinator_shared::{Config, DirStorage, Storage};

use crate::telegram::{TelegramConfig, TelegramStorage};

/// Connects a Telegram lane.
struct TelegramLane {
    cfg: TelegramConfig,
    lane: String,
}

#[async_trait]
impl Connector for TelegramLane {
    async fn connect(&self) -> Result<Arc<dyn Storage>, StorageError> {
        Ok(Arc::new(self.connect_tg().await?))
    }
}

impl TelegramLane {
    async fn connect_tg(&self) -> Result<TelegramStorage, StorageError> {
        if !self.cfg.session_path.exists() {
            return Err(StorageError::Fatal(format!(
                "no Telegram session at {} for lane {}\nhint: run `storinator-worker login --lane {}`",
                self.cfg.session_path.display(),
                self.lane,
                self.lane
            )));
        }
        TelegramStorage::connect(self.cfg.clone()).await
    }
}

/// The Telegram settings of lane `spec` (its session and chat over the shared settings).
pub fn telegram_config(cfg: &Config, lane: &LaneSpec) -> anyhow::Result<Option<TelegramConfig>> {
    let StorageSpec::Telegram { session, chat } = &lane.spec else {
        return Ok(None);
    };
    let mut t = TelegramConfig::from_config(cfg)?;
    t.session_path = session.clone();
    t.storage_chat = chat.clone();
    if cfg.lanes.len() > 1 {
        // Each lane's uploads and downloads spool apart, so names never collide.
        t.spool_dir = cfg.spool_dir().join(format!("lane-{}", lane.name));
    }
    Ok(Some(t))
}

/// What a lane is, for messages while it is not connected.
fn label(lane: &LaneSpec) -> String {
    match &lane.spec {
        StorageSpec::Dir(p) => format!("dir:{}", p.display()),
        StorageSpec::Telegram { session, chat } => format!(
            "telegram session {} ({})",
            session.display(),
            chat.as_deref().unwrap_or("saved messages")
        ),
    }
}

/// Opens the configured store: the backend itself for one lane, [`Lanes`] for several.
pub async fn open(cfg: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    Ok(open_with_account(cfg).await?.0)
}

/// The configured store, and the Telegram account that sends big `/get` files: the only
/// lane's, or the first Telegram lane that connected.
pub async fn open_with_account(
    cfg: &Config,
) -> anyhow::Result<(Arc<dyn Storage>, Option<TelegramStorage>)> {
    if let [only] = cfg.lanes.as_slice() {
        return Ok(match &only.spec {
            StorageSpec::Dir(path) => (
                Arc::new(
                    DirStorage::open(path)
                        .with_context(|| format!("opening storage dir:{}", path.display()))?,
                ),
                None,
            ),
            StorageSpec::Telegram { .. } => {
                let t = telegram_config(cfg, only)?.expect("a telegram lane");
                if !t.session_path.exists() {
                    anyhow::bail!(
                        "no Telegram session at {}\nhint: run `storinator-worker login` first",
                        t.session_path.display()
                    );
                }
                let tg = TelegramStorage::connect(t).await?;
                (Arc::new(tg.clone()), Some(tg))
            }
        });
    }
    let (lanes, account) = open_lanes(cfg).await?;
    Ok((Arc::new(lanes), account))
}

/// Opens several lanes: each Telegram lane is connected at once; one that fails is logged and
/// left to connect later. Only when no lane connects does it fail.
pub async fn open_lanes(cfg: &Config) -> anyhow::Result<(Lanes, Option<TelegramStorage>)> {
    let mut connecting = tokio::task::JoinSet::new();
    let mut lanes: Vec<Option<Lane>> = Vec::new();
    for (i, spec) in cfg.lanes.iter().enumerate() {
        lanes.push(None);
        match &spec.spec {
            StorageSpec::Dir(path) => {
                let dir = DirStorage::open(path).with_context(|| {
                    format!(
                        "opening storage dir:{} (lane {})",
                        path.display(),
                        spec.name
                    )
                })?;
                lanes[i] = Some(Lane::ready(&spec.name, Arc::new(dir)));
            }
            StorageSpec::Telegram { .. } => {
                let connector = TelegramLane {
                    cfg: telegram_config(cfg, spec)?.expect("a telegram lane"),
                    lane: spec.name.clone(),
                };
                connecting.spawn(async move { (i, connector.connect_tg().await, connector) });
            }
        }
    }
    let mut accounts: Vec<(usize, TelegramStorage)> = Vec::new();
    while let Some(done) = connecting.join_next().await {
        let (i, result, connector) = done.context("connecting a lane")?;
        let spec = &cfg.lanes[i];
        lanes[i] = Some(match result {
            Ok(tg) => {
                accounts.push((i, tg.clone()));
                Lane::ready(&spec.name, Arc::new(tg))
            }
            Err(e) => {
                tracing::warn!(
                    lane = spec.name,
                    "lane does not connect, the others carry on: {e}"
                );
                Lane::lazy(
                    &spec.name,
                    label(spec),
                    Box::new(connector),
                    Some(e.to_string()),
                )
            }
        });
    }
    let lanes: Vec<Lane> = lanes.into_iter().map(|l| l.expect("every lane")).collect();
    if lanes.iter().all(|l| l.connected().is_none()) {
        let why: Vec<String> = lanes
            .iter()
            .map(|l| {
                format!(
                    "lane {}: {}",
                    l.name(),
                    l.last_failure().unwrap_or_default()
                )
            })
            .collect();
        anyhow::bail!("no storage lane connects:\n{}", why.join("\n"));
    }
    let lanes = Lanes::new(lanes, cfg.copies, cfg.spool_dir())?;
    refuse_shared_channels(&lanes)?;
    accounts.sort_by_key(|a| a.0);
    Ok((lanes, accounts.into_iter().next().map(|a| a.1)))
}

/// Two accounts may administer the same channel; as two lanes their copies would not be
/// independent (one deleted channel loses both).
fn refuse_shared_channels(lanes: &Lanes) -> anyhow::Result<()> {
    let mut seen: Vec<(i64, &str)> = Vec::new();
    for l in lanes.lanes() {
        let Some(b) = l.connected() else { continue };
        let d = b.describe();
        let Some(id) = d
            .strip_prefix("telegram:channel -100")
            .and_then(|s| s.parse::<i64>().ok())
        else {
            continue;
        };
        if let Some((_, other)) = seen.iter().find(|(c, _)| *c == id) {
            anyhow::bail!(
                "lanes {other} and {} store in the same channel (-100{id}): copies there would not be independent\nhint: give each lane its own chat in STORINATOR_STORAGE",
                l.name()
            );
        }
        seen.push((id, l.name()));
    }
    Ok(())
}
