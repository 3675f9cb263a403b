//! The rollout engine: paged KV block manager, scheduler, sampler, stops.
//!
//! - [`block_manager`]: the device-agnostic paged-KV block allocator (reference-counted blocks,
//!   per-sequence block tables, copy-on-write forking). Pure bookkeeping: the backend owns the
//!   KV memory and executes the copy operations the manager plans.
//! - [`scheduler`]: the [`Engine`]: continuous batching of prefill chunks and decode steps over
//!   the paged cache, preemption when the KV budget runs out, the API the Genius loop drives.
//! - [`sampler`]: reproducible sampling (counter-based Philox draws per sequence and position).
//! - [`stops`]: incremental detokenisation and stop strings.

pub mod block_manager;
pub mod sampler;
pub mod scheduler;
pub mod stops;

pub use block_manager::{
    AppendPlan, BlockId, BlockManager, BlockStats, CopyBlock, OutOfBlocks, SeqId,
};
pub use scheduler::{Engine, EngineConfig, FinishReason, Finished, Request, StopRules};
