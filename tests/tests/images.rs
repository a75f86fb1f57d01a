//! The images the real-node tests run are assembled from images/*.Dockerfile by
//! images/assemble.py (no container engine here): its layout and config follow each Dockerfile's
//! final stage, and anything it cannot follow is refused, naming the line.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use medmerge_tests::fixtures::repo;

fn assemble(dockerfile: &Path, sources: &[(&str, &Path)]) -> Result<Value, String> {
    let mut cmd = Command::new("python3");
    cmd.arg(repo().join("images/assemble.py")).arg(dockerfile).args(["test:tag", "/nonexistent.tar", "--check"]);
    for (src, local) in sources {
        cmd.arg("--source").arg(format!("{src}={}", local.display()));
    }
    let out = cmd.output().expect("python3 runs");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// The ENTRYPOINT and USER lines of a Dockerfile's final stage, as written.
fn final_stage_line(dockerfile: &Path, instruction: &str) -> String {
    let text = std::fs::read_to_string(dockerfile).unwrap();
    let last_from = text.rfind("\nFROM ").unwrap();
    text[last_from..].lines().find_map(|l| l.strip_prefix(&format!("{instruction} "))).unwrap().to_string()
}

fn files(layout: &Value) -> Vec<String> {
    layout["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect()
}

#[test]
fn the_trainer_image_holds_what_its_dockerfile_copies_and_runs_as_it_says() {
    let dir = tempfile::tempdir().unwrap();
    let (lib, weights, bin) = (dir.path().join("lib"), dir.path().join("weights"), dir.path().join("medmerge-trainer"));
    std::fs::create_dir_all(&lib).unwrap();
    std::fs::create_dir_all(&weights).unwrap();
    std::fs::write(lib.join("libexample.so"), b"not an ELF file").unwrap();
    std::fs::write(weights.join("efficientnet-lite0-imagenet.safetensors"), b"w").unwrap();
    std::fs::copy("/bin/true", &bin).unwrap();
    let dockerfile = repo().join("images/trainer.Dockerfile");
    let layout = assemble(&dockerfile, &[("/out/lib", &lib), ("/out/weights", &weights), ("/out/bin/medmerge-trainer", &bin)]).unwrap();
    let files = files(&layout);
    for expected in ["/usr/local/bin/medmerge-trainer", "/opt/libtorch/lib/libexample.so", "/opt/medmerge/weights/efficientnet-lite0-imagenet.safetensors", "/etc/passwd"] {
        assert!(files.contains(&expected.to_string()), "{expected} missing from {files:?}");
    }
    assert!(files.iter().any(|f| f.contains("libc.so")), "the C runtime the binary links comes along: {files:?}");
    assert!(files.iter().any(|f| f.ends_with("DejaVuSans.ttf")), "the fonts the Dockerfile installs come along");
    let config = &layout["config"];
    assert_eq!(config["Entrypoint"], serde_json::from_str::<Value>(&final_stage_line(&dockerfile, "ENTRYPOINT")).unwrap());
    assert_eq!(config["User"], final_stage_line(&dockerfile, "USER"));
    let env: Vec<&str> = config["Env"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
    assert!(env.contains(&"LD_LIBRARY_PATH=/opt/libtorch/lib") && env.contains(&"HOME=/tmp"), "{env:?}");
}

#[test]
fn the_operator_image_holds_its_binary_and_runs_non_root() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("medmerge-operator");
    std::fs::copy("/bin/true", &bin).unwrap();
    let dockerfile = repo().join("images/operator.Dockerfile");
    let layout = assemble(&dockerfile, &[("/src/target/release/medmerge-operator", &bin)]).unwrap();
    assert!(files(&layout).contains(&"/usr/local/bin/medmerge-operator".to_string()));
    assert_eq!(layout["config"]["User"], "65532:65532");
    assert_eq!(layout["config"]["ExposedPorts"]["8080/tcp"], serde_json::json!({}));
}

#[test]
fn what_the_script_cannot_follow_is_refused_naming_the_dockerfile_line() {
    let dir = tempfile::tempdir().unwrap();
    let dockerfile = dir.path().join("x.Dockerfile");
    std::fs::write(&dockerfile, "FROM a AS build\nRUN make\n\nFROM debian:bookworm-slim\nCOPY --from=build /out/x /x\nRUN curl https://example.org | sh\n").unwrap();
    let error = assemble(&dockerfile, &[]).unwrap_err();
    assert!(error.contains("x.Dockerfile:5") && error.contains("no --source for COPY /out/x"), "{error}");
    let error = assemble(&dockerfile, &[("/out/x", Path::new("/bin/true"))]).unwrap_err();
    assert!(error.contains("x.Dockerfile:6") && error.contains("cannot follow RUN"), "{error}");
}
