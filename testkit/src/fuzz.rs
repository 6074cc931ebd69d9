//! A fuzz driver for the stable toolchain (no nightly, no libFuzzer): reproducible random
//! inputs, mutation of valid encodings, and an allocation meter. The harnesses live in the
//! crates' `tests/` (`shared/tests/fuzz.rs`, `worker/tests/fuzz_session.rs`,
//! `bot/tests/fuzz_callback.rs`); each builds valid values from the raw bytes it is given (with
//! `arbitrary`), mutates their encodings with [`mutate`], and checks each decoder call with
//! [`check`].
//!
//! A harness binary that wants allocations metered declares
//! `#[global_allocator] static A: storinator_testkit::fuzz::Meter = storinator_testkit::fuzz::Meter;`.
//!
//! `STORINATOR_FUZZ_ITERS` sets the number of inputs per target (default 3000, a fraction of a
//! second); `STORINATOR_FUZZ_SEED` replays a run.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;

/// A global allocator that records the largest single request made while [`metered`] runs
/// (per thread, so parallel tests don't see each other's).
pub struct Meter;

thread_local! {
    static METERING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Meter {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn record(size: usize) {
    // `try_with`: the thread-locals may be gone while a thread shuts down.
    let _ = METERING.try_with(|m| {
        if m.get() {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    });
}

/// Runs `f` and returns its result with the largest single allocation it made.
pub fn metered<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST.with(|l| l.set(0));
    METERING.with(|m| m.set(true));
    let r = f();
    METERING.with(|m| m.set(false));
    (r, LARGEST.with(|l| l.get()))
}

pub fn iterations() -> u64 {
    std::env::var("STORINATOR_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn base_seed() -> u64 {
    std::env::var("STORINATOR_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).unwrap();
            u64::from_le_bytes(b)
        })
}

/// xorshift64*: small, fast, reproducible.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }
}

/// Mutates a valid encoding: a few of the classic mutations, stacked.
pub fn mutate(rng: &mut Rng, mut data: Vec<u8>, other: &[u8]) -> Vec<u8> {
    let rounds = 1 + rng.below(3);
    for _ in 0..rounds {
        match rng.below(9) {
            0 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] ^= 1 << rng.below(8);
            }
            1 if !data.is_empty() => {
                let i = rng.below(data.len());
                data[i] = rng.next_u64() as u8;
            }
            2 => {
                let n = rng.below(data.len() + 1);
                data.truncate(n);
            }
            3 => {
                let n = rng.below(64);
                let extra = rng.bytes(n);
                data.extend(extra);
            }
            4 if !data.is_empty() => {
                // An interesting integer somewhere: lengths and counts live in LE u32s.
                let v: u32 = [0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFF_FFFF, u32::MAX][rng.below(7)];
                let i = rng.below(data.len());
                for (k, b) in v.to_le_bytes().iter().enumerate() {
                    if i + k < data.len() {
                        data[i + k] = *b;
                    }
                }
            }
            5 if !other.is_empty() => {
                // Splice a piece of another valid encoding in.
                let a = rng.below(other.len());
                let b = a + rng.below(other.len() - a + 1);
                let at = rng.below(data.len() + 1);
                data.splice(at..at, other[a..b].iter().copied());
            }
            6 if data.len() > 1 => {
                let a = rng.below(data.len());
                let b = a + rng.below(data.len() - a);
                data.drain(a..b);
            }
            7 if !data.is_empty() => {
                // Duplicate a slice (repeated records, repeated JSON members).
                let a = rng.below(data.len());
                let b = (a + rng.below(64)).min(data.len());
                let piece = data[a..b].to_vec();
                let at = rng.below(data.len() + 1);
                data.splice(at..at, piece);
            }
            _ => {}
        }
    }
    data
}

/// Runs `target` over `iterations()` inputs: half generated and mutated, a few raw random
/// bytes, the rest generated and left valid. Returns how many ran.
pub fn fuzz(name: &str, target: impl Fn(&mut Rng, &[u8]) -> Result<(), String>) -> u64 {
    let seed = base_seed();
    let n = iterations();
    for i in 0..n {
        let case_seed = seed.wrapping_add(i.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1;
        let mut rng = Rng(case_seed);
        let n = 256 + rng.below(2048);
        let raw = rng.bytes(n);
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| target(&mut rng, &raw)));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                panic!("{name}: case {i} (STORINATOR_FUZZ_SEED={seed}, case seed {case_seed}): {e}")
            }
            Err(_) => panic!(
                "{name}: case {i} panicked (STORINATOR_FUZZ_SEED={seed}, case seed {case_seed})"
            ),
        }
    }
    eprintln!("fuzz {name}: {n} inputs, seed {seed}");
    n
}

/// Checks one decoder call: it returned, and allocated at most `bound` bytes at once.
pub fn check<T, E: std::fmt::Debug>(
    what: &str,
    input: &[u8],
    bound: usize,
    f: impl FnOnce() -> Result<T, E>,
) -> Result<Option<T>, String> {
    let (r, largest) = metered(f);
    if largest > bound {
        return Err(format!(
            "{what}: allocated {largest} bytes at once (bound {bound}) for a {}-byte input {}",
            input.len(),
            hex::encode(&input[..input.len().min(256)])
        ));
    }
    Ok(r.ok())
}

/// Slack for a decoder's own bookkeeping on top of a format bound.
pub const SLACK: usize = 64 * 1024;
