//! `osps-worker`: the builtin worker, the SDK serving the builtin
//! operations. Started by the dispatcher with its stdin and stdout as the
//! job and result pipes; can be run alone for debugging by feeding it frames.

fn main() -> std::process::ExitCode {
    osps_worker::Worker::new("osps-worker")
        .ops(osps_worker::ops::OPS)
        .run()
}
