//! The report answered to `status`: a function over the dispatcher's parts.

use ipc_core::proto::PROTOCOL_VERSION;
use ipc_core::status::{SegmentStatus, StatusReport};

use crate::shared::Shared;

/// What `status` answers now.
pub fn report(shared: &Shared) -> StatusReport {
    let config = &shared.config;
    StatusReport {
        instance: shared.paths.instance().to_owned(),
        protocol_version: PROTOCOL_VERSION,
        dispatcher_pid: std::process::id(),
        uptime_ms: shared.started.elapsed().as_millis() as u64,
        socket: shared.paths.socket().display().to_string(),
        tcp: shared.tcp_addr.get().cloned(),
        segment: segment(shared),
        workers: shared.workers.report(),
        jobs_done: shared.stats.jobs_done(),
        jobs_failed: shared.stats.jobs_failed(),
        queue_depth: shared.queue.len(),
        in_flight: shared.in_flight(),
        connections: shared.admission.connections(),
        shutting_down: shared.life.draining(),
        watchdog: config.watchdog.clone().map(|mut w| {
            w.uptime_ms = config
                .watchdog_started_unix_ms
                .map_or(0, |t| ipc_core::status::unix_ms().saturating_sub(t));
            w
        }),
        jobs_sent_ahead: shared.stats.jobs_sent_ahead(),
        latency: shared.stats.latency(),
    }
}

fn segment(shared: &Shared) -> SegmentStatus {
    let seg = &shared.segment;
    let (slots_in_use, slot_bytes_in_use) = shared.slot_usage();
    let attached_here = 1 + shared.workers.running();
    let (backend, path, see, mode, owner_uid, attached) = match seg.sysv_info() {
        Some(i) => (
            "sysv",
            String::new(),
            format!("ipcs -m -i {} (key 0x{:08x})", i.id, i.key),
            format!("{:04o}", i.mode),
            i.uid,
            i.nattch as usize,
        ),
        None => {
            use std::os::unix::fs::MetadataExt;
            let path = ipc_core::segment::fs_path(seg.name());
            let meta = std::fs::metadata(&path).ok();
            let mode = meta
                .as_ref()
                .map_or("?".into(), |m| format!("{:04o}", m.mode() & 0o7777));
            let uid = meta.as_ref().map_or(u32::MAX, |m| m.uid());
            let see = format!("ls -l {path}");
            ("posix", path, see, mode, uid, attached_here)
        }
    };
    SegmentStatus {
        backend: backend.into(),
        name: seg.name().to_owned(),
        path,
        see,
        size: seg.len() as u64,
        generation: seg
            .header()
            .generation
            .load(std::sync::atomic::Ordering::Relaxed),
        slots_in_use,
        slot_bytes_in_use,
        max_payload: shared.max_payload,
        mode,
        owner_uid,
        attached,
    }
}
