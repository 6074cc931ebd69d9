//! The userbot's session on disk: a small JSON file (mode 0600) holding the home DC, the DC
//! addresses with their permanent authorization keys, the self user and known channels.
//!
//! grammers-session's own persistent storage needs its `sqlite-storage` feature (libsql),
//! which we keep off; this implements its `Session` trait over an in-memory `SessionData`
//! and rewrites the file whenever something worth keeping changes. The loopback server
//! (`storinator-testkit`) writes the same format.

use std::collections::HashMap;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use grammers_session::types::{
    ChannelKind, DcOption, PeerAuth, PeerId, PeerInfo, UpdateState, UpdatesState,
};
use grammers_session::{BoxFuture, Session, SessionData};
use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("session file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("session file {path} is not a valid session: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("session lock poisoned")]
    Poisoned,
}

#[derive(Serialize, Deserialize, Default)]
struct FileFormat {
    version: u32,
    home_dc: i32,
    #[serde(default)]
    dcs: Vec<FileDc>,
    #[serde(default)]
    self_user: Option<FileUser>,
    #[serde(default)]
    channels: Vec<FileChannel>,
}

#[derive(Serialize, Deserialize)]
struct FileDc {
    id: i32,
    addr: String,
    #[serde(default)]
    addr6: Option<String>,
    #[serde(default)]
    auth_key: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct FileUser {
    id: i64,
    access_hash: i64,
    #[serde(default)]
    bot: bool,
}

/// A channel known to the session (id and access hash), e.g. the storage channel.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileChannel {
    pub id: i64,
    pub access_hash: i64,
    #[serde(default)]
    pub title: String,
}

pub struct FileSession {
    path: PathBuf,
    data: Mutex<SessionData>,
    titles: Mutex<HashMap<i64, String>>,
    /// Held for a whole save (snapshot, write, rename), so saves never interleave and the
    /// last one to finish holds everything changed before it started.
    saving: Mutex<()>,
}

impl FileSession {
    /// Loads `path`, or starts a fresh session (Telegram's built-in DC list) if it does not
    /// exist yet.
    pub fn load_or_new(path: &Path) -> Result<Self, SessionError> {
        let mut data = SessionData::default();
        let mut titles = HashMap::new();
        match std::fs::read(path) {
            Ok(bytes) => {
                let invalid = |reason: String| SessionError::Invalid {
                    path: path.to_path_buf(),
                    reason,
                };
                let f: FileFormat =
                    serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
                if f.version != 1 {
                    return Err(invalid(format!("unknown version {}", f.version)));
                }
                data.home_dc = f.home_dc;
                for dc in f.dcs {
                    let v4: SocketAddrV4 = match dc.addr.parse::<SocketAddr>() {
                        Ok(SocketAddr::V4(a)) => a,
                        _ => return Err(invalid(format!("bad dc address {:?}", dc.addr))),
                    };
                    let v6 = match dc.addr6.as_deref().map(str::parse::<SocketAddr>) {
                        Some(Ok(SocketAddr::V6(a))) => a,
                        Some(_) => return Err(invalid(format!("bad dc address {:?}", dc.addr6))),
                        None => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
                    };
                    let auth_key = match dc.auth_key {
                        None => None,
                        Some(h) => {
                            let raw = hex::decode(&h).map_err(|e| invalid(e.to_string()))?;
                            Some(<[u8; 256]>::try_from(raw.as_slice()).map_err(|_| {
                                invalid(format!("auth key of dc {} is not 256 bytes", dc.id))
                            })?)
                        }
                    };
                    data.dc_options.insert(
                        dc.id,
                        DcOption {
                            id: dc.id,
                            ipv4: v4,
                            ipv6: v6,
                            auth_key,
                        },
                    );
                }
                if let Some(u) = f.self_user {
                    // grammers panics on ids outside Telegram's ranges: refuse them here.
                    if PeerId::from_bot_api_dialog_id(u.id).is_none() || u.id < 1 {
                        return Err(invalid(format!("user id {} is out of range", u.id)));
                    }
                    let info = PeerInfo::User {
                        id: u.id,
                        auth: Some(PeerAuth::from_hash(u.access_hash)),
                        bot: Some(u.bot),
                        is_self: Some(true),
                    };
                    data.peer_infos.insert(PeerId::self_user(), info.clone());
                    data.peer_infos.insert(info.id(), info);
                }
                for c in f.channels {
                    if PeerId::channel(c.id).is_none() {
                        return Err(invalid(format!("channel id {} is out of range", c.id)));
                    }
                    let info = PeerInfo::Channel {
                        id: c.id,
                        auth: Some(PeerAuth::from_hash(c.access_hash)),
                        kind: Some(ChannelKind::Broadcast),
                    };
                    titles.insert(c.id, c.title);
                    data.peer_infos.insert(info.id(), info);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(SessionError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        }
        Ok(FileSession {
            path: path.to_path_buf(),
            data: Mutex::new(data),
            titles: Mutex::new(titles),
            saving: Mutex::new(()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The signed-in user's id, if the session has one.
    pub fn self_user_id(&self) -> Option<i64> {
        let d = self.data.lock().ok()?;
        d.peer_infos.values().find_map(|p| match p {
            PeerInfo::User {
                id,
                is_self: Some(true),
                ..
            } => Some(*id),
            _ => None,
        })
    }

    /// Channels the session knows (with access hashes).
    pub fn channels(&self) -> Vec<FileChannel> {
        let Ok(d) = self.data.lock() else {
            return vec![];
        };
        let titles = self.titles.lock().map(|t| t.clone()).unwrap_or_default();
        let mut out: Vec<FileChannel> = d
            .peer_infos
            .values()
            .filter_map(|p| match p {
                PeerInfo::Channel {
                    id, auth: Some(a), ..
                } => Some(FileChannel {
                    id: *id,
                    access_hash: a.hash(),
                    title: titles.get(id).cloned().unwrap_or_default(),
                }),
                _ => None,
            })
            .collect();
        out.sort_by_key(|c| c.id);
        out
    }

    /// Remembers a channel (found in the dialogs) and saves the session.
    pub fn remember_channel(&self, c: &FileChannel) -> Result<(), SessionError> {
        {
            let mut d = self.data.lock().map_err(|_| SessionError::Poisoned)?;
            let info = PeerInfo::Channel {
                id: c.id,
                auth: Some(PeerAuth::from_hash(c.access_hash)),
                kind: Some(ChannelKind::Broadcast),
            };
            d.peer_infos.insert(info.id(), info);
            self.titles
                .lock()
                .map_err(|_| SessionError::Poisoned)?
                .insert(c.id, c.title.clone());
        }
        self.save()
    }

    /// The home DC's address and authorization key (for dedicated upload connections).
    pub fn home_dc(&self) -> Option<(SocketAddrV4, [u8; 256])> {
        let d = self.data.lock().ok()?;
        let dc = d.dc_options.get(&d.home_dc)?;
        Some((dc.ipv4, dc.auth_key?))
    }

    /// Writes the session file atomically with mode 0600 (it holds a login credential): into
    /// a new file with a random name created exclusively (O_EXCL, never through an existing
    /// file or symlink) in the same directory, synced, then renamed over the old one. Saves
    /// are serialised.
    pub fn save(&self) -> Result<(), SessionError> {
        let io = |source| SessionError::Io {
            path: self.path.clone(),
            source,
        };
        let _one_at_a_time = self.saving.lock().map_err(|_| SessionError::Poisoned)?;
        let json = self.to_json()?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        // tempfile: random name, O_CREAT|O_EXCL, mode 0600.
        let mut tmp = tempfile::Builder::new()
            .prefix(".session-")
            .suffix(".tmp")
            .tempfile_in(dir)
            .map_err(io)?;
        {
            use std::io::Write;
            tmp.write_all(&json).map_err(io)?;
            tmp.as_file().sync_all().map_err(io)?;
        }
        tmp.persist(&self.path).map_err(|e| io(e.error))?;
        // The rename is durable once the directory is.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn to_json(&self) -> Result<Vec<u8>, SessionError> {
        let d = self.data.lock().map_err(|_| SessionError::Poisoned)?;
        let titles = self.titles.lock().map_err(|_| SessionError::Poisoned)?;
        let mut dcs: Vec<FileDc> = d
            .dc_options
            .values()
            .filter(|dc| dc.auth_key.is_some() || dc.id == d.home_dc)
            .map(|dc| FileDc {
                id: dc.id,
                addr: dc.ipv4.to_string(),
                addr6: Some(dc.ipv6.to_string()),
                auth_key: dc.auth_key.map(hex::encode),
            })
            .collect();
        dcs.sort_by_key(|d| d.id);
        let mut f = FileFormat {
            version: 1,
            home_dc: d.home_dc,
            dcs,
            ..Default::default()
        };
        for p in d.peer_infos.values() {
            match p {
                PeerInfo::User {
                    id,
                    auth: Some(a),
                    bot,
                    is_self: Some(true),
                } => {
                    f.self_user = Some(FileUser {
                        id: *id,
                        access_hash: a.hash(),
                        bot: bot.unwrap_or(false),
                    })
                }
                PeerInfo::Channel {
                    id, auth: Some(a), ..
                } => f.channels.push(FileChannel {
                    id: *id,
                    access_hash: a.hash(),
                    title: titles.get(id).cloned().unwrap_or_default(),
                }),
                _ => {}
            }
        }
        f.channels.sort_by_key(|c| c.id);
        Ok(serde_json::to_vec_pretty(&f).expect("session serializes"))
    }
}

impl Session for FileSession {
    type Error = SessionError;

    fn home_dc_id(&self) -> Result<i32, SessionError> {
        Ok(self
            .data
            .lock()
            .map_err(|_| SessionError::Poisoned)?
            .home_dc)
    }

    fn set_home_dc_id(&self, dc_id: i32) -> BoxFuture<'_, Result<(), SessionError>> {
        Box::pin(async move {
            let changed = {
                let mut d = self.data.lock().map_err(|_| SessionError::Poisoned)?;
                std::mem::replace(&mut d.home_dc, dc_id) != dc_id
            };
            if changed { self.save() } else { Ok(()) }
        })
    }

    fn dc_option(&self, dc_id: i32) -> Result<Option<DcOption>, SessionError> {
        Ok(self
            .data
            .lock()
            .map_err(|_| SessionError::Poisoned)?
            .dc_options
            .get(&dc_id)
            .cloned())
    }

    fn set_dc_option(&self, dc_option: &DcOption) -> BoxFuture<'_, Result<(), SessionError>> {
        let dc_option = dc_option.clone();
        Box::pin(async move {
            let changed = {
                let mut d = self.data.lock().map_err(|_| SessionError::Poisoned)?;
                d.dc_options.insert(dc_option.id, dc_option.clone()) != Some(dc_option)
            };
            if changed { self.save() } else { Ok(()) }
        })
    }

    fn peer(&self, peer: PeerId) -> BoxFuture<'_, Result<Option<PeerInfo>, SessionError>> {
        Box::pin(async move {
            let d = self.data.lock().map_err(|_| SessionError::Poisoned)?;
            Ok(d.peer_infos.get(&peer).cloned())
        })
    }

    fn cache_peer(&self, peer: PeerInfo) -> BoxFuture<'_, Result<(), SessionError>> {
        Box::pin(async move {
            let worth_saving = {
                let mut d = self.data.lock().map_err(|_| SessionError::Poisoned)?;
                let is_self = matches!(
                    peer,
                    PeerInfo::User {
                        is_self: Some(true),
                        ..
                    }
                );
                if is_self {
                    d.peer_infos.insert(PeerId::self_user(), peer.clone());
                }
                let entry = d
                    .peer_infos
                    .entry(peer.id())
                    .or_insert_with(|| peer.clone());
                let changed = entry.extend_info(&peer);
                (is_self || matches!(peer, PeerInfo::Channel { .. })) && changed
            };
            if worth_saving { self.save() } else { Ok(()) }
        })
    }

    fn updates_state(&self) -> BoxFuture<'_, Result<UpdatesState, SessionError>> {
        Box::pin(async move {
            Ok(self
                .data
                .lock()
                .map_err(|_| SessionError::Poisoned)?
                .updates_state
                .clone())
        })
    }

    fn set_update_state(&self, update: UpdateState) -> BoxFuture<'_, Result<(), SessionError>> {
        // The worker never consumes updates; keep the state in memory only.
        Box::pin(async move {
            let mut d = self.data.lock().map_err(|_| SessionError::Poisoned)?;
            if let UpdateState::All(s) = update {
                d.updates_state = s;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn channel(i: i64) -> FileChannel {
        FileChannel {
            id: 1_000 + i,
            access_hash: i,
            title: format!("c{i}"),
        }
    }

    #[test]
    fn save_never_writes_through_a_planted_file_or_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.session");
        // Someone who can write the directory plants the old predictable temp names: a
        // symlink to a file of theirs to overwrite, and a world-readable file.
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, path.with_extension("tmp")).unwrap();
        let open = dir.path().join("worker.session.tmp");
        std::fs::write(&open, b"").unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();

        let s = FileSession::load_or_new(&path).unwrap();
        s.remember_channel(&channel(1)).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(
            meta.file_type().is_file(),
            "the session is a file of its own"
        );
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        let again = FileSession::load_or_new(&path).unwrap();
        assert_eq!(again.channels(), vec![channel(1)]);
        // Nothing of ours is left behind besides the session.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with(".session-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn concurrent_saves_keep_every_change_and_never_tear_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("worker.session");
        let s = std::sync::Arc::new(FileSession::load_or_new(&path).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        s.remember_channel(&channel(t * 100 + i)).unwrap();
                    }
                })
            })
            .collect();
        // Meanwhile a reader always finds a whole, valid session.
        let reader = {
            let path = path.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    if path.exists() {
                        FileSession::load_or_new(&path).expect("a whole session file");
                    }
                }
            })
        };
        for t in threads {
            t.join().unwrap();
        }
        reader.join().unwrap();
        let saved = FileSession::load_or_new(&path).unwrap().channels();
        assert_eq!(saved.len(), 40, "the last save holds every channel");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
