//! The MTProto session layer, as Telegram runs it: message ids checked against the clock,
//! server salts (a wrong one is answered `bad_server_salt` with the right one, and
//! `get_future_salts` lists the coming ones), `new_session_created` on a session's first
//! message, pings (with `ping_delay_disconnect`), and the wrappers of a call:
//! `invokeWithLayer` (its layer is checked and recorded) and `initConnection` (required once per
//! session: CONNECTION_NOT_INITED otherwise). Content-related messages the server sends
//! (answers, pongs, salts, notifications of new sessions) carry odd seq_no, the others even.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use grammers_tl_types::{self as tl, Cursor, Deserializable, Serializable};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::dispatch;
use super::server::{Outcome, Server, err};
use super::wire::{self, ClientMessage};

/// What the server knows of one MTProto session (per data centre and session id).
#[derive(Clone, Debug, Default)]
pub(crate) struct SessionInfo {
    pub layer: Option<i32>,
    pub inited: bool,
}

/// A message on its way to the client.
pub(crate) struct Out {
    pub body: Vec<u8>,
    pub content_related: bool,
    pub server_initiated: bool,
    pub session: i64,
    pub queued: Instant,
}

/// One connection as the session layer sees it.
pub(crate) struct Ctx {
    pub server: Arc<Server>,
    pub dc: i32,
    pub out: mpsc::UnboundedSender<Out>,
    /// Set to close the connection (a DropConnection fault).
    pub kill: watch::Sender<bool>,
    /// When the connection closes unless another ping comes (ping_delay_disconnect).
    pub deadline: watch::Sender<Option<Instant>>,
}

impl Ctx {
    fn send(&self, session: i64, body: Vec<u8>, content_related: bool, server_initiated: bool) {
        let _ = self.out.send(Out {
            body,
            content_related,
            server_initiated,
            session,
            queued: Instant::now(),
        });
    }
}

const MSGS_ACK: u32 = 0x62d6b459;
const PING: u32 = 0x7abe77ec;
const PING_DELAY_DISCONNECT: u32 = 0xf3427b8c;
const GET_FUTURE_SALTS: u32 = 0xb921bd04;
const DESTROY_SESSION: u32 = 0xe7512126;
const HTTP_WAIT: u32 = 0x9299359f;
const INVOKE_WITH_LAYER: u32 = 0xda9b0d0d;
const INIT_CONNECTION: u32 = 0xc1cd5ea9;
const INVOKE_WITHOUT_UPDATES: u32 = 0xbf9459b7;

/// Salts change every half hour; each is valid for an hour, so two overlap.
const SALT_PERIOD: i64 = 1800;

fn real_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The server salt of data centre `dc` for salt period `period`: a keyed hash, so it is
/// stable across restarts and unknown to anyone without the key.
pub(crate) fn salt_for(server: &Server, dc: i32, period: i64) -> i64 {
    let key = server.dc(dc).map(|d| d.key.data).unwrap_or([0; 256]);
    let epoch = server.salt_epoch.load(std::sync::atomic::Ordering::Relaxed);
    let h = Sha256::new()
        .chain_update(key)
        .chain_update(epoch.to_le_bytes())
        .chain_update(period.to_le_bytes())
        .finalize();
    i64::from_le_bytes(h[..8].try_into().unwrap()) | 1
}

fn period_now(server: &Server) -> i64 {
    i64::from(server.now_unix()) / SALT_PERIOD
}

pub(crate) fn current_salt(server: &Server, dc: i32) -> i64 {
    salt_for(server, dc, period_now(server))
}

fn salt_ok(server: &Server, dc: i32, salt: i64) -> bool {
    let p = period_now(server);
    salt == salt_for(server, dc, p) || salt == salt_for(server, dc, p - 1)
}

/// bad_msg_notification error code for a client msg_id, if it is wrong: 16 too old (more than
/// 300 s behind the server clock), 17 too new (30 s ahead), 18 not divisible by 4.
fn bad_msg_id(msg_id: i64) -> Option<i32> {
    let secs = msg_id >> 32;
    let now = real_unix();
    if msg_id % 4 != 0 {
        Some(18)
    } else if secs < now - 300 {
        Some(16)
    } else if secs > now + 30 {
        Some(17)
    } else {
        None
    }
}

/// Handles one decrypted packet: `top` is the client's top-level message.
pub(crate) fn on_packet(ctx: &Arc<Ctx>, salt: i64, session: i64, top: ClientMessage) {
    let server = &ctx.server;
    if let Some(code) = bad_msg_id(top.msg_id) {
        server.counters.bump("bad_msg_notification");
        let body = tl::enums::BadMsgNotification::Notification(tl::types::BadMsgNotification {
            bad_msg_id: top.msg_id,
            bad_msg_seqno: top.seq_no,
            error_code: code,
        })
        .to_bytes();
        ctx.send(session, body, false, false);
        return;
    }
    if !salt_ok(server, ctx.dc, salt) {
        // The message is not processed; the client resends it under the salt given here.
        server.counters.bump("bad_server_salt");
        let body = tl::enums::BadMsgNotification::BadServerSalt(tl::types::BadServerSalt {
            bad_msg_id: top.msg_id,
            bad_msg_seqno: top.seq_no,
            error_code: 48,
            new_server_salt: current_salt(server, ctx.dc),
        })
        .to_bytes();
        ctx.send(session, body, false, false);
        return;
    }
    let created = {
        let mut s = server.sessions.lock().unwrap();
        let new = !s.contains_key(&(ctx.dc, session));
        s.entry((ctx.dc, session)).or_default();
        new
    };
    if created {
        server.counters.bump("new_session_created");
        let body = tl::enums::NewSession::Created(tl::types::NewSessionCreated {
            first_msg_id: top.msg_id,
            unique_id: super::server::rnd_i64(),
            server_salt: current_salt(server, ctx.dc),
        })
        .to_bytes();
        ctx.send(session, body, true, true);
    }
    let mut msgs = Vec::new();
    if wire::flatten(top, &mut msgs).is_err() {
        let _ = ctx.kill.send(true);
        return;
    }
    for m in msgs {
        on_message(ctx, session, m);
    }
}

fn on_message(ctx: &Arc<Ctx>, session: i64, m: ClientMessage) {
    let server = &ctx.server;
    match wire::constructor(&m.body) {
        Some(MSGS_ACK) | Some(DESTROY_SESSION) | Some(HTTP_WAIT) | None => {}
        Some(id @ (PING | PING_DELAY_DISCONNECT)) => {
            server.counters.bump("ping");
            let mut c = Cursor::from_slice(&m.body[4..]);
            let ping_id = i64::deserialize(&mut c).unwrap_or(0);
            if id == PING_DELAY_DISCONNECT {
                let delay = i32::deserialize(&mut c).unwrap_or(75).max(1);
                let at = Instant::now() + Duration::from_secs(delay as u64);
                let _ = ctx.deadline.send(Some(at));
            }
            let pong = tl::enums::Pong::Pong(tl::types::Pong {
                msg_id: m.msg_id,
                ping_id,
            });
            ctx.send(session, pong.to_bytes(), true, false);
        }
        Some(GET_FUTURE_SALTS) => {
            server.counters.bump("get_future_salts");
            let num = i32::from_bytes(m.body.get(4..8).unwrap_or(&[1, 0, 0, 0]))
                .unwrap_or(1)
                .clamp(1, 64);
            let first = period_now(server);
            let salts = (0..i64::from(num))
                .map(|i| {
                    let p = first + i;
                    tl::types::FutureSalt {
                        valid_since: (p * SALT_PERIOD) as i32,
                        valid_until: ((p + 2) * SALT_PERIOD) as i32,
                        salt: salt_for(server, ctx.dc, p),
                    }
                })
                .collect();
            let body = tl::enums::FutureSalts::Salts(tl::types::FutureSalts {
                req_msg_id: m.msg_id,
                now: server.now_unix(),
                salts: tl::RawVec(salts),
            })
            .to_bytes();
            ctx.send(session, body, true, false);
        }
        Some(_) => {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                let outcome = call(&ctx, session, &m).await;
                let result = match outcome {
                    Outcome::Reply(b) => b,
                    Outcome::Error(code, message) => {
                        tl::enums::RpcError::Error(tl::types::RpcError {
                            error_code: code,
                            error_message: message,
                        })
                        .to_bytes()
                    }
                    Outcome::Hang => return,
                    Outcome::Drop => {
                        let _ = ctx.kill.send(true);
                        return;
                    }
                };
                let mut body = Vec::with_capacity(result.len() + 12);
                body.extend_from_slice(&wire::RPC_RESULT.to_le_bytes());
                body.extend_from_slice(&m.msg_id.to_le_bytes());
                body.extend_from_slice(&result);
                ctx.send(session, body, true, false);
            });
        }
    }
}

/// A call with its wrappers taken off.
struct Unwrapped<'a> {
    layer: Option<i32>,
    init: bool,
    query: &'a [u8],
}

/// Strips invokeWithLayer / initConnection / invokeWithoutUpdates wrappers.
fn unwrap(body: &[u8]) -> Result<Unwrapped<'_>, String> {
    let mut u = Unwrapped {
        layer: None,
        init: false,
        query: body,
    };
    loop {
        match wire::constructor(u.query) {
            Some(INVOKE_WITH_LAYER) if u.query.len() >= 8 => {
                u.layer = Some(i32::from_le_bytes(u.query[4..8].try_into().unwrap()));
                u.query = &u.query[8..];
            }
            Some(INVOKE_WITHOUT_UPDATES) => u.query = &u.query[4..],
            Some(INIT_CONNECTION) => {
                let mut c = Cursor::from_slice(&u.query[4..]);
                let flags = u32::deserialize(&mut c).map_err(|e| e.to_string())?;
                if flags & 3 != 0 {
                    return Err("initConnection with proxy/params is not supported".into());
                }
                i32::deserialize(&mut c).map_err(|e| e.to_string())?;
                for _ in 0..6 {
                    String::deserialize(&mut c).map_err(|e| e.to_string())?;
                }
                u.init = true;
                u.query = &u.query[4 + c.pos()..];
            }
            Some(wire::GZIP_PACKED) => {
                return Err("gzip_packed inside a wrapper is not supported".into());
            }
            _ => return Ok(u),
        }
    }
}

/// Runs a call after the session-level checks.
async fn call(ctx: &Ctx, session: i64, m: &ClientMessage) -> Outcome {
    let server = &ctx.server;
    let u = match unwrap(&m.body) {
        Ok(u) if u.query.len() >= 4 => u,
        _ => return err(400, "INPUT_REQUEST_INVALID"),
    };
    if let Some(layer) = u.layer {
        server.counters.bump(&format!("layer:{layer}"));
        // Telegram answers each client in its own layer; the loopback speaks only the one
        // its TL types were generated for, so any other is refused rather than misread.
        if layer != tl::LAYER {
            return err(400, "CONNECTION_LAYER_INVALID");
        }
    }
    {
        let mut sessions = server.sessions.lock().unwrap();
        let s = sessions.entry((ctx.dc, session)).or_default();
        if let Some(layer) = u.layer {
            s.layer = Some(layer);
        }
        if u.init {
            s.inited = true;
        } else if !s.inited {
            return err(400, "CONNECTION_NOT_INITED");
        }
    }
    dispatch::run(server, ctx.dc, u.query, m.gzipped).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msg_ids_are_checked_against_the_clock() {
        let now = real_unix();
        assert_eq!(bad_msg_id(now << 32), None);
        assert_eq!(bad_msg_id(((now - 400) << 32) & !3), Some(16));
        assert_eq!(bad_msg_id(((now + 60) << 32) & !3), Some(17));
        assert_eq!(bad_msg_id((now << 32) | 1), Some(18));
    }
}
