//! Which trainer images MergeJobs may run. Whoever may create a MergeJob chooses
//! `spec.cluster.image`, and the operator (not that person) creates the pods: without a policy,
//! creating a MergeJob would be as good as creating any pod in the namespace. The cluster admin
//! sets the allowed images in the chart (`trainer.allowedImages`); a MergeJob naming another is
//! refused as `InvalidSpec` before any Job exists.

/// The images stage Jobs may use. Empty: any image (the operator binary's default; the chart
/// sets the project's own trainer image).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ImagePolicy {
    allowed: Vec<String>,
}

impl ImagePolicy {
    /// A policy from allowlist entries. Each entry is an exact reference (`repo:tag`,
    /// `repo@sha256:...`), a repository (`registry/org/trainer`: any tag or digest of it) or a
    /// prefix ending in `/` (`registry/org/`: any repository under it).
    pub fn new(allowed: impl IntoIterator<Item = String>) -> Self {
        ImagePolicy { allowed: allowed.into_iter().map(|a| a.trim().to_string()).filter(|a| !a.is_empty()).collect() }
    }

    /// Whether `image` may run.
    pub fn allows(&self, image: &str) -> bool {
        self.allowed.is_empty()
            || self.allowed.iter().any(|entry| {
                image == entry || (entry.ends_with('/') && image.starts_with(entry.as_str())) || image.strip_prefix(entry.as_str()).is_some_and(|rest| rest.starts_with(':') || rest.starts_with('@'))
            })
    }

    /// The refusal of a MergeJob whose image is not allowed, naming the field and what is.
    pub fn refusal(&self, image: &str) -> Option<String> {
        (!self.allows(image))
            .then(|| format!("spec.cluster.image: {image:?} is not an allowed trainer image (allowed: {}); the cluster admin sets them in the chart's trainer.allowedImages", self.allowed.join(", ")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_references_repositories_and_prefixes_are_allowed_and_nothing_else() {
        let policy = ImagePolicy::new(["ghcr.io/medmerge/trainer".to_string(), "registry.hospital.org/ml/".into(), "docker.io/lib/tool:1.0".into()]);
        for ok in ["ghcr.io/medmerge/trainer:0.1.0", "ghcr.io/medmerge/trainer@sha256:abc", "ghcr.io/medmerge/trainer", "registry.hospital.org/ml/trainer:2", "docker.io/lib/tool:1.0"] {
            assert!(policy.allows(ok), "{ok}");
        }
        for refused in ["ghcr.io/medmerge/trainer-evil:1", "ghcr.io/medmerge/trainerx", "registry.hospital.org/mlx/t:1", "docker.io/lib/tool:1.1", "busybox", ""] {
            assert!(!policy.allows(refused), "{refused}");
        }
        let message = policy.refusal("busybox").unwrap();
        assert!(message.starts_with("spec.cluster.image: \"busybox\" is not an allowed trainer image (allowed: ghcr.io/medmerge/trainer,"), "{message}");
        assert!(ImagePolicy::default().allows("anything:at-all"), "no allowlist: any image");
    }
}
