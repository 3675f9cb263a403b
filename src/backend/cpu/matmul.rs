//! Matrix products on the CPU through the `gemm` crate (AVX2/AVX-512 kernels, rayon threads).

use gemm::Parallelism;

/// Below this many rows a product runs as dot products straight off the weight rows: decode
/// steps of few sequences are memory bound, and packing the weight matrix for `gemm` would read
/// and write it once more for little reuse.
const FEW_ROWS: usize = 64;

/// Rows of `a` dotted with one weight row in a single pass (accumulators held in registers).
const ROW_GROUP: usize = 8;

/// `out[n, m] = a[n, k] @ b[m, k]^T`, row-major, multi-threaded. This is a linear layer with
/// HF weight layout.
pub fn matmul_nt(out: &mut [f32], a: &[f32], b: &[f32], n: usize, m: usize, k: usize) {
    assert!(out.len() == n * m && a.len() == n * k && b.len() == m * k);
    if n <= FEW_ROWS && k > 0 {
        return matmul_nt_few_rows(out, a, b, n, m, k);
    }
    let par = if n * m * k >= 1 << 18 && rayon::current_num_threads() > 1 {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    gemm_nt(out, a, b, n, m, k, par);
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

/// Output columns per parallel task of the few-rows path.
const COLUMNS_PER_TASK: usize = 64;

/// `matmul_nt` for a handful of rows: each weight row is read once and dotted with every row of
/// `a` in the same pass (one weight load feeds `n` FMAs); output columns are split across
/// threads.
fn matmul_nt_few_rows(out: &mut [f32], a: &[f32], b: &[f32], n: usize, m: usize, k: usize) {
    use rayon::prelude::*;
    // Column-major scratch: task t owns columns t*COLUMNS_PER_TASK.., all n rows of each.
    let mut columns = vec![0f32; m * n];
    columns
        .par_chunks_mut(COLUMNS_PER_TASK * n)
        .enumerate()
        .for_each(|(t, chunk)| {
            // Row groups outside, weight rows inside: a group of `a` rows stays in L1 while
            // the task's weight rows (in L2) stream past it.
            for g in (0..n).step_by(ROW_GROUP) {
                let rows = ROW_GROUP.min(n - g);
                let group = &a[g * k..(g + rows) * k];
                for (c, dst) in chunk.chunks_exact_mut(n).enumerate() {
                    let j = t * COLUMNS_PER_TASK + c;
                    dots(group, rows, &b[j * k..(j + 1) * k], &mut dst[g..g + rows]);
                }
            }
        });
    for (j, col) in columns.chunks_exact(n).enumerate() {
        for (i, &v) in col.iter().enumerate() {
            out[i * m + j] = v;
        }
    }
}

/// `dst[i] = a[i, :] . w` for the `n <= ROW_GROUP` rows of `a` (`[n, w.len()]`).
fn dots(a: &[f32], n: usize, w: &[f32], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F is present; shapes are checked by the caller.
        unsafe { dots_avx512(a, n, w, dst) };
        return;
    }
    let k = w.len();
    for (i, d) in dst.iter_mut().enumerate().take(n) {
        *d = dot(&a[i * k..(i + 1) * k], w);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dots_avx512(a: &[f32], n: usize, w: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let k = w.len();
    assert!(n <= ROW_GROUP && a.len() >= n * k && dst.len() >= n);
    let mut acc = [_mm512_setzero_ps(); ROW_GROUP];
    let mut t = 0;
    while t + 16 <= k {
        // SAFETY: t + 16 <= k bounds every load below (rows i < n of a hold k floats each).
        let wv = unsafe { _mm512_loadu_ps(w.as_ptr().add(t)) };
        for (i, acc) in acc.iter_mut().enumerate().take(n) {
            let xv = unsafe { _mm512_loadu_ps(a.as_ptr().add(i * k + t)) };
            *acc = _mm512_fmadd_ps(xv, wv, *acc);
        }
        t += 16;
    }
    for i in 0..n {
        let mut total = _mm512_reduce_add_ps(acc[i]);
        for u in t..k {
            total += a[i * k + u] * w[u];
        }
        dst[i] = total;
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

    /// Both paths (few rows and gemm) against a plain triple loop on odd shapes.
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

#[cfg(test)]
mod timing {
    /// Manual timing aid comparing the few-rows path with `gemm`:
    /// `cargo test --release --lib few_rows_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn few_rows_timing() {
        let shapes = [
            (1, 1536, 576),
            (8, 3072, 576),
            (16, 3072, 576),
            (32, 3072, 576),
            (64, 3072, 576),
            (8, 49152, 576),
            (32, 49152, 576),
            (64, 49152, 576),
        ];
        for (n, m, k) in shapes {
            let a = vec![0.5f32; n * k];
            let b = vec![0.25f32; m * k];
            let mut out = vec![0f32; n * m];
            let mut time = |f: &dyn Fn(&mut [f32])| {
                f(&mut out);
                let t = std::time::Instant::now();
                for _ in 0..10 {
                    f(&mut out);
                }
                t.elapsed().as_secs_f64() / 10.0
            };
            let few = time(&|o| super::matmul_nt_few_rows(o, &a, &b, n, m, k));
            let gemm = time(&|o| super::gemm_nt(o, &a, &b, n, m, k, gemm::Parallelism::Rayon(0)));
            let gf = |s: f64| 2.0 * (n * m * k) as f64 / s / 1e9;
            eprintln!(
                "n={n:>2} m={m:>5} k={k}: few-rows {:7.1} GFLOP/s, gemm {:7.1} GFLOP/s",
                gf(few),
                gf(gemm)
            );
        }
    }
}
