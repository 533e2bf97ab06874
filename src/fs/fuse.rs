//! The thin adapter between the kernel (fuser 0.18) and [`ArtifactFs`]. It converts types,
//! runs each request, and replies; it decides nothing.
//!
//! Each request's future is polled once on the fuser thread that received it: a request
//! answered from memory or the disk cache completes right there, with no hop. A request that
//! must wait (for the network, say) is moved onto the tokio runtime and replied to from there,
//! so fuser threads never wait for the network and tokio threads never block on the kernel.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::future::Future;
use std::sync::Arc;
use std::sync::mpsc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use fuser::{
    BackingId, Errno, FileAttr, FileHandle, FileType, FopenFlags, Generation, INodeNo, InitFlags, KernelConfig,
    LockOwner, Notifier, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use tokio::runtime::Handle;

use super::{ArtifactFs, Attr, FsError, Invalidator, Kind};

pub struct FuseAdapter {
    fs: Arc<ArtifactFs>,
    rt: Handle,
    negative_ttl: Duration,
    backings: Arc<Backings>,
}

/// The kernel's backing-file ids of inodes open in passthrough mode: one per inode, shared by
/// all its passthrough handles (the kernel requires that), closed with the last of them.
#[derive(Default)]
struct Backings {
    by_ino: parking_lot::Mutex<HashMap<u64, (BackingId, u32)>>,
    /// Passthrough handles, with their inode.
    handles: parking_lot::Mutex<HashMap<u64, u64>>,
}

impl Backings {
    /// Replies to `open` in passthrough mode on `file`, registering it with the kernel if the
    /// inode has no backing file yet. Gives the reply back when the kernel refuses.
    fn reply(
        &self,
        ino: u64,
        fh: u64,
        file: &std::fs::File,
        flags: FopenFlags,
        reply: ReplyOpen,
    ) -> Result<(), (ReplyOpen, std::io::Error)> {
        let mut by_ino = self.by_ino.lock();
        let (id, n) = match by_ino.entry(ino) {
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::hash_map::Entry::Vacant(e) => match reply.open_backing(file) {
                Ok(id) => e.insert((id, 0)),
                Err(err) => return Err((reply, err)),
            },
        };
        *n += 1;
        self.handles.lock().insert(fh, ino);
        reply.opened_passthrough(FileHandle(fh), flags, id);
        Ok(())
    }

    /// A handle closed: its inode's backing file goes with the last passthrough handle.
    fn release(&self, fh: u64) {
        let Some(ino) = self.handles.lock().remove(&fh) else {
            return;
        };
        let mut by_ino = self.by_ino.lock();
        if let Some((_, n)) = by_ino.get_mut(&ino) {
            *n -= 1;
            if *n == 0 {
                by_ino.remove(&ino);
            }
        }
    }
}

/// The capability's bit (`linux/capability.h`).
const CAP_SYS_ADMIN: u32 = 21;

/// Whether this process may register backing files with the kernel (`CAP_SYS_ADMIN`).
fn may_passthrough() -> bool {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|caps| caps & (1 << CAP_SYS_ADMIN) != 0)
}

impl FuseAdapter {
    pub fn new(fs: Arc<ArtifactFs>, rt: Handle) -> Self {
        let negative_ttl = fs.config().negative_ttl;
        FuseAdapter {
            fs,
            rt,
            negative_ttl,
            backings: Arc::default(),
        }
    }

    /// Polls `fut` once here; if it is not done, finishes it on the runtime. `done` gets the
    /// output either way.
    /// `op` names the call for the metrics and the slow-operation log.
    fn run<F, T>(&self, op: &'static str, fut: F, done: impl FnOnce(T) + Send + 'static)
    where
        F: Future<Output = T> + Send + 'static,
        T: Send + 'static,
    {
        let _enter = self.rt.enter();
        let start = std::time::Instant::now();
        let done = move |v| {
            done(v);
            crate::metrics::get().fuse(op, start.elapsed());
        };
        let mut fut = Box::pin(fut);
        match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(v) => done(v),
            Poll::Pending => {
                self.rt.spawn(async move { done(fut.await) });
            }
        }
    }
}

/// Logs what a user must see, and turns the error into the kernel's errno.
fn errno(op: &'static str, e: &FsError) -> Errno {
    crate::metrics::get().fuse_failed(op);
    if e.is_failure() {
        tracing::warn!("{op}: {e}");
    } else {
        tracing::debug!("{op}: {e}");
    }
    Errno::from_i32(e.errno())
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.mtime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: a.blksize,
        flags: 0,
    }
}

/// Whether an open replaces the file's content through a write-only handle (`cp`, `>`, `curl
/// -o`, Python's `open(p, "wb")`): such a handle writes around the page cache
/// (`FOPEN_DIRECT_IO`). Nothing reads through it, and keeping what it writes in the page cache
/// would cost a copy into freshly allocated pages per byte, and a second copy of the file in
/// memory beside the staging file (a new 1 GiB file: 1 GiB of page cache nobody reads).
fn replaces_content(flags: i32) -> bool {
    flags & libc::O_ACCMODE == libc::O_WRONLY && flags & libc::O_TRUNC != 0
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
    }
}

impl fuser::Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // readdirplus: `ls -l` gets names and attributes in one round trip.
        for flags in [
            InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            // O_TRUNC arrives with the open, not as a separate truncation: `cp` over a file
            // makes one new version.
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            // Handles that replace a file's content write around the page cache
            // (`FOPEN_DIRECT_IO`, see `replaces_content`); with this flag the kernel also drops
            // cached pages of the range such a write changes, so other readers stay coherent.
            InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP,
        ] {
            if let Err(missing) = config.add_capabilities(flags) {
                tracing::debug!("kernel lacks {missing:?}");
            }
        }
        // Passthrough: files complete in the cache are read by the kernel straight from the
        // cache file. Needs the kernel's support and CAP_SYS_ADMIN; otherwise every read goes
        // through the daemon, as before.
        if self.fs.passthrough_enabled() {
            let why_not = if !may_passthrough() {
                Some("the daemon lacks CAP_SYS_ADMIN (run it as root)".to_string())
            } else if let Err(missing) = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH) {
                Some(format!("the kernel lacks {missing:?} (Linux 6.9 or later has it)"))
            } else if config.set_max_stack_depth(1).is_err() {
                Some("the kernel refused the stack depth".to_string())
            } else {
                None
            };
            match why_not {
                Some(why) => {
                    tracing::info!("passthrough off: {why}; complete files are read through the daemon");
                    self.fs.disable_passthrough();
                }
                None => tracing::debug!("passthrough on: complete files are read by the kernel directly"),
            }
        }
        // Let the kernel keep many readahead requests in flight.
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let fs = self.fs.clone();
        let name = name.to_os_string();
        let negative_ttl = self.negative_ttl;
        self.run(
            "lookup",
            async move { fs.lookup(parent.0, &name).await },
            move |r| match r {
                Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
                // A negative entry: the kernel remembers the name is absent for a while.
                Err(FsError::NotFound) if !negative_ttl.is_zero() => {
                    let none = FileAttr {
                        ino: INodeNo(0),
                        size: 0,
                        blocks: 0,
                        atime: SystemTime::UNIX_EPOCH,
                        mtime: SystemTime::UNIX_EPOCH,
                        ctime: SystemTime::UNIX_EPOCH,
                        crtime: SystemTime::UNIX_EPOCH,
                        kind: FileType::RegularFile,
                        perm: 0,
                        nlink: 0,
                        uid: 0,
                        gid: 0,
                        rdev: 0,
                        blksize: 0,
                        flags: 0,
                    };
                    reply.entry(&negative_ttl, &none, Generation(0))
                }
                Err(e) => reply.error(errno("lookup", &e)),
            },
        );
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let fs = self.fs.clone();
        self.run("getattr", async move { fs.getattr(ino.0).await }, move |r| match r {
            Ok(e) => reply.attr(&e.ttl, &file_attr(&e.attr)),
            Err(e) => reply.error(errno("getattr", &e)),
        });
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        let backings = self.backings.clone();
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let truncate = flags.0 & libc::O_TRUNC != 0;
        self.run(
            "open",
            async move { fs.open(ino.0, write, truncate).await.map(|o| (o, fs)) },
            move |r| match r {
                Ok((o, fs)) => {
                    // A read-only descriptor has nothing to send at close: no FLUSH round trip
                    // (reading many small files pays one less per file).
                    let noflush = if write {
                        FopenFlags::empty()
                    } else {
                        FopenFlags::FOPEN_NOFLUSH
                    };
                    let reply = match &o.passthrough {
                        None => reply,
                        Some(file) => match backings.reply(ino.0, o.fh, file, noflush, reply) {
                            Ok(()) => return,
                            Err((reply, e)) => {
                                tracing::warn!(
                                    "passthrough off: the kernel refused a backing file ({e}); complete files are read through the daemon"
                                );
                                fs.passthrough_refused(o.fh, true);
                                reply
                            }
                        },
                    };
                    let mut f = noflush;
                    if o.keep_cache || o.passthrough.is_some() {
                        f |= FopenFlags::FOPEN_KEEP_CACHE;
                    }
                    if replaces_content(flags.0) {
                        f |= FopenFlags::FOPEN_DIRECT_IO;
                    }
                    reply.opened(FileHandle(o.fh), f)
                }
                Err(e) => reply.error(errno("open", &e)),
            },
        );
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let fs = self.fs.clone();
        self.run(
            "read",
            async move {
                fs.read(fh.0, offset, size, move |r| match r {
                    Ok(bytes) => reply.data(bytes),
                    Err(e) => reply.error(errno("read", &e)),
                })
                .await
            },
            |()| {},
        );
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        let fs = self.fs.clone();
        self.run("flush", async move { fs.flush(fh.0).await }, move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("close", &e)),
        });
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        let fs = self.fs.clone();
        self.run("fsync", async move { fs.flush(fh.0).await }, move |r| match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("fsync", &e)),
        });
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.backings.release(fh.0);
        let fs = self.fs.clone();
        self.run(
            "release",
            async move { fs.release_handle(fh.0).await },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("release", &e)),
            },
        );
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        {
            let _enter = self.rt.enter();
            if let Some(r) = self.fs.try_write_now(fh.0, offset, data) {
                match r {
                    Ok(n) => reply.written(n),
                    Err(e) => reply.error(errno("write", &e)),
                }
                return;
            }
        }
        let fs = self.fs.clone();
        let data = data.to_vec();
        self.run(
            "write",
            async move { fs.write(fh.0, offset, &data).await },
            move |r| match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno("write", &e)),
            },
        );
    }

    fn create(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: fuser::ReplyCreate,
    ) {
        let fs = self.fs.clone();
        let name = name.to_os_string();
        // A new file has no content to keep: write-only handles write around the page cache.
        let open_flags = match replaces_content(flags | libc::O_TRUNC) {
            true => FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_DIRECT_IO,
            false => FopenFlags::FOPEN_KEEP_CACHE,
        };
        self.run(
            "create",
            async move { fs.create(parent.0, &name).await },
            move |r| match r {
                Ok((e, o)) => reply.created(&e.ttl, &file_attr(&e.attr), Generation(0), FileHandle(o.fh), open_flags),
                Err(e) => reply.error(errno("create", &e)),
            },
        );
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let fs = self.fs.clone();
        self.run(
            "setattr",
            async move { fs.setattr(ino.0, size, fh.map(|f| f.0)).await },
            move |r| match r {
                Ok(e) => reply.attr(&e.ttl, &file_attr(&e.attr)),
                Err(e) => reply.error(errno("setattr", &e)),
            },
        );
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let fs = self.fs.clone();
        let name = name.to_os_string();
        self.run(
            "unlink",
            async move { fs.unlink(parent.0, &name).await },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("unlink", &e)),
            },
        );
    }

    fn mkdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        let fs = self.fs.clone();
        let name = name.to_os_string();
        self.run(
            "mkdir",
            async move { fs.mkdir(parent.0, &name).await },
            move |r| match r {
                Ok(e) => reply.entry(&e.ttl, &file_attr(&e.attr), Generation(0)),
                Err(e) => reply.error(errno("mkdir", &e)),
            },
        );
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let fs = self.fs.clone();
        let name = name.to_os_string();
        self.run(
            "rmdir",
            async move { fs.rmdir(parent.0, &name).await },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rmdir", &e)),
            },
        );
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(fuser::RenameFlags::RENAME_EXCHANGE) || flags.contains(fuser::RenameFlags::RENAME_WHITEOUT) {
            reply.error(Errno::EINVAL);
            return;
        }
        let no_replace = flags.contains(fuser::RenameFlags::RENAME_NOREPLACE);
        let fs = self.fs.clone();
        let (name, newname) = (name.to_os_string(), newname.to_os_string());
        self.run(
            "rename",
            async move { fs.rename(parent.0, &name, newparent.0, &newname, no_replace).await },
            move |r| match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno("rename", &e)),
            },
        );
    }

    fn symlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _target: &std::path::Path, reply: ReplyEntry) {
        // Remotes keep files and folders only (docs/SEMANTICS.md).
        reply.error(Errno::EPERM);
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EPERM);
    }

    fn mknod(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _mode: u32,
        _umask: u32,
        _rdev: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::EPERM);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let fs = self.fs.clone();
        let run = async move {
            let fh = fs.opendir(ino.0).await?;
            Ok((fh, fs.kernel_may_keep_listing(ino.0)))
        };
        self.run("opendir", run, move |r| match r {
            // A folder kept honest by background revalidation: the kernel keeps its listing
            // (until a round finds it changed and invalidates it).
            Ok((fh, true)) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Ok((fh, false)) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(errno("opendir", &e)),
        });
    }

    fn readdir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let r = self.fs.readdir(fh.0, offset, |item, next| {
            reply.add(INodeNo(item.ino), next, file_type(item.kind), &item.name)
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("readdir", &e)),
        }
    }

    fn readdirplus(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectoryPlus) {
        let r = self.fs.readdirplus(fh.0, offset, |item, entry, next| {
            reply.add(
                INodeNo(item.ino),
                next,
                &item.name,
                &entry.ttl,
                &file_attr(&entry.attr),
                Generation(0),
            )
        });
        match r {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno("readdirplus", &e)),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.fs.releasedir(fh.0);
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks, s.bfree, s.bavail, s.files, s.ffree, s.bsize, s.namelen, s.frsize,
        );
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    // Extended attributes are not kept (docs/SEMANTICS.md). ENOSYS, not ENODATA: the kernel
    // then stops asking (it would otherwise ask for `security.capability` before every write).
    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENOSYS);
    }

    fn setxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _value: &[u8],
        _flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn removexattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }
}

/// Sends kernel invalidations from a thread of its own: a notification written from a request
/// thread can deadlock against the kernel waiting for that very request.
pub struct ChannelInvalidator {
    tx: parking_lot::Mutex<mpsc::Sender<Inval>>,
}

/// One kernel invalidation.
enum Inval {
    /// The dentry `name` in folder `parent`.
    Entry(u64, String),
    /// The cached contents (a folder's cached listing) and attributes of an inode.
    Inode(u64),
}

impl ChannelInvalidator {
    pub fn start(notifier: Notifier) -> Arc<Self> {
        let (tx, rx) = mpsc::channel::<Inval>();
        let spawned = std::thread::Builder::new()
            .name("afs-invalidate".into())
            .spawn(move || {
                for inval in rx {
                    let (r, what) = match inval {
                        Inval::Entry(parent, name) => (
                            notifier.inval_entry(INodeNo(parent), OsStr::new(&name)),
                            format!("{name:?} in {parent}"),
                        ),
                        Inval::Inode(ino) => (notifier.inval_inode(INodeNo(ino), 0, 0), format!("inode {ino}")),
                    };
                    if let Err(e) = r {
                        // ENOENT: the kernel had no such dentry or inode; nothing to forget.
                        tracing::debug!("invalidate {what}: {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("no kernel invalidations: {e}");
        }
        Arc::new(ChannelInvalidator {
            tx: parking_lot::Mutex::new(tx),
        })
    }
}

impl Invalidator for ChannelInvalidator {
    fn entry(&self, parent: u64, name: &str) {
        let _ = self.tx.lock().send(Inval::Entry(parent, name.to_string()));
    }

    fn inode(&self, ino: u64) {
        let _ = self.tx.lock().send(Inval::Inode(ino));
    }
}
