//! The write side of the filesystem core against the in-memory store: what reaches the remote,
//! what a reader sees meanwhile, and what happens on a conflict.

use super::*;
use crate::testing::noise;

async fn write_all(fs: &ArtifactFs, fh: u64, mut off: u64, data: &[u8]) {
    for piece in data.chunks(128 << 10) {
        assert_eq!(fs.write(fh, off, piece).await.unwrap() as usize, piece.len());
        off += piece.len() as u64;
    }
}

fn remote(e: &Env, path: &str) -> Option<Vec<u8>> {
    e.mem.object(path).map(|(b, _)| b.to_vec())
}

fn received(e: &Env) -> u64 {
    e.mem.stats.bytes_received.load(Ordering::Relaxed)
}

async fn names(fs: &ArtifactFs, dir: u64) -> Vec<String> {
    let fh = fs.opendir(dir).await.unwrap();
    let mut out = Vec::new();
    fs.readdir(fh, 2, |item, _| {
        out.push(item.name.clone());
        false
    })
    .unwrap();
    fs.releasedir(fh);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_is_visible_at_once_and_on_the_remote_after_close() {
    let e = env(Duration::from_secs(60));
    e.mem.insert("d/old", b"x".to_vec());
    let d = resolve(&e.fs, "d").await.unwrap();
    let (entry, o) = e.fs.create(d.attr.ino, OsStr::new("new.txt")).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"hello world").await;
    // Before any upload: listed, looked up, read back.
    assert_eq!(names(&e.fs, d.attr.ino).await, vec!["new.txt", "old"]);
    assert_eq!(resolve(&e.fs, "d/new.txt").await.unwrap().attr.ino, entry.attr.ino);
    assert_eq!(read_fh(&e.fs, o.fh, 6, 100).await.unwrap(), b"world");
    assert_eq!(e.fs.getattr(entry.attr.ino).await.unwrap().attr.size, 11);
    assert!(remote(&e, "d/new.txt").is_none());
    e.fs.flush(o.fh).await.unwrap();
    assert_eq!(remote(&e, "d/new.txt").unwrap(), b"hello world");
    // A second flush (dup'd descriptor) sends nothing.
    let before = received(&e);
    e.fs.flush(o.fh).await.unwrap();
    e.fs.release_handle(o.fh).await.unwrap();
    assert_eq!(received(&e), before);
    assert_eq!(cat(&e.fs, "d/new.txt").await.unwrap(), b"hello world");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_and_overwrites_send_only_what_changed() {
    let e = env(Duration::from_secs(60));
    let old: Vec<u8> = (0..16 * MIB).map(|i| (i % 253) as u8).collect();
    e.mem.insert("big.bin", old.clone());
    let f = resolve(&e.fs, "big.bin").await.unwrap();
    let o = e.fs.open(f.attr.ino, true, false).await.unwrap();
    write_all(&e.fs, o.fh, old.len() as u64, &[7u8; 1024]).await;
    let before = received(&e);
    e.fs.flush(o.fh).await.unwrap();
    assert_eq!(received(&e) - before, 1024, "an append sends the appended bytes");
    write_all(&e.fs, o.fh, 4096, &[9u8; 4096]).await;
    let before = received(&e);
    e.fs.release_handle(o.fh).await.unwrap();
    assert_eq!(received(&e) - before, 4096, "an overwrite sends the written range");
    let mut want = old.clone();
    want.extend_from_slice(&[7u8; 1024]);
    want[4096..8192].fill(9);
    assert_eq!(remote(&e, "big.bin").unwrap(), want);
    assert_eq!(cat(&e.fs, "big.bin").await.unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_a_file_being_written_merge_local_and_remote_bytes() {
    let e = env(Duration::from_secs(60));
    let old: Vec<u8> = (0..3 * MIB).map(|i| (i % 251) as u8).collect();
    e.mem.insert("f", old.clone());
    let f = resolve(&e.fs, "f").await.unwrap();
    let reader = e.fs.open(f.attr.ino, false, false).await.unwrap();
    let writer = e.fs.open(f.attr.ino, true, false).await.unwrap();
    write_all(&e.fs, writer.fh, MIB as u64 + 10, b"LOCAL").await;
    // The handle opened for reading before the write sees it too (one file, one content).
    let got = read_fh(&e.fs, reader.fh, MIB as u64, 20).await.unwrap();
    let mut want = old[MIB..MIB + 20].to_vec();
    want[10..15].copy_from_slice(b"LOCAL");
    assert_eq!(got, want);
    // Truncate and extend: the gap reads as zeros.
    e.fs.setattr(f.attr.ino, Some(100), Some(writer.fh)).await.unwrap();
    e.fs.setattr(f.attr.ino, Some(200), Some(writer.fh)).await.unwrap();
    let got = read_fh(&e.fs, reader.fh, 90, 200).await.unwrap();
    assert_eq!(got.len(), 110);
    assert_eq!(&got[..10], &old[90..100]);
    assert!(got[10..].iter().all(|&b| b == 0));
    e.fs.release_handle(writer.fh).await.unwrap();
    e.fs.release_handle(reader.fh).await.unwrap();
    let mut want = old[..100].to_vec();
    want.resize(200, 0);
    assert_eq!(remote(&e, "f").unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn o_trunc_then_writes_is_one_new_version() {
    let e = env(Duration::from_secs(60));
    let old = noise(20 * MIB, 1);
    let before_tag = e.mem.insert("m.bin", old.clone());
    let f = resolve(&e.fs, "m.bin").await.unwrap();
    let mut new = old.clone();
    new[10 * MIB..11 * MIB].fill(1);
    let o = e.fs.open(f.attr.ino, true, true).await.unwrap();
    // The remote keeps the old version until the close.
    assert_eq!(e.mem.object("m.bin").unwrap().1, before_tag);
    write_all(&e.fs, o.fh, 0, &new).await;
    let before = received(&e);
    e.fs.release_handle(o.fh).await.unwrap();
    assert_eq!(remote(&e, "m.bin").unwrap(), new);
    let sent = received(&e) - before;
    assert!(
        sent < 4 * MIB as u64,
        "cp over a file with 1 MiB changed sent {sent} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_change_is_refused_and_the_local_version_kept() {
    let e = env(Duration::from_secs(60));
    e.mem.insert("c.txt", b"base".to_vec());
    let f = resolve(&e.fs, "c.txt").await.unwrap();
    let o = e.fs.open(f.attr.ino, true, true).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"mine").await;
    let theirs = e.mem.insert("c.txt", b"theirs".to_vec());
    let err = e.fs.flush(o.fh).await.unwrap_err();
    assert_eq!(err.errno(), libc::ESTALE);
    let FsError::Conflict { kept, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(std::fs::read(kept.split(' ').next().unwrap()).unwrap(), b"mine");
    assert_eq!(e.mem.object("c.txt").unwrap().1, theirs, "theirs is not overwritten");
    assert!(e.fs.release_handle(o.fh).await.is_err());
    assert_eq!(cat(&e.fs, "c.txt").await.unwrap(), b"theirs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlink_mkdir_rmdir_and_renames() {
    let e = env(Duration::from_secs(60));
    e.mem.insert("a/f1", b"one".to_vec());
    e.mem.insert("a/sub/f2", b"two".to_vec());
    let a = resolve(&e.fs, "a").await.unwrap();
    // mkdir, then a file in it, then rmdir refuses, unlink, rmdir.
    let d = e.fs.mkdir(a.attr.ino, OsStr::new("new")).await.unwrap();
    assert!(matches!(
        e.fs.mkdir(a.attr.ino, OsStr::new("new")).await,
        Err(FsError::Exists)
    ));
    let (_, o) = e.fs.create(d.attr.ino, OsStr::new("x")).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"x").await;
    e.fs.release_handle(o.fh).await.unwrap();
    assert!(matches!(
        e.fs.rmdir(a.attr.ino, OsStr::new("new")).await,
        Err(FsError::NotEmpty)
    ));
    e.fs.unlink(d.attr.ino, OsStr::new("x")).await.unwrap();
    assert!(remote(&e, "a/new/x").is_none());
    e.fs.rmdir(a.attr.ino, OsStr::new("new")).await.unwrap();
    assert!(matches!(resolve(&e.fs, "a/new").await, Err(FsError::NotFound)));
    // Rename a file, and a folder with what is inside.
    e.fs.rename(a.attr.ino, OsStr::new("f1"), ROOT, OsStr::new("moved"), false)
        .await
        .unwrap();
    assert_eq!(remote(&e, "moved").unwrap(), b"one");
    assert!(remote(&e, "a/f1").is_none());
    assert_eq!(cat(&e.fs, "moved").await.unwrap(), b"one");
    let sub = resolve(&e.fs, "a/sub/f2").await.unwrap();
    e.fs.rename(a.attr.ino, OsStr::new("sub"), ROOT, OsStr::new("top"), false)
        .await
        .unwrap();
    assert_eq!(cat(&e.fs, "top/f2").await.unwrap(), b"two");
    assert_eq!(
        resolve(&e.fs, "top/f2").await.unwrap().attr.ino,
        sub.attr.ino,
        "moved inodes keep their numbers"
    );
    assert!(matches!(resolve(&e.fs, "a/sub").await, Err(FsError::NotFound)));
    // No-replace rename over an existing name.
    assert!(matches!(
        e.fs.rename(ROOT, OsStr::new("moved"), ROOT, OsStr::new("top"), true)
            .await,
        Err(FsError::Exists)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_file_renamed_uploads_to_its_new_name_and_an_unlinked_one_never() {
    let e = env(Duration::from_secs(60));
    let (_, o) = e.fs.create(ROOT, OsStr::new("draft")).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"text").await;
    e.fs.rename(ROOT, OsStr::new("draft"), ROOT, OsStr::new("final"), false)
        .await
        .unwrap();
    e.fs.release_handle(o.fh).await.unwrap();
    assert_eq!(remote(&e, "final").unwrap(), b"text");
    assert!(remote(&e, "draft").is_none());
    let (_, o) = e.fs.create(ROOT, OsStr::new("scratch")).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"gone").await;
    e.fs.unlink(ROOT, OsStr::new("scratch")).await.unwrap();
    // Still readable through the open handle, as on any filesystem.
    assert_eq!(read_fh(&e.fs, o.fh, 0, 10).await.unwrap(), b"gone");
    e.fs.release_handle(o.fh).await.unwrap();
    assert!(remote(&e, "scratch").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn save_through_a_temp_file_renamed_over_the_original() {
    let e = env(Duration::from_secs(60));
    let old = noise(24 * MIB, 2);
    e.mem.insert("doc", old.clone());
    let mut new = old.clone();
    new.splice(5 * MIB..5 * MIB, b"inserted".iter().copied());
    let before = received(&e);
    let (_, o) = e.fs.create(ROOT, OsStr::new("doc.tmp")).await.unwrap();
    write_all(&e.fs, o.fh, 0, &new).await;
    e.fs.release_handle(o.fh).await.unwrap();
    e.fs.rename(ROOT, OsStr::new("doc.tmp"), ROOT, OsStr::new("doc"), false)
        .await
        .unwrap();
    assert_eq!(remote(&e, "doc").unwrap(), new);
    assert!(remote(&e, "doc.tmp").is_none());
    let sent = received(&e) - before;
    assert!(sent < 4 * MIB as u64, "the save sent {sent} bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_without_a_handle_is_sent_at_once() {
    let e = env(Duration::from_secs(60));
    e.mem.insert("t", vec![5u8; 1000]);
    let f = resolve(&e.fs, "t").await.unwrap();
    let a = e.fs.setattr(f.attr.ino, Some(10), None).await.unwrap();
    assert_eq!(a.attr.size, 10);
    assert_eq!(remote(&e, "t").unwrap(), vec![5u8; 10]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_mount_refuses_every_change() {
    let e = env_cfg(MemoryStore::new(), Duration::from_secs(60), true);
    e.mem.insert("f", b"x".to_vec());
    let f = resolve(&e.fs, "f").await.unwrap();
    assert!(matches!(
        e.fs.open(f.attr.ino, true, false).await,
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        e.fs.open(f.attr.ino, false, true).await,
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        e.fs.create(ROOT, OsStr::new("n")).await,
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        e.fs.unlink(ROOT, OsStr::new("f")).await,
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        e.fs.mkdir(ROOT, OsStr::new("d")).await,
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        e.fs.setattr(f.attr.ino, Some(0), None).await,
        Err(FsError::ReadOnly)
    ));
    assert!(matches!(
        e.fs.rename(ROOT, OsStr::new("f"), ROOT, OsStr::new("g"), false).await,
        Err(FsError::ReadOnly)
    ));
    assert_eq!(FsError::ReadOnly.errno(), libc::EROFS);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_file_written_in_order_goes_up_while_it_is_written() {
    let e = env(Duration::from_secs(60));
    let data = noise(40 * MIB, 7);
    let (_, o) = e.fs.create(ROOT, OsStr::new("stream.bin")).await.unwrap();
    write_all(&e.fs, o.fh, 0, &data).await;
    // The whole parts were handed out while writing; let those in flight land.
    let mut before_close = 0;
    for _ in 0..200 {
        before_close = received(&e);
        if before_close >= 32 * MIB as u64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        before_close >= 32 * MIB as u64,
        "only {before_close} bytes sent before close"
    );
    e.fs.release_handle(o.fh).await.unwrap();
    assert_eq!(remote(&e, "stream.bin").unwrap(), data);
    assert_eq!(received(&e), data.len() as u64, "every byte sent once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_out_of_order_ends_the_stream_and_the_file_is_still_right() {
    let e = env(Duration::from_secs(60));
    let mut data = noise(30 * MIB, 8);
    let (_, o) = e.fs.create(ROOT, OsStr::new("s.bin")).await.unwrap();
    write_all(&e.fs, o.fh, 0, &data).await;
    // Back to the start: what was sent is stale now.
    write_all(&e.fs, o.fh, 10, b"patched").await;
    data[10..17].copy_from_slice(b"patched");
    e.fs.release_handle(o.fh).await.unwrap();
    assert_eq!(remote(&e, "s.bin").unwrap(), data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_fails_at_close_is_retried_in_the_background() {
    let e = env(Duration::from_secs(60));
    let down = StoreError::Unavailable("connection refused".into());
    e.faulty.inject_always(Fault::Fail(Op::Write, down));
    let (_, o) = e.fs.create(ROOT, OsStr::new("late.txt")).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"eventually").await;
    let err = e.fs.flush(o.fh).await.unwrap_err();
    assert_eq!(err.errno(), libc::EIO);
    assert!(e.fs.release_handle(o.fh).await.is_err());
    // Journaled for a retry; the remote comes back.
    assert_eq!(e.fs.pending_uploads(), 1);
    e.faulty.clear();
    for _ in 0..100 {
        if remote(&e, "late.txt").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(remote(&e, "late.txt").unwrap(), b"eventually");
    assert!(e.fs.drain(Duration::from_secs(5)).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_the_remote_refuses_is_kept_and_not_retried() {
    let e = env(Duration::from_secs(60));
    let no = StoreError::Refused {
        status: 403,
        message: "token out of scope".into(),
    };
    e.faulty.inject_always(Fault::Fail(Op::Write, no));
    let (_, o) = e.fs.create(ROOT, OsStr::new("denied.txt")).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"mine").await;
    let err = e.fs.flush(o.fh).await.unwrap_err();
    assert_eq!(err.errno(), libc::EACCES, "{err}");
    assert!(err.to_string().contains("token out of scope"), "{err}");
    // Said again at the last close, and not journaled for retries.
    let err = e.fs.release_handle(o.fh).await.unwrap_err();
    assert_eq!(err.errno(), libc::EACCES);
    assert_eq!(e.fs.pending_uploads(), 0);
    e.faulty.clear();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(remote(&e, "denied.txt").is_none(), "nothing was sent later");
    // The bytes are kept where the error said.
    let kept = err.to_string();
    let path = kept.rsplit("kept at ").next().unwrap();
    assert_eq!(std::fs::read(path).unwrap(), b"mine");
}

/// The journal records of the write area.
fn journaled(e: &Env) -> usize {
    std::fs::read_dir(&e.cfg.staging_dir)
        .unwrap()
        .filter(|f| f.as_ref().unwrap().path().extension().is_some_and(|x| x == "json"))
        .count()
}

/// The copies kept in `pending/conflicts/`: (file name, bytes).
fn kept_copies(e: &Env) -> Vec<(String, Vec<u8>)> {
    let Ok(rd) = std::fs::read_dir(e.cfg.staging_dir.join("conflicts")) else {
        return Vec::new();
    };
    rd.map(|f| {
        let p = f.unwrap().path();
        (
            p.file_name().unwrap().to_str().unwrap().to_string(),
            std::fs::read(&p).unwrap(),
        )
    })
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renames_and_removals_after_fsync_are_in_the_journal_before_they_return() {
    let e = env_write_back(Duration::from_secs(3600));
    e.mem.insert("doc", b"old doc".to_vec());
    e.mem.insert("dir/inner", b"old inner".to_vec());
    e.mem.insert("edited", b"edited once".to_vec());
    // A save through a temporary file: written, fsync'd, closed, renamed over the original.
    let (_, o) = e.fs.create(ROOT, OsStr::new("doc.tmp")).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"new doc").await;
    e.fs.flush(o.fh).await.unwrap();
    e.fs.release_handle(o.fh).await.unwrap();
    e.fs.rename(ROOT, OsStr::new("doc.tmp"), ROOT, OsStr::new("doc"), false)
        .await
        .unwrap();
    // A file of the remote changed, then moved; another in a folder that moves.
    let f = resolve(&e.fs, "edited").await.unwrap();
    let o = e.fs.open(f.attr.ino, true, false).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"EDITED").await;
    e.fs.release_handle(o.fh).await.unwrap();
    e.fs.rename(ROOT, OsStr::new("edited"), ROOT, OsStr::new("moved"), false)
        .await
        .unwrap();
    let f = resolve(&e.fs, "dir/inner").await.unwrap();
    let o = e.fs.open(f.attr.ino, true, false).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"NEW").await;
    e.fs.release_handle(o.fh).await.unwrap();
    e.fs.rename(ROOT, OsStr::new("dir"), ROOT, OsStr::new("dir2"), false)
        .await
        .unwrap();
    // A file journaled, then replaced by a rename over it: its changes go with it.
    let (_, o) = e.fs.create(ROOT, OsStr::new("target")).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"replaced").await;
    e.fs.release_handle(o.fh).await.unwrap();
    let (_, o) = e.fs.create(ROOT, OsStr::new("target.new")).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"replacement").await;
    e.fs.release_handle(o.fh).await.unwrap();
    e.fs.rename(ROOT, OsStr::new("target.new"), ROOT, OsStr::new("target"), false)
        .await
        .unwrap();
    // A file journaled, then removed.
    let (_, o) = e.fs.create(ROOT, OsStr::new("scratch")).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"scratch").await;
    e.fs.release_handle(o.fh).await.unwrap();
    e.fs.unlink(ROOT, OsStr::new("scratch")).await.unwrap();
    // Nothing was sent (the delay is an hour); the daemon dies here and the next run replays.
    assert_eq!(remote(&e, "doc").unwrap(), b"old doc");
    assert_eq!(journaled(&e), 4);
    let next = e.next_run();
    assert_eq!(next.replay_journal().await, (4, 0));
    assert_eq!(remote(&e, "doc").unwrap(), b"new doc");
    assert!(remote(&e, "doc.tmp").is_none());
    assert_eq!(remote(&e, "moved").unwrap(), b"EDITED once");
    assert!(remote(&e, "edited").is_none());
    assert_eq!(remote(&e, "dir2/inner").unwrap(), b"NEW inner");
    assert!(remote(&e, "dir/inner").is_none());
    assert_eq!(remote(&e, "target").unwrap(), b"replacement");
    assert!(remote(&e, "scratch").is_none());
    assert!(kept_copies(&e).is_empty(), "no conflicts");
    assert_eq!(journaled(&e), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflict_at_replay_keeps_the_whole_local_version() {
    let e = env_write_back(Duration::from_secs(3600));
    let old = noise(3 * MIB, 3);
    e.mem.insert("cached", old.clone());
    e.mem.insert("partly", old.clone());
    // `cached` is read whole; of `partly` only the first chunk is in the cache.
    assert_eq!(cat(&e.fs, "cached").await.unwrap(), old);
    let p = resolve(&e.fs, "partly").await.unwrap();
    let etag = e.mem.object("partly").unwrap().1;
    let v = e.fs.reader().open_version("partly", &etag, old.len() as u64);
    super::super::mutate::read_all(&v, 0..10).await.unwrap();
    let c = resolve(&e.fs, "cached").await.unwrap();
    for ino in [c.attr.ino, p.attr.ino] {
        let o = e.fs.open(ino, true, false).await.unwrap();
        write_all(&e.fs, o.fh, MIB as u64 + 10, b"LOCAL").await;
        e.fs.release_handle(o.fh).await.unwrap();
    }
    // Someone else changes both before the next run sends them.
    e.mem.insert("cached", b"theirs".to_vec());
    e.mem.insert("partly", b"theirs".to_vec());
    let next = e.next_run();
    assert_eq!(next.replay_journal().await, (0, 0));
    assert_eq!(remote(&e, "cached").unwrap(), b"theirs", "not overwritten");
    let mut kept = kept_copies(&e);
    kept.sort();
    assert_eq!(kept.len(), 2, "{:?}", kept.iter().map(|k| &k.0).collect::<Vec<_>>());
    let mut want = old.clone();
    want[MIB + 10..MIB + 15].copy_from_slice(b"LOCAL");
    let (name, bytes) = &kept[0];
    assert!(name.ends_with("-cached"), "{name}");
    assert!(*bytes == want, "the whole local version of a cached base");
    // What the cache did not hold is zeros, and the name says the copy is incomplete.
    let (name, bytes) = &kept[1];
    assert!(name.ends_with("-partly.incomplete"), "{name}");
    assert_eq!(bytes.len(), want.len());
    assert!(bytes[..MIB] == want[..MIB], "the cached chunk");
    assert_eq!(&bytes[MIB + 10..MIB + 15], b"LOCAL");
    assert!(bytes[MIB + 15..].iter().all(|&b| b == 0));
    assert_eq!(journaled(&e), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_entries_that_fail_at_replay_are_sent_when_the_remote_comes_back() {
    let e = env_write_back(Duration::from_secs(3600));
    let (_, o) = e.fs.create(ROOT, OsStr::new("late.txt")).await.unwrap();
    write_all(&e.fs, o.fh, 0, b"eventually").await;
    e.fs.release_handle(o.fh).await.unwrap();
    // The next run starts while the remote takes no writes.
    let down = StoreError::Unavailable("connection refused".into());
    e.faulty.inject_always(Fault::Fail(Op::Write, down));
    let next = e.next_run();
    assert_eq!(next.replay_journal().await, (0, 1));
    assert_eq!(next.pending_uploads(), 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(remote(&e, "late.txt").is_none());
    assert_eq!(journaled(&e), 1, "still journaled");
    // The remote comes back while mounted.
    e.faulty.clear();
    for _ in 0..100 {
        if remote(&e, "late.txt").is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(remote(&e, "late.txt").unwrap(), b"eventually");
    assert!(next.drain(Duration::from_secs(5)).await.is_empty());
    assert_eq!(journaled(&e), 0);
    let left: Vec<_> = std::fs::read_dir(&e.cfg.staging_dir)
        .unwrap()
        .map(|f| f.unwrap().file_name())
        .filter(|n| n.to_str().unwrap().ends_with(".data"))
        .collect();
    // The first run's staging file is still open there (it never stopped); the replayed one
    // is gone.
    assert!(left.len() <= 1, "{left:?}");
}
