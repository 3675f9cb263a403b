//! The optimizer side of training: AdamW over a list of flat f32 parameter slices with f32
//! moment state, the linear warm-up / linear decay learning-rate schedule, global
//! gradient-norm clipping, and the optimizer's state files so that training can resume.
//!
//! # AdamW (as `torch.optim.AdamW`, `amsgrad = false`)
//!
//! Update number `t` (1-based, `t = step_count()` after the call), for every element:
//!
//! ```text
//! p <- p - lr * weight_decay * p                   (decoupled weight decay)
//! m <- beta1 * m + (1 - beta1) * g
//! v <- beta2 * v + (1 - beta2) * g^2
//! p <- p - lr * (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)
//! ```
//!
//! The bias corrections are computed in f64; the element arithmetic is f32.
//!
//! # Schedule
//!
//! [`LrSchedule::lr`]`(s)` is the learning rate of optimizer update `s`, **0-based** (the
//! number of updates already done), exactly HF `get_linear_schedule_with_warmup`:
//! `peak * s / warmup` for `s < warmup`, else
//! `peak * max(0, (total - s) / max(1, total - warmup))`. HF's `LambdaLR` applies the value
//! *before* stepping, so with `warmup > 0` the very first update uses learning rate 0; this
//! schedule does the same (update 0 gets `lr(0) = 0`).
//!
//! # Clipping
//!
//! [`clip_grad_norm`] computes the global L2 norm over all slices (accumulated in f64) and,
//! when it exceeds `max_norm`, scales every gradient by `max_norm / norm` so the clipped norm is
//! `max_norm` up to f32 rounding (torch adds 1e-6 to the denominator; this does not). It
//! returns the norm before clipping. A non-finite norm leaves the gradients untouched: the
//! caller should skip that update.
//!
//! # State files
//!
//! [`AdamW::save`] writes into a directory: `adamw_m.f32` and `adamw_v.f32` (every slice's
//! moments concatenated in order, raw little-endian f32) and `adamw.json` (format version,
//! update count, hyper-parameters, slice lengths), the header last, each through a temporary
//! file and a rename, so a present header means complete moment files.

use anyhow::{Context, Result, bail, ensure};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::Path;

/// Linear warm-up from 0 to `peak`, then linear decay to 0 at `total_steps` (HF
/// `get_linear_schedule_with_warmup`; see the module comment for the exact formula).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LrSchedule {
    /// The learning rate at the end of warm-up.
    pub peak: f64,
    /// Number of warm-up updates.
    pub warmup_steps: u64,
    /// Total number of updates; the rate is 0 from here on.
    pub total_steps: u64,
}

impl LrSchedule {
    /// A schedule whose warm-up is `warmup_ratio * total_steps` updates, rounded up (HF
    /// `get_warmup_steps`: `ceil(total * ratio)`).
    pub fn with_warmup_ratio(peak: f64, warmup_ratio: f64, total_steps: u64) -> Self {
        LrSchedule {
            peak,
            warmup_steps: (total_steps as f64 * warmup_ratio).ceil() as u64,
            total_steps,
        }
    }

    /// The learning rate of update `step` (0-based: the number of updates already done).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * step as f64 / self.warmup_steps.max(1) as f64;
        }
        let left = self.total_steps.saturating_sub(step) as f64;
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        self.peak * (left / span).max(0.0)
    }
}

/// AdamW hyper-parameters (torch defaults except `weight_decay`, which is the paper's 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Decoupled weight decay (multiplied by the learning rate).
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl AdamWConfig {
    /// Checks the ranges: betas in `[0, 1)`, `eps > 0`, `weight_decay >= 0`, all finite.
    pub fn validate(&self) -> Result<()> {
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            ensure!((0.0..1.0).contains(&b), "{name} must be in [0, 1), got {b}");
        }
        ensure!(
            self.eps.is_finite() && self.eps > 0.0,
            "eps must be finite and > 0, got {}",
            self.eps
        );
        ensure!(
            self.weight_decay.is_finite() && self.weight_decay >= 0.0,
            "weight_decay must be finite and >= 0, got {}",
            self.weight_decay
        );
        Ok(())
    }
}

/// The default `max_norm` for [`clip_grad_norm`].
pub const DEFAULT_MAX_GRAD_NORM: f64 = 1.0;

/// Global L2 norm over all gradient slices, accumulated in f64.
pub fn global_grad_norm(grads: &[&[f32]]) -> f64 {
    grads
        .iter()
        .flat_map(|g| g.iter())
        .map(|&x| f64::from(x) * f64::from(x))
        .sum::<f64>()
        .sqrt()
}

/// Scales all gradients by `max_norm / norm` when the global norm exceeds `max_norm`; returns
/// the norm before clipping. A non-finite norm leaves the gradients as they are.
pub fn clip_grad_norm(grads: &mut [&mut [f32]], max_norm: f64) -> f64 {
    let norm = {
        let views: Vec<&[f32]> = grads.iter().map(|g| &**g).collect();
        global_grad_norm(&views)
    };
    if norm.is_finite() && norm > max_norm {
        let scale = (max_norm / norm) as f32;
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= scale;
            }
        }
    }
    norm
}

/// AdamW state: the update count and the f32 moments of every parameter slice.
#[derive(Debug, Clone, PartialEq)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// The JSON header of the saved state.
#[derive(Debug, Serialize, Deserialize)]
struct StateHeader {
    format: String,
    version: u32,
    step: u64,
    config: AdamWConfig,
    lengths: Vec<usize>,
}

const HEADER_FILE: &str = "adamw.json";
const M_FILE: &str = "adamw_m.f32";
const V_FILE: &str = "adamw_v.f32";
const FORMAT: &str = "genius-engine adamw state";
const VERSION: u32 = 1;

impl AdamW {
    /// Zero state for parameter slices of the given lengths.
    pub fn new(config: AdamWConfig, lengths: &[usize]) -> Result<Self> {
        config.validate()?;
        Ok(AdamW {
            config,
            step: 0,
            m: lengths.iter().map(|&n| vec![0.0; n]).collect(),
            v: lengths.iter().map(|&n| vec![0.0; n]).collect(),
        })
    }

    /// A state from its parts (moments of every slice, `step` updates done).
    pub fn from_parts(
        config: AdamWConfig,
        step: u64,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    ) -> Result<Self> {
        config.validate()?;
        ensure!(
            m.len() == v.len() && m.iter().zip(&v).all(|(a, b)| a.len() == b.len()),
            "AdamW: first and second moments differ in shape"
        );
        Ok(AdamW { config, step, m, v })
    }

    /// `(config, step, m, v)`: the inverse of [`Self::from_parts`].
    pub fn into_parts(self) -> (AdamWConfig, u64, Vec<Vec<f32>>, Vec<Vec<f32>>) {
        (self.config, self.step, self.m, self.v)
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// Number of updates done so far (the 0-based index of the next one, as
    /// [`LrSchedule::lr`] takes it).
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The lengths of the parameter slices this state is for.
    pub fn lengths(&self) -> Vec<usize> {
        self.m.iter().map(Vec::len).collect()
    }

    /// First and second moments of slice `i` (panics if there is no slice `i`).
    pub fn moments(&self, i: usize) -> (&[f32], &[f32]) {
        (&self.m[i], &self.v[i])
    }

    /// One AdamW update of every slice with learning rate `lr` (see the module comment).
    /// `params` and `grads` must match the lengths given at construction.
    pub fn step(&mut self, params: &mut [&mut [f32]], grads: &[&[f32]], lr: f64) -> Result<()> {
        ensure!(
            lr.is_finite() && lr >= 0.0,
            "learning rate must be finite and >= 0, got {lr}"
        );
        ensure!(
            params.len() == self.m.len() && grads.len() == self.m.len(),
            "AdamW holds {} slices, got {} parameter and {} gradient slices",
            self.m.len(),
            params.len(),
            grads.len()
        );
        for (i, (p, g)) in params.iter().zip(grads).enumerate() {
            ensure!(
                p.len() == self.m[i].len() && g.len() == self.m[i].len(),
                "slice {i}: AdamW state has {} elements, parameter {}, gradient {}",
                self.m[i].len(),
                p.len(),
                g.len()
            );
        }
        self.step += 1;
        let c = &self.config;
        let s = crate::backend::AdamWStep::new(
            c.beta1,
            c.beta2,
            c.eps,
            c.weight_decay,
            self.step,
            lr,
            1.0,
        );
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            crate::backend::adamw_update_host(p, &mut self.m[i], &mut self.v[i], g, &s);
        }
        Ok(())
    }

    /// Writes the state into `dir` (created if missing): see the module comment.
    pub fn save(&self, dir: &Path) -> Result<()> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        write_atomic(&dir.join(M_FILE), |w| write_f32s(w, &self.m))?;
        write_atomic(&dir.join(V_FILE), |w| write_f32s(w, &self.v))?;
        let header = StateHeader {
            format: FORMAT.to_string(),
            version: VERSION,
            step: self.step,
            config: self.config,
            lengths: self.lengths(),
        };
        write_atomic(&dir.join(HEADER_FILE), |w| {
            serde_json::to_writer_pretty(&mut *w, &header)?;
            w.write_all(b"\n")?;
            Ok(())
        })
    }

    /// Reads a state written by [`AdamW::save`].
    pub fn load(dir: &Path) -> Result<Self> {
        let hpath = dir.join(HEADER_FILE);
        let text =
            fs::read_to_string(&hpath).with_context(|| format!("reading {}", hpath.display()))?;
        let header: StateHeader = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an AdamW state header", hpath.display()))?;
        ensure!(
            header.format == FORMAT && header.version == VERSION,
            "{}: format '{}' version {}, expected '{FORMAT}' version {VERSION}",
            hpath.display(),
            header.format,
            header.version
        );
        header.config.validate()?;
        let m = read_f32s(&dir.join(M_FILE), &header.lengths)?;
        let v = read_f32s(&dir.join(V_FILE), &header.lengths)?;
        Ok(AdamW {
            config: header.config,
            step: header.step,
            m,
            v,
        })
    }
}

/// Writes through `path.tmp` and renames it over `path`.
fn write_atomic(path: &Path, f: impl FnOnce(&mut dyn Write) -> Result<()>) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let file = fs::File::create(tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(file);
    f(&mut w).with_context(|| format!("writing {}", tmp.display()))?;
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    fs::rename(tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

/// Raw little-endian f32 values of every slice, in order.
fn write_f32s(w: &mut dyn Write, slices: &[Vec<f32>]) -> Result<()> {
    for s in slices {
        if cfg!(target_endian = "little") {
            w.write_all(bytemuck::cast_slice(s))?;
        } else {
            for chunk in s.chunks(1 << 14) {
                let bytes: Vec<u8> = chunk.iter().flat_map(|x| x.to_le_bytes()).collect();
                w.write_all(&bytes)?;
            }
        }
    }
    Ok(())
}

/// Reads a file written by [`write_f32s`] back into slices of the given lengths.
fn read_f32s(path: &Path, lengths: &[usize]) -> Result<Vec<Vec<f32>>> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let total: usize = lengths.iter().sum();
    if bytes.len() != total * 4 {
        bail!(
            "{}: {} bytes, expected {} ({} f32 values)",
            path.display(),
            bytes.len(),
            total * 4,
            total
        );
    }
    let mut out = Vec::with_capacity(lengths.len());
    let mut at = 0;
    for &n in lengths {
        let chunk = &bytes[at * 4..(at + n) * 4];
        out.push(
            chunk
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
        );
        at += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_adamw_step_hand_computed() {
        // lr = 0.1, betas (0.9, 0.999), eps 1e-8, weight decay 0.5, t = 1.
        // p = 1.0, g = 0.2:
        //   decay: p = 1.0 * (1 - 0.1*0.5) = 0.95
        //   m = 0.1*0.2 = 0.02, v = 0.001*0.04 = 4e-5
        //   m_hat = 0.02/0.1 = 0.2, v_hat = 4e-5/0.001 = 0.04, sqrt = 0.2
        //   p = 0.95 - 0.1 * 0.2/(0.2 + 1e-8) = 0.8500000049999997
        // p = -2.0, g = -0.5 (Adam's first step is lr * sign(g) up to eps):
        //   decay: -2.0 * 0.95 = -1.9; p = -1.9 + 0.1 * 0.5/(0.5 + 1e-8) = -1.800000002
        // Second step, same gradients, t = 2, for p = 0.8500000049999997, g = 0.2:
        //   decay: 0.8500000049999997*0.95 = 0.80750000475
        //   m = 0.9*0.02 + 0.1*0.2 = 0.038, v = 0.999*4e-5 + 0.001*0.04 = 7.996e-5
        //   m_hat = 0.038/0.19 = 0.2, v_hat = 7.996e-5/0.001999 = 0.04, sqrt = 0.2
        //   p = 0.8075000047499998 - 0.1*0.2/(0.2+1e-8) = 0.7075000097499995
        let cfg = AdamWConfig {
            weight_decay: 0.5,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(cfg, &[1, 1]).unwrap();
        let mut a = [1.0f32];
        let mut b = [-2.0f32];
        let (ga, gb) = ([0.2f32], [-0.5f32]);
        opt.step(&mut [&mut a, &mut b], &[&ga, &gb], 0.1).unwrap();
        assert_eq!(opt.step_count(), 1);
        assert!(
            (f64::from(a[0]) - 0.8500000049999997).abs() < 1e-6,
            "{}",
            a[0]
        );
        assert!((f64::from(b[0]) - -1.800000002).abs() < 1e-6, "{}", b[0]);
        assert!((opt.moments(0).0[0] / 0.02 - 1.0).abs() < 1e-6);
        assert!((opt.moments(0).1[0] / 4e-5 - 1.0).abs() < 1e-6);
        opt.step(&mut [&mut a, &mut b], &[&ga, &gb], 0.1).unwrap();
        assert!(
            (f64::from(a[0]) - 0.7075000097499995).abs() < 1e-6,
            "{}",
            a[0]
        );
        assert!((opt.moments(0).0[0] / 0.038 - 1.0).abs() < 1e-6);
        assert!((opt.moments(0).1[0] / 7.996e-5 - 1.0).abs() < 1e-6);
    }

    #[test]
    fn small_gradient_shows_eps_and_bias_correction() {
        // No decay, g = 1e-8: m_hat = 1e-8, v_hat = 1e-16, sqrt = 1e-8;
        // p = 0 - 1.0 * 1e-8/(1e-8 + 1e-8) = -0.5 (eps matters; without bias correction
        // it would be -1.0 * 1e-9/(sqrt(1e-19)+1e-8) = -0.0760...).
        let mut opt = AdamW::new(AdamWConfig::default(), &[1]).unwrap();
        let mut p = [0.0f32];
        opt.step(&mut [&mut p], &[&[1e-8]], 1.0).unwrap();
        assert!((p[0] + 0.5).abs() < 1e-5, "{}", p[0]);
    }

    #[test]
    fn step_checks_lengths() {
        let mut opt = AdamW::new(AdamWConfig::default(), &[2, 3]).unwrap();
        let mut a = [0.0f32; 2];
        let mut b = [0.0f32; 2];
        let e = opt
            .step(&mut [&mut a, &mut b], &[&[0.0; 2], &[0.0; 2]], 0.1)
            .unwrap_err();
        assert!(e.to_string().contains("slice 1"), "{e}");
        assert!(opt.step(&mut [&mut a], &[&[0.0; 2]], 0.1).is_err());
        assert_eq!(opt.step_count(), 0);
        let bad = AdamWConfig {
            beta2: 1.0,
            ..AdamWConfig::default()
        };
        assert!(AdamW::new(bad, &[1]).is_err());
    }

    #[test]
    fn schedule_matches_hf_linear_with_warmup() {
        // peak 1e-3, warmup 10, total 100.
        let s = LrSchedule {
            peak: 1e-3,
            warmup_steps: 10,
            total_steps: 100,
        };
        assert_eq!(s.lr(0), 0.0); // HF: the first update runs at lr 0
        assert!((s.lr(1) - 1e-4).abs() < 1e-18);
        assert!((s.lr(5) - 5e-4).abs() < 1e-18);
        assert_eq!(s.lr(10), 1e-3); // (100-10)/90 = 1
        assert!((s.lr(55) - 5e-4).abs() < 1e-18); // 45/90
        assert!((s.lr(99) - 1e-3 / 90.0).abs() < 1e-18);
        assert_eq!(s.lr(100), 0.0);
        assert_eq!(s.lr(150), 0.0);
        // No warm-up: starts at peak.
        let s0 = LrSchedule {
            peak: 2.0,
            warmup_steps: 0,
            total_steps: 4,
        };
        assert_eq!(
            (0..5).map(|i| s0.lr(i)).collect::<Vec<_>>(),
            vec![2.0, 1.5, 1.0, 0.5, 0.0]
        );
        // 10% warm-up of 25 updates rounds up to 3.
        assert_eq!(LrSchedule::with_warmup_ratio(5e-7, 0.1, 25).warmup_steps, 3);
        assert_eq!(
            LrSchedule::with_warmup_ratio(5e-7, 0.1, 100).warmup_steps,
            10
        );
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        // Norm of (3, 4) and (12) is 13.
        let mut a = [3.0f32, 4.0];
        let mut b = [12.0f32];
        let norm = clip_grad_norm(&mut [&mut a, &mut b], 1.0);
        assert_eq!(norm, 13.0);
        let after = global_grad_norm(&[&a, &b]);
        assert!((after - 1.0).abs() < 1e-6, "{after}");
        assert!((a[0] - 3.0 / 13.0).abs() < 1e-7 && (b[0] - 12.0 / 13.0).abs() < 1e-7);
        // Below the threshold nothing changes.
        let mut c = [0.3f32, 0.4];
        assert!((clip_grad_norm(&mut [&mut c], 1.0) - 0.5).abs() < 1e-7);
        assert_eq!(c, [0.3, 0.4]);
        // Non-finite norms are reported and leave the gradients alone.
        let mut d = [f32::NAN, 1.0];
        assert!(clip_grad_norm(&mut [&mut d], 1.0).is_nan());
        assert_eq!(d[1], 1.0);
        assert_eq!(global_grad_norm(&[]), 0.0);
    }

    #[test]
    fn saved_state_resumes_identically() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = AdamWConfig {
            weight_decay: 0.01,
            ..AdamWConfig::default()
        };
        let mut opt = AdamW::new(cfg, &[3, 0, 2]).unwrap();
        let mut p = (vec![0.5f32, -1.0, 2.0], vec![], vec![0.25f32, 3.0]);
        let grads = |k: f32| (vec![0.1 * k, -0.2, 0.3], vec![], vec![-0.05 * k, 0.7]);
        for k in 0..3 {
            let g = grads(k as f32);
            opt.step(
                &mut [&mut p.0, &mut p.1, &mut p.2],
                &[&g.0, &g.1, &g.2],
                1e-2,
            )
            .unwrap();
        }
        opt.save(dir.path()).unwrap();
        let mut loaded = AdamW::load(dir.path()).unwrap();
        assert_eq!(loaded, opt);
        assert_eq!(loaded.step_count(), 3);
        let mut q = p.clone();
        let g = grads(5.0);
        opt.step(
            &mut [&mut p.0, &mut p.1, &mut p.2],
            &[&g.0, &g.1, &g.2],
            1e-2,
        )
        .unwrap();
        loaded
            .step(
                &mut [&mut q.0, &mut q.1, &mut q.2],
                &[&g.0, &g.1, &g.2],
                1e-2,
            )
            .unwrap();
        assert_eq!(p, q);
        assert_eq!(loaded, opt);
        // A truncated moment file is an error naming it.
        let m = dir.path().join(M_FILE);
        let bytes = fs::read(&m).unwrap();
        fs::write(&m, &bytes[..bytes.len() - 4]).unwrap();
        let e = AdamW::load(dir.path()).unwrap_err();
        assert!(e.to_string().contains("adamw_m.f32"), "{e}");
    }
}
