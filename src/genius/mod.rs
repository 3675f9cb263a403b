//! Genius: foresight re-sampling, pair construction, losses, trainer, the round loop.
//!
//! - [`loss`]: preference losses (ACO, DPO, SimPO, IPO, SFT) on per-sequence log-prob sums,
//!   with their gradients with respect to those sums.

pub mod loss;
