//! genius-engine: unsupervised LLM self-training (Genius, arXiv 2504.08672) on a Rust engine
//! with a CPU reference backend and hand-written CUDA kernels.
//!
//! Layers, bottom up:
//! - [`model`]: architecture config, weight loading (safetensors, GGUF), tokenizer and chat template.
//! - [`backend`]: the [`backend::Backend`] trait and its CPU (reference) and CUDA implementations.
//! - [`transformer`]: the LLaMA/Qwen2 transformer written once against `Backend`.
//! - [`engine`]: the rollout engine (paged KV block manager, scheduler, sampler, stops).
//! - [`genius`]: foresight re-sampling, pair construction, losses, trainer, the round loop.
//! - [`eval`]: benchmark evaluation logic (answer extraction and comparison, question files,
//!   prompts, accuracy).
//! - [`report`]: charts and a text summary of a run folder.
//! - [`cli`]: the `genius-engine` commands.

pub mod backend;
pub mod cli;
pub mod engine;
pub mod eval;
pub mod genius;
pub mod model;
pub mod report;
pub mod transformer;
