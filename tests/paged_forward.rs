//! The paged-KV forward pass against the full-sequence forward: chunked prefill then one-token
//! decode steps of several sequences batched together, their blocks scattered through the pool
//! in shuffled order, for block sizes 1, 16 and 7 (which divides none of the lengths).

mod common;

use common::*;
use genius_engine::backend::cpu::CpuBackend;
use genius_engine::model::load_model;
use genius_engine::model::safetensors::Dtype;
use genius_engine::transformer::{PackedBatch, PagedBatch, PagedSeqBatch, Transformer};

/// Hands out pool blocks in a shuffled order so block tables are not the identity.
struct ShuffledBlocks(Vec<u32>);

impl ShuffledBlocks {
    fn new(n: usize, rng: &mut Rng) -> Self {
        let mut ids: Vec<u32> = (0..n as u32).collect();
        for i in (1..n).rev() {
            ids.swap(i, rng.below(i + 1));
        }
        ShuffledBlocks(ids)
    }
    fn take(&mut self) -> u32 {
        self.0.pop().expect("pool large enough")
    }
}

fn check(config: genius_engine::model::ModelConfig, block_size: usize, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_checkpoint(dir.path(), &config, seed, Dtype::F32);
    let m = load_model(Some(dir.path().to_str().unwrap())).unwrap();
    let model = Transformer::load(CpuBackend::new(), config.clone(), m.weights.as_ref()).unwrap();
    let mut rng = Rng::new(seed);

    // Three sequences: prompt lengths, then each decodes 1 token per step.
    let prompt_lens = [13usize, 1, 70];
    let decode_steps = 9;
    let full: Vec<Vec<u32>> = prompt_lens
        .iter()
        .map(|&p| {
            (0..p + decode_steps)
                .map(|_| rng.below(config.vocab_size) as u32)
                .collect()
        })
        .collect();
    let max_len = full.iter().map(Vec::len).max().unwrap();
    let num_blocks = 3 * max_len.div_ceil(block_size) + 5;
    let mut pool = ShuffledBlocks::new(num_blocks, &mut rng);
    let mut cache = model.new_kv_cache(num_blocks, block_size).unwrap();
    let mut tables: Vec<Vec<u32>> = vec![Vec::new(); full.len()];
    let mut lens = vec![0usize; full.len()];

    // Reference: every position of every sequence from the full forward.
    let reference = model
        .forward_hidden(&PackedBatch::from_sequences(&full))
        .unwrap();
    let ref_offsets: Vec<usize> = full
        .iter()
        .scan(0, |acc, s| {
            let o = *acc;
            *acc += s.len();
            Some(o)
        })
        .collect();

    // Steps: prefill in two chunks (first half, then the rest), then decode one at a time.
    let mut schedule: Vec<Vec<usize>> = Vec::new(); // tokens to add per sequence per step
    schedule.push(prompt_lens.iter().map(|&p| p.div_ceil(2)).collect());
    schedule.push(prompt_lens.iter().map(|&p| p - p.div_ceil(2)).collect());
    for _ in 0..decode_steps {
        schedule.push(vec![1; full.len()]);
    }
    let mut worst = 0f32;
    for step in schedule {
        let mut batch = PagedBatch::default();
        for (s, &add) in step.iter().enumerate() {
            if add == 0 {
                continue;
            }
            let start = lens[s];
            let q_start = batch.tokens.len();
            for pos in start..start + add {
                if pos % block_size == 0 {
                    tables[s].push(pool.take());
                }
                let block = tables[s][pos / block_size];
                batch.tokens.push(full[s][pos]);
                batch.positions.push(pos as u32);
                batch
                    .slots
                    .push(block * block_size as u32 + (pos % block_size) as u32);
            }
            lens[s] += add;
            batch.seqs.push(PagedSeqBatch {
                q_start,
                q_len: add,
                context_len: lens[s],
                block_table: tables[s].clone(),
            });
        }
        let hidden = model.forward_paged(&batch, &mut cache).unwrap();
        // Compare logits of every new token with the full forward's at the same position.
        let mut row = 0;
        for (s, &add) in step.iter().enumerate() {
            for pos in lens[s] - add..lens[s] {
                let got = model.logits_at(&hidden, &[row]).unwrap();
                let want = model
                    .logits_at(&reference, &[ref_offsets[s] + pos])
                    .unwrap();
                for (a, b) in got.data.iter().zip(&want.data) {
                    worst = worst.max((a - b).abs() / (1.0 + b.abs()));
                }
                row += 1;
            }
        }
    }
    assert!(
        worst < 1e-4,
        "block size {block_size}: max relative logit difference {worst}"
    );
}

#[test]
fn paged_matches_full_forward_block_size_1() {
    check(tiny_llama_config(), 1, 31);
}

#[test]
fn paged_matches_full_forward_block_size_16() {
    check(tiny_qwen2_config(), 16, 32);
}

#[test]
fn paged_matches_full_forward_block_size_7() {
    check(tiny_llama_config(), 7, 33);
    check(tiny_qwen2_config(), 7, 34);
}

/// A decode step padded the way the CUDA backend pads one for a graph replay
/// (`backend::cuda::graphs::pad_decode`: padding rows at position 0 reading block 0 and caching
/// nothing, `NO_SLOT`), on the CPU reference: the real rows' hidden states are bit-identical to
/// the unpadded step's, the padding rows' are finite, and the KV pools differ from the
/// unpadded step's nowhere.
#[test]
fn padded_decode_step_leaves_real_rows_and_the_cache_unchanged() {
    use genius_engine::backend::cuda::graphs::{is_plain_decode, pad_decode};
    use genius_engine::engine::sampler::{RowSampling, SamplingParams};
    let config = tiny_llama_config();
    let block_size = 4;
    let model = random_cpu_model(&config, 5);
    let mut rng = Rng::new(9);
    let lens = [6usize, 9, 3];
    let num_blocks = 16;
    let mut cache = model.new_kv_cache(num_blocks, block_size).unwrap();
    // Prefill each sequence but its last token, blocks handed out from 0 up (block 0 is real).
    let mut next = 0u32;
    let mut tables = Vec::new();
    let mut seqs = Vec::new();
    for &len in &lens {
        let tokens: Vec<u32> = (0..len)
            .map(|_| rng.below(config.vocab_size) as u32)
            .collect();
        let table: Vec<u32> = (0..len.div_ceil(block_size) as u32)
            .map(|b| next + b)
            .collect();
        next += table.len() as u32;
        let slot = |p: usize| table[p / block_size] * block_size as u32 + (p % block_size) as u32;
        let prefill = PagedBatch {
            tokens: tokens[..len - 1].to_vec(),
            positions: (0..len as u32 - 1).collect(),
            slots: (0..len - 1).map(slot).collect(),
            seqs: vec![PagedSeqBatch {
                q_start: 0,
                q_len: len - 1,
                context_len: len - 1,
                block_table: table.clone(),
            }],
        };
        model.forward_paged(&prefill, &mut cache).unwrap();
        tables.push(table);
        seqs.push(tokens);
    }
    // One decode step of every sequence.
    let mut step = PagedBatch::default();
    for (i, (tokens, table)) in seqs.iter().zip(&tables).enumerate() {
        let p = tokens.len() - 1;
        step.tokens.push(tokens[p]);
        step.positions.push(p as u32);
        step.slots
            .push(table[p / block_size] * block_size as u32 + (p % block_size) as u32);
        step.seqs.push(PagedSeqBatch {
            q_start: i,
            q_len: 1,
            context_len: p + 1,
            block_table: table.clone(),
        });
    }
    let rows: Vec<RowSampling> = (0..lens.len())
        .map(|i| RowSampling {
            params: SamplingParams::default(),
            seq_id: i as u64,
            position: 0,
        })
        .collect();
    assert!(is_plain_decode(&step, &rows));
    let (padded, padded_rows) = pad_decode(&step, &rows, 8);
    assert_eq!(padded.tokens.len(), 8);
    assert_eq!(padded_rows.len(), 8);

    let mut plain_cache = model.new_kv_cache(num_blocks, block_size).unwrap();
    for (dst, src) in plain_cache.k.iter_mut().zip(&cache.k) {
        dst.data.clone_from(&src.data);
    }
    for (dst, src) in plain_cache.v.iter_mut().zip(&cache.v) {
        dst.data.clone_from(&src.data);
    }
    let want = model.forward_paged(&step, &mut plain_cache).unwrap();
    let got = model.forward_paged(&padded, &mut cache).unwrap();
    let h = config.hidden_size;
    assert_eq!(&got.data[..lens.len() * h], &want.data[..]);
    assert!(got.data[lens.len() * h..].iter().all(|v| v.is_finite()));
    for (a, b) in cache
        .k
        .iter()
        .chain(&cache.v)
        .zip(plain_cache.k.iter().chain(&plain_cache.v))
    {
        assert_eq!(a.data, b.data, "a padding row wrote to the cache");
    }
}
