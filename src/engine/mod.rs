//! The rollout engine: paged KV block manager, scheduler, sampler, stops.
//!
//! - [`block_manager`]: the device-agnostic paged-KV block allocator (reference-counted blocks,
//!   per-sequence block tables, copy-on-write forking). Pure bookkeeping: the backend owns the
//!   KV memory and executes the copy operations the manager plans.

pub mod block_manager;

pub use block_manager::{
    AppendPlan, BlockId, BlockManager, BlockStats, CopyBlock, OutOfBlocks, SeqId,
};
