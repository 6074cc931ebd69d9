//! A local directory as storage (`STORINATOR_STORAGE=dir:/some/path`).
//!
//! Objects are plain files named after the object. Packs are written into `<root>/.spool/`
//! and renamed into place, so a put costs no copy and a crash never leaves a half-written
//! object under its final name.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::{Location, ObjectInfo, ObjectRef, Storage, check_name};
use crate::error::StorageError;

pub struct DirStorage {
    root: PathBuf,
    spool: PathBuf,
}

impl DirStorage {
    /// Opens (creating if needed) a directory store.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, StorageError> {
        let root = root.into();
        let spool = root.join(".spool");
        std::fs::create_dir_all(&spool).map_err(|e| StorageError::io(&spool, e))?;
        Ok(DirStorage { root, spool })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, name: &str) -> Result<PathBuf, StorageError> {
        check_name(name)?;
        Ok(self.root.join(name))
    }
}

fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| StorageError::io(dir, e))
}

#[async_trait]
impl Storage for DirStorage {
    fn describe(&self) -> String {
        format!("dir:{}", self.root.display())
    }

    fn spool_dir(&self) -> &Path {
        &self.spool
    }

    async fn put_file(&self, name: &str, path: &Path) -> Result<Location, StorageError> {
        let dest = self.path_of(name)?;
        let (src, root) = (path.to_path_buf(), self.root.clone());
        tokio::task::spawn_blocking(move || {
            // Durability: the pack's bytes, then its name, must be on disk before the catalog
            // says the pack exists (invariant 1).
            std::fs::File::open(&src)
                .and_then(|f| f.sync_all())
                .map_err(|e| StorageError::io(&src, e))?;
            if std::fs::rename(&src, &dest).is_err() {
                // Spool on another file system: copy to a temporary name, then rename.
                let tmp = root.join(format!(
                    ".{}.tmp",
                    dest.file_name().unwrap().to_string_lossy()
                ));
                std::fs::copy(&src, &tmp).map_err(|e| StorageError::io(&tmp, e))?;
                std::fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| StorageError::io(&tmp, e))?;
                std::fs::rename(&tmp, &dest).map_err(|e| StorageError::io(&dest, e))?;
                std::fs::remove_file(&src).map_err(|e| StorageError::io(&src, e))?;
            }
            sync_dir(&root)
        })
        .await
        .map_err(|e| StorageError::Fatal(format!("storage task failed: {e}")))??;
        Ok(name.to_string())
    }

    async fn put_bytes(&self, name: &str, data: Vec<u8>) -> Result<Location, StorageError> {
        let dest = self.path_of(name)?;
        let tmp = self.spool.join(format!("{name}.tmp"));
        std::fs::write(&tmp, &data).map_err(|e| StorageError::io(&tmp, e))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(|e| StorageError::io(&tmp, e))?;
        std::fs::rename(&tmp, &dest).map_err(|e| StorageError::io(&dest, e))?;
        sync_dir(&self.root)?;
        Ok(name.to_string())
    }

    async fn get_range(
        &self,
        obj: &ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        let path = self.path_of(&obj.name)?;
        let name = obj.name.clone();
        tokio::task::spawn_blocking(move || {
            let mut f = match std::fs::File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(StorageError::NotFound { name });
                }
                Err(e) => return Err(StorageError::io(&path, e)),
            };
            let size = f.metadata().map_err(|e| StorageError::io(&path, e))?.len();
            if offset.checked_add(len).is_none_or(|end| end > size) {
                return Err(StorageError::Fatal(format!(
                    "range {offset}+{len} is past the end of {name} ({size} bytes)"
                )));
            }
            f.seek(SeekFrom::Start(offset))
                .map_err(|e| StorageError::io(&path, e))?;
            let mut buf = vec![0u8; len as usize];
            f.read_exact(&mut buf)
                .map_err(|e| StorageError::io(&path, e))?;
            Ok(buf)
        })
        .await
        .map_err(|e| StorageError::Fatal(format!("storage task failed: {e}")))?
    }

    async fn list(&self) -> Result<Vec<ObjectInfo>, StorageError> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.root).map_err(|e| StorageError::io(&self.root, e))?;
        for entry in rd {
            let entry = entry.map_err(|e| StorageError::io(&self.root, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let meta = entry
                .metadata()
                .map_err(|e| StorageError::io(entry.path(), e))?;
            if !meta.is_file() || check_name(&name).is_err() {
                continue;
            }
            out.push(ObjectInfo {
                location: name.clone(),
                name,
                size: meta.len(),
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn remove(&self, obj: &ObjectRef) -> Result<(), StorageError> {
        let path = self.path_of(&obj.name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(StorageError::io(&path, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn dir_storage_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::DirStorage::open(dir.path().join("store")).unwrap();
        super::super::conformance::run(&store).await;
    }
}
