// Backward of causal attention over packed variable-length sequences (FlashAttention-2 style:
// the probabilities are recomputed, nothing but q, k, v is kept from the forward).
//
// With S = scale * Q K^T (causal within each sequence), P = softmax(S), O = P V and dO given:
//   D_i = sum_j P_ij (dO_i . v_j)  (= dO_i . O_i),   dS_ij = P_ij (dO_i . v_j - D_i),
//   dQ = scale * dS K,   dK = scale * dS^T Q,   dV = P^T dO.
// Two kernels, both deterministic (no atomics):
// 1. ge_attention_backward_dq_*: one block per (query tile, query head). Pass 1 walks the key
//    tiles at or before the query tile for the row statistics (log-sum-exp of S and D, each
//    thread keeping an online softmax over its own columns, merged across the 16 threads of a
//    row at the end), writes them to `lse` / `delta`; pass 2 walks the same key tiles again
//    and accumulates dQ in registers.
// 2. ge_attention_backward_dkv_*: one block per (key tile, kv head), launched after 1. It walks
//    every query head of the kv head's GQA group and every query tile at or after the key tile,
//    accumulating dK and dV for all of them in registers, so the GQA sum needs no atomics.
//
// Tiles are bf16 in shared memory as 32-bit words of two elements with a row stride of
// head_dim / 2 + 1 words (odd: the column reads of the dot products hit 16 different banks).
// Products are f32 FMAs on CUDA cores (no tensor cores yet). A block is 256 threads as a 16 x 16
// grid (ty, tx); in a BQ x BK score tile the thread owns rows ty + 16 i and columns tx + 16 j.
#include "common.cuh"

#define GE_AB_THREADS 256
#define GE_AB_NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float ge_ab_lo(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float ge_ab_hi(unsigned int w) { return __uint_as_float(w & 0xffff0000u); }

// Rows `row0 .. row0 + R` of a bf16 matrix with `ld` elements per row (starting at `src`, which
// already includes the head's column offset) into a shared tile; rows at or past `nvalid` are
// zero. 16-byte global loads (head offsets and `ld` are multiples of 64 elements).
template <int HD, int R>
__device__ __forceinline__ void ge_ab_load_tile(unsigned int* dst, const ge_bf16* src, long long ld,
                                                long long row0, int nvalid) {
    constexpr int W = HD / 2 + 1;
    constexpr int VECS = HD / 8;
    for (int i = threadIdx.x; i < R * VECS; i += GE_AB_THREADS) {
        const int r = i / VECS;
        const int c = i % VECS;
        uint4 v;
        v.x = v.y = v.z = v.w = 0u;
        if (r < nvalid) v = *reinterpret_cast<const uint4*>(src + (row0 + r) * ld + c * 8);
        unsigned int* d = dst + r * W + c * 4;
        d[0] = v.x;
        d[1] = v.y;
        d[2] = v.z;
        d[3] = v.w;
    }
}

// acc[i][j] = A[ty + 16 i] . B[tx + 16 j] over the head dimension (shared tiles as above).
template <int HD, int TR, int TC>
__device__ __forceinline__ void ge_ab_dot_tile(float (&acc)[TR][TC], const unsigned int* A,
                                               const unsigned int* B, int ty, int tx) {
    constexpr int W = HD / 2 + 1;
#pragma unroll
    for (int i = 0; i < TR; ++i) {
#pragma unroll
        for (int j = 0; j < TC; ++j) acc[i][j] = 0.0f;
    }
#pragma unroll 4
    for (int w = 0; w < HD / 2; ++w) {
        float a0[TR], a1[TR], b0[TC], b1[TC];
#pragma unroll
        for (int i = 0; i < TR; ++i) {
            const unsigned int x = A[(ty + 16 * i) * W + w];
            a0[i] = ge_ab_lo(x);
            a1[i] = ge_ab_hi(x);
        }
#pragma unroll
        for (int j = 0; j < TC; ++j) {
            const unsigned int x = B[(tx + 16 * j) * W + w];
            b0[j] = ge_ab_lo(x);
            b1[j] = ge_ab_hi(x);
        }
#pragma unroll
        for (int i = 0; i < TR; ++i) {
#pragma unroll
            for (int j = 0; j < TC; ++j) acc[i][j] = fmaf(a1[i], b1[j], fmaf(a0[i], b0[j], acc[i][j]));
        }
    }
}

// ---- dQ and the row statistics: grid (query tile, query head). ----
template <int HD, int BQ, int BK>
__device__ __forceinline__ void ge_attention_backward_dq(const AttentionBackwardArgs& a) {
    static_assert(BQ % 16 == 0 && BK % 16 == 0 && HD % 32 == 0, "tile shapes");
    constexpr int W = HD / 2 + 1;
    constexpr int TR = BQ / 16;
    constexpr int TC = BK / 16;
    constexpr int WJ = HD / 32;  // word columns per thread in the dQ tile
    __shared__ unsigned int q_s[BQ * W];
    __shared__ unsigned int do_s[BQ * W];
    __shared__ unsigned int k_s[BK * W];
    __shared__ unsigned int v_s[BK * W];
    __shared__ float ds_s[BQ][BK + 1];
    __shared__ float lse_s[BQ];
    __shared__ float dd_s[BQ];

    // The tensor-core kernels' modes; these kernels have neither.
    if (a.tile_rows != BQ || a.split_heads || a.stats_given) __trap();
    const int tid = threadIdx.x;
    const int ty = tid / 16;
    const int tx = tid % 16;
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
    // Keys visible to some row of the tile: positions 0 .. q0 + nq - 1.
    const int key_end = q0 + nq;

    ge_ab_load_tile<HD, BQ>(q_s, q, qw, seq0 + q0, nq);
    ge_ab_load_tile<HD, BQ>(do_s, dout, qw, seq0 + q0, nq);

    // Pass 1: per thread, an online softmax over its own columns: max m, sum of exponentials l,
    // and sum of exponentials times dO . v (for D).
    float m[TR], l[TR], acc[TR];
#pragma unroll
    for (int i = 0; i < TR; ++i) {
        m[i] = GE_AB_NEG_INF;
        l[i] = 0.0f;
        acc[i] = 0.0f;
    }
    for (int k0 = 0; k0 < key_end; k0 += BK) {
        const int nk = min(BK, key_end - k0);
        __syncthreads();  // the previous tile's readers are done (and q_s / do_s are loaded)
        ge_ab_load_tile<HD, BK>(k_s, k, kw, seq0 + k0, nk);
        ge_ab_load_tile<HD, BK>(v_s, v, kw, seq0 + k0, nk);
        __syncthreads();
        float s[TR][TC], dp[TR][TC];
        ge_ab_dot_tile<HD, TR, TC>(s, q_s, k_s, ty, tx);
        ge_ab_dot_tile<HD, TR, TC>(dp, do_s, v_s, ty, tx);
#pragma unroll
        for (int i = 0; i < TR; ++i) {
            const int qi = q0 + ty + 16 * i;
#pragma unroll
            for (int j = 0; j < TC; ++j) {
                const int kj = k0 + tx + 16 * j;
                if (ty + 16 * i < nq && kj < k0 + nk && kj <= qi) {
                    const float x = s[i][j] * scale;
                    if (x > m[i]) {
                        const float corr = expf(m[i] - x);  // 0 when m was -inf
                        l[i] = l[i] * corr + 1.0f;
                        acc[i] = acc[i] * corr + dp[i][j];
                        m[i] = x;
                    } else {
                        const float e = expf(x - m[i]);
                        l[i] += e;
                        acc[i] = fmaf(e, dp[i][j], acc[i]);
                    }
                }
            }
        }
    }
    // Merge the 16 threads of each row (lanes differing in bits 0-3: one half-warp).
#pragma unroll
    for (int i = 0; i < TR; ++i) {
        float mx = m[i];
#pragma unroll
        for (int off = 8; off > 0; off /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
        const float f = (m[i] == GE_AB_NEG_INF) ? 0.0f : expf(m[i] - mx);
        float ls = l[i] * f;
        float as = acc[i] * f;
#pragma unroll
        for (int off = 8; off > 0; off /= 2) {
            ls += __shfl_xor_sync(0xffffffffu, ls, off);
            as += __shfl_xor_sync(0xffffffffu, as, off);
        }
        const int r = ty + 16 * i;
        if (tx == 0) {
            // Rows past the sequence see no key: statistics that make their P zero anyway.
            const bool ok = r < nq && ls > 0.0f;
            const float lse = ok ? mx + logf(ls) : 0.0f;
            const float dd = ok ? as / ls : 0.0f;
            lse_s[r] = lse;
            dd_s[r] = dd;
            if (r < nq) {
                const long long idx = (seq0 + q0 + r) * a.num_heads + h;
                reinterpret_cast<float*>(a.lse)[idx] = lse;
                reinterpret_cast<float*>(a.delta)[idx] = dd;
            }
        }
    }

    // Pass 2: dQ[r][d] = scale * sum_c dS[r][c] K[c][d]; the thread owns rows ty + 16 i and the
    // bf16 pairs (words) tx + 16 j.
    float dq[TR][WJ][2];
#pragma unroll
    for (int i = 0; i < TR; ++i) {
#pragma unroll
        for (int j = 0; j < WJ; ++j) dq[i][j][0] = dq[i][j][1] = 0.0f;
    }
    for (int k0 = 0; k0 < key_end; k0 += BK) {
        const int nk = min(BK, key_end - k0);
        __syncthreads();  // lse_s / dd_s visible; the previous tile's readers are done
        ge_ab_load_tile<HD, BK>(k_s, k, kw, seq0 + k0, nk);
        ge_ab_load_tile<HD, BK>(v_s, v, kw, seq0 + k0, nk);
        __syncthreads();
        float s[TR][TC], dp[TR][TC];
        ge_ab_dot_tile<HD, TR, TC>(s, q_s, k_s, ty, tx);
        ge_ab_dot_tile<HD, TR, TC>(dp, do_s, v_s, ty, tx);
#pragma unroll
        for (int i = 0; i < TR; ++i) {
            const int r = ty + 16 * i;
            const int qi = q0 + r;
            const float lse = lse_s[r];
            const float dd = dd_s[r];
#pragma unroll
            for (int j = 0; j < TC; ++j) {
                const int c = tx + 16 * j;
                const int kj = k0 + c;
                float ds = 0.0f;
                if (r < nq && c < nk && kj <= qi) {
                    const float p = expf(s[i][j] * scale - lse);
                    ds = p * (dp[i][j] - dd);
                }
                ds_s[r][c] = ds;
            }
        }
        __syncthreads();
#pragma unroll 4
        for (int c = 0; c < BK; ++c) {
            float kf0[WJ], kf1[WJ];
#pragma unroll
            for (int j = 0; j < WJ; ++j) {
                const unsigned int x = k_s[c * W + tx + 16 * j];
                kf0[j] = ge_ab_lo(x);
                kf1[j] = ge_ab_hi(x);
            }
#pragma unroll
            for (int i = 0; i < TR; ++i) {
                const float ds = ds_s[ty + 16 * i][c];
#pragma unroll
                for (int j = 0; j < WJ; ++j) {
                    dq[i][j][0] = fmaf(ds, kf0[j], dq[i][j][0]);
                    dq[i][j][1] = fmaf(ds, kf1[j], dq[i][j][1]);
                }
            }
        }
    }
    unsigned int* dqo = reinterpret_cast<unsigned int*>(a.dq);
#pragma unroll
    for (int i = 0; i < TR; ++i) {
        const int r = ty + 16 * i;
        if (r >= nq) continue;
        const long long rowword = ((seq0 + q0 + r) * qw + static_cast<long long>(h) * HD) / 2;
#pragma unroll
        for (int j = 0; j < WJ; ++j) {
            dqo[rowword + tx + 16 * j] = ge_pack_bf16x2(dq[i][j][0] * scale, dq[i][j][1] * scale);
        }
    }
}

// ---- dK and dV: grid (key tile, kv head); needs the dq kernel's lse / delta. ----
template <int HD, int BQ, int BK>
__device__ __forceinline__ void ge_attention_backward_dkv(const AttentionBackwardArgs& a) {
    static_assert(BQ % 16 == 0 && BK % 16 == 0 && HD % 32 == 0, "tile shapes");
    constexpr int W = HD / 2 + 1;
    constexpr int TR = BQ / 16;
    constexpr int TC = BK / 16;
    constexpr int WJ = HD / 32;
    __shared__ unsigned int q_s[BQ * W];
    __shared__ unsigned int do_s[BQ * W];
    __shared__ unsigned int k_s[BK * W];
    __shared__ unsigned int v_s[BK * W];
    __shared__ float p_s[BQ][BK + 1];
    __shared__ float ds_s[BQ][BK + 1];
    __shared__ float lse_s[BQ];
    __shared__ float dd_s[BQ];

    // The tensor-core kernels' modes; these kernels have neither.
    if (a.tile_rows != BK || a.split_heads || a.stats_given) __trap();
    const int tid = threadIdx.x;
    const int ty = tid / 16;
    const int tx = tid % 16;
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

    ge_ab_load_tile<HD, BK>(k_s, k, kw, seq0 + k0, nk);
    ge_ab_load_tile<HD, BK>(v_s, v, kw, seq0 + k0, nk);

    // The thread owns key rows ty + 16 i and bf16 pairs (words) tx + 16 j of dK and dV.
    float dk[TC][WJ][2], dv[TC][WJ][2];
#pragma unroll
    for (int i = 0; i < TC; ++i) {
#pragma unroll
        for (int j = 0; j < WJ; ++j) dk[i][j][0] = dk[i][j][1] = dv[i][j][0] = dv[i][j][1] = 0.0f;
    }
    const int first_q = (k0 / BQ) * BQ;
    for (int g = 0; g < group; ++g) {
        const int h = kvh * group + g;
        const ge_bf16* q = reinterpret_cast<const ge_bf16*>(a.q) + static_cast<long long>(h) * HD;
        const ge_bf16* dout = reinterpret_cast<const ge_bf16*>(a.dout) + static_cast<long long>(h) * HD;
        for (int q0 = first_q; q0 < len; q0 += BQ) {
            const int nq = min(BQ, len - q0);
            __syncthreads();  // the previous tile's readers are done
            ge_ab_load_tile<HD, BQ>(q_s, q, qw, seq0 + q0, nq);
            ge_ab_load_tile<HD, BQ>(do_s, dout, qw, seq0 + q0, nq);
            for (int r = tid; r < BQ; r += GE_AB_THREADS) {
                const long long idx = (seq0 + q0 + r) * a.num_heads + h;
                lse_s[r] = r < nq ? lse_g[idx] : 0.0f;
                dd_s[r] = r < nq ? dd_g[idx] : 0.0f;
            }
            __syncthreads();
            float s[TR][TC], dp[TR][TC];
            ge_ab_dot_tile<HD, TR, TC>(s, q_s, k_s, ty, tx);
            ge_ab_dot_tile<HD, TR, TC>(dp, do_s, v_s, ty, tx);
#pragma unroll
            for (int i = 0; i < TR; ++i) {
                const int r = ty + 16 * i;
                const int qi = q0 + r;
                const float lse = lse_s[r];
                const float dd = dd_s[r];
#pragma unroll
                for (int j = 0; j < TC; ++j) {
                    const int c = tx + 16 * j;
                    float p = 0.0f;
                    if (r < nq && c < nk && k0 + c <= qi) p = expf(s[i][j] * scale - lse);
                    p_s[r][c] = p;
                    ds_s[r][c] = p * (dp[i][j] - dd);
                }
            }
            __syncthreads();
#pragma unroll 2
            for (int r = 0; r < BQ; ++r) {
                float q0f[WJ], q1f[WJ], d0f[WJ], d1f[WJ];
#pragma unroll
                for (int j = 0; j < WJ; ++j) {
                    const unsigned int xq = q_s[r * W + tx + 16 * j];
                    const unsigned int xd = do_s[r * W + tx + 16 * j];
                    q0f[j] = ge_ab_lo(xq);
                    q1f[j] = ge_ab_hi(xq);
                    d0f[j] = ge_ab_lo(xd);
                    d1f[j] = ge_ab_hi(xd);
                }
#pragma unroll
                for (int i = 0; i < TC; ++i) {
                    const float p = p_s[r][ty + 16 * i];
                    const float ds = ds_s[r][ty + 16 * i];
#pragma unroll
                    for (int j = 0; j < WJ; ++j) {
                        dv[i][j][0] = fmaf(p, d0f[j], dv[i][j][0]);
                        dv[i][j][1] = fmaf(p, d1f[j], dv[i][j][1]);
                        dk[i][j][0] = fmaf(ds, q0f[j], dk[i][j][0]);
                        dk[i][j][1] = fmaf(ds, q1f[j], dk[i][j][1]);
                    }
                }
            }
        }
    }
    unsigned int* dko = reinterpret_cast<unsigned int*>(a.dk);
    unsigned int* dvo = reinterpret_cast<unsigned int*>(a.dv);
#pragma unroll
    for (int i = 0; i < TC; ++i) {
        const int c = ty + 16 * i;
        if (c >= nk) continue;
        const long long rowword = ((seq0 + k0 + c) * kw + static_cast<long long>(kvh) * HD) / 2;
#pragma unroll
        for (int j = 0; j < WJ; ++j) {
            dko[rowword + tx + 16 * j] = ge_pack_bf16x2(dk[i][j][0] * scale, dk[i][j][1] * scale);
            dvo[rowword + tx + 16 * j] = ge_pack_bf16x2(dv[i][j][0], dv[i][j][1]);
        }
    }
}

// Tile sizes (the host's attention_backward.rs mirrors them): head_dim 64 with 32-row query
// tiles and 64-row key tiles, head_dim 128 with 32 and 32, each under 48 KiB of static shared
// memory.
extern "C" __global__ void ge_attention_backward_dq_d64(AttentionBackwardArgs a) {
    ge_attention_backward_dq<64, 32, 64>(a);
}
extern "C" __global__ void ge_attention_backward_dq_d128(AttentionBackwardArgs a) {
    ge_attention_backward_dq<128, 32, 32>(a);
}
extern "C" __global__ void ge_attention_backward_dkv_d64(AttentionBackwardArgs a) {
    ge_attention_backward_dkv<64, 32, 64>(a);
}
extern "C" __global__ void ge_attention_backward_dkv_d128(AttentionBackwardArgs a) {
    ge_attention_backward_dkv<128, 32, 32>(a);
}
