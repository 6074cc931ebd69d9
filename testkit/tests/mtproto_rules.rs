//! The loopback server enforces Telegram's rules the way Telegram answers them, checked with
//! the unmodified grammers client (default settings, so requests of 512 bytes or more arrive
//! gzip_packed) and raw API calls.

use std::sync::Arc;
use std::time::Duration;

use grammers_client::Client;
use grammers_client::sender::{ConnectionParams, NoRetries, SenderPool};
use grammers_client::session::storages::MemorySession;
use grammers_client::session::types::{DcOption, PeerAuth, PeerInfo};
use grammers_client::session::{Session, SessionData};
use grammers_client::tl;
use grammers_mtsender::InvocationError;
use storinator_testkit::mtproto::{LoopbackOptions, LoopbackTelegram};

struct Conn {
    server: LoopbackTelegram,
    client: Client,
    session: Arc<MemorySession>,
    _runner: tokio::task::JoinHandle<()>,
}

async fn connect(opts: LoopbackOptions) -> Conn {
    let server = LoopbackTelegram::start(opts).await.unwrap();
    let (conn, _updates) = client_for(server, |_| {});
    conn
}

/// A grammers client on `server` with every data centre's key and the self user in its
/// session; `tweak` adjusts the session first. Returns its updates too.
fn client_for(
    server: LoopbackTelegram,
    tweak: impl FnOnce(&mut SessionData),
) -> (
    Conn,
    tokio::sync::mpsc::Receiver<grammers_client::session::updates::UpdatesLike>,
) {
    let mut data = SessionData {
        home_dc: 2,
        ..Default::default()
    };
    for dc in [2, 4] {
        let v4 = match server.dc_addr(dc).unwrap() {
            std::net::SocketAddr::V4(a) => a,
            _ => unreachable!(),
        };
        data.dc_options.insert(
            dc,
            DcOption {
                id: dc,
                ipv4: v4,
                ipv6: std::net::SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
                auth_key: server.auth_key_of(dc),
            },
        );
    }
    let me = PeerInfo::User {
        id: server.self_user_id(),
        auth: Some(PeerAuth::from_hash(server.self_access_hash())),
        bot: Some(false),
        is_self: Some(true),
    };
    data.peer_infos.insert(me.id(), me.clone());
    data.peer_infos
        .insert(grammers_client::session::types::PeerId::self_user(), me);
    for c in server.channels() {
        let info = PeerInfo::Channel {
            id: c.id,
            auth: Some(PeerAuth::from_hash(c.access_hash)),
            kind: Some(grammers_client::session::types::ChannelKind::Broadcast),
        };
        data.peer_infos.insert(info.id(), info);
    }
    tweak(&mut data);
    let session = Arc::new(MemorySession::from(data));
    let pool = SenderPool::with_configuration(
        session.clone(),
        1,
        ConnectionParams {
            retry_policy: Box::new(NoRetries),
            ..Default::default()
        },
    );
    let client = Client::new(pool.handle);
    let runner = tokio::spawn(pool.runner.run());
    (
        Conn {
            server,
            client,
            session,
            _runner: runner,
        },
        pool.updates,
    )
}

fn rpc_name(e: InvocationError) -> String {
    match e {
        InvocationError::Rpc(r) => match r.value {
            Some(v) if r.name.starts_with("FILE_PART") => {
                format!("{}_{v}_MISSING", r.name.trim_end_matches("_MISSING"))
            }
            Some(v) => format!("{}_{v}", r.name),
            None => r.name,
        },
        other => panic!("expected an rpc error, got {other}"),
    }
}

fn send(file: tl::enums::InputFile, random_id: i64) -> tl::functions::messages::SendMedia {
    tl::functions::messages::SendMedia {
        silent: false,
        background: false,
        clear_draft: false,
        noforwards: false,
        update_stickersets_order: false,
        invert_media: false,
        allow_paid_floodskip: false,
        peer: tl::enums::InputPeer::PeerSelf,
        reply_to: None,
        media: tl::enums::InputMedia::UploadedDocument(tl::types::InputMediaUploadedDocument {
            nosound_video: false,
            force_file: true,
            spoiler: false,
            file,
            thumb: None,
            mime_type: "application/octet-stream".into(),
            attributes: vec![],
            stickers: None,
            video_cover: None,
            video_timestamp: None,
            ttl_seconds: None,
        }),
        message: String::new(),
        random_id,
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

fn small(id: i64, parts: i32, name: &str) -> tl::enums::InputFile {
    tl::enums::InputFile::File(tl::types::InputFile {
        id,
        parts,
        name: name.into(),
        md5_checksum: String::new(),
    })
}

async fn part(
    c: &Client,
    file_id: i64,
    file_part: i32,
    bytes: Vec<u8>,
) -> Result<bool, InvocationError> {
    c.invoke(&tl::functions::upload::SaveFilePart {
        file_id,
        file_part,
        bytes,
    })
    .await
}

fn doc_of(updates: tl::enums::Updates) -> tl::types::Document {
    let tl::enums::Updates::Updates(u) = updates else {
        panic!("expected updates")
    };
    for up in u.updates {
        if let tl::enums::Update::NewMessage(n) = up
            && let tl::enums::Message::Message(m) = n.message
            && let Some(tl::enums::MessageMedia::Document(d)) = m.media
            && let Some(tl::enums::Document::Document(d)) = d.document
        {
            return d;
        }
    }
    panic!("no document in the answer")
}

async fn bounded<F: std::future::Future<Output = ()>>(f: F) {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .expect("test took too long");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_rewrites_dc_options_to_loopback_only() {
    bounded(async {
        let c = connect(LoopbackOptions::default()).await;
        let me = c
            .client
            .invoke(&tl::functions::users::GetUsers {
                id: vec![tl::enums::InputUser::UserSelf],
            })
            .await
            .unwrap();
        assert_eq!(me.len(), 1);
        let dc = c.session.dc_option(2).unwrap().unwrap();
        assert_eq!(std::net::SocketAddr::V4(dc.ipv4), c.server.addr());
        assert_eq!(c.server.counters().get("help.getConfig"), 1);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_rules() {
    bounded(async {
        let c = connect(LoopbackOptions::default()).await;
        let cl = &c.client;
        // Parts over 512 KiB are refused outright.
        let e = part(cl, 1, 0, vec![0; 512 * 1024 + 1024])
            .await
            .unwrap_err();
        assert_eq!(rpc_name(e), "FILE_PART_TOO_BIG");
        // A missing part is named at send time.
        part(cl, 2, 0, vec![1; 1024]).await.unwrap();
        part(cl, 2, 2, vec![1; 10]).await.unwrap();
        let e = cl.invoke(&send(small(2, 3, "a"), 1)).await.unwrap_err();
        assert_eq!(rpc_name(e), "FILE_PART_1_MISSING");
        // Non-final parts must divide 512 KiB and be 1 KiB multiples.
        part(cl, 3, 0, vec![1; 1000]).await.unwrap();
        part(cl, 3, 1, vec![1; 10]).await.unwrap();
        let e = cl.invoke(&send(small(3, 2, "b"), 2)).await.unwrap_err();
        assert_eq!(rpc_name(e), "FILE_PART_SIZE_INVALID");
        // More than 4000 parts is refused.
        let e = cl
            .invoke(&tl::functions::upload::SaveBigFilePart {
                file_id: 4,
                file_part: 0,
                file_total_parts: 4001,
                bytes: vec![0; 1024],
            })
            .await
            .unwrap_err();
        assert_eq!(rpc_name(e), "FILE_PARTS_INVALID");
        // Small-file parts are limited to 10 MiB in total.
        for p in 0..21 {
            part(cl, 5, p, vec![7; 512 * 1024]).await.unwrap();
        }
        let e = cl.invoke(&send(small(5, 21, "c"), 3)).await.unwrap_err();
        assert_eq!(rpc_name(e), "FILE_PARTS_INVALID");
        // A good upload goes through once; the same random_id again is a duplicate.
        part(cl, 6, 0, vec![9; 2048]).await.unwrap();
        cl.invoke(&send(small(6, 1, "d"), 4)).await.unwrap();
        part(cl, 7, 0, vec![9; 2048]).await.unwrap();
        let e = cl.invoke(&send(small(7, 1, "d"), 4)).await.unwrap_err();
        assert_eq!(rpc_name(e), "RANDOM_ID_DUPLICATE");
        // Expired parts are reported as missing.
        part(cl, 8, 0, vec![9; 2048]).await.unwrap();
        c.server.expire_uploaded_parts();
        let e = cl.invoke(&send(small(8, 1, "e"), 5)).await.unwrap_err();
        assert_eq!(rpc_name(e), "FILE_PART_0_MISSING");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_file_alignment_rules() {
    bounded(async {
        let c = connect(LoopbackOptions::default()).await;
        let cl = &c.client;
        let size = 2 * 1024 * 1024 + 100;
        let bytes: Vec<u8> = (0..size).map(|i| (i % 253) as u8).collect();
        for (p, chunk) in bytes.chunks(512 * 1024).enumerate() {
            cl.invoke(&tl::functions::upload::SaveBigFilePart {
                file_id: 9,
                file_part: p as i32,
                file_total_parts: 5,
                bytes: chunk.to_vec(),
            })
            .await
            .unwrap();
        }
        let big = tl::enums::InputFile::Big(tl::types::InputFileBig {
            id: 9,
            parts: 5,
            name: "f".into(),
        });
        let doc = doc_of(cl.invoke(&send(big, 6)).await.unwrap());
        assert_eq!(doc.size, size as i64);
        let get = |offset: i64, limit: i32| tl::functions::upload::GetFile {
            precise: false,
            cdn_supported: false,
            location: tl::enums::InputFileLocation::InputDocumentFileLocation(
                tl::types::InputDocumentFileLocation {
                    id: doc.id,
                    access_hash: doc.access_hash,
                    file_reference: doc.file_reference.clone(),
                    thumb_size: String::new(),
                },
            ),
            offset,
            limit,
        };
        for (offset, limit, want) in [
            (100, 4096, "OFFSET_INVALID"),
            (0, 5000, "LIMIT_INVALID"),
            (0, 3 * 4096, "LIMIT_INVALID"),
            (1024 * 1024 - 4096, 8192, "LIMIT_INVALID"),
        ] {
            let e = cl.invoke(&get(offset, limit)).await.unwrap_err();
            assert_eq!(rpc_name(e), want, "offset {offset} limit {limit}");
        }
        let tl::enums::upload::File::File(f) =
            cl.invoke(&get(512 * 1024, 512 * 1024)).await.unwrap()
        else {
            panic!("cdn")
        };
        assert_eq!(f.bytes, &bytes[512 * 1024..1024 * 1024]);
        // The tail is short; past the end is empty.
        let tl::enums::upload::File::File(f) =
            cl.invoke(&get(2 * 1024 * 1024, 4096)).await.unwrap()
        else {
            panic!("cdn")
        };
        assert_eq!(f.bytes, &bytes[2 * 1024 * 1024..]);
        c.server.expire_file_references();
        let e = cl.invoke(&get(0, 4096)).await.unwrap_err();
        assert_eq!(rpc_name(e), "FILE_REFERENCE_EXPIRED");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_and_rate_limit() {
    bounded(async {
        // 150 sends and two history pages fill a budget of 152 per minute exactly.
        let c = connect(LoopbackOptions {
            message_rate: Some((152, Duration::from_secs(60))),
            ..Default::default()
        })
        .await;
        let cl = &c.client;
        for i in 0..150i64 {
            part(cl, 100 + i, 0, vec![1; 16]).await.unwrap();
            cl.invoke(&send(small(100 + i, 1, &format!("m{i}")), 1000 + i))
                .await
                .unwrap();
        }
        let page = |offset_id| tl::functions::messages::GetHistory {
            peer: tl::enums::InputPeer::PeerSelf,
            offset_id,
            offset_date: 0,
            add_offset: 0,
            limit: 100,
            max_id: 0,
            min_id: 0,
            hash: 0,
        };
        let tl::enums::messages::Messages::Slice(first) = cl.invoke(&page(0)).await.unwrap() else {
            panic!("a partial page is a messagesSlice")
        };
        assert_eq!(first.count, 150);
        assert_eq!(first.messages.len(), 100);
        let ids = |ms: &[tl::enums::Message]| -> Vec<i32> {
            ms.iter()
                .map(|m| match m {
                    tl::enums::Message::Message(m) => m.id,
                    _ => 0,
                })
                .collect()
        };
        let first_ids = ids(&first.messages);
        assert!(first_ids.windows(2).all(|w| w[0] > w[1]), "newest first");
        let last = *first_ids.last().unwrap();
        let rest = match cl.invoke(&page(last)).await.unwrap() {
            tl::enums::messages::Messages::Slice(s) => s.messages,
            tl::enums::messages::Messages::Messages(m) => m.messages,
            _ => panic!("unexpected page"),
        };
        assert_eq!(rest.len(), 50);
        assert!(ids(&rest).iter().all(|i| *i < last));
        assert_eq!(c.server.counters().get("messages.sendMedia"), 150);
        // The budget is spent: the next message-class call is refused until the window moves.
        let e = cl.invoke(&page(0)).await.unwrap_err();
        assert!(rpc_name(e).starts_with("FLOOD_WAIT_"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_class_rate_limit_answers_flood_wait() {
    bounded(async {
        let c = connect(LoopbackOptions {
            message_rate: Some((3, Duration::from_secs(30))),
            ..Default::default()
        })
        .await;
        let q = tl::functions::messages::GetHistory {
            peer: tl::enums::InputPeer::PeerSelf,
            offset_id: 0,
            offset_date: 0,
            add_offset: 0,
            limit: 10,
            max_id: 0,
            min_id: 0,
            hash: 0,
        };
        let first = std::time::Instant::now();
        for _ in 0..3 {
            c.client.invoke(&q).await.unwrap();
        }
        let e = c.client.invoke(&q).await.unwrap_err();
        // The wait is what is left of the 30 s window opened by the first call, rounded up:
        // 30 on a quick machine, less on a slow one, never more.
        let elapsed = first.elapsed().as_secs() as u32;
        let name = rpc_name(e);
        let secs: u32 = name.strip_prefix("FLOOD_WAIT_").unwrap().parse().unwrap();
        assert!(
            (29 - elapsed.min(28)..=30).contains(&secs),
            "{name} after {elapsed}s"
        );
        // Part transfers are a different budget.
        part(&c.client, 1, 0, vec![0; 1024]).await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_shapes_part_uploads() {
    bounded(async {
        let c = connect(LoopbackOptions {
            bandwidth: Some(4 * 1024 * 1024),
            ..Default::default()
        })
        .await;
        let t0 = std::time::Instant::now();
        for p in 0..4 {
            part(&c.client, 1, p, vec![0; 512 * 1024]).await.unwrap();
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(450),
            "2 MiB at 4 MiB/s took {took:?}"
        );
    })
    .await;
}

fn channel_peer(c: &storinator_testkit::mtproto::ChannelInfo) -> tl::enums::InputPeer {
    tl::enums::InputPeer::Channel(tl::types::InputPeerChannel {
        channel_id: c.id,
        access_hash: c.access_hash,
    })
}

/// Uploads a one-part document and sends it to `peer`.
async fn post(c: &Client, peer: tl::enums::InputPeer, n: i64) -> tl::enums::Updates {
    part(c, 9000 + n, 0, vec![n as u8; 64]).await.unwrap();
    let mut req = send(small(9000 + n, 1, &format!("d{n}")), 50_000 + n);
    req.peer = peer;
    c.invoke(&req).await.unwrap()
}

fn pts_of(u: &tl::enums::Updates) -> (i32, bool) {
    let tl::enums::Updates::Updates(u) = u else {
        panic!("updates")
    };
    u.updates
        .iter()
        .find_map(|up| match up {
            tl::enums::Update::NewMessage(m) => Some((m.pts, false)),
            tl::enums::Update::NewChannelMessage(m) => Some((m.pts, true)),
            _ => None,
        })
        .unwrap()
}

async fn account_pts(c: &Client) -> i32 {
    let tl::enums::updates::State::State(s) = c
        .invoke(&tl::functions::updates::GetState {})
        .await
        .unwrap();
    s.pts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_was_away_catches_up_with_get_difference() {
    use grammers_client::session::types::{ChannelState, UpdatesState};
    use grammers_mtsender::UpdatesConfiguration;
    bounded(async {
        let c = connect(LoopbackOptions::default()).await;
        let chan = c.server.channels()[0].clone();
        // Where the away client left off: one message in each chat.
        assert_eq!(
            pts_of(&post(&c.client, tl::enums::InputPeer::PeerSelf, 1).await),
            (1, false)
        );
        assert_eq!(
            pts_of(&post(&c.client, channel_peer(&chan), 2).await),
            (1, true)
        );
        // A channel message moves the channel's pts, not the account's.
        assert_eq!(account_pts(&c.client).await, 1);
        // While it was away: 120 messages and a deletion in Saved Messages (more than one
        // difference holds), two channel messages.
        for n in 3..123 {
            post(&c.client, tl::enums::InputPeer::PeerSelf, n).await;
        }
        c.client
            .invoke(&tl::functions::messages::DeleteMessages {
                revoke: true,
                id: vec![3],
            })
            .await
            .unwrap();
        for n in 123..125 {
            assert!(pts_of(&post(&c.client, channel_peer(&chan), n).await).1);
        }
        assert_eq!(account_pts(&c.client).await, 122);

        // The away client comes back with the state it had saved.
        let server = c.server;
        let (b, updates) = client_for(server, |d| {
            d.updates_state = UpdatesState {
                pts: 1,
                qts: 0,
                date: 1,
                seq: 0,
                channels: vec![ChannelState {
                    id: chan.id,
                    pts: 1,
                }],
            };
        });
        let mut stream = b
            .client
            .stream_updates(updates, UpdatesConfiguration { catch_up: true })
            .await
            .unwrap();
        let (mut saved, mut channel, mut deleted) = (Vec::new(), Vec::new(), Vec::new());
        while saved.len() < 119 || channel.len() < 2 || deleted.is_empty() {
            let (u, _, _) = tokio::time::timeout(Duration::from_secs(10), stream.next_raw())
                .await
                .expect("caught up")
                .unwrap();
            match u {
                tl::enums::Update::NewMessage(m) => saved.push(m.message),
                tl::enums::Update::NewChannelMessage(m) => channel.push(m.message),
                tl::enums::Update::DeleteMessages(d) => deleted.extend(d.messages),
                _ => {}
            }
        }
        let ids = |ms: &[tl::enums::Message]| -> Vec<i32> {
            ms.iter()
                .map(|m| match m {
                    tl::enums::Message::Message(m) => m.id,
                    _ => 0,
                })
                .collect()
        };
        // Saved Messages ids 2..=121 came while it was away (the channel counts its own ids);
        // 3 was deleted since.
        let want: Vec<i32> = (2..=121).filter(|i| *i != 3).collect();
        assert_eq!(
            ids(&saved),
            want,
            "every message since pts 1, in order, but the deleted one"
        );
        assert_eq!(ids(&channel), vec![2, 3]);
        assert_eq!(deleted, vec![3]);
        let cnt = b.server.counters();
        assert!(
            cnt.get("updates.getDifference") >= 2,
            "sliced: {:?}",
            cnt.snapshot()
        );
        assert!(cnt.get("updates.getChannelDifference") >= 1);
        stream.sync_update_state().await.unwrap();
        let state = b.session.updates_state().await.unwrap();
        assert_eq!(state.pts, 122);
        assert_eq!(
            state
                .channels
                .iter()
                .find(|s| s.id == chan.id)
                .map(|s| s.pts),
            Some(3)
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_offsets_and_dates_page_as_documented() {
    bounded(async {
        let c = connect(LoopbackOptions::default()).await;
        // Ids 1..=10 sent at t, 11..=20 a day later.
        for n in 1..=20 {
            if n == 11 {
                c.server.advance_clock(Duration::from_secs(86_400));
            }
            post(&c.client, tl::enums::InputPeer::PeerSelf, n).await;
        }
        let page =
            |offset_id, offset_date, add_offset, limit| tl::functions::messages::GetHistory {
                peer: tl::enums::InputPeer::PeerSelf,
                offset_id,
                offset_date,
                add_offset,
                limit,
                max_id: 0,
                min_id: 0,
                hash: 0,
            };
        let ids = |m: tl::enums::messages::Messages| -> Vec<i32> {
            let ms = match m {
                tl::enums::messages::Messages::Messages(m) => m.messages,
                tl::enums::messages::Messages::Slice(m) => m.messages,
                _ => panic!("unexpected"),
            };
            ms.iter()
                .map(|m| match m {
                    tl::enums::Message::Message(m) => m.id,
                    _ => 0,
                })
                .collect()
        };
        let cl = &c.client;
        assert_eq!(
            ids(cl.invoke(&page(15, 0, 0, 3)).await.unwrap()),
            vec![14, 13, 12]
        );
        assert_eq!(
            ids(cl.invoke(&page(15, 0, -3, 3)).await.unwrap()),
            vec![17, 16, 15]
        );
        assert_eq!(
            ids(cl.invoke(&page(15, 0, -2, 4)).await.unwrap()),
            vec![16, 15, 14, 13]
        );
        // offset_date: only messages sent before it (the first day's).
        let tl::enums::Message::Message(m11) = ({
            let r = cl
                .invoke(&tl::functions::messages::GetMessages {
                    id: vec![tl::enums::InputMessage::Id(tl::types::InputMessageId {
                        id: 11,
                    })],
                })
                .await
                .unwrap();
            match r {
                tl::enums::messages::Messages::Messages(m) => {
                    m.messages.into_iter().next().unwrap()
                }
                _ => panic!("unexpected"),
            }
        }) else {
            panic!("message 11")
        };
        assert_eq!(
            ids(cl.invoke(&page(0, m11.date, 0, 4)).await.unwrap()),
            vec![10, 9, 8, 7]
        );
        let tl::enums::messages::Messages::Slice(s) = cl.invoke(&page(15, 0, -3, 3)).await.unwrap()
        else {
            panic!("a slice")
        };
        assert_eq!((s.count, s.offset_id_offset), (20, Some(3)));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn md5_empty_media_and_missing_references_are_answered_as_telegram_does() {
    bounded(async {
        let c = connect(LoopbackOptions::default()).await;
        let cl = &c.client;
        let bytes = vec![5u8; 3000];
        let md5 = |b: &[u8]| format!("{:x}", md5::compute(b));
        let with_md5 = |id, sum: String| {
            tl::enums::InputFile::File(tl::types::InputFile {
                id,
                parts: 1,
                name: "m".into(),
                md5_checksum: sum,
            })
        };
        part(cl, 1, 0, bytes.clone()).await.unwrap();
        let e = cl
            .invoke(&send(with_md5(1, md5(b"other bytes")), 1))
            .await
            .unwrap_err();
        // grammers reads the 5 of MD5 as the error's number.
        assert_eq!(rpc_name(e), "MD5_CHECKSUM_INVALID_5");
        let doc = doc_of(cl.invoke(&send(with_md5(1, md5(&bytes)), 2)).await.unwrap());

        let mut empty = send(small(2, 1, "e"), 3);
        empty.media = tl::enums::InputMedia::Empty;
        assert_eq!(
            rpc_name(cl.invoke(&empty).await.unwrap_err()),
            "MEDIA_EMPTY"
        );

        let get = tl::functions::upload::GetFile {
            precise: false,
            cdn_supported: false,
            location: tl::enums::InputFileLocation::InputDocumentFileLocation(
                tl::types::InputDocumentFileLocation {
                    id: doc.id,
                    access_hash: doc.access_hash,
                    file_reference: vec![],
                    thumb_size: String::new(),
                },
            ),
            offset: 0,
            limit: 4096,
        };
        assert_eq!(
            rpc_name(cl.invoke(&get).await.unwrap_err()),
            "FILEREF_UPGRADE_NEEDED"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn documents_live_on_one_data_centre_and_authorizations_are_carried_over() {
    bounded(async {
        let c = connect(LoopbackOptions::default()).await;
        let cl = &c.client;
        part(cl, 1, 0, vec![1; 5000]).await.unwrap();
        let doc = doc_of(cl.invoke(&send(small(1, 1, "f"), 1)).await.unwrap());
        assert_eq!(doc.dc_id, 2);
        assert!(c.server.move_document("f", 4));
        let get = |cdn_supported| tl::functions::upload::GetFile {
            precise: false,
            cdn_supported,
            location: tl::enums::InputFileLocation::InputDocumentFileLocation(
                tl::types::InputDocumentFileLocation {
                    id: doc.id,
                    access_hash: doc.access_hash,
                    file_reference: doc.file_reference.clone(),
                    thumb_size: String::new(),
                },
            ),
            offset: 0,
            limit: 4096,
        };
        assert_eq!(
            rpc_name(cl.invoke(&get(false)).await.unwrap_err()),
            "FILE_MIGRATE_4"
        );
        // Data centre 4 does not know this account yet.
        let e = cl.invoke_in_dc(4, &get(false)).await.unwrap_err();
        assert_eq!(rpc_name(e), "AUTH_KEY_UNREGISTERED");
        let e = cl
            .invoke(&tl::functions::auth::ExportAuthorization { dc_id: 2 })
            .await
            .unwrap_err();
        assert_eq!(rpc_name(e), "DC_ID_INVALID");
        let tl::enums::auth::ExportedAuthorization::Authorization(x) = cl
            .invoke(&tl::functions::auth::ExportAuthorization { dc_id: 4 })
            .await
            .unwrap();
        let import = tl::functions::auth::ImportAuthorization {
            id: x.id,
            bytes: x.bytes,
        };
        cl.invoke_in_dc(4, &import).await.unwrap();
        let tl::enums::upload::File::File(f) = cl.invoke_in_dc(4, &get(false)).await.unwrap()
        else {
            panic!("served")
        };
        assert_eq!(f.bytes, vec![1; 4096]);
        // An exported authorization is good for one import.
        assert_eq!(
            rpc_name(cl.invoke_in_dc(4, &import).await.unwrap_err()),
            "AUTH_BYTES_INVALID"
        );
        // CDN: only a client that says it supports CDNs is redirected.
        assert!(c.server.serve_from_cdn("f"));
        assert!(matches!(
            cl.invoke_in_dc(4, &get(false)).await.unwrap(),
            tl::enums::upload::File::File(_)
        ));
        assert!(matches!(
            cl.invoke_in_dc(4, &get(true)).await.unwrap(),
            tl::enums::upload::File::CdnRedirect(_)
        ));
    })
    .await;
}
