//! The Prometheus metrics: what the dispatcher counts as it works that
//! `status` does not (jobs by outcome and pool, a latency histogram per
//! pool, worker restarts by cause, connections and refusals by listener),
//! kept in `Cell`s (one thread: a count is a load and a store), and the
//! answer to `metrics`: a snapshot of those and of what `status` reads,
//! encoded by the `prometheus-client` crate in the Prometheus text
//! exposition format (version 0.0.4). Served over HTTP by `metrics_http.rs`.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::time::Duration;

use ipc_core::proto::{ErrorKind, Outcome};
use ipc_core::status::WorkerState;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::pools::Pool;
use crate::session::End;
use crate::shared::Shared;

// The causes a watchdog names, each always exported (0 when absent).
use ipc_core::env::DISPATCHER_RESTART_CAUSES;

/// Upper bounds of the job latency buckets, in seconds: 100 µs to a minute,
/// about three per power of ten (a job of the builtin pool takes tens of
/// µs to a few ms; a command pool's, up to its timeout, 30 s by default).
pub const LATENCY_BOUNDS: [f64; 18] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

/// Outcomes counted: `ok` and each error kind (by its wire index, so a kind
/// added to the protocol is counted and exported with no change here).
const OUTCOMES: usize = 64;

/// Which listener a connection came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    Unix,
    Tcp,
}

impl Listener {
    const ALL: [Listener; 2] = [Listener::Unix, Listener::Tcp];

    fn as_str(self) -> &'static str {
        match self {
            Listener::Unix => "unix",
            Listener::Tcp => "tcp",
        }
    }
}

/// Why a connection was refused before it could send a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The listener's connection budget was spent (`--max-connections`).
    Full,
    /// The peer held its share of the budget (half).
    PeerShare,
    /// A uid not admitted on the Unix socket (`--allow-uid`).
    Uid,
    /// A missing or wrong token on a TCP port that needs one.
    Token,
    /// A token longer than a token can be.
    TokenTooLong,
    /// Not an OSPS client (its first bytes are not a hello).
    NotOsps,
    /// A protocol version the dispatcher does not speak.
    Version,
    /// No hello within `--handshake-timeout-ms`.
    HandshakeTimeout,
    /// Closed, still silent in its handshake, to make room for a newer one.
    Evicted,
}

impl Refused {
    const ALL: [Refused; 9] = [
        Refused::Full,
        Refused::PeerShare,
        Refused::Uid,
        Refused::Token,
        Refused::TokenTooLong,
        Refused::NotOsps,
        Refused::Version,
        Refused::HandshakeTimeout,
        Refused::Evicted,
    ];

    fn as_str(self) -> &'static str {
        match self {
            Refused::Full => "full",
            Refused::PeerShare => "peer_share",
            Refused::Uid => "uid",
            Refused::Token => "token",
            Refused::TokenTooLong => "token_too_long",
            Refused::NotOsps => "not_osps",
            Refused::Version => "version",
            Refused::HandshakeTimeout => "handshake_timeout",
            Refused::Evicted => "evicted",
        }
    }
}

/// The dispatcher-wide counters (the pools' are in [`PoolMetrics`]).
#[derive(Debug)]
pub struct Metrics {
    accepted: [Cell<u64>; 2],
    open: [Cell<u64>; 2],
    refused: [[Cell<u64>; Refused::ALL.len()]; 2],
    /// The watchdog's restarts of the dispatcher, by cause (from the environment).
    dispatcher_restarts: BTreeMap<String, u64>,
    /// When this dispatcher started, in seconds since the Unix epoch.
    started_unix: f64,
}

impl Metrics {
    /// Counters at zero; the dispatcher's restarts from [`ipc_core::env::DISPATCHER_RESTARTS`].
    pub fn from_env() -> Metrics {
        let restarts = std::env::var(ipc_core::env::DISPATCHER_RESTARTS).unwrap_or_default();
        Metrics {
            accepted: Default::default(),
            open: Default::default(),
            refused: Default::default(),
            dispatcher_restarts: parse_dispatcher_restarts(&restarts),
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
        }
    }

    /// Whether a watchdog started this dispatcher after a restart.
    pub fn restarted(&self) -> bool {
        self.dispatcher_restarts.values().any(|&n| n > 0)
    }

    /// Counts a connection accepted on `listener`, open until the guard drops.
    pub fn accepted(&self, listener: Listener) -> Open<'_> {
        let i = listener as usize;
        bump(&self.accepted[i], 1);
        bump(&self.open[i], 1);
        Open(&self.open[i])
    }

    /// Counts a connection refused on `listener` for `why`.
    pub fn refused(&self, listener: Listener, why: Refused) {
        bump(&self.refused[listener as usize][why as usize], 1);
    }
}

/// A connection counted as open while it lives.
#[derive(Debug)]
pub struct Open<'a>(&'a Cell<u64>);

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.set(self.0.get().saturating_sub(1));
    }
}

/// Serves `conn` counted as an open connection of `listener`.
pub async fn counted(
    shared: Rc<Shared>,
    listener: Listener,
    conn: impl std::future::Future<Output = ()>,
) {
    let _open = shared.metrics.accepted(listener);
    conn.await;
}

fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get().saturating_add(n));
}

/// A pool's counters: its jobs by outcome, their latency, its workers'
/// restarts by cause. Each queued job holds its pool's (an `Rc`), so what
/// it counts goes to the pool it was queued on.
#[derive(Debug)]
pub struct PoolMetrics {
    /// `ok` at 0, then each error kind at 1 + its index.
    outcomes: [Cell<u64>; OUTCOMES],
    /// One count per bucket of [`LATENCY_BOUNDS`] (not cumulative), then
    /// those above the last.
    latency: [Cell<u64>; LATENCY_BOUNDS.len() + 1],
    latency_sum: Cell<f64>,
    /// Restarts, by the error kind of the job that ended the worker
    /// ([`restart_cause`]).
    restarts: [Cell<u64>; OUTCOMES],
}

impl Default for PoolMetrics {
    fn default() -> Self {
        PoolMetrics {
            outcomes: std::array::from_fn(|_| Cell::new(0)),
            latency: Default::default(),
            latency_sum: Cell::new(0.0),
            restarts: std::array::from_fn(|_| Cell::new(0)),
        }
    }
}

impl PoolMetrics {
    /// Counts a job answered with `outcome`, `took` after its request was
    /// read (`None`: cancelled, not a latency).
    pub fn answered(&self, outcome: &Outcome, took: Option<Duration>) {
        let i = match outcome {
            Outcome::Ok => 0,
            Outcome::Err(e) => 1 + e.kind as usize,
        };
        if let Some(c) = self.outcomes.get(i) {
            bump(c, 1);
        }
        let Some(took) = took else { return };
        let secs = took.as_secs_f64();
        let bucket = LATENCY_BOUNDS.partition_point(|&b| b < secs);
        bump(&self.latency[bucket], 1);
        self.latency_sum.set(self.latency_sum.get() + secs);
    }

    /// Counts a worker replaced after it ended for `cause` ([`restart_cause`]).
    pub fn restarted(&self, cause: ErrorKind) {
        if let Some(c) = self.restarts.get(cause as usize) {
            bump(c, 1);
        }
    }
}

/// Why a worker that ended `end` is replaced, as an error kind: the one
/// its running job was answered (a hang is `Timeout`, a cancel
/// `Cancelled`, a death past the memory limit `OutOfMemory`, a protocol
/// violation `Internal`, and any kind a new way of ending answers is its
/// own cause); with no job answered, `Timeout` for a hang whose job is
/// retried, else `WorkerCrashed` (a death whose job is retried, or one
/// while idle).
pub fn restart_cause<J>(end: &End<J>) -> ErrorKind {
    match end {
        End::Kill {
            answer, term_first, ..
        } => answer.first().map_or(
            if *term_first {
                ErrorKind::Timeout
            } else {
                ErrorKind::WorkerCrashed
            },
            |(_, kind, _)| *kind,
        ),
        End::Stop => ErrorKind::WorkerCrashed,
    }
}

/// The causes shown even when none happened.
const BASE_RESTART_CAUSES: [ErrorKind; 3] = [
    ErrorKind::WorkerCrashed,
    ErrorKind::Timeout,
    ErrorKind::OutOfMemory,
];

/// Reads `OSPS_DISPATCHER_RESTARTS` (`cause=count` pairs, comma-separated):
/// each known cause with its count (0 when absent); a malformed pair, an
/// unknown cause or an impossible count is ignored, and a cause named twice
/// is summed.
pub fn parse_dispatcher_restarts(text: &str) -> BTreeMap<String, u64> {
    let mut out: BTreeMap<String, u64> = DISPATCHER_RESTART_CAUSES
        .iter()
        .map(|c| (c.to_string(), 0))
        .collect();
    // A sane value is a few dozen bytes: a huge one is not read through.
    for pair in text.split(',').take(64) {
        let Some((cause, count)) = pair.split_once('=') else {
            continue;
        };
        let (cause, count) = (cause.trim(), count.trim());
        let Ok(count) = count.parse::<u64>() else {
            continue;
        };
        if let Some(total) = out.get_mut(cause) {
            *total = total.saturating_add(count);
        }
    }
    out
}

/// Every error kind, in wire order: decoded from its index until one is
/// not a kind, so a kind added to the protocol appears by itself.
fn error_kinds() -> Vec<ErrorKind> {
    (0u8..(OUTCOMES as u8 - 1))
        .map_while(|i| postcard::from_bytes::<ErrorKind>(&[i]).ok())
        .collect()
}

/// A label value of a kind: its name with underscores (`worker_crashed`).
fn label(kind: ErrorKind) -> String {
    kind.name().replace(' ', "_")
}

/// A restart cause's label: `crashed` for `WorkerCrashed`, else the kind's.
fn cause_label(kind: ErrorKind) -> String {
    match kind {
        ErrorKind::WorkerCrashed => "crashed".into(),
        other => label(other),
    }
}

/// The answer to `metrics`: every metric now, in the Prometheus text format.
pub fn render(shared: &Shared) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(snapshot(shared)));
    let mut out = String::with_capacity(8 << 10);
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

/// Labels of one series.
type Labels = Vec<(&'static str, String)>;

/// One series' value.
#[derive(Debug)]
enum Value {
    Counter(u64),
    Gauge(i64),
    GaugeF(f64),
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    },
}

/// One metric: its name (without `_total`, which the encoder adds to a
/// counter), help, type and series.
#[derive(Debug)]
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    series: Vec<(Labels, Value)>,
}

/// Every metric's values at one moment (owned: the crate's collectors are
/// `Send`, the dispatcher's counters are not).
#[derive(Debug)]
struct Snapshot(Vec<Family>);

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for f in &self.0 {
            let mut metric = encoder.encode_descriptor(f.name, f.help, None, f.kind)?;
            for (labels, value) in &f.series {
                let mut series = metric.encode_family(labels)?;
                match value {
                    Value::Counter(n) => ConstCounter::new(*n).encode(series)?,
                    Value::Gauge(n) => ConstGauge::new(*n).encode(series)?,
                    Value::GaugeF(n) => ConstGauge::new(*n).encode(series)?,
                    Value::Histogram {
                        sum,
                        count,
                        buckets,
                    } => series.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?,
                }
            }
        }
        Ok(())
    }
}

fn family(name: &'static str, help: &'static str, kind: MetricType) -> Family {
    Family {
        name,
        help,
        kind,
        series: Vec::new(),
    }
}

fn pool_label(p: &Pool) -> Labels {
    vec![("pool", p.name().to_owned())]
}

fn with(mut labels: Labels, key: &'static str, value: impl Into<String>) -> Labels {
    labels.push((key, value.into()));
    labels
}

/// What the metrics show now.
fn snapshot(shared: &Shared) -> Snapshot {
    let mut families = pool_families(shared);
    families.extend(dispatcher_families(shared));
    Snapshot(families)
}

/// The per-pool metrics.
fn pool_families(shared: &Shared) -> Vec<Family> {
    use MetricType::{Counter, Gauge, Histogram};
    let mut families = [
        family(
            "osps_workers",
            "Worker places of the pool, by the state of their process (starting, idle, busy, stopped).",
            Gauge,
        ),
        family(
            "osps_jobs_queued",
            "Jobs waiting in the pool's queue for a worker.",
            Gauge,
        ),
        family(
            "osps_slots_in_use",
            "Slots of the pool's segment on loan: jobs accepted and not yet answered to their client.",
            Gauge,
        ),
        family(
            "osps_segment_used_bytes",
            "Bytes of the pool's shared-memory segment allocated to slots (payloads and results).",
            Gauge,
        ),
        family(
            "osps_segment_size_bytes",
            "Size of the pool's shared-memory segment, header included.",
            Gauge,
        ),
        family(
            "osps_jobs",
            "Jobs the pool's workers answered (or the dispatcher answered for them), by outcome: ok or the error kind.",
            Counter,
        ),
        family(
            "osps_job_duration_seconds",
            "Time from a job's request being read to its answer (queueing and retries included).",
            Histogram,
        ),
        family(
            "osps_worker_restarts",
            "Workers of the pool replaced after they ended, by cause: crashed, timeout, out_of_memory, or the error kind the running job was answered.",
            Counter,
        ),
        family(
            "osps_worker_recycles",
            "Workers of the pool replaced by policy between jobs, by cause: jobs (recycle_after_jobs) or memory (recycle_above_rss_mib).",
            Counter,
        ),
    ];
    let kinds = error_kinds();
    for p in &shared.pools {
        pool_series(&p, &kinds, &mut families);
    }
    families.into()
}

/// One pool's series of each of [`pool_families`].
fn pool_series(p: &Pool, kinds: &[ErrorKind], families: &mut [Family; 9]) {
    let [workers, queued, slots, used, size, jobs, latency, restarts, recycles] = families;
    let labels = pool_label(p);
    let gauge = |f: &mut Family, n: u64| f.series.push((labels.clone(), Value::Gauge(n as i64)));
    let report = p.workers.report(p.name());
    for state in WorkerState::ALL {
        let n = report.iter().filter(|w| w.state == state).count();
        let l = with(labels.clone(), "state", state.as_str());
        workers.series.push((l, Value::Gauge(n as i64)));
    }
    gauge(queued, p.queue.len() as u64);
    let seg = p.segment_status();
    gauge(slots, seg.slots_in_use as u64);
    gauge(used, seg.slot_bytes_in_use);
    gauge(size, seg.size);
    let m = &p.metrics;
    let outcomes = std::iter::once(("ok".to_owned(), &m.outcomes[0])).chain(
        kinds
            .iter()
            .map(|k| (label(*k), &m.outcomes[1 + *k as usize])),
    );
    for (outcome, n) in outcomes {
        let l = with(labels.clone(), "outcome", outcome);
        jobs.series.push((l, Value::Counter(n.get())));
    }
    latency.series.push((labels.clone(), histogram(m)));
    for k in kinds {
        let n = m.restarts[*k as usize].get();
        if n > 0 || BASE_RESTART_CAUSES.contains(k) {
            let l = with(labels.clone(), "cause", cause_label(*k));
            restarts.series.push((l, Value::Counter(n)));
        }
    }
    let memory = p.workers.recycled_for_memory();
    let by_jobs = p.workers.recycled().saturating_sub(memory);
    for (cause, n) in [("jobs", by_jobs), ("memory", memory)] {
        let l = with(labels.clone(), "cause", cause);
        recycles.series.push((l, Value::Counter(n)));
    }
}

/// A pool's latency histogram, its buckets as the encoder takes them.
fn histogram(m: &PoolMetrics) -> Value {
    let counts: Vec<u64> = m.latency.iter().map(Cell::get).collect();
    let buckets = LATENCY_BOUNDS
        .iter()
        .copied()
        .chain([f64::INFINITY])
        .zip(counts.iter().copied())
        .collect();
    Value::Histogram {
        sum: m.latency_sum.get(),
        count: counts.iter().sum(),
        buckets,
    }
}

/// The dispatcher-wide metrics.
fn dispatcher_families(shared: &Shared) -> Vec<Family> {
    use MetricType::{Counter, Gauge};
    let m = &shared.metrics;
    let mut restarts = family(
        "osps_dispatcher_restarts",
        "Times the watchdog restarted the dispatcher before this one started, by cause (crashed, hung, killed, exited).",
        Counter,
    );
    for (cause, n) in &m.dispatcher_restarts {
        let l = vec![("cause", cause.clone())];
        restarts.series.push((l, Value::Counter(*n)));
    }
    let mut started = family(
        "osps_dispatcher_start_time_seconds",
        "When this dispatcher started, in seconds since the Unix epoch.",
        Gauge,
    );
    started
        .series
        .push((Vec::new(), Value::GaugeF(m.started_unix)));
    let mut accepted = family(
        "osps_connections_accepted",
        "Connections accepted, by listener (unix, tcp).",
        Counter,
    );
    let mut open = family(
        "osps_connections_open",
        "Connections open now, by listener (unix, tcp), in their handshake or admitted.",
        Gauge,
    );
    let mut refused = family(
        "osps_connections_refused",
        "Connections refused or closed before their first request, by listener and reason.",
        Counter,
    );
    for l in Listener::ALL {
        let i = l as usize;
        let labels = vec![("listener", l.as_str().to_owned())];
        accepted
            .series
            .push((labels.clone(), Value::Counter(m.accepted[i].get())));
        open.series
            .push((labels.clone(), Value::Gauge(m.open[i].get() as i64)));
        for why in Refused::ALL {
            let n = m.refused[i][why as usize].get();
            let series = with(labels.clone(), "reason", why.as_str());
            refused.series.push((series, Value::Counter(n)));
        }
    }
    vec![restarts, started, accepted, open, refused]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dispatcher_restarts_are_parsed_defensively() {
        let got = |text: &str| {
            let m = parse_dispatcher_restarts(text);
            DISPATCHER_RESTART_CAUSES.map(|c| m[c])
        };
        assert_eq!(got(""), [0, 0, 0, 0]);
        assert_eq!(got("crashed=3,hung=1"), [3, 1, 0, 0]);
        assert_eq!(got(" killed = 2 , exited=5 "), [0, 0, 2, 5]);
        // Malformed pairs, unknown causes and bad counts are ignored.
        let messy = "crashed=3,,=,hung,hung=x,hung=-1,hung=1.5,bogus=9,crashed=2,exited=99999999999999999999";
        assert_eq!(got(messy), [5, 0, 0, 0]);
        assert_eq!(
            got("crashed=18446744073709551615,crashed=1"),
            [u64::MAX, 0, 0, 0]
        );
        let m = parse_dispatcher_restarts("bogus=1,\u{1F4A5}=2");
        assert_eq!(m.len(), 4, "only the known causes: {m:?}");
    }

    /// The cause is the running job's answer: a cancel's kill (SIGTERM
    /// first, as a hang's) is `Cancelled`, not `Timeout` (it was counted
    /// as a timeout).
    #[test]
    fn a_restart_is_counted_under_the_answer_its_job_got() {
        let kill = |kind: Option<ErrorKind>, term_first| End::Kill {
            why: String::new(),
            answer: kind.map(|k| ((), k, String::new())).into_iter().collect(),
            requeue: vec![],
            term_first,
        };
        let cases = [
            (kill(Some(ErrorKind::Cancelled), true), ErrorKind::Cancelled),
            (kill(Some(ErrorKind::Timeout), true), ErrorKind::Timeout),
            (kill(None, true), ErrorKind::Timeout),
            (
                kill(Some(ErrorKind::OutOfMemory), false),
                ErrorKind::OutOfMemory,
            ),
            (kill(None, false), ErrorKind::WorkerCrashed),
            (End::Stop, ErrorKind::WorkerCrashed),
        ];
        for (end, want) in cases {
            assert_eq!(restart_cause(&end), want);
        }
    }

    #[test]
    fn every_error_kind_is_an_outcome() {
        let kinds = error_kinds();
        assert!(kinds.len() >= 11 && kinds.len() < OUTCOMES, "{kinds:?}");
        for (i, k) in kinds.iter().enumerate() {
            assert_eq!(*k as usize, i);
        }
        assert!(kinds.contains(&ErrorKind::OutOfMemory));
        assert_eq!(label(ErrorKind::WorkerCrashed), "worker_crashed");
        assert_eq!(cause_label(ErrorKind::WorkerCrashed), "crashed");
    }

    #[test]
    fn latencies_fall_in_their_buckets() {
        let m = PoolMetrics::default();
        for us in [0, 100, 101, 999_999, 1_000_000, 61_000_000] {
            m.answered(&Outcome::Ok, Some(Duration::from_micros(us)));
        }
        let counts: Vec<u64> = m.latency.iter().map(Cell::get).collect();
        // 0 and 100 µs in the first bucket (le 0.0001), 101 µs in the
        // second; 999 999 µs and 1 s in le="1"; 61 s above every bound.
        assert_eq!((counts[0], counts[1]), (2, 1));
        assert_eq!(counts[12], 2, "{counts:?}");
        assert_eq!(counts[LATENCY_BOUNDS.len()], 1);
        assert_eq!(counts.iter().sum::<u64>(), 6);
        assert_eq!(m.outcomes[0].get(), 6);
        let Value::Histogram { count, sum, .. } = histogram(&m) else {
            unreachable!()
        };
        assert_eq!(count, 6);
        assert!((sum - 63.000_201).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn a_snapshot_encodes_in_the_prometheus_text_format() {
        let snap = Snapshot(vec![Family {
            name: "osps_jobs",
            help: "Jobs.",
            kind: MetricType::Counter,
            series: vec![(
                vec![("pool", "a\"b".into()), ("outcome", "ok".into())],
                Value::Counter(3),
            )],
        }]);
        let mut registry = Registry::default();
        registry.register_collector(Box::new(snap));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).unwrap();
        assert_eq!(
            out,
            "# HELP osps_jobs_total Jobs.\n# TYPE osps_jobs_total counter\nosps_jobs_total{pool=\"a\\\"b\",outcome=\"ok\"} 3\n"
        );
    }
}
