//! Security as a user meets it: `artifactfs token create`, a mount that sends its token (from
//! a file or the environment), mounts refused with the server's reason (expired, missing, out
//! of scope), `serve` refusing unsafe settings, and a TLS server reached through `--ca-bundle`.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use artifactfs::server::auth::{self, Claims, Mode, Secret};
use common::*;

const SECRET: &str = "an end-to-end test secret, longer than 32 bytes";

/// A file only its owner may read, holding `text`.
fn private_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

/// `artifactfs token create …`, as a user would make one.
fn token_create(secret_file: &Path, prefix: &str, mode: &str, expires: &str) -> String {
    let out = afs(&[
        "token",
        "create",
        "--secret-file",
        s(secret_file),
        "--prefix",
        prefix,
        "--mode",
        mode,
        "--expires",
        expires,
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let token = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(token.starts_with("afs1.") && token.split('.').count() == 3, "{token}");
    token
}

fn serve_with_tokens(store: &Store) -> Server {
    store.serve_with(|c| c.token_secret = Some(Arc::new(Secret::new(SECRET.as_bytes()).unwrap())))
}

#[test]
fn a_token_file_mounts_its_prefix_for_reading_and_writing() {
    let store = Store::new();
    let model = bytes(3 * MIB + 17, 5);
    store.write("team/model.bin", &model);
    store.write("other/secret.bin", b"not for the team");
    let server = serve_with_tokens(&store);
    let keys = tempfile::tempdir().unwrap();
    let secret = private_file(keys.path(), "secret", SECRET);
    let token = token_create(&secret, "/team", "read-write", "1h");
    let token_file = private_file(keys.path(), "token", &format!("{token}\n"));
    let mut m = Mount::with(
        &format!("{}/team", server.url()),
        MountOpts {
            args: vec!["--token-file".into(), s(&token_file).into()],
            ..Default::default()
        },
    );
    assert_eq!(hash_file(&m.path("model.bin")).unwrap(), hash(&model));
    std::fs::write(m.path("written.txt"), b"from the mount").unwrap();
    assert_eq!(
        std::fs::read(store.path("team/written.txt")).unwrap(),
        b"from the mount"
    );
    m.unmount();
    // The daemon logged at debug level, requests included: never the token.
    let log = m.log_text();
    assert!(log.contains("mounted"), "{log}");
    assert!(!log.contains(&token[5..]), "the token is in the log");
}

#[test]
fn a_read_token_from_the_environment_reads_and_cannot_write() {
    let store = Store::new();
    let data = bytes(MIB + 3, 9);
    store.write("pub/data.bin", &data);
    let server = serve_with_tokens(&store);
    let keys = tempfile::tempdir().unwrap();
    let token = token_create(&private_file(keys.path(), "secret", SECRET), "/", "read", "7d");
    let m = Mount::with(
        &server.url(),
        MountOpts {
            env: vec![("ARTIFACTFS_TOKEN".into(), token)],
            ..Default::default()
        },
    );
    assert_eq!(hash_file(&m.path("pub/data.bin")).unwrap(), hash(&data));
    // The token says it reads only: the mount is read-only, rather than refused at close.
    let e = std::fs::write(m.path("pub/new.bin"), b"x").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    assert!(!store.path("pub/new.bin").exists());
}

#[test]
fn mounts_without_a_valid_token_fail_naming_the_cause() {
    let store = Store::new();
    store.write("team/a.bin", b"a");
    let server = serve_with_tokens(&store);
    let url = server.url();
    let keys = tempfile::tempdir().unwrap();
    let secret = Secret::new(SECRET.as_bytes()).unwrap();
    let expired = auth::create(
        &secret,
        &Claims {
            prefix: "/".into(),
            mode: Mode::Read,
            exp: 1_000_000,
            iat: 0,
        },
    );
    let expired_file = private_file(keys.path(), "expired", &expired);
    let team = token_create(&private_file(keys.path(), "secret", SECRET), "/team", "read", "1h");
    let team_file = private_file(keys.path(), "team", &team);
    let place = Place::new();
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 4] = [
        (
            &["--token-file", s(&expired_file)],
            &[],
            "refused the token: unauthorized: token expired",
        ),
        (
            &[],
            &[("ARTIFACTFS_TOKEN", &expired)],
            "refused the token: unauthorized: token expired",
        ),
        (&[], &[], "requires a token (unauthorized: missing token"),
        // A token for /team does not reach the root.
        (
            &["--token-file", s(&team_file)],
            &[],
            "the token does not reach this folder",
        ),
    ];
    for (args, env, why) in cases {
        let start = Instant::now();
        let out = place.mount_with(&url, args, env);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?}: mounted");
        assert!(err.contains(why), "{args:?}: {err}");
        assert!(!err.contains(&expired[5..]) && !err.contains(&team[5..]), "{err}");
        assert!(!is_mounted(&place.mnt));
        assert!(start.elapsed() < Duration::from_secs(20), "{args:?}: retried a refusal");
    }
    // A token file others can read is refused before anything is sent.
    std::fs::set_permissions(&team_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = place.mount_with(&format!("{url}/team"), &["--token-file", s(&team_file)], &[]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("chmod 600"), "{}", stderr(&out));
    // The same token, private again, mounts /team.
    std::fs::set_permissions(&team_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = place.mount_with(&format!("{url}/team"), &["--token-file", s(&team_file)], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(place.mnt.join("a.bin")).unwrap(), b"a");
}

/// `artifactfs serve ARGS`; the address it prints, or its exit and stderr when it stops
/// within 20 s.
fn serve_cli(args: &[&str]) -> Result<(Child, String), Output> {
    let mut child = Command::new(bin())
        .arg("serve")
        .args(args)
        .env_remove("ARTIFACTFS_TOKEN_SECRET")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    match line.strip_prefix("listening on ") {
        Some(url) => Ok((child, url.trim().to_string())),
        None => {
            let end = Instant::now() + Duration::from_secs(20);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > end {
                    let _ = child.kill();
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(child.wait_with_output().unwrap())
        }
    }
}

/// `artifactfs serve ARGS`, which must refuse to start.
fn serve_refused(args: &[&str]) -> Output {
    match serve_cli(args) {
        Ok((child, url)) => {
            drop(Killed(child));
            panic!("serve {args:?} started on {url}");
        }
        Err(out) => out,
    }
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn serve_refuses_a_public_address_without_tokens_and_a_secret_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    // Refused before anything is bound.
    let out = serve_refused(&[s(dir.path()), "--listen", "0.0.0.0:0"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("--allow-anonymous") && err.contains("--token-secret-file"),
        "{err}"
    );
    let secret = dir.path().join("secret");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = serve_refused(&[
        s(dir.path()),
        "--listen",
        "127.0.0.1:0",
        "--token-secret-file",
        s(&secret),
    ]);
    let err = stderr(&out);
    assert!(
        err.contains("accessible to every user") && err.contains("chmod 600"),
        "{err}"
    );
    assert!(!err.contains(SECRET));
}

/// A CA, and a certificate for 127.0.0.1 signed by it: (ca.pem, cert.pem, key.pem).
fn make_ca_and_cert(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "artifactfs test CA");
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    let cert_file = dir.join("cert.pem");
    std::fs::write(&cert_file, cert.pem()).unwrap();
    let key_file = private_file(dir, "key.pem", &key.serialize_pem());
    (ca, cert_file, key_file)
}

#[test]
fn a_tls_server_is_mounted_with_its_ca_and_refused_without_it() {
    let store = Store::new();
    let data = bytes(2 * MIB + 5, 11);
    store.write("data.bin", &data);
    let keys = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_ca_and_cert(keys.path());
    let secret = private_file(keys.path(), "secret", SECRET);
    let (child, url) = serve_cli(&[
        s(store.dir.path()),
        "--listen",
        "127.0.0.1:0",
        "--tls-cert",
        s(&cert),
        "--tls-key",
        s(&key),
        "--token-secret-file",
        s(&secret),
    ])
    .unwrap_or_else(|o| panic!("serve failed: {}", stderr(&o)));
    let _server = Killed(child);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let token_file = private_file(keys.path(), "token", &token_create(&secret, "/", "read", "1h"));
    // Without the CA: the certificate is not trusted, and the mount says so.
    let place = Place::new();
    let out = place.mount_with(&url, &["--token-file", s(&token_file)], &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(!is_mounted(&place.mnt));
    // With it, the bytes arrive intact.
    let m = Mount::with(
        &url,
        MountOpts {
            args: vec![
                "--ca-bundle".into(),
                s(&ca).into(),
                "--token-file".into(),
                s(&token_file).into(),
            ],
            ..Default::default()
        },
    );
    assert_eq!(hash_file(&m.path("data.bin")).unwrap(), hash(&data));
}
