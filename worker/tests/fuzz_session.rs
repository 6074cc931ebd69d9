//! The worker's session file under fuzz: valid session files (DC addresses, auth keys, the
//! signed-in user, known channels) are generated with `arbitrary`, mutated, written and loaded
//! through `FileSession::load_or_new`, the one reader of that file. Every input must load or
//! fail with a `SessionError`, without a panic or an allocation beyond the file's own size.
//!
//! A long run (see `storinator_testkit::fuzz`):
//!
//! ```sh
//! STORINATOR_FUZZ_ITERS=1000000 cargo test --release -p storinator-worker --test fuzz_session -- --nocapture
//! ```

use arbitrary::{Arbitrary, Unstructured};
use serde_json::json;
use storinator_testkit::fuzz::{Meter, SLACK, check, fuzz, mutate};
use storinator_worker::telegram::session::FileSession;

#[global_allocator]
static GLOBAL: Meter = Meter;

fn session_json(u: &mut Unstructured<'_>) -> Vec<u8> {
    let dcs: Vec<_> = (0..u.int_in_range(0..=5usize).unwrap_or(1))
        .map(|_| {
            let ip = <[u8; 4]>::arbitrary(u).unwrap_or([127, 0, 0, 1]);
            let port = u16::arbitrary(u).unwrap_or(443);
            let key = bool::arbitrary(u)
                .unwrap_or(false)
                .then(|| hex::encode(<[u8; 32]>::arbitrary(u).unwrap_or([1; 32]).repeat(8)));
            json!({
                "id": u.int_in_range(1..=5i32).unwrap_or(2),
                "addr": format!("{}.{}.{}.{}:{port}", ip[0], ip[1], ip[2], ip[3]),
                "addr6": bool::arbitrary(u).unwrap_or(false).then(|| format!("[::1]:{port}")),
                "auth_key": key,
            })
        })
        .collect();
    let channels: Vec<_> = (0..u.int_in_range(0..=3usize).unwrap_or(0))
        .map(|_| {
            json!({
                "id": u.int_in_range(1..=999_999_999i64).unwrap_or(1),
                "access_hash": i64::arbitrary(u).unwrap_or(2),
                "title": String::arbitrary(u).unwrap_or_default(),
            })
        })
        .collect();
    let user = bool::arbitrary(u).unwrap_or(true).then(|| {
        json!({
            "id": u.int_in_range(1..=0xff_ffff_ffffi64).unwrap_or(1),
            "access_hash": i64::arbitrary(u).unwrap_or(1),
            "bot": bool::arbitrary(u).unwrap_or(false),
        })
    });
    serde_json::to_vec_pretty(&json!({
        "version": 1,
        "home_dc": u.int_in_range(1..=5i32).unwrap_or(2),
        "dcs": dcs,
        "self_user": user,
        "channels": channels,
    }))
    .unwrap()
}

#[test]
fn fuzz_session_files() {
    // A file rewritten a million times: memory-backed where the machine has it (ext4 flushes
    // a truncated and rewritten file on close, milliseconds each).
    let shm = std::path::Path::new("/dev/shm");
    let dir = if shm.is_dir() {
        tempfile::tempdir_in(shm).unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let path = dir.path().join("worker.session");
    let ran = fuzz("session file", |rng, raw| {
        let u = &mut Unstructured::new(raw);
        let valid = session_json(u);
        let input = if rng.below(4) == 0 {
            valid.clone()
        } else {
            mutate(rng, valid.clone(), &valid)
        };
        std::fs::write(&path, &input).map_err(|e| e.to_string())?;
        let loaded = check(
            "FileSession::load_or_new",
            &input,
            4 * input.len() + SLACK,
            || FileSession::load_or_new(&path),
        )?;
        if input == valid && loaded.is_none() {
            return Err(format!(
                "a valid session was refused: {}",
                String::from_utf8_lossy(&valid)
            ));
        }
        Ok(())
    });
    assert!(ran > 0);
}
