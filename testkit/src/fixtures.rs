//! Fixtures for tests and benchmarks: a deterministic test tree and a way to compare trees.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use sha2::Digest;
use storinator_shared::ChunkId;
use storinator_shared::format::keyring::KeyRing;
use storinator_shared::format::pack::{BlobKind, PackEntry, PackId};

/// Deterministic pseudo-random bytes.
pub fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Builds the standard test tree under `root` (a folder named like the last component).
pub fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("nested/deeper/deepest")).unwrap();
    std::fs::create_dir_all(root.join("empty-dir")).unwrap();
    std::fs::create_dir_all(root.join("ünïcødé 目录")).unwrap();
    std::fs::write(root.join("empty-file"), b"").unwrap();
    std::fs::write(root.join("small.txt"), b"hello, storinator\n").unwrap();
    std::fs::write(
        root.join("ünïcødé 目录/файл.txt"),
        "unicode content ✓".as_bytes(),
    )
    .unwrap();
    std::fs::write(
        root.join("nested/deeper/deepest/leaf.bin"),
        bytes(70_000, 1),
    )
    .unwrap();
    // Spans several 256 KiB packs.
    std::fs::write(root.join("nested/large.bin"), bytes(1_500_000, 2)).unwrap();
    // Duplicate content: stored once.
    std::fs::write(root.join("nested/large-copy.bin"), bytes(1_500_000, 2)).unwrap();
    for i in 0..30 {
        std::fs::write(
            root.join(format!("nested/deeper/f{i:02}.txt")),
            format!("file number {i}\n").repeat(i + 1),
        )
        .unwrap();
    }
    std::os::unix::fs::symlink("nested/large.bin", root.join("link-to-large")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", root.join("absolute-link")).unwrap();
    std::fs::set_permissions(
        root.join("small.txt"),
        std::fs::Permissions::from_mode(0o640),
    )
    .unwrap();
    std::fs::set_permissions(
        root.join("nested/deeper"),
        std::fs::Permissions::from_mode(0o750),
    )
    .unwrap();
    let old = filetime::FileTime::from_unix_time(1_600_000_000, 123_456_789);
    filetime::set_file_mtime(root.join("small.txt"), old).unwrap();
    filetime::set_file_mtime(root.join("empty-dir"), old).unwrap();
}

/// Everything about a tree that a restore must reproduce: kind, content, mode, mtime.
pub fn describe_tree(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in walkdir::WalkDir::new(root).follow_links(false) {
        let e = e.unwrap();
        let rel = e
            .path()
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let m = std::fs::symlink_metadata(e.path()).unwrap();
        let desc = if m.file_type().is_symlink() {
            format!("link {}", std::fs::read_link(e.path()).unwrap().display())
        } else if m.is_dir() {
            format!(
                "dir {:o} {}.{}",
                m.mode() & 0o7777,
                m.mtime(),
                m.mtime_nsec()
            )
        } else {
            let data = std::fs::read(e.path()).unwrap();
            format!(
                "file {:o} {}.{} {}",
                m.mode() & 0o7777,
                m.mtime(),
                m.mtime_nsec(),
                hex::encode(sha2::Sha256::digest(&data))
            )
        };
        out.insert(rel, desc);
    }
    out
}

/// Files in `dir` (recursively) whose name marks them as restore temporaries.
pub fn temp_files(dir: &Path) -> Vec<PathBuf> {
    walkdir::WalkDir::new(dir)
        .into_iter()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains(".storinator-"))
        .map(|e| e.path().to_path_buf())
        .collect()
}

/// A fault the instrumented storage can answer with instead of doing the call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum InjectedFault {
    /// `StorageError::Transient`: storage unreachable for a while.
    Transient,
    /// `StorageError::Fatal`: storage refuses for good.
    Fatal,
    /// `StorageError::FloodWait` for this many seconds.
    FloodWait(u32),
}

impl InjectedFault {
    fn error(&self, what: &str) -> storinator_shared::StorageError {
        use storinator_shared::StorageError;
        match self {
            InjectedFault::Transient => StorageError::Transient(format!("injected {what} failure")),
            InjectedFault::Fatal => StorageError::Fatal(format!("injected {what} failure")),
            InjectedFault::FloodWait(seconds) => StorageError::FloodWait { seconds: *seconds },
        }
    }
}

/// Called after each upload that succeeded, with the object name and the number of uploads so
/// far (cancel a backup mid-way, kill a worker at a known point).
pub type PutHook = Box<dyn Fn(&str, usize) + Send + Sync>;

/// A storage backend wrapped for tests: uploads can be slowed down (so progress is visible)
/// or made to fail after a number of successes (crash and resume tests), every upload is
/// recorded, the uploads in flight are counted (concurrency tests), and scripted faults can
/// answer uploads and listings. The knobs are `Arc`s so a "restarted" process can share them.
pub struct InstrumentedStorage<S> {
    pub inner: S,
    pub delay_ms: Arc<AtomicU64>,
    /// Uploads wait here while it is closed (hold a job mid-way until the test has seen
    /// what it waits for, instead of hoping a delay is long enough).
    pub gate: Arc<Gate>,
    pub fail_puts_after: Arc<AtomicUsize>,
    pub puts: Arc<Mutex<Vec<String>>>,
    /// The next this-many uploads are answered with `put_fault` (default: a flood wait).
    pub put_faults: Arc<AtomicUsize>,
    pub put_fault: Arc<Mutex<InjectedFault>>,
    /// Faults served on uploads so far.
    pub put_faults_served: Arc<AtomicUsize>,
    /// Answer every `list` with this fault while it is set.
    pub list_fault: Arc<Mutex<Option<InjectedFault>>>,
    /// Uploads in flight now, and the most there ever were at once.
    pub in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
    pub after_put: Arc<Mutex<Option<PutHook>>>,
    /// Refuse (fatally) every upload whose object name starts with this, while it is set
    /// (say `forget-`: a forget whose tombstone cannot be stored).
    pub refuse_named: Arc<Mutex<Option<String>>>,
    /// Range reads so far, those in flight now and the most at once; each read waits
    /// `read_delay_ms` first (a far storage), so reads requested together overlap.
    pub reads: Arc<AtomicUsize>,
    pub reads_in_flight: Arc<AtomicUsize>,
    pub max_reads_in_flight: Arc<AtomicUsize>,
    pub read_delay_ms: Arc<AtomicU64>,
    /// While set, the backend announces transfer estimates (as a rate-limited one does): the
    /// objects asked about as `message_calls`, the bytes as `part_calls`.
    pub estimates: Arc<AtomicBool>,
}

impl<S> InstrumentedStorage<S> {
    pub fn new(inner: S) -> Self {
        InstrumentedStorage {
            inner,
            delay_ms: Default::default(),
            gate: Default::default(),
            fail_puts_after: Arc::new(AtomicUsize::new(usize::MAX)),
            puts: Default::default(),
            put_faults: Default::default(),
            put_fault: Arc::new(Mutex::new(InjectedFault::FloodWait(0))),
            put_faults_served: Default::default(),
            list_fault: Default::default(),
            in_flight: Default::default(),
            max_in_flight: Default::default(),
            after_put: Default::default(),
            refuse_named: Default::default(),
            reads: Default::default(),
            reads_in_flight: Default::default(),
            max_reads_in_flight: Default::default(),
            read_delay_ms: Default::default(),
            estimates: Default::default(),
        }
    }

    /// The injected refusal of an upload named `name`, if `refuse_named` matches it.
    fn refused(&self, name: &str) -> Result<(), storinator_shared::StorageError> {
        match self.refuse_named.lock().unwrap().as_deref() {
            Some(prefix) if name.starts_with(prefix) => Err(
                storinator_shared::StorageError::Fatal(format!("injected refusal of {name}")),
            ),
            _ => Ok(()),
        }
    }

    /// The same instrumentation (delay, failure point, faults, upload log, hook) over another
    /// backend: one "process" dies, the next shares what the test watches.
    pub fn sharing<T>(inner: S, other: &InstrumentedStorage<T>) -> Self {
        InstrumentedStorage {
            inner,
            delay_ms: other.delay_ms.clone(),
            gate: other.gate.clone(),
            fail_puts_after: other.fail_puts_after.clone(),
            puts: other.puts.clone(),
            put_faults: other.put_faults.clone(),
            put_fault: other.put_fault.clone(),
            put_faults_served: other.put_faults_served.clone(),
            list_fault: other.list_fault.clone(),
            in_flight: other.in_flight.clone(),
            max_in_flight: other.max_in_flight.clone(),
            after_put: other.after_put.clone(),
            refuse_named: other.refuse_named.clone(),
            reads: other.reads.clone(),
            reads_in_flight: other.reads_in_flight.clone(),
            max_reads_in_flight: other.max_reads_in_flight.clone(),
            read_delay_ms: other.read_delay_ms.clone(),
            estimates: other.estimates.clone(),
        }
    }

    /// Uploads that succeeded so far.
    pub fn put_count(&self) -> usize {
        self.puts.lock().unwrap().len()
    }

    /// Call `hook` after every successful upload.
    pub fn on_put(&self, hook: impl Fn(&str, usize) + Send + Sync + 'static) {
        *self.after_put.lock().unwrap() = Some(Box::new(hook));
    }
}

/// A gate that uploads pass only while it is open (the default).
#[derive(Default)]
pub struct Gate {
    closed: std::sync::atomic::AtomicBool,
    opened: tokio::sync::Notify,
}

impl Gate {
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    pub fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
        self.opened.notify_waiters();
    }

    /// Returns once the gate is open.
    pub async fn pass(&self) {
        loop {
            let opened = self.opened.notified();
            tokio::pin!(opened);
            opened.as_mut().enable();
            if !self.closed.load(Ordering::SeqCst) {
                return;
            }
            opened.await;
        }
    }
}

/// Counts an upload in flight for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(now: &'a AtomicUsize, max: &AtomicUsize) -> Self {
        let n = now.fetch_add(1, Ordering::SeqCst) + 1;
        max.fetch_max(n, Ordering::SeqCst);
        InFlight(now)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

#[async_trait::async_trait]
impl<S: storinator_shared::Storage> storinator_shared::Storage for InstrumentedStorage<S> {
    fn describe(&self) -> String {
        format!("instrumented {}", self.inner.describe())
    }
    fn spool_dir(&self) -> &Path {
        self.inner.spool_dir()
    }
    async fn put_file(
        &self,
        name: &str,
        path: &Path,
    ) -> Result<storinator_shared::Location, storinator_shared::StorageError> {
        self.refused(name)?;
        let _flight = InFlight::enter(&self.in_flight, &self.max_in_flight);
        self.gate.pass().await;
        let delay = self.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        let scripted = self
            .put_faults
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if scripted {
            self.put_faults_served.fetch_add(1, Ordering::SeqCst);
            return Err(self.put_fault.lock().unwrap().error("upload"));
        }
        if self.put_count() >= self.fail_puts_after.load(Ordering::SeqCst) {
            return Err(storinator_shared::StorageError::Fatal(
                "injected upload failure".into(),
            ));
        }
        let loc = self.inner.put_file(name, path).await?;
        let count = {
            let mut puts = self.puts.lock().unwrap();
            puts.push(name.to_string());
            puts.len()
        };
        if let Some(hook) = self.after_put.lock().unwrap().as_ref() {
            hook(name, count);
        }
        Ok(loc)
    }
    async fn put_bytes(
        &self,
        name: &str,
        data: Vec<u8>,
    ) -> Result<storinator_shared::Location, storinator_shared::StorageError> {
        self.refused(name)?;
        self.inner.put_bytes(name, data).await
    }
    async fn get_range(
        &self,
        obj: &storinator_shared::ObjectRef,
        offset: u64,
        len: u64,
    ) -> Result<Vec<u8>, storinator_shared::StorageError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let _flight = InFlight::enter(&self.reads_in_flight, &self.max_reads_in_flight);
        let delay = self.read_delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        }
        self.inner.get_range(obj, offset, len).await
    }
    async fn list(
        &self,
    ) -> Result<Vec<storinator_shared::ObjectInfo>, storinator_shared::StorageError> {
        let fault = self.list_fault.lock().unwrap().clone();
        if let Some(f) = fault {
            return Err(f.error("listing"));
        }
        self.inner.list().await
    }
    async fn remove(
        &self,
        obj: &storinator_shared::ObjectRef,
    ) -> Result<(), storinator_shared::StorageError> {
        self.inner.remove(obj).await
    }
    async fn remove_many(
        &self,
        objs: &[storinator_shared::ObjectRef],
    ) -> Result<(), storinator_shared::StorageError> {
        self.inner.remove_many(objs).await
    }
    fn estimate(&self, bytes: u64, objects: u64) -> Option<storinator_shared::TransferEstimate> {
        self.estimates
            .load(Ordering::SeqCst)
            .then_some(storinator_shared::TransferEstimate {
                message_calls: objects,
                part_calls: bytes,
                seconds: 0.0,
            })
    }
    // The inner store's transfer shape, so that an instrumented store is restored and
    // uploaded to the way the store itself would be.
    fn parallel_uploads(&self) -> usize {
        self.inner.parallel_uploads()
    }
    fn read_ahead(&self) -> u64 {
        self.inner.read_ahead()
    }
}

/// One stored pack as its trailer describes it.
#[derive(Clone, Debug)]
pub struct StoredPack {
    pub name: String,
    pub size: u64,
    pub entries: Vec<PackEntry>,
}

/// Reads the trailer of every pack in `storage` with whichever key of `keys` sealed it (a
/// repository's [`storinator_shared::Repo::ring_all`]). What a test uses to see what really
/// went to storage: which chunks, in which packs, how often.
pub async fn stored_packs(
    storage: &dyn storinator_shared::Storage,
    keys: &KeyRing,
) -> Result<Vec<StoredPack>, String> {
    let mut out = Vec::new();
    for o in storage.list().await.map_err(|e| e.to_string())? {
        if PackId::from_object_name(&o.name).is_none() {
            continue;
        }
        let obj = storinator_shared::ObjectRef::new(&o.name, o.location.clone());
        let bytes = storage
            .get_range(&obj, 0, o.size)
            .await
            .map_err(|e| e.to_string())?;
        out.push(StoredPack {
            name: o.name.clone(),
            size: o.size,
            entries: pack_entries(&o.name, &bytes, keys).map_err(|e| e.to_string())?,
        });
    }
    Ok(out)
}

/// The trailer entries of a whole pack held in memory, authenticated with a key of `keys`.
pub fn pack_entries(
    name: &str,
    pack: &[u8],
    keys: &KeyRing,
) -> Result<Vec<PackEntry>, storinator_shared::format::pack::PackError> {
    use storinator_shared::format::pack::{self, PACK_TAIL_LEN};
    let size = pack.len() as u64;
    let tail_at = size.saturating_sub(PACK_TAIL_LEN) as usize;
    let tlen = pack::decode_tail(name, &pack[tail_at..], size)?;
    let body_len = size - PACK_TAIL_LEN - tlen;
    keys.open_trailer(name, &pack[body_len as usize..tail_at], body_len)
        .map(|(_, t)| t.entries)
}

/// Data chunk ids that are stored in more than one place (each listed with its count). A
/// resumed or repeated backup that uploads what storage already has shows up here.
pub fn duplicate_data_chunks(packs: &[StoredPack]) -> Vec<(ChunkId, usize)> {
    let mut seen: BTreeMap<[u8; 32], usize> = BTreeMap::new();
    for p in packs {
        for e in p.entries.iter().filter(|e| e.kind == BlobKind::Data) {
            *seen.entry(e.id.0).or_default() += 1;
        }
    }
    seen.into_iter()
        .filter(|(_, n)| *n > 1)
        .map(|(id, n)| (ChunkId(id), n))
        .collect()
}

/// Text-like data: slow to compress at zstd level 19, so a job is easy to catch mid-way.
pub fn words(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let vocab: Vec<String> = (0..2000)
        .map(|_| {
            let n = 2 + (next() % 8) as usize;
            (0..n)
                .map(|_| (b'a' + (next() % 26) as u8) as char)
                .collect()
        })
        .collect();
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(vocab[(next() % 2000) as usize].as_bytes());
        out.push(if next() % 10 == 0 { b'\n' } else { b' ' });
    }
    out.truncate(len);
    out
}
