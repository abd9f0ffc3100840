//! `run -o` with the name of an open descriptor (`/dev/stdout`, ...) writes
//! through it: a file the shell redirected stdout to keeps what it held
//! (`>>`) and stays the same file; it is not replaced by a new one, and what
//! the shell writes next comes after the result (`>`).

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};

use osps_testkit::{bin, Instance};

#[test]
fn dev_stdout_redirected_to_a_file_is_appended_to_not_replaced() {
    let inst = Instance::start("devstdout", osps_testkit::args!(1, 16, 1048576));
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.txt");
    std::fs::write(&log, b"earlier lines\n").unwrap();
    let inode = std::fs::metadata(&log).unwrap().ino();
    for name in ["/dev/stdout", "/proc/self/fd/1"] {
        // As `osps-client run upper -o /dev/stdout >> log.txt`.
        let appending = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        let mut child = osps_testkit::client_command(inst.name(), inst.runtime_dir())
            .args(["run", "upper", "--input", "-", "-o", name])
            .stdin(Stdio::piped())
            .stdout(Stdio::from(appending))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(b"result\n").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Before: the file was replaced by one holding only the last result.
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "earlier lines\nRESULT\nRESULT\n"
    );
    assert_eq!(
        std::fs::metadata(&log).unwrap().ino(),
        inode,
        "the same file"
    );
    let stray: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(stray.len(), 1, "no temporary file left: {stray:?}");
}

#[test]
fn dev_stdout_shares_the_shells_position_in_a_file_redirected_with_truncation() {
    let inst = Instance::start("devstdoutpos", osps_testkit::args!(1, 16, 1048576));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.txt");
    // { echo header; osps-client run upper -o /dev/stdout; echo footer; } > out.txt
    let script = format!(
        "{{ echo header; echo result | '{client}' --instance '{inst}' --runtime-dir '{rt}' run upper --input - -o /dev/stdout; echo footer; }} > '{out}'",
        client = bin("osps-client").display(),
        inst = inst.name(),
        rt = inst.runtime_dir().display(),
        out = out.display(),
    );
    let status = Command::new("sh").args(["-c", &script]).status().unwrap();
    assert!(status.success());
    // Before: the result was written at offset 0 of a new open file, and
    // the shell's "footer" overwrote it.
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "header\nRESULT\nfooter\n"
    );
}
