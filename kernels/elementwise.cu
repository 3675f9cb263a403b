// Row-wise and elementwise ops: RMSNorm, RoPE, SwiGLU, residual add, scale, and the data
// movement ops (column split/concat, row gather, which the embedding lookup also uses).
// bf16 in and out, f32 maths; the movement and add/scale kernels also come in f32.
// Launch shapes are chosen on the Rust side (src/backend/cuda/mod.rs), which states each
// kernel's requirements next to its launch.
#include "common.cuh"

// ---- RMSNorm, one warp per row: blockDim.x / 32 rows per block (at most 8, chosen on the
// host so that few rows still spread over the SMs), row blockIdx.x * (blockDim.x / 32) + warp
// (a warp past the last row returns; no block-wide barrier). Lane l takes the row's 16-byte vectors l, l + 32, ... when dim % 8 == 0, else its
// elements l, l + 32, ...; it sums their squares in that order, then the warp's xor-shuffle
// tree. With ADD, x = bf16(x + y) is stored first and the squares are those of the stored
// values; ge_rms_norm and ge_add_rms_norm run this same code, so the fused op gives the bits
// of ge_add_assign_bf16 followed by ge_rms_norm. Each lane reads back only what it wrote. ----

template <bool ADD>
__device__ __forceinline__ void ge_norm_row(ge_bf16* x, const ge_bf16* y, const ge_bf16* w,
                                            ge_bf16* out, int dim, float eps) {
    const int lane = threadIdx.x % GE_WARP_SIZE;
    float ss = 0.0f;
    if ((dim & 7) == 0) {
        for (int j = lane; j < dim / 8; j += GE_WARP_SIZE) {
            float v[8];
            ge_load_bf16x8(x + 8 * j, v);
            if (ADD) {
                float u[8];
                ge_load_bf16x8(y + 8 * j, u);
#pragma unroll
                for (int k = 0; k < 8; ++k) v[k] = ge_bf16_to_f32(ge_f32_to_bf16(v[k] + u[k]));
                ge_store_bf16x8(x + 8 * j, v);  // already bf16 values: stored exactly
            }
#pragma unroll
            for (int k = 0; k < 8; ++k) ss += v[k] * v[k];
        }
    } else {
        for (int i = lane; i < dim; i += GE_WARP_SIZE) {
            float v = ge_bf16_to_f32(x[i]);
            if (ADD) {
                const ge_bf16 sum = ge_f32_to_bf16(v + ge_bf16_to_f32(y[i]));
                x[i] = sum;
                v = ge_bf16_to_f32(sum);
            }
            ss += v * v;
        }
    }
    ss = ge_warp_sum(ss);
    const float scale = rsqrtf(ss / static_cast<float>(dim) + eps);
    if ((dim & 7) == 0) {
        for (int j = lane; j < dim / 8; j += GE_WARP_SIZE) {
            float v[8], g[8], o[8];
            ge_load_bf16x8(x + 8 * j, v);
            ge_load_bf16x8(w + 8 * j, g);
#pragma unroll
            for (int k = 0; k < 8; ++k) o[k] = v[k] * scale * g[k];
            ge_store_bf16x8(out + 8 * j, o);
        }
    } else {
        for (int i = lane; i < dim; i += GE_WARP_SIZE) {
            out[i] = ge_f32_to_bf16(ge_bf16_to_f32(x[i]) * scale * ge_bf16_to_f32(w[i]));
        }
    }
}

extern "C" __global__ void ge_rms_norm(RmsNormArgs a) {
    const long long row =
        static_cast<long long>(blockIdx.x) * (blockDim.x / GE_WARP_SIZE) + threadIdx.x / GE_WARP_SIZE;
    if (row >= a.rows) return;
    ge_bf16* x = const_cast<ge_bf16*>(reinterpret_cast<const ge_bf16*>(a.x)) + row * a.dim;
    ge_norm_row<false>(x, nullptr, reinterpret_cast<const ge_bf16*>(a.weight),
                       reinterpret_cast<ge_bf16*>(a.out) + row * a.dim, a.dim, a.eps);
}

// Rotate-half of pairs (i + k, i + half + k), k < 8, of one head: lo = src[i..], hi =
// src[i + half..] (16-byte loads), written to dst[i..] and dst[i + half..] as lo c - hi s and
// hi c + lo s with the row's table (cos[half] then sin[half]): the scalar loops' arithmetic.
__device__ __forceinline__ void ge_rope_rotate8(const ge_bf16* src, ge_bf16* dst, int i, int half,
                                                const float* table) {
    float lo[8], hi[8], out_lo[8], out_hi[8];
    ge_load_bf16x8(src + i, lo);
    ge_load_bf16x8(src + i + half, hi);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const float c = table[i + k];
        const float s = table[half + i + k];
        out_lo[k] = lo[k] * c - hi[k] * s;
        out_hi[k] = hi[k] * c + lo[k] * s;
    }
    ge_store_bf16x8(dst + i, out_lo);
    ge_store_bf16x8(dst + i + half, out_hi);
}

// ---- RoPE (rotate-half), in place: one block per row. The row's cos/sin table
// (head_dim / 2 pairs) is computed once into dynamic shared memory (head_dim floats), the
// angle in f64 as the CPU reference does, then every head of the row is rotated, eight pairs
// per step when half and the row are whole 16-byte pieces. ----
extern "C" __global__ void ge_rope(RopeArgs a) {
    GE_DYNAMIC_SHARED(float, table);  // cos[half] then sin[half]
    const int half = a.head_dim / 2;
    const long long row = blockIdx.x;
    const double pos = static_cast<double>(reinterpret_cast<const unsigned int*>(a.positions)[row]);
    const float* inv_freq = reinterpret_cast<const float*>(a.inv_freq);
    const float sign = a.inverse ? -1.0f : 1.0f;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double s, c;
        sincos(pos * static_cast<double>(inv_freq[i]), &s, &c);
        table[i] = static_cast<float>(c);
        table[half + i] = sign * static_cast<float>(s);
    }
    __syncthreads();
    ge_bf16* x = reinterpret_cast<ge_bf16*>(a.x) + row * a.width;
    const int pairs = (a.width / a.head_dim) * half;
    if (half % 8 == 0 && a.width % 8 == 0 && ge_aligned16(a.x)) {
        for (int p = 8 * threadIdx.x; p < pairs; p += 8 * blockDim.x) {
            const int head = p / half;
            ge_bf16* h = x + head * a.head_dim;
            ge_rope_rotate8(h, h, p - head * half, half, table);
        }
        return;
    }
    for (int p = threadIdx.x; p < pairs; p += blockDim.x) {
        const int head = p / half;
        const int i = p - head * half;
        ge_bf16* h = x + head * a.head_dim;
        const float lo = ge_bf16_to_f32(h[i]);
        const float hi = ge_bf16_to_f32(h[i + half]);
        const float c = table[i];
        const float s = table[half + i];
        h[i] = ge_f32_to_bf16(lo * c - hi * s);
        h[i + half] = ge_f32_to_bf16(hi * c + lo * s);
    }
}

// ---- SwiGLU on the fused gate/up projection: grid-stride over the output. ----
extern "C" __global__ void ge_swiglu(SwigluArgs a) {
    const ge_bf16* gu = reinterpret_cast<const ge_bf16*>(a.gate_up);
    ge_bf16* out = reinterpret_cast<ge_bf16*>(a.out);
    const long long total = static_cast<long long>(a.rows) * a.inner;
    if ((a.inner & 7) == 0) {
        // Eight elements (16 bytes) per thread and step: every row starts 16-byte aligned.
        const long long vecs = total / 8;
        const int inner_vecs = a.inner / 8;
        for (long long v = ge_global_index(); v < vecs; v += ge_grid_threads()) {
            const long long r = v / inner_vecs;
            const long long j = (v - r * inner_vecs) * 8;
            const ge_bf16* row = gu + r * 2 * a.inner;
            float g[8], u[8], o[8];
            ge_load_bf16x8(row + j, g);
            ge_load_bf16x8(row + a.inner + j, u);
#pragma unroll
            for (int i = 0; i < 8; ++i) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
            ge_store_bf16x8(out + r * a.inner + j, o);
        }
        return;
    }
    for (long long idx = ge_global_index(); idx < total; idx += ge_grid_threads()) {
        const long long r = idx / a.inner;
        const long long j = idx - r * a.inner;
        const ge_bf16* row = gu + r * 2 * a.inner;
        const float g = ge_bf16_to_f32(row[j]);
        const float u = ge_bf16_to_f32(row[a.inner + j]);
        out[idx] = ge_f32_to_bf16(g / (1.0f + expf(-g)) * u);
    }
}

// ---- x += y: grid-stride; the sum is formed in f32 and rounded once. Eight elements per
// step (16- or 32-byte loads) while both are 16-byte aligned, then one at a time for the
// tail: the same bits either way. ----
template <typename X, typename Y> __device__ void add_assign(const AddAssignArgs& a) {
    X* x = reinterpret_cast<X*>(a.x);
    const Y* y = reinterpret_cast<const Y*>(a.y);
    const long long n8 = ge_aligned16(a.x, a.y) ? a.n / 8 : 0;
    for (long long v = ge_global_index(); v < n8; v += ge_grid_threads()) {
        float xf[8], yf[8];
        ge_load8(x + 8 * v, xf);
        ge_load8(y + 8 * v, yf);
#pragma unroll
        for (int k = 0; k < 8; ++k) xf[k] = xf[k] + yf[k];
        ge_store8(x + 8 * v, xf);
    }
    for (long long i = 8 * n8 + ge_global_index(); i < a.n; i += ge_grid_threads()) {
        x[i] = ge_from_f32<X>(ge_to_f32(x[i]) + ge_to_f32(y[i]));
    }
}
extern "C" __global__ void ge_add_assign_bf16(AddAssignArgs a) { add_assign<ge_bf16, ge_bf16>(a); }
extern "C" __global__ void ge_add_assign_f32(AddAssignArgs a) { add_assign<float, float>(a); }
extern "C" __global__ void ge_add_assign_f32_bf16(AddAssignArgs a) { add_assign<float, ge_bf16>(a); }

// ---- x *= factor: grid-stride, eight elements per step while aligned (as add_assign). ----
template <typename T> __device__ void scale(const ScaleArgs& a) {
    T* x = reinterpret_cast<T*>(a.x);
    const long long n8 = ge_aligned16(a.x) ? a.n / 8 : 0;
    for (long long v = ge_global_index(); v < n8; v += ge_grid_threads()) {
        float f[8];
        ge_load8(x + 8 * v, f);
#pragma unroll
        for (int k = 0; k < 8; ++k) f[k] = f[k] * a.factor;
        ge_store8(x + 8 * v, f);
    }
    for (long long i = 8 * n8 + ge_global_index(); i < a.n; i += ge_grid_threads()) {
        x[i] = ge_from_f32<T>(ge_to_f32(x[i]) * a.factor);
    }
}
extern "C" __global__ void ge_scale_bf16(ScaleArgs a) { scale<ge_bf16>(a); }
extern "C" __global__ void ge_scale_f32(ScaleArgs a) { scale<float>(a); }

// ---- Column block copy (split/concat): grid-stride over rows x cols; bitwise, so it is
// instantiated per element size (2 bytes: bf16, 4 bytes: f32). When the column block, both
// widths and both offsets are whole 16-byte pieces (and the buffers 16-byte aligned), it
// copies 16 bytes per step. ----
template <typename T> __device__ void copy_columns(const CopyColumnsArgs& a) {
    constexpr int V = 16 / sizeof(T);  // elements per 16 bytes
    const T* src = reinterpret_cast<const T*>(a.src);
    T* dst = reinterpret_cast<T*>(a.dst);
    if (ge_aligned16(a.src, a.dst) && (a.cols | a.src_width | a.src_col | a.dst_width | a.dst_col) % V == 0) {
        const int vc = a.cols / V;
        const long long total = static_cast<long long>(a.rows) * vc;
        for (long long idx = ge_global_index(); idx < total; idx += ge_grid_threads()) {
            const long long r = idx / vc;
            const long long c = (idx - r * vc) * V;
            *reinterpret_cast<uint4*>(dst + r * a.dst_width + a.dst_col + c) =
                *reinterpret_cast<const uint4*>(src + r * a.src_width + a.src_col + c);
        }
        return;
    }
    const long long total = static_cast<long long>(a.rows) * a.cols;
    for (long long idx = ge_global_index(); idx < total; idx += ge_grid_threads()) {
        const long long r = idx / a.cols;
        const long long c = idx - r * a.cols;
        dst[r * a.dst_width + a.dst_col + c] = src[r * a.src_width + a.src_col + c];
    }
}
extern "C" __global__ void ge_copy_columns_bf16(CopyColumnsArgs a) { copy_columns<unsigned short>(a); }
extern "C" __global__ void ge_copy_columns_f32(CopyColumnsArgs a) { copy_columns<unsigned int>(a); }

// ---- Row gather: grid-stride over count x width; bitwise, per element size; 16 bytes per
// step when rows are whole 16-byte pieces (and the buffers 16-byte aligned). ----
template <typename T> __device__ void gather_rows(const GatherRowsArgs& a) {
    constexpr int V = 16 / sizeof(T);
    const T* src = reinterpret_cast<const T*>(a.src);
    T* dst = reinterpret_cast<T*>(a.dst);
    const unsigned int* indices = reinterpret_cast<const unsigned int*>(a.indices);
    if (ge_aligned16(a.src, a.dst) && a.width % V == 0) {
        const int vw = a.width / V;
        const long long total = static_cast<long long>(a.count) * vw;
        for (long long idx = ge_global_index(); idx < total; idx += ge_grid_threads()) {
            const long long i = idx / vw;
            const long long c = (idx - i * vw) * V;
            *reinterpret_cast<uint4*>(dst + i * a.width + c) =
                *reinterpret_cast<const uint4*>(src + static_cast<long long>(indices[i]) * a.width + c);
        }
        return;
    }
    const long long total = static_cast<long long>(a.count) * a.width;
    for (long long idx = ge_global_index(); idx < total; idx += ge_grid_threads()) {
        const long long i = idx / a.width;
        const long long c = idx - i * a.width;
        dst[idx] = src[static_cast<long long>(indices[i]) * a.width + c];
    }
}
extern "C" __global__ void ge_gather_rows_bf16(GatherRowsArgs a) { gather_rows<unsigned short>(a); }
extern "C" __global__ void ge_gather_rows_f32(GatherRowsArgs a) { gather_rows<unsigned int>(a); }

// ---- The residual add fused with RMSNorm (x += y, then out = rms_norm(x)): ge_norm_row's
// layout and arithmetic (above), the same bits as the two ops it replaces. ----
extern "C" __global__ void ge_add_rms_norm(AddRmsNormArgs a) {
    const long long row =
        static_cast<long long>(blockIdx.x) * (blockDim.x / GE_WARP_SIZE) + threadIdx.x / GE_WARP_SIZE;
    if (row >= a.rows) return;
    ge_norm_row<true>(reinterpret_cast<ge_bf16*>(a.x) + row * a.dim,
                      reinterpret_cast<const ge_bf16*>(a.y) + row * a.dim,
                      reinterpret_cast<const ge_bf16*>(a.weight),
                      reinterpret_cast<ge_bf16*>(a.out) + row * a.dim, a.dim, a.eps);
}

// ---- The paged layer prologue: one block per row. The row's cos/sin table is computed once
// as in ge_rope (f64 angle); q's and k's pairs are rotated with ge_rope's arithmetic, q
// written to q_out, k and v to the pools at the row's slot (ge_write_kv_bf16's copy). ----
extern "C" __global__ void ge_qkv_rope_write_kv(QkvRopeArgs a) {
    GE_DYNAMIC_SHARED(float, table);  // cos[half] then sin[half]
    const int half = a.head_dim / 2;
    const long long row = blockIdx.x;
    const double pos = static_cast<double>(reinterpret_cast<const unsigned int*>(a.positions)[row]);
    const float* inv_freq = reinterpret_cast<const float*>(a.inv_freq);
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        double s, c;
        sincos(pos * static_cast<double>(inv_freq[i]), &s, &c);
        table[i] = static_cast<float>(c);
        table[half + i] = static_cast<float>(s);
    }
    __syncthreads();
    const long long width = static_cast<long long>(a.q_width) + 2LL * a.kv_width;
    const ge_bf16* src = reinterpret_cast<const ge_bf16*>(a.qkv) + row * width;
    ge_bf16* q = reinterpret_cast<ge_bf16*>(a.q_out) + row * a.q_width;
    const unsigned int slot_id = reinterpret_cast<const unsigned int*>(a.slots)[row];
    // A padding row (GE_NO_SLOT) computes its q but caches no K/V.
    const bool cache_kv = slot_id != GE_NO_SLOT;
    const long long slot = cache_kv ? static_cast<long long>(slot_id) : 0;
    ge_bf16* kp = reinterpret_cast<ge_bf16*>(a.k_pool) + slot * a.kv_width;
    ge_bf16* vp = reinterpret_cast<ge_bf16*>(a.v_pool) + slot * a.kv_width;
    const int q_pairs = (a.q_width / a.head_dim) * half;
    const int k_pairs = cache_kv ? (a.kv_width / a.head_dim) * half : 0;
    const ge_bf16* v = src + a.q_width + a.kv_width;
    if (half % 8 == 0 && a.q_width % 8 == 0 && a.kv_width % 8 == 0 &&
        ge_aligned16(a.qkv, a.q_out) && ge_aligned16(a.k_pool, a.v_pool)) {
        // Eight pairs (and eight values of v) per step: the same arithmetic and bits.
        for (int p = 8 * threadIdx.x; p < q_pairs + k_pairs; p += 8 * blockDim.x) {
            const bool is_q = p < q_pairs;
            const int pp = is_q ? p : p - q_pairs;
            const int head = pp / half;
            ge_rope_rotate8(src + (is_q ? 0 : a.q_width) + head * a.head_dim,
                            (is_q ? q : kp) + head * a.head_dim, pp - head * half, half, table);
        }
        if (cache_kv) {
            for (int j = 8 * threadIdx.x; j < a.kv_width; j += 8 * blockDim.x) {
                *reinterpret_cast<uint4*>(vp + j) = *reinterpret_cast<const uint4*>(v + j);
            }
        }
        return;
    }
    for (int p = threadIdx.x; p < q_pairs + k_pairs; p += blockDim.x) {
        const bool is_q = p < q_pairs;
        const int pp = is_q ? p : p - q_pairs;
        const int head = pp / half;
        const int i = pp - head * half;
        const ge_bf16* h = src + (is_q ? 0 : a.q_width) + head * a.head_dim;
        ge_bf16* d = (is_q ? q : kp) + head * a.head_dim;
        const float lo = ge_bf16_to_f32(h[i]);
        const float hi = ge_bf16_to_f32(h[i + half]);
        const float c = table[i];
        const float s = table[half + i];
        d[i] = ge_f32_to_bf16(lo * c - hi * s);
        d[i + half] = ge_f32_to_bf16(hi * c + lo * s);
    }
    if (cache_kv)
        for (int j = threadIdx.x; j < a.kv_width; j += blockDim.x) vp[j] = v[j];
}

