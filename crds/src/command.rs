//! The trainer command line a stage Job runs, written by the operator and read by the trainer's
//! `pipeline` subcommand: one type, so both sides agree on the flags (a trainer test parses
//! [`StageCommand::to_args`] with its own command-line parser).

/// `medmerge-trainer --log-format json pipeline <job file> --stage <stage> [--wait-for-vector N]
/// [--exclude-shard S]...`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StageCommand {
    /// The MergeJob YAML the Job mounts.
    pub job_file: String,
    /// The stage to run, e.g. `finetune-hospital-a`.
    pub stage: String,
    /// For a collect stage: seconds to wait for the hospital's vector.
    pub wait_for_vector: Option<i64>,
    /// Shards the run left out after it started (failed or dropped).
    pub exclude_shards: Vec<String>,
}

impl StageCommand {
    /// The container arguments (the image's entrypoint is the trainer).
    pub fn to_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["--log-format", "json", "pipeline", &self.job_file, "--stage", &self.stage].map(String::from).into();
        if let Some(wait) = self.wait_for_vector {
            args.extend(["--wait-for-vector".into(), wait.to_string()]);
        }
        for shard in &self.exclude_shards {
            args.extend(["--exclude-shard".into(), shard.clone()]);
        }
        args
    }

    /// Reads back arguments that [`StageCommand::to_args`] wrote; None for anything else.
    pub fn parse(args: &[String]) -> Option<Self> {
        let [log, json, pipeline, job_file, stage_flag, stage, rest @ ..] = args else { return None };
        if (log.as_str(), json.as_str(), pipeline.as_str(), stage_flag.as_str()) != ("--log-format", "json", "pipeline", "--stage") || rest.len() % 2 != 0 {
            return None;
        }
        let mut command = StageCommand { job_file: job_file.clone(), stage: stage.clone(), wait_for_vector: None, exclude_shards: vec![] };
        for pair in rest.chunks(2) {
            match pair[0].as_str() {
                "--wait-for-vector" => command.wait_for_vector = Some(pair[1].parse().ok()?),
                "--exclude-shard" => command.exclude_shards.push(pair[1].clone()),
                _ => return None,
            }
        }
        Some(command)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_read_back_as_the_command_that_wrote_them() {
        let command = StageCommand { job_file: "/etc/medmerge/job.yaml".into(), stage: "collect-b".into(), wait_for_vector: Some(3600), exclude_shards: vec!["c".into(), "d".into()] };
        let args = command.to_args();
        assert_eq!(args[..6], ["--log-format", "json", "pipeline", "/etc/medmerge/job.yaml", "--stage", "collect-b"]);
        assert_eq!(StageCommand::parse(&args), Some(command));
        assert_eq!(StageCommand::parse(&["pipeline".to_string()]), None);
    }
}
