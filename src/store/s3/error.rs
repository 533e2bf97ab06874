//! The one mapping from SDK errors to [`StoreError`]. The SDK has already retried what its
//! standard retry policy retries (throttling, 5xx, timeouts, connection errors) by the time an
//! error gets here; what is still transient is reported as `Unavailable` so the engine's own
//! policy (stale-if-error, the write journal) applies. Messages carry the operation, the S3
//! error code and message, never credentials or signatures.

use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_smithy_runtime_api::http::Response;

use crate::store::StoreError;

/// Maps the failure of operation `what` (e.g. `"GetObject"`) on `key`.
pub fn map<E>(what: &'static str, key: &str, err: SdkError<E, Response>) -> StoreError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let context = || format!("{what} {key}: {}", DisplayErrorContext(&err));
    match &err {
        SdkError::TimeoutError(_) => StoreError::Unavailable(context()),
        SdkError::DispatchFailure(d) => {
            if d.is_user() {
                // The request could not be sent as built (e.g. no credentials were found).
                StoreError::Refused {
                    status: 0,
                    message: context(),
                }
            } else {
                StoreError::Unavailable(context())
            }
        }
        SdkError::ConstructionFailure(_) => StoreError::Refused {
            status: 0,
            message: context(),
        },
        SdkError::ResponseError(_) => StoreError::Protocol(context()),
        SdkError::ServiceError(s) => {
            let status = s.raw().status().as_u16();
            let code = s.err().code().unwrap_or("");
            let message = s.err().message().unwrap_or("");
            classify(what, key, status, code, message)
        }
        _ => StoreError::Unavailable(context()),
    }
}

/// A service error by HTTP status and S3 error code.
pub fn classify(what: &'static str, key: &str, status: u16, code: &str, message: &str) -> StoreError {
    let text = || {
        let mut t = format!("{what} {key}: HTTP {status}");
        if !code.is_empty() {
            t.push_str(&format!(" {code}"));
        }
        if !message.is_empty() {
            t.push_str(&format!(": {message}"));
        }
        t
    };
    match (status, code) {
        // A missing bucket is a broken remote, not a missing file.
        (_, "NoSuchBucket") => StoreError::Refused {
            status,
            message: text(),
        },
        (_, "NoSuchUpload") => StoreError::NoSuchUpload,
        (404, _) | (_, "NoSuchKey") | (_, "NotFound") => StoreError::NotFound,
        (412, _) | (_, "PreconditionFailed") => StoreError::PreconditionFailed,
        (416, _) | (_, "InvalidRange") => StoreError::RangeNotSatisfiable { size: None },
        (501, _) | (_, "NotImplemented") => StoreError::Unsupported(what),
        // AWS answers 409 when a concurrent conditional write won the race: worth another
        // try (which then meets the winner's version and fails its precondition properly).
        (409, "ConditionalRequestConflict") => StoreError::Unavailable(text()),
        (408 | 429 | 500 | 502 | 503 | 504, _)
        | (_, "SlowDown" | "Throttling" | "ThrottlingException" | "RequestTimeout" | "InternalError") => {
            StoreError::Unavailable(text())
        }
        _ => StoreError::Refused {
            status,
            message: text(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes_map_to_store_errors() {
        let c = |status, code| classify("Op", "k", status, code, "msg");
        assert!(matches!(c(404, "NoSuchKey"), StoreError::NotFound));
        assert!(matches!(c(404, ""), StoreError::NotFound), "HEAD 404 has no body");
        assert!(matches!(c(404, "NoSuchUpload"), StoreError::NoSuchUpload));
        assert!(matches!(
            c(404, "NoSuchBucket"),
            StoreError::Refused { status: 404, .. }
        ));
        assert!(matches!(c(412, "PreconditionFailed"), StoreError::PreconditionFailed));
        assert!(matches!(c(416, "InvalidRange"), StoreError::RangeNotSatisfiable { .. }));
        assert!(matches!(c(501, "NotImplemented"), StoreError::Unsupported("Op")));
        assert!(matches!(c(503, "SlowDown"), StoreError::Unavailable(_)));
        assert!(matches!(c(400, "RequestTimeout"), StoreError::Unavailable(_)));
        assert!(matches!(
            c(409, "ConditionalRequestConflict"),
            StoreError::Unavailable(_)
        ));
        assert!(matches!(c(500, "InternalError"), StoreError::Unavailable(_)));
        match c(403, "AccessDenied") {
            StoreError::Refused { status: 403, message } => {
                assert_eq!(message, "Op k: HTTP 403 AccessDenied: msg")
            }
            other => panic!("{other:?}"),
        }
        assert!(c(503, "SlowDown").is_transient());
        assert!(!c(403, "SignatureDoesNotMatch").is_transient());
    }
}
