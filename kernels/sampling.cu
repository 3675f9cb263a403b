// Token sampling on the GPU: greedy, unfiltered and top-k / top-p sampling, exactly the
// definition of src/engine/sampler.rs. One block of GE_SAMPLE_THREADS threads per logits row
// (f32 or bf16 [rows, vocab]). Each row writes 4 words of the packed output: token, logprob
// (f32 bits), sampling logprob (f32 bits), status.
//
// Passes over a row (logits are re-read, nothing of vocab size is kept in shared memory):
// 1. max and argmax (lowest index on ties), rejecting NaN / +inf;
// 2. f64 sums of f32 terms: untempered sum E(l - m) (the log-partition) and tempered
//    Z = sum w_i, w_i = E((l_i - m) / T), E the definition's f32 exponential
//    (ge_sampling_exp); the probabilities are p_i = w_i * (1 / Z rounded to f32);
// Unfiltered rows (top_k == 0, top_p == 1), the walk in token order:
// 3. thread t owns the contiguous chunk [t * C, min((t + 1) * C, V)),
//    C = 8 * ceil(V / (8 * threads)) (a multiple of 8, so a chunk of an aligned row starts
//    16-byte aligned), and sums p_i over p_i > 0 in f64 in token order
//    (and notes its last i with p_i > 0); thread 0 forms the exclusive prefix of the chunk
//    sums sequentially and their total;
// 4. the one chunk with prefix <= u * total < next prefix is walked: the token is its first i
//    with prefix + (chunk-local running sum) > u * total; if no chunk holds the threshold
//    (u * total rounded up to the total), the last i with p_i > 0. The block computes the
//    chunk's p_i in parallel (a tile of one per thread in shared memory) and one thread adds
//    them up in order: the same sums as a walk by the chunk's owner, without its chain of
//    exponentials.
// Rows whose vocabulary is a multiple of 8 and whose logits are 16-byte aligned are read 16
// bytes per load (passes 1 to 3); the others one logit per load. In pass 3 and the walk both
// read the same values in the same order per thread, so they give the same bits; in passes 1
// and 2 each thread covers other logits on each path, so the argmax is the same but the f64
// normalisers may differ in their last bits (the definition leaves the order of those sums
// open; a given row on a given path is deterministic).
// Filtered rows (top-k and / or top-p), the walk in rank order (p descending, lower id first)
// without sorting: the key of token i is the bit pattern of p_i (a positive f32, so its bits
// order like its value); a "floor" (key F, id f) is the rank-order prefix {key > F, or key == F
// and id <= f}. See ge_sample_filtered.
// The summation orders are fixed, so the result is deterministic; src/backend/cuda/sampling.rs
// has the same algorithms on the host (tested against the CPU sampler).
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

// The sampling definition's exponential E(x) for x <= 0 (src/engine/sampler.rs,
// `sampling_exp`): every operation an IEEE f32 multiply, add or subtract rounded to nearest
// and none fused (the _rn intrinsics keep the compiler from contracting them into FMAs), so
// the bits are the CPU's. k = round(x log2 e) by the 1.5 * 2^23 trick, r = x - k ln 2 in two
// parts, exp(r) = 1 + r + r^2 P(r) (Cephes expf's P), then 2^(k + 64) and 2^-64, the second
// product rounding once into the subnormal range. Below -104, -inf and NaN give 0.
// Its constants as f32 bit patterns (the same in src/engine/sampler.rs; a test compares them):
// ln 2 in two parts (the high one has 9 significant bits, so k * GE_EXP_LN2_HI is exact),
// log2 e, and P's coefficients from the highest degree down.
#define GE_EXP_LN2_HI 0x3f318000
#define GE_EXP_LN2_LO 0xb95e8083
#define GE_EXP_LOG2E 0x3fb8aa3b
#define GE_EXP_P5 0x39506967
#define GE_EXP_P4 0x3ab743ce
#define GE_EXP_P3 0x3c088908
#define GE_EXP_P2 0x3d2aa9c1
#define GE_EXP_P1 0x3e2aaaaa
#define GE_EXP_P0 0x3f000000
#define GE_ROUND_MAGIC 12582912.0f
__device__ __forceinline__ float ge_sampling_exp(float x) {
    if (!(x >= -104.0f)) return 0.0f;
    x = fminf(x, 0.0f);  // as the CPU's clamp: outside the domain, E(x > 0) = E(0) = 1 on both
    const float t = __fmul_rn(x, __int_as_float(GE_EXP_LOG2E));
    const float kf = __fsub_rn(__fadd_rn(t, GE_ROUND_MAGIC), GE_ROUND_MAGIC);
    const float r = __fsub_rn(__fsub_rn(x, __fmul_rn(kf, __int_as_float(GE_EXP_LN2_HI))),
                              __fmul_rn(kf, __int_as_float(GE_EXP_LN2_LO)));
    const float z = __fmul_rn(r, r);
    float p = __int_as_float(GE_EXP_P5);
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(GE_EXP_P4));
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(GE_EXP_P3));
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(GE_EXP_P2));
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(GE_EXP_P1));
    p = __fadd_rn(__fmul_rn(p, r), __int_as_float(GE_EXP_P0));
    const float y = __fadd_rn(__fadd_rn(__fmul_rn(p, z), r), 1.0f);
    const int k = static_cast<int>(kf);
    const float up = __int_as_float((k + 64 + 127) << 23);
    const float down = __int_as_float((127 - 64) << 23);
    return __fmul_rn(__fmul_rn(y, up), down);
}

// The tempered weight E((l - max) / T) (the division skipped at T = 1: the same value).
__device__ __forceinline__ float ge_sampling_weight(float l, float maxf, float t) {
    const float d = __fsub_rn(l, maxf);
    return ge_sampling_exp(t == 1.0f ? d : __fdiv_rn(d, t));
}

// The tempered probability of a logit: weight * (1 / Z rounded to f32), as the definition says.
__device__ __forceinline__ float ge_sample_prob(float l, float maxf, float t, float inv_z) {
    return __fmul_rn(ge_sampling_weight(l, maxf, t), inv_z);
}

// fn(i, logit) for this thread's logits of a row, strided over the block: 8-logit groups
// j = tid, tid + threads, ... when `vec` (then the row is 16-byte aligned), then the tail
// i = 8 * (V / 8) + tid, ... (the whole row, one logit per load, when not `vec`).
template <typename T, typename F>
__device__ __forceinline__ void ge_for_each_strided(const T* l, int vocab, bool vec, F&& fn) {
    const int groups = vec ? vocab / 8 : 0;
    for (int j = threadIdx.x; j < groups; j += blockDim.x) {
        float x[8];
        ge_load8(l + 8 * j, x);
#pragma unroll
        for (int k = 0; k < 8; ++k) fn(8 * j + k, x[k]);
    }
    for (int i = 8 * groups + threadIdx.x; i < vocab; i += blockDim.x) fn(i, ge_to_f32(l[i]));
}

// fn(i, logit) for i in [begin, end) in order; 16 bytes per load when `vec` (then begin is a
// multiple of 8 and the row 16-byte aligned).
template <typename T, typename F>
__device__ __forceinline__ void ge_for_each_in(const T* l, int begin, int end, bool vec, F&& fn) {
    int i = begin;
    if (vec) {
        for (; i + 8 <= end; i += 8) {
            float x[8];
            ge_load8(l + i, x);
#pragma unroll
            for (int k = 0; k < 8; ++k) fn(i + k, x[k]);
        }
    }
    for (; i < end; ++i) fn(i, ge_to_f32(l[i]));
}

// Filtered sampling: radix-style searches over the f32 bit pattern of p.
// Histogram bins: key >> GE_SAMPLE_BIN_SHIFT (the exponent and 3 mantissa bits of p).
#define GE_SAMPLE_BINS 1024
#define GE_SAMPLE_BIN_SHIFT 20
// Tokens a row's compacted candidate list holds in shared memory.
#define GE_SAMPLE_CAP 4096
// 2^62: the scale of the histogram's fixed-point masses.
#define GE_SAMPLE_FIXED 4611686018427387904.0

// Exclusive prefix sum of an int over the block in thread order (every thread calls);
// `scratch` is 33 ints of shared memory; *total gets the block's sum.
__device__ __forceinline__ int ge_block_exclusive_scan(int v, int* scratch, int* total) {
    const int lane = threadIdx.x % GE_WARP_SIZE;
    const int warp = threadIdx.x / GE_WARP_SIZE;
    const int warps = blockDim.x / GE_WARP_SIZE;
    int x = v;
#pragma unroll
    for (int o = 1; o < GE_WARP_SIZE; o *= 2) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == GE_WARP_SIZE - 1) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {
        const int w = lane < warps ? scratch[lane] : 0;
        int incl = w;
#pragma unroll
        for (int o = 1; o < GE_WARP_SIZE; o *= 2) {
            const int y = __shfl_up_sync(0xffffffffu, incl, o);
            if (lane >= o) incl += y;
        }
        scratch[lane] = incl - w;
        if (lane == GE_WARP_SIZE - 1) scratch[GE_WARP_SIZE] = incl;
    }
    __syncthreads();
    const int res = scratch[warp] + x - v;
    *total = scratch[GE_WARP_SIZE];
    __syncthreads();
    return res;
}

// Whether (key, id) lies in the rank-order prefix ending at the floor (fk, fid).
__device__ __forceinline__ bool ge_in_floor(unsigned int key, int id, unsigned int fk, int fid) {
    return key > fk || (key == fk && id <= fid);
}

// A row's tokens as a list in token order: the whole vocabulary (keys recomputed from the
// logits) or the compacted (key, id) pairs in shared memory.
template <typename T, bool COMPACT>
struct GeSampleList {
    const T* l;
    float maxf, t, inv_z;
    int n;
    const unsigned int* sk;
    const int* si;
    __device__ __forceinline__ void get(int j, unsigned int& key, int& id) const {
        if (COMPACT) {
            key = sk[j];
            id = si[j];
        } else {
            key = __float_as_uint(ge_sample_prob(ge_to_f32(l[j]), maxf, t, inv_z));
            id = j;
        }
    }
    // This thread's contiguous share [begin, end) of the list.
    __device__ __forceinline__ void range(int& begin, int& end) const {
        const int chunk = (n + GE_SAMPLE_THREADS - 1) / GE_SAMPLE_THREADS;
        begin = min(static_cast<int>(threadIdx.x) * chunk, n);
        end = min(begin + chunk, n);
    }
};

// Count (mass == false) or f64 mass of the list's tokens with key >= k inside the floor; per
// thread sequential in list order, then the fixed block tree: deterministic.
template <class L>
__device__ __forceinline__ double ge_list_sum(const L& list, unsigned int k, unsigned int fk,
                                              int fid, bool mass, double* red) {
    int begin, end;
    list.range(begin, end);
    double acc = 0.0;
    for (int j = begin; j < end; ++j) {
        unsigned int key;
        int id;
        list.get(j, key, id);
        if (key >= k && ge_in_floor(key, id, fk, fid)) {
            acc += mass ? static_cast<double>(__uint_as_float(key)) : 1.0;
        }
    }
    return ge_block_sum_f64(acc, red);
}

#define GE_PRED_COUNT_GE 0  // count_ge(K) >= goal
#define GE_PRED_MASS_GE 1   // mass_ge(K) >= goal
#define GE_PRED_MASS_GT 2   // mass_ge(K) > goal

// The largest key K >= 1 with pred(K) (pred is monotone: true for small K), 0 if pred(1) is
// false; one bit at a time from bit 30 (keys are positive f32 bit patterns). Keys <= lo are
// taken as true without counting (the caller knows; the list may hold only keys >= lo).
template <class L>
__device__ unsigned int ge_list_search(const L& list, int pred, double goal, unsigned int lo,
                                       unsigned int fk, int fid, double* red) {
    unsigned int res = 0;
    for (int bit = 30; bit >= 0; --bit) {
        const unsigned int cand = res | (1u << bit);
        bool ok;
        if (cand <= lo) {
            ok = true;
        } else {
            const double v = ge_list_sum(list, cand, fk, fid, pred != GE_PRED_COUNT_GE, red);
            ok = pred == GE_PRED_MASS_GT ? v > goal : v >= goal;
        }
        if (ok) res = cand;
    }
    return res;
}

// Ties at key k inside the floor, in list (token) order: returns their number; with r >= 1
// also the id of the r-th of them in *id (r <= the number).
template <class L>
__device__ int ge_list_ties(const L& list, unsigned int k, unsigned int fk, int fid, int r,
                            int* id_out, int* scan, int* s_id) {
    int begin, end;
    list.range(begin, end);
    int c = 0;
    for (int j = begin; j < end; ++j) {
        unsigned int key;
        int id;
        list.get(j, key, id);
        if (key == k && ge_in_floor(key, id, fk, fid)) ++c;
    }
    int total;
    const int excl = ge_block_exclusive_scan(c, scan, &total);
    if (r >= 1) {
        if (excl < r && r <= excl + c) {
            int seen = excl;
            for (int j = begin; j < end; ++j) {
                unsigned int key;
                int id;
                list.get(j, key, id);
                if (key == k && ge_in_floor(key, id, fk, fid) && ++seen == r) {
                    *s_id = id;
                    break;
                }
            }
        }
        __syncthreads();
        *id_out = *s_id;
        __syncthreads();
    }
    return total;
}

// Adds p to base up to nt times; the number of adds after which the sum first reaches goal
// (>= goal, or > goal when strict), nt if it never does; *cum gets the sum at that point.
__device__ __forceinline__ int ge_tie_steps(double base, double p, int nt, double goal,
                                            bool strict, double* cum) {
    double c = base;
    for (int q = 1; q <= nt; ++q) {
        c += p;
        if (strict ? c > goal : c >= goal) {
            *cum = c;
            return q;
        }
    }
    *cum = c;
    return nt;
}

// The last token of the rank-order prefix ending at the floor: the least key inside it, the
// highest id among those (for a floor that is not itself a token, e.g. (1, INT_MAX)).
template <class L>
__device__ void ge_list_last(const L& list, unsigned int fk, int fid, unsigned int* s_u,
                             int* s_i, unsigned int& key_out, int& id_out) {
    int begin, end;
    list.range(begin, end);
    if (threadIdx.x == 0) {
        *s_u = 0xffffffffu;
        *s_i = -1;
    }
    __syncthreads();
    unsigned int mk = 0xffffffffu;
    for (int j = begin; j < end; ++j) {
        unsigned int key;
        int id;
        list.get(j, key, id);
        if (key >= 1 && ge_in_floor(key, id, fk, fid) && key < mk) mk = key;
    }
    if (mk != 0xffffffffu) atomicMin(s_u, mk);
    __syncthreads();
    const unsigned int least = *s_u;
    int mi = -1;
    for (int j = begin; j < end; ++j) {
        unsigned int key;
        int id;
        list.get(j, key, id);
        if (key == least && ge_in_floor(key, id, fk, fid) && id > mi) mi = id;
    }
    if (mi >= 0) atomicMax(s_i, mi);
    __syncthreads();
    key_out = least;
    id_out = *s_i;
    __syncthreads();
}

// Top-k / top-p on a list holding every token of the kept sets (or, with lo > 0, every token
// with key >= lo, where the caller guarantees the searched thresholds are >= lo).
// k: top-k count (0 = off); s_all: the mass of every candidate (for top-p without top-k);
// lo_k / lo_p: the search lower bounds for top-k / top-p-only. Results go to the chosen
// token, its p, and the total kept mass.
struct GeFilterOut {
    int token;
    float p;
    double total;
};

template <class L>
__device__ GeFilterOut ge_filter_and_walk(const L& list, int k, float top_p, double s_all,
                                          unsigned int lo_k, unsigned int lo_p, double u,
                                          double* red, int* scan, int* s_id, unsigned int* s_u) {
    unsigned int fk = 1;
    int fid = GE_INT_MAX;
    bool floor_is_token = false;
    // Top-k: the k-th largest key K, then the (k - count(key > K))-th tie at K by id.
    double s = s_all;
    if (k > 0) {
        const unsigned int kk = ge_list_search(list, GE_PRED_COUNT_GE, static_cast<double>(k),
                                               lo_k, 1u, GE_INT_MAX, red);
        const double above = ge_list_sum(list, kk + 1, 1u, GE_INT_MAX, false, red);
        int id;
        ge_list_ties(list, kk, 1u, GE_INT_MAX, k - static_cast<int>(above), &id, scan, s_id);
        fk = kk;
        fid = id;
        floor_is_token = true;
        s = ge_list_sum(list, 1u, fk, fid, true, red);
    }
    double total = s;
    // Top-p: the key of the first rank-order prefix reaching top_p * S, then its tie count.
    if (top_p < 1.0f) {
        const double target = static_cast<double>(top_p) * s;
        const unsigned int kp =
            ge_list_search(list, GE_PRED_MASS_GE, target, k > 0 ? 0u : lo_p, fk, fid, red);
        if (kp != 0) {
            const double base = ge_list_sum(list, kp + 1, fk, fid, true, red);
            int dummy;
            const int nt = ge_list_ties(list, kp, fk, fid, 0, &dummy, scan, s_id);
            double cum;
            const int j = ge_tie_steps(base, static_cast<double>(__uint_as_float(kp)), nt, target,
                                       false, &cum);
            int id;
            ge_list_ties(list, kp, fk, fid, j, &id, scan, s_id);
            fk = kp;
            fid = id;
            floor_is_token = true;
            total = cum;
        }
    }
    // The walk: the first rank-order token whose cumulative mass exceeds u * total.
    const double thr = u * total;
    const unsigned int kw = ge_list_search(list, GE_PRED_MASS_GT, thr, 0u, fk, fid, red);
    GeFilterOut o;
    o.total = total;
    if (kw != 0) {
        const double base = ge_list_sum(list, kw + 1, fk, fid, true, red);
        int dummy;
        const int nt = ge_list_ties(list, kw, fk, fid, 0, &dummy, scan, s_id);
        double cum;
        const int j = ge_tie_steps(base, static_cast<double>(__uint_as_float(kw)), nt, thr, true,
                                   &cum);
        int id;
        ge_list_ties(list, kw, fk, fid, j, &id, scan, s_id);
        o.token = id;
        o.p = __uint_as_float(kw);
    } else if (floor_is_token) {
        o.token = fid;
        o.p = __uint_as_float(fk);
    } else {
        // The definition's fallback, the last kept token; not reached as the kernel calls this:
        // with no floor (no top-k cut, top-p 1) the list is the whole row, whose mass at keys
        // >= 1 is s_all (the same sums in the same order), and u * s_all < s_all for u < 1, so
        // kw >= 1 above. (So no emulation input reaches ge_list_last's barriers either.)
        unsigned int key;
        int id;
        ge_list_last(list, fk, fid, s_u, s_id, key, id);
        o.token = id;
        o.p = __uint_as_float(key);
    }
    return o;
}

// The packed output: 4 words per row.
__device__ __forceinline__ void ge_sample_write(unsigned int* out, int row, unsigned int token,
                                                float logprob, float sampling_logprob, int status) {
    out[4 * row + 0] = token;
    out[4 * row + 1] = __float_as_uint(logprob);
    out[4 * row + 2] = __float_as_uint(sampling_logprob);
    out[4 * row + 3] = static_cast<unsigned int>(status);
}

// A filtered row (temperature > 0, top-k and / or top-p), after the max, the log-partition
// `lse` and the tempered normaliser `z`:
// a. one pass: the candidates' (p > 0) count and f64 mass S (per thread in token order, fixed
//    tree), and a histogram of their keys by exponent and 3 mantissa bits: counts and
//    fixed-point (2^-62, rounded down) masses, integer atomics, so exact and deterministic;
// b. from the histogram, a lower bound L on the keys that can matter: the bin of the k-th
//    largest key (top-k), or (top-p without top-k) the highest bin whose rounded-down mass
//    from the top reaches top_p * S with a 1e-9 margin; when at most GE_SAMPLE_CAP tokens have
//    key >= L they are compacted in token order into shared memory (another pass), and the
//    searches below run there; otherwise they run over the whole row (keys recomputed each
//    pass: slower, same results);
// c. top-k: the k-th largest key K by a bit-at-a-time search with block-wide counts, the cut
//    inside the tie at K by token id (block scan); S = the mass kept;
// d. top-p: the largest key K whose kept mass at keys >= K reaches top_p * S (bit search with
//    block-wide f64 masses), then ties at K are added one by one (lowest id first) to the mass
//    above K until the sum reaches the target; total = that sum;
// e. the walk: the largest key K whose kept mass at keys >= K exceeds u * total, then the tie
//    at K that crosses, as in d; if none, the last kept token.
// Masses are sums in a fixed order, not the CPU's rank-order sums: results agree up to f64
// rounding (exactly whenever the sums are exact, e.g. a kept set's p span under 2^29).
template <typename T>
__device__ void ge_sample_filtered(const T* l, int vocab, const SampleRowArgs& p, float maxf,
                                   float inv_z, double lse, unsigned int* out, int row,
                                   double* s_prefix, double* s_red) {
    __shared__ int s_cnt[GE_SAMPLE_BINS];
    __shared__ unsigned int s_key[GE_SAMPLE_CAP];
    __shared__ int s_idx[GE_SAMPLE_CAP];
    __shared__ int s_scan[GE_WARP_SIZE + 1];
    __shared__ int s_id;
    __shared__ unsigned int s_u;
    // The histogram's masses reuse the unfiltered walk's prefix array (same size).
    unsigned long long* s_fm = reinterpret_cast<unsigned long long*>(s_prefix);
    const int tid = threadIdx.x;
    for (int b = tid; b < GE_SAMPLE_BINS; b += blockDim.x) {
        s_cnt[b] = 0;
        s_fm[b] = 0ull;
    }
    __syncthreads();

    // a. candidates: count, mass, histogram.
    GeSampleList<T, false> full{l, maxf, p.temperature, inv_z, vocab, nullptr, nullptr};
    int begin, end;
    full.range(begin, end);
    double sp = 0.0;
    for (int i = begin; i < end; ++i) {
        unsigned int key;
        int id;
        full.get(i, key, id);
        if (key != 0) {
            const float pi = __uint_as_float(key);
            sp += static_cast<double>(pi);
            const int b = static_cast<int>(key >> GE_SAMPLE_BIN_SHIFT);
            atomicAdd(&s_cnt[b], 1);
            atomicAdd(&s_fm[b], static_cast<unsigned long long>(static_cast<double>(pi) *
                                                                 GE_SAMPLE_FIXED));
        }
    }
    const double s_all = ge_block_sum_f64(sp, s_red);
    __syncthreads();

    // b. the lower bound (every thread, the same answer).
    int ncand = 0;
    for (int b = 0; b < GE_SAMPLE_BINS; ++b) ncand += s_cnt[b];
    const int k = (p.top_k > 0 && p.top_k < ncand) ? p.top_k : 0;
    unsigned int lo = 0;
    bool compact = false;
    if (k > 0) {
        int cum = 0;
        for (int b = GE_SAMPLE_BINS - 1; b >= 0; --b) {
            cum += s_cnt[b];
            if (cum >= k) {
                compact = cum <= GE_SAMPLE_CAP;
                lo = max(static_cast<unsigned int>(b) << GE_SAMPLE_BIN_SHIFT, 1u);
                break;
            }
        }
    } else if (p.top_p < 1.0f) {
        const double target = static_cast<double>(p.top_p) * s_all;
        unsigned long long fm = 0ull;
        int cum = 0;
        for (int b = GE_SAMPLE_BINS - 1; b >= 0; --b) {
            fm += s_fm[b];
            cum += s_cnt[b];
            if (cum > GE_SAMPLE_CAP) break;
            if (static_cast<double>(fm) * (1.0 / GE_SAMPLE_FIXED) * (1.0 - 1e-9) >= target) {
                compact = true;
                lo = max(static_cast<unsigned int>(b) << GE_SAMPLE_BIN_SHIFT, 1u);
                break;
            }
        }
    }
    __syncthreads();  // every thread has read the histogram (s_fm aliases s_prefix)

    const double u = ge_philox_uniform(p.seed, p.seq_id, p.position);
    GeFilterOut o;
    if (compact) {
        // Tokens with key >= lo, in token order.
        int c = 0;
        for (int i = begin; i < end; ++i) {
            unsigned int key;
            int id;
            full.get(i, key, id);
            if (key >= lo) ++c;
        }
        int n;
        int at = ge_block_exclusive_scan(c, s_scan, &n);
        for (int i = begin; i < end; ++i) {
            unsigned int key;
            int id;
            full.get(i, key, id);
            if (key >= lo) {
                s_key[at] = key;
                s_idx[at] = i;
                ++at;
            }
        }
        __syncthreads();
        GeSampleList<T, true> list{l, maxf, p.temperature, inv_z, n, s_key, s_idx};
        o = ge_filter_and_walk(list, k, p.top_p, s_all, lo, lo, u, s_red, s_scan, &s_id, &s_u);
    } else {
        o = ge_filter_and_walk(full, k, p.top_p, s_all, 0u, 0u, u, s_red, s_scan, &s_id, &s_u);
    }
    if (tid == 0) {
        ge_sample_write(out, row, static_cast<unsigned int>(o.token),
                        static_cast<float>(static_cast<double>(ge_to_f32(l[o.token])) - lse),
                        static_cast<float>(log(static_cast<double>(o.p) / o.total)), 0);
    }
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
    __shared__ int s_walk;
    __shared__ double s_walk_start;

    const int row = blockIdx.x;
    const int tid = threadIdx.x;
    const int lane = tid % GE_WARP_SIZE;
    const int warp = tid / GE_WARP_SIZE;
    const int warps = blockDim.x / GE_WARP_SIZE;
    const int vocab = a.vocab;
    const T* l = reinterpret_cast<const T*>(a.logits) + static_cast<long long>(row) * vocab;
    const SampleRowArgs p = reinterpret_cast<const SampleRowArgs*>(a.params)[row];
    unsigned int* out = reinterpret_cast<unsigned int*>(a.out);

    const bool greedy = p.temperature == 0.0f;
    const bool filtered = !greedy && (p.top_k > 0 || p.top_p < 1.0f);
    if (tid == 0) {
        s_bad = 0;
        s_first = GE_INT_MAX;
        s_last = -1;
        s_walk = -1;
    }
    __syncthreads();

    // 1. max / argmax, NaN and +inf rejected.
    const float inf = __int_as_float(0x7f800000);
    const bool vec = vocab % 8 == 0 && (reinterpret_cast<unsigned long long>(l) & 15ull) == 0;
    float v = -inf;
    int vi = GE_INT_MAX;
    bool bad = false;
    // Per thread in increasing i, so a strict > keeps the lowest index of a tie.
    ge_for_each_strided(l, vocab, vec, [&](int i, float x) {
        if (x != x || x == inf) {
            bad = true;
        } else if (x > v || (x == v && i < vi)) {
            v = x;
            vi = i;
        }
    });
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
        if (tid == 0) ge_sample_write(out, row, 0u, 0.0f, 0.0f, s_bad != 0 ? 1 : 2);
        return;
    }

    // 2. untempered log-partition and tempered normaliser: f32 terms summed in f64.
    const float t = p.temperature;
    double se = 0.0;
    double sz = 0.0;
    ge_for_each_strided(l, vocab, vec, [&](int, float x) {
        const float d = __fsub_rn(x, maxf);
        const float e = ge_sampling_exp(d);
        se += static_cast<double>(e);
        if (!greedy) {
            // d / 1 == d: the same value as the weight's division.
            sz += static_cast<double>(t == 1.0f ? e : ge_sampling_exp(__fdiv_rn(d, t)));
        }
    });
    se = ge_block_sum_f64(se, s_red);
    const double lse = static_cast<double>(maxf) + log(se);
    if (greedy) {
        if (tid == 0) {
            ge_sample_write(out, row, static_cast<unsigned int>(argmax),
                            static_cast<float>(static_cast<double>(ge_to_f32(l[argmax])) - lse),
                            0.0f, 0);
        }
        return;
    }
    const float inv_z = static_cast<float>(1.0 / ge_block_sum_f64(sz, s_red));
    if (filtered) {
        ge_sample_filtered<T>(l, vocab, p, maxf, inv_z, lse, out, row, s_prefix, s_red);
        return;
    }

    // 3. chunk sums of the f32 probabilities, then their exclusive prefix (sequential).
    const int chunk = 8 * ((vocab + 8 * GE_SAMPLE_THREADS - 1) / (8 * GE_SAMPLE_THREADS));
    const int begin = min(tid * chunk, vocab);
    const int end = min(begin + chunk, vocab);
    double cs = 0.0;
    int last = -1;
    ge_for_each_in(l, begin, end, vec, [&](int i, float x) {
        const float pi = ge_sample_prob(x, maxf, t, inv_z);
        if (pi > 0.0f) {
            cs += static_cast<double>(pi);
            last = i;
        }
    });
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
        s_walk = tid;
        s_walk_start = start;
    }
    __syncthreads();  // s_walk is set; every thread has read s_prefix, which the tiles reuse
    const int walk = s_walk;
    if (walk >= 0) {
        // The chunk's p_i, a tile of one per thread at a time; thread 0 adds them in order.
        float* s_p = reinterpret_cast<float*>(s_prefix);
        const int wb = min(walk * chunk, vocab);
        const int we = min(wb + chunk, vocab);
        double local = 0.0;
        for (int base = wb; base < we; base += blockDim.x) {
            const int i = base + tid;
            s_p[tid] = i < we ? ge_sample_prob(ge_to_f32(l[i]), maxf, t, inv_z) : 0.0f;
            __syncthreads();
            if (tid == 0) {
                const double from = s_walk_start;
                const int n = min(static_cast<int>(blockDim.x), we - base);
                for (int j = 0; j < n; ++j) {
                    const float pi = s_p[j];
                    if (pi > 0.0f) {
                        local += static_cast<double>(pi);
                        if (from + local > threshold) {
                            s_first = base + j;
                            break;
                        }
                    }
                }
            }
            __syncthreads();
            if (s_first != GE_INT_MAX) break;
        }
    }
    if (tid == 0) {
        const int chosen = s_first != GE_INT_MAX ? s_first : s_last;
        const float pt = ge_sample_prob(ge_to_f32(l[chosen]), maxf, t, inv_z);
        ge_sample_write(out, row, static_cast<unsigned int>(chosen),
                        static_cast<float>(static_cast<double>(ge_to_f32(l[chosen])) - lse),
                        static_cast<float>(log(static_cast<double>(pt) / total)), 0);
    }
}

// f32 logits [rows, vocab].
extern "C" __global__ void __launch_bounds__(GE_SAMPLE_THREADS) ge_sample_rows(SampleArgs a) { ge_sample_rows_impl<float>(a); }

// bf16 logits [rows, vocab] (the LM head's output), read as f32.
extern "C" __global__ void __launch_bounds__(GE_SAMPLE_THREADS) ge_sample_rows_bf16(SampleArgs a) { ge_sample_rows_impl<ge_bf16>(a); }

// The definition's exponential of each f32 of src into dst ([n] f32 each, grid-stride): for
// the GPU test that the device computes the CPU's bits (no contraction, no flush to zero).
extern "C" __global__ void ge_sampling_exp_values(CastArgs a) {
    const float* src = reinterpret_cast<const float*>(a.src);
    float* dst = reinterpret_cast<float*>(a.dst);
    for (long long i = ge_global_index(); i < a.n; i += ge_grid_threads()) {
        dst[i] = ge_sampling_exp(src[i]);
    }
}
