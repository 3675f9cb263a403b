//! `linear` for the few rows of a decode step on the kernels of `kernels/skinny_gemm.cu`:
//! opt-in (`$GENIUS_CUDA_SKINNY_GEMM=1`, [`super::CudaOptions::skinny_gemm`]) beside
//! cuBLASLt, for A/B runs. A 64-row x 128-feature tile per block, with the K dimension split
//! over blocks ([`plan_skinny_gemm`]) until the grid covers the chip twice, and the split
//! products summed in split order by a second kernel: the same bits in every process, unlike
//! timed algorithm choices.
//!
//! The plan is tested on the CPU; the kernels in the CPU emulation (`tests/kernel_emu.rs`) and
//! against the CPU backend in `tests/cuda_ops.rs` (skipped without a GPU).

use super::args;
use super::backend::CudaBackend;
use super::context::grid_stride_config;
use anyhow::Result;
use cudarc::driver::LaunchConfig;

/// Environment variable: `1` runs `linear` on the skinny GEMM kernels where they apply.
pub const SKINNY_GEMM_ENV: &str = "GENIUS_CUDA_SKINNY_GEMM";
/// Threads per block (`GE_SG_THREADS`).
pub const THREADS: u32 = 256;
/// Rows of y per block (`GE_SG_BM`).
pub const TILE_ROWS: usize = 64;
/// Output features per block (`GE_SG_BN`).
pub const TILE_OUT: usize = 128;
/// K per pipeline step (`GE_SG_BK`); splits are multiples of it.
pub const STEP_K: usize = 32;
/// Most rows the kernels take: past this, cuBLASLt's large tiles fill the chip anyway.
pub const MAX_ROWS: usize = 512;
/// Most output features: the LM head (a vocabulary of rows) stays on cuBLASLt.
pub const MAX_OUT: usize = 32768;
/// Smallest K of one split (4 steps).
pub const MIN_SPLIT_K: usize = 128;
/// Most splits: the f32 partial products grow with them.
pub const MAX_SPLITS: usize = 16;

/// How one skinny GEMM is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkinnyPlan {
    /// Blocks over output features (grid x).
    pub out_tiles: usize,
    /// Blocks over rows (grid y).
    pub row_tiles: usize,
    /// K splits (grid z); 1 writes y directly.
    pub splits: usize,
    /// K per split, a multiple of [`STEP_K`].
    pub k_per_split: usize,
}

impl SkinnyPlan {
    /// f32 elements of the split products (`[splits, rows, out]`); zero when not split.
    pub fn partial_len(&self, rows: usize, out: usize) -> usize {
        if self.splits == 1 {
            0
        } else {
            self.splits * rows * out
        }
    }
}

/// The layout of `y [rows, out] = x [rows, inp] w [out, inp]^T` on `num_sms` SMs, or `None`
/// where the kernels do not apply: no rows or features, more than [`MAX_ROWS`] rows or
/// [`MAX_OUT`] features, or `inp` not a multiple of 8 (16-byte rows). K is split into as many
/// parts (each a multiple of [`STEP_K`], at least [`MIN_SPLIT_K`] where K allows, at most
/// [`MAX_SPLITS`]) as bring the grid to two blocks per SM.
pub fn plan_skinny_gemm(rows: usize, out: usize, inp: usize, num_sms: usize) -> Option<SkinnyPlan> {
    if rows == 0
        || out == 0
        || inp == 0
        || rows > MAX_ROWS
        || out > MAX_OUT
        || !inp.is_multiple_of(8)
    {
        return None;
    }
    let out_tiles = out.div_ceil(TILE_OUT);
    let row_tiles = rows.div_ceil(TILE_ROWS);
    let tiles = out_tiles * row_tiles;
    let target = 2 * num_sms.max(1);
    let max_splits = (inp / MIN_SPLIT_K).clamp(1, MAX_SPLITS);
    let wanted = target.div_ceil(tiles).clamp(1, max_splits);
    let k_per_split = inp.div_ceil(wanted).next_multiple_of(STEP_K);
    // Rounding the split up can leave the last ones empty.
    let splits = inp.div_ceil(k_per_split);
    Some(SkinnyPlan {
        out_tiles,
        row_tiles,
        splits,
        k_per_split,
    })
}

impl CudaBackend {
    /// `y = x w^T (+ bias)` on the skinny GEMM kernels, with device addresses (`x` bf16
    /// `[rows, inp]`, `w` bf16 `[out, inp]`, `bias` bf16 `[out]`, `y` bf16 `[rows, out]`),
    /// laid out by `plan` (from [`plan_skinny_gemm`] for these sizes).
    ///
    /// # Safety
    /// The addresses must hold live buffers of those shapes until the stream has run the
    /// kernels.
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn skinny_linear(
        &self,
        plan: &SkinnyPlan,
        x: u64,
        w: u64,
        bias: Option<u64>,
        y: u64,
        rows: usize,
        out: usize,
        inp: usize,
    ) -> Result<()> {
        let op = "linear (skinny GEMM)";
        let partial = self.gpu.alloc::<f32>(plan.partial_len(rows, out))?;
        let a = args::SkinnyGemmArgs {
            x,
            w,
            bias: bias.unwrap_or(0),
            y,
            partial: self.gpu.ptr(&partial),
            rows: super::backend::int(rows, op, "rows")?,
            out: super::backend::int(out, op, "out features")?,
            inp: super::backend::int(inp, op, "in features")?,
            k_per_split: super::backend::int(plan.k_per_split, op, "K per split")?,
            splits: super::backend::int(plan.splits, op, "splits")?,
            pad_: 0,
        };
        let cfg = LaunchConfig {
            grid_dim: (
                plan.out_tiles as u32,
                plan.row_tiles as u32,
                plan.splits as u32,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: forwarded from the caller for x, w, bias and y; `partial` holds
        // splits * rows * out f32s when split, and is freed stream-ordered after the kernels.
        unsafe { self.gpu.launch("ge_skinny_gemm", cfg, &a) }?;
        if plan.splits > 1 {
            // SAFETY: as above; the GEMM wrote every element of every split's product.
            unsafe {
                self.gpu
                    .launch("ge_skinny_gemm_reduce", grid_stride_config(rows * out), &a)
            }?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of `#define NAME VALUE` in `kernels/skinny_gemm.cu`.
    fn kernel_define(name: &str) -> String {
        include_str!("../../../kernels/skinny_gemm.cu")
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("#define {name} ")))
            .unwrap_or_else(|| panic!("{name} in kernels/skinny_gemm.cu"))
            .trim()
            .to_string()
    }

    #[test]
    fn constants_are_the_kernels() {
        assert_eq!(kernel_define("GE_SG_THREADS"), THREADS.to_string());
        assert_eq!(kernel_define("GE_SG_BM"), TILE_ROWS.to_string());
        assert_eq!(kernel_define("GE_SG_BN"), TILE_OUT.to_string());
        assert_eq!(kernel_define("GE_SG_BK"), STEP_K.to_string());
    }

    #[test]
    fn decode_shapes_of_qwen_half_b_fill_the_chip() {
        // Down projection at 256 rows: 7 x 4 tiles, 264 blocks wanted -> 10 splits of 512.
        let p = plan_skinny_gemm(256, 896, 4864, 132).unwrap();
        assert_eq!((p.out_tiles, p.row_tiles), (7, 4));
        assert_eq!((p.splits, p.k_per_split), (10, 512));
        // Gate/up at 256 rows: 76 x 4 tiles already fill it.
        let p = plan_skinny_gemm(256, 9728, 896, 132).unwrap();
        assert_eq!((p.splits, p.k_per_split), (1, 896));
        // q/k/v at 64 rows: 9 tiles; K = 896 allows 7 splits of 128.
        let p = plan_skinny_gemm(64, 1152, 896, 132).unwrap();
        assert_eq!(
            (p.out_tiles, p.row_tiles, p.splits, p.k_per_split),
            (9, 1, 7, 128)
        );
        assert_eq!(p.partial_len(64, 1152), 7 * 64 * 1152);
    }

    #[test]
    fn splits_cover_k_exactly_and_are_whole_steps() {
        for rows in [1, 3, 64, 65, 200, 512] {
            for out in [1, 8, 130, 896, 4864, 32768] {
                for inp in [8, 24, 136, 896, 1000, 4864, 8960] {
                    let p = plan_skinny_gemm(rows, out, inp, 132).unwrap();
                    assert!(p.k_per_split.is_multiple_of(STEP_K));
                    assert!(p.splits >= 1 && p.splits <= MAX_SPLITS);
                    // Every K index is in some split, and the last split is not empty.
                    assert!(p.splits * p.k_per_split >= inp);
                    assert!((p.splits - 1) * p.k_per_split < inp);
                    if p.splits > 1 {
                        assert!(p.k_per_split >= MIN_SPLIT_K.min(inp));
                    }
                    assert!(p.out_tiles * TILE_OUT >= out);
                    assert!(p.row_tiles * TILE_ROWS >= rows);
                }
            }
        }
    }

    #[test]
    fn shapes_it_does_not_take() {
        assert_eq!(plan_skinny_gemm(0, 896, 896, 132), None);
        assert_eq!(plan_skinny_gemm(513, 896, 896, 132), None);
        assert_eq!(plan_skinny_gemm(256, 151936, 896, 132), None);
        assert_eq!(plan_skinny_gemm(256, 896, 900, 132), None);
        assert_eq!(plan_skinny_gemm(256, 0, 896, 132), None);
    }
}
