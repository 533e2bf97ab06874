//! Log set-up: `tracing` to stderr or a file, filtered by `RUST_LOG` when set, else by the
//! configured level. Messages of the `log` crate (fuser's) are forwarded too.

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;

fn filter(level: &str) -> EnvFilter {
    // fuser warns that its own unmount-on-exit failed after the kernel already unmounted:
    // noise, not news.
    const QUIET: &str = "fuser::session=error";
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},{QUIET}")))
        .unwrap_or_else(|_| EnvFilter::new(format!("info,{QUIET}")))
}

pub fn init_stderr(level: &str) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

pub fn init_file(level: &str, path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let file = OpenOptions::new().create(true).append(true).open(path)?;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter(level))
        .with_writer(Mutex::new(file))
        .with_ansi(false)
        .with_target(false)
        .try_init();
    Ok(())
}
