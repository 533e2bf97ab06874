//! The command line: definitions (clap) and what each command runs. `main.rs` only parses
//! and calls [`run`].

pub mod config;
pub mod control;
mod daemon;
pub mod helper;
mod logging;
mod mount;
mod registry;
mod unmount;
mod warm;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use config::ByteSize;

#[derive(Debug, Parser)]
#[command(
    name = "artifactfs",
    version,
    about = "Mount a remote artifact store as a local directory"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Mount REMOTE at MOUNTPOINT; returns once the mount is ready.
    #[command(after_long_help = MOUNT_AFTER_HELP)]
    Mount(Box<MountArgs>),
    /// Unmount a mount (waits for its daemon to finish; open files do not make it hang).
    Unmount(UnmountArgs),
    /// Serve a folder over HTTP as an artifact store (the built-in server).
    Serve(ServeArgs),
    /// Inspect or empty the cache.
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Fetch files or folders of a running mount into its cache, in the order given (the
    /// first first), with a progress bar.
    Warm(WarmArgs),
    /// Live figures of a running mount.
    Status(StatusArgs),
    /// Print shell completions (bash, zsh, fish, elvish, powershell) to stdout.
    Completions(CompletionsArgs),
    /// Write man pages: artifactfs.1 and one per subcommand (artifactfs-mount.1, ...).
    Man(ManArgs),
    /// Make tokens for a server started with a token secret.
    #[command(subcommand)]
    Token(TokenCommand),
}

#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell, e.g. `artifactfs completions bash > /etc/bash_completion.d/artifactfs`.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

#[derive(Debug, Args)]
pub struct ManArgs {
    /// Where to write the pages [default: the current directory].
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

const MOUNT_AFTER_HELP: &str = "In /etc/fstab, with the type fuse.artifactfs, these flags are \
mount options written key=value, or a bare key for a yes/no flag, with _ or - \
(e.g. _netdev,cache_dir=/var/cache/afs,read_only,metadata_ttl=5m); mount(8) runs \
/sbin/mount.fuse.artifactfs, a link to this binary (docs/SYSTEM.md).";

#[derive(Debug, Args)]
pub struct WarmArgs {
    /// Files or folders inside a mount (a folder: every file below it).
    #[arg(value_name = "PATH")]
    pub paths: Vec<PathBuf>,
    /// More paths, one per line, highest priority first (after those on the command line).
    #[arg(long, value_name = "FILE")]
    pub list: Option<PathBuf>,
    /// No progress bar (there is none anyway when stdout is not a terminal).
    #[arg(long)]
    pub no_progress: bool,
    /// Warm without a mount: PATHs are paths on this remote (e.g. `models/big.bin`, or `/`
    /// for all of it), fetched into --cache-dir for a later mount of the same remote.
    #[arg(long, value_name = "URL")]
    pub remote: Option<String>,
    /// With --remote: the cache directory [default: the mount's default].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// With --remote: settings of the remote (TOML, as for mount: [http], [s3], [auth], …).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    pub mountpoint: PathBuf,
    /// As JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a new token, signed with the server's secret.
    Create(TokenCreateArgs),
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    /// The server's secret (mode 0600) [default: $ARTIFACTFS_TOKEN_SECRET].
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<PathBuf>,
    /// What the token reaches: this path and everything under it (`/` for everything).
    #[arg(long, value_name = "PATH", default_value = "/")]
    pub prefix: String,
    /// `read`, or `read-write`.
    #[arg(long, value_enum, default_value = "read")]
    pub mode: crate::server::auth::Mode,
    /// How long the token is valid, e.g. 7d, 12h.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub expires: Duration,
}

#[derive(Debug, Args)]
pub struct MountArgs {
    /// The remote: an `artifactfs serve` server, a WebDAV server or a web server's directory
    /// index (http:// or https://), or an S3 bucket and prefix (s3://BUCKET/PREFIX). Optional
    /// when the config file names it.
    #[arg(value_name = "REMOTE")]
    pub first: String,
    /// Where to mount (an existing directory).
    #[arg(value_name = "MOUNTPOINT")]
    pub second: Option<PathBuf>,
    /// TOML configuration (see mount.example.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Cache directory [default: $XDG_CACHE_HOME/artifactfs or ~/.cache/artifactfs].
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Refuse writes (EROFS).
    #[arg(long)]
    pub read_only: bool,
    /// Stay in the foreground (Ctrl-C unmounts) instead of running as a daemon.
    #[arg(long, short = 'f')]
    pub foreground: bool,
    /// Most bytes the cache keeps, e.g. 20G.
    #[arg(long, value_name = "SIZE", value_parser = ByteSize::parse)]
    pub max_cache_size: Option<ByteSize>,
    /// Percent of the cache's disk kept free; the cache shrinks below its size limit to keep
    /// it [default: 5; 0: no such limit].
    #[arg(long, value_name = "PERCENT")]
    pub cache_min_free: Option<u32>,
    /// How long metadata is trusted before it is revalidated, e.g. 60s.
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub metadata_ttl: Option<Duration>,
    /// How often folders the kernel holds are listed again in the background, e.g. 60s [0s:
    /// never; then expired entries are revalidated when next used].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub revalidate_interval: Option<Duration>,
    /// Requests to the remote in flight at once [default: by kind of remote, see
    /// `[performance]`: built-in server 16, S3 8, web servers 4, then more while more pay].
    /// A number given here stays fixed unless --max-concurrency lets it grow.
    #[arg(long, value_name = "N")]
    pub concurrency: Option<usize>,
    /// The number of requests in flight at once grows up to this while more of them bring
    /// more bytes per second [default: 64, or fixed when --concurrency is given].
    #[arg(long, value_name = "N")]
    pub max_concurrency: Option<usize>,
    /// Bytes per second to and from the remote at most, each way, e.g. 50M (binary units).
    #[arg(long, value_name = "RATE", value_parser = ByteSize::parse)]
    pub bandwidth_limit: Option<ByteSize>,
    /// Bytes per second received from the remote at most (overrides --bandwidth-limit).
    #[arg(long, value_name = "RATE", value_parser = ByteSize::parse)]
    pub download_limit: Option<ByteSize>,
    /// Bytes per second sent to the remote at most (overrides --bandwidth-limit).
    #[arg(long, value_name = "RATE", value_parser = ByteSize::parse)]
    pub upload_limit: Option<ByteSize>,
    /// Let other users use the mount (with kernel permission checks).
    #[arg(long)]
    pub allow_other: bool,
    /// Owner shown on every file and folder [default: the mounting user].
    #[arg(long, value_name = "UID")]
    pub uid: Option<u32>,
    /// Group shown on every file and folder [default: the mounting user's].
    #[arg(long, value_name = "GID")]
    pub gid: Option<u32>,
    /// Mode shown on files, octal (e.g. 0640) [default: 0644, 0444 read-only].
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub file_mode: Option<u16>,
    /// Mode shown on folders, octal (e.g. 0750) [default: 0755, 0555 read-only].
    #[arg(long, value_name = "MODE", value_parser = parse_mode)]
    pub dir_mode: Option<u16>,
    /// Log level or RUST_LOG-style filter [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Log to this file [default: stderr in the foreground, <cache dir>/artifactfs.log as a daemon].
    #[arg(long, value_name = "FILE")]
    pub log_file: Option<PathBuf>,
    /// Log kernel calls and remote requests that take at least this long [default: 1s; 0s: never].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub slow_threshold: Option<Duration>,
    /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 127.0.0.1:9187).
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Write a JSON summary of the metrics to FILE at unmount.
    #[arg(long, value_name = "FILE")]
    pub metrics_file: Option<PathBuf>,
    /// Threads answering the kernel.
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Return from close/fsync once changes are in the local journal; upload in the
    /// background after DELAY [default: 1s].
    #[arg(long, value_name = "DELAY", num_args = 0..=1, default_missing_value = "1s", value_parser = humantime::parse_duration)]
    pub write_back: Option<Duration>,
    /// Let the kernel read files complete in the cache straight from the cache file (default,
    /// when the daemon runs as root on Linux 6.9+); `--passthrough=false` reads every byte
    /// through the daemon.
    #[arg(long, value_name = "BOOL")]
    pub passthrough: Option<bool>,
    /// Send only what changed (default); `--incremental=false` uploads whole files.
    #[arg(long, value_name = "BOOL")]
    pub incremental: Option<bool>,
    /// What kind of server an http(s) remote is [default: auto, detected].
    #[arg(long, value_name = "KIND", value_enum)]
    pub kind: Option<crate::store::web::RemoteKind>,
    /// Another base URL serving the same tree (repeatable): reads are spread over all.
    #[arg(long = "mirror", value_name = "URL")]
    pub mirrors: Vec<String>,
    /// Partial PUT with Content-Range to a WebDAV server [default: only for Apache mod_dav].
    #[arg(long, value_name = "BOOL")]
    pub partial_put: Option<bool>,
    /// S3: an S3-compatible server's URL (e.g. http://127.0.0.1:9000) [default: AWS].
    #[arg(long, value_name = "URL")]
    pub endpoint_url: Option<String>,
    /// S3: the region [default: AWS_REGION, the profile's, else us-east-1].
    #[arg(long, value_name = "REGION")]
    pub region: Option<String>,
    /// S3: a profile of ~/.aws/config and ~/.aws/credentials [default: AWS_PROFILE].
    #[arg(long, value_name = "NAME")]
    pub profile: Option<String>,
    /// S3: `path`, `virtual` or `auto` (path-style with --endpoint-url, else virtual-hosted).
    #[arg(long, value_name = "STYLE")]
    pub addressing_style: Option<crate::store::s3::AddressingStyle>,
    /// https remotes (S3, the built-in server, web servers): PEM file of CA certificates
    /// trusted besides the system roots.
    #[arg(long, value_name = "FILE")]
    pub ca_bundle: Option<PathBuf>,
    /// https remotes: accept any TLS certificate (self-signed test servers only; logged as a
    /// warning).
    #[arg(long)]
    pub insecure_skip_tls_verify: bool,
    /// The mount's source as /proc/mounts, df and mount(8) show it [default:
    /// artifactfs:REMOTE; the mount helper uses the fstab line's source].
    #[arg(long, value_name = "NAME")]
    pub fsname: Option<String>,
    /// The built-in server: a file holding the token to send (mode 0600) [default:
    /// $ARTIFACTFS_TOKEN, else `token` in [auth]].
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the resolved configuration and exit.
    #[arg(long)]
    pub print_config: bool,
}

#[derive(Debug, Args)]
pub struct UnmountArgs {
    /// The mount point.
    pub mountpoint: PathBuf,
    /// How long to wait for open files to be closed before cutting them off
    /// [default: the mount's unmount_timeout].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The folder to serve.
    pub dir: PathBuf,
    /// Address to listen on (port 0 picks a free port and prints it).
    #[arg(long, default_value = "127.0.0.1:8787")]
    pub listen: std::net::SocketAddr,
    /// Where the server keeps digests [default: DIR/.artifactfs].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Send `Cache-Control: max-age=SECONDS` with files and listings.
    #[arg(long, value_name = "SECONDS")]
    pub max_age: Option<u64>,
    /// Log level or RUST_LOG-style filter [default: info].
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Require tokens signed with the secret in FILE (mode 0600; see `artifactfs token
    /// create`) [default: $ARTIFACTFS_TOKEN_SECRET when set].
    #[arg(long, value_name = "FILE")]
    pub token_secret_file: Option<PathBuf>,
    /// Serve an address other than loopback without tokens.
    #[arg(long)]
    pub allow_anonymous: bool,
    /// Serve HTTPS with this PEM certificate chain (with --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Send each file answer at most RATE bytes per second, e.g. 50M (binary units): each
    /// client connection gets that much, as with nginx's `limit_rate`.
    #[arg(long, value_name = "RATE", value_parser = ByteSize::parse)]
    pub limit_rate: Option<ByteSize>,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Size, versions, hit rate and remotes of a cache directory.
    Stats {
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Delete cached versions: all of them, or those of one remote, or those not read for a
    /// while (refused while a mount uses the directory).
    Clear {
        #[arg(long, value_name = "DIR")]
        cache_dir: Option<PathBuf>,
        /// Only this remote's versions (its name as `cache stats` shows it).
        #[arg(long, value_name = "REMOTE")]
        remote: Option<String>,
        /// Only versions not read for this long, e.g. 7d.
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Option<Duration>,
    },
}

/// An octal permission mode such as `0640` or `640`.
fn parse_mode(s: &str) -> Result<u16, String> {
    u16::from_str_radix(s.trim_start_matches("0o"), 8)
        .ok()
        .filter(|m| *m <= 0o7777)
        .ok_or_else(|| format!("{s:?} is not an octal mode such as 0640"))
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    let result = match cli.command {
        Command::Mount(a) => mount::run(*a),
        Command::Unmount(a) => unmount::run(a),
        Command::Serve(a) => serve(a),
        Command::Cache(c) => cache(c),
        Command::Warm(a) => warm::warm(a),
        Command::Status(a) => warm::status(a),
        Command::Completions(a) => completions(a.shell),
        Command::Man(a) => man(a.dir),
        Command::Token(TokenCommand::Create(a)) => token_create(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("artifactfs: {e}");
            ExitCode::FAILURE
        }
    }
}

fn completions(shell: clap_complete::Shell) -> Result<(), String> {
    use clap::CommandFactory;
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut Cli::command(), "artifactfs", &mut out);
    Ok(())
}

fn man(dir: Option<PathBuf>) -> Result<(), String> {
    use clap::CommandFactory;
    let dir = dir.unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    println!("man pages written to {}", dir.display());
    Ok(())
}

fn serve(a: ServeArgs) -> Result<(), String> {
    logging::init_stderr(a.log_level.as_deref().unwrap_or("info"));
    let secret = crate::server::auth::Secret::load(a.token_secret_file.as_deref())?;
    let tls = match (a.tls_cert, a.tls_key) {
        (Some(cert), Some(key)) => Some(crate::server::TlsFiles { cert, key }),
        _ => None,
    };
    let cfg = crate::server::ServerConfig {
        root: a.dir,
        listen: a.listen,
        state_dir: a.state_dir,
        max_age: a.max_age.map(Duration::from_secs),
        upload_ttl: crate::server::DEFAULT_UPLOAD_TTL,
        token_secret: secret.map(std::sync::Arc::new),
        allow_anonymous: a.allow_anonymous,
        tls,
        limit_rate: a.limit_rate.map(|r| r.0),
    };
    crate::server::serve_blocking(cfg).map_err(|e| e.to_string())
}

fn token_create(a: TokenCreateArgs) -> Result<(), String> {
    use crate::server::auth;
    let secret = auth::Secret::load(a.secret_file.as_deref())?
        .ok_or_else(|| format!("no secret: give --secret-file FILE or set {}", auth::SECRET_ENV))?;
    let claims = auth::claims_for(&a.prefix, a.mode, a.expires, std::time::SystemTime::now())?;
    println!("{}", auth::create(&secret, &claims));
    Ok(())
}

fn cache(c: CacheCommand) -> Result<(), String> {
    match c {
        CacheCommand::Stats { cache_dir, json } => {
            let dir = cache_dir.unwrap_or_else(config::default_cache_dir);
            let s = crate::cache::stats(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?);
                return Ok(());
            }
            let c = s.counters;
            let reads = c.hit_bytes + c.miss_bytes;
            println!("cache directory  {}", s.dir.display());
            println!("in use by        {}", s.in_use_by.as_deref().unwrap_or("nobody"));
            println!("size             {} ({} bytes)", human(s.bytes), s.bytes);
            println!("versions         {} ({} complete)", s.versions, s.complete_versions);
            if let Some(t) = s.oldest_access {
                let when = std::time::UNIX_EPOCH + Duration::from_secs(t);
                println!("oldest entry     {}", humantime::format_rfc3339_seconds(when));
            }
            if reads > 0 {
                println!(
                    "hit rate         {:.1}% of {} read ({} fetched)",
                    100.0 * c.hit_bytes as f64 / reads as f64,
                    human(reads),
                    human(c.fetched_bytes)
                );
            } else {
                println!("hit rate         no reads recorded yet");
            }
            println!("pending uploads  {}", s.pending_uploads);
            for r in &s.remotes {
                println!("  {}  {} versions, {}", r.remote, r.versions, human(r.bytes));
            }
            Ok(())
        }
        CacheCommand::Clear {
            cache_dir,
            remote,
            older_than,
        } => {
            let dir = cache_dir.unwrap_or_else(config::default_cache_dir);
            let (freed, versions) =
                crate::cache::clear_where(&dir, remote.as_deref(), older_than).map_err(|e| e.to_string())?;
            println!("cleared {} ({versions} versions) from {}", human(freed), dir.display());
            Ok(())
        }
    }
}

/// `1.5 GiB`-style figure for people.
pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}
