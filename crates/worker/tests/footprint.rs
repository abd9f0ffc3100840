//! A worker does not keep the whole segment mapped: the kernel tears down a
//! killed process's page tables before its pipes close, so what a worker
//! keeps mapped delays the dispatcher's noticing its death. After many
//! large jobs over most of the segment, the worker's mapping of it holds
//! about its budget (16 MiB), not what the jobs touched.

mod common;

use common::Bench;
use ipc_core::proto::Outcome;

/// Resident KiB of process `pid`'s mapping of the POSIX segment `name`
/// (its `/proc/PID/smaps` entry: the pages it has page-table entries for).
fn segment_rss_kib(pid: u32, name: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let path = ipc_core::segment::fs_path(name);
    let mut ours = false;
    for line in smaps.lines() {
        let range = line
            .split_whitespace()
            .next()
            .and_then(|r| r.split_once('-'));
        let hex = |s: &str| u64::from_str_radix(s, 16).is_ok();
        if range.is_some_and(|(a, b)| hex(a) && hex(b)) {
            ours = line.ends_with(&path);
        } else if ours && line.starts_with("Rss:") {
            return line.split_whitespace().nth(1).unwrap().parse().unwrap();
        }
    }
    panic!("{path} is not mapped by {pid}:\n{smaps}");
}

#[test]
fn a_worker_keeps_about_its_budget_of_the_segment_mapped_after_many_large_jobs() {
    const JOB: u64 = 2 << 20;
    let (mut b, _) = Bench::start("footprint", 96, &osps_testkit::bin("osps-worker"), &[]);
    let input = vec![7u8; JOB as usize];
    // 40 jobs of 2 MiB, each in its own slot (with room for the result):
    // 80 MiB of the arena touched.
    for j in 0..40 {
        let slot = b.seg.check(j * (JOB + 4096), JOB + 4096).unwrap();
        b.job(j + 1, "sha256", &[], slot, &input);
        let d = b.done();
        assert_eq!((d.job_id, &d.outcome), (j + 1, &Outcome::Ok));
    }
    // A last small job: the worker settled the previous one before it.
    let (d, out) = b.run(41, "echo", &[], b"x");
    assert_eq!((&d.outcome, &out[..]), (&Outcome::Ok, &b"x"[..]));
    let name = b.seg.name().to_owned();
    let kib = segment_rss_kib(b.w.0.id(), &name);
    // The budget and a job past it; far below the 80 MiB the jobs touched
    // (and the 96 MiB of a worker that maps the whole segment).
    assert!(
        kib <= 24 << 10,
        "the worker keeps {kib} KiB of the segment mapped"
    );
    assert_eq!(b.stop(), Some(0));
}
