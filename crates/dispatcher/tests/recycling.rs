//! Recycling by job count (`recycle_after_jobs`): a worker that has run N
//! jobs is replaced between jobs by one started and ready first, so no job
//! fails; recycles are counted apart from restarts, and every retired
//! worker is reaped (no process, no zombie left).

use std::collections::BTreeSet;

use osps_testkit::{assert_group_gone, bin, config_file, zombies_of, Instance};

/// Runs `jobs` jobs over `clients` connections at once, each a `sleep` of
/// 2 ms then an `upper`; each answer is checked.
/// A dispatcher serving the configuration file `path` with small sizes,
/// and `extra` flags.
fn start(tag: &str, path: &std::path::Path, extra: &[&str]) -> Instance {
    let mut args = vec![
        "--config",
        path.to_str().unwrap(),
        "--segment-mib",
        "16",
        "--max-payload",
        "65536",
    ];
    args.extend_from_slice(extra);
    Instance::start(tag, &args)
}

fn run_jobs(inst: &Instance, clients: usize, jobs: usize) {
    let threads: Vec<_> = (0..clients)
        .map(|t| {
            let endpoint = inst.endpoint();
            let n = jobs / clients + usize::from(t < jobs % clients);
            std::thread::spawn(move || {
                let mut c = osps_client::Client::connect(&endpoint).unwrap();
                for i in 0..n {
                    if i % 2 == 0 {
                        let slept = c.call("sleep", &["2"], b"").unwrap();
                        assert_eq!(slept, b"slept 2 ms\n");
                        continue;
                    }
                    let payload = format!("job {t} {i}");
                    let got = c.call("upper", &[], payload.as_bytes()).unwrap();
                    assert_eq!(got, payload.to_uppercase().into_bytes());
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("every job answered, and right");
    }
}

/// Pids of pool `pool`'s live workers, once all are up.
fn pids(inst: &Instance, pool: &str, workers: usize) -> BTreeSet<u32> {
    let st = inst.wait_status("the pool's workers up", |st| {
        st.workers
            .iter()
            .filter(|w| w.pool == pool && w.pid != 0 && w.state != "starting")
            .count()
            == workers
    });
    st.workers
        .iter()
        .filter(|w| w.pool == pool)
        .map(|w| w.pid)
        .collect()
}

/// Every retired worker is gone: not running, not a zombie.
fn assert_retired(inst: &Instance, old: &BTreeSet<u32>) {
    for &pid in old {
        assert_group_gone(pid);
    }
    assert!(
        zombies_of(&[inst.dispatcher_pid()]).is_empty(),
        "zombies of the dispatcher: {:?}",
        zombies_of(&[inst.dispatcher_pid()])
    );
}

#[test]
fn a_builtin_pool_recycling_after_100_jobs_has_new_workers_after_250_and_no_job_failed() {
    let (_dir, path) = config_file("[pools.builtin]\nworkers = 2\nrecycle_after_jobs = 100\n");
    let inst = start("recycle-builtin", &path, &[]);
    let before = pids(&inst, "builtin", 2);
    // Two clients, one job each at a time, and jobs of a few ms: each job
    // finds an idle worker, so the two share the 250 about evenly, and
    // each passes 100.
    run_jobs(&inst, 2, 250);
    // A replacement started at the 100th job may become ready after the
    // last: the swap follows at once, the worker being idle.
    inst.wait_status("two recycles", |st| st.pools[0].recycled >= 2);
    let after = pids(&inst, "builtin", 2);
    assert!(
        before.is_disjoint(&after),
        "new workers expected: before {before:?}, after {after:?}"
    );
    let st = inst.status();
    let pool = &st.pools[0];
    assert_eq!(pool.name, "builtin");
    assert!(pool.recycled >= 2, "{pool:?}");
    assert_eq!((pool.restarts, pool.jobs_failed), (0, 0), "{pool:?}");
    assert!(pool.jobs_done >= 250, "{pool:?}");
    assert!(st.workers.iter().all(|w| w.restarts == 0), "{st:?}");
    assert!(
        inst.log().contains("worker recycled after "),
        "{}",
        inst.log()
    );
    assert_retired(&inst, &before);
}

#[test]
fn a_program_pool_takes_the_top_level_flag_and_recycles_between_sequential_jobs() {
    // osps-worker as a program pool of one worker, with no recycle key of
    // its own: the top-level --recycle-after-jobs applies.
    let worker = bin("osps-worker");
    let (_dir, path) = config_file(&format!(
        "[pools.builtin]\nenabled = false\n\n[pools.own]\nprogram = [\"{}\"]\nworkers = 1\n",
        worker.display()
    ));
    let inst = start("recycle-program", &path, &["--recycle-after-jobs", "10"]);
    let first = pids(&inst, "own", 1);
    let mut seen = first.clone();
    let mut c = inst.client();
    for i in 0..40 {
        let payload = format!("job {i}");
        let got = c.call("upper", &[], payload.as_bytes()).unwrap();
        assert_eq!(got, payload.to_uppercase().into_bytes());
        seen.extend(inst.status().workers.iter().map(|w| w.pid));
    }
    let st = inst.wait_status("two recycles", |st| st.pools[0].recycled >= 2);
    let pool = &st.pools[0];
    assert_eq!((pool.restarts, pool.jobs_failed), (0, 0), "{pool:?}");
    seen.extend(st.workers.iter().map(|w| w.pid));
    seen.remove(&0);
    assert!(seen.len() >= 3, "worker pids seen: {seen:?}");
    let now = pids(&inst, "own", 1);
    let retired: BTreeSet<u32> = seen.difference(&now).copied().collect();
    assert_retired(&inst, &retired);
}
