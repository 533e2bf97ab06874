use clap::Parser;

fn main() -> std::process::ExitCode {
    artifactfs::cli::run(artifactfs::cli::Cli::parse())
}
