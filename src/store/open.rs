//! Which store a remote URL names, and opening it. `http(s)://` is the built-in server when
//! it answers `?afs=info` as one, else a plain web server (WebDAV or a directory index);
//! `[web] kind` (`--kind`) skips the guessing. `s3://BUCKET/PREFIX` is S3 or an
//! S3-compatible server (`[s3]`).

use std::sync::Arc;

use super::http::HttpConfig;
use super::web::{RemoteKind, WebConfig, WebStore};
use super::{DynStore, StoreError, StoreResult};

/// Everything a remote of any kind may need to be opened.
#[derive(Debug, Clone, Default)]
pub struct RemoteOptions {
    pub http: HttpConfig,
    pub web: WebConfig,
    pub s3: super::s3::S3Config,
    /// Sent to the built-in server (`Authorization: Bearer`), never to other kinds.
    pub token: Option<super::http::BearerToken>,
}

/// Opens the remote `url` names.
pub async fn open(url: &str, opts: &RemoteOptions) -> StoreResult<DynStore> {
    let scheme = url.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    match scheme.as_deref() {
        Some("http") | Some("https") => open_http(url, opts).await,
        Some("s3") => Ok(Arc::new(super::s3::S3Store::connect(url, &opts.s3, &opts.http).await?)),
        _ => Err(StoreError::Protocol(format!(
            "{url}: not a remote URL this build knows (http://, https:// or s3://)"
        ))),
    }
}

async fn open_http(url: &str, opts: &RemoteOptions) -> StoreResult<DynStore> {
    use super::artifact::ArtifactStore;
    let web = || async { Ok(Arc::new(WebStore::connect(url, opts.http.clone(), &opts.web).await?) as DynStore) };
    match opts.web.kind {
        RemoteKind::Artifact => {
            if !opts.web.mirrors.is_empty() {
                return Err(StoreError::Protocol(
                    "mirrors are for plain web servers (kind webdav or index)".into(),
                ));
            }
            Ok(Arc::new(
                ArtifactStore::connect(url, opts.http.clone(), opts.token.as_ref()).await?,
            ))
        }
        RemoteKind::Webdav | RemoteKind::Index => web().await,
        // Mirrors only exist for plain web servers.
        RemoteKind::Auto if !opts.web.mirrors.is_empty() => web().await,
        RemoteKind::Auto => {
            match ArtifactStore::connect_if_artifact(url, opts.http.clone(), opts.token.as_ref()).await? {
                Some(s) => Ok(Arc::new(s)),
                None => web().await,
            }
        }
    }
}
