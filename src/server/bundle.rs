//! `GET /dir/?afs=bundle`: the small files of one folder in one response, so that a client
//! reading a folder of many small files pays one round trip, not one per file.
//!
//! The body is a sequence of records, in name order: a [`BundleHeader`] as one line of JSON,
//! then exactly `size` bytes of the file. Each record's tag is computed from the very bytes
//! sent, so a file that changes while being read is sent whole in one version or the other,
//! never mixed. Files larger than `max_file`, folders, and what a listing leaves out are
//! skipped; the bundle stops before the file that would take it past `max_total`.

use std::io::Read;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderValue, header};

use super::Ctx;
use super::auth::{Claims, Reach};
use super::error::ServerError;
use super::listing::stat_entry;
use super::paths::{self, Resolved, Root};
use super::stats::Counter;
use crate::protocol::{
    BUNDLE_MAX_FILE, BUNDLE_MAX_TOTAL, BundleHeader, DIGEST_CHUNK_SIZE, EntryKind, chunk_digests, etag_from_digests,
};

/// Content type of a bundle body.
pub const BUNDLE_TYPE: &str = "application/x-afs-bundle";

/// Records buffered ahead of a slow client.
const QUEUED: usize = 16;
/// Names read by one blocking task, and such tasks at once.
const GROUP: usize = 16;
const READERS: usize = 4;

/// What one bundle may hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    max_file: u64,
    max_total: u64,
}

impl Limits {
    /// The client's wishes, capped at the protocol's limits.
    pub fn new(max_file: Option<u64>, max_total: Option<u64>) -> Self {
        Limits {
            max_file: max_file.unwrap_or(BUNDLE_MAX_FILE).min(BUNDLE_MAX_FILE),
            max_total: max_total.unwrap_or(BUNDLE_MAX_TOTAL).min(BUNDLE_MAX_TOTAL),
        }
    }
}

pub async fn serve_bundle(
    ctx: &Ctx,
    dir: Resolved,
    after: Option<String>,
    limits: Limits,
    scope: Option<Arc<Claims>>,
) -> Result<Response, ServerError> {
    ctx.stats.bump(Counter::Bundles);
    let names = {
        let (dirs, canon) = (Arc::clone(&ctx.dirs), dir.canon.clone());
        let at_root = dir.canon_rel.as_os_str().is_empty();
        tokio::task::spawn_blocking(move || dirs.sorted_names(&canon, at_root))
            .await
            .map_err(|e| ServerError::Internal(e.to_string()))??
    };
    let start = after
        .as_deref()
        .map_or(0, |a| names.partition_point(|n| n.as_str() <= a));
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUED);
    let (root, stats) = (Arc::clone(&ctx.root), Arc::clone(&ctx.stats));
    let (dir, scope) = (Arc::new(dir), scope);
    // Groups of names read by a few blocking tasks at once (small files of a folder whose
    // pages are not cached are read at the disk's latency, one at a time), sent in order.
    let groups: Vec<Vec<String>> = names[start..].chunks(GROUP).map(<[String]>::to_vec).collect();
    tokio::spawn(async move {
        let mut read = futures_util::stream::iter(groups)
            .map(|group| {
                let (root, dir, scope) = (Arc::clone(&root), Arc::clone(&dir), scope.clone());
                tokio::task::spawn_blocking(move || read_group(&root, &dir, scope.as_deref(), limits.max_file, group))
            })
            .buffered(READERS);
        let mut total = 0u64;
        while let Some(group) = read.next().await {
            let Ok(group) = group else { return };
            for (header, data) in group {
                if total + header.size > limits.max_total {
                    return;
                }
                total += header.size;
                let Ok(mut line) = serde_json::to_vec(&header) else {
                    continue;
                };
                line.push(b'\n');
                let size = header.size;
                if tx.send(Bytes::from(line)).await.is_err() || tx.send(Bytes::from(data)).await.is_err() {
                    // The client went away.
                    return;
                }
                stats.add_file_bytes(size);
                stats.bump(Counter::BundledFiles);
            }
        }
    });
    let body = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|b| b.map(Ok::<_, std::io::Error>)));
    let mut resp = Response::new(Body::from_stream(body));
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(BUNDLE_TYPE));
    Ok(resp)
}

/// The records of the files among `names` a bundle holds (blocking).
fn read_group(
    root: &Root,
    dir: &Resolved,
    scope: Option<&Claims>,
    max_file: u64,
    names: Vec<String>,
) -> Vec<(BundleHeader, Vec<u8>)> {
    let mut out = Vec::new();
    for name in names {
        let Some((entry, rel, canon, _)) = stat_entry(root, dir, &name) else {
            continue;
        };
        if entry.kind != EntryKind::File
            || entry.size > max_file
            || scope.is_some_and(|c| c.reach(&rel) != Reach::Inside)
        {
            continue;
        }
        // At most one byte more than a bundle file may have: a file that grew meanwhile is
        // left out, not sent cut.
        let mut data = Vec::with_capacity(entry.size as usize);
        let read = paths::open_canonical(&canon).and_then(|f| f.take(max_file + 1).read_to_end(&mut data));
        if read.is_err() || data.len() as u64 > max_file {
            continue;
        }
        let size = data.len() as u64;
        let header = BundleHeader {
            name,
            size,
            etag: etag_from_digests(size, DIGEST_CHUNK_SIZE, &chunk_digests(&data, DIGEST_CHUNK_SIZE)),
            mtime_ns: entry.mtime_ns,
        };
        out.push((header, data));
    }
    out
}
