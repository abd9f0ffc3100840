//! A worker built with the SDK whose operations fail on purpose, for the
//! SDK's tests (`crates/worker/tests/sdk.rs`): a panic, a panic on the first
//! attempt only, a panic in a streaming operation, and a returned error.

use osps_worker::{invalid_input, Worker};

fn main() -> std::process::ExitCode {
    Worker::new("panicky-worker")
        .op("panic", |job| panic!("boom {}", job.args().join(" ")))
        .op("panic_once", |job| {
            if job.attempt() == 1 {
                panic!("first attempt");
            }
            let answer = format!("attempt {}\n", job.attempt());
            job.reply(answer.as_bytes())
        })
        .streaming_op("panic_streaming", |_call, input| {
            let mut seen = 0usize;
            while let Some(chunk) = input.next_chunk()? {
                seen += chunk.len();
                if seen > 1 << 20 {
                    panic!("past 1 MiB");
                }
            }
            Ok(seen.to_string())
        })
        .op("fail", |_job| Err(invalid_input("nope")))
        .run()
}
