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
            && w.size_with(sealed.len()) > self.pack_size
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
