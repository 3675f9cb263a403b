// The reductions around the training GEMMs (src/backend/cuda/train_gemm.rs; the GEMMs
// themselves are cuBLASLt's):
// - ge_bias_grad_bf16: bias gradients, the column sums of each group of rows of a bf16
//   [rows, cols] gradient (16-byte loads), which ge_column_partials_reduce (backward.cu) adds
//   to the f32 [cols] accumulator in a fixed order;
// - ge_sum_squares_{f32,bf16}: per-block f64 partial sums of squares (gradient norms); the host
//   adds the partials in order, so the result is deterministic;
// - ge_target_logprobs_bf16[_v8]: the fused LM head + log-softmax + gather's forward on a chunk
//   of bf16 logits: one online (max, sum) pass over each row;
// - ge_target_logprobs_backward_bf16[_v8]: its gradient, in place on a chunk of bf16 logits:
//   g * (onehot(target) - p), in one pass when the forward handed over each row's log-sum-exp,
//   else after the same online pass for the statistics.
#include "common.cuh"

// ---- bias gradient, step 1: the column sums of dy over row groups
// (ge_row_group_column_sums; ge_column_partials_reduce in backward.cu adds the groups) ----
extern "C" __global__ void ge_bias_grad_bf16(BiasGradArgs a) {
    ge_row_group_column_sums<false>(reinterpret_cast<const ge_bf16*>(a.dy), nullptr, nullptr,
                                    reinterpret_cast<float*>(a.partial), a.rows, a.cols, a.row_group);
}

// ---- sum of squares ----

// Sum of an f64 over the block (every thread calls; result to every thread); the block size a
// multiple of 32; `scratch` is 32 doubles of shared memory.
__device__ __forceinline__ double ge_train_block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x % GE_WARP_SIZE;
    const int warp = threadIdx.x / GE_WARP_SIZE;
    const int warps = blockDim.x / GE_WARP_SIZE;
#pragma unroll
    for (int o = GE_WARP_SIZE / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps ? scratch[lane] : 0.0;
#pragma unroll
    for (int o = GE_WARP_SIZE / 2; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
__device__ __forceinline__ void ge_sum_squares_impl(const SumSquaresArgs& a) {
    __shared__ double s_red[GE_WARP_SIZE];
    const T* x = reinterpret_cast<const T*>(a.x);
    double acc = 0.0;
    // Eight elements per step while aligned, then the tail one at a time.
    const long long n8 = ge_aligned16(a.x) ? a.n / 8 : 0;
    for (long long v = ge_global_index(); v < n8; v += ge_grid_threads()) {
        float f[8];
        ge_load8(x + 8 * v, f);
#pragma unroll
        for (int k = 0; k < 8; ++k) acc += static_cast<double>(f[k]) * static_cast<double>(f[k]);
    }
    for (long long i = 8 * n8 + ge_global_index(); i < a.n; i += ge_grid_threads()) {
        const double v = static_cast<double>(ge_to_f32(x[i]));
        acc += v * v;
    }
    acc = ge_train_block_sum_f64(acc, s_red);
    if (threadIdx.x == 0) reinterpret_cast<double*>(a.partials)[blockIdx.x] = acc;
}

extern "C" __global__ void ge_sum_squares_f32(SumSquaresArgs a) { ge_sum_squares_impl<float>(a); }

extern "C" __global__ void ge_sum_squares_bf16(SumSquaresArgs a) {
    ge_sum_squares_impl<ge_bf16>(a);
}

// ---- log-prob backward ----

#define GE_NEG_INF __int_as_float(0xff800000)
#define GE_POS_INF __int_as_float(0x7f800000)

// Online softmax statistics: adds logit `x` to the running (max m, sum s of exp(l - m)).
__device__ __forceinline__ void ge_online_add(float& m, float& s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.0f;  // m = -inf: s is 0 and expf(-inf) is 0
        m = x;
    } else if (x != GE_NEG_INF) {
        s += expf(x - m);
    }
}

// Merges the statistics (om, os) into (m, s).
__device__ __forceinline__ void ge_online_merge(float& m, float& s, float om, float os) {
    const float M = fmaxf(m, om);
    if (M == GE_NEG_INF) return;
    const float a = m == GE_NEG_INF ? 0.0f : s * expf(m - M);
    const float b = om == GE_NEG_INF ? 0.0f : os * expf(om - M);
    s = a + b;
    m = M;
}

// Notes a logit that makes the row unusable (NaN or +inf).
__device__ __forceinline__ bool ge_bad_logit(float x) { return x != x || x == GE_POS_INF; }

// Low and high bf16 of a 32-bit word (element 2i and 2i + 1: little-endian), as f32.
__device__ __forceinline__ float ge_lo_bf16(unsigned int w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float ge_hi_bf16(unsigned int w) {
    return __uint_as_float(w & 0xffff0000u);
}

// Online softmax statistics of one bf16 row, for the whole block (block size a multiple of
// 32, at most 1024): the running max m and sum s of exp(l - m) in f32, and whether any logit
// is NaN or +inf. Every thread returns the same three values. VEC: the row is read 8 bf16
// (16 bytes) at a time, which needs vocab % 8 == 0 and a 16-byte aligned row.
template <bool VEC>
__device__ __forceinline__ void ge_row_softmax_stats(const ge_bf16* l, int vocab, float& m_out,
                                                     float& s_out, bool& bad_out) {
    __shared__ float s_m[GE_WARP_SIZE];
    __shared__ float s_s[GE_WARP_SIZE];
    __shared__ int s_bad;
    const int tid = threadIdx.x;
    const int lane = tid % GE_WARP_SIZE;
    const int warp = tid / GE_WARP_SIZE;
    const int warps = blockDim.x / GE_WARP_SIZE;
    if (tid == 0) s_bad = 0;
    __syncthreads();
    float m = GE_NEG_INF;
    float s = 0.0f;
    bool bad = false;
    if (VEC) {
        const uint4* lv = reinterpret_cast<const uint4*>(l);
        const int n8 = vocab / 8;
        for (int j = tid; j < n8; j += blockDim.x) {
            const uint4 u = lv[j];
            const unsigned int w[4] = {u.x, u.y, u.z, u.w};
            float x[8];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                x[2 * k] = ge_lo_bf16(w[k]);
                x[2 * k + 1] = ge_hi_bf16(w[k]);
            }
            // One rescale per 8 logits: the max of the 8 first (fmaxf skips NaN, which
            // marks the row bad anyway), then the 8 exponentials against it.
            float mx = x[0];
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                bad |= ge_bad_logit(x[k]);
                mx = fmaxf(mx, x[k]);
            }
            if (mx > m) {
                s *= expf(m - mx);  // m = -inf: s is 0 and expf(-inf) is 0
                m = mx;
            }
            if (m != GE_NEG_INF) {
#pragma unroll
                for (int k = 0; k < 8; ++k) s += expf(x[k] - m);
            }
        }
    } else {
        for (int i = tid; i < vocab; i += blockDim.x) {
            const float x = ge_bf16_to_f32(l[i]);
            bad |= ge_bad_logit(x);
            ge_online_add(m, s, x);
        }
    }
    if (bad) atomicOr(&s_bad, 1);
#pragma unroll
    for (int o = GE_WARP_SIZE / 2; o > 0; o /= 2) {
        const float om = __shfl_xor_sync(0xffffffffu, m, o);
        const float os = __shfl_xor_sync(0xffffffffu, s, o);
        ge_online_merge(m, s, om, os);
    }
    if (lane == 0) {
        s_m[warp] = m;
        s_s[warp] = s;
    }
    __syncthreads();
    m = lane < warps ? s_m[lane] : GE_NEG_INF;
    s = lane < warps ? s_s[lane] : 0.0f;
#pragma unroll
    for (int o = GE_WARP_SIZE / 2; o > 0; o /= 2) {
        const float om = __shfl_xor_sync(0xffffffffu, m, o);
        const float os = __shfl_xor_sync(0xffffffffu, s, o);
        ge_online_merge(m, s, om, os);
    }
    m_out = m;
    s_out = s;
    bad_out = s_bad != 0;
}

// ---- log-prob forward: log_softmax(logits[row])[targets[row]], one block per row, one
// pass over the row (the statistics above), then log p = l[target] - (max + log(sum)).
// Status: 0 ok, 1 a NaN / +inf logit, 2 every logit -inf, 4 target outside the vocabulary
// (out is then 0). ----
template <bool VEC>
__device__ __forceinline__ void ge_target_logprobs_impl(const TargetLogprobArgs& a) {
    const int row = blockIdx.x;
    const int vocab = a.vocab;
    const ge_bf16* l = reinterpret_cast<const ge_bf16*>(a.logits) + static_cast<long long>(row) * vocab;
    const unsigned int target = reinterpret_cast<const unsigned int*>(a.targets)[row];
    float m, s;
    bool bad;
    ge_row_softmax_stats<VEC>(l, vocab, m, s, bad);
    if (threadIdx.x != 0) return;
    float* out = reinterpret_cast<float*>(a.out);
    int* status = reinterpret_cast<int*>(a.status);
    float* lse = reinterpret_cast<float*>(a.lse);
    if (bad || m == GE_NEG_INF || target >= static_cast<unsigned int>(vocab)) {
        out[row] = 0.0f;
        status[row] = bad ? 1 : (m == GE_NEG_INF ? 2 : 4);
        if (lse != nullptr) lse[row] = __int_as_float(0x7fc00000);
        return;
    }
    const float row_lse = m + logf(s);
    out[row] = ge_bf16_to_f32(l[target]) - row_lse;
    status[row] = 0;
    if (lse != nullptr) lse[row] = row_lse;
}

// bf16 logits [rows, vocab], any vocab.
extern "C" __global__ void ge_target_logprobs_bf16(TargetLogprobArgs a) {
    ge_target_logprobs_impl<false>(a);
}

// bf16 logits [rows, vocab] with vocab % 8 == 0 (16-byte loads).
extern "C" __global__ void ge_target_logprobs_bf16_v8(TargetLogprobArgs a) {
    ge_target_logprobs_impl<true>(a);
}

// ---- log-prob backward, in place: one block per row. Without the forward's log-sum-exp:
// the statistics above, then one pass that reads the logits again and writes
// g * (onehot(target) - exp(l - max) / sum). With it: only that pass, as
// g * (onehot(target) - exp(l - lse)), noting NaN / +inf logits on the way (the row is then
// written with garbage, and its status says so). VEC as above. ----
template <bool VEC>
__device__ __forceinline__ void ge_target_logprobs_backward_impl(const LogprobBackwardArgs& a) {
    __shared__ int s_bad;
    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const int vocab = a.vocab;
    ge_bf16* l = reinterpret_cast<ge_bf16*>(a.logits) + static_cast<long long>(row) * vocab;
    const unsigned int target = reinterpret_cast<const unsigned int*>(a.targets)[row];
    const float g = reinterpret_cast<const float*>(a.d_logprob)[row];
    int* status = reinterpret_cast<int*>(a.status);
    const float* lse = reinterpret_cast<const float*>(a.lse);

    // 1. The statistics: p = exp(l - m) * (1 / s), or exp(l - lse) with the forward's.
    if (tid == 0) s_bad = 0;
    float m, coef;
    if (lse != nullptr) {
        // Every exit here is the whole block's (one row per block).
        m = lse[row];
        if (target >= static_cast<unsigned int>(vocab) || !(fabsf(m) < GE_POS_INF)) {
            if (tid == 0) status[row] = target >= static_cast<unsigned int>(vocab) ? 4 : 3;
            return;
        }
        coef = -g;
        __syncthreads();  // s_bad's reset, before any thread can set it
    } else {
        // Online max and sum of exp(l - max), f32, NaN / +inf noted (its barriers also order
        // s_bad's reset).
        float s;
        bool bad;
        ge_row_softmax_stats<VEC>(l, vocab, m, s, bad);
        if (bad || m == GE_NEG_INF || target >= static_cast<unsigned int>(vocab)) {
            if (tid == 0) status[row] = bad ? 1 : (m == GE_NEG_INF ? 2 : 4);
            return;
        }
        coef = -g / s;
    }

    // 2. dl = g * onehot(target) + coef * exp(l - m), rounded to bf16 once; NaN / +inf logits
    // noted (only the one-pass form can meet one here).
    bool bad = false;
    const int t = static_cast<int>(target);
    if (VEC) {
        uint4* lv = reinterpret_cast<uint4*>(l);
        const int n8 = vocab / 8;
        for (int j = tid; j < n8; j += blockDim.x) {
            const uint4 u = lv[j];
            const unsigned int w[4] = {u.x, u.y, u.z, u.w};
            unsigned int o[4];
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int i0 = j * 8 + 2 * k;
                const float x0 = ge_lo_bf16(w[k]);
                const float x1 = ge_hi_bf16(w[k]);
                bad |= ge_bad_logit(x0) | ge_bad_logit(x1);
                float v0 = coef * expf(x0 - m);
                float v1 = coef * expf(x1 - m);
                if (i0 == t) v0 += g;
                if (i0 + 1 == t) v1 += g;
                o[k] = ge_pack_bf16x2(v0, v1);
            }
            uint4 r;
            r.x = o[0];
            r.y = o[1];
            r.z = o[2];
            r.w = o[3];
            lv[j] = r;
        }
    } else {
        for (int i = tid; i < vocab; i += blockDim.x) {
            const float x = ge_bf16_to_f32(l[i]);
            bad |= ge_bad_logit(x);
            float v = coef * expf(x - m);
            if (i == t) v += g;
            l[i] = ge_f32_to_bf16(v);
        }
    }
    if (bad) atomicOr(&s_bad, 1);
    __syncthreads();
    if (tid == 0) status[row] = s_bad != 0 ? 1 : 0;
}

// bf16 logits [rows, vocab], any vocab.
extern "C" __global__ void ge_target_logprobs_backward_bf16(LogprobBackwardArgs a) {
    ge_target_logprobs_backward_impl<false>(a);
}

// bf16 logits [rows, vocab] with vocab % 8 == 0 (16-byte loads and stores).
extern "C" __global__ void ge_target_logprobs_backward_bf16_v8(LogprobBackwardArgs a) {
    ge_target_logprobs_backward_impl<true>(a);
}
