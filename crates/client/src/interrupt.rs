//! Ctrl-C during `osps-client run`: the first SIGINT cancels the job on the
//! dispatcher (a `cancel` on the job's connection) and the client exits 130
//! once the dispatcher answers it `Cancelled`, or after [`CANCEL_WAIT`]
//! without that answer; a second SIGINT exits at once. Before the request
//! is sent whole there is nothing to cancel (the dispatcher drops a request
//! whose connection ends inside it): the client exits at once.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use osps_client::Canceller;
use signal_hook::consts::SIGINT;
use signal_hook::iterator::Signals;

/// The exit status of a command ended by SIGINT, as a shell reports it (128 + 2).
pub const EXIT_INTERRUPTED: u8 = 130;
/// How long the client waits for the cancelled job's answer after Ctrl-C.
pub const CANCEL_WAIT: Duration = Duration::from_secs(2);

/// The canceller of the job being waited for, if one is.
type Armed = Arc<Mutex<Option<Canceller>>>;

/// Ctrl-C's handler: a thread reading SIGINT (`signal-hook`), and the job
/// it would cancel.
pub struct CtrlC {
    armed: Armed,
}

impl CtrlC {
    /// Takes SIGINT from now on.
    pub fn install() -> io::Result<CtrlC> {
        let armed = Armed::default();
        let mut signals = Signals::new([SIGINT])?;
        let job = Arc::clone(&armed);
        std::thread::Builder::new()
            .name("ctrl-c".into())
            .spawn(move || {
                let mut seen = signals.forever();
                if seen.next().is_some() {
                    first(&job);
                }
                if seen.next().is_some() {
                    quit("interrupted");
                }
            })?;
        Ok(CtrlC { armed })
    }

    /// Ctrl-C cancels through `canceller` until the guard is dropped.
    pub fn arm(&self, canceller: Canceller) -> Disarm<'_> {
        *lock(&self.armed) = Some(canceller);
        Disarm(&self.armed)
    }
}

/// Takes the canceller back when dropped (the job was answered).
pub struct Disarm<'a>(&'a Armed);

impl Drop for Disarm<'_> {
    fn drop(&mut self) {
        lock(self.0).take();
    }
}

fn lock(armed: &Armed) -> MutexGuard<'_, Option<Canceller>> {
    armed
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The first Ctrl-C: cancel the job, and leave if its answer does not come.
fn first(job: &Armed) {
    let sent = match lock(job).as_ref() {
        None => quit("interrupted; no job of ours was pending on the dispatcher"),
        Some(canceller) => canceller.cancel(Duration::from_secs(1)),
    };
    if let Err(e) = sent {
        quit(&format!("interrupted; the cancel could not be sent ({e})"));
    }
    // The main thread reports the job's `Cancelled` answer and exits 130.
    std::thread::spawn(|| {
        std::thread::sleep(CANCEL_WAIT);
        quit(&format!(
            "interrupted; the dispatcher did not answer the cancel within {} s",
            CANCEL_WAIT.as_secs()
        ));
    });
}

fn quit(line: &str) -> ! {
    eprintln!("osps-client: {line}");
    std::process::exit(i32::from(EXIT_INTERRUPTED))
}
