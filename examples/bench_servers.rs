//! The servers `scripts/bench_remotes.py` measures the mount against, on 127.0.0.1, over the
//! file it is given: nginx with WebDAV (`sendfile on`) and an S3 server (s3s-fs, the test
//! suite's; the file is uploaded through the S3 API so the server keeps its ETag). Prints one
//! line per server, `nginx URL` and `s3 ENDPOINT BUCKET KEY SECRET`, then `ready`, and stops
//! them when its stdin closes.
//!
//! `cargo run --release --example bench_servers -- FILE`

use std::io::{BufRead, Write};
use std::sync::Arc;

use artifactfs::store::Store;
use artifactfs::store::s3::{S3Config, S3Store, client::static_credentials};
use artifactfs::testing::web::{NginxMode, WebServer};

const KEY: &str = "AKIAARTIFACTFSBENCH1";
const SECRET: &str = "artifactfs-bench-secret-not-a-real-one";
const BUCKET: &str = "bench";

fn main() {
    let file = std::path::PathBuf::from(std::env::args().nth(1).expect("usage: bench_servers FILE"));
    let name = file.file_name().unwrap().to_str().unwrap().to_string();
    let data = std::fs::read(&file).expect("the file to serve");

    let nginx = WebServer::nginx(NginxMode::Dav).expect("nginx starts (scripts/test.sh installs it)");
    nginx.write(&name, &data);

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join(BUCKET)).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let root = dir.path().to_path_buf();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        let fs = s3s_fs::FileSystem::new(&root).unwrap();
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(KEY, SECRET));
        let service = b.build();
        let http = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let (service, http) = (service.clone(), http.clone());
            tokio::spawn(async move {
                let _ = http
                    .serve_connection(hyper_util::rt::TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    let endpoint = format!("http://{addr}");
    rt.block_on(async {
        let cfg = S3Config {
            endpoint_url: Some(endpoint.clone()),
            region: Some("us-east-1".into()),
            ..S3Config::default()
        };
        let store = S3Store::connect_with(
            &format!("s3://{BUCKET}/"),
            &cfg,
            &Default::default(),
            Some(static_credentials(KEY, SECRET)),
        )
        .await
        .expect("the S3 server answers");
        let store: Arc<dyn Store> = Arc::new(store);
        store
            .put(&name, data.into(), artifactfs::store::WriteCondition::None)
            .await
            .expect("upload to the S3 server");
    });

    let mut out = std::io::stdout().lock();
    writeln!(out, "nginx {}", nginx.url).unwrap();
    writeln!(out, "s3 {endpoint} {BUCKET} {KEY} {SECRET}").unwrap();
    writeln!(out, "ready").unwrap();
    out.flush().unwrap();
    drop(out);
    // Until the benchmark closes our stdin.
    for _ in std::io::stdin().lock().lines() {}
    drop(nginx);
    rt.shutdown_background();
}
