//! The runtime directories: OSPS never changes the mode or owner of a
//! directory it did not create, refuses an unsafe base directory clearly,
//! and the `--allow-uid` recipe (a group-shared base directory) works across
//! restarts. Also the peer-credential check that admits the allowed uid.

mod nobody;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};

use nobody::{copy_bin, ping_as_nobody, root_or_skip, Proc, NOBODY};
use osps_testkit::{wait_for, Instance, PATIENCE};

const ARGS: &[&str] = osps_testkit::args!(1, 8, 65536);

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// Starts a dispatcher on `base` and expects it to refuse: its exit code
/// and stderr.
fn refused_start(base: &Path) -> (Option<i32>, String) {
    let err = base.join("..").join(format!(
        "{}.err",
        base.file_name().unwrap().to_str().unwrap()
    ));
    let mut child = Proc(Some(
        Command::new(osps_testkit::bin("osps-dispatcher"))
            .args(["--instance", "refused", "--runtime-dir"])
            .arg(base)
            .args(ARGS)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    ));
    let status = wait_for(PATIENCE, || child.0.as_mut()?.try_wait().ok().flatten())
        .expect("the dispatcher refuses and exits");
    child.0 = None;
    let text = std::fs::read_to_string(&err).unwrap_or_default();
    let _ = std::fs::remove_file(&err);
    (status.code(), text)
}

#[test]
fn an_unsafe_or_foreign_base_directory_is_refused_and_left_as_it_is() {
    for unsafe_mode in [0o777, 0o770, 0o703] {
        let dir = tempfile::Builder::new()
            .prefix("osps-unsafe-")
            .tempdir()
            .unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(unsafe_mode)).unwrap();
        let (code, err) = refused_start(dir.path());
        assert_eq!(code, Some(1), "{unsafe_mode:o}: {err}");
        assert!(
            err.contains("writable by other users without the sticky bit")
                && err.contains(&dir.path().display().to_string()),
            "{unsafe_mode:o}: {err}"
        );
        assert_eq!(mode(dir.path()), unsafe_mode, "the mode is left as it was");
        assert!(
            !dir.path().join("refused").exists(),
            "nothing made inside it"
        );
    }
    if nix::unistd::getuid().is_root() {
        let dir = tempfile::Builder::new()
            .prefix("osps-foreign-")
            .tempdir()
            .unwrap();
        std::os::unix::fs::chown(dir.path(), Some(NOBODY), Some(NOBODY)).unwrap();
        let before = mode(dir.path());
        let (code, err) = refused_start(dir.path());
        assert_eq!(code, Some(1), "{err}");
        assert!(err.contains(&format!("owned by uid {NOBODY}")), "{err}");
        let m = std::fs::metadata(dir.path()).unwrap();
        assert_eq!(
            (m.uid(), m.mode() & 0o7777),
            (NOBODY, before),
            "left as it was"
        );
    }
}

#[test]
fn a_shared_sticky_or_home_like_base_directory_is_used_as_it_is() {
    for base_mode in [0o1777, 0o755, 0o711] {
        let inst = Instance::start_with(&format!("base{base_mode:o}"), ARGS, |paths| {
            let base = paths.dir().parent().unwrap();
            std::fs::set_permissions(base, std::fs::Permissions::from_mode(base_mode)).unwrap();
        });
        assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
        assert_eq!(
            mode(inst.runtime_dir()),
            base_mode,
            "the base is not chmodded"
        );
        assert_eq!(
            mode(inst.paths.dir()),
            0o700 | (base_mode & 0o050),
            "the instance directory: 0700 and the base's group read/search bits"
        );
        assert_eq!(mode(&inst.paths.socket()), 0o600);
    }
}

#[test]
fn the_allow_uid_recipe_survives_restarts() {
    if !root_or_skip("connecting as nobody") {
        return;
    }
    osps_testkit::become_subreaper();
    // The recipe: a base directory shared with the allowed user's group
    // (RuntimeDirectoryMode=0750 and a shared group), and --allow-uid.
    let base = tempfile::Builder::new()
        .prefix("osps-recipe-")
        .tempdir()
        .unwrap();
    std::os::unix::fs::chown(base.path(), Some(0), Some(NOBODY)).unwrap();
    std::fs::set_permissions(base.path(), std::fs::Permissions::from_mode(0o750)).unwrap();
    let client = copy_bin("osps-client", base.path());
    let instance = osps_testkit::unique_instance("recipe");
    let paths = ipc_core::RuntimePaths::new(&instance, Some(base.path())).unwrap();
    let log = base.path().join("log");
    let start = || {
        Proc(Some(
            Command::new(osps_testkit::bin("osps-dispatcher"))
                .arg("--instance")
                .arg(&instance)
                .arg("--runtime-dir")
                .arg(base.path())
                .args(ARGS)
                .args(["--allow-uid", &NOBODY.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log).unwrap())
                .spawn()
                .unwrap(),
        ))
    };
    let _leftovers = nobody::Leftovers {
        dir: paths.dir().to_path_buf(),
        prefix: format!("osps-0-{instance}-"),
    };
    for round in 0..3 {
        let mut d = start();
        let mut last = (None, String::new());
        let served = wait_for(PATIENCE, || {
            last = ping_as_nobody(&client, &paths.socket());
            (last.0 == Some(0)).then_some(())
        });
        assert!(
            served.is_some(),
            "round {round}: nobody cannot ping: {last:?}; dirs {:o} {:o}; log:\n{}",
            mode(base.path()),
            std::fs::metadata(paths.dir()).map_or(0, |m| m.mode()),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        assert_eq!(
            mode(base.path()),
            0o750,
            "the shared base is left as it was"
        );
        assert_eq!(d.stop(), Some(0));
    }
}

fn open_to_everyone(inst: &Instance) {
    // So that the kernel lets `nobody` reach the socket: what refuses it then is the peer-credential check.
    let socket = inst.paths.socket();
    for (p, m) in [
        (inst.runtime_dir(), 0o755),
        (inst.paths.dir(), 0o755),
        (socket.as_path(), 0o666),
    ] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
    }
}

#[test]
fn an_unprivileged_uid_is_refused_by_its_peer_credentials() {
    if !root_or_skip("connecting as another uid") {
        return;
    }
    let tools = tempfile::Builder::new()
        .prefix("osps-tools-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(tools.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let client = copy_bin("osps-client", tools.path());
    let inst = Instance::start("peercred", ARGS);
    open_to_everyone(&inst);
    let (code, err) = ping_as_nobody(&client, &inst.paths.socket());
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("denied") && err.contains("uid 65534") && err.contains("--allow-uid"),
        "{err}"
    );
    assert_eq!(
        inst.client().call("ping", &[], &[]).unwrap(),
        b"pong\n",
        "our own uid is served"
    );

    let mut allowed = ARGS.to_vec();
    allowed.extend(["--allow-uid", "65534"]);
    let inst = Instance::start("peercredok", &allowed);
    open_to_everyone(&inst);
    let (code, err) = ping_as_nobody(&client, &inst.paths.socket());
    assert_eq!(code, Some(0), "admitted with --allow-uid: {err}");
}

/// An instance directory that existed before OSPS started (mode 0750, a
/// group other than the base's, under a group-shared base) keeps its mode
/// and group and is not removed at stop, by a dispatcher or by a watchdog;
/// one the dispatcher created is removed at its ordered stop.
#[test]
fn an_existing_instance_directory_keeps_its_mode_and_group_and_outlives_the_stop() {
    let root = nix::unistd::getuid().is_root();
    if !root {
        eprintln!("not root: the group part is skipped (only root can give the directory another group); mode and removal are checked");
    }
    for supervised in [false, true] {
        let mut expected = None;
        let setup = |paths: &ipc_core::RuntimePaths| {
            let base = paths.dir().parent().unwrap();
            // A shared base: a directory OSPS makes would get its group and bits.
            std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o750)).unwrap();
            std::fs::create_dir(paths.dir()).unwrap();
            std::fs::set_permissions(paths.dir(), std::fs::Permissions::from_mode(0o750)).unwrap();
            if root {
                std::os::unix::fs::chown(paths.dir(), None, Some(NOBODY)).unwrap();
            }
            let m = std::fs::metadata(paths.dir()).unwrap();
            assert!(
                !root || m.gid() != std::fs::metadata(base).unwrap().gid(),
                "the test needs another group than the base's"
            );
            expected = Some((m.mode() & 0o7777, m.gid()));
        };
        let mut inst = if supervised {
            Instance::supervised_with("olddirwd", &["--heartbeat-ms", "100"], ARGS, setup)
        } else {
            Instance::start_with("olddir", ARGS, setup)
        };
        assert_eq!(inst.client().call("ping", &[], &[]).unwrap(), b"pong\n");
        inst.signal(nix::sys::signal::Signal::SIGTERM);
        let status = inst.wait_exit(PATIENCE).expect("ordered stop");
        assert!(status.success(), "{status}; log:\n{}", inst.log());
        let m = std::fs::metadata(inst.paths.dir()).unwrap_or_else(|e| {
            panic!(
                "supervised {supervised}: the directory OSPS did not create was removed: {e}; log:\n{}",
                inst.log()
            )
        });
        assert_eq!(
            Some((m.mode() & 0o7777, m.gid())),
            expected,
            "supervised {supervised}: mode and group left as they were"
        );
    }
    // One the dispatcher made itself is its to remove.
    let mut inst = Instance::start("madedir", ARGS);
    assert!(inst.paths.dir().is_dir());
    inst.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(inst.wait_exit(PATIENCE).expect("ordered stop").success());
    assert!(
        !inst.paths.dir().exists(),
        "the directory it made is removed"
    );
}
