//! Plain web servers as remotes: WebDAV (nginx `dav` + `dav_ext`, Apache `mod_dav`) and
//! read-only directory indexes (nginx `autoindex` JSON or HTML, Apache `mod_autoindex`).
//!
//! What the server is gets detected once, at connect: `OPTIONS` says whether it speaks
//! WebDAV (the `DAV` header) and which methods it allows; without `PROPFIND` the listing
//! comes from the index page. Files are read with `Range` (a server without range support is
//! read whole, which the read engine notices and logs once).
//!
//! Versions: the server's ETag, normalized (a weak `W/` tag of a file server is its mtime and
//! size, like the strong one; Apache marks tags weak during the second after a change), or,
//! for servers that send none, a tag made here from `Last-Modified` and the size, which is
//! never sent back to the server. `docs/SEMANTICS.md` says what that means for change
//! detection.
//!
//! Writes (`PUT`, `DELETE`, `MKCOL`, `MOVE`) go to the primary URL only. nginx ignores
//! `If-Match` / `If-None-Match` on writes, so the condition is checked with a `HEAD` first
//! (a narrower guarantee: a write by someone else between the check and the write is not
//! seen); servers known to honour them (Apache) get the headers alone. Partial `PUT` with
//! `Content-Range` is used only where the server is known to support it (Apache `mod_dav`,
//! or `partial_put = true`): it is never probed on user data.

pub mod listing;
pub mod replicas;

use std::future::Future;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{Method, StatusCode};
use reqwest::Url;
use reqwest::header::{
    ACCEPT, ACCEPT_ENCODING, CONTENT_LENGTH, CONTENT_RANGE, CONTENT_TYPE, ETAG, IF_MATCH, IF_NONE_MATCH, RANGE,
};
use serde::{Deserialize, Serialize};

use self::listing::Found;
use self::replicas::Replicas;
use super::http::{self as h, HttpConfig};
use super::{
    Capabilities, DirEntry, ETag, EntryKind, GetResponse, Head, Listing, ObjectMeta, Revalidated, Store, StoreError,
    StoreResult, WriteCondition,
};

/// What kind of server an `http(s)://` remote is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RemoteKind {
    /// The built-in server if it answers as one, else WebDAV if offered, else an index.
    #[default]
    Auto,
    /// The built-in artifact server (`artifactfs serve`).
    Artifact,
    /// A WebDAV server: listings by `PROPFIND`.
    Webdav,
    /// A web server's directory index pages (nginx JSON or HTML, Apache HTML).
    Index,
}

/// Settings of plain HTTP/WebDAV remotes (`[web]` in the config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WebConfig {
    pub kind: RemoteKind,
    /// More base URLs serving the same tree; file reads are spread over all of them.
    pub mirrors: Vec<String>,
    /// Whether the server takes writes; unset: what its `OPTIONS` answer allows.
    pub writes: Option<bool>,
    /// Partial `PUT` with `Content-Range`; unset: only for Apache `mod_dav`.
    pub partial_put: Option<bool>,
    /// How often a mirror taken out is checked.
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
}

impl Default for WebConfig {
    fn default() -> Self {
        WebConfig {
            kind: RemoteKind::Auto,
            mirrors: Vec::new(),
            writes: None,
            partial_put: None,
            health_interval: Duration::from_secs(10),
        }
    }
}

/// Where listings come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingForm {
    Propfind,
    IndexJson,
    IndexHtml,
}

/// What was learnt about the server at connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    pub listing: ListingForm,
    /// The `Server` header, for logs and for what is known of a server.
    pub server: String,
    pub writes: bool,
    pub partial_put: bool,
    /// The server checks `If-Match` / `If-None-Match` on writes itself.
    pub conditional_writes: bool,
}

/// Prefix of the tags made here for servers that send no ETag.
const MADE_TAG: &str = "\"~lm-";

#[derive(Debug)]
pub struct WebStore {
    id: String,
    replicas: Arc<Replicas>,
    client: reqwest::Client,
    /// Settings of a request to one replica (fewer retries when there are others to try).
    cfg: HttpConfig,
    detected: Detected,
}

impl WebStore {
    /// Connects to the server at `url` (and its mirrors) and finds out what it offers.
    pub async fn connect(url: &str, cfg: HttpConfig, web: &WebConfig) -> StoreResult<Self> {
        let mut bases = vec![h::base_url(url)?];
        for m in &web.mirrors {
            bases.push(h::base_url(m)?);
        }
        let id = bases[0].1.clone();
        let client = h::build_client(&cfg)?;
        let mut one = cfg.clone();
        if bases.len() > 1 {
            one.retries = one.retries.min(1);
        }
        let replicas = Arc::new(Replicas::new(bases));
        let detected = detect(&client, &one, &replicas, web).await?;
        tracing::info!(
            remote = %id,
            server = %detected.server,
            listing = ?detected.listing,
            writes = detected.writes,
            partial_put = detected.partial_put,
            mirrors = replicas.count() - 1,
            "plain web remote"
        );
        Replicas::spawn_health_checks(&replicas, client.clone(), web.health_interval);
        Ok(WebStore {
            id,
            replicas,
            client,
            cfg: one,
            detected,
        })
    }

    pub fn detected(&self) -> &Detected {
        &self.detected
    }

    pub fn replicas(&self) -> &Replicas {
        &self.replicas
    }

    fn url(&self, replica: usize, path: &str, dir: bool) -> Url {
        h::join_url(&self.replicas.get(replica).base, path, dir)
    }

    /// Runs `op` on the replicas in `order` until one answers; a replica that is unreachable
    /// or failing is taken out. With `lagging`, a mirror's `NotFound` / precondition failure
    /// is also passed on to the next one (it may not have the version yet).
    async fn failover<T, F, Fut>(&self, order: Vec<usize>, lagging: bool, op: F) -> StoreResult<T>
    where
        F: Fn(usize) -> Fut,
        Fut: Future<Output = StoreResult<T>>,
    {
        let mut last = None;
        let n = order.len();
        for (k, i) in order.into_iter().enumerate() {
            match op(i).await {
                Err(e) if k + 1 < n && e.is_transient() => {
                    self.replicas.mark_down(i, &e.to_string());
                    last = Some(e);
                }
                Err(e @ (StoreError::NotFound | StoreError::PreconditionFailed)) if lagging && k + 1 < n => {
                    tracing::debug!(replica = %self.replicas.get(i).id, "{e}; trying another");
                    last = Some(e);
                }
                Err(e) => {
                    if e.is_transient() {
                        self.replicas.mark_down(i, &e.to_string());
                    }
                    return Err(e);
                }
                Ok(v) => return Ok(v),
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Unavailable("no replica".into())))
    }

    async fn send(&self, what: &str, make: impl Fn() -> reqwest::RequestBuilder) -> StoreResult<reqwest::Response> {
        h::send(&self.cfg, what, make).await
    }

    /// The version tag of a response about a file of `size` bytes.
    fn tag_of(&self, headers: &reqwest::header::HeaderMap, size: Option<u64>) -> Option<ETag> {
        if let Some(t) = h::header_str(headers, ETAG.as_str()) {
            return Some(ETag::new(t.strip_prefix("W/").unwrap_or(t)));
        }
        let lm = h::parse_last_modified(headers)?;
        let secs = lm.duration_since(UNIX_EPOCH).ok()?.as_secs();
        Some(ETag::new(&format!("{MADE_TAG}{secs:x}-{:x}\"", size?)))
    }

    async fn head_one(&self, i: usize, path: &str, if_none_match: Option<&ETag>) -> StoreResult<Revalidated<Head>> {
        if path.is_empty() {
            return Ok(Revalidated::Modified(Head::Dir { mtime: UNIX_EPOCH }));
        }
        let url = self.url(i, path, false);
        let what = format!("HEAD {}", redact(&url));
        let resp = self
            .send(&what, || {
                let mut r = self.client.head(url.clone());
                if let Some(t) = if_none_match.filter(|t| server_knows(t)) {
                    r = r.header(IF_NONE_MATCH, t.as_str());
                }
                r
            })
            .await?;
        let status = resp.status();
        if status == StatusCode::NOT_FOUND {
            return Err(StoreError::NotFound);
        }
        // A folder asked for without its slash is redirected to it.
        if resp.url().path().ends_with('/') {
            return Ok(Revalidated::Modified(Head::Dir {
                mtime: h::parse_last_modified(resp.headers()).unwrap_or(UNIX_EPOCH),
            }));
        }
        match status {
            StatusCode::NOT_MODIFIED => return Ok(Revalidated::NotModified),
            s if s.is_success() => {}
            _ => return Err(refused(&what, status, resp).await),
        }
        let headers = resp.headers();
        let size: u64 = match h::header_str(headers, CONTENT_LENGTH.as_str()).and_then(|v| v.parse().ok()) {
            Some(n) => n,
            // Apache answers HEAD of an empty file without one.
            None => self.size_by_get(i, path).await?,
        };
        let meta = ObjectMeta {
            size,
            mtime: h::parse_last_modified(headers).unwrap_or(UNIX_EPOCH),
            etag: self.tag_of(headers, Some(size)),
            max_age: h::parse_max_age(headers),
        };
        if let (Some(want), Some(have)) = (if_none_match, &meta.etag)
            && want == have
        {
            return Ok(Revalidated::NotModified);
        }
        Ok(Revalidated::Modified(Head::File(meta)))
    }

    /// The size of a file whose `HEAD` did not say, from a one-byte ranged `GET`.
    async fn size_by_get(&self, i: usize, path: &str) -> StoreResult<u64> {
        let url = self.url(i, path, false);
        let what = format!("GET {} [0-1)", redact(&url));
        let resp = self
            .send(&what, || {
                self.client
                    .get(url.clone())
                    .header(ACCEPT_ENCODING, "identity")
                    .header(RANGE, "bytes=0-0")
            })
            .await?;
        let size = match h::content_of(&what, &resp) {
            Ok(Some(super::Content::Partial { total: Some(t), .. })) => Some(t),
            Ok(Some(super::Content::Whole { size })) => size,
            Err(StoreError::RangeNotSatisfiable { size }) => size,
            Ok(None) => {
                let status = resp.status();
                return Err(refused(&what, status, resp).await);
            }
            _ => None,
        };
        size.ok_or_else(|| StoreError::Protocol(format!("{what}: the server does not say how large the file is")))
    }

    /// The file at `path` on the primary, `None` when nothing is there.
    async fn current(&self, path: &str) -> StoreResult<Option<Head>> {
        match self.head_one(0, path, None).await {
            Ok(Revalidated::Modified(hd)) => Ok(Some(hd)),
            Ok(Revalidated::NotModified) => Err(StoreError::Protocol("304 to an unconditional HEAD".into())),
            Err(StoreError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Checks `cond` against what is at `path` now (servers that ignore conditional headers
    /// on writes).
    async fn check(&self, path: &str, cond: &WriteCondition) -> StoreResult<()> {
        if matches!(cond, WriteCondition::None) {
            return Ok(());
        }
        let now = self.current(path).await?;
        let ok = match (cond, &now) {
            (WriteCondition::Absent, None) => true,
            (WriteCondition::Matches(t), Some(Head::File(m))) => m.etag.as_ref() == Some(t),
            _ => false,
        };
        if ok {
            Ok(())
        } else {
            Err(StoreError::PreconditionFailed)
        }
    }

    /// Sends a write under `cond`: checked here first unless the server checks it, with the
    /// headers whenever the server can understand them. An `If-Match` refused only because
    /// the server's tag is still weak (Apache, within a second of the last change) is sent
    /// again once the tag is strong.
    async fn conditional_write(
        &self,
        what: &str,
        path: &str,
        cond: &WriteCondition,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> StoreResult<reqwest::Response> {
        let honoured = self.detected.conditional_writes
            && match cond {
                WriteCondition::Matches(t) => server_knows(t),
                _ => true,
            };
        if !honoured {
            self.check(path, cond).await?;
        }
        let build = || {
            let r = make();
            match cond {
                WriteCondition::Matches(t) if honoured => r.header(IF_MATCH, t.as_str()),
                WriteCondition::Absent if honoured => r.header(IF_NONE_MATCH, "*"),
                _ => r,
            }
        };
        let resp = self.send(what, build).await?;
        if resp.status() != StatusCode::PRECONDITION_FAILED || !honoured {
            return Ok(resp);
        }
        let WriteCondition::Matches(want) = cond else {
            return Ok(resp);
        };
        if let Some(Head::File(m)) = self.current(path).await?
            && m.etag.as_ref() == Some(want)
        {
            tracing::debug!(path, "the server's tag is still weak; writing again in a second");
            tokio::time::sleep(Duration::from_millis(1100)).await;
            return self.send(what, build).await;
        }
        Ok(resp)
    }

    /// The version at `path` after a write of ours, read back with `HEAD` (these servers do
    /// not answer writes with one).
    async fn version_after_write(&self, path: &str) -> StoreResult<ObjectMeta> {
        match self.current(path).await? {
            Some(Head::File(m)) if m.etag.is_some() => Ok(m),
            Some(Head::File(_)) => Err(StoreError::Protocol(format!("{path}: no ETag and no Last-Modified"))),
            Some(Head::Dir { .. }) => Err(StoreError::Conflict("is_dir".into())),
            None => Err(StoreError::Protocol(format!("{path}: gone right after it was written"))),
        }
    }

    async fn list_with(&self, i: usize, dir: &str) -> StoreResult<Listing> {
        let url = self.url(i, dir, true);
        let (found, max_age) = match self.detected.listing {
            ListingForm::Propfind => {
                let what = format!("PROPFIND {}", redact(&url));
                let resp = self
                    .send(&what, || {
                        self.client
                            .request(Method::from_bytes(b"PROPFIND").expect("a valid method"), url.clone())
                            .header("Depth", "1")
                            .header(CONTENT_TYPE, "application/xml; charset=utf-8")
                            .body(listing::PROPFIND_BODY)
                    })
                    .await?;
                let status = resp.status();
                if status != StatusCode::MULTI_STATUS {
                    return Err(refused(&what, status, resp).await);
                }
                let age = h::parse_max_age(resp.headers());
                let body = resp.bytes().await.map_err(|e| h::body_error(&what, &e))?;
                let text = String::from_utf8_lossy(&body);
                let found = listing::parse_multistatus(&text, url.path())
                    .map_err(|e| StoreError::Protocol(format!("{what}: {e}")))?;
                (found, age)
            }
            form => {
                let what = format!("GET {}", redact(&url));
                let accept = if form == ListingForm::IndexJson {
                    "application/json"
                } else {
                    "text/html"
                };
                let resp = self
                    .send(&what, || self.client.get(url.clone()).header(ACCEPT, accept))
                    .await?;
                let status = resp.status();
                if status != StatusCode::OK {
                    return Err(refused(&what, status, resp).await);
                }
                let age = h::parse_max_age(resp.headers());
                let body = resp.bytes().await.map_err(|e| h::body_error(&what, &e))?;
                let found = if form == ListingForm::IndexJson {
                    listing::parse_nginx_json(&body).map_err(|e| StoreError::Protocol(format!("{what}: {e}")))?
                } else {
                    listing::parse_html_index(&String::from_utf8_lossy(&body))
                };
                (found, age)
            }
        };
        let entries = self.complete(i, dir, found).await?;
        Ok(Listing {
            entries,
            validator: None,
            max_age,
        })
    }

    /// Entries the listing gave no exact size for are asked with `HEAD`, a few at a time.
    async fn complete(&self, i: usize, dir: &str, found: Vec<Found>) -> StoreResult<Vec<DirEntry>> {
        let results: Vec<StoreResult<Option<DirEntry>>> = futures_util::stream::iter(found)
            .map(|f| async move {
                let entry = |size, mtime: Option<SystemTime>, etag: Option<String>, kind| DirEntry {
                    name: f.name.clone(),
                    kind,
                    size,
                    mtime: mtime.unwrap_or(UNIX_EPOCH),
                    etag: etag.map(|t| ETag::new(t.strip_prefix("W/").unwrap_or(&t))),
                };
                if let Some(size) = f.size {
                    return Ok(Some(entry(size, f.mtime, f.etag.clone(), f.kind)));
                }
                let path = super::join_path(dir, &f.name);
                match self.head_one(i, &path, None).await {
                    Ok(Revalidated::Modified(Head::File(m))) => Ok(Some(DirEntry {
                        name: f.name.clone(),
                        kind: EntryKind::File,
                        size: m.size,
                        mtime: m.mtime,
                        etag: m.etag,
                    })),
                    Ok(Revalidated::Modified(Head::Dir { mtime })) => {
                        Ok(Some(entry(0, Some(mtime), None, EntryKind::Dir)))
                    }
                    // Gone between the listing and the HEAD.
                    Err(StoreError::NotFound) => Ok(None),
                    Ok(Revalidated::NotModified) => Ok(None),
                    Err(e) => Err(e),
                }
            })
            .buffered(8)
            .collect()
            .await;
        results.into_iter().filter_map(Result::transpose).collect()
    }

    /// Whether folder `path` on the primary has anything in it.
    async fn has_children(&self, path: &str) -> StoreResult<bool> {
        Ok(!self.list_with(0, path).await?.entries.is_empty())
    }

    async fn partial_put(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        if !self.detected.partial_put {
            return Err(StoreError::Unsupported("partial PUT"));
        }
        if body.is_empty() {
            return Err(StoreError::Protocol("an empty partial write".into()));
        }
        let end = offset + body.len() as u64;
        let url = self.url(0, path, false);
        let what = format!("PUT {} [{offset}-{end})", redact(&url));
        let resp = self
            .conditional_write(&what, path, &cond, || {
                self.client
                    .put(url.clone())
                    .header(CONTENT_LENGTH, body.len())
                    .header(CONTENT_RANGE, format!("bytes {offset}-{}/*", end - 1))
                    .body(body.clone())
            })
            .await?;
        write_status(&what, resp).await?;
        let meta = self.version_after_write(path).await?;
        if meta.size < end {
            // The server took the body as the whole file: exactly what must never happen.
            return Err(StoreError::Protocol(format!(
                "{what}: the file is {} bytes after a write ending at {end}; the server ignored Content-Range",
                meta.size
            )));
        }
        Ok(meta)
    }
}

/// Finds out what the server at the first reachable replica offers.
async fn detect(
    client: &reqwest::Client,
    cfg: &HttpConfig,
    replicas: &Replicas,
    web: &WebConfig,
) -> StoreResult<Detected> {
    let mut last = None;
    for i in replicas.for_metadata() {
        match detect_one(client, cfg, &replicas.get(i).base, web).await {
            Ok(d) => return Ok(d),
            Err(e) if e.is_transient() && i + 1 < replicas.count() => {
                replicas.mark_down(i, &e.to_string());
                last = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| StoreError::Unavailable("no replica".into())))
}

async fn detect_one(client: &reqwest::Client, cfg: &HttpConfig, base: &Url, web: &WebConfig) -> StoreResult<Detected> {
    let id = redact(base);
    let what = format!("OPTIONS {id}");
    let resp = h::send(cfg, &what, || client.request(Method::OPTIONS, base.clone())).await?;
    let headers = resp.headers().clone();
    let ok = resp.status().is_success();
    drop(resp);
    let server = h::header_str(&headers, "server").unwrap_or("").to_string();
    let dav = ok && headers.contains_key("dav");
    let allow: Vec<String> = if ok {
        headers
            .get_all("allow")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|m| m.trim().to_ascii_uppercase())
            .collect()
    } else {
        Vec::new()
    };
    let allows = |m: &str| allow.iter().any(|a| a == m);
    let propfind = dav && (allow.is_empty() || allows("PROPFIND"));
    let listing = match web.kind {
        RemoteKind::Webdav => ListingForm::Propfind,
        RemoteKind::Auto if propfind => ListingForm::Propfind,
        _ => index_form(client, cfg, base).await?,
    };
    let apache = server.starts_with("Apache");
    let writes = web
        .writes
        .unwrap_or_else(|| ["PUT", "DELETE", "MKCOL", "MOVE"].iter().any(|m| allows(m)));
    let partial_put = writes && web.partial_put.unwrap_or(apache && dav);
    Ok(Detected {
        listing,
        server,
        writes,
        partial_put,
        conditional_writes: apache && dav,
    })
}

/// Which index the server's folder page is (asks for JSON, takes what comes).
async fn index_form(client: &reqwest::Client, cfg: &HttpConfig, base: &Url) -> StoreResult<ListingForm> {
    let what = format!("GET {}", redact(base));
    let resp = h::send(cfg, &what, || {
        client
            .get(base.clone())
            .header(ACCEPT, "application/json, text/html;q=0.9")
    })
    .await?;
    let status = resp.status();
    if !status.is_success() {
        return Err(refused(&what, status, resp).await);
    }
    let ctype = h::header_str(resp.headers(), CONTENT_TYPE.as_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if ctype.contains("json") {
        Ok(ListingForm::IndexJson)
    } else if ctype.contains("html") {
        Ok(ListingForm::IndexHtml)
    } else {
        Err(StoreError::Protocol(format!(
            "{what}: neither WebDAV nor a directory index (Content-Type {ctype:?})"
        )))
    }
}

/// Whether the server itself issued tag `t` (tags made here are checked here).
fn server_knows(t: &ETag) -> bool {
    !t.as_str().starts_with(MADE_TAG)
}

/// A URL without credentials, for logs and errors.
fn redact(url: &Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.to_string()
}

async fn refused(what: &str, status: StatusCode, resp: reqwest::Response) -> StoreError {
    let body = resp.bytes().await.unwrap_or_default();
    match status {
        StatusCode::NOT_FOUND | StatusCode::GONE => StoreError::NotFound,
        StatusCode::PRECONDITION_FAILED => StoreError::PreconditionFailed,
        _ => StoreError::Refused {
            status: status.as_u16(),
            message: format!("{what}: {}", h::error_message(&body)),
        },
    }
}

/// The outcome of a write by its status.
async fn write_status(what: &str, resp: reqwest::Response) -> StoreResult<()> {
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    Err(match status {
        StatusCode::CONFLICT => StoreError::Conflict("no_parent".into()),
        _ => refused(what, status, resp).await,
    })
}

#[async_trait]
impl Store for WebStore {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> crate::store::StoreKind {
        crate::store::StoreKind::Http
    }

    fn capabilities(&self) -> Capabilities {
        let d = &self.detected;
        Capabilities {
            ranged_reads: true,
            listing_etags: false,
            digest_chunk_size: None,
            etags_from_digests: false,
            writes: d.writes,
            partial_writes: d.partial_put,
            server_side_copy: false,
            rename: d.writes,
            content_chunks: false,
            min_part_size: 0,
            max_parts: 10_000,
            // nginx's WebDAV module lists no dot names (see WEB.md).
            complete_listings: false,
            bundles: false,
        }
    }

    async fn list(&self, dir: &str, validator: Option<&str>) -> StoreResult<Revalidated<Listing>> {
        let _ = validator;
        let listing = self
            .failover(self.replicas.for_metadata(), false, |i| self.list_with(i, dir))
            .await?;
        Ok(Revalidated::Modified(listing))
    }

    async fn head(&self, path: &str, if_none_match: Option<&ETag>) -> StoreResult<Revalidated<Head>> {
        self.failover(self.replicas.for_metadata(), false, |i| {
            self.head_one(i, path, if_none_match)
        })
        .await
    }

    async fn get(&self, path: &str, range: Option<Range<u64>>, if_match: Option<&ETag>) -> StoreResult<GetResponse> {
        if let Some(r) = &range
            && r.is_empty()
        {
            return Err(StoreError::Protocol(format!("{path}: empty range requested")));
        }
        // Apache refuses its own tags in If-Match while they are weak: its answers are checked
        // here instead (the read engine compares the ETag of every answer).
        let send_if_match = !self.detected.server.starts_with("Apache");
        let get_one = |i: usize| {
            let range = range.clone();
            async move {
                let url = self.url(i, path, false);
                let what = match &range {
                    Some(r) => format!("GET {} [{}-{})", redact(&url), r.start, r.end),
                    None => format!("GET {}", redact(&url)),
                };
                let resp = self
                    .send(&what, || {
                        let mut r = self.client.get(url.clone()).header(ACCEPT_ENCODING, "identity");
                        if let Some(rg) = &range {
                            r = r.header(RANGE, h::range_header(rg));
                        }
                        if let Some(t) = if_match.filter(|t| send_if_match && server_knows(t)) {
                            r = r.header(IF_MATCH, t.as_str());
                        }
                        r
                    })
                    .await?;
                let Some(content) = h::content_of(&what, &resp)? else {
                    let status = resp.status();
                    return Err(refused(&what, status, resp).await);
                };
                let total = match &content {
                    super::Content::Partial { total, .. } => *total,
                    super::Content::Whole { size } => *size,
                };
                let etag = self.tag_of(resp.headers(), total);
                Ok(GetResponse {
                    etag,
                    content,
                    body: h::body_stream(what, resp),
                })
            }
        };
        self.failover(self.replicas.for_read(), true, get_one).await
    }

    async fn put(&self, path: &str, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        let url = self.url(0, path, false);
        let what = format!("PUT {} ({} bytes)", redact(&url), body.len());
        // Always with a length: nginx refuses a PUT without one (an empty body has none).
        let put = || {
            self.client
                .put(url.clone())
                .header(CONTENT_LENGTH, body.len())
                .body(body.clone())
        };
        let resp = self.conditional_write(&what, path, &cond, put).await?;
        write_status(&what, resp).await?;
        let meta = self.version_after_write(path).await?;
        if let WriteCondition::Matches(old) = &cond
            && meta.etag.as_ref() == Some(old)
        {
            // Same size, same second: the server's tag (mtime seconds and size) cannot tell
            // the new bytes from the old. Written again in a later second, the tag differs.
            // The file's mtime comes from the kernel's coarse clock, which can lag ours by a
            // tick or more, so this is tried up to three times.
            for attempt in 1..=3 {
                let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
                tokio::time::sleep(Duration::from_nanos(
                    1_000_000_000 - u64::from(now.subsec_nanos()) + 20_000_000,
                ))
                .await;
                tracing::debug!(path, attempt, "rewritten so that its tag changes");
                write_status(&what, self.send(&what, put).await?).await?;
                let again = self.version_after_write(path).await?;
                if again.etag.as_ref() != Some(old) {
                    return Ok(again);
                }
            }
            return Err(StoreError::Protocol(format!(
                "{what}: the server's ETag did not change"
            )));
        }
        Ok(meta)
    }

    async fn delete(&self, path: &str, cond: WriteCondition) -> StoreResult<()> {
        let url = self.url(0, path, false);
        let what = format!("DELETE {}", redact(&url));
        let resp = self
            .conditional_write(&what, path, &cond, || self.client.delete(url.clone()))
            .await?;
        write_status(&what, resp).await
    }

    async fn mkdir(&self, path: &str) -> StoreResult<()> {
        let url = self.url(0, path, true);
        let what = format!("MKCOL {}", redact(&url));
        let resp = self
            .send(&what, || {
                self.client
                    .request(Method::from_bytes(b"MKCOL").expect("a valid method"), url.clone())
            })
            .await?;
        match resp.status() {
            StatusCode::METHOD_NOT_ALLOWED => Err(StoreError::Conflict("exists".into())),
            _ => write_status(&what, resp).await,
        }
    }

    async fn rmdir(&self, path: &str) -> StoreResult<()> {
        // DELETE of a collection is recursive; rmdir is not.
        if self.has_children(path).await? {
            return Err(StoreError::Conflict("not_empty".into()));
        }
        let url = self.url(0, path, true);
        let what = format!("DELETE {}", redact(&url));
        let resp = self.send(&what, || self.client.delete(url.clone())).await?;
        write_status(&what, resp).await
    }

    async fn rename(&self, from: &str, to: &str, cond: WriteCondition) -> StoreResult<()> {
        let dir = match self.current(from).await? {
            None => return Err(StoreError::NotFound),
            Some(Head::Dir { .. }) => true,
            Some(Head::File(_)) => false,
        };
        match (dir, self.current(to).await?) {
            (true, Some(Head::File(_))) => return Err(StoreError::Conflict("not_dir".into())),
            (false, Some(Head::Dir { .. })) => return Err(StoreError::Conflict("is_dir".into())),
            // MOVE onto a collection replaces all of it; rename only replaces an empty one.
            (true, Some(Head::Dir { .. })) if self.has_children(to).await? => {
                return Err(StoreError::Conflict("not_empty".into()));
            }
            _ => {}
        }
        let url = self.url(0, from, dir);
        let mut dest = self.url(0, to, dir);
        let _ = dest.set_username("");
        let _ = dest.set_password(None);
        let what = format!("MOVE {} to {}", redact(&url), dest);
        let resp = self
            .conditional_write(&what, from, &cond, || {
                self.client
                    .request(Method::from_bytes(b"MOVE").expect("a valid method"), url.clone())
                    .header("Destination", dest.as_str())
                    .header("Overwrite", "T")
            })
            .await?;
        write_status(&what, resp).await
    }

    async fn append(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        let meta = self.partial_put(path, offset, body.clone(), cond).await?;
        if meta.size != offset + body.len() as u64 {
            return Err(StoreError::Protocol(format!(
                "{path}: {} bytes after an append ending at {}",
                meta.size,
                offset + body.len() as u64
            )));
        }
        Ok(meta)
    }

    async fn write_range(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        self.partial_put(path, offset, body, cond).await
    }
}

#[cfg(test)]
mod tests;
