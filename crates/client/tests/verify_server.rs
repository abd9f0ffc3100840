//! The client verifies its server before it sends anything. A squatter
//! running as `nobody` listens where a root client would connect (the
//! instance's socket path, or a loopback TCP port) and answers like a
//! dispatcher, forging results; the client must refuse it with one line,
//! having sent it nothing: no payload, no token. Needs root (to run the
//! squatter as another uid); skipped otherwise.
//!
//! The squatter is this test program itself, copied where `nobody` can run
//! it and started with `OSPS_TEST_SQUATTER` set (see [`squatter_helper`],
//! an ignored test run only so).

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use ipc_core::proto::{self, Outcome, Request, Response};
use osps_testkit::{bin, wait_for, PATIENCE};

const NOBODY: u32 = 65534;

fn is_root() -> bool {
    let root = nix::unistd::getuid().is_root();
    if !root {
        eprintln!("skipped: running a squatter as another uid needs root");
    }
    root
}

fn chown_nobody(p: &Path) {
    std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
}

fn chmod(p: &Path, mode: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A listener run as `nobody`, killed and reaped when dropped.
struct Squatter {
    child: Child,
    /// Where it writes the bytes received on each connection, one count a line.
    record: PathBuf,
    /// Its TCP port, for a TCP squatter.
    port: Option<u16>,
}

impl Squatter {
    /// Starts the squatter on `what` (`unix:PATH` or `tcp`), working in
    /// `work` (a directory `nobody` may write).
    fn start(work: &Path, what: &str) -> Squatter {
        let exe = work.join("squatter");
        osps_testkit::install_exe(&std::env::current_exe().unwrap(), &exe);
        let record = work.join("received");
        let ready = work.join("ready");
        let child = Command::new(&exe)
            .args([
                "--ignored",
                "--exact",
                "squatter_helper",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("OSPS_TEST_SQUATTER", format!("{what};{}", work.display()))
            .uid(NOBODY)
            .gid(NOBODY)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut s = Squatter {
            child,
            record,
            port: None,
        };
        let port = wait_for(PATIENCE, || std::fs::read_to_string(&ready).ok())
            .expect("the squatter listens");
        s.port = port.trim().parse().ok();
        s
    }

    /// The byte counts received, once the squatter has seen `n` connections end.
    fn received(&self, n: usize) -> Vec<usize> {
        wait_for(PATIENCE, || {
            let text = std::fs::read_to_string(&self.record).unwrap_or_default();
            let counts: Vec<usize> = text.lines().filter_map(|l| l.parse().ok()).collect();
            (counts.len() >= n).then_some(counts)
        })
        .unwrap_or_else(|| panic!("the squatter did not see {n} connection(s)"))
    }
}

impl Drop for Squatter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

use std::os::unix::process::CommandExt;

/// A private directory the test owns (0755 so that `nobody` may pass), with
/// `work`, a subdirectory `nobody` may write.
fn dirs() -> (tempfile::TempDir, PathBuf) {
    let top = tempfile::tempdir().unwrap();
    chmod(top.path(), 0o755);
    let work = top.path().join("work");
    std::fs::create_dir(&work).unwrap();
    chown_nobody(&work);
    (top, work)
}

/// The client run with `args` then `--input -`, fed the victim's secret on stdin.
fn run_secret(args: &[&str]) -> Output {
    client(
        &[args, &["--input", "-"]].concat(),
        b"the victim's secret payload",
        &[],
    )
}

/// [`dirs`], when the test runs as root (else it is skipped).
fn root_dirs() -> Option<(tempfile::TempDir, PathBuf)> {
    is_root().then(dirs)
}

fn client(args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
    let mut child = osps_testkit::spawn_piped(
        Command::new(bin("osps-client"))
            .args(["--retry-ms", "2000"])
            .args(args)
            .envs(env.iter().copied()),
    )
    .unwrap();
    // It may refuse and exit before it reads its input.
    let _ = child.stdin.take().unwrap().write_all(stdin);
    child.wait_with_output().unwrap()
}

fn one_line_refusal(out: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    eprintln!("refused: {err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(out.stdout.is_empty(), "printed a result: {:?}", out.stdout);
    assert_eq!(err.lines().count(), 1, "{err}");
    for n in needles {
        assert!(err.contains(n), "no {n:?} in: {err}");
    }
}

#[test]
fn a_socket_in_a_runtime_directory_another_uid_made_is_refused() {
    let Some((top, work)) = root_dirs() else {
        return;
    };
    // `nobody` got there first: it made the base and instance directories
    // and listens at the socket the root client would use.
    let base = top.path().join("base");
    let inst_dir = base.join("default");
    std::fs::create_dir_all(&inst_dir).unwrap();
    for d in [&base, &inst_dir] {
        chown_nobody(d);
    }
    let sock = inst_dir.join("default.sock");
    let squatter = Squatter::start(&work, &format!("unix:{}", sock.display()));
    let out = run_secret(&["--runtime-dir", base.to_str().unwrap(), "run", "sha256"]);
    one_line_refusal(
        &out,
        &[
            "refusing to talk to unix:",
            &format!("directory {} is owned by uid 65534", inst_dir.display()),
            "owned by uid 65534",
        ],
    );
    // The client did not even connect.
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        std::fs::read_to_string(&squatter.record)
            .unwrap_or_default()
            .is_empty(),
        "the squatter saw a connection"
    );
}

#[test]
fn a_unix_socket_served_by_another_uid_is_refused_by_its_peer_credentials() {
    let Some((top, work)) = root_dirs() else {
        return;
    };
    // The directory is ours and closed now; `nobody` bound its socket
    // while it was open: what refuses it is SO_PEERCRED.
    let dir = top.path().join("sockdir");
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o777);
    let sock = dir.join("osps.sock");
    let squatter = Squatter::start(&work, &format!("unix:{}", sock.display()));
    chmod(&dir, 0o755);
    let target = format!("unix:{}", sock.display());
    for args in [
        &["--connect", &target, "run", "echo", "--input", "-"][..],
        &["--connect", &target, "ping", "--timeout", "2000"][..],
    ] {
        let out = client(args, b"the victim's secret payload", &[]);
        one_line_refusal(
            &out,
            &[
                &format!("refusing to talk to {target}"),
                "served by uid 65534",
                "--server-uid 65534",
            ],
        );
    }
    let out = python(&["--socket", sock.to_str().unwrap(), "echo"]);
    python_refusal(&out, &format!("refusing to talk to {target}"));
    assert_eq!(squatter.received(3), [0, 0, 0], "nothing was sent to it");

    // Told to accept that uid (by number, or by name in the environment),
    // the client talks to it: so the squatter would have been believed.
    let out = client(
        &["--connect", &target, "--server-uid", "65534", "run", "echo"],
        b"",
        &[],
    );
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"forged\n");
    let out = client(
        &["--connect", &target, "run", "echo"],
        b"",
        &[("OSPS_SERVER_UID", "nobody")],
    );
    assert_eq!(out.stdout, b"forged\n", "{out:?}");
}

#[test]
fn a_loopback_port_held_by_another_uid_gets_no_token() {
    let Some((top, work)) = root_dirs() else {
        return;
    };
    let token = top.path().join("token");
    osps_testkit::write_token_file(&token, b"the-victims-token-0123456789");
    let squatter = Squatter::start(&work, "tcp");
    let port = squatter.port.expect("a port");
    let target = format!("tcp:127.0.0.1:{port}");
    // The same port by its IPv4-mapped IPv6 address is the same server.
    let mapped = format!("tcp:[::ffff:127.0.0.1]:{port}");
    for target in [&target, &mapped] {
        let token = token.to_str().unwrap();
        let out = run_secret(&["--connect", target, "--token-file", token, "run", "echo"]);
        one_line_refusal(
            &out,
            &[
                &format!("refusing to talk to {target}"),
                "served by uid 65534",
            ],
        );
    }
    let out = python(&[
        "--tcp",
        &format!("127.0.0.1:{port}"),
        "--token-file",
        token.to_str().unwrap(),
        "echo",
    ]);
    python_refusal(&out, &format!("refusing to talk to {target}"));
    assert_eq!(
        squatter.received(3),
        [0, 0, 0],
        "no hello, no token, no payload"
    );
}

/// The Python example client (docs/examples/osps_client.py) with `args`,
/// a payload on stdin.
fn python(args: &[&str]) -> Output {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../docs/examples/osps_client.py"
    );
    let mut child = osps_testkit::spawn_piped(Command::new("python3").arg(script).args(args))
        .expect("python3 runs");
    let _ = child
        .stdin
        .take()
        .unwrap()
        .write_all(b"the victim's secret payload");
    child.wait_with_output().unwrap()
}

fn python_refusal(out: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert!(
        err.contains(needle) && err.contains("served by uid 65534"),
        "{err}"
    );
}

/// The squatter's body, run as `nobody` by the tests above (with
/// `--ignored --exact`, `OSPS_TEST_SQUATTER` set to `unix:PATH;WORKDIR` or
/// `tcp;WORKDIR`); not a test of its own. It answers like a dispatcher: an
/// accepted hello, then `forged\n` to the first request; it records how
/// many bytes each connection sent it.
#[test]
#[ignore = "run by the squatter tests as another uid"]
fn squatter_helper() {
    let spec = std::env::var("OSPS_TEST_SQUATTER")
        .expect("run by the squatter tests, with OSPS_TEST_SQUATTER set");
    let (what, work) = spec.split_once(';').unwrap();
    let work = PathBuf::from(work);
    let record = work.join("received");
    let serve = |mut s: Box<dyn ReadWrite>| {
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        let mut answered = false;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
            if got.len() >= proto::HELLO_LEN && !answered {
                answered = true;
                let _ = s.write_all(&proto::encode_hello(proto::PROTOCOL_VERSION, 0));
            }
            let mut rest = got.get(proto::HELLO_LEN..).unwrap_or_default();
            let mut scratch = Vec::new();
            if let Ok(req) =
                ipc_core::frame::read_frame::<Request, _>(&mut rest, &mut scratch, 65536)
            {
                if rest.len() as u64 >= req.payload_len {
                    let mut out = Vec::new();
                    let resp = Response {
                        id: req.id,
                        outcome: Outcome::Ok,
                        result_len: 7,
                    };
                    ipc_core::frame::encode(&resp, &mut out).unwrap();
                    out.extend_from_slice(b"forged\n");
                    let _ = s.write_all(&out);
                }
            }
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&record)
            .unwrap();
        writeln!(f, "{}", got.len()).unwrap();
    };
    let ready = work.join("ready");
    if let Some(path) = what.strip_prefix("unix:") {
        let l = std::os::unix::net::UnixListener::bind(path).unwrap();
        std::fs::write(&ready, "unix").unwrap();
        for s in l.incoming() {
            let s = s.unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            serve(Box::new(s));
        }
    } else {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        std::fs::write(&ready, l.local_addr().unwrap().port().to_string()).unwrap();
        for s in l.incoming() {
            let s = s.unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            serve(Box::new(s));
        }
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}
