//! The CUDA attention backward against the CPU backend's `causal_attention_backward`, on
//! fresh random inputs rounded to bf16 (so both backends compute the same function), with
//! poisoned outputs and a synchronize after every launch. Every check runs both kernel sets:
//! the tensor-core kernels (kernels/attention_backward_tc.cu, `attention_tensor_cores` on, the
//! default; with the GQA dk/dv pass split over query heads, the default, and unsplit) and the
//! scalar ones (kernels/attention_backward.cu), and also compares them; on the tensor cores
//! also the training path that takes the forward's softmax statistics.
//! Covers GQA ratios 1, 2, 4, 7 and 8, head_dim 64 and 128, packed sequences of odd lengths,
//! spans with gaps (rows of no sequence must be exactly zero) and a 1024-token sequence.
//!
//! Tolerance: ‖gpu − cpu‖ / ‖cpu‖ at most 2e-2 for each of dq, dk, dv. Both backends see the
//! same bf16 inputs and accumulate in f32; the GPU's outputs are rounded to bf16 (at most 2^-9
//! relative per element, about 2e-3 in L2) and its sums run in another order, with another
//! `exp`; dS = P (dP − D) cancels where dP ≈ D, which magnifies f32 rounding in a few elements,
//! and dk/dv add up to 8 heads x 1024 rows of such terms. Expected errors are a few 1e-3; 2e-2
//! leaves room without letting a wrong mask, a missing head or a wrong scale through (each
//! of those is an O(1) relative error). NaN (an unwritten element) never passes.
//!
//! Ignored unless built for a GPU run (`GENIUS_GPU_TESTS=1`, as tools/gpu-prepare.sh does); so
//! built, a missing device fails them.

mod common;

use common::Rng;
use common::cuda::rel_err_or_inf as rel_err;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::backend::cuda::tensor::round_to_bf16;
use genius_engine::backend::cuda::{CudaBackend, CudaOptions};
use genius_engine::backend::{AttentionShape, Backend, SeqSpan};
use genius_engine::model::HostTensor;
use std::io::Write as _;
use std::sync::OnceLock;

/// Relative L2 error bound of each gradient (see the module comment).
const TOL: f64 = 2e-2;

/// The backends of both kernel sets: (name, backend), tensor cores first, then the scalar
/// kernels, then the tensor cores with the GQA dk/dv pass unsplit (one block per kv head).
fn gpus() -> Option<[(&'static str, &'static CudaBackend); 3]> {
    if !common::cuda::have_device() {
        return None;
    }
    static GPU: OnceLock<[CudaBackend; 3]> = OnceLock::new();
    let [tc, scalar, unsplit] = GPU.get_or_init(|| {
        [(true, true), (false, true), (true, false)].map(|(tensor_cores, split)| {
            let mut o = CudaOptions::from_env().expect("CUDA options from the environment");
            o.poison_outputs = true;
            o.sync_after_launch = true;
            o.attention_tensor_cores = tensor_cores;
            o.attention_backward_split_heads = split;
            o.attention_backward_forward_stats = true;
            CudaBackend::new(&o).unwrap_or_else(|e| panic!("{e:#}"))
        })
    });
    Some([
        ("tensor cores", tc),
        ("scalar", scalar),
        ("tensor cores, unsplit", unsplit),
    ])
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7)
}

/// Spans packed back to back from row `first`, with `gap` empty rows after each.
fn packed(first: usize, lens: &[usize], gap: usize) -> (Vec<SeqSpan>, usize) {
    let mut start = first;
    let mut spans = Vec::new();
    for &len in lens {
        spans.push(SeqSpan { start, len });
        start += len + gap;
    }
    (spans, start)
}

/// One comparison: q/k/v/dout random (bf16-rounded), `rows` rows, the given spans.
fn check(what: &str, shape: AttentionShape, seqs: &[SeqSpan], rows: usize, q_scale: f32) {
    let Some(backends) = gpus() else { return };
    let cpu = CpuBackend::new();
    let seed = seed();
    let mut rng = Rng::new(seed);
    let qw = shape.num_heads * shape.head_dim;
    let kw = shape.num_kv_heads * shape.head_dim;
    let q = round_to_bf16(&rng.tensor(&[rows, qw], q_scale));
    let k = round_to_bf16(&rng.tensor(&[rows, kw], 1.0));
    let v = round_to_bf16(&rng.tensor(&[rows, kw], 1.0));
    let dout = round_to_bf16(&rng.tensor(&[rows, qw], 1.0));
    let (wq, wk, wv) = cpu
        .causal_attention_backward(&q, &k, &v, &dout, seqs, shape)
        .unwrap();
    let mut in_seq = vec![false; rows];
    for s in seqs {
        in_seq[s.start..s.start + s.len].fill(true);
    }
    let mut results = Vec::new();
    for (kind, be) in backends {
        let what = format!("{what} [{kind}]");
        let up = |t: &HostTensor| be.upload(t).unwrap();
        let (gq, gk, gv, gd) = (up(&q), up(&k), up(&v), up(&dout));
        let (dq, dk, dv) = be
            .causal_attention_backward(&gq, &gk, &gv, &gd, seqs, shape)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let got = [
            be.download(&dq).unwrap(),
            be.download(&dk).unwrap(),
            be.download(&dv).unwrap(),
        ];
        for (name, g, w) in [
            ("dq", &got[0], &wq),
            ("dk", &got[1], &wk),
            ("dv", &got[2], &wv),
        ] {
            assert_eq!(g.shape, w.shape, "{what} {name}: shape");
            let nan = g.data.iter().filter(|x| x.is_nan()).count();
            assert_eq!(
                nan, 0,
                "{what} {name} (seed {seed}): {nan} NaN elements (unwritten?)"
            );
            let width = g.shape[1];
            for (r, _) in in_seq.iter().enumerate().filter(|(_, s)| !**s) {
                let row = &g.data[r * width..(r + 1) * width];
                assert!(
                    row.iter().all(|&x| x == 0.0),
                    "{what} {name}: row {r} belongs to no sequence but is not zero"
                );
            }
            let e = rel_err(&g.data, &w.data);
            let _ = writeln!(
                std::io::stderr(),
                "{what} {name}: relative error {e:.2e} (seed {seed})"
            );
            assert!(
                e <= TOL,
                "{what} {name} (seed {seed}): relative error {e:.3e} over {TOL:.0e}"
            );
        }
        // Deterministic: a second run gives the same bits.
        let (dq2, dk2, dv2) = be
            .causal_attention_backward(&gq, &gk, &gv, &gd, seqs, shape)
            .unwrap();
        for (name, a, b) in [
            ("dq", &got[0], &dq2),
            ("dk", &got[1], &dk2),
            ("dv", &got[2], &dv2),
        ] {
            let b = be.download(b).unwrap();
            assert!(
                a.data
                    .iter()
                    .zip(&b.data)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{what} {name}: a second run differs (not deterministic)"
            );
        }
        // The training path: the tensor-core forward hands its log-sum-exp (and output, for
        // delta) to the backward, whose dq kernel then skips its statistics pass. The same
        // gradients, within the same tolerance.
        let (out, stats) = be
            .causal_attention_for_training(&gq, &gk, &gv, seqs, shape)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        match (kind.starts_with("tensor cores"), stats) {
            (true, Some(stats)) => {
                let (dq, dk, dv) = be
                    .causal_attention_backward_with(&gq, &gk, &gv, &gd, &out, &stats, seqs, shape)
                    .unwrap_or_else(|e| panic!("{what}: {e:#}"));
                for (name, g, w) in [("dq", &dq, &wq), ("dk", &dk, &wk), ("dv", &dv, &wv)] {
                    let g = be.download(g).unwrap();
                    let width = g.shape[1];
                    for (r, _) in in_seq.iter().enumerate().filter(|(_, s)| !**s) {
                        assert!(
                            g.data[r * width..(r + 1) * width].iter().all(|&x| x == 0.0),
                            "{what} {name} with the forward's statistics: row {r} belongs to no sequence but is not zero"
                        );
                    }
                    let e = rel_err(&g.data, &w.data);
                    let _ = writeln!(
                        std::io::stderr(),
                        "{what} {name} with the forward's statistics: relative error {e:.2e} (seed {seed})"
                    );
                    assert!(
                        e <= TOL,
                        "{what} {name} with the forward's statistics (seed {seed}): relative error {e:.3e} over {TOL:.0e}"
                    );
                }
            }
            (true, None) if be.attention_forward_tensor_cores() => {
                panic!("{what}: the tensor-core forward gave no statistics for the backward")
            }
            (true, None) => {
                let _ = writeln!(
                    std::io::stderr(),
                    "{what}: forward on CUDA cores ($GENIUS_CUDA_ATTN_FWD_TC=0): no statistics to hand over, path not checked"
                );
            }
            (_, stats) => assert!(
                stats.is_none(),
                "{what}: statistics without the tensor-core backward"
            ),
        }
        results.push(got);
    }
    // The kernel sets agree with each other (as closely as each with the CPU).
    for (other, label) in [(1, "scalar"), (2, "unsplit")] {
        for (i, name) in ["dq", "dk", "dv"].into_iter().enumerate() {
            let e = rel_err(&results[0][i].data, &results[other][i].data);
            let _ = writeln!(
                std::io::stderr(),
                "{what} {name}: tensor cores vs {label} {e:.2e} (seed {seed})"
            );
            assert!(
                e <= TOL,
                "{what} {name} (seed {seed}): tensor cores vs {label} {e:.3e} over {TOL:.0e}"
            );
        }
    }
}

fn shape(num_heads: usize, num_kv_heads: usize, head_dim: usize) -> AttentionShape {
    AttentionShape {
        num_heads,
        num_kv_heads,
        head_dim,
    }
}

const ODD_LENS: &[usize] = &[1, 17, 64, 130, 301];

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn packed_odd_lengths_match_the_cpu() {
    for (h, kvh) in [(4, 4), (4, 2), (14, 2)] {
        for hd in [64, 128] {
            let (seqs, rows) = packed(0, ODD_LENS, 0);
            check(
                &format!("packed H={h} KVH={kvh} hd={hd}"),
                shape(h, kvh, hd),
                &seqs,
                rows,
                2.0,
            );
        }
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn spans_with_gaps_leave_zero_rows() {
    // Gaps before, between and after the sequences, and an empty span.
    for (h, kvh, hd) in [(14, 2, 64), (16, 2, 128), (32, 8, 64), (6, 3, 128)] {
        let (mut seqs, end) = packed(3, &[17, 130, 1, 64, 33, 300], 5);
        seqs.push(SeqSpan { start: 2, len: 0 });
        check(
            &format!("gaps H={h} KVH={kvh} hd={hd}"),
            shape(h, kvh, hd),
            &seqs,
            end + 7,
            2.0,
        );
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn one_long_sequence_matches_the_cpu() {
    // The real models' shapes: Qwen2.5-0.5B (14/2 x 64), Qwen2.5-3B (16/2 x 128), with a
    // peakier softmax for the first.
    check(
        "1024 tokens H=14 KVH=2 hd=64",
        shape(14, 2, 64),
        &[SeqSpan {
            start: 0,
            len: 1024,
        }],
        1024,
        4.0,
    );
    check(
        "1024 tokens H=16 KVH=2 hd=128",
        shape(16, 2, 128),
        &[SeqSpan {
            start: 0,
            len: 1024,
        }],
        1024,
        2.0,
    );
    // Two sequences of a training batch back to back, the second one not tile-aligned.
    let (seqs, rows) = packed(0, &[1024, 999], 0);
    check(
        "1024 + 999 tokens H=32 KVH=8 hd=64",
        shape(32, 8, 64),
        &seqs,
        rows,
        2.0,
    );
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn unsupported_shapes_fail_clearly() {
    let Some(backends) = gpus() else { return };
    for (_, be) in backends {
        unsupported_shapes_fail_clearly_on(be);
    }
}

fn unsupported_shapes_fail_clearly_on(be: &CudaBackend) {
    let t = |w: usize| {
        be.upload(&HostTensor::new(vec![4, w], vec![0.5; 4 * w]))
            .unwrap()
    };
    let seqs = [SeqSpan { start: 0, len: 4 }];
    let e = be
        .causal_attention_backward(&t(96), &t(96), &t(96), &t(96), &seqs, shape(1, 1, 96))
        .unwrap_err()
        .to_string();
    assert!(e.contains("head_dim 96 is not supported on CUDA"), "{e}");
    let overlapping = [SeqSpan { start: 0, len: 3 }, SeqSpan { start: 2, len: 2 }];
    let e = be
        .causal_attention_backward(
            &t(64),
            &t(64),
            &t(64),
            &t(64),
            &overlapping,
            shape(1, 1, 64),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("overlap"), "{e}");
    // No sequences at all: zero gradients.
    let (dq, dk, dv) = be
        .causal_attention_backward(&t(64), &t(64), &t(64), &t(64), &[], shape(1, 1, 64))
        .unwrap();
    for g in [dq, dk, dv] {
        assert!(be.download(&g).unwrap().data.iter().all(|&x| x == 0.0));
    }
}
