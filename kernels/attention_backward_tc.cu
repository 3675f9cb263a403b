// Backward of causal attention over packed variable-length sequences on tensor cores: the
// same maths, grids, tile lists and outputs as kernels/attention_backward.cu (read its header
// first), with every matrix product an `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32`
// (bf16 operands, f32 accumulation). Deterministic (no atomics): the GQA sum is a loop in the
// dk/dv kernel, or (`split_heads`) per-head f32 shares that ge_attention_dkv_reduce adds in
// order. With `stats_given` the dq kernel takes each row's log-sum-exp from the forward
// (kernels/attention_tc.cu) and delta from ge_attention_delta instead of computing them.
// src/backend/cuda/attention_backward.rs has a host emulation of these loops, lane by lane,
// that checks the fragment index maths against the CPU backend.
//
// Blocks are 128 threads, 4 warps; each warp owns 16 rows of the block's own 64-row tile
// (query rows in the dq kernel, key rows in the dk/dv kernel) and walks the other operand in
// tiles of BK keys (dq) or BQ queries (dk/dv).
//
// m16n8k16 fragments (PTX ISA, lane = 4 * gid + tig): A (16 x 16, row-major) a0 = (gid, 2 tig
// + {0,1}), a1 = (gid + 8, same), a2 = (gid, 2 tig + 8 + {0,1}), a3 = (gid + 8, same); B (16 x
// 8) b0 = (k = 2 tig + {0,1}, n = gid), b1 = (k = 2 tig + 8 + {0,1}, n = gid); C (16 x 8) c0, c1
// = (gid, 2 tig + {0,1}), c2, c3 = (gid + 8, same). Two bf16 per 32-bit register, the lower
// index in the low half. A C fragment pair (n-tiles 2j, 2j + 1), rounded to bf16 pairs, is the
// A fragment of k-step j of the next product, so P and dS never go through shared memory.
//
// Shared tiles are bf16 rows of HD elements stored as 32-bit words with a row stride of
// HD / 2 + 4 words (144 or 272 bytes: 16-byte aligned rows for vector stores and ldmatrix, and
// a stride of 4 banks mod 32, so the 8 rows x 16 bytes of each 8 x 8 matrix an ldmatrix reads
// hit 32 different banks). Fragments come from shared memory by ldmatrix: x4 for an A
// fragment, x2 for a B fragment, x2.trans for a B fragment whose k index runs down the tile's
// rows.
#include "common.cuh"

#define GE_ABT_THREADS 128
#define GE_ABT_NEG_INF __int_as_float(0xff800000)

// Rows `row0 .. row0 + R` of a bf16 matrix with `ld` elements per row (from `src`, which
// includes the head's column offset) into a shared tile; rows at or past `nvalid` are zero.
template <int HD, int R>
__device__ __forceinline__ void ge_abt_load(unsigned int* dst, const ge_bf16* src, long long ld,
                                            long long row0, int nvalid) {
    constexpr int W = HD / 2 + 4;
    constexpr int VECS = HD / 8;
    for (int i = threadIdx.x; i < R * VECS; i += GE_ABT_THREADS) {
        const int r = i / VECS;
        const int c = i % VECS;
        uint4 v;
        v.x = v.y = v.z = v.w = 0u;
        if (r < nvalid) v = *reinterpret_cast<const uint4*>(src + (row0 + r) * ld + c * 8);
        *reinterpret_cast<uint4*>(dst + r * W + c * 4) = v;
    }
}

// The A fragment of rows r0 .. r0 + 15, columns kk .. kk + 15 of a shared tile: one ldmatrix
// of four 8 x 8 matrices (rows r0 / r0 + 8, columns kk / kk + 8, in a0..a3's order).
template <int W>
__device__ __forceinline__ void ge_abt_frag_a(unsigned int (&a)[4], const unsigned int* m, int r0,
                                              int kk) {
    const int lane = threadIdx.x % GE_WARP_SIZE;
    const int j = lane / 8;
    const unsigned int* row = m + (r0 + lane % 8 + 8 * (j & 1)) * W + kk / 2 + 4 * (j >> 1);
    ge_ldsm<4, false>(a, row);
}

// The B fragment B[k][n] = M[n0 + n][kk + k] (rows of M are B's columns): rows n0 .. n0 + 7,
// columns kk / kk + 8 (lanes 16..31 give the same addresses as 0..15, unused).
template <int W>
__device__ __forceinline__ void ge_abt_frag_b(unsigned int& b0, unsigned int& b1, const unsigned int* m,
                                              int n0, int kk) {
    const int lane = threadIdx.x % GE_WARP_SIZE;
    const int j = (lane / 8) & 1;
    unsigned int r[2];
    ge_ldsm<2, false>(r, m + (n0 + lane % 8) * W + kk / 2 + 4 * j);
    b0 = r[0];
    b1 = r[1];
}

// The B fragment B[k][n] = M[kk + k][n0 + n] (rows of M are B's rows): transposed loads of
// rows kk .. kk + 7 and kk + 8 .. kk + 15, columns n0 .. n0 + 7.
template <int W>
__device__ __forceinline__ void ge_abt_frag_bt(unsigned int& b0, unsigned int& b1, const unsigned int* m,
                                               int kk, int n0) {
    const int lane = threadIdx.x % GE_WARP_SIZE;
    const int j = (lane / 8) & 1;
    const unsigned short* row =
        reinterpret_cast<const unsigned short*>(m) + (kk + lane % 8 + 8 * j) * (2 * W) + n0;
    unsigned int r[2];
    ge_ldsm<2, true>(r, row);
    b0 = r[0];
    b1 = r[1];
}

// acc[j] = A[r0 .. r0 + 15] . M[8 j .. 8 j + 7]^T over the head dimension: a 16 x (8 NT)
// score tile of one warp, rows from shared tile `A`, columns from rows of shared tile `M`.
template <int HD, int NT>
__device__ __forceinline__ void ge_abt_scores(float (&acc)[NT][4], const unsigned int* A,
                                              const unsigned int* M, int r0) {
    constexpr int W = HD / 2 + 4;
#pragma unroll
    for (int j = 0; j < NT; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < HD; kk += 16) {
        unsigned int a[4];
        ge_abt_frag_a<W>(a, A, r0, kk);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            unsigned int b0, b1;
            ge_abt_frag_b<W>(b0, b1, M, 8 * j, kk);
            ge_mma_bf16_16816(acc[j], a, b0, b1);
        }
    }
}

// The A fragments (k-steps of 16 columns) of a 16 x (8 NT) C-fragment tile, as bf16.
template <int NT>
__device__ __forceinline__ void ge_abt_c_to_a(unsigned int (&a)[NT / 2][4], const float (&c)[NT][4]) {
#pragma unroll
    for (int s = 0; s < NT / 2; ++s) {
        a[s][0] = ge_pack_bf16x2(c[2 * s][0], c[2 * s][1]);
        a[s][1] = ge_pack_bf16x2(c[2 * s][2], c[2 * s][3]);
        a[s][2] = ge_pack_bf16x2(c[2 * s + 1][0], c[2 * s + 1][1]);
        a[s][3] = ge_pack_bf16x2(c[2 * s + 1][2], c[2 * s + 1][3]);
    }
}

// acc[n] += A (16 x 16 KS) . M[0 .. 16 KS][8 n .. 8 n + 7] for every 8-column slice n of the
// head dimension, M a shared tile whose rows are the k index.
template <int HD, int KS>
__device__ __forceinline__ void ge_abt_accumulate(float (&acc)[HD / 8][4], const unsigned int (&a)[KS][4],
                                                  const unsigned int* M) {
    constexpr int W = HD / 2 + 4;
#pragma unroll
    for (int n = 0; n < HD / 8; ++n) {
#pragma unroll
        for (int s = 0; s < KS; ++s) {
            unsigned int b0, b1;
            ge_abt_frag_bt<W>(b0, b1, M, 16 * s, 8 * n);
            ge_mma_bf16_16816(acc[n], a[s], b0, b1);
        }
    }
}

// ---- dQ and the row statistics: grid (query tile of 64 rows, query head). ----
template <int HD, int BK>
__device__ __forceinline__ void ge_attention_backward_dq_tc(const AttentionBackwardArgs& a) {
    static_assert(BK % 16 == 0 && HD % 16 == 0, "tile shapes");
    constexpr int BQ = 64;
    constexpr int W = HD / 2 + 4;
    constexpr int NT = BK / 8;
    constexpr int DT = HD / 8;
    __shared__ __align__(16) unsigned int q_s[BQ * W];
    __shared__ __align__(16) unsigned int do_s[BQ * W];
    __shared__ __align__(16) unsigned int k_s[BK * W];
    __shared__ __align__(16) unsigned int v_s[BK * W];

    if (a.tile_rows != BQ) __trap();
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int gid = lane >> 2;
    const int tig = lane & 3;
    const int r0 = 16 * warp;  // the warp's first row in the tile
    const unsigned int* tile = reinterpret_cast<const unsigned int*>(a.tiles) + 3 * static_cast<long long>(blockIdx.x);
    const long long seq0 = tile[0];
    const int len = static_cast<int>(tile[1]);
    const int q0 = static_cast<int>(tile[2]);
    const int nq = min(BQ, len - q0);
    const int h = blockIdx.y;
    const int kvh = h / (a.num_heads / a.num_kv_heads);
    const long long qw = static_cast<long long>(a.num_heads) * HD;
    const long long kw = static_cast<long long>(a.num_kv_heads) * HD;
    const ge_bf16* q = reinterpret_cast<const ge_bf16*>(a.q) + static_cast<long long>(h) * HD;
    const ge_bf16* dout = reinterpret_cast<const ge_bf16*>(a.dout) + static_cast<long long>(h) * HD;
    const ge_bf16* k = reinterpret_cast<const ge_bf16*>(a.k) + static_cast<long long>(kvh) * HD;
    const ge_bf16* v = reinterpret_cast<const ge_bf16*>(a.v) + static_cast<long long>(kvh) * HD;
    const float scale = a.scale;
    const int key_end = q0 + nq;

    ge_abt_load<HD, BQ>(q_s, q, qw, seq0 + q0, nq);
    ge_abt_load<HD, BQ>(do_s, dout, qw, seq0 + q0, nq);

    float lse_r[2], dd_r[2];
    if (a.stats_given) {
        // The forward's log-sum-exp and ge_attention_delta's delta, for the thread's rows.
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int r = r0 + gid + 8 * hr;
            const long long idx = (seq0 + q0 + r) * a.num_heads + h;
            lse_r[hr] = r < nq ? reinterpret_cast<const float*>(a.lse)[idx] : 0.0f;
            dd_r[hr] = r < nq ? reinterpret_cast<const float*>(a.delta)[idx] : 0.0f;
        }
    } else {
        // Pass 1: the thread's rows are r0 + gid + 8 hr (hr = 0, 1). The running max m is the
        // same in the 4 lanes of a quad (the lanes sharing a row); l and acc (the sums of the
        // exponentials and of exponentials times dP) are per lane over its columns until the end.
        float m[2], l[2], acc[2];
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            m[hr] = GE_ABT_NEG_INF;
            l[hr] = 0.0f;
            acc[hr] = 0.0f;
        }
        for (int k0 = 0; k0 < key_end; k0 += BK) {
            const int nk = min(BK, key_end - k0);
            __syncthreads();  // the previous tile's readers are done (and q_s / do_s are loaded)
            ge_abt_load<HD, BK>(k_s, k, kw, seq0 + k0, nk);
            ge_abt_load<HD, BK>(v_s, v, kw, seq0 + k0, nk);
            __syncthreads();
            float s[NT][4], dp[NT][4];
            ge_abt_scores<HD, NT>(s, q_s, k_s, r0);
            ge_abt_scores<HD, NT>(dp, do_s, v_s, r0);
#pragma unroll
            for (int hr = 0; hr < 2; ++hr) {
                const int r = r0 + gid + 8 * hr;
                const int qi = q0 + r;
                float mx = GE_ABT_NEG_INF;
#pragma unroll
                for (int j = 0; j < NT; ++j) {
#pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int c = 8 * j + 2 * tig + e;
                        const bool ok = r < nq && c < nk && k0 + c <= qi;
                        const float x = ok ? s[j][2 * hr + e] * scale : GE_ABT_NEG_INF;
                        s[j][2 * hr + e] = x;
                        mx = fmaxf(mx, x);
                    }
                }
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
                mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
                const float mn = fmaxf(m[hr], mx);
                if (mn != GE_ABT_NEG_INF) {  // the same in the whole quad
                    const float corr = expf(m[hr] - mn);  // 0 while m was -inf
                    float ls = l[hr] * corr;
                    float as = acc[hr] * corr;
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
#pragma unroll
                        for (int e = 0; e < 2; ++e) {
                            const float ex = expf(s[j][2 * hr + e] - mn);  // 0 where masked
                            ls += ex;
                            as = fmaf(ex, dp[j][2 * hr + e], as);
                        }
                    }
                    l[hr] = ls;
                    acc[hr] = as;
                    m[hr] = mn;
                }
            }
        }
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            float ls = l[hr];
            float as = acc[hr];
            ls += __shfl_xor_sync(0xffffffffu, ls, 1);
            as += __shfl_xor_sync(0xffffffffu, as, 1);
            ls += __shfl_xor_sync(0xffffffffu, ls, 2);
            as += __shfl_xor_sync(0xffffffffu, as, 2);
            const int r = r0 + gid + 8 * hr;
            // Rows past the sequence see no key: statistics that make their P zero anyway.
            const bool ok = r < nq && ls > 0.0f;
            lse_r[hr] = ok ? m[hr] + logf(ls) : 0.0f;
            dd_r[hr] = ok ? as / ls : 0.0f;
            if (tig == 0 && r < nq) {
                const long long idx = (seq0 + q0 + r) * a.num_heads + h;
                reinterpret_cast<float*>(a.lse)[idx] = lse_r[hr];
                reinterpret_cast<float*>(a.delta)[idx] = dd_r[hr];
            }
        }
    }  // pass 1

    // Pass 2: dQ = scale * dS K, dS in registers as A fragments.
    float dq[DT][4];
#pragma unroll
    for (int n = 0; n < DT; ++n) dq[n][0] = dq[n][1] = dq[n][2] = dq[n][3] = 0.0f;
    for (int k0 = 0; k0 < key_end; k0 += BK) {
        const int nk = min(BK, key_end - k0);
        __syncthreads();
        ge_abt_load<HD, BK>(k_s, k, kw, seq0 + k0, nk);
        ge_abt_load<HD, BK>(v_s, v, kw, seq0 + k0, nk);
        __syncthreads();
        float s[NT][4], dp[NT][4];
        ge_abt_scores<HD, NT>(s, q_s, k_s, r0);
        ge_abt_scores<HD, NT>(dp, do_s, v_s, r0);
#pragma unroll
        for (int j = 0; j < NT; ++j) {
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int hr = i / 2;
                const int r = r0 + gid + 8 * hr;
                const int c = 8 * j + 2 * tig + (i % 2);
                float ds = 0.0f;
                if (r < nq && c < nk && k0 + c <= q0 + r) {
                    const float p = expf(s[j][i] * scale - lse_r[hr]);
                    ds = p * (dp[j][i] - dd_r[hr]);
                }
                s[j][i] = ds;
            }
        }
        unsigned int ds_a[NT / 2][4];
        ge_abt_c_to_a<NT>(ds_a, s);
        ge_abt_accumulate<HD, NT / 2>(dq, ds_a, k_s);
    }
    unsigned int* dqo = reinterpret_cast<unsigned int*>(a.dq);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int r = r0 + gid + 8 * hr;
        if (r >= nq) continue;
        const long long rowword = ((seq0 + q0 + r) * qw + static_cast<long long>(h) * HD) / 2;
#pragma unroll
        for (int n = 0; n < DT; ++n) {
            dqo[rowword + 4 * n + tig] = ge_pack_bf16x2(dq[n][2 * hr] * scale, dq[n][2 * hr + 1] * scale);
        }
    }
}

// ---- dK and dV: grid (key tile of 64 rows, kv head[, query head of its group]); needs the
// rows' lse / delta (the dq kernel's, or the forward's and ge_attention_delta's). ----
// The warp computes S^T = K Q^T and dP^T = V dO^T (its 16 key rows x BQ query columns), so
// P^T and dS^T come out in the C layout and feed dV += P^T dO and dK += dS^T Q directly.
// With `split_heads` (GQA), grid z is the query head within the group: the block adds up that
// head's share only and writes it in f32 to a per-head buffer, and ge_attention_dkv_reduce
// sums the group's shares; a group's heads then run in parallel instead of one after another
// in one block (a kv head's key tile is otherwise a single block walking group x queries).
template <int HD, int BQ>
__device__ __forceinline__ void ge_attention_backward_dkv_tc(const AttentionBackwardArgs& a) {
    static_assert(BQ % 16 == 0 && HD % 16 == 0, "tile shapes");
    constexpr int BK = 64;
    constexpr int W = HD / 2 + 4;
    constexpr int NT = BQ / 8;
    constexpr int DT = HD / 8;
    __shared__ __align__(16) unsigned int k_s[BK * W];
    __shared__ __align__(16) unsigned int v_s[BK * W];
    __shared__ __align__(16) unsigned int q_s[BQ * W];
    __shared__ __align__(16) unsigned int do_s[BQ * W];
    __shared__ float lse_s[BQ];
    __shared__ float dd_s[BQ];

    if (a.tile_rows != BK) __trap();
    const int tid = threadIdx.x;
    const int warp = tid / 32;
    const int lane = tid % 32;
    const int gid = lane >> 2;
    const int tig = lane & 3;
    const int r0 = 16 * warp;  // the warp's first key row in the tile
    const unsigned int* tile = reinterpret_cast<const unsigned int*>(a.tiles) + 3 * static_cast<long long>(blockIdx.x);
    const long long seq0 = tile[0];
    const int len = static_cast<int>(tile[1]);
    const int k0 = static_cast<int>(tile[2]);
    const int nk = min(BK, len - k0);
    const int kvh = blockIdx.y;
    const int group = a.num_heads / a.num_kv_heads;
    const long long qw = static_cast<long long>(a.num_heads) * HD;
    const long long kw = static_cast<long long>(a.num_kv_heads) * HD;
    const ge_bf16* k = reinterpret_cast<const ge_bf16*>(a.k) + static_cast<long long>(kvh) * HD;
    const ge_bf16* v = reinterpret_cast<const ge_bf16*>(a.v) + static_cast<long long>(kvh) * HD;
    const float* lse_g = reinterpret_cast<const float*>(a.lse);
    const float* dd_g = reinterpret_cast<const float*>(a.delta);
    const float scale = a.scale;

    ge_abt_load<HD, BK>(k_s, k, kw, seq0 + k0, nk);
    ge_abt_load<HD, BK>(v_s, v, kw, seq0 + k0, nk);

    float dk[DT][4], dv[DT][4];
#pragma unroll
    for (int n = 0; n < DT; ++n) {
        dk[n][0] = dk[n][1] = dk[n][2] = dk[n][3] = 0.0f;
        dv[n][0] = dv[n][1] = dv[n][2] = dv[n][3] = 0.0f;
    }
    const int first_q = (k0 / BQ) * BQ;
    const int g_begin = a.split_heads ? static_cast<int>(blockIdx.z) : 0;
    const int g_end = a.split_heads ? g_begin + 1 : group;
    for (int g = g_begin; g < g_end; ++g) {
        const int h = kvh * group + g;
        const ge_bf16* q = reinterpret_cast<const ge_bf16*>(a.q) + static_cast<long long>(h) * HD;
        const ge_bf16* dout = reinterpret_cast<const ge_bf16*>(a.dout) + static_cast<long long>(h) * HD;
        for (int q0 = first_q; q0 < len; q0 += BQ) {
            const int nq = min(BQ, len - q0);
            __syncthreads();  // the previous tile's readers are done
            ge_abt_load<HD, BQ>(q_s, q, qw, seq0 + q0, nq);
            ge_abt_load<HD, BQ>(do_s, dout, qw, seq0 + q0, nq);
            for (int r = tid; r < BQ; r += GE_ABT_THREADS) {
                const long long idx = (seq0 + q0 + r) * a.num_heads + h;
                lse_s[r] = r < nq ? lse_g[idx] : 0.0f;
                dd_s[r] = r < nq ? dd_g[idx] : 0.0f;
            }
            __syncthreads();
            // The warp's keys all past the tile's queries, or past the sequence: nothing to add.
            if (r0 >= nk || k0 + r0 > q0 + nq - 1) continue;
            float st[NT][4], dpt[NT][4];
            ge_abt_scores<HD, NT>(st, k_s, q_s, r0);
            ge_abt_scores<HD, NT>(dpt, v_s, do_s, r0);
#pragma unroll
            for (int j = 0; j < NT; ++j) {
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int kr = r0 + gid + 8 * (i / 2);  // key row in the tile
                    const int c = 8 * j + 2 * tig + (i % 2);  // query row in the tile
                    float p = 0.0f;
                    if (kr < nk && c < nq && k0 + kr <= q0 + c) p = expf(st[j][i] * scale - lse_s[c]);
                    st[j][i] = p;
                    dpt[j][i] = p * (dpt[j][i] - dd_s[c]);
                }
            }
            unsigned int pa[NT / 2][4], dsa[NT / 2][4];
            ge_abt_c_to_a<NT>(pa, st);
            ge_abt_c_to_a<NT>(dsa, dpt);
            ge_abt_accumulate<HD, NT / 2>(dv, pa, do_s);
            ge_abt_accumulate<HD, NT / 2>(dk, dsa, q_s);
        }
    }
    if (a.split_heads) {
        // This head's share, f32 and unscaled, at [row, head, column].
        float* dkp = reinterpret_cast<float*>(a.dk);
        float* dvp = reinterpret_cast<float*>(a.dv);
        const long long h = static_cast<long long>(kvh) * group + g_begin;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
            const int kr = r0 + gid + 8 * hr;
            if (kr >= nk) continue;
            const long long at = ((seq0 + k0 + kr) * a.num_heads + h) * HD + 2 * tig;
#pragma unroll
            for (int n = 0; n < DT; ++n) {
                float2 pk, pv;
                pk.x = dk[n][2 * hr];
                pk.y = dk[n][2 * hr + 1];
                pv.x = dv[n][2 * hr];
                pv.y = dv[n][2 * hr + 1];
                *reinterpret_cast<float2*>(dkp + at + 8 * n) = pk;
                *reinterpret_cast<float2*>(dvp + at + 8 * n) = pv;
            }
        }
        return;
    }
    unsigned int* dko = reinterpret_cast<unsigned int*>(a.dk);
    unsigned int* dvo = reinterpret_cast<unsigned int*>(a.dv);
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
        const int kr = r0 + gid + 8 * hr;
        if (kr >= nk) continue;
        const long long rowword = ((seq0 + k0 + kr) * kw + static_cast<long long>(kvh) * HD) / 2;
#pragma unroll
        for (int n = 0; n < DT; ++n) {
            dko[rowword + 4 * n + tig] = ge_pack_bf16x2(dk[n][2 * hr] * scale, dk[n][2 * hr + 1] * scale);
            dvo[rowword + 4 * n + tig] = ge_pack_bf16x2(dv[n][2 * hr], dv[n][2 * hr + 1]);
        }
    }
}

// ---- delta = rowsum(dout * out) per (row, head), f32 (see AttentionDeltaArgs): one warp per
// (row, head), lanes striding over head_dim, then a warp sum. ----
extern "C" __global__ void ge_attention_delta(AttentionDeltaArgs a) {
    const ge_bf16* o = reinterpret_cast<const ge_bf16*>(a.out);
    const ge_bf16* d = reinterpret_cast<const ge_bf16*>(a.dout);
    float* delta = reinterpret_cast<float*>(a.delta);
    const long long pairs = a.rows * a.num_heads;
    const int lane = threadIdx.x % GE_WARP_SIZE;
    const long long warps = ge_grid_threads() / GE_WARP_SIZE;
    for (long long w = ge_global_index() / GE_WARP_SIZE; w < pairs; w += warps) {
        const long long base = w * a.head_dim;  // row r, head h: (r * num_heads + h) * head_dim
        float s = 0.0f;
        for (int i = lane; i < a.head_dim; i += GE_WARP_SIZE) {
            s = fmaf(ge_bf16_to_f32(d[base + i]), ge_bf16_to_f32(o[base + i]), s);
        }
        s = ge_warp_sum(s);
        if (lane == 0) delta[w] = s;
    }
}

// ---- The split dk/dv kernel's per-head shares summed over each group (see AttentionDkvReduceArgs):
// grid-stride over the rows x kv width outputs, the group's heads added in order. ----
extern "C" __global__ void ge_attention_dkv_reduce(AttentionDkvReduceArgs a) {
    const float* dkp = reinterpret_cast<const float*>(a.dk_part);
    const float* dvp = reinterpret_cast<const float*>(a.dv_part);
    ge_bf16* dk = reinterpret_cast<ge_bf16*>(a.dk);
    ge_bf16* dv = reinterpret_cast<ge_bf16*>(a.dv);
    const int group = a.num_heads / a.num_kv_heads;
    const long long kw = static_cast<long long>(a.num_kv_heads) * a.head_dim;
    const long long total = a.rows * kw;
    for (long long i = ge_global_index(); i < total; i += ge_grid_threads()) {
        const long long r = i / kw;
        const int c = static_cast<int>(i - r * kw);
        const int kvh = c / a.head_dim;
        const int d = c - kvh * a.head_dim;
        const long long p = (r * a.num_heads + static_cast<long long>(kvh) * group) * a.head_dim + d;
        float sk = 0.0f, sv = 0.0f;
        for (int g = 0; g < group; ++g) {
            sk += dkp[p + static_cast<long long>(g) * a.head_dim];
            sv += dvp[p + static_cast<long long>(g) * a.head_dim];
        }
        dk[i] = ge_f32_to_bf16(sk * a.scale);
        dv[i] = ge_f32_to_bf16(sv);
    }
}

// Tile sizes (the host's attention_backward.rs mirrors them): both kernels own 64-row tiles;
// the dq kernel walks keys in tiles of 64 (head_dim 64) or 16 (128), the dk/dv kernel queries
// in tiles of 64 or 16, each under 48 KiB of static shared memory.
extern "C" __global__ void __launch_bounds__(GE_ABT_THREADS) ge_attention_backward_tc_dq_d64(AttentionBackwardArgs a) {
    ge_attention_backward_dq_tc<64, 64>(a);
}
extern "C" __global__ void __launch_bounds__(GE_ABT_THREADS) ge_attention_backward_tc_dq_d128(AttentionBackwardArgs a) {
    ge_attention_backward_dq_tc<128, 16>(a);
}
extern "C" __global__ void __launch_bounds__(GE_ABT_THREADS) ge_attention_backward_tc_dkv_d64(AttentionBackwardArgs a) {
    ge_attention_backward_dkv_tc<64, 64>(a);
}
extern "C" __global__ void __launch_bounds__(GE_ABT_THREADS) ge_attention_backward_tc_dkv_d128(AttentionBackwardArgs a) {
    ge_attention_backward_dkv_tc<128, 16>(a);
}
