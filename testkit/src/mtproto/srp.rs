//! The server side of Telegram's two-step verification (core.telegram.org/api/srp): SRP-2048
//! with Telegram's group, `x = PH2(password, salt1, salt2)`, the verifier `v = g^x mod p`,
//! the challenge `g_b = k·v + g^b mod p` and the check of the client's `M1`. The client side
//! is grammers-crypto's `calculate_2fa`; this mirrors it from the server's end.

use num_bigint::BigUint;
use sha2::{Digest, Sha256, Sha512};

/// Telegram's 2048-bit safe prime (the `p` its servers send, with g = 3).
const P_HEX: &str = "c71caeb9c6b1c9048e6c522f70f13f73980d40238e3e21c14934d037563d930f\
48198a0aa7c14058229493d22530f4dbfa336f6e0ac925139543aed44cce7c37\
20fd51f69458705ac68cd4fe6b6b13abdc9746512969328454f18faf8c595f64\
2477fe96bb2a941d5bcd1d4ac8cc49880708fa9b378e3c4f3a9060bee67cf9a4\
a4a695811051907e162753b56b0f6b410dba74d8a84b2a14b3144e0ef1284754\
fd17ed950d5965b4b9dd46582db1178d169c6bc465b0d6ff9ca3928fef5b9ae4\
e418fc15e83ebea0f87fa9ff5eed70050ded2849f47bf959d956850ce929851f\
0d8115f635b105ee2e4e15d04b2454bf6f4fadf034b10403119cd8e3b92fcc5b";

pub(crate) const G: i32 = 3;

pub(crate) fn p_bytes() -> Vec<u8> {
    hex::decode(P_HEX).expect("constant prime")
}

fn h(parts: &[&[u8]]) -> [u8; 32] {
    let mut d = Sha256::new();
    for p in parts {
        d.update(p);
    }
    d.finalize().into()
}

fn pad256(x: &BigUint) -> [u8; 256] {
    let b = x.to_bytes_be();
    let mut out = [0u8; 256];
    out[256 - b.len()..].copy_from_slice(&b);
    out
}

/// PH2(password, salt1, salt2) = SH(pbkdf2(sha512, PH1, salt1, 100000), salt2), where
/// SH(d, s) = H(s | d | s) and PH1 = SH(SH(password, salt1), salt2).
fn ph2(password: &[u8], salt1: &[u8], salt2: &[u8]) -> [u8; 32] {
    let sh = |d: &[u8], s: &[u8]| h(&[s, d, s]);
    let ph1 = sh(&sh(password, salt1), salt2);
    let mut dk = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(&ph1, salt1, 100_000, &mut dk);
    sh(&dk, salt2)
}

/// What the server keeps of a password: the salts and the verifier, never the password.
pub(crate) struct Verifier {
    pub salt1: Vec<u8>,
    pub salt2: Vec<u8>,
    v: BigUint,
}

impl Verifier {
    pub(crate) fn new(password: &str) -> Verifier {
        // Telegram's salt1 is the client's 8 random bytes extended by the server's 32.
        let salt1 = super::server::rnd_bytes(40);
        let salt2 = super::server::rnd_bytes(16);
        let x = BigUint::from_bytes_be(&ph2(password.as_bytes(), &salt1, &salt2));
        let p = BigUint::from_bytes_be(&p_bytes());
        let v = BigUint::from(G as u32).modpow(&x, &p);
        Verifier { salt1, salt2, v }
    }
}

/// One challenge (`account.password`'s srp_B and srp_id); valid until the next is issued.
pub(crate) struct Challenge {
    pub id: i64,
    b: BigUint,
    pub g_b: [u8; 256],
}

impl Challenge {
    pub(crate) fn new(verifier: &Verifier) -> Challenge {
        let p = BigUint::from_bytes_be(&p_bytes());
        let g = BigUint::from(G as u32);
        let b = BigUint::from_bytes_be(&super::server::rnd_bytes(256)) % &p;
        let k = BigUint::from_bytes_be(&h(&[&pad256(&p), &pad256(&g)]));
        let g_b = (k * &verifier.v + g.modpow(&b, &p)) % &p;
        Challenge {
            id: super::server::rnd_i64(),
            b,
            g_b: pad256(&g_b),
        }
    }

    /// Checks the client's `A` (g_a) and `M1` against this challenge.
    pub(crate) fn check(&self, verifier: &Verifier, a: &[u8], m1: &[u8]) -> bool {
        let p = BigUint::from_bytes_be(&p_bytes());
        let g = BigUint::from(G as u32);
        let big_a = BigUint::from_bytes_be(a);
        // A must be a proper group element (1 < A < p - 1), as the SRP page demands.
        let one = BigUint::from(1u32);
        if a.len() > 256 || big_a <= one || big_a >= &p - &one {
            return false;
        }
        let a_pad = pad256(&big_a);
        let u = BigUint::from_bytes_be(&h(&[&a_pad, &self.g_b]));
        // S = (A · v^u)^b mod p, the same secret the client computes as (g_b - k·v)^(a + u·x).
        let s = (big_a * verifier.v.modpow(&u, &p) % &p).modpow(&self.b, &p);
        let k_a = h(&[&pad256(&s)]);
        let h_p = h(&[&pad256(&p)]);
        let h_g = h(&[&pad256(&g)]);
        let mut xor = [0u8; 32];
        for i in 0..32 {
            xor[i] = h_p[i] ^ h_g[i];
        }
        let expected = h(&[
            &xor,
            &h(&[&verifier.salt1]),
            &h(&[&verifier.salt2]),
            &a_pad,
            &self.g_b,
            &k_a,
        ]);
        expected.as_slice() == m1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammers_client_proof_passes_only_with_the_right_password() {
        let ver = Verifier::new("correct horse");
        let ch = Challenge::new(&ver);
        let p = p_bytes();
        let prove = |password: &str| {
            grammers_crypto::two_factor_auth::calculate_2fa(
                &ver.salt1,
                &ver.salt2,
                &p,
                &G,
                ch.g_b.to_vec(),
                super::super::server::rnd_bytes(256),
                password,
            )
        };
        let (m1, g_a) = prove("correct horse");
        assert!(ch.check(&ver, &g_a, &m1));
        let (m1, g_a) = prove("wrong horse");
        assert!(!ch.check(&ver, &g_a, &m1));
        // A degenerate A (1) is refused whatever M1 says.
        let mut one = [0u8; 256];
        one[255] = 1;
        assert!(!ch.check(&ver, &one, &m1));
    }

    #[test]
    fn the_group_is_one_grammers_accepts() {
        assert!(grammers_crypto::two_factor_auth::check_p_and_g(
            &p_bytes(),
            &G
        ));
    }
}
