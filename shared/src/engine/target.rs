//! The restore target as an open directory handle: every file, folder and symlink a restore
//! makes, and every mode, owner and time it sets, goes through handles opened beneath it that
//! never follow a symlink (invariant 4). A local user who swaps a folder of the target for a
//! symlink while a restore runs makes that restore fail for the paths below it; nothing is
//! written, chmod'ed, chown'ed or touched through the link.
//!
//! Paths below the target are resolved by the kernel with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS)` (Linux 5.6+). Where `openat2` is missing (older kernels, seccomp
//! profiles that don't know it) the same is done one component at a time with `openat(...,
//! O_NOFOLLOW)`, each step relative to the handle of the step before.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{self as rfs, AtFlags, Mode, OFlags, ResolveFlags};

use crate::error::Error;

/// Set once `openat2` turned out to be unavailable; from then on the walk is used.
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// The target directory of a restore, held open.
pub(crate) struct Target {
    root: OwnedFd,
    /// The target's path, for messages only: nothing is resolved through it after opening.
    path: PathBuf,
}

impl Target {
    /// Opens the target directory.
    ///
    /// `within: None` (the CLI): `to` is the operator's own path; it is created if missing and
    /// opened as named. `within: Some(roots)` (jobs from the chat): `to` must lie in one of the
    /// roots; the root is opened as configured, and every component below it is opened (or
    /// created) without following symlinks, so the target can't be moved out of the roots by a
    /// symlink placed or swapped in between the bot's check and the restore.
    pub(crate) fn open(to: &Path, within: Option<&[PathBuf]>) -> Result<Target, Error> {
        let root = match within {
            None => {
                std::fs::create_dir_all(to).map_err(|e| Error::io(to, e))?;
                rfs::open(to, dir_flags(), Mode::empty()).map_err(|e| Error::io(to, e.into()))?
            }
            Some(roots) => open_within(to, roots)?,
        };
        Ok(Target {
            root,
            path: to.to_path_buf(),
        })
    }

    /// The path of `rel` below the target, for messages.
    pub(crate) fn display(&self, rel: &Path) -> PathBuf {
        self.path.join(rel)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Opens the existing directory `rel` (empty: the target itself).
    pub(crate) fn dir(&self, rel: &Path) -> io::Result<OwnedFd> {
        open_beneath(self.root.as_fd(), rel, dir_flags(), Mode::empty())
    }

    /// Opens the existing directory `rel` for path operations only (no read permission
    /// needed), as `fstatat` and friends use it.
    pub(crate) fn dir_path(&self, rel: &Path) -> io::Result<OwnedFd> {
        open_beneath(
            self.root.as_fd(),
            rel,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
    }

    /// Opens `rel` for reading if it is a regular file (`Ok(None)` if it is something else).
    /// Never blocks on a FIFO and never follows a symlink.
    pub(crate) fn open_regular(&self, rel: &Path) -> io::Result<Option<File>> {
        let fd = open_beneath(
            self.root.as_fd(),
            rel,
            OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let st = rfs::fstat(&fd)?;
        if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
            return Ok(None);
        }
        Ok(Some(File::from(fd)))
    }

    /// Whether anything (of any kind, a symlink included) is at `name` in the target.
    pub(crate) fn holds(&self, name: &OsStr) -> io::Result<bool> {
        match rfs::statat(&self.root, name, AtFlags::SYMLINK_NOFOLLOW) {
            Ok(_) => Ok(true),
            Err(rustix::io::Errno::NOENT) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Opens directory `rel`, creating it and any missing parent (mode 0700: writable by the
    /// restore until its recorded mode is applied) one component at a time, never through a
    /// symlink. Returns the handle and whether the last component was created.
    pub(crate) fn make_dirs(&self, rel: &Path) -> io::Result<(OwnedFd, bool)> {
        make_dirs(self.root.as_fd(), rel)
    }
}

fn dir_flags() -> OFlags {
    OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC
}

/// Picks the restore root `to` lies in (as configured or as canonicalised), opens it, and opens
/// or creates the rest of `to` below it without following symlinks.
fn open_within(to: &Path, roots: &[PathBuf]) -> Result<OwnedFd, Error> {
    let plain = to.is_absolute()
        && to
            .to_str()
            .is_some_and(|s| s.split('/').all(|c| c != "." && c != ".."));
    if !plain {
        return Err(Error::Invalid(format!(
            "restore target {} is not a plain absolute path (no \".\" or \"..\")",
            to.display()
        )));
    }
    let mut best: Option<PathBuf> = None;
    for r in roots {
        let forms = [Some(r.clone()), std::fs::canonicalize(r).ok()];
        for c in forms.into_iter().flatten() {
            if to.starts_with(&c)
                && best
                    .as_ref()
                    .is_none_or(|b| c.as_os_str().len() > b.as_os_str().len())
            {
                best = Some(c);
            }
        }
    }
    let Some(root) = best else {
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(Error::Invalid(format!(
            "restore target {} is outside the restore roots ({})\nhint: STORINATOR_RESTORE_ROOTS lists where restores may write",
            to.display(),
            list.join(", ")
        )));
    };
    // The root itself is the operator's configuration: opened as named.
    let root_fd =
        rfs::open(&root, dir_flags(), Mode::empty()).map_err(|e| Error::io(&root, e.into()))?;
    let rest = to
        .strip_prefix(&root)
        .expect("chosen because it is a prefix");
    make_dirs(root_fd.as_fd(), rest)
        .map(|(fd, _)| fd)
        .map_err(|e| {
            if is_not_a_dir(&e) {
                Error::Invalid(format!(
                    "restore target {} passes through a symlink or a file below the restore root {}",
                    to.display(),
                    root.display()
                ))
            } else {
                Error::io(to, e)
            }
        })
}

/// The error of a path that runs into a symlink or a non-directory where a folder should be.
pub(crate) fn is_not_a_dir(e: &io::Error) -> bool {
    matches!(
        rustix::io::Errno::from_io_error(e),
        Some(rustix::io::Errno::LOOP | rustix::io::Errno::NOTDIR | rustix::io::Errno::XDEV)
    )
}

/// The plain names of a relative path, refusing anything else.
fn names(rel: &Path) -> io::Result<Vec<&OsStr>> {
    rel.components()
        .map(|c| match c {
            Component::Normal(n) => Ok(n),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} is not a plain relative path", rel.display()),
            )),
        })
        .collect()
}

/// Opens `rel` beneath `dir` with `flags`, never following a symlink and never leaving `dir`.
pub(crate) fn open_beneath(
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
    mode: Mode,
) -> io::Result<OwnedFd> {
    names(rel)?;
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        match open_beneath_openat2(dir, rel, flags, mode) {
            Err(e) if rustix::io::Errno::from_io_error(&e) == Some(rustix::io::Errno::NOSYS) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
            }
            r => return r,
        }
    }
    open_beneath_walk(dir, rel, flags, mode)
}

/// `openat2` with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS`: the kernel
/// resolves the whole path and refuses any symlink on the way, the last component included.
fn open_beneath_openat2(
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
    mode: Mode,
) -> io::Result<OwnedFd> {
    let path: &Path = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel
    };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS;
    // EAGAIN: a rename raced the lookup (RESOLVE_BENEATH is checked strictly). Bounded retries.
    let mut tries = 0;
    loop {
        match rfs::openat2(dir, path, flags | OFlags::CLOEXEC, mode, resolve) {
            Err(rustix::io::Errno::AGAIN) if tries < 16 => tries += 1,
            r => return r.map_err(Into::into),
        }
    }
}

/// The fallback: one component at a time, each opened `O_NOFOLLOW` relative to the last.
pub(crate) fn open_beneath_walk(
    dir: BorrowedFd<'_>,
    rel: &Path,
    flags: OFlags,
    mode: Mode,
) -> io::Result<OwnedFd> {
    let names = names(rel)?;
    let Some((last, parents)) = names.split_last() else {
        return Ok(rfs::openat(dir, ".", flags | OFlags::CLOEXEC, mode)?);
    };
    let mut cur: Option<OwnedFd> = None;
    for n in parents {
        let at = cur.as_ref().map_or(dir, |f| f.as_fd());
        // O_PATH | O_DIRECTORY | O_NOFOLLOW: a symlink here fails with ENOTDIR.
        let next = rfs::openat(
            at,
            *n,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        cur = Some(next);
    }
    let at = cur.as_ref().map_or(dir, |f| f.as_fd());
    Ok(rfs::openat(
        at,
        *last,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        mode,
    )?)
}

/// See [`Target::make_dirs`].
fn make_dirs(dir: BorrowedFd<'_>, rel: &Path) -> io::Result<(OwnedFd, bool)> {
    let names = names(rel)?;
    let mut cur = rfs::openat(dir, ".", dir_flags(), Mode::empty())?;
    let mut created = false;
    for n in names {
        let (next, made) = open_or_make_dir(cur.as_fd(), n)?;
        cur = next;
        created = made;
    }
    Ok((cur, created))
}

/// Opens the directory `name` in `dir`, creating it (0700) if it does not exist.
fn open_or_make_dir(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<(OwnedFd, bool)> {
    let flags = dir_flags() | OFlags::NOFOLLOW;
    for _ in 0..8 {
        match rfs::openat(dir, name, flags, Mode::empty()) {
            Ok(fd) => return Ok((fd, false)),
            Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        match rfs::mkdirat(dir, name, Mode::from_raw_mode(0o700)) {
            Ok(()) => match rfs::openat(dir, name, flags, Mode::empty()) {
                Ok(fd) => return Ok((fd, true)),
                // Swapped between mkdir and open: start again.
                Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            },
            Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Err(io::Error::other(format!(
        "{} keeps changing under the restore",
        Path::new(name).display()
    )))
}

/// Names in an open directory (`.` and `..` left out).
pub(crate) fn list_dir(dir: &OwnedFd) -> io::Result<Vec<Vec<u8>>> {
    let fd = rfs::openat(dir, ".", dir_flags(), Mode::empty())?;
    let mut out = Vec::new();
    for e in rfs::Dir::read_from(&fd)? {
        let e = e?;
        let name = e.file_name().to_bytes();
        if name != b"." && name != b".." {
            out.push(name.to_vec());
        }
    }
    Ok(out)
}

/// Removes the entry `name` (not a directory) from `dir`.
pub(crate) fn unlink(dir: &OwnedFd, name: &[u8]) -> io::Result<()> {
    Ok(rfs::unlinkat(
        dir,
        OsStr::from_bytes(name),
        AtFlags::empty(),
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    type Resolver = fn(BorrowedFd<'_>, &Path, OFlags, Mode) -> io::Result<OwnedFd>;

    fn fd(p: &Path) -> OwnedFd {
        rfs::open(p, dir_flags(), Mode::empty()).unwrap()
    }

    /// Both resolvers refuse symlinks anywhere on the path and `..`, and agree otherwise.
    #[test]
    fn both_resolvers_refuse_symlinks_and_escapes() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/f"), b"x").unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("a/link")).unwrap();
        std::os::unix::fs::symlink("b/f", d.path().join("a/flink")).unwrap();
        let root = fd(d.path());
        let read = OFlags::RDONLY;
        let resolvers: [(&str, Resolver); 2] = [
            ("openat2", open_beneath_openat2),
            ("walk", open_beneath_walk),
        ];
        for (name, open) in resolvers {
            assert!(
                open(root.as_fd(), Path::new("a/b/f"), read, Mode::empty()).is_ok(),
                "{name}"
            );
            assert!(open(root.as_fd(), Path::new(""), dir_flags(), Mode::empty()).is_ok());
            for bad in ["a/link", "a/link/x", "a/flink"] {
                let e = open(root.as_fd(), Path::new(bad), read, Mode::empty()).unwrap_err();
                assert!(is_not_a_dir(&e), "{name} {bad}: {e}");
            }
            // A file created beneath a symlinked folder would land outside: refused.
            assert!(
                open(
                    root.as_fd(),
                    Path::new("a/link/new"),
                    OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL,
                    Mode::from_raw_mode(0o600)
                )
                .is_err()
            );
        }
        assert!(open_beneath(root.as_fd(), Path::new("../x"), read, Mode::empty()).is_err());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn make_dirs_creates_writable_folders_and_refuses_links() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = fd(d.path());
        let (_, created) = make_dirs(root.as_fd(), Path::new("x/y/z")).unwrap();
        assert!(created);
        let (_, created) = make_dirs(root.as_fd(), Path::new("x/y")).unwrap();
        assert!(!created);
        use std::os::unix::fs::PermissionsExt;
        let m = std::fs::metadata(d.path().join("x/y/z"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(m & 0o700, 0o700);
        std::os::unix::fs::symlink(outside.path(), d.path().join("x/l")).unwrap();
        let e = make_dirs(root.as_fd(), Path::new("x/l/q")).unwrap_err();
        assert!(is_not_a_dir(&e), "{e}");
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }

    #[test]
    fn open_within_keeps_the_target_inside_the_roots() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let rootp = d.path().join("root");
        std::fs::create_dir_all(&rootp).unwrap();
        std::os::unix::fs::symlink(outside.path(), rootp.join("link")).unwrap();
        let roots = vec![rootp.clone()];
        assert!(Target::open(&rootp.join("new/deeper"), Some(&roots)).is_ok());
        assert!(rootp.join("new/deeper").is_dir());
        for bad in [
            d.path().join("elsewhere"),
            rootp.join("link/x"),
            rootp.join("link"),
            rootp.join("../root/x"),
        ] {
            assert!(
                Target::open(&bad, Some(&roots)).is_err(),
                "{}",
                bad.display()
            );
        }
        assert!(Target::open(&rootp.join("./x"), Some(&roots)).is_err());
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        assert!(!d.path().join("elsewhere").exists());
        // The CLI's operator names any folder, relative or with dots, as any tool would.
        let cli = d.path().join("cli/./sub/../t");
        assert!(Target::open(&cli, None).is_ok());
        assert!(d.path().join("cli/t").is_dir());
    }
}
