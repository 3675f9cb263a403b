// Shared definitions for every kernel file in kernels/ (one file per op family).
// Conventions, fixed before the first kernel lands so every family follows them:
// - activations and weights are bf16, row-major, token-major ([tokens, features]);
// - accumulation, norms, softmax and log-probabilities are fp32;
// - a kernel's arguments that the Rust side also builds live in a struct declared in
//   args.h (mirrored into Rust by bindgen), passed by value;
// - kernels are `extern "C"` and named `ge_<op>[_<dtype>]`; the Rust registry
//   (src/backend/cuda/context.rs) lists every one of them.
//
// The kernels include no system or CUDA headers: NVRTC has no include path at run time on a
// machine with only the driver and libnvrtc, so bf16 is handled here through its bits and the
// PTX conversion instruction (sm_80 and newer).
#pragma once

#include "args.h"

#define GE_WARP_SIZE 32

// A KV slot meaning "do not cache this row" (padding rows of a fixed-size decode step); the
// Rust side's `backend::NO_SLOT`, which a test compares with this line.
#define GE_NO_SLOT 0xffffffffu

// A bf16 value as stored in memory: the upper 16 bits of an IEEE f32.
struct __align__(2) ge_bf16 {
    unsigned short bits;
};

// bf16 -> f32 (exact).
__device__ __forceinline__ float ge_bf16_to_f32(ge_bf16 v) {
    return __uint_as_float(static_cast<unsigned int>(v.bits) << 16);
}

// f32 -> bf16, rounded to nearest even (NaN stays NaN), one instruction on sm_80+.
__device__ __forceinline__ ge_bf16 ge_f32_to_bf16(float f) {
    ge_bf16 r;
#ifdef GE_KERNEL_EMU
    r.bits = ge_emu::f32_to_bf16_bits(f);  // tools/kernel-emu: the same rounding on the host
#else
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r.bits) : "f"(f));
#endif
    return r;
}

// Eight bf16 values (16 bytes, 16-byte aligned) at `p` as floats, exactly.
__device__ __forceinline__ void ge_load_bf16x8(const ge_bf16* p, float f[8]) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);  // the lower address is the low half
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Eight floats rounded to bf16 as ge_f32_to_bf16 rounds them, stored as 16 bytes at `p`
// (16-byte aligned).
__device__ __forceinline__ void ge_store_bf16x8(ge_bf16* p, const float f[8]) {
    unsigned int w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        w[i] = static_cast<unsigned int>(ge_f32_to_bf16(f[2 * i]).bits) |
               (static_cast<unsigned int>(ge_f32_to_bf16(f[2 * i + 1]).bits) << 16);
    }
    uint4 v;
    v.x = w[0];
    v.y = w[1];
    v.z = w[2];
    v.w = w[3];
    *reinterpret_cast<uint4*>(p) = v;
}

// Eight f32 values (32 bytes, 16-byte aligned) at `p`, and their store: the f32 forms of
// ge_load_bf16x8 / ge_store_bf16x8, so that one template body serves both element types.
__device__ __forceinline__ void ge_load8(const float* p, float f[8]) {
    const float4 a = reinterpret_cast<const float4*>(p)[0];
    const float4 b = reinterpret_cast<const float4*>(p)[1];
    f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
    f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}
__device__ __forceinline__ void ge_load8(const ge_bf16* p, float f[8]) { ge_load_bf16x8(p, f); }
__device__ __forceinline__ void ge_store8(float* p, const float f[8]) {
    float4 a, b;
    a.x = f[0]; a.y = f[1]; a.z = f[2]; a.w = f[3];
    b.x = f[4]; b.y = f[5]; b.z = f[6]; b.w = f[7];
    reinterpret_cast<float4*>(p)[0] = a;
    reinterpret_cast<float4*>(p)[1] = b;
}
__device__ __forceinline__ void ge_store8(ge_bf16* p, const float f[8]) { ge_store_bf16x8(p, f); }

// Eight bf16 values at `p` as floats: one 16-byte load when `aligned`, else eight 2-byte ones
// (the same values).
__device__ __forceinline__ void ge_load_bf16x8_any(const ge_bf16* p, float f[8], bool aligned) {
    if (aligned) {
        ge_load_bf16x8(p, f);
    } else {
#pragma unroll
        for (int k = 0; k < 8; ++k) f[k] = ge_bf16_to_f32(p[k]);
    }
}

// Whether every address is 16-byte aligned (the eight-element paths' requirement).
__device__ __forceinline__ bool ge_aligned16(unsigned long long a, unsigned long long b = 0ull) {
    return ((a | b) & 15ull) == 0ull;
}

// Column sums over groups of rows, the first step of a deterministic column reduction (the
// RMSNorm weight gradient, the bias gradient; ge_column_partials_reduce adds the groups). Block
// (32, GE_COLUMN_SUM_GROUPS), grid (column tiles, row-group tiles): thread (l, y) of block
// (bx, by) owns row group g = by * GE_COLUMN_SUM_GROUPS + y (rows g * row_group ..) and, when
// cols % 8 == 0, the 8 columns from 8 (bx * 32 + l) (16-byte loads where dy and x are aligned;
// a tile is 256 columns), else column bx * 32 + l. It sums dy (SCALED: dy * x * rinv[row])
// over its group's rows in order into partial[g * cols ..].
#define GE_COLUMN_SUM_GROUPS 8
template <bool SCALED>
__device__ __forceinline__ void ge_row_group_column_sums(const ge_bf16* dy, const ge_bf16* x,
                                                         const float* rinv, float* partial, int rows,
                                                         int cols, int row_group) {
    const int g = blockIdx.y * GE_COLUMN_SUM_GROUPS + threadIdx.y;
    const int r0 = g * row_group;
    if (r0 >= rows) return;
    const int r1 = min(rows, r0 + row_group);
    partial += static_cast<long long>(g) * cols;
    if ((cols & 7) == 0) {
        const bool aligned = ge_aligned16(reinterpret_cast<unsigned long long>(dy),
                                          reinterpret_cast<unsigned long long>(x));
        const int c0 = 8 * (blockIdx.x * GE_WARP_SIZE + threadIdx.x);
        if (c0 >= cols) return;
        float acc[8];
#pragma unroll
        for (int k = 0; k < 8; ++k) acc[k] = 0.0f;
#pragma unroll 4
        for (int r = r0; r < r1; ++r) {
            const long long at = static_cast<long long>(r) * cols + c0;
            float gv[8];
            ge_load_bf16x8_any(dy + at, gv, aligned);
            if (SCALED) {
                float xv[8];
                ge_load_bf16x8_any(x + at, xv, aligned);
                const float rr = rinv[r];
#pragma unroll
                for (int k = 0; k < 8; ++k) acc[k] += gv[k] * xv[k] * rr;
            } else {
#pragma unroll
                for (int k = 0; k < 8; ++k) acc[k] += gv[k];
            }
        }
#pragma unroll
        for (int k = 0; k < 8; ++k) partial[c0 + k] = acc[k];
    } else {
        const int col = blockIdx.x * GE_WARP_SIZE + threadIdx.x;
        if (col >= cols) return;
        float acc = 0.0f;
        for (int r = r0; r < r1; ++r) {
            const long long at = static_cast<long long>(r) * cols + col;
            const float gv = ge_bf16_to_f32(dy[at]);
            acc += SCALED ? gv * ge_bf16_to_f32(x[at]) * rinv[r] : gv;
        }
        partial[col] = acc;
    }
}

// Dynamic shared memory (the launch's shared_mem_bytes) as an array `name` of `type`.
#ifdef GE_KERNEL_EMU
#define GE_DYNAMIC_SHARED(type, name) type* name = reinterpret_cast<type*>(ge_emu::dynamic_shared())
#else
#define GE_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// `ldmatrix.sync.aligned.m8n8.x{2,4}[.trans].shared.b16`: COUNT 8 x 8 bf16 matrices from
// shared memory, lane i giving the address of row i % 8 of matrix i / 8 (16-byte aligned);
// register j of lane l gets matrix j's pair (row l / 4, columns 2 (l % 4), + 1), or with
// TRANS the pair (rows 2 (l % 4), + 1, column l / 4): the register layout of mma.sync's
// m16n8k16 fragments. The whole warp must call it (the tensor-core attention kernels).
template <int COUNT, bool TRANS>
__device__ __forceinline__ void ge_ldsm(unsigned int (&r)[COUNT], const void* row) {
#ifdef GE_KERNEL_EMU
    ge_emu::ldmatrix(r, COUNT, row, TRANS);  // tools/kernel-emu: the same on the host
#else
    unsigned int addr;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(addr) : "l"(row));
    if (COUNT == 4 && !TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    } else if (COUNT == 2 && !TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(addr));
    } else if (COUNT == 2 && TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];"
                     : "=r"(r[0]), "=r"(r[1])
                     : "r"(addr));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                     : "r"(addr));
    }
#endif
}

// `cp.async.cg.shared.global` of 16 bytes from global `src` to shared `dst` (both 16-byte
// aligned), or 16 zero bytes when `valid` is false (src-size 0: nothing is read, but `src` must
// still be a valid address). Asynchronous: the bytes are there for this thread once a later
// ge_cp_async_wait<N> has left at most N of its committed groups pending, and for the other
// threads of its warp after a __syncwarp that follows that wait.
__device__ __forceinline__ void ge_cp_async16(void* dst, const void* src, bool valid) {
#ifdef GE_KERNEL_EMU
    ge_emu::cp_async16(dst, src, valid);  // tools/kernel-emu: deferred to the wait, as on the GPU
#else
    unsigned int addr;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(addr) : "l"(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :
                 : "r"(addr), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
#endif
}

// Closes this thread's current group of ge_cp_async16 copies (an empty group is allowed).
__device__ __forceinline__ void ge_cp_async_commit() {
#ifdef GE_KERNEL_EMU
    ge_emu::cp_async_commit();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed copy groups are still pending.
template <int N>
__device__ __forceinline__ void ge_cp_async_wait() {
#ifdef GE_KERNEL_EMU
    ge_emu::cp_async_wait(N);
#else
    asm volatile("cp.async.wait_group %0;" : : "n"(N) : "memory");
#endif
}

// c += A B on one `mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32` tile (the whole warp
// calls it). Fragment ownership (PTX ISA), with g = lane / 4 and t = lane % 4:
//   A (16 x 16): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9],
//                a3 = A[g+8][2t+8, 2t+9]   (lower column in the low 16 bits);
//   B (16 x 8):  b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g];
//   C (16 x 8):  c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1].
__device__ __forceinline__ void ge_mma_bf16_16816(float (&c)[4], const unsigned int (&a)[4],
                                                  unsigned int b0, unsigned int b1) {
#ifdef GE_KERNEL_EMU
    ge_emu::mma_m16n8k16_bf16(c, a, b0, b1);  // tools/kernel-emu: the same on the host
#else
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Two f32 values as one bf16 pair word (`lo` in the low half, the lower index), each rounded
// to nearest even as ge_f32_to_bf16 rounds.
__device__ __forceinline__ unsigned int ge_pack_bf16x2(float lo, float hi) {
    unsigned int r;
#ifdef GE_KERNEL_EMU
    r = static_cast<unsigned int>(ge_emu::f32_to_bf16_bits(lo)) |
        (static_cast<unsigned int>(ge_emu::f32_to_bf16_bits(hi)) << 16);
#else
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
#endif
    return r;
}

// Element type conversions used by the templated kernels.
__device__ __forceinline__ float ge_to_f32(ge_bf16 v) { return ge_bf16_to_f32(v); }
__device__ __forceinline__ float ge_to_f32(float v) { return v; }
template <typename T> __device__ __forceinline__ T ge_from_f32(float v);
template <> __device__ __forceinline__ ge_bf16 ge_from_f32<ge_bf16>(float v) {
    return ge_f32_to_bf16(v);
}
template <> __device__ __forceinline__ float ge_from_f32<float>(float v) { return v; }

// Sum of `v` over the 32 lanes of a warp, returned to every lane.
__device__ __forceinline__ float ge_warp_sum(float v) {
#pragma unroll
    for (int offset = GE_WARP_SIZE / 2; offset > 0; offset /= 2) {
        v += __shfl_xor_sync(0xffffffffu, v, offset);
    }
    return v;
}

// Maximum of `v` over the 32 lanes of a warp, returned to every lane.
__device__ __forceinline__ float ge_warp_max(float v) {
#pragma unroll
    for (int offset = GE_WARP_SIZE / 2; offset > 0; offset /= 2) {
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    }
    return v;
}

// Index of this thread in a one-dimensional grid, and the grid's thread count, as 64-bit
// values for grid-stride loops over tensors of more than 2^31 elements.
__device__ __forceinline__ long long ge_global_index() {
    return static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}
__device__ __forceinline__ long long ge_grid_threads() {
    return static_cast<long long>(gridDim.x) * blockDim.x;
}
