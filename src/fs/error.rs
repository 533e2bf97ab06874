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
            FsError::Remote { .. } | FsError::Read { .. } => libc::EIO,
        }
    }

    /// Whether the error says something about the remote or the cache that a user must see
    /// in the log (the others are ordinary answers).
    pub fn is_failure(&self) -> bool {
        matches!(self, FsError::Remote { .. } | FsError::Read { .. })
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
