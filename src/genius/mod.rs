//! Genius: foresight re-sampling, pair construction, losses, trainer, the round loop.
//!
//! - [`artifacts`]: resumable JSONL logs and atomic JSON files of a run.
//! - [`loss`]: preference losses (ACO, DPO, SimPO, IPO, SFT) on per-sequence log-prob sums,
//!   with their gradients with respect to those sums.
//! - [`optim`]: AdamW over flat f32 parameter slices, the linear warm-up/decay learning-rate
//!   schedule, global gradient-norm clipping, and optimizer state files for resuming.
//! - [`pairs`]: the trajectory and pair file formats and one preference pair per step.
//! - [`queries`]: the training-query files and the bundled default query set.
//! - [`sequences`]: training token sequences from pairs (prompt masking, truncation) and the
//!   reference model's log-prob sums.
//! - [`trainer`]: the training loop: micro-batches, explicit backward, clipping, AdamW,
//!   resumable state.
//! - [`sample`]: stepwise foresight re-sampling of many queries at once on the rollout engine.

pub mod artifacts;
pub mod loss;
pub mod optim;
pub mod pairs;
pub mod queries;
pub mod sample;
pub mod sequences;
pub mod trainer;
