use clap::Parser;

fn main() -> std::process::ExitCode {
    use artifactfs::cli::helper;
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    let rest: Vec<_> = args.collect();
    // mount(8) runs /sbin/mount.fuse.artifactfs, a link to this binary, or, without it,
    // fuse3's mount.fuse runs `artifactfs SOURCE DIR -o OPTIONS`.
    if helper::invoked_as_helper(&argv0) || helper::called_by_mount_fuse(&rest) {
        return helper::main(rest);
    }
    artifactfs::cli::run(artifactfs::cli::Cli::parse())
}
