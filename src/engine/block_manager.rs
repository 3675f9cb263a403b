//! Paged-KV block manager (vLLM-style): pure bookkeeping, no tensors.
//!
//! The KV cache is a pool of `num_blocks` blocks of `block_size` token slots each; slot
//! `block.0 * block_size + offset` is where the backend keeps one token's K/V rows. Each sequence
//! (a [`SeqId`] chosen by the caller) owns a *block table*: the blocks holding its tokens in order,
//! so token `position` lives in slot `slot_of(table[position / block_size], position % block_size)`.
//!
//! Blocks are reference counted so that sequences can share a prefix: [`BlockManager::fork`] gives
//! the child the parent's table (every block's count + 1, zero new blocks). Full blocks are never
//! written again and stay shared for good. A partially filled last block that is shared is copied
//! on write: the first sequence to append into it gets a fresh block, and the [`AppendPlan`] lists
//! the [`CopyBlock`] the backend must execute (copy the KV rows of `src` into `dst`) before
//! writing the new tokens. The sequence that appends last, once the count is back to 1, writes in
//! place.
//!
//! Failures come in two kinds: running out of blocks is expected (the scheduler preempts), so
//! [`BlockManager::reserve`] reports it as a typed [`OutOfBlocks`] inside an `Ok`, and leaves the
//! manager unchanged; misuse (an unknown or duplicate [`SeqId`], truncating past the end, ...) is an
//! `anyhow` error naming the sequence. No call sequence panics.

use anyhow::{Context, Result, bail, ensure};
use std::collections::HashMap;
use std::fmt;

/// A KV block in the pool, `0..num_blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlockId(pub u32);

impl BlockId {
    fn index(self) -> usize {
        self.0 as usize
    }
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "block {}", self.0)
    }
}

/// A sequence, identified by the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sequence {}", self.0)
    }
}

/// A copy-on-write operation: the backend copies all `block_size` KV slots of `src` into `dst`
/// (every layer, K and V) before writing the new tokens of the same plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopyBlock {
    pub src: BlockId,
    pub dst: BlockId,
}

/// What the backend must do to append tokens to a sequence, returned by
/// [`BlockManager::reserve`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendPlan {
    /// Block copies to execute first, in order.
    pub copies: Vec<CopyBlock>,
    /// Position (in the sequence) of the first new token.
    pub first_position: usize,
    /// The KV slot of each new token, in position order: `slots[i]` is where the K/V of position
    /// `first_position + i` go.
    pub slots: Vec<usize>,
}

/// Not enough free blocks for a [`BlockManager::reserve`]; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfBlocks {
    /// Blocks the request needed (new blocks plus a copy-on-write block).
    pub needed: usize,
    /// Blocks free at the time of the request.
    pub free: usize,
}

impl fmt::Display for OutOfBlocks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "out of KV blocks: needed {}, {} free",
            self.needed, self.free
        )
    }
}

impl std::error::Error for OutOfBlocks {}

/// A snapshot of the pool's occupancy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStats {
    /// Blocks in the pool.
    pub total: usize,
    /// Blocks on the free list.
    pub free: usize,
    /// Blocks referenced by at least one sequence (`total - free`).
    pub used: usize,
    /// Blocks referenced by more than one block-table entry.
    pub shared: usize,
    /// Live sequences.
    pub sequences: usize,
}

/// One sequence's bookkeeping.
#[derive(Clone, Debug, Default)]
struct Sequence {
    /// Blocks holding the tokens, in order; `len.div_ceil(block_size)` entries.
    table: Vec<BlockId>,
    /// Tokens stored.
    len: usize,
}

/// Reference counts and the free list.
#[derive(Clone, Debug)]
struct BlockPool {
    ref_counts: Vec<u32>,
    /// Free blocks, used as a stack (the lowest ids come out first on a fresh pool).
    free: Vec<BlockId>,
}

impl BlockPool {
    fn new(num_blocks: u32) -> Self {
        Self {
            ref_counts: vec![0; num_blocks as usize],
            free: (0..num_blocks).rev().map(BlockId).collect(),
        }
    }

    /// Takes a free block (count 1). Callers check `free.len()` first.
    fn allocate(&mut self) -> Option<BlockId> {
        let block = self.free.pop()?;
        self.ref_counts[block.index()] = 1;
        Some(block)
    }

    fn retain(&mut self, block: BlockId) {
        self.ref_counts[block.index()] += 1;
    }

    /// Drops one reference; the block goes back on the free list at zero.
    fn release(&mut self, block: BlockId) {
        let count = &mut self.ref_counts[block.index()];
        debug_assert!(*count > 0, "{block} released with no references");
        *count = count.saturating_sub(1);
        if *count == 0 {
            self.free.push(block);
        }
    }

    fn ref_count(&self, block: BlockId) -> u32 {
        self.ref_counts[block.index()]
    }
}

/// The paged-KV block manager: block tables of all sequences over one reference-counted pool.
#[derive(Clone, Debug)]
pub struct BlockManager {
    block_size: usize,
    pool: BlockPool,
    sequences: HashMap<SeqId, Sequence>,
}

impl BlockManager {
    /// A pool of `num_blocks` blocks of `block_size` token slots (capacity
    /// `num_blocks * block_size` tokens). Errors when `block_size` is 0, when block ids would not
    /// fit in a `u32`, or when slot indices would not fit in a `usize`.
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self> {
        ensure!(block_size > 0, "KV block size must be at least 1");
        let num_blocks_u32 = u32::try_from(num_blocks)
            .with_context(|| format!("{num_blocks} KV blocks do not fit in 32-bit block ids"))?;
        ensure!(
            num_blocks.checked_mul(block_size).is_some(),
            "{num_blocks} KV blocks of {block_size} slots overflow the slot index"
        );
        Ok(Self {
            block_size,
            pool: BlockPool::new(num_blocks_u32),
            sequences: HashMap::new(),
        })
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn num_blocks(&self) -> usize {
        self.pool.ref_counts.len()
    }

    /// Blocks on the free list.
    pub fn num_free_blocks(&self) -> usize {
        self.pool.free.len()
    }

    /// Whether `seq` is a live sequence.
    pub fn contains(&self, seq: SeqId) -> bool {
        self.sequences.contains_key(&seq)
    }

    /// The live sequences, in no particular order.
    pub fn sequence_ids(&self) -> impl Iterator<Item = SeqId> + '_ {
        self.sequences.keys().copied()
    }

    /// References to `block` (0 when free); errors for an id outside the pool.
    pub fn ref_count(&self, block: BlockId) -> Result<u32> {
        self.pool
            .ref_counts
            .get(block.index())
            .copied()
            .with_context(|| format!("{block} is outside the pool of {}", self.num_blocks()))
    }

    /// Registers an empty sequence; errors if `seq` already exists.
    pub fn add_sequence(&mut self, seq: SeqId) -> Result<()> {
        if self.sequences.contains_key(&seq) {
            bail!("{seq} already exists in the KV block manager");
        }
        self.sequences.insert(seq, Sequence::default());
        Ok(())
    }

    fn sequence(&self, seq: SeqId) -> Result<&Sequence> {
        self.sequences
            .get(&seq)
            .with_context(|| format!("unknown {seq} in the KV block manager"))
    }

    /// Blocks a [`reserve`](Self::reserve) of `n_new` tokens would take from the free list: new
    /// blocks past the end of the table, plus one if the last block is partially filled and
    /// shared (copy on write). 0 when `n_new` is 0.
    pub fn blocks_needed(&self, seq: SeqId, n_new: usize) -> Result<usize> {
        let sequence = self.sequence(seq)?;
        Ok(self.blocks_needed_for(sequence, n_new))
    }

    fn blocks_needed_for(&self, sequence: &Sequence, n_new: usize) -> usize {
        if n_new == 0 {
            return 0;
        }
        let new_blocks = match sequence.len.checked_add(n_new) {
            Some(total) => total.div_ceil(self.block_size) - sequence.table.len(),
            None => usize::MAX,
        };
        new_blocks.saturating_add(usize::from(self.needs_copy_on_write(sequence)))
    }

    /// Whether appending to `sequence` must first copy its last block: partially filled and
    /// referenced by another table entry.
    fn needs_copy_on_write(&self, sequence: &Sequence) -> bool {
        !sequence.len.is_multiple_of(self.block_size)
            && sequence
                .table
                .last()
                .is_some_and(|&last| self.pool.ref_count(last) > 1)
    }

    /// Whether `n_blocks` blocks are free.
    pub fn can_allocate(&self, n_blocks: usize) -> bool {
        n_blocks <= self.pool.free.len()
    }

    /// Makes room for `n_new` more tokens at the end of `seq`, copying a shared partial last block
    /// first and allocating blocks as needed; returns the plan the backend executes (copies, then
    /// the new tokens' slots). All or nothing: `Ok(Err(OutOfBlocks))` when the pool is short, and
    /// then nothing changed. The outer error is for an unknown `seq`.
    pub fn reserve(
        &mut self,
        seq: SeqId,
        n_new: usize,
    ) -> Result<std::result::Result<AppendPlan, OutOfBlocks>> {
        let sequence = self.sequence(seq)?;
        let needed = self.blocks_needed_for(sequence, n_new);
        let free = self.pool.free.len();
        if needed > free {
            return Ok(Err(OutOfBlocks { needed, free }));
        }
        let copy_on_write = self.needs_copy_on_write(sequence);
        let block_size = self.block_size;
        let pool = &mut self.pool;
        let sequence = self
            .sequences
            .get_mut(&seq)
            .with_context(|| format!("unknown {seq} in the KV block manager"))?;
        let mut plan = AppendPlan {
            copies: Vec::new(),
            first_position: sequence.len,
            slots: Vec::with_capacity(n_new),
        };
        if n_new == 0 {
            return Ok(Ok(plan));
        }
        // `needed <= free` was checked, so the allocations below cannot fail; the `Option`s are
        // still handled rather than unwrapped.
        if copy_on_write && let Some(last) = sequence.table.last_mut() {
            let dst = pool
                .allocate()
                .context("KV block pool exhausted after its free count was checked")?;
            plan.copies.push(CopyBlock { src: *last, dst });
            pool.release(*last);
            *last = dst;
        }
        let new_len = sequence.len + n_new;
        while sequence.table.len() * block_size < new_len {
            let block = pool
                .allocate()
                .context("KV block pool exhausted after its free count was checked")?;
            sequence.table.push(block);
        }
        for position in sequence.len..new_len {
            let block = sequence.table[position / block_size];
            plan.slots
                .push(block.index() * block_size + position % block_size);
        }
        sequence.len = new_len;
        Ok(Ok(plan))
    }

    /// Creates `child` as a copy of `parent` sharing all its blocks (each count + 1, including a
    /// partial last block, which is copied on the first write by either side). Takes no block.
    /// Errors if `parent` is unknown or `child` exists.
    pub fn fork(&mut self, parent: SeqId, child: SeqId) -> Result<()> {
        let sequence = self
            .sequence(parent)
            .with_context(|| format!("cannot fork {parent} into {child}"))?
            .clone();
        if self.sequences.contains_key(&child) {
            bail!("cannot fork {parent} into {child}: {child} already exists");
        }
        for &block in &sequence.table {
            self.pool.retain(block);
        }
        self.sequences.insert(child, sequence);
        Ok(())
    }

    /// Shortens `seq` to its first `len` tokens, releasing the blocks that no longer hold any.
    /// A shared block cut in the middle stays shared (the next append copies it). Errors if `seq`
    /// is unknown or shorter than `len`.
    pub fn truncate(&mut self, seq: SeqId, len: usize) -> Result<()> {
        let block_size = self.block_size;
        let sequence = self
            .sequences
            .get_mut(&seq)
            .with_context(|| format!("unknown {seq} in the KV block manager"))?;
        if len > sequence.len {
            bail!(
                "cannot truncate {seq} to {len} tokens: it holds only {}",
                sequence.len
            );
        }
        let keep = len.div_ceil(block_size);
        for block in sequence.table.drain(keep..) {
            self.pool.release(block);
        }
        sequence.len = len;
        Ok(())
    }

    /// Drops `seq` and releases all its blocks. Errors if `seq` is unknown.
    pub fn release(&mut self, seq: SeqId) -> Result<()> {
        let sequence = self
            .sequences
            .remove(&seq)
            .with_context(|| format!("cannot release unknown {seq}"))?;
        for block in sequence.table {
            self.pool.release(block);
        }
        Ok(())
    }

    /// The blocks holding `seq`'s tokens, in order.
    pub fn block_table(&self, seq: SeqId) -> Result<&[BlockId]> {
        Ok(&self.sequence(seq)?.table)
    }

    /// Tokens stored for `seq`.
    pub fn seq_len(&self, seq: SeqId) -> Result<usize> {
        Ok(self.sequence(seq)?.len)
    }

    /// The KV slot of token `position` of `seq`; errors past the end of the sequence.
    pub fn slot_of(&self, seq: SeqId, position: usize) -> Result<usize> {
        let sequence = self.sequence(seq)?;
        if position >= sequence.len {
            bail!(
                "position {position} is past the end of {seq} ({} tokens)",
                sequence.len
            );
        }
        let block = sequence.table[position / self.block_size];
        Ok(block.index() * self.block_size + position % self.block_size)
    }

    /// Occupancy of the pool (O(blocks)).
    pub fn stats(&self) -> BlockStats {
        let total = self.num_blocks();
        let free = self.pool.free.len();
        BlockStats {
            total,
            free,
            used: total - free,
            shared: self.pool.ref_counts.iter().filter(|&&c| c > 1).count(),
            sequences: self.sequences.len(),
        }
    }

    /// Checks the bookkeeping (for tests and debugging): every block is either on the free list
    /// exactly once with count 0, or off it with a count equal to the number of table entries
    /// pointing at it; every table has `len.div_ceil(block_size)` entries, all inside the pool.
    pub fn check_invariants(&self) -> Result<()> {
        let total = self.num_blocks();
        let mut on_free_list = vec![false; total];
        for &block in &self.pool.free {
            let index = block.index();
            ensure!(index < total, "free list holds {block}, outside the pool");
            ensure!(!on_free_list[index], "{block} is on the free list twice");
            on_free_list[index] = true;
        }
        let mut references = vec![0u64; total];
        for (seq, sequence) in &self.sequences {
            let expected = sequence.len.div_ceil(self.block_size);
            ensure!(
                sequence.table.len() == expected,
                "{seq} has {} tokens but {} blocks (expected {expected})",
                sequence.len,
                sequence.table.len()
            );
            for &block in &sequence.table {
                ensure!(
                    block.index() < total,
                    "{seq} points at {block}, outside the pool"
                );
                references[block.index()] += 1;
            }
        }
        for (index, (&count, &refs)) in self.pool.ref_counts.iter().zip(&references).enumerate() {
            let block = BlockId(index as u32);
            if on_free_list[index] {
                ensure!(count == 0, "free {block} has reference count {count}");
                ensure!(refs == 0, "free {block} is in {refs} block tables");
            } else {
                ensure!(count > 0, "{block} is neither free nor referenced (leaked)");
                ensure!(
                    u64::from(count) == refs,
                    "{block} has reference count {count} but {refs} table entries"
                );
            }
        }
        Ok(())
    }
}
