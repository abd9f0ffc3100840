//! Pools contain their workers: each pool has its own segment, which its
//! workers map and no other (checked in `/proc/PID/maps`); run as root, a
//! pool with `user` runs its workers as that user, its segment is given to
//! that user alone, and a hostile worker of another pool and uid (the
//! Python worker's `scan`, which opens every OSPS object it can find)
//! finds none of the other pools' jobs; a killed dispatcher's segments are
//! all removed by the next, those given to a pool's user too; the System V
//! backend makes one segment per pool as well.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ipc_core::status::StatusReport;
use nix::sys::signal::Signal;
use osps_testkit::{config_file, pool_segment, sha256_line, wait_for, Instance};

fn grower() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/grower.py")
}

/// The OSPS segments process `pid` maps, as `/proc/PID/maps` names them
/// (`/dev/shm/NAME` for POSIX, `/SYSV<key>` for System V).
fn mapped_segments(pid: u32) -> Vec<String> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut found: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with("/dev/shm/osps-") || p.starts_with("/SYSV"))
        .map(str::to_owned)
        .collect();
    found.sort();
    found.dedup();
    found
}

/// The real, effective, saved and file-system uids of process `pid`.
fn uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    line.split_whitespace()
        .skip(1)
        .map(|u| u.parse().unwrap())
        .collect()
}

fn workers_of(st: &StatusReport, pool: &str) -> Vec<u32> {
    st.workers
        .iter()
        .filter(|w| w.pool == pool)
        .map(|w| w.pid)
        .collect()
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Whether we are root; says the test is skipped when not (pools of
/// other users need root).
fn root_or_skip() -> bool {
    if !is_root() {
        eprintln!("skipped: needs root to run pools as other users");
    }
    is_root()
}

/// A configuration file of `pools`, and the dispatcher's arguments that
/// read it, with a top-level segment of `mib` MiB, payloads up to
/// `payload` bytes and `extra`; the guard keeps the file.
fn with_pools(
    pools: &str,
    mib: u64,
    payload: u64,
    extra: &[&str],
) -> (tempfile::TempDir, Vec<String>) {
    let (dir, file) = config_file(pools);
    let mut args: Vec<String> = ["--config", file.to_str().unwrap(), "--segment-mib"]
        .map(String::from)
        .to_vec();
    args.extend([mib.to_string(), "--max-payload".into(), payload.to_string()]);
    args.extend(extra.iter().map(|a| a.to_string()));
    (dir, args)
}

/// The builtin pool, and a command pool `second` (`cat`, with a 4 MiB
/// segment) run as nobody when we are root.
fn two_pools() -> String {
    let user = if is_root() { "user = \"nobody\"\n" } else { "" };
    format!(
        "[pools.builtin]\nworkers = 1\n\n\
         [pools.second]\nexec = [\"cat\"]\nops = [\"cat\"]\nworkers = 1\nsegment_mib = 4\n{user}"
    )
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// SIGKILLs the supervised dispatcher and waits for the next one to serve
/// with all its workers; returns its status.
fn kill_dispatcher(inst: &Instance, old_pid: u32) -> StatusReport {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(old_pid as i32), Signal::SIGKILL).unwrap();
    wait_for(Duration::from_secs(20), || {
        let st = inst.try_status()?;
        (st.dispatcher_pid != old_pid && st.workers.iter().all(|w| w.pid != 0)).then_some(st)
    })
    .expect("a new dispatcher")
}

/// Runs the Python `script` as `uid` (its group the same number).
fn python_as(uid: u32, script: &str) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    std::process::Command::new("python3")
        .args(["-c", script])
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap()
}

#[test]
fn each_pools_workers_map_their_own_segment_and_no_other() {
    let (_dir, args) = with_pools(
        &format!(
            "[pools.builtin]\nworkers = 2\n\n\
         [pools.py]\nprogram = [\"python3\", \"{}\"]\nworkers = 1\nsegment_mib = 8\n\n\
         [pools.cat]\nexec = [\"cat\"]\nops = [\"cat\"]\nworkers = 1\nsegment_mib = 4\n",
            grower().display()
        ),
        16,
        4 << 20,
        &[],
    );
    let inst = Instance::start("ct-maps", &strs(&args));
    let mut c = inst.client();
    assert_eq!(c.call("upper", &[], b"abc").unwrap(), b"ABC");
    assert_eq!(c.call("cat", &[], b"through cat").unwrap(), b"through cat");
    assert_eq!(c.call("stale", &[], b"x").unwrap(), b"fresh\n");
    let st = inst.status();
    let mut names = Vec::new();
    for (pool, mib) in [("builtin", 16), ("py", 8), ("cat", 4)] {
        let seg = pool_segment(&st, pool);
        assert_eq!(seg.size, 4096 + (mib << 20), "pool {pool}: {seg:?}");
        // A pool's payloads are what its segment's largest slot holds.
        let largest = ipc_core::SlotAllocator::max_slot_for(mib << 20);
        assert_eq!(seg.max_payload, (largest - 4096).min(4 << 20), "{pool}");
        assert_eq!(seg.attached, 1 + workers_of(&st, pool).len(), "{seg:?}");
        names.push(seg.path.clone());
        for pid in workers_of(&st, pool) {
            assert_eq!(
                mapped_segments(pid),
                vec![seg.path.clone()],
                "worker {pid} of pool {pool} maps its pool's segment alone"
            );
        }
    }
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3, "three segments: {names:?}");
    // The dispatcher maps them all.
    assert_eq!(mapped_segments(inst.pid()), names);
}

#[test]
fn a_payload_larger_than_its_pools_segment_holds_is_refused_and_the_connection_kept() {
    let pools = "[pools.small]\nexec = [\"cat\"]\nops = [\"cat\"]\nworkers = 1\nsegment_mib = 1\n";
    let (_dir, args) = with_pools(pools, 16, 4 << 20, &[]);
    let inst = Instance::start("ct-small", &strs(&args));
    let mut c = inst.client();
    let big = vec![7u8; 2 << 20];
    let limit = ipc_core::SlotAllocator::max_slot_for(1 << 20) - 4096;
    match c.call("cat", &[], &big) {
        Err(osps_client::ClientError::Remote(e)) => {
            assert_eq!(e.kind, ipc_core::ErrorKind::TooLarge);
            let said = format!("exceeds pool \"small\"'s limit of {limit} bytes");
            assert!(e.message.contains(&said), "{}", e.message);
        }
        other => panic!("too large expected: {other:?}"),
    }
    // The same connection goes on: other pools take large payloads.
    assert_eq!(c.call("sha256", &[], &big).unwrap(), sha256_line(&big));
    assert_eq!(c.call("cat", &[], b"small").unwrap(), b"small");
}

/// Root only: a pool of `nobody` and a hostile pool of `daemon`; the
/// hostile worker finds nothing of the others' jobs, and cannot open their
/// segments (nor can any worker of another uid open nobody's).
#[test]
fn a_hostile_worker_of_another_uid_finds_nothing_of_another_pools_jobs() {
    if !root_or_skip() {
        return;
    }
    let (_dir, args) = with_pools(&format!(
        "[pools.builtin]\nworkers = 1\nuser = \"nobody\"\n\n\
         [pools.root]\nexec = [\"cat\"]\nops = [\"cat\"]\nworkers = 1\n\n\
         [pools.hostile]\nprogram = [\"python3\", \"{}\", \"scan\"]\nworkers = 1\nuser = \"daemon\"\n",
        grower().display()
    ), 16, 4 << 20, &[]);
    let inst = Instance::start("ct-hostile", &strs(&args));
    let mut c = inst.client();
    let st = inst.status();
    // nobody's workers serve, as nobody, from a segment given to nobody.
    let nobody = st.pools.iter().find(|p| p.name == "builtin").unwrap();
    let who = nobody.run_as.as_ref().expect("run_as in status");
    assert_eq!((who.user.as_str(), who.uid), ("nobody", 65534));
    for pid in workers_of(&st, "builtin") {
        assert_eq!(uids(pid), vec![65534; 4], "worker {pid} runs as nobody");
    }
    let seg = pool_segment(&st, "builtin");
    assert_eq!(
        (seg.owner_uid, seg.mode.as_str()),
        (65534, "0600"),
        "{seg:?}"
    );
    for pid in workers_of(&st, "hostile") {
        assert_eq!(uids(pid), vec![1; 4], "worker {pid} runs as daemon");
    }
    let data = osps_testkit::noise(100_000);
    assert_eq!(c.call("sha256", &[], &data).unwrap(), sha256_line(&data));
    // Secrets of the other pools' clients, left in their segments.
    let marker = format!("SECRET-{}", std::process::id());
    let secret = format!("{marker} of a client of pool builtin");
    assert_eq!(
        c.call("echo", &[], secret.as_bytes()).unwrap(),
        secret.as_bytes()
    );
    let secret = format!("{marker} of a client of pool root");
    assert_eq!(
        c.call("cat", &[], secret.as_bytes()).unwrap(),
        secret.as_bytes()
    );
    let prefix = inst.paths.segment_prefix();
    let report = c.call("scan", &[&marker, &prefix], b"").unwrap();
    let report = String::from_utf8(report).unwrap();
    println!("{report}");
    assert!(
        !report.contains("FOUND"),
        "the hostile worker found a secret:\n{report}"
    );
    // Pools of other uids than the dispatcher's get System V segments (a
    // POSIX one's owner could shrink it under the dispatcher); the root
    // pool's is POSIX. The scan names a System V segment by its key.
    let shown = |pool: &str| {
        let seg = pool_segment(&st, pool);
        match seg.backend.as_str() {
            "sysv" => format!(
                "sysv key {:#010x}",
                ipc_core::segment::sysv_key(&seg.name) as u32
            ),
            _ => seg.name.clone(),
        }
    };
    let backends = ["builtin", "hostile", "root"].map(|p| pool_segment(&st, p).backend.clone());
    assert_eq!(backends, ["sysv", "sysv", "posix"]);
    assert!(
        report.contains(&format!("own {}\n", shown("hostile"))),
        "{report}"
    );
    for pool in ["builtin", "root"] {
        let name = shown(pool);
        assert!(
            report.contains(&format!("denied {name} (Permission denied)")),
            "pool {pool}'s segment {name} not denied:\n{report}"
        );
    }
    // The hostile pool serves on, and so do the others.
    assert_eq!(c.call("upper", &[], b"ok").unwrap(), b"OK");
}

/// With the System V backend too, each pool has its own segment, given
/// to its user (run as root); another uid cannot attach it.
#[test]
fn with_system_v_each_pool_has_its_own_segment_given_to_its_user() {
    let (_dir, args) = with_pools(&two_pools(), 8, 65536, &["--segment", "sysv"]);
    let inst = Instance::start("ct-sysv", &strs(&args));
    let mut c = inst.client();
    let data = osps_testkit::noise(10_000);
    assert_eq!(c.call("sha256", &[], &data).unwrap(), sha256_line(&data));
    assert_eq!(c.call("cat", &[], &data).unwrap(), data);
    let st = inst.status();
    let (a, b) = (pool_segment(&st, "builtin"), pool_segment(&st, "second"));
    assert_eq!((a.backend.as_str(), b.backend.as_str()), ("sysv", "sysv"));
    if is_root() {
        for pid in workers_of(&st, "second") {
            assert_eq!(uids(pid), vec![65534; 4], "worker {pid} runs as nobody");
        }
    }
    assert_ne!(a.name, b.name);
    assert_eq!((a.size, b.size), (4096 + (8 << 20), 4096 + (4 << 20)));
    for (pool, seg) in [("builtin", a), ("second", b)] {
        let key = ipc_core::segment::sysv_key(&seg.name) as u32;
        for pid in workers_of(&st, pool) {
            assert_eq!(
                mapped_segments(pid),
                vec![format!("/SYSV{key:08x}")],
                "{pool}"
            );
        }
    }
    if is_root() {
        another_uid_cannot_attach(b);
    }
    // An ordered stop removes both (one given to another user).
    let names = [a.name.clone(), b.name.clone()];
    let mut inst = inst;
    inst.signal(Signal::SIGTERM);
    assert!(inst
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    for name in &names {
        assert!(
            !ipc_core::segment::exists(name),
            "{name} left after the stop"
        );
    }
}

/// Pool `b`'s System V segment is nobody's, its workers run as nobody,
/// and daemon cannot attach it.
fn another_uid_cannot_attach(b: &ipc_core::status::SegmentStatus) {
    assert_eq!((b.owner_uid, b.mode.as_str()), (65534, "0600"), "{b:?}");
    // Another uid (daemon) cannot attach nobody's segment.
    let key = ipc_core::segment::sysv_key(&b.name);
    let attach = format!(
        "import ctypes, os\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         libc.shmat.restype = ctypes.c_void_p\n\
         shmid = libc.shmget({key}, 0, 0)\n\
         assert shmid >= 0, os.strerror(ctypes.get_errno())\n\
         addr = libc.shmat(shmid, None, 0o10000)\n\
         print('attached' if addr not in (None, ctypes.c_void_p(-1).value) else os.strerror(ctypes.get_errno()))\n"
    );
    let out = python_as(1, &attach);
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(said.trim(), "Permission denied", "{out:?}");
}

/// A dispatcher killed with its segments (one given to a pool's user)
/// leaves them to the next, which removes them all.
#[test]
fn a_killed_dispatchers_segments_are_all_removed_by_the_next() {
    let (_dir, args) = with_pools(&two_pools(), 8, 65536, &[]);
    let inst = Instance::supervised("ct-killed", &[], &strs(&args));
    let mut c = inst.client();
    assert_eq!(c.call("cat", &[], b"before").unwrap(), b"before");
    let st = inst.status();
    let old: Vec<String> = st
        .pools
        .iter()
        .map(|p| p.segment.as_ref().unwrap().path.clone())
        .collect();
    assert_eq!(old.len(), 2);
    let st = kill_dispatcher(&inst, st.dispatcher_pid);
    for path in &old {
        assert!(
            !Path::new(path).exists(),
            "{path} left by the dead dispatcher"
        );
    }
    assert_eq!(st.pools.len(), 2);
    assert!(
        inst.log()
            .matches("removed the segment of a dead predecessor")
            .count()
            >= 2,
        "{}",
        inst.log()
    );
    let mut c = inst.client();
    assert_eq!(c.call("cat", &[], b"after").unwrap(), b"after");
}

/// Root only: a worker of another user gets a session of its own (no
/// controlling terminal, so no `TIOCSTI` into the dispatcher's), no new
/// privileges, no descriptor the dispatcher inherited, and an environment
/// of its own: none of the dispatcher's variables, its user's HOME and USER.
#[test]
fn a_worker_of_another_user_gets_its_own_session_and_environment_and_no_inherited_fd() {
    if !root_or_skip() {
        return;
    }
    let (_dir, args) = with_pools(
        "[pools.builtin]\nworkers = 1\n\n\
         [pools.other]\nexec = [\"cat\"]\nops = [\"cat\"]\nworkers = 1\nuser = \"nobody\"\nenv = { MINE = \"given\" }\n",
        8,
        65536,
        &[],
    );
    // The dispatcher inherits fd 7 (not close-on-exec) and a secret variable.
    let wrapper = [
        "env",
        "OSPS_TEST_SECRET=hunter2",
        "sh",
        "-c",
        "exec 7</etc/passwd; exec \"$@\"",
        "sh",
    ];
    let inst = Instance::start_under("ct-session", &wrapper, &strs(&args));
    let mut c = inst.client();
    assert_eq!(c.call("cat", &[], b"served").unwrap(), b"served");
    let st = inst.status();
    let (root, other) = (workers_of(&st, "builtin")[0], workers_of(&st, "other")[0]);
    // Which of a process's descriptors are /etc/passwd (the inherited one).
    let passwd = |pid: u32| -> Vec<String> {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .filter_map(|e| {
                let e = e.ok()?;
                let target = std::fs::read_link(e.path()).ok()?;
                (target == Path::new("/etc/passwd"))
                    .then(|| e.file_name().to_string_lossy().into_owned())
            })
            .collect()
    };
    assert_eq!(
        passwd(inst.pid()),
        ["7"],
        "the set-up: the dispatcher inherits fd 7"
    );
    assert_eq!(
        passwd(root),
        ["7"],
        "the set-up: so does a worker of its own user"
    );
    assert!(
        passwd(other).is_empty(),
        "the nobody worker inherits no descriptor"
    );
    let stat = |pid: u32| {
        let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let after = s[s.rfind(')').unwrap() + 2..].to_owned();
        let f: Vec<i64> = after
            .split(' ')
            .skip(2)
            .take(4)
            .map(|x| x.parse().unwrap())
            .collect();
        (f[0], f[1], f[2]) // pgrp, session, tty_nr
    };
    let (pgrp, session, tty) = stat(other);
    assert_eq!(
        (pgrp, session, tty),
        (other as i64, other as i64, 0),
        "its own session, no tty"
    );
    assert_ne!(stat(inst.pid()).1, session);
    let status = std::fs::read_to_string(format!("/proc/{other}/status")).unwrap();
    assert!(status.contains("NoNewPrivs:\t1"), "{status}");
    let environ = std::fs::read(format!("/proc/{other}/environ")).unwrap();
    let vars: Vec<String> = environ
        .split(|&b| b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    for want in ["USER=nobody", "HOME=/nonexistent", "MINE=given"] {
        assert!(vars.iter().any(|v| v == want), "{want} not in {vars:?}");
    }
    assert!(
        !vars.iter().any(|v| v.starts_with("OSPS_TEST_SECRET")),
        "{vars:?}"
    );
    assert!(!vars.iter().any(|v| v.contains("/root")), "{vars:?}");
    // The root pool's worker, for contrast, has the dispatcher's environment.
    let root_env = std::fs::read(format!("/proc/{root}/environ")).unwrap();
    assert!(String::from_utf8_lossy(&root_env).contains("OSPS_TEST_SECRET=hunter2"));
}

/// Root only, System V: the pool's user (owner of its segment) gives it to
/// root; the next dispatcher, after a crash, still removes it (it goes by
/// the creator, which only the kernel sets).
#[test]
fn a_system_v_segment_whose_owner_changed_it_is_still_removed_after_a_crash() {
    if !root_or_skip() {
        return;
    }
    let (_dir, args) = with_pools(&two_pools(), 8, 65536, &["--segment", "sysv"]);
    let inst = Instance::supervised("ct-svowner", &[], &strs(&args));
    let st = inst.status();
    let name = pool_segment(&st, "second").name.clone();
    let key = ipc_core::segment::sysv_key(&name);
    // As nobody, its owner: IPC_STAT, uid := 0, IPC_SET (shmid_ds's
    // ipc_perm.uid is at offset 4).
    let give_to_root = format!(
        "import ctypes, struct\n\
         libc = ctypes.CDLL(None, use_errno=True)\n\
         shmid = libc.shmget({key}, 0, 0)\n\
         buf = ctypes.create_string_buffer(256)\n\
         assert libc.shmctl(shmid, 2, buf) == 0\n\
         struct.pack_into('<I', buf, 4, 0)\n\
         assert libc.shmctl(shmid, 1, buf) == 0, ctypes.get_errno()\n\
         print(shmid)\n"
    );
    let out = python_as(65534, &give_to_root);
    assert!(out.status.success(), "{out:?}");
    let ipcs = || {
        String::from_utf8(
            std::process::Command::new("ipcs")
                .args(["-m"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap()
    };
    let hex = format!("0x{:08x}", key as u32);
    assert!(
        ipcs()
            .lines()
            .any(|l| l.starts_with(&hex) && l.contains(" root ")),
        "{}",
        ipcs()
    );
    kill_dispatcher(&inst, st.dispatcher_pid);
    assert!(
        !ipc_core::segment::exists(&name),
        "{name} left:\n{}",
        ipcs()
    );
}

/// A pool may have a System V segment of its own (`segment = "sysv"`, the
/// choice for untrusted code: its size cannot change) beside POSIX ones.
#[test]
fn a_pool_may_have_a_system_v_segment_beside_posix_ones() {
    let pools = format!("{}segment = \"sysv\"\n", two_pools());
    let (_dir, args) = with_pools(&pools, 8, 65536, &[]);
    let mut inst = Instance::start("ct-mixed", &strs(&args));
    let mut c = inst.client();
    let data = osps_testkit::noise(5000);
    assert_eq!(c.call("cat", &[], &data).unwrap(), data);
    assert_eq!(c.call("sha256", &[], &data).unwrap(), sha256_line(&data));
    let st = inst.status();
    let (a, b) = (pool_segment(&st, "builtin"), pool_segment(&st, "second"));
    assert_eq!((a.backend.as_str(), b.backend.as_str()), ("posix", "sysv"));
    assert!(b.name.starts_with(ipc_core::segment::SYSV_PREFIX), "{b:?}");
    let names = [a.name.clone(), b.name.clone()];
    drop(c);
    inst.signal(Signal::SIGTERM);
    assert!(inst
        .wait_exit(Duration::from_secs(10))
        .is_some_and(|s| s.success()));
    for name in &names {
        assert!(
            !ipc_core::segment::exists(name),
            "{name} left after the stop"
        );
    }
}
