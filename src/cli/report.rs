//! `genius-engine report RUN_DIR [--out DIR]`: charts (SVG) and a text summary of a run folder
//! (see [`crate::report`] for what is read and written).

use anyhow::Result;
use std::path::PathBuf;

/// `report`'s arguments.
#[derive(clap::Args, Debug, Clone)]
pub struct ReportArgs {
    /// A `genius-engine run --out` folder.
    pub run_dir: PathBuf,
    /// Where the charts and report.txt go [default: RUN_DIR/report].
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &ReportArgs) -> Result<()> {
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| args.run_dir.join("report"));
    let report = crate::report::write_report(&args.run_dir, &out)?;
    print!("{}", report.text);
    eprintln!("report in {}", report.summary_path.display());
    Ok(())
}
