//! The slot allocator: a two-level segregated fit (TLSF) allocator over the
//! segment's arena, in pages of [`MIN_BLOCK`] bytes.
//!
//! Only the dispatcher allocates. Free blocks sit in lists by size class:
//! first level the power of two, second level one of 16 steps within it, with
//! a bitmap of non-empty lists at each level. Allocation finds a list whose
//! every block fits with two bit scans (failing that, it tries the first
//! block of the request's own class), takes that block and splits off the
//! rest; release merges the block with its free physical neighbours. Both
//! take a fixed number of steps whatever the number or sizes of live slots:
//! O(1). A slot is the request rounded up to whole pages (no power-of-two
//! rounding), and freed neighbours always merge, so mixed sizes do not
//! fragment the arena into failure: once everything is freed the arena is one
//! block again. Pure logic: no memory in the segment is touched.

use crate::segment::Region;

/// Smallest block: one page.
pub const MIN_BLOCK: u64 = 4096;
const NIL: u32 = u32::MAX;
/// Second-level lists per power of two: 2^SL_BITS.
const SL_BITS: u32 = 4;
const SL: u32 = 1 << SL_BITS;
/// First-level classes: sizes below 16 pages, then one per power of two up to 2^31 pages.
const FL: usize = 32 - SL_BITS as usize + 1;

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
/// freed twice, and (through [`crate::segment::Arena`]) holding `&mut` of it
/// is what gives `&mut` of its bytes. It carries its allocator's identity.
#[derive(Debug, PartialEq, Eq)]
pub struct Slot {
    start: u32,
    pages: u32,
    arena: u64,
}

impl Slot {
    /// The slot's bytes in the arena.
    pub fn region(&self) -> Region {
        Region::new(self.start as u64 * MIN_BLOCK, self.pages as u64 * MIN_BLOCK)
    }

    /// The identity of the arena it was allocated in (0: a free-standing allocator).
    pub(crate) fn arena(&self) -> u64 {
        self.arena
    }
}

/// The size class (first level, second level) of a block of `pages` pages.
fn class(pages: u32) -> (usize, u32) {
    if pages < SL {
        (0, pages)
    } else {
        let log = 31 - pages.leading_zeros();
        (
            (log - SL_BITS + 1) as usize,
            (pages >> (log - SL_BITS)) - SL,
        )
    }
}

/// The class to search for a request of `pages`: the lowest one whose every
/// block holds `pages` (the request rounded up to its class's next boundary).
fn search_class(pages: u32) -> Option<(usize, u32)> {
    if pages < SL {
        return Some((0, pages));
    }
    let log = 31 - pages.leading_zeros();
    pages.checked_add((1 << (log - SL_BITS)) - 1).map(class)
}

/// The allocator's state: per page, what the block starting there is.
#[derive(Debug)]
pub struct SlotAllocator {
    /// Identity given to its slots: an [`crate::segment::Arena`]'s, or 0.
    owner: u64,
    pages: u32,
    /// Largest request, in pages: the whole arena.
    max_pages: u32,
    fl_bitmap: u32,
    sl_bitmap: [u32; FL],
    heads: [[u32; SL as usize]; FL],
    /// For each block start: its length in pages.
    size: Vec<u32>,
    /// For each block start: the start of the block before it, or NIL.
    prev_phys: Vec<u32>,
    /// For each free block start: its neighbours in its free list.
    next_free: Vec<u32>,
    prev_free: Vec<u32>,
    /// For each block start: whether it is free.
    free: Vec<bool>,
    in_use: usize,
    bytes_in_use: u64,
}

impl SlotAllocator {
    /// An allocator over `arena_len` bytes (rounded down to [`MIN_BLOCK`]),
    /// free-standing: its slots give access to no bytes.
    pub fn new(arena_len: u64) -> Self {
        SlotAllocator::for_arena(arena_len, 0)
    }

    /// The allocator of the arena `owner` (its slots carry that identity).
    pub(crate) fn for_arena(arena_len: u64, owner: u64) -> Self {
        let pages = u32::try_from(arena_len / MIN_BLOCK).expect("arena below 16 TiB");
        let n = pages as usize;
        let mut a = SlotAllocator {
            owner,
            pages,
            max_pages: 0,
            fl_bitmap: 0,
            sl_bitmap: [0; FL],
            heads: [[NIL; SL as usize]; FL],
            size: vec![0; n],
            prev_phys: vec![NIL; n],
            next_free: vec![NIL; n],
            prev_free: vec![NIL; n],
            free: vec![false; n],
            in_use: 0,
            bytes_in_use: 0,
        };
        if pages > 0 {
            // One free block: the whole arena.
            a.size[0] = pages;
            a.insert(0);
            a.max_pages = pages;
        }
        a
    }

    /// The largest slot this arena can give, in bytes (0 if the arena is
    /// empty): any request up to it succeeds once every slot is free.
    pub fn max_slot(&self) -> u64 {
        self.max_pages as u64 * MIN_BLOCK
    }

    /// [`SlotAllocator::max_slot`] of an allocator over `arena_len` bytes,
    /// without building one: the whole arena, in whole pages.
    pub fn max_slot_for(arena_len: u64) -> u64 {
        arena_len / MIN_BLOCK * MIN_BLOCK
    }

    /// The bytes a request of `len` bytes takes: `len` rounded up to whole pages (at least one).
    pub fn slot_len(len: u64) -> u64 {
        len.div_ceil(MIN_BLOCK).max(1).saturating_mul(MIN_BLOCK)
    }

    /// Slots currently allocated.
    pub fn in_use(&self) -> usize {
        self.in_use
    }

    /// Bytes currently allocated (whole pages).
    pub fn bytes_in_use(&self) -> u64 {
        self.bytes_in_use
    }

    /// Allocates a slot of at least `len` bytes (at least one page).
    pub fn alloc(&mut self, len: u64) -> Result<Slot, AllocError> {
        let pages = len.div_ceil(MIN_BLOCK).max(1);
        if pages > self.max_pages as u64 {
            return Err(AllocError::TooLarge {
                requested: len,
                max: self.max_slot(),
            });
        }
        let pages = pages as u32;
        // A list whose every block fits; failing that, a block of the
        // request's own class that happens to be big enough (the only other
        // place one can be), so allocation fails only when no free block fits.
        let start = match search_class(pages).and_then(|(fl, sl)| self.fitting_list(fl, sl)) {
            Some((fl, sl)) => self.heads[fl][sl as usize],
            None => self
                .own_class_fit(pages)
                .ok_or(AllocError::Exhausted { requested: len })?,
        };
        self.remove(start);
        let have = self.size[start as usize];
        debug_assert!(have >= pages);
        if have > pages {
            // Split: the rest is a free block of its own.
            let rest = start + pages;
            self.size[rest as usize] = have - pages;
            self.prev_phys[rest as usize] = start;
            self.link_next(rest);
            self.size[start as usize] = pages;
            self.insert(rest);
        }
        self.in_use += 1;
        self.bytes_in_use += pages as u64 * MIN_BLOCK;
        Ok(Slot {
            start,
            pages,
            arena: self.owner,
        })
    }

    /// The first non-empty list at (`fl`, `sl` or above), else at the lowest first level above `fl`.
    fn fitting_list(&self, fl: usize, sl: u32) -> Option<(usize, u32)> {
        match self.sl_bitmap[fl] & (u32::MAX << sl) {
            0 => {
                let above = self.fl_bitmap & u32::MAX.checked_shl(fl as u32 + 1).unwrap_or(0);
                let fl = (above != 0).then(|| above.trailing_zeros() as usize)?;
                Some((fl, self.sl_bitmap[fl].trailing_zeros()))
            }
            map => Some((fl, map.trailing_zeros())),
        }
    }

    /// The first free block of `pages`' own class holding `pages`: a walk of
    /// that one list, taken only when no class above has a free block.
    fn own_class_fit(&self, pages: u32) -> Option<u32> {
        let (fl, sl) = class(pages);
        let mut at = self.heads[fl][sl as usize];
        while at != NIL && self.size[at as usize] < pages {
            at = self.next_free[at as usize];
        }
        (at != NIL).then_some(at)
    }

    /// Returns a slot; merges it with its free neighbours. Panics on a slot
    /// of another allocator (freeing it here would corrupt this one).
    pub fn free(&mut self, slot: Slot) {
        let Slot {
            mut start,
            pages,
            arena,
        } = slot;
        assert_eq!(arena, self.owner, "a slot freed into another allocator");
        debug_assert_eq!(self.size[start as usize], pages);
        debug_assert!(!self.free[start as usize]);
        self.in_use -= 1;
        self.bytes_in_use -= pages as u64 * MIN_BLOCK;
        let mut size = pages;
        let next = start + size;
        if next < self.pages && self.free[next as usize] {
            self.remove(next);
            size += self.size[next as usize];
        }
        let prev = self.prev_phys[start as usize];
        if prev != NIL && self.free[prev as usize] {
            self.remove(prev);
            size += self.size[prev as usize];
            start = prev;
        }
        self.size[start as usize] = size;
        self.link_next(start);
        self.insert(start);
    }

    /// Points the block after `start` back at it.
    fn link_next(&mut self, start: u32) {
        let after = start + self.size[start as usize];
        if after < self.pages {
            self.prev_phys[after as usize] = start;
        }
    }

    /// Puts a block in the free list of its class.
    fn insert(&mut self, start: u32) {
        let (fl, sl) = class(self.size[start as usize]);
        let head = self.heads[fl][sl as usize];
        self.next_free[start as usize] = head;
        self.prev_free[start as usize] = NIL;
        if head != NIL {
            self.prev_free[head as usize] = start;
        }
        self.heads[fl][sl as usize] = start;
        self.free[start as usize] = true;
        self.sl_bitmap[fl] |= 1 << sl;
        self.fl_bitmap |= 1 << fl;
    }

    /// Takes a free block out of its list.
    fn remove(&mut self, start: u32) {
        let (fl, sl) = class(self.size[start as usize]);
        let (p, n) = (
            self.prev_free[start as usize],
            self.next_free[start as usize],
        );
        if p == NIL {
            self.heads[fl][sl as usize] = n;
            if n == NIL {
                self.sl_bitmap[fl] &= !(1 << sl);
                if self.sl_bitmap[fl] == 0 {
                    self.fl_bitmap &= !(1 << fl);
                }
            }
        } else {
            self.next_free[p as usize] = n;
        }
        if n != NIL {
            self.prev_free[n as usize] = p;
        }
        self.free[start as usize] = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// The smallest size of a class.
    fn class_floor(fl: usize, sl: u32) -> u64 {
        if fl == 0 {
            sl as u64
        } else {
            ((SL + sl) as u64) << (fl as u32 - 1)
        }
    }

    #[test]
    fn sizes_round_up_to_whole_pages() {
        let mut a = SlotAllocator::new(16 * MIB);
        assert_eq!(a.max_slot(), 16 * MIB);
        for (len, want) in [
            (0, 4096),
            (1, 4096),
            (4096, 4096),
            (4097, 8192),
            (MIB + 1, MIB + 4096),
            (64 * 4096 + 4096, 65 * 4096),
        ] {
            assert_eq!(SlotAllocator::slot_len(len), want);
            let s = a.alloc(len).unwrap();
            assert_eq!(s.region().len(), want, "len {len}");
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
        assert_eq!(whole.region(), Region::new(0, 64 * 1024));
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
                    assert!(s.region().len() >= len);
                    live.push(s);
                }
            }
            if step.is_multiple_of(997) {
                let mut rs: Vec<Region> = live.iter().map(Slot::region).collect();
                rs.sort_by_key(|r| r.offset());
                for w in rs.windows(2) {
                    assert!(
                        w[0].offset() + w[0].len() <= w[1].offset(),
                        "overlap at step {step}"
                    );
                }
                assert!(rs.last().is_none_or(|r| r.offset() + r.len() <= arena));
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
    fn classes_hold_what_their_search_promises() {
        for pages in 1..=(1u32 << 20) {
            let (fl, sl) = class(pages);
            assert!(class_floor(fl, sl) <= pages as u64);
            // Every block in the searched class holds the request.
            let (sfl, ssl) = search_class(pages).unwrap();
            assert!(class_floor(sfl, ssl) >= pages as u64, "{pages}");
            assert!((sfl, ssl) >= (fl, sl));
        }
    }

    #[test]
    fn up_to_max_slot_always_fits_an_empty_arena_and_beyond_never() {
        for arena in [
            4096,
            15 * 4096,
            16 * 4096,
            17 * 4096,
            10 * MIB + 12 * 1024,
            256 * MIB,
            300 * MIB + 4096,
        ] {
            let mut a = SlotAllocator::new(arena);
            let max = a.max_slot();
            assert_eq!(max, arena / 4096 * 4096, "the whole arena");
            assert_eq!(SlotAllocator::max_slot_for(arena), max);
            let s = a.alloc(max).unwrap();
            assert_eq!(s.region().len(), max);
            a.free(s);
            assert!(matches!(a.alloc(max + 1), Err(AllocError::TooLarge { .. })));
        }
        // The default configuration: a 64 MiB payload and its 4 KiB reserve
        // take their own size, and three fit in 256 MiB.
        let mut a = SlotAllocator::new(256 * MIB);
        let slots: Vec<Slot> = (0..3).map(|_| a.alloc(64 * MIB + 4096).unwrap()).collect();
        assert_eq!(slots[2].region().len(), 64 * MIB + 4096);
        for s in slots {
            a.free(s);
        }
        assert_eq!(a.alloc(256 * MIB).unwrap().region().offset(), 0);
        // 64 MiB and its reserve fit a 65 MiB segment.
        let mut a = SlotAllocator::new(65 * MIB);
        assert!(a.alloc(64 * MIB + 4096).is_ok());
    }

    #[test]
    fn a_free_block_that_fits_is_found_even_in_the_requests_own_class() {
        // Free blocks of 16384 and 17000 pages (one class), the smaller first
        // in its list, nothing larger free: 16385 pages (64 MiB + 4 KiB) must
        // come from the 17000-page one.
        let mut a = SlotAllocator::new(256 * MIB);
        let page = MIN_BLOCK;
        let first = a.alloc(16384 * page).unwrap();
        let _wall = a.alloc(page).unwrap();
        let second = a.alloc(17000 * page).unwrap();
        let _wall2 = a.alloc(page).unwrap();
        let _rest = a.alloc((65536 - 16384 - 17000 - 2) * page).unwrap();
        a.free(second);
        a.free(first);
        let s = a.alloc(16385 * page).expect("the 17000-page block fits");
        assert_eq!(s.region().offset(), (16384 + 1) * page);
        assert_eq!(
            a.alloc(16385 * page),
            Err(AllocError::Exhausted {
                requested: 16385 * page
            })
        );
    }

    #[test]
    fn an_empty_arena_refuses_cleanly() {
        let mut a = SlotAllocator::new(100);
        assert!(matches!(a.alloc(1), Err(AllocError::TooLarge { .. })));
    }
}
