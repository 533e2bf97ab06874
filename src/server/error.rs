//! The server's one error type and its mapping to an HTTP status and a JSON `ErrorBody`.
//!
//! Every handler returns `Result<Response, ServerError>`; this file is the only place that
//! decides which status and `code` a failure becomes (`docs/PROTOCOL.md`, "Errors").

use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode, header};

use crate::protocol::ErrorBody;

/// The methods the server answers (the `Allow` header of a `405`).
pub const ALLOW: &str = "GET, HEAD, PUT, POST, DELETE";

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("bad path: {0}")]
    BadPath(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// No valid token (`401`, with `WWW-Authenticate: Bearer`).
    #[error("unauthorized: {0}")]
    Unauthorized(String),
    /// A valid token that does not allow the request (`403`).
    #[error("out of scope: {0}")]
    OutOfScope(String),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("precondition failed")]
    PreconditionFailed,
    #[error("range not satisfiable (size {size})")]
    RangeNotSatisfiable { size: u64 },
    #[error("busy: {0}")]
    Busy(String),
    #[error("no parent folder: {0}")]
    NoParent(String),
    #[error("{0} is a folder")]
    IsDir(String),
    #[error("{0} is not a folder")]
    NotDir(String),
    #[error("{0} exists")]
    Exists(String),
    #[error("{0} is not empty")]
    NotEmpty(String),
    #[error("bad move: {0}")]
    BadMove(String),
    #[error("offset {offset} is not the size of the file ({size})")]
    OffsetMismatch { offset: u64, size: u64 },
    #[error("bad part: {0}")]
    BadPart(String),
    #[error("no such upload: {0}")]
    NoSuchUpload(String),
    #[error("unknown chunk {0}")]
    UnknownChunk(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("internal error: {0}")]
    Internal(String),
    #[error("served folder {path}: {source}")]
    Root {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A setting that cannot work (refused at start).
    #[error("{0}")]
    Config(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl From<super::auth::AuthError> for ServerError {
    fn from(e: super::auth::AuthError) -> Self {
        match e {
            super::auth::AuthError::Unauthorized(m) => ServerError::Unauthorized(m.to_string()),
            super::auth::AuthError::OutOfScope(m) => ServerError::OutOfScope(m),
        }
    }
}

impl ServerError {
    /// An I/O failure on a path a request named: a missing file is a 404, not a 500.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        match source.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::NotADirectory => ServerError::NotFound(context),
            io::ErrorKind::PermissionDenied => ServerError::Forbidden(context),
            _ if source.raw_os_error() == Some(libc::ELOOP) => ServerError::NotFound(context),
            _ => ServerError::Io { context, source },
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ServerError::BadPath(_) | ServerError::BadRequest(_) | ServerError::BadPart(_) => StatusCode::BAD_REQUEST,
            ServerError::Forbidden(_) | ServerError::OutOfScope(_) => StatusCode::FORBIDDEN,
            ServerError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ServerError::NotFound(_) | ServerError::NoSuchUpload(_) | ServerError::UnknownChunk(_) => {
                StatusCode::NOT_FOUND
            }
            ServerError::NoParent(_)
            | ServerError::IsDir(_)
            | ServerError::NotDir(_)
            | ServerError::Exists(_)
            | ServerError::NotEmpty(_)
            | ServerError::BadMove(_)
            | ServerError::OffsetMismatch { .. } => StatusCode::CONFLICT,
            ServerError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ServerError::PreconditionFailed => StatusCode::PRECONDITION_FAILED,
            ServerError::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            ServerError::Busy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ServerError::Io { .. }
            | ServerError::Internal(_)
            | ServerError::Root { .. }
            | ServerError::Bind { .. }
            | ServerError::Config(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ServerError::BadPath(_) => "bad_path",
            ServerError::BadRequest(_) => "bad_request",
            ServerError::Forbidden(_) => "forbidden",
            ServerError::Unauthorized(_) => "unauthorized",
            ServerError::OutOfScope(_) => "out_of_scope",
            ServerError::NotFound(_) => "not_found",
            ServerError::MethodNotAllowed => "method_not_allowed",
            ServerError::PreconditionFailed => "precondition_failed",
            ServerError::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            ServerError::Busy(_) => "busy",
            ServerError::NoParent(_) => "no_parent",
            ServerError::IsDir(_) => "is_dir",
            ServerError::NotDir(_) => "not_dir",
            ServerError::Exists(_) => "exists",
            ServerError::NotEmpty(_) => "not_empty",
            ServerError::BadMove(_) => "bad_move",
            ServerError::OffsetMismatch { .. } => "offset_mismatch",
            ServerError::BadPart(_) => "bad_part",
            ServerError::NoSuchUpload(_) => "no_such_upload",
            ServerError::UnknownChunk(_) => "unknown_chunk",
            ServerError::Io { .. }
            | ServerError::Internal(_)
            | ServerError::Root { .. }
            | ServerError::Bind { .. }
            | ServerError::Config(_) => "internal",
        }
    }
}

impl IntoResponse for ServerError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "request failed");
        } else {
            tracing::debug!(error = %self, "request refused");
        }
        let body = ErrorBody {
            code: self.code().to_string(),
            error: self.to_string(),
        };
        let json = match &self {
            // The current size rides along, so the client can append at the right place.
            ServerError::OffsetMismatch { size, .. } => {
                serde_json::to_vec(&serde_json::json!({"code": body.code, "error": body.error, "size": size}))
            }
            _ => serde_json::to_vec(&body),
        }
        .unwrap_or_default();
        let mut resp = (status, json).into_response();
        let headers = resp.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            ServerError::RangeNotSatisfiable { size } => {
                if let Ok(v) = HeaderValue::from_str(&format!("bytes */{size}")) {
                    headers.insert(header::CONTENT_RANGE, v);
                }
            }
            ServerError::MethodNotAllowed => {
                headers.insert(header::ALLOW, HeaderValue::from_static(ALLOW));
            }
            ServerError::Unauthorized(_) => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"artifactfs\""),
                );
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_map_to_protocol_codes() {
        let nf = ServerError::io("x", io::Error::from(io::ErrorKind::NotFound));
        assert_eq!((nf.status(), nf.code()), (StatusCode::NOT_FOUND, "not_found"));
        let other = ServerError::io("x", io::Error::other("boom"));
        assert_eq!((other.status().as_u16(), other.code()), (500, "internal"));
        let busy = ServerError::Busy("x".into());
        assert_eq!((busy.status().as_u16(), busy.code()), (503, "busy"));
    }

    #[test]
    fn write_errors_have_their_codes_and_offset_mismatch_says_the_size() {
        let x = || "x".to_string();
        for (e, status, code) in [
            (ServerError::NoParent(x()), 409, "no_parent"),
            (ServerError::IsDir(x()), 409, "is_dir"),
            (ServerError::NotDir(x()), 409, "not_dir"),
            (ServerError::Exists(x()), 409, "exists"),
            (ServerError::NotEmpty(x()), 409, "not_empty"),
            (ServerError::BadMove(x()), 409, "bad_move"),
            (
                ServerError::OffsetMismatch { offset: 1, size: 2 },
                409,
                "offset_mismatch",
            ),
            (ServerError::BadPart(x()), 400, "bad_part"),
            (ServerError::NoSuchUpload(x()), 404, "no_such_upload"),
            (ServerError::UnknownChunk(x()), 404, "unknown_chunk"),
        ] {
            assert_eq!((e.status().as_u16(), e.code()), (status, code));
        }
    }

    #[test]
    fn range_error_carries_content_range() {
        let r = ServerError::RangeNotSatisfiable { size: 42 }.into_response();
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(r.headers()[header::CONTENT_RANGE], "bytes */42");
        assert_eq!(r.headers()[header::CONTENT_TYPE], "application/json");
    }
}
