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
    /** u32 `[rows]`, each below the pool's row count (checked on the host) or GE_NO_SLOT
     * (the row is not written), read. */
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
    /** Nucleus mass in (0, 1]; 1 disables top-p. */
    float top_p;
    /** Keep the top_k most likely tokens; 0 disables top-k (values above INT_MAX are clamped). */
    int top_k;
    /** Philox counter word 0. */
    unsigned int position;
} SampleRowArgs;
GE_LAYOUT(SampleRowArgs, 32, 8);

/** One token per logits row, greedy, unfiltered or top-k / top-p sampling (the definition of
 * `src/engine/sampler.rs`). Each row `r` writes 4 words at `out[4 r]`: the token, the untempered
 * log-softmax at it (f32 bits), its log-probability under the sampled distribution (f32 bits),
 * and a status: 0 done, 1 a NaN or `+inf` logit, 2 every logit `-inf`. */
typedef struct SampleArgs {
    /** f32 or bf16 `[rows, vocab]`, read. */
    unsigned long long logits;
    /** SampleRowArgs `[rows]`, read. */
    unsigned long long params;
    /** u32 `[rows, 4]`, written. */
    unsigned long long out;
    int rows;
    int vocab;
} SampleArgs;
GE_LAYOUT(SampleArgs, 32, 8);

/** `out[r] = log_softmax(logits[r])[targets[r]]` for every row `r` (one online pass: f32
 * running max and sum of exponentials), and, where `lse` is set, `lse[r]` = the row's
 * log-sum-exp (max + log(sum)) for the backward. `status[r]`: 0 done, 1 a NaN or `+inf` logit,
 * 2 every logit `-inf`, 4 the target is not a token of the vocabulary. */
typedef struct TargetLogprobArgs {
    /** bf16 `[rows, vocab]`, read. */
    unsigned long long logits;
    /** u32 `[rows]`, read. */
    unsigned long long targets;
    /** f32 `[rows]`, written. */
    unsigned long long out;
    /** i32 `[rows]`, written. */
    unsigned long long status;
    /** f32 `[rows]`, written (NaN for a row whose status is not 0); 0 for none. */
    unsigned long long lse;
    int rows;
    int vocab;
} TargetLogprobArgs;
GE_LAYOUT(TargetLogprobArgs, 48, 8);

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
    /** u32 `[rows]` (GE_NO_SLOT: the row's K/V are not written), read. */
    unsigned long long slots;
    /** f32 `[head_dim / 2]`, read. */
    unsigned long long inv_freq;
    int rows;
    int q_width;
    int kv_width;
    int head_dim;
} QkvRopeArgs;
GE_LAYOUT(QkvRopeArgs, 72, 8);

/** Bias gradient, `grad[c] += sum over r of dy[r, c]` (f32), step 1: the column sums of each
 * group of `row_group` rows into `partial` (rows in order); `ge_column_partials_reduce` then
 * adds the groups' sums to the gradient. */
typedef struct BiasGradArgs {
    /** bf16 `[rows, cols]`, read. */
    unsigned long long dy;
    /** f32 `[ceil(rows / row_group), cols]`: each row group's column sums, written (then added
     * to the gradient by `ge_column_partials_reduce`). */
    unsigned long long partial;
    int rows;
    int cols;
    /** Rows per group. */
    int row_group;
    int pad_;
} BiasGradArgs;
GE_LAYOUT(BiasGradArgs, 32, 8);

/** `out[c] += sum over g < groups of partial[g * cols + c]` (f32), in a fixed order: block
 * (32, 8) over 32 columns, warp y summing groups y, y + 8, ... in order, the 8 warps' sums
 * added in warp order. */
typedef struct ColumnReduceArgs {
    /** f32 `[groups, cols]`, read. */
    unsigned long long partial;
    /** f32 `[cols]`, read and written. */
    unsigned long long out;
    int groups;
    int cols;
} ColumnReduceArgs;
GE_LAYOUT(ColumnReduceArgs, 24, 8);

/** `partials[b] = sum of x[i]^2` (f64) over the elements grid-stride block `b` visits; the
 * host adds the partials in order. */
typedef struct SumSquaresArgs {
    /** `[n]` of the kernel's type (f32 or bf16), read. */
    unsigned long long x;
    /** f64 `[gridDim.x]`, written. */
    unsigned long long partials;
    long long n;
} SumSquaresArgs;
GE_LAYOUT(SumSquaresArgs, 24, 8);

/** Log-prob backward on a chunk of logits, in place: for every row `r`, with
 * `p = softmax(logits[r])` and `g = d_logprob[r]`, `logits[r] = g * (onehot(targets[r]) - p)`.
 * Where `lse` is set, `p = exp(logits[r] - lse[r])` with the forward's log-sum-exp (one pass
 * over the row); else the row's statistics are computed first (two passes).
 * `status[r]`: 0 ok, 1 a NaN or +inf logit, 2 every logit -inf, 3 `lse[r]` is not finite,
 * 4 target outside the vocabulary (the row is then left as it was on 2, 3 and 4). */
typedef struct LogprobBackwardArgs {
    /** bf16 `[rows, vocab]`, read and written. */
    unsigned long long logits;
    /** u32 `[rows]`, read. */
    unsigned long long targets;
    /** f32 `[rows]`, read. */
    unsigned long long d_logprob;
    /** i32 `[rows]`, written. */
    unsigned long long status;
    /** f32 `[rows]`, read: the forward's log-sum-exp of each row; 0 for none. */
    unsigned long long lse;
    int rows;
    int vocab;
} LogprobBackwardArgs;
GE_LAYOUT(LogprobBackwardArgs, 48, 8);
/** Grouped row scatter-add, the adjoint of a row gather: for every group `g < groups`,
 * `dst[targets[g]] += src[order[k]]` for `k` in `segments[g] .. segments[g + 1]`, summed in
 * that order in f32 starting from the destination's value and rounded once to its type. The
 * host groups the rows (targets are distinct, so no two threads write one element, and the
 * order of the sum is fixed: deterministic). */
typedef struct ScatterAddRowsArgs {
    /** `[dst rows, width]` of the kernel's destination type, rows `targets` read and written. */
    unsigned long long dst;
    /** `[src rows, width]` of the kernel's source type, read. */
    unsigned long long src;
    /** u32 `[src rows]`: source rows grouped by destination, ascending within a group, read. */
    unsigned long long order;
    /** u32 `[groups + 1]`: each group's range of `order`, read. */
    unsigned long long segments;
    /** u32 `[groups]`: each group's destination row, distinct, read. */
    unsigned long long targets;
    int groups;
    int width;
} ScatterAddRowsArgs;
GE_LAYOUT(ScatterAddRowsArgs, 48, 8);

/** RMSNorm backward. Forward `y = x * r * w` with `r = 1 / sqrt(mean(x^2) + eps)` per row.
 * The row kernel (one warp per row) writes `dx = r * w * dy - x * r^3 / dim * sum(dy * w * x)`
 * and `rinv[row] = r`; the column kernel sums `dy * x * r` over each group of `row_group`
 * rows into `partial[group]`, and `ge_column_partials_reduce` adds the groups' sums to the
 * weight gradient (fixed orders, no atomics: deterministic). */
typedef struct RmsNormBackwardArgs {
    /** bf16 `[rows, dim]`, read. */
    unsigned long long x;
    /** bf16 `[dim]`, read. */
    unsigned long long weight;
    /** bf16 `[rows, dim]`, read. */
    unsigned long long dy;
    /** bf16 `[rows, dim]`, written by the row kernel. */
    unsigned long long dx;
    /** f32 `[rows]`, written by the row kernel, read by the column kernel. */
    unsigned long long rinv;
    /** f32 `[ceil(rows / row_group), dim]`, written by the column kernel. */
    unsigned long long partial;
    int rows;
    int dim;
    float eps;
    /** Rows per group of the column kernel. */
    int row_group;
} RmsNormBackwardArgs;
GE_LAYOUT(RmsNormBackwardArgs, 64, 8);

/** SwiGLU backward: with `g = gate_up[r, j]`, `u = gate_up[r, inner + j]`, `s = sigmoid(g)`:
 * `out[r, j] = dy * u * s * (1 + g * (1 - s))` and `out[r, inner + j] = dy * g * s`. */
typedef struct SwigluBackwardArgs {
    /** bf16 `[rows, 2 * inner]` (gate columns first), read. */
    unsigned long long gate_up;
    /** bf16 `[rows, inner]`, read. */
    unsigned long long dy;
    /** bf16 `[rows, 2 * inner]`, written. */
    unsigned long long out;
    int rows;
    int inner;
} SwigluBackwardArgs;
GE_LAYOUT(SwigluBackwardArgs, 32, 8);

/** One AdamW update of `n` f32 elements in place: `adamw_update_host`'s arithmetic (the
 * scalars of `AdamWStep`), every operation rounded separately (no fused multiply-add); with
 * `out_bf16`, the updated master rounded to bf16 (as `ge_cast_f32_bf16` rounds) is written
 * there too: the parameter's working copy, set in the same pass. */
typedef struct AdamWArgs {
    /** f32 `[n]`, read and written. */
    unsigned long long master;
    /** f32 `[n]`, read and written. */
    unsigned long long m;
    /** f32 `[n]`, read and written. */
    unsigned long long v;
    /** f32 `[n]`, read. */
    unsigned long long grad;
    long long n;
    float beta1;
    float beta2;
    float one_minus_beta1;
    float one_minus_beta2;
    float eps;
    float step_size;
    float inv_sqrt_bias2;
    float decay;
    float grad_scale;
    /** bf16 `[n]`, written; 0 for none. */
    unsigned long long out_bf16;
} AdamWArgs;
GE_LAYOUT(AdamWArgs, 88, 8);

/** `dst[i] = src[i]` converted (f32 to bf16: rounded to nearest even) for `i < n`. */
typedef struct CastArgs {
    /** `[n]` of the kernel's source type, read. */
    unsigned long long src;
    /** `[n]` of the kernel's destination type, written. */
    unsigned long long dst;
    long long n;
} CastArgs;
GE_LAYOUT(CastArgs, 24, 8);
/** `y = x w^T (+ bias)` for few rows (kernels/skinny_gemm.cu): x bf16 `[rows, inp]`, w bf16
 * `[out, inp]`, bias bf16 `[out]` (0: none), y bf16 `[rows, out]`. The K dimension is cut into
 * `splits` ranges of `k_per_split` (a multiple of 32); with one split the kernel writes `y`,
 * otherwise each split writes its f32 partial product to `partial` (`[splits, rows, out]`) and
 * `ge_skinny_gemm_reduce` sums them in split order, adds the bias and writes `y`. */
typedef struct SkinnyGemmArgs {
    /** bf16 `[rows, inp]`, read. */
    unsigned long long x;
    /** bf16 `[out, inp]`, read. */
    unsigned long long w;
    /** bf16 `[out]`, read; 0 for no bias. */
    unsigned long long bias;
    /** bf16 `[rows, out]`, written (by the reduce kernel when split). */
    unsigned long long y;
    /** f32 `[splits, rows, out]`, written by the GEMM and read by the reduce (split only). */
    unsigned long long partial;
    int rows;
    int out;
    /** A multiple of 8 (16-byte rows of x and w). */
    int inp;
    int k_per_split;
    int splits;
    int pad_;
} SkinnyGemmArgs;
GE_LAYOUT(SkinnyGemmArgs, 64, 8);

/** Loss kinds of `PairLossArgs::kind`. */
#define GE_LOSS_ACO 0
#define GE_LOSS_DPO 1
#define GE_LOSS_SIMPO 2
#define GE_LOSS_IPO 3
#define GE_LOSS_SFT 4
/** f64 outputs per pair: policy chosen and rejected sums, loss, the two gradients, chosen and
 * rejected rewards, ACO weight, margin. */
#define GE_PAIR_LOSS_OUTPUTS 9

/** Preference losses (kernels/loss.cu), one block per pair: pair `p`'s policy sums are rows
 * `segments[4p] .. segments[4p+1]` (chosen) and `segments[4p+2] .. segments[4p+3]` (rejected)
 * of `row_logprobs`; `inputs[6p ..]` are the reference sums, the token counts and the
 * advantages (chosen then rejected each); `outputs[9p ..]` as `GE_PAIR_LOSS_OUTPUTS` says. */
typedef struct PairLossArgs {
    /** f32 `[rows]`, read. */
    unsigned long long row_logprobs;
    /** u32 `[4 * pairs]`, read. */
    unsigned long long segments;
    /** f64 `[6 * pairs]`, read. */
    unsigned long long inputs;
    /** f64 `[9 * pairs]`, written. */
    unsigned long long outputs;
    int pairs;
    /** `GE_LOSS_*`. */
    int kind;
    /** ACO: 1 for `max(1, e)`, 0 for `min(1, e)`. */
    int clip_max;
    int unused;
    double beta;
    /** ACO's alpha (may be +inf). */
    double alpha;
    /** SimPO's gamma. */
    double gamma;
    /** IPO's tau. */
    double tau;
} PairLossArgs;
GE_LAYOUT(PairLossArgs, 80, 8);

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
    /** Tensor-core dk/dv kernel only: 1 = each block takes one query head of its kv head's
     * group (grid z) and writes that head's f32 share of dk (unscaled) and dv at `dk` / `dv`,
     * read as `[rows, num_heads, head_dim]` f32, which ge_attention_dkv_reduce then sums
     * over the group; 0 = each block loops over the group and writes bf16 dk / dv. */
    int split_heads;
    /** Tensor-core dq kernel only: 1 = `lse` and `delta` already hold every sequence row's
     * statistics (the forward's log-sum-exp, ge_attention_delta's delta), so the kernel
     * reads them instead of computing (and writing) them in a first pass over the keys. */
    int stats_given;
} AttentionBackwardArgs;
GE_LAYOUT(AttentionBackwardArgs, 112, 8);

/** `delta[r, h] = sum_d dout[r, h, d] * out[r, h, d]` (f32) for every row `r < rows` and head
 * `h`: the attention backward's `sum_j P_rj dP_rj`, from the forward's output. */
typedef struct AttentionDeltaArgs {
    /** bf16 `[rows, num_heads * head_dim]`, read. */
    unsigned long long out;
    /** bf16 `[rows, num_heads * head_dim]`, read. */
    unsigned long long dout;
    /** f32 `[rows, num_heads]`, written. */
    unsigned long long delta;
    long long rows;
    int num_heads;
    int head_dim;
} AttentionDeltaArgs;
GE_LAYOUT(AttentionDeltaArgs, 40, 8);

/** dk and dv from the per-query-head shares of the split tensor-core dk/dv kernel:
 * `dk[r, kvh, d] = bf16(scale * sum_g dk_part[r, kvh * group + g, d])`, `dv` the same without
 * the scale, for every row `r < rows` (`group = num_heads / num_kv_heads`; the sum in order
 * of `g`). */
typedef struct AttentionDkvReduceArgs {
    /** f32 `[rows, num_heads, head_dim]`, read. */
    unsigned long long dk_part;
    /** f32 `[rows, num_heads, head_dim]`, read. */
    unsigned long long dv_part;
    /** bf16 `[rows, num_kv_heads * head_dim]`, written. */
    unsigned long long dk;
    /** bf16 `[rows, num_kv_heads * head_dim]`, written. */
    unsigned long long dv;
    long long rows;
    int num_heads;
    int num_kv_heads;
    int head_dim;
    float scale;
} AttentionDkvReduceArgs;
GE_LAYOUT(AttentionDkvReduceArgs, 56, 8);

/** Forward causal attention over packed sequences on tensor cores (kernels/attention_tc.cu).
 * Tile `t` (`t < num_tiles`, grid x; grid y is the query head) is three u32s of `tiles`: the
 * sequence's first row, its length and the tile's first position in it (a multiple of
 * `tile_rows`, which must be the kernel's 64). Position `i` of a sequence sees positions
 * `0..=i`; query head `h` reads kv head `h / (num_heads / num_kv_heads)`. */
typedef struct AttentionTcArgs {
    /** bf16 `[rows, num_heads * head_dim]`, read. */
    unsigned long long q;
    /** bf16 `[rows, num_kv_heads * head_dim]`, read. */
    unsigned long long k;
    /** bf16 `[rows, num_kv_heads * head_dim]`, read. */
    unsigned long long v;
    /** bf16 `[rows, num_heads * head_dim]`, written at the sequences' rows. */
    unsigned long long out;
    /** f32 `[rows, num_heads]`: natural log-sum-exp of the scaled scores, written at the
     * sequences' rows; 0 for none. */
    unsigned long long lse;
    /** u32 `[num_tiles, 3]`: (sequence start row, sequence length, tile start position). */
    unsigned long long tiles;
    int num_tiles;
    int num_heads;
    int num_kv_heads;
    int head_dim;
    /** Positions per query tile the host used (64). */
    int tile_rows;
    float scale;
} AttentionTcArgs;
GE_LAYOUT(AttentionTcArgs, 72, 8);

#endif /* GENIUS_ENGINE_KERNEL_ARGS_H */
