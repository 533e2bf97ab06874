//! Tokens of the built-in server (`docs/PROTOCOL.md`, "Authentication"): making them
//! (`artifactfs token create`), checking them (signature in constant time, expiry) and what
//! they allow (a path prefix, read or read-write), and loading the secret they are signed with.
//!
//! A token is `afs1.<payload>.<mac>`: `payload` is the base64url (no padding) of a JSON
//! [`Claims`], `mac` the base64url of HMAC-SHA256(secret, `afs1.<payload>`). The secret and
//! tokens are never logged; [`Secret`]'s `Debug` hides it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::{Deserialize, Serialize};

/// The first part of every token (the format's version).
pub const TOKEN_PREFIX: &str = "afs1";
/// Environment variable holding the server's secret when no file is given.
pub const SECRET_ENV: &str = "ARTIFACTFS_TOKEN_SECRET";
/// Shortest secret accepted, in bytes.
pub const SECRET_MIN_LEN: usize = 16;
/// Longest token accepted (a token is a header; anything longer is not ours).
const TOKEN_MAX_LEN: usize = 4096;

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Read,
    ReadWrite,
}

/// The signed content of a token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Path prefix, `/` for everything; compared segment by segment.
    pub prefix: String,
    pub mode: Mode,
    /// Expiry, seconds since the Unix epoch: the token is refused from this second on.
    pub exp: u64,
    /// When it was made, seconds since the Unix epoch (informative).
    pub iat: u64,
}

/// The key tokens are signed with.
pub struct Secret(hmac::Key);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(…)")
    }
}

impl Secret {
    /// A secret from its bytes (surrounding whitespace, such as a final newline, is not part of
    /// it); at least [`SECRET_MIN_LEN`] bytes.
    pub fn new(bytes: &[u8]) -> Result<Secret, String> {
        let trimmed = bytes.trim_ascii();
        if trimmed.len() < SECRET_MIN_LEN {
            return Err(format!(
                "the token secret is {} bytes; it must be at least {SECRET_MIN_LEN} (e.g. `head -c 32 /dev/urandom | base64`)",
                trimmed.len()
            ));
        }
        Ok(Secret(hmac::Key::new(hmac::HMAC_SHA256, trimmed)))
    }

    /// Reads a secret file, refusing one that other users may read or write.
    pub fn from_file(path: &Path) -> Result<Secret, String> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| format!("token secret file {}: {e}", path.display()))?;
        let mode = meta.permissions().mode();
        if mode & 0o007 != 0 {
            return Err(format!(
                "token secret file {} is accessible to every user (mode {:o}); run `chmod 600 {}`",
                path.display(),
                mode & 0o777,
                path.display()
            ));
        }
        let bytes = std::fs::read(path).map_err(|e| format!("token secret file {}: {e}", path.display()))?;
        Secret::new(&bytes).map_err(|e| format!("token secret file {}: {e}", path.display()))
    }

    /// The secret from `file` when given, else from [`SECRET_ENV`]; `None` when neither is set.
    pub fn load(file: Option<&Path>) -> Result<Option<Secret>, String> {
        if let Some(f) = file {
            return Secret::from_file(f).map(Some);
        }
        match std::env::var_os(SECRET_ENV) {
            Some(v) if !v.is_empty() => {
                use std::os::unix::ffi::OsStrExt;
                Secret::new(v.as_bytes())
                    .map(Some)
                    .map_err(|e| format!("{SECRET_ENV}: {e}"))
            }
            _ => Ok(None),
        }
    }
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// `401`: no token, or one that is not valid now.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// `403`: a valid token that does not allow this request.
    #[error("{0}")]
    OutOfScope(String),
}

/// Makes a token for `claims`.
pub fn create(secret: &Secret, claims: &Claims) -> String {
    let json = serde_json::to_vec(claims).unwrap_or_default();
    let signed = format!("{TOKEN_PREFIX}.{}", URL_SAFE_NO_PAD.encode(json));
    let mac = hmac::sign(&secret.0, signed.as_bytes());
    format!("{signed}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()))
}

/// A token valid for `ttl` from `now`.
pub fn claims_for(prefix: &str, mode: Mode, ttl: Duration, now: SystemTime) -> Result<Claims, String> {
    let prefix = normalize_prefix(prefix)?;
    let iat = now.duration_since(UNIX_EPOCH).map_err(|e| e.to_string())?.as_secs();
    if ttl.is_zero() {
        return Err("the token's lifetime must be more than 0s".into());
    }
    Ok(Claims {
        prefix,
        mode,
        exp: iat.saturating_add(ttl.as_secs().max(1)),
        iat,
    })
}

/// `/a/b/` → `/a/b`; `""` and `/` → `/`; refuses `.`, `..` and empty segments.
fn normalize_prefix(p: &str) -> Result<String, String> {
    let segs: Vec<&str> = p.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
    if segs.iter().any(|s| *s == "." || *s == ".." || s.contains('\0')) {
        return Err(format!("prefix {p:?}: `.` and `..` are not allowed"));
    }
    if p.trim_matches('/').contains("//") {
        return Err(format!("prefix {p:?}: empty segment"));
    }
    Ok(format!("/{}", segs.join("/")))
}

/// Checks a token's signature (constant time) and expiry and returns what it allows.
pub fn verify(secret: &Secret, token: &str, now: SystemTime) -> Result<Claims, AuthError> {
    let bad = AuthError::Unauthorized("malformed token");
    if token.len() > TOKEN_MAX_LEN {
        return Err(bad);
    }
    let mut parts = token.split('.');
    let (Some(version), Some(payload), Some(mac), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad);
    };
    if version != TOKEN_PREFIX {
        return Err(AuthError::Unauthorized("unknown token format (expected afs1.…)"));
    }
    let mac = URL_SAFE_NO_PAD.decode(mac).map_err(|_| bad.clone())?;
    let signed = &token[..version.len() + 1 + payload.len()];
    hmac::verify(&secret.0, signed.as_bytes(), &mac).map_err(|_| AuthError::Unauthorized("invalid token signature"))?;
    // Only signed bytes are parsed.
    let json = URL_SAFE_NO_PAD.decode(payload).map_err(|_| bad.clone())?;
    let claims: Claims = serde_json::from_slice(&json).map_err(|_| bad)?;
    let now = now.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    if now >= claims.exp {
        return Err(AuthError::Unauthorized("token expired"));
    }
    Ok(claims)
}

/// The bearer token of an `Authorization` header value.
pub fn bearer(value: Option<&http::HeaderValue>) -> Result<&str, AuthError> {
    let v = value.ok_or(AuthError::Unauthorized(
        "missing token (send Authorization: Bearer TOKEN)",
    ))?;
    let v = v
        .to_str()
        .map_err(|_| AuthError::Unauthorized("malformed Authorization header"))?;
    let (scheme, token) = v
        .split_once(' ')
        .ok_or(AuthError::Unauthorized("malformed Authorization header"))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(AuthError::Unauthorized("Authorization is not a Bearer token"));
    }
    Ok(token.trim())
}

/// How a path relates to a token's prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// The path is the prefix or under it.
    Inside,
    /// The path is a folder above the prefix (listing it would show names outside).
    Above,
    Outside,
}

impl Claims {
    /// Where `rel` (relative to the served folder, no leading slash) lies.
    pub fn reach(&self, rel: &Path) -> Reach {
        let mut want = self.prefix.split('/').filter(|s| !s.is_empty());
        let mut have = rel.components().map(|c| c.as_os_str());
        loop {
            match (want.next(), have.next()) {
                (None, _) => return Reach::Inside,
                (Some(_), None) => return Reach::Above,
                (Some(w), Some(h)) if std::ffi::OsStr::new(w) == h => {}
                _ => return Reach::Outside,
            }
        }
    }

    /// Whether this token allows a request on `rel`: reads inside the prefix, writes inside
    /// it with a read-write token. Anything above or beside the prefix is refused (listings of
    /// parent folders are refused, not filtered).
    pub fn allows(&self, rel: &Path, write: bool) -> Result<(), AuthError> {
        if self.reach(rel) != Reach::Inside {
            return Err(AuthError::OutOfScope(format!(
                "/{} is outside the token's scope {}",
                rel.display(),
                self.prefix
            )));
        }
        if write && self.mode != Mode::ReadWrite {
            return Err(AuthError::OutOfScope("the token allows reads only".into()));
        }
        Ok(())
    }

    /// Whether the whole served folder is in scope.
    pub fn is_global(&self) -> bool {
        self.prefix == "/"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> Secret {
        Secret::new(b"0123456789abcdef0123456789abcdef\n").unwrap()
    }

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn token(prefix: &str, mode: Mode) -> String {
        let c = claims_for(prefix, mode, Duration::from_secs(3600), at(1_000_000)).unwrap();
        create(&secret(), &c)
    }

    #[test]
    fn a_token_round_trips_until_it_expires() {
        let t = token("/team-a/", Mode::ReadWrite);
        assert!(t.starts_with("afs1.") && t.split('.').count() == 3, "{t}");
        let c = verify(&secret(), &t, at(1_000_000)).unwrap();
        assert_eq!(c.prefix, "/team-a");
        assert_eq!(c.mode, Mode::ReadWrite);
        assert_eq!((c.iat, c.exp), (1_000_000, 1_003_600));
        assert!(verify(&secret(), &t, at(1_003_599)).is_ok());
        assert_eq!(
            verify(&secret(), &t, at(1_003_600)),
            Err(AuthError::Unauthorized("token expired"))
        );
    }

    #[test]
    fn tampered_tokens_and_other_secrets_are_refused() {
        let t = token("/team-a", Mode::Read);
        let other = Secret::new(b"another secret, 32 bytes long...").unwrap();
        assert_eq!(
            verify(&other, &t, at(1_000_000)),
            Err(AuthError::Unauthorized("invalid token signature"))
        );
        // A payload widened to the whole tree, keeping the old signature.
        let (_, rest) = t.split_once('.').unwrap();
        let (_, mac) = rest.split_once('.').unwrap();
        let widened = Claims {
            prefix: "/".into(),
            mode: Mode::ReadWrite,
            exp: u64::MAX,
            iat: 0,
        };
        let forged = format!(
            "afs1.{}.{mac}",
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&widened).unwrap())
        );
        assert_eq!(
            verify(&secret(), &forged, at(1_000_000)),
            Err(AuthError::Unauthorized("invalid token signature"))
        );
        // One bit of the MAC flipped.
        let mut bytes = URL_SAFE_NO_PAD.decode(mac).unwrap();
        bytes[0] ^= 1;
        let flipped = format!("{}.{}", &t[..t.rfind('.').unwrap()], URL_SAFE_NO_PAD.encode(bytes));
        assert!(verify(&secret(), &flipped, at(1_000_000)).is_err());
        for junk in ["", "afs1", "afs1..", "afs2.a.b", "afs1.a.b.c", "afs1.!!.??"] {
            assert!(
                matches!(verify(&secret(), junk, at(1_000_000)), Err(AuthError::Unauthorized(_))),
                "{junk:?}"
            );
        }
    }

    #[test]
    fn scope_is_a_prefix_of_whole_segments_and_mode_limits_writes() {
        let c = verify(&secret(), &token("/team-a/", Mode::Read), at(1_000_000)).unwrap();
        let p = Path::new;
        assert_eq!(c.reach(p("team-a")), Reach::Inside);
        assert_eq!(c.reach(p("team-a/x/y")), Reach::Inside);
        assert_eq!(c.reach(p("")), Reach::Above);
        assert_eq!(c.reach(p("team-ab")), Reach::Outside, "segments, not bytes");
        assert_eq!(c.reach(p("team-b/x")), Reach::Outside);
        assert!(c.allows(p("team-a/f"), false).is_ok());
        assert!(matches!(c.allows(p("team-a/f"), true), Err(AuthError::OutOfScope(_))));
        assert!(matches!(c.allows(p(""), false), Err(AuthError::OutOfScope(_))));
        assert!(matches!(c.allows(p("team-b/f"), false), Err(AuthError::OutOfScope(_))));
        let rw = verify(&secret(), &token("/", Mode::ReadWrite), at(1_000_000)).unwrap();
        assert!(rw.is_global());
        assert!(rw.allows(p("anything/at/all"), true).is_ok());
        assert!(rw.allows(p(""), true).is_ok());
    }

    #[test]
    fn prefixes_and_secrets_are_checked() {
        assert!(claims_for("/a/../b", Mode::Read, Duration::from_secs(1), at(1)).is_err());
        assert!(claims_for("/a", Mode::Read, Duration::ZERO, at(1)).is_err());
        assert_eq!(
            claims_for("", Mode::Read, Duration::from_secs(1), at(1))
                .unwrap()
                .prefix,
            "/"
        );
        assert!(Secret::new(b"short\n").is_err());
    }

    #[test]
    fn secret_files_readable_by_everyone_are_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("secret");
        std::fs::write(&f, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Secret::from_file(&f).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let s = Secret::from_file(&f).unwrap();
        assert_eq!(format!("{s:?}"), "Secret(…)");
    }

    #[test]
    fn the_secret_comes_from_the_file_else_the_environment() {
        // Only this test touches the variable.
        unsafe { std::env::remove_var(SECRET_ENV) };
        assert!(Secret::load(None).unwrap().is_none());
        unsafe { std::env::set_var(SECRET_ENV, "too short") };
        let e = Secret::load(None).unwrap_err();
        assert!(e.starts_with(SECRET_ENV) && !e.contains("too short"), "{e}");
        unsafe { std::env::set_var(SECRET_ENV, "0123456789abcdef0123456789abcdef") };
        let from_env = Secret::load(None).unwrap().unwrap();
        unsafe { std::env::remove_var(SECRET_ENV) };
        let t = token("/", Mode::Read);
        assert!(verify(&from_env, &t, at(1_000_000)).is_ok(), "same bytes, same key");
        // A file given wins over the variable, and a missing one is an error.
        assert!(Secret::load(Some(Path::new("/nonexistent/secret"))).is_err());
    }

    #[test]
    fn bearer_headers() {
        let h = |s: &str| http::HeaderValue::from_str(s).unwrap();
        assert_eq!(bearer(Some(&h("Bearer abc"))), Ok("abc"));
        assert_eq!(bearer(Some(&h("bearer abc"))), Ok("abc"));
        assert!(bearer(Some(&h("Basic abc"))).is_err());
        assert!(bearer(None).is_err());
    }
}
