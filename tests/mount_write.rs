//! End to end: writing through a real mount of a remote on 127.0.0.1, on every remote kind
//! that takes writes (`common::remote`). Remote content is checked by hash in the served
//! folder; bytes on the wire are counted by the server.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::IntoRawFd;
use std::os::unix::fs::FileExt;
use std::process::Command;

use common::*;

/// Closes a file and returns what `close(2)` said (dropping a `File` ignores it).
fn close(f: std::fs::File) -> std::io::Result<()> {
    let fd = f.into_raw_fd();
    // SAFETY: we own the fd.
    if unsafe { libc::close(fd) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().unwrap();
    assert!(st.success(), "{cmd}");
}

on_remotes! {
    fn everyday_operations_reach_the_remote(r) needs [] {
        r.write("docs/readme.txt", b"first\n");
        r.write("docs/old/a.bin", &bytes(300_000, 1));
        let m = r.mount();
        // Create and write; readable at once through the mount.
        std::fs::write(m.path("docs/new.txt"), b"hello\n").unwrap();
        assert_eq!(std::fs::read(m.path("docs/new.txt")).unwrap(), b"hello\n");
        assert_eq!(r.stored("docs/new.txt"), b"hello\n");
        // >> appends.
        sh(&format!("echo more >> '{}'", m.path("docs/new.txt").display()));
        assert_eq!(r.stored("docs/new.txt"), b"hello\nmore\n");
        // In-place range overwrite.
        sh(&format!(
            "printf XY | dd of='{}' bs=1 seek=2 conv=notrunc status=none",
            m.path("docs/new.txt").display()
        ));
        assert_eq!(r.stored("docs/new.txt"), b"heXYo\nmore\n");
        // truncate, touch, mkdir, mv of a file and of a folder, rm, rmdir.
        sh(&format!("truncate -s 3 '{}'", m.path("docs/new.txt").display()));
        assert_eq!(r.stored("docs/new.txt"), b"heX");
        sh(&format!(
            "touch '{}' '{}'",
            m.path("docs/new.txt").display(),
            m.path("docs/empty").display()
        ));
        assert_eq!(r.stored("docs/empty"), b"");
        std::fs::create_dir(m.path("docs/sub")).unwrap();
        assert!(r.path("docs/sub").is_dir());
        std::fs::rename(m.path("docs/new.txt"), m.path("docs/sub/moved.txt")).unwrap();
        assert_eq!(r.stored("docs/sub/moved.txt"), b"heX");
        assert!(!r.path("docs/new.txt").exists());
        if r.renames_folders() {
            std::fs::rename(m.path("docs/old"), m.path("archive")).unwrap();
            assert_eq!(r.stored("archive/a.bin"), bytes(300_000, 1));
            assert_eq!(hash_file(&m.path("archive/a.bin")).unwrap(), hash(&bytes(300_000, 1)));
        } else {
            let err = std::fs::rename(m.path("docs/old"), m.path("archive")).unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EPERM), "{err}");
            assert_eq!(r.stored("docs/old/a.bin"), bytes(300_000, 1), "nothing moved");
            assert!(!m.path("archive").exists());
            std::fs::remove_file(m.path("docs/old/a.bin")).unwrap();
            std::fs::remove_dir(m.path("docs/old")).unwrap();
        }
        assert_eq!(
            std::fs::remove_dir(m.path("docs/sub")).unwrap_err().raw_os_error(),
            Some(libc::ENOTEMPTY)
        );
        std::fs::remove_file(m.path("docs/sub/moved.txt")).unwrap();
        std::fs::remove_dir(m.path("docs/sub")).unwrap();
        assert!(!r.path("docs/sub").exists());
        // cp a new version over an old one.
        let local = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(local.path(), b"replaced").unwrap();
        sh(&format!(
            "cp '{}' '{}'",
            local.path().display(),
            m.path("docs/readme.txt").display()
        ));
        assert_eq!(r.stored("docs/readme.txt"), b"replaced");
        // ls sees it all, and modes say the mount is writable.
        let mut names: Vec<String> = std::fs::read_dir(m.path("docs"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, vec!["empty", "readme.txt"]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(m.path("docs/empty")).unwrap().permissions().mode() & 0o777,
            0o644
        );
        // Symlinks are not kept by the remote: refused, consistently.
        let err = std::os::unix::fs::symlink("x", m.path("link")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EPERM));
    }

    fn open_files_renamed_and_removed_keep_working(r) needs [] {
        let m = r.mount();
        let mut f = std::fs::File::create(m.path("draft")).unwrap();
        f.write_all(b"part one,").unwrap();
        std::fs::rename(m.path("draft"), m.path("final")).unwrap();
        f.write_all(b" part two").unwrap();
        close(f).unwrap();
        assert_eq!(r.stored("final"), b"part one, part two");
        // Seen once on Apache under load (not reproduced since): say what happened if again.
        assert!(
            !r.path("draft").exists(),
            "draft is on the remote ({:?}); the mount's log:\n{}",
            std::fs::read(r.path("draft")).ok().map(|b| String::from_utf8_lossy(&b).into_owned()),
            m.log_text()
        );
        // Removed while open: still readable and writable through the descriptor; never uploaded.
        let mut g = std::fs::File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(m.path("scratch"))
            .unwrap();
        g.write_all(b"temporary").unwrap();
        std::fs::remove_file(m.path("scratch")).unwrap();
        g.seek(SeekFrom::Start(0)).unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "temporary");
        close(g).unwrap();
        assert!(!r.path("scratch").exists());
    }

    fn appends_and_overwrites_send_only_the_change(r) needs [PartialUpdates] {
        let old = bytes(256 * MIB, 2);
        r.write("big.bin", &old);
        let m = r.mount();
        // The file is in the cache.
        assert_eq!(hash_file(&m.path("big.bin")).unwrap(), hash(&old));
        let wire = |f: &dyn Fn()| {
            let before = r.wire();
            f();
            let after = r.wire();
            (
                after.received - before.received,
                after.file_bytes_sent - before.file_bytes_sent,
            )
        };
        let mut want = old.clone();

        // Append 1 KiB.
        let (sent, fetched) = wire(&|| {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(m.path("big.bin"))
                .unwrap();
            f.write_all(&[7u8; 1024]).unwrap();
            close(f).unwrap();
        });
        want.extend_from_slice(&[7u8; 1024]);
        eprintln!("append 1 KiB: sent {sent} B, fetched {fetched} B");
        assert!(
            sent < r.small_change_budget() && fetched < 1 << 20,
            "append: sent {sent}, fetched {fetched}"
        );
        assert_eq!(hash_file(&r.path("big.bin")).unwrap(), hash(&want));

        // Overwrite 4 KiB in place.
        let (sent, fetched) = wire(&|| {
            let f = std::fs::OpenOptions::new().write(true).open(m.path("big.bin")).unwrap();
            f.write_all_at(&[9u8; 4096], 100 * MIB as u64).unwrap();
            close(f).unwrap();
        });
        want[100 * MIB..100 * MIB + 4096].fill(9);
        eprintln!("overwrite 4 KiB: sent {sent} B, fetched {fetched} B");
        assert!(
            sent < r.small_change_budget() && fetched < 1 << 20,
            "overwrite: sent {sent}, fetched {fetched}"
        );
        assert_eq!(hash_file(&r.path("big.bin")).unwrap(), hash(&want));
        // Reading the new version back takes what we did not change from the cache of the
        // version it was written from: only the chunks holding a change are fetched.
        let (_, fetched) = wire(&|| assert_eq!(hash_file(&m.path("big.bin")).unwrap(), hash(&want)));
        eprintln!("read back after the changes: fetched {fetched} B");
        assert!(fetched <= 4 << 20, "read back: fetched {fetched}");
    }

    fn rewrites_send_only_the_changed_chunks(r) needs [ChunkDedup] {
        let old = bytes(128 * MIB, 2);
        r.write("big.bin", &old);
        let m = r.mount();
        assert_eq!(hash_file(&m.path("big.bin")).unwrap(), hash(&old));
        let wire = |f: &dyn Fn()| {
            let before = r.wire();
            f();
            let after = r.wire();
            (
                after.received - before.received,
                after.file_bytes_sent - before.file_bytes_sent,
            )
        };
        let mut want = old.clone();

        // cp of a version with 1 MiB changed in the middle.
        want[64 * MIB..65 * MIB].copy_from_slice(&bytes(MIB, 3));
        let local = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(local.path(), &want).unwrap();
        let (sent, _) = wire(&|| {
            sh(&format!(
                "cp '{}' '{}'",
                local.path().display(),
                m.path("big.bin").display()
            ))
        });
        eprintln!("cp with 1 MiB changed: sent {sent} B");
        assert!(sent < 4 << 20, "cp: sent {sent}");
        assert_eq!(hash_file(&r.path("big.bin")).unwrap(), hash(&want));

        // The same kind of change saved through a temp file renamed over the original.
        want[60 * MIB..61 * MIB].copy_from_slice(&bytes(MIB, 4));
        std::fs::write(local.path(), &want).unwrap();
        let (sent, _) = wire(&|| {
            sh(&format!(
                "cp '{}' '{}'",
                local.path().display(),
                m.path("big.bin.tmp").display()
            ));
            std::fs::rename(m.path("big.bin.tmp"), m.path("big.bin")).unwrap();
        });
        eprintln!("temp file + mv with 1 MiB changed: sent {sent} B");
        assert!(sent < 4 << 20, "save via temp: sent {sent}");
        assert_eq!(hash_file(&r.path("big.bin")).unwrap(), hash(&want));
        assert_eq!(hash_file(&m.path("big.bin")).unwrap(), hash(&want));
    }

    fn a_new_large_file_goes_up_in_parallel_parts_before_close_returns(r) needs [ParallelParts] {
        let m = r.mount();
        let data = bytes(1024 * MIB, 5);
        r.restart_max_active();
        let start = r.wire();
        let mut f = std::fs::File::create(m.path("new.bin")).unwrap();
        for piece in data.chunks(1 << 20) {
            f.write_all(piece).unwrap();
        }
        // Streamed: parts go to the server while the file is open, before any close. How
        // far they got when the last write returned depends on the machine's load (the
        // writes fill the page cache faster than one loaded core uploads), so the test waits
        // for them, with the file still open.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut before_close = r.wire().received - start.received;
        while before_close < 8 << 20 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
            before_close = r.wire().received - start.received;
        }
        assert!(
            before_close >= 8 << 20,
            "only {before_close} bytes arrived in 30 s with the file open"
        );
        // Only part uploads went while the file was written: two or more at once.
        let active = r.max_active().expect("the server counts requests in flight");
        assert!(active >= 2, "at most {active} part uploads at once while writing");
        close(f).unwrap();
        let received = r.wire().received - start.received;
        assert_eq!(
            hash_file(&r.path("new.bin")).unwrap(),
            hash(&data),
            "on the remote when close returned"
        );
        assert!(
            received <= data.len() as u64 * 21 / 20,
            "{received} bytes received for a file of {}: parts sent twice",
            data.len()
        );
    }

    fn a_file_changed_on_the_server_meanwhile_is_not_overwritten(r) needs [] {
        r.write("c.txt", b"base");
        let m = r.mount();
        assert_eq!(std::fs::read(m.path("c.txt")).unwrap(), b"base");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(m.path("c.txt"))
            .unwrap();
        f.write_all(b"mine").unwrap();
        r.write("c.txt", b"theirs");
        let err = close(f).unwrap_err();
        assert!(
            matches!(err.raw_os_error(), Some(libc::ESTALE) | Some(libc::EIO)),
            "close: {err}"
        );
        assert_eq!(r.stored("c.txt"), b"theirs", "theirs is not overwritten");
        let log = m.log_text();
        assert!(log.contains("changed on the remote since it was opened"), "{log}");
        let kept: Vec<_> = std::fs::read_dir(m.cache.join("pending/conflicts")).unwrap().collect();
        assert_eq!(kept.len(), 1);
        assert_eq!(std::fs::read(kept[0].as_ref().unwrap().path()).unwrap(), b"mine");
    }

    fn shared_mapping_writes_reach_the_remote(r) needs [] {
        r.write("m.bin", &[0u8; 8192]);
        let m = r.mount();
        python(
            "import mmap,sys\n\
             f=open(sys.argv[1],'r+b')\n\
             mm=mmap.mmap(f.fileno(),0)\n\
             mm[100:105]=b'MMAP!'\n\
             mm.flush(); mm.close(); f.close()",
            &[&m.path("m.bin")],
        );
        let got = r.stored("m.bin");
        assert_eq!(&got[100..105], b"MMAP!");
        assert_eq!(got.len(), 8192);
    }

    fn tar_x_and_rsync_a_into_the_mount(r) needs [] {
        let src = tempfile::tempdir().unwrap();
        for i in 0..30 {
            let d = src.path().join(format!("d{}", i % 3));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(format!("f{i}.dat")), bytes(1000 + i * 100, i as u64)).unwrap();
        }
        let m = r.mount();
        let tarball = tempfile::NamedTempFile::new().unwrap();
        sh(&format!(
            "tar -C '{}' -cf '{}' .",
            src.path().display(),
            tarball.path().display()
        ));
        std::fs::create_dir(m.path("untarred")).unwrap();
        sh(&format!(
            "tar -C '{}' -xf '{}'",
            m.path("untarred").display(),
            tarball.path().display()
        ));
        for i in 0..30 {
            let rel = format!("d{}/f{i}.dat", i % 3);
            assert_eq!(
                r.stored(&format!("untarred/{rel}")),
                bytes(1000 + i * 100, i as u64),
                "{rel}"
            );
        }
        // rsync -a: temp files renamed into place, chmod and utimens (accepted, not kept).
        sh(&format!(
            "rsync -a '{}/' '{}/'",
            src.path().display(),
            m.path("synced").display()
        ));
        for i in 0..30 {
            let rel = format!("d{}/f{i}.dat", i % 3);
            assert_eq!(
                r.stored(&format!("synced/{rel}")),
                bytes(1000 + i * 100, i as u64),
                "{rel}"
            );
        }
        let leftovers: Vec<_> = std::fs::read_dir(r.path("synced/d0"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "rsync temp files left: {leftovers:?}");
    }

    fn writes_through_a_mapping_after_the_last_close_reach_the_remote_at_release(r) needs [] {
        r.write("late.bin", &[0u8; 8192]);
        let m = r.mount();
        // The descriptor is closed (its flush has nothing to send) before the mapping is
        // written; the bytes reach the daemon when the mapping goes, and the upload happens
        // at the release that follows, with no close left to report it.
        python(
            "import mmap,sys\n\
             f=open(sys.argv[1],'r+b')\n\
             mm=mmap.mmap(f.fileno(),0)\n\
             f.close()\n\
             mm[4000:4004]=b'LATE'\n\
             mm.close()",
            &[&m.path("late.bin")],
        );
        let end = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while r.stored("late.bin")[4000..4004] != *b"LATE" {
            assert!(std::time::Instant::now() < end, "the release never uploaded: {}", m.log_text());
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert_eq!(r.stored("late.bin").len(), 8192);
    }

    fn a_save_through_a_temp_file_replaces_the_original(r) needs [] {
        let old = bytes(3 * MIB + 11, 31);
        r.write("doc/report.bin", &old);
        let m = r.mount();
        assert_eq!(hash_file(&m.path("doc/report.bin")).unwrap(), hash(&old));
        // What editors, rsync and pip do: write a temporary file, fsync, rename it over.
        let mut new = old.clone();
        new[MIB..MIB + 100].fill(7);
        new.extend_from_slice(b"appended");
        let tmp = m.path("doc/.report.bin.tmp");
        let mut f = std::fs::File::create(&tmp).unwrap();
        f.write_all(&new).unwrap();
        f.sync_all().unwrap();
        close(f).unwrap();
        std::fs::rename(&tmp, m.path("doc/report.bin")).unwrap();
        assert_eq!(hash_file(&m.path("doc/report.bin")).unwrap(), hash(&new));
        assert_eq!(hash(&r.stored("doc/report.bin")), hash(&new), "on the remote");
        assert!(!r.path("doc/.report.bin.tmp").exists(), "the temporary name is gone");
        assert!(!tmp.exists());
    }

    fn metadata_changes_follow_the_documented_policy(r) needs [] {
        r.write("meta.txt", b"kept");
        let m = r.mount();
        let p = m.path("meta.txt");
        let before = std::fs::metadata(&p).unwrap();
        // chmod, chown and times: accepted, not kept.
        sh(&format!("chmod 0600 '{}'", p.display()));
        sh(&format!("chown 1234:1234 '{}'", p.display()));
        sh(&format!("touch -d 2001-02-03 '{}'", p.display()));
        use std::os::unix::fs::MetadataExt;
        let after = std::fs::metadata(&p).unwrap();
        assert_eq!(after.mode() & 0o777, 0o644, "the configured mode stays");
        assert_eq!((after.uid(), after.gid()), (before.uid(), before.gid()));
        assert_ne!(after.mtime(), 981_158_400, "times are the remote's");
        // Extended attributes, links, device nodes: refused, never half-made.
        let x = Command::new("python3")
            .args(["-c", "import os,sys\ntry:\n os.setxattr(sys.argv[1],'user.k',b'v')\nexcept OSError as e:\n print(e.errno)"])
            .arg(&p)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&x.stdout).trim(), libc::ENOTSUP.to_string());
        let link = std::fs::hard_link(&p, m.path("hard"));
        assert_eq!(link.unwrap_err().raw_os_error(), Some(libc::EPERM));
        let sym = std::os::unix::fs::symlink("meta.txt", m.path("soft"));
        assert_eq!(sym.unwrap_err().raw_os_error(), Some(libc::EPERM));
        let fifo = Command::new("mkfifo").arg(m.path("fifo")).status().unwrap();
        assert!(!fifo.success());
        for name in ["hard", "soft", "fifo"] {
            assert!(!r.path(name).exists(), "{name} reached the remote");
            assert!(std::fs::symlink_metadata(m.path(name)).is_err(), "{name} shows in the mount");
        }
        assert_eq!(r.stored("meta.txt"), b"kept");
    }

    fn a_read_only_mount_refuses_writes(r) needs [] {
        r.write("a", b"x");
        let m = r.mount_with(MountOpts {
                args: vec!["--read-only".into()],
                ..MountOpts::default()
            },
        );
        let w = std::fs::OpenOptions::new().write(true).open(m.path("a")).unwrap_err();
        assert_eq!(w.raw_os_error(), Some(libc::EROFS));
        assert_eq!(
            std::fs::write(m.path("b"), b"y").unwrap_err().raw_os_error(),
            Some(libc::EROFS)
        );
        assert_eq!(std::fs::read(m.path("a")).unwrap(), b"x");
    }

    fn write_back_survives_a_crash_while_the_server_is_down(r) needs [] {
        r.write("existing.log", b"line 1\n");
        let cache = tempfile::tempdir().unwrap();
        let opts = || MountOpts {
            cache: Some(cache.path().join("c")),
            args: vec!["--write-back=1h".into()],
            ..Default::default()
        };
        let mut m = r.mount_with(opts());
        // Look at the files while the server is up.
        assert_eq!(std::fs::read(m.path("existing.log")).unwrap(), b"line 1\n");
        assert!(std::fs::read_dir(&m.mnt).unwrap().count() >= 1);
        r.stop();
        // The server is down: writes and fsync still succeed, into the journal.
        let mut f = std::fs::File::create(m.path("new.bin")).unwrap();
        let data = bytes(3 * MIB + 5, 9);
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        let mut g = std::fs::OpenOptions::new()
            .append(true)
            .open(m.path("existing.log"))
            .unwrap();
        g.write_all(b"line 2\n").unwrap();
        g.sync_all().unwrap();
        // The daemon dies before anything was sent.
        m.kill9_keep_mounted();
        drop(f);
        drop(g);
        common::force_unmount(&m.mnt);
        // The server comes back on the same address; the next mount sends the journal first.
        r.restart();
        let m2 = r.mount_with(opts());
        assert_eq!(r.stored("new.bin"), data);
        assert_eq!(r.stored("existing.log"), b"line 1\nline 2\n");
        assert_eq!(hash_file(&m2.path("new.bin")).unwrap(), hash(&data));
        assert!(
            m2.log_text().contains("write-back journal replayed"),
            "{}",
            m2.log_text()
        );
    }

    fn write_back_returns_before_the_upload_and_unmount_sends_the_rest(r) needs [] {
        let mut m = r.mount_with(MountOpts {
                args: vec!["--write-back=1h".into()],
                ..MountOpts::default()
            },
        );
        let data = bytes(2 * MIB + 3, 11);
        let mut f = std::fs::File::create(m.path("wb.bin")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        close(f).unwrap();
        // Durable locally, not sent yet (the delay is an hour).
        assert!(!r.path("wb.bin").exists());
        assert_eq!(
            hash_file(&m.path("wb.bin")).unwrap(),
            hash(&data),
            "readable through the mount meanwhile"
        );
        let journaled = std::fs::read_dir(m.cache.join("pending"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json"))
            .count();
        assert_eq!(journaled, 1);
        let out = m.unmount();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(r.stored("wb.bin"), data, "sent while unmounting");
        let left = std::fs::read_dir(m.cache.join("pending"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json"))
            .count();
        assert_eq!(left, 0);
    }

    fn a_write_back_overwrite_inside_a_file_survives_a_crash(r) needs [] {
        let old = bytes(3 * MIB, 22);
        r.write("big.bin", &old);
        let cache = tempfile::tempdir().unwrap();
        let opts = || MountOpts {
            cache: Some(cache.path().join("c")),
            args: vec!["--write-back=1h".into()],
            ..Default::default()
        };
        let mut m = r.mount_with(opts());
        // A change in the middle: the file keeps its size.
        let f = std::fs::OpenOptions::new().write(true).open(m.path("big.bin")).unwrap();
        f.write_all_at(b"PATCH", MIB as u64).unwrap();
        f.sync_all().unwrap();
        close(f).unwrap();
        m.kill9_keep_mounted();
        common::force_unmount(&m.mnt);
        let mut want = old.clone();
        want[MIB..MIB + 5].copy_from_slice(b"PATCH");
        let m2 = r.mount_with(opts());
        assert_eq!(hash_file(&r.path("big.bin")).unwrap(), hash(&want), "{}", m2.log_text());
        assert_eq!(hash_file(&m2.path("big.bin")).unwrap(), hash(&want));
    }

    fn a_save_renamed_over_the_original_after_fsync_survives_a_crash(r) needs [] {
        r.write("doc.txt", b"old version\n");
        let cache = tempfile::tempdir().unwrap();
        let opts = || MountOpts {
            cache: Some(cache.path().join("c")),
            args: vec!["--write-back=1h".into()],
            ..Default::default()
        };
        let mut m = r.mount_with(opts());
        assert_eq!(std::fs::read(m.path("doc.txt")).unwrap(), b"old version\n");
        // What editors and rsync do: write a temporary file, fsync, close, rename it over
        // the original.
        let data = bytes(2 * MIB + 7, 21);
        let mut f = std::fs::File::create(m.path("doc.txt.tmp")).unwrap();
        f.write_all(&data).unwrap();
        f.sync_all().unwrap();
        close(f).unwrap();
        std::fs::rename(m.path("doc.txt.tmp"), m.path("doc.txt")).unwrap();
        // A scratch file fsync'd, then removed.
        let mut g = std::fs::File::create(m.path("scratch")).unwrap();
        g.write_all(b"scratch").unwrap();
        g.sync_all().unwrap();
        close(g).unwrap();
        std::fs::remove_file(m.path("scratch")).unwrap();
        // Nothing sent yet (the delay is an hour); the daemon dies.
        assert_eq!(r.stored("doc.txt"), b"old version\n");
        m.kill9_keep_mounted();
        common::force_unmount(&m.mnt);
        let m2 = r.mount_with(opts());
        assert_eq!(hash_file(&r.path("doc.txt")).unwrap(), hash(&data), "the final name");
        assert!(!r.path("doc.txt.tmp").exists(), "no temporary name on the remote");
        assert!(!r.path("scratch").exists(), "a removed file is not sent");
        assert_eq!(hash_file(&m2.path("doc.txt")).unwrap(), hash(&data));
        assert!(
            !m2.cache.join("pending/conflicts").exists(),
            "no conflict: {}",
            m2.log_text()
        );
        let journaled = std::fs::read_dir(m2.cache.join("pending"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "json"))
            .count();
        assert_eq!(journaled, 0);
    }
}

/// An unmount with the remote unreachable (it accepts connections and never answers) ends
/// within `mount.unmount_timeout`, the daemon says what it left, and the next mount sends it.
#[test]
fn unmount_with_the_remote_unreachable_ends_in_time_and_the_next_mount_sends_the_rest() {
    use common::remote::{Kind, Remote};
    let mut r = Remote::start(Kind::Builtin);
    let cache = tempfile::tempdir().unwrap();
    let config = cache.path().join("mount.toml");
    std::fs::write(&config, "[mount]\nunmount_timeout = \"2s\"\n").unwrap();
    let opts = || MountOpts {
        cache: Some(cache.path().join("c")),
        args: vec![
            "--write-back=1h".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        ..Default::default()
    };
    let mut m = r.mount_with(opts());
    let files: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (format!("f{i}.bin"), bytes(MIB + i, 30 + i as u64)))
        .collect();
    for (name, data) in &files {
        let mut f = std::fs::File::create(m.path(name)).unwrap();
        f.write_all(data).unwrap();
        f.sync_all().unwrap();
        close(f).unwrap();
    }
    // The server goes; something on its address takes connections and never answers.
    r.stop();
    let addr = r.url().trim_start_matches("http://").to_string();
    let hole = std::net::TcpListener::bind(&addr).unwrap();
    hole.set_nonblocking(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let holder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match hole.accept() {
                    Ok((c, _)) => held.push(c),
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
                }
            }
        })
    };
    let start = std::time::Instant::now();
    let out = Command::new(bin()).arg("unmount").arg(&m.mnt).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut child = m.child.take().unwrap();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if start.elapsed() > std::time::Duration::from_secs(30) {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let took = start.elapsed();
    eprintln!("the daemon ended {took:?} after the unmount began");
    let log = m.log_text();
    assert!(status.success(), "the daemon ended by itself ({status}): {log}");
    assert!(
        took < std::time::Duration::from_secs(2 + 4),
        "the daemon took {took:?} with a 2 s unmount timeout"
    );
    assert!(log.contains("uploads not sent within the unmount timeout"), "{log}");
    for (name, _) in &files {
        assert!(log.contains(name.as_str()), "{name} is named in the log: {log}");
        assert!(!r.path(name).exists());
    }
    // The remote comes back; the next mount sends the journal before it serves.
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    holder.join().unwrap();
    r.restart();
    let m2 = r.mount_with(opts());
    for (name, data) in &files {
        assert_eq!(hash_file(&r.path(name)).unwrap(), hash(data), "{name}");
        assert_eq!(hash_file(&m2.path(name)).unwrap(), hash(data), "{name}");
    }
}

/// A write-only handle that replaces a file's content (`cp`, `>`, `open(p, "wb")`) writes
/// around the kernel's page cache: the bytes go to the daemon once, not also into page-cache
/// copies nobody reads. A reader open meanwhile, and its mapping, still see the new bytes.
#[test]
fn replacing_a_file_writes_around_the_page_cache_and_readers_see_the_new_bytes() {
    let store = Store::new();
    store.write("f.bin", b"old content\n");
    let server = store.serve();
    let m = Mount::new(&server.url());
    let reader = std::fs::File::open(m.path("f.bin")).unwrap();
    let mut old = Vec::new();
    (&reader).read_to_end(&mut old).unwrap();
    assert_eq!(old, b"old content\n");
    let new = bytes(8 * MIB, 41);
    let mut w = std::fs::File::create(m.path("f.bin")).unwrap();
    for piece in new.chunks(MIB) {
        w.write_all(piece).unwrap();
    }
    close(w).unwrap();
    assert_eq!(hash(&std::fs::read(store.path("f.bin")).unwrap()), hash(&new));
    // Nothing of the 8 MiB went into the mount's page cache on the way.
    assert_eq!(
        artifactfs::testing::resident_pages(&reader, new.len()),
        0,
        "pages of the write stayed cached"
    );
    // The reader opened before sees the new bytes, by read and through a mapping.
    let mut seen = vec![0u8; new.len()];
    reader.read_exact_at(&mut seen, 0).unwrap();
    assert!(seen == new, "the open reader sees the new bytes");
    assert_eq!(hash(&std::fs::read(m.path("f.bin")).unwrap()), hash(&new));
    // A file created new is written the same way.
    std::fs::write(m.path("g.bin"), &new[..3 * MIB]).unwrap();
    let g = std::fs::File::open(m.path("g.bin")).unwrap();
    assert_eq!(artifactfs::testing::resident_pages(&g, 3 * MIB), 0);
    assert_eq!(
        hash(&std::fs::read(store.path("g.bin")).unwrap()),
        hash(&new[..3 * MIB])
    );
}
