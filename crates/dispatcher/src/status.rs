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
        workers: shared
            .pools
            .iter()
            .flat_map(|p| p.workers.report(p.name()))
            .collect(),
        jobs_done: shared.stats.jobs_done(),
        jobs_failed: shared.stats.jobs_failed(),
        queue_depth: shared.queued(),
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
        pools: shared
            .pools
            .iter()
            .map(|p| p.status(&config.worker_exe, shared.cgroup_version()))
            .collect(),
        jobs_cancelled: shared.stats.jobs_cancelled(),
        reload: shared.reloads.status(shared),
    }
}

/// The first pool's segment (the builtin pool's when it runs): each
/// pool's own is in its entry of `pools`.
fn segment(shared: &Shared) -> SegmentStatus {
    shared.pools.first().segment_status()
}
