//! `MergeJob` spec types. Every field's doc comment becomes `kubectl explain` text.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::limits;
pub use crate::placement::{DataVolume, PodOverrides, StageKind, DEFAULT_GPU_RESOURCE};
use crate::status::MergeJobStatus;

/// A MergeJob merges the data vectors of several hospitals (shards) into one classifier.
///
/// Each shard fine-tunes the same pretrained model on its own images and shares only its data
/// vector (fine-tuned minus pretrained weights). The vectors are added, scaled by lambda, onto the
/// pretrained weights, the classification heads are averaged, batch-norm state is restored with a
/// short pass over each shard, and the result is evaluated on a held-out set.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "medmerge.io",
    version = "v1alpha1",
    kind = "MergeJob",
    namespaced,
    shortname = "mj",
    status = "MergeJobStatus",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Shards","type":"string","jsonPath":".status.shardsReady"}"#,
    printcolumn = r#"{"name":"Accuracy","type":"number","jsonPath":".status.results.accuracy"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct MergeJobSpec {
    /// The pretrained classifier every shard starts from.
    pub model: ModelSpec,
    /// The hospitals taking part. Each fine-tunes on its own data, or supplies a pre-computed
    /// vector. Names must be unique DNS labels.
    #[schemars(length(min = 1), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub shards: Vec<ShardSpec>,
    /// How each shard fine-tunes.
    #[serde(default)]
    pub training: TrainingSpec,
    /// How every hospital's vector leaves it (privacy noise, compression); a shard's own
    /// `release` replaces it. Default: the vector as trained, in float32.
    #[serde(default, skip_serializing_if = "ReleaseSpec::is_plain")]
    pub release: ReleaseSpec,
    /// How vectors and heads are combined, and which baselines are computed beside the merge.
    #[serde(default)]
    pub merge: MergeSpec,
    /// How batch-norm state of merged models is restored before evaluation.
    #[serde(default)]
    pub restore: RestoreSpec,
    /// The coordinator's held-out evaluation set.
    pub evaluation: EvaluationSpec,
    /// Where artifacts (base weights, vectors, models, reports) are written.
    #[serde(default)]
    pub storage: StorageSpec,
    /// How the operator runs stages on a cluster (ignored by the local pipeline).
    #[serde(default)]
    pub cluster: ClusterSpec,
    /// Pause the run without losing it, as Job, JobSet and TrainJob spell it: active stage Jobs
    /// are suspended (their pods go, the Jobs and every published artifact stay) and nothing new
    /// starts; clearing it carries the same run on. `cluster.suspend` is the older spelling and
    /// still works.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspend: bool,
}

impl MergeJobSpec {
    /// Whether the run is paused (`suspend`, or the older `cluster.suspend`).
    pub fn is_suspended(&self) -> bool {
        self.suspend || self.cluster.suspend
    }

    /// How `shard`'s vector is released: its own `release`, else the spec's.
    pub fn release_of<'a>(&'a self, shard: &'a ShardSpec) -> &'a ReleaseSpec {
        shard.release.as_ref().unwrap_or(&self.release)
    }
}

/// How a hospital's data vector is prepared for upload, after training and before it leaves:
/// first differential privacy (clip and noise), then the encoding. Both happen on the
/// hospital's side, in its own training stage (or its own `finetune` run).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReleaseSpec {
    /// Differential privacy for the vector: its L2 norm clipped to `clipNorm` and Gaussian noise
    /// added, calibrated so that the released vector is (epsilon, delta)-DP with respect to the
    /// hospital's whole training set. Covers the vector's tensors only (not its sample counts,
    /// training metrics or the restoration stages' outputs). Unset: no noise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacySpec>,
    /// How the vector's weight tensors are stored for upload: `float32` (exact), `int8` (one
    /// scale per output channel, 4x smaller) or `topK` (only the largest-magnitude `density`
    /// of each tensor's entries). Heads, biases and batch-norm tensors stay float32.
    #[serde(default, skip_serializing_if = "VectorEncoding::is_float32")]
    pub encoding: VectorEncoding,
    /// With `encoding: topK`: the fraction of each tensor's entries kept (default 0.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = limits::TOP_K_DENSITY.min, max = limits::TOP_K_DENSITY.max), extend("exclusiveMinimum" = limits::TOP_K_DENSITY.min_exclusive))]
    pub density: Option<f64>,
}

impl ReleaseSpec {
    /// The fraction of entries `topK` keeps when `density` is unset.
    pub const DEFAULT_TOP_K_DENSITY: f64 = 0.1;

    /// Whether the vector is released as trained, in float32 (the default).
    pub fn is_plain(&self) -> bool {
        *self == ReleaseSpec::default()
    }

    /// The fraction of entries kept by `topK`.
    pub fn top_k_density(&self) -> f64 {
        self.density.unwrap_or(Self::DEFAULT_TOP_K_DENSITY)
    }
}

/// The (epsilon, delta) guarantee a hospital asks for and the clipping norm that bounds its
/// vector's sensitivity.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PrivacySpec {
    /// Privacy loss epsilon (smaller: more noise).
    #[schemars(range(min = limits::EPSILON.min, max = limits::EPSILON.max), extend("exclusiveMinimum" = limits::EPSILON.min_exclusive))]
    pub epsilon: f64,
    /// Probability delta that the epsilon bound fails; well below 1 / (number of patients).
    #[schemars(range(min = limits::DELTA.min, max = limits::DELTA.max), extend("exclusiveMinimum" = limits::DELTA.min_exclusive))]
    pub delta: f64,
    /// The vector's L2 norm is scaled down to at most this before noise is added; the noise's
    /// standard deviation grows with it.
    #[schemars(range(min = limits::CLIP_NORM.min), extend("exclusiveMinimum" = limits::CLIP_NORM.min_exclusive))]
    pub clip_norm: f64,
}

/// How a vector's weight tensors are stored for upload.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum VectorEncoding {
    /// 32-bit floats, exact.
    #[default]
    Float32,
    /// 8-bit integers with one float scale per output channel (round to nearest).
    Int8,
    /// The largest-magnitude entries of each tensor with their positions; the rest are zero.
    TopK,
}

impl VectorEncoding {
    /// Whether this is the default, exact encoding.
    pub fn is_float32(&self) -> bool {
        *self == VectorEncoding::Float32
    }

    /// The spelling the spec uses.
    pub fn as_str(&self) -> &'static str {
        match self {
            VectorEncoding::Float32 => "float32",
            VectorEncoding::Int8 => "int8",
            VectorEncoding::TopK => "topK",
        }
    }
}

/// Cluster execution settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ClusterSpec {
    /// Trainer container image every stage Job runs.
    pub image: String,
    /// Image pull policy (Always, IfNotPresent, Never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// Retries of a stage Job before the stage counts as failed.
    #[schemars(range(min = limits::BACKOFF_LIMIT.min, max = limits::BACKOFF_LIMIT.max))]
    pub backoff_limit: i32,
    /// Seconds a stage Job may run before it is stopped and counts as failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = limits::ACTIVE_DEADLINE_SECONDS.min))]
    pub active_deadline_seconds: Option<i64>,
    /// Shards whose vectors must be available to go on without shards that failed.
    /// Unset: every shard is required.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = limits::MIN_SHARDS.min))]
    pub min_shards: Option<u32>,
    /// The older spelling of the top-level `suspend` (same effect).
    pub suspend: bool,
    /// GPUs requested (as limits of `gpuResource`) by training, restoration and evaluation
    /// Jobs: 0 or 1 (the trainer uses one device; multi-GPU training is not supported yet).
    #[schemars(range(min = limits::GPUS.min, max = limits::GPUS.max))]
    pub gpus: u32,
    /// The extended resource that `gpus` requests: `nvidia.com/gpu`, a MIG profile such as
    /// `nvidia.com/mig-1g.10gb`, or `amd.com/gpu`. For anything else, set `resources` in
    /// `podOverrides` or `stageOverrides`.
    pub gpu_resource: String,
    /// CPU and memory for every stage Job's container.
    pub resources: ResourceSpec,
    /// Size limit of the scratch emptyDir mounted at /tmp in every stage pod (downloaded
    /// artifacts, the S3 data cache, temporary files), a quantity such as `20Gi`. Unset: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scratch_size_limit: Option<String>,
    /// Pod settings for every stage pod (placement, extra volumes, env, identity, resources).
    /// `stageOverrides` and a shard's `podOverrides` refine them.
    #[serde(skip_serializing_if = "PodOverrides::is_empty")]
    pub pod_overrides: PodOverrides,
    /// Pod settings per stage kind (`init`, `finetune`, `collect`, `fullTraining`, `merge`,
    /// `restore`, `evaluate`), applied over `podOverrides`; e.g. put `evaluate` on a GPU pool
    /// and `merge` on CPU nodes.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub stage_overrides: std::collections::BTreeMap<String, PodOverrides>,
    /// Seconds from the start of a shard's Job (its admission, when a queue such as Kueue holds
    /// it first) after which a shard that has not delivered its vector (an external hospital, or
    /// a training Job still running) is dropped as a straggler; `minShards` then decides whether
    /// the run goes on. Unset: wait for every shard.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = limits::STRAGGLER_DEADLINE_SECONDS.min))]
    pub straggler_deadline_seconds: Option<i64>,
    /// Seconds after a stage Job finishes before Kubernetes deletes it (and its pods).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = limits::TTL_SECONDS_AFTER_FINISHED.min))]
    pub ttl_seconds_after_finished: Option<i32>,
    /// Tolerations added to every stage pod (e.g. for tainted GPU nodes).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
}

/// Container resources, as Kubernetes quantities ("4", "500m", "16Gi").
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct ResourceSpec {
    /// CPU request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<String>,
    /// Memory request and limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
}

/// A pod toleration (the fields of core/v1 Toleration).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Toleration {
    /// Taint key to tolerate; empty with operator Exists tolerates every taint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Equal (default) or Exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(Equal|Exists)$"))]
    pub operator: Option<String>,
    /// Taint value to match with operator Equal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// NoSchedule, PreferNoSchedule or NoExecute; empty matches every effect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(NoSchedule|PreferNoSchedule|NoExecute)$"))]
    pub effect: Option<String>,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            image: "ghcr.io/medmerge/trainer:0.1.0".into(),
            image_pull_policy: None,
            backoff_limit: 2,
            active_deadline_seconds: None,
            min_shards: None,
            suspend: false,
            gpus: 0,
            gpu_resource: DEFAULT_GPU_RESOURCE.into(),
            resources: ResourceSpec::default(),
            scratch_size_limit: None,
            pod_overrides: PodOverrides::default(),
            stage_overrides: Default::default(),
            straggler_deadline_seconds: None,
            ttl_seconds_after_finished: None,
            tolerations: Vec::new(),
        }
    }
}

/// The model architecture and the weights every shard starts from.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// Network architecture.
    #[serde(default)]
    pub architecture: Architecture,
    /// Where the pretrained weights come from.
    #[serde(default)]
    pub weights: WeightsSource,
    /// Path of a `.safetensors` or `.pth` file with torchvision-style (or, for
    /// efficientnet-lite0, efficientnet_pytorch-style) tensor names. Required when `weights` is
    /// `file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_path: Option<String>,
    /// Class names in label order. Empty: taken from the first shard's class folders.
    #[serde(default)]
    pub classes: Vec<String>,
    /// Square input resolution in pixels.
    #[serde(default = "default_image_size")]
    #[schemars(range(min = limits::IMAGE_SIZE.min, max = limits::IMAGE_SIZE.max))]
    pub image_size: u32,
    /// Seed for random initialisation of new layers (heads, or everything when weights=random).
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Each image may carry several labels (RFMiD-style wide manifests: `path,<class>,...` with
    /// 0/1 columns): trains with binary cross-entropy and reports per-label AUROC.
    #[serde(default)]
    pub multi_label: bool,
}

/// Supported classifier architectures.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Architecture {
    /// EfficientNet-Lite0 (ReLU6, no squeeze-excitation); ImageNet weights ship with medmerge.
    #[default]
    EfficientnetLite0,
    /// ResNet-18 (torchvision layout).
    Resnet18,
    /// ResNet-34 (torchvision layout).
    Resnet34,
    /// ResNet-50 (torchvision layout), the paper's model.
    Resnet50,
    /// EfficientNet-B0 (torchvision layout).
    EfficientnetB0,
    /// MobileNetV2 (torchvision layout).
    MobilenetV2,
    /// MobileNetV3-Large (torchvision layout): an edge model for devices at the point of care.
    MobilenetV3Large,
    /// MobileNetV3-Small (torchvision layout): the smallest edge model.
    MobilenetV3Small,
}

impl Architecture {
    /// The kebab-case name used in YAML, CLI flags and artifact metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::EfficientnetLite0 => "efficientnet-lite0",
            Architecture::Resnet18 => "resnet18",
            Architecture::Resnet34 => "resnet34",
            Architecture::Resnet50 => "resnet50",
            Architecture::EfficientnetB0 => "efficientnet-b0",
            Architecture::MobilenetV2 => "mobilenet-v2",
            Architecture::MobilenetV3Large => "mobilenet-v3-large",
            Architecture::MobilenetV3Small => "mobilenet-v3-small",
        }
    }

    /// Parses the kebab-case name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }

    /// Every supported architecture.
    pub const ALL: [Architecture; 8] =
        [Self::EfficientnetLite0, Self::Resnet18, Self::Resnet34, Self::Resnet50, Self::EfficientnetB0, Self::MobilenetV2, Self::MobilenetV3Large, Self::MobilenetV3Small];
}

/// Where pretrained weights come from.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum WeightsSource {
    /// The ImageNet weights that ship with medmerge (efficientnet-lite0 only).
    #[default]
    Imagenet,
    /// Seeded random initialisation (tests, or architectures without shipped weights).
    Random,
    /// Import from `weightsPath`.
    File,
}

/// One hospital.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardSpec {
    /// Unique name, a DNS label (lower-case letters, digits, '-'; at most 40 characters).
    #[schemars(length(min = 1, max = 40), regex(pattern = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"))]
    pub name: String,
    /// The shard's training images. Omit only when `vector` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataSource>,
    /// Location of a data vector the hospital computed on its own premises with
    /// `medmerge-trainer finetune`. When set, the shard is not trained here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vector: Option<String>,
    /// Name of a Secret with this shard's data credentials, mounted only into this shard's Jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_ref: Option<String>,
    /// Name of a Secret with keys `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` of this
    /// hospital's own identity for the artifact bucket (`storage.s3`). This shard's training and
    /// restoration pods get it instead of `storage.s3.credentialsSecret`, so they never hold the
    /// bucket's credentials. Everything they write lies under `<run>/shards/<name>/`: a bucket
    /// policy can limit the identity to writing there and reading the MergeJob's prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_secret: Option<String>,
    /// Node labels this shard's Jobs must run on (e.g. the hospital's own nodes).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub node_selector: std::collections::BTreeMap<String, String>,
    /// How this hospital's vector leaves it, replacing the spec's `release` (e.g. a hospital
    /// that asks for stronger privacy or has a slow uplink).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release: Option<ReleaseSpec>,
    /// Tolerations for this shard's pods, added to `cluster.tolerations`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Pod settings for this shard's pods (its training, collection and restoration), applied
    /// last: e.g. the hospital's own `serviceAccountName` for a workload identity, its node
    /// affinity, or a GPU model only its nodes have.
    #[serde(default, skip_serializing_if = "PodOverrides::is_empty")]
    pub pod_overrides: PodOverrides,
}

/// A labelled image set.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataSource {
    /// An ImageFolder directory (`<class>/<image>`) or a CSV manifest (`path,label`, paths
    /// relative to the manifest's directory): a local path, or `s3://bucket/prefix/` (or
    /// `.../manifest.csv`) read with the shard's own credentials and cached locally. With
    /// `volume`, a relative path inside that volume.
    pub path: String,
    /// On a cluster: the volume holding the images (a PersistentVolumeClaim, hostPath, NFS
    /// share or CSI volume), mounted read-only into the pods of this shard only (or of the
    /// evaluation, for `evaluation.data`). Not used by local runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<DataVolume>,
}

impl DataSource {
    /// Images at `path`, with no volume.
    pub fn at(path: impl Into<String>) -> Self {
        DataSource { path: path.into(), volume: None }
    }
}

/// Fine-tuning settings shared by every shard.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct TrainingSpec {
    /// Passes over the shard's data.
    #[schemars(range(min = limits::EPOCHS.min, max = limits::EPOCHS.max))]
    pub epochs: u32,
    /// Images per optimisation step.
    #[schemars(range(min = limits::BATCH_SIZE.min, max = limits::BATCH_SIZE.max))]
    pub batch_size: u32,
    /// Optimiser.
    pub optimizer: Optimizer,
    /// Peak learning rate.
    #[schemars(range(min = limits::LEARNING_RATE.min), extend("exclusiveMinimum" = limits::LEARNING_RATE.min_exclusive))]
    pub learning_rate: f64,
    /// Weight decay (decoupled for adamW).
    #[schemars(range(min = limits::WEIGHT_DECAY.min))]
    pub weight_decay: f64,
    /// Learning-rate schedule over the whole run.
    pub schedule: Schedule,
    /// Seed for shuffling, augmentation and head initialisation.
    pub seed: u64,
    /// Weight the cross-entropy by inverse class frequency of the shard.
    pub class_weighting: bool,
    /// Fraction of each shard held out to pick the epoch with the best balanced accuracy (mean
    /// recall over the classes, so a majority class cannot carry it); 0 keeps the last epoch.
    #[schemars(range(min = limits::VALIDATION_FRACTION.min, max = limits::VALIDATION_FRACTION.max))]
    pub validation_fraction: f64,
    /// Random augmentation applied to training images.
    pub augment: AugmentSpec,
    /// On CUDA, run forward passes under bfloat16 autocast (float32 weights, optimizer and loss;
    /// bfloat16's range needs no loss scaling). Needs a GPU with bfloat16 (Ampere or newer).
    /// Ignored on CPU.
    pub mixed_precision: bool,
}

impl Default for TrainingSpec {
    fn default() -> Self {
        TrainingSpec {
            epochs: 3,
            batch_size: 32,
            optimizer: Optimizer::Adam,
            learning_rate: 1e-4,
            weight_decay: 0.0,
            schedule: Schedule::Constant,
            seed: 3315,
            class_weighting: true,
            validation_fraction: 0.0,
            augment: AugmentSpec::default(),
            mixed_precision: false,
        }
    }
}

/// Optimisers.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Optimizer {
    /// Adam (the paper).
    #[default]
    Adam,
    /// AdamW, decoupled weight decay.
    AdamW,
    /// SGD with Nesterov momentum 0.9.
    Sgd,
}

/// Learning-rate schedules.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Schedule {
    /// The same rate throughout.
    #[default]
    Constant,
    /// Cosine decay to zero over all steps.
    Cosine,
}

/// Random augmentation.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct AugmentSpec {
    /// Random horizontal and vertical flips.
    pub flip: bool,
    /// Maximum rotation in degrees (0 disables).
    #[schemars(range(min = limits::ROTATION_DEGREES.min, max = limits::ROTATION_DEGREES.max))]
    pub rotation_degrees: f32,
    /// Maximum relative brightness/contrast/saturation change (0 disables).
    #[schemars(range(min = limits::COLOR_JITTER.min, max = limits::COLOR_JITTER.max))]
    pub color_jitter: f32,
    /// Smallest crop side as a fraction of the image for random scale crops (1 disables).
    #[schemars(range(min = limits::MIN_SCALE.min, max = limits::MIN_SCALE.max))]
    pub min_scale: f32,
}

impl Default for AugmentSpec {
    fn default() -> Self {
        AugmentSpec { flip: true, rotation_degrees: 0.0, color_jitter: 0.0, min_scale: 1.0 }
    }
}

/// Merge settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct MergeSpec {
    /// How the data vectors are combined into the merged model.
    pub method: MergeMethod,
    /// Scale applied to the summed vectors (dataVector, ties, dare, randomVector). Default 2.0:
    /// with the default restoration it matched full training on IID hospitals and beat 1.5 on
    /// the mean of IID, label-skewed, size-skewed and imbalanced hospitals, 1.5 beat 1.0 and 1.0
    /// beat the paper's 0.5 (bench/results/default-candidates.md, bench/results/paper-table.md).
    #[schemars(range(min = limits::LAMBDA.min, max = limits::LAMBDA.max))]
    pub lambda: f64,
    /// How the shards' classification heads are combined.
    pub heads: HeadStrategy,
    /// Fraction of each vector's largest-magnitude entries kept by TIES.
    #[schemars(range(min = limits::TIES_DENSITY.min, max = limits::TIES_DENSITY.max), extend("exclusiveMinimum" = limits::TIES_DENSITY.min_exclusive))]
    pub ties_density: f64,
    /// Probability that DARE drops an entry of each vector.
    #[schemars(range(min = limits::DARE_DROP_RATE.min, max = limits::DARE_DROP_RATE.max))]
    pub dare_drop_rate: f64,
    /// Seed for randomVector and DARE.
    pub seed: u64,
    /// Models computed and evaluated beside the merged one, for comparison.
    pub baselines: Vec<Baseline>,
    /// Secure aggregation: every hospital uploads its vector masked (`medmerge-trainer secure
    /// mask`) and the merge learns only the sum, never one hospital's vector. Needs vector-only
    /// shards, `dataVector` or `paramsMean` with mean heads, no restoration and no baselines
    /// other than `paramsMean`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_sum: Option<SecureSumSpec>,
}

/// Secure aggregation of masked vectors.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecureSumSpec {
    /// The session the hospitals masked for (`secure mask --session`); uploads masked for
    /// another session are refused. When a hospital drops out, each survivor uploads its share
    /// about it (`secure share`) next to its vector, at `<vector>.dropout-<dropped>.json`.
    pub session: String,
}

impl Default for MergeSpec {
    fn default() -> Self {
        MergeSpec {
            method: MergeMethod::DataVector,
            lambda: 2.0,
            heads: HeadStrategy::Mean,
            ties_density: 0.2,
            dare_drop_rate: 0.9,
            seed: 3315,
            baselines: vec![Baseline::ParamsMean, Baseline::ShardModels],
            secure_sum: None,
        }
    }
}

/// Ways to combine vectors.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum MergeMethod {
    /// pretrained + lambda * sum of vectors (the paper).
    #[default]
    DataVector,
    /// Mean of the fine-tuned weights (model soup); lambda is not used.
    ParamsMean,
    /// A random direction with the per-tensor norm of the data-vector sum (a control).
    RandomVector,
    /// TIES-merging: trim, elect sign, disjoint mean, times lambda.
    Ties,
    /// DARE: drop entries at random, rescale, sum, times lambda.
    Dare,
}

impl MergeMethod {
    /// kebab-case name used in artifact keys and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            MergeMethod::DataVector => "data-vector",
            MergeMethod::ParamsMean => "params-mean",
            MergeMethod::RandomVector => "random-vector",
            MergeMethod::Ties => "ties",
            MergeMethod::Dare => "dare",
        }
    }

    /// Parses the kebab-case name.
    pub fn parse(name: &str) -> Option<Self> {
        [Self::DataVector, Self::ParamsMean, Self::RandomVector, Self::Ties, Self::Dare].into_iter().find(|m| m.as_str() == name)
    }
}

/// How heads are combined.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum HeadStrategy {
    /// Plain mean of the shard heads (the paper).
    #[default]
    Mean,
    /// Mean weighted by each shard's number of training images.
    SampleWeighted,
}

/// Comparison models.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum Baseline {
    /// Parameter mean of the fine-tuned models, restored like the merged model.
    ParamsMean,
    /// Random vector with the data-vector's per-tensor norms, restored like the merged model.
    RandomVector,
    /// TIES-merging, restored like the merged model.
    Ties,
    /// DARE, restored like the merged model.
    Dare,
    /// Each shard's own fine-tuned model, alone.
    ShardModels,
    /// The pretrained model with the same restoration and averaged heads but no vectors: what the
    /// restoration alone achieves.
    PretrainedRestored,
    /// One model trained on all shards together (needs every shard's data in one place; for
    /// benchmarks, not for production).
    FullTraining,
}

/// Restoration settings.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", default)]
pub struct RestoreSpec {
    /// How batch-norm state is restored.
    pub mode: RestoreMode,
    /// Learning rate of the modes that train (finetuneEpoch, averagedEpoch, averagedEpochHead;
    /// defaults to training.learningRate).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = limits::RESTORE_LEARNING_RATE.min), extend("exclusiveMinimum" = limits::RESTORE_LEARNING_RATE.min_exclusive))]
    pub learning_rate: Option<f64>,
    /// Training rounds of the modes that train: averaged epochs one after another
    /// (averagedEpoch, averagedEpochHead), or passes along the chain (finetuneEpoch). Each
    /// round costs every hospital one epoch on its own data.
    #[serde(skip_serializing_if = "is_one_epoch")]
    #[schemars(range(min = limits::RESTORE_EPOCHS.min, max = limits::RESTORE_EPOCHS.max))]
    pub epochs: u32,
}

// One epoch is left out of the serialised spec, so that the run key of a spec written before
// `restore.epochs` existed stays the same (an operator upgrade does not start new runs).
fn is_one_epoch(epochs: &u32) -> bool {
    *epochs == 1
}

impl Default for RestoreSpec {
    fn default() -> Self {
        RestoreSpec { mode: RestoreMode::AveragedEpochHead, learning_rate: None, epochs: 1 }
    }
}

impl RestoreSpec {
    /// How the restoration reads in reports: the mode, with the epochs when there are several
    /// (`averaged-epoch-head ×2`).
    pub fn label(&self) -> String {
        match self.epochs {
            n if n > 1 && self.mode.trains() => format!("{} ×{n}", self.mode.as_str()),
            _ => self.mode.as_str().to_string(),
        }
    }

    /// The rounds this restoration runs, in order, for a model that is multi-label or not:
    /// the mode's rounds with its training round repeated `epochs` times; multi-label models
    /// skip the head round (the closed-form head needs one class per image).
    pub fn rounds(&self, multi_label: bool) -> Vec<RestoreRound> {
        use RestoreRound::*;
        let training = |round: fn(u32) -> RestoreRound| (1..=self.epochs.max(1)).map(round).collect::<Vec<_>>();
        let rounds = match self.mode {
            RestoreMode::BnRecalibrate => vec![BnMoments],
            RestoreMode::ClosedFormHead => vec![BnMoments, HeadStatistics],
            RestoreMode::AveragedEpoch => [training(Epoch), vec![BnMoments]].concat(),
            RestoreMode::AveragedEpochHead => [training(Epoch), vec![BnMoments, HeadStatistics]].concat(),
            RestoreMode::FinetuneEpoch => training(Chain),
            RestoreMode::None => vec![],
        };
        rounds.into_iter().filter(|r| !(multi_label && *r == HeadStatistics)).collect()
    }
}

/// Restoration modes. Every mode but `finetuneEpoch` runs as rounds in which all hospitals work
/// at the same time on their own data and only aggregates leave them; no hospital waits for
/// another's result.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum RestoreMode {
    /// Each shard computes batch-norm statistics of the merged model on its own data; only
    /// counts, sums and sums of squares leave the shard; they are combined exactly.
    BnRecalibrate,
    /// `bnRecalibrate`, then a classification head fitted in closed form (shrinkage LDA) from
    /// each shard's per-class counts and feature sums and its feature Gram matrix, computed with
    /// the recalibrated backbone (multi-label models skip the head round).
    ClosedFormHead,
    /// One training epoch on every shard at the same time, each from the merged model; the
    /// shards' models are averaged (weighted by images), then `bnRecalibrate`.
    AveragedEpoch,
    /// `averagedEpoch`, then the closed-form head of `closedFormHead` (multi-label models skip the
    /// head round): the default, the best
    /// measured restoration that keeps hospitals independent (bench/results/paper-table.md).
    #[default]
    AveragedEpochHead,
    /// One training epoch on each shard in turn, the model travelling from shard to shard (the
    /// paper's restoration; hospitals wait on each other).
    FinetuneEpoch,
    /// No restoration.
    None,
}

/// One round of a restoration: what each shard computes from the round's input model, and what
/// the coordinator combines it into. Training rounds carry their number (from 1) because
/// `restore.epochs` repeats them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RestoreRound {
    /// Every shard trains one epoch from the input; the models are averaged.
    Epoch(u32),
    /// Every shard reports batch-norm input moments; they set the running statistics.
    BnMoments,
    /// Every shard reports per-class feature statistics; they fit the classification head.
    HeadStatistics,
    /// Shard after shard, one epoch each, the model passed along (the paper's chain).
    Chain(u32),
}

impl RestoreRound {
    /// kebab-case name of the round's kind (`epoch`, `bn`, `head`, `chain`).
    pub fn kind(self) -> &'static str {
        match self {
            RestoreRound::Epoch(_) => "epoch",
            RestoreRound::BnMoments => "bn",
            RestoreRound::HeadStatistics => "head",
            RestoreRound::Chain(_) => "chain",
        }
    }

    /// Name used in stage names and artifact keys: the kind, numbered from the second training
    /// round on (`epoch`, `epoch-2`), so one-epoch runs keep the keys they always had.
    pub fn name(self) -> String {
        match self {
            RestoreRound::Epoch(n) | RestoreRound::Chain(n) if n > 1 => format!("{}-{n}", self.kind()),
            _ => self.kind().to_string(),
        }
    }

    /// Whether shards train in this round (and so use `restore.learningRate`).
    pub fn trains(self) -> bool {
        matches!(self, RestoreRound::Epoch(_) | RestoreRound::Chain(_))
    }
}

impl RestoreMode {
    /// Every mode, in documentation order.
    pub const ALL: [RestoreMode; 6] = [Self::BnRecalibrate, Self::ClosedFormHead, Self::AveragedEpoch, Self::AveragedEpochHead, Self::FinetuneEpoch, Self::None];

    /// kebab-case name used in artifact keys and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            RestoreMode::BnRecalibrate => "bn-recalibrate",
            RestoreMode::ClosedFormHead => "closed-form-head",
            RestoreMode::AveragedEpoch => "averaged-epoch",
            RestoreMode::AveragedEpochHead => "averaged-epoch-head",
            RestoreMode::FinetuneEpoch => "finetune-epoch",
            RestoreMode::None => "none",
        }
    }

    /// Parses the kebab-case name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// Whether any round trains (and so uses `restore.learningRate` and `restore.epochs`).
    pub fn trains(self) -> bool {
        RestoreSpec { mode: self, ..RestoreSpec::default() }.rounds(false).iter().any(|r| r.trains())
    }
}

/// The held-out evaluation.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EvaluationSpec {
    /// The coordinator's held-out test images.
    pub data: DataSource,
    /// Probability threshold at which each class's sensitivity and specificity are reported
    /// (one class against the rest).
    #[serde(default = "default_operating_point")]
    #[schemars(range(min = limits::OPERATING_POINT.min, max = limits::OPERATING_POINT.max))]
    pub operating_point: f64,
    /// Held-out images explained with Grad-CAM for every evaluated model (the report's share of
    /// heat inside the fundus disc and its gallery of correct and wrong predictions); 0 turns
    /// Grad-CAM off.
    #[serde(default = "default_explain_images")]
    #[schemars(range(min = limits::EXPLAIN_IMAGES.min, max = limits::EXPLAIN_IMAGES.max))]
    pub explain_images: u32,
}

impl EvaluationSpec {
    /// Evaluation on `data` with default settings.
    pub fn on(data: DataSource) -> Self {
        EvaluationSpec { data, operating_point: default_operating_point(), explain_images: default_explain_images() }
    }
}

/// Artifact storage.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Local directory (the embedded default for one-machine runs). Set this or `s3`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<LocalStorage>,
    /// An S3 or S3-compatible bucket (clusters; hospitals upload external vectors there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Storage>,
    /// Key prefix under which every run's artifacts live.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// What happens to the MergeJob's artifacts (every generation) when it is deleted.
    #[serde(default)]
    pub cleanup: CleanupPolicy,
}

/// What deleting a MergeJob does to its artifacts.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Default, JsonSchema)]
pub enum CleanupPolicy {
    /// Keep them (models and reports outlive the resource).
    #[default]
    Retain,
    /// Delete them before the MergeJob goes away (the operator holds a finalizer until done).
    Delete,
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec { local: Some(LocalStorage { path: "medmerge-artifacts".into(), persistent_volume_claim: None }), s3: None, prefix: default_prefix(), cleanup: CleanupPolicy::Retain }
    }
}

/// An S3 bucket holding the artifacts.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Storage {
    /// Bucket name.
    #[schemars(length(min = 3, max = 63))]
    pub bucket: String,
    /// Endpoint URL of an S3-compatible server (MinIO, SeaweedFS, Ceph); unset for AWS S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Region (S3-compatible servers accept any).
    #[serde(default = "default_region")]
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Secret with keys `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`, given to the
    /// coordinator's stage pods (init, collect, merge, evaluate, ...), and to a shard's training
    /// and restoration pods unless the shard names its own `storageSecret`. Unset: the pods'
    /// standard AWS credential chain (e.g. a workload identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<String>,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_true() -> bool {
    true
}

/// A local artifact directory.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LocalStorage {
    /// Directory path; relative paths are relative to the MergeJob file. On a cluster, a
    /// relative path inside `persistentVolumeClaim`.
    pub path: String,
    /// On a cluster: a ReadWriteMany PersistentVolumeClaim in the MergeJob's namespace, mounted
    /// into every stage pod; the operator reads results from the same share (the chart's
    /// `localArtifacts`). Required by the operator for local storage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub persistent_volume_claim: Option<String>,
}

fn default_image_size() -> u32 {
    128
}
fn default_seed() -> u64 {
    3315
}
fn default_operating_point() -> f64 {
    0.5
}

fn default_explain_images() -> u32 {
    32
}

fn default_prefix() -> String {
    "runs".into()
}
