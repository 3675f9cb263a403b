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

// ---- RMSNorm backward, rows: one block per row; block size a multiple of 32. The same
// arithmetic as the CPU reference (`1 / sqrt`, not rsqrtf, so `r` is correctly rounded). ----
extern "C" __global__ void ge_rms_norm_backward_rows(RmsNormBackwardArgs a) {
    __shared__ float scratch[GE_WARP_SIZE];
    const long long row = blockIdx.x;
    const ge_bf16* x = reinterpret_cast<const ge_bf16*>(a.x) + row * a.dim;
    const ge_bf16* dy = reinterpret_cast<const ge_bf16*>(a.dy) + row * a.dim;
    const ge_bf16* w = reinterpret_cast<const ge_bf16*>(a.weight);
    ge_bf16* dx = reinterpret_cast<ge_bf16*>(a.dx) + row * a.dim;
    float ss = 0.0f;
    float dot = 0.0f;
    for (int i = threadIdx.x; i < a.dim; i += blockDim.x) {
        const float xv = ge_bf16_to_f32(x[i]);
        ss += xv * xv;
        dot += ge_bf16_to_f32(dy[i]) * ge_bf16_to_f32(w[i]) * xv;
    }
    ss = ge_block_sum(ss, scratch);
    dot = ge_block_sum(dot, scratch);
    const float r = 1.0f / sqrtf(ss / static_cast<float>(a.dim) + a.eps);
    const float c = r * r * r / static_cast<float>(a.dim) * dot;
    for (int i = threadIdx.x; i < a.dim; i += blockDim.x) {
        const float xv = ge_bf16_to_f32(x[i]);
        dx[i] = ge_f32_to_bf16(r * ge_bf16_to_f32(w[i]) * ge_bf16_to_f32(dy[i]) - c * xv);
    }
    if (threadIdx.x == 0) reinterpret_cast<float*>(a.rinv)[row] = r;
}

// ---- RMSNorm backward, weight gradient: block (32 columns, GE_RMS_BWD_SLICES row slices),
// grid over column tiles. Thread (c, s) sums rows s, s + slices, ... of column c in order;
// thread (c, 0) then adds the slices' sums in slice order to weight_grad[c]. Fixed order, no
// atomics: the same bits every run. ----
#define GE_RMS_BWD_SLICES 16
extern "C" __global__ void ge_rms_norm_backward_weight(RmsNormBackwardArgs a) {
    __shared__ float partial[GE_RMS_BWD_SLICES][GE_WARP_SIZE];
    const int col = blockIdx.x * GE_WARP_SIZE + threadIdx.x;
    const ge_bf16* x = reinterpret_cast<const ge_bf16*>(a.x);
    const ge_bf16* dy = reinterpret_cast<const ge_bf16*>(a.dy);
    const float* rinv = reinterpret_cast<const float*>(a.rinv);
    float acc = 0.0f;
    if (col < a.dim) {
        for (int r = threadIdx.y; r < a.rows; r += GE_RMS_BWD_SLICES) {
            const long long at = static_cast<long long>(r) * a.dim + col;
            acc += ge_bf16_to_f32(dy[at]) * ge_bf16_to_f32(x[at]) * rinv[r];
        }
    }
    partial[threadIdx.y][threadIdx.x] = acc;
    __syncthreads();
    if (threadIdx.y == 0 && col < a.dim) {
        float sum = 0.0f;
#pragma unroll
        for (int s = 0; s < GE_RMS_BWD_SLICES; ++s) sum += partial[s][threadIdx.x];
        float* wg = reinterpret_cast<float*>(a.weight_grad);
        wg[col] += sum;
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
