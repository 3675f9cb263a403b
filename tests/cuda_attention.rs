//! The CUDA KV cache and attention (kernels/paged_attention.cu) against the CPU backend, on
//! fresh random inputs with poisoned outputs and a synchronize after every launch. Each test
//! is ignored unless built for a GPU run (`GENIUS_GPU_TESTS=1`, as tools/gpu-prepare.sh
//! does); so built, a missing device fails it.
//!
//! Inputs are rounded to bf16 before the CPU sees them, so the two backends compute on the same
//! numbers; the CUDA result is bf16 (relative rounding 2^-9) over f32 accumulation, hence the
//! tolerance `2e-2 + 1e-2 |want|` on outputs of magnitude about 1.

mod common;

use genius_engine::backend::cpu::CpuBackend;
use genius_engine::backend::cuda::tensor::round_to_bf16;
use genius_engine::backend::cuda::{CudaBackend, CudaOptions};
use genius_engine::backend::{AttentionShape, Backend, PagedSeq, SeqSpan};
use genius_engine::model::HostTensor;
use std::io::Write;

/// The backend with poisoned outputs and a wait after every launch, or `None` after the
/// harness's `SKIPPED:` line (a failure instead in a build for a GPU run).
fn gpu() -> Option<CudaBackend> {
    common::cuda::gpu_with(|o| CudaOptions {
        sync_after_launch: true,
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
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(7)
}

fn assert_close(what: &str, got: &HostTensor, want: &HostTensor) {
    assert_eq!(got.shape, want.shape, "{what}: shapes");
    let mut worst = (0f32, 0usize);
    for (i, (&g, &w)) in got.data.iter().zip(&want.data).enumerate() {
        assert!(
            g.is_finite(),
            "{what}: element {i} is {g} (unwritten or overflow)"
        );
        let err = (g - w).abs();
        assert!(
            err <= 2e-2 + 1e-2 * w.abs(),
            "{what}: element {i}: got {g}, want {w}"
        );
        if err > worst.0 {
            worst = (err, i);
        }
    }
    let _ = writeln!(
        std::io::stderr(),
        "{what}: max abs error {:.2e} at {}",
        worst.0,
        worst.1
    );
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn write_kv_and_copy_blocks_are_exact() {
    let Some(be) = gpu() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = Rng(seed());
    for (blocks, block_size, width) in [(9, 16, 128), (13, 7, 3 * 64), (5, 1, 2 * 64), (6, 3, 5)] {
        let rows = blocks * block_size;
        let (mut kc, mut vc) = (
            cpu.kv_pool(blocks, block_size, width).unwrap(),
            cpu.kv_pool(blocks, block_size, width).unwrap(),
        );
        let (mut kg, mut vg) = (
            be.kv_pool(blocks, block_size, width).unwrap(),
            be.kv_pool(blocks, block_size, width).unwrap(),
        );
        assert_eq!(
            be.download(&kg).unwrap().data,
            kc.data,
            "kv_pool is zero-filled"
        );
        // Every slot once, in shuffled order, then a few again (the last write wins on both).
        let mut slots: Vec<u32> = (0..rows as u32).collect();
        rng.shuffle(&mut slots);
        for step in [slots.clone(), slots[..rows / 3].to_vec()] {
            let k = rng.tensor(vec![step.len(), width], 1.0);
            let v = rng.tensor(vec![step.len(), width], 1.0);
            cpu.write_kv(&mut kc, &mut vc, &k, &v, &step).unwrap();
            let (kd, vd) = (be.upload(&k).unwrap(), be.upload(&v).unwrap());
            be.write_kv(&mut kg, &mut vg, &kd, &vd, &step).unwrap();
        }
        assert_eq!(be.download(&kg).unwrap().data, kc.data, "write_kv k");
        assert_eq!(be.download(&vg).unwrap().data, vc.data, "write_kv v");
        // Independent copies, a chain (1 -> 2 after 0 -> 1), a self-copy, an overwrite.
        let copies = [(0, 1), (1, 2), (3, 3), (4, 0), (2, blocks as u32 - 1)];
        cpu.copy_blocks(&mut kc, &copies, block_size).unwrap();
        be.copy_blocks(&mut kg, &copies, block_size).unwrap();
        assert_eq!(be.download(&kg).unwrap().data, kc.data, "copy_blocks");
        // Errors, not panics.
        assert!(
            be.copy_blocks(&mut kg, &[(0, blocks as u32)], block_size)
                .is_err()
        );
        let k = rng.tensor(vec![1, width], 1.0);
        let kd = be.upload(&k).unwrap();
        assert!(
            be.write_kv(&mut kg, &mut vg, &kd, &kd, &[rows as u32])
                .is_err()
        );
    }
}

/// One paged attention case: sequences as `(q_len, context_len)`, and rows left between
/// sequences (written as zeros).
struct Case {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
    seqs: Vec<(usize, usize)>,
    gap_rows: bool,
}

fn run_paged(be: &CudaBackend, rng: &mut Rng, c: &Case) {
    let cpu = CpuBackend::new();
    let kw = c.kv_heads * c.head_dim;
    let qw = c.heads * c.head_dim;
    let blocks_needed: usize = c.seqs.iter().map(|s| s.1.div_ceil(c.block_size)).sum();
    let pool_blocks = blocks_needed + 5;
    let mut ids: Vec<u32> = (0..pool_blocks as u32).collect();
    rng.shuffle(&mut ids);
    // Random data in every slot, also those no sequence uses: reading one shows.
    let k_pool = rng.tensor(vec![pool_blocks * c.block_size, kw], 1.0);
    let v_pool = rng.tensor(vec![pool_blocks * c.block_size, kw], 1.0);
    let mut tables = Vec::new();
    let mut next_id = 0;
    for &(_, ctx) in &c.seqs {
        let n = ctx.div_ceil(c.block_size);
        tables.push(ids[next_id..next_id + n].to_vec());
        next_id += n;
    }
    let mut row = 0;
    let mut seqs = Vec::new();
    for (i, &(q_len, ctx)) in c.seqs.iter().enumerate() {
        if c.gap_rows {
            row += 1;
        }
        seqs.push(PagedSeq {
            q_start: row,
            q_len,
            context_len: ctx,
            block_table: &tables[i],
        });
        row += q_len;
    }
    let q = rng.tensor(vec![row, qw], 2.0);
    let shape = AttentionShape {
        num_heads: c.heads,
        num_kv_heads: c.kv_heads,
        head_dim: c.head_dim,
    };
    let want = cpu
        .paged_attention(&q, &k_pool, &v_pool, &seqs, shape, c.block_size)
        .unwrap();
    let (qd, kd, vd) = (
        be.upload(&q).unwrap(),
        be.upload(&k_pool).unwrap(),
        be.upload(&v_pool).unwrap(),
    );
    let got = be
        .paged_attention(&qd, &kd, &vd, &seqs, shape, c.block_size)
        .unwrap();
    let what = format!(
        "paged ({}) heads {}/{} d {} block {} seqs {:?}",
        if be.paged_attention_tensor_cores() {
            "tensor cores"
        } else {
            "CUDA cores"
        },
        c.heads,
        c.kv_heads,
        c.head_dim,
        c.block_size,
        c.seqs
    );
    assert_close(&what, &be.download(&got).unwrap(), &want);
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn paged_attention_matches_the_cpu() {
    let Some(be) = gpu() else {
        return;
    };
    let mut rng = Rng(seed());
    let mut cases = Vec::new();
    // GQA 1, 2, 7 (Qwen2.5-0.5B's 14 / 2) and 4 (LLaMA-3 8B's 32 / 8).
    for (heads, kv_heads) in [(4, 4), (4, 2), (14, 2), (32, 8)] {
        for head_dim in [64, 128] {
            for block_size in [1, 16, 7] {
                // Decode steps (one query each, odd and partial-block contexts), a prefill
                // chunk over cached context, a whole prompt, a 2-query step.
                cases.push(Case {
                    heads,
                    kv_heads,
                    head_dim,
                    block_size,
                    seqs: vec![(1, 1), (1, 17), (1, 33), (37, 37 + 50), (23, 23), (2, 9)],
                    gap_rows: block_size == 7,
                });
            }
        }
    }
    // Long contexts with few sequences: split over several partitions and combined.
    for (heads, kv_heads, head_dim, block_size) in
        [(14, 2, 64, 16), (8, 8, 128, 7), (28, 4, 128, 16)]
    {
        cases.push(Case {
            heads,
            kv_heads,
            head_dim,
            block_size,
            seqs: vec![(1, 3001), (1, 700), (3, 1500)],
            gap_rows: false,
        });
    }
    // A group of 16 heads: two slices of 8 per kv head.
    cases.push(Case {
        heads: 32,
        kv_heads: 2,
        head_dim: 64,
        block_size: 16,
        seqs: vec![(1, 600), (5, 40)],
        gap_rows: true,
    });
    // Both kernel families on every case: the tensor-core one (the default) and the CUDA-core
    // one ($GENIUS_CUDA_PA_TC=0).
    for tensor_cores in [true, false] {
        be.set_paged_attention_tensor_cores(tensor_cores);
        for c in &cases {
            run_paged(&be, &mut rng, c);
        }
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn causal_attention_matches_the_cpu() {
    let Some(be) = gpu() else {
        return;
    };
    let cpu = CpuBackend::new();
    let mut rng = Rng(seed());
    for (heads, kv_heads) in [(4, 4), (6, 3), (14, 2)] {
        for head_dim in [64, 128] {
            for lens in [vec![1], vec![37, 5, 130], vec![700]] {
                // A row of no sequence between spans: zeros on both backends.
                let mut spans = Vec::new();
                let mut at = 0;
                for &len in &lens {
                    spans.push(SeqSpan { start: at, len });
                    at += len + 1;
                }
                let n = at;
                let q = rng.tensor(vec![n, heads * head_dim], 2.0);
                let k = rng.tensor(vec![n, kv_heads * head_dim], 1.0);
                let v = rng.tensor(vec![n, kv_heads * head_dim], 1.0);
                let shape = AttentionShape {
                    num_heads: heads,
                    num_kv_heads: kv_heads,
                    head_dim,
                };
                let want = cpu.causal_attention(&q, &k, &v, &spans, shape).unwrap();
                let (qd, kd, vd) = (
                    be.upload(&q).unwrap(),
                    be.upload(&k).unwrap(),
                    be.upload(&v).unwrap(),
                );
                // The tensor-core forward (the default), then the paged kernels on contiguous
                // rows: tensor-core and CUDA-core.
                for (forward_tc, paged_tc) in [(true, true), (false, true), (false, false)] {
                    be.set_attention_forward_tensor_cores(forward_tc);
                    be.set_paged_attention_tensor_cores(paged_tc);
                    let got = be.causal_attention(&qd, &kd, &vd, &spans, shape).unwrap();
                    let what = format!(
                        "causal (forward tc {forward_tc}, paged tc {paged_tc}) heads {heads}/{kv_heads} d {head_dim} lens {lens:?}"
                    );
                    assert_close(&what, &be.download(&got).unwrap(), &want);
                }
                be.set_attention_forward_tensor_cores(true);
                be.set_paged_attention_tensor_cores(true);
            }
        }
    }
}

#[test]
#[cfg_attr(
    not(genius_gpu_tests),
    ignore = "needs a CUDA GPU: built by tools/gpu-prepare.sh (GENIUS_GPU_TESTS=1), run by tools/gpu-check.sh"
)]
fn bad_attention_inputs_are_errors() {
    let Some(be) = gpu() else {
        return;
    };
    let mut rng = Rng(seed());
    let shape = AttentionShape {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 64,
    };
    let q = be.upload(&rng.tensor(vec![3, 128], 1.0)).unwrap();
    let pool = be.kv_pool(4, 4, 64).unwrap();
    let table = [0u32, 9];
    let bad_block = [PagedSeq {
        q_start: 0,
        q_len: 1,
        context_len: 6,
        block_table: &table,
    }];
    assert!(
        be.paged_attention(&q, &pool, &pool, &bad_block, shape, 4)
            .is_err()
    );
    let short = [PagedSeq {
        q_start: 0,
        q_len: 1,
        context_len: 9,
        block_table: &table[..1],
    }];
    assert!(
        be.paged_attention(&q, &pool, &pool, &short, shape, 4)
            .is_err()
    );
    // An unsupported head_dim is an error naming it.
    let odd = AttentionShape {
        num_heads: 2,
        num_kv_heads: 1,
        head_dim: 80,
    };
    let q80 = be.upload(&rng.tensor(vec![3, 160], 1.0)).unwrap();
    let k80 = be.upload(&rng.tensor(vec![3, 80], 1.0)).unwrap();
    let e = be
        .causal_attention(&q80, &k80, &k80, &[SeqSpan { start: 0, len: 3 }], odd)
        .unwrap_err();
    assert!(e.to_string().contains("head_dim 80"), "{e}");
}
