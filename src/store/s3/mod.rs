//! The S3 remote (`s3://BUCKET/PREFIX`): AWS S3 and S3-compatible servers, through the
//! official SDK (signing, credentials, protocol) over our reqwest/rustls client.
//!
//! How the [`Store`] trait maps onto S3:
//! - `list`: `ListObjectsV2` with the `/` delimiter, all pages; keys that cannot be file
//!   names follow the rule in `keys.rs`. No ETags are relied on in listings
//!   (`listing_etags: false`; S3-compatible servers such as s3s-fs leave them out).
//! - `head`: `HeadObject`; when there is no such object, a folder is a prefix with at least
//!   one key under it (`ListObjectsV2 max-keys=1`), never a listing of the whole prefix.
//! - `get`: ranged `GetObject` with `If-Match`; the response's ETag is handed back so the
//!   engine catches servers that ignore `If-Match`.
//! - writes: `PutObject`, and upload sessions as multipart uploads (`multipart.rs`) whose
//!   copied ranges are `UploadPartCopy` from the base version; commits carry `If-Match` /
//!   `If-None-Match: *` (or, with `conditional_writes = false`, a `HEAD` check just before).
//! - `mkdir` puts the marker object `dir/`, `rmdir` deletes it (refused while keys remain);
//!   `rename` of a file is `CopyObject` + `DeleteObject` (not atomic, see docs/S3.md);
//!   folders cannot be renamed.

pub mod client;
pub mod config;
mod connector;
pub mod error;
pub mod keys;
mod multipart;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use async_trait::async_trait;
use aws_sdk_s3::primitives::ByteStream;
use bytes::Bytes;
use futures_util::StreamExt;
use parking_lot::Mutex;

pub use self::config::{AddressingStyle, S3Config, S3Url};
use self::error::map;
use self::keys::{Keys, Listed};
use super::http::{HttpConfig, parse_content_range};
use super::{
    Capabilities, Content, DirEntry, ETag, EntryKind, GetResponse, Head, Listing, ObjectMeta, PartReceipt, PartSource,
    Revalidated, Store, StoreError, StoreResult, UploadId, WriteCondition,
};

/// S3's limits on multipart uploads.
pub const MIN_PART: u64 = 5 << 20;
pub const MAX_PART: u64 = 5 << 30;
pub const MAX_PARTS: u32 = 10_000;

#[derive(Debug)]
pub struct S3Store {
    id: String,
    bucket: String,
    keys: Keys,
    client: aws_sdk_s3::Client,
    cfg: S3Config,
    /// The base version of each open upload session (the source of its copied ranges).
    uploads: Mutex<HashMap<String, Option<ETag>>>,
    /// Whether `DeleteObject` is sent with `If-Match`; cleared when the server answers that
    /// it does not implement it (the `HEAD` check before the delete remains).
    delete_if_match: AtomicBool,
}

fn to_system_time(t: Option<&aws_sdk_s3::primitives::DateTime>) -> SystemTime {
    t.and_then(|d| SystemTime::try_from(*d).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn etag_of(t: Option<&str>) -> Option<ETag> {
    t.filter(|t| !t.is_empty()).map(ETag::new)
}

impl S3Store {
    /// Opens `s3://BUCKET/PREFIX` with the standard credential chain, and checks that the
    /// bucket can be listed (so a wrong endpoint, bucket or key fails the mount with the
    /// reason).
    pub async fn connect(url: &str, cfg: &S3Config, http: &HttpConfig) -> StoreResult<Self> {
        Self::connect_with(url, cfg, http, None).await
    }

    /// As [`connect`](Self::connect), with fixed credentials instead of the chain.
    pub async fn connect_with(
        url: &str,
        cfg: &S3Config,
        http: &HttpConfig,
        credentials: Option<aws_sdk_s3::config::Credentials>,
    ) -> StoreResult<Self> {
        let u = S3Url::parse(url)?;
        let client = client::build(cfg, http, credentials).await?;
        let store = S3Store {
            id: u.id(),
            bucket: u.bucket.clone(),
            keys: Keys::new(&u.prefix),
            client,
            cfg: cfg.clone(),
            uploads: Mutex::new(HashMap::new()),
            delete_if_match: AtomicBool::new(cfg.conditional_writes),
        };
        store
            .client
            .list_objects_v2()
            .bucket(&store.bucket)
            .prefix(&u.prefix)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| map("ListObjectsV2", &format!("s3://{}/{}", u.bucket, u.prefix), e))?;
        tracing::info!(
            remote = %store.id,
            endpoint = cfg.endpoint_url.as_deref().unwrap_or("AWS"),
            path_style = cfg.path_style(),
            server_side_copy = cfg.server_side_copy,
            conditional_writes = cfg.conditional_writes,
            "S3 remote"
        );
        if !cfg.server_side_copy {
            tracing::info!("server_side_copy = false: a changed file is uploaded whole (no UploadPartCopy)");
        }
        if !cfg.conditional_writes {
            tracing::info!(
                "conditional_writes = false: uploads check the version with a HEAD just before they commit \
                 (a write by someone else in between is overwritten)"
            );
        }
        Ok(store)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `HeadObject` of `key` as a file version.
    async fn head_object(&self, key: &str) -> StoreResult<ObjectMeta> {
        let out = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| map("HeadObject", key, e))?;
        Ok(ObjectMeta {
            size: out.content_length().unwrap_or(0).max(0) as u64,
            mtime: to_system_time(out.last_modified()),
            etag: etag_of(out.e_tag()),
            max_age: None,
        })
    }

    /// Whether at least one key lies under the folder `path` (its marker counts).
    async fn has_keys_under(&self, path: &str) -> StoreResult<bool> {
        let prefix = self.keys.dir(path);
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&prefix)
            .max_keys(1)
            .send()
            .await
            .map_err(|e| map("ListObjectsV2", &prefix, e))?;
        Ok(!out.contents().is_empty() || !out.common_prefixes().is_empty())
    }

    /// The weaker check used without conditional writes: the current version, by `HEAD`,
    /// meets `cond`.
    async fn check_by_head(&self, key: &str, cond: &WriteCondition) -> StoreResult<()> {
        let current = match self.head_object(key).await {
            Ok(m) => Some(m),
            Err(StoreError::NotFound) => None,
            Err(e) => return Err(e),
        };
        meets(cond, current.as_ref())
    }

    /// The `x-amz-copy-source` of `key` in this bucket.
    fn copy_source(&self, key: &str) -> String {
        use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
        const KEEP: &AsciiSet = &NON_ALPHANUMERIC
            .remove(b'-')
            .remove(b'_')
            .remove(b'.')
            .remove(b'~')
            .remove(b'/');
        format!("{}/{}", self.bucket, utf8_percent_encode(key, KEEP))
    }
}

/// Whether the version `current` (None: nothing there) meets `cond`.
fn meets(cond: &WriteCondition, current: Option<&ObjectMeta>) -> StoreResult<()> {
    match (cond, current) {
        (WriteCondition::None, _) | (WriteCondition::Absent, None) => Ok(()),
        (WriteCondition::Matches(t), Some(m)) if m.etag.as_ref() == Some(t) => Ok(()),
        _ => Err(StoreError::PreconditionFailed),
    }
}

/// A write under `If-Match` that finds no object failed its precondition (AWS answers 404):
/// the version it was based on is gone, which the engine must treat as a conflict.
fn conditional(cond: &WriteCondition, e: StoreError) -> StoreError {
    match (cond, e) {
        (WriteCondition::Matches(_), StoreError::NotFound) => StoreError::PreconditionFailed,
        (_, e) => e,
    }
}

#[async_trait]
impl Store for S3Store {
    fn id(&self) -> &str {
        &self.id
    }

    fn kind(&self) -> crate::store::StoreKind {
        crate::store::StoreKind::S3
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            ranged_reads: true,
            listing_etags: false,
            digest_chunk_size: None,
            etags_from_digests: false,
            writes: true,
            partial_writes: false,
            server_side_copy: self.cfg.server_side_copy,
            rename: true,
            content_chunks: false,
            min_part_size: MIN_PART,
            max_parts: MAX_PARTS,
            complete_listings: true,
            bundles: false,
        }
    }

    async fn list(&self, dir: &str, validator: Option<&str>) -> StoreResult<Revalidated<Listing>> {
        let prefix = self.keys.dir(dir);
        let mut files: BTreeMap<String, DirEntry> = BTreeMap::new();
        let mut dirs: BTreeSet<String> = BTreeSet::new();
        let mut any = false;
        let mut token: Option<String> = None;
        loop {
            let out = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .delimiter("/")
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|e| map("ListObjectsV2", &prefix, e))?;
            for o in out.contents() {
                any = true;
                let key = o.key().unwrap_or("");
                match keys::object_name(&prefix, key) {
                    Listed::Name(n) => {
                        files.insert(
                            n.to_string(),
                            DirEntry {
                                name: n.to_string(),
                                kind: EntryKind::File,
                                size: o.size().unwrap_or(0).max(0) as u64,
                                mtime: to_system_time(o.last_modified()),
                                etag: etag_of(o.e_tag()),
                            },
                        );
                    }
                    Listed::Marker => {}
                    Listed::Hidden(why) => tracing::warn!(remote = %self.id, key, "S3 key left out: it {why}"),
                }
            }
            for p in out.common_prefixes() {
                any = true;
                let common = p.prefix().unwrap_or("");
                match keys::prefix_name(&prefix, common) {
                    Listed::Name(n) => {
                        dirs.insert(n.to_string());
                    }
                    Listed::Marker => {}
                    Listed::Hidden(why) => {
                        tracing::warn!(remote = %self.id, prefix = common, "S3 keys left out: the prefix {why}")
                    }
                }
            }
            match (out.is_truncated(), out.next_continuation_token()) {
                (Some(true), Some(t)) if !t.is_empty() => token = Some(t.to_string()),
                (Some(true), _) => {
                    return Err(StoreError::Protocol(format!(
                        "ListObjectsV2 {prefix}: truncated listing without a continuation token"
                    )));
                }
                _ => break,
            }
        }
        if !any && !dir.is_empty() {
            return Err(StoreError::NotFound);
        }
        for d in dirs {
            if files.contains_key(&d) {
                tracing::warn!(
                    remote = %self.id,
                    name = %d,
                    "S3 keys under {}{d}/ left out: {}",
                    prefix,
                    keys::Hidden::ShadowedByFile
                );
                continue;
            }
            files.insert(
                d.clone(),
                DirEntry {
                    name: d,
                    kind: EntryKind::Dir,
                    size: 0,
                    mtime: SystemTime::UNIX_EPOCH,
                    etag: None,
                },
            );
        }
        let entries: Vec<DirEntry> = files.into_values().collect();
        // S3 has no conditional listing; a digest of what was listed still tells the engine
        // that nothing changed.
        let mut h = blake3::Hasher::new();
        for e in &entries {
            h.update(e.name.as_bytes());
            h.update(&[0, e.kind as u8]);
            h.update(&e.size.to_le_bytes());
            let t = e.mtime.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
            h.update(&t.as_nanos().to_le_bytes());
            if let Some(t) = &e.etag {
                h.update(t.as_str().as_bytes());
            }
        }
        let v = h.finalize().to_hex().to_string();
        if validator == Some(v.as_str()) {
            return Ok(Revalidated::NotModified);
        }
        Ok(Revalidated::Modified(Listing {
            entries,
            validator: Some(v),
            max_age: None,
        }))
    }

    async fn head(&self, path: &str, if_none_match: Option<&ETag>) -> StoreResult<Revalidated<Head>> {
        if path.is_empty() {
            return Ok(Revalidated::Modified(Head::Dir {
                mtime: SystemTime::UNIX_EPOCH,
            }));
        }
        // The object first: a name that is both an object and a prefix is the file (keys.rs),
        // and a file costs one request.
        match self.head_object(&self.keys.object(path)).await {
            Ok(meta) => {
                // Compared here: not every server honours conditional HEADs.
                if if_none_match.is_some() && meta.etag.as_ref() == if_none_match {
                    return Ok(Revalidated::NotModified);
                }
                Ok(Revalidated::Modified(Head::File(meta)))
            }
            Err(StoreError::NotFound) => {
                if self.has_keys_under(path).await? {
                    Ok(Revalidated::Modified(Head::Dir {
                        mtime: SystemTime::UNIX_EPOCH,
                    }))
                } else {
                    Err(StoreError::NotFound)
                }
            }
            Err(e) => Err(e),
        }
    }

    async fn get(&self, path: &str, range: Option<Range<u64>>, if_match: Option<&ETag>) -> StoreResult<GetResponse> {
        let key = self.keys.object(path);
        let mut req = self.client.get_object().bucket(&self.bucket).key(&key);
        if let Some(r) = &range {
            if r.is_empty() {
                return Err(StoreError::RangeNotSatisfiable { size: None });
            }
            req = req.range(format!("bytes={}-{}", r.start, r.end - 1));
        }
        if let Some(t) = if_match {
            req = req.if_match(t.as_str());
        }
        let out = req.send().await.map_err(|e| map("GetObject", &key, e))?;
        let content = match out.content_range() {
            Some(cr) => {
                let (range, total) = parse_content_range(cr)
                    .ok_or_else(|| StoreError::Protocol(format!("GetObject {key}: bad Content-Range {cr:?}")))?;
                Content::Partial { range, total }
            }
            None => Content::Whole {
                size: out.content_length().map(|n| n.max(0) as u64),
            },
        };
        let etag = etag_of(out.e_tag());
        let what = format!("GetObject {key}");
        let body = futures_util::stream::unfold(Some(out.body), move |body| {
            let what = what.clone();
            async move {
                let mut body = body?;
                match body.next().await {
                    None => None,
                    Some(Ok(b)) => Some((Ok(b), Some(body))),
                    Some(Err(e)) => Some((Err(StoreError::BodyCut(super::http::error_chain(&what, &e))), None)),
                }
            }
        })
        .boxed();
        Ok(GetResponse { etag, content, body })
    }

    async fn put(&self, path: &str, body: Bytes, cond: WriteCondition) -> StoreResult<ObjectMeta> {
        let key = self.keys.object(path);
        if !self.cfg.conditional_writes {
            self.check_by_head(&key, &cond).await?;
        }
        let size = body.len() as u64;
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&key)
            .content_length(size as i64)
            .body(ByteStream::from(body));
        if self.cfg.conditional_writes {
            match &cond {
                WriteCondition::None => {}
                WriteCondition::Matches(t) => req = req.if_match(t.as_str()),
                WriteCondition::Absent => req = req.if_none_match("*"),
            }
        }
        let out = req
            .send()
            .await
            .map_err(|e| conditional(&cond, map("PutObject", &key, e)))?;
        Ok(ObjectMeta {
            size,
            mtime: SystemTime::now(),
            etag: etag_of(out.e_tag()),
            max_age: None,
        })
    }

    async fn delete(&self, path: &str, cond: WriteCondition) -> StoreResult<()> {
        let key = self.keys.object(path);
        // S3 answers a delete of nothing with success: the HEAD gives `NotFound`, and checks
        // the version on servers that ignore `If-Match` on deletes.
        let current = self.head_object(&key).await?;
        meets(&cond, Some(&current))?;
        let if_match = match &cond {
            WriteCondition::Matches(t) if self.delete_if_match.load(Ordering::Relaxed) => Some(t.clone()),
            _ => None,
        };
        let send = |t: Option<ETag>| {
            self.client
                .delete_object()
                .bucket(&self.bucket)
                .key(&key)
                .set_if_match(t.map(|t| t.as_str().to_string()))
                .send()
        };
        match send(if_match.clone()).await {
            Ok(_) => Ok(()),
            Err(e) => match map("DeleteObject", &key, e) {
                StoreError::Unsupported(_) if if_match.is_some() => {
                    tracing::info!(
                        remote = %self.id,
                        "the server does not take If-Match on DeleteObject: deletes are checked by HEAD only"
                    );
                    self.delete_if_match.store(false, Ordering::Relaxed);
                    send(None).await.map(|_| ()).map_err(|e| map("DeleteObject", &key, e))
                }
                e => Err(conditional(&cond, e)),
            },
        }
    }

    async fn mkdir(&self, path: &str) -> StoreResult<()> {
        match self.head(path, None).await {
            Ok(_) => return Err(StoreError::Conflict("exists".into())),
            Err(StoreError::NotFound) => {}
            Err(e) => return Err(e),
        }
        // No parent check: S3 folders are implied by keys, and the filesystem only makes a
        // folder in one it knows.
        let marker = self.keys.dir(path);
        let mut req = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(&marker)
            .content_length(0)
            .body(ByteStream::from(Bytes::new()));
        if self.cfg.conditional_writes {
            req = req.if_none_match("*");
        }
        match req.send().await.map_err(|e| map("PutObject", &marker, e)) {
            Ok(_) => Ok(()),
            Err(StoreError::PreconditionFailed) => Err(StoreError::Conflict("exists".into())),
            Err(e) => Err(e),
        }
    }

    async fn rmdir(&self, path: &str) -> StoreResult<()> {
        if path.is_empty() {
            return Err(StoreError::Conflict("not_empty".into()));
        }
        let marker = self.keys.dir(path);
        let out = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&marker)
            .max_keys(2)
            .send()
            .await
            .map_err(|e| map("ListObjectsV2", &marker, e))?;
        if out.contents().iter().any(|o| o.key() != Some(marker.as_str())) || !out.common_prefixes().is_empty() {
            return Err(StoreError::Conflict("not_empty".into()));
        }
        // Deleting a marker that is not there succeeds, as on S3: the folder is gone either way.
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&marker)
            .send()
            .await
            .map_err(|e| map("DeleteObject", &marker, e))?;
        Ok(())
    }

    async fn rename(&self, from: &str, to: &str, cond: WriteCondition) -> StoreResult<()> {
        let src = self.keys.object(from);
        let dst = self.keys.object(to);
        let current = match self.head_object(&src).await {
            Ok(m) => m,
            Err(StoreError::NotFound) => {
                if !from.is_empty() && self.has_keys_under(from).await? {
                    return Err(StoreError::Unsupported(
                        "renaming a folder (S3 has no folders: every key under it would be copied)",
                    ));
                }
                return Err(StoreError::NotFound);
            }
            Err(e) => return Err(e),
        };
        meets(&cond, Some(&current))?;
        let etag = current
            .etag
            .clone()
            .ok_or_else(|| StoreError::Protocol(format!("HeadObject {src}: no ETag")))?;
        if self.has_keys_under(to).await? {
            return Err(StoreError::Conflict("is_dir".into()));
        }
        if current.size <= MAX_PART {
            self.client
                .copy_object()
                .bucket(&self.bucket)
                .key(&dst)
                .copy_source(self.copy_source(&src))
                .copy_source_if_match(etag.as_str())
                .send()
                .await
                .map_err(|e| map("CopyObject", &dst, e))?;
        } else {
            self.copy_large(&src, &dst, &etag, current.size).await?;
        }
        // The copy is in place; the old name goes only if it is still the version copied.
        let deleted = self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(&src)
            .set_if_match(
                self.delete_if_match
                    .load(Ordering::Relaxed)
                    .then(|| etag.as_str().to_string()),
            )
            .send()
            .await;
        if let Err(e) = deleted {
            tracing::warn!(
                remote = %self.id,
                "rename {from} → {to}: copied, but the old name stays: {}",
                map("DeleteObject", &src, e)
            );
        }
        Ok(())
    }

    async fn begin_upload(&self, path: &str, base: Option<ETag>) -> StoreResult<UploadId> {
        self.begin_multipart(path, base).await
    }

    async fn upload_part(
        &self,
        id: &UploadId,
        number: u32,
        src: PartSource,
        _at: Option<u64>,
    ) -> StoreResult<PartReceipt> {
        self.multipart_part(id, number, src).await
    }

    async fn commit_upload(
        &self,
        id: &UploadId,
        parts: Vec<PartReceipt>,
        cond: WriteCondition,
    ) -> StoreResult<ObjectMeta> {
        self.complete_multipart(id, parts, cond).await
    }

    async fn abort_upload(&self, id: &UploadId) -> StoreResult<()> {
        self.abort_multipart(id).await
    }
}
