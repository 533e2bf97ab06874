use clap::Parser;

fn main() -> std::process::ExitCode {
    let mut args = std::env::args_os();
    let argv0 = args.next().unwrap_or_default();
    // mount(8) runs /sbin/mount.fuse.artifactfs, a link to this binary.
    if artifactfs::cli::helper::invoked_as_helper(&argv0) {
        return artifactfs::cli::helper::main(args.collect());
    }
    artifactfs::cli::run(artifactfs::cli::Cli::parse())
}
