//! The `[s3]` section of the mount configuration (and its command-line flags), and the
//! `s3://BUCKET/PREFIX` URL. Everything here is plain data; `client.rs` turns it into a client.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::store::{StoreError, StoreResult};

/// How the bucket appears in request URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AddressingStyle {
    /// Path-style when an endpoint URL is given (what MinIO and test servers expect),
    /// virtual-hosted on AWS.
    #[default]
    Auto,
    /// `https://host/BUCKET/KEY`.
    Path,
    /// `https://BUCKET.host/KEY`.
    Virtual,
}

impl std::str::FromStr for AddressingStyle {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AddressingStyle::Auto),
            "path" => Ok(AddressingStyle::Path),
            "virtual" => Ok(AddressingStyle::Virtual),
            _ => Err(format!("{s:?}: expected auto, path or virtual")),
        }
    }
}

/// Settings of `s3://` remotes (`[s3]` in the config). Connection timeouts and retries come
/// from `[http]`, as for every remote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// An S3-compatible server (MinIO, Ceph, s3s-fs, …); default: AWS for the region.
    pub endpoint_url: Option<String>,
    /// Default: `AWS_REGION` / `AWS_DEFAULT_REGION`, the profile's region, else `us-east-1`.
    pub region: Option<String>,
    /// A profile of `~/.aws/config` / `~/.aws/credentials`; default: `AWS_PROFILE`, else
    /// `default`.
    pub profile: Option<String>,
    pub addressing_style: AddressingStyle,
    /// PEM file of CA certificates trusted besides the system roots.
    pub ca_bundle: Option<PathBuf>,
    /// Accept any TLS certificate (tests against self-signed servers only; logged).
    pub insecure_skip_tls_verify: bool,
    /// Unchanged ranges of a changed file are copied on the server (`UploadPartCopy`);
    /// `false` for servers without it: changed files are then uploaded whole.
    pub server_side_copy: bool,
    /// The server honours `If-Match` / `If-None-Match: *` on `PutObject` and
    /// `CompleteMultipartUpload`; `false`: a `HEAD` just before the commit checks instead
    /// (a weaker guarantee: a write in between is overwritten).
    pub conditional_writes: bool,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint_url: None,
            region: None,
            profile: None,
            addressing_style: AddressingStyle::Auto,
            ca_bundle: None,
            insecure_skip_tls_verify: false,
            server_side_copy: true,
            conditional_writes: true,
        }
    }
}

impl S3Config {
    /// Whether requests put the bucket in the path.
    pub fn path_style(&self) -> bool {
        match self.addressing_style {
            AddressingStyle::Auto => self.endpoint_url.is_some(),
            AddressingStyle::Path => true,
            AddressingStyle::Virtual => false,
        }
    }
}

/// A parsed `s3://BUCKET/PREFIX` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// `""` or a key prefix ending with `/`.
    pub prefix: String,
}

impl S3Url {
    pub fn parse(url: &str) -> StoreResult<S3Url> {
        let bad = |why: &str| StoreError::Protocol(format!("{url:?}: {why}; write s3://BUCKET or s3://BUCKET/PREFIX"));
        let rest = url
            .strip_prefix("s3://")
            .or_else(|| url.strip_prefix("S3://"))
            .ok_or_else(|| bad("not an s3:// URL"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        // Bucket names are 3–63 characters of lowercase letters, digits, `.` and `-`; the
        // rule is checked loosely (old buckets may have capitals) but never lets `@`, `:`,
        // `?` or `#` through, so the name cannot change the host or the request.
        if bucket.len() < 3
            || bucket.len() > 255
            || !bucket
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(bad("not a bucket name"));
        }
        if prefix.contains("?") || prefix.contains('#') {
            return Err(bad("a prefix takes no query or fragment"));
        }
        let segments: Vec<&str> = prefix.split('/').filter(|s| !s.is_empty()).collect();
        if segments.iter().any(|s| *s == "." || *s == "..") {
            return Err(bad("`.` and `..` are not prefix segments"));
        }
        let prefix = if segments.is_empty() {
            String::new()
        } else {
            format!("{}/", segments.join("/"))
        };
        Ok(S3Url {
            bucket: bucket.to_string(),
            prefix,
        })
    }

    /// `s3://bucket/prefix` without a trailing slash: the store's id.
    pub fn id(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
            .trim_end_matches('/')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_normalised_prefix() {
        let u = S3Url::parse("s3://my-bucket").unwrap();
        assert_eq!((u.bucket.as_str(), u.prefix.as_str()), ("my-bucket", ""));
        assert_eq!(u.id(), "s3://my-bucket");
        let u = S3Url::parse("s3://my-bucket/a//b/").unwrap();
        assert_eq!(u.prefix, "a/b/");
        assert_eq!(u.id(), "s3://my-bucket/a/b");
        for bad in [
            "http://x/y",
            "s3://",
            "s3://ab",
            "s3://user@host/x",
            "s3://b:80/x",
            "s3://bucket/../x",
            "s3://bucket/x?y",
        ] {
            assert!(S3Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn addressing_defaults_to_path_style_with_an_endpoint() {
        let mut c = S3Config::default();
        assert!(!c.path_style());
        c.endpoint_url = Some("http://127.0.0.1:9000".into());
        assert!(c.path_style());
        c.addressing_style = AddressingStyle::Virtual;
        assert!(!c.path_style());
    }
}
