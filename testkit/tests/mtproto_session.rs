//! The loopback's MTProto session layer, seen from a raw client that shows every message
//! the server sends (grammers hides these): server salts and bad_server_salt, future salts,
//! new_session_created, seq_no parity, message ids checked against the clock, the
//! initConnection and invokeWithLayer rules, unknown keys and ping_delay_disconnect.

use std::time::Duration;

use grammers_crypto::{AuthKey, DequeBuffer};
use grammers_tl_types::{self as tl, Cursor, Deserializable, Identifiable, Serializable};
use storinator_testkit::mtproto::wire;
use storinator_testkit::mtproto::{LoopbackOptions, LoopbackTelegram};
use tokio::net::TcpStream;

/// One message from the server.
#[derive(Debug)]
struct Msg {
    msg_id: i64,
    seq_no: i32,
    salt: i64,
    body: Vec<u8>,
}

impl Msg {
    fn constructor(&self) -> u32 {
        u32::from_le_bytes(self.body[..4].try_into().unwrap())
    }
}

struct Raw {
    stream: TcpStream,
    key: AuthKey,
    session: i64,
    salt: i64,
    seq_out: i32,
    seq_in: i32,
    content: i32,
    last_id: i64,
}

impl Raw {
    async fn connect(server: &LoopbackTelegram, key: [u8; 256]) -> Raw {
        Raw {
            stream: TcpStream::connect(server.addr()).await.unwrap(),
            key: AuthKey::from_bytes(key),
            session: 0x5e55_1011,
            salt: 0,
            seq_out: 0,
            seq_in: 0,
            content: 0,
            last_id: 0,
        }
    }

    fn next_msg_id(&mut self, secs_offset: i64) -> i64 {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + secs_offset;
        let id = if secs_offset < 0 {
            secs << 32
        } else {
            (secs << 32).max(self.last_id + 4) & !3
        };
        self.last_id = id;
        id
    }

    async fn send_with(&mut self, body: &[u8], secs_offset: i64) -> i64 {
        let msg_id = self.next_msg_id(secs_offset);
        self.content += 1;
        let seq_no = self.content * 2 - 1;
        let mut buf = DequeBuffer::with_capacity(body.len() + 64, 64);
        buf.extend(self.salt.to_le_bytes());
        buf.extend(self.session.to_le_bytes());
        buf.extend(msg_id.to_le_bytes());
        buf.extend(seq_no.to_le_bytes());
        buf.extend((body.len() as i32).to_le_bytes());
        buf.extend(body.iter().copied());
        grammers_crypto::encrypt_data_v2(&mut buf, &self.key);
        wire::write_frame(&mut self.stream, &mut self.seq_out, buf.as_ref())
            .await
            .unwrap();
        msg_id
    }

    async fn send(&mut self, body: &[u8]) -> i64 {
        self.send_with(body, 0).await
    }

    async fn recv(&mut self) -> Msg {
        let mut frame = tokio::time::timeout(
            Duration::from_secs(10),
            wire::read_frame(&mut self.stream, &mut self.seq_in),
        )
        .await
        .expect("an answer")
        .unwrap();
        let plain = grammers_crypto::decrypt_data_v2(&mut frame, &self.key).unwrap();
        let mut c = Cursor::from_slice(plain);
        let salt = i64::deserialize(&mut c).unwrap();
        let session = i64::deserialize(&mut c).unwrap();
        assert_eq!(session, self.session, "the server answers in our session");
        let msg_id = i64::deserialize(&mut c).unwrap();
        let seq_no = i32::deserialize(&mut c).unwrap();
        let len = i32::deserialize(&mut c).unwrap() as usize;
        let body = plain[32..32 + len].to_vec();
        Msg {
            msg_id,
            seq_no,
            salt,
            body,
        }
    }
}

fn init(layer: i32) -> Vec<u8> {
    tl::functions::InvokeWithLayer {
        layer,
        query: tl::functions::InitConnection {
            api_id: 1,
            device_model: "raw".into(),
            system_version: "test".into(),
            app_version: "0".into(),
            system_lang_code: "en".into(),
            lang_pack: "".into(),
            lang_code: "en".into(),
            proxy: None,
            params: None,
            query: tl::functions::help::GetConfig {},
        },
    }
    .to_bytes()
}

/// The rpc_result's answer, or panics.
fn result_of(m: &Msg, req: i64) -> &[u8] {
    assert_eq!(m.constructor(), wire::RPC_RESULT, "{m:?}");
    assert_eq!(i64::from_le_bytes(m.body[4..12].try_into().unwrap()), req);
    &m.body[12..]
}

fn rpc_error(answer: &[u8]) -> String {
    match tl::enums::RpcError::from_bytes(answer) {
        Ok(tl::enums::RpcError::Error(e)) => format!("{} {}", e.error_code, e.error_message),
        Err(_) => "not an error".into(),
    }
}

#[tokio::test]
async fn salts_sessions_and_sequence_numbers_follow_mtproto() {
    let server = LoopbackTelegram::start(LoopbackOptions::default())
        .await
        .unwrap();
    let mut raw = Raw::connect(&server, server.auth_key()).await;

    // Salt 0 is not this server's: the message is refused with the right salt.
    let first = raw.send(&init(tl::LAYER)).await;
    let m = raw.recv().await;
    let tl::enums::BadMsgNotification::BadServerSalt(bad) =
        tl::enums::BadMsgNotification::from_bytes(&m.body).unwrap()
    else {
        panic!("expected bad_server_salt, got {m:?}")
    };
    assert_eq!((bad.bad_msg_id, bad.error_code), (first, 48));
    assert_ne!(bad.new_server_salt, 0);
    assert_eq!(m.seq_no % 2, 0, "a notification is not content-related");
    assert_eq!(server.counters().get("help.getConfig"), 0, "nothing ran");

    // Under the right salt: a new session is announced, then the answer.
    raw.salt = bad.new_server_salt;
    let req = raw.send(&init(tl::LAYER)).await;
    let created = raw.recv().await;
    let tl::enums::NewSession::Created(ns) =
        tl::enums::NewSession::from_bytes(&created.body).unwrap();
    assert_eq!((ns.first_msg_id, ns.server_salt), (req, raw.salt));
    assert_eq!(created.msg_id % 4, 3, "a message the server started");
    let answer = raw.recv().await;
    tl::enums::Config::from_bytes(result_of(&answer, req)).unwrap();
    assert_eq!(answer.msg_id % 4, 1, "an answer");
    assert_eq!(answer.salt, raw.salt);

    // Pings and salts are content-related too: odd seq_no, counting up.
    let ping = raw
        .send(&tl::functions::Ping { ping_id: 77 }.to_bytes())
        .await;
    let pong = raw.recv().await;
    let tl::enums::Pong::Pong(p) = tl::enums::Pong::from_bytes(&pong.body).unwrap();
    assert_eq!((p.msg_id, p.ping_id), (ping, 77));
    let salts_req = raw
        .send(&tl::functions::GetFutureSalts { num: 3 }.to_bytes())
        .await;
    let salts = raw.recv().await;
    let seqs = [created.seq_no, answer.seq_no, pong.seq_no, salts.seq_no];
    assert_eq!(seqs, [1, 3, 5, 7], "odd and increasing");
    let tl::enums::FutureSalts::Salts(fs) =
        tl::enums::FutureSalts::from_bytes(&salts.body).unwrap();
    assert_eq!(fs.req_msg_id, salts_req);
    assert_eq!(fs.salts.0.len(), 3);
    let now = fs.now;
    assert!(fs.salts.0[0].valid_since <= now && now < fs.salts.0[0].valid_until);
    assert_eq!(fs.salts.0[0].salt, raw.salt);
    assert!(
        fs.salts
            .0
            .windows(2)
            .all(|w| w[0].valid_since < w[1].valid_since)
    );

    // New salts: the old one is refused again, with the new one.
    server.rotate_salts();
    let again = raw
        .send(&tl::functions::Ping { ping_id: 78 }.to_bytes())
        .await;
    let m = raw.recv().await;
    let tl::enums::BadMsgNotification::BadServerSalt(bad) =
        tl::enums::BadMsgNotification::from_bytes(&m.body).unwrap()
    else {
        panic!("expected bad_server_salt, got {m:?}")
    };
    assert_eq!(bad.bad_msg_id, again);
    assert_ne!(bad.new_server_salt, raw.salt);
    assert_eq!(server.counters().get("bad_server_salt"), 2);
    assert_eq!(server.counters().get("new_session_created"), 1);
}

#[tokio::test]
async fn calls_need_init_connection_in_the_servers_layer_and_a_sane_msg_id() {
    let server = LoopbackTelegram::start(LoopbackOptions::default())
        .await
        .unwrap();
    let mut raw = Raw::connect(&server, server.auth_key()).await;
    raw.send(&tl::functions::Ping { ping_id: 1 }.to_bytes())
        .await;
    let tl::enums::BadMsgNotification::BadServerSalt(bad) =
        tl::enums::BadMsgNotification::from_bytes(&raw.recv().await.body).unwrap()
    else {
        panic!("expected bad_server_salt")
    };
    raw.salt = bad.new_server_salt;

    // A call before initConnection.
    let req = raw
        .send(&tl::functions::help::GetConfig {}.to_bytes())
        .await;
    let _created = raw.recv().await;
    assert_eq!(
        rpc_error(result_of(&raw.recv().await, req)),
        "400 CONNECTION_NOT_INITED"
    );
    // A layer the server does not speak.
    let req = raw.send(&init(1)).await;
    assert_eq!(
        rpc_error(result_of(&raw.recv().await, req)),
        "400 CONNECTION_LAYER_INVALID"
    );
    assert_eq!(server.counters().get("layer:1"), 1);
    // Its own layer: served, and the session is initialised for what follows.
    let req = raw.send(&init(tl::LAYER)).await;
    assert_eq!(rpc_error(result_of(&raw.recv().await, req)), "not an error");
    let req = raw
        .send(&tl::functions::help::GetConfig {}.to_bytes())
        .await;
    assert_eq!(rpc_error(result_of(&raw.recv().await, req)), "not an error");
    assert_eq!(server.counters().get(&format!("layer:{}", tl::LAYER)), 1);

    // A message id from ten minutes ago: bad_msg_notification 16 (msg_id too low).
    let old = raw
        .send_with(&tl::functions::Ping { ping_id: 2 }.to_bytes(), -600)
        .await;
    let m = raw.recv().await;
    let tl::enums::BadMsgNotification::Notification(n) =
        tl::enums::BadMsgNotification::from_bytes(&m.body).unwrap()
    else {
        panic!("expected bad_msg_notification")
    };
    assert_eq!((n.bad_msg_id, n.error_code), (old, 16));
}

#[tokio::test]
async fn a_key_the_data_centre_does_not_know_gets_transport_error_404() {
    let server = LoopbackTelegram::start(LoopbackOptions::default())
        .await
        .unwrap();
    // Data centre 4's key on data centre 2.
    let mut raw = Raw::connect(&server, server.auth_key_of(4).unwrap()).await;
    raw.send(&init(tl::LAYER)).await;
    let mut status = [0u8; 4];
    tokio::io::AsyncReadExt::read_exact(&mut raw.stream, &mut status)
        .await
        .unwrap();
    assert_eq!(i32::from_le_bytes(status), -404);
}

#[tokio::test]
async fn ping_delay_disconnect_closes_a_silent_connection() {
    let server = LoopbackTelegram::start(LoopbackOptions::default())
        .await
        .unwrap();
    let mut raw = Raw::connect(&server, server.auth_key()).await;
    let ping = tl::functions::PingDelayDisconnect {
        ping_id: 5,
        disconnect_delay: 1,
    }
    .to_bytes();
    raw.send(&ping).await;
    let tl::enums::BadMsgNotification::BadServerSalt(bad) =
        tl::enums::BadMsgNotification::from_bytes(&raw.recv().await.body).unwrap()
    else {
        panic!("expected bad_server_salt")
    };
    raw.salt = bad.new_server_salt;
    raw.send(&ping).await;
    let _created = raw.recv().await;
    assert_eq!(
        raw.recv().await.constructor(),
        tl::types::Pong::CONSTRUCTOR_ID
    );
    let started = tokio::time::Instant::now();
    // Waiting for the deadline costs no CPU (a connection that spun would burn a core).
    let cpu = cpu_ticks();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let used = cpu_ticks() - cpu;
    assert!(used < 30, "{used} ticks of CPU while idle");
    let mut buf = [0u8; 1];
    let n = tokio::io::AsyncReadExt::read(&mut raw.stream, &mut buf)
        .await
        .unwrap_or(0);
    assert_eq!(n, 0, "closed");
    let after = started.elapsed();
    assert!(
        after >= Duration::from_millis(900) && after <= Duration::from_secs(5),
        "closed after {after:?}"
    );
}

/// User and system CPU time of this process, in clock ticks (/proc/self/stat).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let after_name = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after_name.split_whitespace().collect();
    // Fields 14 and 15 of the line; the name (field 2) was cut, so 11 and 12 here.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}
