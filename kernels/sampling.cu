// Token sampling on the GPU: greedy and unfiltered sampling (temperature > 0, no top-k, no
// top-p), exactly the definition of src/engine/sampler.rs. One block of GE_SAMPLE_THREADS
// threads per logits row (f32 or bf16 [rows, vocab]); top-k / top-p rows are refused (status 3), the
// host routes them elsewhere.
//
// Passes over a row (logits are re-read, nothing of vocab size is kept in shared memory):
// 1. max and argmax (lowest index on ties), rejecting NaN / +inf;
// 2. f64 sums: untempered sum exp(l - m) (the log-partition) and tempered Z = sum w_i,
//    w_i = exp((l_i - m) / T);
// 3. thread t owns the contiguous chunk [t * C, min((t + 1) * C, V)), C = ceil(V / threads),
//    and sums p_i = (float)(w_i / Z) over p_i > 0 in f64 in token order (and notes its last
//    i with p_i > 0); thread 0 forms the exclusive prefix of the chunk sums sequentially and
//    their total;
// 4. the one chunk with prefix <= u * total < next prefix is walked: the token is its first i
//    with prefix + (chunk-local running sum) > u * total; if no chunk holds the threshold
//    (u * total rounded up to the total), the last i with p_i > 0.
// The summation orders are fixed, so the result is deterministic; src/backend/cuda/sampling.rs
// has the same algorithm on the host (tested against the CPU sampler).
#include "common.cuh"

#define GE_SAMPLE_THREADS 1024
#define GE_INT_MAX 0x7fffffff

// Philox4x32-10, as src/engine/sampler.rs (a test compares these constants with the Rust ones).
#define GE_PHILOX_M0 0xD2511F53u
#define GE_PHILOX_M1 0xCD9E8D57u
#define GE_PHILOX_W0 0x9E3779B9u
#define GE_PHILOX_W1 0xBB67AE85u
#define GE_PHILOX_ROUNDS 10

// Counter (c0..c3) encrypted under key (k0, k1); the result replaces the counter.
__device__ __forceinline__ void ge_philox4x32_10(unsigned int c[4], unsigned int k0,
                                                 unsigned int k1) {
#pragma unroll
    for (int round = 0; round < GE_PHILOX_ROUNDS; ++round) {
        if (round > 0) {
            k0 += GE_PHILOX_W0;
            k1 += GE_PHILOX_W1;
        }
        const unsigned long long p0 =
            static_cast<unsigned long long>(GE_PHILOX_M0) * static_cast<unsigned long long>(c[0]);
        const unsigned long long p1 =
            static_cast<unsigned long long>(GE_PHILOX_M1) * static_cast<unsigned long long>(c[2]);
        const unsigned int n0 = static_cast<unsigned int>(p1 >> 32) ^ c[1] ^ k0;
        const unsigned int n1 = static_cast<unsigned int>(p1);
        const unsigned int n2 = static_cast<unsigned int>(p0 >> 32) ^ c[3] ^ k1;
        const unsigned int n3 = static_cast<unsigned int>(p0);
        c[0] = n0;
        c[1] = n1;
        c[2] = n2;
        c[3] = n3;
    }
}

// The 53-bit uniform in [0, 1) for (seed, seq_id, position): key (seed lo, seed hi), counter
// (position, seq_id lo, seq_id hi, 0), top 53 bits of x0 << 32 | x1, times 2^-53.
__device__ __forceinline__ double ge_philox_uniform(unsigned long long seed,
                                                    unsigned long long seq_id,
                                                    unsigned int position) {
    unsigned int c[4] = {position, static_cast<unsigned int>(seq_id),
                         static_cast<unsigned int>(seq_id >> 32), 0u};
    ge_philox4x32_10(c, static_cast<unsigned int>(seed), static_cast<unsigned int>(seed >> 32));
    const unsigned long long bits =
        ((static_cast<unsigned long long>(c[0]) << 32) | static_cast<unsigned long long>(c[1])) >> 11;
    return static_cast<double>(bits) * (1.0 / 9007199254740992.0);
}

// Sum of an f64 over the block (every thread calls; result to every thread); `scratch` is 32
// doubles of shared memory.
__device__ __forceinline__ double ge_block_sum_f64(double v, double* scratch) {
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

// Keeps the larger value, the lower index on ties.
__device__ __forceinline__ void ge_argmax_merge(float& v, int& i, float ov, int oi) {
    if (ov > v || (ov == v && oi < i)) {
        v = ov;
        i = oi;
    }
}

// The tempered probability of a logit, rounded to f32 as the definition says.
__device__ __forceinline__ float ge_sample_prob(float l, double m, double t, double z) {
    return static_cast<float>(exp((static_cast<double>(l) - m) / t) / z);
}

// The kernel body for logits of element type T (f32 or bf16; read as f32).
template <typename T>
__device__ __forceinline__ void ge_sample_rows_impl(const SampleArgs& a) {
    __shared__ float s_max[GE_WARP_SIZE];
    __shared__ int s_idx[GE_WARP_SIZE];
    __shared__ double s_red[GE_WARP_SIZE];
    __shared__ double s_prefix[GE_SAMPLE_THREADS];
    __shared__ double s_total;
    __shared__ int s_bad;
    __shared__ int s_first;
    __shared__ int s_last;

    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const int lane = tid % GE_WARP_SIZE;
    const int warp = tid / GE_WARP_SIZE;
    const int warps = blockDim.x / GE_WARP_SIZE;
    const int vocab = a.vocab;
    const T* l = reinterpret_cast<const T*>(a.logits) + static_cast<long long>(row) * vocab;
    const SampleRowArgs p = reinterpret_cast<const SampleRowArgs*>(a.params)[row];
    unsigned int* tokens = reinterpret_cast<unsigned int*>(a.tokens);
    float* logprobs = reinterpret_cast<float*>(a.logprobs);
    float* sampling_logprobs = reinterpret_cast<float*>(a.sampling_logprobs);
    int* status = reinterpret_cast<int*>(a.status);

    const bool greedy = p.temperature == 0.0f;
    if (!greedy && (p.top_k > 0 || p.top_p < 1.0f)) {
        if (tid == 0) {
            tokens[row] = 0;
            logprobs[row] = 0.0f;
            sampling_logprobs[row] = 0.0f;
            status[row] = 3;
        }
        return;
    }
    if (tid == 0) {
        s_bad = 0;
        s_first = GE_INT_MAX;
        s_last = -1;
    }
    __syncthreads();

    // 1. max / argmax, NaN and +inf rejected.
    const float inf = __int_as_float(0x7f800000);
    float v = -inf;
    int vi = GE_INT_MAX;
    bool bad = false;
    for (int i = tid; i < vocab; i += blockDim.x) {
        const float x = ge_to_f32(l[i]);
        if (x != x || x == inf) {
            bad = true;
        } else if (x > v) {
            v = x;
            vi = i;
        }
    }
    if (bad) atomicOr(&s_bad, 1);
#pragma unroll
    for (int o = GE_WARP_SIZE / 2; o > 0; o /= 2) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, vi, o);
        ge_argmax_merge(v, vi, ov, oi);
    }
    if (lane == 0) {
        s_max[warp] = v;
        s_idx[warp] = vi;
    }
    __syncthreads();
    if (warp == 0) {
        v = lane < warps ? s_max[lane] : -inf;
        vi = lane < warps ? s_idx[lane] : GE_INT_MAX;
#pragma unroll
        for (int o = GE_WARP_SIZE / 2; o > 0; o /= 2) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, o);
            const int oi = __shfl_xor_sync(0xffffffffu, vi, o);
            ge_argmax_merge(v, vi, ov, oi);
        }
    }
    __syncthreads();  // every warp has read s_max / s_idx
    if (tid == 0) {
        s_max[0] = v;
        s_idx[0] = vi;
    }
    __syncthreads();
    const float maxf = s_max[0];
    const int argmax = s_idx[0];
    if (s_bad != 0 || maxf == -inf) {
        if (tid == 0) {
            tokens[row] = 0;
            logprobs[row] = 0.0f;
            sampling_logprobs[row] = 0.0f;
            status[row] = s_bad != 0 ? 1 : 2;
        }
        return;
    }

    // 2. untempered log-partition and tempered normaliser, in f64.
    const double m = static_cast<double>(maxf);
    const double t = static_cast<double>(p.temperature);
    double se = 0.0;
    double sz = 0.0;
    for (int i = tid; i < vocab; i += blockDim.x) {
        const double d = static_cast<double>(ge_to_f32(l[i])) - m;
        const double e = exp(d);
        se += e;
        if (!greedy) sz += t == 1.0 ? e : exp(d / t);  // d / 1 == d: the same value
    }
    se = ge_block_sum_f64(se, s_red);
    const double lse = m + log(se);
    if (greedy) {
        if (tid == 0) {
            tokens[row] = static_cast<unsigned int>(argmax);
            logprobs[row] = static_cast<float>(static_cast<double>(ge_to_f32(l[argmax])) - lse);
            sampling_logprobs[row] = 0.0f;
            status[row] = 0;
        }
        return;
    }
    const double z = ge_block_sum_f64(sz, s_red);

    // 3. chunk sums of the f32 probabilities, then their exclusive prefix (sequential).
    const int chunk = (vocab + GE_SAMPLE_THREADS - 1) / GE_SAMPLE_THREADS;
    const int begin = min(tid * chunk, vocab);
    const int end = min(begin + chunk, vocab);
    double cs = 0.0;
    int last = -1;
    for (int i = begin; i < end; ++i) {
        const float pi = ge_sample_prob(ge_to_f32(l[i]), m, t, z);
        if (pi > 0.0f) {
            cs += static_cast<double>(pi);
            last = i;
        }
    }
    if (last >= 0) atomicMax(&s_last, last);
    s_prefix[tid] = cs;
    __syncthreads();
    if (tid == 0) {
        double run = 0.0;
        for (int k = 0; k < GE_SAMPLE_THREADS; ++k) {
            const double c = s_prefix[k];
            s_prefix[k] = run;
            run += c;
        }
        s_total = run;
    }
    __syncthreads();

    // 4. the inverse-CDF walk: only the chunk whose range [prefix, next prefix) holds the
    // threshold can hold the first crossing (the walk adds a chunk-local sum to the prefix,
    // so it ends exactly at the next prefix, and rounding is monotone).
    const double total = s_total;
    const double threshold = ge_philox_uniform(p.seed, p.seq_id, p.position) * total;
    const double start = s_prefix[tid];
    const double next = tid + 1 < GE_SAMPLE_THREADS ? s_prefix[tid + 1] : total;
    if (start <= threshold && threshold < next) {
        double local = 0.0;
        for (int i = begin; i < end; ++i) {
            const float pi = ge_sample_prob(ge_to_f32(l[i]), m, t, z);
            if (pi > 0.0f) {
                local += static_cast<double>(pi);
                if (start + local > threshold) {
                    s_first = i;
                    break;
                }
            }
        }
    }
    __syncthreads();
    if (tid == 0) {
        const int chosen = s_first != GE_INT_MAX ? s_first : s_last;
        const float pt = ge_sample_prob(ge_to_f32(l[chosen]), m, t, z);
        tokens[row] = static_cast<unsigned int>(chosen);
        logprobs[row] = static_cast<float>(static_cast<double>(ge_to_f32(l[chosen])) - lse);
        sampling_logprobs[row] = static_cast<float>(log(static_cast<double>(pt) / total));
        status[row] = 0;
    }
}

// f32 logits [rows, vocab].
extern "C" __global__ void ge_sample_rows(SampleArgs a) { ge_sample_rows_impl<float>(a); }

// bf16 logits [rows, vocab] (the LM head's output), read as f32.
extern "C" __global__ void ge_sample_rows_bf16(SampleArgs a) { ge_sample_rows_impl<ge_bf16>(a); }

// log_softmax(logits[row])[targets[row]] for bf16 logits [rows, vocab]: one block of
// GE_SAMPLE_THREADS threads per row; max in f32, sum of exp(l - max) in f64 (as the CPU's
// fused log-prob gathering), NaN / +inf and all -inf rows reported through status.
extern "C" __global__ void ge_target_logprobs_bf16(TargetLogprobArgs a) {
    __shared__ float s_max[GE_WARP_SIZE];
    __shared__ double s_red[GE_WARP_SIZE];
    __shared__ int s_bad;
    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const int lane = tid % GE_WARP_SIZE;
    const int warp = tid / GE_WARP_SIZE;
    const int warps = blockDim.x / GE_WARP_SIZE;
    const int vocab = a.vocab;
    const ge_bf16* l = reinterpret_cast<const ge_bf16*>(a.logits) + static_cast<long long>(row) * vocab;
    const unsigned int target = reinterpret_cast<const unsigned int*>(a.targets)[row];
    float* out = reinterpret_cast<float*>(a.out);
    int* status = reinterpret_cast<int*>(a.status);
    if (tid == 0) s_bad = 0;
    __syncthreads();
    const float inf = __int_as_float(0x7f800000);
    float v = -inf;
    bool bad = false;
    for (int i = tid; i < vocab; i += blockDim.x) {
        const float x = ge_bf16_to_f32(l[i]);
        if (x != x || x == inf) bad = true;
        else v = fmaxf(v, x);
    }
    if (bad) atomicOr(&s_bad, 1);
    v = ge_warp_max(v);
    if (lane == 0) s_max[warp] = v;
    __syncthreads();
    v = lane < warps ? s_max[lane] : -inf;
    v = ge_warp_max(v);
    const float maxf = v;
    if (s_bad != 0 || maxf == -inf || target >= static_cast<unsigned int>(vocab)) {
        if (tid == 0) {
            out[row] = 0.0f;
            status[row] = s_bad != 0 ? 1 : (maxf == -inf ? 2 : 4);
        }
        return;
    }
    const double m = static_cast<double>(maxf);
    double se = 0.0;
    for (int i = tid; i < vocab; i += blockDim.x) {
        se += exp(static_cast<double>(ge_bf16_to_f32(l[i])) - m);
    }
    se = ge_block_sum_f64(se, s_red);
    if (tid == 0) {
        out[row] = static_cast<float>(static_cast<double>(ge_bf16_to_f32(l[target])) - (m + log(se)));
        status[row] = 0;
    }
}

