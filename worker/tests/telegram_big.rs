//! Pack-size limits and big packs. The big-pack round trip always runs with a 24 MiB pack
//! (the saveBigFilePart path, 48 parts); set STORINATOR_TG_BIG_MIB (for example 1945 for a
//! 1.9 GiB pack) to run it at that size instead.

mod telegram_support;

use std::io::Write;
use std::time::Duration;

use sha2::{Digest, Sha256};
use storinator_shared::error::StorageError;
use storinator_shared::storage::{ObjectRef, Storage};
use storinator_testkit::mtproto::LoopbackOptions;
use telegram_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pack_over_the_upload_limit_is_refused_before_uploading() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let f = start(LoopbackOptions::default(), false).await;
        let p = f.storage.spool_dir().join("too-big");
        std::fs::create_dir_all(f.storage.spool_dir()).unwrap();
        // Sparse: 2000 MiB + 1 byte costs no disk.
        let file = std::fs::File::create(&p).unwrap();
        file.set_len(2000 * 1024 * 1024 + 1).unwrap();
        let err = f.storage.put_file("ab.enc", &p).await.unwrap_err();
        assert!(matches!(err, StorageError::Fatal(_)), "{err:?}");
        assert!(err.to_string().contains("upload limit"), "{err}");
        assert_eq!(f.server.counters().get("upload.saveBigFilePart"), 0);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn premium_ceiling_is_refused_before_uploading() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let opts = LoopbackOptions {
            premium: true,
            ..Default::default()
        };
        let f = start_with(opts, false, |c| c.premium = true).await;
        let p = f.storage.spool_dir().join("too-big");
        std::fs::create_dir_all(f.storage.spool_dir()).unwrap();
        // Sparse: 4000 MiB + 1 byte costs no disk.
        let file = std::fs::File::create(&p).unwrap();
        file.set_len(4000 * 1024 * 1024 + 1).unwrap();
        let err = f.storage.put_file("ab.enc", &p).await.unwrap_err();
        assert!(matches!(err, StorageError::Fatal(_)), "{err:?}");
        assert!(err.to_string().contains("upload limit"), "{err}");
        assert!(
            err.to_string().contains(&(4000u64 << 20).to_string()),
            "{err}"
        );
        assert_eq!(f.server.counters().get("upload.saveBigFilePart"), 0);
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_pack_round_trip() {
    let mib = match std::env::var("STORINATOR_TG_BIG_MIB") {
        Ok(v) => v
            .parse::<u64>()
            .expect("STORINATOR_TG_BIG_MIB is a number of MiB"),
        Err(_) => 24,
    };
    println!("big pack round trip: {mib} MiB (STORINATOR_TG_BIG_MIB sets the size)");
    tokio::time::timeout(Duration::from_secs(60 * 60), async {
        let f = start(LoopbackOptions::default(), false).await;
        let spool = f.storage.spool_dir().to_path_buf();
        std::fs::create_dir_all(&spool).unwrap();
        let p = spool.join("big");
        let mut sent = Sha256::new();
        {
            let mut w = std::io::BufWriter::new(std::fs::File::create(&p).unwrap());
            for i in 0..mib {
                let block = data(1024 * 1024, i);
                sent.update(&block);
                w.write_all(&block).unwrap();
            }
        }
        let name = "ffffffffffffffffffffffffffffffff.enc";
        let loc = f.storage.put_file(name, &p).await.unwrap();
        let size = mib * 1024 * 1024;
        let obj = ObjectRef::new(name, loc);
        let mut got = Sha256::new();
        let mut off = 0;
        while off < size {
            let len = (64 * 1024 * 1024).min(size - off);
            got.update(f.storage.get_range(&obj, off, len).await.unwrap());
            off += len;
        }
        assert_eq!(sent.finalize(), got.finalize());
        let parts = (size.div_ceil(512 * 1024)) as u64;
        assert_eq!(f.server.counters().get("upload.saveBigFilePart"), parts);
        assert_eq!(f.server.counters().get("upload.saveFilePart"), 0);
    })
    .await
    .unwrap();
}
