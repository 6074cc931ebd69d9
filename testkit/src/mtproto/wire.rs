//! Server side of MTProto 2.0 over the "Full" transport: framing, encryption and the
//! message envelope. grammers-crypto only implements the client's direction (encrypt with
//! x = 0, decrypt with x = 8), so the mirror image lives here, built on its AES-IGE helpers.

use std::io::Read;

use grammers_tl_types::{Cursor, Deserializable};
use sha1::Digest as _;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest frame we accept from a client. grammers never sends more than about 1 MiB per
/// packet (a 512 KiB part plus container overhead); anything far bigger is a broken stream.
const MAX_FRAME: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    Closed,
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad frame: {0}")]
    BadFrame(String),
    #[error("bad encrypted message: {0}")]
    BadMessage(String),
}

/// The permanent authorization key shared by the server and the seeded session.
#[derive(Clone)]
pub struct ServerKey {
    pub data: [u8; 256],
    pub key_id: [u8; 8],
}

impl ServerKey {
    pub fn new(data: [u8; 256]) -> Self {
        // auth_key_id = the 64 lower-order bits of SHA1(auth_key).
        let sha = sha1::Sha1::digest(data);
        let mut key_id = [0; 8];
        key_id.copy_from_slice(&sha[12..20]);
        ServerKey { data, key_id }
    }

    pub fn random() -> Self {
        let mut data = [0u8; 256];
        getrandom::fill(&mut data).expect("os random source");
        Self::new(data)
    }
}

/// aes_key / aes_iv derivation of MTProto 2.0; `x` is 0 for client→server, 8 for
/// server→client.
fn calc_key(key: &[u8; 256], msg_key: &[u8; 16], x: usize) -> ([u8; 32], [u8; 32]) {
    let a = Sha256::new()
        .chain_update(msg_key)
        .chain_update(&key[x..x + 36])
        .finalize();
    let b = Sha256::new()
        .chain_update(&key[40 + x..40 + x + 36])
        .chain_update(msg_key)
        .finalize();
    let mut aes_key = [0; 32];
    aes_key[0..8].copy_from_slice(&a[0..8]);
    aes_key[8..24].copy_from_slice(&b[8..24]);
    aes_key[24..32].copy_from_slice(&a[24..32]);
    let mut aes_iv = [0; 32];
    aes_iv[0..8].copy_from_slice(&b[0..8]);
    aes_iv[8..24].copy_from_slice(&a[8..24]);
    aes_iv[24..32].copy_from_slice(&b[24..32]);
    (aes_key, aes_iv)
}

/// Decrypts a client packet (auth_key_id, msg_key, encrypted data) in place and returns the
/// plaintext (salt, session_id, msg_id, seq_no, length, body, padding).
pub fn decrypt_from_client<'a>(
    key: &ServerKey,
    packet: &'a mut [u8],
) -> Result<&'a [u8], WireError> {
    if packet.len() < 24 || !(packet.len() - 24).is_multiple_of(16) {
        return Err(WireError::BadMessage(format!(
            "encrypted packet of {} bytes",
            packet.len()
        )));
    }
    if packet[..8] != key.key_id {
        return Err(WireError::BadMessage("unknown auth_key_id".into()));
    }
    let mut msg_key = [0; 16];
    msg_key.copy_from_slice(&packet[8..24]);
    let (aes_key, aes_iv) = calc_key(&key.data, &msg_key, 0);
    let plain = &mut packet[24..];
    super::ige::decrypt(plain, &aes_key, &aes_iv);
    let check = Sha256::new()
        .chain_update(&key.data[88..120])
        .chain_update(&*plain)
        .finalize();
    if check[8..24] != msg_key {
        return Err(WireError::BadMessage("msg_key mismatch".into()));
    }
    Ok(plain)
}

/// Encrypts `plain` (salt, session_id, message) for the client, returning the packet.
pub fn encrypt_for_client(key: &ServerKey, mut plain: Vec<u8>) -> Vec<u8> {
    // 12..1024 bytes of padding, total a multiple of 16.
    let pad = 16 + (16 - plain.len() % 16);
    let mut padding = [0u8; 32];
    getrandom::fill(&mut padding[..pad]).expect("os random source");
    plain.extend_from_slice(&padding[..pad]);
    let large = Sha256::new()
        .chain_update(&key.data[96..128])
        .chain_update(&plain)
        .finalize();
    let mut msg_key = [0; 16];
    msg_key.copy_from_slice(&large[8..24]);
    let (aes_key, aes_iv) = calc_key(&key.data, &msg_key, 8);
    super::ige::encrypt(&mut plain, &aes_key, &aes_iv);
    let mut out = Vec::with_capacity(24 + plain.len());
    out.extend_from_slice(&key.key_id);
    out.extend_from_slice(&msg_key);
    out.extend_from_slice(&plain);
    out
}

/// Reads one "Full" transport frame: len (4, includes itself), seq (4), payload, crc32 (4).
pub async fn read_frame<R: AsyncRead + Unpin>(
    r: &mut R,
    expect_seq: &mut i32,
) -> Result<Vec<u8>, WireError> {
    let mut head = [0u8; 8];
    match r.read_exact(&mut head[..4]).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    r.read_exact(&mut head[4..]).await?;
    let len = i32::from_le_bytes(head[..4].try_into().unwrap());
    if len < 12 || len as usize > MAX_FRAME {
        return Err(WireError::BadFrame(format!("frame length {len}")));
    }
    let seq = i32::from_le_bytes(head[4..8].try_into().unwrap());
    if seq != *expect_seq {
        return Err(WireError::BadFrame(format!(
            "frame seq {seq}, expected {expect_seq}"
        )));
    }
    *expect_seq += 1;
    let mut rest = vec![0u8; len as usize - 8];
    r.read_exact(&mut rest).await?;
    let crc_at = rest.len() - 4;
    let got = u32::from_le_bytes(rest[crc_at..].try_into().unwrap());
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(&rest[..crc_at]);
    if h.finalize() != got {
        return Err(WireError::BadFrame("crc32 mismatch".into()));
    }
    rest.truncate(crc_at);
    Ok(rest)
}

pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    seq: &mut i32,
    payload: &[u8],
) -> Result<(), WireError> {
    let len = (payload.len() + 12) as i32;
    let mut head = [0u8; 8];
    head[..4].copy_from_slice(&len.to_le_bytes());
    head[4..].copy_from_slice(&seq.to_le_bytes());
    *seq += 1;
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(payload);
    let crc = h.finalize().to_le_bytes();
    w.write_all(&head).await?;
    w.write_all(payload).await?;
    w.write_all(&crc).await?;
    Ok(())
}

/// One MTProto message from the client, after unwrapping the envelope.
pub struct ClientMessage {
    pub msg_id: i64,
    pub seq_no: i32,
    pub body: Vec<u8>,
    /// Arrived inside gzip_packed (counted, so tests can see what the client compressed).
    pub gzipped: bool,
}

/// The decrypted envelope: server salt, session id and the top-level message.
pub fn parse_plaintext(plain: &[u8]) -> Result<(i64, i64, ClientMessage), WireError> {
    let bad = |e: grammers_tl_types::deserialize::Error| WireError::BadMessage(e.to_string());
    let mut c = Cursor::from_slice(plain);
    let salt = i64::deserialize(&mut c).map_err(bad)?;
    let session_id = i64::deserialize(&mut c).map_err(bad)?;
    let msg = read_message(&mut c)?;
    Ok((salt, session_id, msg))
}

fn read_message(c: &mut Cursor) -> Result<ClientMessage, WireError> {
    let bad = |e: grammers_tl_types::deserialize::Error| WireError::BadMessage(e.to_string());
    let msg_id = i64::deserialize(c).map_err(bad)?;
    let seq_no = i32::deserialize(c).map_err(bad)?;
    let len = i32::deserialize(c).map_err(bad)?;
    if len < 0 || len as usize > MAX_FRAME {
        return Err(WireError::BadMessage(format!("message length {len}")));
    }
    let mut body = vec![0; len as usize];
    c.read_exact(&mut body).map_err(bad)?;
    Ok(ClientMessage {
        msg_id,
        seq_no,
        body,
        gzipped: false,
    })
}

pub const MSG_CONTAINER: u32 = 0x73f1f8dc;
pub const GZIP_PACKED: u32 = 0x3072cfa1;
pub const RPC_RESULT: u32 = 0xf35c6d01;

/// Flattens containers and gzip_packed wrappers into plain messages.
pub fn flatten(msg: ClientMessage, out: &mut Vec<ClientMessage>) -> Result<(), WireError> {
    let id = constructor(&msg.body);
    match id {
        Some(MSG_CONTAINER) => {
            let bad =
                |e: grammers_tl_types::deserialize::Error| WireError::BadMessage(e.to_string());
            let mut c = Cursor::from_slice(&msg.body[4..]);
            let n = i32::deserialize(&mut c).map_err(bad)?;
            for _ in 0..n {
                let inner = read_message(&mut c)?;
                flatten(inner, out)?;
            }
            Ok(())
        }
        Some(GZIP_PACKED) => {
            let body = gunzip(&msg.body[4..])?;
            flatten(
                ClientMessage {
                    msg_id: msg.msg_id,
                    seq_no: msg.seq_no,
                    body,
                    gzipped: true,
                },
                out,
            )
        }
        _ => {
            out.push(msg);
            Ok(())
        }
    }
}

/// Unpacks the `packed_data:bytes` of a gzip_packed object.
pub fn gunzip(tl_bytes: &[u8]) -> Result<Vec<u8>, WireError> {
    let packed = Vec::<u8>::from_bytes(tl_bytes)
        .map_err(|e| WireError::BadMessage(format!("gzip_packed: {e}")))?;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(&packed[..])
        .read_to_end(&mut out)
        .map_err(|e| WireError::BadMessage(format!("gzip_packed: {e}")))?;
    Ok(out)
}

pub fn constructor(body: &[u8]) -> Option<u32> {
    body.get(..4)
        .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_encryption_is_readable_by_grammers_client_side() {
        // grammers' decrypt_data_v2 is what the client runs on our packets.
        let key = ServerKey::random();
        let plain = vec![7u8; 40];
        let mut packet = encrypt_for_client(&key, plain.clone());
        let ak = grammers_crypto::AuthKey::from_bytes(key.data);
        let out = grammers_crypto::decrypt_data_v2(&mut packet, &ak).unwrap();
        assert_eq!(&out[..40], &plain[..]);
    }

    #[test]
    fn client_encryption_is_readable_by_server() {
        let key = ServerKey::random();
        let ak = grammers_crypto::AuthKey::from_bytes(key.data);
        let mut buf = grammers_crypto::DequeBuffer::with_capacity(64, 64);
        buf.extend([9u8; 48].iter().copied());
        grammers_crypto::encrypt_data_v2(&mut buf, &ak);
        let mut packet = buf.as_ref().to_vec();
        let plain = decrypt_from_client(&key, &mut packet).unwrap();
        assert_eq!(&plain[..48], &[9u8; 48][..]);
    }
}
