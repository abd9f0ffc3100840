//! Tidy checks on the source tree: conventions that matter, checked by an
//! ordinary test.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

fn workspace_files() -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let mut files = Vec::new();
    for dir in ["crates", "xtask"] {
        rust_files(&root.join(dir), &mut files);
    }
    assert!(files.len() > 10, "found only {} files", files.len());
    files
}

#[test]
fn every_file_starts_with_a_doc_line_saying_what_it_is_for() {
    let missing: Vec<_> = workspace_files()
        .into_iter()
        .filter(|p| !std::fs::read_to_string(p).unwrap().starts_with("//!"))
        .collect();
    assert!(
        missing.is_empty(),
        "files without a leading //! line: {missing:?}"
    );
}

#[test]
fn unsafe_code_lives_only_in_the_segment_module() {
    let offenders: Vec<_> = workspace_files()
        .into_iter()
        .filter(|p| !p.ends_with("ipc-core/src/segment.rs") && !p.ends_with("xtask/tests/tidy.rs"))
        .filter(|p| {
            std::fs::read_to_string(p).unwrap().lines().any(|l| {
                let code = l.split("//").next().unwrap();
                code.contains("unsafe ") || code.contains("unsafe{")
            })
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "unsafe outside ipc-core/src/segment.rs: {offenders:?}"
    );
}

#[test]
fn no_stubs_in_shipped_code() {
    let needles = [concat!("todo", "!("), concat!("unimplemented", "!(")];
    let stubs: Vec<_> = workspace_files()
        .into_iter()
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            needles.iter().any(|n| text.contains(n))
        })
        .collect();
    assert!(stubs.is_empty(), "stubs in {stubs:?}");
}
