//! The web store against real servers: nginx (WebDAV, JSON and HTML indexes, no ranges) and
//! Apache `mod_dav`, each started on 127.0.0.1 by the test.

use std::time::Duration;

use futures_util::StreamExt;

use super::*;
use crate::store::Content;
use crate::testing::noise;
use crate::testing::web::{NginxMode, WebServer};

async fn connect(url: &str, web: WebConfig) -> WebStore {
    let cfg = HttpConfig {
        retries: 1,
        retry_min_delay: Duration::from_millis(10),
        retry_max_delay: Duration::from_millis(50),
        ..HttpConfig::default()
    };
    WebStore::connect(url, cfg, &web).await.unwrap()
}

async fn body(r: GetResponse) -> Vec<u8> {
    let mut out = Vec::new();
    let mut b = r.body;
    while let Some(p) = b.next().await {
        out.extend_from_slice(&p.unwrap());
    }
    out
}

fn file(h: Revalidated<Head>) -> ObjectMeta {
    match h {
        Revalidated::Modified(Head::File(m)) => m,
        other => panic!("not a file: {other:?}"),
    }
}

fn names(l: &Listing) -> Vec<(String, EntryKind, u64)> {
    let mut v: Vec<_> = l.entries.iter().map(|e| (e.name.clone(), e.kind, e.size)).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn tree(s: &WebServer) -> Vec<u8> {
    let data = noise(300_000, 1);
    s.write("a.bin", &data);
    s.write("sp ace/f&g <x>.txt", b"hello");
    s.write("sub/deep/z", b"");
    data
}

async fn listed(st: &WebStore, dir: &str) -> Listing {
    match st.list(dir, None).await.unwrap() {
        Revalidated::Modified(l) => l,
        Revalidated::NotModified => panic!("no validator was sent"),
    }
}

/// What every kind of server must do alike for reading.
async fn reads_like_a_filesystem(s: &WebServer, st: &WebStore) {
    let data = tree(s);
    let root = listed(st, "").await;
    assert_eq!(
        names(&root),
        [
            ("a.bin".into(), EntryKind::File, 300_000),
            ("sp ace".into(), EntryKind::Dir, 0),
            ("sub".into(), EntryKind::Dir, 0)
        ]
    );
    let inner = listed(st, "sp ace").await;
    assert_eq!(names(&inner), [("f&g <x>.txt".into(), EntryKind::File, 5)]);
    assert!(matches!(st.list("nope", None).await, Err(StoreError::NotFound)));

    let m = file(st.head("a.bin", None).await.unwrap());
    assert_eq!(m.size, 300_000);
    let tag = m.etag.clone().expect("a version tag");
    assert!(matches!(
        st.head("sub", None).await.unwrap(),
        Revalidated::Modified(Head::Dir { .. })
    ));
    assert!(matches!(st.head("missing", None).await, Err(StoreError::NotFound)));
    assert_eq!(
        file(st.head("sub/deep/z", None).await.unwrap()).size,
        0,
        "an empty file"
    );
    assert_eq!(st.head("a.bin", Some(&tag)).await.unwrap(), Revalidated::NotModified);

    let r = st.get("a.bin", Some(1000..70_000), Some(&tag)).await.unwrap();
    assert_eq!(r.etag.as_ref(), Some(&tag), "the answer names the same version");
    let whole = matches!(r.content, Content::Whole { .. });
    let got = body(r).await;
    if whole {
        assert_eq!(got, data);
    } else {
        assert_eq!(got, &data[1000..70_000]);
    }
    let small = body(st.get("sp ace/f&g <x>.txt", None, None).await.unwrap()).await;
    assert_eq!(small, b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_webdav_reads() {
    let s = WebServer::nginx(NginxMode::Dav).unwrap();
    let st = connect(&s.url, WebConfig::default()).await;
    let d = st.detected();
    assert_eq!(d.listing, ListingForm::Propfind);
    assert!(d.writes && !d.partial_put && !d.conditional_writes, "{d:?}");
    reads_like_a_filesystem(&s, &st).await;
    // nginx honours If-Match on GET: a stale version is refused, not served.
    let stale = ETag::new("\"0-0\"");
    assert!(matches!(
        st.get("a.bin", Some(0..10), Some(&stale)).await,
        Err(StoreError::PreconditionFailed)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_json_index_reads() {
    let s = WebServer::nginx(NginxMode::JsonIndex).unwrap();
    let st = connect(&s.url, WebConfig::default()).await;
    assert_eq!(st.detected().listing, ListingForm::IndexJson);
    assert!(!st.detected().writes);
    assert!(!st.capabilities().writes);
    reads_like_a_filesystem(&s, &st).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_html_index_reads() {
    let s = WebServer::nginx(NginxMode::HtmlIndex).unwrap();
    let st = connect(&s.url, WebConfig::default()).await;
    assert_eq!(st.detected().listing, ListingForm::IndexHtml);
    reads_like_a_filesystem(&s, &st).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_ranges_answers_whole_files() {
    let s = WebServer::nginx(NginxMode::NoRanges).unwrap();
    let st = connect(&s.url, WebConfig::default()).await;
    reads_like_a_filesystem(&s, &st).await;
    let r = st.get("a.bin", Some(10..20), None).await.unwrap();
    assert_eq!(r.content, Content::Whole { size: Some(300_000) });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_html_index_reads_sizes_by_head() {
    let s = WebServer::apache().unwrap();
    let st = connect(
        &s.url,
        WebConfig {
            kind: RemoteKind::Index,
            ..WebConfig::default()
        },
    )
    .await;
    assert_eq!(st.detected().listing, ListingForm::IndexHtml);
    reads_like_a_filesystem(&s, &st).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_webdav_reads() {
    let s = WebServer::apache().unwrap();
    let st = connect(&s.url, WebConfig::default()).await;
    let d = st.detected();
    assert_eq!(d.listing, ListingForm::Propfind);
    assert!(d.writes && d.partial_put && d.conditional_writes, "{d:?}");
    reads_like_a_filesystem(&s, &st).await;
}

/// Writes every WebDAV server must take alike.
async fn writes_like_a_filesystem(s: &WebServer, st: &WebStore) {
    let a = st
        .put("new.txt", Bytes::from_static(b"one"), WriteCondition::Absent)
        .await
        .unwrap();
    assert_eq!(a.size, 3);
    assert_eq!(std::fs::read(s.path("new.txt")).unwrap(), b"one");
    let t1 = a.etag.clone().unwrap();
    assert!(matches!(
        st.put("new.txt", Bytes::from_static(b"two"), WriteCondition::Absent)
            .await,
        Err(StoreError::PreconditionFailed)
    ));
    // Same size, within the same second: the tag must still change.
    let b = st
        .put(
            "new.txt",
            Bytes::from_static(b"two"),
            WriteCondition::Matches(t1.clone()),
        )
        .await
        .unwrap();
    assert_ne!(b.etag.as_ref(), Some(&t1));
    assert_eq!(std::fs::read(s.path("new.txt")).unwrap(), b"two");
    assert!(matches!(
        st.put(
            "new.txt",
            Bytes::from_static(b"old"),
            WriteCondition::Matches(t1.clone())
        )
        .await,
        Err(StoreError::PreconditionFailed)
    ));
    assert_eq!(
        std::fs::read(s.path("new.txt")).unwrap(),
        b"two",
        "a refused write left no trace"
    );
    assert!(matches!(
        st.delete("new.txt", WriteCondition::Matches(t1)).await,
        Err(StoreError::PreconditionFailed)
    ));
    st.delete("new.txt", WriteCondition::Matches(b.etag.unwrap()))
        .await
        .unwrap();
    assert!(!s.path("new.txt").exists());

    let empty = st.put("empty", Bytes::new(), WriteCondition::Absent).await.unwrap();
    assert_eq!(empty.size, 0);
    assert_eq!(std::fs::read(s.path("empty")).unwrap(), b"");
    st.mkdir("d").await.unwrap();
    assert!(s.path("d").is_dir());
    assert!(matches!(st.mkdir("d").await, Err(StoreError::Conflict(c)) if c == "exists"));
    st.put("d/f", Bytes::from_static(b"x"), WriteCondition::Absent)
        .await
        .unwrap();
    assert!(matches!(st.rmdir("d").await, Err(StoreError::Conflict(c)) if c == "not_empty"));
    st.mkdir("e").await.unwrap();
    st.mkdir("e/inner").await.unwrap();
    assert!(
        matches!(st.rename("e", "d", WriteCondition::None).await, Err(StoreError::Conflict(c)) if c == "not_empty"),
        "a folder does not replace a folder with things in it"
    );
    st.rmdir("e/inner").await.unwrap();
    st.rename("d/f", "d/g", WriteCondition::None).await.unwrap();
    assert_eq!(std::fs::read(s.path("d/g")).unwrap(), b"x");
    st.rename("d", "e", WriteCondition::None).await.unwrap();
    assert!(s.path("e/g").exists() && !s.path("d").exists());
    assert!(matches!(
        st.rename("missing", "x", WriteCondition::None).await,
        Err(StoreError::NotFound)
    ));
    st.delete("e/g", WriteCondition::None).await.unwrap();
    st.rmdir("e").await.unwrap();
    assert!(!s.path("e").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_webdav_writes() {
    let s = WebServer::nginx(NginxMode::Dav).unwrap();
    let st = connect(&s.url, WebConfig::default()).await;
    writes_like_a_filesystem(&s, &st).await;
    // No partial PUT here: never tried, refused before a request is sent.
    s.write("p", b"abc");
    let before = s.requests().len();
    assert!(matches!(
        st.append("p", 3, Bytes::from_static(b"d"), WriteCondition::None).await,
        Err(StoreError::Unsupported(_))
    ));
    assert_eq!(s.requests().len(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_webdav_writes() {
    let s = WebServer::apache().unwrap();
    let st = connect(&s.url, WebConfig::default()).await;
    writes_like_a_filesystem(&s, &st).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apache_partial_puts_send_only_the_change() {
    let s = WebServer::apache().unwrap();
    let st = connect(&s.url, WebConfig::default()).await;
    let mut data = noise(4 << 20, 7);
    s.write("big", &data);
    let v = file(st.head("big", None).await.unwrap());
    let before = s.requests_at_least(1).len();
    // Right after a change Apache's tag is weak; the write waits for it to be strong.
    let tail = noise(1024, 8);
    let a = st
        .append(
            "big",
            data.len() as u64,
            Bytes::from(tail.clone()),
            WriteCondition::Matches(v.etag.unwrap()),
        )
        .await
        .unwrap();
    data.extend_from_slice(&tail);
    assert_eq!(a.size, data.len() as u64);
    let patch = noise(4096, 9);
    let w = st
        .write_range(
            "big",
            1 << 20,
            Bytes::from(patch.clone()),
            WriteCondition::Matches(a.etag.clone().unwrap()),
        )
        .await
        .unwrap();
    data[1 << 20..(1 << 20) + 4096].copy_from_slice(&patch);
    assert_eq!(w.size, data.len() as u64);
    assert_ne!(w.etag, a.etag);
    assert_eq!(std::fs::read(s.path("big")).unwrap(), data);
    let sent: u64 = s.requests_at_least(before + 4)[before..]
        .iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.bytes_in)
        .sum();
    assert!(sent < 16 << 10, "partial PUTs carried {sent} bytes");
    // A stale version is refused by the server itself.
    assert!(matches!(
        st.write_range(
            "big",
            0,
            Bytes::from_static(b"z"),
            WriteCondition::Matches(a.etag.unwrap())
        )
        .await,
        Err(StoreError::PreconditionFailed)
    ));
    assert_eq!(std::fs::read(s.path("big")).unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_share_reads_and_come_back_when_healthy() {
    let a = WebServer::nginx(NginxMode::JsonIndex).unwrap();
    let data = noise(100_000, 3);
    a.write("f", &data);
    // The mirror's port is reserved, then left closed: the mirror is down at first.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let web = WebConfig {
        mirrors: vec![format!("http://127.0.0.1:{port}")],
        health_interval: Duration::from_millis(200),
        ..WebConfig::default()
    };
    let st = connect(&a.url, web).await;
    let tag = file(st.head("f", None).await.unwrap()).etag.unwrap();
    for _ in 0..4 {
        assert_eq!(body(st.get("f", None, Some(&tag)).await.unwrap()).await, data);
    }
    assert!(
        !st.replicas().get(1).is_up(),
        "the mirror that refused connections is out"
    );

    let sock = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let mut b = WebServer::nginx_on(NginxMode::JsonIndex, sock).unwrap();
    b.write("f", &data);
    // Same bytes, same mtime: the same version on both.
    let mtime = std::fs::metadata(a.path("f")).unwrap().modified().unwrap();
    std::fs::File::options()
        .write(true)
        .open(b.path("f"))
        .unwrap()
        .set_modified(mtime)
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !st.replicas().get(1).is_up() {
        assert!(std::time::Instant::now() < deadline, "the mirror was not put back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..4 {
        assert_eq!(
            body(st.get("f", Some(0..1000), Some(&tag)).await.unwrap()).await,
            &data[..1000]
        );
    }
    let gets = |s: &WebServer| {
        s.requests()
            .iter()
            .filter(|r| r.method == "GET" && r.uri == "/f")
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while gets(&b) < 2 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(gets(&b) >= 2, "reads go to the mirror too: {:?}", b.requests());

    // The primary goes away: reads and listings carry on from the mirror.
    drop(a);
    for _ in 0..3 {
        assert_eq!(
            body(st.get("f", Some(0..1000), Some(&tag)).await.unwrap()).await,
            &data[..1000]
        );
    }
    assert_eq!(names(&listed(&st, "").await), [("f".into(), EntryKind::File, 100_000)]);
    assert!(!st.replicas().get(0).is_up());
    b.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tells_the_kinds_apart() {
    let s = WebServer::nginx(NginxMode::Dav).unwrap();
    let opts = crate::store::open::RemoteOptions::default();
    let st = crate::store::open::open(&s.url, &opts).await.unwrap();
    assert!(st.capabilities().writes && !st.capabilities().server_side_copy);
    let err = crate::store::open::open(
        &s.url,
        &crate::store::open::RemoteOptions {
            web: WebConfig {
                kind: RemoteKind::Artifact,
                ..WebConfig::default()
            },
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not an artifactfs server"), "{err}");
}
