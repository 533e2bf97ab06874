//! Running as a daemon: fork before any thread exists, and let the parent return only once
//! the child says the mount is ready (or why it is not).

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

/// The child's line back to the parent.
pub struct Ready(Option<File>);

impl Ready {
    /// No parent waits (foreground).
    pub fn none() -> Self {
        Ready(None)
    }

    pub fn ok(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "ok {msg}");
        }
    }

    pub fn fail(&mut self, msg: &str) {
        if let Some(mut f) = self.0.take() {
            let _ = writeln!(f, "err {msg}");
        }
    }
}

pub enum Forked {
    /// In the parent: the child's verdict.
    Parent(Result<String, String>),
    /// In the daemon.
    Child(Ready),
}

/// Forks. The child detaches (new session, `/` as working directory, stdin and stdout on
/// `/dev/null`, stderr into `log`), the parent waits for its verdict. Must be called before any
/// thread is started.
pub fn daemonize(log: &Path) -> io::Result<Forked> {
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d)?;
    }
    let log_file = std::fs::OpenOptions::new().create(true).append(true).open(log)?;
    let mut fds = [0; 2];
    // SAFETY: plain syscalls; no other thread exists yet, so fork is safe.
    unsafe {
        if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
            return Err(io::Error::last_os_error());
        }
        match libc::fork() {
            -1 => Err(io::Error::last_os_error()),
            0 => {
                libc::close(fds[0]);
                libc::setsid();
                let _ = libc::chdir(c"/".as_ptr());
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::close(null);
                }
                libc::dup2(log_file.as_raw_fd(), 2);
                Ok(Forked::Child(Ready(Some(File::from_raw_fd(fds[1])))))
            }
            _child => {
                libc::close(fds[1]);
                let mut r = File::from_raw_fd(fds[0]);
                let mut msg = String::new();
                let _ = r.read_to_string(&mut msg);
                let msg = msg.trim_end();
                Ok(Forked::Parent(if let Some(m) = msg.strip_prefix("ok ") {
                    Ok(m.to_string())
                } else if let Some(m) = msg.strip_prefix("err ") {
                    Err(m.to_string())
                } else {
                    Err(format!(
                        "the mount daemon stopped before the mount was ready (see {})",
                        log.display()
                    ))
                }))
            }
        }
    }
}

/// Whether process `pid` exists and is not a zombie.
pub fn is_alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(s) => s
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}
