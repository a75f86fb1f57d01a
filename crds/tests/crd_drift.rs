//! The committed CRD must be exactly what the Rust types generate.

use kube::CustomResourceExt;

#[test]
fn committed_crd_yaml_matches_the_rust_types() {
    let generated = serde_yaml::to_string(&medmerge_crds::MergeJob::crd()).unwrap();
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/mergejob.yaml")).unwrap();
    assert!(generated == committed, "crds/mergejob.yaml is stale: run `make crds` and commit the result");
}

#[test]
fn the_helm_charts_crd_is_the_committed_crd() {
    let committed = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/mergejob.yaml")).unwrap();
    let chart = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../charts/medmerge/crds/mergejob.yaml")).unwrap();
    assert!(chart == committed, "charts/medmerge/crds/mergejob.yaml differs from crds/mergejob.yaml: run `make crds` and commit the result");
}

#[test]
fn the_example_mergejobs_parse_and_validate() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples");
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "yaml") {
            let mj: medmerge_crds::MergeJob = serde_yaml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            medmerge_crds::validate(&mj.spec).unwrap_or_else(|e| panic!("{}: {e:?}", p.display()));
            n += 1;
        }
    }
    assert!(n > 0);
}
