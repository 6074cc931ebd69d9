//! Pack-size limits. The multi-GiB round trip is opt-in: set STORINATOR_TG_BIG_MIB (for
//! example 1945 for a 1.9 GiB pack) to run it; otherwise it returns at once.

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
async fn multi_gib_pack_round_trip_opt_in() {
    let Some(mib) = std::env::var("STORINATOR_TG_BIG_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        eprintln!("STORINATOR_TG_BIG_MIB not set: skipping the multi-GiB pack test");
        return;
    };
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
    })
    .await
    .unwrap();
}
