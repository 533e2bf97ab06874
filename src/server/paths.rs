//! Safe resolution of request paths to files under the served folder.
//!
//! Owns the rules of `docs/PROTOCOL.md` "Paths": decode the raw URI path once, refuse bad
//! segments (`400 bad_path`), refuse whatever resolves outside the served folder
//! (`403 forbidden`), and hide the server's own state folder (`404`). Nothing else in the
//! server turns a request path into a file-system path.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use percent_encoding::percent_decode_str;

use super::error::ServerError;

/// Name of the state folder at the root of the served folder.
pub const STATE_DIR_NAME: &str = ".artifactfs";

/// Names of the temporary files a write leaves beside its target while it runs, when the
/// state folder is on another filesystem; never listed, read or written through the protocol.
pub const HIDDEN_TEMP_PREFIX: &str = ".afs-tmp-";

/// The served folder, canonical, and the state folder to hide when it lies inside it.
#[derive(Debug, Clone)]
pub struct Root {
    canon: PathBuf,
    hidden_state: Option<PathBuf>,
}

/// A request path after decoding and checking its segments (no file-system access yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestPath {
    /// Relative to the served folder, no leading or trailing slash; empty for the root.
    pub rel: PathBuf,
    pub trailing_slash: bool,
}

/// Where a write goes: the canonical folder that holds it and the name in it.
#[derive(Debug, Clone)]
pub struct WriteTarget {
    /// Absolute path; the parent is canonical, the last name is as requested (or the target
    /// of a symlink of that name, when it stays inside the root).
    pub path: PathBuf,
    /// `path` relative to the served folder. Keys locks, digests and caches.
    pub rel: PathBuf,
    /// The canonical parent folder.
    pub parent: PathBuf,
    /// The path as the request named it, for messages.
    pub shown: String,
}

/// A request path resolved on disk.
#[derive(Debug, Clone)]
pub struct Resolved {
    /// Canonical absolute path (symlinks followed), inside the served folder.
    pub canon: PathBuf,
    /// `canon` relative to the served folder; empty for the root. Keys digests and caches.
    pub canon_rel: PathBuf,
}

impl Root {
    /// `canon` must already be canonical; `state_dir` is canonicalized here when it exists.
    pub fn new(canon: PathBuf, state_dir: &Path) -> Root {
        let hidden_state = std::fs::canonicalize(state_dir)
            .ok()
            .filter(|s| s.starts_with(&canon) && s != &canon);
        Root { canon, hidden_state }
    }

    pub fn path(&self) -> &Path {
        &self.canon
    }

    /// Whether a canonical path inside the root belongs to the server's own state.
    pub fn is_hidden(&self, canon: &Path) -> bool {
        let Ok(rel) = canon.strip_prefix(&self.canon) else {
            return true;
        };
        let first_is_state = matches!(
            rel.components().next(),
            Some(Component::Normal(n)) if n == OsStr::new(STATE_DIR_NAME)
        );
        first_is_state || self.hidden_state.as_ref().is_some_and(|s| canon.starts_with(s)) || is_hidden_temp(canon)
    }

    /// Resolves the path a write names: its parent folder must exist (`409 no_parent`) and
    /// stay inside the root; the last name may not exist yet. A symlink of that name is
    /// followed when its target stays inside the root. Blocking.
    pub fn resolve_for_write(&self, req: &RequestPath) -> Result<WriteTarget, ServerError> {
        let shown = req.rel.display().to_string();
        let (Some(name), Some(parent_rel)) = (req.rel.file_name(), req.rel.parent()) else {
            return Err(ServerError::Forbidden(
                "the served folder itself cannot be written".into(),
            ));
        };
        let reserved = || ServerError::Forbidden(format!("{shown} is reserved for the server"));
        if matches!(
            req.rel.components().next(),
            Some(Component::Normal(n)) if n == OsStr::new(STATE_DIR_NAME)
        ) || name.as_bytes().starts_with(HIDDEN_TEMP_PREFIX.as_bytes())
        {
            return Err(reserved());
        }
        let no_parent = || ServerError::NoParent(shown.clone());
        let parent = match std::fs::canonicalize(self.canon.join(parent_rel)) {
            Ok(p) => p,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                return Err(no_parent());
            }
            Err(e) => return Err(ServerError::io(&shown, e)),
        };
        if !parent.starts_with(&self.canon) {
            return Err(ServerError::Forbidden(format!(
                "{shown} resolves outside the served folder"
            )));
        }
        if self.is_hidden(&parent) && parent != self.canon {
            return Err(reserved());
        }
        if !std::fs::metadata(&parent).is_ok_and(|m| m.is_dir()) {
            return Err(no_parent());
        }
        let mut path = parent.join(name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            let target = std::fs::canonicalize(&path)
                .map_err(|_| ServerError::Forbidden(format!("{shown} is a symlink that leads nowhere")))?;
            let res = self.check_canonical(target, &shown).map_err(|e| match e {
                ServerError::NotFound(_) => reserved(),
                other => other,
            })?;
            if res.canon_rel.as_os_str().is_empty() {
                return Err(ServerError::Forbidden(
                    "the served folder itself cannot be written".into(),
                ));
            }
            path = res.canon;
        }
        let parent = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.canon.clone());
        let rel = path
            .strip_prefix(&self.canon)
            .map(Path::to_path_buf)
            .map_err(|_| ServerError::Forbidden(format!("{shown} resolves outside the served folder")))?;
        Ok(WriteTarget {
            path,
            rel,
            parent,
            shown,
        })
    }

    /// Follows symlinks and checks the result stays inside the root and outside the state
    /// folder. Blocking (file-system calls).
    pub fn resolve(&self, req: &RequestPath) -> Result<Resolved, ServerError> {
        let shown = || req.rel.display().to_string();
        if matches!(
            req.rel.components().next(),
            Some(Component::Normal(n)) if n == OsStr::new(STATE_DIR_NAME)
        ) {
            return Err(ServerError::NotFound(shown()));
        }
        let canon = std::fs::canonicalize(self.canon.join(&req.rel)).map_err(|e| ServerError::io(shown(), e))?;
        self.check_canonical(canon, &shown())
    }

    /// Where `rel` leads on disk, relative to the root: its longest existing ancestor with
    /// symlinks followed, then the rest as named. `None` when that leaves the root (the write
    /// itself refuses it). Blocking.
    pub fn resolve_existing_prefix(&self, rel: &Path) -> Option<PathBuf> {
        let mut existing = self.canon.join(rel);
        let mut rest = Vec::new();
        loop {
            if let Ok(canon) = std::fs::canonicalize(&existing) {
                let mut out = canon.strip_prefix(&self.canon).ok()?.to_path_buf();
                out.extend(rest.iter().rev());
                return Some(out);
            }
            rest.push(existing.file_name()?.to_os_string());
            if !existing.pop() {
                return None;
            }
        }
    }

    /// Checks an already canonical path (for listing entries reached through symlinks).
    pub fn check_canonical(&self, canon: PathBuf, shown: &str) -> Result<Resolved, ServerError> {
        let Ok(rel) = canon.strip_prefix(&self.canon) else {
            return Err(ServerError::Forbidden(format!(
                "{shown} resolves outside the served folder"
            )));
        };
        if self.is_hidden(&canon) {
            return Err(ServerError::NotFound(shown.to_string()));
        }
        let canon_rel = rel.to_path_buf();
        Ok(Resolved { canon, canon_rel })
    }
}

/// Opens a canonical path for reading. `O_NONBLOCK`: should the path have become a FIFO since
/// it was checked, opening must not hang (reads of regular files ignore the flag).
/// `O_NOFOLLOW`: a canonical path has no symlink; refuse one swapped in since.
pub fn open_canonical(canon: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(canon)
}

/// Whether the last name of `path` is one of a write's hidden temporary files.
pub fn is_hidden_temp(path: &Path) -> bool {
    path.file_name()
        .is_some_and(|n| n.as_bytes().starts_with(HIDDEN_TEMP_PREFIX.as_bytes()))
}

/// Decodes the raw URI path (percent-encoding, once) and checks every segment.
pub fn parse_request_path(raw: &str) -> Result<RequestPath, ServerError> {
    let Some(raw_rel) = raw.strip_prefix('/') else {
        return Err(ServerError::BadPath(format!("{raw:?} does not start with /")));
    };
    check_segments(raw, percent_decode_str(raw_rel).collect())
}

/// Checks a path that is already decoded (the `to=` of a move: query values are decoded once
/// by the query parser, and not again here).
pub fn parse_decoded_path(path: &str) -> Result<RequestPath, ServerError> {
    let Some(rel) = path.strip_prefix('/') else {
        return Err(ServerError::BadPath(format!("{path:?} does not start with /")));
    };
    check_segments(path, rel.as_bytes().to_vec())
}

fn check_segments(raw: &str, decoded: Vec<u8>) -> Result<RequestPath, ServerError> {
    let mut decoded = decoded;
    let trailing_slash = decoded.last() == Some(&b'/');
    if trailing_slash {
        decoded.pop();
    }
    if decoded.is_empty() {
        // The root, `/`: a folder, as if written with its trailing slash.
        return Ok(RequestPath {
            rel: PathBuf::new(),
            trailing_slash: true,
        });
    }
    for seg in decoded.split(|&b| b == b'/') {
        let why = if seg.is_empty() {
            "empty segment"
        } else if seg == b"." || seg == b".." {
            "dot segment"
        } else if seg.contains(&0) {
            "NUL byte"
        } else if seg.contains(&b'\\') {
            "backslash"
        } else {
            continue;
        };
        return Err(ServerError::BadPath(format!("{raw:?}: {why}")));
    }
    Ok(RequestPath {
        rel: PathBuf::from(OsStr::from_bytes(&decoded)),
        trailing_slash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> (String, bool) {
        let p = parse_request_path(raw).unwrap();
        (p.rel.to_str().unwrap().to_string(), p.trailing_slash)
    }

    fn bad(raw: &str) -> bool {
        matches!(parse_request_path(raw), Err(ServerError::BadPath(_)))
    }

    #[test]
    fn decodes_once() {
        assert_eq!(ok("/"), ("".into(), true));
        assert_eq!(ok("/a/b%20c"), ("a/b c".into(), false));
        assert_eq!(ok("/dir/"), ("dir".into(), true));
        assert_eq!(ok("/a%2fb"), ("a/b".into(), false));
        // Decoded once: `%252e` is the literal name `%2e`.
        assert_eq!(ok("/%252e%252e"), ("%2e%2e".into(), false));
        assert_eq!(ok("/..a/b.."), ("..a/b..".into(), false));
    }

    #[test]
    fn refuses_bad_segments() {
        for raw in [
            "/..",
            "/../etc/passwd",
            "/a/../b",
            "/a/./b",
            "/.",
            "/%2e%2e",
            "/%2E%2E/x",
            "/a%2f..%2fb",
            "/a/%2e",
            "/a//b",
            "/a%2f%2fb",
            "/a//",
            "/a%00b",
            "/a%5cb",
            "/a\\b",
            "relative",
        ] {
            assert!(bad(raw), "{raw} should be refused");
        }
    }

    #[test]
    fn resolve_stays_inside() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root_dir = tmp.path().join("root");
        std::fs::create_dir_all(root_dir.join("sub")).unwrap();
        std::fs::write(root_dir.join("sub/f"), b"x").unwrap();
        std::fs::write(outside.path().join("secret"), b"s").unwrap();
        std::os::unix::fs::symlink(outside.path(), root_dir.join("out")).unwrap();
        std::os::unix::fs::symlink("sub/f", root_dir.join("in")).unwrap();
        std::fs::create_dir_all(root_dir.join(".artifactfs")).unwrap();
        std::os::unix::fs::symlink(".artifactfs", root_dir.join("state-link")).unwrap();
        let canon = std::fs::canonicalize(&root_dir).unwrap();
        let root = Root::new(canon.clone(), &canon.join(".artifactfs"));
        let res = |raw: &str| root.resolve(&parse_request_path(raw).unwrap());

        let r = res("/in").unwrap();
        assert_eq!(r.canon_rel, PathBuf::from("sub/f"));
        assert_eq!(res("/").unwrap().canon_rel, PathBuf::new());
        assert!(matches!(res("/out/secret"), Err(ServerError::Forbidden(_))));
        assert!(matches!(res("/out"), Err(ServerError::Forbidden(_))));
        assert!(matches!(res("/.artifactfs"), Err(ServerError::NotFound(_))));
        assert!(matches!(res("/state-link"), Err(ServerError::NotFound(_))));
        assert!(matches!(res("/nope"), Err(ServerError::NotFound(_))));
        assert!(matches!(res("/sub/f/x"), Err(ServerError::NotFound(_))));

        let w = |raw: &str| root.resolve_for_write(&parse_request_path(raw).unwrap());
        let t = w("/sub/new").unwrap();
        assert_eq!((t.rel, t.parent), (PathBuf::from("sub/new"), canon.join("sub")));
        assert_eq!(w("/in").unwrap().rel, PathBuf::from("sub/f"));
        assert!(matches!(w("/missing/x"), Err(ServerError::NoParent(_))));
        assert!(matches!(w("/sub/f/x"), Err(ServerError::NoParent(_))));
        assert!(matches!(w("/out/x"), Err(ServerError::Forbidden(_))));
        assert!(matches!(w("/.artifactfs/x"), Err(ServerError::Forbidden(_))));
        assert!(matches!(w("/state-link/x"), Err(ServerError::Forbidden(_))));
        assert!(matches!(w("/sub/.afs-tmp-1"), Err(ServerError::Forbidden(_))));
        assert!(matches!(w("/"), Err(ServerError::Forbidden(_))));
        std::fs::write(root_dir.join("sub/.afs-tmp-9"), b"t").unwrap();
        assert!(matches!(res("/sub/.afs-tmp-9"), Err(ServerError::NotFound(_))));
        assert_eq!(parse_decoded_path("/a b/%41").unwrap().rel, PathBuf::from("a b/%41"));
        assert!(matches!(parse_decoded_path("/a/../b"), Err(ServerError::BadPath(_))));
    }
}
