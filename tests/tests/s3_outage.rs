//! The S3 server stops answering in the middle of an upload: the store retries, then fails
//! naming the bucket and key, and nothing half-written becomes visible. Run alone (it freezes
//! the server): `make test-s3`.

use std::time::Duration;

use medmerge_store::{S3Config, Store};
use medmerge_tests::fixtures;

fn signal(name: &str) {
    let pid = std::env::var("MEDMERGE_S3_PID").expect("MEDMERGE_S3_PID is set by scripts/with-s3.sh");
    let status = std::process::Command::new("kill").args([name, &pid]).status().unwrap();
    assert!(status.success(), "kill {name} {pid}");
}

#[tokio::test]
#[ignore = "needs an S3 server: run `make test-s3`"]
async fn an_unresponsive_server_fails_the_upload_clearly_and_publishes_nothing() {
    let config = S3Config { max_attempts: 2, attempt_timeout: Some(Duration::from_secs(2)), ..fixtures::s3_config("medmerge-outage") };
    let store = Store::s3(config).await;
    store.create_bucket().await.unwrap();

    signal("-STOP");
    let big: Vec<u8> = vec![7; 20 << 20];
    let result = store.put("runs/ns/mj/g1/merged/data-vector/model.safetensors", big).await;
    signal("-CONT");

    let err = result.unwrap_err().to_string();
    assert!(err.contains("s3://medmerge-outage/runs/ns/mj/g1/merged/data-vector/model.safetensors"), "{err}");
    assert!(err.contains("failed"), "{err}");
    // Once the server is back, the key that failed to upload does not exist.
    let mut visible = None;
    for _ in 0..20 {
        match store.exists("runs/ns/mj/g1/merged/data-vector/model.safetensors").await {
            Ok(v) => {
                visible = Some(v);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    assert_eq!(visible, Some(false), "a failed upload left an object behind");
}
