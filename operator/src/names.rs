//! Deterministic, DNS-safe names for the objects a MergeJob owns.

use sha2::{Digest, Sha256};

/// Kubernetes' limit for label values and most object names.
pub const MAX_NAME: usize = 63;

/// `<mergejob>-g<generation>-<stage>`, shortened with a hash suffix when longer than 63
/// characters, so the same stage of the same generation always gets the same name.
pub fn child_name(mergejob: &str, generation: i64, stage: &str) -> String {
    let full = format!("{mergejob}-g{generation}-{stage}");
    if full.len() <= MAX_NAME {
        return full;
    }
    let hash = hex::encode(&Sha256::digest(full.as_bytes())[..4]);
    let keep = MAX_NAME - hash.len() - 1;
    format!("{}-{hash}", full[..keep].trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_readable() {
        assert_eq!(child_name("retina", 3, "finetune-hospital-a"), "retina-g3-finetune-hospital-a");
    }

    #[test]
    fn long_names_are_cut_to_63_characters_and_stay_distinct() {
        let long = "a-very-long-mergejob-name-that-a-gitops-repository-might-well-use";
        let a = child_name(long, 1, "finetune-hospital-number-one");
        let b = child_name(long, 1, "finetune-hospital-number-two");
        assert!(a.len() <= MAX_NAME && b.len() <= MAX_NAME);
        assert_ne!(a, b);
        assert_eq!(a, child_name(long, 1, "finetune-hospital-number-one"));
        assert!(!a.contains("--"));
    }
}
