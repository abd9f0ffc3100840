//! Criterion micro-benchmarks for the slot allocator (`SlotAllocator`) over a
//! 256 MiB arena: the 4 KiB alloc+free hot path, a steady state of mixed
//! sizes with 64 live slots, and construction.
//!
//! Run with `cargo bench -p ipc-core --bench alloc`.

use std::collections::VecDeque;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ipc_core::alloc::{Slot, SlotAllocator};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
/// The arena every benchmark allocates from.
const ARENA: u64 = 256 * MIB;
/// Live slots in the mixed-size steady state.
const LIVE: usize = 64;

/// Request lengths for the mixed-size benchmark, used in this order, round
/// and round. Mostly small, a few large, two that are not powers of two
/// (rounded up to 8 KiB and 512 KiB). With 64 live slots each entry is live
/// exactly four times, about 78 MiB in all: the arena never runs out.
const MIXED: [u64; 16] = [
    4 * KIB,
    8 * KIB,
    4 * KIB,
    64 * KIB,
    5_000,
    MIB,
    16 * KIB,
    4 * KIB,
    256 * KIB,
    4 * KIB,
    16 * MIB,
    32 * KIB,
    300_000,
    2 * MIB,
    128 * KIB,
    4 * KIB,
];

/// Alloc then free one 4 KiB slot: the path every small request takes.
fn alloc_free_4k(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc/alloc_free_4k");
    // One element is one alloc + free pair.
    group.throughput(Throughput::Elements(1));

    // Empty arena: the 4 KiB slot is split off the one 256 MiB free block
    // and merged back into it on free. (This was the longest path of the
    // buddy allocator this TLSF one replaced: 16 splits and 16 merges.)
    let mut a = SlotAllocator::new(ARENA);
    group.bench_function("empty_arena", |b| {
        b.iter(|| {
            let s = a.alloc(black_box(4 * KIB)).expect("alloc");
            a.free(black_box(s));
        })
    });
    assert_eq!(a.in_use(), 0);

    // One 4 KiB slot held at the arena's start: the new slot is split off
    // the free block after it and merges back into it on free, its other
    // neighbour being held. (The id is from the buddy allocator's days.)
    let mut a = SlotAllocator::new(ARENA);
    let held = a.alloc(4 * KIB).expect("alloc");
    group.bench_function("buddy_held", |b| {
        b.iter(|| {
            let s = a.alloc(black_box(4 * KIB)).expect("alloc");
            a.free(black_box(s));
        })
    });
    a.free(held);
    assert_eq!(a.in_use(), 0);

    group.finish();
}

/// Steady state with [`LIVE`] slots of mixed sizes: free the oldest, alloc
/// the next length of [`MIXED`].
fn mixed_steady_state(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc/mixed_4k_16m");
    // One element is one free + one alloc.
    group.throughput(Throughput::Elements(1));

    let mut a = SlotAllocator::new(ARENA);
    let mut next = 0usize;
    let mut live: VecDeque<Slot> = VecDeque::with_capacity(LIVE);
    for _ in 0..LIVE {
        live.push_back(a.alloc(MIXED[next]).expect("pre-fill"));
        next = (next + 1) % MIXED.len();
    }

    group.bench_function("live_64", |b| {
        b.iter(|| {
            let oldest = live.pop_front().expect("a live slot");
            a.free(black_box(oldest));
            let s = a.alloc(black_box(MIXED[next])).expect("mixed alloc");
            next = (next + 1) % MIXED.len();
            live.push_back(s);
        })
    });
    assert_eq!(a.in_use(), LIVE);

    group.finish();
}

/// `SlotAllocator::new` over 256 MiB (65,536 pages); includes the drop.
fn construction(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc/new");
    group.throughput(Throughput::Elements(1));
    group.bench_function("256mib", |b| {
        b.iter(|| SlotAllocator::new(black_box(ARENA)))
    });
    group.finish();
}

criterion_group!(benches, alloc_free_4k, mixed_steady_state, construction);
criterion_main!(benches);
