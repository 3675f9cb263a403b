// Forward causal attention over packed variable-length sequences on tensor cores
// (FlashAttention-2 style): bf16 q/k/v `[tokens, heads * head_dim]`, f32 online softmax, bf16
// output, and optionally the per-row log-sum-exp of the scaled scores.
//
// One block of 128 threads (4 warps) per (query tile of 64 positions, query head). Warp w owns
// query rows 16 w .. 16 w + 15 of the tile; its Q fragments stay in registers for the whole
// block. The block walks the key tiles (64 positions) at or before its query tile; only the
// diagonal tile is masked (every earlier key tile is fully visible to every row of the tile).
// For each key tile, K and V are copied to shared memory (row stride head_dim + 8 bf16, i.e.
// head_dim / 2 + 4 words: 4 mod 32, so the fragment reads of 8 rows x 4 words or 4 rows x 4
// words hit distinct banks), then per warp:
//   S (16 x 64)  = Q (16 x hd) K^T        : 8 n-tiles x hd/16 k-steps of mma m16n8k16,
//   online softmax on S in registers (each row's 64 values live in the 4 lanes of a quad),
//   O (16 x hd) += P (16 x 64, bf16) V    : hd/8 n-tiles x 4 k-steps; P's A fragments are the
//                                           S accumulators of n-tiles 2kk, 2kk+1 repacked.
//
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 fragment ownership (PTX ISA), with
// g = lane / 4 and t = lane % 4:
//   A (16 x 16): reg0 = A[g][2t, 2t+1], reg1 = A[g+8][2t, 2t+1], reg2 = A[g][2t+8, 2t+9],
//                reg3 = A[g+8][2t+8, 2t+9]   (lower column in the low 16 bits);
//   B (16 x 8):  reg0 = B[2t, 2t+1][g], reg1 = B[2t+8, 2t+9][g];
//   C (16 x 8):  c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].
// For S = Q K^T, B[k][n] = K[n][k]: the pair B[2t, 2t+1][g] is one 32-bit word of K's row g.
// For O = P V, B[k][n] = V[k][n]: two bf16 of different V rows, packed by hand.
#include "common.cuh"

#define GE_AT_THREADS 128
#define GE_AT_BQ 64
#define GE_AT_BK 64
#define GE_AT_NEG_INF __int_as_float(0xff800000)

// Rows `row0 .. row0 + 64` (columns `col0 .. col0 + HD`) of a bf16 matrix with `ld` elements
// per row into a shared tile with row stride HD + 8; rows at or past `nvalid` are zero.
template <int HD>
__device__ __forceinline__ void ge_at_load_tile(ge_bf16* dst, const ge_bf16* src, long long ld,
                                                long long row0, int nvalid) {
    constexpr int VECS = HD / 8;
    constexpr int LDS = HD + 8;
#pragma unroll 4
    for (int i = threadIdx.x; i < GE_AT_BK * VECS; i += GE_AT_THREADS) {
        const int r = i / VECS;
        const int c = i % VECS;
        uint4 v;
        v.x = v.y = v.z = v.w = 0u;
        if (r < nvalid) v = *reinterpret_cast<const uint4*>(src + (row0 + r) * ld + c * 8);
        *reinterpret_cast<uint4*>(dst + r * LDS + c * 8) = v;
    }
}

template <int HD>
__device__ __forceinline__ void ge_attention_tc_fwd(const AttentionTcArgs& a) {
    constexpr int LDS = HD + 8;  // bf16 per shared row
    constexpr int KSTEPS = HD / 16;
    constexpr int ONT = HD / 8;  // n-tiles of O
    constexpr int SNT = GE_AT_BK / 8;  // n-tiles of S
    __shared__ __align__(16) ge_bf16 ks[GE_AT_BK * LDS];
    __shared__ __align__(16) ge_bf16 vs[GE_AT_BK * LDS];

    const unsigned int* tile = reinterpret_cast<const unsigned int*>(a.tiles) + 3 * blockIdx.x;
    const long long seq_start = tile[0];
    const int seq_len = static_cast<int>(tile[1]);
    const int q0 = static_cast<int>(tile[2]);
    const int h = blockIdx.y;
    const int kvh = h / (a.num_heads / a.num_kv_heads);
    const long long qld = static_cast<long long>(a.num_heads) * HD;
    const long long kld = static_cast<long long>(a.num_kv_heads) * HD;
    const ge_bf16* qp = reinterpret_cast<const ge_bf16*>(a.q) + h * HD;
    const ge_bf16* kp = reinterpret_cast<const ge_bf16*>(a.k) + kvh * HD;
    const ge_bf16* vp = reinterpret_cast<const ge_bf16*>(a.v) + kvh * HD;

    const int warp = threadIdx.x / GE_WARP_SIZE;
    const int lane = threadIdx.x % GE_WARP_SIZE;
    const int g = lane / 4;
    const int t = lane % 4;
    // Positions (within the sequence) of this thread's two rows.
    const int r0 = q0 + warp * 16 + g;
    const int r1 = r0 + 8;

    // Q fragments, straight from global memory (32-bit words; rows past the end are zero).
    unsigned int qf[KSTEPS][4];
    {
        const unsigned int* q0w = r0 < seq_len
            ? reinterpret_cast<const unsigned int*>(qp + (seq_start + r0) * qld) : nullptr;
        const unsigned int* q1w = r1 < seq_len
            ? reinterpret_cast<const unsigned int*>(qp + (seq_start + r1) * qld) : nullptr;
#pragma unroll
        for (int kk = 0; kk < KSTEPS; ++kk) {
            const int w = kk * 8 + t;  // word of columns 16 kk + 2t, +1
            qf[kk][0] = q0w ? q0w[w] : 0u;
            qf[kk][1] = q1w ? q1w[w] : 0u;
            qf[kk][2] = q0w ? q0w[w + 4] : 0u;
            qf[kk][3] = q1w ? q1w[w + 4] : 0u;
        }
    }

    float o[ONT][4];
#pragma unroll
    for (int j = 0; j < ONT; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.0f;
    float m0 = GE_AT_NEG_INF, m1 = GE_AT_NEG_INF;  // running max of scaled log2 scores
    float l0 = 0.0f, l1 = 0.0f;  // running sums (this thread's columns only)
    const float sl2 = a.scale * 1.4426950408889634f;

    const int last_kt = q0 / GE_AT_BK;
    for (int kt = 0; kt <= last_kt; ++kt) {
        const int k0 = kt * GE_AT_BK;
        const int nvalid = min(GE_AT_BK, seq_len - k0);
        __syncthreads();  // the previous tile's readers are done
        ge_at_load_tile<HD>(ks, kp, kld, seq_start + k0, nvalid);
        ge_at_load_tile<HD>(vs, vp, kld, seq_start + k0, nvalid);
        __syncthreads();

        // S = Q K^T.
        float s[SNT][4];
#pragma unroll
        for (int j = 0; j < SNT; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
        const unsigned int* kw = reinterpret_cast<const unsigned int*>(ks);
#pragma unroll
        for (int j = 0; j < SNT; ++j) {
            const unsigned int* krow = kw + (j * 8 + g) * (LDS / 2);
#pragma unroll
            for (int kk = 0; kk < KSTEPS; ++kk) {
                ge_mma_bf16_16816(s[j], qf[kk], krow[kk * 8 + t], krow[kk * 8 + t + 4]);
            }
        }

        // Scale to log2 units and mask (diagonal tile only: key position > query position,
        // or past the sequence's end).
        const bool diag = kt == last_kt;
#pragma unroll
        for (int j = 0; j < SNT; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[j][e] * sl2;
                if (diag) {
                    const int kpos = k0 + j * 8 + 2 * t + (e & 1);
                    const int qpos = e < 2 ? r0 : r1;
                    if (kpos > qpos || kpos >= seq_len) x = GE_AT_NEG_INF;
                }
                s[j][e] = x;
            }
        }

        // Online softmax: row maxima over the quad (lanes 4g .. 4g + 3).
        float mx0 = m0, mx1 = m1;
#pragma unroll
        for (int j = 0; j < SNT; ++j) {
            mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
            mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        // Every processed tile has a visible key for every row (its first key), so the max is
        // finite; guard anyway so a fully masked row gives zeros, not NaN.
        const float b0 = mx0 == GE_AT_NEG_INF ? 0.0f : mx0;
        const float b1 = mx1 == GE_AT_NEG_INF ? 0.0f : mx1;
        const float c0 = exp2f(m0 - b0);
        const float c1 = exp2f(m1 - b1);
        m0 = mx0;
        m1 = mx1;
        l0 *= c0;
        l1 *= c1;
#pragma unroll
        for (int j = 0; j < ONT; ++j) {
            o[j][0] *= c0;
            o[j][1] *= c0;
            o[j][2] *= c1;
            o[j][3] *= c1;
        }
#pragma unroll
        for (int j = 0; j < SNT; ++j) {
            s[j][0] = exp2f(s[j][0] - b0);
            s[j][1] = exp2f(s[j][1] - b0);
            s[j][2] = exp2f(s[j][2] - b1);
            s[j][3] = exp2f(s[j][3] - b1);
            l0 += s[j][0] + s[j][1];
            l1 += s[j][2] + s[j][3];
        }

        // O += P V.
        const unsigned short* vh = reinterpret_cast<const unsigned short*>(vs);
#pragma unroll
        for (int kk = 0; kk < GE_AT_BK / 16; ++kk) {
            unsigned int pf[4];
            pf[0] = ge_pack_bf16x2(s[2 * kk][0], s[2 * kk][1]);
            pf[1] = ge_pack_bf16x2(s[2 * kk][2], s[2 * kk][3]);
            pf[2] = ge_pack_bf16x2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            pf[3] = ge_pack_bf16x2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
            // B[k][n] = V[16 kk + k][8 j + n]: transposed ldmatrix of key rows 16 kk .. + 7
            // and + 8 .. + 15, for the column slices 8 j and 8 (j + 1) at once.
            const int mat = lane / 8;
            const unsigned short* vrow = vh + (kk * 16 + lane % 8 + 8 * (mat & 1)) * LDS + 8 * (mat >> 1);
#pragma unroll
            for (int j = 0; j < ONT; j += 2) {
                unsigned int b[4];
                ge_ldsm<4, true>(b, vrow + 8 * j);
                ge_mma_bf16_16816(o[j], pf, b[0], b[1]);
                ge_mma_bf16_16816(o[j + 1], pf, b[2], b[3]);
            }
        }
    }

    // Row sums over the quad, normalise, write.
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
    const float inv0 = l0 > 0.0f ? 1.0f / l0 : 0.0f;
    const float inv1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
    ge_bf16* op = reinterpret_cast<ge_bf16*>(a.out) + h * HD;
    if (r0 < seq_len) {
        unsigned int* w = reinterpret_cast<unsigned int*>(op + (seq_start + r0) * qld);
#pragma unroll
        for (int j = 0; j < ONT; ++j) w[j * 4 + t] = ge_pack_bf16x2(o[j][0] * inv0, o[j][1] * inv0);
    }
    if (r1 < seq_len) {
        unsigned int* w = reinterpret_cast<unsigned int*>(op + (seq_start + r1) * qld);
#pragma unroll
        for (int j = 0; j < ONT; ++j) w[j * 4 + t] = ge_pack_bf16x2(o[j][2] * inv1, o[j][3] * inv1);
    }
    if (a.lse != 0ull && t == 0) {
        // Natural log-sum-exp of the scaled scores: (m + log2 l) * ln 2.
        float* lse = reinterpret_cast<float*>(a.lse);
        const float ln2 = 0.6931471805599453f;
        if (r0 < seq_len) lse[(seq_start + r0) * a.num_heads + h] = (m0 + __log2f(l0)) * ln2;
        if (r1 < seq_len) lse[(seq_start + r1) * a.num_heads + h] = (m1 + __log2f(l1)) * ln2;
    }
}

extern "C" __global__ void __launch_bounds__(GE_AT_THREADS)
    ge_attention_tc_fwd_d64(const AttentionTcArgs a) {
    ge_attention_tc_fwd<64>(a);
}

extern "C" __global__ void __launch_bounds__(GE_AT_THREADS)
    ge_attention_tc_fwd_d128(const AttentionTcArgs a) {
    ge_attention_tc_fwd<128>(a);
}
