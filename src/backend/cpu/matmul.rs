//! Matrix products on the CPU through the `gemm` crate (AVX2/AVX-512 kernels, rayon threads)
//! for operands that are not packed weights (attention, and training's weight gradients), and
//! the dot product.

use gemm::Parallelism;

/// `out[n, m] = a[n, k] @ b[m, k]^T`, row-major (a linear layer with HF weight layout, for
/// matrices that are not packed weights), multi-threaded when large.
pub fn matmul_nt(out: &mut [f32], a: &[f32], b: &[f32], n: usize, m: usize, k: usize) {
    gemm_nt(out, a, b, n, m, k, parallelism(n, m, k));
}

/// `out[n, m] = a[n, k] @ b[m, k]^T` through `gemm`, whatever the row count.
fn gemm_nt(out: &mut [f32], a: &[f32], b: &[f32], n: usize, m: usize, k: usize, par: Parallelism) {
    assert!(out.len() == n * m && a.len() == n * k && b.len() == m * k);
    // SAFETY: the assert above bounds every index the strides below produce.
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
    unsafe {
        gemm_raw(
            false, m, n, k, dst, dst_rs, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, par,
        )
    }
}

/// `dst[m, n] += lhs[m, k] @ rhs[k, n]`, strides as in [`gemm_strided`] (weight gradients
/// accumulate across the rows of a batch and across batches).
///
/// # Safety
/// Every element addressed by the shapes and strides must be inside its buffer.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_strided_add(
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
    unsafe {
        gemm_raw(
            true, m, n, k, dst, dst_rs, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, par,
        )
    }
}

/// The one call into `gemm`: `dst = (accumulate ? dst : 0) + lhs @ rhs`.
///
/// # Safety
/// As [`gemm_strided`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_raw(
    accumulate: bool,
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
    if m == 0 || n == 0 || (accumulate && k == 0) {
        return;
    }
    let alpha = if accumulate { 1.0 } else { 0.0 };
    unsafe {
        gemm::gemm(
            m, n, k, dst, 1, dst_rs, accumulate, lhs, lhs_cs, lhs_rs, rhs, rhs_cs, rhs_rs, alpha,
            1.0, false, false, false, par,
        )
    }
}

/// Rayon threads for a product of `m x n x k` when it is large enough to pay for them.
pub(super) fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    if m * n * k >= 1 << 18 && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    }
}

/// `y += a * x`, with the widest vector unit the CPU has.
pub fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
    assert_eq!(y.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; the lengths are equal (asserted above).
        unsafe { axpy_avx512(y, a, x) };
        return;
    }
    for (y, &x) in y.iter_mut().zip(x) {
        *y = a.mul_add(x, *y);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn axpy_avx512(y: &mut [f32], a: f32, x: &[f32]) {
    use std::arch::x86_64::*;
    let n = y.len();
    let av = _mm512_set1_ps(a);
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n = y.len() = x.len().
        unsafe {
            let yv = _mm512_loadu_ps(y.as_ptr().add(i));
            let xv = _mm512_loadu_ps(x.as_ptr().add(i));
            _mm512_storeu_ps(y.as_mut_ptr().add(i), _mm512_fmadd_ps(av, xv, yv));
        }
        i += 16;
    }
    for j in i..n {
        y[j] = a.mul_add(x[j], y[j]);
    }
}

/// Dot product with the widest vector unit the CPU has.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { dot_avx512(a, b) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { dot_avx2(a, b) };
        }
    }
    dot_portable(a, b)
}

/// Eight independent partial sums, so the compiler can keep them in one vector register.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ac.zip(bc) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_portable(a, b)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let mut acc = [_mm512_setzero_ps(); 4];
    let mut i = 0;
    while i + 64 <= n {
        for (l, acc) in acc.iter_mut().enumerate() {
            // SAFETY: i + 16 * l + 16 <= n, inside both slices.
            let (x, y) = unsafe {
                (
                    _mm512_loadu_ps(a.as_ptr().add(i + 16 * l)),
                    _mm512_loadu_ps(b.as_ptr().add(i + 16 * l)),
                )
            };
            *acc = _mm512_fmadd_ps(x, y, *acc);
        }
        i += 64;
    }
    while i + 16 <= n {
        // SAFETY: i + 16 <= n.
        let (x, y) = unsafe {
            (
                _mm512_loadu_ps(a.as_ptr().add(i)),
                _mm512_loadu_ps(b.as_ptr().add(i)),
            )
        };
        acc[0] = _mm512_fmadd_ps(x, y, acc[0]);
        i += 16;
    }
    let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
    let mut total = _mm512_reduce_add_ps(sum);
    for j in i..n {
        total += a[j] * b[j];
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gemm` with our strides against a plain triple loop on odd shapes.
    #[test]
    fn matmul_nt_matches_naive_loops() {
        let mut seed = 1u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        };
        for &(n, m, k) in &[
            (1, 1, 1),
            (1, 37, 129),
            (3, 70, 65),
            (8, 64, 576),
            (9, 33, 17),
            (40, 130, 77),
        ] {
            let a: Vec<f32> = (0..n * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let mut out = vec![f32::NAN; n * m];
            matmul_nt(&mut out, &a, &b, n, m, k);
            for i in 0..n {
                for j in 0..m {
                    let want: f64 = (0..k)
                        .map(|t| a[i * k + t] as f64 * b[j * k + t] as f64)
                        .sum();
                    let got = out[i * m + j] as f64;
                    assert!(
                        (got - want).abs() < 1e-4 * (1.0 + want.abs()),
                        "({n},{m},{k}) [{i},{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn axpy_matches_scalar_loop() {
        for len in [0, 1, 15, 16, 17, 64, 65] {
            let x: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut y: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: Vec<f32> = x
                .iter()
                .zip(&y)
                .map(|(x, y)| 0.75f32.mul_add(*x, *y))
                .collect();
            axpy(&mut y, 0.75, &x);
            assert_eq!(y, want, "len {len}");
        }
    }

    #[test]
    fn dot_paths_agree() {
        let a: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..1000).map(|i| (i as f32 * 0.11).cos()).collect();
        for len in [0, 1, 15, 16, 17, 63, 64, 65, 999, 1000] {
            let want: f64 = a[..len]
                .iter()
                .zip(&b[..len])
                .map(|(x, y)| *x as f64 * *y as f64)
                .sum();
            assert!(
                (dot(&a[..len], &b[..len]) as f64 - want).abs() < 1e-3,
                "len {len}"
            );
            assert!(
                (dot_portable(&a[..len], &b[..len]) as f64 - want).abs() < 1e-3,
                "len {len}"
            );
        }
    }
}
