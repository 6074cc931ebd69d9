//! Part transfers over a link with a round trip: several parts in flight per connection,
//! several connections, reads of one range in parallel, a window that halves on FLOOD_WAIT;
//! and through all that, bytes that come back identical under jitter and injected faults.

mod telegram_support;

use std::time::{Duration, Instant};

use storinator_shared::storage::{ObjectRef, Storage};
use storinator_testkit::mtproto::{Fault, LoopbackOptions, NetProfile};
use telegram_support::*;

const PACK: &str = "00112233445566778899aabbccddeeff.enc";
const MIB: usize = 1024 * 1024;

async fn bounded<F: std::future::Future<Output = ()>>(secs: u64, f: F) {
    tokio::time::timeout(Duration::from_secs(secs), f)
        .await
        .expect("test took too long");
}

/// A fixture whose loopback has [`link`]'s round trip and jitter.
async fn start_on_link() -> Fixture {
    start(
        LoopbackOptions {
            net: link(),
            ..Default::default()
        },
        false,
    )
    .await
}

fn link() -> NetProfile {
    NetProfile {
        rtt: Duration::from_millis(40),
        jitter: Duration::from_millis(20),
        conn_bytes_per_sec: Some(NetProfile::mbps(400.0)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_parts_come_back_identical_under_jitter_and_faults() {
    bounded(120, async {
        let f = start_on_link().await;
        let faults = f.server.faults();
        // Late enough that the window has opened up first.
        faults.on_call("upload.saveBigFilePart", 30, Fault::DropConnection);
        faults.on_call("upload.saveBigFilePart", 38, Fault::flood_wait(1));
        faults.on_call(
            "upload.saveBigFilePart",
            44,
            Fault::rpc(500, "RPC_CALL_FAIL"),
        );
        faults.on_call("upload.getFile", 25, Fault::rpc(500, "RPC_CALL_FAIL"));
        faults.on_call("upload.getFile", 32, Fault::DropConnection);
        faults.on_call("upload.getFile", 40, Fault::flood_wait(1));
        let bytes = data(24 * MIB + 12_345, 11);
        let loc = put(&f.storage, PACK, &bytes).await;
        let up = f.storage.scheduler().stats();
        assert!(up.peak_parts_in_flight >= 8, "{up:?}");
        assert!(up.peak_parts_per_connection >= 2, "{up:?}");
        assert!(up.part_connections >= 2, "{up:?}");
        assert!(up.flood_waits >= 1 && up.window_cuts >= 1, "{up:?}");
        assert!(up.reconnects >= 1 && up.retries >= 2, "{up:?}");
        assert_eq!(f.server.documents().len(), 1);

        // Read back from a fresh process (nothing cached, a window that starts small), the
        // way a restore does: a few ranges at once, each spread over several windows.
        let reader = open_storage(&f.dir, &f.server).await;
        let obj = ObjectRef::new(PACK, loc);
        let mut reads = Vec::new();
        for (off, len) in [
            (0u64, 8 * MIB as u64),
            (8 * MIB as u64, 8 * MIB as u64),
            (16 * MIB as u64, (bytes.len() - 16 * MIB) as u64),
            (3_000_001, 777_777),
            (bytes.len() as u64 - 10, 10),
        ] {
            let (s, o) = (reader.clone(), obj.clone());
            reads.push(tokio::spawn(async move {
                (off, len, s.get_range(&o, off, len).await)
            }));
        }
        for r in reads {
            let (off, len, got) = r.await.unwrap();
            let got = got.unwrap();
            let want = &bytes[off as usize..(off + len) as usize];
            assert!(got == want, "range {off}+{len} differs");
        }
        let down = reader.scheduler().stats();
        assert!(down.peak_parts_in_flight >= 8, "{down:?}");
        assert!(down.part_connections >= 2, "{down:?}");
        assert!(down.flood_waits >= 1 && down.retries >= 2, "{down:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_in_flight_overlap_their_round_trips() {
    bounded(120, async {
        // Long enough that the emulated round trips, not the CPU of a loaded machine (the
        // whole suite runs beside this), decide the time.
        let rtt = Duration::from_millis(400);
        let f = start_with(
            LoopbackOptions {
                net: NetProfile::with_rtt(rtt),
                ..Default::default()
            },
            false,
            |c| c.part_concurrency = 16,
        )
        .await;
        // Warm up: connections open and the window opens up to its bound.
        put(&f.storage, PACK, &data(8 * MIB, 1)).await;
        assert_eq!(f.storage.scheduler().part_concurrency(), 16);
        // 32 parts one round trip each would take 32 round trips; one at a time on each of at
        // most four connections at least eight; sixteen at a time two, plus the send (under a
        // loaded suite that has taken up to three more round trips' worth of CPU).
        let name = "00112233445566778899aabbccddee00.enc";
        let spool = f.storage.spool_dir().join("timed.part");
        std::fs::write(&spool, data(16 * MIB, 2)).unwrap();
        let t = Instant::now();
        f.storage.put_file(name, &spool).await.unwrap();
        let took = t.elapsed();
        let stats = f.storage.scheduler().stats();
        assert!(
            took < rtt * 7,
            "32 parts took {took:?}: they did not overlap ({stats:?})"
        );
        assert!(stats.peak_parts_per_connection >= 4, "{stats:?}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_wait_halves_the_part_window() {
    bounded(60, async {
        let f = start_with(LoopbackOptions::default(), false, |c| {
            c.part_concurrency = 16
        })
        .await;
        put(&f.storage, PACK, &data(12 * MIB, 3)).await;
        let s = f.storage.scheduler();
        assert_eq!(s.part_concurrency(), 16, "grown to its bound");
        // A small pack: four parts sent at once, the first answered FLOOD_WAIT_1.
        f.server
            .faults()
            .on_call("upload.saveFilePart", 1, Fault::flood_wait(1));
        let t = Instant::now();
        let bytes = data(2 * MIB, 4);
        let name = "00112233445566778899aabbccddee01.enc";
        let loc = put(&f.storage, name, &bytes).await;
        assert!(t.elapsed() >= Duration::from_secs(1), "waited as asked");
        assert_eq!(
            s.part_concurrency(),
            8,
            "halved, then one part regrew it by 1/8"
        );
        assert_eq!(s.stats().window_cuts, 1);
        assert_eq!(
            get_all(&f.storage, name, &loc, bytes.len() as u64).await,
            bytes
        );
    })
    .await;
}

/// Connections open for the parts a transfer announces, all at once (one at a time, at
/// two round trips each, they would trail a window that doubles every round trip), only as
/// many as those parts need (a one-part object opens one), and the parts spread over them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_open_together_for_the_parts_announced() {
    bounded(60, async {
        let f = start_with(LoopbackOptions::default(), false, |c| {
            c.part_concurrency = 32
        })
        .await;
        put(
            &f.storage,
            "00112233445566778899aabbccddee02.enc",
            &data(1000, 5),
        )
        .await;
        let s = f.storage.scheduler().stats();
        assert_eq!(s.part_connections, 1, "one part, one connection: {s:?}");
        // A larger transfer after it opens the connections its parts need beside that one,
        // even though that one keeps answering (a part goes on it while it has room).
        let bytes = data(8 * MIB, 7);
        let loc = put(&f.storage, PACK, &bytes).await;
        let s = f.storage.scheduler().stats();
        assert_eq!(s.part_connections, 4, "{s:?}");
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );

        // 8 MiB: 16 parts, four connections' worth, opened together (a round trip away, so
        // opening takes a while, as over any real link).
        let f = start_with(
            LoopbackOptions {
                net: NetProfile::with_rtt(Duration::from_millis(40)),
                ..Default::default()
            },
            false,
            |c| c.part_concurrency = 32,
        )
        .await;
        let bytes = data(8 * MIB, 6);
        let loc = put(&f.storage, PACK, &bytes).await;
        let s = f.storage.scheduler().stats();
        assert_eq!(s.part_connections, 4, "{s:?}");
        assert!(
            s.peak_connections_opening >= 2,
            "the three beside the first opened together: {s:?}"
        );
        // The parts waited for the connections opening rather than crowd the first one open.
        assert!(
            s.peak_parts_per_connection <= 4,
            "parts piled on one connection while others opened: {s:?}"
        );
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );
    })
    .await;
}

/// A new part connection's initConnection rides on its first parts instead of costing a round
/// trip of its own (a help.getConfig answered before any part could go), and its first parts
/// go under the salt the data centre gave when the storage connected: none is refused for a
/// wrong salt (each would have crossed the link for nothing), and none waits for the server's
/// first answer to learn the salt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_connection_sends_its_initconnection_with_its_first_parts() {
    bounded(60, async {
        let f = start_on_link().await;
        let c = f.server.counters();
        let (configs, salts, layers) = (
            c.get("help.getConfig"),
            c.get("bad_server_salt"),
            c.get("layer:230"),
        );
        let bytes = data(12 * MIB, 9);
        let loc = put(&f.storage, PACK, &bytes).await;
        let s = f.storage.scheduler().stats();
        assert!(s.part_connections >= 2, "{s:?}");
        assert_eq!(
            c.get("help.getConfig") - configs,
            0,
            "a part connection spent a round trip on its own initConnection: {:?}",
            c.snapshot()
        );
        assert!(
            c.get("layer:230") - layers >= s.part_connections,
            "each part connection was initialised: {:?}",
            c.snapshot()
        );
        assert_eq!(
            c.get("bad_server_salt") - salts,
            0,
            "a part connection began under a wrong salt: {:?}",
            c.snapshot()
        );
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );
    })
    .await;
}

/// Salts that went stale (the server moved on since the storage fetched them) cost a resend:
/// each part refused for its salt goes again under the right one, and the transfer completes
/// byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_under_a_stale_salt_are_sent_again() {
    bounded(60, async {
        let f = start_on_link().await;
        f.server.rotate_salts();
        let c = f.server.counters();
        let salts = c.get("bad_server_salt");
        let bytes = data(6 * MIB + 777, 10);
        let loc = put(&f.storage, PACK, &bytes).await;
        assert!(
            c.get("bad_server_salt") > salts,
            "the server refused messages under the stale salt: {:?}",
            c.snapshot()
        );
        assert_eq!(
            get_all(&f.storage, PACK, &loc, bytes.len() as u64).await,
            bytes
        );
    })
    .await;
}
