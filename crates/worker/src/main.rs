//! `osps-worker`: the builtin worker, the SDK serving the builtin
//! operations, or with `--exec-op` a command pool's worker running a
//! command per job ([`osps_worker::exec`]). Started by the dispatcher with
//! its stdin and stdout as the job and result pipes; can be run alone for
//! debugging by feeding it frames. With `--contain-memory BYTES -- PROGRAM`
//! first, it is the launcher of a worker under a memory limit (`contain`).

mod contain;

fn main() -> std::process::ExitCode {
    if let Some(failed) = contain::launch_if_asked() {
        return failed;
    }
    osps_worker::exec::main()
}
