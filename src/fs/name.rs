//! Names are parsed, not checked: a [`ValidName`] can only be built from a string that can be
//! a file name here, so the rest of the filesystem never holds an invalid one.

use std::ffi::OsStr;
use std::fmt;

use super::error::FsError;

/// Longest file name Linux accepts (bytes).
pub const NAME_MAX: usize = 255;

/// A name that can be one path segment of the mount and of the remote.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValidName(String);

/// Why a remote name cannot be shown as a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadName {
    Empty,
    Dot,
    Slash,
    Nul,
    TooLong,
}

impl fmt::Display for BadName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BadName::Empty => "empty",
            BadName::Dot => "`.` or `..`",
            BadName::Slash => "contains `/`",
            BadName::Nul => "contains NUL",
            BadName::TooLong => "longer than 255 bytes",
        })
    }
}

impl ValidName {
    /// A name from the remote (listing entry).
    pub fn from_remote(name: &str) -> Result<Self, BadName> {
        if name.is_empty() {
            return Err(BadName::Empty);
        }
        if name == "." || name == ".." {
            return Err(BadName::Dot);
        }
        if name.contains('/') {
            return Err(BadName::Slash);
        }
        if name.contains('\0') {
            return Err(BadName::Nul);
        }
        if name.len() > NAME_MAX {
            return Err(BadName::TooLong);
        }
        Ok(ValidName(name.to_string()))
    }

    /// A name the kernel asks about. A name that is not UTF-8 cannot exist on the remote.
    pub fn from_kernel(name: &OsStr) -> Result<Self, FsError> {
        if name.len() > NAME_MAX {
            return Err(FsError::NameTooLong);
        }
        let s = name.to_str().ok_or(FsError::NotFound)?;
        ValidName::from_remote(s).map_err(|_| FsError::InvalidName)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ValidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}

impl fmt::Display for ValidName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn remote_names_that_cannot_be_files_are_refused() {
        assert_eq!(ValidName::from_remote(""), Err(BadName::Empty));
        assert_eq!(ValidName::from_remote("."), Err(BadName::Dot));
        assert_eq!(ValidName::from_remote(".."), Err(BadName::Dot));
        assert_eq!(ValidName::from_remote("a/b"), Err(BadName::Slash));
        assert_eq!(ValidName::from_remote("a\0b"), Err(BadName::Nul));
        assert_eq!(ValidName::from_remote(&"x".repeat(256)), Err(BadName::TooLong));
        assert!(ValidName::from_remote(&"x".repeat(255)).is_ok());
        assert!(ValidName::from_remote("...").is_ok());
        assert!(ValidName::from_remote("ünïcode ✓").is_ok());
    }

    #[test]
    fn kernel_names_map_to_errnos() {
        assert!(matches!(
            ValidName::from_kernel(OsStr::new(&"y".repeat(300))),
            Err(FsError::NameTooLong)
        ));
        assert!(matches!(
            ValidName::from_kernel(OsStr::from_bytes(b"\xff\xfe")),
            Err(FsError::NotFound)
        ));
        assert_eq!(ValidName::from_kernel(OsStr::new("ok")).unwrap().as_str(), "ok");
    }
}
