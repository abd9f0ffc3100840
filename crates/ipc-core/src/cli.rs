//! The command-line flags every OSPS binary shares, defined once: each
//! binary flattens the groups it takes into its own clap arguments
//! (`#[command(flatten)]`), so their names, defaults, environment variables
//! and help read the same everywhere.

use std::path::PathBuf;

use crate::logging::LogFormat;

/// `--log-format` (the dispatcher, the watchdog, the worker).
#[derive(Debug, Clone, clap::Args)]
pub struct LogArgs {
    /// Log lines: text for people, json (one object per line) for machines. Filter with RUST_LOG.
    #[arg(long, env = crate::env::LOG_FORMAT, default_value = "text")]
    pub log_format: LogFormat,
}

/// `--instance` and `--runtime-dir`: which instance, and where its runtime
/// directory is (the dispatcher, the watchdog, the client). Global, so a
/// binary with subcommands takes them before or after the subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct InstanceArgs {
    /// Instance name: the socket, lock file and segment names contain it.
    #[arg(long, global = true, env = crate::env::INSTANCE, default_value = crate::paths::DEFAULT_INSTANCE)]
    pub instance: String,
    /// Base runtime directory [default: $XDG_RUNTIME_DIR/osps, else /tmp/osps-<uid>].
    #[arg(long, global = true, env = crate::env::RUNTIME_DIR)]
    pub runtime_dir: Option<PathBuf>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Both {
        #[command(flatten)]
        log: LogArgs,
        #[command(flatten)]
        instance: InstanceArgs,
    }

    #[test]
    fn defaults_and_values() {
        // The environment may name an instance or format; a flag wins over it.
        let b = Both::parse_from(["t", "--instance", "x", "--log-format", "json"]);
        assert_eq!(b.instance.instance, "x");
        assert_eq!(b.log.log_format, LogFormat::Json);
        let b = Both::parse_from(["t", "--runtime-dir", "/run/o", "--log-format", "text"]);
        assert_eq!(b.instance.runtime_dir, Some(PathBuf::from("/run/o")));
        assert_eq!(b.log.log_format, LogFormat::Text);
        assert!(Both::try_parse_from(["t", "--log-format", "xml"]).is_err());
    }

    #[test]
    fn the_flags_read_their_environment_variables() {
        let cmd = <Both as clap::CommandFactory>::command();
        let env_of = |name: &str| {
            cmd.get_arguments()
                .find(|a| a.get_long() == Some(name))
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(env_of("log-format").as_deref(), Some("OSPS_LOG_FORMAT"));
        assert_eq!(env_of("instance").as_deref(), Some("OSPS_INSTANCE"));
        assert_eq!(env_of("runtime-dir").as_deref(), Some("OSPS_RUNTIME_DIR"));
    }
}
