//! End-to-end tests of the artifact server: a real `ServerHandle` on `127.0.0.1:0` over a
//! temporary folder, spoken to with reqwest and, where URL normalisation would hide the case
//! (`..` and friends), with raw HTTP over a `TcpStream`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::{StatusCode, header};

use super::*;
use crate::protocol::{
    DigestList, EntryKind, ErrorBody, ListPage, ServerStats, chunk_digests, etag_from_digests, quote_etag,
};
pub(super) use crate::testing::noise as data;

pub(super) const MIB: usize = 1 << 20;

pub(super) fn tag_of(bytes: &[u8]) -> String {
    etag_from_digests(
        bytes.len() as u64,
        DIGEST_CHUNK_SIZE,
        &chunk_digests(bytes, DIGEST_CHUNK_SIZE),
    )
}

pub(super) struct Fixture {
    pub(super) tmp: tempfile::TempDir,
    pub(super) server: ServerHandle,
}

impl Fixture {
    pub(super) fn new(build: impl FnOnce(&Path)) -> Fixture {
        Fixture::with_config(build, |_| {})
    }

    pub(super) fn with_config(build: impl FnOnce(&Path), tweak: impl FnOnce(&mut ServerConfig)) -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("root")).unwrap();
        build(&tmp.path().join("root"));
        let mut cfg = ServerConfig::local(tmp.path().join("root"));
        tweak(&mut cfg);
        let server = ServerHandle::start(cfg).unwrap();
        Fixture { tmp, server }
    }

    pub(super) fn root(&self) -> PathBuf {
        self.tmp.path().join("root")
    }

    pub(super) fn url(&self, path: &str) -> String {
        format!("{}{}", self.server.url(), path)
    }

    pub(super) fn restart(&mut self) {
        let cfg = ServerConfig::local(self.root());
        // The new server starts while the old one is idle; then the old one stops.
        let old = std::mem::replace(&mut self.server, ServerHandle::start(cfg).unwrap());
        drop(old);
    }

    /// Waits until every response (bodies included) is finished.
    pub(super) fn settle(&self) -> ServerStats {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = self.server.stats().snapshot();
            if s.active == 0 || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

pub(super) fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder().no_proxy().build().unwrap()
}

pub(super) async fn get(c: &reqwest::Client, url: &str, headers: &[(header::HeaderName, &str)]) -> Resp {
    let mut req = c.get(url);
    for (k, v) in headers {
        req = req.header(k, *v);
    }
    Resp::from(req.send().await.unwrap()).await
}

pub(super) struct Resp {
    pub(super) status: StatusCode,
    pub(super) headers: http::HeaderMap,
    pub(super) body: Vec<u8>,
}

impl Resp {
    pub(super) async fn from(r: reqwest::Response) -> Resp {
        let status = r.status();
        let headers = r.headers().clone();
        let body = r.bytes().await.unwrap().to_vec();
        Resp { status, headers, body }
    }

    pub(super) fn header(&self, name: impl header::AsHeaderName) -> &str {
        self.headers.get(name).map(|v| v.to_str().unwrap()).unwrap_or("")
    }

    pub(super) fn error_code(&self) -> String {
        serde_json::from_slice::<ErrorBody>(&self.body).unwrap().code
    }

    pub(super) fn json<T: serde::de::DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// One raw HTTP/1.1 request with `Connection: close`; the target is sent exactly as given.
fn raw(addr: SocketAddr, method: &str, target: &str) -> RawResp {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    RawResp::parse(&all)
}

struct RawResp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResp {
    fn parse(all: &[u8]) -> RawResp {
        let split = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("no end of headers");
        let head = std::str::from_utf8(&all[..split]).unwrap();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
        let headers = lines
            .map(|l| {
                let (k, v) = l.split_once(':').unwrap();
                (k.trim().to_ascii_lowercase(), v.trim().to_string())
            })
            .collect();
        RawResp {
            status,
            headers,
            body: all[split + 4..].to_vec(),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn code(&self) -> String {
        serde_json::from_slice::<ErrorBody>(&self.body).unwrap().code
    }
}

#[tokio::test]
async fn full_and_ranged_gets_return_exact_bytes() {
    let content = data(3 * MIB + 123, 1);
    let c2 = content.clone();
    let f = Fixture::new(move |r| std::fs::write(r.join("f.bin"), &c2).unwrap());
    let c = client();
    let url = f.url("/f.bin");
    let size = content.len() as u64;

    let r = get(&c, &url, &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body, content);
    assert_eq!(r.header(header::CONTENT_LENGTH), size.to_string());

    let cases: &[(&str, u64, u64)] = &[
        ("bytes=0-0", 0, 0),
        ("bytes=100-2000000", 100, 2_000_000),
        ("bytes=1048575-1048576", 1_048_575, 1_048_576),
        ("bytes=-500", size - 500, size - 1),
        ("bytes=3000000-", 3_000_000, size - 1),
        ("bytes=10-99999999999", 10, size - 1),
        ("bytes=-99999999", 0, size - 1),
    ];
    for &(range, start, end) in cases {
        let r = get(&c, &url, &[(header::RANGE, range)]).await;
        assert_eq!(r.status, StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            r.header(header::CONTENT_RANGE),
            format!("bytes {start}-{end}/{size}"),
            "{range}"
        );
        assert_eq!(r.body, &content[start as usize..=end as usize], "{range}");
    }

    for unsat in [format!("bytes={size}-"), format!("bytes={}-{}", size + 5, size + 9)] {
        let r = get(&c, &url, &[(header::RANGE, &unsat)]).await;
        assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE, "{unsat}");
        assert_eq!(r.header(header::CONTENT_RANGE), format!("bytes */{size}"));
        assert_eq!(r.error_code(), "range_not_satisfiable");
    }

    // Several ranges or bad syntax: the whole file with 200.
    for ignored in ["bytes=0-1,5-9", "bytes=9-1", "chars=0-1", "bytes=x"] {
        let r = get(&c, &url, &[(header::RANGE, ignored)]).await;
        assert_eq!(r.status, StatusCode::OK, "{ignored}");
        assert_eq!(r.body.len(), content.len(), "{ignored}");
    }
}

#[tokio::test]
async fn empty_file() {
    let f = Fixture::new(|r| std::fs::write(r.join("empty"), b"").unwrap());
    let c = client();
    let r = get(&c, &f.url("/empty"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());
    assert_eq!(r.header(header::ETAG), quote_etag(&tag_of(b"")));
    let r = get(&c, &f.url("/empty"), &[(header::RANGE, "bytes=0-")]).await;
    assert_eq!(r.status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(r.header(header::CONTENT_RANGE), "bytes */0");
}

#[tokio::test]
async fn head_sends_every_header_and_no_body() {
    let content = data(5000, 2);
    let c2 = content.clone();
    let f = Fixture::with_config(
        move |r| {
            std::fs::write(r.join("f"), &c2).unwrap();
            std::fs::create_dir(r.join("d")).unwrap();
        },
        |cfg| cfg.max_age = Some(Duration::from_secs(60)),
    );
    let c = client();
    let r = Resp::from(c.head(f.url("/f")).send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.body.is_empty());
    assert_eq!(r.header(header::CONTENT_LENGTH), "5000");
    assert_eq!(r.header(header::ETAG), quote_etag(&tag_of(&content)));
    assert_eq!(r.header(header::ACCEPT_RANGES), "bytes");
    assert_eq!(r.header(KIND_HEADER), "file");
    assert_eq!(r.header(header::CONTENT_TYPE), "application/octet-stream");
    assert_eq!(r.header(header::CACHE_CONTROL), "max-age=60");
    let mtime = std::fs::metadata(f.root().join("f")).unwrap().modified().unwrap();
    assert_eq!(r.header(header::LAST_MODIFIED), httpdate::fmt_http_date(mtime));

    // A Range on HEAD is ignored (range handling is defined for GET only).
    let r = Resp::from(
        c.head(f.url("/f"))
            .header(header::RANGE, "bytes=0-9")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(r.status, StatusCode::OK);

    for dir in ["/d", "/d/", "/"] {
        let r = Resp::from(c.head(f.url(dir)).send().await.unwrap()).await;
        assert_eq!(r.status, StatusCode::OK, "{dir}");
        assert_eq!(r.header(KIND_HEADER), "dir", "{dir}");
        assert!(r.body.is_empty());
    }

    // Without --max-age there is no Cache-Control.
    let plain = Fixture::new(|r| std::fs::write(r.join("f"), b"x").unwrap());
    let r = get(&c, &plain.url("/f"), &[]).await;
    assert!(r.headers.get(header::CACHE_CONTROL).is_none());
}

#[tokio::test]
async fn etag_and_digests_follow_the_content() {
    let content = data(2 * MIB + 7, 3);
    let c2 = content.clone();
    let f = Fixture::new(move |r| std::fs::write(r.join("f"), &c2).unwrap());
    let c = client();
    let r = get(&c, &f.url("/f"), &[]).await;
    let tag = tag_of(&content);
    assert_eq!(r.header(header::ETAG), quote_etag(&tag));

    let r = get(&c, &f.url("/f?afs=digests"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.header(header::ETAG), quote_etag(&tag));
    let list: DigestList = r.json();
    let want: Vec<String> = chunk_digests(&content, DIGEST_CHUNK_SIZE)
        .iter()
        .map(hex::encode)
        .collect();
    assert_eq!(
        list,
        DigestList {
            etag: tag.clone(),
            size: content.len() as u64,
            chunk_size: DIGEST_CHUNK_SIZE,
            algorithm: "blake3".into(),
            digests: want,
            // Checked against known values of a standard CRC32C in protocol.rs.
            crc32c: Some(
                crate::protocol::chunk_crc32c(&content, DIGEST_CHUNK_SIZE)
                    .iter()
                    .map(|c| format!("{c:08x}"))
                    .collect()
            ),
        }
    );
    let quoted = quote_etag(&tag);
    let r = get(&c, &f.url("/f?afs=digests"), &[(header::IF_NONE_MATCH, &quoted)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert_eq!(r.header(header::ETAG), quoted);
    let r = get(&c, &f.url("/f?afs=digests"), &[(header::IF_MATCH, "\"nope\"")]).await;
    assert_eq!(r.status, StatusCode::PRECONDITION_FAILED);
    assert_eq!(r.error_code(), "precondition_failed");
}

#[tokio::test]
async fn etag_changes_when_rewritten_in_place_with_the_same_size_and_mtime() {
    let old = data(300_000, 4);
    let o2 = old.clone();
    let f = Fixture::new(move |r| std::fs::write(r.join("f"), &o2).unwrap());
    let c = client();
    let path = f.root().join("f");
    let r = get(&c, &f.url("/f"), &[]).await;
    assert_eq!(r.header(header::ETAG), quote_etag(&tag_of(&old)));
    let before = std::fs::metadata(&path).unwrap();

    std::thread::sleep(Duration::from_millis(20));
    let mut new = old.clone();
    new[150_000] ^= 0xff;
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&new[150_000..150_001], 150_000).unwrap();
    file.set_modified(before.modified().unwrap()).unwrap();
    drop(file);
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (after.ino(), after.size(), after.mtime(), after.mtime_nsec()),
        (before.ino(), before.size(), before.mtime(), before.mtime_nsec())
    );
    assert_ne!(
        (after.ctime(), after.ctime_nsec()),
        (before.ctime(), before.ctime_nsec())
    );

    let r = get(&c, &f.url("/f"), &[]).await;
    assert_eq!(r.body, new);
    assert_eq!(r.header(header::ETAG), quote_etag(&tag_of(&new)));
    assert_ne!(tag_of(&new), tag_of(&old));
}

#[tokio::test]
async fn sidecar_is_written_for_large_files_and_reused_after_a_restart() {
    let content = data(9 * MIB + 5, 5);
    let c2 = content.clone();
    let mut f = Fixture::new(move |r| {
        std::fs::write(r.join("big"), &c2).unwrap();
        std::fs::write(r.join("small"), b"small").unwrap();
    });
    let c = client();
    let tag = tag_of(&content);
    let r = Resp::from(c.head(f.url("/big")).send().await.unwrap()).await;
    assert_eq!(r.header(header::ETAG), quote_etag(&tag));
    get(&c, &f.url("/small"), &[]).await;

    let name = blake3::hash(b"big").to_hex();
    let sidecar = f
        .root()
        .join(".artifactfs/digests")
        .join(&name[..2])
        .join(format!("{name}.json"));
    let meta = std::fs::metadata(&sidecar).expect("sidecar of the large file");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
    let fmeta = std::fs::metadata(f.root().join("big")).unwrap();
    assert_eq!(json["etag"], tag.as_str());
    assert_eq!(json["ino"], fmeta.ino());
    assert_eq!(json["size"], content.len() as u64);
    assert_eq!(json["chunk_size"], DIGEST_CHUNK_SIZE);
    assert_eq!(json["digests"].as_array().unwrap().len(), 10);
    // Small files get no sidecar: the only one is the big file's.
    let count = walk_files(&f.root().join(".artifactfs/digests"));
    assert_eq!(count, 1);

    f.restart();
    std::thread::sleep(Duration::from_millis(20));
    let r = Resp::from(c.head(f.url("/big")).send().await.unwrap()).await;
    assert_eq!(r.header(header::ETAG), quote_etag(&tag));
    // The listing knows the tag from the sidecar without hashing.
    let page: ListPage = get(&c, &f.url("/?afs=list"), &[]).await.json();
    let big = page.entries.iter().find(|e| e.name == "big").unwrap();
    assert_eq!(big.etag.as_deref(), Some(tag.as_str()));
    // Not rewritten: a fresh hash would have renamed a new file over it.
    let again = std::fs::metadata(&sidecar).unwrap();
    assert_eq!(
        (again.ino(), again.mtime(), again.mtime_nsec()),
        (meta.ino(), meta.mtime(), meta.mtime_nsec())
    );
}

pub(super) fn walk_files(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            n += walk_files(&e.path());
        } else {
            n += 1;
        }
    }
    n
}

#[tokio::test]
async fn listing_pages_give_every_name_once_in_order() {
    let f = Fixture::new(|r| {
        std::fs::create_dir(r.join("many")).unwrap();
        for i in 0..2500 {
            // Mixed widths so bytewise order differs from numeric order.
            std::fs::write(r.join("many").join(format!("n{i}")), i.to_string()).unwrap();
        }
        std::fs::create_dir(r.join("many/sub")).unwrap();
    });
    let c = client();
    let mut want: Vec<String> = (0..2500).map(|i| format!("n{i}")).collect();
    want.push("sub".into());
    want.sort();

    let mut got = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut url = f.url("/many/?afs=list&limit=1000");
        if let Some(a) = &after {
            url.push_str(&format!("&after={a}"));
        }
        let r = get(&c, &url, &[]).await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.header(KIND_HEADER), "dir");
        let page: ListPage = r.json();
        assert_eq!(page.path, "many");
        assert!(page.entries.len() <= 1000);
        pages += 1;
        for e in &page.entries {
            if e.name == "sub" {
                assert_eq!((e.kind, e.size, e.etag.as_deref()), (EntryKind::Dir, 0, None));
            } else {
                let n = &e.name[1..];
                assert_eq!(e.kind, EntryKind::File);
                assert_eq!(e.size, n.len() as u64);
                assert_eq!(e.etag.as_deref(), Some(tag_of(n.as_bytes()).as_str()));
            }
        }
        got.extend(page.entries.into_iter().map(|e| e.name));
        match page.next {
            Some(n) => {
                assert_eq!(Some(&n), got.last());
                after = Some(n);
            }
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(got, want);

    // `GET /dir/` without `afs` is the same listing.
    let plain: ListPage = get(&c, &f.url("/many"), &[]).await.json();
    assert_eq!(plain.entries.len(), 1000);
    assert_eq!(plain.entries[0].name, want[0]);
}

#[tokio::test]
async fn listing_revalidates_with_its_own_etag() {
    let f = Fixture::new(|r| std::fs::write(r.join("a"), b"a").unwrap());
    let c = client();
    let r = get(&c, &f.url("/?afs=list"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let tag = r.header(header::ETAG).to_string();
    assert!(tag.starts_with('"') && tag.len() == 34, "{tag}");
    let r = get(&c, &f.url("/?afs=list"), &[(header::IF_NONE_MATCH, &tag)]).await;
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(r.body.is_empty());
    assert_eq!(r.header(header::ETAG), tag);

    std::fs::write(f.root().join("b"), b"b").unwrap();
    let r = get(&c, &f.url("/?afs=list"), &[(header::IF_NONE_MATCH, &tag)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_ne!(r.header(header::ETAG), tag);
    let page: ListPage = r.json();
    let names: Vec<_> = page.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

#[tokio::test]
async fn listing_leaves_out_what_is_not_served() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"s").unwrap();
    let out = outside.path().to_path_buf();
    let f = Fixture::new(move |r| {
        std::fs::write(r.join("file"), b"x").unwrap();
        std::os::unix::fs::symlink(&out, r.join("escape")).unwrap();
        std::os::unix::fs::symlink(out.join("secret"), r.join("escape-file")).unwrap();
        std::os::unix::fs::symlink("file", r.join("inside")).unwrap();
        let bad = std::ffi::OsStr::from_bytes(b"bad\xffname");
        std::fs::write(r.join(bad), b"b").unwrap();
    });
    let c = client();
    let page: ListPage = get(&c, &f.url("/"), &[]).await.json();
    let names: Vec<_> = page.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["file", "inside"]);
    assert_eq!(page.entries[1].kind, EntryKind::File);
    assert_eq!(page.entries[1].etag, page.entries[0].etag);
    let r = get(&c, &f.url("/inside"), &[]).await;
    assert_eq!(r.body, b"x");
}

#[tokio::test]
async fn conditional_gets() {
    let content = data(10_000, 6);
    let c2 = content.clone();
    let f = Fixture::new(move |r| std::fs::write(r.join("f"), &c2).unwrap());
    let c = client();
    let url = f.url("/f");
    let r = get(&c, &url, &[]).await;
    let tag = r.header(header::ETAG).to_string();
    let lm = r.header(header::LAST_MODIFIED).to_string();
    let weak = format!("W/{tag}");
    let listed = format!("\"x\", {tag}");
    let earlier = httpdate::fmt_http_date(httpdate::parse_http_date(&lm).unwrap() - Duration::from_secs(10));

    let cases: Vec<(Vec<(header::HeaderName, &str)>, StatusCode)> = vec![
        (vec![(header::IF_NONE_MATCH, &tag)], StatusCode::NOT_MODIFIED),
        (vec![(header::IF_NONE_MATCH, &weak)], StatusCode::NOT_MODIFIED),
        (vec![(header::IF_NONE_MATCH, &listed)], StatusCode::NOT_MODIFIED),
        (vec![(header::IF_NONE_MATCH, "*")], StatusCode::NOT_MODIFIED),
        (vec![(header::IF_NONE_MATCH, "\"other\"")], StatusCode::OK),
        (vec![(header::IF_MATCH, &tag)], StatusCode::OK),
        (vec![(header::IF_MATCH, "*")], StatusCode::OK),
        (vec![(header::IF_MATCH, &weak)], StatusCode::PRECONDITION_FAILED),
        (vec![(header::IF_MATCH, "\"other\"")], StatusCode::PRECONDITION_FAILED),
        (vec![(header::IF_MODIFIED_SINCE, &lm)], StatusCode::NOT_MODIFIED),
        (vec![(header::IF_MODIFIED_SINCE, &earlier)], StatusCode::OK),
        (
            vec![(header::IF_UNMODIFIED_SINCE, &earlier)],
            StatusCode::PRECONDITION_FAILED,
        ),
        (vec![(header::IF_UNMODIFIED_SINCE, &lm)], StatusCode::OK),
        (
            vec![(header::RANGE, "bytes=0-9"), (header::IF_RANGE, &tag)],
            StatusCode::PARTIAL_CONTENT,
        ),
        (
            vec![(header::RANGE, "bytes=0-9"), (header::IF_RANGE, &lm)],
            StatusCode::PARTIAL_CONTENT,
        ),
        (
            vec![(header::RANGE, "bytes=0-9"), (header::IF_RANGE, "\"old\"")],
            StatusCode::OK,
        ),
        (
            vec![(header::RANGE, "bytes=0-9"), (header::IF_RANGE, &weak)],
            StatusCode::OK,
        ),
        (
            vec![(header::RANGE, "bytes=0-9"), (header::IF_RANGE, &earlier)],
            StatusCode::OK,
        ),
        (
            vec![(header::IF_MATCH, &tag), (header::RANGE, "bytes=5-")],
            StatusCode::PARTIAL_CONTENT,
        ),
    ];
    for (headers, want) in cases {
        let r = get(&c, &url, &headers).await;
        assert_eq!(r.status, want, "{headers:?}");
        match want {
            StatusCode::NOT_MODIFIED => {
                assert!(r.body.is_empty());
                assert_eq!(r.header(header::ETAG), tag);
                assert_eq!(r.header(header::LAST_MODIFIED), lm);
            }
            StatusCode::PRECONDITION_FAILED => assert_eq!(r.error_code(), "precondition_failed"),
            StatusCode::OK => assert_eq!(r.body, content),
            _ => {
                let start: usize = if headers.iter().any(|(_, v)| *v == "bytes=5-") {
                    5
                } else {
                    0
                };
                let end = if start == 5 { content.len() } else { 10 };
                assert_eq!(r.body, &content[start..end]);
            }
        }
    }
}

#[test]
fn path_escapes_are_refused_on_the_wire() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"secret").unwrap();
    let out = outside.path().to_path_buf();
    let f = Fixture::new(move |r| {
        std::fs::create_dir(r.join("sub")).unwrap();
        std::fs::write(r.join("sub/f"), b"ok").unwrap();
        std::fs::write(r.join("a b"), b"space").unwrap();
        std::os::unix::fs::symlink(&out, r.join("out")).unwrap();
        std::os::unix::fs::symlink(out.join("secret"), r.join("sub/leak")).unwrap();
    });
    let addr = f.server.addr();
    let secret_name = outside.path().file_name().unwrap().to_str().unwrap().to_string();

    let ok = raw(addr, "GET", "/sub/f");
    assert_eq!((ok.status, ok.body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(raw(addr, "GET", "/a%20b").body, b"space");

    let bad_paths = [
        "/..".to_string(),
        "/../".to_string(),
        format!("/../{secret_name}/secret"),
        "/sub/../sub/f".to_string(),
        "/sub/./f".to_string(),
        "/%2e%2e/etc/passwd".to_string(),
        "/%2E%2E/etc/passwd".to_string(),
        "/sub/%2e%2e/%2e%2e/etc/passwd".to_string(),
        "/sub%2f..%2f..%2fetc%2fpasswd".to_string(),
        "/sub%2F%2E%2E%2Fsub%2Ff".to_string(),
        "/sub//f".to_string(),
        "/sub/f%00".to_string(),
        "/sub%5cf".to_string(),
        "/..%5c..%5cetc".to_string(),
    ];
    for p in &bad_paths {
        let r = raw(addr, "GET", p);
        assert_eq!(r.status, 400, "{p}");
        assert_eq!(r.code(), "bad_path", "{p}");
    }
    for p in ["/out/secret", "/out", "/out/", "/sub/leak", "/out/?afs=list"] {
        let r = raw(addr, "GET", p);
        assert_eq!(r.status, 403, "{p}");
        assert_eq!(r.code(), "forbidden", "{p}");
    }
    for p in [
        "/.artifactfs",
        "/.artifactfs/",
        "/.artifactfs/digests",
        "/%2eartifactfs/digests",
        "/nope",
    ] {
        let r = raw(addr, "GET", p);
        assert_eq!(r.status, 404, "{p}");
        assert_eq!(r.code(), "not_found", "{p}");
    }
    // A file with a trailing slash is not a folder.
    assert_eq!(raw(addr, "GET", "/sub/f/").status, 404);
    // HEAD too.
    assert_eq!(raw(addr, "HEAD", "/%2e%2e/x").status, 400);
}

#[test]
fn operations_methods_and_errors() {
    let f = Fixture::new(|r| {
        std::fs::write(r.join("f"), b"x").unwrap();
        std::fs::create_dir(r.join("d")).unwrap();
    });
    let addr = f.server.addr();
    let r = raw(addr, "GET", "/d/?afs=info");
    assert_eq!(r.status, 200);
    let info: ServerInfo = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(info, server_info(true));
    assert!(info.capabilities.writes && info.capabilities.partial_writes && info.capabilities.content_chunks);
    assert_eq!(info.protocol, "artifactfs/1");
    assert_eq!(info.chunk_size, 1 << 20);
    assert_eq!(info.max_list_limit, 10_000);

    for (method, target, status, code) in [
        ("POST", "/f", 405, "method_not_allowed"),
        ("PATCH", "/f", 405, "method_not_allowed"),
        ("GET", "/f?afs=append", 405, "method_not_allowed"),
        ("PUT", "/f?afs=mkdir", 405, "method_not_allowed"),
        ("DELETE", "/f?afs=commit", 405, "method_not_allowed"),
        ("POST", "/?afs=info", 405, "method_not_allowed"),
        ("GET", "/f?afs=bogus", 400, "bad_request"),
        ("GET", "/f?afs=list", 400, "bad_request"),
        ("GET", "/d?afs=digests", 400, "bad_request"),
        ("GET", "/d/?afs=list&limit=0", 400, "bad_request"),
        ("GET", "/d/?afs=list&limit=ten", 400, "bad_request"),
        ("GET", "/missing?afs=digests", 404, "not_found"),
    ] {
        let r = raw(addr, method, target);
        assert_eq!(r.status, status, "{method} {target}");
        assert_eq!(r.code(), code, "{method} {target}");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    assert_eq!(
        raw(addr, "POST", "/f").header("allow"),
        Some("GET, HEAD, PUT, POST, DELETE")
    );
}

#[tokio::test]
async fn stats_count_exactly() {
    let content = data(2 * MIB + 10, 7);
    let c2 = content.clone();
    let f = Fixture::new(move |r| std::fs::write(r.join("f"), &c2).unwrap());
    let c = client();
    let url = f.url("/f");
    let r = get(&c, &url, &[]).await;
    let tag = r.header(header::ETAG).to_string();
    get(&c, &url, &[(header::RANGE, "bytes=100-199")]).await;
    get(&c, &url, &[(header::RANGE, "bytes=-5")]).await;
    get(&c, &url, &[(header::IF_NONE_MATCH, &tag)]).await;
    get(&c, &url, &[(header::IF_MATCH, "\"x\"")]).await;
    get(&c, &url, &[(header::RANGE, "bytes=99999999-")]).await;
    c.head(&url).send().await.unwrap();
    get(&c, &f.url("/?afs=list"), &[]).await;
    get(&c, &f.url("/f?afs=digests"), &[]).await;
    let s = f.settle();
    assert_eq!(
        s,
        ServerStats {
            requests: 9,
            file_bytes_sent: content.len() as u64 + 100 + 5,
            gets: 6,
            ranged_gets: 2,
            heads: 1,
            lists: 1,
            digests: 1,
            not_modified: 1,
            precondition_failed: 1,
            active: 0,
            max_active: 1,
            writes: 0,
            bytes_received: 0,
            parts_copied_bytes: 0,
            bundles: 0,
            bundled_files: 0,
        }
    );
    // Over HTTP, the stats request counts itself.
    let over_http: ServerStats = get(&c, &f.url("/?afs=stats"), &[]).await.json();
    assert_eq!(over_http.requests, 10);
    assert_eq!(over_http.active, 1);
    assert_eq!(over_http.file_bytes_sent, s.file_bytes_sent);

    f.server.stats().reset();
    let s = f.settle();
    assert_eq!((s.requests, s.file_bytes_sent, s.gets), (0, 0, 0));
}

#[test]
fn abandoned_body_is_no_longer_active() {
    let f = Fixture::new(|r| std::fs::write(r.join("big"), data(64 * MIB, 8)).unwrap());
    let mut s = TcpStream::connect(f.server.addr()).unwrap();
    write!(s, "GET /big HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = s.read(&mut buf).unwrap();
    assert!(n > 0);
    let busy = f.server.stats().snapshot();
    assert_eq!(busy.active, 1);
    drop(s);
    let after = f.settle();
    assert_eq!(after.active, 0);
    assert!(after.file_bytes_sent < 64 * MIB as u64);
}

#[test]
fn body_is_cut_short_when_the_file_changes_while_it_is_sent() {
    let old = data(64 * MIB, 9);
    let o2 = old.clone();
    let f = Fixture::new(move |r| std::fs::write(r.join("big"), &o2).unwrap());
    std::thread::sleep(Duration::from_millis(20));
    let mut s = TcpStream::connect(f.server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    // Read the headers and a little of the body, slowly.
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    while got.len() < 512 * 1024 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
        std::thread::sleep(Duration::from_millis(5));
    }
    // Rewrite the file in place (same inode), changing every chunk.
    let mut new = old.clone();
    for b in new.iter_mut().step_by(4096) {
        *b ^= 0x5a;
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(f.root().join("big"))
        .unwrap();
    file.write_all_at(&new, 0).unwrap();
    drop(file);
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
    let resp = RawResp::parse(&got);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("content-length"), Some("67108864"));
    assert!(resp.body.len() < old.len(), "the body must end short of Content-Length");
    // Every byte that was sent is from the version the tag names.
    assert_eq!(resp.body, &old[..resp.body.len()]);
    assert_eq!(resp.header("etag").unwrap(), quote_etag(&tag_of(&old)));
}

#[test]
fn keep_alive_serves_several_requests_on_one_connection() {
    let f = Fixture::new(|r| std::fs::write(r.join("f"), b"0123456789").unwrap());
    let mut s = TcpStream::connect(f.server.addr()).unwrap();
    for range in ["0-1", "5-9"] {
        write!(s, "GET /f HTTP/1.1\r\nHost: x\r\nRange: bytes={range}\r\n\r\n").unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the headers and the announced body are in.
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
            if let Some(p) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                let r = RawResp::parse(&got);
                let len: usize = r.header("content-length").unwrap().parse().unwrap();
                if got.len() >= p + 4 + len {
                    break;
                }
            }
        }
        let r = RawResp::parse(&got);
        assert_eq!(r.status, 206);
        let (a, b) = range.split_once('-').unwrap();
        let (a, b): (usize, usize) = (a.parse().unwrap(), b.parse().unwrap());
        assert_eq!(r.body, &b"0123456789"[a..=b]);
    }
}

#[test]
fn shutdown_is_prompt_with_idle_connections_and_bounded_with_stalled_bodies() {
    let f = Fixture::new(|r| std::fs::write(r.join("big"), data(64 * MIB, 10)).unwrap());
    let Fixture { tmp, server } = f;
    let addr = server.addr();
    // An idle keep-alive connection, as a client pool leaves behind.
    let mut idle = TcpStream::connect(addr).unwrap();
    write!(idle, "GET /?afs=info HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 4096];
    assert!(idle.read(&mut buf).unwrap() > 0);
    let t = Instant::now();
    drop(server);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert!(TcpStream::connect(addr).is_err(), "still accepting");

    // A client that stops reading mid-body holds the shutdown for the grace period only.
    let server = ServerHandle::start(ServerConfig::local(tmp.path().join("root"))).unwrap();
    let mut stalled = TcpStream::connect(server.addr()).unwrap();
    write!(stalled, "GET /big HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    assert!(stalled.read(&mut buf).unwrap() > 0);
    let t = Instant::now();
    drop(server);
    let took = t.elapsed();
    assert!(took < SHUTDOWN_GRACE + Duration::from_secs(3), "{took:?}");
}
