//! Packs on their way out: the [`Packer`] fills the current pack with sealed blobs and hands
//! each finished pack to [`upload_packs`], which stores it and only then indexes it in the
//! catalog (invariant 1: the catalog never points at a pack storage does not have).

use std::path::PathBuf;
use std::sync::Arc;

use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::mpsc;

use crate::catalog::Catalog;
use crate::error::Error;
use crate::format::crypto::{ChunkId, SealMode};
use crate::format::pack::{BlobKind, FinishedPack, PackWriter};
use crate::storage::{ObjectRef, Storage, with_retry};

/// Fills packs up to the pack size and sends each finished one to the uploader.
/// Most blobs in one pack. The pack's table of contents is held in memory until the pack is
/// finished (and sealed, and indexed in the catalog at once): a pack of a million small files
/// would hold a million entries. At this many it is a few MB, and a pack of small files is
/// still several MB.
const MAX_PACK_BLOBS: usize = 1 << 16;

pub(super) struct Packer {
    current: Option<PackWriter>,
    pack_size: u64,
    spool: PathBuf,
    encrypt: bool,
    uploader: mpsc::Sender<FinishedPack>,
}

impl Packer {
    pub(super) fn new(
        pack_size: u64,
        spool: PathBuf,
        encrypt: bool,
        uploader: mpsc::Sender<FinishedPack>,
    ) -> Self {
        Packer {
            current: None,
            pack_size,
            spool,
            encrypt,
            uploader,
        }
    }

    /// Appends a sealed blob to the current pack, starting a new pack when it would overflow.
    /// Called from blocking threads.
    pub(super) fn append(
        &mut self,
        mode: SealMode<'_>,
        kind: BlobKind,
        id: ChunkId,
        sealed: &[u8],
        raw_len: usize,
    ) -> Result<(), Error> {
        if let Some(w) = self.current.as_ref()
            && !w.is_empty()
            && (w.size_with(sealed.len()) > self.pack_size || w.blobs() >= MAX_PACK_BLOBS)
        {
            self.flush(mode)?;
        }
        if self.current.is_none() {
            self.current =
                Some(PackWriter::create(&self.spool).map_err(|e| Error::io(&self.spool, e))?);
        }
        let w = self.current.as_mut().expect("a pack is open");
        w.add(kind, id, sealed, raw_len, self.encrypt)
            .map_err(|e| Error::io(w.path(), e))
    }

    /// Finishes the open pack, if any, and hands it to the uploader. Called from blocking
    /// threads.
    pub(super) fn flush(&mut self, mode: SealMode<'_>) -> Result<(), Error> {
        let Some(w) = self.current.take() else {
            return Ok(());
        };
        let path = w.path().to_path_buf();
        let done = w.finish(mode).map_err(|e| Error::io(&path, e))?;
        self.uploader
            .blocking_send(done)
            .map_err(|_| Error::Invalid("pack upload failed".into()))
    }

    /// Drops the open pack without uploading it (the backup failed).
    pub(super) fn discard(mut self) {
        if let Some(w) = self.current.take() {
            w.discard();
        }
    }
}

/// Uploads finished packs (as many at once as the storage takes: one per lane set) and
/// indexes each once storage has it. Returns the number of packs uploaded. Each pack is
/// recorded as `run_id`'s unfinished pack before its upload, so a crash leaves a row that the
/// next run reclaims (the object is never forgotten).
pub(super) async fn upload_packs(
    storage: Arc<dyn Storage>,
    catalog: Catalog,
    run_id: String,
    mut packs: mpsc::Receiver<FinishedPack>,
) -> Result<u64, Error> {
    let parallel = storage.parallel_uploads().max(1);
    let mut inflight = FuturesUnordered::new();
    let mut count = 0u64;
    let mut open = true;
    loop {
        tokio::select! {
            pack = packs.recv(), if open && inflight.len() < parallel => match pack {
                Some(pack) => inflight.push(upload_one(&storage, &catalog, &run_id, pack)),
                None => open = false,
            },
            Some(done) = inflight.next(), if !inflight.is_empty() => {
                done?;
                count += 1;
            }
            else => break,
        }
    }
    Ok(count)
}

/// Records, uploads and indexes one pack.
async fn upload_one(
    storage: &Arc<dyn Storage>,
    catalog: &Catalog,
    run_id: &str,
    pack: FinishedPack,
) -> Result<(), Error> {
    let name = pack.id.object_name();
    catalog
        .pack_uploading(&pack.id.0, pack.size, pack.encrypted, run_id)
        .await?;
    let location = with_retry(&format!("uploading {name}"), || {
        storage.put_file(&name, &pack.path)
    })
    .await?;
    let recorded = catalog
        .pack_uploaded(run_id, &pack.id.0, pack.size, &location, &pack.entries)
        .await;
    if let Err(e) = recorded {
        if matches!(e, Error::Changed(_)) {
            // Another process took this run for dead and reclaimed the pack, perhaps
            // before the upload landed: the object is nobody's now, so delete it.
            let obj = ObjectRef::new(&name, location);
            if let Err(r) = storage.remove(&obj).await {
                tracing::warn!("deleting reclaimed pack {name}: {r}");
            }
        }
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::crypto::{Keys, MasterSecret};

    #[test]
    fn a_pack_of_small_blobs_ends_at_the_blob_cap() {
        let d = tempfile::tempdir().unwrap();
        let keys = Keys::derive(&MasterSecret::generate());
        let (tx, mut rx) = mpsc::channel(4);
        let mut packer = Packer::new(1 << 30, d.path().to_path_buf(), true, tx);
        let mode = SealMode::Encrypted(&keys);
        for i in 0..=MAX_PACK_BLOBS as u32 {
            let mut id = [0u8; 32];
            id[..4].copy_from_slice(&i.to_be_bytes());
            packer
                .append(mode, BlobKind::Data, ChunkId(id), b"sealed", 6)
                .unwrap();
        }
        let full = rx.try_recv().expect("the full pack went to the uploader");
        assert_eq!(full.entries.len(), MAX_PACK_BLOBS);
        assert!(rx.try_recv().is_err(), "the last blob opened a new pack");
        packer.flush(mode).unwrap();
        assert_eq!(rx.try_recv().unwrap().entries.len(), 1);
    }
}
