// Paged KV cache and attention: K/V scatter into the pools (write_kv), copy-on-write block
// copies (copy_blocks), and attention of query rows over a KV cache read through block tables
// (or over contiguous K/V rows, for whole-sequence causal attention), split over context
// partitions with a log-sum-exp combine for long contexts.
//
// bf16 in and out, f32 scores, online softmax and accumulation. Launch shapes are chosen on the
// Rust side (src/backend/cuda/attention.rs), which states each kernel's requirements next to
// its launch.
#include "common.cuh"

// -inf without math headers (NVRTC compiles these units with no include path).
#define GE_NEG_INF __int_as_float(0xff800000)

// ---- write_kv: grid-stride over rows * width elements. ----
extern "C" __global__ void ge_write_kv_bf16(WriteKvArgs a) {
    const long long n = static_cast<long long>(a.rows) * a.width;
    const unsigned int* slots = reinterpret_cast<const unsigned int*>(a.slots);
    const ge_bf16* k = reinterpret_cast<const ge_bf16*>(a.k);
    const ge_bf16* v = reinterpret_cast<const ge_bf16*>(a.v);
    ge_bf16* kp = reinterpret_cast<ge_bf16*>(a.k_pool);
    ge_bf16* vp = reinterpret_cast<ge_bf16*>(a.v_pool);
    for (long long i = ge_global_index(); i < n; i += ge_grid_threads()) {
        const long long r = i / a.width;
        const long long c = i - r * a.width;
        if (slots[r] == GE_NO_SLOT) continue;  // a padding row: nothing to cache
        const long long dst = static_cast<long long>(slots[r]) * a.width + c;
        kp[dst] = k[i];
        vp[dst] = v[i];
    }
}

// ---- copy_blocks: blockIdx.y is the copy; x blocks stride over the block's elements, 16 bytes
// at a time when a block is a whole number of 16-byte vectors (the pool itself is 256-byte
// aligned). ----
extern "C" __global__ void ge_copy_blocks_bf16(CopyBlocksArgs a) {
    const unsigned int* pairs = reinterpret_cast<const unsigned int*>(a.pairs);
    const long long c = blockIdx.y;
    if (c >= a.count) return;
    const long long src = static_cast<long long>(pairs[2 * c]) * a.block_elems;
    const long long dst = static_cast<long long>(pairs[2 * c + 1]) * a.block_elems;
    const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
    const long long first = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (a.block_elems % 8 == 0) {
        const uint4* s = reinterpret_cast<const uint4*>(reinterpret_cast<const ge_bf16*>(a.pool) + src);
        uint4* d = reinterpret_cast<uint4*>(reinterpret_cast<ge_bf16*>(a.pool) + dst);
        for (long long i = first; i < a.block_elems / 8; i += stride) d[i] = s[i];
    } else {
        const unsigned short* s = reinterpret_cast<const unsigned short*>(a.pool) + src;
        unsigned short* d = reinterpret_cast<unsigned short*>(a.pool) + dst;
        for (long long i = first; i < a.block_elems; i += stride) d[i] = s[i];
    }
}

// ---- Paged attention over one context partition. ----
//
// Grid: x = work item (one query row of one sequence), y = (kv head, slice of its query heads),
// z = context partition. Block: GE_PA_THREADS threads (4 warps). The block holds its query
// heads (at most GE_PA_MAX_HEADS, all sharing one kv head, so each K/V row is read once for
// all of them) in shared memory and walks its partition in tiles of GE_PA_TILE positions:
// 1. the tile's K/V row indices, through the block table, into shared memory;
// 2. scores: each thread takes a position and its whole K row (16-byte loads, the next one
//    in flight while the current one is used), a dot product per head against the block's
//    queries in shared memory;
// 3. online softmax per head (one warp per head): new running max, the factor that rescales
//    the earlier accumulation, exponentials in place of the scores, running sum;
// 4. values: thread (column pair, key part) reads two bf16 of a V row as one 4-byte word (a
//    warp covers 64 columns, 128 bytes) and accumulates p * v for every head in registers;
//    the key parts' sums meet in shared memory at the end.
#define GE_PA_THREADS 128
#define GE_PA_WARPS (GE_PA_THREADS / GE_WARP_SIZE)
#define GE_PA_TILE 128
#define GE_PA_MAX_HEADS 8

// What a block of either attention kernel works on (grid: x = work item, y = (kv head, slice
// of its query heads), z = context partition): its work item `w` and query row, the sequence's
// block-table (or contiguous) base, the query heads h0 .. h0 + nh - 1 sharing kv head kvh, the
// partition's visible positions p0 .. p1 - 1, and the rows' widths and head pointers.
struct GePaBlock {
    long long w, row, base;
    int nh, h0, p0, p1;
    long long qw, kw;
    const ge_bf16 *q, *kp, *vp;
};

// Fills `b` for this block; false when its partition holds no visible position of its row (the
// whole block then returns).
template <int HD>
__device__ __forceinline__ bool ge_pa_block(const PagedAttentionArgs& a, GePaBlock& b) {
    const unsigned int* work = reinterpret_cast<const unsigned int*>(a.work);
    const unsigned int* seqs = reinterpret_cast<const unsigned int*>(a.seqs);
    b.w = blockIdx.x;
    b.row = work[2 * b.w];
    const unsigned int* sd = seqs + 4 * static_cast<long long>(work[2 * b.w + 1]);
    const int q_start = static_cast<int>(sd[0]);
    const int q_len = static_cast<int>(sd[1]);
    const int context_len = static_cast<int>(sd[2]);
    b.base = sd[3];
    const int visible = context_len - q_len + (static_cast<int>(b.row) - q_start) + 1;

    const int group = a.num_heads / a.num_kv_heads;
    const int slices = (group + a.heads_per_block - 1) / a.heads_per_block;
    const int kvh = blockIdx.y / slices;
    const int g0 = (blockIdx.y % slices) * a.heads_per_block;
    b.nh = min(a.heads_per_block, group - g0);
    b.h0 = kvh * group + g0;
    b.p0 = blockIdx.z * a.partition_size;
    if (b.p0 >= visible) return false;
    b.p1 = min(visible, b.p0 + a.partition_size);

    b.qw = static_cast<long long>(a.num_heads) * HD;
    b.kw = static_cast<long long>(a.num_kv_heads) * HD;
    b.q = reinterpret_cast<const ge_bf16*>(a.q) + b.row * b.qw + static_cast<long long>(b.h0) * HD;
    b.kp = reinterpret_cast<const ge_bf16*>(a.k_pool) + static_cast<long long>(kvh) * HD;
    b.vp = reinterpret_cast<const ge_bf16*>(a.v_pool) + static_cast<long long>(kvh) * HD;
    return true;
}

// The K/V pool row of visible position `pos` of the sequence at `base`: through the block
// table, or `base + pos` on contiguous rows.
__device__ __forceinline__ long long ge_pa_slot(const PagedAttentionArgs& a, long long base, long long pos) {
    return a.contiguous ? base + pos
                        : static_cast<long long>(reinterpret_cast<const unsigned int*>(
                              a.block_tables)[base + pos / a.block_size]) * a.block_size +
                              pos % a.block_size;
}

// Head `head`'s normalised output columns 2 pair, + 1: bf16 into `out` when the context is
// one partition, else f32 into the partition's slot of `part_out`, with (pair 0) the
// partition's max of the scaled scores (natural-log units) and its sum of exponentials.
template <int HD>
__device__ __forceinline__ void ge_pa_write(const PagedAttentionArgs& a, const GePaBlock& b, int head,
                                            int pair, float o0, float o1, float max, float sum) {
    if (a.num_partitions == 1) {
        const long long col = static_cast<long long>(head) * HD + 2 * pair;
        reinterpret_cast<unsigned int*>(a.out)[(b.row * b.qw + col) / 2] = ge_pack_bf16x2(o0, o1);
        return;
    }
    const long long idx = (b.w * a.num_heads + head) * a.num_partitions + blockIdx.z;
    float2 o;
    o.x = o0;
    o.y = o1;
    reinterpret_cast<float2*>(a.part_out)[(idx * HD) / 2 + pair] = o;
    if (pair == 0) {
        reinterpret_cast<float*>(a.part_max)[idx] = max;
        reinterpret_cast<float*>(a.part_sum)[idx] = sum;
    }
}

template <int HD>
__device__ __forceinline__ void paged_attention_partition(const PagedAttentionArgs& a) {
    static_assert(HD % GE_WARP_SIZE == 0 && GE_PA_THREADS % (HD / 2) == 0, "head_dim");
    constexpr int PAIRS = HD / 2;                         // column pairs of a V row
    constexpr int KEY_SPLIT = GE_PA_THREADS / PAIRS;      // threads per column pair
    __shared__ float q_s[GE_PA_MAX_HEADS][HD];
    __shared__ float s_s[GE_PA_MAX_HEADS][GE_PA_TILE];
    __shared__ float corr_s[GE_PA_MAX_HEADS];
    __shared__ float m_s[GE_PA_MAX_HEADS];
    __shared__ float l_s[GE_PA_MAX_HEADS];
    __shared__ long long slot_s[GE_PA_TILE];
    __shared__ float red_s[KEY_SPLIT][GE_PA_MAX_HEADS][HD];

    const int tid = threadIdx.x;
    const int lane = tid % GE_WARP_SIZE;
    const int warp = tid / GE_WARP_SIZE;
    GePaBlock blk;
    if (!ge_pa_block<HD>(a, blk)) return;  // the whole block: this row has fewer partitions
    const auto& [w, row, base, nh, h0, p0, p1, qw, kw, q, kp, vp] = blk;

    for (int i = tid; i < nh * HD; i += GE_PA_THREADS) q_s[i / HD][i % HD] = ge_bf16_to_f32(q[i]);
    if (tid < GE_PA_MAX_HEADS) {
        m_s[tid] = GE_NEG_INF;
        l_s[tid] = 0.0f;
    }
    const int pair = tid % PAIRS;  // columns 2 * pair and 2 * pair + 1
    const int key_part = tid / PAIRS;
    float acc0[GE_PA_MAX_HEADS], acc1[GE_PA_MAX_HEADS];
#pragma unroll
    for (int g = 0; g < GE_PA_MAX_HEADS; ++g) acc0[g] = acc1[g] = 0.0f;

    for (int t0 = p0; t0 < p1; t0 += GE_PA_TILE) {
        const int tl = min(GE_PA_TILE, p1 - t0);
        if (tid < tl) {
            slot_s[tid] = ge_pa_slot(a, base, t0 + tid);
        }
        __syncthreads();  // slots (and, on the first tile, q_s, m_s, l_s) are visible

        // Scores: one thread per position computes the dot products of its K row (read in
        // 16-byte vectors) with every query head of the block (q from shared memory, the same
        // address across the warp: a broadcast). No cross-lane reductions.
        for (int t = tid; t < tl; t += GE_PA_THREADS) {
            const uint4* k4 = reinterpret_cast<const uint4*>(kp + slot_s[t] * kw);
            float dot[GE_PA_MAX_HEADS];
#pragma unroll
            for (int g = 0; g < GE_PA_MAX_HEADS; ++g) dot[g] = 0.0f;
            // The next 16 bytes are loaded while the current ones are multiplied.
            uint4 next = k4[0];
#pragma unroll 1
            for (int c = 0; c < HD / 8; ++c) {
                const uint4 raw = next;
                if (c + 1 < HD / 8) next = k4[c + 1];
                const unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
                float kf[8];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    kf[2 * j] = __uint_as_float(words[j] << 16);
                    kf[2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
                }
#pragma unroll
                for (int g = 0; g < GE_PA_MAX_HEADS; ++g) {
                    if (g < nh) {  // uniform over the block
#pragma unroll
                        for (int j = 0; j < 8; ++j) dot[g] += q_s[g][c * 8 + j] * kf[j];
                    }
                }
            }
#pragma unroll
            for (int g = 0; g < GE_PA_MAX_HEADS; ++g) {
                if (g < nh) s_s[g][t] = dot[g] * a.scale;
            }
        }
        __syncthreads();

        for (int g = warp; g < nh; g += GE_PA_WARPS) {
            float mx = GE_NEG_INF;
            for (int t = lane; t < tl; t += GE_WARP_SIZE) mx = fmaxf(mx, s_s[g][t]);
            mx = ge_warp_max(mx);
            const float m_old = m_s[g];
            const float m_new = fmaxf(m_old, mx);
            float sum = 0.0f;
            for (int t = lane; t < tl; t += GE_WARP_SIZE) {
                const float e = expf(s_s[g][t] - m_new);
                s_s[g][t] = e;
                sum += e;
            }
            sum = ge_warp_sum(sum);
            if (lane == 0) {
                const float corr = expf(m_old - m_new);  // 0 on the first tile (m_old = -inf)
                corr_s[g] = corr;
                l_s[g] = l_s[g] * corr + sum;
                m_s[g] = m_new;
            }
        }
        __syncthreads();

#pragma unroll
        for (int g = 0; g < GE_PA_MAX_HEADS; ++g) {
            if (g < nh) {
                acc0[g] *= corr_s[g];
                acc1[g] *= corr_s[g];
            }
        }
        // Two columns per thread from one 4-byte word (the pool is 256-byte aligned and rows
        // and head offsets are even, so the word is aligned).
        const unsigned int* vp2 = reinterpret_cast<const unsigned int*>(vp) + pair;
#pragma unroll 8
        for (int t = key_part; t < tl; t += KEY_SPLIT) {
            const unsigned int word = vp2[slot_s[t] * (kw / 2)];
            const float v0 = __uint_as_float(word << 16);
            const float v1 = __uint_as_float(word & 0xffff0000u);
#pragma unroll
            for (int g = 0; g < GE_PA_MAX_HEADS; ++g) {
                if (g < nh) {
                    const float p = s_s[g][t];
                    acc0[g] += p * v0;
                    acc1[g] += p * v1;
                }
            }
        }
        __syncthreads();  // the next tile overwrites slot_s, s_s and corr_s
    }

    // The key parts' sums, in order of key part, by the threads of key part 0.
#pragma unroll
    for (int g = 0; g < GE_PA_MAX_HEADS; ++g) {
        if (g < nh) {
            red_s[key_part][g][2 * pair] = acc0[g];
            red_s[key_part][g][2 * pair + 1] = acc1[g];
        }
    }
    __syncthreads();
    if (key_part != 0) return;
#pragma unroll
    for (int g = 0; g < GE_PA_MAX_HEADS; ++g) {
        if (g < nh) {
            for (int s = 1; s < KEY_SPLIT; ++s) {
                acc0[g] += red_s[s][g][2 * pair];
                acc1[g] += red_s[s][g][2 * pair + 1];
            }
        }
    }
#pragma unroll
    for (int g = 0; g < GE_PA_MAX_HEADS; ++g) {
        if (g >= nh) continue;
        const float inv = 1.0f / l_s[g];
        ge_pa_write<HD>(a, blk, h0 + g, pair, acc0[g] * inv, acc1[g] * inv, m_s[g], l_s[g]);
    }
}

extern "C" __global__ void ge_paged_attention_d64(PagedAttentionArgs a) {
    paged_attention_partition<64>(a);
}
extern "C" __global__ void ge_paged_attention_d128(PagedAttentionArgs a) {
    paged_attention_partition<128>(a);
}

// ---- Paged attention on tensor cores (the default; `GENIUS_CUDA_PA_TC=0` keeps the kernel
// above). Same arguments, grid, partitions and outputs as ge_paged_attention_d*. ----
//
// With grouped-query attention every K/V row is shared by the block's query heads (7 for
// Qwen2.5-0.5B), so the kernel above spends a dot product per head and position on the CUDA
// cores, with a shared-memory load per multiply-add. Here the block's heads are the rows of an
// m16n8k16 tile (heads 0 .. nh - 1 in rows 0 .. 7, rows 8 .. 15 zero, their results unused):
//   S (16 x KT)  = Q (16 x HD) K^T          : KT / 8 n-tiles x HD / 16 k-steps,
//   O (16 x HD) += P (16 x KT, bf16) V       : HD / 8 n-tiles x KT / 16 k-steps,
// with P's A fragments repacked from S's accumulators (FlashAttention-2), K's B fragments by
// ldmatrix and V's by ldmatrix.trans.
//
// Each of the 4 warps walks its own tiles of KT positions of the partition (tiles w, w + 4,
// ...) with its own online softmax, gathering each tile's K and V rows through the block table
// into its own shared tiles by cp.async (16 bytes per lane and copy, zero-filled past the
// partition's end), STAGES tiles in flight. At the end the warps' (max, sum, output) meet in
// shared memory and are merged as partitions are: out = sum_w 2^(m_w - M) O_w / sum_w 2^(m_w -
// M) l_w. Scores are kept in log2 units (scale * log2 e); a split partition's max is written
// in natural units (times ln 2), as the combine kernel expects.
#define GE_PT_WARPS 4
#define GE_PT_THREADS (GE_PT_WARPS * GE_WARP_SIZE)

// The K and V rows of positions `first .. first + KT` (zero rows from `end` on) into `ks` and
// `vs` (row stride HD + 8 bf16), by cp.async from the calling warp's lanes.
template <int HD, int KT>
__device__ __forceinline__ void ge_pt_gather(ge_bf16* ks, ge_bf16* vs, const PagedAttentionArgs& a,
                                             const ge_bf16* kp, const ge_bf16* vp, long long kw,
                                             long long base, int first, int end, int lane) {
    constexpr int VECS = HD / 8;  // 16-byte pieces of a row
    constexpr int LDS = HD + 8;
    // Lane r < KT looks up row r's slot; the copies take it by shuffle.
    long long my_slot = 0;
    if (lane < KT && first + lane < end) my_slot = ge_pa_slot(a, base, first + lane);
    static_assert(KT <= GE_WARP_SIZE && (KT * VECS) % GE_WARP_SIZE == 0, "one slot per lane");
#pragma unroll
    for (int it = 0; it < KT * VECS / GE_WARP_SIZE; ++it) {
        const int i = it * GE_WARP_SIZE + lane;
        const int r = i / VECS;
        const int c = i % VECS;
        const long long slot = __shfl_sync(0xffffffffu, my_slot, r);
        // An invalid copy reads nothing, but its address must still be a valid one: row 0.
        const bool valid = first + r < end;
        ge_cp_async16(ks + r * LDS + c * 8, kp + slot * kw + c * 8, valid);
        ge_cp_async16(vs + r * LDS + c * 8, vp + slot * kw + c * 8, valid);
    }
}

template <int HD, int KT, int STAGES>
__device__ __forceinline__ void paged_attention_tc_partition(const PagedAttentionArgs& a) {
    static_assert(KT % 16 == 0 && (KT * HD / 8) % GE_WARP_SIZE == 0, "tile");
    static_assert(HD % 32 == 0 && (STAGES == 1 || STAGES == 2), "head_dim, stages");
    constexpr int LDS = HD + 8;
    constexpr int KSTEPS = HD / 16;  // k-steps of S = Q K^T
    constexpr int ONT = HD / 8;      // n-tiles of O
    constexpr int SNT = KT / 8;      // n-tiles of S
    constexpr int TILE = KT * LDS;   // bf16 of one K (or V) tile
    __shared__ __align__(16) ge_bf16 tiles[GE_PT_WARPS * STAGES * 2 * TILE];
    static_assert(sizeof(float) * GE_PT_WARPS * 8 * (HD + 2) <= sizeof(ge_bf16) * GE_PT_WARPS * STAGES * 2 * TILE,
                  "the merge's scratch fits in the tiles");

    const int tid = threadIdx.x;
    const int lane = tid % GE_WARP_SIZE;
    const int warp = tid / GE_WARP_SIZE;
    const int g = lane / 4;
    const int t = lane % 4;
    GePaBlock blk;
    if (!ge_pa_block<HD>(a, blk)) return;  // the whole block: this row has fewer partitions
    const auto& [w, row, base, nh, h0, p0, p1, qw, kw, q, kp, vp] = blk;

    // Q's A fragments, rows g < nh only (a1 and a3, rows g + 8, are zero): words kk * 8 + t
    // and + 4 of head g's row are columns 16 kk + 2t, +1 and 16 kk + 8 + 2t, +1.
    unsigned int qf[KSTEPS][2];
    {
        const unsigned int* qrow = g < nh ? reinterpret_cast<const unsigned int*>(q + g * HD) : nullptr;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            qf[kk][0] = qrow ? qrow[kk * 8 + t] : 0u;
            qf[kk][1] = qrow ? qrow[kk * 8 + t + 4] : 0u;
        }
    }

    float o[ONT][2];  // row g, columns 8 j + 2t, +1
#pragma unroll
    for (int j = 0; j < ONT; ++j) o[j][0] = o[j][1] = 0.0f;
    float m = GE_NEG_INF;  // running max of row g's log2 scores (the same in the quad)
    float l = 0.0f;        // running sum of this lane's columns of row g
    const float sl2 = a.scale * 1.4426950408889634f;

    const int ntiles = (p1 - p0 + KT - 1) / KT;
    ge_bf16* mine = tiles + warp * STAGES * 2 * TILE;
    int stage = 0;
    int tile = warp;
    if (tile < ntiles) ge_pt_gather<HD, KT>(mine, mine + TILE, a, kp, vp, kw, base, p0 + tile * KT, p1, lane);
    ge_cp_async_commit();
    for (; tile < ntiles; tile += GE_PT_WARPS) {
        const int next = tile + GE_PT_WARPS;
        if (STAGES == 2) {
            ge_bf16* other = mine + (stage ^ 1) * 2 * TILE;
            if (next < ntiles) ge_pt_gather<HD, KT>(other, other + TILE, a, kp, vp, kw, base, p0 + next * KT, p1, lane);
            ge_cp_async_commit();
            ge_cp_async_wait<1>();  // this tile's copies are done (the next tile's may not be)
        } else {
            ge_cp_async_wait<0>();
        }
        __syncwarp();  // every lane's copies are visible to the warp
        const ge_bf16* ks = mine + stage * 2 * TILE;
        const ge_bf16* vs = ks + TILE;

        // S = Q K^T: B fragments of two k-steps per ldmatrix.x4 (matrices: columns 16 kk,
        // 16 kk + 8, 16 (kk + 1), 16 (kk + 1) + 8 of key rows 8 j .. 8 j + 7).
        float s[SNT][4];
#pragma unroll
        for (int j = 0; j < SNT; ++j) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk += 2) {
                unsigned int b[4];
                ge_ldsm<4, false>(b, ks + (j * 8 + lane % 8) * LDS + kk * 16 + 8 * (lane / 8));
                const unsigned int a0[4] = {qf[kk][0], 0u, qf[kk][1], 0u};
                const unsigned int a1[4] = {qf[kk + 1][0], 0u, qf[kk + 1][1], 0u};
                ge_mma_bf16_16816(s[j], a0, b[0], b[1]);
                ge_mma_bf16_16816(s[j], a1, b[2], b[3]);
            }
        }

        // Log2 units; positions past the partition's end masked. Row g's columns of this
        // lane are s[j][0], s[j][1] (positions 8 j + 2t, +1).
        const int first = p0 + tile * KT;
        float mx = GE_NEG_INF;
#pragma unroll
        for (int j = 0; j < SNT; ++j) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const float x = first + j * 8 + 2 * t + e < p1 ? s[j][e] * sl2 : GE_NEG_INF;
                s[j][e] = x;
                mx = fmaxf(mx, x);
            }
        }
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // The tile's first position is visible, so mx is finite; corr is 0 on the first tile.
        const float m_new = fmaxf(m, mx);
        const float corr = exp2f(m - m_new);
        m = m_new;
        l *= corr;
#pragma unroll
        for (int j = 0; j < ONT; ++j) {
            o[j][0] *= corr;
            o[j][1] *= corr;
        }
#pragma unroll
        for (int j = 0; j < SNT; ++j) {
            s[j][0] = exp2f(s[j][0] - m);
            s[j][1] = exp2f(s[j][1] - m);
            l += s[j][0] + s[j][1];
        }

        // O += P V, 16 positions per k-step; V's B fragments by ldmatrix.x4.trans, two
        // column slices per instruction.
#pragma unroll
        for (int kk = 0; kk < KT / 16; ++kk) {
            const unsigned int pf[4] = {ge_pack_bf16x2(s[2 * kk][0], s[2 * kk][1]), 0u,
                                        ge_pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]), 0u};
            const int mat = lane / 8;
            const ge_bf16* vrow = vs + (kk * 16 + lane % 8 + 8 * (mat & 1)) * LDS + 8 * (mat >> 1);
#pragma unroll
            for (int j = 0; j < ONT; j += 2) {
                unsigned int b[4];
                ge_ldsm<4, true>(b, vrow + 8 * j);
                float d0[4] = {o[j][0], o[j][1], 0.0f, 0.0f};
                float d1[4] = {o[j + 1][0], o[j + 1][1], 0.0f, 0.0f};
                ge_mma_bf16_16816(d0, pf, b[0], b[1]);
                ge_mma_bf16_16816(d1, pf, b[2], b[3]);
                o[j][0] = d0[0];
                o[j][1] = d0[1];
                o[j + 1][0] = d1[0];
                o[j + 1][1] = d1[1];
            }
        }
        __syncwarp();  // the warp is done with this stage before it is refilled
        if (STAGES == 2) {
            stage ^= 1;
        } else {
            if (next < ntiles) ge_pt_gather<HD, KT>(mine, mine + TILE, a, kp, vp, kw, base, p0 + next * KT, p1, lane);
            ge_cp_async_commit();
        }
    }
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);

    // Merge the warps (a warp without tiles has m = -inf, l = 0, O = 0 and adds nothing).
    // Every copy was waited for, so the tiles can hold the scratch once all warps are here.
    __syncthreads();
    float* wm = reinterpret_cast<float*>(tiles);  // [warp][8]
    float* wl = wm + GE_PT_WARPS * 8;             // [warp][8]
    float* wo = wl + GE_PT_WARPS * 8;             // [warp][8][HD]
    if (t == 0) {
        wm[warp * 8 + g] = m;
        wl[warp * 8 + g] = l;
    }
#pragma unroll
    for (int j = 0; j < ONT; ++j) {
        wo[(warp * 8 + g) * HD + 8 * j + 2 * t] = o[j][0];
        wo[(warp * 8 + g) * HD + 8 * j + 2 * t + 1] = o[j][1];
    }
    __syncthreads();
    for (int i = tid; i < nh * (HD / 2); i += GE_PT_THREADS) {
        const int r = i / (HD / 2);
        const int pair = i % (HD / 2);
        float mmax = GE_NEG_INF;
#pragma unroll
        for (int v = 0; v < GE_PT_WARPS; ++v) mmax = fmaxf(mmax, wm[v * 8 + r]);
        float total = 0.0f, o0 = 0.0f, o1 = 0.0f;
#pragma unroll
        for (int v = 0; v < GE_PT_WARPS; ++v) {
            const float f = exp2f(wm[v * 8 + r] - mmax);  // 0 for a warp without tiles
            total += f * wl[v * 8 + r];
            o0 += f * wo[(v * 8 + r) * HD + 2 * pair];
            o1 += f * wo[(v * 8 + r) * HD + 2 * pair + 1];
        }
        const float inv = 1.0f / total;
        // The max in natural-log units, as the CUDA-core kernel writes it.
        ge_pa_write<HD>(a, blk, h0 + r, pair, o0 * inv, o1 * inv, mmax * 0.6931471805599453f, total);
    }
}

// Key tiles of 16 positions; two in flight per warp at head_dim 64 (36 KiB of shared memory
// per block), one at 128 (34 KiB), under the 48 KiB of static shared memory.
extern "C" __global__ void __launch_bounds__(GE_PT_THREADS) ge_paged_attention_tc_d64(PagedAttentionArgs a) {
    paged_attention_tc_partition<64, 16, 2>(a);
}
extern "C" __global__ void __launch_bounds__(GE_PT_THREADS) ge_paged_attention_tc_d128(PagedAttentionArgs a) {
    paged_attention_tc_partition<128, 16, 1>(a);
}

// ---- Combine of the partitions: one block per (work item, head), threads over head_dim. Each
// partition z holding visible positions contributes its normalised output o_z with weight
// sum_z * exp(max_z - max over partitions); the result is divided by the total weight. ----
extern "C" __global__ void ge_paged_attention_combine(PagedCombineArgs a) {
    const unsigned int* work = reinterpret_cast<const unsigned int*>(a.work);
    const unsigned int* seqs = reinterpret_cast<const unsigned int*>(a.seqs);
    const long long w = blockIdx.x;
    const int h = blockIdx.y;
    const long long row = work[2 * w];
    const unsigned int* sd = seqs + 4 * static_cast<long long>(work[2 * w + 1]);
    const int visible = static_cast<int>(sd[2]) - static_cast<int>(sd[1]) +
                        (static_cast<int>(row) - static_cast<int>(sd[0])) + 1;
    const int parts = min(a.num_partitions, (visible + a.partition_size - 1) / a.partition_size);
    const long long first = (w * a.num_heads + h) * a.num_partitions;
    const float* pm = reinterpret_cast<const float*>(a.part_max) + first;
    const float* ps = reinterpret_cast<const float*>(a.part_sum) + first;
    const float* po = reinterpret_cast<const float*>(a.part_out) + first * a.head_dim;
    float mx = GE_NEG_INF;
    for (int z = 0; z < parts; ++z) mx = fmaxf(mx, pm[z]);
    float total = 0.0f;
    for (int z = 0; z < parts; ++z) total += ps[z] * expf(pm[z] - mx);
    const float inv = 1.0f / total;
    ge_bf16* out = reinterpret_cast<ge_bf16*>(a.out) + row * static_cast<long long>(a.num_heads) * a.head_dim +
                   static_cast<long long>(h) * a.head_dim;
    for (int d = threadIdx.x; d < a.head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int z = 0; z < parts; ++z) o += ps[z] * expf(pm[z] - mx) * po[static_cast<long long>(z) * a.head_dim + d];
        out[d] = ge_f32_to_bf16(o * inv);
    }
}
