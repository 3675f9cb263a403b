//! The tensor-core forward of causal attention (kernels/attention_tc.cu) against the CPU
//! backend and against the paged-attention kernel it replaces (the fallback path), on fresh
//! random bf16-rounded inputs with poisoned outputs and a synchronize after every launch:
//! GQA groups 1, 2 and 7, head_dim 64 and 128, packed odd lengths with gaps between spans
//! (rows of no sequence must stay zero), and 1024- and 2048-token sequences. Relative L2 error
//! at most 1e-2; the log-sum-exp against f64 on the host.
//!
//! Ignored unless built for a GPU run (`GENIUS_GPU_TESTS=1`, as tools/gpu-prepare.sh does);
//! so built, a missing device fails it.

mod common;

use genius_engine::backend::cpu::CpuBackend;
use genius_engine::backend::cuda::tensor::round_to_bf16;
use genius_engine::backend::cuda::{CudaBackend, CudaOptions};
use genius_engine::backend::{AttentionShape, Backend, SeqSpan};
use genius_engine::model::HostTensor;
use std::io::Write;

const TOL: f64 = 1e-2;

/// The backend with poisoned outputs and a wait after every launch, or `None` after the
/// harness's `SKIPPED:` line (a failure instead in a build for a GPU run).
fn gpu() -> Option<CudaBackend> {
    common::cuda::gpu_with(|o| CudaOptions {
        sync_after_launch: true,
        attention_forward_tensor_cores: true,
        ..o
    })
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn uniform(&mut self) -> f32 {
        (self.next() as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
    }
    fn tensor(&mut self, shape: Vec<usize>, scale: f32) -> HostTensor {
        let n = shape.iter().product();
        let data = (0..n).map(|_| self.uniform() * scale).collect();
        round_to_bf16(&HostTensor::new(shape, data))
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7)
}

/// Spans of `lens` starting at row `lead`, `gap` rows of no sequence after each.
fn spans_of(lens: &[usize], lead: usize, gap: usize) -> (Vec<SeqSpan>, usize) {
    let mut spans = Vec::new();
    let mut at = lead;
    for &len in lens {
        spans.push(SeqSpan { start: at, len });
        at += len + gap;
    }
    (spans, at)
}

#[allow(clippy::too_many_arguments)]
fn run_case(
    be: &CudaBackend,
    cpu: &CpuBackend,
    rng: &mut Rng,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    lens: &[usize],
    lead: usize,
    gap: usize,
    check_lse: bool,
) {
    let (spans, n) = spans_of(lens, lead, gap);
    let q = rng.tensor(vec![n, heads * head_dim], 2.0);
    let k = rng.tensor(vec![n, kv_heads * head_dim], 1.0);
    let v = rng.tensor(vec![n, kv_heads * head_dim], 1.0);
    let shape = AttentionShape {
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim,
    };
    let what = format!("heads {heads}/{kv_heads} d {head_dim} lens {lens:?} lead {lead} gap {gap}");
    let want = cpu.causal_attention(&q, &k, &v, &spans, shape).unwrap();
    let (qd, kd, vd) = (
        be.upload(&q).unwrap(),
        be.upload(&k).unwrap(),
        be.upload(&v).unwrap(),
    );
    be.set_attention_forward_tensor_cores(true);
    let got = be
        .download(&be.causal_attention(&qd, &kd, &vd, &spans, shape).unwrap())
        .unwrap();
    be.set_attention_forward_tensor_cores(false);
    let old = be
        .download(&be.causal_attention(&qd, &kd, &vd, &spans, shape).unwrap())
        .unwrap();
    be.set_attention_forward_tensor_cores(true);
    assert_eq!(got.shape, want.shape, "{what}: shape");
    let nan = got.data.iter().filter(|x| x.is_nan()).count();
    assert_eq!(nan, 0, "{what}: {nan} NaN elements (unwritten or wrong)");
    let e_cpu = common::cuda::rel_err_or_inf(&got.data, &want.data);
    let e_old = common::cuda::rel_err_or_inf(&got.data, &old.data);
    let _ = writeln!(
        std::io::stderr(),
        "tc attention {what}: rel L2 vs cpu {e_cpu:.2e}, vs paged kernel {e_old:.2e}"
    );
    assert!(e_cpu <= TOL, "{what}: relative L2 vs cpu {e_cpu:.3e}");
    assert!(
        e_old <= TOL,
        "{what}: relative L2 vs the paged kernel {e_old:.3e}"
    );
    // Rows of no sequence are zero.
    let w = heads * head_dim;
    for r in 0..n {
        if !spans
            .iter()
            .any(|s| (s.start..s.start + s.len).contains(&r))
        {
            assert!(
                got.data[r * w..(r + 1) * w].iter().all(|&x| x == 0.0),
                "{what}: row {r} of no sequence is not zero"
            );
        }
    }
    if check_lse {
        let (out2, lse) = be
            .causal_attention_with_lse(&qd, &kd, &vd, &spans, shape)
            .unwrap();
        let out2 = be.download(&out2).unwrap();
        assert_eq!(out2.data, got.data, "{what}: with_lse output differs");
        let lse = be.download(&lse).unwrap();
        assert_eq!(lse.shape, vec![n, heads]);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let (kw, group) = (kv_heads * head_dim, heads / kv_heads);
        for s in &spans {
            for i in 0..s.len {
                let row = s.start + i;
                for h in 0..heads {
                    let kvh = h / group;
                    let sc: Vec<f64> = (0..=i)
                        .map(|j| {
                            let kr = s.start + j;
                            (0..head_dim)
                                .map(|d| {
                                    q.data[row * w + h * head_dim + d] as f64
                                        * k.data[kr * kw + kvh * head_dim + d] as f64
                                })
                                .sum::<f64>()
                                * scale
                        })
                        .collect();
                    let mx = sc.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let want = mx + sc.iter().map(|x| (x - mx).exp()).sum::<f64>().ln();
                    let g = lse.data[row * heads + h] as f64;
                    assert!(
                        (g - want).abs() <= 1e-3 * want.abs().max(1.0),
                        "{what}: lse row {row} head {h}: {g} vs {want}"
                    );
                }
            }
        }
        for r in 0..n {
            if !spans
                .iter()
                .any(|s| (s.start..s.start + s.len).contains(&r))
            {
                assert!(
                    lse.data[r * heads..(r + 1) * heads]
                        .iter()
                        .all(|&x| x == 0.0)
                );
            }
        }
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn tensor_core_attention_matches_cpu_and_paged_kernel_on_packed_odd_lengths() {
    let Some(be) = gpu() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = Rng(seed());
    for (heads, kv_heads) in [(2, 2), (4, 2), (14, 2)] {
        for head_dim in [64, 128] {
            // Gaps between spans (rows of no sequence: zero), then packed back to back (every
            // row written: the poisoned output must be overwritten everywhere).
            run_case(
                &be,
                &cpu,
                &mut rng,
                heads,
                kv_heads,
                head_dim,
                &[1, 17, 64, 130, 301],
                2,
                3,
                true,
            );
            run_case(
                &be,
                &cpu,
                &mut rng,
                heads,
                kv_heads,
                head_dim,
                &[301, 1, 130, 17, 64],
                0,
                0,
                false,
            );
        }
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn tensor_core_attention_matches_on_long_sequences() {
    let Some(be) = gpu() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = Rng(seed());
    // Qwen2.5-0.5B's shape (14 / 2 heads of 64), and GQA 7 at head_dim 128.
    run_case(&be, &cpu, &mut rng, 14, 2, 64, &[1024], 0, 0, false);
    run_case(&be, &cpu, &mut rng, 14, 2, 64, &[2048], 0, 0, false);
    run_case(&be, &cpu, &mut rng, 7, 1, 128, &[1024, 2048], 1, 1, false);
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn other_head_dims_are_errors_on_both_paths() {
    let Some(be) = gpu() else {
        return;
    };
    let mut rng = Rng(seed());
    let shape = AttentionShape {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 80,
    };
    let q = be.upload(&rng.tensor(vec![5, 160], 1.0)).unwrap();
    let k = be.upload(&rng.tensor(vec![5, 80], 1.0)).unwrap();
    // head_dim 80 has no kernel on either path: the fallback's error, not a tensor-core one.
    let e = be
        .causal_attention(&q, &k, &k, &[SeqSpan { start: 0, len: 3 }], shape)
        .unwrap_err()
        .to_string();
    assert!(e.contains("head_dim 80"), "{e}");
    assert!(
        be.causal_attention_with_lse(&q, &k, &k, &[SeqSpan { start: 0, len: 3 }], shape)
            .is_err()
    );
}
