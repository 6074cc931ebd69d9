//! The CPU side of a backup: read, chunk, seal.
//!
//! Threads: `readers` threads each take whole files (read with aligned buffers, cut into
//! chunks, hash the file), `sealers` threads compute keyed chunk ids, decide dedup,
//! compress/encrypt/MAC new chunks and append them to the current pack. That splits the
//! per-byte work about evenly, so one large file keeps both cores busy.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};

use sha2::{Digest, Sha256};

use super::backup::{Warning, mtime_ns};
use super::dedup::ChunkSet;
use super::packer::Packer;
use super::repo::Repo;
use crate::error::Error;
use crate::format::chunker::{ChunkBuf, Chunker, Cutter};
use crate::format::crypto::{self, ChunkId, Keys, SealMode};
use crate::format::pack::BlobKind;
use crate::format::snapshot::{LISTING_CHUNKS, META_COMPRESSION};
use crate::progress::{CancelFlag, Counters};

/// What reading a file produced.
pub(super) struct FileData {
    pub sha256: [u8; 32],
    pub size: u64,
    pub chunks: Vec<ChunkId>,
}

/// A file's outcome: its data and perhaps a warning, or why it was left out.
pub(super) type FileOutcome = Result<(FileData, Option<Warning>), String>;

/// A file's chunk ids in order, filled in by the sealers (which compute the ids).
type ChunkList = Arc<Mutex<Vec<ChunkId>>>;

/// A read file before its chunk ids are all known.
type PendingOutcome = Result<(FileData, ChunkList, Option<Warning>), String>;

/// Files up to this size are sealed by the thread that reads them (see `read_file`).
const SEAL_INLINE_MAX: u64 = 256 * 1024;

/// Chunks a sealer takes at once: sealed together, their encryption runs side by side, about
/// four times as fast as one after another (see `crypto::seal_many_into`). The queue holds as
/// many per sealer.
const SEAL_AT_ONCE: usize = 4;

/// A reader's small-file chunks waiting to be sealed [`SEAL_AT_ONCE`] at a time, as a sealer
/// seals a large file's (a small file is one chunk, so one file alone has none to go with):
/// copies of the chunks (the chunker's buffer goes on to the next file), their buffers kept
/// for the next ones, and the sealed blobs' buffers.
#[derive(Default)]
struct Unsealed {
    chunks: Vec<(ChunkId, Vec<u8>)>,
    spare: Vec<Vec<u8>>,
    sealed: Vec<Vec<u8>>,
}

/// A chunk on its way to a sealer.
struct SealJob {
    data: Vec<u8>,
    list: ChunkList,
    index: usize,
}

enum ReadError {
    /// The file is left out of the snapshot (reported as a warning).
    Skip(String),
    /// The whole backup stops.
    Fatal(Error),
}

/// The CPU side of a backup.
pub(super) struct Pipeline {
    pub keys: Keys,
    pub encrypt: bool,
    pub compression: Option<i32>,
    /// The file chunker's masks and key-seeded gear tables, made once.
    pub cutter: Cutter,
    pub threads: usize,
    /// Ids already stored, or being stored by this run.
    pub known: Mutex<ChunkSet>,
    pub counters: Arc<Counters>,
    pub cancel: CancelFlag,
    pub failed: AtomicBool,
    pub new_chunks: AtomicU64,
    pub new_bytes: AtomicU64,
}

/// Listing chunks [`Pipeline::store_bytes`] seals at once (a batch is held twice, as chunks
/// and sealed: at most 4 MiB with [`LISTING_CHUNKS`]).
const LISTING_BATCH: usize = 8;

/// The state the reader and sealer threads share during [`Pipeline::read_all`].
struct Shared<'a> {
    files: &'a [(PathBuf, String, u64)],
    next: AtomicUsize,
    results: Mutex<Vec<Option<PendingOutcome>>>,
    packer: Mutex<Packer>,
    fatal: Mutex<Option<Error>>,
}

/// The next [`SEAL_AT_ONCE`] chunks to seal, waiting for each; fewer only once the readers
/// are done, `None` when the queue is then empty.
///
/// Waiting for a full set rather than taking what is queued: one large file is read by one
/// reader about as fast as two sealers seal, so the queue rarely holds more than a chunk,
/// and chunks sealed one at a time left AES about a fifth of a first backup's CPU (one CBC
/// chain waits on each block). The wait costs no throughput: a sealer waits only while the
/// queue is empty, that is while the readers are the slower side; the other sealer meanwhile
/// seals its own set. Nothing a reader waits for is held while waiting (only the queue's end).
fn take_jobs(seal_rx: &Mutex<mpsc::Receiver<SealJob>>) -> Option<Vec<SealJob>> {
    let rx = seal_rx.lock().unwrap();
    let mut jobs = vec![rx.recv().ok()?];
    jobs.extend(rx.iter().take(SEAL_AT_ONCE - 1));
    Some(jobs)
}

impl Pipeline {
    pub(super) fn new(
        repo: &Repo,
        keys: &Keys,
        encrypt: bool,
        stored: ChunkSet,
        counters: &Arc<Counters>,
        cancel: &CancelFlag,
    ) -> Pipeline {
        Pipeline {
            keys: keys.clone(),
            encrypt,
            compression: repo.settings.compression,
            cutter: Cutter::new(repo.settings.chunker, keys.chunker_seed(encrypt)),
            threads: repo.settings.threads.max(1),
            known: Mutex::new(stored),
            counters: counters.clone(),
            cancel: cancel.clone(),
            failed: AtomicBool::new(false),
            new_chunks: AtomicU64::new(0),
            new_bytes: AtomicU64::new(0),
        }
    }

    pub(super) fn mode(&self) -> SealMode<'_> {
        if self.encrypt {
            SealMode::Encrypted(&self.keys)
        } else {
            SealMode::Plain(&self.keys)
        }
    }

    pub(super) fn blob_id(&self, data: &[u8]) -> ChunkId {
        self.keys.blob_id(self.encrypt, data)
    }

    fn cdc_seed(&self) -> u64 {
        // Secret per repository and per kind of snapshot: the cut points of unencrypted packs
        // are visible and must tell nothing about encrypted ones (see `Keys::chunker_seed`).
        self.keys.chunker_seed(self.encrypt)
    }

    fn fail(&self, shared: &Shared<'_>, e: Error) {
        self.failed.store(true, Ordering::Relaxed);
        shared.fatal.lock().unwrap().get_or_insert(e);
    }

    /// Reads every file, returning per-file outcomes in order and the packer with the pack
    /// still open (the listing and snapshot object go in after).
    pub(super) fn read_all(
        self: Arc<Self>,
        files: Vec<(PathBuf, String, u64)>,
        packer: Packer,
    ) -> Result<(Vec<FileOutcome>, Packer), Error> {
        let shared = Shared {
            files: &files,
            next: AtomicUsize::new(0),
            results: Mutex::new((0..files.len()).map(|_| None).collect()),
            packer: Mutex::new(packer),
            fatal: Mutex::new(None),
        };
        let (seal_tx, seal_rx) = mpsc::sync_channel::<SealJob>(self.threads * SEAL_AT_ONCE);
        let seal_rx = Mutex::new(seal_rx);
        std::thread::scope(|s| {
            let readers: Vec<_> = (0..self.threads)
                .map(|_| {
                    let seal_tx = seal_tx.clone();
                    s.spawn(|| self.reader(&shared, seal_tx))
                })
                .collect();
            drop(seal_tx);
            for _ in 0..self.threads {
                s.spawn(|| self.sealer(&shared, &seal_rx));
            }
            for r in readers {
                let _ = r.join();
            }
        });
        let Shared {
            results,
            packer,
            fatal,
            ..
        } = shared;
        let packer = packer.into_inner().unwrap();
        if let Some(e) = fatal.into_inner().unwrap() {
            packer.discard();
            return Err(e);
        }
        // Every sealer has finished: each file's chunk list is complete.
        let results = results
            .into_inner()
            .unwrap()
            .into_iter()
            .map(|r| {
                r.expect("every file was read")
                    .map(|(mut data, list, warning)| {
                        data.chunks = std::mem::take(&mut *list.lock().unwrap());
                        (data, warning)
                    })
            })
            .collect();
        Ok((results, packer))
    }

    /// A reader thread: takes the next file until none are left or the backup failed.
    fn reader(&self, shared: &Shared<'_>, seal_tx: mpsc::SyncSender<SealJob>) {
        // One chunk buffer for every file this thread reads, and the small files' chunks
        // waiting to be sealed together.
        let mut buf = None;
        let mut sealed = Unsealed::default();
        loop {
            if self.failed.load(Ordering::Relaxed) {
                break;
            }
            let i = shared.next.fetch_add(1, Ordering::Relaxed);
            let Some((path, rel, size)) = shared.files.get(i) else {
                break;
            };
            let bufs = (&mut buf, &mut sealed);
            match self.read_file(shared, (path, rel, *size), &seal_tx, bufs) {
                Err(ReadError::Fatal(e)) => {
                    self.fail(shared, e);
                    break;
                }
                Err(ReadError::Skip(msg)) => shared.results.lock().unwrap()[i] = Some(Err(msg)),
                Ok(v) => shared.results.lock().unwrap()[i] = Some(Ok(v)),
            }
            Counters::add(&self.counters.files_done, 1);
        }
        if !self.failed.load(Ordering::Relaxed) {
            self.seal_waiting(shared, &mut sealed);
        }
    }

    /// Keeps a small file's chunk for sealing with the next ones (see [`Unsealed`]).
    fn seal_later(&self, shared: &Shared<'_>, unsealed: &mut Unsealed, id: ChunkId, data: &[u8]) {
        let mut copy = unsealed.spare.pop().unwrap_or_default();
        copy.extend_from_slice(data);
        unsealed.chunks.push((id, copy));
        if unsealed.chunks.len() >= SEAL_AT_ONCE {
            self.seal_waiting(shared, unsealed);
        }
    }

    /// Seals and packs the chunks [`Pipeline::seal_later`] kept.
    fn seal_waiting(&self, shared: &Shared<'_>, unsealed: &mut Unsealed) {
        let chunks: Vec<(ChunkId, &[u8])> = unsealed
            .chunks
            .iter()
            .map(|(id, data)| (*id, &data[..]))
            .collect();
        self.store_chunks(shared, &chunks, &mut unsealed.sealed);
        for (_, mut data) in unsealed.chunks.drain(..) {
            data.clear();
            unsealed.spare.push(data);
        }
    }

    /// A sealer thread: ids, dedups, seals and packs chunks until the readers are done.
    fn sealer(&self, shared: &Shared<'_>, seal_rx: &Mutex<mpsc::Receiver<SealJob>>) {
        let mut bufs = Vec::new();
        while let Some(jobs) = take_jobs(seal_rx) {
            if self.failed.load(Ordering::Relaxed) {
                continue; // drain so readers never block
            }
            let chunks: Vec<(ChunkId, &[u8])> = jobs
                .iter()
                .map(|job| {
                    let id = self.blob_id(&job.data);
                    job.list.lock().unwrap()[job.index] = id;
                    (id, &job.data[..])
                })
                .collect();
            self.store_chunks(shared, &chunks, &mut bufs);
        }
    }

    /// Dedups, seals and packs chunks (each with its id); `bufs` is scratch space.
    fn store_chunks(
        &self,
        shared: &Shared<'_>,
        chunks: &[(ChunkId, &[u8])],
        bufs: &mut Vec<Vec<u8>>,
    ) {
        let new: Vec<(ChunkId, &[u8])> = {
            let mut known = self.known.lock().unwrap();
            // Not those already stored, or being stored by this run.
            chunks
                .iter()
                .filter(|(id, _)| known.insert(*id))
                .copied()
                .collect()
        };
        if new.is_empty() {
            return;
        }
        let bytes: usize = new.iter().map(|(_, data)| data.len()).sum();
        self.new_chunks
            .fetch_add(new.len() as u64, Ordering::Relaxed);
        self.new_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if bufs.len() < new.len() {
            bufs.resize_with(new.len(), Vec::new);
        }
        let sealed = &mut bufs[..new.len()];
        sealed.iter_mut().for_each(Vec::clear);
        let plain: Vec<&[u8]> = new.iter().map(|(_, data)| *data).collect();
        crypto::seal_many_into(sealed, self.mode(), &plain, self.compression);
        let mut packer = shared.packer.lock().unwrap();
        for ((id, data), blob) in new.iter().zip(sealed.iter()) {
            if let Err(e) = self.append(&mut packer, BlobKind::Data, *id, blob, data.len()) {
                self.fail(shared, e);
                return;
            }
        }
    }

    /// Appends a sealed blob to the current pack and counts it.
    fn append(
        &self,
        packer: &mut Packer,
        kind: BlobKind,
        id: ChunkId,
        sealed: &[u8],
        raw_len: usize,
    ) -> Result<(), Error> {
        packer.append(self.mode(), kind, id, sealed, raw_len)?;
        Counters::add(&self.counters.bytes_stored, sealed.len() as u64);
        Ok(())
    }

    /// Seals and packs one metadata blob unless it is already known.
    pub(super) fn add_blob(
        &self,
        packer: &mut Packer,
        kind: BlobKind,
        id: ChunkId,
        data: &[u8],
    ) -> Result<(), Error> {
        if !self.known.lock().unwrap().insert(id) {
            return Ok(());
        }
        let sealed = crypto::seal(self.mode(), data, Some(META_COMPRESSION));
        self.append(packer, kind, id, &sealed, data.len())
    }

    /// Chunks `data` (a listing) into blobs; returns their ids in order.
    ///
    /// The chunks are named and sealed [`LISTING_BATCH`] at a time on every thread: the
    /// listing is the last thing a backup stores, and sealed on one thread it kept the other
    /// cores waiting (100,000 files: a 27 MB listing, about 0.3 s of one core).
    pub(super) fn store_bytes(
        &self,
        packer: &mut Packer,
        data: impl std::io::Read,
        kind: BlobKind,
    ) -> Result<Vec<ChunkId>, Error> {
        let mut ids = Vec::new();
        let cutter = Cutter::new(LISTING_CHUNKS, self.cdc_seed());
        let mut chunker = Chunker::new(data, &cutter, ChunkBuf::new(&cutter));
        let mut batch: Vec<Vec<u8>> = Vec::with_capacity(LISTING_BATCH);
        while let Some(chunk) = chunker
            .next_chunk()
            .map_err(|e| Error::Invalid(format!("chunking listing: {e}")))?
        {
            batch.push(chunk.to_vec());
            if batch.len() == LISTING_BATCH {
                self.store_batch(packer, kind, &batch, &mut ids)?;
                batch.clear();
            }
        }
        self.store_batch(packer, kind, &batch, &mut ids)?;
        Ok(ids)
    }

    /// Names, dedups and seals `batch` across the threads, then packs the new blobs in order.
    fn store_batch(
        &self,
        packer: &mut Packer,
        kind: BlobKind,
        batch: &[Vec<u8>],
        ids: &mut Vec<ChunkId>,
    ) -> Result<(), Error> {
        if batch.is_empty() {
            return Ok(());
        }
        let per_thread = batch.len().div_ceil(self.threads);
        let seal = |data: &Vec<u8>| {
            let id = self.blob_id(data);
            let new = self.known.lock().unwrap().insert(id);
            (
                id,
                new.then(|| crypto::seal(self.mode(), data, Some(META_COMPRESSION))),
            )
        };
        let done: Vec<Vec<(ChunkId, Option<Vec<u8>>)>> = std::thread::scope(|s| {
            let parts: Vec<_> = batch
                .chunks(per_thread)
                .map(|part| s.spawn(move || part.iter().map(seal).collect()))
                .collect();
            parts
                .into_iter()
                .map(|p| p.join().expect("a sealing thread panicked"))
                .collect()
        });
        for ((id, sealed), data) in done.into_iter().flatten().zip(batch) {
            if let Some(sealed) = sealed {
                self.append(packer, kind, id, &sealed, data.len())?;
            }
            ids.push(id);
        }
        Ok(())
    }

    /// Reads, chunks and hashes one file. The chunks of a small file are sealed right here:
    /// handing each to a sealer thread cost two thread wake-ups per file, more than sealing
    /// a few KiB. A large file's chunks go to the sealers, so that it keeps every core busy.
    fn read_file(
        &self,
        shared: &Shared<'_>,
        (path, rel, expected): (&Path, &str, u64),
        seal_tx: &mpsc::SyncSender<SealJob>,
        (buf, sealed): (&mut Option<ChunkBuf>, &mut Unsealed),
    ) -> Result<(FileData, ChunkList, Option<Warning>), ReadError> {
        let inline = expected <= SEAL_INLINE_MAX;
        let file = File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                ReadError::Skip("skipped: vanished before it could be read".into())
            }
            _ => ReadError::Skip(format!("skipped: cannot open: {e}")),
        })?;
        let before = file
            .metadata()
            .map_err(|e| ReadError::Skip(format!("skipped: {e}")))?;
        let lent = buf.take().unwrap_or_else(|| ChunkBuf::new(&self.cutter));
        let mut chunker = Chunker::new(&file, &self.cutter, lent);
        let mut sha = Sha256::new();
        let list: ChunkList = Arc::default();
        let mut size = 0u64;
        let read = loop {
            if self.cancel.is_cancelled() {
                break Err(ReadError::Fatal(Error::Cancelled));
            }
            if self.failed.load(Ordering::Relaxed) {
                break Err(ReadError::Fatal(Error::Invalid("backup aborted".into())));
            }
            let chunk = match chunker.next_chunk() {
                Ok(Some(c)) => c,
                Ok(None) => break Ok(()),
                Err(e) => break Err(ReadError::Skip(format!("skipped: read error: {e}"))),
            };
            sha.update(chunk);
            size += chunk.len() as u64;
            Counters::add(&self.counters.bytes_done, chunk.len() as u64);
            if inline {
                let id = self.blob_id(chunk);
                list.lock().unwrap().push(id);
                self.seal_later(shared, sealed, id, chunk);
                continue;
            }
            let index = {
                let mut l = list.lock().unwrap();
                l.push(ChunkId([0; 32]));
                l.len() - 1
            };
            let sent = seal_tx.send(SealJob {
                data: chunk.to_vec(),
                list: list.clone(),
                index,
            });
            if sent.is_err() {
                break Err(ReadError::Fatal(Error::Invalid("backup aborted".into())));
            }
        };
        *buf = Some(chunker.into_buffer());
        read?;
        // The file read, not whatever its path names now: a file replaced since was read
        // whole as it was (its new inode makes the next backup read the path again).
        let after = file.metadata().ok();
        let changed = size != expected
            || after.is_none_or(|a| a.len() != before.len() || mtime_ns(&a) != mtime_ns(&before));
        let warning = changed.then(|| Warning {
            path: rel.to_string(),
            message: "changed while being read: stored as read; the next backup will read it again"
                .into(),
        });
        Ok((
            FileData {
                sha256: sha.finalize().into(),
                size,
                chunks: Vec::new(),
            },
            list,
            warning,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn job(index: usize) -> SealJob {
        SealJob {
            data: vec![index as u8],
            list: ChunkList::default(),
            index,
        }
    }

    /// A sealer waits for a full set even when the readers send one chunk at a time, and
    /// takes what is left once they are done.
    #[test]
    fn a_sealer_takes_full_sets_until_the_readers_are_done() {
        let (tx, rx) = mpsc::sync_channel::<SealJob>(SEAL_AT_ONCE);
        let rx = Mutex::new(rx);
        let reader = std::thread::spawn(move || {
            for i in 0..SEAL_AT_ONCE + 2 {
                std::thread::sleep(Duration::from_millis(5));
                tx.send(job(i)).unwrap();
            }
        });
        let first = take_jobs(&rx).expect("a set");
        let indexes: Vec<usize> = first.iter().map(|j| j.index).collect();
        assert_eq!(indexes, (0..SEAL_AT_ONCE).collect::<Vec<_>>());
        let rest = take_jobs(&rx).expect("the rest");
        let indexes: Vec<usize> = rest.iter().map(|j| j.index).collect();
        assert_eq!(indexes, vec![SEAL_AT_ONCE, SEAL_AT_ONCE + 1]);
        reader.join().unwrap();
        assert!(take_jobs(&rx).is_none());
    }
}
