//! Support for the tests that compare a whole model on the CUDA backend with the CPU backend:
//! the backend (or a skip line), bf16-rounded random weights loaded on both, and the relative
//! error they are judged by.

use super::random_weights;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::backend::cuda::{CudaBackend, CudaOptions, probe_devices};
use genius_engine::model::{HostTensor, MemoryTensors, ModelConfig};
use genius_engine::transformer::Transformer;
use std::io::Write as _;

/// A CUDA backend with poisoned outputs, or `None` with a `SKIPPED:` line where there is no
/// device (a failure instead in a build for a GPU run, `GENIUS_GPU_TESTS`).
pub fn gpu() -> Option<CudaBackend> {
    gpu_with(|o| o)
}

/// [`gpu`] with options of the caller's (given the test options, poisoned outputs on).
pub fn gpu_with(options: impl FnOnce(CudaOptions) -> CudaOptions) -> Option<CudaBackend> {
    match probe_devices() {
        Ok(d) if !d.is_empty() => {}
        other => {
            let why = match other {
                Err(e) => e,
                Ok(_) => "the driver reports no devices".into(),
            };
            if cfg!(genius_gpu_tests) {
                panic!(
                    "built for a GPU run (GENIUS_GPU_TESTS) but there is no usable CUDA device: {why}"
                );
            }
            let _ = writeln!(std::io::stderr(), "SKIPPED: no CUDA device ({why})");
            return None;
        }
    }
    let opts = CudaOptions {
        poison_outputs: true,
        ..CudaOptions::from_env().expect("CUDA options from the environment")
    };
    Some(CudaBackend::new(&options(opts)).unwrap_or_else(|e| panic!("{e:#}")))
}

/// Random weights rounded to bf16, so both backends hold the same values.
pub fn bf16_weights(config: &ModelConfig, seed: u64) -> Vec<(String, HostTensor)> {
    let mut w = random_weights(config, seed);
    for (_, t) in &mut w {
        for v in &mut t.data {
            *v = half::bf16::from_f32(*v).to_f32();
        }
    }
    w
}

/// The same bf16-rounded random weights on the CPU and on `gpu`.
pub fn both(
    config: &ModelConfig,
    seed: u64,
    gpu: CudaBackend,
) -> (Transformer<CpuBackend>, Transformer<CudaBackend>) {
    let w = bf16_weights(config, seed);
    let src = MemoryTensors::new(&w).unwrap();
    let cpu = Transformer::load(CpuBackend::new(), config.clone(), &src).unwrap();
    let cuda = Transformer::load(gpu, config.clone(), &src).unwrap();
    (cpu, cuda)
}

/// ‖a − b‖ / ‖b‖ over all elements (`a` the GPU's); NaN anywhere fails.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        assert!(x.is_finite(), "non-finite GPU value {x}");
        num += (f64::from(x) - f64::from(y)).powi(2);
        den += f64::from(y).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}
