//! Log set-up shared by the binaries: `tracing` to stderr, filtered by
//! `RUST_LOG` (default `info`), each line naming the role and pid.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber for a process playing `role`. Call once,
/// from `main`. Returns a guard span to keep entered for the process's life.
pub fn init(role: &'static str) -> tracing::span::EnteredSpan {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    tracing::info_span!("osps", role, pid = std::process::id()).entered()
}
