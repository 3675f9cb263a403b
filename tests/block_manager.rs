//! The paged-KV block manager: appends, slot numbering, forking, copy-on-write, truncation,
//! release, and a randomised property test against a simulated KV store, for block sizes 1, 7
//! and 16.

use anyhow::Result;
use genius_engine::engine::block_manager::{
    AppendPlan, BlockId, BlockManager, BlockStats, CopyBlock, OutOfBlocks, SeqId,
};
use std::collections::HashMap;

const BLOCK_SIZES: [usize; 3] = [1, 16, 7];

/// `reserve` that must succeed.
fn reserve_ok(manager: &mut BlockManager, seq: SeqId, n: usize) -> AppendPlan {
    match manager.reserve(seq, n) {
        Ok(Ok(plan)) => plan,
        Ok(Err(out)) => panic!("{seq}: unexpected {out}"),
        Err(err) => panic!("{seq}: unexpected error {err:#}"),
    }
}

fn check(manager: &BlockManager) {
    if let Err(err) = manager.check_invariants() {
        panic!("invariant broken: {err:#}");
    }
}

#[test]
fn new_rejects_bad_geometry() {
    assert!(BlockManager::new(4, 0).is_err());
    assert!(BlockManager::new(usize::MAX, 2).is_err());
    let manager = BlockManager::new(0, 16).unwrap();
    assert_eq!(manager.stats().total, 0);
    check(&manager);
}

#[test]
fn appends_cross_block_boundaries_and_number_slots() -> Result<()> {
    for block_size in BLOCK_SIZES {
        let mut manager = BlockManager::new(64, block_size)?;
        let seq = SeqId(7);
        manager.add_sequence(seq)?;
        assert_eq!(manager.blocks_needed(seq, 0)?, 0);
        assert_eq!(manager.blocks_needed(seq, 1)?, 1);
        assert_eq!(
            manager.blocks_needed(seq, 2 * block_size + 1)?,
            3,
            "block size {block_size}"
        );

        // Grow one token, then a run that crosses several block boundaries, then one more.
        let mut slots = Vec::new();
        for n in [1, 2 * block_size + 3, 1, 0, block_size] {
            let plan = reserve_ok(&mut manager, seq, n);
            assert!(plan.copies.is_empty());
            assert_eq!(plan.first_position, slots.len());
            assert_eq!(plan.slots.len(), n);
            slots.extend(plan.slots);
            check(&manager);
        }
        let len = slots.len();
        assert_eq!(manager.seq_len(seq)?, len);
        let table = manager.block_table(seq)?.to_vec();
        assert_eq!(table.len(), len.div_ceil(block_size));
        // Fresh pool: blocks come out in id order, so slots are simply 0..len.
        assert_eq!(
            table,
            (0..table.len() as u32).map(BlockId).collect::<Vec<_>>()
        );
        assert_eq!(slots, (0..len).collect::<Vec<_>>());
        for (position, &slot) in slots.iter().enumerate() {
            assert_eq!(manager.slot_of(seq, position)?, slot);
            let block = table[position / block_size];
            assert_eq!(slot, block.0 as usize * block_size + position % block_size);
        }
        assert!(manager.slot_of(seq, len).is_err());
        let stats = manager.stats();
        assert_eq!(
            stats,
            BlockStats {
                total: 64,
                free: 64 - table.len(),
                used: table.len(),
                shared: 0,
                sequences: 1,
            }
        );
    }
    Ok(())
}

#[test]
fn out_of_blocks_changes_nothing() -> Result<()> {
    for block_size in BLOCK_SIZES {
        let mut manager = BlockManager::new(4, block_size)?;
        let (a, b) = (SeqId(1), SeqId(2));
        manager.add_sequence(a)?;
        // Three blocks used, the last one partial (for block size 1: three full blocks).
        let len = if block_size == 1 {
            3
        } else {
            3 * block_size - 1
        };
        reserve_ok(&mut manager, a, len);
        manager.fork(a, b)?;
        // b needs a copy of the shared partial block plus one new block (block size 1: two new
        // blocks); only 1 is free.
        let before = manager.stats();
        let table_before = manager.block_table(b)?.to_vec();
        let needed = 2;
        assert_eq!(manager.blocks_needed(b, block_size + 1)?, needed);
        assert!(!manager.can_allocate(needed));
        assert!(manager.can_allocate(1));
        let result = manager.reserve(b, block_size + 1)?;
        assert_eq!(result, Err(OutOfBlocks { needed, free: 1 }));
        assert_eq!(manager.stats(), before);
        assert_eq!(manager.block_table(b)?, table_before.as_slice());
        assert_eq!(manager.seq_len(b)?, len);
        check(&manager);
        // A request far beyond the pool (and one that overflows) is just OutOfBlocks too.
        assert!(matches!(
            manager.reserve(a, 1 << 40)?,
            Err(OutOfBlocks { .. })
        ));
        assert!(matches!(
            manager.reserve(a, usize::MAX)?,
            Err(OutOfBlocks { .. })
        ));
        check(&manager);
    }
    Ok(())
}

#[test]
fn fork_shares_and_copy_on_write_happens_once() -> Result<()> {
    for block_size in BLOCK_SIZES.into_iter().filter(|&b| b > 1) {
        let mut manager = BlockManager::new(32, block_size)?;
        let (parent, child) = (SeqId(10), SeqId(11));
        manager.add_sequence(parent)?;
        let len = 2 * block_size + 1; // two full blocks and a partial one
        reserve_ok(&mut manager, parent, len);
        let free_before = manager.stats().free;
        manager.fork(parent, child)?;
        check(&manager);
        let stats = manager.stats();
        assert_eq!(stats.free, free_before, "fork takes no block");
        assert_eq!(stats.shared, 3);
        assert_eq!(stats.sequences, 2);
        assert_eq!(manager.block_table(child)?, manager.block_table(parent)?);
        assert_eq!(manager.seq_len(child)?, len);
        let partial = manager.block_table(parent)?[2];
        assert_eq!(manager.ref_count(partial)?, 2);

        // The child writes first: it copies the shared partial block.
        assert_eq!(manager.blocks_needed(child, 1)?, 1);
        let plan = reserve_ok(&mut manager, child, 1);
        assert_eq!(plan.copies.len(), 1);
        let CopyBlock { src, dst } = plan.copies[0];
        assert_eq!(src, partial);
        assert_ne!(dst, partial);
        assert_eq!(manager.block_table(child)?[2], dst);
        assert_eq!(plan.slots, vec![dst.0 as usize * block_size + 1]);
        assert_eq!(manager.ref_count(partial)?, 1);
        assert_eq!(manager.stats().shared, 2, "the full blocks stay shared");
        check(&manager);

        // The parent's count is back to 1: it writes in place.
        assert_eq!(manager.blocks_needed(parent, 1)?, 0);
        let plan = reserve_ok(&mut manager, parent, 1);
        assert!(plan.copies.is_empty());
        assert_eq!(plan.slots, vec![partial.0 as usize * block_size + 1]);
        check(&manager);

        // Errors: forking from an unknown sequence or onto an existing one.
        assert!(manager.fork(SeqId(99), SeqId(100)).is_err());
        let err = manager.fork(parent, child).unwrap_err();
        assert!(format!("{err:#}").contains("sequence 11"), "{err:#}");
        check(&manager);
    }
    Ok(())
}

#[test]
fn fork_of_full_blocks_needs_no_copy() -> Result<()> {
    let block_size = 16;
    let mut manager = BlockManager::new(8, block_size)?;
    let (parent, child) = (SeqId(0), SeqId(1));
    manager.add_sequence(parent)?;
    reserve_ok(&mut manager, parent, 2 * block_size);
    manager.fork(parent, child)?;
    let plan = reserve_ok(&mut manager, child, 1);
    assert!(plan.copies.is_empty());
    assert_eq!(manager.stats().shared, 2);
    check(&manager);
    Ok(())
}

#[test]
fn truncate_then_append() -> Result<()> {
    for block_size in BLOCK_SIZES {
        let mut manager = BlockManager::new(32, block_size)?;
        let seq = SeqId(3);
        manager.add_sequence(seq)?;
        reserve_ok(&mut manager, seq, 4 * block_size);
        let table = manager.block_table(seq)?.to_vec();

        // Into the middle of a block (or onto a boundary for size 1): the tail blocks go back.
        let len = block_size + block_size / 2 + usize::from(block_size == 1);
        manager.truncate(seq, len)?;
        check(&manager);
        let kept = len.div_ceil(block_size);
        assert_eq!(manager.block_table(seq)?, &table[..kept]);
        assert_eq!(manager.stats().used, kept);
        assert!(manager.truncate(seq, len + 1).is_err());

        // Appending continues in the kept partial block, no copy (not shared).
        let plan = reserve_ok(&mut manager, seq, 1);
        assert!(plan.copies.is_empty());
        assert_eq!(plan.first_position, len);
        assert_eq!(plan.slots, vec![manager.slot_of(seq, len)?]);
        check(&manager);

        manager.truncate(seq, 0)?;
        assert!(manager.block_table(seq)?.is_empty());
        assert_eq!(manager.stats().free, 32);
        check(&manager);
    }
    Ok(())
}

#[test]
fn truncate_into_a_shared_block_keeps_it_shared() -> Result<()> {
    let block_size = 7;
    let mut manager = BlockManager::new(16, block_size)?;
    let (a, b) = (SeqId(1), SeqId(2));
    manager.add_sequence(a)?;
    reserve_ok(&mut manager, a, 3 * block_size);
    manager.fork(a, b)?;
    manager.truncate(b, block_size + 3)?;
    check(&manager);
    let shared = manager.block_table(b)?[1];
    assert_eq!(manager.ref_count(shared)?, 2);
    assert_eq!(manager.stats().shared, 2);
    // b's next write lands mid-block in a shared block: copy on write.
    let plan = reserve_ok(&mut manager, b, 1);
    assert_eq!(plan.copies.len(), 1);
    assert_eq!(plan.copies[0].src, shared);
    assert_eq!(manager.ref_count(shared)?, 1);
    check(&manager);
    Ok(())
}

#[test]
fn release_returns_everything() -> Result<()> {
    for block_size in BLOCK_SIZES {
        let mut manager = BlockManager::new(40, block_size)?;
        let root = SeqId(0);
        manager.add_sequence(root)?;
        reserve_ok(&mut manager, root, 3 * block_size + 2);
        for child in 1..5 {
            manager.fork(root, SeqId(child))?;
            reserve_ok(&mut manager, SeqId(child), child as usize * 2);
        }
        check(&manager);
        for seq in 0..5 {
            manager.release(SeqId(seq))?;
            check(&manager);
        }
        assert_eq!(
            manager.stats(),
            BlockStats {
                total: 40,
                free: 40,
                used: 0,
                shared: 0,
                sequences: 0,
            }
        );
        assert!(manager.release(root).is_err());
    }
    Ok(())
}

#[test]
fn unknown_sequences_are_errors_naming_them() -> Result<()> {
    let mut manager = BlockManager::new(4, 16)?;
    let ghost = SeqId(42);
    let errors = [
        manager.reserve(ghost, 1).map(|_| ()).unwrap_err(),
        manager.fork(ghost, SeqId(1)).unwrap_err(),
        manager.truncate(ghost, 0).unwrap_err(),
        manager.release(ghost).unwrap_err(),
        manager.block_table(ghost).map(|_| ()).unwrap_err(),
        manager.seq_len(ghost).map(|_| ()).unwrap_err(),
        manager.slot_of(ghost, 0).map(|_| ()).unwrap_err(),
        manager.blocks_needed(ghost, 1).map(|_| ()).unwrap_err(),
    ];
    for err in errors {
        assert!(format!("{err:#}").contains("sequence 42"), "{err:#}");
    }
    manager.add_sequence(ghost)?;
    assert!(manager.add_sequence(ghost).is_err());
    assert!(manager.ref_count(BlockId(4)).is_err());
    check(&manager);
    Ok(())
}

/// n = 8 forks of a 1,000-token prompt with 16-token blocks: 62 full blocks and one partial, all
/// shared; each child's first token copies the partial block, the full ones stay shared.
#[test]
fn eight_forks_of_a_long_prompt_share_its_blocks() -> Result<()> {
    let block_size = 16;
    let mut manager = BlockManager::new(128, block_size)?;
    let prompt = SeqId(0);
    manager.add_sequence(prompt)?;
    reserve_ok(&mut manager, prompt, 1000);
    let prompt_table = manager.block_table(prompt)?.to_vec();
    assert_eq!(prompt_table.len(), 63);
    let children: Vec<SeqId> = (1..=8).map(SeqId).collect();
    for &child in &children {
        manager.fork(prompt, child)?;
    }
    check(&manager);
    let stats = manager.stats();
    assert_eq!(stats.used, 63);
    assert_eq!(stats.shared, 63);
    assert_eq!(stats.sequences, 9);
    let partial = prompt_table[62];
    assert_eq!(manager.ref_count(partial)?, 9);

    let mut copies = Vec::new();
    for &child in &children {
        let plan = reserve_ok(&mut manager, child, 1);
        assert_eq!(plan.copies.len(), 1, "{child}");
        assert_eq!(plan.copies[0].src, partial);
        copies.push(plan.copies[0].dst);
        assert_eq!(&manager.block_table(child)?[..62], &prompt_table[..62]);
        check(&manager);
    }
    copies.sort();
    copies.dedup();
    assert_eq!(copies.len(), 8, "each child has its own copy");
    let stats = manager.stats();
    assert_eq!(stats.used, 63 + 8);
    assert_eq!(stats.shared, 62, "the full blocks are still shared");
    for &block in &prompt_table[..62] {
        assert_eq!(manager.ref_count(block)?, 9);
    }
    // The prompt keeps the original partial block, now its own: it writes in place.
    assert_eq!(manager.ref_count(partial)?, 1);
    let plan = reserve_ok(&mut manager, prompt, 1);
    assert!(plan.copies.is_empty());

    // Variant: the prompt is released before the children write; the last writer needs no copy.
    let mut manager = BlockManager::new(128, block_size)?;
    manager.add_sequence(prompt)?;
    reserve_ok(&mut manager, prompt, 1000);
    for &child in &children {
        manager.fork(prompt, child)?;
    }
    manager.release(prompt)?;
    let n_copies: usize = children
        .iter()
        .map(|&child| reserve_ok(&mut manager, child, 1).copies.len())
        .sum();
    assert_eq!(n_copies, 7);
    assert_eq!(manager.stats().used, 63 + 7);
    check(&manager);
    Ok(())
}

/// splitmix64: a small seeded generator for the property test.
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0; the bias is irrelevant here).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The model the manager is checked against: each live sequence's token history, and a
/// simulated KV store with one value per slot.
struct Simulation {
    manager: BlockManager,
    histories: HashMap<SeqId, Vec<u64>>,
    kv: Vec<Option<u64>>,
    next_token: u64,
    out_of_blocks: usize,
    copies: usize,
    forks: usize,
    truncates: usize,
    releases: usize,
}

impl Simulation {
    fn new(num_blocks: usize, block_size: usize) -> Self {
        Self {
            manager: BlockManager::new(num_blocks, block_size).unwrap(),
            histories: HashMap::new(),
            kv: vec![None; num_blocks * block_size],
            next_token: 0,
            out_of_blocks: 0,
            copies: 0,
            forks: 0,
            truncates: 0,
            releases: 0,
        }
    }

    fn reserve(&mut self, seq: SeqId, n: usize) {
        let before = (
            self.manager.stats(),
            self.manager.block_table(seq).unwrap().to_vec(),
        );
        let expected_needed = self.manager.blocks_needed(seq, n).unwrap();
        match self.manager.reserve(seq, n).unwrap() {
            Err(out) => {
                assert_eq!(out.needed, expected_needed);
                assert_eq!(out.free, before.0.free);
                assert!(out.needed > out.free);
                let after = (
                    self.manager.stats(),
                    self.manager.block_table(seq).unwrap().to_vec(),
                );
                assert_eq!(before, after, "OutOfBlocks must change nothing");
                self.out_of_blocks += 1;
            }
            Ok(plan) => {
                assert_eq!(before.0.free - self.manager.stats().free, expected_needed);
                let block_size = self.manager.block_size();
                for copy in &plan.copies {
                    let src = copy.src.0 as usize * block_size;
                    let dst = copy.dst.0 as usize * block_size;
                    self.kv.copy_within(src..src + block_size, dst);
                    self.copies += 1;
                }
                let history = self.histories.get_mut(&seq).unwrap();
                assert_eq!(plan.first_position, history.len());
                assert_eq!(plan.slots.len(), n);
                for (i, &slot) in plan.slots.iter().enumerate() {
                    assert_eq!(
                        self.manager.slot_of(seq, plan.first_position + i).unwrap(),
                        slot
                    );
                    self.kv[slot] = Some(self.next_token);
                    history.push(self.next_token);
                    self.next_token += 1;
                }
            }
        }
    }

    /// Every sequence reads back exactly its own history through its block table.
    fn verify(&self) {
        check(&self.manager);
        assert_eq!(self.manager.stats().sequences, self.histories.len());
        let block_size = self.manager.block_size();
        for (&seq, history) in &self.histories {
            assert_eq!(self.manager.seq_len(seq).unwrap(), history.len());
            let table = self.manager.block_table(seq).unwrap();
            for (position, &token) in history.iter().enumerate() {
                let slot =
                    table[position / block_size].0 as usize * block_size + position % block_size;
                assert_eq!(
                    self.kv[slot],
                    Some(token),
                    "{seq} position {position} (slot {slot})"
                );
            }
        }
    }

    fn step(&mut self, rng: &mut SplitMix64, id_range: u64) {
        let seq = SeqId(rng.next_u64() % id_range);
        let live = self.histories.contains_key(&seq);
        match rng.below(100) {
            // Add (or an error for an existing id).
            0..10 => {
                let result = self.manager.add_sequence(seq);
                assert_eq!(result.is_ok(), !live);
                self.histories.entry(seq).or_default();
            }
            // Reserve: mostly decode-sized, sometimes a prefill.
            10..60 => {
                if !live {
                    assert!(self.manager.reserve(seq, 1).is_err());
                    return;
                }
                let n = match rng.below(10) {
                    0 => rng.below(12 * self.manager.block_size() + 40),
                    1..4 => rng.below(2 * self.manager.block_size() + 2),
                    _ => 1 + rng.below(3),
                };
                self.reserve(seq, n);
            }
            // Fork into a random id.
            60..80 => {
                let child = SeqId(rng.next_u64() % id_range);
                let child_live = self.histories.contains_key(&child);
                let result = self.manager.fork(seq, child);
                assert_eq!(result.is_ok(), live && !child_live, "fork {seq} -> {child}");
                if result.is_ok() {
                    let history = self.histories[&seq].clone();
                    self.histories.insert(child, history);
                    self.forks += 1;
                }
            }
            // Truncate to a random length (sometimes past the end: an error).
            80..92 => {
                if !live {
                    assert!(self.manager.truncate(seq, 0).is_err());
                    return;
                }
                let history_len = self.histories[&seq].len();
                let len = rng.below(history_len + 2);
                let result = self.manager.truncate(seq, len);
                assert_eq!(result.is_ok(), len <= history_len);
                if result.is_ok() {
                    self.histories.get_mut(&seq).unwrap().truncate(len);
                    self.truncates += 1;
                }
            }
            // Release.
            _ => {
                let result = self.manager.release(seq);
                assert_eq!(result.is_ok(), live);
                if live {
                    self.histories.remove(&seq);
                    self.releases += 1;
                }
            }
        }
    }
}

#[test]
fn random_operations_keep_every_sequence_intact() {
    for block_size in BLOCK_SIZES {
        for seed in [1u64, 0xDEAD_BEEF] {
            let num_blocks = 256usize.div_ceil(block_size);
            let mut sim = Simulation::new(num_blocks, block_size);
            let mut rng = SplitMix64(seed ^ block_size as u64);
            for _ in 0..4000 {
                sim.step(&mut rng, 24);
                sim.verify();
            }
            println!(
                "block size {block_size}, seed {seed:#x}: {} out-of-blocks, {} copies, {} forks, \
                 {} truncates, {} releases",
                sim.out_of_blocks, sim.copies, sim.forks, sim.truncates, sim.releases
            );
            assert!(sim.out_of_blocks > 0, "the pool never ran out");
            // With one-token blocks every block is full: nothing is ever copied.
            assert_eq!(
                sim.copies > 0,
                block_size > 1,
                "block size {block_size}: {} copies",
                sim.copies
            );
            assert!(sim.forks > 0 && sim.truncates > 0 && sim.releases > 0);
            let live: Vec<SeqId> = sim.histories.keys().copied().collect();
            for seq in live {
                sim.manager.release(seq).unwrap();
                sim.histories.remove(&seq);
                sim.verify();
            }
            let stats = sim.manager.stats();
            assert_eq!(stats.free, num_blocks);
            assert_eq!(stats.used, 0);
            assert_eq!(stats.sequences, 0);
        }
    }
}
