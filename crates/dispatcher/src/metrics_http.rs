//! `--metrics-listen ADDR`: the metrics (`metrics.rs`) over HTTP/1.1 at
//! `GET /metrics` (and `HEAD`), for Prometheus to scrape; 404 for any
//! other path, 405 for any other method. HTTP is `hyper`'s (its server
//! half, HTTP/1 only): the request line and headers are parsed by a
//! well-tested parser, not ours.
//!
//! Loopback unless `--metrics-listen-public`. Anyone who can connect to
//! the port may scrape (the metrics carry pool names and counts, never a
//! payload or a peer's identity), so its cost to the dispatcher is bounded
//! against hostile local users: at most [`MAX_CONNECTIONS`] at once (more
//! are closed at once), a request's head at most [`MAX_HEAD`] bytes and
//! [`MAX_HEADERS`] headers, read within [`HEAD_TIMEOUT`], one request per
//! connection, every connection closed after [`CONNECTION_DEADLINE`]
//! whatever it does (a slow reader of the answer too), and at most one
//! connection accepted every [`ACCEPT_PACE`] (a flood waits in the kernel's
//! backlog, not on the dispatcher's thread). The tasks run on
//! the dispatcher's thread: an answer is rendered in microseconds, and no
//! wait here holds up anything else.

use std::cell::Cell;
use std::convert::Infallible;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::shared::Shared;
use crate::{Config, DispatcherError, Invalid};

/// Connections served at once; more are closed as soon as accepted.
pub const MAX_CONNECTIONS: usize = 16;
/// Bytes of a request's line and headers, at most (hyper's smallest buffer).
pub const MAX_HEAD: usize = 8192;
/// Headers of a request, at most.
pub const MAX_HEADERS: usize = 32;
/// Time to send a request's line and headers.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a connection may live, whatever it does.
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// Time between two connections accepted, at least: at most 100 a second.
pub const ACCEPT_PACE: Duration = Duration::from_millis(10);
/// The one path served.
pub const PATH: &str = "/metrics";

/// Refuses a non-loopback `--metrics-listen` without `--metrics-listen-public`.
pub fn validate(config: &Config) -> Result<(), Invalid> {
    match config.metrics_listen {
        Some(addr) if !ipc_core::peer::is_loopback(addr.ip()) && !config.metrics_listen_public => {
            Err(Invalid {
                key: "metrics-listen",
                message: format!("--metrics-listen {addr} is not a loopback address; the metrics are served on loopback (127.0.0.0/8, ::1) unless given --metrics-listen-public"),
            })
        }
        None if config.metrics_listen_public => Err(Invalid {
            key: "metrics-listen-public",
            message: "--metrics-listen-public applies to a metrics listener: add --metrics-listen ADDR".into(),
        }),
        _ => Ok(()),
    }
}

/// The metrics listener's task, aborted (its listener closed) when dropped.
#[derive(Debug)]
pub struct Serving(tokio::task::JoinHandle<()>);

impl Drop for Serving {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Binds `--metrics-listen`, if given, and serves it on a task of its own.
pub async fn start(shared: &Rc<Shared>) -> Result<Option<Serving>, DispatcherError> {
    let Some(addr) = shared.config.metrics_listen else {
        return Ok(None);
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        // The port was free for the dispatcher before us, and whoever took
        // it since (another uid may bind a loopback port too) must not stop
        // the jobs from being served: the watchdog would give up.
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && shared.metrics.restarted() => {
            tracing::error!("metrics listener: cannot listen on {addr}: {e}; jobs are served, and the metrics port is tried again every {BIND_RETRY:?}");
            let task = tokio::task::spawn_local(bind_later(addr, Rc::clone(shared)));
            return Ok(Some(Serving(task)));
        }
        Err(source) => {
            return Err(DispatcherError::Listen {
                what: format!("metrics {addr}"),
                source,
            })
        }
    };
    tracing::info!("metrics served at http://{}{PATH}", listener.local_addr()?);
    let task = tokio::task::spawn_local(serve(listener, Rc::clone(shared)));
    Ok(Some(Serving(task)))
}

/// How often a restarted dispatcher tries again to bind a metrics port
/// another process holds.
pub const BIND_RETRY: Duration = Duration::from_secs(1);

/// Binds `addr` once it is free, then serves it.
async fn bind_later(addr: std::net::SocketAddr, shared: Rc<Shared>) {
    loop {
        tokio::time::sleep(BIND_RETRY).await;
        if let Ok(listener) = TcpListener::bind(addr).await {
            tracing::info!(
                "metrics listener: {addr} is free again; metrics served at http://{addr}{PATH}"
            );
            return serve(listener, shared).await;
        }
    }
}

/// Accepts scrapers, each on a task of its own, up to [`MAX_CONNECTIONS`].
async fn serve(listener: TcpListener, shared: Rc<Shared>) {
    let open = Rc::new(Cell::new(0usize));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!("metrics listener: accept failed: {e}; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Paced: a flood of connections (any local user can make one) waits
        // in the kernel's backlog instead of taking the dispatcher's thread
        // from the jobs; a scraper comes every few seconds.
        tokio::time::sleep(ACCEPT_PACE).await;
        if open.get() >= MAX_CONNECTIONS {
            crate::handshake::log_rate_limited(
                || tracing::info!(%peer, "metrics listener: {MAX_CONNECTIONS} connections open already; closing this one (logged at most once a second)"),
            );
            continue; // dropped: closed
        }
        open.set(open.get() + 1);
        let (shared, open) = (Rc::clone(&shared), Rc::clone(&open));
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(CONNECTION_DEADLINE, connection(stream, shared)).await;
            open.set(open.get() - 1);
        });
    }
}

/// Serves one request on a connection, then closes it.
async fn connection(stream: tokio::net::TcpStream, shared: Rc<Shared>) {
    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
        let answer = respond(&shared, req.method(), req.uri().path());
        async move { Ok::<_, Infallible>(answer) }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .max_headers(MAX_HEADERS)
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = served {
        tracing::debug!("metrics connection: {e}");
    }
}

/// The answer to `method` on `path`.
pub fn respond(shared: &Shared, method: &Method, path: &str) -> Response<Full<Bytes>> {
    let text = |status: StatusCode, body: String| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        r
    };
    if path != PATH {
        return text(
            StatusCode::NOT_FOUND,
            format!("not found: the metrics are at {PATH}\n"),
        );
    }
    if method != Method::GET && method != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("method {method} not allowed: GET {PATH}\n"),
        );
        r.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let mut r = text(StatusCode::OK, crate::metrics::render(shared));
    let kind = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    r
}
