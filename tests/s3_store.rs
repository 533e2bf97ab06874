//! The S3 store against a real S3 server (s3s-fs, in-process on 127.0.0.1): the same
//! semantics as the memory store's tests, plus what is S3's own (requests per lookup,
//! pagination, the multipart limits, what reaches the wire).

mod common;

use artifactfs::store::s3::{S3Config, S3Store, client::static_credentials};
use artifactfs::store::{
    Content, ETag, EntryKind, GetResponse, Head, PartSource, Revalidated, Store, StoreError, WriteCondition,
};
use bytes::Bytes;
use common::s3::{ACCESS_KEY, S3Server, SECRET_KEY};
use futures_util::StreamExt;

const MIB: usize = 1 << 20;

async fn read_all(r: GetResponse) -> Vec<u8> {
    let mut out = Vec::new();
    let mut body = r.body;
    while let Some(b) = body.next().await {
        out.extend_from_slice(&b.unwrap());
    }
    out
}

fn listing(r: Revalidated<artifactfs::store::Listing>) -> Vec<(String, EntryKind, u64)> {
    match r {
        Revalidated::Modified(l) => l.entries.into_iter().map(|e| (e.name, e.kind, e.size)).collect(),
        Revalidated::NotModified => panic!("not modified"),
    }
}

async fn put(s: &S3Store, path: &str, data: &[u8]) -> ETag {
    s.put(path, Bytes::copy_from_slice(data), WriteCondition::None)
        .await
        .unwrap()
        .etag
        .unwrap()
}

#[tokio::test]
async fn listing_and_lookups_with_folders_implied_by_keys() {
    let srv = S3Server::start();
    let s = srv.store("").await;
    put(&s, "a/b/c.bin", &[1; 10]).await;
    put(&s, "a/x", &[2; 3]).await;
    put(&s, "top", b"t").await;
    assert_eq!(
        listing(s.list("", None).await.unwrap()),
        vec![("a".into(), EntryKind::Dir, 0), ("top".into(), EntryKind::File, 1)]
    );
    let Revalidated::Modified(l) = s.list("a", None).await.unwrap() else {
        panic!()
    };
    let names: Vec<_> = l.entries.iter().map(|e| (e.name.as_str(), e.kind)).collect();
    assert_eq!(names, vec![("b", EntryKind::Dir), ("x", EntryKind::File)]);
    // No conditional listing in S3, but an unchanged listing says so.
    assert_eq!(
        s.list("a", l.validator.as_deref()).await.unwrap(),
        Revalidated::NotModified
    );
    put(&s, "a/y", &[0]).await;
    assert!(matches!(
        s.list("a", l.validator.as_deref()).await.unwrap(),
        Revalidated::Modified(_)
    ));
    assert!(matches!(s.list("nope", None).await, Err(StoreError::NotFound)));

    // A file is one HEAD; a folder a HEAD and one ListObjectsV2 of at most one key.
    srv.wire.reset();
    let Revalidated::Modified(Head::File(m)) = s.head("a/x", None).await.unwrap() else {
        panic!()
    };
    assert_eq!(m.size, 3);
    let seen = srv.wire.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "HEAD");
    assert_eq!(s.head("a/x", m.etag.as_ref()).await.unwrap(), Revalidated::NotModified);
    srv.wire.reset();
    assert!(matches!(
        s.head("a", None).await.unwrap(),
        Revalidated::Modified(Head::Dir { .. })
    ));
    let seen = srv.wire.requests();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen[1].is_list() && seen[1].query.contains("max-keys=1"), "{seen:?}");
    assert!(matches!(s.head("a/nope", None).await, Err(StoreError::NotFound)));
    assert!(matches!(
        s.head("", None).await.unwrap(),
        Revalidated::Modified(Head::Dir { .. })
    ));
}

#[tokio::test]
async fn a_prefix_is_the_root_and_nothing_outside_it_is_seen() {
    let srv = S3Server::start();
    let whole = srv.store("").await;
    put(&whole, "team/builds/app.bin", b"app").await;
    put(&whole, "team/other.bin", b"o").await;
    let s = srv.store("team/builds").await;
    assert_eq!(s.id(), "s3://artifacts/team/builds");
    assert_eq!(
        listing(s.list("", None).await.unwrap()),
        vec![("app.bin".into(), EntryKind::File, 3)]
    );
    put(&s, "new.bin", b"n").await;
    assert!(whole.head("team/builds/new.bin", None).await.is_ok());
    assert!(matches!(s.head("other.bin", None).await, Err(StoreError::NotFound)));
}

#[tokio::test]
async fn long_listings_are_paginated() {
    let srv = S3Server::start();
    // Written into the server's folder directly: 1,005 keys, more than one page of 1,000.
    for i in 0..1005 {
        let p = srv.file(&format!("many/f{i:04}"));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, [1u8; 2]).unwrap();
    }
    let s = srv.store("").await;
    srv.wire.reset();
    let entries = listing(s.list("many", None).await.unwrap());
    assert_eq!(entries.len(), 1005);
    assert_eq!(entries[1004].0, "f1004");
    let lists = srv.wire.requests().iter().filter(|r| r.is_list()).count();
    assert_eq!(lists, 2, "two pages");
}

#[tokio::test]
async fn ranged_reads_return_the_etag_the_server_sent() {
    let srv = S3Server::start();
    let s = srv.store("").await;
    let data = common::bytes(200_000, 1);
    let t = put(&s, "f", &data).await;
    let r = s.get("f", Some(10..100_010), Some(&t)).await.unwrap();
    assert_eq!(
        r.content,
        Content::Partial {
            range: 10..100_010,
            total: Some(200_000)
        }
    );
    assert_eq!(r.etag.as_ref(), Some(&t));
    assert_eq!(read_all(r).await, &data[10..100_010]);
    let whole = s.get("f", None, None).await.unwrap();
    assert_eq!(whole.content, Content::Whole { size: Some(200_000) });
    assert_eq!(read_all(whole).await, data);
    // Replaced: a server that ignores If-Match (s3s-fs) still names the version it sent,
    // which the engine compares; one that honours it fails the request.
    let t2 = put(&s, "f", &[9u8; 5]).await;
    match s.get("f", Some(0..1), Some(&t)).await {
        Err(StoreError::PreconditionFailed) => {}
        Ok(r) => assert_eq!(r.etag, Some(t2)),
        Err(e) => panic!("{e}"),
    }
    assert!(matches!(
        s.get("f", Some(5..6), None).await,
        Err(StoreError::RangeNotSatisfiable { .. })
    ));
    assert!(matches!(s.get("nope", None, None).await, Err(StoreError::NotFound)));
}

#[tokio::test]
async fn writes_are_conditional() {
    let srv = S3Server::start();
    let s = srv.store("").await;
    let t1 = s
        .put("f", Bytes::from_static(b"one"), WriteCondition::Absent)
        .await
        .unwrap()
        .etag
        .unwrap();
    assert!(matches!(
        s.put("f", Bytes::from_static(b"x"), WriteCondition::Absent).await,
        Err(StoreError::PreconditionFailed)
    ));
    assert!(matches!(
        s.put(
            "f",
            Bytes::from_static(b"x"),
            WriteCondition::Matches(ETag::new("\"nope\""))
        )
        .await,
        Err(StoreError::PreconditionFailed)
    ));
    assert!(matches!(
        s.put("gone", Bytes::from_static(b"x"), WriteCondition::Matches(t1.clone()))
            .await,
        Err(StoreError::PreconditionFailed)
    ));
    let t2 = s
        .put("f", Bytes::from_static(b"two"), WriteCondition::Matches(t1.clone()))
        .await
        .unwrap()
        .etag
        .unwrap();
    assert_ne!(t1, t2);
    assert!(matches!(
        s.delete("f", WriteCondition::Matches(t1)).await,
        Err(StoreError::PreconditionFailed)
    ));
    s.delete("f", WriteCondition::Matches(t2)).await.unwrap();
    assert!(matches!(
        s.delete("f", WriteCondition::None).await,
        Err(StoreError::NotFound)
    ));
}

#[tokio::test]
async fn without_conditional_writes_a_head_checks_the_version() {
    let srv = S3Server::start();
    let cfg = S3Config {
        conditional_writes: false,
        ..srv.config()
    };
    let s = S3Store::connect_with(
        &srv.url(""),
        &cfg,
        &Default::default(),
        Some(static_credentials(ACCESS_KEY, SECRET_KEY)),
    )
    .await
    .unwrap();
    let t = put(&s, "f", b"one").await;
    assert!(matches!(
        s.put("f", Bytes::from_static(b"x"), WriteCondition::Absent).await,
        Err(StoreError::PreconditionFailed)
    ));
    s.put("f", Bytes::from_static(b"two"), WriteCondition::Matches(t))
        .await
        .unwrap();
}

#[tokio::test]
async fn an_upload_session_copies_base_ranges_on_the_server() {
    let srv = S3Server::start();
    let s = srv.store("").await;
    let base_data = common::bytes(12 * MIB, 2);
    let base = put(&s, "f", &base_data).await;
    srv.wire.reset();
    let id = s.begin_upload("f", Some(base.clone())).await.unwrap();
    let p1 = s
        .upload_part(&id, 1, PartSource::CopyFromBase(0..6 * MIB as u64), None)
        .await
        .unwrap();
    let p2 = s
        .upload_part(&id, 2, PartSource::Bytes(Bytes::from_static(b"appended")), None)
        .await
        .unwrap();
    let meta = s
        .commit_upload(&id, vec![p1, p2], WriteCondition::Matches(base.clone()))
        .await
        .unwrap();
    assert_eq!(meta.size, 6 * MIB as u64 + 8);
    let received = srv.wire.received();
    assert!(
        received < 64 << 10,
        "only the new bytes and requests travel: {received}"
    );
    assert!(srv.wire.requests().iter().any(|r| r.copy), "UploadPartCopy was used");
    let got = read_all(s.get("f", None, None).await.unwrap()).await;
    assert_eq!(&got[..6 * MIB], &base_data[..6 * MIB]);
    assert_eq!(&got[6 * MIB..], b"appended");
    // The version the commit names is the one the server now has.
    let Revalidated::Modified(Head::File(now)) = s.head("f", None).await.unwrap() else {
        panic!()
    };
    assert_eq!(now.etag, meta.etag);
    assert_eq!(now.size, meta.size);
}

#[tokio::test]
async fn a_session_whose_base_changed_meanwhile_does_not_overwrite() {
    let srv = S3Server::start();
    let s = srv.store("").await;
    let base = put(&s, "f", &common::bytes(6 * MIB, 3)).await;
    let id = s.begin_upload("f", Some(base.clone())).await.unwrap();
    let p1 = s
        .upload_part(&id, 1, PartSource::CopyFromBase(0..5 * MIB as u64), None)
        .await
        .unwrap();
    let p2 = s
        .upload_part(&id, 2, PartSource::Bytes(Bytes::from_static(b"XY")), None)
        .await
        .unwrap();
    // Someone else writes in between: the commit must not overwrite them.
    let theirs = put(&s, "f", b"theirs").await;
    let err = s.commit_upload(&id, vec![p1, p2], WriteCondition::Matches(base)).await;
    assert!(matches!(err, Err(StoreError::PreconditionFailed)), "{err:?}");
    let Revalidated::Modified(Head::File(m)) = s.head("f", None).await.unwrap() else {
        panic!()
    };
    assert_eq!(m.etag, Some(theirs));
    let _ = s.abort_upload(&id).await;
}

#[tokio::test]
async fn parts_below_the_minimum_are_refused_at_the_commit_and_sessions_abort() {
    let srv = S3Server::start();
    let s = srv.store("").await;
    let caps = s.capabilities();
    assert_eq!(caps.min_part_size, 5 << 20);
    assert_eq!(caps.max_parts, 10_000);
    assert!(caps.server_side_copy && caps.writes && !caps.partial_writes && !caps.listing_etags);
    let id = s.begin_upload("n", None).await.unwrap();
    let p1 = s
        .upload_part(&id, 1, PartSource::Bytes(Bytes::from_static(b"small")), None)
        .await
        .unwrap();
    let p2 = s
        .upload_part(&id, 2, PartSource::Bytes(Bytes::from_static(b"last")), None)
        .await
        .unwrap();
    let err = s.commit_upload(&id, vec![p1, p2], WriteCondition::Absent).await;
    assert!(matches!(err, Err(StoreError::Refused { status: 400, .. })), "{err:?}");
    assert!(matches!(
        s.upload_part(&id, 1, PartSource::Chunk([0; 32]), None).await,
        Err(StoreError::Unsupported(_))
    ));
    assert!(matches!(
        s.upload_part(&id, 1, PartSource::CopyFromBase(0..1), None).await,
        Err(StoreError::Unsupported(_))
    ));
    let id = s.begin_upload("n2", None).await.unwrap();
    s.abort_upload(&id).await.unwrap();
    let one = s.begin_upload("n3", None).await.unwrap();
    let p = s
        .upload_part(&one, 1, PartSource::Bytes(Bytes::from_static(b"only part")), None)
        .await
        .unwrap();
    let m = s.commit_upload(&one, vec![p], WriteCondition::Absent).await.unwrap();
    assert_eq!(m.size, 9);
}

#[tokio::test]
async fn folders_are_marker_objects_and_only_empty_ones_go() {
    let srv = S3Server::start();
    let s = srv.store("").await;
    s.mkdir("d").await.unwrap();
    assert!(matches!(s.mkdir("d").await, Err(StoreError::Conflict(c)) if c == "exists"));
    put(&s, "d/f", b"x").await;
    assert!(matches!(s.rmdir("d").await, Err(StoreError::Conflict(c)) if c == "not_empty"));
    put(&s, "file", b"x").await;
    assert!(matches!(s.mkdir("file").await, Err(StoreError::Conflict(c)) if c == "exists"));
    s.delete("d/f", WriteCondition::None).await.unwrap();
    s.rmdir("d").await.unwrap();
    assert!(matches!(s.head("d", None).await, Err(StoreError::NotFound)));
}

#[tokio::test]
async fn files_rename_by_copy_and_folders_refuse() {
    let srv = S3Server::start();
    let s = srv.store("").await;
    let t = put(&s, "a.txt", b"hello").await;
    put(&s, "dir/x", b"x").await;
    assert!(matches!(
        s.rename("a.txt", "b.txt", WriteCondition::Matches(ETag::new("\"other\"")))
            .await,
        Err(StoreError::PreconditionFailed)
    ));
    srv.wire.reset();
    s.rename("a.txt", "b.txt", WriteCondition::Matches(t)).await.unwrap();
    assert!(srv.wire.received() < 8 << 10, "a server-side copy");
    assert!(matches!(s.head("a.txt", None).await, Err(StoreError::NotFound)));
    assert_eq!(read_all(s.get("b.txt", None, None).await.unwrap()).await, b"hello");
    assert!(matches!(
        s.rename("dir", "dir2", WriteCondition::None).await,
        Err(StoreError::Unsupported(_))
    ));
    assert!(matches!(
        s.rename("b.txt", "dir", WriteCondition::None).await,
        Err(StoreError::Conflict(c)) if c == "is_dir"
    ));
    assert!(matches!(
        s.rename("nope", "x", WriteCondition::None).await,
        Err(StoreError::NotFound)
    ));
}

#[tokio::test]
async fn wrong_keys_and_unreachable_servers_fail_with_the_reason_and_no_secret() {
    let srv = S3Server::start();
    let err = S3Store::connect_with(
        &srv.url(""),
        &srv.config(),
        &Default::default(),
        Some(static_credentials(ACCESS_KEY, "wrong-secret-value")),
    )
    .await
    .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StoreError::Refused { status: 403, .. }), "{msg}");
    assert!(!msg.contains("wrong-secret-value"), "{msg}");
    let err = S3Store::connect_with(
        "s3://no-such-bucket",
        &srv.config(),
        &Default::default(),
        Some(static_credentials(ACCESS_KEY, SECRET_KEY)),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("NoSuchBucket"), "{err}");

    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let cfg = S3Config {
        endpoint_url: Some(format!("http://127.0.0.1:{port}")),
        ..srv.config()
    };
    let http = artifactfs::store::http::HttpConfig {
        retries: 1,
        ..Default::default()
    };
    let err = S3Store::connect_with(
        &srv.url(""),
        &cfg,
        &http,
        Some(static_credentials(ACCESS_KEY, SECRET_KEY)),
    )
    .await
    .unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().to_lowercase().contains("connect"), "{err}");
}

#[tokio::test]
async fn a_ca_bundle_that_holds_no_certificate_is_named() {
    let srv = S3Server::start();
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("ca.pem");
    std::fs::write(&pem, "not a certificate\n").unwrap();
    let cfg = S3Config {
        ca_bundle: Some(pem.clone()),
        ..srv.config()
    };
    let err = S3Store::connect_with(
        &srv.url(""),
        &cfg,
        &Default::default(),
        Some(static_credentials(ACCESS_KEY, SECRET_KEY)),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("ca_bundle") && err.to_string().contains("ca.pem"),
        "{err}"
    );
    let cfg = S3Config {
        endpoint_url: Some("ftp://127.0.0.1:1".into()),
        ..srv.config()
    };
    let err = S3Store::connect_with(&srv.url(""), &cfg, &Default::default(), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("endpoint_url"), "{err}");
}
