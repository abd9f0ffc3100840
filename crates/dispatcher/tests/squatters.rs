//! Another uid that makes objects first under every segment name it can
//! guess (the old fixed name `osps-<uid>-<inst>-<hash>` and its System V key,
//! and many names of the current form) never stops a start, and is never
//! opened, mapped or removed: names carry a fresh random part, segments are
//! created exclusively, and what must survive a crash lives in the state
//! file. Both directions: a root dispatcher with `nobody` squatting, and a
//! dispatcher run as `nobody` with root squatting. Both backends.

mod nobody;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use ipc_core::segment::{self, SYSV_PREFIX};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use nobody::{as_nobody, copy_bin, ping_as_nobody, root_or_skip, Proc, NOBODY};
use osps_testkit::{wait_for, Instance, PATIENCE};

const ARGS: &[&str] = osps_testkit::args!(2, 8, 65536);

/// Environment variable telling the [`squatter`] helper what to make.
const SQUAT_ENV: &str = "OSPS_TEST_SQUAT";

/// The helper the squatting uid runs (this test program, re-executed under
/// `setpriv`): makes each name in `$OSPS_TEST_SQUAT` (one a line). Names
/// starting with `junk:` become plain files in `/dev/shm`; the others real
/// OSPS segments (either backend) of generation `u64::MAX`, left behind.
#[test]
#[ignore = "run by the squatter tests as another uid"]
fn squatter() {
    let Ok(names) = std::env::var(SQUAT_ENV) else {
        return;
    };
    make_squats(&names);
}

fn make_squats(names: &str) {
    for name in names.lines() {
        if let Some(junk) = name.strip_prefix("junk:") {
            std::fs::write(segment::fs_path(junk), b"a squatter's file\n").unwrap();
        } else {
            let mut seg = ipc_core::Segment::create(name, 4096, u64::MAX)
                .unwrap_or_else(|e| panic!("squat {name}: {e}"));
            seg.disown();
        }
    }
}

/// FNV-1a of the runtime directory, as the old fixed segment names used it.
fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    }) as u32
}

/// What a squatter made, with how it looked, so the test can tell it was
/// left untouched; removed on drop.
struct Squats {
    /// POSIX objects: path, inode, owner, size, contents.
    files: Vec<(PathBuf, u64, u32, u64, Vec<u8>)>,
    /// System V keys, with the owner.
    keys: Vec<(i32, u32)>,
    names: Vec<String>,
}

impl Squats {
    /// Every name the old scheme would use for `uid`'s `instance` under the
    /// base `dir`, plus `guesses` names of the current form, plus System V
    /// segments for the old name and a few guesses.
    fn names(uid: u32, instance: &str, base: &Path, guesses: usize) -> Vec<String> {
        let dir = std::path::absolute(base).unwrap().join(instance);
        let old = format!(
            "/osps-{uid}-{instance}-{:08x}",
            fnv1a(dir.as_os_str().as_encoded_bytes())
        );
        let mut names = vec![old.clone(), format!("{SYSV_PREFIX}{old}")];
        for i in 0..guesses {
            let guess = format!("{old}-{:016x}", 0x5eed_0000_0000_0000u64 + i as u64 * 7919);
            if i < 4 {
                names.push(format!("{SYSV_PREFIX}{guess}"));
            }
            names.push(format!("junk:{guess}"));
        }
        names
    }

    /// Makes `names` as `nobody` (via `helper`, a copy of this test program)
    /// or, without a helper, as ourselves (root).
    fn make(names: Vec<String>, helper: Option<&Path>) -> Squats {
        let list = names.join("\n");
        match helper {
            Some(exe) => {
                let out = as_nobody(exe)
                    .args(["--ignored", "--exact", "squatter", "--test-threads", "1"])
                    .env(SQUAT_ENV, &list)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .output()
                    .unwrap();
                assert!(
                    out.status.success(),
                    "squatter: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            None => make_squats(&list),
        }
        let mut squats = Squats {
            files: Vec::new(),
            keys: Vec::new(),
            names: names.clone(),
        };
        for name in &names {
            if name.starts_with(SYSV_PREFIX) {
                let info = sysv_owner(segment::sysv_key(name)).expect("squatted key listed");
                squats.keys.push((segment::sysv_key(name), info));
            } else {
                let path = PathBuf::from(segment::fs_path(name.trim_start_matches("junk:")));
                let m = std::fs::symlink_metadata(&path).unwrap();
                let bytes = std::fs::read(&path).unwrap();
                squats.files.push((path, m.ino(), m.uid(), m.len(), bytes));
            }
        }
        squats
    }

    /// Each object is still there, as it was.
    fn assert_untouched(&self) {
        for (path, ino, uid, len, bytes) in &self.files {
            let m = std::fs::symlink_metadata(path)
                .unwrap_or_else(|e| panic!("squatter's {} gone: {e}", path.display()));
            assert_eq!(
                (m.ino(), m.uid(), m.len()),
                (*ino, *uid, *len),
                "{}",
                path.display()
            );
            assert_eq!(&std::fs::read(path).unwrap(), bytes, "{}", path.display());
        }
        for (key, uid) in &self.keys {
            assert_eq!(sysv_owner(*key), Some(*uid), "squatter's key {key:#x}");
        }
    }

    /// No process among `pids` maps any of these objects.
    fn assert_not_mapped_by(&self, pids: &[u32]) {
        for pid in pids {
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
            // The mapped object of each line: the sixth column on (a path,
            // `/SYSV<key> (deleted)` for System V).
            let objects: Vec<&str> = maps
                .lines()
                .filter_map(|l| {
                    let o = l.splitn(6, char::is_whitespace).nth(5)?.trim();
                    Some(o.strip_suffix(" (deleted)").unwrap_or(o))
                })
                .collect();
            for (path, ..) in &self.files {
                assert!(
                    !objects.contains(&path.to_str().unwrap()),
                    "pid {pid} maps the squatter's {}",
                    path.display()
                );
            }
            for (key, _) in &self.keys {
                let tag = format!("/SYSV{key:08x}");
                assert!(
                    !objects.contains(&tag.as_str()),
                    "pid {pid} maps the squatter's {tag}"
                );
            }
        }
    }
}

impl Drop for Squats {
    fn drop(&mut self) {
        for name in &self.names {
            segment::unlink(name.trim_start_matches("junk:"));
        }
    }
}

/// The owner (creator uid) of the System V segment with this key, if any.
fn sysv_owner(key: i32) -> Option<u32> {
    let table = std::fs::read_to_string("/proc/sysvipc/shm").ok()?;
    table.lines().skip(1).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        // key shmid perms size cpid lpid nattch uid gid cuid ...
        (cols.first()?.parse::<i32>().ok()? == key).then(|| cols.get(9)?.parse().ok())?
    })
}

/// A directory `nobody` can read and run programs from.
fn tools_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("osps-tools-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn a_root_instance_starts_and_restarts_past_nobodys_squats(backend: &str) {
    if !root_or_skip("squatting as nobody") {
        return;
    }
    let tools = tools_dir();
    let helper = tools.path().join("squatter");
    osps_testkit::install_exe(&std::env::current_exe().unwrap(), &helper);
    let mut args = ARGS.to_vec();
    args.extend(["--segment", backend]);
    let mut squats = None;
    let inst = Instance::supervised_with(
        &format!("squat{backend}"),
        &["--heartbeat-ms", "100"],
        &args,
        |paths| {
            let base = paths.dir().parent().unwrap();
            let names = Squats::names(0, paths.instance(), base, 64);
            squats = Some(Squats::make(names, Some(&helper)));
        },
    );
    let squats = squats.unwrap();
    for round in 1..=2u64 {
        let s = inst.status();
        assert_eq!(
            s.segment.generation, round,
            "generation from the state file, not the squatter's"
        );
        assert!(
            !squats
                .names
                .iter()
                .any(|n| s.segment.name.ends_with(n.trim_start_matches("junk:"))),
            "{} is a squatted name",
            s.segment.name
        );
        assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
        squats.assert_untouched();
        let mut pids = inst.worker_pids();
        pids.push(s.dispatcher_pid);
        squats.assert_not_mapped_by(&pids);
        if round == 1 {
            // A crash and a restart: the new start must get past them too.
            kill(Pid::from_raw(s.dispatcher_pid as i32), Signal::SIGKILL).unwrap();
            inst.wait_status("restarted", |n| {
                n.dispatcher_pid != s.dispatcher_pid && n.workers.iter().all(|w| w.state == "idle")
            });
        }
    }
    assert!(
        inst.log()
            .contains("removed the segment of a dead predecessor"),
        "{}",
        inst.log()
    );
    squats.assert_untouched();
}

#[test]
fn a_root_instance_starts_and_restarts_past_nobodys_squats_posix() {
    a_root_instance_starts_and_restarts_past_nobodys_squats("posix");
}

#[test]
fn a_root_instance_starts_and_restarts_past_nobodys_squats_sysv() {
    a_root_instance_starts_and_restarts_past_nobodys_squats("sysv");
}

#[test]
fn an_unprivileged_instance_starts_and_restarts_past_roots_squats() {
    if !root_or_skip("running the dispatcher as nobody") {
        return;
    }
    osps_testkit::become_subreaper();
    for backend in ["posix", "sysv"] {
        let base = tools_dir();
        for bin in ["osps-dispatcher", "osps-worker", "osps-client"] {
            copy_bin(bin, base.path());
        }
        let runtime = base.path().join("run");
        std::fs::create_dir(&runtime).unwrap();
        std::os::unix::fs::chown(&runtime, Some(NOBODY), Some(NOBODY)).unwrap();
        let instance = osps_testkit::unique_instance(&format!("nobody{backend}"));
        let squats = Squats::make(Squats::names(NOBODY, &instance, &runtime, 64), None);
        let socket = runtime.join(&instance).join(format!("{instance}.sock"));
        let _leftovers = nobody::Leftovers {
            dir: runtime.join(&instance),
            prefix: format!("osps-{NOBODY}-{instance}-"),
        };
        let start = || {
            let child = as_nobody(&base.path().join("osps-dispatcher"))
                .arg("--instance")
                .arg(&instance)
                .arg("--runtime-dir")
                .arg(&runtime)
                .args(ARGS)
                .args(["--segment", backend])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(base.path().join(format!("log-{backend}"))).unwrap())
                .spawn()
                .unwrap();
            Proc(Some(child))
        };
        let log = || {
            std::fs::read_to_string(base.path().join(format!("log-{backend}"))).unwrap_or_default()
        };
        let client = base.path().join("osps-client");
        for round in 0..2 {
            let mut d = start();
            let served = wait_for(PATIENCE, || {
                (ping_as_nobody(&client, &socket).0 == Some(0)).then_some(())
            });
            assert!(
                served.is_some(),
                "{backend} round {round}: the nobody instance never served; log:\n{}",
                log()
            );
            squats.assert_untouched();
            squats.assert_not_mapped_by(&[d.pid()]);
            assert_eq!(
                d.stop(),
                Some(0),
                "{backend}: ordered stop; log:\n{}",
                log()
            );
        }
        squats.assert_untouched();
        let left: Vec<_> = std::fs::read_dir("/dev/shm")
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(&format!("osps-{NOBODY}-{instance}-")))
            .filter(|n| {
                !squats
                    .files
                    .iter()
                    .any(|f| f.0 == Path::new("/dev/shm").join(n))
            })
            .collect();
        assert_eq!(
            left,
            Vec::<String>::new(),
            "the nobody instance left segments"
        );
    }
}

/// Segments made here under names the test knows to be ours; removed on drop.
struct Ours(Vec<String>);

impl Drop for Ours {
    fn drop(&mut self) {
        for name in &self.0 {
            segment::unlink(name);
        }
    }
}

/// A crash of a version before the state file left its segment under the
/// old fixed name (`/osps-<uid>-<inst>-<hash>`, or its System V key): the
/// next start removes it (ours), and leaves alone the same name held by
/// another uid (never opened).
#[test]
fn a_start_removes_our_segment_under_the_old_fixed_name_and_leaves_anothers() {
    let root = nix::unistd::getuid().is_root();
    if !root {
        eprintln!("not root: nobody's old-name segment is not made; only ours is checked");
    }
    let tools = tools_dir();
    let helper = tools.path().join("squatter");
    osps_testkit::install_exe(&std::env::current_exe().unwrap(), &helper);
    let uid = nix::unistd::getuid().as_raw();
    // Ours in one backend, nobody's in the other, then the other way round.
    for ours_sysv in [false, true] {
        let mut ours = None;
        let mut theirs = None;
        let inst = Instance::start_with(&format!("oldname{ours_sysv}"), ARGS, |paths| {
            let base = paths.dir().parent().unwrap();
            let names = Squats::names(uid, paths.instance(), base, 0);
            let (old_posix, old_sysv) = (names[0].clone(), names[1].clone());
            assert_eq!(old_posix, paths.legacy_segment_name());
            let (mine, other) = if ours_sysv {
                (old_sysv, old_posix)
            } else {
                (old_posix, old_sysv)
            };
            make_squats(&mine);
            assert!(segment::exists(&mine));
            ours = Some(Ours(vec![mine]));
            if root {
                theirs = Some(Squats::make(vec![other], Some(&helper)));
            }
        });
        let ours = ours.unwrap();
        assert!(
            !segment::exists(&ours.0[0]),
            "our segment under the old name {} is left; log:\n{}",
            ours.0[0],
            inst.log()
        );
        assert!(
            inst.log().contains(&format!(
                "removed the segment of a dead predecessor name={}",
                ours.0[0]
            )),
            "{}",
            inst.log()
        );
        if let Some(theirs) = &theirs {
            theirs.assert_untouched();
            let mut pids = inst.worker_pids();
            pids.push(inst.dispatcher_pid());
            theirs.assert_not_mapped_by(&pids);
        }
        assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
    }
}
