//! Keys ↔ paths. A store path `a/b` is the key `PREFIX a/b`; a folder is a key prefix
//! (`PREFIX a/`) with at least one key under it, or the marker object `PREFIX a/` that
//! `mkdir` makes.
//!
//! S3 keys are any UTF-8 up to 1024 bytes, so a listing can hold keys no file can be named
//! after. The rule (docs/SEMANTICS.md, "S3 keys that cannot be file names"), applied to each
//! listing page before the filesystem sees it:
//! - a segment that is empty (`a//b`), `.` or `..`, or holds NUL, or is longer than 255
//!   bytes, hides that key (and for a prefix, everything under it), with a warning naming it;
//!   such a name never reaches the filesystem, so no path can escape the mount;
//! - a name that is both an object and a prefix (`a` and `a/x`) is the file; the keys under
//!   `a/` are not reachable through the mount (warning). `head` gives the same answer without
//!   listing, since it asks for the object first;
//! - the folder's own marker object (`a/` when listing `a`) is not an entry.

use crate::fs::name::NAME_MAX;

/// Why a key was left out of a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hidden {
    EmptySegment,
    Dot,
    Nul,
    TooLong,
    ShadowedByFile,
}

impl std::fmt::Display for Hidden {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Hidden::EmptySegment => "has an empty path segment (`//`)",
            Hidden::Dot => "has a `.` or `..` segment",
            Hidden::Nul => "contains NUL",
            Hidden::TooLong => "has a segment longer than 255 bytes",
            Hidden::ShadowedByFile => "is a prefix and also an object: the object is shown",
        })
    }
}

/// The mapping of one remote (`s3://bucket/prefix`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    /// `""` or ends with `/`.
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Keys {
            prefix: prefix.to_string(),
        }
    }

    /// The object key of file `path`.
    pub fn object(&self, path: &str) -> String {
        format!("{}{}", self.prefix, path)
    }

    /// The key prefix of folder `path` (its marker object's key too); the root is the remote's
    /// prefix itself.
    pub fn dir(&self, path: &str) -> String {
        if path.is_empty() {
            self.prefix.clone()
        } else {
            format!("{}{}/", self.prefix, path)
        }
    }
}

/// What one listed key or common prefix becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listed<'a> {
    /// An entry named this.
    Name(&'a str),
    /// The listed folder's own marker object: not an entry.
    Marker,
    /// Left out, for this reason.
    Hidden(Hidden),
}

/// An object key listed under `dir_prefix` (with the `/` delimiter, so the rest holds no `/`).
pub fn object_name<'a>(dir_prefix: &str, key: &'a str) -> Listed<'a> {
    let Some(rest) = key.strip_prefix(dir_prefix) else {
        return Listed::Hidden(Hidden::EmptySegment);
    };
    if rest.is_empty() {
        return Listed::Marker;
    }
    match check(rest) {
        Some(h) => Listed::Hidden(h),
        None => Listed::Name(rest),
    }
}

/// A common prefix listed under `dir_prefix` (`dir_prefix NAME/`).
pub fn prefix_name<'a>(dir_prefix: &str, common: &'a str) -> Listed<'a> {
    let Some(rest) = common.strip_prefix(dir_prefix).and_then(|r| r.strip_suffix('/')) else {
        return Listed::Hidden(Hidden::EmptySegment);
    };
    if rest.is_empty() {
        // `dir_prefix/` followed by `/`: keys with `//`.
        return Listed::Hidden(Hidden::EmptySegment);
    }
    match check(rest) {
        Some(h) => Listed::Hidden(h),
        None => Listed::Name(rest),
    }
}

/// Why `name` cannot be one path segment, if it cannot.
fn check(name: &str) -> Option<Hidden> {
    if name.is_empty() || name.contains('/') {
        Some(Hidden::EmptySegment)
    } else if name == "." || name == ".." {
        Some(Hidden::Dot)
    } else if name.contains('\0') {
        Some(Hidden::Nul)
    } else if name.len() > NAME_MAX {
        Some(Hidden::TooLong)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_to_keys_under_the_prefix() {
        let k = Keys::new("team/builds/");
        assert_eq!(k.object("a/b.bin"), "team/builds/a/b.bin");
        assert_eq!(k.dir("a"), "team/builds/a/");
        assert_eq!(k.dir(""), "team/builds/");
        let root = Keys::new("");
        assert_eq!(root.object("x"), "x");
        assert_eq!(root.dir(""), "");
    }

    #[test]
    fn keys_that_cannot_be_names_are_hidden_with_a_reason() {
        let p = "data/";
        assert_eq!(object_name(p, "data/f.bin"), Listed::Name("f.bin"));
        assert_eq!(object_name(p, "data/"), Listed::Marker);
        assert_eq!(object_name(p, "data/."), Listed::Hidden(Hidden::Dot));
        assert_eq!(object_name(p, "data/.."), Listed::Hidden(Hidden::Dot));
        assert_eq!(object_name(p, "data/a\0b"), Listed::Hidden(Hidden::Nul));
        assert_eq!(
            object_name(p, &format!("data/{}", "x".repeat(256))),
            Listed::Hidden(Hidden::TooLong)
        );
        let longest = format!("data/{}", "x".repeat(255));
        assert_eq!(object_name(p, &longest), Listed::Name(&longest[5..]));
        assert_eq!(object_name(p, "elsewhere"), Listed::Hidden(Hidden::EmptySegment));
        assert_eq!(prefix_name(p, "data/sub/"), Listed::Name("sub"));
        assert_eq!(prefix_name(p, "data//"), Listed::Hidden(Hidden::EmptySegment));
        assert_eq!(prefix_name(p, "data/../"), Listed::Hidden(Hidden::Dot));
        assert_eq!(prefix_name(p, "data/./"), Listed::Hidden(Hidden::Dot));
        assert_eq!(prefix_name(p, "data/sub"), Listed::Hidden(Hidden::EmptySegment));
        assert_eq!(object_name("", "..."), Listed::Name("..."));
    }
}
