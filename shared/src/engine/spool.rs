//! Spool files: a run's records on disk between its stages (JSON lines in the run's own
//! folder, removed with it), so a stage hands the next one a million items without holding
//! them. Blocking I/O: used off the async runtime.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;

/// Writes records, one JSON line each.
pub(super) struct SpoolWriter<T> {
    path: PathBuf,
    out: BufWriter<File>,
    _records: PhantomData<fn(&T)>,
}

impl<T: Serialize> SpoolWriter<T> {
    /// Creates (or truncates) the spool file at `path`.
    pub(super) fn create(path: &Path) -> Result<SpoolWriter<T>, Error> {
        let file = File::create(path).map_err(|e| Error::io(path, e))?;
        Ok(SpoolWriter {
            path: path.to_path_buf(),
            out: BufWriter::with_capacity(1 << 16, file),
            _records: PhantomData,
        })
    }

    pub(super) fn push(&mut self, record: &T) -> Result<(), Error> {
        serde_json::to_writer(&mut self.out, record)
            .map_err(|e| Error::Invalid(format!("writing {}: {e}", self.path.display())))?;
        self.out
            .write_all(b"\n")
            .map_err(|e| Error::io(&self.path, e))
    }

    /// Flushes the file and leaves it for someone else to read (and remove).
    pub(super) fn close(mut self) -> Result<(), Error> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))
    }

    /// Flushes the file and opens it for reading from the start.
    pub(super) fn finish(mut self) -> Result<SpoolReader<T>, Error> {
        self.out.flush().map_err(|e| Error::io(&self.path, e))?;
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        Ok(SpoolReader {
            path: self.path,
            input: BufReader::with_capacity(1 << 16, file),
            line: String::new(),
            _records: PhantomData,
        })
    }
}

/// Reads the records back in the order they were written.
pub(super) struct SpoolReader<T> {
    path: PathBuf,
    input: BufReader<File>,
    line: String,
    _records: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> SpoolReader<T> {
    /// The next (up to) `n` records; empty at the end.
    pub(super) fn next_batch(&mut self, n: usize) -> Result<Vec<T>, Error> {
        let mut out = Vec::with_capacity(n.min(4096));
        while out.len() < n {
            self.line.clear();
            let read = self
                .input
                .read_line(&mut self.line)
                .map_err(|e| Error::io(&self.path, e))?;
            if read == 0 {
                break;
            }
            let record = serde_json::from_str(self.line.trim_end())
                .map_err(|e| Error::Invalid(format!("reading {}: {e}", self.path.display())))?;
            out.push(record);
        }
        Ok(out)
    }
}

impl<T> Drop for SpoolReader<T> {
    fn drop(&mut self) {
        // Read once; the run's folder goes anyway, this only frees the disk sooner.
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_come_back_in_order_in_batches_and_the_file_goes() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("s.jsonl");
        let mut w = SpoolWriter::<(u32, String)>::create(&path).unwrap();
        for i in 0..10 {
            w.push(&(i, format!("line\n{i}"))).unwrap();
        }
        let mut r = w.finish().unwrap();
        let mut got = Vec::new();
        loop {
            let b = r.next_batch(3).unwrap();
            if b.is_empty() {
                break;
            }
            assert!(b.len() <= 3);
            got.extend(b);
        }
        assert_eq!(
            got,
            (0..10)
                .map(|i| (i, format!("line\n{i}")))
                .collect::<Vec<_>>()
        );
        drop(r);
        assert!(!path.exists());
    }
}
