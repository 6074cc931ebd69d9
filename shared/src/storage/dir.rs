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

/// Puts `src` at `dest` across file systems: a copy to a temporary name beside `dest`, synced,
/// renamed into place; then `src` is removed.
fn copy_into_place(src: &Path, dest: &Path, root: &Path) -> Result<(), StorageError> {
    let tmp = root.join(format!(
        ".{}.tmp",
        dest.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::copy(src, &tmp).map_err(|e| match e.kind() {
        // Name the file that is really missing: the source, not the temporary copy.
        std::io::ErrorKind::NotFound if !src.exists() => StorageError::io(src, e),
        _ => StorageError::io(&tmp, e),
    })?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| StorageError::io(&tmp, e))?;
    std::fs::rename(&tmp, dest).map_err(|e| StorageError::io(dest, e))?;
    std::fs::remove_file(src).map_err(|e| StorageError::io(src, e))
}

/// A failed rename, blamed on the path that caused it.
fn rename_error(src: &Path, dest: &Path, e: std::io::Error) -> StorageError {
    let culprit = if e.kind() == std::io::ErrorKind::NotFound && !src.exists() {
        src
    } else {
        dest
    };
    StorageError::io(culprit, e)
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

    fn adopts_file(&self) -> bool {
        true
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
            match std::fs::rename(&src, &dest) {
                Ok(()) => {}
                // The spool is on another file system: copy, then rename (only then).
                Err(e) if e.kind() == std::io::ErrorKind::CrossesDevices => {
                    copy_into_place(&src, &dest, &root)?
                }
                Err(e) => return Err(rename_error(&src, &dest, e)),
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

    async fn remove_many(&self, objs: &[ObjectRef]) -> Result<(), StorageError> {
        for o in objs {
            self.remove(o).await?;
        }
        // Durable: a deleted pack must not come back after a power loss once the catalog
        // has forgotten it (it would be an object nothing tracks).
        sync_dir(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn dir_storage_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStorage::open(dir.path().join("store")).unwrap();
        super::super::conformance::run(&store).await;
    }

    #[tokio::test]
    async fn a_vanished_spool_file_is_named_and_nothing_is_copied() {
        let dir = tempfile::tempdir().unwrap();
        let store = DirStorage::open(dir.path().join("store")).unwrap();
        let gone = store.spool_dir().join("run-x/0123.partial");
        let e = store.put_file("aa.enc", &gone).await.unwrap_err();
        let msg = e.to_string();
        assert!(msg.starts_with(&gone.display().to_string()), "{msg}");
        assert!(!msg.contains("aa.enc.tmp"), "{msg}");
        assert!(!e.is_retryable(), "a missing file does not come back");
        // The destination's folder vanished (not the source): the destination is named.
        let src = store.spool_dir().join("p.partial");
        std::fs::write(&src, b"pack").unwrap();
        std::fs::remove_dir_all(store.root()).unwrap();
        std::fs::create_dir_all(store.spool_dir()).unwrap();
        std::fs::write(&src, b"pack").unwrap();
        let moved = DirStorage {
            root: dir.path().join("elsewhere"),
            spool: store.spool_dir().to_path_buf(),
        };
        let e = moved.put_file("bb.enc", &src).await.unwrap_err();
        assert!(
            e.to_string()
                .starts_with(&dir.path().join("elsewhere/bb.enc").display().to_string()),
            "{e}"
        );
        assert!(src.exists(), "the pack stays in the spool");
        assert!(!dir.path().join("elsewhere").exists());
    }
}
