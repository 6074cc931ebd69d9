//! Content-defined chunking (FastCDC 2020) over a reader, with 4 KiB-aligned reads.
//!
//! We drive `fastcdc`'s cut-point search ourselves instead of using its `StreamCDC`: that one
//! reads into unaligned buffer positions and moves the whole buffer after every chunk, and
//! on these machines a misaligned 1 MiB read is several times slower than an aligned one.
//! The gear table is seeded from the repository key, so chunk boundaries (and therefore chunk
//! sizes visible in storage) don't fingerprint known files.

use std::io::{self, Read};

use fastcdc::v2020::{self, Normalization};

/// Chunk size bounds. Defaults: 256 KiB / 1 MiB / 4 MiB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkerParams {
    pub min: usize,
    pub avg: usize,
    pub max: usize,
}

impl Default for ChunkerParams {
    fn default() -> Self {
        ChunkerParams {
            min: 256 * 1024,
            avg: 1024 * 1024,
            max: 4 * 1024 * 1024,
        }
    }
}

impl ChunkerParams {
    /// Small chunks, for tests that want many chunks from little data.
    pub fn small() -> Self {
        ChunkerParams {
            min: 4 * 1024,
            avg: 16 * 1024,
            max: 64 * 1024,
        }
    }
}

const ALIGN: usize = 4096;
const READ_SIZE: usize = 1024 * 1024;

/// A heap buffer whose start is 4096-byte aligned.
struct AlignedBuf {
    storage: Vec<u8>,
    offset: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Self {
        let storage = vec![0u8; len + ALIGN];
        let offset = storage.as_ptr().align_offset(ALIGN);
        AlignedBuf {
            storage,
            offset,
            len,
        }
    }
    fn as_slice(&self) -> &[u8] {
        &self.storage[self.offset..self.offset + self.len]
    }
    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.offset..self.offset + self.len]
    }
}

/// What cutting needs besides the bytes: the bounds, their masks and the gear tables seeded
/// from the key. Made once per backup and shared by every reader thread.
#[derive(Clone, Debug)]
pub struct Cutter {
    params: ChunkerParams,
    mask_s: u64,
    mask_l: u64,
    gear: std::borrow::Cow<'static, [u64]>,
    gear_ls: std::borrow::Cow<'static, [u64]>,
}

impl Cutter {
    pub fn new(params: ChunkerParams, seed: u64) -> Cutter {
        assert!(
            params.min >= v2020::MINIMUM_MIN
                && params.min <= params.avg
                && params.avg <= params.max
        );
        let (mask_s, mask_l) = v2020::select_masks(params.avg, Normalization::Level1);
        let (gear, gear_ls) = v2020::get_gear_with_seed(seed);
        Cutter {
            params,
            mask_s,
            mask_l,
            gear,
            gear_ls,
        }
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Room for a whole max-size chunk plus aligned reads behind it.
    fn buffer_len(&self) -> usize {
        (self.params.max + 2 * READ_SIZE).next_multiple_of(ALIGN)
    }
}

/// A chunker's buffer, kept from one file to the next. It holds a whole max-size chunk plus
/// aligned reads (about 6 MiB by default): allocating and zeroing that for every file cost
/// more than reading a small file, so each reader thread keeps one and lends it to the
/// chunker of each file it reads.
pub struct ChunkBuf(AlignedBuf);

impl ChunkBuf {
    pub fn new(cutter: &Cutter) -> ChunkBuf {
        ChunkBuf(AlignedBuf::new(cutter.buffer_len()))
    }
}

/// Splits a byte stream into content-defined chunks.
pub struct Chunker<'c, R> {
    reader: R,
    buf: AlignedBuf,
    start: usize,
    end: usize,
    eof: bool,
    cutter: &'c Cutter,
    /// Bytes handed out so far.
    pub position: u64,
}

impl<'c, R: Read> Chunker<'c, R> {
    /// Chunks `reader` in `buf` (see [`ChunkBuf`]; get it back with
    /// [`Chunker::into_buffer`]).
    pub fn new(reader: R, cutter: &'c Cutter, buf: ChunkBuf) -> Self {
        assert!(
            buf.0.len >= cutter.buffer_len(),
            "a chunk buffer made for smaller chunks"
        );
        Chunker {
            reader,
            buf: buf.0,
            start: 0,
            end: 0,
            eof: false,
            cutter,
            position: 0,
        }
    }

    /// The buffer, for the next file.
    pub fn into_buffer(self) -> ChunkBuf {
        ChunkBuf(self.buf)
    }

    fn fill(&mut self) -> io::Result<()> {
        while !self.eof && self.end - self.start < self.cutter.params.max {
            if self.end + READ_SIZE > self.buf.len {
                // Move the unconsumed tail to the front so that its end lands on an aligned
                // offset: the next read then goes to an aligned address.
                let tail = self.end - self.start;
                let new_start = tail.next_multiple_of(ALIGN) - tail;
                self.buf
                    .as_mut_slice()
                    .copy_within(self.start..self.end, new_start);
                self.start = new_start;
                self.end = new_start + tail;
            }
            let end = self.end;
            let n = match self
                .reader
                .read(&mut self.buf.as_mut_slice()[end..end + READ_SIZE])
            {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if n == 0 {
                self.eof = true;
            }
            self.end += n;
        }
        Ok(())
    }

    /// The next chunk, or `None` at the end of the stream. The slice is valid until the next
    /// call.
    pub fn next_chunk(&mut self) -> io::Result<Option<&[u8]>> {
        self.fill()?;
        if self.start == self.end {
            return Ok(None);
        }
        let data = &self.buf.as_slice()[self.start..self.end];
        let c = self.cutter;
        let (_, cut) = v2020::cut_gear(
            data,
            c.params.min,
            c.params.avg,
            c.params.max,
            c.mask_s,
            c.mask_l,
            c.mask_s << 1,
            c.mask_l << 1,
            &c.gear,
            &c.gear_ls,
        );
        let cut = if cut == 0 { data.len() } else { cut };
        let chunk_start = self.start;
        self.start += cut;
        self.position += cut as u64;
        Ok(Some(&self.buf.as_slice()[chunk_start..chunk_start + cut]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn chunks(data: &[u8], params: ChunkerParams, seed: u64) -> Vec<Vec<u8>> {
        let cutter = Cutter::new(params, seed);
        let mut c = Chunker::new(data, &cutter, ChunkBuf::new(&cutter));
        let mut out = Vec::new();
        while let Some(ch) = c.next_chunk().unwrap() {
            out.push(ch.to_vec());
        }
        out
    }

    #[test]
    fn sizes_respect_bounds_and_average() {
        let data = pseudo_random(40 << 20, 7);
        let p = ChunkerParams::default();
        let cs = chunks(&data, p, 0);
        for c in &cs[..cs.len() - 1] {
            assert!(c.len() >= p.min && c.len() <= p.max, "{}", c.len());
        }
        let avg = data.len() / cs.len();
        assert!(
            avg > 512 * 1024 && avg < 2 * 1024 * 1024,
            "average chunk {avg}"
        );
        assert_eq!(cs.concat(), data);
    }

    #[test]
    fn an_insertion_only_changes_nearby_chunks() {
        let data = pseudo_random(8 << 20, 3);
        let p = ChunkerParams::small();
        let a = chunks(&data, p, 42);
        let mut edited = data.clone();
        edited.splice(4 << 20..4 << 20, b"hello".iter().copied());
        let b = chunks(&edited, p, 42);
        let common = a.iter().filter(|c| b.contains(c)).count();
        assert!(
            common + 4 >= a.len(),
            "only {common} of {} chunks survived",
            a.len()
        );
    }

    #[test]
    fn seed_changes_boundaries() {
        let data = pseudo_random(4 << 20, 5);
        let p = ChunkerParams::small();
        assert_ne!(chunks(&data, p, 1), chunks(&data, p, 2));
    }

    #[test]
    fn a_buffer_lent_from_file_to_file_chunks_each_as_a_fresh_one_would() {
        let p = ChunkerParams::small();
        let cutter = Cutter::new(p, 9);
        let mut buf = ChunkBuf::new(&cutter);
        // A large file leaves the buffer full of its bytes; smaller ones follow.
        for (len, seed) in [(300_000, 1), (10, 2), (70_000, 3), (0, 4), (5_000, 5)] {
            let data = pseudo_random(len, seed);
            let mut c = Chunker::new(&data[..], &cutter, buf);
            let mut out = Vec::new();
            while let Some(ch) = c.next_chunk().unwrap() {
                out.push(ch.to_vec());
            }
            buf = c.into_buffer();
            assert_eq!(out, chunks(&data, p, 9), "file of {len} bytes");
        }
    }

    /// A reader that returns short reads, like a pipe.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(777);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn chunks_reassemble(len in 0usize..300_000, seed in any::<u64>(), short in any::<bool>()) {
            let data = pseudo_random(len, seed);
            let p = ChunkerParams::small();
            let mut out = Vec::new();
            if short {
                let cutter = Cutter::new(p, seed);
                let mut c = Chunker::new(Trickle(&data), &cutter, ChunkBuf::new(&cutter));
                while let Some(ch) = c.next_chunk().unwrap() { out.push(ch.to_vec()); }
            } else {
                out = chunks(&data, p, seed);
            }
            prop_assert_eq!(out.concat(), data.clone());
            // Same input, same chunks: the basis of dedup.
            prop_assert_eq!(out, chunks(&data, p, seed));
        }
    }
}
