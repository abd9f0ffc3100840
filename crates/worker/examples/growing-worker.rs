//! A worker built with the SDK whose results outgrow their slot, for the
//! SDK's tests (`crates/worker/tests/grow.rs`): `repeat N` writes its input
//! N times through the result writer; `reply_repeat N` builds the same in
//! memory and answers it with `JobCtx::reply`.

use std::io::Write;

use osps_worker::{expect_args, invalid_input, io_error, ErrorKind, JobCtx, RemoteError, Worker};

fn times(job: &JobCtx<'_>) -> Result<usize, RemoteError> {
    expect_args(job.args(), 1, "repeat N")?;
    job.args()[0]
        .parse()
        .map_err(|_| invalid_input(format!("not a count: {:?}", job.args()[0])))
}

fn main() -> std::process::ExitCode {
    Worker::new("growing-worker")
        .op("repeat", |job| {
            let n = times(job)?;
            let (input, mut out) = job.input_and_writer();
            for _ in 0..n {
                out.write_all(input).map_err(|e| {
                    io_error(e, |e| RemoteError::new(ErrorKind::Internal, e.to_string()))
                })?;
            }
            out.finish()
        })
        .op("reply_repeat", |job| {
            let n = times(job)?;
            let bytes = job.input().repeat(n);
            job.reply(&bytes)
        })
        .run()
}
