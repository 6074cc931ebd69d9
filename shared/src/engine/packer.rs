//! Packs on their way out: the [`Packer`] fills the current pack with sealed blobs and hands
//! each finished pack to [`upload_packs`], which stores it and only then indexes it in the
//! catalog (invariant 1: the catalog never points at a pack storage does not have).

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::catalog::Catalog;
use crate::error::Error;
use crate::format::crypto::{ChunkId, SealMode};
use crate::format::pack::{BlobKind, FinishedPack, PackWriter};
use crate::storage::{Storage, with_retry};

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
        self.current
            .as_mut()
            .expect("a pack is open")
            .add(kind, id, sealed, raw_len, self.encrypt)
            .map_err(|e| Error::io(&self.spool, e))
    }

    /// Finishes the open pack, if any, and hands it to the uploader. Called from blocking
    /// threads.
    pub(super) fn flush(&mut self, mode: SealMode<'_>) -> Result<(), Error> {
        let Some(w) = self.current.take() else {
            return Ok(());
        };
        let done = w.finish(mode).map_err(|e| Error::io(&self.spool, e))?;
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

/// Uploads finished packs one at a time and indexes each once storage has it. Returns the
/// number of packs uploaded.
pub(super) async fn upload_packs(
    storage: Arc<dyn Storage>,
    catalog: Catalog,
    mut packs: mpsc::Receiver<FinishedPack>,
) -> Result<u64, Error> {
    let mut count = 0u64;
    while let Some(pack) = packs.recv().await {
        let name = pack.id.object_name();
        // The id is recorded before the upload: a crash between the two is detectable.
        catalog
            .pack_uploading(&pack.id.0, pack.size, pack.encrypted)
            .await?;
        let location = with_retry(&format!("uploading {name}"), || {
            storage.put_file(&name, &pack.path)
        })
        .await?;
        catalog
            .pack_stored(
                &pack.id.0,
                pack.size,
                pack.encrypted,
                &location,
                &pack.entries,
            )
            .await?;
        count += 1;
    }
    Ok(count)
}
