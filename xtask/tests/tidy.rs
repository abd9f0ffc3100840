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
    for dir in ["crates", "xtask", "examples"] {
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

/// Functions in `crates/*/src` and how many lines each spans (signature to
/// closing brace), found by indentation: rustfmt puts a function's closing
/// brace alone at its opening line's indentation.
fn function_lengths(text: &str) -> Vec<(usize, String, usize)> {
    let lines: Vec<&str> = text.lines().collect();
    let mut found = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let code = line.trim_start();
        let indent = &line[..line.len() - code.len()];
        let after_quals = ["pub ", "pub(crate) ", "async ", "const ", "unsafe "]
            .iter()
            .fold(code, |c, q| c.strip_prefix(q).unwrap_or(c));
        let after_quals = ["async ", "unsafe "]
            .iter()
            .fold(after_quals, |c, q| c.strip_prefix(q).unwrap_or(c));
        let Some(rest) = after_quals.strip_prefix("fn ") else {
            continue;
        };
        if line.trim_end().ends_with(';') {
            continue; // a declaration in a trait
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        let close = format!("{indent}}}");
        if let Some(end) = (i + 1..lines.len()).find(|&j| lines[j] == close) {
            found.push((i + 1, name, end - i + 1));
        }
    }
    found
}

#[test]
fn no_function_in_the_crates_is_over_80_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter(|p| p.components().any(|c| c.as_os_str() == "src"))
        .flat_map(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            function_lengths(&text)
                .into_iter()
                .filter(|(_, _, n)| *n > 80)
                .map(move |(line, name, n)| format!("{}:{line} {name} ({n} lines)", p.display()))
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(long.is_empty(), "functions over 80 lines: {long:#?}");
}

#[test]
fn the_function_length_check_finds_a_long_function() {
    let body = "    x();\n".repeat(85);
    let text = format!(
        "impl A {{\n    pub async fn long(&self) {{\n{body}    }}\n    fn short() {{}}\n}}\n"
    );
    let found = function_lengths(&text);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((found[0].1.as_str(), found[0].2), ("long", 87));
}

#[test]
fn no_safe_function_hands_out_mut_from_a_shared_borrow() {
    let allow = concat!("mut_from", "_ref");
    let offenders: Vec<_> = workspace_files()
        .into_iter()
        .filter(|p| !p.ends_with("xtask/tests/tidy.rs"))
        .filter(|p| {
            let text = std::fs::read_to_string(p).unwrap();
            // The allowance, or a safe `fn f(&self, ..) -> &mut` on one line
            // (rustfmt keeps such short signatures on one line; an unsafe fn
            // states its contract and is allowed).
            text.contains(allow)
                || text.lines().any(|l| {
                    let l = l.trim_start();
                    !l.contains("unsafe fn")
                        && l.contains("fn ")
                        && l.contains("(&self")
                        && l.contains("-> &mut")
                        && !l.contains("&mut self")
                })
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "a mut_from_ref allowance or a safe (&self) -> &mut function in {offenders:?}"
    );
}
