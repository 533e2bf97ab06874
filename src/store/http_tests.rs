//! The HTTP client's behaviour against a scripted server on 127.0.0.1: what is retried and
//! what is not, redirects, the idle-read timeout, and the headers of ranged reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};

use super::*;

/// A server that answers each request with the next of `script` (the last one repeats), and
/// counts the requests and remembers their headers.
struct Scripted {
    hits: AtomicUsize,
    seen: parking_lot::Mutex<Vec<(String, HeaderMap)>>,
    script: Vec<fn(&Uri) -> Response>,
}

async fn handle(State(s): State<Arc<Scripted>>, uri: Uri, headers: HeaderMap) -> Response {
    let n = s.hits.fetch_add(1, Ordering::SeqCst);
    s.seen.lock().push((uri.to_string(), headers));
    (s.script[n.min(s.script.len() - 1)])(&uri)
}

async fn serve(script: Vec<fn(&Uri) -> Response>) -> (Arc<Scripted>, String) {
    let s = Arc::new(Scripted {
        hits: AtomicUsize::new(0),
        seen: parking_lot::Mutex::new(Vec::new()),
        script,
    });
    let app = axum::Router::new().fallback(handle).with_state(s.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (s, format!("http://{addr}"))
}

fn quick() -> HttpConfig {
    HttpConfig {
        retries: 3,
        retry_min_delay: Duration::from_millis(5),
        retry_max_delay: Duration::from_millis(20),
        read_timeout: Duration::from_millis(300),
        ..HttpConfig::default()
    }
}

fn status(code: StatusCode) -> Response {
    (code, "no").into_response()
}

#[tokio::test]
async fn overload_and_server_errors_are_retried_until_an_answer() {
    let (s, url) = serve(vec![
        |_| status(StatusCode::SERVICE_UNAVAILABLE),
        |_| status(StatusCode::TOO_MANY_REQUESTS),
        |_| status(StatusCode::BAD_GATEWAY),
        |_| "fine".into_response(),
    ])
    .await;
    let cfg = quick();
    let client = build_client(&cfg).unwrap();
    let resp = send(&cfg, "GET x", || client.get(&url)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.text().await.unwrap(), "fine");
    assert_eq!(s.hits.load(Ordering::SeqCst), 4);
}

#[tokio::test]
async fn retries_end_and_other_statuses_are_not_retried() {
    let (s, url) = serve(vec![|_| status(StatusCode::SERVICE_UNAVAILABLE)]).await;
    let cfg = quick();
    let client = build_client(&cfg).unwrap();
    let err = send(&cfg, "GET x", || client.get(&url)).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(s.hits.load(Ordering::SeqCst), 1 + cfg.retries);

    let (s, url) = serve(vec![|_| status(StatusCode::NOT_FOUND)]).await;
    let resp = send(&cfg, "GET x", || client.get(&url)).await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND, "returned for the caller to read");
    assert_eq!(s.hits.load(Ordering::SeqCst), 1, "a 404 is not retried");
}

#[tokio::test]
async fn a_refused_connection_is_retried_then_named() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let cfg = quick();
    let client = build_client(&cfg).unwrap();
    let retried = crate::metrics::get().summary()["retries"].as_u64().unwrap();
    let err = send(&cfg, "GET x", || client.get(format!("http://127.0.0.1:{port}/")))
        .await
        .unwrap_err();
    assert!(err.to_string().to_lowercase().contains("refused"), "{err}");
    let now = crate::metrics::get().summary()["retries"].as_u64().unwrap();
    assert!(now >= retried + cfg.retries as u64, "{retried} -> {now}");
}

#[tokio::test]
async fn redirects_are_followed() {
    let (s, url) = serve(vec![
        |_| (StatusCode::TEMPORARY_REDIRECT, [("location", "/moved/here")]).into_response(),
        |uri| format!("at {}", uri.path()).into_response(),
    ])
    .await;
    let cfg = quick();
    let client = build_client(&cfg).unwrap();
    let resp = send(&cfg, "GET x", || client.get(format!("{url}/old"))).await.unwrap();
    assert_eq!(resp.text().await.unwrap(), "at /moved/here");
    assert_eq!(s.hits.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_body_that_stalls_fails_after_the_read_timeout_instead_of_hanging() {
    let (_s, url) = serve(vec![|_| {
        let stream = futures_util::stream::unfold(0u32, |n| async move {
            if n > 0 {
                // Silence, far longer than the read timeout.
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
            Some((Ok::<_, std::io::Error>(Bytes::from_static(b"first")), n + 1))
        });
        Response::new(Body::from_stream(stream))
    }])
    .await;
    let cfg = quick();
    let client = build_client(&cfg).unwrap();
    let start = Instant::now();
    let resp = send(&cfg, "GET x", || client.get(&url)).await.unwrap();
    let mut body = body_stream("GET x".into(), resp);
    let first = futures_util::StreamExt::next(&mut body).await.unwrap().unwrap();
    assert_eq!(&first[..], b"first");
    let second = futures_util::StreamExt::next(&mut body).await.unwrap();
    assert!(second.is_err(), "a stalled body must end in an error");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
}

/// The `?afs=info` answer of a read-only artifact server, with or without digests and
/// bundles.
fn scripted_info(bundles: bool) -> Response {
    axum::Json(crate::protocol::ServerInfo {
        protocol: crate::protocol::PROTOCOL.into(),
        server: "scripted".into(),
        chunk_size: 1 << 20,
        max_list_limit: 1000,
        capabilities: crate::protocol::ServerCapabilities {
            ranges: true,
            listing_etags: true,
            digests: bundles,
            writes: false,
            partial_writes: false,
            content_chunks: false,
            bundles,
        },
    })
    .into_response()
}

#[tokio::test]
async fn ranged_reads_ask_for_identity_encoding_and_carry_the_version() {
    use crate::store::{ETag, Store};
    let (s, url) = serve(vec![|_| scripted_info(false), |_| {
        (
            StatusCode::PARTIAL_CONTENT,
            [
                ("content-range", "bytes 10-14/100"),
                ("etag", "\"v1\""),
                ("content-length", "5"),
            ],
            "abcde",
        )
            .into_response()
    }])
    .await;
    let store = crate::store::artifact::ArtifactStore::connect(&url, quick(), None)
        .await
        .unwrap();
    let resp = store
        .get("f.bin", Some(10..15), Some(&ETag::new("\"v1\"")))
        .await
        .unwrap();
    assert_eq!(resp.etag, Some(ETag::new("\"v1\"")));
    let seen = s.seen.lock();
    let (uri, headers) = &seen[1];
    assert!(uri.starts_with("/f.bin"), "{uri}");
    assert_eq!(headers["accept-encoding"], "identity");
    assert_eq!(headers["range"], "bytes=10-14");
    assert_eq!(headers["if-match"], "\"v1\"");
}

/// A folder's small files in one request from the built-in server: in name order, with the
/// tag a `HEAD` gives, within the sizes asked for, counted by the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_brings_a_folders_small_files_in_one_request() {
    use crate::store::{BundleFile, Head, Revalidated, Store};
    use futures_util::StreamExt;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    let files: [(&str, usize); 4] = [("d/a", 100), ("d/b", 3000), ("d/big", 2 << 20), ("d/c", 10)];
    std::fs::create_dir_all(root.join("d/sub")).unwrap();
    for (i, (name, len)) in files.iter().enumerate() {
        std::fs::write(root.join(name), crate::testing::noise(*len, i as u64)).unwrap();
    }
    let server = crate::server::ServerHandle::start(crate::server::ServerConfig::local(root.clone())).unwrap();
    let store = crate::store::artifact::ArtifactStore::connect(&server.url(), quick(), None)
        .await
        .unwrap();
    let get = |after: Option<&'static str>, max_total: u64| {
        let store = &store;
        async move {
            let files = store
                .bundle("d", after, 1 << 20, max_total)
                .await
                .unwrap()
                .expect("bundles");
            files.map(|f| f.unwrap()).collect::<Vec<_>>().await
        }
    };
    let all = get(None, 64 << 20).await;
    let names: Vec<&str> = all.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c"], "small files only, in name order");
    for f in &all {
        let path = format!("d/{}", f.name);
        assert_eq!(f.data, std::fs::read(root.join(&path)).unwrap(), "{path}");
        let Revalidated::Modified(Head::File(meta)) = store.head(&path, None).await.unwrap() else {
            panic!("{path} is a file")
        };
        assert_eq!(meta.etag, Some(f.etag.clone()), "{path}: the tag a HEAD gives");
    }
    let names = |v: Vec<BundleFile>| v.into_iter().map(|f| f.name).collect::<Vec<_>>();
    assert_eq!(names(get(Some("a"), 64 << 20).await), ["b", "c"]);
    assert_eq!(
        names(get(None, 3100).await),
        ["a", "b"],
        "stops before going past max_total"
    );
    let stats = server.stats().snapshot();
    assert_eq!((stats.bundles, stats.bundled_files), (3, 7));
    assert_eq!(stats.gets, 0);
}

#[tokio::test]
async fn a_bundle_cut_inside_a_file_ends_in_an_error_after_the_whole_files() {
    use crate::store::Store;
    use futures_util::StreamExt;
    let (_s, url) = serve(vec![
        |_| scripted_info(true),
        |_| {
            let body = "{\"name\":\"x\",\"size\":3,\"etag\":\"t1\",\"mtime_ns\":0}\nabc{\"name\":\"y\",\"size\":10,\"etag\":\"t2\",\"mtime_ns\":0}\nabcd";
            (StatusCode::OK, body).into_response()
        },
    ])
    .await;
    let store = crate::store::artifact::ArtifactStore::connect(&url, quick(), None)
        .await
        .unwrap();
    let got: Vec<_> = store
        .bundle("d", None, 1 << 20, 1 << 20)
        .await
        .unwrap()
        .unwrap()
        .collect()
        .await;
    assert_eq!(got.len(), 2);
    let x = got[0].as_ref().unwrap();
    assert_eq!(
        (x.name.as_str(), &x.data[..], x.etag.as_str()),
        ("x", &b"abc"[..], "\"t1\"")
    );
    assert!(
        matches!(&got[1], Err(StoreError::Protocol(m)) if m.contains("cut")),
        "{:?}",
        got[1]
    );
}

/// `?afs=digests` with CRC32C (this server), without (an older one), and with a CRC32C list
/// that does not match the chunks (refused, not half-used).
#[tokio::test]
async fn digests_carry_crc32c_when_the_server_has_them() {
    use crate::store::{ETag, Store};
    fn list(crc32c: Option<Vec<&str>>) -> Response {
        axum::Json(crate::protocol::DigestList {
            etag: "v1".into(),
            size: (1 << 20) + 1,
            chunk_size: 1 << 20,
            algorithm: "blake3".into(),
            digests: vec!["ab".repeat(32), "cd".repeat(32)],
            crc32c: crc32c.map(|v| v.into_iter().map(String::from).collect()),
        })
        .into_response()
    }
    let (_s, url) = serve(vec![
        |_| scripted_info(true),
        |_| list(Some(vec!["e3069283", "0000002a"])),
        |_| list(None),
        |_| list(Some(vec!["e3069283"])),
        |_| list(Some(vec!["e3069283", "xyz"])),
    ])
    .await;
    let store = crate::store::artifact::ArtifactStore::connect(&url, quick(), None)
        .await
        .unwrap();
    let v1 = ETag::new("\"v1\"");
    let d = store.digests("f", &v1).await.unwrap().unwrap();
    assert_eq!(d.digests, vec![[0xab; 32], [0xcd; 32]]);
    assert_eq!(d.crc32c, Some(vec![0xe306_9283, 42]));
    let d = store.digests("f", &v1).await.unwrap().unwrap();
    assert_eq!(d.crc32c, None);
    for _ in 0..2 {
        let err = store.digests("f", &v1).await.unwrap_err();
        assert!(matches!(err, StoreError::Protocol(_)), "{err}");
    }
}
