// `y = x w^T (+ bias)` for the few rows of a decode step (at most a few hundred), on tensor
// cores with the K dimension split over blocks: opt-in (`GENIUS_CUDA_SKINNY_GEMM=1`) beside
// cuBLASLt, whose first heuristic pick for these shapes leaves most SMs idle (Qwen2.5-0.5B's
// down projection at 256 rows is 2 x 7 output tiles of 128 x 128 for 132 SMs, each walking
// K = 4864). Deterministic: the split partial products are summed in split order by a second
// kernel, so a shape gives the same bits in every process on the same GPU model. Launch shapes
// are chosen on the Rust side (src/backend/cuda/skinny_gemm.rs, `plan_skinny_gemm`).
//
// Block: 256 threads (8 warps) for a 64 x 128 tile of y (rows x output features); warp w owns
// rows 32 (w / 4) .. + 31 and features 32 (w % 4) .. + 31: 2 x 4 m16n8k16 tiles, 32 f32
// accumulators per thread. K runs in steps of 32: the x tile (64 x 32) and the w tile
// (128 x 32) of a step are copied to shared memory by cp.async (rows of 40 bf16, so the
// ldmatrix row reads of 8 consecutive rows hit distinct banks), three steps in flight. Rows
// past `rows`, features past `out` and K past the split's end are zero-filled. Fragments:
// A (x rows) by ldmatrix.x4; B[k][n] = w[n][k] by ldmatrix.x4 on w's rows (two n-tiles per
// instruction), as K's fragments in the attention kernels.
#include "common.cuh"

#define GE_SG_THREADS 256
#define GE_SG_BM 64
#define GE_SG_BN 128
#define GE_SG_BK 32
#define GE_SG_STAGES 3
#define GE_SG_LDS (GE_SG_BK + 8)

// One K step's tiles into stage buffers `xs` (64 rows) and `ws` (128 rows): 16-byte pieces,
// 4 per row; one x piece and two w pieces per thread.
__device__ __forceinline__ void ge_sg_load(ge_bf16* xs, ge_bf16* ws, const SkinnyGemmArgs& a, int m0,
                                           int n0, int k0, int k_end) {
    const ge_bf16* x = reinterpret_cast<const ge_bf16*>(a.x);
    const ge_bf16* w = reinterpret_cast<const ge_bf16*>(a.w);
    const int tid = threadIdx.x;
    {
        const int r = tid / 4;
        const int c = (tid % 4) * 8;
        const bool valid = m0 + r < a.rows && k0 + c < k_end;
        // An invalid copy reads nothing; its address is still a valid one (the first row).
        const long long off = valid ? static_cast<long long>(m0 + r) * a.inp + k0 + c : 0;
        ge_cp_async16(xs + r * GE_SG_LDS + c, x + off, valid);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int piece = tid + i * GE_SG_THREADS;
        const int r = piece / 4;
        const int c = (piece % 4) * 8;
        const bool valid = n0 + r < a.out && k0 + c < k_end;
        const long long off = valid ? static_cast<long long>(n0 + r) * a.inp + k0 + c : 0;
        ge_cp_async16(ws + r * GE_SG_LDS + c, w + off, valid);
    }
}

// Grid: x = feature tiles of 128, y = row tiles of 64, z = K splits.
extern "C" __global__ void __launch_bounds__(GE_SG_THREADS) ge_skinny_gemm(SkinnyGemmArgs a) {
    __shared__ __align__(16) ge_bf16 xs[GE_SG_STAGES][GE_SG_BM * GE_SG_LDS];
    __shared__ __align__(16) ge_bf16 ws[GE_SG_STAGES][GE_SG_BN * GE_SG_LDS];
    const int n0 = blockIdx.x * GE_SG_BN;
    const int m0 = blockIdx.y * GE_SG_BM;
    const int k_begin = blockIdx.z * a.k_per_split;
    const int k_end = min(a.inp, k_begin + a.k_per_split);
    const int steps = k_end > k_begin ? (k_end - k_begin + GE_SG_BK - 1) / GE_SG_BK : 0;
    const int lane = threadIdx.x % GE_WARP_SIZE;
    const int warp = threadIdx.x / GE_WARP_SIZE;
    const int wm = (warp / 4) * 32;  // the warp's rows within the tile
    const int wn = (warp % 4) * 32;  // and features
    const int g = lane / 4;
    const int t = lane % 4;
    const int mat = lane / 8;

    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j][0] = acc[i][j][1] = acc[i][j][2] = acc[i][j][3] = 0.0f;

#pragma unroll
    for (int s = 0; s < GE_SG_STAGES - 1; ++s) {
        if (s < steps) ge_sg_load(xs[s], ws[s], a, m0, n0, k_begin + s * GE_SG_BK, k_end);
        ge_cp_async_commit();
    }
    for (int step = 0; step < steps; ++step) {
        ge_cp_async_wait<GE_SG_STAGES - 2>();  // this step's copies (of this thread) are done
        __syncthreads();  // everyone's are, and everyone is done with the stage refilled next
        const int next = step + GE_SG_STAGES - 1;
        if (next < steps) {
            ge_sg_load(xs[next % GE_SG_STAGES], ws[next % GE_SG_STAGES], a, m0, n0, k_begin + next * GE_SG_BK,
                       k_end);
        }
        ge_cp_async_commit();
        const ge_bf16* xt = xs[step % GE_SG_STAGES];
        const ge_bf16* wt = ws[step % GE_SG_STAGES];
#pragma unroll
        for (int kk = 0; kk < GE_SG_BK / 16; ++kk) {
            // A: matrices (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows
            // 8-15, k 8-15) of the m-tile: a0..a3.
            unsigned int af[2][4];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                ge_ldsm<4, false>(af[i], xt + (wm + i * 16 + lane % 8 + 8 * (mat & 1)) * GE_SG_LDS + kk * 16 +
                                             8 * (mat >> 1));
            }
            // B: matrices (n-tile j, k 0-7), (j, k 8-15), (j + 1, k 0-7), (j + 1, k 8-15).
#pragma unroll
            for (int j = 0; j < 4; j += 2) {
                unsigned int bf[4];
                ge_ldsm<4, false>(bf, wt + (wn + (j + (mat >> 1)) * 8 + lane % 8) * GE_SG_LDS + kk * 16 +
                                          8 * (mat & 1));
#pragma unroll
                for (int i = 0; i < 2; ++i) {
                    ge_mma_bf16_16816(acc[i][j], af[i], bf[0], bf[1]);
                    ge_mma_bf16_16816(acc[i][j + 1], af[i], bf[2], bf[3]);
                }
            }
        }
    }
    ge_cp_async_wait<0>();  // nothing may land in shared memory after the block exits

    // Thread's elements: rows wm + 16 i + g (+ 8 for e >= 2), features wn + 8 j + 2t (+ 1).
    const bool pairs = a.out % 2 == 0;  // then (row, 2t) pairs are 4- / 8-byte aligned
    const ge_bf16* bias = reinterpret_cast<const ge_bf16*>(a.bias);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + wn + 8 * j + 2 * t;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + wm + 16 * i + g + 8 * h;
                if (row >= a.rows || col >= a.out) continue;
                float v0 = acc[i][j][2 * h];
                float v1 = acc[i][j][2 * h + 1];
                const bool second = col + 1 < a.out;
                const long long at = static_cast<long long>(row) * a.out + col;
                if (a.splits == 1) {
                    if (a.bias != 0ull) {
                        v0 += ge_bf16_to_f32(bias[col]);
                        if (second) v1 += ge_bf16_to_f32(bias[col + 1]);
                    }
                    if (pairs) {
                        reinterpret_cast<unsigned int*>(a.y)[at / 2] = ge_pack_bf16x2(v0, v1);
                    } else {
                        ge_bf16* y = reinterpret_cast<ge_bf16*>(a.y);
                        y[at] = ge_f32_to_bf16(v0);
                        if (second) y[at + 1] = ge_f32_to_bf16(v1);
                    }
                } else {
                    float* p = reinterpret_cast<float*>(a.partial) +
                               static_cast<long long>(blockIdx.z) * a.rows * a.out;
                    if (pairs) {
                        float2 v;
                        v.x = v0;
                        v.y = v1;
                        reinterpret_cast<float2*>(p)[at / 2] = v;
                    } else {
                        p[at] = v0;
                        if (second) p[at + 1] = v1;
                    }
                }
            }
        }
    }
}

// ---- The split products summed in split order, plus the bias, to bf16: grid-stride over
// rows * out. ----
extern "C" __global__ void ge_skinny_gemm_reduce(SkinnyGemmArgs a) {
    const long long n = static_cast<long long>(a.rows) * a.out;
    const float* p = reinterpret_cast<const float*>(a.partial);
    const ge_bf16* bias = reinterpret_cast<const ge_bf16*>(a.bias);
    ge_bf16* y = reinterpret_cast<ge_bf16*>(a.y);
    for (long long i = ge_global_index(); i < n; i += ge_grid_threads()) {
        float v = p[i];
        for (int z = 1; z < a.splits; ++z) v += p[static_cast<long long>(z) * n + i];
        if (a.bias != 0ull) v += ge_bf16_to_f32(bias[i % a.out]);
        y[i] = ge_f32_to_bf16(v);
    }
}
