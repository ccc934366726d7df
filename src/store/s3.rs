//! S3 (or any S3-compatible endpoint) through aws-sdk-s3.
//!
//! The SDK's own retries are off: [`super::retry::Retrying`] decides, from the error class set
//! here, what is retried.

use std::time::{Duration, SystemTime};

use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{BehaviorVersion, Region};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;

use super::{check_key, ObjectMeta, ObjectStore, StoreError};

/// A bucket and a key prefix.
pub struct S3Store {
    client: aws_sdk_s3::Client,
    bucket: String,
    /// Key prefix, empty or ending in `/`.
    prefix: String,
    /// For logs: endpoint, bucket and prefix, never credentials.
    describe: String,
}

impl std::fmt::Debug for S3Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Store({})", self.describe)
    }
}

/// Settings of an S3 store.
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    /// Bucket.
    pub bucket: String,
    /// Key prefix.
    pub prefix: String,
    /// Custom endpoint (S3-compatible servers).
    pub endpoint: Option<String>,
    /// Region (default us-east-1).
    pub region: Option<String>,
    /// Path-style addressing (most S3-compatible servers).
    pub path_style: bool,
}

impl S3Settings {
    /// Parses `bucket/prefix?endpoint=...&region=...&path_style=true`.
    pub fn parse(rest: &str) -> Result<Self, StoreError> {
        let bad = |m: String| StoreError::Permanent { message: m };
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let (bucket, prefix) = path.split_once('/').unwrap_or((path, ""));
        if bucket.is_empty() {
            return Err(bad("s3 store URL needs a bucket: s3://bucket/prefix".into()));
        }
        let mut s = S3Settings {
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').into(),
            ..Default::default()
        };
        for kv in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            match k {
                "endpoint" => s.endpoint = Some(v.into()),
                "region" => s.region = Some(v.into()),
                "path_style" => s.path_style = matches!(v, "" | "true" | "1"),
                other => {
                    return Err(bad(format!(
                        "unknown s3 store option {other:?} (endpoint, region, path_style)"
                    )))
                }
            }
        }
        Ok(s)
    }
}

impl S3Store {
    /// From the part of an `s3://` URL after the scheme.
    pub async fn from_url(rest: &str) -> Result<Self, StoreError> {
        Self::new(S3Settings::parse(rest)?).await
    }

    /// Connects (lazily: the first request opens the connection).
    pub async fn new(s: S3Settings) -> Result<Self, StoreError> {
        let region = s.region.clone().unwrap_or_else(|| "us-east-1".into());
        let shared = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(region))
            .load()
            .await;
        let mut b = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(s.path_style)
            .retry_config(RetryConfig::disabled())
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_secs(5))
                    .operation_attempt_timeout(Duration::from_secs(60))
                    .build(),
            );
        if let Some(ep) = &s.endpoint {
            b = b.endpoint_url(ep);
        }
        let prefix = if s.prefix.is_empty() {
            String::new()
        } else {
            format!("{}/", s.prefix)
        };
        let describe = format!(
            "s3://{}/{}{}",
            s.bucket,
            prefix,
            s.endpoint.map(|e| format!(" at {e}")).unwrap_or_default()
        );
        Ok(Self {
            client: aws_sdk_s3::Client::from_conf(b.build()),
            bucket: s.bucket,
            prefix,
            describe,
        })
    }

    fn full(&self, key: &str) -> Result<String, StoreError> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }
}

fn classify<E, R>(key: &str, err: SdkError<E, R>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    let detail = DisplayErrorContext(&err).to_string();
    match &err {
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or("");
            let transient = matches!(
                code,
                "SlowDown" | "RequestTimeout" | "Throttling" | "InternalError" | "ServiceUnavailable"
            );
            if code == "NoSuchKey" || code == "NotFound" {
                StoreError::NotFound { key: key.to_owned() }
            } else if transient || code.is_empty() && detail.contains("status: 5") {
                StoreError::Transient {
                    message: format!("{key}: {detail}"),
                }
            } else {
                StoreError::Permanent {
                    message: format!("{key}: {detail}"),
                }
            }
        }
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) | SdkError::ResponseError(_) => {
            StoreError::Transient {
                message: format!("{key}: {detail}"),
            }
        }
        _ => StoreError::Permanent {
            message: format!("{key}: {detail}"),
        },
    }
}

fn raw_status<E>(err: &SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> Option<u16> {
    match err {
        SdkError::ServiceError(se) => Some(se.raw().status().as_u16()),
        _ => None,
    }
}

/// Sharpens a classification with the HTTP status, which S3 errors without a body lack a code for.
fn classify_http<E>(key: &str, err: SdkError<E, aws_sdk_s3::config::http::HttpResponse>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let status = raw_status(&err);
    let code = match &err {
        SdkError::ServiceError(se) => se.err().code().map(str::to_owned),
        _ => None,
    };
    match (status, code.as_deref()) {
        (Some(404), None | Some("NotFound") | Some("NoSuchKey")) => {
            StoreError::NotFound { key: key.to_owned() }
        }
        (Some(s), _) if s >= 500 || s == 429 => StoreError::Transient {
            message: format!("{key}: HTTP {s}: {}", DisplayErrorContext(&err)),
        },
        _ => classify(key, err),
    }
}

#[tonic::async_trait]
impl ObjectStore for S3Store {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let full = self.full(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(&full)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(|e| classify_http(key, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let full = self.full(key)?;
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
            .map_err(|e| classify_http(key, e))?;
        let body = out.body.collect().await.map_err(|e| StoreError::Transient {
            message: format!("{key}: reading body: {e}"),
        })?;
        Ok(body.into_bytes())
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let full = self.full(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => match classify_http(key, e) {
                StoreError::NotFound { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full(key)?;
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&full)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => match classify_http(key, e) {
                StoreError::NotFound { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        let full = format!("{}{prefix}", self.prefix);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let resp = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&full)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| classify_http(prefix, e))?;
            for o in resp.contents() {
                let Some(k) = o.key() else { continue };
                let key = k.strip_prefix(&self.prefix).unwrap_or(k).to_owned();
                let modified = o
                    .last_modified()
                    .and_then(|t| SystemTime::try_from(*t).ok())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                out.push(ObjectMeta {
                    key,
                    size: o.size().unwrap_or(0).max(0) as u64,
                    modified,
                });
            }
            match resp.next_continuation_token() {
                Some(t) if resp.is_truncated().unwrap_or(false) => token = Some(t.to_owned()),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        let s = S3Settings::parse(
            "bkt/some/prefix/?endpoint=http://127.0.0.1:9000&region=eu-west-1&path_style=true",
        )
        .unwrap();
        assert_eq!(s.bucket, "bkt");
        assert_eq!(s.prefix, "some/prefix");
        assert_eq!(s.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s.region.as_deref(), Some("eu-west-1"));
        assert!(s.path_style);
        assert!(S3Settings::parse("?endpoint=x").is_err());
        assert!(S3Settings::parse("b?bogus=1").is_err());
    }
}
