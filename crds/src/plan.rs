//! The stage plan: which stages a MergeJob has, in which order, and what each reads and writes.
//!
//! A stage is done when everything it writes exists; it is ready when everything it reads exists
//! and it is not done. Both the local pipeline and the operator drive a run with [`StagePlan::ready`],
//! so a run interrupted anywhere resumes where it stopped without redoing finished stages.

use std::collections::BTreeSet;

use crate::layout::ArtifactLayout;
use crate::spec::{Baseline, MergeJobSpec, MergeMethod, RestoreRound};

/// A model evaluated at the end of a run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Stable id, used in artifact keys and reports (e.g. `data-vector`, `shard-a`).
    pub id: String,
    /// How the candidate is produced.
    pub kind: CandidateKind,
}

/// How a candidate model is produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CandidateKind {
    /// Merged from the shard vectors with this method, then restored.
    Merged(MergeMethod),
    /// The pretrained weights with the averaged heads, restored: what restoration alone gives.
    PretrainedRestored,
    /// One shard's own fine-tuned model.
    ShardModel(String),
    /// A model trained on every shard's data at once.
    FullTraining,
}

impl CandidateKind {
    /// Whether this candidate goes through the merge and restore stages.
    pub fn is_merged(&self) -> bool {
        matches!(self, CandidateKind::Merged(_) | CandidateKind::PretrainedRestored)
    }
}

/// One unit of work.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Stage {
    /// Materialise the pretrained weights once.
    Init,
    /// Fine-tune on one shard and write its data vector.
    Finetune { shard: String },
    /// Copy an externally computed vector into the run (asynchronous participation).
    Collect { shard: String },
    /// Train one model on all shards' data (benchmark baseline).
    FullTraining,
    /// Merge vectors into one candidate model.
    Merge { candidate: String },
    /// One shard's part of one round of a candidate's restoration.
    Restore { candidate: String, round: RestoreRound, shard: String },
    /// Combine the shards' parts of one restoration round into the round's model (no round:
    /// publish the merged model unrestored).
    RestoreCombine { candidate: String, round: Option<RestoreRound> },
    /// Evaluate every candidate on the held-out set.
    Evaluate,
}

impl Stage {
    /// The shard whose own stage this is (its training, its restoration parts): run with the
    /// shard's credentials and writing only under its prefix. Collecting a hospital's uploaded
    /// vector is the coordinator's stage, not the shard's.
    pub fn owning_shard(&self) -> Option<&str> {
        match self {
            Stage::Finetune { shard } | Stage::Restore { shard, .. } => Some(shard),
            _ => None,
        }
    }

    /// Short, stable name for logs and child-object names.
    pub fn name(&self) -> String {
        match self {
            Stage::Init => "init".into(),
            Stage::Finetune { shard } => format!("finetune-{shard}"),
            Stage::Collect { shard } => format!("collect-{shard}"),
            Stage::FullTraining => "full-training".into(),
            Stage::Merge { candidate } => format!("merge-{candidate}"),
            Stage::Restore { candidate, round, shard } => format!("restore-{candidate}-{}-{shard}", round.name()),
            Stage::RestoreCombine { candidate, round: Some(round) } => format!("restore-{candidate}-{}", round.name()),
            Stage::RestoreCombine { candidate, round: None } => format!("restore-{candidate}"),
            Stage::Evaluate => "evaluate".into(),
        }
    }
}

/// A stage with the artifact keys it reads and writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedStage {
    /// The stage.
    pub stage: Stage,
    /// Keys that must exist before it runs.
    pub reads: Vec<String>,
    /// Keys it produces; all present means done.
    pub writes: Vec<String>,
}

impl PlannedStage {
    /// A restoration stage's starting model: the merged model, the previous round's model or, in
    /// a chain, the previous shard's part. None for other stages.
    pub fn model_input(&self) -> Option<&str> {
        match self.stage {
            Stage::Restore { .. } | Stage::RestoreCombine { .. } => self.reads.first().map(String::as_str),
            _ => None,
        }
    }

    /// A combine stage's inputs from the shards (one part each), in shard order; empty for
    /// other stages.
    pub fn shard_parts(&self) -> &[String] {
        match self.stage {
            Stage::RestoreCombine { round: Some(_), .. } => self.reads.get(1..).unwrap_or_default(),
            _ => &[],
        }
    }

    /// A restoration stage's one output (a part, a round's model or the restored model).
    pub fn restore_output(&self) -> Option<&str> {
        match self.stage {
            Stage::Restore { .. } | Stage::RestoreCombine { .. } => self.writes.first().map(String::as_str),
            _ => None,
        }
    }
}

/// Every stage of one run, in a valid execution order.
#[derive(Clone, Debug, PartialEq)]
pub struct StagePlan {
    /// Stages in topological order.
    pub stages: Vec<PlannedStage>,
    /// Models evaluated at the end, the primary merged model first.
    pub candidates: Vec<Candidate>,
}

/// The candidates a spec asks for: the primary merge first, then baselines, without duplicates.
pub fn candidates(spec: &MergeJobSpec) -> Vec<Candidate> {
    let mut out = vec![Candidate { id: spec.merge.method.as_str().into(), kind: CandidateKind::Merged(spec.merge.method) }];
    let mut push = |c: Candidate| {
        if !out.iter().any(|o| o.id == c.id) {
            out.push(c);
        }
    };
    let mut baselines = spec.merge.baselines.clone();
    baselines.sort();
    baselines.dedup();
    for b in baselines {
        let merged = |m: MergeMethod| Candidate { id: m.as_str().into(), kind: CandidateKind::Merged(m) };
        match b {
            Baseline::ParamsMean => push(merged(MergeMethod::ParamsMean)),
            Baseline::RandomVector => push(merged(MergeMethod::RandomVector)),
            Baseline::Ties => push(merged(MergeMethod::Ties)),
            Baseline::Dare => push(merged(MergeMethod::Dare)),
            Baseline::PretrainedRestored => push(Candidate { id: "pretrained-restored".into(), kind: CandidateKind::PretrainedRestored }),
            Baseline::FullTraining => push(Candidate { id: "full-training".into(), kind: CandidateKind::FullTraining }),
            Baseline::ShardModels => {
                for s in &spec.shards {
                    push(Candidate { id: format!("shard-{}", s.name), kind: CandidateKind::ShardModel(s.name.clone()) })
                }
            }
        }
    }
    out
}

impl StagePlan {
    /// Builds the plan of `spec` with keys from `layout`.
    pub fn new(spec: &MergeJobSpec, layout: &ArtifactLayout) -> Self {
        let candidates = candidates(spec);
        let mut stages = vec![PlannedStage { stage: Stage::Init, reads: vec![], writes: vec![layout.base()] }];
        for s in &spec.shards {
            let stage = if s.vector.is_some() {
                PlannedStage { stage: Stage::Collect { shard: s.name.clone() }, reads: vec![], writes: vec![layout.shard_vector(&s.name)] }
            } else {
                PlannedStage { stage: Stage::Finetune { shard: s.name.clone() }, reads: vec![layout.base()], writes: vec![layout.shard_vector(&s.name), layout.shard_metrics(&s.name)] }
            };
            stages.push(stage);
        }
        let vectors: Vec<String> = spec.shards.iter().map(|s| layout.shard_vector(&s.name)).collect();
        // Restoration needs the shard's images, so shards known only by their vector sit it out.
        let restoring_shards: Vec<&str> = spec.shards.iter().filter(|s| s.data.is_some()).map(|s| s.name.as_str()).collect();
        let mut eval_reads = Vec::new();
        for c in &candidates {
            match &c.kind {
                CandidateKind::FullTraining => {
                    stages.push(PlannedStage { stage: Stage::FullTraining, reads: vec![layout.base()], writes: vec![layout.full_training()] });
                    eval_reads.push(layout.full_training());
                }
                CandidateKind::ShardModel(shard) => eval_reads.push(layout.shard_vector(shard)),
                CandidateKind::Merged(_) | CandidateKind::PretrainedRestored => {
                    let mut reads = vec![layout.base()];
                    reads.extend(vectors.iter().cloned());
                    stages.push(PlannedStage { stage: Stage::Merge { candidate: c.id.clone() }, reads, writes: vec![layout.merged(&c.id)] });
                    stages.extend(restore_stages(&spec.restore.rounds(spec.model.multi_label), &c.id, &restoring_shards, layout));
                    eval_reads.push(layout.restored(&c.id));
                }
            }
        }
        eval_reads.extend(vectors);
        eval_reads.push(layout.base());
        stages.push(PlannedStage { stage: Stage::Evaluate, reads: eval_reads, writes: vec![layout.eval_metrics(), layout.eval_report(), layout.eval_html()] });
        StagePlan { stages, candidates }
    }

    /// Stages whose inputs all exist and whose outputs do not, in plan order.
    pub fn ready(&self, exists: &BTreeSet<String>) -> Vec<&PlannedStage> {
        self.stages.iter().filter(|p| !p.writes.iter().all(|w| exists.contains(w)) && p.reads.iter().all(|r| exists.contains(r))).collect()
    }

    /// Whether every stage's outputs exist.
    pub fn is_complete(&self, exists: &BTreeSet<String>) -> bool {
        self.stages.iter().all(|p| p.writes.iter().all(|w| exists.contains(w)))
    }

    /// Every key the plan reads or writes (what an observer needs to check for existence).
    pub fn keys(&self) -> BTreeSet<String> {
        self.stages.iter().flat_map(|p| p.reads.iter().chain(&p.writes).cloned()).collect()
    }
}

/// The stages of `candidate`'s restoration: per round, a part per shard (all in parallel, except
/// the chain, where each shard starts from the previous one's model) and a combine stage. Each
/// round reads the previous round's model; the last writes the restored model.
fn restore_stages(rounds: &[RestoreRound], candidate: &str, shards: &[&str], layout: &ArtifactLayout) -> Vec<PlannedStage> {
    let mut input = layout.merged(candidate);
    if rounds.is_empty() {
        // No restoration: the combine stage publishes the merged model as the restored one.
        let stage = Stage::RestoreCombine { candidate: candidate.into(), round: None };
        return vec![PlannedStage { stage, reads: vec![input], writes: vec![layout.restored(candidate)] }];
    }
    let mut stages = Vec::new();
    for (i, &round) in rounds.iter().enumerate() {
        let output = if i + 1 == rounds.len() { layout.restored(candidate) } else { layout.restore_round(candidate, round) };
        let mut combine_reads = vec![input.clone()];
        let mut previous = input.clone();
        for s in shards {
            let part = layout.restore_part(candidate, round, s);
            let reads = if matches!(round, RestoreRound::Chain(_)) { vec![previous.clone()] } else { vec![input.clone()] };
            stages.push(PlannedStage { stage: Stage::Restore { candidate: candidate.into(), round, shard: (*s).into() }, reads, writes: vec![part.clone()] });
            previous = part.clone();
            combine_reads.push(part);
        }
        stages.push(PlannedStage { stage: Stage::RestoreCombine { candidate: candidate.into(), round: Some(round) }, reads: combine_reads, writes: vec![output.clone()] });
        input = output;
    }
    stages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restoration_stages_name_their_starting_model_parts_and_output() {
        let layout = ArtifactLayout::new("runs", "ns", "mj", 1);
        let stages = restore_stages(&[RestoreRound::Epoch(1), RestoreRound::BnMoments], "dv", &["a", "b"], &layout);
        let part_a = &stages[0];
        assert_eq!((part_a.model_input(), part_a.restore_output()), (Some(layout.merged("dv").as_str()), Some(layout.restore_part("dv", RestoreRound::Epoch(1), "a").as_str())));
        let combine = &stages[2];
        assert_eq!(combine.model_input(), Some(layout.merged("dv").as_str()));
        assert_eq!(combine.shard_parts(), [layout.restore_part("dv", RestoreRound::Epoch(1), "a"), layout.restore_part("dv", RestoreRound::Epoch(1), "b")]);
        assert_eq!(stages[3].model_input(), combine.restore_output(), "the next round starts from this round's model");
        assert_eq!(stages.last().unwrap().restore_output(), Some(layout.restored("dv").as_str()));
        let chain = restore_stages(&[RestoreRound::Chain(1)], "dv", &["a", "b"], &layout);
        assert_eq!(chain[1].model_input(), chain[0].restore_output(), "a chain's next shard starts from the previous part");
        let init = PlannedStage { stage: Stage::Init, reads: vec![], writes: vec![layout.base()] };
        assert_eq!((init.model_input(), init.shard_parts().len(), init.restore_output()), (None, 0, None));
    }
    use crate::spec::*;

    fn spec(shards: &[(&str, bool)], mode: RestoreMode, baselines: Vec<Baseline>) -> MergeJobSpec {
        MergeJobSpec {
            model: ModelSpec { architecture: Architecture::Resnet18, weights: WeightsSource::Random, weights_path: None, classes: vec![], image_size: 32, seed: 1, multi_label: false },
            shards: shards
                .iter()
                .map(|(n, external)| ShardSpec {
                    name: (*n).into(),
                    data: (!external).then(|| DataSource::at(format!("data/{n}"))),
                    vector: external.then(|| format!("incoming/{n}.safetensors")),
                    secret_ref: None,
                    storage_secret: None,
                    node_selector: Default::default(),
                    release: None,
                    tolerations: vec![],
                    pod_overrides: Default::default(),
                })
                .collect(),
            training: TrainingSpec::default(),
            release: Default::default(),
            merge: MergeSpec { baselines, ..MergeSpec::default() },
            restore: RestoreSpec { mode, ..RestoreSpec::default() },
            evaluation: EvaluationSpec::on(DataSource::at("test")),
            storage: StorageSpec::default(),
            cluster: ClusterSpec::default(),
            suspend: false,
        }
    }

    fn layout() -> ArtifactLayout {
        ArtifactLayout::new("runs", "local", "t", 1)
    }

    fn run_to_completion(plan: &StagePlan) -> Vec<Stage> {
        let mut done = BTreeSet::new();
        let mut order = Vec::new();
        while let Some(p) = plan.ready(&done).first().cloned() {
            order.push(p.stage.clone());
            done.extend(p.writes.iter().cloned());
        }
        assert!(plan.is_complete(&done), "plan stalled after {order:?}");
        order
    }

    #[test]
    fn a_fresh_run_starts_with_init_only() {
        let plan = StagePlan::new(&spec(&[("a", false), ("b", false)], RestoreMode::BnRecalibrate, vec![]), &layout());
        let ready: Vec<_> = plan.ready(&BTreeSet::new()).into_iter().map(|p| p.stage.clone()).collect();
        assert_eq!(ready, vec![Stage::Init]);
    }

    #[test]
    fn after_init_every_shard_can_train_in_parallel() {
        let l = layout();
        let plan = StagePlan::new(&spec(&[("a", false), ("b", false)], RestoreMode::BnRecalibrate, vec![]), &l);
        let done = BTreeSet::from([l.base()]);
        let ready: Vec<_> = plan.ready(&done).into_iter().map(|p| p.stage.clone()).collect();
        assert_eq!(ready, vec![Stage::Finetune { shard: "a".into() }, Stage::Finetune { shard: "b".into() }]);
    }

    #[test]
    fn merge_waits_for_every_vector_including_external_ones() {
        let l = layout();
        let plan = StagePlan::new(&spec(&[("a", false), ("ext", true)], RestoreMode::BnRecalibrate, vec![]), &l);
        let done = BTreeSet::from([l.base(), l.shard_vector("a"), l.shard_metrics("a")]);
        let ready: Vec<_> = plan.ready(&done).into_iter().map(|p| p.stage.clone()).collect();
        assert_eq!(ready, vec![Stage::Collect { shard: "ext".into() }]);
    }

    #[test]
    fn bn_recalibration_runs_on_shards_with_data_then_combines() {
        let order = run_to_completion(&StagePlan::new(&spec(&[("a", false), ("ext", true)], RestoreMode::BnRecalibrate, vec![]), &layout()));
        let c = "data-vector".to_string();
        assert_eq!(
            order,
            vec![
                Stage::Init,
                Stage::Finetune { shard: "a".into() },
                Stage::Collect { shard: "ext".into() },
                Stage::Merge { candidate: c.clone() },
                Stage::Restore { candidate: c.clone(), round: RestoreRound::BnMoments, shard: "a".into() },
                Stage::RestoreCombine { candidate: c, round: Some(RestoreRound::BnMoments) },
                Stage::Evaluate,
            ]
        );
    }

    #[test]
    fn finetune_epoch_restoration_chains_shard_after_shard() {
        let l = layout();
        let plan = StagePlan::new(&spec(&[("a", false), ("b", false)], RestoreMode::FinetuneEpoch, vec![]), &l);
        let step_b = plan.stages.iter().find(|p| p.stage == Stage::Restore { candidate: "data-vector".into(), round: RestoreRound::Chain(1), shard: "b".into() }).unwrap();
        assert_eq!(step_b.reads, vec![l.restore_part("data-vector", RestoreRound::Chain(1), "a")]);
    }

    #[test]
    fn parallel_restoration_rounds_let_every_shard_work_at_once_and_feed_the_next_round() {
        let l = layout();
        let plan = StagePlan::new(&spec(&[("a", false), ("b", false)], RestoreMode::AveragedEpochHead, vec![]), &l);
        let c = "data-vector";
        let mut done = BTreeSet::from([l.merged(c)]);
        for (round, input, output) in [
            (RestoreRound::Epoch(1), l.merged(c), l.restore_round(c, RestoreRound::Epoch(1))),
            (RestoreRound::BnMoments, l.restore_round(c, RestoreRound::Epoch(1)), l.restore_round(c, RestoreRound::BnMoments)),
            (RestoreRound::HeadStatistics, l.restore_round(c, RestoreRound::BnMoments), l.restored(c)),
        ] {
            let ready: Vec<_> = plan.ready(&done).into_iter().filter(|p| matches!(p.stage, Stage::Restore { .. })).cloned().collect();
            let shards: Vec<_> = ready.iter().map(|p| p.stage.clone()).collect();
            assert_eq!(shards, ["a", "b"].map(|s| Stage::Restore { candidate: c.into(), round, shard: s.into() }), "both shards at once in {round:?}");
            assert!(ready.iter().all(|p| p.reads == vec![input.clone()]), "{round:?} reads {input}");
            done.extend(ready.iter().flat_map(|p| p.writes.clone()));
            let combine = plan.ready(&done).into_iter().find(|p| matches!(p.stage, Stage::RestoreCombine { .. })).cloned().expect("combine ready");
            assert_eq!(combine.writes, vec![output.clone()]);
            done.insert(output);
        }
    }

    #[test]
    fn a_second_restoration_epoch_is_its_own_round_that_starts_from_the_first() {
        let l = layout();
        let mut two = spec(&[("a", false), ("b", false)], RestoreMode::AveragedEpochHead, vec![]);
        two.restore.epochs = 2;
        let plan = StagePlan::new(&two, &l);
        let c = "data-vector";
        let first = l.restore_part(c, RestoreRound::Epoch(1), "a");
        let second = plan.stages.iter().find(|p| p.stage == Stage::Restore { candidate: c.into(), round: RestoreRound::Epoch(2), shard: "a".into() }).expect("a second epoch for shard a");
        assert_ne!(second.writes, vec![first], "the second epoch keeps the first's part");
        assert_eq!(second.reads, vec![l.restore_round(c, RestoreRound::Epoch(1))], "it starts from the first epoch's average");
        let bn = plan.stages.iter().find(|p| p.stage == Stage::Restore { candidate: c.into(), round: RestoreRound::BnMoments, shard: "a".into() }).unwrap();
        assert_eq!(bn.reads, vec![l.restore_round(c, RestoreRound::Epoch(2))]);
        assert_eq!(l.restore_part(c, RestoreRound::Epoch(1), "a"), layout().restore_part(c, RestoreRound::Epoch(1), "a"));
        assert!(l.restore_part(c, RestoreRound::Epoch(1), "a").contains("/epoch/"), "one-epoch runs keep their keys");
        let keys = plan.keys();
        assert_eq!(keys.len(), keys.iter().collect::<BTreeSet<_>>().len());
        let mut chain = spec(&[("a", false), ("b", false)], RestoreMode::FinetuneEpoch, vec![]);
        chain.restore.epochs = 2;
        let plan = StagePlan::new(&chain, &l);
        let pass_two_a = plan.stages.iter().find(|p| p.stage == Stage::Restore { candidate: c.into(), round: RestoreRound::Chain(2), shard: "a".into() }).unwrap();
        assert_eq!(pass_two_a.reads, vec![l.restore_round(c, RestoreRound::Chain(1))], "the second pass starts from the end of the first");
    }

    #[test]
    fn baselines_become_candidates_once_and_primary_comes_first() {
        let mut s = spec(&[("a", false), ("b", false)], RestoreMode::None, vec![Baseline::ShardModels, Baseline::ParamsMean, Baseline::ParamsMean]);
        s.merge.method = MergeMethod::ParamsMean;
        let ids: Vec<_> = candidates(&s).into_iter().map(|c| c.id).collect();
        assert_eq!(ids, vec!["params-mean", "shard-a", "shard-b"]);
    }

    #[test]
    fn a_finished_run_has_nothing_ready() {
        let plan = StagePlan::new(&spec(&[("a", false)], RestoreMode::None, vec![Baseline::FullTraining, Baseline::PretrainedRestored]), &layout());
        let all: BTreeSet<String> = plan.keys();
        assert!(plan.ready(&all).is_empty());
        assert!(plan.is_complete(&all));
    }

    #[test]
    fn every_stage_of_a_full_plan_eventually_runs() {
        let plan =
            StagePlan::new(&spec(&[("a", false), ("b", false), ("c", true)], RestoreMode::FinetuneEpoch, vec![Baseline::FullTraining, Baseline::RandomVector, Baseline::ShardModels]), &layout());
        assert_eq!(run_to_completion(&plan).len(), plan.stages.len());
    }
}
