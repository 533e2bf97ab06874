//! The mount configuration: TOML (`mount.example.toml` documents every key), overridden by
//! command-line flags. Sizes are written like `64MiB` / `8M` (binary units), durations like
//! `60s` / `500ms`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

use crate::store::http::HttpConfig;
use crate::store::s3::S3Config;

/// A number of bytes; parsed from `"64MiB"`, `"8M"`, `"1G"` or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<Self, String> {
        parse_size::Config::new()
            .with_binary()
            .parse_size(s.trim())
            .map(ByteSize)
            .map_err(|e| format!("{s:?} is not a size ({e}); write e.g. 64MiB or 8M"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
        let mut v = self.0;
        let mut u = 0;
        while u + 1 < UNITS.len() && v >= 1024 && v.is_multiple_of(1024) {
            v /= 1024;
            u += 1;
        }
        write!(f, "{v}{}", UNITS[u])
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64MiB\" or a number of bytes")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v).map(ByteSize).map_err(E::custom)
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub mount: MountSection,
    pub cache: CacheSection,
    pub read: ReadSection,
    pub metadata: MetadataSection,
    pub write: WriteSection,
    pub http: HttpConfig,
    pub web: crate::store::web::WebConfig,
    pub s3: S3Config,
    pub auth: AuthSection,
    pub log: LogSection,
    pub performance: PerformanceSection,
}

/// Limits by kind of remote (`[performance]`, `[performance.s3]`, …).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PerformanceSection {
    /// Requests in flight at once, for remotes of any kind (unless their kind says otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// Bytes per second received from the remote at most (unset: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub download_limit: Option<ByteSize>,
    /// Bytes per second sent to the remote at most (unset: no limit).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upload_limit: Option<ByteSize>,
    /// The built-in server.
    pub artifact: KindLimits,
    pub s3: KindLimits,
    /// Plain web servers (WebDAV, directory indexes).
    pub http: KindLimits,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KindLimits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
}

/// Requests in flight at once when nothing is configured: what each kind of remote takes well
/// (the built-in server serves in parallel from one disk; S3 spreads; a web server may limit
/// connections per client).
const BUILTIN: &str = "the built-in value for this kind of remote";

pub fn builtin_concurrency(kind: crate::store::StoreKind) -> usize {
    use crate::store::StoreKind;
    match kind {
        StoreKind::Artifact | StoreKind::Other => 16,
        StoreKind::S3 => 8,
        StoreKind::Http => 4,
    }
}

impl Config {
    /// Requests in flight at once for a remote of `kind`, and which setting said so: the
    /// remote's own (`read.concurrency`, `--concurrency`), then its kind's
    /// (`performance.<kind>.concurrency`), then `performance.concurrency`, then the built-in
    /// value of the kind.
    pub fn concurrency_for(&self, kind: crate::store::StoreKind) -> (usize, &'static str) {
        use crate::store::StoreKind;
        let by_kind = match kind {
            StoreKind::Artifact => (
                self.performance.artifact.concurrency,
                "performance.artifact.concurrency",
            ),
            StoreKind::S3 => (self.performance.s3.concurrency, "performance.s3.concurrency"),
            StoreKind::Http => (self.performance.http.concurrency, "performance.http.concurrency"),
            StoreKind::Other => (None, ""),
        };
        if let Some(n) = self.read.concurrency {
            (n, "read.concurrency")
        } else if let (Some(n), from) = by_kind {
            (n, from)
        } else if let Some(n) = self.performance.concurrency {
            (n, "performance.concurrency")
        } else {
            (builtin_concurrency(kind), BUILTIN)
        }
    }

    /// Requests in flight at once for a remote of `kind` at first, how many they may grow to
    /// while more pay, and which setting gave the first number. A number set anywhere stays
    /// fixed unless `read.max_concurrency` is set too.
    pub fn concurrency_range(&self, kind: crate::store::StoreKind) -> (usize, usize, &'static str) {
        let (start, from) = self.concurrency_for(kind);
        let max = match self.read.max_concurrency {
            Some(m) => m.max(start),
            None if from == BUILTIN => crate::read::MAX_CONCURRENCY.max(start),
            None => start,
        };
        (start, max, from)
    }
}

/// The token sent to the built-in server. Taken from, in this order: `--token-file` or
/// `token_file`, the environment variable `ARTIFACTFS_TOKEN`, `token`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    /// A file holding the token (mode 0600).
    pub token_file: Option<PathBuf>,
    /// The token itself (prefer a file; `--print-config` hides it).
    pub token: Option<crate::store::http::BearerToken>,
}

/// The environment variable a token is taken from when no token file is given.
pub const TOKEN_ENV: &str = "ARTIFACTFS_TOKEN";

impl AuthSection {
    /// The token to send, from the first source that has one (see [`AuthSection`]).
    pub fn resolve_token(&self) -> Result<Option<crate::store::http::BearerToken>, String> {
        use crate::store::http::BearerToken;
        if let Some(f) = &self.token_file {
            return BearerToken::from_file(f).map(Some);
        }
        if let Some(v) = std::env::var_os(TOKEN_ENV).filter(|v| !v.is_empty()) {
            let v = v.into_string().map_err(|_| format!("{TOKEN_ENV} is not UTF-8"))?;
            return BearerToken::new(&v).map(Some).map_err(|e| format!("{TOKEN_ENV}: {e}"));
        }
        Ok(self.token.clone())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MountSection {
    /// Remote URL, when not given on the command line.
    pub remote: Option<String>,
    /// Refuse every write with EROFS.
    pub read_only: bool,
    /// Let other users see the mount (turns on the kernel's permission checks).
    pub allow_other: bool,
    /// Threads answering the kernel.
    pub threads: usize,
    /// Kernel readahead for the mount (`read_ahead_kb` of its backing device); 0 keeps the
    /// kernel's default. Needs root.
    pub kernel_readahead: ByteSize,
    /// How long `unmount` waits for open files to be closed before it cuts them off, and for
    /// pending write-back uploads (the rest stays journaled for the next mount).
    #[serde(with = "humantime_serde")]
    pub unmount_timeout: Duration,
    /// Owner and modes shown on files and directories (default: the mounting user).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub file_mode: Option<u16>,
    pub dir_mode: Option<u16>,
}

impl Default for MountSection {
    fn default() -> Self {
        MountSection {
            remote: None,
            read_only: false,
            allow_other: false,
            threads: 4,
            kernel_readahead: ByteSize(8 << 20),
            unmount_timeout: Duration::from_secs(10),
            uid: None,
            gid: None,
            file_mode: None,
            dir_mode: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheSection {
    /// Default: `$XDG_CACHE_HOME/artifactfs`, else `~/.cache/artifactfs`.
    pub dir: Option<PathBuf>,
    pub max_size: ByteSize,
    /// Granularity of the cache's chunk bitmap (and of random reads).
    pub chunk_size: ByteSize,
    /// Percent of the cache's filesystem kept free: the cache shrinks below `max_size` when
    /// other files fill the disk.
    pub min_free_percent: u32,
    /// Versions nobody read for this long are deleted; unset: kept until the size limit.
    #[serde(with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub expire_after: Option<Duration>,
}

impl Default for CacheSection {
    fn default() -> Self {
        CacheSection {
            dir: None,
            max_size: ByteSize(10 << 30),
            chunk_size: ByteSize(1 << 20),
            min_free_percent: 5,
            expire_after: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReadSection {
    pub max_request: ByteSize,
    pub readahead_initial: ByteSize,
    pub readahead_max: ByteSize,
    /// This remote's own limit; unset, `[performance]` decides.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<usize>,
    /// The number of requests at once grows up to this while more of them bring more bytes
    /// per second. Unset: 64 when no concurrency is set, else the set number (fixed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<usize>,
    pub memory_budget: ByteSize,
    pub verify: bool,
    pub retries: usize,
    /// Let the kernel read files complete in the cache straight from the cache file.
    pub passthrough: bool,
    /// Opening a file this small fetches the folder's other files this small (0: never).
    pub prefetch_small_files: ByteSize,
    /// At most this much of a folder's small files fetched ahead.
    pub prefetch_folder_bytes: ByteSize,
}

impl Default for ReadSection {
    fn default() -> Self {
        let d = crate::read::ReadConfig::default();
        ReadSection {
            max_request: ByteSize(d.max_request),
            readahead_initial: ByteSize(d.readahead.initial),
            readahead_max: ByteSize(d.readahead.max),
            concurrency: None,
            max_concurrency: None,
            memory_budget: ByteSize(d.memory_budget),
            verify: d.verify,
            retries: d.retries,
            passthrough: true,
            prefetch_small_files: ByteSize(256 << 10),
            prefetch_folder_bytes: ByteSize(64 << 20),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetadataSection {
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub negative_ttl: Duration,
    pub stale_if_error: bool,
    /// Folders the kernel holds are listed again this often in the background; "0s": never.
    #[serde(with = "humantime_serde")]
    pub revalidate_interval: Duration,
}

impl Default for MetadataSection {
    fn default() -> Self {
        let d = crate::fs::FsConfig::default();
        MetadataSection {
            ttl: d.metadata_ttl,
            negative_ttl: d.negative_ttl,
            stale_if_error: d.stale_if_error,
            revalidate_interval: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WriteSection {
    /// `close`/`fsync` return once changes are in the local journal; uploads follow.
    pub write_back: bool,
    /// With `write_back`: how long after a `close`/`fsync` the upload starts.
    #[serde(with = "humantime_serde")]
    pub write_back_delay: Duration,
    /// Send only what changed (append, ranged writes, unchanged ranges copied on the server,
    /// chunks the remote holds); `false` uploads whole files.
    pub incremental: bool,
    /// New files up to this size are uploaded in one request.
    pub put_max: ByteSize,
    /// Size of the new-bytes parts of larger uploads.
    pub part_size: ByteSize,
    /// Parts uploaded at once per file.
    pub parallel_parts: usize,
}

impl Default for WriteSection {
    fn default() -> Self {
        let p = crate::write::plan::PlanConfig::default();
        WriteSection {
            write_back: false,
            write_back_delay: Duration::from_secs(1),
            incremental: p.incremental,
            put_max: ByteSize(p.put_max),
            part_size: ByteSize(p.part_size),
            parallel_parts: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogSection {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a `RUST_LOG`-style filter.
    pub level: String,
    /// Log file; default: stderr in the foreground, `<cache dir>/artifactfs.log` as a daemon.
    pub file: Option<PathBuf>,
    /// A kernel call or a request to the remote that takes this long is logged as slow
    /// (`0s`: never).
    #[serde(with = "humantime_serde")]
    pub slow_threshold: Duration,
    /// Serve Prometheus metrics at `http://ADDR/metrics`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Write a JSON summary of the metrics here at unmount.
    pub metrics_file: Option<PathBuf>,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            level: "info".into(),
            file: None,
            slow_threshold: Duration::from_secs(1),
            metrics_addr: None,
            metrics_file: None,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), String> {
        let chunk = self.cache.chunk_size.0;
        if !(4096..=(64 << 20)).contains(&chunk) || !chunk.is_power_of_two() {
            return Err(format!(
                "cache.chunk_size {} must be a power of two from 4KiB to 64MiB",
                self.cache.chunk_size
            ));
        }
        if self.read.max_request.0 < chunk {
            return Err("read.max_request must be at least cache.chunk_size".into());
        }
        if self.cache.min_free_percent > 90 {
            return Err("cache.min_free_percent must be at most 90".into());
        }
        let p = &self.performance;
        let limits = [
            self.read.concurrency,
            self.read.max_concurrency,
            p.concurrency,
            p.artifact.concurrency,
            p.s3.concurrency,
            p.http.concurrency,
        ];
        let rates = [p.download_limit, p.upload_limit];
        if rates.iter().flatten().any(|r| r.0 < 1024) {
            return Err("bandwidth limits must be at least 1KiB (per second)".into());
        }
        if limits.contains(&Some(0)) || self.mount.threads == 0 {
            return Err("concurrency limits and mount.threads must be at least 1".into());
        }
        if self.write.part_size.0 == 0 || self.write.parallel_parts == 0 {
            return Err("write.part_size and write.parallel_parts must be at least 1".into());
        }
        if let Some(e) = &self.s3.endpoint_url
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(format!("s3.endpoint_url {e:?} must start with http:// or https://"));
        }
        if self.read.readahead_max.0 < self.read.readahead_initial.0 {
            return Err("read.readahead_max must be at least read.readahead_initial".into());
        }
        Ok(())
    }
}

/// The default cache directory.
pub fn default_cache_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return PathBuf::from(x).join("artifactfs");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".cache").join("artifactfs")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(ByteSize::parse("8M").unwrap().0, 8 << 20);
        assert_eq!(ByteSize::parse("64MiB").unwrap().0, 64 << 20);
        assert_eq!(ByteSize::parse("1 GiB").unwrap().0, 1 << 30);
        assert_eq!(ByteSize::parse("4096").unwrap().0, 4096);
        assert!(ByteSize::parse("lots").is_err());
        assert_eq!(ByteSize(8 << 20).to_string(), "8MiB");
        assert_eq!(ByteSize(1000).to_string(), "1000B");
    }

    #[test]
    fn concurrency_comes_from_the_remote_then_its_kind_then_the_default_then_the_kind_fallback() {
        use crate::store::StoreKind;
        let mut c = Config::default();
        assert_eq!(c.concurrency_for(StoreKind::Artifact).0, 16);
        assert_eq!(c.concurrency_for(StoreKind::S3).0, 8);
        assert_eq!(c.concurrency_for(StoreKind::Http).0, 4);
        c.performance.concurrency = Some(6);
        assert_eq!(c.concurrency_for(StoreKind::S3), (6, "performance.concurrency"));
        c.performance.s3.concurrency = Some(12);
        assert_eq!(c.concurrency_for(StoreKind::S3), (12, "performance.s3.concurrency"));
        assert_eq!(c.concurrency_for(StoreKind::Http), (6, "performance.concurrency"));
        c.read.concurrency = Some(2);
        assert_eq!(c.concurrency_for(StoreKind::S3), (2, "read.concurrency"));
        let parsed: Config = toml::from_str("[performance.http]\nconcurrency = 3\n").unwrap();
        assert_eq!(parsed.concurrency_for(StoreKind::Http).0, 3);
        assert_eq!(parsed.concurrency_for(StoreKind::Artifact).0, 16);
        c.performance.http.concurrency = Some(0);
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_number_of_requests_grows_from_a_built_in_start_but_a_set_one_stays_unless_allowed() {
        use crate::store::StoreKind;
        let mut c = Config::default();
        let max = crate::read::MAX_CONCURRENCY;
        assert_eq!(
            c.concurrency_range(StoreKind::Http).0..=c.concurrency_range(StoreKind::Http).1,
            4..=max
        );
        c.performance.s3.concurrency = Some(12);
        assert_eq!(
            c.concurrency_range(StoreKind::S3),
            (12, 12, "performance.s3.concurrency")
        );
        assert_eq!(c.concurrency_range(StoreKind::Artifact).1, max, "the others still grow");
        c.read.max_concurrency = Some(20);
        assert_eq!(c.concurrency_range(StoreKind::S3).1, 20);
        assert_eq!(c.concurrency_range(StoreKind::Artifact), (16, 20, BUILTIN));
        c.read.max_concurrency = Some(3);
        assert_eq!(c.concurrency_range(StoreKind::Artifact).1, 16, "never below the start");
        c.read.max_concurrency = Some(0);
        assert!(c.validate().is_err());
    }

    #[test]
    fn the_example_config_documents_every_key_with_its_default() {
        let text = include_str!("../../mount.example.toml");
        let parsed: Config = toml::from_str(text).expect("mount.example.toml parses");
        let mut expect = Config::default();
        expect.mount.remote = parsed.mount.remote.clone();
        expect.cache.dir = parsed.cache.dir.clone();
        expect.log.file = parsed.log.file.clone();
        expect.log.metrics_addr = parsed.log.metrics_addr;
        expect.log.metrics_file = parsed.log.metrics_file.clone();
        expect.mount.uid = parsed.mount.uid;
        expect.mount.gid = parsed.mount.gid;
        expect.mount.file_mode = parsed.mount.file_mode;
        expect.mount.dir_mode = parsed.mount.dir_mode;
        expect.s3.endpoint_url = parsed.s3.endpoint_url.clone();
        expect.s3.region = parsed.s3.region.clone();
        expect.s3.profile = parsed.s3.profile.clone();
        expect.s3.ca_bundle = parsed.s3.ca_bundle.clone();
        expect.http.ca_bundle = parsed.http.ca_bundle.clone();
        expect.auth = parsed.auth.clone();
        assert_eq!(parsed, expect, "the example's values are the defaults");
        // Every key of the serialized defaults appears in the example.
        let defaults = toml::to_string(&Config::default()).unwrap();
        for line in defaults.lines() {
            if let Some((key, _)) = line.split_once(" = ") {
                assert!(text.contains(&format!("{key} = ")), "mount.example.toml lacks `{key}`");
            }
        }
        for key in [
            "remote",
            "dir",
            "file",
            "uid",
            "gid",
            "file_mode",
            "dir_mode",
            "endpoint_url",
            "region",
            "profile",
            "ca_bundle",
            "token_file",
            "token",
        ] {
            assert!(text.contains(&format!("{key} = ")), "mount.example.toml lacks `{key}`");
        }
    }

    #[test]
    fn the_token_comes_from_the_file_then_the_environment_then_the_config() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let parsed: Config = toml::from_str("[auth]\ntoken = \"from-config\"\n").unwrap();
        let token = |a: &AuthSection| a.resolve_token().unwrap().map(|t| t.headers()["authorization"].clone());
        // Only this test touches the variable.
        unsafe { std::env::remove_var(TOKEN_ENV) };
        assert_eq!(token(&parsed.auth).unwrap(), "Bearer from-config");
        unsafe { std::env::set_var(TOKEN_ENV, "from-env") };
        assert_eq!(token(&parsed.auth).unwrap(), "Bearer from-env");
        let mut with_file = parsed.auth.clone();
        with_file.token_file = Some(file.clone());
        assert_eq!(token(&with_file).unwrap(), "Bearer from-file");
        unsafe { std::env::remove_var(TOKEN_ENV) };
        // A token file others can read is refused; the message never quotes the token.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = with_file.resolve_token().unwrap_err();
        assert!(e.contains("chmod 600") && !e.contains("from-file"), "{e}");
        // --print-config hides it.
        let printed = toml::to_string(&parsed).unwrap();
        assert!(
            printed.contains("token = \"<hidden>\"") && !printed.contains("from-config"),
            "{printed}"
        );
    }

    #[test]
    fn unknown_keys_and_impossible_values_are_refused() {
        assert!(toml::from_str::<Config>("[cache]\nmax_sise = \"1G\"\n").is_err());
        let mut c = Config::default();
        c.cache.chunk_size = ByteSize(1000);
        assert!(c.validate().is_err());
        assert!(Config::default().validate().is_ok());
    }
}
