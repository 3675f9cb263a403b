//! Linear-layer weights packed once, at upload, into the layout the CPU's vector units read
//! fastest, and the matrix product on that layout.
//!
//! # Layout
//!
//! A weight `W` of logical shape `[out, in]` (HF layout) is cut into panels of
//! [`PANEL`] = 16 output rows; panel `p` is stored `in`-major: element `W[16 p + c, t]` sits at
//! `p * in * 16 + t * 16 + c`. The last panel is zero-padded. One 64-byte load then gives 16
//! output columns' weights for one input index, so `x @ W^T` becomes a sum of outer products:
//! for each `t`, every row's `x[r, t]` (broadcast) times the panel's 16 weights, accumulated in
//! registers over all of `t`, and each result is written once, in place. No horizontal
//! reductions and no per-call packing: a decode step of a few rows streams each weight once.
//!
//! # Tiles
//!
//! A tile is up to [`TILE_ROWS`] rows of `x` against [`TILE_PANELS`] panels (32 columns):
//! 24 AVX-512 accumulators, 2 weight loads and 12 broadcasts per 24 FMAs. Work is split over
//! threads by groups of panels; within a group, the panels stay in L2 while every row tile of
//! `x` passes over them.

use rayon::prelude::*;

/// Output rows (columns of the product) per panel: one AVX-512 register of f32.
pub const PANEL: usize = 16;
/// Rows of `x` per register tile.
const TILE_ROWS: usize = 12;
/// Panels per register tile.
const TILE_PANELS: usize = 2;
/// Panels per parallel task, a multiple of [`TILE_PANELS`].
const PANELS_PER_TASK: usize = 8;

/// A `[out, in]` weight in panel layout (see the module comment).
#[derive(Debug, Clone)]
pub struct PackedMatrix {
    out: usize,
    inp: usize,
    data: Vec<f32>,
}

impl PackedMatrix {
    /// Packs a row-major `[out, in]` matrix.
    pub fn pack(w: &[f32], out: usize, inp: usize) -> Self {
        assert_eq!(
            w.len(),
            out * inp,
            "pack: {} values for [{out}, {inp}]",
            w.len()
        );
        let panels = out.div_ceil(PANEL);
        let mut data = vec![0f32; panels * inp * PANEL];
        data.par_chunks_mut(inp * PANEL)
            .enumerate()
            .for_each(|(p, panel)| {
                let rows = PANEL.min(out - p * PANEL);
                for c in 0..rows {
                    let src = &w[(p * PANEL + c) * inp..(p * PANEL + c + 1) * inp];
                    for (t, &v) in src.iter().enumerate() {
                        panel[t * PANEL + c] = v;
                    }
                }
            });
        Self { out, inp, data }
    }

    /// The row-major `[out, in]` matrix back.
    pub fn unpack(&self) -> Vec<f32> {
        let (out, inp) = (self.out, self.inp);
        let mut w = vec![0f32; out * inp];
        w.par_chunks_mut(inp).enumerate().for_each(|(j, row)| {
            let panel = &self.data[(j / PANEL) * inp * PANEL..];
            for (t, v) in row.iter_mut().enumerate() {
                *v = panel[t * PANEL + j % PANEL];
            }
        });
        w
    }

    /// Output features (rows of the logical matrix).
    pub fn out_features(&self) -> usize {
        self.out
    }

    /// Input features (columns of the logical matrix).
    pub fn in_features(&self) -> usize {
        self.inp
    }

    fn panels(&self) -> usize {
        self.out.div_ceil(PANEL)
    }

    /// `out[n, self.out] = x[n, self.in] @ W^T`, overwriting `out`; multi-threaded over
    /// groups of panels.
    pub fn matmul(&self, out: &mut [f32], x: &[f32], n: usize) {
        let (m, k) = (self.out, self.inp);
        assert!(x.len() == n * k && out.len() == n * m, "matmul: shapes");
        if n == 0 || m == 0 {
            return;
        }
        if k == 0 {
            out.fill(0.0);
            return;
        }
        let out_ptr = SendPtr(out.as_mut_ptr());
        let tasks = self.panels().div_ceil(PANELS_PER_TASK);
        let run = |task: usize| {
            let first = task * PANELS_PER_TASK;
            let last = (first + PANELS_PER_TASK).min(self.panels());
            // SAFETY: task `task` writes only columns `first * PANEL..last * PANEL` (clipped
            // to `m`) of `out`, disjoint from every other task's; `out` outlives the call.
            unsafe { self.matmul_panels(out_ptr, x, n, first, last) };
        };
        if tasks > 1 && n * m * k >= 1 << 16 && rayon::current_num_threads() > 1 {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    }

    /// Panels `first..last` against every row of `x`, written into their columns of `out`.
    ///
    /// # Safety
    /// `out` points at an `[n, self.out]` buffer no one else writes these columns of.
    unsafe fn matmul_panels(&self, out: SendPtr, x: &[f32], n: usize, first: usize, last: usize) {
        let (m, k) = (self.out, self.inp);
        let mut p = first;
        while p < last {
            let panels = TILE_PANELS.min(last - p);
            let cols = (m - p * PANEL).min(panels * PANEL);
            let w = &self.data[p * k * PANEL..(p + panels) * k * PANEL];
            let mut r = 0;
            while r < n {
                let rows = TILE_ROWS.min(n - r);
                // SAFETY: rows r..r + rows and columns p * PANEL..+cols are inside `out`.
                let dst = unsafe { out.0.add(r * m + p * PANEL) };
                let tile = Tile {
                    x: &x[r * k..(r + rows) * k],
                    k,
                    w,
                    dst,
                    ldd: m,
                    cols,
                };
                // SAFETY: as above; the tile's shapes are consistent by construction.
                unsafe { tile.run(rows, panels) };
                r += rows;
            }
            p += panels;
        }
    }
}

/// Rows of `dy` per register tile of the transposed product.
const T_TILE_ROWS: usize = 6;
/// Input columns (`t`) per register tile of the transposed product.
const T_TILE_COLS: usize = 4;
/// Input columns per parallel task of the transposed product, a multiple of [`T_TILE_COLS`].
const T_COLS_PER_TASK: usize = 32;
/// Panels per pass of the transposed product: a task's slice of `W` for one pass
/// (`T_PANELS_PER_PASS x T_COLS_PER_TASK x 16` floats, 256 KiB) stays in L2 while every row
/// tile of `dy` sweeps it.
const T_PANELS_PER_PASS: usize = 128;

impl PackedMatrix {
    /// `dx[n, self.in] = dy[n, self.out] @ W`, overwriting `dx`: the input gradient of
    /// [`Self::matmul`], read straight off the panel layout (no unpacking).
    ///
    /// The reduction runs over the output rows `j` of `W`, which the layout keeps contiguous
    /// within a panel: a register tile of [`T_TILE_ROWS`] rows of `dy` x [`T_TILE_COLS`] input
    /// columns `t` keeps one 16-lane accumulator per (row, column), adds
    /// `dy[r, 16p..16p + 16] * W_p[t][0..16]` for every panel `p` of a pass, and reduces each
    /// accumulator horizontally once per pass. Multi-threaded over groups of input columns.
    pub fn matmul_transposed(&self, dx: &mut [f32], dy: &[f32], n: usize) {
        let (m, k) = (self.out, self.inp);
        assert!(
            dy.len() == n * m && dx.len() == n * k,
            "matmul_transposed: shapes"
        );
        dx.fill(0.0);
        if n == 0 || m == 0 || k == 0 {
            return;
        }
        let dx_ptr = SendPtr(dx.as_mut_ptr());
        let tasks = k.div_ceil(T_COLS_PER_TASK);
        let run = |task: usize| {
            let first = task * T_COLS_PER_TASK;
            let last = (first + T_COLS_PER_TASK).min(k);
            // SAFETY: task `task` writes only columns `first..last` of `dx`, disjoint from
            // every other task's; `dx` outlives the call.
            unsafe { self.transposed_columns(dx_ptr, dy, n, first, last) };
        };
        if tasks > 1 && n * m * k >= 1 << 16 && rayon::current_num_threads() > 1 {
            (0..tasks).into_par_iter().for_each(run);
        } else {
            (0..tasks).for_each(run);
        }
    }

    /// Input columns `first..last` of `dx += dy @ W`, pass by pass over the panels.
    ///
    /// # Safety
    /// `dx` points at an `[n, self.in]` buffer no one else writes these columns of.
    unsafe fn transposed_columns(
        &self,
        dx: SendPtr,
        dy: &[f32],
        n: usize,
        first: usize,
        last: usize,
    ) {
        let (m, k) = (self.out, self.inp);
        let panels = self.panels();
        let mut p0 = 0;
        while p0 < panels {
            let pass = T_PANELS_PER_PASS.min(panels - p0);
            // Valid dy columns in the pass's last panel (the matrix's last panel may be partial).
            let last_valid = (m - (p0 + pass - 1) * PANEL).min(PANEL);
            let mut r = 0;
            while r < n {
                let rows = T_TILE_ROWS.min(n - r);
                let mut t = first;
                while t < last {
                    let cols = T_TILE_COLS.min(last - t);
                    let tile = TransposedTile {
                        // SAFETY (all three): row r < n, column p0 * 16 < m of dy; panel
                        // p0, column t < k of W; row r, column t of dx.
                        dy: unsafe { dy.as_ptr().add(r * m + p0 * PANEL) },
                        ldy: m,
                        w: unsafe { self.data.as_ptr().add(p0 * k * PANEL + t * PANEL) },
                        panel_stride: k * PANEL,
                        panels: pass,
                        last_valid,
                        dst: unsafe { dx.0.add(r * k + t) },
                        ldd: k,
                    };
                    // SAFETY: the tile addresses rows r..r + rows, columns t..t + cols of
                    // dx, and only valid elements of dy and W (see `TransposedTile`).
                    unsafe { tile.run(rows, cols) };
                    t += cols;
                }
                r += rows;
            }
            p0 += pass;
        }
    }
}

/// One register tile of the transposed product: `rows` rows of `dy` against `cols` input
/// columns of `panels` consecutive panels, added into `dst`.
struct TransposedTile {
    /// `dy[r0, 16 p0]`; row stride `ldy`.
    dy: *const f32,
    ldy: usize,
    /// `W_p0[t0][0]`; panel `p` of the pass starts `p * panel_stride` further.
    w: *const f32,
    panel_stride: usize,
    panels: usize,
    /// Valid `dy` columns (1..=16) in the last panel; the rest are past the end of a row.
    last_valid: usize,
    /// `dx[r0, t0]`; row stride `ldd`.
    dst: *mut f32,
    ldd: usize,
}

impl TransposedTile {
    /// # Safety
    /// `dy` addresses `rows` rows of `16 * (panels - 1) + last_valid` floats at stride `ldy`;
    /// `w` addresses `cols * 16` floats at each panel; `dst` addresses `rows` rows of `cols`
    /// writable floats at stride `ldd`.
    unsafe fn run(&self, rows: usize, cols: usize) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512vl")
        {
            macro_rules! dispatch {
                ($($r:literal)*) => {
                    match (rows, cols) {
                        $(($r, 4) => unsafe { self.avx512::<$r, 4>() },
                          ($r, 3) => unsafe { self.avx512::<$r, 3>() },
                          ($r, 2) => unsafe { self.avx512::<$r, 2>() },
                          ($r, 1) => unsafe { self.avx512::<$r, 1>() },)*
                        _ => unreachable!("tile of {rows} rows x {cols} columns"),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6);
            return;
        }
        unsafe { self.portable(rows, cols) }
    }

    /// Reference loops (any CPU).
    unsafe fn portable(&self, rows: usize, cols: usize) {
        for r in 0..rows {
            for j in 0..cols {
                let mut acc = 0f32;
                for p in 0..self.panels {
                    let valid = if p + 1 == self.panels {
                        self.last_valid
                    } else {
                        PANEL
                    };
                    for c in 0..valid {
                        // SAFETY: inside the tile's inputs (see `run`).
                        let (d, w) = unsafe {
                            (
                                *self.dy.add(r * self.ldy + p * PANEL + c),
                                *self.w.add(p * self.panel_stride + j * PANEL + c),
                            )
                        };
                        acc = d.mul_add(w, acc);
                    }
                }
                // SAFETY: (r, j) is inside the tile's destination.
                unsafe { *self.dst.add(r * self.ldd + j) += acc };
            }
        }
    }

    /// AVX-512VL too: the horizontal reductions use 256- and 128-bit instructions, which
    /// without it can only reach registers 0-15, and the compiler then keeps (and spills)
    /// the accumulators there.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl")]
    unsafe fn avx512<const R: usize, const T: usize>(&self) {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        // Every load is masked: all lanes but in the pass's last panel, where only the valid
        // ones are read (the matrix's padded weights and the floats past the end of a dy row
        // are never touched). One loop body keeps the accumulators in registers.
        let last_mask = ((1u32 << self.last_valid) - 1) as u16;
        for p in 0..self.panels {
            let mask = if p + 1 == self.panels {
                last_mask
            } else {
                u16::MAX
            };
            let w = self.w.wrapping_add(p * self.panel_stride);
            let mut wv = [_mm512_setzero_ps(); T];
            for (j, wv) in wv.iter_mut().enumerate() {
                // SAFETY: panel p < panels holds 16 floats for each of the tile's T columns;
                // only the mask's lanes are read.
                *wv = unsafe { _mm512_maskz_loadu_ps(mask, w.wrapping_add(j * PANEL)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let src = self.dy.wrapping_add(r * self.ldy + p * PANEL);
                // SAFETY: row r < R of dy has 16 valid floats at a full panel, and the mask's
                // lanes at the last one.
                let dv = unsafe { _mm512_maskz_loadu_ps(mask, src) };
                for j in 0..T {
                    acc[j] = _mm512_fmadd_ps(dv, wv[j], acc[j]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let dst = self.dst.wrapping_add(r * self.ldd);
            if T == 4 {
                // The four sums of a row at once: interleave and add pairs within 128-bit
                // lanes until each lane holds [a0, a1, a2, a3] partials, then add the lanes.
                // (`% T` only keeps the indices in range for the other, dead, instances.)
                let (a0, a1, a2, a3) = (acc[0], acc[1 % T], acc[2 % T], acc[3 % T]);
                let t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
                let t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
                let u = _mm512_add_ps(
                    _mm512_shuffle_ps::<0b01_00_01_00>(t0, t1),
                    _mm512_shuffle_ps::<0b11_10_11_10>(t0, t1),
                );
                let u = _mm512_add_ps(u, _mm512_shuffle_f32x4::<0b01_00_11_10>(u, u));
                let u = _mm512_add_ps(u, _mm512_shuffle_f32x4::<0b10_11_00_01>(u, u));
                // SAFETY: columns 0..4 of row r are inside the tile's destination.
                unsafe {
                    _mm_storeu_ps(
                        dst,
                        _mm_add_ps(_mm_loadu_ps(dst), _mm512_castps512_ps128(u)),
                    );
                }
            } else {
                for (j, &a) in acc.iter().enumerate() {
                    // SAFETY: (r, j) is inside the tile's destination.
                    unsafe { *dst.add(j) += _mm512_reduce_add_ps(a) };
                }
            }
        }
    }
}

/// A raw output pointer that tasks writing disjoint columns share.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: only used for disjoint writes (see `PackedMatrix::matmul`).
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

/// One register tile: `rows` rows of `x` (`[rows, k]`) against `panels` consecutive panels
/// (`w`), written to `dst` (row stride `ldd`, `cols` valid columns).
struct Tile<'a> {
    x: &'a [f32],
    k: usize,
    w: &'a [f32],
    dst: *mut f32,
    ldd: usize,
    cols: usize,
}

impl Tile<'_> {
    /// # Safety
    /// `dst` addresses `rows` rows of `cols` writable floats at stride `ldd`.
    unsafe fn run(&self, rows: usize, panels: usize) {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx512f") {
            macro_rules! dispatch {
                ($($r:literal)*) => {
                    match (rows, panels) {
                        $(($r, 2) => unsafe { self.avx512::<$r, 2>() },
                          ($r, 1) => unsafe { self.avx512::<$r, 1>() },)*
                        _ => unreachable!("tile of {rows} rows x {panels} panels"),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6 7 8 9 10 11 12);
            return;
        }
        unsafe { self.portable(rows, panels) }
    }

    /// Reference loops (any CPU), same accumulation order per output as the vector kernel.
    unsafe fn portable(&self, rows: usize, panels: usize) {
        let k = self.k;
        for r in 0..rows {
            let xr = &self.x[r * k..(r + 1) * k];
            for p in 0..panels {
                let w = &self.w[p * k * PANEL..(p + 1) * k * PANEL];
                let mut acc = [0f32; PANEL];
                for (t, &xv) in xr.iter().enumerate() {
                    for (a, &wv) in acc.iter_mut().zip(&w[t * PANEL..(t + 1) * PANEL]) {
                        *a = xv.mul_add(wv, *a);
                    }
                }
                for (c, &a) in acc.iter().enumerate() {
                    let col = p * PANEL + c;
                    if col < self.cols {
                        // SAFETY: (r, col) is inside the tile's destination.
                        unsafe { *self.dst.add(r * self.ldd + col) = a };
                    }
                }
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512<const R: usize, const P: usize>(&self) {
        use std::arch::x86_64::*;
        let k = self.k;
        debug_assert!(self.x.len() >= R * k && self.w.len() >= P * k * PANEL);
        let xp = self.x.as_ptr();
        let wp = self.w.as_ptr();
        let mut acc = [[_mm512_setzero_ps(); P]; R];
        for t in 0..k {
            let mut wv = [_mm512_setzero_ps(); P];
            for (p, wv) in wv.iter_mut().enumerate() {
                // SAFETY: panel p holds k * PANEL floats; t < k.
                *wv = unsafe { _mm512_loadu_ps(wp.add(p * k * PANEL + t * PANEL)) };
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: row r < R of x holds k floats.
                let xv = _mm512_set1_ps(unsafe { *xp.add(r * k + t) });
                for p in 0..P {
                    acc[p] = _mm512_fmadd_ps(xv, wv[p], acc[p]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (p, &a) in acc.iter().enumerate() {
                let first = p * PANEL;
                if first >= self.cols {
                    continue;
                }
                let valid = (self.cols - first).min(PANEL);
                // SAFETY: row r, columns first..first + valid are inside the destination.
                unsafe {
                    let d = self.dst.add(r * self.ldd + first);
                    if valid == PANEL {
                        _mm512_storeu_ps(d, a);
                    } else {
                        _mm512_mask_storeu_ps(d, ((1u32 << valid) - 1) as u16, a);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((*seed >> 40) as f32 / (1u64 << 24) as f32) - 0.5
            })
            .collect()
    }

    /// Every tile shape (rows 1..=12 and beyond, one or two panels, partial last panel)
    /// against a plain f64 loop; unwritten outputs would stay NaN.
    #[test]
    fn packed_matmul_matches_naive_loops() {
        let mut seed = 7u64;
        for &(n, m, k) in &[
            (1, 1, 1),
            (1, 37, 129),
            (3, 70, 65),
            (8, 64, 576),
            (13, 33, 17),
            (25, 130, 77),
            (64, 200, 40),
            (100, 16, 3),
        ] {
            let x = rand_vec(n * k, &mut seed);
            let w = rand_vec(m * k, &mut seed);
            let packed = PackedMatrix::pack(&w, m, k);
            assert_eq!(packed.unpack(), w, "({m},{k}) pack/unpack round trip");
            let mut out = vec![f32::NAN; n * m];
            packed.matmul(&mut out, &x, n);
            let mut portable = vec![f32::NAN; n * m];
            for r in 0..n {
                for p in (0..m.div_ceil(PANEL)).step_by(TILE_PANELS) {
                    let panels = TILE_PANELS.min(m.div_ceil(PANEL) - p);
                    let tile = Tile {
                        x: &x[r * k..(r + 1) * k],
                        k,
                        w: &packed.data[p * k * PANEL..],
                        dst: portable[r * m + p * PANEL..].as_mut_ptr(),
                        ldd: m,
                        cols: (m - p * PANEL).min(panels * PANEL),
                    };
                    unsafe { tile.portable(1, panels) };
                }
            }
            for i in 0..n {
                for j in 0..m {
                    let want: f64 = (0..k)
                        .map(|t| x[i * k + t] as f64 * w[j * k + t] as f64)
                        .sum();
                    for (what, got) in [
                        ("vector", out[i * m + j]),
                        ("portable", portable[i * m + j]),
                    ] {
                        assert!(
                            (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{what} ({n},{m},{k}) [{i},{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod transposed_tests {
    use super::tests::rand_vec;
    use super::*;

    /// `dx = dy @ W` on odd shapes (every tile size, partial last panel, more panels than one
    /// pass) against an f64 loop, through the vector kernel and the portable one. The padded
    /// rows of the last panel are poisoned with NaN after packing: reading them, or dy past a
    /// row's end, would show.
    #[test]
    fn packed_matmul_transposed_matches_naive_loops() {
        let mut seed = 11u64;
        for &(n, m, k) in &[
            (1, 1, 1),
            (1, 37, 129),
            (3, 70, 65),
            (7, 64, 33),
            (13, 33, 17),
            (25, 130, 77),
            (6, 2100, 9),
            (100, 16, 3),
        ] {
            let dy = rand_vec(n * m, &mut seed);
            let w = rand_vec(m * k, &mut seed);
            let mut packed = PackedMatrix::pack(&w, m, k);
            let panels = m.div_ceil(PANEL);
            let last = panels - 1;
            for t in 0..k {
                for c in m - last * PANEL..PANEL {
                    packed.data[last * k * PANEL + t * PANEL + c] = f32::NAN;
                }
            }
            let mut dx = vec![f32::NAN; n * k];
            packed.matmul_transposed(&mut dx, &dy, n);
            let mut portable = vec![0f32; n * k];
            for r in 0..n {
                let mut p0 = 0;
                while p0 < panels {
                    let pass = T_PANELS_PER_PASS.min(panels - p0);
                    let tile = TransposedTile {
                        dy: dy[r * m + p0 * PANEL..].as_ptr(),
                        ldy: m,
                        w: packed.data[p0 * k * PANEL..].as_ptr(),
                        panel_stride: k * PANEL,
                        panels: pass,
                        last_valid: (m - (p0 + pass - 1) * PANEL).min(PANEL),
                        dst: portable[r * k..].as_mut_ptr(),
                        ldd: k,
                    };
                    for t in 0..k {
                        let tile = TransposedTile {
                            w: tile.w.wrapping_add(t * PANEL),
                            dst: tile.dst.wrapping_add(t),
                            ..tile
                        };
                        unsafe { tile.portable(1, 1) };
                    }
                    p0 += pass;
                }
            }
            for i in 0..n {
                for t in 0..k {
                    let want: f64 = (0..m)
                        .map(|j| dy[i * m + j] as f64 * w[j * k + t] as f64)
                        .sum();
                    for (what, got) in
                        [("vector", dx[i * k + t]), ("portable", portable[i * k + t])]
                    {
                        assert!(
                            (got as f64 - want).abs() < 1e-4 * (1.0 + want.abs()),
                            "{what} ({n},{m},{k}) [{i},{t}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod timing {
    /// Manual timing aid: the packed product against `gemm` on the default model's shapes,
    /// `cargo test --release --lib packed_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn packed_timing() {
        let shapes = [
            (1, 1536, 576),
            (8, 3072, 576),
            (32, 3072, 576),
            (64, 3072, 576),
            (64, 576, 1536),
            (64, 49152, 576),
            (512, 3072, 576),
            (512, 576, 1536),
            (600, 576, 576),
            (600, 3072, 576),
            (600, 576, 1536),
            (128, 49152, 576),
        ];
        for (n, m, k) in shapes {
            let x = vec![0.5f32; n * k];
            let w = vec![0.25f32; m * k];
            let packed = super::PackedMatrix::pack(&w, m, k);
            let mut out = vec![0f32; n * m];
            let mut time = |f: &dyn Fn(&mut [f32])| {
                f(&mut out);
                let t = std::time::Instant::now();
                for _ in 0..10 {
                    f(&mut out);
                }
                t.elapsed().as_secs_f64() / 10.0
            };
            let p = time(&|o| packed.matmul(o, &x, n));
            let g = time(&|o| super::super::matmul::matmul_nt(o, &x, &w, n, m, k));
            let dy = vec![0.5f32; n * m];
            let mut dx = vec![0f32; n * k];
            packed.matmul_transposed(&mut dx, &dy, n);
            let t = std::time::Instant::now();
            for _ in 0..10 {
                packed.matmul_transposed(&mut dx, &dy, n);
            }
            let tr = t.elapsed().as_secs_f64() / 10.0;
            let gf = |s: f64| 2.0 * (n * m * k) as f64 / s / 1e9;
            eprintln!(
                "n={n:>3} m={m:>5} k={k:>4}: packed {:7.1} GFLOP/s, transposed {:7.1} GFLOP/s, \
                 gemm crate {:7.1} GFLOP/s",
                gf(p),
                gf(tr),
                gf(g)
            );
        }
    }
}
