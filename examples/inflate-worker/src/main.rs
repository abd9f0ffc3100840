//! `inflate-worker`: an example OSPS worker written with the SDK. It
//! decompresses untrusted gzip (a classic place for a decoder bug to take
//! its process down: here it takes down one worker, which the dispatcher
//! replaces) and compresses.
//!
//! Serve it: `osps-dispatcher --worker-exe target/debug/inflate-worker`.
//! Ops:
//! - `gunzip`: the payload is gzip (one member or several, as `gunzip`
//!   reads them); answers what is inside. The result is written straight
//!   into the shared segment as it is decoded ([`JobCtx::input_and_writer`])
//!   and grows past the slot as needed, up to the pool's `max_result_mib`
//!   (past it, `too large`: a decompression bomb costs one refused job).
//!   Corrupt gzip: `invalid input`.
//! - `gunzip_crc32`: the payload is gzip; answers `<decompressed bytes>
//!   <CRC-32 of them, 8 hex digits>\n`. Streaming: it starts while a large
//!   upload still arrives. Corrupt gzip: `invalid input`.
//! - `gzip [LEVEL]`: the payload compressed as gzip (level 0 to 9, 6 by
//!   default), written straight into the segment as it is made, so a result
//!   larger than the input (random data grows by a few bytes per 64 KiB) is
//!   no problem.

use std::io::Write;

use osps_worker::{
    expect_args, invalid_input, io_error, Call, Input, JobCtx, Output, RemoteError, Worker,
};

fn main() -> std::process::ExitCode {
    Worker::new("inflate-worker")
        .streaming_op("gunzip_crc32", gunzip_crc32)
        .op("gunzip", gunzip)
        .op("gzip", gzip)
        .run()
}

/// Counts and checksums what the decoder writes, keeping none of it.
#[derive(Default)]
struct Sink {
    len: u64,
    crc: crc32fast::Hasher,
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.len += buf.len() as u64;
        self.crc.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn gunzip_crc32(call: &Call<'_>, input: &mut dyn Input) -> Result<String, RemoteError> {
    expect_args(call.args(), 0, "gunzip_crc32")?;
    let corrupt = |e: std::io::Error| invalid_input(format!("not valid gzip: {e}"));
    let mut decoder = flate2::write::GzDecoder::new(Sink::default());
    while let Some(chunk) = input.next_chunk()? {
        decoder.write_all(chunk).map_err(corrupt)?;
    }
    // `finish` checks the trailer (CRC and length) and fails on a truncated stream.
    let sink = decoder.finish().map_err(corrupt)?;
    Ok(format!("{} {:08x}\n", sink.len, sink.crc.finalize()))
}

fn gunzip(job: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    expect_args(job.args(), 0, "gunzip")?;
    let (input, mut out) = job.input_and_writer();
    let mut decoder = flate2::read::MultiGzDecoder::new(input);
    // A write error is the writer's (no room: `too large`); a read error,
    // the decoder's (corrupt or truncated input).
    std::io::copy(&mut decoder, &mut out)
        .map_err(|e| io_error(e, |e| invalid_input(format!("not valid gzip: {e}"))))?;
    out.finish()
}

fn gzip(job: &mut JobCtx<'_>) -> Result<Output, RemoteError> {
    let level = match job.args() {
        [] => 6,
        [level] => level
            .parse::<u32>()
            .ok()
            .filter(|&l| l <= 9)
            .ok_or_else(|| invalid_input(format!("gzip level is 0 to 9, got {level:?}")))?,
        more => {
            return Err(invalid_input(format!(
                "expected at most 1 argument, got {}; usage: gzip [LEVEL]",
                more.len()
            )))
        }
    };
    let (input, out) = job.input_and_writer();
    let mut encoder = flate2::write::GzEncoder::new(out, flate2::Compression::new(level));
    let write = |e: std::io::Error| io_error(e, |e| invalid_input(format!("gzip: {e}")));
    encoder.write_all(input).map_err(write)?;
    encoder.finish().map_err(write)?.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `op` on `input` in a slot with 4 KiB of free room, as the
    /// dispatcher makes it; a larger result grows in memory (no dispatcher).
    fn run(
        op: fn(&mut JobCtx<'_>) -> Result<Output, RemoteError>,
        input: &[u8],
    ) -> Result<Vec<u8>, RemoteError> {
        run_where(op, input).map(|(bytes, _)| bytes)
    }

    /// As [`run`], and whether the result left the slot.
    fn run_where(
        op: fn(&mut JobCtx<'_>) -> Result<Output, RemoteError>,
        input: &[u8],
    ) -> Result<(Vec<u8>, bool), RemoteError> {
        let mut slot = input.to_vec();
        slot.resize(input.len() + 4096, 0);
        let mut job = JobCtx::new(&[], 1, &mut slot, input.len());
        let out = op(&mut job)?;
        Ok((job.result(&out).unwrap().to_vec(), out.in_area()))
    }

    #[test]
    fn gzip_then_gunzip_gives_back_the_input_and_its_length_and_crc() {
        let text = b"hello hello hello hello\n".repeat(100);
        let gz = run(gzip, &text).unwrap();
        assert!(gz.len() < text.len());
        let call = Call {
            args: &[],
            attempt: 1,
        };
        let answer = gunzip_crc32(&call, &mut osps_worker::Whole(Some(&gz))).unwrap();
        assert_eq!(
            answer,
            format!("{} {:08x}\n", text.len(), crc32fast::hash(&text))
        );
        let err = gunzip_crc32(&call, &mut osps_worker::Whole(Some(&gz[..gz.len() - 3])));
        assert_eq!(err.unwrap_err().kind, osps_worker::ErrorKind::InvalidInput);
        // The result is larger than the slot: it grows.
        assert_eq!(run(gunzip, &gz).unwrap(), text);
        let e = run(gunzip, &gz[..gz.len() - 3]).unwrap_err();
        assert_eq!(e.kind, osps_worker::ErrorKind::InvalidInput);
        assert!(e.message.starts_with("not valid gzip"), "{e}");
    }

    #[test]
    fn random_data_grows_under_gzip_past_its_slot() {
        let data = osps_testkit::noise(1 << 20);
        let (gz, grew) = run_where(gzip, &data).unwrap();
        assert!(gz.len() > data.len() && grew, "{} bytes", gz.len());
        assert_eq!(run(gunzip, &gz).unwrap(), data);
        // Two members, as `gunzip` reads them.
        let mut two = run(gzip, b"one ").unwrap();
        two.extend(run(gzip, b"two").unwrap());
        assert_eq!(run(gunzip, &two).unwrap(), b"one two");
    }
}
