//! Progress of `osps-client run` on a terminal: a bar while the payload is
//! sent, a spinner while the job runs, a bar while the result comes back.
//! Drawn on stderr only when stderr is a terminal and the payload or the
//! result is large; nothing at all when piped.

use std::io::{self, IsTerminal, Read, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Below this many bytes a transfer is over before a bar would help.
pub const THRESHOLD: u64 = 1 << 20;

/// One request's progress display (hidden when not drawing).
pub struct Progress {
    bar: ProgressBar,
    drawing: bool,
    /// The result goes to the terminal the bar is drawn on: the bar must be
    /// gone before its bytes are written, or they land after it on its line
    /// and the bar's text stays on the screen.
    result_on_terminal: bool,
}

fn worth_drawing(len: u64) -> bool {
    len >= THRESHOLD && io::stderr().is_terminal()
}

impl Progress {
    /// A display for sending `len` payload bytes to `op`; draws only on a
    /// terminal and when `len` is at least [`THRESHOLD`] (the result may still
    /// turn it on, see [`Progress::receiving`]).
    /// `result_on_terminal`: the result is written to stdout, which is a terminal.
    pub fn new(op: &str, len: u64, result_on_terminal: bool) -> Progress {
        let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::hidden());
        bar.set_style(bytes_style("sending"));
        bar.set_message(format!("running {op}"));
        let mut p = Progress {
            bar,
            drawing: false,
            result_on_terminal,
        };
        if worth_drawing(len) {
            p.draw();
        }
        p
    }

    fn draw(&mut self) {
        self.bar.set_draw_target(ProgressDrawTarget::stderr());
        self.drawing = true;
    }

    /// Counts bytes read from `input` as sent; when they are all sent, shows
    /// a spinner until the answer comes.
    pub fn reader<R: Read>(&self, input: R) -> Counted<R> {
        Counted {
            inner: input,
            bar: self.bar.clone(),
            spin_when_full: true,
        }
    }

    /// The answer has come with `len` result bytes: a bar for them, unless
    /// they go to the terminal itself (then the display is removed first).
    pub fn receiving(&mut self, len: u64) {
        if self.result_on_terminal {
            self.clear();
            self.bar.set_draw_target(ProgressDrawTarget::hidden());
            self.drawing = false;
            return;
        }
        if !self.drawing && worth_drawing(len) {
            self.draw();
        }
        self.bar.disable_steady_tick();
        self.bar.set_style(bytes_style("receiving"));
        self.bar.set_length(len);
        self.bar.set_position(0);
    }

    /// Counts bytes written to `output` as received.
    pub fn writer<W: Write>(&self, output: W) -> Counted<W> {
        Counted {
            inner: output,
            bar: self.bar.clone(),
            spin_when_full: false,
        }
    }

    /// Removes the display (on success, failure or retry alike).
    pub fn clear(&self) {
        self.bar.disable_steady_tick();
        self.bar.finish_and_clear();
    }
}

fn bytes_style(what: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{what:>9} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{binary_bytes_per_sec}} eta {{eta}}"
    ))
    .expect("valid template")
    .progress_chars("=> ")
}

/// A reader or writer that advances a bar.
pub struct Counted<T> {
    inner: T,
    bar: ProgressBar,
    /// For the payload's reader: once all is sent, spin until the answer.
    spin_when_full: bool,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        if self.spin_when_full && self.bar.length().is_some_and(|l| self.bar.position() >= l) {
            self.spin_when_full = false;
            self.bar.set_style(
                ProgressStyle::with_template("{spinner} {msg} {elapsed}").expect("valid template"),
            );
            self.bar.enable_steady_tick(Duration::from_millis(100));
        }
        Ok(n)
    }
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
