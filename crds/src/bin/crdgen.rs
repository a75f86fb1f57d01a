//! Prints the MergeJob CustomResourceDefinition as YAML (`cargo run -p medmerge-crds --bin crdgen > crds/mergejob.yaml`).

use kube::CustomResourceExt;

fn main() -> Result<(), serde_yaml::Error> {
    print!("{}", serde_yaml::to_string(&medmerge_crds::MergeJob::crd())?);
    Ok(())
}
