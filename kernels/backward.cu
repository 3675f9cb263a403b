// Backward (training) kernels of the row-wise and elementwise ops: the row scatter-add (the
// adjoint of the row gather and of the embedding lookup), RMSNorm backward (input gradient
// and the deterministic weight-gradient column reduction) and SwiGLU backward. RoPE's
// backward is ge_rope with `inverse` set (elementwise.cu). bf16 activations, f32 maths,
// gradients accumulated in f32; no atomics: every reduction has a fixed order.
// Launch shapes are chosen on the Rust side (src/backend/cuda/train_elementwise.rs).
#include "common.cuh"

// ---- Row scatter-add: grid-stride over groups x width. Each destination element belongs to
// one group, so one thread owns it and adds the group's source rows in the host's order. ----
template <typename D, typename S> __device__ void scatter_add_rows(const ScatterAddRowsArgs& a) {
    D* dst = reinterpret_cast<D*>(a.dst);
    const S* src = reinterpret_cast<const S*>(a.src);
    const unsigned int* order = reinterpret_cast<const unsigned int*>(a.order);
    const unsigned int* segments = reinterpret_cast<const unsigned int*>(a.segments);
    const unsigned int* targets = reinterpret_cast<const unsigned int*>(a.targets);
    const long long total = static_cast<long long>(a.groups) * a.width;
    for (long long idx = ge_global_index(); idx < total; idx += ge_grid_threads()) {
        const long long g = idx / a.width;
        const long long c = idx - g * a.width;
        D* out = dst + static_cast<long long>(targets[g]) * a.width + c;
        float acc = ge_to_f32(*out);
        for (unsigned int k = segments[g]; k < segments[g + 1]; ++k) {
            acc += ge_to_f32(src[static_cast<long long>(order[k]) * a.width + c]);
        }
        *out = ge_from_f32<D>(acc);
    }
}
extern "C" __global__ void ge_scatter_add_rows_bf16(ScatterAddRowsArgs a) {
    scatter_add_rows<ge_bf16, ge_bf16>(a);
}
extern "C" __global__ void ge_scatter_add_rows_bf16_f32(ScatterAddRowsArgs a) {
    scatter_add_rows<ge_bf16, float>(a);
}
extern "C" __global__ void ge_scatter_add_rows_f32(ScatterAddRowsArgs a) {
    scatter_add_rows<float, float>(a);
}
extern "C" __global__ void ge_scatter_add_rows_f32_bf16(ScatterAddRowsArgs a) {
    scatter_add_rows<float, ge_bf16>(a);
}

// ---- RMSNorm backward, rows: one warp per row, blockDim.x / 32 rows per block (a warp past
// the last row returns; no block barrier). Lane l takes the row's 16-byte vectors l, l + 32,
// ... when dim % 8 == 0, else its elements l, l + 32, ...; the sums by the warp's shuffle
// tree. The CPU reference's arithmetic (`1 / sqrt`, not rsqrtf, so `r` is correctly
// rounded). ----
extern "C" __global__ void ge_rms_norm_backward_rows(RmsNormBackwardArgs a) {
    const long long row =
        static_cast<long long>(blockIdx.x) * (blockDim.x / GE_WARP_SIZE) + threadIdx.x / GE_WARP_SIZE;
    if (row >= a.rows) return;
    const int lane = threadIdx.x % GE_WARP_SIZE;
    const ge_bf16* x = reinterpret_cast<const ge_bf16*>(a.x) + row * a.dim;
    const ge_bf16* dy = reinterpret_cast<const ge_bf16*>(a.dy) + row * a.dim;
    const ge_bf16* w = reinterpret_cast<const ge_bf16*>(a.weight);
    ge_bf16* dx = reinterpret_cast<ge_bf16*>(a.dx) + row * a.dim;
    const bool vec = (a.dim & 7) == 0 && ge_aligned16(a.x, a.dy) && ge_aligned16(a.weight, a.dx);
    float ss = 0.0f;
    float dot = 0.0f;
    if (vec) {
        for (int j = lane; j < a.dim / 8; j += GE_WARP_SIZE) {
            float xv[8], gv[8], wv[8];
            ge_load_bf16x8(x + 8 * j, xv);
            ge_load_bf16x8(dy + 8 * j, gv);
            ge_load_bf16x8(w + 8 * j, wv);
#pragma unroll
            for (int k = 0; k < 8; ++k) {
                ss += xv[k] * xv[k];
                dot += gv[k] * wv[k] * xv[k];
            }
        }
    } else {
        for (int i = lane; i < a.dim; i += GE_WARP_SIZE) {
            const float xv = ge_bf16_to_f32(x[i]);
            ss += xv * xv;
            dot += ge_bf16_to_f32(dy[i]) * ge_bf16_to_f32(w[i]) * xv;
        }
    }
    ss = ge_warp_sum(ss);
    dot = ge_warp_sum(dot);
    const float r = 1.0f / sqrtf(ss / static_cast<float>(a.dim) + a.eps);
    const float c = r * r * r / static_cast<float>(a.dim) * dot;
    if (vec) {
        for (int j = lane; j < a.dim / 8; j += GE_WARP_SIZE) {
            float xv[8], gv[8], wv[8], o[8];
            ge_load_bf16x8(x + 8 * j, xv);
            ge_load_bf16x8(dy + 8 * j, gv);
            ge_load_bf16x8(w + 8 * j, wv);
#pragma unroll
            for (int k = 0; k < 8; ++k) o[k] = r * wv[k] * gv[k] - c * xv[k];
            ge_store_bf16x8(dx + 8 * j, o);
        }
    } else {
        for (int i = lane; i < a.dim; i += GE_WARP_SIZE) {
            const float xv = ge_bf16_to_f32(x[i]);
            dx[i] = ge_f32_to_bf16(r * ge_bf16_to_f32(w[i]) * ge_bf16_to_f32(dy[i]) - c * xv);
        }
    }
    if (lane == 0) reinterpret_cast<float*>(a.rinv)[row] = r;
}

// ---- RMSNorm backward, weight gradient, step 1: the column sums of dy * x * r over row
// groups (ge_row_group_column_sums). ----
extern "C" __global__ void ge_rms_norm_backward_weight(RmsNormBackwardArgs a) {
    ge_row_group_column_sums<true>(reinterpret_cast<const ge_bf16*>(a.dy), reinterpret_cast<const ge_bf16*>(a.x),
                                   reinterpret_cast<const float*>(a.rinv), reinterpret_cast<float*>(a.partial),
                                   a.rows, a.dim, a.row_group);
}

// ---- Column sums of f32 partials (ge_row_group_column_sums' row groups), added to `out`:
// block (32, GE_COLUMN_SUM_GROUPS) over 32 columns; warp y sums groups y, y + 8, ... in order,
// and thread (c, 0) adds the warps' sums in warp order. ----
extern "C" __global__ void ge_column_partials_reduce(ColumnReduceArgs a) {
    __shared__ float sums[GE_COLUMN_SUM_GROUPS][GE_WARP_SIZE + 1];
    const int col = blockIdx.x * GE_WARP_SIZE + threadIdx.x;
    const float* partial = reinterpret_cast<const float*>(a.partial);
    float acc = 0.0f;
    if (col < a.cols) {
#pragma unroll 4
        for (int g = threadIdx.y; g < a.groups; g += GE_COLUMN_SUM_GROUPS) {
            acc += partial[static_cast<long long>(g) * a.cols + col];
        }
    }
    sums[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < a.cols) {
        float total = 0.0f;
#pragma unroll
        for (int y = 0; y < GE_COLUMN_SUM_GROUPS; ++y) total += sums[y][threadIdx.x];
        reinterpret_cast<float*>(a.out)[col] += total;
    }
}

// ---- SwiGLU backward: grid-stride over rows x inner, the CPU reference's formulas. ----
extern "C" __global__ void ge_swiglu_backward(SwigluBackwardArgs a) {
    const ge_bf16* gu = reinterpret_cast<const ge_bf16*>(a.gate_up);
    const ge_bf16* dy = reinterpret_cast<const ge_bf16*>(a.dy);
    ge_bf16* out = reinterpret_cast<ge_bf16*>(a.out);
    const long long total = static_cast<long long>(a.rows) * a.inner;
    if ((a.inner & 7) == 0) {
        // Eight elements (16 bytes) per thread and step, the same maths as below.
        const long long vecs = total / 8;
        const int inner_vecs = a.inner / 8;
        for (long long v = ge_global_index(); v < vecs; v += ge_grid_threads()) {
            const long long r = v / inner_vecs;
            const long long j = (v - r * inner_vecs) * 8;
            const ge_bf16* row = gu + r * 2 * a.inner;
            ge_bf16* o = out + r * 2 * a.inner;
            float g[8], u[8], d[8], dg[8], du[8];
            ge_load_bf16x8(row + j, g);
            ge_load_bf16x8(row + a.inner + j, u);
            ge_load_bf16x8(dy + r * a.inner + j, d);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const float s = 1.0f / (1.0f + expf(-g[i]));
                du[i] = d[i] * g[i] * s;
                dg[i] = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
            }
            ge_store_bf16x8(o + a.inner + j, du);
            ge_store_bf16x8(o + j, dg);
        }
        return;
    }
    for (long long idx = ge_global_index(); idx < total; idx += ge_grid_threads()) {
        const long long r = idx / a.inner;
        const long long j = idx - r * a.inner;
        const ge_bf16* row = gu + r * 2 * a.inner;
        ge_bf16* o = out + r * 2 * a.inner;
        const float g = ge_bf16_to_f32(row[j]);
        const float u = ge_bf16_to_f32(row[a.inner + j]);
        const float d = ge_bf16_to_f32(dy[idx]);
        const float s = 1.0f / (1.0f + expf(-g));
        o[a.inner + j] = ge_f32_to_bf16(d * g * s);
        o[j] = ge_f32_to_bf16(d * u * s * (1.0f + g * (1.0f - s)));
    }
}
