//! End-to-end tests of the write side (`docs/PROTOCOL.md`, "Writes"): a real `ServerHandle`
//! on `127.0.0.1:0` over a temporary folder, spoken to with reqwest. Bytes, statuses, error
//! codes and counters are checked exactly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, StatusCode, header};

use super::journal::{Journal, Record};
use super::tests::{Fixture, MIB, Resp, client, data, get, tag_of, walk_files};
use super::*;
use crate::protocol::{
    ChunkList, CommitRequest, DIGEST_CHUNK_SIZE, EntryKind, HasChunksAnswer, ListPage, PartRef, PartStored,
    UploadStarted, WriteResult, cdc_chunks, etag_from_digests, quote_etag,
};

type H<'a> = &'a [(header::HeaderName, &'a str)];

async fn send(c: &reqwest::Client, method: Method, url: &str, headers: H<'_>, body: Vec<u8>) -> Resp {
    let mut req = c.request(method, url).body(body);
    for (k, v) in headers {
        req = req.header(k, *v);
    }
    Resp::from(req.send().await.unwrap()).await
}

async fn put(c: &reqwest::Client, url: &str, headers: H<'_>, body: &[u8]) -> Resp {
    send(c, Method::PUT, url, headers, body.to_vec()).await
}

async fn post(c: &reqwest::Client, url: &str, headers: H<'_>, body: &[u8]) -> Resp {
    send(c, Method::POST, url, headers, body.to_vec()).await
}

async fn delete(c: &reqwest::Client, url: &str, headers: H<'_>) -> Resp {
    send(c, Method::DELETE, url, headers, Vec::new()).await
}

async fn head_tag(c: &reqwest::Client, url: &str) -> String {
    let r = Resp::from(c.head(url).send().await.unwrap()).await;
    assert_eq!(r.status, StatusCode::OK, "HEAD {url}");
    r.header(header::ETAG).to_string()
}

async fn has_chunks(c: &reqwest::Client, f: &Fixture, hashes: &[String]) -> Vec<bool> {
    let body = serde_json::to_vec(&serde_json::json!({ "chunks": hashes })).unwrap();
    let r = post(c, &f.url("/?afs=has-chunks"), &[], &body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    r.json::<HasChunksAnswer>().have
}

fn hashes_of(bytes: &[u8]) -> Vec<String> {
    cdc_chunks(bytes).into_iter().map(|c| c.hash).collect()
}

/// Asserts a write answered `status` with the `WriteResult` and `ETag` of `content`.
fn assert_written(r: &Resp, status: StatusCode, content: &[u8]) -> WriteResult {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    let w: WriteResult = r.json();
    assert_eq!(w.etag, tag_of(content));
    assert_eq!(w.size, content.len() as u64);
    assert_eq!(r.header(header::ETAG), quote_etag(&w.etag));
    w
}

fn assert_error(r: &Resp, status: StatusCode, code: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.error_code(), code);
}

/// Files directly in `<state>/tmp` and hidden temporaries anywhere under the root.
fn leftovers(f: &Fixture) -> usize {
    let tmp = f.root().join(".artifactfs/tmp");
    let in_tmp = std::fs::read_dir(tmp).map_or(0, |d| d.count());
    fn hidden(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name() != ".artifactfs")
            .map(|e| {
                if e.file_type().unwrap().is_dir() {
                    hidden(&e.path())
                } else {
                    usize::from(e.file_name().to_string_lossy().starts_with(paths::HIDDEN_TEMP_PREFIX))
                }
            })
            .sum()
    }
    in_tmp + hidden(&f.root())
}

#[tokio::test]
async fn put_creates_and_replaces_with_conditions() {
    let f = Fixture::new(|r| {
        std::fs::create_dir(r.join("d")).unwrap();
        std::fs::write(r.join("file"), b"x").unwrap();
    });
    let c = client();
    let one = data(3 * MIB + 5, 1);
    let r = put(&c, &f.url("/d/new.bin"), &[], &one).await;
    let w = assert_written(&r, StatusCode::CREATED, &one);
    assert_eq!(std::fs::read(f.root().join("d/new.bin")).unwrap(), one);
    let meta = std::fs::metadata(f.root().join("d/new.bin")).unwrap();
    assert_eq!(w.mtime_ns, digests::Identity::of(&meta).mtime_ns);
    assert_eq!(get(&c, &f.url("/d/new.bin"), &[]).await.body, one);
    assert_eq!(head_tag(&c, &f.url("/d/new.bin")).await, quote_etag(&tag_of(&one)));

    let two = data(1000, 2);
    let old_tag = quote_etag(&tag_of(&one));
    // Conditions: If-None-Match: * only creates; If-Match names the version replaced.
    let r = put(&c, &f.url("/d/new.bin"), &[(header::IF_NONE_MATCH, "*")], &two).await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let r = put(&c, &f.url("/d/new.bin"), &[(header::IF_MATCH, "\"nope\"")], &two).await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let r = put(&c, &f.url("/d/missing"), &[(header::IF_MATCH, "*")], &two).await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    assert_eq!(std::fs::read(f.root().join("d/new.bin")).unwrap(), one);
    let r = put(&c, &f.url("/d/new.bin"), &[(header::IF_MATCH, &old_tag)], &two).await;
    assert_written(&r, StatusCode::OK, &two);
    let r = put(&c, &f.url("/d/other"), &[(header::IF_NONE_MATCH, "*")], b"").await;
    assert_written(&r, StatusCode::CREATED, b"");

    // Where a file cannot go.
    assert_error(&put(&c, &f.url("/d"), &[], b"z").await, StatusCode::CONFLICT, "is_dir");
    assert_error(
        &put(&c, &f.url("/nope/x"), &[], b"z").await,
        StatusCode::CONFLICT,
        "no_parent",
    );
    assert_error(
        &put(&c, &f.url("/file/x"), &[], b"z").await,
        StatusCode::CONFLICT,
        "no_parent",
    );
    assert_error(
        &put(&c, &f.url("/.artifactfs/x"), &[], b"z").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &put(&c, &f.url("/a%5cb"), &[], b"z").await,
        StatusCode::BAD_REQUEST,
        "bad_path",
    );
    assert_error(
        &put(&c, &f.url("/d/.afs-tmp-1"), &[], b"z").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );
    assert_error(
        &put(&c, &f.url("/"), &[], b"z").await,
        StatusCode::FORBIDDEN,
        "forbidden",
    );

    // The listing has the new files with their tags at once.
    let page: ListPage = get(&c, &f.url("/d/"), &[]).await.json();
    let names: Vec<_> = page.entries.iter().map(|e| (e.name.as_str(), e.etag.clone())).collect();
    assert_eq!(names, [("new.bin", Some(tag_of(&two))), ("other", Some(tag_of(b"")))]);
    assert_eq!(leftovers(&f), 0);
}

#[tokio::test]
async fn delete_removes_files_and_empty_folders() {
    let f = Fixture::new(|r| {
        std::fs::write(r.join("f"), b"bytes").unwrap();
        std::fs::create_dir_all(r.join("full/sub")).unwrap();
        std::fs::create_dir(r.join("empty")).unwrap();
    });
    let c = client();
    assert_error(
        &delete(&c, &f.url("/f"), &[(header::IF_MATCH, "\"x\"")]).await,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    assert_error(
        &delete(&c, &f.url("/f/"), &[]).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let tag = quote_etag(&tag_of(b"bytes"));
    let r = delete(&c, &f.url("/f"), &[(header::IF_MATCH, &tag)]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert!(!f.root().join("f").exists());
    assert_error(&get(&c, &f.url("/f"), &[]).await, StatusCode::NOT_FOUND, "not_found");
    assert_error(&delete(&c, &f.url("/f"), &[]).await, StatusCode::NOT_FOUND, "not_found");
    assert_error(
        &delete(&c, &f.url("/gone/f"), &[]).await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(&delete(&c, &f.url("/empty"), &[]).await, StatusCode::CONFLICT, "is_dir");
    assert_error(
        &delete(&c, &f.url("/full/"), &[]).await,
        StatusCode::CONFLICT,
        "not_empty",
    );
    assert_error(
        &delete(&c, &f.url("/empty/"), &[(header::IF_MATCH, "*")]).await,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    assert_eq!(delete(&c, &f.url("/empty/"), &[]).await.status, StatusCode::NO_CONTENT);
    assert_eq!(
        delete(&c, &f.url("/full/sub/"), &[]).await.status,
        StatusCode::NO_CONTENT
    );
    assert!(!f.root().join("empty").exists() && !f.root().join("full/sub").exists());
    assert_error(&delete(&c, &f.url("/"), &[]).await, StatusCode::FORBIDDEN, "forbidden");
}

#[tokio::test]
async fn mkdir_makes_one_folder() {
    let f = Fixture::new(|r| std::fs::write(r.join("f"), b"x").unwrap());
    let c = client();
    let r = post(&c, &f.url("/a/?afs=mkdir"), &[], b"").await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert!(f.root().join("a").is_dir());
    assert_eq!(
        post(&c, &f.url("/a/b?afs=mkdir"), &[], b"").await.status,
        StatusCode::CREATED
    );
    assert_error(
        &post(&c, &f.url("/a/?afs=mkdir"), &[], b"").await,
        StatusCode::CONFLICT,
        "exists",
    );
    assert_error(
        &post(&c, &f.url("/f?afs=mkdir"), &[], b"").await,
        StatusCode::CONFLICT,
        "exists",
    );
    assert_error(
        &post(&c, &f.url("/x/y/?afs=mkdir"), &[], b"").await,
        StatusCode::CONFLICT,
        "no_parent",
    );
    let page: ListPage = get(&c, &f.url("/"), &[]).await.json();
    assert_eq!(page.entries[0].name, "a");
    assert_eq!(page.entries[0].kind, EntryKind::Dir);
}

#[tokio::test]
async fn move_renames_files_and_folders() {
    let big = data(3 * MIB, 3);
    let b2 = big.clone();
    let f = Fixture::new(move |r| {
        std::fs::write(r.join("a"), &b2).unwrap();
        std::fs::write(r.join("b"), b"bbb").unwrap();
        std::fs::create_dir_all(r.join("dir/inner")).unwrap();
        std::fs::write(r.join("dir/inner/x"), b"xx").unwrap();
        std::fs::create_dir(r.join("empty")).unwrap();
        std::fs::create_dir(r.join("other")).unwrap();
        std::fs::write(r.join("other/y"), b"y").unwrap();
    });
    let c = client();
    // Startup chunking first: a file it opened before the move and hashes after would count.
    let mut at_start = hashes_of(&big);
    at_start.extend([b"bbb".as_slice(), b"xx", b"y"].map(|b| hashes_of(b).remove(0)));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !has_chunks(&c, &f, &at_start).await.iter().all(|&b| b) {
        assert!(Instant::now() < deadline, "background chunking did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mv = |from: &str, to: &str| f.url(&format!("{from}?afs=move&to={to}"));
    // A file, replacing nothing, keeping its tag.
    let r = post(&c, &mv("/a", "/dir/a2"), &[], b"").await;
    assert_written(&r, StatusCode::OK, &big);
    assert!(!f.root().join("a").exists());
    assert_eq!(std::fs::read(f.root().join("dir/a2")).unwrap(), big);
    let hashed = f.server.store().bytes_hashed();
    assert_eq!(head_tag(&c, &f.url("/dir/a2")).await, quote_etag(&tag_of(&big)));
    assert_eq!(
        f.server.store().bytes_hashed(),
        hashed,
        "a moved file is not hashed again"
    );
    // replace=false refuses an existing destination; the default replaces it.
    let r = post(&c, &f.url("/b?afs=move&to=/dir/a2&replace=false"), &[], b"").await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let r = post(&c, &mv("/b", "/dir/a2"), &[(header::IF_MATCH, "\"wrong\"")], b"").await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let tag_b = quote_etag(&tag_of(b"bbb"));
    let r = post(&c, &mv("/b", "/dir/a2"), &[(header::IF_MATCH, &tag_b)], b"").await;
    assert_written(&r, StatusCode::OK, b"bbb");
    assert_eq!(std::fs::read(f.root().join("dir/a2")).unwrap(), b"bbb");
    // The chunks of the replaced content are gone, the moved file's are found.
    let have = has_chunks(&c, &f, &[hashes_of(&big)[0].clone(), hashes_of(b"bbb")[0].clone()]).await;
    assert_eq!(have, [false, true]);

    // Kinds and places that refuse.
    assert_error(
        &post(&c, &mv("/dir/a2", "/empty"), &[], b"").await,
        StatusCode::CONFLICT,
        "is_dir",
    );
    assert_error(
        &post(&c, &mv("/dir", "/other/y"), &[], b"").await,
        StatusCode::CONFLICT,
        "not_dir",
    );
    assert_error(
        &post(&c, &mv("/dir", "/dir/a2"), &[], b"").await,
        StatusCode::CONFLICT,
        "bad_move",
    );
    assert_error(
        &post(&c, &mv("/dir", "/dir/inner/d"), &[], b"").await,
        StatusCode::CONFLICT,
        "bad_move",
    );
    assert_error(
        &post(&c, &mv("/dir", "/dir"), &[], b"").await,
        StatusCode::CONFLICT,
        "bad_move",
    );
    assert_error(
        &post(&c, &mv("/dir", "/other"), &[], b"").await,
        StatusCode::CONFLICT,
        "not_empty",
    );
    assert_error(
        &post(&c, &mv("/dir", "/no/where"), &[], b"").await,
        StatusCode::CONFLICT,
        "no_parent",
    );
    assert_error(
        &post(&c, &mv("/missing", "/m2"), &[], b"").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    assert_error(
        &post(&c, &f.url("/dir?afs=move"), &[], b"").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &post(&c, &mv("/dir", "/..%2Fx"), &[], b"").await,
        StatusCode::BAD_REQUEST,
        "bad_path",
    );
    let r = post(&c, &f.url("/dir?afs=move&to=/empty&replace=false"), &[], b"").await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    // A folder replaces an empty folder, with its content; names with spaces work.
    let r = post(&c, &mv("/dir", "/empty"), &[], b"").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(std::fs::read(f.root().join("empty/a2")).unwrap(), b"bbb");
    assert_eq!(std::fs::read(f.root().join("empty/inner/x")).unwrap(), b"xx");
    assert_eq!(
        post(&c, &mv("/empty", "/new%20name"), &[], b"").await.status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(get(&c, &f.url("/new%20name/a2"), &[]).await.body, b"bbb");
    // Chunks found through the folder's new path.
    assert_eq!(has_chunks(&c, &f, &hashes_of(b"bbb")).await, [true]);
}

#[tokio::test]
async fn append_write_and_truncate_in_place() {
    let start = data(1500, 4);
    let s2 = start.clone();
    let f = Fixture::new(move |r| {
        std::fs::write(r.join("f"), &s2).unwrap();
        std::fs::create_dir(r.join("d")).unwrap();
    });
    let c = client();
    let url = |q: &str| f.url(&format!("/f?afs={q}"));
    let mut want = start.clone();

    let r = post(&c, &url("append&offset=1500"), &[], b"hello").await;
    want.extend_from_slice(b"hello");
    assert_written(&r, StatusCode::OK, &want);
    let r = post(&c, &url("append&offset=1500"), &[], b"again").await;
    assert_error(&r, StatusCode::CONFLICT, "offset_mismatch");
    let body: serde_json::Value = r.json();
    assert_eq!(body["size"], 1505);
    // An empty append changes nothing.
    let r = post(&c, &url("append&offset=1505"), &[], b"").await;
    assert_written(&r, StatusCode::OK, &want);

    let r = post(&c, &url("write&offset=10"), &[], b"0123456789").await;
    want[10..20].copy_from_slice(b"0123456789");
    assert_written(&r, StatusCode::OK, &want);
    let r = post(&c, &url("write&offset=1500"), &[], b"across the end").await;
    want.truncate(1500);
    want.extend_from_slice(b"across the end");
    assert_written(&r, StatusCode::OK, &want);
    let r = post(&c, &url(&format!("write&offset={}", want.len())), &[], b"!").await;
    want.push(b'!');
    assert_written(&r, StatusCode::OK, &want);
    let r = post(&c, &url("write&offset=99999"), &[], b"x").await;
    assert_error(&r, StatusCode::RANGE_NOT_SATISFIABLE, "range_not_satisfiable");
    assert_eq!(r.header(header::CONTENT_RANGE), format!("bytes */{}", want.len()));

    let r = post(&c, &url("truncate&size=100"), &[], b"").await;
    want.truncate(100);
    assert_written(&r, StatusCode::OK, &want);
    let r = post(&c, &url("truncate&size=150"), &[], b"").await;
    want.resize(150, 0);
    assert_written(&r, StatusCode::OK, &want);
    assert_eq!(std::fs::read(f.root().join("f")).unwrap(), want);

    // Conditions.
    let tag = quote_etag(&tag_of(&want));
    let r = post(&c, &url("append&offset=150"), &[(header::IF_MATCH, "\"old\"")], b"x").await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let r = post(&c, &url("append&offset=150"), &[(header::IF_NONE_MATCH, "*")], b"x").await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let r = post(&c, &url("append&offset=150"), &[(header::IF_MATCH, &tag)], b"x").await;
    want.push(b'x');
    assert_written(&r, StatusCode::OK, &want);

    // What they need.
    for q in ["append&offset=0", "write&offset=0", "truncate&size=0"] {
        let r = post(&c, &f.url(&format!("/missing?afs={q}")), &[], b"x").await;
        assert_error(&r, StatusCode::NOT_FOUND, "not_found");
        let r = post(&c, &f.url(&format!("/d?afs={q}")), &[], b"x").await;
        assert_error(&r, StatusCode::CONFLICT, "is_dir");
    }
    for q in ["append", "write", "truncate", "append&offset=x"] {
        let r = post(&c, &url(q), &[], b"x").await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    }
    assert_eq!(get(&c, &f.url("/f"), &[]).await.body, want);
    let journal = f.root().join(".artifactfs/journal");
    assert_eq!(std::fs::read_dir(journal).unwrap().count(), 0);
}

#[tokio::test]
async fn concurrent_appends_chained_through_retries_make_the_concatenation() {
    let f = Fixture::new(|r| std::fs::write(r.join("log"), b"").unwrap());
    let c = client();
    const WRITERS: usize = 100;
    const BLOCK: usize = 100;
    let url = Arc::new(f.url("/log"));
    let mut tasks = Vec::new();
    for i in 0..WRITERS {
        let (c, url) = (c.clone(), Arc::clone(&url));
        tasks.push(tokio::spawn(async move {
            let block = vec![i as u8; BLOCK];
            let mut offset = 0u64;
            let mut tries = 0;
            loop {
                tries += 1;
                let r = post(&c, &format!("{url}?afs=append&offset={offset}"), &[], &block).await;
                match r.status {
                    StatusCode::OK => return tries,
                    StatusCode::CONFLICT => {
                        assert_eq!(r.error_code(), "offset_mismatch");
                        offset = r.json::<serde_json::Value>()["size"].as_u64().unwrap();
                    }
                    other => panic!("append answered {other}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let got = std::fs::read(f.root().join("log")).unwrap();
    assert_eq!(got.len(), WRITERS * BLOCK);
    let mut seen = [false; WRITERS];
    for block in got.chunks(BLOCK) {
        assert!(block.iter().all(|&b| b == block[0]), "a block is mixed");
        assert!(!seen[block[0] as usize], "block {} twice", block[0]);
        seen[block[0] as usize] = true;
    }
    assert_eq!(head_tag(&c, &f.url("/log")).await, quote_etag(&tag_of(&got)));
    let s = f.settle();
    assert_eq!(s.writes, WRITERS as u64);
}

#[test]
fn a_put_never_mixes_versions_for_readers_or_on_disk() {
    let old = data(16 * MIB, 5);
    let o2 = old.clone();
    let f = Fixture::new(move |r| std::fs::write(r.join("big"), &o2).unwrap());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = client();
    // A reader of the old version, slow, while a PUT replaces the file.
    let mut s = TcpStream::connect(f.server.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    while got.len() < 512 * 1024 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    let new = data(16 * MIB, 6);
    let r = rt.block_on(put(&c, &f.url("/big"), &[], &new));
    assert_written(&r, StatusCode::OK, &new);
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("{e}"),
        }
    }
    let split = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let body = &got[split..];
    assert_eq!(body, &old[..body.len()], "the reader saw bytes of another version");
    assert_eq!(std::fs::read(f.root().join("big")).unwrap(), new);

    // Concurrent PUTs of two contents leave exactly one of them, every time.
    let (a, b) = (data(2 * MIB + 1, 7), data(2 * MIB + 1, 8));
    let race = f.url("/race");
    for _ in 0..5 {
        let (pa, pb) = rt.block_on(async { tokio::join!(put(&c, &race, &[], &a), put(&c, &race, &[], &b)) });
        assert!(pa.status.is_success() && pb.status.is_success());
        let on_disk = std::fs::read(f.root().join("race")).unwrap();
        assert!(on_disk == a || on_disk == b, "mixed content on disk");
        let tag = rt.block_on(head_tag(&c, &f.url("/race")));
        assert_eq!(tag, quote_etag(&tag_of(&on_disk)));
    }
    assert_eq!(leftovers(&f), 0);
}

async fn start_upload(c: &reqwest::Client, url: &str, headers: H<'_>) -> String {
    let r = post(c, &format!("{url}?afs=upload"), headers, b"").await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", String::from_utf8_lossy(&r.body));
    let u: UploadStarted = r.json();
    assert_eq!(u.upload.len(), 32);
    u.upload
}

async fn part(c: &reqwest::Client, url: &str, id: &str, k: u32, extra: &str, body: &[u8]) -> Resp {
    put(c, &format!("{url}?afs=part&upload={id}&part={k}{extra}"), &[], body).await
}

async fn stored(c: &reqwest::Client, url: &str, id: &str, k: u32, extra: &str, body: &[u8], want: &[u8]) -> PartRef {
    let r = part(c, url, id, k, extra, body).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
    let p: PartStored = r.json();
    assert_eq!(
        (p.part, p.size, p.tag.as_str()),
        (k, want.len() as u64, blake3::hash(want).to_hex().as_str())
    );
    PartRef { part: k, tag: p.tag }
}

async fn commit(c: &reqwest::Client, url: &str, id: &str, headers: H<'_>, parts: &[PartRef]) -> Resp {
    let body = serde_json::to_vec(&CommitRequest { parts: parts.to_vec() }).unwrap();
    post(c, &format!("{url}?afs=commit&upload={id}"), headers, &body).await
}

#[tokio::test]
async fn upload_sessions_build_files_from_parts() {
    let base = data(3 * MIB, 9);
    let other = data(600_000, 10);
    let (b2, o2) = (base.clone(), other.clone());
    let f = Fixture::new(move |r| {
        std::fs::write(r.join("f"), &b2).unwrap();
        std::fs::write(r.join("elsewhere"), &o2).unwrap();
        std::fs::create_dir(r.join("d")).unwrap();
    });
    let c = client();
    let url = f.url("/new");
    // New bytes only, out of order, one part retried.
    let id = start_upload(&c, &url, &[]).await;
    let p2 = stored(&c, &url, &id, 2, "", b"world", b"world").await;
    let _first_try = stored(&c, &url, &id, 1, "", b"HELLO ", b"HELLO ").await;
    let p1 = stored(&c, &url, &id, 1, "", b"hello ", b"hello ").await;
    // A part not stored, or with another tag: 400, and the session stays.
    let missing = PartRef {
        part: 3,
        tag: p2.tag.clone(),
    };
    assert_error(
        &commit(&c, &url, &id, &[], &[p1.clone(), missing]).await,
        StatusCode::BAD_REQUEST,
        "bad_part",
    );
    let wrong = PartRef {
        part: 1,
        tag: blake3::hash(b"HELLO ").to_hex().to_string(),
    };
    assert_error(
        &commit(&c, &url, &id, &[], &[wrong, p2.clone()]).await,
        StatusCode::BAD_REQUEST,
        "bad_part",
    );
    assert!(!f.root().join("new").exists());
    let r = commit(&c, &url, &id, &[], &[p1.clone(), p2.clone()]).await;
    assert_written(&r, StatusCode::CREATED, b"hello world");
    assert_eq!(std::fs::read(f.root().join("new")).unwrap(), b"hello world");
    // The session ended with the commit.
    assert_error(
        &commit(&c, &url, &id, &[], &[p1]).await,
        StatusCode::NOT_FOUND,
        "no_such_upload",
    );
    assert_error(
        &part(&c, &url, &id, 1, "", b"x").await,
        StatusCode::NOT_FOUND,
        "no_such_upload",
    );

    // Base ranges and known chunks: only the new bytes travel.
    let furl = f.url("/f");
    let tag = quote_etag(&tag_of(&base));
    assert_error(
        &post(&c, &format!("{furl}?afs=upload"), &[(header::IF_MATCH, "\"old\"")], b"").await,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    let id = start_upload(&c, &furl, &[(header::IF_MATCH, &tag)]).await;
    let before = f.server.stats().snapshot();
    let chunk = cdc_chunks(&other)[1].clone();
    let chunk_bytes = &other[chunk.offset as usize..(chunk.offset + chunk.len) as usize];
    let head = stored(&c, &furl, &id, 1, "&copy=0-1048575", b"", &base[..MIB]).await;
    let mid = stored(&c, &furl, &id, 2, "", b"-inserted-", b"-inserted-").await;
    let ch = stored(&c, &furl, &id, 3, &format!("&chunk={}", chunk.hash), b"", chunk_bytes).await;
    let tail = stored(
        &c,
        &furl,
        &id,
        4,
        &format!("&copy=2000000-{}", base.len() - 1),
        b"",
        &base[2_000_000..],
    )
    .await;
    assert_error(
        &part(&c, &furl, &id, 5, &format!("&copy=0-{}", base.len()), b"").await,
        StatusCode::RANGE_NOT_SATISFIABLE,
        "range_not_satisfiable",
    );
    assert_error(
        &part(&c, &furl, &id, 5, &format!("&chunk={}", "ab".repeat(32)), b"").await,
        StatusCode::NOT_FOUND,
        "unknown_chunk",
    );
    assert_error(
        &part(&c, &furl, &id, 5, "&chunk=xyz", b"").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &part(&c, &furl, &id, 0, "", b"x").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &part(&c, &furl, &id, 10_001, "", b"x").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    // Another file's session.
    assert_error(
        &part(&c, &url, &id, 5, "", b"x").await,
        StatusCode::NOT_FOUND,
        "no_such_upload",
    );
    let mut want = base[..MIB].to_vec();
    want.extend_from_slice(b"-inserted-");
    want.extend_from_slice(chunk_bytes);
    want.extend_from_slice(&base[2_000_000..]);
    // Commit conditions apply to the current file.
    let r = commit(
        &c,
        &furl,
        &id,
        &[(header::IF_NONE_MATCH, "*")],
        std::slice::from_ref(&head),
    )
    .await;
    assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
    let r = commit(&c, &furl, &id, &[(header::IF_MATCH, &tag)], &[head, mid, ch, tail]).await;
    assert_written(&r, StatusCode::OK, &want);
    assert_eq!(std::fs::read(f.root().join("f")).unwrap(), want);
    let after = f.settle();
    // The refused parts were answered before their bodies were read.
    assert_eq!(after.bytes_received - before.bytes_received, 10);
    assert_eq!(
        after.parts_copied_bytes - before.parts_copied_bytes,
        MIB as u64 + chunk.len + (base.len() - 2_000_000) as u64
    );

    // copy= without a base; abort; parts into a folder's path.
    let id = start_upload(&c, &furl, &[]).await;
    assert_error(
        &part(&c, &furl, &id, 1, "&copy=0-0", b"").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_eq!(
        delete(&c, &format!("{furl}?afs=upload&upload={id}"), &[]).await.status,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &part(&c, &furl, &id, 1, "", b"x").await,
        StatusCode::NOT_FOUND,
        "no_such_upload",
    );
    assert_error(
        &delete(&c, &format!("{furl}?afs=upload&upload={id}"), &[]).await,
        StatusCode::NOT_FOUND,
        "no_such_upload",
    );
    assert_error(
        &post(&c, &f.url("/d?afs=upload"), &[], b"").await,
        StatusCode::CONFLICT,
        "is_dir",
    );
    assert_error(
        &post(&c, &f.url("/no/x?afs=upload"), &[], b"").await,
        StatusCode::CONFLICT,
        "no_parent",
    );
    // An empty commit makes an empty file.
    let id = start_upload(&c, &f.url("/empty"), &[]).await;
    assert_written(
        &commit(&c, &f.url("/empty"), &id, &[], &[]).await,
        StatusCode::CREATED,
        b"",
    );
    let uploads = f.root().join(".artifactfs/uploads");
    assert_eq!(std::fs::read_dir(uploads).unwrap().count(), 0);
    assert_eq!(leftovers(&f), 0);
}

#[tokio::test]
async fn idle_upload_sessions_expire_with_their_parts() {
    let f = Fixture::with_config(|_| {}, |cfg| cfg.upload_ttl = Duration::from_millis(300));
    let c = client();
    let url = f.url("/f");
    let r = post(&c, &format!("{url}?afs=upload"), &[], b"").await;
    let started: UploadStarted = r.json();
    assert_eq!(started.expires_in_s, 1);
    let id = started.upload;
    // Requests keep it alive.
    for k in 1..=4 {
        stored(&c, &url, &id, k, "", b"x", b"x").await;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let dir = f.root().join(".artifactfs/uploads").join(&id);
    assert_eq!(walk_files(&dir), 4);
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(!dir.exists(), "expired parts are removed");
    assert_error(
        &part(&c, &url, &id, 1, "", b"x").await,
        StatusCode::NOT_FOUND,
        "no_such_upload",
    );
    assert_eq!(f.server.ctx.uploads.as_ref().unwrap().len(), 0);
}

#[tokio::test]
async fn chunk_lists_and_has_chunks_follow_every_write() {
    let existing = data(2 * MIB + 3, 11);
    let e2 = existing.clone();
    let f = Fixture::new(move |r| {
        std::fs::create_dir(r.join("sub")).unwrap();
        std::fs::write(r.join("sub/old"), &e2).unwrap();
    });
    let c = client();
    // Files present at start are chunked in the background.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !has_chunks(&c, &f, &hashes_of(&existing)).await.iter().all(|&b| b) {
        assert!(Instant::now() < deadline, "background chunking did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = get(&c, &f.url("/sub/old?afs=chunks"), &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    let list: ChunkList = r.json();
    assert_eq!(
        list,
        ChunkList {
            etag: tag_of(&existing),
            size: existing.len() as u64,
            chunks: cdc_chunks(&existing),
        }
    );
    let tag = r.header(header::ETAG).to_string();
    assert_eq!(
        get(&c, &f.url("/sub/old?afs=chunks"), &[(header::IF_NONE_MATCH, &tag)])
            .await
            .status,
        StatusCode::NOT_MODIFIED
    );
    assert_error(
        &get(&c, &f.url("/sub/old?afs=chunks"), &[(header::IF_MATCH, "\"x\"")]).await,
        StatusCode::PRECONDITION_FAILED,
        "precondition_failed",
    );
    assert_error(
        &get(&c, &f.url("/sub/?afs=chunks"), &[]).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    // PUT, append, write, truncate, commit: each version's chunks are known at once.
    let put_bytes = data(700_000, 12);
    put(&c, &f.url("/p"), &[], &put_bytes).await;
    let mut appended = data(300_000, 13);
    put(&c, &f.url("/a"), &[], &appended).await;
    let more = data(400_000, 14);
    post(&c, &f.url("/a?afs=append&offset=300000"), &[], &more).await;
    appended.extend_from_slice(&more);
    let mut written = data(900_000, 15);
    put(&c, &f.url("/w"), &[], &written).await;
    let patch = data(5000, 16);
    post(&c, &f.url("/w?afs=write&offset=400000"), &[], &patch).await;
    written[400_000..405_000].copy_from_slice(&patch);
    post(&c, &f.url("/w?afs=truncate&size=800000"), &[], b"").await;
    written.truncate(800_000);
    let committed = data(500_000, 17);
    let id = start_upload(&c, &f.url("/c"), &[]).await;
    let p = stored(&c, &f.url("/c"), &id, 1, "", &committed, &committed).await;
    commit(&c, &f.url("/c"), &id, &[], &[p]).await;
    for (path, content) in [
        ("/p", &put_bytes),
        ("/a", &appended),
        ("/w", &written),
        ("/c", &committed),
    ] {
        let list: ChunkList = get(&c, &f.url(&format!("{path}?afs=chunks")), &[]).await.json();
        assert_eq!(list.chunks, cdc_chunks(content), "{path}");
        assert!(
            has_chunks(&c, &f, &hashes_of(content)).await.iter().all(|&b| b),
            "{path}"
        );
    }
    // Unknown hashes, and the chunks of a version that was replaced.
    let replaced = data(300_000, 13);
    let stale = hashes_of(&replaced).pop().unwrap();
    let have = has_chunks(&c, &f, &[stale, "00".repeat(32), hashes_of(&put_bytes)[0].clone()]).await;
    assert_eq!(have, [false, false, true]);
    let r = post(&c, &f.url("/?afs=has-chunks"), &[], br#"{"chunks": ["nothex"]}"#).await;
    assert_error(&r, StatusCode::BAD_REQUEST, "bad_request");
    let many = serde_json::to_vec(&serde_json::json!({ "chunks": vec!["00".repeat(32); 10_001] })).unwrap();
    assert_error(
        &post(&c, &f.url("/?afs=has-chunks"), &[], &many).await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );
    assert_error(
        &post(&c, &f.url("/?afs=has-chunks"), &[], b"{").await,
        StatusCode::BAD_REQUEST,
        "bad_request",
    );

    // A file changed behind the server's back: its chunks are checked before use.
    let victim = cdc_chunks(&put_bytes)[0].clone();
    std::fs::write(f.root().join("p"), data(700_000, 99)).unwrap();
    let id = start_upload(&c, &f.url("/q"), &[]).await;
    let r = part(&c, &f.url("/q"), &id, 1, &format!("&chunk={}", victim.hash), b"").await;
    assert_error(&r, StatusCode::NOT_FOUND, "unknown_chunk");
    assert_eq!(has_chunks(&c, &f, &[victim.hash]).await, [false]);
}

#[tokio::test]
async fn a_chunk_whose_bytes_changed_in_place_is_refused() {
    let content = data(3_000_000, 20);
    let c2 = content.clone();
    let f = Fixture::new(move |r| std::fs::write(r.join("f"), &c2).unwrap());
    let c = client();
    let first = cdc_chunks(&content)[0].clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while has_chunks(&c, &f, std::slice::from_ref(&first.hash)).await != [true] {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Same inode, size and mtime; only the bytes (and ctime) differ: the identity check
    // catches it, and the hash check would catch it if the identity did not.
    let path = f.root().join("f");
    let before = std::fs::metadata(&path).unwrap().modified().unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, b"X", 10).unwrap();
    file.set_modified(before).unwrap();
    drop(file);
    let id = start_upload(&c, &f.url("/g"), &[]).await;
    let r = part(&c, &f.url("/g"), &id, 1, &format!("&chunk={}", first.hash), b"").await;
    assert_error(&r, StatusCode::NOT_FOUND, "unknown_chunk");
    // Its other chunks are forgotten with it until the file is chunked again.
    assert_eq!(has_chunks(&c, &f, &hashes_of(&content)[1..2]).await, [false]);
}

#[test]
fn the_journal_is_replayed_before_serving_after_a_crash() {
    let start = data(5000, 21);
    let s2 = start.clone();
    let mut f = Fixture::new(move |r| {
        std::fs::write(r.join("f"), &s2).unwrap();
        std::fs::write(r.join("g"), b"0123456789").unwrap();
    });
    // Stop serving, then leave records as a server that died between making a record
    // durable and applying it (f), and after applying but before removing it (g).
    let journal = Journal::new(f.root().join(".artifactfs/journal"));
    let id_of = |p: &str| digests::Identity::of(&std::fs::metadata(f.root().join(p)).unwrap());
    let tail = b" and a journaled tail";
    let mut rec = journal.begin().unwrap();
    rec.data.write_all(tail).unwrap();
    let hash = blake3::hash(tail).to_hex().to_string();
    let record = Record::new(
        Path::new("f"),
        id_of("f"),
        5000,
        tail.len() as u64,
        hash,
        5000 + tail.len() as u64,
    );
    journal.commit(&rec, &record).unwrap();
    let mut rec2 = journal.begin().unwrap();
    rec2.data.write_all(b"AB").unwrap();
    let record2 = Record::new(
        Path::new("g"),
        id_of("g"),
        2,
        2,
        blake3::hash(b"AB").to_hex().to_string(),
        10,
    );
    journal.commit(&rec2, &record2).unwrap();
    std::fs::write(f.root().join("g"), b"01AB456789").unwrap();
    // A record that was never committed (no .json) is not applied.
    let mut never = journal.begin().unwrap();
    never.data.write_all(b"zzz").unwrap();

    f.restart();
    let mut want = start.clone();
    want.extend_from_slice(tail);
    assert_eq!(std::fs::read(f.root().join("f")).unwrap(), want);
    assert_eq!(std::fs::read(f.root().join("g")).unwrap(), b"01AB456789");
    assert_eq!(
        std::fs::read_dir(f.root().join(".artifactfs/journal")).unwrap().count(),
        0
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let c = client();
    assert_eq!(rt.block_on(head_tag(&c, &f.url("/f"))), quote_etag(&tag_of(&want)));
}

#[tokio::test]
async fn writes_in_place_on_a_large_file_hash_only_what_changed() {
    let big = data(64 * MIB, 22);
    let b2 = big.clone();
    let mut f = Fixture::new(move |r| std::fs::write(r.join("big"), &b2).unwrap());
    let c = client();
    assert_eq!(head_tag(&c, &f.url("/big")).await, quote_etag(&tag_of(&big)));
    let mut want = big;
    let before = f.server.store().bytes_hashed();
    let extra = data(1000, 23);
    let r = post(
        &c,
        &f.url(&format!("/big?afs=append&offset={}", want.len())),
        &[],
        &extra,
    )
    .await;
    want.extend_from_slice(&extra);
    let w = assert_written(&r, StatusCode::OK, &want);
    let hashed = f.server.store().bytes_hashed() - before;
    // The last 1 MiB chunk (whole) plus the tail's content-defined chunks.
    assert!(
        hashed <= (MIB + 1000 + 3 * MIB) as u64,
        "{hashed} bytes hashed after a 1000-byte append"
    );
    let t = Instant::now();
    assert_eq!(head_tag(&c, &f.url("/big")).await, quote_etag(&w.etag));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "HEAD after an append took {:?}",
        t.elapsed()
    );
    assert_eq!(f.server.store().bytes_hashed() - before, hashed, "HEAD hashed nothing");

    let before = f.server.store().bytes_hashed();
    let r = post(&c, &f.url("/big?afs=write&offset=33554000"), &[], b"patch").await;
    want[33_554_000..33_554_005].copy_from_slice(b"patch");
    assert_written(&r, StatusCode::OK, &want);
    let hashed = f.server.store().bytes_hashed() - before;
    assert!(
        hashed <= (MIB + 4 * MIB) as u64,
        "{hashed} bytes hashed after a 5-byte write"
    );

    // The sidecar holds the new version's digests, CRC32C and chunks (format 3): a restarted
    // server knows the tag and the chunks without hashing.
    let name = blake3::hash(b"big").to_hex();
    let sidecar = f
        .root()
        .join(".artifactfs/digests")
        .join(&name[..2])
        .join(format!("{name}.json"));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
    assert_eq!(json["format"], 3);
    assert_eq!(json["crc32c"].as_array().unwrap().len(), want.len().div_ceil(1 << 20));
    assert_eq!(json["etag"], tag_of(&want));
    assert_eq!(json["cdc"].as_array().unwrap().len(), cdc_chunks(&want).len());
    f.restart();
    assert_eq!(head_tag(&c, &f.url("/big")).await, quote_etag(&tag_of(&want)));
    let list: ChunkList = get(&c, &f.url("/big?afs=chunks"), &[]).await.json();
    assert_eq!(list.chunks, cdc_chunks(&want));
    assert_eq!(f.server.store().bytes_hashed(), 0);

    // A sidecar of format 1 (no chunks, no CRC32C) is not read: the file is hashed again,
    // to the same tag, and the sidecar is rewritten in format 3.
    let mut old: serde_json::Value = json.clone();
    old.as_object_mut().unwrap().remove("format");
    old.as_object_mut().unwrap().remove("cdc");
    old.as_object_mut().unwrap().remove("crc32c");
    std::fs::write(&sidecar, serde_json::to_vec(&old).unwrap()).unwrap();
    f.restart();
    assert_eq!(head_tag(&c, &f.url("/big")).await, quote_etag(&tag_of(&want)));
    assert_eq!(f.server.store().bytes_hashed(), want.len() as u64);
    let list: ChunkList = get(&c, &f.url("/big?afs=chunks"), &[]).await.json();
    assert_eq!(list.chunks, cdc_chunks(&want));
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&sidecar).unwrap()).unwrap();
    assert_eq!(json["format"], 3);
}

#[tokio::test]
async fn write_counters_are_exact() {
    let f = Fixture::new(|r| std::fs::write(r.join("f"), b"abc").unwrap());
    let c = client();
    let base = f.settle();
    put(&c, &f.url("/n"), &[], &[7u8; 1000]).await; // writes 1, received 1000
    put(&c, &f.url("/n"), &[(header::IF_MATCH, "\"x\"")], &[7u8; 50]).await; // refused before the body
    post(&c, &f.url("/f?afs=append&offset=3"), &[], b"defg").await; // writes 2, received 1004
    post(&c, &f.url("/f?afs=append&offset=0"), &[], b"zz").await; // 409 before the body
    post(&c, &f.url("/f?afs=write&offset=0"), &[], b"AB").await; // writes 3, received 1006
    post(&c, &f.url("/f?afs=truncate&size=2"), &[], b"").await; // writes 4
    post(&c, &f.url("/d/?afs=mkdir"), &[], b"").await; // writes 5
    post(&c, &f.url("/n?afs=move&to=/d/n"), &[], b"").await; // writes 6
    let id = start_upload(&c, &f.url("/f"), &[(header::IF_MATCH, &quote_etag(&tag_of(b"AB")))]).await;
    let p1 = stored(&c, &f.url("/f"), &id, 1, "", b"12345", b"12345").await; // received 1011
    let p2 = stored(&c, &f.url("/f"), &id, 2, "&copy=0-1", b"", b"AB").await; // copied 2
    commit(&c, &f.url("/f"), &id, &[], &[p2, p1]).await; // writes 7
    delete(&c, &f.url("/d/n"), &[]).await; // writes 8
    delete(&c, &f.url("/d/n"), &[]).await; // 404
    let s = f.settle();
    assert_eq!(s.writes - base.writes, 8);
    assert_eq!(s.bytes_received - base.bytes_received, 1011);
    assert_eq!(s.parts_copied_bytes - base.parts_copied_bytes, 2);
    assert_eq!(s.precondition_failed - base.precondition_failed, 1);
    assert_eq!(std::fs::read(f.root().join("f")).unwrap(), b"AB12345");
}

#[tokio::test]
async fn a_state_folder_on_another_filesystem_still_gives_atomic_writes() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        return;
    }
    let state = tempfile::tempdir_in(shm).unwrap();
    let sp = state.path().to_path_buf();
    let f = Fixture::with_config(|_| {}, move |cfg| cfg.state_dir = Some(sp));
    let c = client();
    let content = data(MIB + 1, 30);
    assert_written(
        &put(&c, &f.url("/x"), &[], &content).await,
        StatusCode::CREATED,
        &content,
    );
    let id = start_upload(&c, &f.url("/y"), &[]).await;
    let p = stored(&c, &f.url("/y"), &id, 1, "", b"part", b"part").await;
    assert_written(
        &commit(&c, &f.url("/y"), &id, &[], &[p]).await,
        StatusCode::CREATED,
        b"part",
    );
    assert_eq!(std::fs::read(f.root().join("x")).unwrap(), content);
    // In-place parts: the assembly file is a hidden temporary beside the target, never listed,
    // and becomes the file; an aborted session leaves nothing.
    let names = || -> Vec<String> {
        std::fs::read_dir(f.root())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    let id = start_upload(&c, &f.url("/z"), &[]).await;
    let refs = send_in_place(&c, &f.url("/z"), &id, &content, MIB / 2).await;
    let hidden: Vec<_> = names().into_iter().filter(|n| n.starts_with(".afs-tmp-")).collect();
    assert_eq!(hidden.len(), 1, "{hidden:?}");
    let ino = ino_of(&f.root().join(&hidden[0]));
    let page: ListPage = get(&c, &f.url("/"), &[]).await.json();
    assert_eq!(page.entries.len(), 2);
    assert_written(
        &commit(&c, &f.url("/z"), &id, &[], &refs).await,
        StatusCode::CREATED,
        &content,
    );
    assert_eq!(ino_of(&f.root().join("z")), ino);
    assert_eq!(std::fs::read(f.root().join("z")).unwrap(), content);
    let id = start_upload(&c, &f.url("/z"), &[]).await;
    send_in_place(&c, &f.url("/z"), &id, b"abc", 2).await;
    assert_eq!(names().len(), 4);
    delete(&c, &f.url(&format!("/z?afs=upload&upload={id}")), &[]).await;
    assert_eq!(names().len(), 3, "{:?}", names());
    let page: ListPage = get(&c, &f.url("/"), &[]).await.json();
    assert_eq!(page.entries.len(), 3);
}

/// The one assembly file of session `id` (path and inode), and how many files its folder holds.
fn assembly_of(f: &Fixture, id: &str) -> (std::path::PathBuf, u64, usize) {
    use std::os::unix::fs::MetadataExt;
    let dir = f.root().join(".artifactfs/uploads").join(id);
    let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    let assembly: Vec<_> = names
        .iter()
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("assembly-"))
        .collect();
    assert_eq!(assembly.len(), 1, "{names:?}");
    let ino = std::fs::metadata(assembly[0]).unwrap().ino();
    (assembly[0].clone(), ino, names.len())
}

fn ino_of(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
}

/// Sends `content` as in-place parts of `part_size` bytes, all at once, the last one first;
/// returns their references in file order.
async fn send_in_place(c: &reqwest::Client, url: &str, id: &str, content: &[u8], part_size: usize) -> Vec<PartRef> {
    let sends = content.chunks(part_size).enumerate().rev().map(|(i, bytes)| {
        let (c, url, id, bytes) = (c.clone(), url.to_string(), id.to_string(), bytes.to_vec());
        async move {
            let extra = format!("&offset={}", i * part_size);
            stored(&c, &url, &id, i as u32 + 1, &extra, &bytes, &bytes).await
        }
    });
    let mut refs = futures_util::future::join_all(sends).await;
    refs.reverse();
    refs
}

fn sidecar_json(f: &Fixture, rel: &str) -> serde_json::Value {
    let name = blake3::hash(rel.as_bytes()).to_hex();
    let path = f
        .root()
        .join(".artifactfs/digests")
        .join(&name[..2])
        .join(format!("{name}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[tokio::test]
async fn in_place_parts_commit_without_a_copy_or_a_second_hash() {
    let f = Fixture::new(|_| {});
    let c = client();
    let store = Arc::clone(f.server.store());
    for (name, len, part_size) in [("a.bin", 20 * MIB + 12_345, 3 * MIB), ("b.bin", 9 * MIB, MIB)] {
        let content = data(len, len as u64);
        let url = f.url(&format!("/{name}"));
        let id = start_upload(&c, &url, &[]).await;
        let before = f.settle();
        let refs = send_in_place(&c, &url, &id, &content, part_size).await;
        // The parts went into one file, no part files.
        let (assembly, ino, files) = assembly_of(&f, &id);
        assert_eq!(files, 1);
        assert_eq!(std::fs::read(&assembly).unwrap(), content);
        // With the background held, the commit's own work shows alone.
        let hold = store.hold_background().await;
        let hashed = store.bytes_hashed();
        let r = commit(&c, &url, &id, &[], &refs).await;
        let w = assert_written(&r, StatusCode::CREATED, &content);
        let tag = etag_from_digests(
            len as u64,
            DIGEST_CHUNK_SIZE,
            &crate::protocol::chunk_digests(&content, DIGEST_CHUNK_SIZE),
        );
        assert_eq!(w.etag, tag, "{name}: the tag of the content, computed independently");
        assert_eq!(
            store.bytes_hashed(),
            hashed,
            "{name}: every 1 MiB digest came from the parts"
        );
        let target = f.root().join(name);
        assert_eq!(ino_of(&target), ino, "{name}: the assembly file itself became the file");
        assert_eq!(std::fs::read(&target).unwrap(), content);
        assert_eq!(head_tag(&c, &url).await, quote_etag(&tag));
        let after = f.settle();
        assert_eq!(after.bytes_received - before.bytes_received, len as u64);
        assert_eq!(after.parts_copied_bytes, before.parts_copied_bytes);
        assert_eq!(after.writes - before.writes, 1);
        // Nothing left of the session.
        assert!(!f.root().join(".artifactfs/uploads").join(&id).exists());
        assert_eq!(leftovers(&f), 0);
        // The chunks are not known yet: the sidecar has the digests only.
        let json = sidecar_json(&f, name);
        assert_eq!((json["etag"].as_str(), json.get("cdc")), (Some(tag.as_str()), None));
        let hashes = hashes_of(&content);
        if name == "a.bin" {
            // Asked for, they are computed at once (the background job then finds them).
            let r = get(&c, &format!("{url}?afs=chunks"), &[]).await;
            assert_eq!(r.status, StatusCode::OK);
            let list: ChunkList = r.json();
            let want = ChunkList {
                etag: tag.clone(),
                size: len as u64,
                chunks: cdc_chunks(&content),
            };
            assert_eq!(list, want);
            assert_eq!(store.bytes_hashed() - hashed, len as u64);
            drop(hold);
        } else {
            // Left alone, the background job chunks the file; has-chunks waits for it rather
            // than deny chunks of a file just written.
            drop(hold);
            assert!(has_chunks(&c, &f, &hashes).await.iter().all(|&b| b), "{name}");
            assert_eq!(store.bytes_hashed() - hashed, len as u64);
            let list: ChunkList = get(&c, &format!("{url}?afs=chunks"), &[]).await.json();
            assert_eq!(list.chunks, cdc_chunks(&content));
            assert_eq!(store.bytes_hashed() - hashed, len as u64, "chunked once");
        }
        // The sidecar gets the chunks (format 3) once they are known.
        let deadline = Instant::now() + Duration::from_secs(20);
        while sidecar_json(&f, name).get("cdc").is_none() {
            assert!(Instant::now() < deadline, "the sidecar never got the chunks");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let json = sidecar_json(&f, name);
        assert_eq!(json["format"], 3);
        assert_eq!(json["cdc"].as_array().unwrap().len(), cdc_chunks(&content).len());
    }
}

#[tokio::test]
async fn unaligned_in_place_parts_hash_only_the_chunks_no_part_covers() {
    let f = Fixture::new(|_| {});
    let c = client();
    let store = Arc::clone(f.server.store());
    let content = data(10 * MIB + 500, 41);
    let url = f.url("/u.bin");
    let id = start_upload(&c, &url, &[]).await;
    // 0..3.5 MiB, 3.5..4 MiB, 4..10 MiB + 500 (the last piece short: the file's end).
    let cuts = [0, 7 * MIB / 2, 4 * MIB, content.len()];
    let mut refs = Vec::new();
    for (i, w) in cuts.windows(2).enumerate() {
        let bytes = &content[w[0]..w[1]];
        let extra = format!("&offset={}", w[0]);
        refs.push(stored(&c, &url, &id, i as u32 + 1, &extra, bytes, bytes).await);
    }
    let _hold = store.hold_background().await;
    let hashed = store.bytes_hashed();
    let r = commit(&c, &url, &id, &[], &refs).await;
    assert_written(&r, StatusCode::CREATED, &content);
    // Only the chunk 3..4 MiB, across the first two parts, was read.
    assert_eq!(store.bytes_hashed() - hashed, MIB as u64);
    assert_eq!(std::fs::read(f.root().join("u.bin")).unwrap(), content);
}

#[tokio::test]
async fn in_place_parts_resent_replace_and_overwritten_ones_are_lost() {
    let f = Fixture::new(|_| {});
    let c = client();
    let url = f.url("/r.bin");
    let (one, two) = (data(1000, 50), data(500, 51));
    let id = start_upload(&c, &url, &[]).await;
    let first = stored(&c, &url, &id, 1, "&offset=0", &one, &one).await;
    let p2 = stored(&c, &url, &id, 2, "&offset=1000", &two, &two).await;
    // Sent again with other bytes: the new bytes replace the old ones in place.
    let again = data(1000, 52);
    let p1 = stored(&c, &url, &id, 1, "&offset=0", &again, &again).await;
    assert_error(
        &commit(&c, &url, &id, &[], &[first, p2.clone()]).await,
        StatusCode::BAD_REQUEST,
        "bad_part",
    );
    // A part written over both: they are lost until sent again.
    let over = data(200, 53);
    let p3 = stored(&c, &url, &id, 3, "&offset=900", &over, &over).await;
    for listed in [vec![p1.clone(), p2.clone()], vec![p2.clone()], vec![p1.clone()]] {
        let r = commit(&c, &url, &id, &[], &listed).await;
        assert_error(&r, StatusCode::BAD_REQUEST, "bad_part");
        assert!(String::from_utf8_lossy(&r.body).contains("overwritten"));
    }
    assert!(!f.root().join("r.bin").exists());
    let p1 = stored(&c, &url, &id, 1, "&offset=0", &again, &again).await;
    let p2 = stored(&c, &url, &id, 2, "&offset=1000", &two, &two).await;
    // Part 3 was overwritten in turn; parts 1 and 2 are whole again.
    assert_error(
        &commit(&c, &url, &id, &[], &[p3]).await,
        StatusCode::BAD_REQUEST,
        "bad_part",
    );
    let mut want = again.clone();
    want.extend_from_slice(&two);
    assert_written(&commit(&c, &url, &id, &[], &[p1, p2]).await, StatusCode::CREATED, &want);
    assert_eq!(std::fs::read(f.root().join("r.bin")).unwrap(), want);
    assert_eq!(leftovers(&f), 0);

    // An in-place part replaces a part sent without offset of the same number, and back.
    let id = start_upload(&c, &url, &[]).await;
    stored(&c, &url, &id, 1, "", b"file part", b"file part").await;
    let dir = f.root().join(".artifactfs/uploads").join(&id);
    assert!(dir.join("1").exists());
    let p1 = stored(&c, &url, &id, 1, "&offset=0", b"in place", b"in place").await;
    assert!(!dir.join("1").exists(), "the replaced part's file is gone");
    assert_written(&commit(&c, &url, &id, &[], &[p1]).await, StatusCode::OK, b"in place");
    let id = start_upload(&c, &url, &[]).await;
    stored(&c, &url, &id, 1, "&offset=0", b"in place", b"in place").await;
    let p1 = stored(&c, &url, &id, 1, "", b"file part", b"file part").await;
    assert_written(&commit(&c, &url, &id, &[], &[p1]).await, StatusCode::OK, b"file part");

    // Aborting removes the assembly file with the session.
    let id = start_upload(&c, &url, &[]).await;
    stored(&c, &url, &id, 1, "&offset=0", &one, &one).await;
    stored(&c, &url, &id, 2, "", &two, &two).await;
    assert_eq!(assembly_of(&f, &id).2, 2);
    let r = delete(&c, &format!("{url}?afs=upload&upload={id}"), &[]).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_eq!(
        std::fs::read_dir(f.root().join(".artifactfs/uploads")).unwrap().count(),
        0
    );
    assert_eq!(leftovers(&f), 0);
    assert_eq!(std::fs::read(f.root().join("r.bin")).unwrap(), b"file part");
}

#[tokio::test]
async fn mixed_gapped_and_reordered_parts_fall_back_and_stay_exact() {
    let base = data(3 * MIB, 60);
    let other = data(600_000, 61);
    let (b2, o2) = (base.clone(), other.clone());
    let f = Fixture::new(move |r| {
        std::fs::write(r.join("f"), &b2).unwrap();
        std::fs::write(r.join("elsewhere"), &o2).unwrap();
    });
    let c = client();
    let store = Arc::clone(f.server.store());
    let chunk = cdc_chunks(&other)[1].clone();
    let chunk_bytes = other[chunk.offset as usize..(chunk.offset + chunk.len) as usize].to_vec();
    // The files present at start are chunked in the background; wait until they are.
    let mut known = hashes_of(&base);
    known.push(chunk.hash.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    while !has_chunks(&c, &f, &known).await.iter().all(|&b| b) {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = f.url("/f");
    let tag = quote_etag(&tag_of(&base));
    let (x, y) = (data(2 * MIB + 3, 62), data(700, 63));
    let (mut received, mut copied) = (0u64, 0u64);
    let before = f.settle();

    // In place from 0 but with a part without offset among them: copied, exact.
    let id = start_upload(&c, &url, &[(header::IF_MATCH, &tag)]).await;
    let p1 = stored(&c, &url, &id, 1, "&offset=0", &x, &x).await;
    let p2 = stored(&c, &url, &id, 2, "", &y, &y).await;
    let off = x.len() + y.len();
    let p3 = stored(
        &c,
        &url,
        &id,
        3,
        &format!("&offset={off}&copy=0-99999"),
        b"",
        &base[..100_000],
    )
    .await;
    let at = off + 100_000;
    let p4 = stored(
        &c,
        &url,
        &id,
        4,
        &format!("&offset={at}&chunk={}", chunk.hash),
        b"",
        &chunk_bytes,
    )
    .await;
    // Refused before anything is written or counted.
    let bad = [
        ("&offset=0&copy=0-99999999", StatusCode::RANGE_NOT_SATISFIABLE),
        (&*format!("&offset=0&chunk={}", "ab".repeat(32)), StatusCode::NOT_FOUND),
        ("&offset=9223372036854775808", StatusCode::BAD_REQUEST),
        ("&offset=x", StatusCode::BAD_REQUEST),
    ];
    for (extra, status) in bad {
        assert_eq!(part(&c, &url, &id, 5, extra, b"").await.status, status, "{extra}");
    }
    received += (x.len() + y.len()) as u64;
    copied += 100_000 + chunk.len;
    let mut want = x.clone();
    want.extend_from_slice(&y);
    want.extend_from_slice(&base[..100_000]);
    want.extend_from_slice(&chunk_bytes);
    let r = commit(&c, &url, &id, &[(header::IF_MATCH, &tag)], &[p1, p2, p3, p4]).await;
    let w = assert_written(&r, StatusCode::OK, &want);
    assert_eq!(std::fs::read(f.root().join("f")).unwrap(), want);

    // copy= and chunk= in place, tiling from 0: no copy at commit; listed in another order or
    // with a gap: the file is the parts' concatenation all the same.
    let tag = quote_etag(&w.etag);
    let id = start_upload(&c, &url, &[(header::IF_MATCH, &tag)]).await;
    let q1 = stored(&c, &url, &id, 1, "&offset=0&copy=0-2097151", b"", &want[..2 * MIB]).await;
    let q2 = stored(&c, &url, &id, 2, &format!("&offset={}", 2 * MIB), &y, &y).await;
    let gap = 2 * MIB + y.len() + 10;
    let q3 = stored(
        &c,
        &url,
        &id,
        3,
        &format!("&offset={gap}&chunk={}", chunk.hash),
        b"",
        &chunk_bytes,
    )
    .await;
    // Not listed, beyond the end: cut off.
    let q4 = stored(&c, &url, &id, 4, &format!("&offset={}", 9 * MIB), &x, &x).await;
    received += (y.len() + x.len()) as u64;
    copied += 2 * MIB as u64 + chunk.len;
    for listed in [
        vec![q2.clone(), q1.clone()],
        vec![q1.clone(), q2.clone(), q3.clone()],
        vec![q1.clone(), q1.clone()],
    ] {
        let mut content = Vec::new();
        for p in &listed {
            content.extend_from_slice(match p.part {
                1 => &want[..2 * MIB],
                2 => &y,
                _ => &chunk_bytes,
            });
        }
        // A failed condition keeps the session.
        let r = commit(&c, &url, &id, &[(header::IF_NONE_MATCH, "*")], &listed).await;
        assert_error(&r, StatusCode::PRECONDITION_FAILED, "precondition_failed");
        // A commit ends the session: the next layout needs the same parts again.
        let id2 = start_upload(&c, &url, &[]).await;
        let mut refs = Vec::new();
        for p in &listed {
            let (extra, body): (String, &[u8]) = match p.part {
                1 => (format!("&offset={}", 0), &want[..2 * MIB]),
                2 => (format!("&offset={}", 2 * MIB), &y),
                _ => (format!("&offset={gap}"), &chunk_bytes),
            };
            refs.push(stored(&c, &url, &id2, p.part, &extra, body, body).await);
            received += body.len() as u64;
        }
        let hashed = store.bytes_hashed();
        let r = commit(&c, &url, &id2, &[], &refs).await;
        assert_written(&r, StatusCode::OK, &content);
        assert_eq!(std::fs::read(f.root().join("f")).unwrap(), content);
        assert!(
            store.bytes_hashed() - hashed >= content.len() as u64,
            "copied and hashed"
        );
    }
    let _ = q4;
    let hashed = store.bytes_hashed();
    let _hold = store.hold_background().await;
    let r = commit(&c, &url, &id, &[], &[q1, q2]).await;
    let mut content = want[..2 * MIB].to_vec();
    content.extend_from_slice(&y);
    assert_written(&r, StatusCode::OK, &content);
    assert_eq!(std::fs::read(f.root().join("f")).unwrap(), content);
    // Every digest came from the parts, the copy's included.
    assert_eq!(store.bytes_hashed(), hashed);

    let after = f.settle();
    assert_eq!(after.bytes_received - before.bytes_received, received);
    assert_eq!(after.parts_copied_bytes - before.parts_copied_bytes, copied);
    assert_eq!(
        std::fs::read_dir(f.root().join(".artifactfs/uploads")).unwrap().count(),
        0
    );
    assert_eq!(leftovers(&f), 0);
}
