//! Client of the built-in artifact server (`artifactfs serve`, `docs/PROTOCOL.md`).

use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use http::StatusCode;
use reqwest::Url;
use reqwest::header::{ACCEPT_ENCODING, CONTENT_LENGTH, ETAG, IF_MATCH, IF_NONE_MATCH, RANGE};

use super::http::{self as h, BearerToken, HttpConfig};
use super::{
    BundleFile, BundleStream, Capabilities, Digests, DirEntry, ETag, GetResponse, Head, Listing, ObjectMeta,
    PartReceipt, PartSource, Revalidated, Store, StoreError, StoreResult, UploadId, WriteCondition,
};
use crate::protocol::{self, DigestList, KIND_HEADER, ListPage, ServerInfo};

#[derive(Debug)]
pub struct ArtifactStore {
    id: String,
    /// Always ends with `/`.
    base: Url,
    client: reqwest::Client,
    cfg: HttpConfig,
    info: ServerInfo,
}

impl ArtifactStore {
    /// Connects to the server at `url` and checks that it speaks the protocol; `token` is sent
    /// with every request.
    pub async fn connect(url: &str, cfg: HttpConfig, token: Option<&BearerToken>) -> StoreResult<Self> {
        let id = h::base_url(url)?.1;
        Self::connect_if_artifact(url, cfg, token).await?.ok_or_else(|| {
            StoreError::Protocol(format!(
                "{id} is not an artifactfs server (no answer to ?afs=info; `--kind` names other kinds)"
            ))
        })
    }

    /// Connects to the server at `url` when it is an artifactfs server: `None` when it
    /// answers `?afs=info` with anything but the server's description (a plain web server).
    /// An artifactfs server that refuses the token (or its absence) is an error naming why.
    pub async fn connect_if_artifact(
        url: &str,
        cfg: HttpConfig,
        token: Option<&BearerToken>,
    ) -> StoreResult<Option<Self>> {
        /// An info answer is small; a web server may answer with a large index page instead.
        const INFO_MAX: usize = 64 << 10;
        let (base, id) = h::base_url(url)?;
        let headers = token.map(BearerToken::headers).unwrap_or_default();
        let client = h::build_client_with(&cfg, headers)?;
        let mut info_url = base.clone();
        info_url.set_query(Some("afs=info"));
        let what = format!("GET {id}/?afs=info");
        let resp = h::send(&cfg, &what, || client.get(info_url.clone())).await?;
        if let Some(refusal) = auth_refusal(&id, token.is_some(), &resp) {
            let body = resp.bytes().await.unwrap_or_default();
            return Err(refusal(&h::error_message(&body)));
        }
        if !resp.status().is_success() {
            tracing::debug!("{what}: HTTP {}: not an artifactfs server", resp.status());
            return Ok(None);
        }
        let mut body = Vec::new();
        let mut stream = resp.bytes_stream();
        while let Some(piece) = futures_util::StreamExt::next(&mut stream).await {
            body.extend_from_slice(&piece.map_err(|e| h::body_error(&what, &e))?);
            if body.len() > INFO_MAX {
                return Ok(None);
            }
        }
        let Ok(info) = serde_json::from_slice::<ServerInfo>(&body) else {
            return Ok(None);
        };
        if info.protocol != protocol::PROTOCOL {
            return Err(StoreError::Protocol(format!(
                "{id} speaks {}, this client speaks {}",
                info.protocol,
                protocol::PROTOCOL
            )));
        }
        let mut info = info;
        if token.is_some_and(BearerToken::is_read_only) {
            tracing::info!("the token allows reads only");
            let c = &mut info.capabilities;
            (c.writes, c.partial_writes, c.content_chunks) = (false, false, false);
        }
        let store = ArtifactStore {
            id,
            base,
            client,
            cfg,
            info,
        };
        if token.is_some() {
            // A token is checked for its scope on paths, not on `info`: ask for the mounted
            // folder now, so a token that does not reach it fails the mount, not the first `ls`.
            let url = store.url_for("", true);
            let what = format!("HEAD {url}");
            let resp = h::send(&store.cfg, &what, || store.client.head(url.clone())).await?;
            if let Some(refusal) = auth_refusal(&store.id, true, &resp) {
                return Err(refusal("the token does not reach this folder"));
            }
        }
        Ok(Some(store))
    }

    pub fn info(&self) -> &ServerInfo {
        &self.info
    }

    fn url_for(&self, path: &str, dir: bool) -> Url {
        h::join_url(&self.base, path, dir)
    }

    async fn fail(&self, what: &str, resp: reqwest::Response) -> StoreError {
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let err: Option<protocol::ErrorBody> = serde_json::from_slice(&body).ok();
        let code = err.as_ref().map(|e| e.code.as_str()).unwrap_or("");
        match (status, code) {
            (StatusCode::NOT_FOUND, "no_such_upload") => StoreError::NoSuchUpload,
            (StatusCode::NOT_FOUND, "unknown_chunk") => StoreError::UnknownChunk,
            (StatusCode::NOT_FOUND, _) => StoreError::NotFound,
            (StatusCode::PRECONDITION_FAILED, _) => StoreError::PreconditionFailed,
            (StatusCode::CONFLICT, "offset_mismatch") => StoreError::OffsetMismatch {
                size: serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["size"].as_u64())
                    .unwrap_or(0),
            },
            (StatusCode::CONFLICT, code) => StoreError::Conflict(code.to_string()),
            (StatusCode::RANGE_NOT_SATISFIABLE, _) => StoreError::RangeNotSatisfiable { size: None },
            (StatusCode::UNAUTHORIZED, _) | (StatusCode::FORBIDDEN, "out_of_scope") => StoreError::Refused {
                status: status.as_u16(),
                message: format!("{what}: the server refused the token: {}", h::error_message(&body)),
            },
            _ => StoreError::Refused {
                status: status.as_u16(),
                message: format!("{what}: {}", h::error_message(&body)),
            },
        }
    }

    fn op_url(&self, path: &str, dir: bool, op: &str, params: &[(&str, &str)]) -> Url {
        let mut url = self.url_for(path, dir);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair(protocol::QUERY_KEY, op);
            for (k, v) in params {
                q.append_pair(k, v);
            }
        }
        url
    }

    /// Sends a write and reads its answer: a [`protocol::WriteResult`] as an [`ObjectMeta`]
    /// for writes that make a version, `None` for those that answer without a body.
    async fn write(
        &self,
        what: String,
        cond: &WriteCondition,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> StoreResult<Option<ObjectMeta>> {
        let resp = h::send(&self.cfg, &what, || with_condition(make(), cond)).await?;
        match resp.status() {
            StatusCode::NO_CONTENT => Ok(None),
            s if s.is_success() => {
                let body = resp.bytes().await.map_err(|e| h::body_error(&what, &e))?;
                if body.is_empty() {
                    return Ok(None);
                }
                let r: protocol::WriteResult =
                    serde_json::from_slice(&body).map_err(|e| StoreError::Protocol(format!("{what}: {e}")))?;
                Ok(Some(ObjectMeta {
                    size: r.size,
                    mtime: mtime_from_ns(r.mtime_ns),
                    etag: Some(ETag::from_bare(&r.etag)),
                    max_age: None,
                }))
            }
            _ => Err(self.fail(&what, resp).await),
        }
    }

    async fn write_version(
        &self,
        what: String,
        cond: &WriteCondition,
        make: impl Fn() -> reqwest::RequestBuilder,
    ) -> StoreResult<ObjectMeta> {
        let w = what.clone();
        self.write(what, cond, make)
            .await?
            .ok_or_else(|| StoreError::Protocol(format!("{w}: no version in the answer")))
    }

    async fn json<T: serde::de::DeserializeOwned>(&self, what: &str, resp: reqwest::Response) -> StoreResult<T> {
        if !resp.status().is_success() {
            return Err(self.fail(what, resp).await);
        }
        let body = resp.bytes().await.map_err(|e| h::body_error(what, &e))?;
        serde_json::from_slice(&body).map_err(|e| StoreError::Protocol(format!("{what}: {e}")))
    }

    async fn list_page(
        &self,
        dir: &str,
        after: Option<&str>,
        validator: Option<&str>,
    ) -> StoreResult<Revalidated<(ListPage, Option<String>, Option<Duration>)>> {
        let mut url = self.url_for(dir, true);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair(protocol::QUERY_KEY, "list");
            q.append_pair(
                "limit",
                &self.info.max_list_limit.min(protocol::LIST_MAX_LIMIT).to_string(),
            );
            if let Some(a) = after {
                q.append_pair("after", a);
            }
        }
        let what = format!("GET {url}");
        let resp = h::send(&self.cfg, &what, || {
            let mut r = self.client.get(url.clone());
            if let Some(v) = validator {
                r = r.header(IF_NONE_MATCH, v);
            }
            r
        })
        .await?;
        match resp.status() {
            StatusCode::NOT_MODIFIED => return Ok(Revalidated::NotModified),
            StatusCode::OK => {}
            _ => return Err(self.fail(&what, resp).await),
        }
        let etag = h::header_str(resp.headers(), ETAG.as_str()).map(str::to_string);
        let max_age = h::parse_max_age(resp.headers());
        let body = resp.bytes().await.map_err(|e| h::body_error(&what, &e))?;
        let page: ListPage = serde_json::from_slice(&body).map_err(|e| StoreError::Protocol(format!("{what}: {e}")))?;
        Ok(Revalidated::Modified((page, etag, max_age)))
    }
}

/// The files of a bundle body: a JSON header line, then that many bytes, again and again
/// (`docs/PROTOCOL.md`). A body cut inside a record ends with an error after the whole
/// records before it.
fn bundle_files(what: String, body: BoxStream<'static, StoreResult<Bytes>>) -> BundleStream {
    struct State {
        body: BoxStream<'static, StoreResult<Bytes>>,
        buf: bytes::BytesMut,
        header: Option<protocol::BundleHeader>,
        what: String,
        done: bool,
    }
    type Item = (StoreResult<BundleFile>, State);
    fn fail(mut s: State, e: StoreError) -> Option<Item> {
        s.done = true;
        Some((Err(e), s))
    }
    fn bad(s: State, why: &str) -> Option<Item> {
        let e = StoreError::Protocol(format!("{}: {why}", s.what));
        fail(s, e)
    }
    let state = State {
        body,
        buf: bytes::BytesMut::new(),
        header: None,
        what,
        done: false,
    };
    futures_util::stream::unfold(state, |mut s| async move {
        while !s.done {
            match s.header.take() {
                None => {
                    if let Some(nl) = s.buf.iter().position(|&b| b == b'\n') {
                        let line = s.buf.split_to(nl + 1);
                        match serde_json::from_slice::<protocol::BundleHeader>(&line[..nl]) {
                            Ok(h) if h.size <= protocol::BUNDLE_MAX_FILE => s.header = Some(h),
                            Ok(h) => return bad(s, &format!("a bundle file of {} bytes", h.size)),
                            Err(e) => return bad(s, &format!("bad bundle header: {e}")),
                        }
                        continue;
                    }
                    if s.buf.len() > 64 << 10 {
                        return bad(s, "bundle header line too long");
                    }
                }
                Some(h) if s.buf.len() as u64 >= h.size => {
                    let data = s.buf.split_to(h.size as usize).freeze();
                    let file = BundleFile {
                        name: h.name,
                        etag: ETag::from_bare(&h.etag),
                        data,
                    };
                    return Some((Ok(file), s));
                }
                Some(h) => s.header = Some(h),
            }
            match s.body.next().await {
                Some(Ok(piece)) => s.buf.extend_from_slice(&piece),
                Some(Err(e)) => return fail(s, e),
                None if s.header.is_none() && s.buf.is_empty() => return None,
                None => return bad(s, "bundle body cut inside a file"),
            }
        }
        None
    })
    .boxed()
}

fn with_condition(r: reqwest::RequestBuilder, cond: &WriteCondition) -> reqwest::RequestBuilder {
    match cond {
        WriteCondition::None => r,
        WriteCondition::Matches(t) => r.header(IF_MATCH, t.as_str()),
        WriteCondition::Absent => r.header(IF_NONE_MATCH, "*"),
    }
}

/// A path as the `to=` of a move: the request path form, leading slash included.
fn dest_param(path: &str) -> String {
    format!("/{}", path.trim_start_matches('/'))
}

fn mtime_from_ns(ns: i64) -> SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn meta_from_headers(headers: &reqwest::header::HeaderMap, size: u64) -> ObjectMeta {
    ObjectMeta {
        size,
        mtime: h::parse_last_modified(headers).unwrap_or(UNIX_EPOCH),
        etag: h::header_str(headers, ETAG.as_str()).map(ETag::new),
        max_age: h::parse_max_age(headers),
    }
}

#[async_trait]
impl Store for ArtifactStore {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> crate::store::StoreKind {
        crate::store::StoreKind::Artifact
    }

    fn capabilities(&self) -> Capabilities {
        let c = self.info.capabilities;
        Capabilities {
            ranged_reads: c.ranges,
            listing_etags: c.listing_etags,
            digest_chunk_size: c.digests.then_some(self.info.chunk_size),
            etags_from_digests: c.digests,
            writes: c.writes,
            partial_writes: c.partial_writes,
            server_side_copy: c.writes,
            rename: c.writes,
            content_chunks: c.content_chunks,
            min_part_size: 0,
            max_parts: 10_000,
            complete_listings: true,
            bundles: c.bundles,
        }
    }

    async fn list(&self, dir: &str, validator: Option<&str>) -> StoreResult<Revalidated<Listing>> {
        let mut entries = Vec::new();
        let mut after: Option<String> = None;
        let mut first_validator = None;
        let mut pages = 0;
        let mut max_age = None;
        loop {
            // Only a one-page listing can be revalidated as a whole.
            let cond = if pages == 0 { validator } else { None };
            let (page, etag, age) = match self.list_page(dir, after.as_deref(), cond).await? {
                Revalidated::NotModified => return Ok(Revalidated::NotModified),
                Revalidated::Modified(p) => p,
            };
            if pages == 0 {
                first_validator = etag;
                max_age = age;
            }
            pages += 1;
            entries.extend(page.entries.into_iter().map(|e| DirEntry {
                name: e.name,
                kind: e.kind,
                size: e.size,
                mtime: mtime_from_ns(e.mtime_ns),
                etag: e.etag.as_deref().map(ETag::from_bare),
            }));
            match page.next {
                Some(n) if after.as_deref() != Some(n.as_str()) => after = Some(n),
                _ => break,
            }
        }
        Ok(Revalidated::Modified(Listing {
            entries,
            validator: if pages == 1 { first_validator } else { None },
            max_age,
        }))
    }

    async fn head(&self, path: &str, if_none_match: Option<&ETag>) -> StoreResult<Revalidated<Head>> {
        let url = self.url_for(path, false);
        let what = format!("HEAD {url}");
        let resp = h::send(&self.cfg, &what, || {
            let mut r = self.client.head(url.clone());
            if let Some(t) = if_none_match {
                r = r.header(IF_NONE_MATCH, t.as_str());
            }
            r
        })
        .await?;
        match resp.status() {
            StatusCode::NOT_MODIFIED => return Ok(Revalidated::NotModified),
            StatusCode::OK => {}
            _ => return Err(self.fail(&what, resp).await),
        }
        let headers = resp.headers();
        if h::header_str(headers, KIND_HEADER) == Some("dir") {
            return Ok(Revalidated::Modified(Head::Dir {
                mtime: h::parse_last_modified(headers).unwrap_or(UNIX_EPOCH),
            }));
        }
        let size = h::header_str(headers, CONTENT_LENGTH.as_str())
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| StoreError::Protocol(format!("{what}: no Content-Length")))?;
        Ok(Revalidated::Modified(Head::File(meta_from_headers(headers, size))))
    }

    async fn get(&self, path: &str, range: Option<Range<u64>>, if_match: Option<&ETag>) -> StoreResult<GetResponse> {
        let url = self.url_for(path, false);
        let what = match &range {
            Some(r) => format!("GET {url} [{}-{})", r.start, r.end),
            None => format!("GET {url}"),
        };
        if let Some(r) = &range
            && r.is_empty()
        {
            return Err(StoreError::Protocol(format!("{what}: empty range requested")));
        }
        let resp = h::send(&self.cfg, &what, || {
            let mut r = self.client.get(url.clone()).header(ACCEPT_ENCODING, "identity");
            if let Some(rg) = &range {
                r = r.header(RANGE, h::range_header(rg));
            }
            if let Some(t) = if_match {
                r = r.header(IF_MATCH, t.as_str());
            }
            r
        })
        .await?;
        let Some(content) = h::content_of(&what, &resp)? else {
            return Err(self.fail(&what, resp).await);
        };
        let etag = h::header_str(resp.headers(), ETAG.as_str()).map(ETag::new);
        let body = h::body_stream(what, resp);
        Ok(GetResponse { etag, content, body })
    }

    async fn bundle(
        &self,
        dir: &str,
        after: Option<&str>,
        max_file: u64,
        max_total: u64,
    ) -> StoreResult<Option<BundleStream>> {
        if !self.info.capabilities.bundles {
            return Ok(None);
        }
        let mut url = self.url_for(dir, true);
        {
            let mut q = url.query_pairs_mut();
            q.append_pair(protocol::QUERY_KEY, "bundle");
            q.append_pair("max_file", &max_file.to_string());
            q.append_pair("max_total", &max_total.to_string());
            if let Some(a) = after {
                q.append_pair("after", a);
            }
        }
        let what = format!("GET {url}");
        let resp = h::send(&self.cfg, &what, || {
            self.client.get(url.clone()).header(ACCEPT_ENCODING, "identity")
        })
        .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.fail(&what, resp).await);
        }
        Ok(Some(bundle_files(what.clone(), h::body_stream(what, resp))))
    }

    async fn digests(&self, path: &str, etag: &ETag) -> StoreResult<Option<Digests>> {
        if !self.info.capabilities.digests {
            return Ok(None);
        }
        let mut url = self.url_for(path, false);
        url.query_pairs_mut().append_pair(protocol::QUERY_KEY, "digests");
        let what = format!("GET {url}");
        let resp = h::send(&self.cfg, &what, || {
            self.client.get(url.clone()).header(IF_MATCH, etag.as_str())
        })
        .await?;
        if resp.status() != StatusCode::OK {
            return Err(self.fail(&what, resp).await);
        }
        let body = resp.bytes().await.map_err(|e| h::body_error(&what, &e))?;
        let list: DigestList =
            serde_json::from_slice(&body).map_err(|e| StoreError::Protocol(format!("{what}: {e}")))?;
        if ETag::from_bare(&list.etag) != *etag {
            return Err(StoreError::PreconditionFailed);
        }
        let digests = list
            .digests
            .iter()
            .map(|d| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(d, &mut out).map(|_| out)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Protocol(format!("{what}: bad digest: {e}")))?;
        let expect = list.size.div_ceil(list.chunk_size.max(1));
        if list.chunk_size == 0 || digests.len() as u64 != expect {
            return Err(StoreError::Protocol(format!(
                "{what}: {} digests for {} bytes",
                digests.len(),
                list.size
            )));
        }
        let crc32c = match &list.crc32c {
            None => None,
            Some(sums) => Some(
                sums.iter()
                    .map(|c| match c.len() {
                        8 => u32::from_str_radix(c, 16).ok(),
                        _ => None,
                    })
                    .collect::<Option<Vec<u32>>>()
                    .filter(|s| s.len() == digests.len())
                    .ok_or_else(|| StoreError::Protocol(format!("{what}: bad crc32c list")))?,
            ),
        };
        Ok(Some(Digests {
            chunk_size: list.chunk_size,
            digests,
            crc32c,
        }))
    }

    async fn put(&self, path: &str, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        let url = self.url_for(path, false);
        let what = format!("PUT {url} ({} bytes)", body.len());
        self.write_version(what, &cond, || self.client.put(url.clone()).body(body.clone()))
            .await
    }

    async fn delete(&self, path: &str, cond: WriteCondition) -> StoreResult<()> {
        let url = self.url_for(path, false);
        self.write(format!("DELETE {url}"), &cond, || self.client.delete(url.clone()))
            .await
            .map(drop)
    }

    async fn mkdir(&self, path: &str) -> StoreResult<()> {
        let url = self.op_url(path, true, "mkdir", &[]);
        self.write(format!("POST {url}"), &WriteCondition::None, || {
            self.client.post(url.clone())
        })
        .await
        .map(drop)
    }

    async fn rmdir(&self, path: &str) -> StoreResult<()> {
        let url = self.url_for(path, true);
        self.write(format!("DELETE {url}"), &WriteCondition::None, || {
            self.client.delete(url.clone())
        })
        .await
        .map(drop)
    }

    async fn rename(&self, from: &str, to: &str, cond: WriteCondition) -> StoreResult<()> {
        let dest = dest_param(to);
        let url = self.op_url(from, false, "move", &[("to", &dest)]);
        self.write(format!("POST {url}"), &cond, || self.client.post(url.clone()))
            .await
            .map(drop)
    }

    async fn append(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        let url = self.op_url(path, false, "append", &[("offset", &offset.to_string())]);
        let what = format!("POST {url} ({} bytes)", body.len());
        self.write_version(what, &cond, || self.client.post(url.clone()).body(body.clone()))
            .await
    }

    async fn write_range(&self, path: &str, offset: u64, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        let url = self.op_url(path, false, "write", &[("offset", &offset.to_string())]);
        let what = format!("POST {url} ({} bytes)", body.len());
        self.write_version(what, &cond, || self.client.post(url.clone()).body(body.clone()))
            .await
    }

    async fn truncate(&self, path: &str, size: u64, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        let url = self.op_url(path, false, "truncate", &[("size", &size.to_string())]);
        self.write_version(format!("POST {url}"), &cond, || self.client.post(url.clone()))
            .await
    }

    async fn chunks(&self, path: &str, etag: &ETag) -> StoreResult<Vec<protocol::CdcChunk>> {
        let url = self.op_url(path, false, "chunks", &[]);
        let what = format!("GET {url}");
        let resp = h::send(&self.cfg, &what, || {
            self.client.get(url.clone()).header(IF_MATCH, etag.as_str())
        })
        .await?;
        let list: protocol::ChunkList = self.json(&what, resp).await?;
        if ETag::from_bare(&list.etag) != *etag {
            return Err(StoreError::PreconditionFailed);
        }
        Ok(list.chunks)
    }

    async fn has_chunks(&self, hashes: &[[u8; 32]]) -> StoreResult<Vec<bool>> {
        let url = self.op_url("", true, "has-chunks", &[]);
        let what = format!("POST {url}");
        let mut out = Vec::with_capacity(hashes.len());
        for batch in hashes.chunks(10_000) {
            let req = protocol::HasChunksRequest {
                chunks: batch.iter().map(hex::encode).collect(),
            };
            let body = serde_json::to_vec(&req).map_err(|e| StoreError::Protocol(e.to_string()))?;
            let resp = h::send(&self.cfg, &what, || {
                self.client
                    .post(url.clone())
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body.clone())
            })
            .await?;
            let answer: protocol::HasChunksAnswer = self.json(&what, resp).await?;
            if answer.have.len() != batch.len() {
                return Err(StoreError::Protocol(format!(
                    "{what}: {} answers for {} hashes",
                    answer.have.len(),
                    batch.len()
                )));
            }
            out.extend(answer.have);
        }
        Ok(out)
    }

    async fn begin_upload(&self, path: &str, base: Option<ETag>) -> StoreResult<UploadId> {
        let url = self.op_url(path, false, "upload", &[]);
        let what = format!("POST {url}");
        let cond = base.map(WriteCondition::Matches).unwrap_or(WriteCondition::None);
        let resp = h::send(&self.cfg, &what, || {
            with_condition(self.client.post(url.clone()), &cond)
        })
        .await?;
        let started: protocol::UploadStarted = self.json(&what, resp).await?;
        Ok(UploadId {
            path: path.to_string(),
            id: started.upload,
        })
    }

    async fn upload_part(
        &self,
        id: &UploadId,
        number: u32,
        src: PartSource,
        at: Option<u64>,
    ) -> StoreResult<PartReceipt> {
        let n = number.to_string();
        let mut params = vec![("upload", id.id.clone()), ("part", n)];
        if let Some(at) = at {
            params.push(("offset", at.to_string()));
        }
        let body = match &src {
            PartSource::Bytes(b) => b.clone(),
            PartSource::CopyFromBase(r) => {
                if r.is_empty() {
                    return Err(StoreError::Protocol("an empty copy range".into()));
                }
                params.push(("copy", format!("{}-{}", r.start, r.end - 1)));
                Bytes::new()
            }
            PartSource::Chunk(hash) => {
                params.push(("chunk", hex::encode(hash)));
                Bytes::new()
            }
        };
        let pairs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let url = self.op_url(&id.path, false, "part", &pairs);
        let what = format!("PUT {url} ({} bytes)", body.len());
        let resp = h::send(&self.cfg, &what, || self.client.put(url.clone()).body(body.clone())).await?;
        let stored: protocol::PartStored = self.json(&what, resp).await?;
        Ok(PartReceipt {
            number: stored.part,
            tag: stored.tag,
            len: stored.size,
        })
    }

    async fn commit_upload(
        &self,
        id: &UploadId,
        parts: Vec<PartReceipt>,
        cond: WriteCondition,
    ) -> StoreResult<ObjectMeta> {
        let url = self.op_url(&id.path, false, "commit", &[("upload", &id.id)]);
        let req = protocol::CommitRequest {
            parts: parts
                .iter()
                .map(|p| protocol::PartRef {
                    part: p.number,
                    tag: p.tag.clone(),
                })
                .collect(),
        };
        let body = Bytes::from(serde_json::to_vec(&req).map_err(|e| StoreError::Protocol(e.to_string()))?);
        self.write_version(format!("POST {url}"), &cond, || {
            self.client
                .post(url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body.clone())
        })
        .await
    }

    async fn abort_upload(&self, id: &UploadId) -> StoreResult<()> {
        let url = self.op_url(&id.path, false, "upload", &[("upload", &id.id)]);
        self.write(format!("DELETE {url}"), &WriteCondition::None, || {
            self.client.delete(url.clone())
        })
        .await
        .map(drop)
    }
}

/// When `resp` is the built-in server refusing a request for want of a valid token (`401`
/// with `WWW-Authenticate: Bearer`) or for a token that does not allow it (`403`): the error
/// to report, given the server's reason. The token itself is never part of it.
fn auth_refusal(
    id: &str,
    sent_token: bool,
    resp: &reqwest::Response,
) -> Option<impl FnOnce(&str) -> StoreError + use<>> {
    let status = resp.status();
    let bearer = resp
        .headers()
        .get(reqwest::header::WWW_AUTHENTICATE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("bearer"));
    let hint = "give one with --token-file FILE, ARTIFACTFS_TOKEN or `token` in [auth]";
    let id = id.to_string();
    let make = move |reason: &str| -> String {
        match (status.as_u16(), sent_token) {
            (401, false) => format!("{id} requires a token ({reason}); {hint}"),
            (401, true) => format!("{id} refused the token: {reason}"),
            _ => format!("{id} refused the token (403 forbidden): {reason}"),
        }
    };
    let refused = match status {
        StatusCode::UNAUTHORIZED => bearer,
        StatusCode::FORBIDDEN => sent_token,
        _ => false,
    };
    refused.then_some(move |reason: &str| StoreError::Refused {
        status: status.as_u16(),
        message: make(reason),
    })
}
