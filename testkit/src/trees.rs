//! Deterministic trees of the shapes the benchmarks measure: many small files, a mixed tree,
//! one large file. Contents are pseudo-random (incompressible, like most data worth backing
//! up that is not text) and the same from run to run.

use std::io::Write;
use std::path::Path;

/// What a tree holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeStats {
    pub files: u64,
    pub bytes: u64,
}

/// xorshift64: fast enough to write gigabytes, no dependency.
struct Noise(u64);

impl Noise {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            w.copy_from_slice(&v[..w.len()]);
        }
    }
}

fn write_file(path: &Path, size: u64, noise: &mut Noise, block: &mut [u8]) {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut left = size;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        noise.fill(&mut block[..n]);
        f.write_all(&block[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
}

/// `count` files of `min..=max` bytes each (sizes uniform), 100 to a folder, in folders of
/// 100 folders.
pub fn small_files(root: &Path, count: u64, min: u64, max: u64, seed: u64) -> TreeStats {
    let mut noise = Noise(seed | 1);
    let mut block = vec![0u8; max as usize];
    let mut stats = TreeStats::default();
    for i in 0..count {
        let dir = root.join(format!("d{:03}/e{:02}", i / 10_000, (i / 100) % 100));
        if i % 100 == 0 {
            std::fs::create_dir_all(&dir).unwrap();
        }
        let size = min + noise.next() % (max - min + 1);
        std::fs::write(dir.join(format!("f{i:07}")), {
            noise.fill(&mut block[..size as usize]);
            &block[..size as usize]
        })
        .unwrap();
        stats.files += 1;
        stats.bytes += size;
    }
    stats
}

/// A mixed tree of about `total` bytes: 40 % in one large file, 30 % in 30 files, 20 % in
/// 200 files, 10 % in files of 4 to 64 KiB (about 3,100 of them for 1 GiB).
pub fn mixed(root: &Path, total: u64) -> TreeStats {
    let mut noise = Noise(0x1234_5678_9abc_def1);
    let mut block = vec![0u8; 1 << 16];
    let mut stats = TreeStats::default();
    let mut write = |path: &Path, size: u64, noise: &mut Noise| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        write_file(path, size, noise, &mut block);
        stats.files += 1;
        stats.bytes += size;
    };
    write(&root.join("large/disk.img"), total * 4 / 10, &mut noise);
    for i in 0..30 {
        let p = root.join(format!("media/video-{i:02}.mkv"));
        write(&p, total * 3 / 10 / 30, &mut noise);
    }
    for i in 0..200 {
        let p = root.join(format!("docs/{}/file-{i:03}.pdf", i % 10));
        write(&p, total * 2 / 10 / 200, &mut noise);
    }
    let mut small = 0;
    let mut i = 0;
    while small < total / 10 {
        let size = 4096 + noise.next() % (60 * 1024);
        let p = root.join(format!("src/{}/{}/f{i:05}.txt", i % 17, i % 5));
        write(&p, size, &mut noise);
        small += size;
        i += 1;
    }
    stats
}

/// One file of `size` bytes at `path`. Its content repeats every `period` bytes (pass `size`
/// for no repetition): a large file that does not need as much room in every store it is
/// backed up to, at the price of deduplicating after the first period.
pub fn large_file(path: &Path, size: u64, period: u64) -> TreeStats {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut block = vec![0u8; 1 << 20];
    let mut noise = Noise(0x5eed_0f1a_26ef_11e5);
    let mut written = 0u64;
    while written < size {
        if written.is_multiple_of(period.max(1)) {
            noise = Noise(0x5eed_0f1a_26ef_11e5);
        }
        let to_period_end = period.max(1) - written % period.max(1);
        let n = (size - written).min(block.len() as u64).min(to_period_end) as usize;
        noise.fill(&mut block[..n]);
        f.write_all(&block[..n]).unwrap();
        written += n as u64;
    }
    f.flush().unwrap();
    TreeStats {
        files: 1,
        bytes: size,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn shapes_are_deterministic_and_sized_as_asked() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let s = small_files(a.path(), 250, 1024, 16 * 1024, 7);
        assert_eq!(s, small_files(b.path(), 250, 1024, 16 * 1024, 7));
        assert_eq!(s.files, 250);
        assert!(s.bytes >= 250 * 1024 && s.bytes <= 250 * 16 * 1024);
        let contents = |root: &Path| -> Vec<(PathBuf, Vec<u8>)> {
            let mut v: Vec<_> = walkdir::WalkDir::new(root)
                .into_iter()
                .map(|e| e.unwrap())
                .filter(|e| e.file_type().is_file())
                .map(|e| {
                    let rel = e.path().strip_prefix(root).unwrap().to_path_buf();
                    (rel, std::fs::read(e.path()).unwrap())
                })
                .collect();
            v.sort();
            v
        };
        assert!(contents(a.path()) == contents(b.path()), "same tree twice");
        let m = mixed(&a.path().join("mixed"), 8 << 20);
        assert!(m.bytes >= 8 << 20 && m.files > 231, "{m:?}");

        let big = a.path().join("big/file");
        large_file(&big, 3 << 20, 1 << 20);
        let bytes = std::fs::read(&big).unwrap();
        assert_eq!(bytes.len(), 3 << 20);
        assert_eq!(
            bytes[..1 << 20],
            bytes[1 << 20..2 << 20],
            "repeats every period"
        );
        assert_ne!(bytes[..4096], bytes[4096..8192]);
    }
}
