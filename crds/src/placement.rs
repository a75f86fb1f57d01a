//! How stage pods are placed and what they mount on a cluster: data volumes, pod-template
//! overrides at MergeJob, stage-kind and shard level, and the stage kinds they are keyed by.
//! Types only; the operator turns them into pod specs.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, CSIVolumeSource, EnvFromSource, EnvVar, HostPathVolumeSource, LocalObjectReference, NFSVolumeSource, PersistentVolumeClaimVolumeSource, ResourceRequirements, Toleration, Volume,
    VolumeMount,
};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::plan::Stage;

/// The extended resource `cluster.gpus` requests unless `cluster.gpuResource` says otherwise.
pub const DEFAULT_GPU_RESOURCE: &str = "nvidia.com/gpu";

/// A volume holding images, as a cluster provides it. Set exactly one source.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataVolume {
    /// A PersistentVolumeClaim in the MergeJob's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<PersistentVolumeClaimVolumeSource>,
    /// A directory on the node (single-node clusters, or data pre-staged on the hospital's nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_path: Option<HostPathVolumeSource>,
    /// An NFS export.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nfs: Option<NFSVolumeSource>,
    /// A CSI volume (e.g. an object-store or vendor storage driver).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub csi: Option<CSIVolumeSource>,
}

impl DataVolume {
    /// How many sources are set (exactly one is valid).
    pub fn sources(&self) -> usize {
        [self.persistent_volume_claim.is_some(), self.host_path.is_some(), self.nfs.is_some(), self.csi.is_some()].into_iter().filter(|s| *s).count()
    }
}

/// Pod settings layered onto stage pods: `cluster.podOverrides`, then
/// `cluster.stageOverrides[kind]`, then the shard's `podOverrides`. Maps (nodeSelector) are
/// merged key by key and lists (tolerations, volumes, volumeMounts, env, envFrom,
/// imagePullSecrets) appended; single values (affinity, serviceAccountName, priorityClassName)
/// are replaced by the more specific level; `resources` replaces requests and limits key by key.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodOverrides {
    /// Node, pod and anti-pod affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// Node labels the pod must run on.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Tolerations (e.g. of tainted GPU nodes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Extra pod volumes (mount them with `volumeMounts`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<Volume>,
    /// Extra mounts in the trainer container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<VolumeMount>,
    /// Extra environment variables of the trainer container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Environment from ConfigMaps or Secrets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env_from: Vec<EnvFromSource>,
    /// Secrets for pulling the trainer image from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// ServiceAccount the pod runs as (e.g. one per hospital, for its own workload identity).
    /// Its API token is not mounted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// PriorityClass of the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// Requests and limits of the trainer container, any resource name (`cpu`, `memory`,
    /// `nvidia.com/gpu`, `nvidia.com/mig-1g.10gb`, `amd.com/gpu`, ...), over `cluster.resources`
    /// and `cluster.gpus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
}

impl PodOverrides {
    /// Whether nothing is overridden.
    pub fn is_empty(&self) -> bool {
        self == &PodOverrides::default()
    }
}

/// The kinds of stage, as `cluster.stageOverrides` keys them.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StageKind {
    /// Materialising the pretrained base.
    Init,
    /// A shard's fine-tuning.
    Finetune,
    /// Copying an external hospital's vector.
    Collect,
    /// The pooled-data baseline.
    FullTraining,
    /// Merging vectors into a candidate.
    Merge,
    /// A shard's part of a restoration, and combining the parts.
    Restore,
    /// Evaluating every candidate.
    Evaluate,
}

impl StageKind {
    /// Every kind, in plan order.
    pub const ALL: [StageKind; 7] = [StageKind::Init, StageKind::Finetune, StageKind::Collect, StageKind::FullTraining, StageKind::Merge, StageKind::Restore, StageKind::Evaluate];

    /// The camelCase name `cluster.stageOverrides` uses as a key.
    pub fn as_str(self) -> &'static str {
        match self {
            StageKind::Init => "init",
            StageKind::Finetune => "finetune",
            StageKind::Collect => "collect",
            StageKind::FullTraining => "fullTraining",
            StageKind::Merge => "merge",
            StageKind::Restore => "restore",
            StageKind::Evaluate => "evaluate",
        }
    }

    /// The kind of `stage`.
    pub fn of(stage: &Stage) -> Self {
        match stage {
            Stage::Init => StageKind::Init,
            Stage::Finetune { .. } => StageKind::Finetune,
            Stage::Collect { .. } => StageKind::Collect,
            Stage::FullTraining => StageKind::FullTraining,
            Stage::Merge { .. } => StageKind::Merge,
            Stage::Restore { .. } | Stage::RestoreCombine { .. } => StageKind::Restore,
            Stage::Evaluate => StageKind::Evaluate,
        }
    }
}
