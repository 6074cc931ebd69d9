//! Decoders under fuzz, on the stable toolchain: valid encodings are generated from random
//! bytes with `arbitrary`, mutated (bit flips, overwrites, truncation, extension, splices,
//! interesting integers), and fed to every decoder of what storage returns: the pack tail and
//! trailer, sealed blobs and their headers, listing lines, snapshot objects and key objects.
//!
//! Each input must decode or fail with a typed error: no panic, and no single allocation beyond
//! the format's bound for that input (a counting allocator records the largest request made
//! while the decoder runs).
//!
//! The normal suite runs a few thousand inputs per target. A long run:
//!
//! ```sh
//! STORINATOR_FUZZ_ITERS=1000000 cargo test --release -p storinator-shared --test fuzz -- --nocapture
//! ```
//!
//! `STORINATOR_FUZZ_SEED=<n>` replays a run (every failure prints its seed and input).

use arbitrary::{Arbitrary, Unstructured};
use storinator_shared::format::crypto::{
    self, ChunkId, KdfParams, Keys, MasterSecret, SealMode, WrappedKey,
};
use storinator_shared::format::pack::{
    self, BlobKind, PACK_MAGIC, PACK_TAIL_LEN, PackEntry, encode_trailer,
};
use storinator_shared::format::snapshot::{ListingEntry, SnapshotObject, decode_listing};
use storinator_shared::{EntryKind, Error};
use storinator_testkit::fuzz::{Meter, SLACK, check, fuzz, metered, mutate};

#[global_allocator]
static GLOBAL: Meter = Meter;

// ---------------------------------------------------------------------------------------------
// Generators of valid values

fn keys() -> Keys {
    Keys::derive(&MasterSecret::generate())
}

fn chunk_id(u: &mut Unstructured<'_>) -> ChunkId {
    ChunkId(<[u8; 32]>::arbitrary(u).unwrap_or([7; 32]))
}

fn text(u: &mut Unstructured<'_>, max: usize) -> String {
    let s = String::arbitrary(u).unwrap_or_default();
    s.chars().take(max).collect()
}

fn plain_path(u: &mut Unstructured<'_>) -> String {
    let parts = 1 + u.int_in_range(0..=4usize).unwrap_or(0);
    (0..parts)
        .map(|_| {
            let t = text(u, 12).replace(['/', '\0'], "_");
            if t.is_empty() || t == "." || t == ".." {
                "x".to_string()
            } else {
                t
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn listing_entry(u: &mut Unstructured<'_>) -> ListingEntry {
    let kind = *u
        .choose(&[EntryKind::File, EntryKind::Dir, EntryKind::Symlink])
        .unwrap_or(&EntryKind::File);
    let size = if kind == EntryKind::File {
        u64::arbitrary(u).unwrap_or(1) % (1 << 40) + 1
    } else {
        0
    };
    let chunks = if kind == EntryKind::File {
        (0..1 + u.int_in_range(0..=3usize).unwrap_or(0))
            .map(|_| chunk_id(u))
            .collect()
    } else {
        Vec::new()
    };
    ListingEntry {
        path: plain_path(u),
        kind,
        size,
        mtime_ns: i64::arbitrary(u).unwrap_or(0),
        mode: u32::arbitrary(u).unwrap_or(0o644) & 0o7777,
        inode: u64::arbitrary(u).unwrap_or(0),
        sha256: (kind == EntryKind::File).then(|| hex::encode(chunk_id(u).0)),
        chunks,
        target: (kind == EntryKind::Symlink).then(|| {
            let t = text(u, 40).replace('\0', "");
            if t.is_empty() { "t".into() } else { t }
        }),
        uid: Option::<u32>::arbitrary(u).unwrap_or(None),
        gid: Option::<u32>::arbitrary(u).unwrap_or(None),
        user: bool::arbitrary(u)
            .unwrap_or(false)
            .then(|| "alice".to_string()),
        group: None,
    }
}

fn snapshot_object(u: &mut Unstructured<'_>) -> SnapshotObject {
    let started = i64::arbitrary(u).unwrap_or(0) >> 2;
    SnapshotObject {
        version: 1 + u32::from(bool::arbitrary(u).unwrap_or(false)),
        owner: if bool::arbitrary(u).unwrap_or(true) {
            "local".into()
        } else {
            format!("tg:{}", u64::arbitrary(u).unwrap_or(1))
        },
        root: format!("/{}", plain_path(u)),
        hostname: text(u, 20),
        encrypted: bool::arbitrary(u).unwrap_or(true),
        started_at: started,
        finished_at: started + i64::from(u32::arbitrary(u).unwrap_or(0)),
        listing: (0..u.int_in_range(0..=3usize).unwrap_or(0))
            .map(|_| chunk_id(u))
            .collect(),
        files: u64::arbitrary(u).unwrap_or(0),
        dirs: u64::arbitrary(u).unwrap_or(0),
        bytes: u64::arbitrary(u).unwrap_or(0),
        bytes_read: 0,
        new_chunks: 0,
        bytes_stored: 0,
        warnings: 0,
    }
}

fn pack_entry(u: &mut Unstructured<'_>, body_len: u64) -> PackEntry {
    let length = u.int_in_range(1..=4096u32).unwrap_or(1);
    let offset = u
        .int_in_range(0..=body_len.saturating_sub(u64::from(length)))
        .unwrap_or(0);
    PackEntry {
        kind: *u
            .choose(&[BlobKind::Data, BlobKind::Listing, BlobKind::Snapshot])
            .unwrap_or(&BlobKind::Data),
        flags: 3,
        id: chunk_id(u),
        offset,
        length,
        raw_length: u.int_in_range(0..=65536u32).unwrap_or(0),
    }
}

// ---------------------------------------------------------------------------------------------
// Targets

#[test]
fn fuzz_pack_trailers_and_tails() {
    let k = keys();
    let ran = fuzz("pack trailer", |rng, raw| {
        let u = &mut Unstructured::new(raw);
        let body_len = u64::from(u.int_in_range(4096..=1_000_000u32).unwrap_or(4096));
        let encrypted = rng.below(2) == 0;
        let entries: Vec<PackEntry> = (0..u.int_in_range(0..=20usize).unwrap_or(1))
            .map(|_| PackEntry {
                flags: if encrypted { 3 } else { 2 },
                ..pack_entry(u, body_len)
            })
            .collect();
        let plain = encode_trailer(&entries);
        let mutated = if rng.below(4) == 0 {
            plain.clone()
        } else {
            mutate(rng, plain.clone(), &plain)
        };
        // The decoder of the plaintext: allocation bounded by the input.
        check(
            "decode_trailer",
            &mutated,
            2 * mutated.len() + SLACK,
            || pack::decode_trailer("p", &mutated, body_len),
        )?;
        // Sealed and authenticated: any change is refused before decoding.
        let mode = if encrypted {
            SealMode::Encrypted(&k)
        } else {
            SealMode::Plain(&k)
        };
        let sealed = crypto::seal(mode, &plain, None);
        let sealed_m = mutate(rng, sealed.clone(), &sealed);
        let opened = check(
            "open_trailer",
            &sealed_m,
            2 * sealed_m.len() + SLACK,
            || pack::open_trailer(&k, "p", &sealed_m, body_len),
        )?;
        if sealed_m != sealed && opened.is_some() {
            return Err("a modified trailer was accepted".into());
        }
        if sealed_m == sealed && opened.is_none() {
            return Err("a valid trailer was refused".into());
        }
        // The tail: a length and the magic.
        let mut tail = (sealed.len() as u32).to_le_bytes().to_vec();
        tail.extend(PACK_MAGIC);
        let tail_m = mutate(rng, tail.clone(), &tail);
        check("decode_tail", &tail_m, SLACK, || {
            pack::decode_tail("p", &tail_m, body_len + sealed.len() as u64 + PACK_TAIL_LEN)
        })?;
        Ok(())
    });
    assert!(ran > 0);
}

#[test]
fn fuzz_sealed_blobs_and_headers() {
    let k = keys();
    const MAX: usize = 1 << 20;
    let ran = fuzz("sealed blob", |rng, raw| {
        let u = &mut Unstructured::new(raw);
        let len = u.int_in_range(0..=8192usize).unwrap_or(0);
        let plain: Vec<u8> = if rng.below(2) == 0 {
            rng.bytes(len)
        } else {
            vec![b'a'; len]
        };
        let encrypt = rng.below(2) == 0;
        let mode = if encrypt {
            SealMode::Encrypted(&k)
        } else {
            SealMode::Plain(&k)
        };
        let compress = [None, Some(1), Some(3)][rng.below(3)];
        let sealed = crypto::seal(mode, &plain, compress);
        let m = if rng.below(5) == 0 {
            sealed.clone()
        } else {
            mutate(rng, sealed.clone(), &sealed)
        };
        let bound = m.len().max(MAX) + SLACK;
        check("parse_header", &m, SLACK, || crypto::parse_header(&m))?;
        let opened = check("open", &m, bound, || crypto::open(&k, &m, MAX))?;
        match (&opened, m == sealed) {
            (Some(p), true) if *p != plain => return Err("round trip changed the data".into()),
            (None, true) => return Err("a valid blob was refused".into()),
            (Some(_), false) => return Err("a modified blob was accepted".into()),
            _ => {}
        }
        let id = if encrypt {
            k.chunk_id(&plain)
        } else {
            crypto::plain_chunk_id(&plain)
        };
        let chunk = check("open_chunk", &m, bound, || {
            crypto::open_chunk(&k, &m, MAX, &id)
        })?;
        if chunk.is_some() != (m == sealed) {
            return Err("open_chunk disagrees with open".into());
        }
        // Format-1 unencrypted blobs (a checksum only) go through the same reader.
        let mut v1 = vec![0xB5, 1, 0, 0];
        v1.extend(&plain);
        let sum: [u8; 32] =
            sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&v1)).into();
        v1.extend(sum);
        let v1m = mutate(rng, v1.clone(), &sealed);
        check("open format 1", &v1m, bound, || {
            crypto::open_chunk(&k, &v1m, MAX, &crypto::plain_chunk_id(&plain))
        })?;
        if check("open format 1 unvouched", &v1m, bound, || {
            crypto::open(&k, &v1m, MAX)
        })?
        .is_some()
        {
            return Err("an unauthenticated blob opened without a vouching id".into());
        }
        Ok(())
    });
    assert!(ran > 0);
}

#[test]
fn fuzz_listing_lines() {
    let ran = fuzz("listing", |rng, raw| {
        let u = &mut Unstructured::new(raw);
        let mut listing = Vec::new();
        for _ in 0..1 + u.int_in_range(0..=5usize).unwrap_or(0) {
            listing.extend(serde_json::to_vec(&listing_entry(u)).unwrap());
            listing.push(b'\n');
        }
        let valid = decode_listing(&listing);
        if let Err(e) = &valid {
            return Err(format!("a generated listing was refused: {e}"));
        }
        let m = mutate(rng, listing.clone(), &listing);
        check("decode_listing", &m, 4 * m.len() + SLACK, || {
            decode_listing(&m)
        })?;
        Ok(())
    });
    assert!(ran > 0);
}

#[test]
fn fuzz_snapshot_objects() {
    let ran = fuzz("snapshot object", |rng, raw| {
        let u = &mut Unstructured::new(raw);
        let json = serde_json::to_vec(&snapshot_object(u)).unwrap();
        if let Err(e) = SnapshotObject::decode(&json) {
            return Err(format!("a generated snapshot object was refused: {e}"));
        }
        let m = mutate(rng, json.clone(), &json);
        check("SnapshotObject::decode", &m, 4 * m.len() + SLACK, || {
            SnapshotObject::decode(&m)
        })?;
        Ok(())
    });
    assert!(ran > 0);
}

#[test]
fn fuzz_key_objects() {
    let master = MasterSecret::generate();
    let valid = WrappedKey::wrap(&master, "pw", KdfParams::fast_for_tests()).unwrap();
    let json = serde_json::to_vec(&valid).unwrap();
    let ran = fuzz("key object", |rng, raw| {
        let u = &mut Unstructured::new(raw);
        let mut w = valid.clone();
        if bool::arbitrary(u).unwrap_or(false) {
            w.kdf = KdfParams {
                m_kib: u32::arbitrary(u).unwrap_or(8),
                t_cost: u32::arbitrary(u).unwrap_or(1),
                p_cost: u32::arbitrary(u).unwrap_or(1),
            };
        }
        let base = serde_json::to_vec(&w).unwrap();
        let m = mutate(rng, base, &json);
        let decoded = check("WrappedKey::decode", &m, 4 * m.len() + SLACK, || {
            WrappedKey::decode(&m)
        })?;
        if let Some(w) = decoded {
            // What decodes is within the bounds Argon2 will be asked for.
            w.kdf
                .check()
                .map_err(|e| format!("decoded out of bounds: {e}"))?;
        }
        Ok(())
    });
    assert!(ran > 0);
}

/// The engine's error type is what callers see: every decoder error converts into it.
#[test]
fn decoder_errors_are_typed() {
    let k = keys();
    let e: Error = crypto::open(&k, b"nope", 10).unwrap_err().into();
    assert!(matches!(e, Error::Crypto(_)));
    let e: Error = pack::decode_trailer("p", b"xx", 0).unwrap_err().into();
    assert!(matches!(e, Error::Pack(_)));
    let e: Error = decode_listing(b"{").unwrap_err().into();
    assert!(matches!(e, Error::Format(_)));
    let e: Error = SnapshotObject::decode(b"[]").unwrap_err().into();
    assert!(matches!(e, Error::Format(_)));
}

/// The meter itself: it sees an allocation made inside, and nothing made outside.
#[test]
fn the_allocation_meter_sees_large_requests() {
    let (v, largest) = metered(|| Vec::<u8>::with_capacity(3 << 20));
    assert!(largest >= 3 << 20, "{largest}");
    let (_, none) = metered(|| v.len());
    assert_eq!(none, 0);
    let r = check("oversized", b"x", 1024, || Ok::<_, ()>(vec![0u8; 1 << 20]));
    assert!(r.is_err());
}
