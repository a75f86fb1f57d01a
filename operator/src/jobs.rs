//! The Kubernetes objects that run one stage: a ConfigMap holding the MergeJob (one per
//! generation) and a batch Job per stage. Pure builders: same input, same objects.
//!
//! Isolation: a shard's Secret is mounted only into that shard's own stage Jobs (its training
//! and its restoration), never into another shard's or the coordinator's. Every pod runs as a
//! non-root user with a read-only root filesystem, no privilege escalation and no capabilities.

use std::collections::BTreeMap;

use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec,
    SeccompProfile, SecretKeySelector, SecretVolumeSource, SecurityContext, Toleration, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::Resource;
use medmerge_crds::command::StageCommand;
use medmerge_crds::{MergeJob, MergeJobSpec, Stage};

use crate::names::child_name;
use crate::pod_overrides::{base_resources, layered, Layered};

/// Label naming the owning MergeJob.
pub const LABEL_MERGEJOB: &str = "medmerge.io/mergejob";
/// Label with the MergeJob generation a child belongs to.
pub const LABEL_GENERATION: &str = "medmerge.io/generation";
/// Label with the stage name a Job runs.
pub const LABEL_STAGE: &str = "medmerge.io/stage";
/// Where the MergeJob YAML is mounted in every stage pod.
pub const JOB_FILE: &str = "/etc/medmerge/mergejob.yaml";
/// Where a shard's Secret is mounted in that shard's pods.
pub const SHARD_SECRET_DIR: &str = "/var/run/secrets/medmerge/shard";
/// The unprivileged user the trainer runs as.
pub const RUN_AS_USER: i64 = 65532;
/// Where a shard's data volume is mounted (read-only) in that shard's pods: `<dir>/<shard>`.
pub const SHARD_DATA_DIR: &str = "/var/run/medmerge/shards";
/// Where the evaluation data volume is mounted (read-only) in the evaluate pod.
pub const EVALUATION_DATA_DIR: &str = "/var/run/medmerge/evaluation";
/// Where the `storage.local` claim is mounted in every stage pod (the chart mounts the
/// operator's view of the same share at the same path).
pub const ARTIFACTS_DIR: &str = "/var/lib/medmerge/artifacts";

/// Kueue's labels. Set on a MergeJob, they are copied to each of its stage Jobs, which are then
/// created suspended: Kueue admits (unsuspends) each against its queue's quota and priority.
pub const KUEUE_LABELS: [&str; 2] = ["kueue.x-k8s.io/queue-name", "kueue.x-k8s.io/priority-class"];

/// The MergeJob's Kueue labels (only on Jobs: on pods, Kueue's pod integration would queue them
/// a second time).
fn kueue_labels(mj: &MergeJob) -> BTreeMap<String, String> {
    let all = mj.metadata.labels.iter().flatten();
    all.filter(|(k, _)| KUEUE_LABELS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect()
}

fn labels(mj: &MergeJob, generation: i64) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".into(), "medmerge".into()),
        ("app.kubernetes.io/name".into(), "medmerge-trainer".into()),
        (LABEL_MERGEJOB.into(), mj.metadata.name.clone().unwrap_or_default()),
        (LABEL_GENERATION.into(), generation.to_string()),
    ])
}

fn owner(mj: &MergeJob) -> Vec<OwnerReference> {
    mj.controller_owner_ref(&()).into_iter().collect()
}

/// The ConfigMap holding generation `generation` of the MergeJob, mounted by its stage Jobs.
pub fn spec_configmap(mj: &MergeJob, generation: i64) -> Result<ConfigMap, serde_yaml::Error> {
    let name = mj.metadata.name.clone().unwrap_or_default();
    let job = MergeJob {
        metadata: ObjectMeta { name: Some(name.clone()), namespace: mj.metadata.namespace.clone(), generation: Some(generation), ..Default::default() },
        spec: pod_view(&mj.spec),
        status: None,
    };
    Ok(ConfigMap {
        metadata: ObjectMeta {
            name: Some(child_name(&name, generation, "spec")),
            namespace: mj.metadata.namespace.clone(),
            labels: Some(labels(mj, generation)),
            owner_references: Some(owner(mj)),
            ..Default::default()
        },
        data: Some(BTreeMap::from([("mergejob.yaml".into(), serde_yaml::to_string(&job)?)])),
        ..Default::default()
    })
}

/// The MergeJob as its stage pods see it: data on volumes and a `storage.local` claim become
/// the paths where [`stage_job`] mounts them, so the trainer reads plain paths.
pub fn pod_view(spec: &MergeJobSpec) -> MergeJobSpec {
    let mut view = spec.clone();
    for shard in &mut view.shards {
        if let Some(data) = shard.data.as_mut().filter(|d| d.volume.is_some()) {
            data.path = format!("{SHARD_DATA_DIR}/{}/{}", shard.name, data.path);
            data.volume = None;
        }
    }
    if view.evaluation.data.volume.take().is_some() {
        view.evaluation.data.path = format!("{EVALUATION_DATA_DIR}/{}", view.evaluation.data.path);
    }
    if let Some(local) = view.storage.local.as_mut().filter(|l| l.persistent_volume_claim.is_some()) {
        local.path = format!("{ARTIFACTS_DIR}/{}", local.path);
        local.persistent_volume_claim = None;
    }
    view
}

/// A read-only volume and its mount for data on `volume`.
fn data_volume(name: String, volume: &medmerge_crds::DataVolume, mount_path: String) -> (Volume, VolumeMount) {
    let source = Volume {
        name: name.clone(),
        persistent_volume_claim: volume.persistent_volume_claim.clone().map(|c| PersistentVolumeClaimVolumeSource { read_only: Some(true), ..c }),
        host_path: volume.host_path.clone(),
        nfs: volume.nfs.clone().map(|n| k8s_openapi::api::core::v1::NFSVolumeSource { read_only: Some(true), ..n }),
        csi: volume.csi.clone().map(|c| k8s_openapi::api::core::v1::CSIVolumeSource { read_only: Some(true), ..c }),
        ..Default::default()
    };
    (source, VolumeMount { name, mount_path, read_only: Some(true), ..Default::default() })
}

/// The data volumes `stage` reads: its shard's (training, restoration), every shard's (the
/// pooled baseline) or the evaluation set's. Never another shard's.
fn data_volumes(spec: &MergeJobSpec, stage: &Stage) -> Vec<(Volume, VolumeMount)> {
    let shard_volume = |shard: &medmerge_crds::ShardSpec| {
        let volume = shard.data.as_ref().and_then(|d| d.volume.as_ref())?;
        Some(data_volume(format!("data-{}", shard.name), volume, format!("{SHARD_DATA_DIR}/{}", shard.name)))
    };
    match stage {
        Stage::Finetune { shard } | Stage::Restore { shard, .. } => spec.shards.iter().filter(|s| &s.name == shard).filter_map(shard_volume).collect(),
        Stage::FullTraining => spec.shards.iter().filter_map(shard_volume).collect(),
        Stage::Evaluate => spec.evaluation.data.volume.iter().map(|v| data_volume("evaluation-data".into(), v, EVALUATION_DATA_DIR.into())).collect(),
        _ => Vec::new(),
    }
}

/// The shard whose data a stage touches, if any.
pub fn stage_shard(stage: &Stage) -> Option<&str> {
    match stage {
        Stage::Finetune { shard } | Stage::Collect { shard } | Stage::Restore { shard, .. } => Some(shard),
        _ => None,
    }
}

fn uses_gpu(stage: &Stage) -> bool {
    matches!(stage, Stage::Finetune { .. } | Stage::FullTraining | Stage::Restore { .. } | Stage::Evaluate)
}

fn toleration(t: &medmerge_crds::Toleration) -> Toleration {
    Toleration { key: t.key.clone(), operator: t.operator.clone(), value: t.value.clone(), effect: t.effect.clone(), ..Default::default() }
}

/// The trainer's environment: a writable HOME and, for an S3 store, the bucket identity the
/// stage runs as, by reference: a shard's own stage (its training, its restoration parts) its
/// shard's `storageSecret` when it names one, every other stage `storage.s3.credentialsSecret`.
/// Shard data credentials stay in each shard's own mounted Secret.
fn env(mj: &MergeJob, stage: &Stage) -> Vec<EnvVar> {
    let mut env = vec![EnvVar { name: "HOME".into(), value: Some("/tmp".into()), ..Default::default() }];
    let shard_identity = stage.owning_shard().and_then(|s| mj.spec.shards.iter().find(|x| x.name == s)).and_then(|s| s.storage_secret.as_ref());
    let bucket_identity = mj.spec.storage.s3.as_ref().and_then(|s| s.credentials_secret.as_ref());
    if let Some(secret) = shard_identity.or(bucket_identity) {
        for key in ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"] {
            let selector = SecretKeySelector { name: secret.clone(), key: key.into(), optional: Some(false) };
            env.push(EnvVar { name: key.into(), value_from: Some(EnvVarSource { secret_key_ref: Some(selector), ..Default::default() }), ..Default::default() });
        }
    }
    env
}

/// How long a collect Job waits for a hospital's vector when no straggler deadline bounds it.
const DEFAULT_VECTOR_WAIT_SECONDS: i64 = 7 * 24 * 3600;

/// The trainer's command for `stage`, leaving out the `excluded` shards. A collect stage waits
/// for the hospital's upload until the straggler deadline, so late hospitals are picked up; a
/// secure-sum merge waits as long for the survivors' shares about hospitals that dropped out.
/// Without one it waits on: the Job's own `activeDeadlineSeconds`, when set, ends it and names
/// `DeadlineExceeded` (a wait of the same length raced the Job controller and could end first
/// as a plain failure).
fn stage_command(spec: &MergeJobSpec, stage: &Stage, excluded: &[&str]) -> StageCommand {
    let wait = spec.cluster.straggler_deadline_seconds.unwrap_or(DEFAULT_VECTOR_WAIT_SECONDS);
    let exclude_shards = excluded.iter().map(|s| s.to_string()).collect();
    let waits = match stage {
        Stage::Collect { .. } => true,
        Stage::Merge { .. } => spec.merge.secure_sum.is_some(),
        _ => false,
    };
    StageCommand { job_file: JOB_FILE.into(), stage: stage.name(), wait_for_vector: waits.then_some(wait), exclude_shards }
}

/// The batch Job that runs `stage` of generation `generation` with every shard of the spec.
pub fn stage_job(mj: &MergeJob, generation: i64, stage: &Stage) -> Job {
    stage_job_excluding(mj, generation, stage, &[])
}

/// [`stage_job`] whose trainer leaves out the `excluded` shards (dropped after the run started,
/// so not reflected in the run's spec ConfigMap).
pub fn stage_job_excluding(mj: &MergeJob, generation: i64, stage: &Stage, excluded: &[&str]) -> Job {
    let name = mj.metadata.name.clone().unwrap_or_default();
    let cluster = &mj.spec.cluster;
    let shard = stage_shard(stage).and_then(|s| mj.spec.shards.iter().find(|x| x.name == s));
    let mut labels = labels(mj, generation);
    labels.insert(LABEL_STAGE.into(), stage.name());

    let mut volumes = vec![
        Volume { name: "mergejob".into(), config_map: Some(ConfigMapVolumeSource { name: child_name(&name, generation, "spec"), ..Default::default() }), ..Default::default() },
        Volume { name: "tmp".into(), empty_dir: Some(EmptyDirVolumeSource { size_limit: cluster.scratch_size_limit.clone().map(Quantity), ..Default::default() }), ..Default::default() },
    ];
    let mut mounts = vec![
        VolumeMount { name: "mergejob".into(), mount_path: "/etc/medmerge".into(), read_only: Some(true), ..Default::default() },
        VolumeMount { name: "tmp".into(), mount_path: "/tmp".into(), ..Default::default() },
    ];
    if let Some(secret) = shard.and_then(|s| s.secret_ref.clone()) {
        volumes.push(Volume { name: "shard-credentials".into(), secret: Some(SecretVolumeSource { secret_name: Some(secret), ..Default::default() }), ..Default::default() });
        mounts.push(VolumeMount { name: "shard-credentials".into(), mount_path: SHARD_SECRET_DIR.into(), read_only: Some(true), ..Default::default() });
    }
    for (volume, mount) in data_volumes(&mj.spec, stage) {
        volumes.push(volume);
        mounts.push(mount);
    }
    if let Some(claim) = mj.spec.storage.local.as_ref().and_then(|l| l.persistent_volume_claim.clone()) {
        let source = PersistentVolumeClaimVolumeSource { claim_name: claim, read_only: Some(false) };
        volumes.push(Volume { name: "artifacts".into(), persistent_volume_claim: Some(source), ..Default::default() });
        mounts.push(VolumeMount { name: "artifacts".into(), mount_path: ARTIFACTS_DIR.into(), ..Default::default() });
    }
    let mut env = env(mj, stage);
    if shard.is_some_and(|s| s.secret_ref.is_some()) {
        env.push(EnvVar { name: "MEDMERGE_SHARD_CREDENTIALS_DIR".into(), value: Some(SHARD_SECRET_DIR.into()), ..Default::default() });
    }
    let stage_level = cluster.stage_overrides.get(medmerge_crds::StageKind::of(stage).as_str());
    let over: Layered = layered([Some(&cluster.pod_overrides), stage_level, shard.map(|s| &s.pod_overrides)]);
    volumes.extend(over.volumes);
    mounts.extend(over.volume_mounts);
    env.extend(over.env);
    let resources = over.resources.apply(base_resources(cluster, uses_gpu(stage)));
    let container = Container {
        name: "trainer".into(),
        image: Some(cluster.image.clone()),
        image_pull_policy: cluster.image_pull_policy.clone(),
        args: Some(stage_command(&mj.spec, stage, excluded).to_args()),
        env: Some(env),
        env_from: (!over.env_from.is_empty()).then_some(over.env_from),
        volume_mounts: Some(mounts),
        resources,
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(RUN_AS_USER),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".into()]), ..Default::default() }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mut node_selector = over.node_selector;
    node_selector.extend(shard.map(|s| s.node_selector.clone()).unwrap_or_default());
    let queue = kueue_labels(mj);
    let queued = queue.contains_key(KUEUE_LABELS[0]);
    let mut job_labels = labels.clone();
    job_labels.extend(queue);
    let mut tolerations: Vec<Toleration> = cluster.tolerations.iter().chain(shard.map(|s| s.tolerations.as_slice()).unwrap_or_default()).map(toleration).collect();
    tolerations.extend(over.tolerations);
    Job {
        metadata: ObjectMeta {
            name: Some(child_name(&name, generation, &stage.name())),
            namespace: mj.metadata.namespace.clone(),
            labels: Some(job_labels),
            owner_references: Some(owner(mj)),
            ..Default::default()
        },
        spec: Some(JobSpec {
            suspend: queued.then_some(true),
            backoff_limit: Some(cluster.backoff_limit),
            active_deadline_seconds: cluster.active_deadline_seconds,
            ttl_seconds_after_finished: cluster.ttl_seconds_after_finished,
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels), ..Default::default() }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    enable_service_links: Some(false),
                    node_selector: (!node_selector.is_empty()).then_some(node_selector),
                    tolerations: (!tolerations.is_empty()).then_some(tolerations),
                    affinity: over.affinity,
                    image_pull_secrets: (!over.image_pull_secrets.is_empty()).then_some(over.image_pull_secrets),
                    service_account_name: over.service_account_name,
                    priority_class_name: over.priority_class_name,
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(RUN_AS_USER),
                        fs_group: Some(RUN_AS_USER),
                        seccomp_profile: Some(SeccompProfile { type_: "RuntimeDefault".into(), ..Default::default() }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use medmerge_crds::RestoreRound;

    fn mergejob() -> MergeJob {
        let mut mj: MergeJob = serde_yaml::from_str(
            r#"
apiVersion: medmerge.io/v1alpha1
kind: MergeJob
metadata: {name: retina, namespace: radiology, uid: 1234-abcd, generation: 2}
spec:
  model: {architecture: resnet50, weights: random}
  shards:
    - {name: hospital-a, data: {path: a}, secretRef: creds-a, nodeSelector: {site: a}, tolerations: [{key: site-a, operator: Exists}]}
    - {name: hospital-b, data: {path: b}, secretRef: creds-b}
  evaluation: {data: {path: t}}
  cluster: {gpus: 1, backoffLimit: 3, ttlSecondsAfterFinished: 600, resources: {cpu: "4", memory: 16Gi}, tolerations: [{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]}
"#,
        )
        .unwrap();
        mj.metadata.generation = Some(2);
        mj
    }

    fn secrets(job: &Job) -> Vec<String> {
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        pod.volumes.iter().flatten().filter_map(|v| v.secret.as_ref()).filter_map(|s| s.secret_name.clone()).collect()
    }

    #[test]
    fn a_shard_job_mounts_only_its_own_secret_and_runs_on_its_nodes() {
        let mj = mergejob();
        let a = stage_job(&mj, 2, &Stage::Finetune { shard: "hospital-a".into() });
        assert_eq!(secrets(&a), vec!["creds-a"]);
        let pod = a.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.node_selector.as_ref().unwrap()["site"], "a");
        let b_restore = stage_job(&mj, 2, &Stage::Restore { candidate: "data-vector".into(), round: RestoreRound::BnMoments, shard: "hospital-b".into() });
        assert_eq!(secrets(&b_restore), vec!["creds-b"]);
        let env = pod.containers[0].env.clone().unwrap();
        assert!(env.iter().any(|e| e.name == "MEDMERGE_SHARD_CREDENTIALS_DIR" && e.value.as_deref() == Some(SHARD_SECRET_DIR)), "the trainer is told where its shard's credentials are");
    }

    #[test]
    fn coordinator_stages_see_no_shard_secret() {
        let mj = mergejob();
        for stage in [Stage::Init, Stage::Merge { candidate: "data-vector".into() }, Stage::RestoreCombine { candidate: "data-vector".into(), round: Some(RestoreRound::BnMoments) }, Stage::Evaluate] {
            assert!(secrets(&stage_job(&mj, 2, &stage)).is_empty(), "{}", stage.name());
        }
    }

    #[test]
    fn every_pod_is_non_root_read_only_and_unprivileged() {
        let job = stage_job(&mergejob(), 2, &Stage::Finetune { shard: "hospital-a".into() });
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        assert_eq!(pod.security_context.as_ref().unwrap().run_as_non_root, Some(true));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let sc = pod.containers[0].security_context.as_ref().unwrap();
        assert_eq!((sc.read_only_root_filesystem, sc.allow_privilege_escalation, sc.privileged), (Some(true), Some(false), Some(false)));
        assert_eq!(sc.capabilities.as_ref().unwrap().drop, Some(vec!["ALL".to_string()]));
    }

    #[test]
    fn jobs_are_named_labelled_owned_and_run_their_stage() {
        let job = stage_job(&mergejob(), 2, &Stage::Finetune { shard: "hospital-a".into() });
        assert_eq!(job.metadata.name.as_deref(), Some("retina-g2-finetune-hospital-a"));
        assert_eq!(job.metadata.labels.as_ref().unwrap()[LABEL_STAGE], "finetune-hospital-a");
        let owner = &job.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.name.as_str(), owner.controller), ("MergeJob", "retina", Some(true)));
        let spec = job.spec.as_ref().unwrap();
        assert_eq!(spec.backoff_limit, Some(3));
        let args = spec.template.spec.as_ref().unwrap().containers[0].args.clone().unwrap();
        assert_eq!(&args[args.len() - 2..], ["--stage", "finetune-hospital-a"]);
    }

    #[test]
    fn a_queue_label_reaches_every_stage_job_which_then_waits_suspended_for_kueue() {
        let mut mj = mergejob();
        mj.metadata.labels = Some(BTreeMap::from([
            ("kueue.x-k8s.io/queue-name".to_string(), "gpu".to_string()),
            ("kueue.x-k8s.io/priority-class".to_string(), "research".to_string()),
            ("team".to_string(), "radiology".to_string()),
        ]));
        for stage in [Stage::Init, Stage::Finetune { shard: "hospital-a".into() }, Stage::Evaluate] {
            let job = stage_job(&mj, 1, &stage);
            let labels = job.metadata.labels.unwrap();
            assert_eq!((labels["kueue.x-k8s.io/queue-name"].as_str(), labels["kueue.x-k8s.io/priority-class"].as_str()), ("gpu", "research"));
            assert!(!labels.contains_key("team"), "only Kueue's labels are copied");
            let spec = job.spec.unwrap();
            assert_eq!(spec.suspend, Some(true), "{}: Kueue unsuspends what it admits", stage.name());
            assert!(!spec.template.metadata.unwrap().labels.unwrap().contains_key("kueue.x-k8s.io/queue-name"), "pods are not queued twice");
        }
        let unqueued = stage_job(&mergejob(), 1, &Stage::Init);
        assert_eq!(unqueued.spec.unwrap().suspend, None, "without a queue a Job starts at once");
    }

    #[test]
    fn gpus_are_requested_only_by_stages_that_run_the_model() {
        let mj = mergejob();
        let gpu = |s: &Stage| stage_job(&mj, 2, s).spec.unwrap().template.spec.unwrap().containers[0].resources.clone();
        assert_eq!(gpu(&Stage::Finetune { shard: "hospital-a".into() }).unwrap().limits.unwrap()["nvidia.com/gpu"], Quantity("1".into()));
        let merge = gpu(&Stage::Merge { candidate: "data-vector".into() }).unwrap();
        assert!(!merge.limits.unwrap().contains_key("nvidia.com/gpu"));
    }

    #[test]
    fn the_spec_configmap_round_trips_the_mergejob() {
        let mj = mergejob();
        let cm = spec_configmap(&mj, 2).unwrap();
        let back: MergeJob = serde_yaml::from_str(&cm.data.unwrap()["mergejob.yaml"]).unwrap();
        assert_eq!(back.spec, pod_view(&mj.spec));
        assert_eq!(back.spec, mj.spec, "without volumes the pods see the spec as written");
        assert_eq!(back.metadata.generation, Some(2));
    }

    #[test]
    fn tolerations_resources_and_ttl_reach_the_pod() {
        let mj = mergejob();
        let a = stage_job(&mj, 2, &Stage::Finetune { shard: "hospital-a".into() }).spec.unwrap();
        assert_eq!(a.ttl_seconds_after_finished, Some(600));
        let pod = a.template.spec.unwrap();
        let keys: Vec<String> = pod.tolerations.unwrap().iter().filter_map(|t| t.key.clone()).collect();
        assert_eq!(keys, vec!["nvidia.com/gpu", "site-a"]);
        let r = pod.containers[0].resources.clone().unwrap();
        assert_eq!(r.requests.unwrap()["cpu"], Quantity("4".into()));
        assert_eq!(r.limits.unwrap()["memory"], Quantity("16Gi".into()));
        let b = stage_job(&mj, 2, &Stage::Finetune { shard: "hospital-b".into() }).spec.unwrap().template.spec.unwrap();
        assert_eq!(b.tolerations.unwrap().len(), 1, "shard a's toleration is not shard b's");
    }

    #[test]
    fn a_collect_job_waits_for_the_hospitals_vector_until_the_straggler_deadline() {
        let mut mj = mergejob();
        mj.spec.cluster.straggler_deadline_seconds = Some(3600);
        let args = |mj: &MergeJob, stage: &Stage| stage_job(mj, 2, stage).spec.unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
        let collect = args(&mj, &Stage::Collect { shard: "hospital-b".into() });
        assert_eq!(&collect[collect.len() - 2..], ["--wait-for-vector", "3600"]);
        assert!(!args(&mj, &Stage::Finetune { shard: "hospital-a".into() }).contains(&"--wait-for-vector".to_string()));
        let merge = Stage::Merge { candidate: "data-vector".into() };
        assert!(!args(&mj, &merge).contains(&"--wait-for-vector".to_string()), "a plain merge has nothing to wait for");
        mj.spec.merge.secure_sum = Some(medmerge_crds::SecureSumSpec { session: "s".into() });
        let secure = args(&mj, &merge);
        assert_eq!(&secure[secure.len() - 2..], ["--wait-for-vector", "3600"], "a secure merge waits for dropout shares");
    }

    #[test]
    fn without_a_straggler_deadline_a_collect_job_outwaits_its_own_active_deadline() {
        let mut mj = mergejob();
        mj.spec.cluster.active_deadline_seconds = Some(90);
        let spec = stage_job(&mj, 2, &Stage::Collect { shard: "hospital-b".into() }).spec.unwrap();
        let args = spec.template.spec.unwrap().containers[0].args.clone().unwrap();
        let wait: i64 = args[args.len() - 1].parse().unwrap();
        assert_eq!(spec.active_deadline_seconds, Some(90));
        assert!(wait > 90, "the Job's deadline, not the trainer's wait, ends a silent hospital: {args:?}");
    }

    #[test]
    fn an_s3_store_gives_every_stage_the_bucket_credentials_by_reference() {
        let mut mj = mergejob();
        mj.spec.storage.local = None;
        mj.spec.storage.s3 = Some(medmerge_crds::S3Storage { bucket: "b".into(), endpoint: None, region: "r".into(), path_style: true, credentials_secret: Some("bucket-creds".into()) });
        let env = stage_job(&mj, 2, &Stage::Merge { candidate: "data-vector".into() }).spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
        let refs: Vec<(String, String)> = env.iter().filter_map(|e| e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).map(|r| (e.name.clone(), r.name.clone()))).collect();
        assert_eq!(refs, vec![("AWS_ACCESS_KEY_ID".to_string(), "bucket-creds".to_string()), ("AWS_SECRET_ACCESS_KEY".to_string(), "bucket-creds".to_string())]);
        assert!(env.iter().all(|e| e.value.as_deref() != Some("bucket-creds")), "credentials are referenced, never copied into the Job");
    }

    #[test]
    fn a_shard_with_its_own_bucket_identity_never_gets_the_bucket_credentials() {
        let mut mj = mergejob();
        mj.spec.storage.local = None;
        mj.spec.storage.s3 = Some(medmerge_crds::S3Storage { bucket: "b".into(), endpoint: None, region: "r".into(), path_style: true, credentials_secret: Some("bucket-creds".into()) });
        mj.spec.shards[0].storage_secret = Some("hospital-a-bucket".into());
        let identity = |stage: Stage| -> Vec<String> {
            let env = stage_job(&mj, 2, &stage).spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap();
            env.iter().filter_map(|e| e.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()).map(|r| r.name.clone())).collect()
        };
        let a = |shard: &str| shard.to_string();
        assert_eq!(identity(Stage::Finetune { shard: a("hospital-a") }), ["hospital-a-bucket", "hospital-a-bucket"]);
        assert_eq!(identity(Stage::Restore { candidate: "data-vector".into(), round: RestoreRound::Epoch(1), shard: a("hospital-a") }), ["hospital-a-bucket", "hospital-a-bucket"]);
        // Collecting a hospital's upload, and everything not a shard's own, is the coordinator's.
        for stage in [Stage::Collect { shard: a("hospital-a") }, Stage::Merge { candidate: "data-vector".into() }, Stage::Evaluate, Stage::Init] {
            assert_eq!(identity(stage.clone()), ["bucket-creds", "bucket-creds"], "{}", stage.name());
        }
        assert_eq!(identity(Stage::Finetune { shard: a("hospital-b") }), ["bucket-creds", "bucket-creds"], "a shard without its own identity gets the bucket's");
    }

    #[test]
    fn stages_after_a_shard_was_dropped_are_told_to_leave_it_out() {
        let job = stage_job_excluding(&mergejob(), 2, &Stage::Merge { candidate: "data-vector".into() }, &["hospital-b"]);
        let args = job.spec.unwrap().template.spec.unwrap().containers[0].args.clone().unwrap();
        assert_eq!(&args[args.len() - 2..], ["--exclude-shard", "hospital-b"]);
    }

    fn on_volumes() -> MergeJob {
        let mut mj = mergejob();
        let yaml = r#"
shards:
  - {name: hospital-a, data: {path: images, volume: {persistentVolumeClaim: {claimName: a-data}}}, secretRef: creds-a, podOverrides: {serviceAccountName: hospital-a}}
  - {name: hospital-b, data: {path: b.csv, volume: {hostPath: {path: /srv/b}}}}
evaluation: {data: {path: test, volume: {nfs: {server: 10.0.0.5, path: /export/test}}}}
storage: {local: {path: runs, persistentVolumeClaim: artifacts}}
"#;
        let v: serde_yaml::Value = serde_yaml::from_str(yaml).unwrap();
        mj.spec.shards = serde_yaml::from_value(v["shards"].clone()).unwrap();
        mj.spec.evaluation = serde_yaml::from_value(v["evaluation"].clone()).unwrap();
        mj.spec.storage = serde_yaml::from_value(v["storage"].clone()).unwrap();
        mj
    }

    fn mounts(job: &Job) -> Vec<(String, String, bool)> {
        let pod = job.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        pod.containers[0].volume_mounts.iter().flatten().map(|m| (m.name.clone(), m.mount_path.clone(), m.read_only.unwrap_or(false))).collect()
    }

    #[test]
    fn a_shard_pod_mounts_only_its_own_data_volume_read_only() {
        let mj = on_volumes();
        let a = stage_job(&mj, 2, &Stage::Finetune { shard: "hospital-a".into() });
        let m = mounts(&a);
        assert!(m.contains(&("data-hospital-a".into(), format!("{SHARD_DATA_DIR}/hospital-a"), true)), "{m:?}");
        assert!(!m.iter().any(|(n, _, _)| n == "data-hospital-b" || n == "evaluation-data"), "{m:?}");
        let pod = a.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        let claim = pod.volumes.iter().flatten().find(|v| v.name == "data-hospital-a").unwrap().persistent_volume_claim.clone().unwrap();
        assert_eq!((claim.claim_name.as_str(), claim.read_only), ("a-data", Some(true)));
        assert_eq!(pod.service_account_name.as_deref(), Some("hospital-a"), "the shard's own identity");
        let restore_b = mounts(&stage_job(&mj, 2, &Stage::Restore { candidate: "data-vector".into(), round: RestoreRound::BnMoments, shard: "hospital-b".into() }));
        assert!(restore_b.iter().any(|(n, _, ro)| n == "data-hospital-b" && *ro) && !restore_b.iter().any(|(n, _, _)| n == "data-hospital-a"), "{restore_b:?}");
        for stage in [Stage::Init, Stage::Merge { candidate: "data-vector".into() }, Stage::Collect { shard: "hospital-a".into() }] {
            assert!(!mounts(&stage_job(&mj, 2, &stage)).iter().any(|(n, _, _)| n.starts_with("data-") || n == "evaluation-data"), "{}", stage.name());
        }
        let evaluate = mounts(&stage_job(&mj, 2, &Stage::Evaluate));
        assert!(evaluate.contains(&("evaluation-data".into(), EVALUATION_DATA_DIR.into(), true)), "{evaluate:?}");
    }

    #[test]
    fn every_stage_pod_mounts_the_artifacts_claim_and_reads_paths_where_volumes_are_mounted() {
        let mj = on_volumes();
        for stage in [Stage::Init, Stage::Finetune { shard: "hospital-b".into() }, Stage::Evaluate] {
            assert!(mounts(&stage_job(&mj, 2, &stage)).contains(&("artifacts".into(), ARTIFACTS_DIR.into(), false)), "{}", stage.name());
        }
        let view = pod_view(&mj.spec);
        assert_eq!(view.shards[0].data.as_ref().unwrap().path, format!("{SHARD_DATA_DIR}/hospital-a/images"));
        assert_eq!(view.shards[1].data.as_ref().unwrap().path, format!("{SHARD_DATA_DIR}/hospital-b/b.csv"));
        assert_eq!(view.evaluation.data.path, format!("{EVALUATION_DATA_DIR}/test"));
        assert_eq!(view.storage.local.as_ref().unwrap().path, format!("{ARTIFACTS_DIR}/runs"));
        assert!(medmerge_crds::validate(&view).is_ok(), "the trainer accepts the pod's view: {:?}", medmerge_crds::validate(&view));
    }

    #[test]
    fn scratch_has_the_configured_size_limit_and_stage_kinds_get_their_own_placement() {
        let mut mj = mergejob();
        mj.spec.cluster.scratch_size_limit = Some("20Gi".into());
        mj.spec.cluster.stage_overrides.insert("evaluate".into(), serde_yaml::from_str("{nodeSelector: {pool: gpu}, priorityClassName: high}").unwrap());
        let evaluate = stage_job(&mj, 2, &Stage::Evaluate).spec.unwrap().template.spec.unwrap();
        assert_eq!(evaluate.node_selector.unwrap()["pool"], "gpu");
        assert_eq!(evaluate.priority_class_name.as_deref(), Some("high"));
        let tmp = evaluate.volumes.unwrap().into_iter().find(|v| v.name == "tmp").unwrap();
        assert_eq!(tmp.empty_dir.unwrap().size_limit, Some(Quantity("20Gi".into())));
        let merge = stage_job(&mj, 2, &Stage::Merge { candidate: "data-vector".into() }).spec.unwrap().template.spec.unwrap();
        assert_eq!(merge.node_selector, None);
        assert_eq!(merge.priority_class_name, None);
    }
}
