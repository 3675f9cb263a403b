//! The rollout engine: paged KV block manager, scheduler, sampler, stops.

pub mod sampler;
pub mod stops;
