/* Argument structs of the kernels, shared with the Rust side.
 *
 * Each kernel whose arguments the Rust side builds takes one of these structs by value. The
 * Rust mirror is src/backend/cuda/args.rs, generated from this file by tools/gen-bindings.sh
 * (bindgen) and committed; a test regenerates it and compares where bindgen is installed.
 *
 * Rules, so that the C and Rust layouts agree without surprises:
 * - plain C: no includes, no C++ in this file (bindgen reads it as C; nvcc and NVRTC as C++);
 * - device pointers are `unsigned long long` device addresses (CUdeviceptr), each field's
 *   comment giving the element type and shape the kernel reads them as;
 * - pointers first, then 8-byte counts, then 4-byte fields;
 * - every struct's size and alignment are stated with GE_LAYOUT below: the CUDA compilers check
 *   them, and a Rust test checks the mirror against the same numbers.
 */
#ifndef GENIUS_ENGINE_KERNEL_ARGS_H
#define GENIUS_ENGINE_KERNEL_ARGS_H

#ifdef __cplusplus
#define GE_LAYOUT(T, size, align)                                                            \
    static_assert(sizeof(T) == (size) && alignof(T) == (align), #T " layout changed")
#else
#define GE_LAYOUT(T, size, align)                                                            \
    _Static_assert(sizeof(T) == (size) && _Alignof(T) == (align), #T " layout changed")
#endif

/** `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight` for every row `r`, f32 accumulation. */
typedef struct RmsNormArgs {
    /** bf16 `[rows, dim]`, read. */
    unsigned long long x;
    /** bf16 `[dim]`, read. */
    unsigned long long weight;
    /** bf16 `[rows, dim]`, written. */
    unsigned long long out;
    int rows;
    int dim;
    float eps;
} RmsNormArgs;
GE_LAYOUT(RmsNormArgs, 40, 8);

/** Rotary embedding in place, HF rotate-half layout: in each head, element `i` pairs with
 * `i + head_dim / 2` and is rotated by `positions[r] * inv_freq[i]` (minus that when
 * `inverse` is non-zero: the rotation's transpose, RoPE's backward). */
typedef struct RopeArgs {
    /** bf16 `[rows, width]`, `width = heads * head_dim`, read and written. */
    unsigned long long x;
    /** u32 `[rows]`, read. */
    unsigned long long positions;
    /** f32 `[head_dim / 2]`, read. */
    unsigned long long inv_freq;
    int rows;
    int width;
    int head_dim;
    int inverse;
} RopeArgs;
GE_LAYOUT(RopeArgs, 40, 8);

/** `out[r, j] = silu(gate_up[r, j]) * gate_up[r, inner + j]` for `j < inner`. */
typedef struct SwigluArgs {
    /** bf16 `[rows, 2 * inner]` (gate columns first), read. */
    unsigned long long gate_up;
    /** bf16 `[rows, inner]`, written. */
    unsigned long long out;
    int rows;
    int inner;
} SwigluArgs;
GE_LAYOUT(SwigluArgs, 24, 8);

/** `x[i] += y[i]` for `i < n`. */
typedef struct AddAssignArgs {
    /** `[n]` of the kernel's destination type, read and written. */
    unsigned long long x;
    /** `[n]` of the kernel's source type, read. */
    unsigned long long y;
    long long n;
} AddAssignArgs;
GE_LAYOUT(AddAssignArgs, 24, 8);

/** `x[i] *= factor` for `i < n`. */
typedef struct ScaleArgs {
    /** `[n]` of the kernel's type, read and written. */
    unsigned long long x;
    long long n;
    float factor;
} ScaleArgs;
GE_LAYOUT(ScaleArgs, 24, 8);

/** `dst[r, dst_col + c] = src[r, src_col + c]` for `r < rows`, `c < cols`: one part of a
 * column split or concatenation. */
typedef struct CopyColumnsArgs {
    /** `[rows, src_width]`, read. */
    unsigned long long src;
    /** `[rows, dst_width]`, written in columns `dst_col..dst_col + cols`. */
    unsigned long long dst;
    int rows;
    int cols;
    int src_width;
    int src_col;
    int dst_width;
    int dst_col;
} CopyColumnsArgs;
GE_LAYOUT(CopyColumnsArgs, 40, 8);

/** `dst[i] = src[indices[i]]` for rows `i < count` of width `width` (row gather; also the
 * embedding lookup, with the token ids as indices). */
typedef struct GatherRowsArgs {
    /** `[src_rows, width]`, read. */
    unsigned long long src;
    /** `[count, width]`, written. */
    unsigned long long dst;
    /** u32 `[count]`, each below the source's row count (checked on the host), read. */
    unsigned long long indices;
    int count;
    int width;
} GatherRowsArgs;
GE_LAYOUT(GatherRowsArgs, 32, 8);

/** Scatter of new K/V rows into a paged cache: `k_pool[slots[i]] = k[i]` and
 * `v_pool[slots[i]] = v[i]` for rows `i < rows` of `width` elements. */
typedef struct WriteKvArgs {
    /** bf16 `[pool_rows, width]`, written at the given slots. */
    unsigned long long k_pool;
    /** bf16 `[pool_rows, width]`, written at the given slots. */
    unsigned long long v_pool;
    /** bf16 `[rows, width]`, read. */
    unsigned long long k;
    /** bf16 `[rows, width]`, read. */
    unsigned long long v;
    /** u32 `[rows]`, each below the pool's row count (checked on the host), read. */
    unsigned long long slots;
    int rows;
    int width;
} WriteKvArgs;
GE_LAYOUT(WriteKvArgs, 48, 8);

/** Copies whole blocks of a paged cache: block `pairs[2 c + 1]` becomes a copy of block
 * `pairs[2 c]` for `c < count` (no block is both a source and a destination in one launch;
 * the host splits the copies otherwise). */
typedef struct CopyBlocksArgs {
    /** bf16 `[blocks * block_size, width]`, read and written. */
    unsigned long long pool;
    /** u32 `[count, 2]`: (source block, destination block), read. */
    unsigned long long pairs;
    /** Elements per block: `block_size * width`. */
    long long block_elems;
    int count;
} CopyBlocksArgs;
GE_LAYOUT(CopyBlocksArgs, 32, 8);

/** Attention of query rows over a KV cache, split over context partitions. Work item `w`
 * (`w < work_rows`) is query row `work[2 w]` of sequence `work[2 w + 1]`; a sequence is four
 * u32s in `seqs`: first query row, query count, context length, and `base` (the offset of its
 * block table in `block_tables`, or with `contiguous` the K/V row of its position 0). Query
 * `i` of a sequence sits at position `context_len - q_len + i` and sees positions up to its
 * own. Position `p` is K/V row `block_tables[base + p / block_size] * block_size +
 * p % block_size` (paged) or `base + p` (contiguous). Partition `z` covers positions
 * `z * partition_size ..` of the visible ones. With `num_partitions == 1` the kernel writes
 * `out`; otherwise each partition writes its normalised partial output, running maximum and
 * sum of exponentials to the `part_*` buffers and the combine kernel writes `out`. */
typedef struct PagedAttentionArgs {
    /** bf16 `[q rows, num_heads * head_dim]`, read. */
    unsigned long long q;
    /** bf16 `[pool rows, num_kv_heads * head_dim]`, read. */
    unsigned long long k_pool;
    /** bf16 `[pool rows, num_kv_heads * head_dim]`, read. */
    unsigned long long v_pool;
    /** bf16 `[q rows, num_heads * head_dim]`, written at the work items' rows. */
    unsigned long long out;
    /** f32 `[work_rows, num_heads, num_partitions, head_dim]`, written (split only). */
    unsigned long long part_out;
    /** f32 `[work_rows, num_heads, num_partitions]`, written (split only). */
    unsigned long long part_max;
    /** f32 `[work_rows, num_heads, num_partitions]`, written (split only). */
    unsigned long long part_sum;
    /** u32 `[work_rows, 2]`: (query row, sequence), read. */
    unsigned long long work;
    /** u32 `[sequences, 4]`: (q_start, q_len, context_len, base), read. */
    unsigned long long seqs;
    /** u32 block ids of every sequence, concatenated; unused with `contiguous`. */
    unsigned long long block_tables;
    int work_rows;
    int num_heads;
    int num_kv_heads;
    int head_dim;
    int block_size;
    int partition_size;
    int num_partitions;
    /** Query heads per thread block (a slice of one kv head's group), at most 8. */
    int heads_per_block;
    float scale;
    int contiguous;
} PagedAttentionArgs;
GE_LAYOUT(PagedAttentionArgs, 120, 8);

/** Log-sum-exp merge of the partitions of [`PagedAttentionArgs`]: for each work item and
 * head, `out = sum_z w_z o_z / sum_z w_z` with `w_z = part_sum_z * exp(part_max_z - max)`,
 * over the partitions that hold visible positions. */
typedef struct PagedCombineArgs {
    /** bf16 `[q rows, num_heads * head_dim]`, written at the work items' rows. */
    unsigned long long out;
    /** f32 `[work_rows, num_heads, num_partitions, head_dim]`, read. */
    unsigned long long part_out;
    /** f32 `[work_rows, num_heads, num_partitions]`, read. */
    unsigned long long part_max;
    /** f32 `[work_rows, num_heads, num_partitions]`, read. */
    unsigned long long part_sum;
    /** u32 `[work_rows, 2]`, as in [`PagedAttentionArgs`], read. */
    unsigned long long work;
    /** u32 `[sequences, 4]`, as in [`PagedAttentionArgs`], read. */
    unsigned long long seqs;
    int work_rows;
    int num_heads;
    int head_dim;
    int partition_size;
    int num_partitions;
} PagedCombineArgs;
GE_LAYOUT(PagedCombineArgs, 72, 8);

/** Per-row sampling parameters of [`SampleArgs`] (the CPU's `SamplingParams` plus the row's
 * sequence id and position, which with the seed select the Philox draw). */
typedef struct SampleRowArgs {
    /** Philox key: `(seed lo32, seed hi32)`. */
    unsigned long long seed;
    /** Philox counter words 1 and 2: `(seq_id lo32, seq_id hi32)`. */
    unsigned long long seq_id;
    /** 0 = greedy; otherwise finite and > 0 (checked on the host). */
    float temperature;
    /** Must be 1 on the GPU for now (top-p is not implemented there). */
    float top_p;
    /** Must be 0 on the GPU for now (top-k is not implemented there). */
    int top_k;
    /** Philox counter word 0. */
    unsigned int position;
} SampleRowArgs;
GE_LAYOUT(SampleRowArgs, 32, 8);

/** One token per logits row, greedy or unfiltered sampling (the definition of
 * `src/engine/sampler.rs`). Each row writes `status`: 0 done, 1 a NaN or `+inf` logit,
 * 2 every logit `-inf`, 3 top-k / top-p requested (not on the GPU). */
typedef struct SampleArgs {
    /** f32 `[rows, vocab]`, read. */
    unsigned long long logits;
    /** SampleRowArgs `[rows]`, read. */
    unsigned long long params;
    /** u32 `[rows]`, written. */
    unsigned long long tokens;
    /** f32 `[rows]`: untempered log-softmax at the token, written. */
    unsigned long long logprobs;
    /** f32 `[rows]`: log-probability under the sampled distribution, written. */
    unsigned long long sampling_logprobs;
    /** i32 `[rows]`, written. */
    unsigned long long status;
    int rows;
    int vocab;
} SampleArgs;
GE_LAYOUT(SampleArgs, 56, 8);

/** `out[r] = log_softmax(logits[r])[targets[r]]` for every row `r` (f32 max, f64 sum of
 * exponentials). `status[r]`: 0 done, 1 a NaN or `+inf` logit, 2 every logit `-inf`, 4 the
 * target is not a token of the vocabulary. */
typedef struct TargetLogprobArgs {
    /** bf16 `[rows, vocab]`, read. */
    unsigned long long logits;
    /** u32 `[rows]`, read. */
    unsigned long long targets;
    /** f32 `[rows]`, written. */
    unsigned long long out;
    /** i32 `[rows]`, written. */
    unsigned long long status;
    int rows;
    int vocab;
} TargetLogprobArgs;
GE_LAYOUT(TargetLogprobArgs, 40, 8);

/** The residual add fused with the next norm, for every row `r`: `x[r] += y[r]` (rounded to
 * bf16, as the plain add), then `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight`. */
typedef struct AddRmsNormArgs {
    /** bf16 `[rows, dim]`, read and written. */
    unsigned long long x;
    /** bf16 `[rows, dim]`, read. */
    unsigned long long y;
    /** bf16 `[dim]`, read. */
    unsigned long long weight;
    /** bf16 `[rows, dim]`, written. */
    unsigned long long out;
    int rows;
    int dim;
    float eps;
} AddRmsNormArgs;
GE_LAYOUT(AddRmsNormArgs, 48, 8);

/** The paged layer prologue, for every row `r`: q, k and v are the column ranges
 * `[0, q_width)`, `[q_width, q_width + kv_width)` and the next `kv_width` of `qkv[r]`; q and k
 * are rotated (RoPE, rotate-half, at `positions[r]`), q goes to `q_out[r]`, k and v to row
 * `slots[r]` of the pools. */
typedef struct QkvRopeArgs {
    /** bf16 `[rows, q_width + 2 * kv_width]`, read. */
    unsigned long long qkv;
    /** bf16 `[rows, q_width]`, written. */
    unsigned long long q_out;
    /** bf16 `[pool rows, kv_width]`, rows `slots` written. */
    unsigned long long k_pool;
    /** bf16 `[pool rows, kv_width]`, rows `slots` written. */
    unsigned long long v_pool;
    /** u32 `[rows]`, read. */
    unsigned long long positions;
    /** u32 `[rows]`, read. */
    unsigned long long slots;
    /** f32 `[head_dim / 2]`, read. */
    unsigned long long inv_freq;
    int rows;
    int q_width;
    int kv_width;
    int head_dim;
} QkvRopeArgs;
GE_LAYOUT(QkvRopeArgs, 72, 8);

/** Backward of causal attention over packed sequences (kernels/attention_backward.cu). Tile
 * `t` (`t < num_tiles`) is three u32s of `tiles`: the sequence's first row, its length and
 * the tile's first position in it; a tile covers `tile_rows` positions (query rows for the dq
 * kernel, key rows for the dk/dv kernel; the kernel checks it was built for that size).
 * Position `i` of a sequence sees positions `0..=i`; query head `h` reads kv head
 * `h / (num_heads / num_kv_heads)`. The dq kernel also writes the softmax statistics (`lse`
 * and `delta`) of its rows, which the dk/dv kernel, launched after it, reads. */
typedef struct AttentionBackwardArgs {
    /** bf16 `[rows, num_heads * head_dim]`, read. */
    unsigned long long q;
    /** bf16 `[rows, num_kv_heads * head_dim]`, read. */
    unsigned long long k;
    /** bf16 `[rows, num_kv_heads * head_dim]`, read. */
    unsigned long long v;
    /** bf16 `[rows, num_heads * head_dim]`, read. */
    unsigned long long dout;
    /** bf16 `[rows, num_heads * head_dim]`, written at the sequences' rows (dq kernel). */
    unsigned long long dq;
    /** bf16 `[rows, num_kv_heads * head_dim]`, written at the sequences' rows (dk/dv kernel). */
    unsigned long long dk;
    /** bf16 `[rows, num_kv_heads * head_dim]`, written at the sequences' rows (dk/dv kernel). */
    unsigned long long dv;
    /** f32 `[rows, num_heads]`: log-sum-exp of the scaled scores, written by the dq kernel
     * at the sequences' rows, read by the dk/dv kernel. */
    unsigned long long lse;
    /** f32 `[rows, num_heads]`: `sum_j P_ij (dout_i . v_j)` (= `dout_i . out_i`), as `lse`. */
    unsigned long long delta;
    /** u32 `[num_tiles, 3]`: (sequence start row, sequence length, tile start position). */
    unsigned long long tiles;
    int num_tiles;
    int num_heads;
    int num_kv_heads;
    int head_dim;
    /** Positions per tile the host used; must equal the kernel's compiled tile size. */
    int tile_rows;
    float scale;
} AttentionBackwardArgs;
GE_LAYOUT(AttentionBackwardArgs, 104, 8);

#endif /* GENIUS_ENGINE_KERNEL_ARGS_H */
