//! Matrix products on the CPU through the `gemm` crate (AVX2/AVX-512 kernels, rayon threads).

use gemm::Parallelism;

/// `out[n, m] = a[n, k] @ b[m, k]^T`, row-major, multi-threaded. This is a linear layer with
/// HF weight layout.
pub fn matmul_nt(out: &mut [f32], a: &[f32], b: &[f32], n: usize, m: usize, k: usize) {
    assert!(out.len() == n * m && a.len() == n * k && b.len() == m * k);
    let par = if n * m * k >= 1 << 18 && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    // SAFETY: the asserts above bound every index the strides below produce.
    unsafe {
        gemm_strided(
            n,
            m,
            k,
            out.as_mut_ptr(),
            m as isize,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            par,
        )
    }
}

/// `dst[m, n] = lhs[m, k] @ rhs[k, n]` with arbitrary strides (`*_rs` between rows, `*_cs`
/// between columns); dst columns are contiguous. Overwrites dst.
///
/// # Safety
/// Every element addressed by the shapes and strides must be inside its buffer.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    lhs: *const f32,
    lhs_rs: isize,
    lhs_cs: isize,
    rhs: *const f32,
    rhs_rs: isize,
    rhs_cs: isize,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    unsafe {
        gemm::gemm(
            m, n, k, dst, 1, dst_rs, false, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, 0.0, 1.0,
            false, false, false, par,
        )
    }
}
