//! Keys and sealing: the one place where bytes are encrypted, authenticated and compressed.
//!
//! Blob format (all sealed objects: chunks, pack trailers, listings, snapshot objects, the
//! wrapped key):
//!
//! ```text
//! header(4) = [0xB5, version, flags, 0]      flags: bit0 encrypted, bit1 compressed
//! encrypted:   header | IV(16) | AES-256-CBC/PKCS#7 ciphertext | HMAC-SHA256(mac key, header|IV|ciphertext)(32)
//! unencrypted: header | payload | HMAC-SHA256(mac key, header|payload)(32)          (version 2)
//! ```
//!
//! Version 2 is written. Version 1 is still read: its encrypted blobs are the same as version
//! 2's, but its unencrypted blobs end in a bare SHA-256 of `header|payload`, which anyone can
//! compute. Such a blob proves nothing about who wrote it, so [`open`] refuses it
//! ([`CryptoError::Unauthenticated`]); only [`open_chunk`] accepts one, when the caller holds
//! the blob's id from an authenticated source and the content hashes to that id.
//!
//! Compression (zstd) happens before encryption and only when it makes the payload smaller.
//! `open` checks the MAC (constant time) before it decrypts or decompresses anything.
//! [`seal_many_into`] seals several blobs at once, their CBC chains encrypted side by side
//! (`cbc_encrypt_chains`); each comes out byte for byte as the `cbc` crate's encryptor makes
//! it alone (tested against it and against NIST's vectors), and is opened by that crate.
//!
//! Keys: a random [`MasterSecret`] per user, wrapped under a passphrase with Argon2id
//! ([`WrappedKey`]); subkeys for encryption, MAC, chunk ids, the two chunker seeds and restore
//! temporary names derived with HKDF-SHA256 ([`Keys`]). No type here prints key bytes in
//! `Debug`, and no error carries secret material.

use std::cell::RefCell;
use std::fmt;

use aes::Aes256;
use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockModeDecrypt, KeyIvInit};
use hkdf::Hkdf;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroize;

pub use crate::error::CryptoError;

type HmacSha256 = Hmac<Sha256>;
type Aes256CbcDec = cbc::Decryptor<Aes256>;

/// Length of a [`ChunkId`] in bytes.
pub const ID_LEN: usize = 32;

const MAGIC: u8 = 0xB5;
/// The format written.
const VERSION: u8 = 2;
/// The first format: as 2, except that unencrypted blobs carry only a SHA-256 checksum.
const VERSION_1: u8 = 1;
const FLAG_ENCRYPTED: u8 = 0b01;
const FLAG_COMPRESSED: u8 = 0b10;
const KNOWN_FLAGS: u8 = FLAG_ENCRYPTED | FLAG_COMPRESSED;
const HEADER_LEN: usize = 4;
const IV_LEN: usize = 16;
const BLOCK_LEN: usize = 16;
const TAG_LEN: usize = 32;
const KEY_LEN: usize = 32;
const MASTER_LEN: usize = 32;

const INFO_ENC: &[u8] = b"t-storinator v1 encryption";
const INFO_MAC: &[u8] = b"t-storinator v1 mac";
const INFO_ID: &[u8] = b"t-storinator v1 chunk-id";
// Format 2: one chunker seed per kind of snapshot. The cut points of unencrypted packs are
// visible, so their seed can be solved for; it must tell nothing about the encrypted one.
const INFO_SEED_ENCRYPTED: &[u8] = b"t-storinator v2 chunker seed, encrypted snapshots";
const INFO_SEED_UNENCRYPTED: &[u8] = b"t-storinator v2 chunker seed, unencrypted snapshots";
const INFO_TEMP: &[u8] = b"t-storinator v2 restore temporary names";
// Owner keys (issue 13): an owner's unencrypted blobs get keyed ids too, so that two owners
// holding the same file never share an id; the installation key wraps owner keys with its own
// pair of subkeys, unrelated to the ones that seal data.
const INFO_PLAIN_ID: &[u8] = b"t-storinator v3 owner plain chunk-id";
const INFO_WRAP_ENC: &[u8] = b"t-storinator v3 owner-key wrapping, encryption";
const INFO_WRAP_MAC: &[u8] = b"t-storinator v3 owner-key wrapping, mac";

/// Bounds on the Argon2id parameters of a stored key object, so that a planted or tampered
/// key object costs at most about a second or two and 1 GiB to try (the parameters written
/// are 64 MiB, 3 passes, 1 lane).
pub const MAX_KDF_M_KIB: u32 = 1024 * 1024;
pub const MAX_KDF_T_COST: u32 = 8;
pub const MAX_KDF_P_COST: u32 = 4;
/// Largest key object read from storage (a real one is about 500 bytes).
pub const MAX_KEY_OBJECT: u64 = 4096;

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the operating system's random number generator failed");
    b
}

// ---------------------------------------------------------------------------------------------
// Ids

/// 32-byte blob id (keyed HMAC of the plaintext, or SHA-256 for plain blobs).
/// `Display`/`Debug` and serde use lowercase hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; ID_LEN]);

impl ChunkId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Result<ChunkId, CryptoError> {
        if s.len() != 2 * ID_LEN {
            return Err(CryptoError::BadId(format!(
                "expected {} hex digits, got {}",
                2 * ID_LEN,
                s.len()
            )));
        }
        let mut b = [0u8; ID_LEN];
        hex::decode_to_slice(s, &mut b).map_err(|e| CryptoError::BadId(e.to_string()))?;
        Ok(ChunkId(b))
    }

    pub fn from_slice(b: &[u8]) -> Result<ChunkId, CryptoError> {
        let arr: [u8; ID_LEN] = b
            .try_into()
            .map_err(|_| CryptoError::BadId(format!("expected {ID_LEN} bytes, got {}", b.len())))?;
        Ok(ChunkId(arr))
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 2 * ID_LEN];
        // Cannot fail: the buffer is exactly twice the input.
        hex::encode_to_slice(self.0, &mut buf).map_err(|_| fmt::Error)?;
        f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ChunkId;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a 64-digit hex chunk id")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ChunkId, E> {
                ChunkId::from_hex(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// SHA-256 of the plaintext: ids of blobs stored unencrypted.
pub fn plain_chunk_id(plaintext: &[u8]) -> ChunkId {
    ChunkId(Sha256::digest(plaintext).into())
}

// ---------------------------------------------------------------------------------------------
// Keys

/// The user's random master secret. Zeroized on drop; `Debug` never shows it.
pub struct MasterSecret([u8; MASTER_LEN]);

impl MasterSecret {
    pub fn generate() -> MasterSecret {
        MasterSecret(random_bytes())
    }
}

#[cfg(feature = "test-support")]
impl MasterSecret {
    /// The secret's bytes, for tests that scan output for leaked keys. Only in test builds.
    pub fn bytes_for_tests(&self) -> [u8; MASTER_LEN] {
        self.0
    }
}

impl Drop for MasterSecret {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for MasterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterSecret(..)")
    }
}

/// Subkeys derived from the master secret with HKDF-SHA256. Zeroized on drop.
#[derive(Clone)]
pub struct Keys {
    enc: [u8; KEY_LEN],
    mac: [u8; KEY_LEN],
    id: [u8; KEY_LEN],
    temp: [u8; KEY_LEN],
    seed_encrypted: u64,
    seed_unencrypted: u64,
    /// The key of unencrypted blobs' ids: `None` for the installation key (SHA-256 ids, as
    /// every repository before owner keys wrote them), `Some` for an owner's key.
    plain_id: Option<[u8; KEY_LEN]>,
}

impl Keys {
    /// The installation's keys (and, in a repository from before owner keys, the keys of all
    /// its data): unencrypted blobs are named by their SHA-256.
    pub fn derive(master: &MasterSecret) -> Keys {
        Self::derive_impl(master, false)
    }

    /// An owner's keys: as [`Keys::derive`], except that unencrypted blobs are named by a
    /// keyed hash too, so no id is shared with another owner.
    pub fn derive_owner(master: &MasterSecret) -> Keys {
        Self::derive_impl(master, true)
    }

    fn derive_impl(master: &MasterSecret, owner: bool) -> Keys {
        let hk = Hkdf::<Sha256>::new(None, &master.0);
        let mut k = Keys {
            enc: [0; KEY_LEN],
            mac: [0; KEY_LEN],
            id: [0; KEY_LEN],
            temp: [0; KEY_LEN],
            seed_encrypted: 0,
            seed_unencrypted: 0,
            plain_id: None,
        };
        if owner {
            let mut plain = [0u8; KEY_LEN];
            hk.expand(INFO_PLAIN_ID, &mut plain).expect("hkdf length");
            k.plain_id = Some(plain);
        }
        // 32 bytes is far below HKDF-SHA256's 255*32 limit: these cannot fail.
        hk.expand(INFO_ENC, &mut k.enc).expect("hkdf length");
        hk.expand(INFO_MAC, &mut k.mac).expect("hkdf length");
        hk.expand(INFO_ID, &mut k.id).expect("hkdf length");
        hk.expand(INFO_TEMP, &mut k.temp).expect("hkdf length");
        let mut seed = [0u8; 8];
        hk.expand(INFO_SEED_ENCRYPTED, &mut seed)
            .expect("hkdf length");
        k.seed_encrypted = u64::from_le_bytes(seed);
        hk.expand(INFO_SEED_UNENCRYPTED, &mut seed)
            .expect("hkdf length");
        k.seed_unencrypted = u64::from_le_bytes(seed);
        seed.zeroize();
        k
    }

    /// The encryption, MAC and chunk-id keys, for tests that scan output for leaked keys.
    /// Only in test builds.
    #[cfg(feature = "test-support")]
    pub fn bytes_for_tests(&self) -> [[u8; KEY_LEN]; 3] {
        [self.enc, self.mac, self.id]
    }

    /// HMAC-SHA256 with the chunk-id key over the plaintext.
    pub fn chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        let mut m = hmac_sha256(&self.id);
        m.update(plaintext);
        ChunkId(m.finalize().into_bytes().into())
    }

    /// The id of an unencrypted blob's plaintext: SHA-256 under the installation key, a keyed
    /// hash under an owner's key.
    pub fn plain_chunk_id(&self, plaintext: &[u8]) -> ChunkId {
        match &self.plain_id {
            None => plain_chunk_id(plaintext),
            Some(k) => {
                let mut m = hmac_sha256(k);
                m.update(plaintext);
                ChunkId(m.finalize().into_bytes().into())
            }
        }
    }

    /// The id of a blob's plaintext sealed encrypted or not.
    pub fn blob_id(&self, encrypted: bool, plaintext: &[u8]) -> ChunkId {
        if encrypted {
            self.chunk_id(plaintext)
        } else {
            self.plain_chunk_id(plaintext)
        }
    }

    /// The gear-table seed of the content-defined chunker: one for encrypted snapshots and an
    /// unrelated one for unencrypted snapshots, whose cut points storage can see.
    pub fn chunker_seed(&self, encrypted: bool) -> u64 {
        if encrypted {
            self.seed_encrypted
        } else {
            self.seed_unencrypted
        }
    }

    /// A keyed tag of `parts` (HMAC-SHA256 under the restore-temporary key, each part
    /// length-prefixed): lets a restore recognise the temporary files it made itself.
    pub fn temp_tag(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = hmac_sha256(&self.temp);
        for p in parts {
            m.update(&(p.len() as u64).to_le_bytes());
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        self.enc.zeroize();
        self.mac.zeroize();
        self.id.zeroize();
        self.temp.zeroize();
        self.seed_encrypted.zeroize();
        self.seed_unencrypted.zeroize();
        if let Some(k) = self.plain_id.as_mut() {
            k.zeroize();
        }
    }
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Keys(..)")
    }
}

fn hmac_sha256(key: &[u8; KEY_LEN]) -> HmacSha256 {
    // HMAC accepts keys of any length; this cannot fail.
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("hmac takes any key length")
}

// ---------------------------------------------------------------------------------------------
// Sealing

/// How to seal: encrypted, or unencrypted (readable without the key, still authenticated by
/// an HMAC under the MAC key).
#[derive(Clone, Copy)]
pub enum SealMode<'a> {
    Encrypted(&'a Keys),
    Plain(&'a Keys),
}

impl SealMode<'_> {
    pub fn is_encrypted(&self) -> bool {
        matches!(self, SealMode::Encrypted(_))
    }
}

impl fmt::Debug for SealMode<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SealMode::Encrypted(_) => f.write_str("Encrypted"),
            SealMode::Plain(_) => f.write_str("Plain"),
        }
    }
}

/// An explicit (encryption, MAC) key pair: what both [`Keys`] and the passphrase KEK seal with.
struct KeyPair<'a> {
    enc: &'a [u8; KEY_LEN],
    mac: &'a [u8; KEY_LEN],
}

impl Keys {
    fn pair(&self) -> KeyPair<'_> {
        KeyPair {
            enc: &self.enc,
            mac: &self.mac,
        }
    }
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

/// Plaintexts at least this long are probed (see [`looks_compressible`]) before being
/// compressed whole; shorter ones cost little to compress whatever they hold.
const PROBE_FROM: usize = 256 * 1024;

/// The probe: this many samples, each this long, spread evenly over the plaintext.
const PROBE_SAMPLES: usize = 4;
const PROBE_SAMPLE_LEN: usize = 16 * 1024;

/// Whether compressing `plaintext` whole looks worth it: its samples, compressed one by one,
/// yes if any comes out at least 1/32 shorter (the output buffer is that long: a sample that
/// does not fit fails). Incompressible data (media, archives, encrypted files) fails all
/// four samples: 1/16 of the cost of compressing a 1 MiB chunk whole, which was about a
/// fifteenth of a first backup's CPU on such data. Compressible data usually passes at the
/// first sample (1/64 more work). A plaintext that compresses only where no sample falls,
/// or only across distances longer than a sample, is stored as it is: a loss of at most
/// what those parts would have saved.
fn looks_compressible(comp: &mut zstd::bulk::Compressor<'static>, plaintext: &[u8]) -> bool {
    let mut probe = [0u8; PROBE_SAMPLE_LEN - PROBE_SAMPLE_LEN / 32];
    let stride = plaintext.len() / PROBE_SAMPLES;
    (0..PROBE_SAMPLES).any(|i| {
        let at = i * stride;
        let sample = &plaintext[at..(at + PROBE_SAMPLE_LEN).min(plaintext.len())];
        comp.compress_to_buffer(sample, &mut probe[..]).is_ok()
    })
}

/// Below [`PROBE_FROM`], the bytes whose frequencies [`looks_skewed`] counts: the whole
/// plaintext up to this long, else four pieces of a quarter of this, spread over it. Shorter
/// plaintexts than a quarter of it are compressed whatever they hold.
const SKEW_SAMPLE: usize = 2048;

/// The chance that two bytes drawn from a plaintext are equal, as a power of 2 (minus its
/// collision entropy in bits per byte), above which its bytes are uneven enough for zstd's
/// Huffman coding of literals to pay with no repeat at all. Random bytes: 2^-8; at 2^-7.5
/// or less, the (Shannon) entropy is 7.5 bits per byte or more, so Huffman coding could save
/// at most 1/16. Measured (as collision entropy) on samples of this machine's files, 300
/// each: random bytes 7.83 or more, Rust sources 2.5–4.9, shared libraries 0.1–4.4, PNG
/// images 4.8–8.0 (178 above 7.5), gzip files 7.8–8.1.
const SKEWED_ABOVE: f64 = -7.5;

/// The zstd level of the pass that looks for repeats in a plaintext whose bytes are even. A
/// negative level keeps literals raw, so all it can find is repeats, and skips ahead where
/// it finds none. zstd's own benchmark on 8 KiB of random bytes: 4.5 GB/s at -5 and 1.15 at
/// level 3; on random bytes with a block of 512 or 64 bytes repeated, -5 finds the repeats
/// that level 3 does (to within 1.5 % of its output).
const REPEATS_PROBE_LEVEL: i32 = -5;

thread_local! {
    /// The output of [`has_repeats`]' pass (thrown away).
    static PROBE_OUT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Whether the bytes of `plaintext` (a sample of it, see [`SKEW_SAMPLE`]) are uneven enough
/// for compression to pay without any repeat (see [`SKEWED_ABOVE`]). The chance that two
/// bytes are equal is estimated without bias from the pairs of the sample, so a short sample
/// of random bytes measures 2^-8 like a long one.
fn looks_skewed(plaintext: &[u8]) -> bool {
    // Four tables, so that a run of one byte value does not wait on its own count; each
    // counts at most a quarter of the sample and 3.
    const _: () = assert!(SKEW_SAMPLE / 4 + 3 <= u16::MAX as usize);
    let mut counts = [[0u16; 256]; 4];
    let mut count = |bytes: &[u8]| {
        let mut quads = bytes.chunks_exact(4);
        for q in &mut quads {
            for (table, b) in counts.iter_mut().zip(q) {
                table[usize::from(*b)] += 1;
            }
        }
        for b in quads.remainder() {
            counts[0][usize::from(*b)] += 1;
        }
    };
    let n = if plaintext.len() <= SKEW_SAMPLE {
        count(plaintext);
        plaintext.len()
    } else {
        let piece = SKEW_SAMPLE / 4;
        let stride = plaintext.len() / 4;
        (0..4).for_each(|i| count(&plaintext[i * stride..i * stride + piece]));
        SKEW_SAMPLE
    };
    let pairs: u64 = (0..256)
        .map(|v| counts.iter().map(|t| u64::from(t[v])).sum::<u64>())
        .map(|c| c * c.saturating_sub(1))
        .sum();
    let all_pairs = (n * n.saturating_sub(1)) as f64;
    pairs as f64 > all_pairs * SKEWED_ABOVE.exp2()
}

/// Whether a fast pass over `plaintext` (see [`REPEATS_PROBE_LEVEL`]) finds repeats that make
/// it any shorter. Leaves `comp` at that level.
fn has_repeats(comp: &mut zstd::bulk::Compressor<'static>, plaintext: &[u8]) -> bool {
    if comp.set_compression_level(REPEATS_PROBE_LEVEL).is_err() {
        return true;
    }
    PROBE_OUT.with(|out| {
        let mut out = out.borrow_mut();
        let room = plaintext.len().saturating_sub(1);
        if out.len() < room {
            out.resize(room, 0);
        }
        comp.compress_to_buffer(plaintext, &mut out[..room]).is_ok()
    })
}

/// Whether compressing a plaintext shorter than [`PROBE_FROM`] looks worth it. Most small
/// files that don't compress (images, archives, keys) have bytes as even as random ones, and
/// zstd at level 3 spent about a ninth of a first backup's CPU on 100,000 of them, mostly
/// counting their bytes and looking for repeats in vain: this counts a sample's bytes (cheap)
/// and, if they are even, makes one fast pass for repeats, which is all that could shrink
/// them. Text and code are uneven and compressed as before, at no extra cost. What is lost:
/// a plaintext whose bytes look even (in the sample) and that has no repeat, but whose
/// Huffman coding would have saved under about 1/16.
fn small_looks_compressible(comp: &mut zstd::bulk::Compressor<'static>, plaintext: &[u8]) -> bool {
    plaintext.len() < SKEW_SAMPLE / 4 || looks_skewed(plaintext) || has_repeats(comp, plaintext)
}

/// Appends `plaintext`, zstd-compressed at `level`, to `out` if that is smaller than the
/// plaintext; returns whether it did. Writes straight into `out`'s spare capacity.
fn try_compress_into(out: &mut Vec<u8>, plaintext: &[u8], level: i32) -> bool {
    let body = out.len();
    let written = COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(level).ok();
        }
        let comp = c.as_mut()?;
        let worth_it = if plaintext.len() >= PROBE_FROM {
            comp.set_compression_level(level).ok()?;
            looks_compressible(comp, plaintext)
        } else {
            small_looks_compressible(comp, plaintext)
        };
        if !worth_it {
            return None;
        }
        comp.set_compression_level(level).ok()?;
        out.reserve(zstd::compress_bound(plaintext.len()));
        let mut cur = std::io::Cursor::new(&mut *out);
        cur.set_position(body as u64);
        comp.compress_to_buffer(plaintext, &mut cur).ok()
    });
    match written {
        Some(n) if n < plaintext.len() && out.len() == body + n => true,
        _ => {
            out.truncate(body);
            false
        }
    }
}

/// A blob being sealed: where it starts in its buffer, where its message starts (after the
/// header and IV), and its IV.
struct Sealing {
    start: usize,
    body: usize,
    iv: [u8; IV_LEN],
}

/// The single implementation of the format's writer (always the current version): seals each
/// of `plaintexts` into the buffer of the same place in `outs` (appended). Several at once:
/// their encryption runs side by side (see [`cbc_encrypt_chains`]).
fn seal_impl(
    outs: &mut [Vec<u8>],
    kp: KeyPair<'_>,
    encrypt: bool,
    plaintexts: &[&[u8]],
    compress: Option<i32>,
) {
    assert_eq!(outs.len(), plaintexts.len(), "one buffer per blob");
    let sealing: Vec<Sealing> = outs
        .iter_mut()
        .zip(plaintexts)
        .map(|(out, plaintext)| begin_seal(out, encrypt, plaintext, compress))
        .collect();
    if encrypt {
        let mut chains: Vec<(&[u8; IV_LEN], &mut [u8])> = outs
            .iter_mut()
            .zip(&sealing)
            .map(|(out, s)| (&s.iv, &mut out[s.body..]))
            .collect();
        cbc_encrypt_chains(kp.enc, &mut chains);
    }
    // Encrypt-then-MAC; an unencrypted blob is authenticated the same way.
    for (out, s) in outs.iter_mut().zip(&sealing) {
        let mut m = hmac_sha256(kp.mac);
        m.update(&out[s.start..]);
        let tag = m.finalize().into_bytes();
        out.extend_from_slice(&tag);
    }
}

/// Appends a blob's header, IV (encrypted) and message: the plaintext, compressed if that is
/// smaller, padded to whole blocks (PKCS#7) when it is to be encrypted.
fn begin_seal(
    out: &mut Vec<u8>,
    encrypt: bool,
    plaintext: &[u8],
    compress: Option<i32>,
) -> Sealing {
    let start = out.len();
    out.reserve(sealed_len_bound(plaintext.len()));
    let mut flags = 0u8;
    if encrypt {
        flags |= FLAG_ENCRYPTED;
    }
    out.extend_from_slice(&[MAGIC, VERSION, flags, 0]);
    let iv: [u8; IV_LEN] = if encrypt { random_bytes() } else { [0; IV_LEN] };
    if encrypt {
        out.extend_from_slice(&iv);
    }
    let body = out.len();
    if let Some(level) = compress
        && try_compress_into(out, plaintext, level)
    {
        flags |= FLAG_COMPRESSED;
        out[start + 2] = flags;
    } else {
        out.extend_from_slice(plaintext);
    }
    if encrypt {
        let pad = BLOCK_LEN - (out.len() - body) % BLOCK_LEN;
        out.resize(out.len() + pad, pad as u8);
    }
    Sealing { start, body, iv }
}

/// AES-256-CBC encryption in place of several messages (each whole blocks, with its own IV):
/// the same bytes as `cbc::Encryptor` makes of each alone. A CBC block waits for the one
/// before it, so one message at a time leaves the processor's AES unit waiting on each
/// block's latency; blocks of different messages don't wait on each other, and taking one of
/// each in turn keeps several in flight: four messages go about four times as fast as one.
fn cbc_encrypt_chains(key: &[u8; KEY_LEN], chains: &mut [(&[u8; IV_LEN], &mut [u8])]) {
    use aes::cipher::consts::U16;
    use aes::cipher::{
        Array, BlockCipherEncBackend, BlockCipherEncClosure, BlockCipherEncrypt, BlockSizeUser,
    };

    struct Chains<'a, 'b, 'c>(&'a mut [(&'b [u8; IV_LEN], &'c mut [u8])]);

    impl BlockSizeUser for Chains<'_, '_, '_> {
        type BlockSize = U16;
    }

    impl BlockCipherEncClosure for Chains<'_, '_, '_> {
        #[inline(always)]
        fn call<B: BlockCipherEncBackend<BlockSize = U16>>(self, backend: &B) {
            let longest = self.0.iter().map(|(_, m)| m.len()).max().unwrap_or(0);
            for at in (0..longest).step_by(BLOCK_LEN) {
                for (iv, msg) in self.0.iter_mut() {
                    if at >= msg.len() {
                        continue;
                    }
                    let before: &[u8] = if at == 0 {
                        &iv[..]
                    } else {
                        &msg[at - BLOCK_LEN..at]
                    };
                    let mut block = Array::<u8, U16>::default();
                    for (b, (p, c)) in block.iter_mut().zip(msg[at..].iter().zip(before)) {
                        *b = p ^ c;
                    }
                    backend.encrypt_block((&mut block).into());
                    msg[at..at + BLOCK_LEN].copy_from_slice(&block);
                }
            }
        }
    }

    debug_assert!(chains.iter().all(|(_, m)| m.len() % BLOCK_LEN == 0));
    Aes256::new(key.into()).encrypt_with_backend(Chains(chains));
}

/// Seal `plaintext` into a self-describing blob appended to `out`.
///
/// `compress: Some(level)` compresses with zstd first; the compressed form is kept only if it
/// is smaller (the header's flag says which).
pub fn seal_into(out: &mut Vec<u8>, mode: SealMode<'_>, plaintext: &[u8], compress: Option<i32>) {
    seal_many_into(std::slice::from_mut(out), mode, &[plaintext], compress);
}

/// [`seal_into`] for several blobs at once, each into the buffer of the same place in `outs`:
/// faster than one by one (their encryption runs side by side).
pub fn seal_many_into(
    outs: &mut [Vec<u8>],
    mode: SealMode<'_>,
    plaintexts: &[&[u8]],
    compress: Option<i32>,
) {
    let (keys, encrypt) = match mode {
        SealMode::Encrypted(k) => (k, true),
        SealMode::Plain(k) => (k, false),
    };
    seal_impl(outs, keys.pair(), encrypt, plaintexts, compress);
}

/// [`seal_into`] a fresh `Vec`.
pub fn seal(mode: SealMode<'_>, plaintext: &[u8], compress: Option<i32>) -> Vec<u8> {
    let mut out = Vec::new();
    seal_into(&mut out, mode, plaintext, compress);
    out
}

/// Upper bound on sealed size for `n` plaintext bytes (uncompressed worst case).
pub fn sealed_len_bound(n: usize) -> usize {
    HEADER_LEN + IV_LEN + (n / BLOCK_LEN + 1) * BLOCK_LEN + TAG_LEN
}

/// A parsed blob header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u8,
    pub encrypted: bool,
    pub compressed: bool,
}

impl Header {
    /// A format-1 unencrypted blob: integrity by a bare checksum, no authentication.
    pub fn is_unauthenticated(&self) -> bool {
        self.version == VERSION_1 && !self.encrypted
    }
}

/// Parses and checks a blob's header.
pub fn parse_header(sealed: &[u8]) -> Result<Header, CryptoError> {
    if sealed.len() < HEADER_LEN {
        return Err(CryptoError::Truncated);
    }
    if sealed[0] != MAGIC {
        return Err(CryptoError::BadMagic);
    }
    if sealed[1] != VERSION && sealed[1] != VERSION_1 {
        return Err(CryptoError::UnsupportedVersion(sealed[1]));
    }
    let flags = sealed[2];
    if flags & !KNOWN_FLAGS != 0 {
        return Err(CryptoError::Malformed("unknown flags"));
    }
    if sealed[3] != 0 {
        return Err(CryptoError::Malformed("reserved header byte is set"));
    }
    Ok(Header {
        version: sealed[1],
        encrypted: flags & FLAG_ENCRYPTED != 0,
        compressed: flags & FLAG_COMPRESSED != 0,
    })
}

/// Whether a sealed blob is encrypted, without opening it.
pub fn sealed_is_encrypted(sealed: &[u8]) -> Result<bool, CryptoError> {
    Ok(parse_header(sealed)?.encrypted)
}

/// What the reader accepts besides blobs authenticated with the key.
#[derive(Clone, Copy)]
enum Accept {
    /// Only authenticated blobs.
    Authenticated,
    /// Also a format-1 unencrypted blob, whose checksum is verified; the caller must then
    /// check its content against something authenticated.
    Format1Checksum,
}

/// The single implementation of the format's reader.
fn open_impl(
    kp: KeyPair<'_>,
    sealed: &[u8],
    max_plain: usize,
    accept: Accept,
) -> Result<(Header, Vec<u8>), CryptoError> {
    let header = parse_header(sealed)?;
    if header.is_unauthenticated() {
        if matches!(accept, Accept::Authenticated) {
            return Err(CryptoError::Unauthenticated);
        }
        if sealed.len() < HEADER_LEN + TAG_LEN {
            return Err(CryptoError::Truncated);
        }
        let (body, sum) = sealed.split_at(sealed.len() - TAG_LEN);
        if Sha256::digest(body).as_slice() != sum {
            return Err(CryptoError::ChecksumMismatch);
        }
        return finish_open(header, &body[HEADER_LEN..], max_plain);
    }
    let min = if header.encrypted {
        HEADER_LEN + IV_LEN + BLOCK_LEN + TAG_LEN
    } else {
        HEADER_LEN + TAG_LEN
    };
    if sealed.len() < min {
        return Err(CryptoError::Truncated);
    }
    let (authed, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let mut m = hmac_sha256(kp.mac);
    m.update(authed);
    m.verify_slice(tag).map_err(|_| CryptoError::MacMismatch)?;
    if !header.encrypted {
        return finish_open(header, &authed[HEADER_LEN..], max_plain);
    }
    let iv: &[u8; IV_LEN] = authed[HEADER_LEN..HEADER_LEN + IV_LEN]
        .try_into()
        .expect("length checked");
    let ct = &authed[HEADER_LEN + IV_LEN..];
    if ct.len() % BLOCK_LEN != 0 {
        return Err(CryptoError::Malformed(
            "ciphertext is not a whole number of blocks",
        ));
    }
    // Cheap early reject: the padded plaintext is at most one block longer than the data.
    if !header.compressed && ct.len() - BLOCK_LEN > max_plain {
        return Err(CryptoError::TooLarge(max_plain));
    }
    let mut buf = ct.to_vec();
    let pt_len = Aes256CbcDec::new(kp.enc.into(), iv.into())
        .decrypt_padded::<Pkcs7>(&mut buf)
        .map_err(|_| CryptoError::Malformed("bad padding"))?
        .len();
    buf.truncate(pt_len);
    if header.compressed {
        let out = decompress_limited(&buf, max_plain);
        buf.zeroize();
        return Ok((header, out?));
    }
    if buf.len() > max_plain {
        return Err(CryptoError::TooLarge(max_plain));
    }
    Ok((header, buf))
}

/// Decompresses (or copies) an unencrypted payload within the limit.
fn finish_open(
    header: Header,
    data: &[u8],
    max_plain: usize,
) -> Result<(Header, Vec<u8>), CryptoError> {
    if header.compressed {
        return Ok((header, decompress_limited(data, max_plain)?));
    }
    if data.len() > max_plain {
        return Err(CryptoError::TooLarge(max_plain));
    }
    Ok((header, data.to_vec()))
}

fn decompress_limited(data: &[u8], max_plain: usize) -> Result<Vec<u8>, CryptoError> {
    if let Ok(Some(size)) = zstd::zstd_safe::get_frame_content_size(data)
        && size > max_plain as u64
    {
        return Err(CryptoError::TooLarge(max_plain));
    }
    zstd::bulk::decompress(data, max_plain).map_err(|e| CryptoError::Decompress(e.to_string()))
}

/// Verify, then decrypt, then decompress (at most `max_plain` bytes of output).
///
/// Only blobs authenticated with `keys` are opened: the MAC (constant time) is checked before
/// anything else touches the payload. A format-1 unencrypted blob, which carries only a
/// checksum, gives [`CryptoError::Unauthenticated`].
pub fn open(keys: &Keys, sealed: &[u8], max_plain: usize) -> Result<Vec<u8>, CryptoError> {
    open_impl(keys.pair(), sealed, max_plain, Accept::Authenticated).map(|(_, p)| p)
}

/// A blob opened by [`open_chunk`].
#[derive(Debug)]
pub struct Opened {
    pub plaintext: Vec<u8>,
    /// The blob was encrypted (its id is keyed) rather than unencrypted (its id is SHA-256).
    pub encrypted: bool,
}

/// Opens the blob that holds the content with id `id`, and checks that it does: the keyed id
/// of an encrypted blob's plaintext, the SHA-256 of an unencrypted one's.
///
/// `id` must come from an authenticated source (the catalog, an authenticated trailer, an
/// authenticated listing or snapshot object). That source then vouches for the content, so a
/// format-1 unencrypted blob (checksum only) is accepted too when it hashes to `id`.
pub fn open_chunk(
    keys: &Keys,
    sealed: &[u8],
    max_plain: usize,
    id: &ChunkId,
) -> Result<Opened, CryptoError> {
    let (header, plaintext) = open_impl(keys.pair(), sealed, max_plain, Accept::Format1Checksum)?;
    let actual = if header.encrypted {
        keys.chunk_id(&plaintext)
    } else if header.is_unauthenticated() {
        // Format 1 predates owner keys: its unencrypted ids are always SHA-256.
        plain_chunk_id(&plaintext)
    } else {
        keys.plain_chunk_id(&plaintext)
    };
    if actual != *id {
        return Err(CryptoError::WrongId);
    }
    Ok(Opened {
        plaintext,
        encrypted: header.encrypted,
    })
}

/// Opens a chunk's blob like [`open_chunk`] (MAC first; a format-1 unencrypted blob by its
/// checksum), without recomputing the chunk's id from the plaintext: one SHA-256 pass fewer per
/// byte. The blob is authentic, but nothing yet says it is the chunk that was asked for.
///
/// Only for a caller that compares the plaintext with a hash from an authenticated source
/// before anything else sees it: a restore writes a file to a temporary name and renames it
/// only once the file's recorded SHA-256 matches. When it does not, [`open_chunk`] says which
/// chunk was wrong.
pub fn open_unbound(keys: &Keys, sealed: &[u8], max_plain: usize) -> Result<Opened, CryptoError> {
    let (header, plaintext) = open_impl(keys.pair(), sealed, max_plain, Accept::Format1Checksum)?;
    Ok(Opened {
        plaintext,
        encrypted: header.encrypted,
    })
}

/// Opens a format-1 unencrypted blob by its checksum alone. Nothing authenticates it: use the
/// result only to compare with something trusted (`verify` compares a format-1 unencrypted
/// pack's trailer with the catalog that recorded the pack).
pub fn open_format1_unencrypted(sealed: &[u8], max_plain: usize) -> Result<Vec<u8>, CryptoError> {
    let header = parse_header(sealed)?;
    if !header.is_unauthenticated() {
        return Err(CryptoError::Malformed("not a format-1 unencrypted blob"));
    }
    // No key is consulted on this path.
    let unused = [0u8; KEY_LEN];
    let kp = KeyPair {
        enc: &unused,
        mac: &unused,
    };
    open_impl(kp, sealed, max_plain, Accept::Format1Checksum).map(|(_, p)| p)
}

// ---------------------------------------------------------------------------------------------
// Passphrase wrapping

/// Argon2id parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub m_kib: u32,
    pub t_cost: u32,
    pub p_cost: u32,
}

impl KdfParams {
    /// 64 MiB, 3 passes, 1 lane.
    pub fn interactive() -> Self {
        KdfParams {
            m_kib: 64 * 1024,
            t_cost: 3,
            p_cost: 1,
        }
    }

    /// The smallest parameters argon2 accepts (8 KiB, 1 pass, 1 lane). Tests only.
    pub fn fast_for_tests() -> Self {
        KdfParams {
            m_kib: argon2::Params::MIN_M_COST,
            t_cost: 1,
            p_cost: 1,
        }
    }

    /// Refuses parameters beyond the bounds (a key object from storage is hostile until its
    /// passphrase opens it).
    pub fn check(&self) -> Result<(), CryptoError> {
        let over = |what: &str, v: u32, max: u32| {
            Err(CryptoError::Kdf(format!(
                "{what} {v} is above the limit of {max}"
            )))
        };
        if self.m_kib > MAX_KDF_M_KIB {
            return over("memory cost (KiB)", self.m_kib, MAX_KDF_M_KIB);
        }
        if self.t_cost > MAX_KDF_T_COST {
            return over("time cost", self.t_cost, MAX_KDF_T_COST);
        }
        if self.p_cost > MAX_KDF_P_COST {
            return over("parallelism", self.p_cost, MAX_KDF_P_COST);
        }
        Ok(())
    }
}

/// Key-encryption key derived from a passphrase: `enc | mac`. Zeroized on drop.
struct Kek([u8; 2 * KEY_LEN]);

impl Kek {
    fn derive(passphrase: &str, salt: &[u8], kdf: KdfParams) -> Result<Kek, CryptoError> {
        kdf.check()?;
        let params = argon2::Params::new(kdf.m_kib, kdf.t_cost, kdf.p_cost, Some(2 * KEY_LEN))
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        let a2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
        let mut kek = Kek([0; 2 * KEY_LEN]);
        a2.hash_password_into(passphrase.as_bytes(), salt, &mut kek.0)
            .map_err(|e| CryptoError::Kdf(e.to_string()))?;
        Ok(kek)
    }

    fn pair(&self) -> KeyPair<'_> {
        let (enc, mac) = self.0.split_at(KEY_LEN);
        KeyPair {
            enc: enc.try_into().expect("half of the kek"),
            mac: mac.try_into().expect("half of the kek"),
        }
    }
}

impl Drop for Kek {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

/// The master secret wrapped under a passphrase (stored as JSON, also in storage as the key
/// object). Holds no secret in the clear.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WrappedKey {
    /// 16 random bytes, hex; stays the same across passphrase changes.
    pub key_id: String,
    /// 16 random bytes, fresh for every wrap.
    pub salt: Vec<u8>,
    pub kdf: KdfParams,
    /// The sealed (encrypted, uncompressed) master secret.
    pub wrapped: Vec<u8>,
}

impl WrappedKey {
    /// Argon2id(passphrase, salt, params) → 64 bytes → (enc, mac) pair that seals the master
    /// secret in the encrypted blob format.
    pub fn wrap(
        master: &MasterSecret,
        passphrase: &str,
        kdf: KdfParams,
    ) -> Result<WrappedKey, CryptoError> {
        let key_id: [u8; 16] = random_bytes();
        Self::wrap_with_id(master, passphrase, kdf, hex::encode(key_id))
    }

    fn wrap_with_id(
        master: &MasterSecret,
        passphrase: &str,
        kdf: KdfParams,
        key_id: String,
    ) -> Result<WrappedKey, CryptoError> {
        let salt: [u8; 16] = random_bytes();
        let kek = Kek::derive(passphrase, &salt, kdf)?;
        let mut wrapped = Vec::with_capacity(sealed_len_bound(MASTER_LEN));
        seal_impl(
            std::slice::from_mut(&mut wrapped),
            kek.pair(),
            true,
            &[&master.0[..]],
            None,
        );
        Ok(WrappedKey {
            key_id,
            salt: salt.to_vec(),
            kdf,
            wrapped,
        })
    }

    /// Same key_id, new salt: re-wrap under a new passphrase (no data re-encryption).
    pub fn rewrap(&self, old: &str, new: &str, kdf: KdfParams) -> Result<WrappedKey, CryptoError> {
        let master = self.unwrap(old)?;
        Self::wrap_with_id(&master, new, kdf, self.key_id.clone())
    }

    /// Reads a key object (as stored in storage), checking every field against the format's
    /// bounds before anything is derived from it.
    pub fn decode(bytes: &[u8]) -> Result<WrappedKey, CryptoError> {
        if bytes.len() as u64 > MAX_KEY_OBJECT {
            return Err(CryptoError::BadKeyObject(format!(
                "{} bytes, more than the {MAX_KEY_OBJECT} a key object may have",
                bytes.len()
            )));
        }
        let w: WrappedKey =
            serde_json::from_slice(bytes).map_err(|e| CryptoError::BadKeyObject(e.to_string()))?;
        w.check()?;
        Ok(w)
    }

    /// Checks the fields against the format: a 32-digit hex id, a 16 to 64 byte salt,
    /// bounded KDF parameters, and an encrypted blob of exactly a wrapped master key's size.
    pub fn check(&self) -> Result<(), CryptoError> {
        let bad = |m: &str| Err(CryptoError::BadKeyObject(m.to_string()));
        if self.key_id.len() != 32
            || !self
                .key_id
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return bad("key id is not 32 lowercase hex digits");
        }
        if !(16..=64).contains(&self.salt.len()) {
            return bad("salt is not 16 to 64 bytes");
        }
        self.kdf.check()?;
        if self.wrapped.len() != sealed_len_bound(MASTER_LEN) {
            return bad("wrapped key has the wrong length");
        }
        let h = parse_header(&self.wrapped)?;
        if !h.encrypted || h.compressed {
            return bad("wrapped key is not an encrypted, uncompressed blob");
        }
        Ok(())
    }

    /// Wrong passphrase → [`CryptoError::WrongPassphrase`].
    pub fn unwrap(&self, passphrase: &str) -> Result<MasterSecret, CryptoError> {
        self.check()?;
        let kek = Kek::derive(passphrase, &self.salt, self.kdf)?;
        let mut plain = open_impl(kek.pair(), &self.wrapped, MASTER_LEN, Accept::Authenticated)
            .map(|(_, p)| p)
            .map_err(|e| match e {
                CryptoError::MacMismatch => CryptoError::WrongPassphrase,
                CryptoError::TooLarge(_) => {
                    CryptoError::Malformed("wrapped key has the wrong length")
                }
                other => other,
            })?;
        let result = <[u8; MASTER_LEN]>::try_from(plain.as_slice())
            .map(MasterSecret)
            .map_err(|_| CryptoError::Malformed("wrapped key has the wrong length"));
        plain.zeroize();
        result
    }
}

// ---------------------------------------------------------------------------------------------
// Owner keys

/// Largest owner-key object read from storage (a real one is about 150 bytes).
pub const MAX_OWNER_KEY_OBJECT: u64 = 1024;
/// Longest owner name an owner-key object may carry.
const MAX_OWNER_LEN: usize = 256;
const OWNER_KEY_VERSION: u8 = 1;
const OWNER_KEY_ID_LEN: usize = 16;

/// One owner's random master key (`local`, `tg:<id>`), with the random id that names it.
/// Zeroized on drop (through [`MasterSecret`]); `Debug` shows the id and owner only.
pub struct OwnerKey {
    /// 16 random bytes, 32 hex digits: names the key object and the catalog row.
    pub key_id: String,
    pub owner: String,
    master: MasterSecret,
}

impl OwnerKey {
    pub fn generate(owner: &str) -> OwnerKey {
        let id: [u8; OWNER_KEY_ID_LEN] = random_bytes();
        OwnerKey {
            key_id: hex::encode(id),
            owner: owner.to_string(),
            master: MasterSecret::generate(),
        }
    }

    /// The subkeys that seal and name this owner's data.
    pub fn keys(&self) -> Keys {
        Keys::derive_owner(&self.master)
    }
}

#[cfg(feature = "test-support")]
impl OwnerKey {
    /// The owner's master secret, for tests that scan output for leaked keys. Only in test
    /// builds.
    pub fn bytes_for_tests(&self) -> [u8; MASTER_LEN] {
        self.master.0
    }
}

impl fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerKey({} of {})", self.key_id, self.owner)
    }
}

/// The installation key's subkeys that wrap owner keys (HKDF-SHA256 of the installation's
/// master secret, apart from every subkey that seals data). Zeroized on drop.
pub struct KeyWrap([u8; 2 * KEY_LEN]);

impl KeyWrap {
    pub fn derive(installation: &MasterSecret) -> KeyWrap {
        let hk = Hkdf::<Sha256>::new(None, &installation.0);
        let mut w = KeyWrap([0; 2 * KEY_LEN]);
        let (enc, mac) = w.0.split_at_mut(KEY_LEN);
        hk.expand(INFO_WRAP_ENC, enc).expect("hkdf length");
        hk.expand(INFO_WRAP_MAC, mac).expect("hkdf length");
        w
    }

    fn pair(&self) -> KeyPair<'_> {
        let (enc, mac) = self.0.split_at(KEY_LEN);
        KeyPair {
            enc: enc.try_into().expect("half of the wrap key"),
            mac: mac.try_into().expect("half of the wrap key"),
        }
    }

    /// Seals an owner key (encrypted, authenticated): `version | key id | master | owner`.
    pub fn seal(&self, key: &OwnerKey) -> Vec<u8> {
        let mut plain = Vec::with_capacity(1 + OWNER_KEY_ID_LEN + MASTER_LEN + key.owner.len());
        plain.push(OWNER_KEY_VERSION);
        let mut id = [0u8; OWNER_KEY_ID_LEN];
        hex::decode_to_slice(&key.key_id, &mut id).expect("owner key ids are 32 hex digits");
        plain.extend_from_slice(&id);
        plain.extend_from_slice(&key.master.0);
        plain.extend_from_slice(key.owner.as_bytes());
        let mut out = Vec::with_capacity(sealed_len_bound(plain.len()));
        seal_impl(
            std::slice::from_mut(&mut out),
            self.pair(),
            true,
            &[&plain[..]],
            None,
        );
        plain.zeroize();
        out
    }

    /// Opens an owner key sealed by [`KeyWrap::seal`], checking that it is the key named
    /// `key_id` (a key object renamed, or a catalog row pointing at another key, is refused).
    /// A blob this installation key did not seal fails authentication before anything else.
    pub fn open(&self, key_id: &str, sealed: &[u8]) -> Result<OwnerKey, CryptoError> {
        let bad = |m: String| CryptoError::BadKeyObject(format!("owner key {key_id}: {m}"));
        if sealed.len() as u64 > MAX_OWNER_KEY_OBJECT {
            return Err(bad(format!(
                "{} bytes, more than the {MAX_OWNER_KEY_OBJECT} an owner key may have",
                sealed.len()
            )));
        }
        let header = parse_header(sealed).map_err(|e| bad(e.to_string()))?;
        if !header.encrypted || header.compressed || header.version != VERSION {
            return Err(bad("not an encrypted, uncompressed blob of format 2".into()));
        }
        let max = 1 + OWNER_KEY_ID_LEN + MASTER_LEN + MAX_OWNER_LEN;
        let mut plain = open_impl(self.pair(), sealed, max, Accept::Authenticated)
            .map(|(_, p)| p)
            .map_err(|e| {
                match e {
                CryptoError::MacMismatch => bad(
                    "authentication failed: it was modified, or another installation key wrapped it"
                        .into(),
                ),
                e => bad(e.to_string()),
            }
            })?;
        let result = (|| {
            if plain.len() < 1 + OWNER_KEY_ID_LEN + MASTER_LEN + 1 {
                return Err(bad("too short".into()));
            }
            if plain[0] != OWNER_KEY_VERSION {
                return Err(bad(format!("unknown owner key version {}", plain[0])));
            }
            let id = hex::encode(&plain[1..1 + OWNER_KEY_ID_LEN]);
            if id != key_id {
                return Err(bad(format!("it holds key {id}")));
            }
            let rest = &plain[1 + OWNER_KEY_ID_LEN..];
            let master: [u8; MASTER_LEN] = rest[..MASTER_LEN].try_into().expect("length checked");
            let owner = std::str::from_utf8(&rest[MASTER_LEN..])
                .map_err(|_| bad("its owner is not UTF-8".into()))?;
            Ok(OwnerKey {
                key_id: id,
                owner: owner.to_string(),
                master: MasterSecret(master),
            })
        })();
        plain.zeroize();
        result
    }
}

impl Drop for KeyWrap {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl fmt::Debug for KeyWrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyWrap(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn h(s: &str) -> Vec<u8> {
        hex::decode(s.split_whitespace().collect::<String>()).unwrap()
    }

    fn keys() -> Keys {
        Keys::derive(&MasterSecret::generate())
    }

    // NIST SP 800-38A, F.2.5 / F.2.6 (CBC-AES256).
    const NIST_KEY: &str = "603deb1015ca71be2b73aef0857d7781 1f352c073b6108d72d9810a30914dff4";
    const NIST_IV: &str = "000102030405060708090a0b0c0d0e0f";
    const NIST_PT: &str = "6bc1bee22e409f96e93d7e117393172a ae2d8a571e03ac9c9eb76fac45af8e51
                           30c81c46a35ce411e5fbc1191a0a52ef f69f2445df4f9b17ad2b417be66c3710";
    const NIST_CT: &str = "f58c4c04d6e5f1ba779eabfb5f7bfbd6 9cfc4e967edb808d679f777bc6702c7d
                           39f23369a9d9bacfa530e26304231461 b2eb05e2c39be9fcda6c19078c6a9d1b";

    #[test]
    fn kat_nist_cbc_aes256_encrypt_by_our_chains() {
        let (key, iv, pt) = (h(NIST_KEY), h(NIST_IV), h(NIST_PT));
        assert_eq!((key.len(), iv.len(), pt.len()), (32, 16, 64));
        let key: [u8; 32] = key.try_into().unwrap();
        let iv: [u8; 16] = iv.try_into().unwrap();
        // The writer's own CBC (several messages at once), here with one message.
        let mut buf = pt.clone();
        cbc_encrypt_chains(&key, &mut [(&iv, &mut buf[..])]);
        assert_eq!(buf, h(NIST_CT));
    }

    /// Several messages encrypted side by side come out as `cbc::Encryptor` makes each alone,
    /// whatever their lengths and count (a message ends while others go on).
    #[test]
    fn chains_encrypt_as_the_cbc_crate_does_each_message() {
        use cbc::cipher::BlockModeEncrypt;
        let key: [u8; 32] = random_bytes();
        for lengths in [
            &[1usize][..],
            &[4, 1],
            &[3, 0, 7, 2, 5],
            &[64, 64, 64, 64],
            &[9; 9],
        ] {
            let ivs: Vec<[u8; 16]> = lengths.iter().map(|_| random_bytes()).collect();
            let messages: Vec<Vec<u8>> = lengths
                .iter()
                .map(|blocks| (0..blocks * 16).map(|_| random_bytes::<1>()[0]).collect())
                .collect();
            let mut ours = messages.clone();
            let mut chains: Vec<(&[u8; 16], &mut [u8])> = ivs
                .iter()
                .zip(ours.iter_mut())
                .map(|(iv, m)| (iv, &mut m[..]))
                .collect();
            cbc_encrypt_chains(&key, &mut chains);
            for ((iv, mut m), got) in ivs.iter().zip(messages).zip(&ours) {
                let n = m.len();
                let want = cbc::Encryptor::<Aes256>::new((&key).into(), iv.into())
                    .encrypt_padded::<cbc::cipher::block_padding::NoPadding>(&mut m, n)
                    .unwrap();
                assert_eq!(got.as_slice(), want, "lengths {lengths:?}");
            }
        }
    }

    /// Blobs sealed together open as blobs sealed alone do: each with its own IV, compressed
    /// or not on its own merits, MAC'd on its own.
    #[test]
    fn blobs_sealed_together_open_one_by_one() {
        let keys = Keys::derive(&MasterSecret::generate());
        let random: Vec<u8> = (0..5000).map(|_| random_bytes::<1>()[0]).collect();
        let plains: Vec<&[u8]> = vec![b"", b"short", &[7u8; 70_000], &random, b"0123456789abcdef"];
        for mode in [SealMode::Encrypted(&keys), SealMode::Plain(&keys)] {
            let mut outs = vec![b"kept".to_vec(); plains.len()];
            seal_many_into(&mut outs, mode, &plains, Some(3));
            let mut ivs = std::collections::HashSet::new();
            for (out, plain) in outs.iter().zip(&plains) {
                assert_eq!(&out[..4], b"kept", "appended after what the buffer held");
                let blob = &out[4..];
                assert_eq!(&open(&keys, blob, 1 << 20).unwrap(), plain);
                let h = parse_header(blob).unwrap();
                assert_eq!(h.encrypted, mode.is_encrypted());
                assert_eq!(
                    h.compressed,
                    plain.len() == 70_000,
                    "only the zeros compress"
                );
                if h.encrypted {
                    assert!(ivs.insert(blob[4..20].to_vec()), "each blob has its own IV");
                }
            }
        }
    }

    #[test]
    fn kat_nist_cbc_aes256_decrypt() {
        let key: [u8; 32] = h(NIST_KEY).try_into().unwrap();
        let iv: [u8; 16] = h(NIST_IV).try_into().unwrap();
        let mut buf = h(NIST_CT);
        assert_eq!(buf.len(), 64);
        let pt = Aes256CbcDec::new((&key).into(), (&iv).into())
            .decrypt_padded::<cbc::cipher::block_padding::NoPadding>(&mut buf)
            .unwrap();
        assert_eq!(pt, h(NIST_PT).as_slice());
    }

    #[test]
    fn kat_rfc4231_hmac_sha256() {
        let aa131 = vec![0xaa; 131];
        let cases: Vec<(Vec<u8>, Vec<u8>, &str)> = vec![
            (
                vec![0x0b; 20],
                b"Hi There".to_vec(),
                "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7",
            ),
            (
                b"Jefe".to_vec(),
                b"what do ya want for nothing?".to_vec(),
                "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843",
            ),
            (
                vec![0xaa; 20],
                vec![0xdd; 50],
                "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe",
            ),
            (
                h("0102030405060708090a0b0c0d0e0f10111213141516171819"),
                vec![0xcd; 50],
                "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b",
            ),
            (
                vec![0x0c; 20],
                b"Test With Truncation".to_vec(),
                "a3b6167473100ee06e0c796c2955552b",
            ),
            (
                aa131.clone(),
                b"Test Using Larger Than Block-Size Key - Hash Key First".to_vec(),
                "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54",
            ),
            (
                aa131,
                b"This is a test using a larger than block-size key and a larger than \
                  block-size data. The key needs to be hashed before being used by the \
                  HMAC algorithm."
                    .to_vec(),
                "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2",
            ),
        ];
        assert_eq!(cases[3].0.len(), 25);
        for (i, (key, data, want)) in cases.iter().enumerate() {
            let want = h(want);
            let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap();
            m.update(data);
            let got = m.finalize().into_bytes();
            assert_eq!(
                &got[..want.len()],
                want.as_slice(),
                "RFC 4231 case {}",
                i + 1
            );
            // The verify path used by `open` agrees (full-length cases only).
            if want.len() == 32 {
                let mut m = <HmacSha256 as KeyInit>::new_from_slice(key).unwrap();
                m.update(data);
                m.verify_slice(&want).unwrap();
            }
        }
    }

    #[test]
    fn kat_rfc5869_hkdf_sha256_case1() {
        let ikm = vec![0x0b; 22];
        let salt = h("000102030405060708090a0b0c");
        let info = h("f0f1f2f3f4f5f6f7f8f9");
        let (prk, hk) = Hkdf::<Sha256>::extract(Some(&salt), &ikm);
        assert_eq!(
            prk.as_slice(),
            h("077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5").as_slice()
        );
        let mut okm = [0u8; 42];
        hk.expand(&info, &mut okm).unwrap();
        assert_eq!(
            okm.as_slice(),
            h("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")
                .as_slice()
        );
    }

    #[test]
    fn owner_keys_name_plain_blobs_by_a_keyed_hash() {
        let inst = keys();
        assert_eq!(inst.plain_chunk_id(b"x"), plain_chunk_id(b"x"));
        let (a, b) = (OwnerKey::generate("local"), OwnerKey::generate("tg:1"));
        let (ka, kb) = (a.keys(), b.keys());
        assert_ne!(ka.plain_chunk_id(b"x"), plain_chunk_id(b"x"));
        assert_ne!(ka.plain_chunk_id(b"x"), kb.plain_chunk_id(b"x"));
        assert_ne!(ka.chunk_id(b"x"), kb.chunk_id(b"x"));
        // A keyed unencrypted blob opens by its keyed id, under its own key only.
        let sealed = seal(SealMode::Plain(&ka), b"x", None);
        let id = ka.plain_chunk_id(b"x");
        assert_eq!(open_chunk(&ka, &sealed, 16, &id).unwrap().plaintext, b"x");
        assert!(matches!(
            open_chunk(&kb, &sealed, 16, &id),
            Err(CryptoError::MacMismatch)
        ));
        assert!(matches!(
            open_chunk(&ka, &sealed, 16, &plain_chunk_id(b"x")),
            Err(CryptoError::WrongId)
        ));
    }

    #[test]
    fn owner_keys_are_wrapped_by_the_installation_key_and_bound_to_their_id() {
        let inst = MasterSecret::generate();
        let wrap = KeyWrap::derive(&inst);
        let k = OwnerKey::generate("tg:42");
        let sealed = wrap.seal(&k);
        let back = wrap.open(&k.key_id, &sealed).unwrap();
        assert_eq!(back.owner, "tg:42");
        assert_eq!(back.keys().chunk_id(b"d"), k.keys().chunk_id(b"d"));
        // Another installation's key, a flipped byte, another name: refused, named.
        let other = KeyWrap::derive(&MasterSecret::generate());
        let e = other.open(&k.key_id, &sealed).unwrap_err().to_string();
        assert!(
            e.contains(&k.key_id) && e.contains("authentication failed"),
            "{e}"
        );
        let mut bad = sealed.clone();
        bad[30] ^= 1;
        assert!(
            wrap.open(&k.key_id, &bad)
                .unwrap_err()
                .to_string()
                .contains("authentication failed")
        );
        let e = wrap.open(&"0".repeat(32), &sealed).unwrap_err().to_string();
        assert!(e.contains(&format!("it holds key {}", k.key_id)), "{e}");
        assert!(wrap.open(&k.key_id, &vec![0xB5; 2000]).is_err());
        // The wrap key seals nothing else: it is not the installation's data key.
        let data = Keys::derive(&inst);
        assert!(open(&data, &sealed, 1024).is_err());
        assert_eq!(format!("{k:?}"), format!("OwnerKey({} of tg:42)", k.key_id));
    }

    #[test]
    fn keys_are_distinct_subkeys() {
        let k = keys();
        assert_ne!(k.enc, k.mac);
        assert_ne!(k.enc, k.id);
        assert_ne!(k.mac, k.id);
        // Deterministic from the master.
        let m = MasterSecret::generate();
        let (a, b) = (Keys::derive(&m), Keys::derive(&m));
        assert_eq!((a.enc, a.mac, a.id), (b.enc, b.mac, b.id));
    }

    fn all_modes(k: &Keys) -> [(SealMode<'_>, Option<i32>); 4] {
        [
            (SealMode::Encrypted(k), None),
            (SealMode::Encrypted(k), Some(3)),
            (SealMode::Plain(k), None),
            (SealMode::Plain(k), Some(3)),
        ]
    }

    #[test]
    fn seal_open_round_trip() {
        let k = keys();
        let compressible = b"abcdefgh".repeat(1000);
        let random: Vec<u8> = (0..5000).map(|_| random_bytes::<1>()[0]).collect();
        for data in [&b""[..], b"x", &[7u8; 16][..], &compressible, &random] {
            for (mode, comp) in all_modes(&k) {
                let s = seal(mode, data, comp);
                assert!(s.len() <= sealed_len_bound(data.len()));
                let enc = matches!(mode, SealMode::Encrypted(_));
                assert_eq!(sealed_is_encrypted(&s).unwrap(), enc);
                assert_eq!(s[2] & FLAG_ENCRYPTED != 0, enc);
                assert_eq!(open(&k, &s, data.len()).unwrap(), data, "{mode:?} {comp:?}");
                if !enc {
                    // Unencrypted data is in the clear, but another key does not authenticate it.
                    assert!(matches!(
                        open(&keys(), &s, data.len()),
                        Err(CryptoError::MacMismatch)
                    ));
                }
                // Limit one below the size is refused.
                if !data.is_empty() {
                    assert!(open(&k, &s, data.len() - 1).is_err());
                }
            }
        }
    }

    /// A format-1 blob as the first writer made it: encrypted ones as now (MAC), unencrypted
    /// ones with a bare SHA-256.
    fn seal_format1(keys: Option<&Keys>, plaintext: &[u8]) -> Vec<u8> {
        match keys {
            Some(k) => {
                let mut s = seal(SealMode::Encrypted(k), plaintext, None);
                s[1] = VERSION_1;
                let body = s.len() - TAG_LEN;
                let mut m = hmac_sha256(&k.mac);
                m.update(&s[..body]);
                let tag = m.finalize().into_bytes();
                s[body..].copy_from_slice(&tag);
                s
            }
            None => {
                let mut s = vec![MAGIC, VERSION_1, 0, 0];
                s.extend_from_slice(plaintext);
                let sum = Sha256::digest(&s);
                s.extend_from_slice(&sum);
                s
            }
        }
    }

    #[test]
    fn format1_encrypted_blobs_still_open() {
        let k = keys();
        let s = seal_format1(Some(&k), b"old secret");
        assert_eq!(parse_header(&s).unwrap().version, 1);
        assert_eq!(open(&k, &s, 100).unwrap(), b"old secret");
        let o = open_chunk(&k, &s, 100, &k.chunk_id(b"old secret")).unwrap();
        assert!(o.encrypted);
        assert!(matches!(
            open(&keys(), &s, 100),
            Err(CryptoError::MacMismatch)
        ));
    }

    #[test]
    fn format1_unencrypted_blobs_open_only_when_an_authenticated_id_vouches() {
        let k = keys();
        let s = seal_format1(None, b"old public data");
        // Anyone can make this blob: on its own it is refused.
        assert!(matches!(
            open(&k, &s, 100),
            Err(CryptoError::Unauthenticated)
        ));
        // With the id an authenticated source recorded, its content is checked against it.
        let id = plain_chunk_id(b"old public data");
        let o = open_chunk(&k, &s, 100, &id).unwrap();
        assert_eq!(o.plaintext, b"old public data");
        assert!(!o.encrypted);
        assert!(matches!(
            open_chunk(&k, &s, 100, &plain_chunk_id(b"something else")),
            Err(CryptoError::WrongId)
        ));
        let mut bad = s.clone();
        bad[5] ^= 1;
        assert!(matches!(
            open_chunk(&k, &bad, 100, &id),
            Err(CryptoError::ChecksumMismatch)
        ));
        assert_eq!(
            open_format1_unencrypted(&s, 100).unwrap(),
            b"old public data"
        );
        let new = seal(SealMode::Plain(&k), b"x", None);
        assert!(open_format1_unencrypted(&new, 100).is_err());
    }

    #[test]
    fn open_chunk_checks_ids_of_both_kinds() {
        let k = keys();
        let e = seal(SealMode::Encrypted(&k), b"chunk", Some(3));
        let p = seal(SealMode::Plain(&k), b"chunk", Some(3));
        assert!(
            open_chunk(&k, &e, 100, &k.chunk_id(b"chunk"))
                .unwrap()
                .encrypted
        );
        assert!(
            !open_chunk(&k, &p, 100, &plain_chunk_id(b"chunk"))
                .unwrap()
                .encrypted
        );
        // An encrypted blob's id is keyed; an unencrypted one's is SHA-256: never swapped.
        assert!(matches!(
            open_chunk(&k, &e, 100, &plain_chunk_id(b"chunk")),
            Err(CryptoError::WrongId)
        ));
        assert!(matches!(
            open_chunk(&k, &p, 100, &k.chunk_id(b"chunk")),
            Err(CryptoError::WrongId)
        ));
    }

    /// `open_unbound` authenticates exactly as `open_chunk` does and returns what the blob
    /// holds, whatever chunk was asked for: its caller checks the content by another hash.
    #[test]
    fn open_unbound_authenticates_but_leaves_the_id_to_the_caller() {
        let k = keys();
        let e = seal(SealMode::Encrypted(&k), b"chunk", Some(3));
        let p = seal(SealMode::Plain(&k), b"chunk", Some(3));
        let o = open_unbound(&k, &e, 100).unwrap();
        assert_eq!((o.plaintext.as_slice(), o.encrypted), (&b"chunk"[..], true));
        let o = open_unbound(&k, &p, 100).unwrap();
        assert_eq!(
            (o.plaintext.as_slice(), o.encrypted),
            (&b"chunk"[..], false)
        );
        // Another key's blob, a flipped byte, a size over the bound: refused as before.
        assert!(matches!(
            open_unbound(&keys(), &e, 100),
            Err(CryptoError::MacMismatch)
        ));
        let mut bad = e.clone();
        bad[HEADER_LEN + IV_LEN] ^= 1;
        assert!(matches!(
            open_unbound(&k, &bad, 100),
            Err(CryptoError::MacMismatch)
        ));
        assert!(matches!(
            open_unbound(&k, &e, 4),
            Err(CryptoError::TooLarge(4))
        ));
        // A format-1 unencrypted blob opens by its checksum; a damaged one does not.
        let old = seal_format1(None, b"old public data");
        assert_eq!(
            open_unbound(&k, &old, 100).unwrap().plaintext,
            b"old public data"
        );
        let mut bad = old.clone();
        bad[5] ^= 1;
        assert!(matches!(
            open_unbound(&k, &bad, 100),
            Err(CryptoError::ChecksumMismatch)
        ));
    }

    #[test]
    fn chunker_seeds_are_separate_and_temp_tags_keyed() {
        let (k1, k2) = (keys(), keys());
        assert_ne!(k1.chunker_seed(true), k1.chunker_seed(false));
        assert_ne!(k1.chunker_seed(true), k2.chunker_seed(true));
        let m = MasterSecret::generate();
        let (a, b) = (Keys::derive(&m), Keys::derive(&m));
        assert_eq!(a.chunker_seed(false), b.chunker_seed(false));
        assert_eq!(a.temp_tag(&[b"n", b"x"]), b.temp_tag(&[b"n", b"x"]));
        assert_ne!(a.temp_tag(&[b"n", b"x"]), a.temp_tag(&[b"nx"]));
        assert_ne!(a.temp_tag(&[b"n"]), k1.temp_tag(&[b"n"]));
    }

    #[test]
    fn key_objects_are_checked_before_use() {
        let m = MasterSecret::generate();
        let w = WrappedKey::wrap(&m, "pw", KdfParams::fast_for_tests()).unwrap();
        let json = serde_json::to_vec(&w).unwrap();
        assert!(WrappedKey::decode(&json).is_ok());
        assert!(matches!(
            WrappedKey::decode(&vec![b' '; 5000]),
            Err(CryptoError::BadKeyObject(_))
        ));
        assert!(matches!(
            WrappedKey::decode(b"{}"),
            Err(CryptoError::BadKeyObject(_))
        ));
        let mutate = |f: &dyn Fn(&mut WrappedKey)| {
            let mut v = w.clone();
            f(&mut v);
            WrappedKey::decode(&serde_json::to_vec(&v).unwrap())
        };
        assert!(mutate(&|v| v.key_id = "ZZ".repeat(16)).is_err());
        assert!(mutate(&|v| v.salt = vec![0; 4]).is_err());
        assert!(mutate(&|v| v.salt = vec![0; 4096]).is_err());
        assert!(mutate(&|v| v.kdf.t_cost = 1000).is_err());
        assert!(mutate(&|v| v.kdf.m_kib = MAX_KDF_M_KIB + 1).is_err());
        assert!(mutate(&|v| v.wrapped.push(0)).is_err());
        assert!(mutate(&|v| v.wrapped[2] = 0).is_err());
    }

    #[test]
    fn compression_flag_set_only_when_smaller() {
        let k = keys();
        let compressible = b"abcdefgh".repeat(1000);
        let random: Vec<u8> = (0..5000).map(|_| random_bytes::<1>()[0]).collect();
        for mode in [SealMode::Encrypted(&k), SealMode::Plain(&k)] {
            let s = seal(mode, &compressible, Some(3));
            assert_ne!(s[2] & FLAG_COMPRESSED, 0);
            assert!(s.len() < 1000);
            let s = seal(mode, &random, Some(3));
            assert_eq!(s[2] & FLAG_COMPRESSED, 0);
            let s = seal(mode, &compressible, None);
            assert_eq!(s[2] & FLAG_COMPRESSED, 0);
        }
    }

    /// `n` random bytes: a plaintext no compressor can shrink.
    fn random(n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        getrandom::fill(&mut v[..]).unwrap();
        v
    }

    /// A large plaintext is compressed when any probe sample compresses, wherever in it that
    /// is; one that no sample finds compressible is stored as it is, without the whole-chunk
    /// attempt.
    #[test]
    fn large_plaintexts_are_probed_before_compressing() {
        let k = keys();
        let len = 1 << 20;
        let mut comp = zstd::bulk::Compressor::new(1).unwrap();
        let noise = random(len);
        assert!(!looks_compressible(&mut comp, &noise));
        let s = seal(SealMode::Encrypted(&k), &noise, Some(1));
        assert_eq!(s[2] & FLAG_COMPRESSED, 0);
        assert_eq!(open(&k, &s, len).unwrap(), noise);
        // Only the last quarter compresses: the last sample finds it.
        let mut tail = random(len);
        tail[len * 3 / 4..].fill(7);
        assert!(looks_compressible(&mut comp, &tail));
        let s = seal(SealMode::Encrypted(&k), &tail, Some(1));
        assert_ne!(s[2] & FLAG_COMPRESSED, 0);
        assert!(s.len() < len * 3 / 4 + 4096, "sealed {} bytes", s.len());
        assert_eq!(open(&k, &s, len).unwrap(), tail);
        // Text-like data passes at the first sample.
        let text = b"the quick brown fox jumps over the lazy dog; ".repeat(len / 45);
        assert!(looks_compressible(&mut comp, &text));
        // Below the probe's threshold, a plaintext of even bytes gets a fast pass for
        // repeats: a mostly random one with a compressible end is still compressed.
        let mut short = random(PROBE_FROM - 1);
        let n = short.len();
        short[n - 8192..].fill(0);
        let s = seal(SealMode::Plain(&k), &short, Some(1));
        assert_ne!(s[2] & FLAG_COMPRESSED, 0);
    }

    /// Below the large probe's threshold, uneven bytes (text, code, hex) are compressed as
    /// they are; even ones only where a fast pass finds repeats; random bytes are stored as
    /// they are, without a whole attempt at the snapshot's level.
    #[test]
    fn small_plaintexts_are_compressed_when_uneven_or_repeating() {
        let k = keys();
        let mut comp = zstd::bulk::Compressor::new(3).unwrap();
        let sealed_compressed = |plaintext: &[u8]| {
            let s = seal(SealMode::Encrypted(&k), plaintext, Some(3));
            assert_eq!(open(&k, &s, plaintext.len()).unwrap(), plaintext);
            (s[2] & FLAG_COMPRESSED != 0, s.len())
        };
        for len in [SKEW_SAMPLE / 4, SKEW_SAMPLE, 8192, PROBE_FROM - 1] {
            let noise = random(len);
            assert!(!looks_skewed(&noise), "{len} random bytes look uneven");
            assert!(!has_repeats(&mut comp, &noise), "{len} random bytes repeat");
            assert!(!small_looks_compressible(&mut comp, &noise));
            assert!(!sealed_compressed(&noise).0);
        }
        // Hex of random bytes: no repeat, but Huffman coding alone halves it.
        let hex = hex::encode(random(4096)).into_bytes();
        assert!(looks_skewed(&hex));
        let (compressed, len) = sealed_compressed(&hex);
        assert!(
            compressed && len < hex.len() * 6 / 10,
            "hex sealed to {len} bytes"
        );
        // Only the samples are counted: hex with random bytes between them looks uneven;
        // random bytes with hex between them look even.
        let mut pieces = random(64 * 1024);
        let stride = pieces.len() / 4;
        for i in 0..4 {
            pieces[i * stride..i * stride + SKEW_SAMPLE / 4].fill(b'a' + i as u8);
        }
        assert!(looks_skewed(&pieces));
        let mut between = hex::encode(random(32 * 1024)).into_bytes();
        for i in 0..4 {
            let sample = i * stride..i * stride + SKEW_SAMPLE / 4;
            between[sample].copy_from_slice(&random(SKEW_SAMPLE / 4));
        }
        assert!(!looks_skewed(&between));
        // A random block repeated: even bytes, but the fast pass finds the repeat, and the
        // plaintext is compressed at its level.
        let mut twice = random(4096);
        twice.extend_from_within(..);
        assert!(!looks_skewed(&twice));
        assert!(has_repeats(&mut comp, &twice));
        let (compressed, len) = sealed_compressed(&twice);
        assert!(
            compressed && len < 4096 + 256,
            "a repeated block sealed to {len} bytes"
        );
        // Short ones are compressed whatever they hold.
        assert!(small_looks_compressible(
            &mut comp,
            &random(SKEW_SAMPLE / 4 - 1)
        ));
    }

    #[test]
    fn format_layout() {
        let k = keys();
        let s = seal(SealMode::Encrypted(&k), b"hello", None);
        assert_eq!(&s[..4], &[0xB5, 2, 1, 0]);
        assert_eq!(s.len(), 4 + 16 + 16 + 32);
        assert_eq!(s.len(), sealed_len_bound(5));
        let p = seal(SealMode::Plain(&k), b"hello", None);
        assert_eq!(&p[..4], &[0xB5, 2, 0, 0]);
        assert_eq!(&p[4..9], b"hello");
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&k.mac).unwrap();
        m.update(&p[..9]);
        assert_eq!(&p[9..], m.finalize().into_bytes().as_slice());
        assert_eq!(sealed_len_bound(0), 4 + 16 + 16 + 32);
        assert_eq!(sealed_len_bound(16), 4 + 16 + 32 + 32);
    }

    #[test]
    fn seal_into_appends() {
        let k = keys();
        let mut out = b"prefix".to_vec();
        seal_into(&mut out, SealMode::Encrypted(&k), b"data", Some(1));
        let first_end = out.len();
        seal_into(&mut out, SealMode::Plain(&k), b"more", None);
        assert_eq!(&out[..6], b"prefix");
        assert_eq!(open(&k, &out[6..first_end], 100).unwrap(), b"data");
        assert_eq!(open(&k, &out[first_end..], 100).unwrap(), b"more");
    }

    #[test]
    fn fresh_iv_per_seal() {
        let k = keys();
        let a = seal(SealMode::Encrypted(&k), b"same data", None);
        let b = seal(SealMode::Encrypted(&k), b"same data", None);
        assert_ne!(a[4..20], b[4..20]);
        assert_ne!(a, b);
    }

    #[test]
    fn wrong_keys_and_missing_keys() {
        let (k1, k2) = (keys(), keys());
        let s = seal(SealMode::Encrypted(&k1), b"secret", None);
        assert!(matches!(open(&k2, &s, 100), Err(CryptoError::MacMismatch)));
    }

    #[test]
    fn format_errors() {
        let k = keys();
        assert!(matches!(open(&k, &[], 10), Err(CryptoError::Truncated)));
        assert!(matches!(
            open(&k, &[0xB5, 1], 10),
            Err(CryptoError::Truncated)
        ));
        let mut s = seal(SealMode::Plain(&k), b"x", None);
        s[0] = 0;
        assert!(matches!(open(&k, &s, 10), Err(CryptoError::BadMagic)));
        s[0] = 0xB5;
        s[1] = 3;
        assert!(matches!(
            open(&k, &s, 10),
            Err(CryptoError::UnsupportedVersion(3))
        ));
        assert!(sealed_is_encrypted(&s).is_err());
        let e = seal(SealMode::Encrypted(&k), b"x", None);
        assert!(matches!(
            open(&k, &e[..e.len() - 1], 10),
            Err(CryptoError::Truncated)
        ));
        assert!(matches!(
            open(&k, &e[..40], 10),
            Err(CryptoError::Truncated)
        ));
        let e = seal(SealMode::Encrypted(&k), &[5u8; 100], None);
        assert!(matches!(
            open(&k, &e[..e.len() - 1], 100),
            Err(CryptoError::MacMismatch)
        ));
        assert!(matches!(
            open(&k, &e[..e.len() - 16], 100),
            Err(CryptoError::MacMismatch)
        ));
        let mut bad = e.clone();
        bad[2] |= 0x80;
        assert!(matches!(
            open(&k, &bad, 100),
            Err(CryptoError::Malformed(_))
        ));
        bad[2] = e[2];
        bad[3] = 1;
        assert!(matches!(
            open(&k, &bad, 100),
            Err(CryptoError::Malformed(_))
        ));
    }

    #[test]
    fn decompression_limit_enforced() {
        let k = keys();
        let bomb = vec![0u8; 8 << 20];
        for mode in [SealMode::Encrypted(&k), SealMode::Plain(&k)] {
            let s = seal(mode, &bomb, Some(3));
            assert!(s.len() < 4096, "zeros compress well");
            match open(&k, &s, 1 << 20) {
                Err(CryptoError::TooLarge(n)) => assert_eq!(n, 1 << 20),
                Err(CryptoError::Decompress(_)) => {}
                other => panic!("expected a limit error, got {:?}", other.map(|v| v.len())),
            }
            assert_eq!(open(&k, &s, 8 << 20).unwrap().len(), 8 << 20);
        }
    }

    #[test]
    fn decompression_limit_without_recorded_size() {
        // A zstd frame that does not record its content size (streaming encoder).
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 3).unwrap();
        std::io::Write::write_all(&mut enc, &vec![0u8; 4 << 20]).unwrap();
        let frame = enc.finish().unwrap();
        assert!(
            zstd::zstd_safe::get_frame_content_size(&frame)
                .map(|s| s.is_none())
                .unwrap_or(true)
        );
        let k = keys();
        let mut blob = vec![MAGIC, VERSION, FLAG_COMPRESSED, 0];
        blob.extend_from_slice(&frame);
        let mut m = hmac_sha256(&k.mac);
        m.update(&blob);
        let tag = m.finalize().into_bytes();
        blob.extend_from_slice(&tag);
        assert!(matches!(
            open(&k, &blob, 1 << 20),
            Err(CryptoError::TooLarge(_) | CryptoError::Decompress(_))
        ));
        assert_eq!(open(&k, &blob, 4 << 20).unwrap().len(), 4 << 20);
    }

    #[test]
    fn chunk_id_keyed_and_deterministic() {
        let (k1, k2) = (keys(), keys());
        let data = b"some chunk";
        assert_eq!(k1.chunk_id(data), k1.chunk_id(data));
        assert_eq!(k1.clone().chunk_id(data), k1.chunk_id(data));
        assert_ne!(k1.chunk_id(data), k2.chunk_id(data));
        assert_ne!(k1.chunk_id(data), k1.chunk_id(b"other chunk"));
        assert_ne!(k1.chunk_id(data), plain_chunk_id(data));
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(&k1.id).unwrap();
        m.update(data);
        assert_eq!(
            k1.chunk_id(data).0,
            <[u8; 32]>::from(m.finalize().into_bytes())
        );
        assert_eq!(
            plain_chunk_id(b"abc").to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn chunk_id_hex_and_serde() {
        let id = plain_chunk_id(b"abc");
        let hx = id.to_hex();
        assert_eq!(format!("{id}"), hx);
        assert_eq!(format!("{id:?}"), hx);
        assert_eq!(ChunkId::from_hex(&hx).unwrap(), id);
        assert_eq!(ChunkId::from_hex(&hx.to_uppercase()).unwrap(), id);
        assert_eq!(ChunkId::from_slice(&id.0).unwrap(), id);
        assert!(matches!(
            ChunkId::from_hex("abc"),
            Err(CryptoError::BadId(_))
        ));
        assert!(matches!(
            ChunkId::from_hex(&"zz".repeat(32)),
            Err(CryptoError::BadId(_))
        ));
        assert!(matches!(
            ChunkId::from_slice(&[1, 2]),
            Err(CryptoError::BadId(_))
        ));
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json, format!("\"{hx}\""));
        assert_eq!(serde_json::from_str::<ChunkId>(&json).unwrap(), id);
        let v: ChunkId = serde_json::from_reader(json.as_bytes()).unwrap();
        assert_eq!(v, id);
        assert!(serde_json::from_str::<ChunkId>("\"00\"").is_err());
    }

    #[test]
    fn wrap_unwrap_round_trip() {
        let m = MasterSecret::generate();
        let w = WrappedKey::wrap(&m, "correct horse", KdfParams::fast_for_tests()).unwrap();
        assert_eq!(w.key_id.len(), 32);
        assert_eq!(w.salt.len(), 16);
        assert!(sealed_is_encrypted(&w.wrapped).unwrap());
        let u = w.unwrap("correct horse").unwrap();
        assert_eq!(u.0, m.0);
        assert!(matches!(
            w.unwrap("wrong horse"),
            Err(CryptoError::WrongPassphrase)
        ));
        // Fresh salt and key id per wrap.
        let w2 = WrappedKey::wrap(&m, "correct horse", KdfParams::fast_for_tests()).unwrap();
        assert_ne!(w.salt, w2.salt);
        assert_ne!(w.key_id, w2.key_id);
    }

    #[test]
    fn wrap_depends_on_kdf_params() {
        let m = MasterSecret::generate();
        let mut w = WrappedKey::wrap(&m, "pw", KdfParams::fast_for_tests()).unwrap();
        w.kdf.t_cost = 2;
        assert!(matches!(w.unwrap("pw"), Err(CryptoError::WrongPassphrase)));
        w.kdf.t_cost = 1;
        w.kdf.m_kib = u32::MAX;
        assert!(matches!(w.unwrap("pw"), Err(CryptoError::Kdf(_))));
        w.kdf.m_kib = 1;
        assert!(matches!(w.unwrap("pw"), Err(CryptoError::Kdf(_))));
        // Every parameter from storage is bounded before Argon2 runs.
        w.kdf = KdfParams::fast_for_tests();
        w.kdf.t_cost = u32::MAX;
        assert!(matches!(w.unwrap("pw"), Err(CryptoError::Kdf(_))));
        w.kdf.t_cost = 1;
        w.kdf.p_cost = 1 << 20;
        assert!(matches!(w.unwrap("pw"), Err(CryptoError::Kdf(_))));
    }

    #[test]
    fn rewrap_keeps_master_and_key_id() {
        let m = MasterSecret::generate();
        let p = KdfParams::fast_for_tests();
        let w = WrappedKey::wrap(&m, "old", p).unwrap();
        assert!(matches!(
            w.rewrap("nope", "new", p),
            Err(CryptoError::WrongPassphrase)
        ));
        let w2 = w.rewrap("old", "new", p).unwrap();
        assert_eq!(w2.key_id, w.key_id);
        assert_ne!(w2.salt, w.salt);
        assert_eq!(w2.unwrap("new").unwrap().0, m.0);
        assert!(matches!(
            w2.unwrap("old"),
            Err(CryptoError::WrongPassphrase)
        ));
    }

    #[test]
    fn wrapped_key_json_round_trip() {
        let m = MasterSecret::generate();
        let w = WrappedKey::wrap(&m, "pw", KdfParams::fast_for_tests()).unwrap();
        let json = serde_json::to_string(&w).unwrap();
        let back: WrappedKey = serde_json::from_str(&json).unwrap();
        assert_eq!(back.key_id, w.key_id);
        assert_eq!(back.salt, w.salt);
        assert_eq!(back.kdf, w.kdf);
        assert_eq!(back.wrapped, w.wrapped);
        assert_eq!(back.unwrap("pw").unwrap().0, m.0);
    }

    #[test]
    fn kdf_params_presets() {
        let i = KdfParams::interactive();
        assert_eq!((i.m_kib, i.t_cost, i.p_cost), (65536, 3, 1));
        let f = KdfParams::fast_for_tests();
        assert!(argon2::Params::new(f.m_kib, f.t_cost, f.p_cost, Some(64)).is_ok());
    }

    #[test]
    fn debug_never_shows_key_bytes() {
        let m = MasterSecret::generate();
        let k = Keys::derive(&m);
        let dm = format!("{m:?}");
        let dk = format!("{k:?} {:?}", SealMode::Encrypted(&k));
        assert_eq!(dm, "MasterSecret(..)");
        for secret in [&m.0, &k.enc, &k.mac, &k.id] {
            let hx = hex::encode(secret);
            for s in [&dm, &dk] {
                assert!(!s.contains(&hx));
                assert!(!s.contains(&format!("{:?}", secret)));
            }
        }
        let w = WrappedKey::wrap(&m, "hunter2", KdfParams::fast_for_tests()).unwrap();
        let dw = format!("{w:?}");
        assert!(!dw.contains("hunter2"));
        assert!(!dw.contains(&hex::encode(m.0)));
    }

    fn mode_strategy() -> impl Strategy<Value = (bool, Option<i32>)> {
        (
            any::<bool>(),
            prop_oneof![Just(None), Just(Some(1)), Just(Some(3))],
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn prop_round_trip(
            data in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..65536),
                proptest::collection::vec(0u8..4, 0..65536),
            ],
            (encrypted, comp) in mode_strategy(),
        ) {
            let k = keys();
            let mode = if encrypted { SealMode::Encrypted(&k) } else { SealMode::Plain(&k) };
            let s = seal(mode, &data, comp);
            prop_assert!(s.len() <= sealed_len_bound(data.len()));
            prop_assert_eq!(sealed_is_encrypted(&s).unwrap(), encrypted);
            prop_assert_eq!(open(&k, &s, data.len()).unwrap(), data);
        }

        #[test]
        fn prop_any_flipped_byte_is_rejected(
            data in proptest::collection::vec(0u8..8, 0..4096),
            (encrypted, comp) in mode_strategy(),
            pos in any::<proptest::sample::Index>(),
            delta in 1u8..=255,
        ) {
            let k = keys();
            let mode = if encrypted { SealMode::Encrypted(&k) } else { SealMode::Plain(&k) };
            let mut s = seal(mode, &data, comp);
            let i = pos.index(s.len());
            s[i] ^= delta;
            for key in [&k, &keys()] {
                match open(key, &s, 1 << 20) {
                    Ok(v) => prop_assert!(false, "tampered blob opened ({} bytes)", v.len()),
                    Err(
                        CryptoError::MacMismatch
                        | CryptoError::ChecksumMismatch
                        | CryptoError::Unauthenticated
                        | CryptoError::Truncated
                        | CryptoError::BadMagic
                        | CryptoError::UnsupportedVersion(_)
                        | CryptoError::Malformed(_),
                    ) => {}
                    Err(e) => prop_assert!(false, "unexpected error: {e}"),
                }
            }
        }
    }
}
