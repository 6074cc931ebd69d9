//! In-memory storage for tests: fast, and it can be told to corrupt or lose objects.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;

use super::{Location, ObjectInfo, ObjectRef, Storage, check_name};
use crate::error::StorageError;

/// Keeps every object in a map. `spool` is a scratch directory for packs being written.
pub struct MemoryStorage {
    objects: Mutex<BTreeMap<String, Vec<u8>>>,
    spool: PathBuf,
}

impl MemoryStorage {
    pub fn new(spool: impl Into<PathBuf>) -> Self {
        MemoryStorage {
            objects: Mutex::new(BTreeMap::new()),
            spool: spool.into(),
        }
    }

    /// Flip one byte of a stored object (tests of corruption handling).
    pub fn corrupt(&self, name: &str, offset: usize) -> bool {
        let mut objects = self.objects.lock().unwrap();
        match objects.get_mut(name).and_then(|o| o.get_mut(offset)) {
            Some(b) => {
                *b ^= 0x01;
                true
            }
            None => false,
        }
    }

    /// Names and sizes of everything stored.
    pub fn snapshot(&self) -> Vec<(String, usize)> {
        self.objects
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.len()))
            .collect()
    }
}

#[async_trait]
impl Storage for MemoryStorage {
    fn describe(&self) -> String {
        "memory".into()
    }

    fn spool_dir(&self) -> &Path {
        &self.spool
    }

    async fn put_file(&self, name: &str, path: &Path) -> Result<Location, StorageError> {
        check_name(name)?;
        let data = std::fs::read(path).map_err(|e| StorageError::io(path, e))?;
        std::fs::remove_file(path).map_err(|e| StorageError::io(path, e))?;
        self.objects.lock().unwrap().insert(name.to_string(), data);
        Ok(name.to_string())
    }

    async fn put_bytes(&self, name: &str, data: Vec<u8>) -> Result<Location, StorageError> {
        check_name(name)?;
        self.objects.lock().unwrap().insert(name.to_string(), data);
        Ok(name.to_string())
    }

    async fn get_range(
        &self,
        obj: &ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, StorageError> {
        let objects = self.objects.lock().unwrap();
        let data = objects
            .get(&obj.name)
            .ok_or_else(|| StorageError::NotFound {
                name: obj.name.clone(),
            })?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= data.len() as u64)
            .ok_or_else(|| {
                StorageError::Fatal(format!(
                    "range {offset}+{len} is past the end of {} ({} bytes)",
                    obj.name,
                    data.len()
                ))
            })?;
        Ok(data[offset as usize..end as usize].to_vec())
    }

    async fn list(&self) -> Result<Vec<ObjectInfo>, StorageError> {
        Ok(self
            .objects
            .lock()
            .unwrap()
            .iter()
            .map(|(k, v)| ObjectInfo {
                name: k.clone(),
                size: v.len() as u64,
                location: k.clone(),
            })
            .collect())
    }

    async fn remove(&self, obj: &ObjectRef) -> Result<(), StorageError> {
        self.objects.lock().unwrap().remove(&obj.name);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #[tokio::test]
    async fn memory_storage_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::MemoryStorage::new(dir.path().join("spool"));
        super::super::conformance::run(&store).await;
    }
}
