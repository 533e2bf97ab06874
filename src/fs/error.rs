//! The filesystem's errors and the one place where they become errnos.

use crate::read::ReadError;
use crate::store::StoreError;

#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("the remote version changed")]
    Stale,
    #[error("read-only mount")]
    ReadOnly,
    #[error("file name too long")]
    NameTooLong,
    #[error("invalid file name")]
    InvalidName,
    #[error("bad file handle")]
    BadHandle,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    /// Opened for reading in passthrough mode: no writer may open it meanwhile.
    #[error(
        "the file is being read straight from the cache (passthrough): it cannot be changed until those readers close it"
    )]
    Busy,
    #[error("not supported: {0}")]
    NotSupported(&'static str),
    #[error("invalid argument: {0}")]
    Invalid(&'static str),
    #[error("{path} changed on the remote meanwhile; your version is kept at {kept}")]
    Conflict { path: String, kept: String },
    #[error("{path}: the upload failed: {err}")]
    Upload { path: String, err: String },
    /// The remote refuses the change for good (a `4xx` such as 401, 403 or 413): not retried.
    #[error("{path}: the remote refused the change ({err}); your version is kept at {kept}")]
    Refused { path: String, err: String, kept: String },
    #[error("local write area: {0}")]
    Local(String),
    #[error("{path}: {err}")]
    Remote { path: String, err: StoreError },
    #[error("{path}: {err}")]
    Read { path: String, err: ReadError },
}

impl FsError {
    pub fn remote(path: &str, err: StoreError) -> Self {
        match err {
            StoreError::NotFound => FsError::NotFound,
            StoreError::PreconditionFailed => FsError::Stale,
            StoreError::Conflict(code) => match code.as_str() {
                "exists" => FsError::Exists,
                "not_empty" => FsError::NotEmpty,
                "is_dir" => FsError::IsDir,
                "not_dir" | "no_parent" => FsError::NotDir,
                "bad_move" => FsError::Invalid("a folder cannot move into itself"),
                _ => FsError::Remote {
                    path: path.to_string(),
                    err: StoreError::Conflict(code),
                },
            },
            StoreError::Unsupported(what) => FsError::NotSupported(what),
            err => FsError::Remote {
                path: path.to_string(),
                err,
            },
        }
    }

    pub fn read(path: &str, err: ReadError) -> Self {
        match err {
            ReadError::Stale => FsError::Stale,
            err => FsError::Read {
                path: path.to_string(),
                err,
            },
        }
    }

    /// The errno the kernel gets. Exhaustive on purpose: a new variant must choose one.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::NotDir => libc::ENOTDIR,
            FsError::IsDir => libc::EISDIR,
            FsError::Stale => libc::ESTALE,
            FsError::ReadOnly => libc::EROFS,
            FsError::NameTooLong => libc::ENAMETOOLONG,
            FsError::InvalidName => libc::EINVAL,
            FsError::BadHandle => libc::EBADF,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Busy => libc::ETXTBSY,
            FsError::NotSupported(_) => libc::EPERM,
            FsError::Invalid(_) => libc::EINVAL,
            FsError::Conflict { .. } => libc::ESTALE,
            FsError::Refused { .. } => libc::EACCES,
            FsError::Remote { .. } | FsError::Read { .. } | FsError::Upload { .. } | FsError::Local(_) => libc::EIO,
        }
    }

    /// Whether the error says something about the remote or the cache that a user must see
    /// in the log (the others are ordinary answers).
    pub fn is_failure(&self) -> bool {
        matches!(
            self,
            FsError::Remote { .. }
                | FsError::Read { .. }
                | FsError::Upload { .. }
                | FsError::Local(_)
                | FsError::Conflict { .. }
                | FsError::Refused { .. }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_failures_are_eio_and_version_changes_estale() {
        assert_eq!(FsError::remote("a", StoreError::NotFound).errno(), libc::ENOENT);
        assert_eq!(
            FsError::remote("a", StoreError::PreconditionFailed).errno(),
            libc::ESTALE
        );
        let e = FsError::remote("a", StoreError::Unavailable("connection refused".into()));
        assert_eq!(e.errno(), libc::EIO);
        assert!(e.is_failure() && e.to_string().contains("connection refused"));
        assert_eq!(FsError::read("a", ReadError::Stale).errno(), libc::ESTALE);
        assert_eq!(FsError::read("a", ReadError::Integrity("x".into())).errno(), libc::EIO);
    }
}
