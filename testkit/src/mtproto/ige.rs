//! AES-256-IGE for the server side. grammers-crypto's IGE goes through the `aes` crate one
//! block at a time, and on CPUs with VAES that crate picks its 512-bit backend, which
//! re-broadcasts the round keys for every single block: IGE is serial, so that is the worst
//! case. On x86_64 with AES-NI we run the rounds directly; elsewhere we fall back to
//! grammers' functions. Both are checked against each other in the tests.

pub fn encrypt(buf: &mut [u8], key: &[u8; 32], iv: &[u8; 32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("aes") {
        // SAFETY: AES-NI (and SSE2, part of x86_64) is available, checked just above.
        unsafe { ni::encrypt(buf, key, iv) };
        return;
    }
    grammers_crypto::aes::ige_encrypt(buf, key, iv)
}

pub fn decrypt(buf: &mut [u8], key: &[u8; 32], iv: &[u8; 32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("aes") {
        // SAFETY: AES-NI is available, checked just above.
        unsafe { ni::decrypt(buf, key, iv) };
        return;
    }
    grammers_crypto::aes::ige_decrypt(buf, key, iv)
}

#[cfg(target_arch = "x86_64")]
mod ni {
    use std::arch::x86_64::*;

    #[target_feature(enable = "aes,sse2")]
    fn assist1(t1: __m128i, t2: __m128i) -> __m128i {
        let t2 = _mm_shuffle_epi32::<0xff>(t2);
        let mut t4 = _mm_slli_si128::<4>(t1);
        let mut t1 = _mm_xor_si128(t1, t4);
        t4 = _mm_slli_si128::<4>(t4);
        t1 = _mm_xor_si128(t1, t4);
        t4 = _mm_slli_si128::<4>(t4);
        t1 = _mm_xor_si128(t1, t4);
        _mm_xor_si128(t1, t2)
    }

    #[target_feature(enable = "aes,sse2")]
    fn assist2(t1: __m128i, t3: __m128i) -> __m128i {
        let t2 = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(t1));
        let mut t4 = _mm_slli_si128::<4>(t3);
        let mut t3 = _mm_xor_si128(t3, t4);
        t4 = _mm_slli_si128::<4>(t4);
        t3 = _mm_xor_si128(t3, t4);
        t4 = _mm_slli_si128::<4>(t4);
        t3 = _mm_xor_si128(t3, t4);
        _mm_xor_si128(t3, t2)
    }

    /// The AES-256 key schedule (Intel's AES-NI white paper, figure 28).
    #[target_feature(enable = "aes,sse2")]
    fn expand(key: &[u8; 32]) -> [__m128i; 15] {
        // SAFETY: both loads read 16 bytes inside the 32-byte key.
        let (mut t1, mut t3) = unsafe {
            (
                _mm_loadu_si128(key.as_ptr().cast()),
                _mm_loadu_si128(key.as_ptr().add(16).cast()),
            )
        };
        let mut k = [t1; 15];
        k[1] = t3;
        macro_rules! round {
            ($i:expr, $rcon:expr) => {
                t1 = assist1(t1, _mm_aeskeygenassist_si128::<$rcon>(t3));
                k[$i] = t1;
                t3 = assist2(t1, t3);
                k[$i + 1] = t3;
            };
        }
        round!(2, 0x01);
        round!(4, 0x02);
        round!(6, 0x04);
        round!(8, 0x08);
        round!(10, 0x10);
        round!(12, 0x20);
        k[14] = assist1(t1, _mm_aeskeygenassist_si128::<0x40>(t3));
        k
    }

    #[target_feature(enable = "aes,sse2")]
    fn load(b: &[u8]) -> __m128i {
        assert!(b.len() >= 16);
        // SAFETY: the assert guarantees 16 readable bytes.
        unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
    }

    #[target_feature(enable = "aes,sse2")]
    fn store(b: &mut [u8], v: __m128i) {
        assert!(b.len() >= 16);
        // SAFETY: the assert guarantees 16 writable bytes.
        unsafe { _mm_storeu_si128(b.as_mut_ptr().cast(), v) }
    }

    #[target_feature(enable = "aes,sse2")]
    pub fn encrypt(buf: &mut [u8], key: &[u8; 32], iv: &[u8; 32]) {
        assert_eq!(buf.len() % 16, 0);
        let k = expand(key);
        let mut prev_c = load(&iv[..16]);
        let mut prev_p = load(&iv[16..]);
        for block in buf.chunks_exact_mut(16) {
            let p = load(block);
            let mut x = _mm_xor_si128(_mm_xor_si128(p, prev_c), k[0]);
            for rk in &k[1..14] {
                x = _mm_aesenc_si128(x, *rk);
            }
            x = _mm_aesenclast_si128(x, k[14]);
            let c = _mm_xor_si128(x, prev_p);
            store(block, c);
            prev_c = c;
            prev_p = p;
        }
    }

    #[target_feature(enable = "aes,sse2")]
    pub fn decrypt(buf: &mut [u8], key: &[u8; 32], iv: &[u8; 32]) {
        assert_eq!(buf.len() % 16, 0);
        let ek = expand(key);
        let mut dk = [ek[14]; 15];
        for i in 1..14 {
            dk[i] = _mm_aesimc_si128(ek[14 - i]);
        }
        dk[14] = ek[0];
        let mut prev_c = load(&iv[..16]);
        let mut prev_p = load(&iv[16..]);
        for block in buf.chunks_exact_mut(16) {
            let c = load(block);
            let mut x = _mm_xor_si128(_mm_xor_si128(c, prev_p), dk[0]);
            for rk in &dk[1..14] {
                x = _mm_aesdec_si128(x, *rk);
            }
            x = _mm_aesdeclast_si128(x, dk[14]);
            let p = _mm_xor_si128(x, prev_c);
            store(block, p);
            prev_c = c;
            prev_p = p;
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn matches_grammers_ige() {
        let mut key = [0u8; 32];
        let mut iv = [0u8; 32];
        let mut data = vec![0u8; 16 * 97];
        for (i, b) in key.iter_mut().enumerate() {
            *b = (i * 13 + 1) as u8;
        }
        for (i, b) in iv.iter_mut().enumerate() {
            *b = (i * 7 + 3) as u8;
        }
        for (i, b) in data.iter_mut().enumerate() {
            *b = (i * 31 % 251) as u8;
        }
        let mut ours = data.clone();
        let mut theirs = data.clone();
        super::encrypt(&mut ours, &key, &iv);
        grammers_crypto::aes::ige_encrypt(&mut theirs, &key, &iv);
        assert_eq!(ours, theirs);
        super::decrypt(&mut ours, &key, &iv);
        assert_eq!(ours, data);
    }
}
