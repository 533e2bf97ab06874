//! Which store a remote URL names, and opening it: `http(s)://` is the built-in server when it
//! answers `?afs=info`; `s3://BUCKET/PREFIX` is S3 (or an S3-compatible server, `[s3]`).

use super::http::HttpConfig;
use super::{DynStore, StoreError, StoreResult};

/// Everything a remote of any kind may need to be opened.
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    pub http: HttpConfig,
    pub s3: super::s3::S3Config,
}

/// Opens the remote `url` names.
pub async fn open(url: &str, opts: &RemoteOptions) -> StoreResult<DynStore> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http") | Some("https") => {
            let s = super::artifact::ArtifactStore::connect(url, opts.http.clone()).await?;
            Ok(std::sync::Arc::new(s))
        }
        Some("s3") => {
            let s = super::s3::S3Store::connect(url, &opts.s3, &opts.http).await?;
            Ok(std::sync::Arc::new(s))
        }
        _ => Err(StoreError::Protocol(format!(
            "{url}: not a remote URL this build knows (http://, https:// or s3://)"
        ))),
    }
}
