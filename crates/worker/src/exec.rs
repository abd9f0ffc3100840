//! Command pools: `osps-worker` in exec mode.
