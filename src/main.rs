//! `genius-engine`: the command-line entry point. All logic lives in the library (`cli`).

use clap::Parser;

fn main() {
    let cli = genius_engine::cli::Cli::parse();
    if let Err(e) = genius_engine::cli::run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
