//! Configuration reload (SIGHUP, or the `reload` request): the file is read
//! again and applied rolling, so no job fails and no client notices.
//!
//! A pool whose settled configuration changed in any way (program, command,
//! workers, segment, user, policy) is *replaced*: a new [`Pool`] with a
//! segment of its own is started beside the old one (staged: its workers'
//! `Ready` does not touch the routes), and once its workers are ready the
//! routes switch to the new pools in one step. A replaced or removed pool
//! is then *retired*: it runs what it holds (queued jobs, and those still
//! arriving: their slots live in its segment), and once its last slot is
//! back its workers are stopped politely (after their jobs), reaped, and its
//! segment is unlinked and dropped from the state file. A reload that
//! cannot apply (the file does not parse or validate, a restart-only option
//! changed, a new pool cannot start or serves an operation another serves)
//! changes nothing: the staged pools are stopped and their segments removed.
//!
//! Every pool's drivers stop on a channel of the pool's own
//! ([`start_drivers`]); [`stop_all`] stops them all at shutdown.

use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use ipc_core::paths::RecordedSegment;
use ipc_core::proto::ErrorKind;
use ipc_core::status::ReloadStatus;
use ipc_core::InstanceLock;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admission::PeerKey;
use crate::pools::{Pool, PoolConfig, Routes, SlotCaps};
use crate::shared::Shared;
use crate::Config;

/// How long a reload waits for a new pool's workers: a worker's own ready
/// timeout, and a little more.
const READY_WAIT: Duration =
    Duration::from_millis(crate::driver::READY_TIMEOUT.as_millis() as u64 + 1000);
/// How often a reload looks at its new pools' workers while they start.
const POLL: Duration = Duration::from_millis(10);
/// Delay before a new segment is prefaulted.
const POPULATE_AFTER: Duration = Duration::from_millis(200);

/// Reads the configuration again, as at start: the file, under the same
/// command line (whose flags still override it), checked. `Err` is one
/// line: why it is refused (`FILE:LINE: ...` when a line is to blame).
pub type ReadConfig = dyn Fn() -> Result<Config, String> + Send + Sync;

/// Where a reload reads its configuration (`--config FILE`).
#[derive(Clone)]
pub struct ConfigSource {
    pub file: PathBuf,
    read: Arc<ReadConfig>,
}

impl ConfigSource {
    pub fn new(file: PathBuf, read: Arc<ReadConfig>) -> ConfigSource {
        ConfigSource { file, read }
    }
}

impl std::fmt::Debug for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ConfigSource({})", self.file.display())
    }
}

/// A reload refused: the error kind and the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub kind: ErrorKind,
    pub message: String,
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal {
        kind: ErrorKind::InvalidInput,
        message: message.into(),
    }
}

/// What reloads need (set once the dispatcher runs) and what they did.
#[derive(Debug, Default)]
pub struct Reloads {
    ctx: RefCell<Option<Rc<Context>>>,
    /// One reload at a time; the next one reads the file after it.
    one_at_a_time: tokio::sync::Mutex<()>,
    applied: Cell<u64>,
    refused: Cell<u64>,
    last: RefCell<String>,
}

/// What the dispatcher gives its reloads at start.
#[derive(Debug)]
struct Context {
    /// Held for life: new segments are made under it.
    lock: Rc<InstanceLock>,
    /// The segments named in the state file, shared with the clean-up.
    recorded: Rc<RefCell<Vec<RecordedSegment>>>,
    generation: u64,
    paths: ipc_core::RuntimePaths,
    /// Turns true when the dispatcher stops.
    stop: watch::Receiver<bool>,
    /// Each pool's drivers and their stop.
    runs: RefCell<Vec<PoolRun>>,
    /// The retirements under way.
    retiring: RefCell<Vec<JoinHandle<()>>>,
}

/// One pool's drivers, and the channel that stops them.
#[derive(Debug)]
struct PoolRun {
    index: usize,
    stop: watch::Sender<bool>,
    drivers: Vec<JoinHandle<()>>,
}

impl Reloads {
    /// What `status` shows; `None` before the first reload.
    pub fn status(&self, shared: &Shared) -> Option<ReloadStatus> {
        if self.applied.get() + self.refused.get() == 0 {
            return None;
        }
        let retiring = shared.pools.retiring();
        Some(ReloadStatus {
            applied: self.applied.get(),
            refused: self.refused.get(),
            last: self.last.borrow().clone(),
            retiring_workers: retiring.iter().map(|p| p.workers.running()).sum(),
        })
    }

    fn context(&self) -> Option<Rc<Context>> {
        self.ctx.borrow().clone()
    }
}

/// Starts every pool's drivers and keeps what reloads need: the lock, the
/// state file's segments (shared with the clean-up), the generation, and
/// the dispatcher's stop.
pub fn begin(
    shared: &Rc<Shared>,
    lock: Rc<InstanceLock>,
    recorded: Rc<RefCell<Vec<RecordedSegment>>>,
    generation: u64,
    stop: watch::Receiver<bool>,
) {
    let ctx = Rc::new(Context {
        lock,
        recorded,
        generation,
        paths: shared.paths.clone(),
        stop,
        runs: RefCell::new(Vec::new()),
        retiring: RefCell::new(Vec::new()),
    });
    for pool in &shared.pools {
        start_drivers(shared, &ctx, &pool);
    }
    *shared.reloads.ctx.borrow_mut() = Some(ctx);
}

/// Starts a driver per place of `pool`, stopped by the pool's own channel.
fn start_drivers(shared: &Rc<Shared>, ctx: &Context, pool: &Rc<Pool>) {
    let (tx, rx) = watch::channel(false);
    let drivers = (0..pool.config.workers)
        .map(|i| {
            let run = crate::driver::drive(Rc::clone(shared), Rc::clone(pool), i, rx.clone());
            tokio::task::spawn_local(run)
        })
        .collect();
    ctx.runs.borrow_mut().push(PoolRun {
        index: pool.index,
        stop: tx,
        drivers,
    });
}

/// Stops the drivers of the pool `index` and waits for them (each stops
/// its worker after its jobs, and reaps it).
async fn stop_pool(ctx: &Context, index: usize) {
    let run = {
        let mut runs = ctx.runs.borrow_mut();
        let at = runs.iter().position(|r| r.index == index);
        at.map(|i| runs.remove(i))
    };
    if let Some(run) = run {
        let _ = run.stop.send(true);
        for d in run.drivers {
            let _ = d.await;
        }
    }
}

/// At shutdown: stops every pool's drivers and waits for them, then for
/// the retirements (which stand aside once the dispatcher stops).
pub async fn stop_all(shared: &Shared) {
    let Some(ctx) = shared.reloads.ctx.borrow_mut().take() else {
        return;
    };
    let runs: Vec<PoolRun> = ctx.runs.borrow_mut().drain(..).collect();
    for r in &runs {
        let _ = r.stop.send(true);
    }
    for r in runs {
        for d in r.drivers {
            let _ = d.await;
        }
    }
    let retiring: Vec<_> = ctx.retiring.borrow_mut().drain(..).collect();
    for r in retiring {
        let _ = r.await;
    }
}

/// SIGHUP: a reload, its result logged.
pub fn on_sighup(shared: &Rc<Shared>) {
    tracing::info!("SIGHUP: reloading the configuration");
    drop(start(shared));
}

/// The `reload` request from `peer`: its answer. Only the dispatcher's
/// own uid and root may ask, on the Unix socket.
pub async fn answer(shared: &Rc<Shared>, peer: &PeerKey) -> Result<String, Refusal> {
    let me = nix::unistd::geteuid().as_raw();
    match peer {
        PeerKey::Uid(uid) if *uid == me || *uid == 0 => {}
        other => {
            tracing::warn!(peer = %other, "reload refused: permission denied");
            return Err(Refusal {
                kind: ErrorKind::PermissionDenied,
                message: format!(
                    "only uid {me} (the dispatcher's) or root may reload it, on the Unix socket; {other} may not"
                ),
            });
        }
    }
    // A task of its own: a client that leaves never cuts a reload short.
    match start(shared).await {
        Ok(answer) => answer,
        Err(e) => Err(Refusal {
            kind: ErrorKind::Internal,
            message: format!("the reload failed: {e}"),
        }),
    }
}

/// Runs a reload in a task of its own (one at a time), counted and logged.
fn start(shared: &Rc<Shared>) -> JoinHandle<Result<String, Refusal>> {
    let shared = Rc::clone(shared);
    tokio::task::spawn_local(async move {
        let reloads = &shared.reloads;
        let _turn = reloads.one_at_a_time.lock().await;
        let result = reload(&shared).await;
        match &result {
            Ok(summary) => {
                reloads.applied.set(reloads.applied.get() + 1);
                *reloads.last.borrow_mut() = summary.clone();
                tracing::info!("{summary}");
            }
            Err(r) => {
                reloads.refused.set(reloads.refused.get() + 1);
                *reloads.last.borrow_mut() = format!("refused: {}", r.message);
                tracing::error!("reload refused ({}): {}", r.kind, r.message);
            }
        }
        result
    })
}

/// Reads the file and applies it; `Err` when nothing changed.
async fn reload(shared: &Rc<Shared>) -> Result<String, Refusal> {
    let Some(source) = shared.config.reload_from.clone() else {
        return Err(invalid(
            "this dispatcher was started without --config: there is no configuration file to reload (restart it with --config FILE)",
        ));
    };
    if shared.life.draining() {
        return Err(Refusal {
            kind: ErrorKind::ShuttingDown,
            message: "the dispatcher is shutting down".into(),
        });
    }
    let ctx = shared
        .reloads
        .context()
        .ok_or_else(|| invalid("the dispatcher is still starting"))?;
    // Off the event loop: it reads the file, looks users and programs up.
    let read = Arc::clone(&source.read);
    let new = match tokio::task::spawn_blocking(move || read()).await {
        Ok(read) => read.map_err(invalid)?,
        Err(e) => return Err(invalid(format!("reading the configuration failed: {e}"))),
    };
    needs_restart(&shared.config, &new).map_err(invalid)?;
    let plan = Plan::new(shared, &new);
    if plan.staged.is_empty() && plan.retired.is_empty() {
        save_applied(shared, &new);
        return Ok(format!(
            "reloaded {}: nothing changed",
            source.file.display()
        ));
    }
    let staged = stage(shared, &ctx, &plan.staged)?;
    if let Err(why) = ready(&staged).await {
        abort(&ctx, &staged).await;
        return Err(invalid(why));
    }
    if shared.life.draining() {
        // The stop stops every pool's workers and removes every segment.
        return Err(Refusal {
            kind: ErrorKind::ShuttingDown,
            message: "the dispatcher began shutting down during the reload".into(),
        });
    }
    let active = plan.active(&staged);
    let routes = match Routes::plan(&active) {
        Ok(routes) => routes,
        Err(conflict) => {
            abort(&ctx, &staged).await;
            return Err(invalid(conflict));
        }
    };
    shared.routes.replace(routes);
    shared.pools.switch(active, plan.retired.clone());
    for p in &staged {
        p.slots.segment().populate_in_background(POPULATE_AFTER);
    }
    for old in &plan.retired {
        let task =
            tokio::task::spawn_local(retire(Rc::clone(shared), Rc::clone(&ctx), Rc::clone(old)));
        ctx.retiring.borrow_mut().push(task);
    }
    save_applied(shared, &new);
    Ok(plan.summary(&source.file))
}

/// Keeps the text of the configuration just applied, for a restart after
/// a crash to fall back on if the file is broken by then.
pub fn save_applied(shared: &Shared, applied: &Config) {
    if let Some(text) = &applied.file_text {
        if let Err(e) = shared.paths.save_applied_config(text) {
            tracing::warn!("cannot keep the applied configuration: {e}");
        }
    }
}

/// The options a running dispatcher cannot change: those of its sockets,
/// limits and admission (a restart applies them). `Err` names those the
/// file changed.
fn needs_restart(old: &Config, new: &Config) -> Result<(), String> {
    let mut changed: Vec<&str> = Vec::new();
    // Every field of `Config` is sorted here, by a destructuring without
    // `..`: a new option does not build until it is named restart-only or
    // applied by a reload.
    macro_rules! sort {
        (restart: $($field:ident => $key:literal),* ; reload: $($other:ident),* $(,)?) => {{
            let Config { $($field: _,)* $($other: _,)* } = new;
            $(if old.$field != new.$field { changed.push($key); })*
        }};
    }
    sort!(
        restart:
        tcp => "tcp", tcp_allow_remote => "tcp_allow_remote", token_file => "token_file",
        max_connections => "max_connections", max_tcp_connections => "max_tcp_connections",
        allow_uids => "allow_uid", max_payload => "max_payload", max_frame => "max_frame",
        handshake_timeout_ms => "handshake_timeout_ms", frame_timeout_ms => "frame_timeout_ms",
        idle_timeout_ms => "idle_timeout_ms", write_timeout_ms => "write_timeout_ms",
        conn_arena_percent => "conn_arena_percent", peer_arena_percent => "peer_arena_percent",
        max_in_flight => "max_in_flight", drain_timeout_ms => "drain_timeout_ms",
        allow_fault_injection => "allow_fault_injection", worker_exe => "worker_exe",
        instance => "instance", runtime_dir => "runtime_dir",
        metrics_listen => "metrics_listen", metrics_listen_public => "metrics_listen_public";
        // The pools' settings (a reload replaces the pools they change),
        // what the watchdog says (not from the file), and the file itself.
        reload:
        workers, job_timeout_ms, max_attempts, backend, segment_mib, max_result_mib,
        recycle_after_jobs, recycle_above_rss_mib, memory_limit_mib, pools, builtin_pool,
        builtin_run_as, watchdog, watchdog_started_unix_ms, reload_from, file_text,
    );
    if changed.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} cannot change while the dispatcher runs (restart it to apply {}); nothing was changed",
        changed.join(", "),
        if changed.len() == 1 { "it" } else { "them" }
    ))
}

/// What a reload does to the pools.
struct Plan {
    /// The new configuration's pools, in order: a running pool kept as it
    /// is, or the configuration of a pool to start.
    wanted: Vec<Result<Rc<Pool>, PoolConfig>>,
    /// The pools to start.
    staged: Vec<PoolConfig>,
    /// Running pools replaced or removed.
    retired: Vec<Rc<Pool>>,
    /// Names, for the summary.
    replaced: Vec<String>,
    added: Vec<String>,
    removed: Vec<String>,
}

/// Whether two settled pools are the same (where they were configured aside).
fn same(a: &PoolConfig, b: &PoolConfig) -> bool {
    let bare = |p: &PoolConfig| PoolConfig {
        origin: String::new(),
        ..p.clone()
    };
    bare(a) == bare(b)
}

impl Plan {
    fn new(shared: &Shared, new: &Config) -> Plan {
        let running: Vec<Rc<Pool>> = shared.pools.iter().collect();
        let configs = new.pools();
        let names: BTreeSet<&str> = configs.iter().map(|c| c.name.as_str()).collect();
        let mut plan = Plan {
            wanted: Vec::new(),
            staged: Vec::new(),
            retired: Vec::new(),
            replaced: Vec::new(),
            added: Vec::new(),
            removed: Vec::new(),
        };
        for c in configs.iter().cloned() {
            match running.iter().find(|p| p.name() == c.name) {
                Some(p) if same(&p.config, &c) => plan.wanted.push(Ok(Rc::clone(p))),
                Some(p) => {
                    plan.replaced.push(c.name.clone());
                    plan.retired.push(Rc::clone(p));
                    plan.staged.push(c.clone());
                    plan.wanted.push(Err(c));
                }
                None => {
                    plan.added.push(c.name.clone());
                    plan.staged.push(c.clone());
                    plan.wanted.push(Err(c));
                }
            }
        }
        for p in running.iter().filter(|p| !names.contains(p.name())) {
            plan.removed.push(p.name().to_owned());
            plan.retired.push(Rc::clone(p));
        }
        plan
    }

    /// The pools routed to after the switch, in the configuration's order.
    fn active(&self, staged: &[Rc<Pool>]) -> Vec<Rc<Pool>> {
        let mut fresh = staged.iter();
        self.wanted
            .iter()
            .map(|w| match w {
                Ok(kept) => Rc::clone(kept),
                Err(_) => Rc::clone(fresh.next().expect("one staged pool per new one")),
            })
            .collect()
    }

    fn summary(&self, file: &std::path::Path) -> String {
        let list = |what: &str, names: &[String]| {
            (!names.is_empty()).then(|| format!("{what} {}", names.join(", ")))
        };
        let said: Vec<String> = [
            list("replaced", &self.replaced),
            list("added", &self.added),
            list("removed", &self.removed),
        ]
        .into_iter()
        .flatten()
        .collect();
        let old: usize = self.retired.iter().map(|p| p.workers.running()).sum();
        format!(
            "reloaded {}: pools {}; {old} old worker(s) stop once their jobs are answered",
            file.display(),
            said.join("; ")
        )
    }
}

/// Makes the new pools' segments (recorded in the state file first) and
/// the pools, staged, and starts their workers.
fn stage(
    shared: &Rc<Shared>,
    ctx: &Context,
    configs: &[PoolConfig],
) -> Result<Vec<Rc<Pool>>, Refusal> {
    if configs.is_empty() {
        return Ok(Vec::new());
    }
    let wanted: Vec<_> = configs
        .iter()
        .map(|p| ipc_core::start::Wanted {
            backend: p.backend,
            arena_len: (p.segment_mib << 20) as usize,
            owner: p.run_as.as_ref().map(|r| (r.uid, r.gid)),
        })
        .collect();
    let kept = ctx.recorded.borrow().clone();
    let (segments, recorded) =
        ipc_core::start::add_segments(&shared.paths, &ctx.lock, &kept, &wanted, ctx.generation)
            .map_err(|e| invalid(format!("cannot make the new pools' segments: {e}")))?;
    *ctx.recorded.borrow_mut() = recorded;
    let caps = SlotCaps {
        conn_percent: shared.config.conn_arena_percent,
        peer_percent: shared.config.peer_arena_percent,
    };
    let pools: Vec<Rc<Pool>> = configs
        .iter()
        .cloned()
        .zip(segments)
        .map(|(config, mut segment)| {
            // Unlinked by name: at its retirement, an abort, or the stop.
            segment.disown();
            let mut pool = Pool::new(config, shared.pools.next_id(), segment, caps);
            // A replaced pool's counters go on in its successor (no reset
            // while the dispatcher lives; its last jobs count too).
            if let Some(old) = shared.pools.iter().find(|p| p.name() == pool.name()) {
                pool.metrics = Rc::clone(&old.metrics);
            }
            let pool = Rc::new(pool);
            pool.stage();
            pool
        })
        .collect();
    for pool in &pools {
        tracing::info!(
            pool = pool.name(),
            segment = pool.slots.segment().name(),
            "reload: starting the pool's new workers"
        );
        start_drivers(shared, ctx, pool);
    }
    Ok(pools)
}

/// Waits until every new pool's workers are all ready (or, at the
/// deadline, at least one of each); `Err` says which pool could not start.
async fn ready(pools: &[Rc<Pool>]) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + READY_WAIT;
    loop {
        if let Some(p) = pools.iter().find(|p| p.start_failure().is_some()) {
            let why = p.start_failure().unwrap_or_default();
            return Err(format!(
                "pool \"{}\" ({}) cannot start: {why}; nothing was changed",
                p.name(),
                p.config.origin
            ));
        }
        let all_up = pools
            .iter()
            .all(|p| p.workers.running() == p.config.workers && p.ops().is_some());
        if all_up {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return match pools
                .iter()
                .find(|p| p.workers.running() == 0 || p.ops().is_none())
            {
                Some(p) => Err(format!(
                    "pool \"{}\" ({}): no worker ready within {READY_WAIT:?}; nothing was changed",
                    p.name(),
                    p.config.origin
                )),
                None => Ok(()),
            };
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Undoes [`stage`]: stops the new pools' workers, removes their segments.
async fn abort(ctx: &Context, pools: &[Rc<Pool>]) {
    for p in pools {
        stop_pool(ctx, p.index).await;
        forget_segment(ctx, p);
    }
}

/// Unlinks a stopped pool's segment and drops it from the state file.
fn forget_segment(ctx: &Context, pool: &Pool) {
    let name = pool.slots.segment().name().to_owned();
    if !ipc_core::segment::unlink(&name) {
        tracing::warn!(segment = %name, "the segment was gone already (renamed or removed by its pool's user?)");
    }
    let mut recorded = ctx.recorded.borrow_mut();
    recorded.retain(|s| s.name != name);
    let state = ipc_core::paths::InstanceState {
        generation: ctx.generation,
        segments: recorded.clone(),
    };
    drop(recorded);
    if let Err(e) = ctx.paths.write_state(&state) {
        tracing::warn!("cannot update the state file: {e}");
    }
}

/// A replaced or removed pool's end: once every slot of its segment is back
/// (each job it held answered, each upload into it over), its workers are
/// stopped after their jobs and reaped, and its segment removed. Stands
/// aside if the dispatcher stops first (the stop does all that).
async fn retire(shared: Rc<Shared>, ctx: Rc<Context>, pool: Rc<Pool>) {
    let mut stop = ctx.stop.clone();
    tokio::select! {
        () = pool.slots.all_returned() => {}
        _ = stop.wait_for(|s| *s) => return,
    }
    if shared.life.draining() {
        return;
    }
    let workers = pool.workers.running();
    stop_pool(&ctx, pool.index).await;
    if shared.life.draining() {
        return;
    }
    forget_segment(&ctx, &pool);
    shared.pools.forget(pool.index);
    tracing::info!(
        pool = pool.name(),
        segment = pool.slots.segment().name(),
        "reload: the old pool's {workers} worker(s) stopped after their jobs; its segment is removed"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_settings_apply_live_and_restart_only_options_are_named() {
        let old = Config::new("t");
        assert_eq!(needs_restart(&old, &old.clone()), Ok(()));
        let mut new = old.clone();
        // What pools take: applied by replacing them.
        new.workers = old.workers + 3;
        new.job_timeout_ms = 5;
        new.segment_mib = 8;
        new.recycle_after_jobs = Some(10);
        assert_eq!(needs_restart(&old, &new), Ok(()));
        new.max_in_flight = 7;
        new.tcp = Some("127.0.0.1:1".parse().unwrap());
        assert_eq!(
            needs_restart(&old, &new),
            Err("tcp, max_in_flight cannot change while the dispatcher runs (restart it to apply them); nothing was changed".into())
        );
    }

    #[test]
    fn pools_are_the_same_wherever_they_were_configured() {
        let pools = Config::new("t").pools();
        let mut moved = pools[0].clone();
        moved.origin = "osps.toml:9".into();
        assert!(same(&pools[0], &moved));
        moved.workers += 1;
        assert!(!same(&pools[0], &moved));
    }
}
