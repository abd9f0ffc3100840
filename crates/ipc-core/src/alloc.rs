//! The slot allocator: a binary buddy allocator over the segment's arena.
//!
//! Only the dispatcher allocates. Blocks are powers of two from
//! [`MIN_BLOCK`] up to the largest that fits; allocation and release are
//! O(log(arena / MIN_BLOCK)) — at most a few dozen steps — with intrusive
//! doubly-linked free lists, and freed buddies merge back, so mixed sizes do
//! not fragment the arena into failure. Pure logic: no memory is touched.

use crate::segment::Region;

/// Smallest block: one page.
pub const MIN_BLOCK: u64 = 4096;
const NIL: u32 = u32::MAX;

/// Why an allocation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// Larger than the largest block the arena can ever hold.
    #[error("{requested} bytes exceed the largest slot of {max} bytes")]
    TooLarge { requested: u64, max: u64 },
    /// No free block is big enough right now; retry after a release.
    #[error("no free slot of {requested} bytes right now")]
    Exhausted { requested: u64 },
}

/// An allocated slot. Not `Clone`: releasing consumes it, so a slot cannot be
/// freed twice.
#[derive(Debug, PartialEq, Eq)]
pub struct Slot {
    index: u32,
    order: u8,
}

impl Slot {
    /// The slot's bytes in the arena.
    pub fn region(&self) -> Region {
        Region {
            offset: self.index as u64 * MIN_BLOCK,
            len: MIN_BLOCK << self.order,
        }
    }
}

/// The buddy allocator's state.
#[derive(Debug)]
pub struct SlotAllocator {
    blocks: u32,
    max_order: u8,
    /// Per order: first free block, or NIL.
    heads: Vec<u32>,
    next: Vec<u32>,
    prev: Vec<u32>,
    /// For each block that starts a free run: its order; `u8::MAX` otherwise.
    free_order: Vec<u8>,
    in_use: usize,
    bytes_in_use: u64,
}

impl SlotAllocator {
    /// An allocator over `arena_len` bytes (rounded down to [`MIN_BLOCK`]).
    pub fn new(arena_len: u64) -> Self {
        let blocks = u32::try_from(arena_len / MIN_BLOCK).expect("arena below 16 TiB");
        let max_order = if blocks == 0 {
            0
        } else {
            (31 - blocks.leading_zeros()) as u8
        };
        let mut a = SlotAllocator {
            blocks,
            max_order,
            heads: vec![NIL; max_order as usize + 1],
            next: vec![NIL; blocks as usize],
            prev: vec![NIL; blocks as usize],
            free_order: vec![u8::MAX; blocks as usize],
            in_use: 0,
            bytes_in_use: 0,
        };
        // Carve the arena into maximal aligned power-of-two blocks.
        let mut i = 0u32;
        while i < blocks {
            let mut order = max_order;
            while !i.is_multiple_of(1 << order) || i + (1 << order) > blocks {
                order -= 1;
            }
            a.push(i, order);
            i += 1 << order;
        }
        a
    }

    /// The largest slot this arena can give, in bytes (0 if the arena is empty).
    pub fn max_slot(&self) -> u64 {
        if self.blocks == 0 {
            0
        } else {
            MIN_BLOCK << self.max_order
        }
    }

    /// Slots currently allocated.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Bytes currently allocated (whole blocks).
    pub fn bytes_in_use(&self) -> u64 {
        self.bytes_in_use
    }

    /// Allocates a slot of at least `len` bytes (at least one block).
    pub fn alloc(&mut self, len: u64) -> Result<Slot, AllocError> {
        let blocks_needed = len.div_ceil(MIN_BLOCK).max(1);
        let order = blocks_needed.next_power_of_two().trailing_zeros();
        if self.blocks == 0 || order > self.max_order as u32 {
            return Err(AllocError::TooLarge {
                requested: len,
                max: self.max_slot(),
            });
        }
        let order = order as u8;
        let mut k = order;
        while self.heads[k as usize] == NIL {
            if k == self.max_order {
                return Err(AllocError::Exhausted { requested: len });
            }
            k += 1;
        }
        let index = self.heads[k as usize];
        self.remove(index, k);
        while k > order {
            k -= 1;
            self.push(index + (1 << k), k);
        }
        self.in_use += 1;
        self.bytes_in_use += MIN_BLOCK << order;
        Ok(Slot { index, order })
    }

    /// Returns a slot; merges it with its free buddies.
    pub fn free(&mut self, slot: Slot) {
        let Slot {
            mut index,
            mut order,
        } = slot;
        self.in_use -= 1;
        self.bytes_in_use -= MIN_BLOCK << order;
        while order < self.max_order {
            let buddy = index ^ (1 << order);
            if buddy >= self.blocks || self.free_order[buddy as usize] != order {
                break;
            }
            self.remove(buddy, order);
            index = index.min(buddy);
            order += 1;
        }
        self.push(index, order);
    }

    fn push(&mut self, i: u32, order: u8) {
        let head = self.heads[order as usize];
        self.next[i as usize] = head;
        self.prev[i as usize] = NIL;
        if head != NIL {
            self.prev[head as usize] = i;
        }
        self.heads[order as usize] = i;
        self.free_order[i as usize] = order;
    }

    fn remove(&mut self, i: u32, order: u8) {
        let (p, n) = (self.prev[i as usize], self.next[i as usize]);
        if p == NIL {
            self.heads[order as usize] = n;
        } else {
            self.next[p as usize] = n;
        }
        if n != NIL {
            self.prev[n as usize] = p;
        }
        self.free_order[i as usize] = u8::MAX;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn sizes_round_up_to_powers_of_two_pages() {
        let mut a = SlotAllocator::new(16 * MIB);
        assert_eq!(a.max_slot(), 16 * MIB);
        for (len, want) in [
            (0, 4096),
            (1, 4096),
            (4096, 4096),
            (4097, 8192),
            (MIB + 1, 2 * MIB),
        ] {
            let s = a.alloc(len).unwrap();
            assert_eq!(s.region().len, want, "len {len}");
            a.free(s);
        }
        assert_eq!(a.in_use(), 0);
    }

    #[test]
    fn exhaustion_is_an_error_not_a_panic_and_recovers() {
        let mut a = SlotAllocator::new(64 * 1024);
        let slots: Vec<_> = (0..16).map(|_| a.alloc(1).unwrap()).collect();
        assert_eq!(a.alloc(1), Err(AllocError::Exhausted { requested: 1 }));
        assert!(matches!(a.alloc(1 << 20), Err(AllocError::TooLarge { .. })));
        for s in slots {
            a.free(s);
        }
        // Everything merged back: the whole arena is one block again.
        let whole = a.alloc(64 * 1024).unwrap();
        assert_eq!(
            whole.region(),
            Region {
                offset: 0,
                len: 64 * 1024
            }
        );
    }

    #[test]
    fn regions_never_overlap_and_stay_in_the_arena() {
        let arena = 10 * MIB + 12 * 1024; // not a power of two
        let mut a = SlotAllocator::new(arena);
        let mut live: Vec<Slot> = Vec::new();
        let mut seed = 0x9e3779b97f4a7c15u64;
        for step in 0..20_000u32 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            if seed.is_multiple_of(3) && !live.is_empty() {
                let s = live.swap_remove((seed as usize / 3) % live.len());
                a.free(s);
            } else {
                let len = 1 + (seed >> 20) % (MIB / (1 + (seed % 8)));
                if let Ok(s) = a.alloc(len) {
                    assert!(s.region().len >= len);
                    live.push(s);
                }
            }
            if step.is_multiple_of(997) {
                let mut rs: Vec<Region> = live.iter().map(Slot::region).collect();
                rs.sort_by_key(|r| r.offset);
                for w in rs.windows(2) {
                    assert!(
                        w[0].offset + w[0].len <= w[1].offset,
                        "overlap at step {step}"
                    );
                }
                assert!(rs.last().is_none_or(|r| r.offset + r.len <= arena));
                assert_eq!(a.in_use(), live.len());
            }
        }
        for s in live.drain(..) {
            a.free(s);
        }
        assert_eq!(a.bytes_in_use(), 0);
        // After all frees the largest block is available again.
        let big = a.alloc(a.max_slot()).unwrap();
        a.free(big);
    }

    #[test]
    fn an_empty_arena_refuses_cleanly() {
        let mut a = SlotAllocator::new(100);
        assert!(matches!(a.alloc(1), Err(AllocError::TooLarge { .. })));
    }
}
