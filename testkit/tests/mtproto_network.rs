//! The emulated network through the real grammers client: each connection's round-trip time
//! (pipelined calls overlap, as on a real link), jitter, a bandwidth cap per connection beside
//! the shared one, and changes while connections are open. Small delays and few round trips
//! keep this quick; lower bounds are exact (the server sleeps them), upper bounds are loose.

use std::sync::Arc;
use std::time::{Duration, Instant};

use grammers_client::Client;
use grammers_client::sender::{ConnectionParams, NoRetries, SenderPool};
use grammers_client::session::SessionData;
use grammers_client::session::storages::MemorySession;
use grammers_client::session::types::{DcOption, PeerAuth, PeerInfo};
use grammers_client::tl;
use storinator_testkit::mtproto::{LoopbackOptions, LoopbackTelegram, NetProfile};

/// A grammers client with its own connection to `server`.
fn client(server: &LoopbackTelegram) -> (Client, tokio::task::JoinHandle<()>) {
    let mut data = SessionData {
        home_dc: 2,
        ..Default::default()
    };
    let v4 = match server.addr() {
        std::net::SocketAddr::V4(a) => a,
        _ => unreachable!(),
    };
    data.dc_options.insert(
        2,
        DcOption {
            id: 2,
            ipv4: v4,
            ipv6: std::net::SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
            auth_key: Some(server.auth_key()),
        },
    );
    let me = PeerInfo::User {
        id: server.self_user_id(),
        auth: Some(PeerAuth::from_hash(server.self_access_hash())),
        bot: Some(false),
        is_self: Some(true),
    };
    data.peer_infos.insert(me.id(), me);
    let pool = SenderPool::with_configuration(
        Arc::new(MemorySession::from(data)),
        1,
        ConnectionParams {
            retry_policy: Box::new(NoRetries),
            ..Default::default()
        },
    );
    let c = Client::new(pool.handle);
    (c, tokio::spawn(pool.runner.run()))
}

async fn round_trip(c: &Client) -> Duration {
    let t = Instant::now();
    c.invoke(&tl::functions::users::GetUsers {
        id: vec![tl::enums::InputUser::UserSelf],
    })
    .await
    .unwrap();
    t.elapsed()
}

/// Incompressible bytes (grammers gzips requests; the link carries what is sent).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 24) as u8
        })
        .collect()
}

async fn upload(c: &Client, file_id: i64, mib: usize) -> Duration {
    let t = Instant::now();
    for p in 0..mib * 2 {
        c.invoke(&tl::functions::upload::SaveFilePart {
            file_id,
            file_part: p as i32,
            bytes: noise(512 * 1024, file_id as u64 * 100 + p as u64),
        })
        .await
        .unwrap();
    }
    t.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_round_trip_takes_the_rtt_and_pipelined_calls_overlap() {
    let rtt = Duration::from_millis(150);
    let server = LoopbackTelegram::start(LoopbackOptions {
        net: NetProfile::with_rtt(rtt),
        ..Default::default()
    })
    .await
    .unwrap();
    let (c, _r) = client(&server);
    round_trip(&c).await; // connect, salts, session
    let one = round_trip(&c).await;
    assert!(
        one >= rtt && one < rtt + Duration::from_millis(300),
        "one call took {one:?}"
    );
    // Eight calls in flight on the same connection come back about one round trip later.
    let t = Instant::now();
    let calls = (0..8).map(|_| round_trip(&c));
    let each: Vec<Duration> = futures_join(calls).await;
    let all = t.elapsed();
    assert!(each.iter().all(|d| *d >= rtt), "{each:?}");
    assert!(
        all < rtt * 4,
        "8 pipelined calls took {all:?}, sequential would be {:?}",
        rtt * 8
    );

    // Changed while the connection is open: applies to the next message.
    server.set_net(NetProfile::default());
    let fast = round_trip(&c).await;
    assert!(fast < rtt, "{fast:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jitter_adds_a_bounded_random_delay() {
    let rtt = Duration::from_millis(20);
    let jitter = Duration::from_millis(40);
    let server = LoopbackTelegram::start(LoopbackOptions {
        net: NetProfile {
            rtt,
            jitter,
            conn_bytes_per_sec: None,
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let (c, _r) = client(&server);
    round_trip(&c).await;
    let mut took = Vec::new();
    for _ in 0..8 {
        took.push(round_trip(&c).await);
    }
    assert!(took.iter().all(|d| *d >= rtt), "{took:?}");
    assert!(
        took.iter()
            .all(|d| *d < rtt + jitter * 2 + Duration::from_millis(150)),
        "{took:?}"
    );
    let spread = *took.iter().max().unwrap() - *took.iter().min().unwrap();
    assert!(spread >= Duration::from_millis(5), "no jitter: {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_is_capped_per_connection_and_shared_cap_on_top() {
    // 8 MB/s per connection: 1 MiB takes about 130 ms on one.
    let per_conn = 8_000_000;
    let server = LoopbackTelegram::start(LoopbackOptions {
        net: NetProfile {
            conn_bytes_per_sec: Some(per_conn),
            ..Default::default()
        },
        ..Default::default()
    })
    .await
    .unwrap();
    let (a, _ra) = client(&server);
    let (b, _rb) = client(&server);
    round_trip(&a).await;
    round_trip(&b).await;
    let floor = Duration::from_secs_f64((1 << 20) as f64 / per_conn as f64);
    let one = upload(&a, 1, 2).await;
    assert!(one >= floor * 2, "2 MiB on one connection took {one:?}");
    // Two connections each get their own cap: 1 MiB on each at once.
    let t = Instant::now();
    let (x, y) = tokio::join!(upload(&a, 2, 1), upload(&b, 3, 1));
    let both = t.elapsed();
    assert!(x >= floor && y >= floor, "{x:?} {y:?}");
    assert!(
        both < one,
        "two connections in parallel {both:?} vs one {one:?}"
    );

    // The shared cap of the same rate makes the two connections share it.
    server.set_net(NetProfile::default());
    server.set_bandwidth(Some(per_conn));
    let t = Instant::now();
    tokio::join!(upload(&a, 4, 1), upload(&b, 5, 1));
    let shared = t.elapsed();
    assert!(shared >= floor * 2, "shared cap: {shared:?}");
}

/// Runs futures concurrently and collects their outputs in order.
async fn futures_join<F: std::future::Future>(fs: impl IntoIterator<Item = F>) -> Vec<F::Output> {
    let mut set = Vec::new();
    for f in fs {
        set.push(Box::pin(f));
    }
    let mut out = Vec::new();
    let mut pending: Vec<_> = set.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, f) in pending.iter_mut().enumerate() {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *f = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(results.into_iter().map(|r| r.unwrap()));
    out
}

/// A new connection pays TCP's handshake, a round trip before the client's first bytes can go
/// out, as on a real link: a fresh grammers client's first call takes five round trips (the
/// handshake, then four of MTProto's: the salt, the salts fetched, the call), the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_pays_the_tcp_handshake() {
    let rtt = Duration::from_millis(100);
    let server = LoopbackTelegram::start(LoopbackOptions {
        net: NetProfile::with_rtt(rtt),
        ..Default::default()
    })
    .await
    .unwrap();
    let (c, _r) = client(&server);
    let first = round_trip(&c).await;
    let next = round_trip(&c).await;
    assert!(
        first >= rtt * 5 && first < rtt * 5 + Duration::from_millis(400),
        "a new connection's first call took {first:?}"
    );
    assert!(next < rtt * 2, "the next call took {next:?}");
}
