//! Layering `PodOverrides` (MergeJob, stage kind, shard) into the settings of one stage pod, and
//! the container resources they refine. Pure.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, EnvFromSource, EnvVar, LocalObjectReference, ResourceRequirements, Toleration, Volume, VolumeMount};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use medmerge_crds::{ClusterSpec, PodOverrides};

/// Requests and limits, key by key; a more specific level replaces single keys only.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResourceLayer {
    /// Requests by resource name.
    pub requests: BTreeMap<String, Quantity>,
    /// Limits by resource name.
    pub limits: BTreeMap<String, Quantity>,
}

impl ResourceLayer {
    /// `base` with this layer's keys written over it, as the container's requirements (`None`
    /// when there are none at all).
    pub fn apply(self, base: ResourceLayer) -> Option<ResourceRequirements> {
        let mut requests = base.requests;
        requests.extend(self.requests);
        let mut limits = base.limits;
        limits.extend(self.limits);
        let some = |m: BTreeMap<String, Quantity>| (!m.is_empty()).then_some(m);
        (!requests.is_empty() || !limits.is_empty()).then(|| ResourceRequirements { requests: some(requests), limits: some(limits), ..Default::default() })
    }
}

/// The pod settings of all levels combined, most specific last.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layered {
    /// The most specific affinity given.
    pub affinity: Option<Affinity>,
    /// Every level's node labels, later levels winning per key.
    pub node_selector: BTreeMap<String, String>,
    /// Every level's tolerations.
    pub tolerations: Vec<Toleration>,
    /// Every level's extra volumes.
    pub volumes: Vec<Volume>,
    /// Every level's extra mounts.
    pub volume_mounts: Vec<VolumeMount>,
    /// Every level's extra environment.
    pub env: Vec<EnvVar>,
    /// Every level's environment sources.
    pub env_from: Vec<EnvFromSource>,
    /// Every level's image pull Secrets.
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// The most specific ServiceAccount given.
    pub service_account_name: Option<String>,
    /// The most specific PriorityClass given.
    pub priority_class_name: Option<String>,
    /// Every level's resources, later levels winning per key.
    pub resources: ResourceLayer,
}

/// Combines `levels` (absent ones skipped), least specific first.
pub fn layered<'a>(levels: impl IntoIterator<Item = Option<&'a PodOverrides>>) -> Layered {
    let mut out = Layered::default();
    for o in levels.into_iter().flatten() {
        if o.affinity.is_some() {
            out.affinity = o.affinity.clone();
        }
        out.node_selector.extend(o.node_selector.clone());
        out.tolerations.extend(o.tolerations.iter().cloned());
        out.volumes.extend(o.volumes.iter().cloned());
        out.volume_mounts.extend(o.volume_mounts.iter().cloned());
        out.env.extend(o.env.iter().cloned());
        out.env_from.extend(o.env_from.iter().cloned());
        out.image_pull_secrets.extend(o.image_pull_secrets.iter().cloned());
        if o.service_account_name.is_some() {
            out.service_account_name = o.service_account_name.clone();
        }
        if o.priority_class_name.is_some() {
            out.priority_class_name = o.priority_class_name.clone();
        }
        if let Some(r) = &o.resources {
            out.resources.requests.extend(r.requests.clone().unwrap_or_default());
            out.resources.limits.extend(r.limits.clone().unwrap_or_default());
        }
    }
    out
}

/// CPU and memory from `cluster.resources` (requests; memory is also the limit), and
/// `cluster.gpus` of `cluster.gpuResource` as a limit for stages that run the model.
pub fn base_resources(cluster: &ClusterSpec, runs_model: bool) -> ResourceLayer {
    let mut layer = ResourceLayer::default();
    if let Some(cpu) = &cluster.resources.cpu {
        layer.requests.insert("cpu".into(), Quantity(cpu.clone()));
    }
    if let Some(memory) = &cluster.resources.memory {
        layer.requests.insert("memory".into(), Quantity(memory.clone()));
        layer.limits.insert("memory".into(), Quantity(memory.clone()));
    }
    if cluster.gpus > 0 && runs_model {
        layer.limits.insert(cluster.gpu_resource.clone(), Quantity(cluster.gpus.to_string()));
    }
    layer
}

#[cfg(test)]
mod tests {
    use super::*;

    fn overrides(yaml: &str) -> PodOverrides {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn lists_are_appended_maps_merged_and_single_values_taken_from_the_most_specific_level() {
        let all = overrides("{nodeSelector: {pool: gpu, zone: a}, tolerations: [{key: gpu, operator: Exists}], serviceAccountName: coordinator, priorityClassName: batch}");
        let stage = overrides("{nodeSelector: {zone: b}, env: [{name: X, value: '1'}]}");
        let shard = overrides("{serviceAccountName: hospital-a, tolerations: [{key: site-a, operator: Exists}]}");
        let l = layered([Some(&all), Some(&stage), None, Some(&shard)]);
        assert_eq!(l.node_selector, BTreeMap::from([("pool".to_string(), "gpu".to_string()), ("zone".to_string(), "b".to_string())]));
        let keys: Vec<_> = l.tolerations.iter().filter_map(|t| t.key.clone()).collect();
        assert_eq!(keys, ["gpu", "site-a"]);
        assert_eq!(l.service_account_name.as_deref(), Some("hospital-a"));
        assert_eq!(l.priority_class_name.as_deref(), Some("batch"));
        assert_eq!(l.env.len(), 1);
    }

    #[test]
    fn a_mig_profile_replaces_the_whole_gpu_only_where_asked() {
        let cluster: ClusterSpec = serde_yaml::from_str("{gpus: 1, resources: {cpu: '4', memory: 16Gi}}").unwrap();
        let evaluate = overrides("{resources: {limits: {nvidia.com/mig-1g.10gb: '1', nvidia.com/gpu: '0'}, requests: {cpu: '2'}}}");
        let r = layered([Some(&evaluate)]).resources.apply(base_resources(&cluster, true)).unwrap();
        let limits = r.limits.unwrap();
        assert_eq!(limits["nvidia.com/mig-1g.10gb"], Quantity("1".into()));
        assert_eq!(limits["nvidia.com/gpu"], Quantity("0".into()));
        assert_eq!(limits["memory"], Quantity("16Gi".into()));
        assert_eq!(r.requests.unwrap()["cpu"], Quantity("2".into()));
    }

    #[test]
    fn gpus_use_the_configured_extended_resource_and_only_for_stages_that_run_the_model() {
        let cluster: ClusterSpec = serde_yaml::from_str("{gpus: 1, gpuResource: amd.com/gpu}").unwrap();
        assert_eq!(base_resources(&cluster, true).limits["amd.com/gpu"], Quantity("1".into()));
        assert!(base_resources(&cluster, false).limits.is_empty());
        assert_eq!(ResourceLayer::default().apply(ResourceLayer::default()), None);
    }
}
