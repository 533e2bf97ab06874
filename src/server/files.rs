//! Answers about one file: `GET`/`HEAD` of its bytes and `?afs=digests`.
//!
//! Owns the order that keeps tags honest: the file is opened and `fstat`ed first, the tag is
//! that of the open file's identity, conditionals are evaluated against it, and the body is
//! streamed from the same open file (which `body.rs` re-checks while sending).

use std::fs::File;
use std::sync::Arc;

use axum::body::Body;
use axum::response::Response;
use http::{HeaderMap, HeaderValue, Method, StatusCode, header};

use super::Ctx;
use super::body::{FileBody, Paced};
use super::digests::FileDigests;
use super::error::ServerError;
use super::json_response;
use super::paths::Resolved;
use super::range::{Precondition, RangeOutcome, Validators, evaluate_preconditions, evaluate_range};
use super::stats::Counter;
use crate::protocol::{DigestList, KIND_HEADER, quote_etag};

/// `GET` or `HEAD` of a file's bytes.
pub async fn serve_file(
    ctx: &Ctx,
    method: &Method,
    headers: &HeaderMap,
    target: &Resolved,
    file: Arc<File>,
) -> Result<Response, ServerError> {
    let is_get = method == Method::GET;
    if is_get {
        // HEADs are counted for every path in `dispatch`.
        ctx.stats.bump(Counter::Gets);
    }
    let d = ctx.store.get(&target.canon_rel, &file).await?;
    let id = d.identity;
    let v = validators(&d);
    if let Some(resp) = check_preconditions(ctx, headers, &v, |r| file_headers(ctx, &d, r))? {
        return Ok(resp);
    }
    let (status, start, len) = match if is_get {
        evaluate_range(headers, id.size, &v)
    } else {
        RangeOutcome::Full
    } {
        RangeOutcome::Unsatisfiable => {
            return Err(ServerError::RangeNotSatisfiable { size: id.size });
        }
        RangeOutcome::Full => (StatusCode::OK, 0, id.size),
        RangeOutcome::Partial { start, end } => {
            ctx.stats.bump(Counter::RangedGets);
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
    };
    let body = if is_get && len > 0 {
        let body = FileBody::new(file, id, start, len, Arc::clone(&ctx.stats));
        match ctx.limit_rate {
            Some(rate) => Body::new(Paced::new(body, rate)),
            None => Body::new(body),
        }
    } else {
        Body::empty()
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    file_headers(ctx, &d, &mut resp);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if status == StatusCode::PARTIAL_CONTENT {
        let range = format!("bytes {}-{}/{}", start, start + len - 1, id.size);
        h.insert(header::CONTENT_RANGE, header_value(&range)?);
    }
    Ok(resp)
}

/// `GET /file?afs=digests`.
pub async fn serve_digests(
    ctx: &Ctx,
    headers: &HeaderMap,
    target: &Resolved,
    file: Arc<File>,
) -> Result<Response, ServerError> {
    ctx.stats.bump(Counter::Digests);
    let d = ctx.store.get(&target.canon_rel, &file).await?;
    let v = validators(&d);
    let etag = header_value(&quote_etag(&d.etag))?;
    let set_etag = |r: &mut Response| {
        r.headers_mut().insert(header::ETAG, etag.clone());
    };
    if let Some(resp) = check_preconditions(ctx, headers, &v, set_etag)? {
        return Ok(resp);
    }
    let list = DigestList {
        etag: d.etag.clone(),
        size: d.identity.size,
        chunk_size: d.chunk_size,
        algorithm: "blake3".to_string(),
        digests: d.hex_digests(),
        crc32c: Some(d.hex_crc32c()),
    };
    let mut resp = json_response(&list)?;
    set_etag(&mut resp);
    Ok(resp)
}

fn validators(d: &FileDigests) -> Validators<'_> {
    Validators {
        etag: &d.etag,
        last_modified_secs: d.identity.mtime_secs(),
    }
}

/// `Some(response)` when the conditionals end the request (304), an error for 412.
fn check_preconditions(
    ctx: &Ctx,
    headers: &HeaderMap,
    v: &Validators<'_>,
    decorate: impl FnOnce(&mut Response),
) -> Result<Option<Response>, ServerError> {
    match evaluate_preconditions(headers, v) {
        Precondition::Proceed => Ok(None),
        Precondition::Failed => {
            ctx.stats.bump(Counter::PreconditionFailed);
            Err(ServerError::PreconditionFailed)
        }
        Precondition::NotModified => {
            ctx.stats.bump(Counter::NotModified);
            let mut resp = Response::new(Body::empty());
            *resp.status_mut() = StatusCode::NOT_MODIFIED;
            decorate(&mut resp);
            Ok(Some(resp))
        }
    }
}

/// Headers of every 200/206/304 of a file.
fn file_headers(ctx: &Ctx, d: &FileDigests, resp: &mut Response) {
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&quote_etag(&d.etag)) {
        h.insert(header::ETAG, v);
    }
    let mtime = std::time::UNIX_EPOCH + std::time::Duration::from_secs(d.identity.mtime_secs().max(0) as u64);
    if let Ok(v) = HeaderValue::from_str(&httpdate::fmt_http_date(mtime)) {
        h.insert(header::LAST_MODIFIED, v);
    }
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(KIND_HEADER, HeaderValue::from_static("file"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if let Some(max_age) = ctx.max_age
        && let Ok(v) = HeaderValue::from_str(&format!("max-age={}", max_age.as_secs()))
    {
        h.insert(header::CACHE_CONTROL, v);
    }
}

fn header_value(s: &str) -> Result<HeaderValue, ServerError> {
    HeaderValue::from_str(s).map_err(|e| ServerError::Internal(e.to_string()))
}
