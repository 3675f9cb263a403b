// Optimizer kernels: the fused AdamW update on f32 master weights and moments (optionally
// writing the parameter's bf16 working copy in the same pass), and the f32 -> bf16 cast that
// sets a bf16 parameter from its master copy on the device.
// Launch shapes are chosen on the Rust side (src/backend/cuda/train_elementwise.rs).
#include "common.cuh"

// ---- AdamW: grid-stride over the elements. Every operation is an explicitly rounded
// intrinsic (__fmul_rn, __fadd_rn, __fsqrt_rn, __fdiv_rn), so that the compiler cannot
// contract a multiply and an add into an FMA: the result is bit for bit the host's
// `adamw_update_host` (Rust never contracts), in the same operation order. ----
extern "C" __global__ void ge_adamw_update(AdamWArgs a) {
    float* p = reinterpret_cast<float*>(a.master);
    float* m = reinterpret_cast<float*>(a.m);
    float* v = reinterpret_cast<float*>(a.v);
    const float* grad = reinterpret_cast<const float*>(a.grad);
    ge_bf16* out = reinterpret_cast<ge_bf16*>(a.out_bf16);
    for (long long i = ge_global_index(); i < a.n; i += ge_grid_threads()) {
        // g = grad * grad_scale
        const float g = __fmul_rn(grad[i], a.grad_scale);
        // m = beta1 * m + one_minus_beta1 * g
        const float mi = __fadd_rn(__fmul_rn(a.beta1, m[i]), __fmul_rn(a.one_minus_beta1, g));
        // v = beta2 * v + (one_minus_beta2 * g) * g
        const float vi =
            __fadd_rn(__fmul_rn(a.beta2, v[i]), __fmul_rn(__fmul_rn(a.one_minus_beta2, g), g));
        // denom = sqrt(v) * inv_sqrt_bias2 + eps
        const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(vi), a.inv_sqrt_bias2), a.eps);
        // p = p * decay - (step_size * m) / denom
        const float upd = __fdiv_rn(__fmul_rn(a.step_size, mi), denom);
        const float pi = __fsub_rn(__fmul_rn(p[i], a.decay), upd);
        p[i] = pi;
        m[i] = mi;
        v[i] = vi;
        if (out != nullptr) out[i] = ge_f32_to_bf16(pi);  // the working copy, as the cast sets it
    }
}

// ---- Casts, grid-stride, eight elements per step while both buffers are 16-byte aligned:
// f32 -> bf16 rounded to nearest even (the host upload's rounding; a bf16 parameter set from
// its master copy), and bf16 -> f32 exactly (the master copy of a bf16 parameter). ----
template <typename S, typename D> __device__ void cast(const CastArgs& a) {
    const S* src = reinterpret_cast<const S*>(a.src);
    D* dst = reinterpret_cast<D*>(a.dst);
    const long long n8 = ge_aligned16(a.src, a.dst) ? a.n / 8 : 0;
    for (long long v = ge_global_index(); v < n8; v += ge_grid_threads()) {
        float f[8];
        ge_load8(src + 8 * v, f);
        ge_store8(dst + 8 * v, f);
    }
    for (long long i = 8 * n8 + ge_global_index(); i < a.n; i += ge_grid_threads()) {
        dst[i] = ge_from_f32<D>(ge_to_f32(src[i]));
    }
}
extern "C" __global__ void ge_cast_f32_bf16(CastArgs a) { cast<float, ge_bf16>(a); }
extern "C" __global__ void ge_cast_bf16_f32(CastArgs a) { cast<ge_bf16, float>(a); }
