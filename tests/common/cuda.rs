//! Support for the tests that compare a whole model on the CUDA backend with the CPU backend:
//! the backend (or a skip line), bf16-rounded random weights loaded on both, and the relative
//! errors they are judged by.

use super::{Rng, random_weights};
use genius_engine::backend::Backend;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::backend::cuda::tensor::round_to_bf16;
use genius_engine::backend::cuda::{CudaBackend, CudaOptions, probe_devices};
use genius_engine::engine::Finished;
use genius_engine::model::{HostTensor, MemoryTensors, ModelConfig};
use genius_engine::transformer::{PackedBatch, Transformer};
use std::io::Write as _;
use std::sync::OnceLock;

/// Prints a `SKIPPED:` line the test harness does not capture, so that a skip is visible; in a
/// build for a GPU run (`GENIUS_GPU_TESTS`) a missing device is a failure instead.
pub fn skipped(why: &str) {
    if cfg!(genius_gpu_tests) {
        panic!("built for a GPU run (GENIUS_GPU_TESTS) but there is no usable CUDA device: {why}");
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: no CUDA device ({why})");
}

/// Whether a device exists; prints the skip line (see [`skipped`]) when not.
pub fn have_device() -> bool {
    match probe_devices() {
        Ok(d) if !d.is_empty() => true,
        Ok(_) => {
            skipped("the driver reports no devices");
            false
        }
        Err(why) => {
            skipped(&why);
            false
        }
    }
}

/// A CUDA backend with poisoned outputs, or `None` with a `SKIPPED:` line where there is no
/// device (a failure instead in a build for a GPU run, `GENIUS_GPU_TESTS`).
pub fn gpu() -> Option<CudaBackend> {
    gpu_with(|o| o)
}

/// [`gpu`] with options of the caller's (given the test options, poisoned outputs on).
pub fn gpu_with(options: impl FnOnce(CudaOptions) -> CudaOptions) -> Option<CudaBackend> {
    if !have_device() {
        return None;
    }
    let opts = CudaOptions {
        poison_outputs: true,
        ..CudaOptions::from_env().expect("CUDA options from the environment")
    };
    Some(CudaBackend::new(&options(opts)).unwrap_or_else(|e| panic!("{e:#}")))
}

/// The op tests' options: poisoned outputs and a synchronize after every launch (so that a
/// fault is reported by the kernel that caused it).
pub fn test_options() -> CudaOptions {
    CudaOptions {
        poison_outputs: true,
        sync_after_launch: true,
        ..CudaOptions::from_env().expect("CUDA options from the environment")
    }
}

/// The op tests' backend ([`test_options`]), one per test executable, or `None` (after
/// printing the skip line) without a device.
pub fn shared_gpu() -> Option<&'static CudaBackend> {
    if !have_device() {
        return None;
    }
    static GPU: OnceLock<CudaBackend> = OnceLock::new();
    Some(GPU.get_or_init(|| {
        let be = CudaBackend::new(&test_options()).unwrap_or_else(|e| panic!("{e:#}"));
        let _ = writeln!(
            std::io::stderr(),
            "cuda backend: {} kernels {:?}",
            be.name(),
            be.kernel_units()
        );
        be
    }))
}

/// A random tensor already rounded to bf16 (so that both backends see the same values).
pub fn rand_bf16(rng: &mut Rng, shape: &[usize], scale: f32) -> HostTensor {
    round_to_bf16(&rng.tensor(shape, scale))
}

/// ‖got − want‖ / ‖want‖ (the error itself when `want` is zero); infinite on any NaN/inf.
pub fn rel_err_or_inf(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len());
    if got.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if den == 0.0 {
        num.sqrt()
    } else {
        (num / den).sqrt()
    }
}

/// `got` has `want`'s shape, no NaN (an unwritten poisoned element) and a relative error
/// ([`rel_err_or_inf`]) of at most `tol`.
#[track_caller]
pub fn assert_close(what: &str, got: &HostTensor, want: &HostTensor, tol: f64) {
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let unwritten = got.data.iter().filter(|v| v.is_nan()).count();
    assert_eq!(
        unwritten, 0,
        "{what}: {unwritten} NaN elements (unwritten or wrong)"
    );
    let e = rel_err_or_inf(&got.data, &want.data);
    assert!(e <= tol, "{what}: relative error {e:.3e} over {tol:.0e}");
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

/// The worst `|gpu - cpu| / (1 + |cpu|)` between the log-probs the engine reported for the
/// tokens it drew after each prompt (`done[i]` after `prompts[i]`) and the CPU's for the same
/// tokens in the same contexts; every reported log-prob must be finite and at most 0.
pub fn worst_logprob_difference(
    cpu: &Transformer<CpuBackend>,
    prompts: &[Vec<u32>],
    done: &[Finished],
) -> f32 {
    assert_eq!(done.len(), prompts.len());
    let mut worst = 0f32;
    for (p, f) in prompts.iter().zip(done) {
        assert!(!f.tokens.is_empty());
        let seq: Vec<u32> = p.iter().chain(&f.tokens).copied().collect();
        let hidden = cpu
            .forward_hidden(&PackedBatch::from_sequences(&[&seq]))
            .unwrap();
        let rows: Vec<usize> = (p.len() - 1..seq.len() - 1).collect();
        let want = cpu.target_logprobs(&hidden, &rows, &f.tokens).unwrap();
        for (g, w) in f.logprobs.iter().zip(&want) {
            assert!(g.is_finite() && *g <= 0.0, "logprob {g}");
            worst = worst.max((g - w).abs() / (1.0 + w.abs()));
        }
    }
    worst
}
