//! Builds the SDK client of a remote: region, endpoint and addressing style, the standard
//! credential chain (environment, `AWS_PROFILE` with `~/.aws/credentials` and
//! `~/.aws/config`, `credential_process`, web identity, ECS and instance metadata), cached
//! and refreshed by the SDK before they expire, retries and TLS from `[http]` and `[s3]`.
//! Credentials are never logged: the SDK redacts them in `Debug`, and errors carry none.

use aws_config::BehaviorVersion;
use aws_config::meta::region::RegionProviderChain;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation, StalledStreamProtectionConfig,
};

use super::config::S3Config;
use super::connector::ReqwestConnector;
use crate::store::http::{self as h, HttpConfig};
use crate::store::{StoreError, StoreResult};

fn config_error(message: String) -> StoreError {
    StoreError::Refused { status: 0, message }
}

/// The reqwest client with the TLS settings of `[s3]` (else those of `[http]`).
fn http_client(cfg: &S3Config, http: &HttpConfig) -> StoreResult<reqwest::Client> {
    let ca = cfg.ca_bundle.as_deref().or(http.ca_bundle.as_deref());
    let insecure = cfg.insecure_skip_tls_verify || http.insecure_skip_tls_verify;
    h::with_tls(h::client_builder(http), ca, insecure)?
        .build()
        .map_err(|e| config_error(h::error_chain("cannot build the HTTP client", &e)))
}

/// The SDK client for `cfg`. `credentials`: fixed keys instead of the standard chain (tests,
/// embedding).
pub async fn build(
    cfg: &S3Config,
    http: &HttpConfig,
    credentials: Option<Credentials>,
) -> StoreResult<aws_sdk_s3::Client> {
    if let Some(e) = &cfg.endpoint_url
        && !(e.starts_with("http://") || e.starts_with("https://"))
    {
        return Err(config_error(format!(
            "endpoint_url {e:?}: expected http://HOST[:PORT] or https://…"
        )));
    }
    let connector = ReqwestConnector::new(http_client(cfg, http)?);
    let region = match &cfg.region {
        Some(r) => RegionProviderChain::first_try(Region::new(r.clone())),
        None => RegionProviderChain::default_provider().or_else(Region::from_static("us-east-1")),
    };
    let retries = u32::try_from(http.retries).unwrap_or(u32::MAX).saturating_add(1);
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .http_client(connector)
        .region(region)
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(retries)
                .with_initial_backoff(http.retry_min_delay)
                .with_max_backoff(http.retry_max_delay),
        )
        // The reqwest client enforces connect and read-silence timeouts; like every remote,
        // a transfer has no total time limit while bytes flow.
        .timeout_config(TimeoutConfig::disabled())
        .stalled_stream_protection(StalledStreamProtectionConfig::disabled())
        // Checksums only where S3 requires them: S3-compatible servers differ in which
        // flexible checksums (and aws-chunked trailers) they accept; the engine checks what
        // it reads itself (length, ETag, digests).
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
    if let Some(p) = &cfg.profile {
        loader = loader.profile_name(p);
    }
    if let Some(c) = credentials {
        loader = loader.credentials_provider(c);
    }
    if let Some(e) = &cfg.endpoint_url {
        loader = loader.endpoint_url(e);
    }
    let sdk = loader.load().await;
    let s3 = aws_sdk_s3::config::Builder::from(&sdk)
        .force_path_style(cfg.path_style())
        .build();
    Ok(aws_sdk_s3::Client::from_conf(s3))
}

/// Fixed access keys (for tests and programs that embed the store).
pub fn static_credentials(access_key: &str, secret_key: &str) -> Credentials {
    Credentials::new(access_key, secret_key, None, None, "artifactfs-static")
}
