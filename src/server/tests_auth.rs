//! Tokens end to end (`docs/PROTOCOL.md`, "Authentication"): a real `ServerHandle` that
//! requires tokens, asked every kind of request with no token, bad tokens, tokens of another
//! scope or mode, and good ones. Refused writes must change nothing.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{Method, StatusCode, header};

use super::auth::{self, Claims, Mode, Secret};
use super::tests::{Fixture, Resp, client, data};
use super::*;
use crate::protocol::{HasChunksAnswer, cdc_chunks};

const SECRET: &[u8] = b"a test secret of at least 32 bytes";

fn secret() -> Arc<Secret> {
    Arc::new(Secret::new(SECRET).unwrap())
}

fn token_with(secret: &Secret, prefix: &str, mode: Mode, exp: u64) -> String {
    let claims = Claims {
        prefix: prefix.into(),
        mode,
        exp,
        iat: 0,
    };
    auth::create(secret, &claims)
}

fn in_an_hour() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() + 3600
}

fn token(prefix: &str, mode: Mode) -> String {
    token_with(&secret(), prefix, mode, in_an_hour())
}

const A: &[u8] = b"the content of a/f.bin";

fn fixture() -> Fixture {
    Fixture::with_config(
        |root| {
            std::fs::create_dir_all(root.join("a")).unwrap();
            std::fs::create_dir_all(root.join("b")).unwrap();
            std::fs::write(root.join("a/f.bin"), A).unwrap();
            std::fs::write(root.join("b/g.bin"), data(600 << 10, 7)).unwrap();
            std::os::unix::fs::symlink("../b/g.bin", root.join("a/link")).unwrap();
            std::os::unix::fs::symlink("../b", root.join("a/bdir")).unwrap();
        },
        |cfg| cfg.token_secret = Some(secret()),
    )
}

/// Every kind of request, on a file or folder under `dir` (`a` or `b`): (method, target,
/// body, whether it writes).
fn every_request(dir: &str) -> Vec<(Method, String, Vec<u8>, bool)> {
    let has = serde_json::to_vec(&serde_json::json!({"chunks": ["00".repeat(32)]})).unwrap();
    let commit = serde_json::to_vec(&serde_json::json!({"parts": []})).unwrap();
    let f = format!("/{dir}/f.bin");
    vec![
        (Method::GET, f.clone(), vec![], false),
        (Method::HEAD, f.clone(), vec![], false),
        (Method::GET, format!("/{dir}/?afs=list"), vec![], false),
        (Method::GET, format!("/{dir}/"), vec![], false),
        (Method::HEAD, format!("/{dir}/"), vec![], false),
        (Method::GET, format!("{f}?afs=digests"), vec![], false),
        (Method::GET, format!("{f}?afs=chunks"), vec![], false),
        (Method::POST, format!("/{dir}/?afs=has-chunks"), has, true),
        (Method::PUT, format!("/{dir}/new.bin"), b"new".to_vec(), true),
        (Method::DELETE, f.clone(), vec![], true),
        (Method::POST, format!("/{dir}/sub/?afs=mkdir"), vec![], true),
        (Method::POST, format!("{f}?afs=move&to=/{dir}/moved.bin"), vec![], true),
        (Method::POST, format!("{f}?afs=append&offset=0"), b"x".to_vec(), true),
        (Method::POST, format!("{f}?afs=write&offset=0"), b"x".to_vec(), true),
        (Method::POST, format!("{f}?afs=truncate&size=1"), vec![], true),
        (Method::POST, format!("{f}?afs=upload"), vec![], true),
        (
            Method::PUT,
            format!("{f}?afs=part&upload=u1&part=1"),
            b"x".to_vec(),
            true,
        ),
        (Method::POST, format!("{f}?afs=commit&upload=u1"), commit, true),
        (Method::DELETE, format!("{f}?afs=upload&upload=u1"), vec![], true),
    ]
}

async fn send(f: &Fixture, method: Method, target: &str, body: Vec<u8>, token: Option<&str>) -> Resp {
    let mut req = client().request(method, f.url(target)).body(body);
    if let Some(t) = token {
        req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
    }
    Resp::from(req.send().await.unwrap()).await
}

/// Asserts the served folder still holds exactly what [`fixture`] made.
fn unchanged(root: &Path) {
    assert_eq!(std::fs::read(root.join("a/f.bin")).unwrap(), A);
    let mut names: Vec<_> = std::fs::read_dir(root.join("a"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["bdir", "f.bin", "link"]);
    assert_eq!(std::fs::read_dir(root.join("b")).unwrap().count(), 1);
}

fn assert_unauthorized(r: &Resp, why: &str, what: &str) {
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{what}");
    assert_eq!(
        r.header(header::WWW_AUTHENTICATE),
        "Bearer realm=\"artifactfs\"",
        "{what}"
    );
    if !r.body.is_empty() {
        // HEAD answers have no body.
        assert_eq!(r.error_code(), "unauthorized", "{what}");
        let body = String::from_utf8_lossy(&r.body);
        assert!(body.contains(why), "{what}: {body}");
    }
}

#[tokio::test]
async fn every_kind_of_request_needs_a_valid_token() {
    let f = fixture();
    let expired = token_with(&secret(), "/", Mode::ReadWrite, 1000);
    let other = token_with(
        &Secret::new(b"not the server's secret at all!!").unwrap(),
        "/",
        Mode::ReadWrite,
        in_an_hour(),
    );
    let mut requests = every_request("a");
    requests.push((Method::GET, "/?afs=info".into(), vec![], false));
    requests.push((Method::GET, "/?afs=stats".into(), vec![], false));
    for (method, target, body, _) in &requests {
        let what = format!("{method} {target}");
        let r = send(&f, method.clone(), target, body.clone(), None).await;
        assert_unauthorized(&r, "missing token", &what);
        let r = send(&f, method.clone(), target, body.clone(), Some(&expired)).await;
        assert_unauthorized(&r, "token expired", &what);
        let r = send(&f, method.clone(), target, body.clone(), Some(&other)).await;
        assert_unauthorized(&r, "invalid token signature", &what);
        let r = send(&f, method.clone(), target, body.clone(), Some("afs1.garbage")).await;
        assert_unauthorized(&r, "malformed token", &what);
    }
    unchanged(&f.root());
    assert_eq!(f.settle().writes, 0);
}

#[tokio::test]
async fn tokens_reach_their_prefix_only_and_read_tokens_never_write() {
    let f = fixture();
    let rw_a = token("/a", Mode::ReadWrite);
    let read_a = token("/a/", Mode::Read);
    // Everything under b is outside a's scope, reads and writes alike.
    for (method, target, body, _) in every_request("b") {
        let r = send(&f, method.clone(), &target, body, Some(&rw_a)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {target}");
        if method != Method::HEAD {
            assert_eq!(r.error_code(), "out_of_scope", "{method} {target}");
        }
    }
    // A read token in scope reads, and every write is refused.
    for (method, target, body, writes) in every_request("a") {
        let r = send(&f, method.clone(), &target, body, Some(&read_a)).await;
        if writes {
            assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {target}");
            assert_eq!(r.error_code(), "out_of_scope");
            assert!(String::from_utf8_lossy(&r.body).contains("reads only"));
        } else {
            assert!(r.status.is_success(), "{method} {target}: {}", r.status);
        }
    }
    unchanged(&f.root());
    assert_eq!(f.settle().writes, 0);
    // The read-write token writes inside its prefix.
    let r = send(&f, Method::PUT, "/a/new.bin", b"new".to_vec(), Some(&rw_a)).await;
    assert_eq!(r.status, StatusCode::CREATED);
    assert_eq!(std::fs::read(f.root().join("a/new.bin")).unwrap(), b"new");
    let r = send(&f, Method::GET, "/a/new.bin", vec![], Some(&read_a)).await;
    assert_eq!((r.status, r.body.as_slice()), (StatusCode::OK, &b"new"[..]));
    // info and stats need a token, of any scope.
    let r = send(&f, Method::GET, "/?afs=info", vec![], Some(&read_a)).await;
    assert_eq!(r.status, StatusCode::OK);
}

#[tokio::test]
async fn parent_listings_symlinks_and_move_targets_stay_in_scope() {
    let f = fixture();
    let rw_a = token("/a", Mode::ReadWrite);
    // Folders above the prefix are refused, not filtered: their names are not shown.
    for target in ["/", "/?afs=list", "/b/"] {
        let r = send(&f, Method::GET, target, vec![], Some(&rw_a)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{target}");
        assert!(!String::from_utf8_lossy(&r.body).contains("g.bin"));
    }
    // A name that only starts like the prefix is outside it.
    let r = send(&f, Method::GET, "/ab", vec![], Some(&rw_a)).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    // Symlinks inside the prefix that lead outside it.
    for (method, target, body) in [
        (Method::GET, "/a/link", vec![]),
        (Method::GET, "/a/bdir/", vec![]),
        (Method::GET, "/a/bdir/g.bin", vec![]),
        (Method::PUT, "/a/link", b"over".to_vec()),
        (Method::PUT, "/a/bdir/new.bin", b"new".to_vec()),
    ] {
        let r = send(&f, method.clone(), target, body, Some(&rw_a)).await;
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {target}");
    }
    // The listing of a/ leaves out the symlinks that lead out of it.
    let r = send(&f, Method::GET, "/a/?afs=list", vec![], Some(&rw_a)).await;
    let names: Vec<String> = r
        .json::<crate::protocol::ListPage>()
        .entries
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["f.bin"]);
    let r = send(&f, Method::GET, "/a/?afs=list", vec![], Some(&token("/", Mode::Read))).await;
    assert_eq!(
        r.json::<crate::protocol::ListPage>().entries.len(),
        3,
        "a global token sees them"
    );
    // A move out of the prefix.
    let r = send(
        &f,
        Method::POST,
        "/a/f.bin?afs=move&to=/b/stolen.bin",
        vec![],
        Some(&rw_a),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = send(
        &f,
        Method::POST,
        "/a/f.bin?afs=move&to=%2Fa%2Fbdir%2Fx",
        vec![],
        Some(&rw_a),
    )
    .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN, "through a symlink");
    unchanged(&f.root());
    // A global token reads the root.
    let r = send(&f, Method::GET, "/?afs=list", vec![], Some(&token("/", Mode::Read))).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(String::from_utf8_lossy(&r.body).contains("\"b\""));
}

#[tokio::test]
async fn chunks_outside_the_scope_are_neither_reported_nor_copied() {
    let f = fixture();
    let b = data(600 << 10, 7);
    let b_hash = cdc_chunks(&b)[0].hash.clone();
    let a_hash = cdc_chunks(A)[0].hash.clone();
    let ask = serde_json::to_vec(&serde_json::json!({"chunks": [b_hash.clone(), a_hash.clone()]})).unwrap();
    let everything = token("/", Mode::ReadWrite);
    let rw_a = token("/a", Mode::ReadWrite);
    // Indexing runs in the background: wait until the global token sees both.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = send(&f, Method::POST, "/?afs=has-chunks", ask.clone(), Some(&everything)).await;
        assert_eq!(r.status, StatusCode::OK);
        if r.json::<HasChunksAnswer>().have == [true, true] {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "chunks never indexed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = send(&f, Method::POST, "/a/?afs=has-chunks", ask, Some(&rw_a)).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json::<HasChunksAnswer>().have, [false, true]);
    // A part made of b's chunk, in a session on a/: the chunk is unknown to this token.
    let r = send(&f, Method::POST, "/a/copy.bin?afs=upload", vec![], Some(&rw_a)).await;
    assert_eq!(r.status, StatusCode::CREATED);
    let id = r.json::<crate::protocol::UploadStarted>().upload;
    let part = |h: &str| format!("/a/copy.bin?afs=part&upload={id}&part=1&chunk={h}");
    let r = send(&f, Method::PUT, &part(&b_hash), vec![], Some(&rw_a)).await;
    assert_eq!(
        (r.status, r.error_code().as_str()),
        (StatusCode::NOT_FOUND, "unknown_chunk")
    );
    let r = send(&f, Method::PUT, &part(&a_hash), vec![], Some(&rw_a)).await;
    assert_eq!(r.status, StatusCode::OK, "{}", String::from_utf8_lossy(&r.body));
}

#[test]
fn a_server_on_a_public_address_needs_tokens_or_allow_anonymous() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig::local(dir.path());
    cfg.listen = "0.0.0.0:0".parse().unwrap();
    let err = ServerHandle::start(cfg).err().expect("refused").to_string();
    assert!(
        err.contains("--allow-anonymous") && err.contains("--token-secret-file"),
        "{err}"
    );
    // Loopback needs neither.
    assert!(ServerHandle::start(ServerConfig::local(dir.path())).is_ok());
}
