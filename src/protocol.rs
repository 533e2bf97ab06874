//! Wire types of the artifactfs protocol (`docs/PROTOCOL.md`), shared by the built-in server
//! (`server/`) and its client (`store/artifact.rs`) so the two cannot drift apart.
//!
//! This module owns only data shapes and the ETag derivation; no I/O happens here.

use serde::{Deserialize, Serialize};

/// Protocol name and major version, answered by `?afs=info`.
pub const PROTOCOL: &str = "artifactfs/1";

/// Query parameter that selects a protocol operation on a path (`?afs=list`, ...).
pub const QUERY_KEY: &str = "afs";

/// Response header naming the kind of a path on `HEAD`/`GET` (`file` or `dir`).
pub const KIND_HEADER: &str = "x-afs-kind";

/// Size of the chunks whose blake3 digests make up a file's ETag.
pub const DIGEST_CHUNK_SIZE: u64 = 1 << 20;

/// Default and largest page size of a directory listing.
pub const LIST_DEFAULT_LIMIT: usize = 1000;
pub const LIST_MAX_LIMIT: usize = 10_000;

/// `GET <any path>?afs=info`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerInfo {
    pub protocol: String,
    pub server: String,
    /// Chunk size of the digests served by `?afs=digests`.
    pub chunk_size: u64,
    pub max_list_limit: usize,
    pub capabilities: ServerCapabilities,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerCapabilities {
    pub ranges: bool,
    pub listing_etags: bool,
    pub digests: bool,
    /// `PUT`, `DELETE`, `mkdir`, `move`, upload sessions.
    pub writes: bool,
    /// `append`, `write` (a range in place) and `truncate`.
    #[serde(default)]
    pub partial_writes: bool,
    /// `?afs=chunks`, `?afs=has-chunks` and parts that reference a chunk by hash.
    #[serde(default)]
    pub content_chunks: bool,
    /// `?afs=bundle`: a folder's small files in one response.
    #[serde(default)]
    pub bundles: bool,
}

/// The header line of one file in a bundle (`GET /dir/?afs=bundle`), followed by `size`
/// bytes of content.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BundleHeader {
    pub name: String,
    pub size: u64,
    /// The file's tag (unquoted), computed from the bytes that follow.
    pub etag: String,
    pub mtime_ns: i64,
}

/// Largest file a bundle holds, and most content bytes in one bundle.
pub const BUNDLE_MAX_FILE: u64 = 1 << 20;
pub const BUNDLE_MAX_TOTAL: u64 = 64 << 20;

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
}

/// One page of `GET <dir>/?afs=list[&limit=N][&after=NAME]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListPage {
    /// The listed directory, relative to the served root, without leading slash.
    pub path: String,
    /// Sorted by name (bytewise).
    pub entries: Vec<ListEntry>,
    /// Pass as `after=` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListEntry {
    pub name: String,
    pub kind: EntryKind,
    /// Bytes for files, 0 for directories.
    #[serde(default)]
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Opaque entity tag without quotes; `None` when the server has not hashed the file yet
    /// (a `HEAD` of the file returns it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

/// `GET <file>?afs=digests`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DigestList {
    /// Entity tag without quotes.
    pub etag: String,
    pub size: u64,
    pub chunk_size: u64,
    /// Always `blake3`.
    pub algorithm: String,
    /// Hex blake3 digest of each chunk, in order; the last chunk may be short.
    pub digests: Vec<String>,
    /// CRC32C (Castagnoli) of each chunk, 8 hex digits each, in order: what a reader checks
    /// the bytes it fetched against, at a fifth of blake3's CPU cost. Absent from servers
    /// older than it; such a reader checks the blake3 digests instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32c: Option<Vec<String>>,
}

/// Body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: String,
    pub error: String,
}

/// `GET /?afs=stats`: the server's counters since it started (or since the last reset).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ServerStats {
    pub requests: u64,
    /// Bytes of file content sent in `GET` bodies (200 and 206).
    pub file_bytes_sent: u64,
    pub gets: u64,
    pub ranged_gets: u64,
    pub heads: u64,
    pub lists: u64,
    pub digests: u64,
    pub not_modified: u64,
    pub precondition_failed: u64,
    /// Requests being answered right now and the most seen at once.
    pub active: u64,
    pub max_active: u64,
    /// Write requests that changed the served folder (`docs/PROTOCOL.md`, ServerStats).
    #[serde(default)]
    pub writes: u64,
    /// Request body bytes read by `PUT`, parts with a body, `append` and `write`.
    #[serde(default)]
    pub bytes_received: u64,
    /// Bytes of parts the server took from a base range or a known chunk.
    #[serde(default)]
    pub parts_copied_bytes: u64,
    /// `?afs=bundle` requests, and the files they sent (their bytes count in
    /// `file_bytes_sent`).
    #[serde(default)]
    pub bundles: u64,
    #[serde(default)]
    pub bundled_files: u64,
}

/// Content-defined chunking (FastCDC 2020) shared by the server's chunk index and clients
/// that upload only the chunks a server lacks: boundaries depend on the content, so inserting
/// bytes shifts only the chunks around the insertion.
pub const CDC_MIN: usize = 64 << 10;
pub const CDC_AVG: usize = 256 << 10;
pub const CDC_MAX: usize = 1 << 20;

/// One content-defined chunk of a file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CdcChunk {
    pub offset: u64,
    pub len: u64,
    /// Hex blake3 of the chunk's bytes.
    pub hash: String,
}

/// The content-defined chunks of `data`.
pub fn cdc_chunks(data: &[u8]) -> Vec<CdcChunk> {
    fastcdc::v2020::FastCDC::new(data, CDC_MIN, CDC_AVG, CDC_MAX)
        .map(|c| CdcChunk {
            offset: c.offset as u64,
            len: c.length as u64,
            hash: blake3::hash(&data[c.offset..c.offset + c.length]).to_hex().to_string(),
        })
        .collect()
}

/// `GET <file>?afs=chunks`: the content-defined chunks of the current version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ChunkList {
    pub etag: String,
    pub size: u64,
    pub chunks: Vec<CdcChunk>,
}

/// `POST /?afs=has-chunks` request and answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HasChunksRequest {
    pub chunks: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HasChunksAnswer {
    /// One per asked hash, in order.
    pub have: Vec<bool>,
}

/// The answer to every write that makes a new version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WriteResult {
    /// Entity tag (without quotes) of the new version.
    pub etag: String,
    pub size: u64,
    pub mtime_ns: i64,
}

/// `POST <file>?afs=upload`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct UploadStarted {
    pub upload: String,
    /// The session is dropped after this long without a request.
    pub expires_in_s: u64,
}

/// `PUT <file>?afs=part&…`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartStored {
    pub part: u32,
    /// Hex blake3 of the part's bytes; handed back at commit.
    pub tag: String,
    pub size: u64,
}

/// `POST <file>?afs=commit&upload=ID` body: the parts, in the order they make the file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CommitRequest {
    pub parts: Vec<PartRef>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PartRef {
    pub part: u32,
    pub tag: String,
}

/// Derives a file's entity tag (without quotes) from its per-chunk blake3 digests.
///
/// Being a function of the chunk digests, the tag of an appended file is found by hashing only
/// the new and the last partial chunk.
pub fn etag_from_digests(size: u64, chunk_size: u64, digests: &[[u8; 32]]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"artifactfs-etag-v1");
    h.update(&size.to_le_bytes());
    h.update(&chunk_size.to_le_bytes());
    for d in digests {
        h.update(d);
    }
    hex::encode(&h.finalize().as_bytes()[..16])
}

/// Per-chunk blake3 digests of `data`, as the server computes them.
pub fn chunk_digests(data: &[u8], chunk_size: u64) -> Vec<[u8; 32]> {
    data.chunks(chunk_size as usize)
        .map(|c| *blake3::hash(c).as_bytes())
        .collect()
}

/// CRC32C (Castagnoli, the iSCSI polynomial) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, data) as u32
}

/// CRC32C of bytes fed in pieces.
pub struct Crc32c(crc_fast::Digest);

impl Crc32c {
    pub fn new() -> Crc32c {
        Crc32c(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi))
    }

    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    pub fn finalize(&self) -> u32 {
        self.0.finalize() as u32
    }

    pub fn reset(&mut self) {
        self.0.reset();
    }
}

impl Default for Crc32c {
    fn default() -> Crc32c {
        Crc32c::new()
    }
}

impl std::fmt::Debug for Crc32c {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Crc32c({:08x})", self.finalize())
    }
}

/// Per-chunk CRC32C of `data`, as the server computes them.
pub fn chunk_crc32c(data: &[u8], chunk_size: u64) -> Vec<u32> {
    data.chunks(chunk_size as usize).map(crc32c).collect()
}

/// The `ETag` header value for an opaque tag.
pub fn quote_etag(tag: &str) -> String {
    format!("\"{tag}\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etag_depends_on_every_digest_and_the_size() {
        let a = chunk_digests(&[1u8; 3000], 1024);
        assert_eq!(a.len(), 3);
        let base = etag_from_digests(3000, 1024, &a);
        let mut b = a.clone();
        b[2][0] ^= 1;
        assert_ne!(base, etag_from_digests(3000, 1024, &b));
        assert_ne!(base, etag_from_digests(3001, 1024, &a));
        assert_eq!(base.len(), 32);
        assert_eq!(base, etag_from_digests(3000, 1024, &a));
    }

    #[test]
    fn crc32c_is_castagnoli_whole_or_in_pieces() {
        // The check value of CRC-32/ISCSI.
        assert_eq!(crc32c(b"123456789"), 0xe306_9283);
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut c = Crc32c::new();
        for piece in data.chunks(4097) {
            c.update(piece);
        }
        assert_eq!(c.finalize(), crc32c(&data));
        c.reset();
        assert_eq!(c.finalize(), crc32c(b""));
        assert_eq!(
            chunk_crc32c(&data, 1 << 17),
            vec![
                crc32c(&data[..1 << 17]),
                crc32c(&data[1 << 17..1 << 18]),
                crc32c(&data[1 << 18..])
            ]
        );
    }

    #[test]
    fn content_defined_chunks_survive_an_insertion() {
        let mut x = 7u64;
        let data: Vec<u8> = (0..4 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let a = cdc_chunks(&data);
        assert_eq!(a.iter().map(|c| c.len).sum::<u64>(), data.len() as u64);
        assert!(a.iter().all(|c| c.len <= CDC_MAX as u64));
        let mut edited = data[..1 << 20].to_vec();
        edited.extend_from_slice(b"inserted bytes");
        edited.extend_from_slice(&data[1 << 20..]);
        let b = cdc_chunks(&edited);
        let old: std::collections::HashSet<_> = a.iter().map(|c| &c.hash).collect();
        let changed = b.iter().filter(|c| !old.contains(&c.hash)).map(|c| c.len).sum::<u64>();
        assert!(
            changed <= 2 * CDC_MAX as u64,
            "{changed} bytes in new chunks after a 14-byte insertion"
        );
    }

    #[test]
    fn listing_round_trips_and_omits_unknown_etags() {
        let page = ListPage {
            path: "a/b".into(),
            entries: vec![ListEntry {
                name: "x".into(),
                kind: EntryKind::File,
                size: 3,
                mtime_ns: 7,
                etag: None,
            }],
            next: None,
        };
        let s = serde_json::to_string(&page).unwrap();
        assert!(!s.contains("etag") && !s.contains("next"), "{s}");
        assert_eq!(serde_json::from_str::<ListPage>(&s).unwrap(), page);
    }
}
