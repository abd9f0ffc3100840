//! How much of the segment a worker keeps mapped. When a process dies, the
//! kernel tears down its memory map before it closes its files, so the
//! dispatcher learns of a killed worker (EOF on its pipe) only once every
//! page-table entry the worker had for the segment is gone: 16–41 ms under
//! load (median, `cargo xtask bench` o8) for a worker that had mapped all of
//! a 256 MiB segment. So a worker does not map the whole segment ahead of
//! use; it counts the bytes its jobs were given (slots and results; a result
//! in the slot counts twice, so the budget errs low), and past [`BUDGET`],
//! between jobs, drops its page-table entries for the segment
//! ([`Segment::drop_page_tables`]: the bytes stay in the segment; pages
//! fault back in on next use). It does so after the answer is sent, so the
//! answer does not wait for it; a job sent ahead does, as long as the
//! kernel takes to unmap what was mapped (what a kill would have cost).

use ipc_core::Segment;

/// Bytes of the segment a worker's jobs may touch before it drops its
/// page-table entries for the segment: at most this much (and the job
/// running) is left for the kernel to tear down when the worker is killed.
pub(crate) const BUDGET: u64 = 16 << 20;

/// Bytes of the segment touched since the last drop.
#[derive(Debug, Default)]
pub(crate) struct Footprint {
    touched: u64,
}

impl Footprint {
    /// After a job's answer is sent: counts the bytes it may have touched
    /// (its slot and its result), and drops the segment's page-table
    /// entries once past the budget. A failed drop is logged and changes
    /// nothing else (the worker serves on, mapping more).
    pub(crate) fn after_job(&mut self, segment: &Segment, touched: u64) {
        self.touched = self.touched.saturating_add(touched);
        if self.touched < BUDGET {
            return;
        }
        match segment.drop_page_tables() {
            Ok(()) => tracing::trace!(bytes = self.touched, "dropped the segment's page tables"),
            Err(e) => tracing::debug!("cannot drop the segment's page tables: {e}"),
        }
        self.touched = 0;
    }
}
