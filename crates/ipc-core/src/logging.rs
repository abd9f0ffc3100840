//! Log set-up shared by the binaries: `tracing` to stderr, filtered by
//! `RUST_LOG` (default `info`; e.g. `RUST_LOG=debug`,
//! `RUST_LOG=info,dispatcher=debug`), each line naming the role and pid.
//! Human-readable by default; one JSON object per line with
//! `--log-format json` (or `OSPS_LOG_FORMAT=json`), which the watchdog and
//! the dispatcher pass on to the processes they start.

use std::sync::OnceLock;

#[cfg(feature = "logging")]
use tracing_subscriber::EnvFilter;

/// The environment variable that carries the log format to child processes.
pub const ENV_LOG_FORMAT: &str = crate::env::LOG_FORMAT;

/// How log lines look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// `2026-11-24T08:03:24.319Z  INFO osps{role="dispatcher" pid=11252}: message key=value`
    #[default]
    Text,
    /// `{"timestamp":...,"level":"INFO","fields":{"message":...},"spans":[{"role":...,"pid":...,"name":"osps"}]}`
    Json,
}

impl LogFormat {
    /// The name used on command lines and in [`ENV_LOG_FORMAT`].
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

impl std::str::FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format {other:?}: expected text or json")),
        }
    }
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// The format this process logs in (to pass on to the processes it starts).
pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// Installs the global subscriber for a process playing `role`. Call once,
/// from `main`. Returns a guard span to keep entered for the process's life.
#[cfg(feature = "logging")]
pub fn init(role: &'static str, format: LogFormat) -> tracing::span::EnteredSpan {
    let _ = FORMAT.set(format);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
    tracing::info_span!("osps", role, pid = std::process::id()).entered()
}
