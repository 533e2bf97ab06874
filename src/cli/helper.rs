//! The mount(8) helper: run as `/sbin/mount.fuse.artifactfs SOURCE DIR [-sfnv] [-o OPTIONS]`
//! (an fstab line of type `fuse.artifactfs`, or `mount -t fuse.artifactfs`), the binary turns
//! the `-o` options into the flags of `artifactfs mount` and mounts as a daemon.
//!
//! The options are read from the clap definition of `mount`, so every flag is an option as
//! soon as it exists: `cache_dir=/x` or `cache-dir=/x` is `--cache-dir=/x`, a bare `read_only`
//! is `--read-only`. The generic options fstab lines carry are accepted as `mount.fuse3`
//! accepts them; anything else is refused, naming the option.

use std::ffi::OsString;

use clap::CommandFactory;

use super::Cli;

/// Names under which the binary acts as the mount helper.
const HELPER_NAMES: [&str; 2] = ["mount.fuse.artifactfs", "mount.artifactfs"];

/// Flags of `mount` that make no sense when mount(8) waits for the helper.
const NOT_OPTIONS: [(&str, &str); 2] = [
    (
        "foreground",
        "mount(8) waits for its helper, so it would never return; run `artifactfs mount --foreground` from a service unit instead (docs/SYSTEM.md)",
    ),
    (
        "print-config",
        "it prints instead of mounting; run `artifactfs mount --print-config` by hand",
    ),
];

/// What mount.fuse3 and the kernel handle, or fstab alone uses; accepted and ignored. An
/// artifactfs mount is always `nodev,nosuid,noatime`.
const IGNORED: [&str; 22] = [
    "defaults",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "group",
    "owner",
    "nofail",
    "_netdev",
    "rw",
    "suid",
    "nosuid",
    "dev",
    "nodev",
    "exec",
    "noexec",
    "atime",
    "noatime",
    "relatime",
    "nodiratime",
    "async",
];

/// Whether the program was started under a helper name (argv[0]'s last component).
pub fn invoked_as_helper(argv0: &std::ffi::OsStr) -> bool {
    let name = std::path::Path::new(argv0).file_name().unwrap_or_default();
    HELPER_NAMES.iter().any(|h| name == *h)
}

/// Whether the arguments (after the program name) are fuse3's generic `mount.fuse` calling
/// `artifactfs SOURCE DIR -o OPTIONS`: with no `/sbin/mount.fuse.artifactfs`, mount(8) runs
/// `mount.fuse`, which runs the program named by the type from `PATH`. The first argument is
/// then a URL, which no subcommand or flag looks like.
pub fn called_by_mount_fuse(args: &[OsString]) -> bool {
    args.first()
        .and_then(|a| a.to_str())
        .is_some_and(|a| !a.starts_with('-') && a.contains("://"))
        && args.len() >= 2
}

/// A parsed helper command line.
#[derive(Debug, PartialEq, Eq)]
pub struct Invocation {
    /// `artifactfs mount …` arguments, program name included.
    pub mount_args: Vec<OsString>,
    /// `-f`: check everything, mount nothing (mount(8)'s fake mode).
    pub fake: bool,
    /// `-v`: say what is run.
    pub verbose: bool,
}

/// Reads `SOURCE DIR [-sfnv] [-N NS] [-t TYPE] [-o OPTIONS]…` (mount(8)'s helper calling
/// convention; several `-o` add up).
pub fn parse_invocation(args: &[OsString]) -> Result<Invocation, String> {
    let usage = "usage: mount.fuse.artifactfs REMOTE MOUNTPOINT [-o OPTION[,OPTION...]]";
    let mut positional = Vec::new();
    let mut options = Vec::new();
    let (mut sloppy, mut fake, mut verbose) = (false, false, false);
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let text = a.to_str();
        match text {
            Some("-o") => {
                let v = it.next().ok_or("-o needs a value")?;
                options.push(v.to_str().ok_or("the options are not UTF-8")?.to_string());
            }
            Some("-t") => {
                let t = it.next().ok_or("-t needs a value")?.to_string_lossy().to_string();
                if t != "artifactfs" && t != "fuse.artifactfs" {
                    return Err(format!("this helper mounts fuse.artifactfs, not {t}"));
                }
            }
            Some("-N") => {
                return Err("-N (another mount namespace) is not supported".into());
            }
            Some(s) if s.starts_with("-o") && s.len() > 2 => options.push(s[2..].to_string()),
            Some(s) if s.starts_with('-') && s.len() > 1 && !s.starts_with("--") => {
                for c in s[1..].chars() {
                    match c {
                        's' => sloppy = true,
                        'f' => fake = true,
                        'v' => verbose = true,
                        // mtab is /proc/self/mounts: there is nothing to skip writing.
                        'n' => {}
                        _ => return Err(format!("unknown helper flag -{c}; {usage}")),
                    }
                }
            }
            _ => positional.push(a.clone()),
        }
    }
    let [source, dir] = <[OsString; 2]>::try_from(positional).map_err(|_| usage.to_string())?;
    let mut flags = Vec::new();
    for o in &options {
        flags.extend(translate(o, sloppy)?);
    }
    // The mount table shows the fstab line's source, so `mount -a` knows the line is mounted.
    let source_text = source.to_str().filter(|s| !s.is_empty() && !s.contains(','));
    if let Some(s) = source_text
        && !flags.iter().any(|f| f.starts_with("--fsname"))
    {
        flags.push(format!("--fsname={s}"));
    }
    let mut mount_args: Vec<OsString> = vec!["artifactfs".into(), "mount".into(), source, dir];
    mount_args.extend(flags.into_iter().map(OsString::from));
    Ok(Invocation {
        mount_args,
        fake,
        verbose,
    })
}

/// Splits an option string at commas outside double quotes; quotes around a value (or part
/// of it) are removed, so `mirror="http://a/x,y"` keeps its comma.
pub fn split_options(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in s.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if quoted {
        return Err(format!("unbalanced quote in the options {s:?}"));
    }
    out.push(cur);
    Ok(out.into_iter().filter(|o| !o.is_empty()).collect())
}

/// Turns one `-o` string into `artifactfs mount` flags. `sloppy` (mount -s) skips unknown
/// options instead of failing.
pub fn translate(options: &str, sloppy: bool) -> Result<Vec<String>, String> {
    let cmd = Cli::command();
    let mount = cmd.find_subcommand("mount").expect("the mount command");
    let mut flags = Vec::new();
    for opt in split_options(options)? {
        let (key, value) = match opt.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (opt.as_str(), None),
        };
        if value.is_none() && IGNORED.contains(&key) {
            continue;
        }
        // fstab-only options for systemd and others, `user=NAME` from a user mount, notes.
        if key.starts_with("x-") || (value.is_some() && ["user", "comment"].contains(&key)) {
            continue;
        }
        if (key, value) == ("ro", None) {
            flags.push("--read-only".to_string());
            continue;
        }
        let long = key.replace('_', "-");
        if let Some((_, why)) = NOT_OPTIONS.iter().find(|(k, _)| *k == long) {
            return Err(format!("option {key} cannot be used from fstab or mount(8): {why}"));
        }
        let arg = mount
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "help");
        let Some(arg) = arg else {
            if sloppy {
                continue;
            }
            return Err(format!(
                "unknown option {key:?}; the options are the flags of `artifactfs mount --help` \
                 written as key=value (cache_dir=/var/cache/artifactfs) or a bare key for a \
                 yes/no flag (read_only), besides the generic mount options"
            ));
        };
        if !arg.get_action().takes_values() {
            // An on/off flag: bare or `=true` turns it on, `=false` leaves it off.
            match value.map(parse_bool).transpose()? {
                None | Some(true) => flags.push(format!("--{long}")),
                Some(false) => {}
            }
            continue;
        }
        let takes_bool = arg.get_possible_values().iter().any(|p| p.get_name() == "true");
        match value {
            Some(v) if takes_bool => flags.push(format!("--{long}={}", parse_bool(v)?)),
            Some("") => return Err(format!("option {key} has an empty value")),
            Some(v) => flags.push(format!("--{long}={v}")),
            None if takes_bool => flags.push(format!("--{long}=true")),
            None if arg.get_num_args().is_some_and(|n| n.min_values() == 0) => flags.push(format!("--{long}")),
            None => return Err(format!("option {key} needs a value: {key}=VALUE")),
        }
    }
    Ok(flags)
}

fn parse_bool(v: &str) -> Result<bool, String> {
    match v.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(format!(
            "{v:?} is not a yes/no value (true, false, yes, no, on, off, 1, 0)"
        )),
    }
}

/// Runs as the helper: parse, then `artifactfs mount` in daemon mode, which returns once the
/// mount is ready.
pub fn main(args: Vec<OsString>) -> std::process::ExitCode {
    use clap::Parser;
    let fail = |e: String| {
        eprintln!("mount.fuse.artifactfs: {e}");
        std::process::ExitCode::from(32) // mount(8)'s "mount failure"
    };
    let inv = match parse_invocation(&args) {
        Ok(i) => i,
        Err(e) => return fail(e),
    };
    if inv.verbose {
        let shown: Vec<_> = inv.mount_args.iter().map(|a| a.to_string_lossy()).collect();
        eprintln!("mount.fuse.artifactfs: running {}", shown.join(" "));
    }
    let cli = match Cli::try_parse_from(&inv.mount_args) {
        Ok(c) => c,
        Err(e) => return fail(e.to_string().trim_end().to_string()),
    };
    let super::Command::Mount(a) = cli.command else {
        unreachable!("the helper builds a mount command")
    };
    if inv.fake {
        return match super::mount::resolve(&a) {
            Ok(_) => std::process::ExitCode::SUCCESS,
            Err(e) => fail(e),
        };
    }
    // mount(8) at boot may run without HOME; the default cache directory needs one, and
    // mount.fuse3 makes the same choice.
    if std::env::var_os("HOME").is_none() && a.cache_dir.is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("HOME", "/root") };
    }
    match super::mount::run(*a) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::{Command, MountArgs};
    use clap::ArgAction;
    use clap::Parser;
    use std::path::PathBuf;
    use std::time::Duration;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    /// The helper's command line as `artifactfs mount` sees it.
    fn mount_args(args: &[&str]) -> MountArgs {
        let inv = parse_invocation(&os(args)).unwrap();
        match Cli::try_parse_from(&inv.mount_args).unwrap().command {
            Command::Mount(a) => *a,
            _ => panic!("not a mount"),
        }
    }

    #[test]
    fn the_fstab_line_of_the_docs_becomes_mount_flags() {
        let a = mount_args(&[
            "http://host:8787/",
            "/mnt/artifacts",
            "-o",
            "rw,defaults,_netdev,cache_dir=/var/cache/afs,read_only,metadata_ttl=5m",
        ]);
        assert_eq!(a.first, "http://host:8787/");
        assert_eq!(a.second, Some(PathBuf::from("/mnt/artifacts")));
        assert_eq!(a.cache_dir, Some(PathBuf::from("/var/cache/afs")));
        assert!(a.read_only);
        assert_eq!(a.metadata_ttl, Some(Duration::from_secs(300)));
        assert!(!a.foreground, "the helper daemonizes");
        assert!(!a.allow_other);
        assert_eq!(
            a.fsname.as_deref(),
            Some("http://host:8787/"),
            "mount -a compares sources"
        );
        let a = mount_args(&["http://h/", "/m", "-o", "fsname=afs"]);
        assert_eq!(a.fsname.as_deref(), Some("afs"));
    }

    #[test]
    fn dashes_or_underscores_and_flags_in_any_place() {
        let a = mount_args(&[
            "-v",
            "-o",
            "max-cache-size=2G,cache_min_free=0",
            "s3://b/p",
            "-t",
            "fuse.artifactfs",
            "/m",
            "-o",
            "endpoint_url=http://127.0.0.1:9000,region=eu-1,addressing-style=path,allow_other",
        ]);
        assert_eq!(a.first, "s3://b/p");
        assert_eq!(a.max_cache_size.map(|s| s.0), Some(2 << 30));
        assert_eq!(a.cache_min_free, Some(0));
        assert_eq!(a.endpoint_url.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(a.region.as_deref(), Some("eu-1"));
        assert!(a.allow_other);
    }

    #[test]
    fn booleans_bare_or_with_a_value() {
        assert_eq!(translate("read_only", false).unwrap(), ["--read-only"]);
        assert_eq!(translate("read_only=yes", false).unwrap(), ["--read-only"]);
        assert!(translate("read_only=false,allow_other=0", false).unwrap().is_empty());
        assert_eq!(translate("ro", false).unwrap(), ["--read-only"]);
        // Flags that take true/false: bare means true.
        assert_eq!(translate("incremental", false).unwrap(), ["--incremental=true"]);
        assert_eq!(translate("partial_put=off", false).unwrap(), ["--partial-put=false"]);
        let e = translate("read_only=maybe", false).unwrap_err();
        assert!(e.contains("\"maybe\" is not a yes/no value"), "{e}");
        // write_back has an optional delay.
        assert_eq!(translate("write_back", false).unwrap(), ["--write-back"]);
        assert_eq!(translate("write_back=5s", false).unwrap(), ["--write-back=5s"]);
        let a = mount_args(&["u", "/m", "-o", "write_back,incremental=false"]);
        assert_eq!(a.write_back, Some(Duration::from_secs(1)));
        assert_eq!(a.incremental, Some(false));
    }

    #[test]
    fn quotes_keep_commas_in_values_and_mirrors_repeat() {
        assert_eq!(
            split_options(r#"a,mirror="http://m/x,y",b"#).unwrap(),
            ["a", "mirror=http://m/x,y", "b"]
        );
        assert_eq!(split_options(",,a,").unwrap(), ["a"]);
        assert!(
            split_options(r#"mirror="http://m"#)
                .unwrap_err()
                .contains("unbalanced quote")
        );
        let a = mount_args(&["u", "/m", "-o", r#"mirror="http://m1/a,b",mirror=http://m2/"#]);
        assert_eq!(a.mirrors, ["http://m1/a,b", "http://m2/"]);
    }

    #[test]
    fn generic_options_are_ignored_and_unknown_ones_fail() {
        let generic = "defaults,noauto,user,users,nofail,_netdev,x-systemd.automount,\
                       x-systemd.mount-timeout=30,user=alice,comment=x,rw,suid,nosuid,dev,nodev,exec,noexec,atime,noatime";
        assert!(translate(generic, false).unwrap().is_empty());
        let e = translate("cache_dir=/x,cach_dir=/y", false).unwrap_err();
        assert!(e.contains("unknown option \"cach_dir\""), "{e}");
        // mount -s: sloppy, unknown options are skipped.
        assert_eq!(translate("cach_dir=/y,read_only", true).unwrap(), ["--read-only"]);
        let e = translate("cache_dir", false).unwrap_err();
        assert!(e.contains("cache_dir needs a value"), "{e}");
        let e = translate("foreground", false).unwrap_err();
        assert!(e.contains("service unit"), "{e}");
        assert!(translate("help", false).is_err());
        let e = parse_invocation(&os(&["u", "/m", "-t", "fuse.sshfs"])).unwrap_err();
        assert!(e.contains("not fuse.sshfs"), "{e}");
        assert!(parse_invocation(&os(&["u"])).unwrap_err().starts_with("usage"));
        let inv = parse_invocation(&os(&["u", "/m", "-fnv"])).unwrap();
        assert!(inv.fake && inv.verbose);
    }

    #[test]
    fn every_mount_flag_is_an_option() {
        // A sample value for each kind of value the mount flags take.
        let sample = |name: &str| match name {
            "SIZE" => "1G",
            "DURATION" | "DELAY" => "2s",
            "N" | "PERCENT" => "2",
            "BOOL" => "true",
            "KIND" => "webdav",
            "STYLE" => "path",
            "LEVEL" => "debug",
            "URL" => "http://127.0.0.1:1/",
            "RATE" => "50M",
            "UID" | "GID" => "1000",
            "MODE" => "0640",
            "ADDR" => "127.0.0.1:9187",
            _ => "/x",
        };
        let cmd = Cli::command();
        let mount = cmd.find_subcommand("mount").unwrap();
        let mut tried = 0;
        for arg in mount.get_arguments() {
            let Some(long) = arg.get_long() else { continue };
            if long == "help" || NOT_OPTIONS.iter().any(|(k, _)| *k == long) {
                continue;
            }
            let key = long.replace('-', "_");
            let opt = if arg.get_action().takes_values() {
                let name = arg.get_value_names().and_then(|v| v.first()).map(|s| s.as_str());
                format!("{key}={}", sample(name.unwrap_or("")))
            } else {
                key.clone()
            };
            let a = ["u", "/m", "-o", opt.as_str()];
            let inv = parse_invocation(&os(&a)).unwrap_or_else(|e| panic!("{opt}: {e}"));
            let matches = Cli::command()
                .try_get_matches_from(&inv.mount_args)
                .unwrap_or_else(|e| panic!("{opt}: {e}"));
            let m = matches.subcommand_matches("mount").unwrap();
            let id = arg.get_id().as_str();
            assert_eq!(
                m.value_source(id),
                Some(clap::parser::ValueSource::CommandLine),
                "{opt} did not set --{long}"
            );
            assert!(matches!(
                arg.get_action(),
                ArgAction::SetTrue | ArgAction::Set | ArgAction::Append
            ));
            tried += 1;
        }
        assert!(tried >= 20, "only {tried} flags");
    }

    #[test]
    fn mount_fuse_calls_are_told_from_subcommands() {
        assert!(called_by_mount_fuse(&os(&["http://h:8787/", "/mnt", "-o", "dev,suid"])));
        assert!(called_by_mount_fuse(&os(&["s3://bucket/p", "/mnt"])));
        assert!(!called_by_mount_fuse(&os(&["mount", "http://h/", "/mnt"])));
        assert!(!called_by_mount_fuse(&os(&["--help"])));
        assert!(!called_by_mount_fuse(&os(&["http://h/"])));
        assert!(!called_by_mount_fuse(&os(&[])));
        // What mount.fuse3 adds (dev, suid) is accepted.
        let a = mount_args(&["http://h/", "/mnt", "-o", "dev,suid,cache_dir=/c"]);
        assert_eq!(a.cache_dir, Some(PathBuf::from("/c")));
    }

    #[test]
    fn helper_names() {
        assert!(invoked_as_helper("/sbin/mount.fuse.artifactfs".as_ref()));
        assert!(invoked_as_helper("mount.artifactfs".as_ref()));
        assert!(!invoked_as_helper("/usr/bin/artifactfs".as_ref()));
        assert!(!invoked_as_helper("/sbin/mount.fuse".as_ref()));
    }
}
