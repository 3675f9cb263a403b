// Shared definitions for every kernel file in kernels/ (one file per op family).
// Conventions, fixed before the first kernel lands so every family follows them:
// - activations and weights are bf16, row-major, token-major ([tokens, features]);
// - accumulation, norms, softmax and log-probabilities are fp32;
// - a kernel's arguments that the Rust side also builds live in a struct declared here.
#pragma once

#include <cuda_bf16.h>
#include <stdint.h>

#define GE_WARP_SIZE 32

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
