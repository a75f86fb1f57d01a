//! `medmerge-merge`: merges data vectors onto their base without loading libtorch, so a merge
//! costs what reading the vectors and writing one model cost. The same merge as
//! `medmerge-trainer merge`, less that one's libtorch probe of the merged model (`restore` probes
//! the model it publishes) and the secure sum (which needs the trainer).

use clap::Parser;
use medmerge_merge::cli::{named_vectors, MergeFlags};
use medmerge_merge::merge::merge_files;

/// Merge data vectors onto their base (plain Rust: no libtorch).
#[derive(Parser)]
#[command(name = "medmerge-merge", version)]
struct Args {
    /// Vectors as NAME=PATH (repeatable).
    #[arg(long = "vector", required = true)]
    vectors: Vec<String>,
    #[command(flatten)]
    flags: MergeFlags,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let merged = (|| -> anyhow::Result<()> {
        let vectors = named_vectors("vector", &args.vectors)?;
        merge_files(&args.flags.base, &vectors, &args.flags.options()?, &args.flags.out)?;
        Ok(())
    })();
    match merged {
        Ok(()) => {
            println!("merged model written to {}", args.flags.out.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
