//! The crate's layers (see `src/lib.rs`): a module imports only from its own layer or the ones
//! below it. This reads every source file and checks each `crate::<module>` path against the
//! table, so an import of a higher layer fails the build's tests, not a later review.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The crate's top-level modules and what each may import (besides itself).
fn allowed(module: &str) -> &'static [&'static str] {
    const FOUNDATION: &[&str] = &["error", "config", "clock", "progress"];
    match module {
        // The crate's vocabulary: only each other.
        "error" | "config" | "clock" | "progress" => FOUNDATION,
        // Bytes in, bytes out.
        "format" => &["error"],
        // Where packs live; the schema and its queries. Independent of each other.
        "storage" => &["error", "config", "clock", "progress", "format"],
        "catalog" => &["error", "config", "clock", "progress", "format"],
        "engine" => &[
            "error", "config", "clock", "progress", "format", "storage", "catalog",
        ],
        "ops" => &[
            "error", "config", "clock", "progress", "format", "storage", "catalog", "engine",
        ],
        // The table of contents re-exports everything.
        "lib" => &[
            "error", "config", "clock", "progress", "format", "storage", "catalog", "engine", "ops",
        ],
        other => panic!("module {other} is not in the layer table of tests/layering.rs"),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a source file belongs to (`src/engine/backup.rs` → `engine`).
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_str()
        .unwrap();
    first.trim_end_matches(".rs").to_string()
}

/// Every `crate::<name>` a line of code (not a comment) mentions.
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap();
        assert!(
            !line.contains("crate::{"),
            "grouped `crate::{{..}}` imports hide their layer: write one path per module: {line}"
        );
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().last();
            rest = &rest[i + "crate::".len()..];
            // `storinator_shared::` or `some_crate::` are not ours.
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push(name);
        }
    }
    out
}

#[test]
fn no_module_imports_a_higher_layer() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut violations = BTreeSet::new();
    let mut seen_modules = BTreeSet::new();
    for file in &files {
        let module = top_module(&src, file);
        seen_modules.insert(module.clone());
        let allowed = allowed(&module);
        let code = std::fs::read_to_string(file).unwrap();
        for used in crate_paths(&code) {
            if used != module && !allowed.contains(&used.as_str()) {
                violations.insert(format!(
                    "{} ({module}) imports crate::{used}",
                    file.strip_prefix(&src).unwrap().display()
                ));
            }
        }
    }
    assert!(
        violations.is_empty(),
        "layering violations:\n{}",
        violations.into_iter().collect::<Vec<_>>().join("\n")
    );
    // The table covers the crate: a new top-level module must be placed in a layer.
    for m in ["format", "storage", "catalog", "engine", "ops"] {
        assert!(seen_modules.contains(m), "layer {m} is missing from src/");
    }
}

#[test]
fn the_checker_sees_violations() {
    assert_eq!(
        crate_paths("use crate::engine::repo::Repo; // crate::ops in a comment"),
        vec!["engine"]
    );
    assert_eq!(
        crate_paths("x = storinator_crate::foo"),
        Vec::<String>::new()
    );
    assert!(!allowed("format").contains(&"catalog"));
    assert!(!allowed("catalog").contains(&"engine"));
    assert!(!allowed("engine").contains(&"ops"));
}
