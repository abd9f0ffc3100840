//! What a person at a terminal sees: no progress line left above the
//! answer, and one line saying what the client waits for when the
//! dispatcher does not answer; nothing of the kind when not a terminal.
//! `script` (util-linux) gives the client a pseudo-terminal; what it wrote
//! is replayed on a small screen model to see what stays on the screen.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use osps_testkit::{bin, Instance};

const ARGS: &[&str] = osps_testkit::args!(1, 16, 4194304);

fn have_script() -> bool {
    let ok = Command::new("script").arg("--version").output().is_ok();
    if !ok {
        eprintln!("skipped: `script` is not installed, so no pseudo-terminal");
    }
    ok
}

/// Runs `command` (a shell line) on a 200-column pseudo-terminal; returns
/// the bytes written to it and the exit status.
fn on_terminal(command: &str) -> (Vec<u8>, std::process::ExitStatus) {
    let out = Command::new("script")
        .args([
            "-qec",
            &format!("stty cols 200 rows 50; {command}"),
            "/dev/null",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.stdout, out.status)
}

/// The lines left on a screen after `bytes` are written to it: handles
/// carriage return, line feed, cursor up/down (`ESC [ n A/B`) and erasing
/// (`ESC [ 2K`, `ESC [ K`); other escape sequences are skipped.
fn screen(bytes: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(bytes);
    let mut lines: Vec<Vec<char>> = vec![Vec::new()];
    let (mut row, mut col) = (0usize, 0usize);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => col = 0,
            '\n' => {
                row += 1;
                if row == lines.len() {
                    lines.push(Vec::new());
                }
            }
            '\x1b' if chars.peek() == Some(&'[') => {
                chars.next();
                let mut arg = String::new();
                let mut end = ' ';
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() || c == '~' {
                        end = c;
                        break;
                    }
                    arg.push(c);
                }
                let n: usize = arg.parse().unwrap_or(1);
                match (end, arg.as_str()) {
                    ('A', _) => row = row.saturating_sub(n),
                    ('B', _) => {
                        row += n;
                        while lines.len() <= row {
                            lines.push(Vec::new());
                        }
                    }
                    ('K', "2") => lines[row].clear(),
                    ('K', "" | "0") => lines[row].truncate(col),
                    _ => {}
                }
            }
            c if c.is_control() => {}
            c => {
                let line = &mut lines[row];
                while line.len() < col {
                    line.push(' ');
                }
                if col < line.len() {
                    line[col] = c;
                } else {
                    line.push(c);
                }
                col += 1;
            }
        }
    }
    lines
        .into_iter()
        .map(|l| l.into_iter().collect::<String>().trim_end().to_owned())
        .filter(|l| !l.is_empty())
        .collect()
}

#[test]
fn the_screen_model_erases_what_a_progress_bar_erases() {
    assert_eq!(
        screen(b"  sending [==>  ] 1 MiB\r\x1b[2Kresult\r\n"),
        vec!["result"]
    );
    assert_eq!(
        screen(b"bar\r\nresult\r\n\r\x1b[2K"),
        vec!["bar", "result"],
        "erasing the wrong line leaves the bar"
    );
    assert_eq!(screen(b"a\r\nb\x1b[1A\r\x1b[2K"), vec!["b"]);
}

#[test]
fn no_progress_line_is_left_above_the_answer_on_a_terminal() {
    if !have_script() {
        return;
    }
    let inst = Instance::start("ttyclear", ARGS);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.bin");
    let data: Vec<u8> = (0..2_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&input, &data).unwrap();
    for op in ["sha256", "wc"] {
        let (bytes, status) = on_terminal(&format!(
            "{} --instance {} --runtime-dir {} run {op} --input {}",
            bin("osps-client").display(),
            inst.name(),
            inst.runtime_dir().display(),
            input.display()
        ));
        assert!(status.success(), "{}", String::from_utf8_lossy(&bytes));
        let answer = match op {
            "sha256" => osps_testkit::sha256_line(&data),
            _ => osps_testkit::wc_line(&data),
        };
        let answer = String::from_utf8(answer).unwrap().trim_end().to_owned();
        assert!(
            String::from_utf8_lossy(&bytes).contains("sending"),
            "a bar was drawn"
        );
        assert_eq!(
            screen(&bytes),
            vec![answer],
            "{op}: the screen holds the answer alone; written: {:?}",
            String::from_utf8_lossy(&bytes)
        );
    }
}

/// An instance whose dispatcher was killed: its lock file stays (as after a
/// crash), so the client waits for a restart that does not come.
fn killed_instance(tag: &str) -> Instance {
    let mut inst = Instance::start(tag, ARGS);
    inst.signal(nix::sys::signal::Signal::SIGKILL);
    inst.wait_exit(osps_testkit::PATIENCE)
        .expect("the dispatcher exits");
    assert!(inst.paths.lock_file().exists());
    inst
}

#[test]
fn a_wait_over_a_second_is_told_once_on_a_terminal_and_not_when_piped() {
    if !have_script() {
        return;
    }
    let inst = killed_instance("ttywait");
    let client = format!(
        "{} --instance {} --runtime-dir {} --retry-ms 3000 run ping",
        bin("osps-client").display(),
        inst.name(),
        inst.runtime_dir().display()
    );
    let started = Instant::now();
    let (bytes, status) = on_terminal(&client);
    assert!(!status.success());
    let lines = screen(&bytes);
    let waiting: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("waiting for the OSPS dispatcher"))
        .collect();
    assert_eq!(waiting.len(), 1, "{lines:?}");
    assert!(
        waiting[0].starts_with(&format!(
            "osps-client: waiting for the OSPS dispatcher at unix:{} (not answering: ",
            inst.paths.socket().display()
        )) && waiting[0].contains("retrying for"),
        "{lines:?}"
    );
    assert!(started.elapsed() >= Duration::from_secs(2));

    // Piped: only the final error.
    let out = Command::new("sh").args(["-c", &client]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("waiting for"), "{err}");
}
