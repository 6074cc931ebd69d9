//! The backup's walk: a folder's tree in path order as the catalog orders paths (bytewise,
//! SQLite's text order), so that a run of walked paths is one range of the catalog's index
//! and the previous snapshot can be read range by range alongside the walk.
//!
//! Bytewise order is not "a folder, then its contents": a folder's own entry sorts at its
//! name, its contents at `name/`, and between them sort the siblings whose names continue
//! with a byte below `/` (`a`, `a-b`, `a.txt`, then `a/x`). So each folder's children are
//! sorted by those keys and the walk descends when it reaches a folder's `name/` key.

use std::fs::Metadata;
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;

/// What the walk found next.
pub(super) enum Walked {
    /// A path and its own metadata (symlinks not followed).
    Entry(PathBuf, std::io::Result<Metadata>),
    /// A folder whose contents could not be listed (its own entry came before).
    Unlisted(PathBuf, std::io::Error),
}

enum Step {
    Entry(PathBuf),
    Enter(PathBuf),
}

/// A depth-first walk in bytewise path order. It holds one sorted list of children per
/// folder on the current path, nothing of the folders it has left.
pub(super) struct Walker {
    stack: Vec<std::vec::IntoIter<Step>>,
}

impl Walker {
    /// Walks `root` (a folder): the folder itself first, then everything below it.
    pub(super) fn new(root: PathBuf) -> Walker {
        Walker {
            stack: vec![vec![Step::Entry(root.clone()), Step::Enter(root)].into_iter()],
        }
    }

    fn children(dir: &std::path::Path) -> std::io::Result<Vec<Step>> {
        let mut keyed: Vec<(Vec<u8>, Step)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let path = entry.path();
            // Without following symlinks: a link to a folder is an entry, not a subtree.
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                let mut key = name.as_bytes().to_vec();
                key.push(b'/');
                keyed.push((key, Step::Enter(path.clone())));
            }
            keyed.push((name.as_bytes().to_vec(), Step::Entry(path)));
        }
        keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        Ok(keyed.into_iter().map(|(_, s)| s).collect())
    }
}

impl Iterator for Walker {
    type Item = Walked;

    fn next(&mut self) -> Option<Walked> {
        loop {
            let step = match self.stack.last_mut()?.next() {
                Some(s) => s,
                None => {
                    self.stack.pop();
                    continue;
                }
            };
            match step {
                Step::Entry(path) => {
                    let meta = std::fs::symlink_metadata(&path);
                    return Some(Walked::Entry(path, meta));
                }
                Step::Enter(dir) => match Walker::children(&dir) {
                    Ok(steps) => self.stack.push(steps.into_iter()),
                    Err(e) => return Some(Walked::Unlisted(dir, e)),
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn walked(root: &std::path::Path) -> Vec<String> {
        Walker::new(root.to_path_buf())
            .map(|w| match w {
                Walked::Entry(p, _) => p.strip_prefix(root).unwrap().display().to_string(),
                Walked::Unlisted(p, e) => panic!("{}: {e}", p.display()),
            })
            .collect()
    }

    #[test]
    fn the_walk_is_in_bytewise_path_order() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        for dir in ["a/x/deep/er", "a.d", "b", "Z"] {
            std::fs::create_dir_all(r.join(dir)).unwrap();
        }
        for file in [
            "a-b",
            "a.txt",
            "a/x/deep/er/f",
            "a/y",
            "a0",
            "b/ä",
            "b/z",
            "Z/1",
            "é",
        ] {
            std::fs::write(r.join(file), b"x").unwrap();
        }
        std::os::unix::fs::symlink("a", r.join("a-link")).unwrap();
        let got = walked(r);
        // Stored paths share the root's name as a prefix: the relative paths' order is theirs.
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(got, sorted);
        assert_eq!(got.len(), 18, "{got:?}");
        // A folder's contents follow the siblings that sort between its name and `name/`.
        let pos = |p: &str| got.iter().position(|g| g == p).unwrap();
        assert!(pos("a") < pos("a-b") && pos("a.txt") < pos("a/x") && pos("a/y") < pos("a0"));
        // The symlink to a folder is an entry, not walked into.
        assert!(!got.iter().any(|g| g.starts_with("a-link/")));
    }
}
