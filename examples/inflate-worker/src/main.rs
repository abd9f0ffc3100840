//! `inflate-worker`: an example OSPS worker written with the SDK. It
//! decompresses untrusted gzip (a classic place for a decoder bug to take
//! its process down: here it takes down one worker, which the dispatcher
//! replaces) and compresses.
//!
//! Serve it: `osps-dispatcher --worker-exe target/debug/inflate-worker`.
//! Ops:
//! - `gunzip_crc32`: the payload is gzip; answers `<decompressed bytes>
//!   <CRC-32 of them, 8 hex digits>\n`. Streaming: it starts while a large
//!   upload still arrives. Corrupt gzip: `invalid input`.
//! - `gzip [LEVEL]`: the payload compressed as gzip (level 0 to 9, 6 by
//!   default). The result must fit in the slot (the input plus 4 KiB):
//!   deflate stores incompressible data in blocks of up to 64 KiB with 5
//!   bytes of header each, so random data up to about 50 MiB fits.

use std::io::Write;

use osps_worker::{expect_args, invalid_input, Call, Input, JobCtx, Output, RemoteError, Worker};

fn main() -> std::process::ExitCode {
    Worker::new("inflate-worker")
        .streaming_op("gunzip_crc32", gunzip_crc32)
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
    let mut encoder = flate2::write::GzEncoder::new(
        Vec::with_capacity(job.input().len() / 2 + 64),
        flate2::Compression::new(level),
    );
    let write = |e: std::io::Error| invalid_input(format!("gzip: {e}"));
    encoder.write_all(job.input()).map_err(write)?;
    let compressed = encoder.finish().map_err(write)?;
    job.reply(&compressed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_gzip(input: &[u8]) -> Vec<u8> {
        let mut slot = input.to_vec();
        slot.resize(input.len() + 4096, 0);
        let mut job = JobCtx::new(&[], 1, &mut slot, input.len());
        let out = gzip(&mut job).unwrap();
        slot[out.offset..out.offset + out.len].to_vec()
    }

    #[test]
    fn gzip_then_gunzip_gives_back_the_length_and_crc() {
        let text = b"hello hello hello hello\n".repeat(100);
        let gz = run_gzip(&text);
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
    }
}
