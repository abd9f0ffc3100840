//! `osps-worker`: the builtin worker, the SDK serving the builtin
//! operations, or with `--exec-op` a command pool's worker running a
//! command per job ([`osps_worker::exec`]). Started by the dispatcher with
//! its stdin and stdout as the job and result pipes; can be run alone for
//! debugging by feeding it frames.

fn main() -> std::process::ExitCode {
    osps_worker::exec::main()
}
