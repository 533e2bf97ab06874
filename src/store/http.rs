//! The HTTP plumbing every HTTP-based store shares: one pooled `reqwest` client, the retry
//! policy (which failures are retried, with what backoff), and parsers of the response
//! headers the engine relies on (`Content-Range`, `Cache-Control`, dates).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use backon::{ExponentialBuilder, Retryable};
use http::StatusCode;
use reqwest::header::HeaderMap;
use serde::{Deserialize, Serialize};

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::Url;
use reqwest::header::CONTENT_RANGE;

use super::{Content, StoreError, StoreResult};

/// Connection settings of a remote (`[http]` in the config).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    /// Time allowed to open a connection.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Longest silence while waiting for response bytes. There is deliberately no total
    /// request timeout: a large transfer may take as long as it needs while bytes flow.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// Further tries after a connection error, 429 or 5xx.
    pub retries: usize,
    /// First backoff delay; doubles per retry, with jitter, up to `retry_max_delay`.
    #[serde(with = "humantime_serde")]
    pub retry_min_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max_delay: Duration,
    /// Idle keep-alive connections kept per host.
    pub pool_max_idle: usize,
    /// PEM file of CA certificates trusted besides the system roots, for https remotes other
    /// than S3 (which has its own `[s3] ca_bundle`, falling back to this one).
    pub ca_bundle: Option<PathBuf>,
    /// Accept any TLS certificate (self-signed test servers only; logged as a warning).
    pub insecure_skip_tls_verify: bool,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(30),
            retries: 5,
            retry_min_delay: Duration::from_millis(100),
            retry_max_delay: Duration::from_secs(5),
            pool_max_idle: 32,
            ca_bundle: None,
            insecure_skip_tls_verify: false,
        }
    }
}

/// The one client a remote uses for all its requests (connection pool, keep-alive), with the
/// TLS settings of `cfg`.
pub fn build_client(cfg: &HttpConfig) -> StoreResult<reqwest::Client> {
    build_client_with(cfg, HeaderMap::new())
}

/// The same, sending `headers` with every request (an `Authorization` marked sensitive).
pub fn build_client_with(cfg: &HttpConfig, headers: HeaderMap) -> StoreResult<reqwest::Client> {
    with_tls(
        client_builder(cfg),
        cfg.ca_bundle.as_deref(),
        cfg.insecure_skip_tls_verify,
    )?
    .default_headers(headers)
    .build()
    .map_err(|e| StoreError::Refused {
        status: 0,
        message: error_chain("cannot build the HTTP client", &e),
    })
}

/// Adds the CA certificates of `ca_bundle` to the trusted roots, or turns certificate checks
/// off (with a warning).
pub fn with_tls(
    mut b: reqwest::ClientBuilder,
    ca_bundle: Option<&Path>,
    insecure: bool,
) -> StoreResult<reqwest::ClientBuilder> {
    let config_error = |message: String| StoreError::Refused { status: 0, message };
    if let Some(path) = ca_bundle {
        let pem = std::fs::read(path).map_err(|e| config_error(format!("ca_bundle {}: {e}", path.display())))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| config_error(format!("ca_bundle {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(config_error(format!(
                "ca_bundle {}: no PEM certificate in it",
                path.display()
            )));
        }
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    if insecure {
        tracing::warn!(
            "insecure_skip_tls_verify: the remote's TLS certificate is NOT checked; anyone on the \
             network path can read and change what this mount reads and writes"
        );
        b = b.danger_accept_invalid_certs(true);
    }
    Ok(b)
}

/// A bearer token (`Authorization: Bearer …`, the built-in server's tokens). It is never
/// shown: `Debug` and `Serialize` (`--print-config`) hide it, and it travels only in a header
/// marked sensitive, never in a URL.
#[derive(Clone, PartialEq, Eq)]
pub struct BearerToken(String);

impl BearerToken {
    /// A token as written in a file or variable (surrounding whitespace, such as a final
    /// newline, is not part of it). The error never quotes the token.
    pub fn new(text: &str) -> Result<BearerToken, String> {
        let t = text.trim();
        if t.is_empty() {
            return Err("the token is empty".into());
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token holds spaces or characters other than printable ASCII".into());
        }
        Ok(BearerToken(t.to_string()))
    }

    /// Reads a token file, refusing one that other users may read.
    pub fn from_file(path: &Path) -> Result<BearerToken, String> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
        if meta.permissions().mode() & 0o007 != 0 {
            return Err(format!(
                "token file {} is readable by every user; run `chmod 600 {}`",
                path.display(),
                path.display()
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("token file {}: {e}", path.display()))?;
        BearerToken::new(&text).map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// Whether the token says it allows reads only (an `afs1` token of mode `read`). Read
    /// without checking the signature, which only the server can: it only spares the mount
    /// writes the server would refuse.
    pub fn is_read_only(&self) -> bool {
        use base64::Engine;
        let mut parts = self.0.split('.');
        let (Some("afs1"), Some(payload)) = (parts.next(), parts.next()) else {
            return false;
        };
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .ok()
            .and_then(|json| serde_json::from_slice::<serde_json::Value>(&json).ok())
            .is_some_and(|v| v["mode"] == "read")
    }

    /// `Authorization: Bearer TOKEN`, marked sensitive (hidden from reqwest's and hyper's logs).
    pub fn headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Ok(mut v) = http::HeaderValue::from_str(&format!("Bearer {}", self.0)) {
            v.set_sensitive(true);
            h.insert(http::header::AUTHORIZATION, v);
        }
        h
    }
}

impl std::fmt::Debug for BearerToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerToken(<hidden>)")
    }
}

impl Serialize for BearerToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<hidden>")
    }
}

impl<'de> Deserialize<'de> for BearerToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        BearerToken::new(&s).map_err(serde::de::Error::custom)
    }
}

/// The settings every remote's client starts from (a remote may add TLS settings).
pub fn client_builder(cfg: &HttpConfig) -> reqwest::ClientBuilder {
    install_crypto_provider();
    reqwest::Client::builder()
        .user_agent(concat!("artifactfs/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(cfg.connect_timeout)
        .read_timeout(cfg.read_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .http1_only()
}

fn install_crypto_provider() {
    // Several clients may race here; only the first install wins and that is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// Whether a status is worth retrying (the remote is overloaded or failing for now).
pub fn status_is_transient(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
        || matches!(status.as_u16(), 500 | 502 | 503 | 504)
}

/// Sends the request `make` builds, retrying connection failures and transient statuses with
/// exponential backoff and jitter. Other statuses are returned for the caller to interpret.
/// `what` names the request in errors and logs (never with credentials).
pub async fn send<F>(cfg: &HttpConfig, what: &str, make: F) -> StoreResult<reqwest::Response>
where
    F: Fn() -> reqwest::RequestBuilder,
{
    let backoff = ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(cfg.retry_min_delay)
        .with_max_delay(cfg.retry_max_delay)
        .with_max_times(cfg.retries);
    let attempt = || async {
        let resp = make().send().await.map_err(|e| describe_reqwest_error(what, &e))?;
        let status = resp.status();
        if status_is_transient(status) {
            return Err(StoreError::Unavailable(format!("{what}: HTTP {status}")));
        }
        Ok(resp)
    };
    attempt
        .retry(backoff)
        .when(StoreError::is_transient)
        .notify(|err, delay| {
            crate::metrics::get().retried();
            tracing::debug!("retrying in {delay:?}: {err}")
        })
        .await
}

fn describe_reqwest_error(what: &str, e: &reqwest::Error) -> StoreError {
    StoreError::Unavailable(error_chain(what, e))
}

/// `what: error: cause: cause…` (reqwest's Display hides the cause chain).
pub fn error_chain(what: &str, e: &dyn std::error::Error) -> String {
    // The root cause is what a user needs.
    let mut msg = format!("{what}: {e}");
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

/// Maps a body-stream error to a store error (a cut body is retried from where it stopped).
pub fn body_error(what: &str, e: &reqwest::Error) -> StoreError {
    match describe_reqwest_error(what, e) {
        StoreError::Unavailable(m) => StoreError::BodyCut(m),
        other => other,
    }
}

/// The base URL of a remote (always ending in `/`, no query or fragment) and its id: the
/// same URL without credentials and without the trailing slash, safe to log.
pub fn base_url(url: &str) -> StoreResult<(Url, String)> {
    let mut base = Url::parse(url).map_err(|e| StoreError::Protocol(format!("bad remote URL {url:?}: {e}")))?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err(StoreError::Protocol(format!("{url}: not an http(s) URL")));
    }
    if !base.path().ends_with('/') {
        let p = format!("{}/", base.path());
        base.set_path(&p);
    }
    base.set_query(None);
    base.set_fragment(None);
    let mut id_url = base.clone();
    let _ = id_url.set_username("");
    let _ = id_url.set_password(None);
    let id = id_url.as_str().trim_end_matches('/').to_string();
    Ok((base, id))
}

/// `text` with the credentials of every URL in it removed (`http://user:pw@host/` →
/// `http://host/`), for messages that quote URLs as given.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let end = tail
            .find(|c: char| c == '/' || c == '?' || c == '#' || c.is_whitespace() || c == ')' || c == '"')
            .unwrap_or(tail.len());
        let authority = &tail[..end];
        out.push_str(authority.rsplit_once('@').map_or(authority, |(_, host)| host));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// Characters left as they are in a path segment; everything else is percent-encoded.
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.').remove(b'~');

/// The URL of remote `path` under `base` (which ends in `/`), each segment percent-encoded;
/// with `dir`, ending in `/`.
pub fn join_url(base: &Url, path: &str, dir: bool) -> Url {
    let mut s = base.as_str().to_string();
    for (i, seg) in path.split('/').filter(|s| !s.is_empty()).enumerate() {
        if i > 0 {
            s.push('/');
        }
        s.extend(utf8_percent_encode(seg, SEGMENT));
    }
    if dir && !s.ends_with('/') {
        s.push('/');
    }
    // Segments are encoded and the base parsed already, so this cannot fail.
    Url::parse(&s).unwrap_or_else(|_| base.clone())
}

/// What a `GET` answer carries, from its status and headers: `Ok(None)` for a status the
/// caller interprets (an error of its protocol).
pub fn content_of(what: &str, resp: &reqwest::Response) -> StoreResult<Option<Content>> {
    let headers = resp.headers();
    match resp.status() {
        StatusCode::PARTIAL_CONTENT => {
            let cr = header_str(headers, CONTENT_RANGE.as_str())
                .ok_or_else(|| StoreError::Protocol(format!("{what}: 206 without Content-Range")))?;
            let (range, total) = parse_content_range(cr)
                .ok_or_else(|| StoreError::Protocol(format!("{what}: bad Content-Range {cr:?}")))?;
            Ok(Some(Content::Partial { range, total }))
        }
        StatusCode::OK => Ok(Some(Content::Whole {
            size: resp.content_length(),
        })),
        StatusCode::RANGE_NOT_SATISFIABLE => {
            let size = header_str(headers, CONTENT_RANGE.as_str())
                .and_then(|v| v.strip_prefix("bytes */"))
                .and_then(|v| v.parse().ok());
            Err(StoreError::RangeNotSatisfiable { size })
        }
        _ => Ok(None),
    }
}

/// The `Range` header value for `range` (non-empty).
pub fn range_header(range: &Range<u64>) -> String {
    format!("bytes={}-{}", range.start, range.end - 1)
}

/// A response body as a stream of store results (a cut body is [`StoreError::BodyCut`]).
pub fn body_stream(what: String, resp: reqwest::Response) -> BoxStream<'static, StoreResult<Bytes>> {
    resp.bytes_stream()
        .map(move |r| r.map_err(|e| body_error(&what, &e)))
        .boxed()
}

/// `Content-Range: bytes a-b/total` → (`a..b+1`, `Some(total)`); `total` is `None` for `*`.
pub fn parse_content_range(value: &str) -> Option<(Range<u64>, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let a: u64 = a.trim().parse().ok()?;
    let b: u64 = b.trim().parse().ok()?;
    if b < a {
        return None;
    }
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    if let Some(t) = total
        && b >= t
    {
        return None;
    }
    Some((a..b + 1, total))
}

/// `Cache-Control: max-age=N` (`no-cache` / `no-store` count as 0).
pub fn parse_max_age(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::CACHE_CONTROL)?.to_str().ok()?;
    let mut max_age = None;
    for directive in value.split(',') {
        let d = directive.trim().to_ascii_lowercase();
        if d == "no-cache" || d == "no-store" {
            return Some(Duration::ZERO);
        }
        if let Some(n) = d.strip_prefix("max-age=") {
            max_age = n.trim_matches('"').parse().ok().map(Duration::from_secs);
        }
    }
    max_age
}

pub fn parse_last_modified(headers: &HeaderMap) -> Option<SystemTime> {
    let v = headers.get(http::header::LAST_MODIFIED)?.to_str().ok()?;
    httpdate::parse_http_date(v).ok()
}

pub fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A short human summary of an error response body (JSON `error` field, else the text).
pub fn error_message(body: &[u8]) -> String {
    if let Ok(e) = serde_json::from_slice::<crate::protocol::ErrorBody>(body) {
        return e.error;
    }
    let text = String::from_utf8_lossy(body);
    text.chars().take(200).collect()
}

#[cfg(test)]
#[path = "http_tests.rs"]
mod client_tests;

#[cfg(test)]
mod tests {
    #[test]
    fn credentials_in_quoted_urls_are_removed() {
        assert_eq!(
            super::redact_urls("cannot use http://al:s3cret@h:80/x: error for url (https://u@h/y) s3://b/p"),
            "cannot use http://h:80/x: error for url (https://h/y) s3://b/p"
        );
        assert_eq!(super::redact_urls("no url here"), "no url here");
    }

    use super::*;

    #[test]
    fn urls_encode_each_segment() {
        let base = Url::parse("http://h:1/pre/").unwrap();
        assert_eq!(
            join_url(&base, "a b/c#d?e", false).as_str(),
            "http://h:1/pre/a%20b/c%23d%3Fe"
        );
        assert_eq!(join_url(&base, "", true).as_str(), "http://h:1/pre/");
        assert_eq!(join_url(&base, "d", true).as_str(), "http://h:1/pre/d/");
        assert_eq!(join_url(&base, "100%/x", false).as_str(), "http://h:1/pre/100%25/x");
    }

    #[test]
    fn base_urls_lose_credentials_in_their_id() {
        let (base, id) = base_url("https://u:secret@h/a/b?x=1#f").unwrap();
        assert_eq!(base.as_str(), "https://u:secret@h/a/b/");
        assert_eq!(id, "https://h/a/b");
        assert!(base_url("ftp://h/").is_err());
    }

    #[test]
    fn content_range_forms() {
        assert_eq!(parse_content_range("bytes 0-9/100"), Some((0..10, Some(100))));
        assert_eq!(parse_content_range("bytes 5-5/*"), Some((5..6, None)));
        assert_eq!(parse_content_range("bytes 9-0/100"), None);
        assert_eq!(parse_content_range("bytes 0-100/100"), None, "end past total");
        assert_eq!(parse_content_range("bytes */100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }

    #[test]
    fn max_age_directives() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_max_age(&h), None);
        h.insert("cache-control", "public, max-age=120".parse().unwrap());
        assert_eq!(parse_max_age(&h), Some(Duration::from_secs(120)));
        h.insert("cache-control", "no-cache".parse().unwrap());
        assert_eq!(parse_max_age(&h), Some(Duration::ZERO));
    }

    #[test]
    fn tokens_are_never_shown() {
        let t = BearerToken::new("afs1.payload.mac\n").unwrap();
        assert_eq!(format!("{t:?}"), "BearerToken(<hidden>)");
        assert_eq!(serde_json::to_string(&t).unwrap(), "\"<hidden>\"");
        let h = t.headers();
        let v = &h[http::header::AUTHORIZATION];
        assert!(v.is_sensitive());
        assert_eq!(v.to_str().unwrap(), "Bearer afs1.payload.mac");
        assert!(!format!("{h:?}").contains("payload"), "{h:?}");
        let e = BearerToken::new("afs1.a b").unwrap_err();
        assert!(!e.contains("afs1"), "{e}");
        assert!(BearerToken::new(" \n").is_err());
        // eyJtb2RlIjoicmVhZCJ9 is {"mode":"read"}, eyJtb2RlIjoicmVhZC13cml0ZSJ9 {"mode":"read-write"}.
        assert!(BearerToken::new("afs1.eyJtb2RlIjoicmVhZCJ9.x").unwrap().is_read_only());
        assert!(
            !BearerToken::new("afs1.eyJtb2RlIjoicmVhZC13cml0ZSJ9.x")
                .unwrap()
                .is_read_only()
        );
        assert!(!t.is_read_only());
    }

    #[test]
    fn every_status_is_classified() {
        // A table over every status: only overload and server failures are retried.
        for code in 100u16..600 {
            let Ok(s) = StatusCode::from_u16(code) else { continue };
            let expect = matches!(code, 408 | 429 | 500 | 502 | 503 | 504);
            assert_eq!(status_is_transient(s), expect, "status {code}");
        }
    }
}
