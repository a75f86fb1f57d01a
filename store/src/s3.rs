//! The S3 backend (aws-sdk-s3): custom endpoints and path-style addressing for S3-compatible
//! servers, SHA-256 in object metadata, multipart uploads for large objects.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, Delete, ObjectIdentifier};
use aws_sdk_s3::Client;

use crate::{same_or_refused, sha256_hex, Result, StoreError};

/// Objects at least this large are uploaded in parts.
pub const MULTIPART_THRESHOLD: usize = 16 << 20;
/// Size of each part of a multipart upload (S3's minimum is 5 MiB).
pub const PART_SIZE: usize = 8 << 20;
/// Default time one attempt (a whole upload of up to one part) may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest wait for the first byte of a response.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Metadata key holding an object's SHA-256 (as `x-amz-meta-sha256`).
pub const DIGEST_METADATA: &str = "sha256";

/// Where and how to reach a bucket.
#[derive(Clone, Debug, Default)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Endpoint URL for S3-compatible servers (MinIO, SeaweedFS, Ceph); `None` for AWS.
    pub endpoint: Option<String>,
    /// Region (S3-compatible servers accept any).
    pub region: String,
    /// Path-style addressing (`endpoint/bucket/key`), which most S3-compatible servers need.
    pub path_style: bool,
    /// Explicit credentials `(access key id, secret access key)`; `None` uses the standard AWS
    /// chain (environment, profile, web identity, instance metadata).
    pub credentials: Option<(String, String)>,
    /// Attempts per request before giving up (transient errors back off exponentially).
    pub max_attempts: u32,
    /// Time one attempt may take before it counts as failed (default 5 minutes).
    pub attempt_timeout: Option<Duration>,
}

impl S3Config {
    /// The bucket a MergeJob's `storage.s3` names, with credentials from the standard AWS chain,
    /// five attempts per request and the default attempt timeout.
    pub fn from_spec(spec: &medmerge_crds::S3Storage) -> S3Config {
        S3Config { bucket: spec.bucket.clone(), endpoint: spec.endpoint.clone(), region: spec.region.clone(), path_style: spec.path_style, credentials: None, max_attempts: 5, attempt_timeout: None }
    }
}

/// A bucket and a client for it.
#[derive(Clone, Debug)]
pub struct S3Store {
    client: Client,
    bucket: String,
    /// What it was connected with, to open an independent connection ([`S3Store::reconnect`]).
    config: S3Config,
}

impl S3Store {
    /// A new client for the same bucket with its own connections: an SDK client's connections
    /// are driven by the runtime that opened them, so another thread with its own runtime must
    /// not share them (it would wait for a runtime that is not running).
    pub(crate) async fn reconnect(&self) -> S3Store {
        S3Store::connect(self.config.clone()).await
    }

    pub(crate) async fn connect(c: S3Config) -> S3Store {
        let attempt_timeout = c.attempt_timeout.unwrap_or(ATTEMPT_TIMEOUT);
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(if c.region.is_empty() { "us-east-1".to_string() } else { c.region.clone() }))
            .retry_config(RetryConfig::standard().with_max_attempts(c.max_attempts.max(1)).with_initial_backoff(Duration::from_millis(500)))
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    // A server that accepts and never answers fails an attempt after this, not
                    // after the whole attempt time (bounded: attempts x this).
                    .read_timeout(attempt_timeout.min(RESPONSE_TIMEOUT))
                    .operation_attempt_timeout(attempt_timeout)
                    .build(),
            );
        if let Some(endpoint) = &c.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        if let Some((id, secret)) = &c.credentials {
            loader = loader.credentials_provider(aws_sdk_s3::config::Credentials::new(id, secret, None, None, "medmerge"));
        }
        let shared = loader.load().await;
        let config = aws_sdk_s3::config::Builder::from(&shared).force_path_style(c.path_style).build();
        S3Store { client: Client::from_conf(config), bucket: c.bucket.clone(), config: c }
    }

    /// `s3://bucket/key`.
    pub fn location(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    /// The server's error code and message when it answered; one line saying what to set when
    /// no credentials were found (the SDK's own report is a multi-line dump of its provider
    /// chain); the whole error chain otherwise (connection refused, timeout, ...).
    fn error<E: std::error::Error + ProvideErrorMetadata + 'static>(&self, key: &str, operation: &'static str, e: E) -> StoreError {
        let cause = match (e.code(), e.message()) {
            (Some(code), Some(message)) => format!("{code}: {message}"),
            (Some(code), None) => code.to_string(),
            _ if no_credentials(&e) => NO_CREDENTIALS.to_string(),
            _ => match DisplayErrorContext(&e).to_string() {
                full if full.contains("timeout") => {
                    format!("the server did not answer in time on any attempt (timed out; is the endpoint an S3 server, and up?): {}", full.split(" (").next().unwrap_or_default())
                }
                full => full,
            },
        };
        StoreError::S3 { location: self.location(key), operation, cause }
    }

    /// For errors that happen on this side (a broken download stream, a request that cannot be
    /// built).
    fn local_error<E: std::error::Error>(&self, key: &str, operation: &'static str, e: E) -> StoreError {
        StoreError::S3 { location: self.location(key), operation, cause: DisplayErrorContext(&e).to_string() }
    }

    pub(crate) async fn create_bucket(&self) -> Result<()> {
        match self.client.create_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_bucket_already_owned_by_you() || s.is_bucket_already_exists()) => Ok(()),
            Err(e) => Err(self.error("", "create bucket", e)),
        }
    }

    pub(crate) async fn put(&self, key: &str, bytes: Vec<u8>) -> Result<String> {
        let digest = sha256_hex(&bytes);
        self.upload(key, bytes, &digest, false).await?;
        Ok(digest)
    }

    /// No-replace publish: a HEAD finds most existing objects; the conditional PUT
    /// (`If-None-Match: *`) closes the race on servers that support it (AWS, MinIO).
    pub(crate) async fn publish(&self, key: &str, bytes: Vec<u8>) -> Result<String> {
        let digest = sha256_hex(&bytes);
        if let Some(published) = self.published_digest(key).await? {
            return same_or_refused(self.location(key), published, digest);
        }
        match self.upload(key, bytes, &digest, true).await? {
            Written::Yes => Ok(digest),
            Written::AlreadyThere => {
                let published = self.published_digest(key).await?.unwrap_or_default();
                same_or_refused(self.location(key), published, digest)
            }
        }
    }

    /// The SHA-256 of the object at `key` (from its metadata, or by reading it when it was
    /// uploaded without), `None` when there is none.
    pub(crate) async fn published_digest(&self, key: &str) -> Result<Option<String>> {
        let head = match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(h) => h,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => return Ok(None),
            Err(e) => return Err(self.error(key, "head", e)),
        };
        match head.metadata().and_then(|m| m.get(DIGEST_METADATA)) {
            Some(d) => Ok(Some(d.clone())),
            None => Ok(self.get(key).await?.map(|b| sha256_hex(&b))),
        }
    }

    /// Uploads `bytes` as `key`; with `if_absent`, only when nothing is there (the server's
    /// precondition failure is [`Written::AlreadyThere`], not an error).
    async fn upload(&self, key: &str, bytes: Vec<u8>, digest: &str, if_absent: bool) -> Result<Written> {
        if bytes.len() >= MULTIPART_THRESHOLD {
            return self.put_multipart(key, &bytes, digest, if_absent).await;
        }
        let mut put = self.client.put_object().bucket(&self.bucket).key(key).metadata(DIGEST_METADATA, digest).body(ByteStream::from(bytes));
        if if_absent {
            put = put.if_none_match("*");
        }
        match put.send().await {
            Ok(_) => Ok(Written::Yes),
            Err(e) if precondition_failed(&e) => Ok(Written::AlreadyThere),
            Err(e) => Err(self.error(key, "put", e)),
        }
    }

    async fn put_multipart(&self, key: &str, bytes: &[u8], digest: &str, if_absent: bool) -> Result<Written> {
        let upload = self.client.create_multipart_upload().bucket(&self.bucket).key(key).metadata(DIGEST_METADATA, digest).send().await.map_err(|e| self.error(key, "start multipart upload", e))?;
        let id = upload.upload_id().unwrap_or_default().to_string();
        let result = self.upload_parts(key, &id, bytes, if_absent).await;
        if !matches!(result, Ok(Written::Yes)) {
            // Nothing half-published: the parts are discarded and the key never appears.
            let _ = self.client.abort_multipart_upload().bucket(&self.bucket).key(key).upload_id(&id).send().await;
        }
        result
    }

    async fn upload_parts(&self, key: &str, id: &str, bytes: &[u8], if_absent: bool) -> Result<Written> {
        let mut parts = Vec::new();
        for (i, chunk) in bytes.chunks(PART_SIZE).enumerate() {
            let number = i as i32 + 1;
            let part = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(id)
                .part_number(number)
                .body(ByteStream::from(chunk.to_vec()))
                .send()
                .await
                .map_err(|e| self.error(key, "upload part", e))?;
            parts.push(CompletedPart::builder().part_number(number).set_e_tag(part.e_tag().map(str::to_string)).build());
        }
        let completed = self
            .client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(parts)).build())
            .set_if_none_match(if_absent.then(|| "*".to_string()))
            .send()
            .await;
        match completed {
            Ok(_) => Ok(Written::Yes),
            Err(e) if precondition_failed(&e) => Ok(Written::AlreadyThere),
            Err(e) => Err(self.error(key, "complete multipart upload", e)),
        }
    }

    pub(crate) async fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let object = match self.client.get_object().bucket(&self.bucket).key(key).send().await {
            Ok(o) => o,
            Err(e) if e.as_service_error().is_some_and(|s| s.is_no_such_key()) => return Ok(None),
            Err(e) => return Err(self.error(key, "get", e)),
        };
        let expected = object.metadata().and_then(|m| m.get(DIGEST_METADATA)).cloned();
        let bytes = object.body.collect().await.map_err(|e| self.local_error(key, "download", e))?.into_bytes().to_vec();
        if let Some(expected) = expected {
            let actual = sha256_hex(&bytes);
            if actual != expected {
                return Err(StoreError::DigestMismatch { location: self.location(key), expected, actual });
            }
        }
        Ok(Some(bytes))
    }

    pub(crate) async fn exists(&self, key: &str) -> Result<bool> {
        match self.client.head_object().bucket(&self.bucket).key(key).send().await {
            Ok(_) => Ok(true),
            Err(e) if e.as_service_error().is_some_and(|s| s.is_not_found()) => Ok(false),
            Err(e) => Err(self.error(key, "head", e)),
        }
    }

    pub(crate) async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let prefix = if prefix.is_empty() || prefix.ends_with('/') { prefix.to_string() } else { format!("{prefix}/") };
        let mut keys = Vec::new();
        let mut pages = self.client.list_objects_v2().bucket(&self.bucket).prefix(&prefix).into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error(&prefix, "list", e))?;
            keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_string)));
        }
        keys.sort();
        Ok(keys)
    }

    pub(crate) async fn remove(&self, key: &str) -> Result<()> {
        self.client.delete_object().bucket(&self.bucket).key(key).send().await.map_err(|e| self.error(key, "delete", e))?;
        Ok(())
    }

    pub(crate) async fn remove_prefix(&self, prefix: &str) -> Result<()> {
        let keys = self.list(prefix).await?;
        for batch in keys.chunks(1000) {
            let objects: Vec<ObjectIdentifier> = batch.iter().filter_map(|k| ObjectIdentifier::builder().key(k).build().ok()).collect();
            let delete = Delete::builder().set_objects(Some(objects)).build().map_err(|e| self.local_error(prefix, "delete", e))?;
            self.client.delete_objects().bucket(&self.bucket).delete(delete).send().await.map_err(|e| self.error(prefix, "delete", e))?;
        }
        Ok(())
    }
}

/// Whether a conditional upload happened.
enum Written {
    Yes,
    /// `If-None-Match: *` failed: an object is there (put by another runner since the HEAD).
    AlreadyThere,
}

/// Whether `e` is the server refusing a conditional write because the object exists (S3 says
/// `PreconditionFailed`, or `ConditionalRequestConflict` while another conditional write of the
/// same key is in flight).
fn precondition_failed<E: ProvideErrorMetadata, R>(e: &aws_sdk_s3::error::SdkError<E, R>) -> bool {
    e.as_service_error().and_then(|s| s.code()).is_some_and(|code| code == "PreconditionFailed" || code == "ConditionalRequestConflict")
}

/// What a user sees when the AWS credential chain finds nothing.
const NO_CREDENTIALS: &str =
    "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or a web identity token) for this process, or spec.storage.s3.credentialsSecret in a MergeJob";

/// Whether an error (anywhere in its source chain) is the credential chain finding nothing.
fn no_credentials(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = next {
        if matches!(err.downcast_ref::<CredentialsError>(), Some(CredentialsError::CredentialsNotLoaded(_))) {
            return true;
        }
        next = err.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_credential_types::provider::{future, ProvideCredentials};

    /// A credential chain that finds nothing, as the default one does on a machine without any.
    #[derive(Debug)]
    struct NoCredentials;

    impl ProvideCredentials for NoCredentials {
        fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            future::ProvideCredentials::ready(Err(CredentialsError::not_loaded("nothing in the environment")))
        }
    }

    #[tokio::test]
    async fn a_server_that_accepts_and_never_answers_is_a_bounded_error_naming_the_bucket() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        // Accept connections and keep them open without a word.
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming() {
                held.push(conn);
            }
        });
        let config = S3Config {
            bucket: "silent".into(),
            endpoint: Some(endpoint),
            region: "us-east-1".into(),
            path_style: true,
            credentials: Some(("id".into(), "secret".into())),
            max_attempts: 2,
            attempt_timeout: Some(Duration::from_millis(500)),
        };
        let store = S3Store::connect(config).await;
        let message = store.list("runs/").await.unwrap_err().to_string();
        assert!(message.starts_with("s3://silent/runs/: list failed: the server did not answer in time") && message.contains("timed out"), "{message}");
    }

    #[tokio::test]
    async fn missing_credentials_are_one_line_naming_the_bucket_and_what_to_set() {
        let config =
            aws_sdk_s3::Config::builder().behavior_version(BehaviorVersion::latest()).region(Region::new("us-east-1")).endpoint_url("http://127.0.0.1:9").credentials_provider(NoCredentials).build();
        let store = S3Store { client: Client::from_conf(config), bucket: "hospital-vectors".into(), config: S3Config::default() };
        let message = store.list("runs/").await.unwrap_err().to_string();
        assert_eq!(message, format!("s3://hospital-vectors/runs/: list failed: {NO_CREDENTIALS}"));
    }
}
