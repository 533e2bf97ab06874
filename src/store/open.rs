//! Which store a remote URL names, and opening it: `http(s)://` is the built-in server when it
//! answers `?afs=info`; other kinds are added here as they come.

use super::http::HttpConfig;
use super::{DynStore, StoreError, StoreResult};

/// Everything a remote of any kind may need to be opened.
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    pub http: HttpConfig,
}

/// Opens the remote `url` names.
pub async fn open(url: &str, opts: &RemoteOptions) -> StoreResult<DynStore> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http") | Some("https") => {
            let s = super::artifact::ArtifactStore::connect(url, opts.http.clone()).await?;
            Ok(std::sync::Arc::new(s))
        }
        _ => Err(StoreError::Protocol(format!(
            "{url}: not a remote URL this build knows (http:// or https://)"
        ))),
    }
}
