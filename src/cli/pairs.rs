//! `genius-engine pairs`: one preference pair per step of every sampled query
//! (method.md section 2), from `trajectories.jsonl` to `pairs.jsonl` (written atomically).

use crate::genius::pairs::{
    PairOptions, RejectStrategy, build_pairs, read_trajectories, write_jsonl,
};
use anyhow::{Result, bail};
use std::path::{Path, PathBuf};

/// How the rejected candidate is picked (flag form of [`RejectStrategy`]).
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RejectFlag {
    /// Uniformly among the step's other candidates (the release; default).
    #[default]
    Uniform,
    /// The lowest f (the paper's "w/o sampling" ablation).
    Lowest,
}

impl From<RejectFlag> for RejectStrategy {
    fn from(f: RejectFlag) -> Self {
        match f {
            RejectFlag::Uniform => RejectStrategy::Uniform,
            RejectFlag::Lowest => RejectStrategy::Lowest,
        }
    }
}

/// `pairs`' flags.
#[derive(clap::Args, Debug, Clone)]
pub struct PairsArgs {
    /// trajectories.jsonl from `sample`.
    #[arg(long)]
    pub trajectories: PathBuf,
    /// Output pairs.jsonl.
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, value_enum, default_value_t = RejectFlag::Uniform)]
    pub rejected: RejectFlag,
    /// Seed of the uniform pick.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Drop candidates whose trajectory has at least this many characters (the release used
    /// 10000); default: keep all.
    #[arg(long)]
    pub max_chars: Option<usize>,
}

pub fn run(args: &PairsArgs) -> Result<()> {
    let opts = PairOptions {
        strategy: args.rejected.into(),
        seed: args.seed,
        max_chars: args.max_chars,
    };
    let (queries, pairs) = pairs_phase(&args.trajectories, &args.output, &opts)?;
    eprintln!(
        "{pairs} pairs from {queries} queries -> {}",
        args.output.display()
    );
    Ok(())
}

/// A stable per-query number for the uniform pick: FNV-1a of the query id (the order of lines
/// in a resumed trajectories file is not stable, the ids are).
pub fn query_key(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Builds every pair and writes them; returns (queries, pairs). Zero pairs is an error: there
/// would be nothing to train on.
pub fn pairs_phase(
    trajectories: &Path,
    output: &Path,
    opts: &PairOptions,
) -> Result<(usize, usize)> {
    let trajs = read_trajectories(trajectories)?;
    let mut pairs = Vec::new();
    for t in &trajs {
        pairs.extend(build_pairs(t, query_key(&t.id), opts)?);
    }
    if pairs.is_empty() {
        bail!(
            "{}: no preference pairs could be built from {} queries (each step needs at least 2 candidates{})",
            trajectories.display(),
            trajs.len(),
            if opts.max_chars.is_some() {
                " shorter than --max-chars"
            } else {
                ""
            }
        );
    }
    write_jsonl(output, &pairs)?;
    Ok((trajs.len(), pairs.len()))
}
