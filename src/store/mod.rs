//! Remotes. One async trait, [`Store`], for every kind of remote, shaped by the strictest one
//! (S3: no rename, no append, opaque ETags, multipart uploads whose parts are new bytes or
//! copies of base ranges), with [`Capabilities`] telling the engine what a remote can do.
//!
//! A store only moves bytes and metadata and reports what the remote said; it does not decide
//! whether a response is acceptable for a cached version (that policy lives in `read/`), and it
//! knows nothing of the cache or of FUSE.
//!
//! Kinds: [`artifact::ArtifactStore`] (the built-in server), [`s3::S3Store`] (S3 and
//! S3-compatible servers), [`memory::MemoryStore`] (tests, reference semantics) and
//! [`faulty::FaultyStore`] (wraps any store and injects faults).

pub mod artifact;
pub mod faulty;
pub mod http;
pub mod limited;
pub mod memory;
pub mod metered;
pub mod open;
pub mod s3;
pub mod web;

use std::fmt;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::stream::BoxStream;

pub use crate::protocol::EntryKind;

/// An entity tag as the remote sent it in its `ETag` header (quotes included), compared
/// byte for byte. Opaque: nothing is derived from its content.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ETag(Arc<str>);

impl ETag {
    pub fn new(header_value: &str) -> Self {
        ETag(Arc::from(header_value))
    }
    /// An ETag from a bare tag, as listings of the built-in server carry it.
    pub fn from_bare(tag: &str) -> Self {
        ETag(Arc::from(crate::protocol::quote_etag(tag)))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// Weak tags (`W/"…"`) never identify a byte-exact version.
    pub fn is_weak(&self) -> bool {
        self.0.starts_with("W/")
    }
}

impl fmt::Debug for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for ETag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a remote can do; the engine checks these instead of the remote's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// `Range` requests are honoured (206). When false, every read fetches the whole object.
    pub ranged_reads: bool,
    /// Listings carry each file's ETag (no `HEAD` needed before reading).
    pub listing_etags: bool,
    /// Per-chunk blake3 digests can be fetched ([`Store::digests`]), with this chunk size.
    pub digest_chunk_size: Option<u64>,
    /// ETags are `protocol::etag_from_digests` of those digests: a file of one chunk is
    /// checked against its tag, with no request for its digests.
    pub etags_from_digests: bool,
    /// Any write at all (put, delete, mkdir, upload sessions).
    pub writes: bool,
    /// Appends and ranged writes without rewriting the object.
    pub partial_writes: bool,
    /// Upload parts may copy ranges of the base version on the server side.
    pub server_side_copy: bool,
    /// Atomic rename of a file.
    pub rename: bool,
    /// Content-defined chunk lists, "which chunks do you hold", parts by chunk hash.
    pub content_chunks: bool,
    /// Smallest part of an upload session except the last (S3: 5 MiB).
    pub min_part_size: u64,
    /// Most parts in one upload session (S3: 10,000).
    pub max_parts: u32,
    /// Listings show every name. When false (some WebDAV servers leave out names starting
    /// with a dot), a dot name missing from a listing is asked about on its own.
    pub complete_listings: bool,
    /// A folder's small files come in one request ([`Store::bundle`]).
    pub bundles: bool,
}

impl Capabilities {
    /// A remote that can only be read.
    pub const fn read_only() -> Self {
        Capabilities {
            ranged_reads: true,
            listing_etags: false,
            digest_chunk_size: None,
            etags_from_digests: false,
            writes: false,
            partial_writes: false,
            server_side_copy: false,
            rename: false,
            content_chunks: false,
            min_part_size: 5 << 20,
            max_parts: 10_000,
            complete_listings: true,
            bundles: false,
        }
    }
}

/// Metadata of one file version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    pub size: u64,
    pub mtime: SystemTime,
    /// `None` when the remote did not say (e.g. a listing without ETags).
    pub etag: Option<ETag>,
    /// `Cache-Control: max-age` of the response, if the remote sent one.
    pub max_age: Option<Duration>,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    pub mtime: SystemTime,
    pub etag: Option<ETag>,
}

/// A whole directory (all pages).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub entries: Vec<DirEntry>,
    /// Validator for a conditional re-list, if the remote offers one.
    pub validator: Option<String>,
    pub max_age: Option<Duration>,
}

/// What a path is on the remote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    File(ObjectMeta),
    Dir { mtime: SystemTime },
}

/// The answer to a conditional request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revalidated<T> {
    NotModified,
    Modified(T),
}

/// Which bytes a `GET` response carries, as the response itself declared them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// `206`: this range of an object of `total` bytes (`None` when the remote sent `*`).
    Partial { range: Range<u64>, total: Option<u64> },
    /// `200`: the whole object.
    Whole { size: Option<u64> },
}

/// A streaming `GET` response.
/// One file of a bundle ([`Store::bundle`]): its name in the folder, its version and all of
/// its bytes.
#[derive(Debug, Clone)]
pub struct BundleFile {
    pub name: String,
    pub etag: ETag,
    pub data: Bytes,
}

/// The files of a bundle, as they arrive.
pub type BundleStream = BoxStream<'static, StoreResult<BundleFile>>;

pub struct GetResponse {
    pub etag: Option<ETag>,
    pub content: Content,
    pub body: BoxStream<'static, Result<Bytes, StoreError>>,
}

impl fmt::Debug for GetResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GetResponse")
            .field("etag", &self.etag)
            .field("content", &self.content)
            .finish_non_exhaustive()
    }
}

/// Per-chunk digests of one version: blake3 (what its tag is made of) and, when the remote
/// has them, CRC32C (what a reader checks fetched bytes against, for a fifth of the CPU).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Digests {
    pub chunk_size: u64,
    pub digests: Vec<[u8; 32]>,
    /// One per chunk when present.
    pub crc32c: Option<Vec<u32>>,
}

/// The precondition a write carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteCondition {
    /// Unconditional.
    None,
    /// Only if the current version has this tag (`If-Match`).
    Matches(ETag),
    /// Only if nothing exists at the path (`If-None-Match: *`).
    Absent,
}

/// An open upload session.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UploadId {
    /// The file the session writes.
    pub path: String,
    /// The remote's name for the session.
    pub id: String,
}

/// One part of an upload session.
#[derive(Debug, Clone)]
pub enum PartSource {
    /// New bytes.
    Bytes(Bytes),
    /// A range of the session's base version, copied on the server side.
    CopyFromBase(Range<u64>),
    /// A content-defined chunk the server holds somewhere, by its blake3 hash
    /// (`content_chunks`).
    Chunk([u8; 32]),
}

/// Proof that a part was stored, handed back at commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartReceipt {
    pub number: u32,
    pub tag: String,
    pub len: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("not found")]
    NotFound,
    #[error("the remote version changed (precondition failed)")]
    PreconditionFailed,
    #[error("range not satisfiable (object size {size:?})")]
    RangeNotSatisfiable { size: Option<u64> },
    #[error("not supported by this remote: {0}")]
    Unsupported(&'static str),
    #[error("the remote refused the request: HTTP {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("the remote is unreachable or failing: {0}")]
    Unavailable(String),
    #[error("the response body ended early: {0}")]
    BodyCut(String),
    #[error("malformed response from the remote: {0}")]
    Protocol(String),
    #[error("unknown upload session")]
    NoSuchUpload,
    #[error("the server no longer holds that chunk")]
    UnknownChunk,
    #[error("the path conflicts with what is there: {0}")]
    Conflict(String),
    #[error("the append offset is not the file's size ({size})")]
    OffsetMismatch { size: u64 },
}

impl StoreError {
    /// Worth another try: the same request may succeed later.
    pub fn is_transient(&self) -> bool {
        matches!(self, StoreError::Unavailable(_) | StoreError::BodyCut(_))
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The kinds of remote, for settings that depend on the kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    /// The built-in server (`artifactfs serve`).
    Artifact,
    S3,
    /// A plain web server (WebDAV or directory indexes).
    Http,
    /// In-memory and test stores.
    Other,
}

/// A remote artifact store. Paths are relative to the remote's root, `/`-separated, without
/// a leading slash; `""` is the root.
#[async_trait]
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// A stable name of this remote (its URL without credentials), used in cache keys and logs.
    fn id(&self) -> &str;

    /// What kind of remote this is (for the settings of its kind).
    fn kind(&self) -> StoreKind {
        StoreKind::Other
    }

    fn capabilities(&self) -> Capabilities;

    /// The whole directory; with `validator`, `NotModified` when it is unchanged.
    async fn list(&self, dir: &str, validator: Option<&str>) -> StoreResult<Revalidated<Listing>>;

    /// What `path` is; with `if_none_match`, `NotModified` when the file still has that tag.
    async fn head(&self, path: &str, if_none_match: Option<&ETag>) -> StoreResult<Revalidated<Head>>;

    /// Bytes of a file: `range` of it, or all of it. With `if_match`, fails with
    /// `PreconditionFailed` when the file no longer has that tag.
    async fn get(&self, path: &str, range: Option<Range<u64>>, if_match: Option<&ETag>) -> StoreResult<GetResponse>;

    /// Per-chunk digests of the version `etag` of a file, when the remote offers them.
    async fn digests(&self, _path: &str, _etag: &ETag) -> StoreResult<Option<Digests>> {
        Ok(None)
    }

    // The write side. Remotes without `writes` keep these defaults.

    async fn put(&self, _path: &str, _body: Bytes, _cond: WriteCondition) -> StoreResult<ObjectMeta> {
        Err(StoreError::Unsupported("put"))
    }

    async fn delete(&self, _path: &str, _cond: WriteCondition) -> StoreResult<()> {
        Err(StoreError::Unsupported("delete"))
    }

    async fn mkdir(&self, _path: &str) -> StoreResult<()> {
        Err(StoreError::Unsupported("mkdir"))
    }

    async fn rmdir(&self, _path: &str) -> StoreResult<()> {
        Err(StoreError::Unsupported("rmdir"))
    }

    /// Atomic rename of a file (only with `capabilities().rename`).
    async fn rename(&self, _from: &str, _to: &str, _cond: WriteCondition) -> StoreResult<()> {
        Err(StoreError::Unsupported("rename"))
    }

    /// Appends `body` at `offset`, which must be the current size (`partial_writes`).
    async fn append(&self, _path: &str, _offset: u64, _body: Bytes, _cond: WriteCondition) -> StoreResult<ObjectMeta> {
        Err(StoreError::Unsupported("append"))
    }

    /// Writes `body` at `offset` (at most the size; may extend the file), atomically
    /// (`partial_writes`).
    async fn write_range(
        &self,
        _path: &str,
        _offset: u64,
        _body: Bytes,
        _cond: WriteCondition,
    ) -> StoreResult<ObjectMeta> {
        Err(StoreError::Unsupported("ranged writes"))
    }

    /// Shrinks or extends (with zeros) a file to `size` (`partial_writes`).
    async fn truncate(&self, _path: &str, _size: u64, _cond: WriteCondition) -> StoreResult<ObjectMeta> {
        Err(StoreError::Unsupported("truncate"))
    }

    /// The content-defined chunks of version `etag` (`content_chunks`).
    async fn chunks(&self, _path: &str, _etag: &ETag) -> StoreResult<Vec<crate::protocol::CdcChunk>> {
        Err(StoreError::Unsupported("chunk lists"))
    }

    /// The small files of folder `dir` in one request: names after `after`, in name order,
    /// each of at most `max_file` bytes, at most `max_total` bytes in all. `None`: the remote
    /// has no such request (the default).
    async fn bundle(
        &self,
        _dir: &str,
        _after: Option<&str>,
        _max_file: u64,
        _max_total: u64,
    ) -> StoreResult<Option<BundleStream>> {
        Ok(None)
    }

    /// Which of these chunk hashes the remote holds, in any file (`content_chunks`).
    async fn has_chunks(&self, _hashes: &[[u8; 32]]) -> StoreResult<Vec<bool>> {
        Err(StoreError::Unsupported("chunk lookups"))
    }

    /// Opens an upload session that builds a new version of `path` from new bytes and, with
    /// `base`, ranges of that version.
    async fn begin_upload(&self, _path: &str, _base: Option<ETag>) -> StoreResult<UploadId> {
        Err(StoreError::Unsupported("upload sessions"))
    }

    /// Stores part `number`. `at`: the part's offset in the new file, when known (a remote may
    /// then write it in place).
    async fn upload_part(
        &self,
        _id: &UploadId,
        _number: u32,
        _src: PartSource,
        _at: Option<u64>,
    ) -> StoreResult<PartReceipt> {
        Err(StoreError::Unsupported("upload sessions"))
    }

    /// Makes the parts, in order, the new version, atomically and under `cond`.
    async fn commit_upload(
        &self,
        _id: &UploadId,
        _parts: Vec<PartReceipt>,
        _cond: WriteCondition,
    ) -> StoreResult<ObjectMeta> {
        Err(StoreError::Unsupported("upload sessions"))
    }

    async fn abort_upload(&self, _id: &UploadId) -> StoreResult<()> {
        Err(StoreError::Unsupported("upload sessions"))
    }
}

pub type DynStore = Arc<dyn Store>;

/// Parent directory and last segment of a remote path (`"a/b/c"` → `("a/b", "c")`).
pub fn split_path(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// `dir` joined with `name`.
pub fn join_path(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split_and_join() {
        assert_eq!(split_path("a/b/c"), ("a/b", "c"));
        assert_eq!(split_path("c"), ("", "c"));
        assert_eq!(join_path("", "x"), "x");
        assert_eq!(join_path("a/b", "x"), "a/b/x");
    }

    #[test]
    fn etags_compare_exactly() {
        assert_eq!(ETag::from_bare("ab"), ETag::new("\"ab\""));
        assert_ne!(ETag::new("W/\"ab\""), ETag::new("\"ab\""));
        assert!(ETag::new("W/\"ab\"").is_weak());
    }
}
