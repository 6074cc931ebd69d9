//! A key per owner, and the ring of keys an operation may open blobs with.
//!
//! **Who holds which key.** An installation (one passphrase, one storage, one catalog shared
//! by its hosts) has one *installation key*: the random master secret `init` creates, wrapped
//! under the passphrase with Argon2id (`key-<id>.enc`, [`super::crypto::WrappedKey`]). Each
//! owner (`local`, `tg:<id>`) has an *owner key* of its own: another random master secret,
//! created by the first backup of that owner and wrapped by subkeys of the installation key
//! ([`super::crypto::KeyWrap`], stored as `key-owner-<id>.enc`). An owner's data (chunks, listings,
//! snapshot objects, pack trailers) is sealed and named with its own key only, so:
//!
//! - one owner's key material opens nothing of another owner's (the MAC fails first), and
//! - chunk ids are keyed per owner, unencrypted ones too ([`super::crypto::Keys::plain_chunk_id`]):
//!   two owners holding the same file get different ids and different stored blobs, and
//!   storage cannot tell that they hold the same file. There is no dedup across owners.
//!
//! **Why wrap owner keys under the installation key rather than each under the passphrase.**
//! Both end at the passphrase (Argon2id unlocks the installation key, HKDF derives the wrapping
//! pair from it), but this way a process pays Argon2id once however many owners there are
//! (the daemon unlocks at start, issue 18), and a passphrase change re-wraps one object, never
//! the owners' keys. Whoever holds the passphrase can read every owner's backups, as before:
//! owners are kept apart from each other, not from the installation's operator.
//!
//! **Hosts.** Every host of an installation opens the same installation key with the same
//! passphrase, and finds an owner's key in the shared catalog (or, on a new machine, in
//! storage). An owner's *first* key (lowest catalog row) is the one every host seals new data
//! with, so one owner's identical data deduplicates across hosts. Keys are stored before they
//! are recorded, and recorded before any blob uses them: a host killed in between leaves at
//! most a stored key nothing uses. Two hosts creating an owner's first key at once both store
//! theirs; both read back the same first row and use it.
//!
//! **Storage.** An owner key object goes to every lane (`Lanes::put_bytes`) before it is
//! recorded, and is seeded into a lane added later before that lane's first pack. `recover`
//! unwraps the installation key with the passphrase, then opens every `key-owner-*.enc` with it:
//! each is authenticated (and checked to be the key its name says) before use; one that fails
//! is reported by name and skipped.
//!
//! **Repositories from before owner keys** (one key for every owner) keep working: their data
//! stays sealed under the installation key, which stays in every ring, so old snapshots
//! restore as before. New data of every owner, from its first backup after the upgrade, is
//! sealed under the owner's new key; unchanged files keep pointing at their old chunks (they
//! are not read again), changed ones are stored again under the owner's key (no dedup with
//! the old chunks, whose ids are keyed differently). The legacy key does not become an owner's
//! key: it was shared by every owner, so it cannot separate any of them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::crypto::{self, ChunkId, CryptoError, Keys, Opened};
use super::pack::{self, PackError, Trailer};

/// Name of an owner key object in storage.
/// (`key-owner-<id>.enc`: beside the installation's `key-<id>.enc`, not a pack's name.)
pub fn owner_key_object_name(key_id: &str) -> String {
    format!("key-owner-{key_id}.enc")
}

/// The key id of an owner key object's name.
pub fn owner_key_id_of(name: &str) -> Option<&str> {
    let id = name.strip_prefix("key-owner-")?.strip_suffix(".enc")?;
    (id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
    .then_some(id)
}

/// One key of a ring: an owner's (named by its key id) or the installation's (`key_id` empty).
#[derive(Clone, Debug)]
pub struct RingKey {
    pub key_id: String,
    /// The owner of an owner key; empty for the installation key.
    pub owner: String,
    pub keys: Arc<Keys>,
}

/// The keys an operation may open blobs with: one owner's keys and the installation key (a
/// restore), or every key (verify, prune, scrub, recover). A blob opens under the key whose
/// MAC it carries; any other key fails authentication, so trying the ring's keys in turn
/// opens a blob under its own key or not at all.
pub struct KeyRing {
    keys: Vec<RingKey>,
    /// The slot that opened the last blob: blobs come pack by pack, and a pack holds one
    /// key's blobs, so this is almost always the right first try.
    hint: AtomicUsize,
}

impl KeyRing {
    pub fn new(keys: Vec<RingKey>) -> KeyRing {
        assert!(!keys.is_empty(), "a key ring holds at least one key");
        KeyRing {
            keys,
            hint: AtomicUsize::new(0),
        }
    }

    pub fn get(&self, slot: usize) -> &RingKey {
        &self.keys[slot]
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The slot of the key named `key_id` (empty: the installation key).
    pub fn slot_of(&self, key_id: &str) -> Option<usize> {
        self.keys.iter().position(|k| k.key_id == key_id)
    }

    /// Slots in the order to try them: the last one that worked first.
    fn order(&self) -> impl Iterator<Item = usize> + '_ {
        let n = self.keys.len();
        let start = self.hint.load(Ordering::Relaxed) % n;
        (0..n).map(move |i| (start + i) % n)
    }

    /// Tries `f` under each key until one authenticates the blob; any failure other than a
    /// MAC mismatch is the blob's own (the MAC matched, or the blob is malformed) and is
    /// returned at once. Every key failing gives the MAC mismatch.
    fn try_each<T, E>(
        &self,
        mut f: impl FnMut(&Keys) -> Result<T, E>,
        is_mac_mismatch: impl Fn(&E) -> bool,
    ) -> Result<(usize, T), E> {
        let mut last = None;
        for slot in self.order() {
            match f(&self.keys[slot].keys) {
                Ok(v) => {
                    self.hint.store(slot, Ordering::Relaxed);
                    return Ok((slot, v));
                }
                Err(e) if is_mac_mismatch(&e) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("a ring holds at least one key"))
    }

    /// [`crypto::open_chunk`] under whichever key of the ring sealed the blob.
    pub fn open_chunk(
        &self,
        sealed: &[u8],
        max_plain: usize,
        id: &ChunkId,
    ) -> Result<(usize, Opened), CryptoError> {
        self.try_each(
            |k| crypto::open_chunk(k, sealed, max_plain, id),
            |e| matches!(e, CryptoError::MacMismatch),
        )
    }

    /// [`crypto::open_unbound`] under whichever key of the ring sealed the blob.
    pub fn open_unbound(
        &self,
        sealed: &[u8],
        max_plain: usize,
    ) -> Result<(usize, Opened), CryptoError> {
        self.try_each(
            |k| crypto::open_unbound(k, sealed, max_plain),
            |e| matches!(e, CryptoError::MacMismatch),
        )
    }

    /// [`crypto::open`] under whichever key of the ring sealed the blob.
    pub fn open(&self, sealed: &[u8], max_plain: usize) -> Result<(usize, Vec<u8>), CryptoError> {
        self.try_each(
            |k| crypto::open(k, sealed, max_plain),
            |e| matches!(e, CryptoError::MacMismatch),
        )
    }

    /// [`pack::open_trailer`] under whichever key of the ring sealed the pack.
    pub fn open_trailer(
        &self,
        pack: &str,
        sealed: &[u8],
        body_len: u64,
    ) -> Result<(usize, Trailer), PackError> {
        self.try_each(
            |k| pack::open_trailer(k, pack, sealed, body_len),
            |e| {
                matches!(
                    e,
                    PackError::Crypto {
                        source: CryptoError::MacMismatch,
                        ..
                    }
                )
            },
        )
    }
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|k| k.key_id.as_str()).collect();
        write!(f, "KeyRing({ids:?})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::crypto::{MasterSecret, OwnerKey, SealMode, seal};

    fn ring_of(keys: &[(&str, &Keys)]) -> KeyRing {
        KeyRing::new(
            keys.iter()
                .map(|(id, k)| RingKey {
                    key_id: id.to_string(),
                    owner: String::new(),
                    keys: Arc::new((*k).clone()),
                })
                .collect(),
        )
    }

    #[test]
    fn a_ring_opens_each_blob_under_its_own_key_and_nothing_under_another_owners() {
        let inst = Keys::derive(&MasterSecret::generate());
        let (a, b) = (OwnerKey::generate("local"), OwnerKey::generate("tg:1"));
        let (ka, kb) = (a.keys(), b.keys());
        let ring_a = ring_of(&[("a", &ka), ("", &inst)]);
        for (encrypted, keys) in [(true, &ka), (false, &ka), (true, &inst), (false, &inst)] {
            let mode = if encrypted {
                SealMode::Encrypted(keys)
            } else {
                SealMode::Plain(keys)
            };
            let sealed = seal(mode, b"data", None);
            let id = keys.blob_id(encrypted, b"data");
            let (slot, opened) = ring_a.open_chunk(&sealed, 64, &id).unwrap();
            assert_eq!(opened.plaintext, b"data");
            assert_eq!(ring_a.get(slot).keys.chunk_id(b"k"), keys.chunk_id(b"k"));
        }
        // Owner B's blobs: an authenticated failure, whatever the order tried.
        for encrypted in [true, false] {
            let mode = if encrypted {
                SealMode::Encrypted(&kb)
            } else {
                SealMode::Plain(&kb)
            };
            let sealed = seal(mode, b"data", None);
            let id = kb.blob_id(encrypted, b"data");
            let e = ring_a.open_chunk(&sealed, 64, &id).unwrap_err();
            assert!(matches!(e, CryptoError::MacMismatch), "{e}");
            assert!(e.to_string().contains("authentication failed"), "{e}");
        }
        // A malformed blob fails at once, not as a MAC mismatch.
        assert!(matches!(
            ring_a.open(b"xx", 64),
            Err(CryptoError::Truncated)
        ));
    }

    #[test]
    fn owner_key_object_names() {
        let id = "0123456789abcdef0123456789abcdef";
        assert_eq!(owner_key_id_of(&owner_key_object_name(id)), Some(id));
        assert_eq!(owner_key_id_of("key-owner-xyz.enc"), None);
        assert_eq!(owner_key_id_of(&format!("key-{id}.enc")), None);
    }
}
