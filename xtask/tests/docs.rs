//! Checks that the documents a user reads stay true: every option the
//! binaries accept is in the README, no document points outside the
//! repository, and no build product is committed.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The files git tracks, relative to the root.
fn tracked_files() -> Vec<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(root())
        .args(["ls-files", "-z"])
        .output()
        .expect("git ls-files");
    assert!(out.status.success(), "git ls-files failed");
    let files: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .split('\0')
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    assert!(files.len() > 20, "git lists only {} files", files.len());
    files
}

/// The `--long` options a binary's `--help` lists.
fn long_options(bin: &str) -> Vec<String> {
    let out = Command::new(osps_testkit::bin(bin))
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success(), "{bin} --help failed");
    let text = String::from_utf8(out.stdout).unwrap();
    let mut opts: Vec<String> = text
        .lines()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l.strip_prefix("-h, ").unwrap_or(l);
            let l = l.strip_prefix("-V, ").unwrap_or(l);
            let l = l.split_once(", ").map_or(l, |(_, rest)| rest);
            l.starts_with("--").then(|| {
                l.split(|c: char| c.is_whitespace() || c == '=' || c == '<')
                    .next()
                    .unwrap()
                    .to_owned()
            })
        })
        .filter(|o| o != "--help" && o != "--version")
        .collect();
    opts.sort();
    opts.dedup();
    assert!(opts.len() > 3, "{bin} --help lists only {opts:?}");
    opts
}

/// The tracked files `which` picks whose text `says` something.
fn tracked_files_saying(which: impl Fn(&str) -> bool, says: impl Fn(&str) -> bool) -> Vec<String> {
    tracked_files()
        .into_iter()
        .filter(|f| which(f))
        .filter(|f| says(&std::fs::read_to_string(root().join(f)).unwrap_or_default()))
        .collect()
}

#[test]
fn every_option_of_the_watchdog_and_dispatcher_is_in_the_readme() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for bin in ["osps-watchdog", "osps-dispatcher"] {
        let missing: Vec<String> = long_options(bin)
            .into_iter()
            .filter(|o| !readme.contains(&format!("`{o}")))
            .collect();
        assert!(
            missing.is_empty(),
            "{bin} accepts {missing:?}, which README.md does not document"
        );
    }
}

#[test]
fn no_document_points_outside_the_repository() {
    let offenders = tracked_files_saying(
        |f| f.ends_with(".md") || f.starts_with("contrib/") || f.starts_with("docs/"),
        |text| text.contains("../shared") || text.contains("shared/seed"),
    );
    assert!(
        offenders.is_empty(),
        "these documents point at files a clone does not have: {offenders:?}"
    );
}

#[test]
fn no_build_product_is_committed() {
    let products: Vec<String> = tracked_files()
        .into_iter()
        .filter(|f| f.contains("__pycache__/") || f.ends_with(".pyc") || f.starts_with("target/"))
        .collect();
    assert!(products.is_empty(), "build products in git: {products:?}");
}

#[test]
fn documented_commands_never_pick_processes_by_name() {
    // `pgrep -f osps-...` finds every instance's and every user's processes:
    // commands in the documents take pids from `osps-client status --json`.
    let offenders = tracked_files_saying(
        |f| f.ends_with(".md"),
        |text| {
            text.lines()
                .any(|l| l.contains("$(pgrep") && l.contains("osps-"))
        },
    );
    assert!(
        offenders.is_empty(),
        "documents whose commands choose OSPS processes with pgrep: {offenders:?}"
    );
}
