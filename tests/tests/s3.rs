//! The store against a real S3 server (SeaweedFS, started by `scripts/with-s3.sh`; run with
//! `make test-s3`, part of `make test`). Ignored by a plain `cargo test`, which has no server.

use medmerge_store::{S3Config, Store, StoreError};
use medmerge_tests::fixtures;

const BUCKET: &str = "medmerge-test";

fn config(credentials: Option<(String, String)>) -> S3Config {
    S3Config { credentials, ..fixtures::s3_config(BUCKET) }
}

/// The admin identity, from the standard AWS environment variables.
async fn admin() -> Store {
    let store = Store::s3(config(None)).await;
    store.create_bucket().await.unwrap();
    store
}

/// A real safetensors file: a small tensor with its header.
fn safetensors_bytes() -> Vec<u8> {
    let data: Vec<u8> = (0..64u32).flat_map(|i| (i as f32 * 0.5).to_le_bytes()).collect();
    let header = r#"{"w":{"dtype":"F32","shape":[8,8],"data_offsets":[0,256]},"__metadata__":{"base_digest":"abc"}}"#;
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

#[tokio::test]
#[ignore = "needs an S3 server: run `make test-s3`"]
async fn objects_round_trip_with_their_digest_and_listing_finds_them() {
    let store = admin().await;
    let vector = safetensors_bytes();
    let digest = store.put("runs/ns/mj/g1/shards/a/vector.safetensors", vector.clone()).await.unwrap();
    assert_eq!(digest, medmerge_store::sha256_hex(&vector));
    assert_eq!(store.get("runs/ns/mj/g1/shards/a/vector.safetensors").await.unwrap(), Some(vector));
    assert!(store.exists("runs/ns/mj/g1/shards/a/vector.safetensors").await.unwrap());
    assert!(!store.exists("runs/ns/mj/g1/shards/b/vector.safetensors").await.unwrap());
    assert_eq!(store.get("runs/ns/mj/g1/missing").await.unwrap(), None);
    store.put("runs/ns/mj/g1/eval/metrics.json", b"{}".to_vec()).await.unwrap();
    assert_eq!(store.list("runs/ns/mj/g1").await.unwrap(), ["runs/ns/mj/g1/eval/metrics.json", "runs/ns/mj/g1/shards/a/vector.safetensors"]);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v.safetensors");
    store.get_file("runs/ns/mj/g1/shards/a/vector.safetensors", &file).await.unwrap();
    assert_eq!(std::fs::read(&file).unwrap(), safetensors_bytes());

    store.remove_prefix("runs/ns/mj").await.unwrap();
    assert!(store.list("runs/ns/mj").await.unwrap().is_empty());
}

#[tokio::test]
#[ignore = "needs an S3 server: run `make test-s3`"]
async fn a_large_object_goes_up_in_parts_and_comes_back_whole() {
    let store = admin().await;
    let big: Vec<u8> = (0..(20usize << 20)).map(|i| (i * 31 % 251) as u8).collect();
    assert!(big.len() >= medmerge_store::MULTIPART_THRESHOLD);
    store.put("big/model.safetensors", big.clone()).await.unwrap();
    let back = store.get("big/model.safetensors").await.unwrap().unwrap();
    assert!(back == big, "the multipart object differs after a round trip");
}

#[tokio::test]
#[ignore = "needs an S3 server: run `make test-s3`"]
async fn a_corrupted_object_is_refused_naming_bucket_and_key() {
    let store = admin().await;
    store.put("corrupt/vector.safetensors", safetensors_bytes()).await.unwrap();
    // Someone overwrites the bytes but keeps the old digest: what a bit flip at rest looks like.
    let digest = medmerge_store::sha256_hex(&safetensors_bytes());
    let raw = raw_client().await;
    raw.put_object().bucket(BUCKET).key("corrupt/vector.safetensors").metadata("sha256", digest).body(b"not the vector".to_vec().into()).send().await.unwrap();
    let err = store.get("corrupt/vector.safetensors").await.unwrap_err();
    assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
    assert!(err.to_string().contains("s3://medmerge-test/corrupt/vector.safetensors"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    assert!(store.get_file("corrupt/vector.safetensors", &dir.path().join("v")).await.is_err());
    assert!(!dir.path().join("v").exists(), "nothing is written from a corrupt download");
}

#[tokio::test]
#[ignore = "needs an S3 server: run `make test-s3`"]
async fn wrong_credentials_are_a_clear_error() {
    admin().await;
    let store = Store::s3(config(Some(("nobody".into(), "wrong-secret".into())))).await;
    let err = store.put("x/y", b"z".to_vec()).await.unwrap_err().to_string();
    assert!(err.contains("s3://medmerge-test/x/y") && err.contains("put failed"), "{err}");
    assert!(err.contains("InvalidAccessKeyId") || err.contains("AccessDenied") || err.contains("SignatureDoesNotMatch"), "{err}");
}

#[tokio::test]
#[ignore = "needs an S3 server: run `make test-s3`"]
async fn a_shard_credential_reaches_only_its_own_prefix() {
    let admin = admin().await;
    admin.put("shard-b/images/x.png", b"hospital b's image".to_vec()).await.unwrap();
    let key = std::env::var("MEDMERGE_S3_SHARD_A_KEY").unwrap();
    let secret = std::env::var("MEDMERGE_S3_SHARD_A_SECRET").unwrap();
    let shard_a = Store::s3(config(Some((key, secret)))).await;
    shard_a.put("shard-a/images/y.png", b"hospital a's image".to_vec()).await.unwrap();
    assert_eq!(shard_a.get("shard-a/images/y.png").await.unwrap().as_deref(), Some(&b"hospital a's image"[..]));
    let err = shard_a.get("shard-b/images/x.png").await.unwrap_err().to_string();
    assert!(err.contains("s3://medmerge-test/shard-b/images/x.png") && err.contains("AccessDenied"), "{err}");
    assert!(shard_a.put("shard-b/images/z.png", b"!".to_vec()).await.is_err(), "shard a cannot write into shard b's prefix");
}

async fn raw_client() -> aws_sdk_s3::Client {
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest()).endpoint_url(fixtures::s3_endpoint()).region(aws_config::Region::new("us-east-1")).load().await;
    aws_sdk_s3::Client::from_conf(aws_sdk_s3::config::Builder::from(&shared).force_path_style(true).build())
}

#[tokio::test]
#[ignore = "needs an S3 server: run `make test-s3`"]
async fn publishing_on_s3_never_replaces_different_content() {
    let store = admin().await;
    let key = "runs/ns/publish/g1/merged/model.safetensors";
    store.remove_prefix("runs/ns/publish").await.unwrap();
    let first = safetensors_bytes();
    store.publish(key, first.clone()).await.unwrap();
    assert_eq!(store.publish(key, first.clone()).await.unwrap(), medmerge_store::sha256_hex(&first), "identical content is a no-op");
    let err = store.publish(key, b"another result".to_vec()).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyPublished { .. }) && err.to_string().contains(&format!("s3://{BUCKET}/{key}")), "{err}");
    assert_eq!(store.get(key).await.unwrap(), Some(first));
    // Racing publishers: exactly one wins or all publish the same bytes.
    let tasks: Vec<_> = (0..6u8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.publish("runs/ns/publish/g1/race", vec![i; 1024]).await })
        })
        .collect();
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(StoreError::AlreadyPublished { .. }) => {}
            Err(e) => panic!("{e}"),
        }
    }
    let raced = store.get("runs/ns/publish/g1/race").await.unwrap().unwrap();
    assert!(raced.iter().all(|b| *b == raced[0]));
    assert!(won >= 1);
    let err = store.put("runs/../../escape", vec![1]).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidKey { .. }), "{err}");
    store.remove_prefix("runs/ns/publish").await.unwrap();
}
