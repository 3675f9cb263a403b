/* Argument structs of the kernels, shared with the Rust side.
 *
 * Each kernel whose arguments the Rust side builds takes one of these structs by value. The
 * Rust mirror is src/backend/cuda/args.rs, generated from this file by tools/gen-bindings.sh
 * (bindgen) and committed; a test regenerates it and compares where bindgen is installed.
 *
 * Rules, so that the C and Rust layouts agree without surprises:
 * - plain C: no includes, no C++ in this file (bindgen reads it as C; nvcc and NVRTC as C++);
 * - device pointers are `unsigned long long` device addresses (CUdeviceptr), each field's
 *   comment giving the element type and shape the kernel reads them as;
 * - pointers first, then 8-byte counts, then 4-byte fields;
 * - every struct's size and alignment are stated with GE_LAYOUT below: the CUDA compilers check
 *   them, and a Rust test checks the mirror against the same numbers.
 */
#ifndef GENIUS_ENGINE_KERNEL_ARGS_H
#define GENIUS_ENGINE_KERNEL_ARGS_H

#ifdef __cplusplus
#define GE_LAYOUT(T, size, align)                                                            \
    static_assert(sizeof(T) == (size) && alignof(T) == (align), #T " layout changed")
#else
#define GE_LAYOUT(T, size, align)                                                            \
    _Static_assert(sizeof(T) == (size) && _Alignof(T) == (align), #T " layout changed")
#endif

/** `out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * weight` for every row `r`, f32 accumulation. */
typedef struct RmsNormArgs {
    /** bf16 `[rows, dim]`, read. */
    unsigned long long x;
    /** bf16 `[dim]`, read. */
    unsigned long long weight;
    /** bf16 `[rows, dim]`, written. */
    unsigned long long out;
    int rows;
    int dim;
    float eps;
} RmsNormArgs;
GE_LAYOUT(RmsNormArgs, 40, 8);

/** Rotary embedding in place, HF rotate-half layout: in each head, element `i` pairs with
 * `i + head_dim / 2` and is rotated by `positions[r] * inv_freq[i]` (minus that when
 * `inverse` is non-zero: the rotation's transpose, RoPE's backward). */
typedef struct RopeArgs {
    /** bf16 `[rows, width]`, `width = heads * head_dim`, read and written. */
    unsigned long long x;
    /** u32 `[rows]`, read. */
    unsigned long long positions;
    /** f32 `[head_dim / 2]`, read. */
    unsigned long long inv_freq;
    int rows;
    int width;
    int head_dim;
    int inverse;
} RopeArgs;
GE_LAYOUT(RopeArgs, 40, 8);

/** `out[r, j] = silu(gate_up[r, j]) * gate_up[r, inner + j]` for `j < inner`. */
typedef struct SwigluArgs {
    /** bf16 `[rows, 2 * inner]` (gate columns first), read. */
    unsigned long long gate_up;
    /** bf16 `[rows, inner]`, written. */
    unsigned long long out;
    int rows;
    int inner;
} SwigluArgs;
GE_LAYOUT(SwigluArgs, 24, 8);

/** `x[i] += y[i]` for `i < n`. */
typedef struct AddAssignArgs {
    /** `[n]` of the kernel's destination type, read and written. */
    unsigned long long x;
    /** `[n]` of the kernel's source type, read. */
    unsigned long long y;
    long long n;
} AddAssignArgs;
GE_LAYOUT(AddAssignArgs, 24, 8);

/** `x[i] *= factor` for `i < n`. */
typedef struct ScaleArgs {
    /** `[n]` of the kernel's type, read and written. */
    unsigned long long x;
    long long n;
    float factor;
} ScaleArgs;
GE_LAYOUT(ScaleArgs, 24, 8);

/** `dst[r, dst_col + c] = src[r, src_col + c]` for `r < rows`, `c < cols`: one part of a
 * column split or concatenation. */
typedef struct CopyColumnsArgs {
    /** `[rows, src_width]`, read. */
    unsigned long long src;
    /** `[rows, dst_width]`, written in columns `dst_col..dst_col + cols`. */
    unsigned long long dst;
    int rows;
    int cols;
    int src_width;
    int src_col;
    int dst_width;
    int dst_col;
} CopyColumnsArgs;
GE_LAYOUT(CopyColumnsArgs, 40, 8);

/** `dst[i] = src[indices[i]]` for rows `i < count` of width `width` (row gather; also the
 * embedding lookup, with the token ids as indices). */
typedef struct GatherRowsArgs {
    /** `[src_rows, width]`, read. */
    unsigned long long src;
    /** `[count, width]`, written. */
    unsigned long long dst;
    /** u32 `[count]`, each below the source's row count (checked on the host), read. */
    unsigned long long indices;
    int count;
    int width;
} GatherRowsArgs;
GE_LAYOUT(GatherRowsArgs, 32, 8);

#endif /* GENIUS_ENGINE_KERNEL_ARGS_H */
