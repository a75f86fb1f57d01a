//! Runs a whole MergeJob (or one of its stages) in process.

use std::path::PathBuf;

use medmerge_trainer::pipeline::{Job, Runner};
use tch::Device;

use crate::stdout::say;

/// The subcommand's flags.
#[derive(clap::Args)]
pub struct Args {
    /// MergeJob YAML file.
    job: PathBuf,
    /// Run only this stage (e.g. `finetune-hospital-a`), as a cluster Job would.
    #[arg(long)]
    stage: Option<String>,
    /// Print every stage and whether it is done, ready or waiting; run nothing.
    #[arg(long, conflicts_with = "stage")]
    plan: bool,
    /// With `--stage collect-<shard>`: wait up to this many seconds for the hospital's
    /// vector to appear (looking every 10 s) instead of failing at once; with a secure-sum
    /// `--stage merge-<candidate>`: for the survivors' shares about hospitals that dropped out.
    #[arg(long, requires = "stage", default_value_t = 0)]
    wait_for_vector: u64,
    /// Leave this shard out (repeatable): the operator drops shards that failed or missed
    /// the straggler deadline, and later stages run without them.
    #[arg(long)]
    exclude_shard: Vec<String>,
}

/// Runs the subcommand.
pub fn run(Args { job, stage, plan, wait_for_vector, exclude_shard }: Args, dev: Device) -> anyhow::Result<()> {
    let mut job = Job::load(&job)?;
    job.exclude_shards(&exclude_shard)?;
    let runner = Runner::new(job, dev)?;
    if plan {
        for (name, state) in runner.status()? {
            say!("{state:8} {name}");
        }
    } else if let Some(stage) = stage {
        runner.wait_for_vector(&stage, std::time::Duration::from_secs(wait_for_vector))?;
        runner.run_stage(&stage)?;
    } else {
        let report = runner.run()?;
        say!("{}", report.table());
        say!("artifacts: {}", report.run);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use medmerge_crds::command::StageCommand;

    use crate::{Cli, Command};

    #[test]
    fn the_command_the_operator_writes_parses_into_the_same_stage_wait_and_exclusions() {
        let written = StageCommand { job_file: "/etc/medmerge/job.yaml".into(), stage: "collect-b".into(), wait_for_vector: Some(600), exclude_shards: vec!["c".into(), "d".into()] };
        let cli = Cli::try_parse_from(std::iter::once("medmerge-trainer".to_string()).chain(written.to_args())).unwrap();
        let Command::Pipeline(args) = cli.command else { panic!("not the pipeline subcommand") };
        let read = StageCommand { job_file: args.job.display().to_string(), stage: args.stage.unwrap(), wait_for_vector: Some(args.wait_for_vector as i64), exclude_shards: args.exclude_shard };
        assert_eq!(read, written);
    }
}
