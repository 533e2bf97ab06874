//! Uploads against the in-memory store: the content that arrives, the plan taken, and the new
//! bytes that crossed the wire.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::*;
use crate::store::memory::MemoryStore;
use crate::store::{Capabilities, ETag, Store};
use crate::testing::noise as data;

const MIB: usize = 1 << 20;

struct Original(Bytes);

#[async_trait]
impl BaseSource for Original {
    async fn read(&self, r: Range<u64>) -> Result<Bytes, String> {
        Ok(self.0.slice(r.start as usize..r.end as usize))
    }
}

struct Env {
    dir: tempfile::TempDir,
    mem: Arc<MemoryStore>,
    up: Uploader,
}

fn env_with(mem: MemoryStore, cfg: PlanConfig) -> Env {
    let mem = Arc::new(mem);
    Env {
        dir: tempfile::tempdir().unwrap(),
        up: Uploader::new(mem.clone(), cfg, 4),
        mem,
    }
}

fn env() -> Env {
    env_with(MemoryStore::new(), PlanConfig::default())
}

impl Env {
    fn existing(&self, path: &str, content: &[u8]) -> (Staged, Original) {
        let etag = self.mem.insert(path, content.to_vec());
        let s = Staged::modify(
            self.dir.path().join(format!("s-{}", path.replace('/', "_"))),
            RemoteVersion {
                etag,
                size: content.len() as u64,
            },
        )
        .unwrap();
        (s, Original(Bytes::copy_from_slice(content)))
    }

    fn received(&self) -> u64 {
        self.mem.stats.bytes_received.load(Ordering::Relaxed)
    }

    async fn send(&self, path: &str, s: &mut Staged, base: &Original) -> Outcome {
        let before = self.received();
        let o = self.up.upload(path, s, base).await.unwrap().expect("something to send");
        assert_eq!(self.received() - before, o.bytes_sent, "counted on both sides");
        s.uploaded(o.version.clone());
        o
    }

    fn remote(&self, path: &str) -> Vec<u8> {
        self.mem.object(path).unwrap().0.to_vec()
    }
}

#[tokio::test]
async fn an_append_sends_the_appended_bytes() {
    let e = env();
    let old = data(16 * MIB, 1);
    let (mut s, base) = e.existing("log", &old);
    s.write(old.len() as u64, &[7u8; 1024]).unwrap();
    let o = e.send("log", &mut s, &base).await;
    assert_eq!((o.plan, o.bytes_sent), ("append", 1024));
    let mut want = old.clone();
    want.extend_from_slice(&[7u8; 1024]);
    assert_eq!(e.remote("log"), want);
    assert_eq!(o.version.size, want.len() as u64);
    // Nothing new: nothing sent.
    assert!(e.up.upload("log", &s, &base).await.unwrap().is_none());
}

#[tokio::test]
async fn an_overwrite_in_place_sends_the_written_range() {
    let e = env();
    let old = data(16 * MIB, 2);
    let (mut s, base) = e.existing("f", &old);
    s.write(5 * MIB as u64, &[9u8; 4096]).unwrap();
    let o = e.send("f", &mut s, &base).await;
    assert_eq!((o.plan, o.bytes_sent), ("write", 4096));
    let mut want = old.clone();
    want[5 * MIB..5 * MIB + 4096].fill(9);
    assert_eq!(e.remote("f"), want);
    // Two ranges at once: one session of server-side copies and the two ranges.
    s.write(100, b"abc").unwrap();
    s.write(15 * MIB as u64, b"xyz").unwrap();
    let o = e.send("f", &mut s, &base).await;
    assert_eq!((o.plan, o.bytes_sent), ("session", 6));
    want[100..103].copy_from_slice(b"abc");
    want[15 * MIB..15 * MIB + 3].copy_from_slice(b"xyz");
    assert_eq!(e.remote("f"), want);
}

#[tokio::test]
async fn a_rewrite_with_one_mib_changed_sends_only_the_changed_chunks() {
    let e = env();
    let old = data(32 * MIB, 3);
    let (mut s, base) = e.existing("m.bin", &old);
    let mut new = old.clone();
    new[16 * MIB..17 * MIB].copy_from_slice(&data(MIB, 4));
    // `cp new m.bin`: truncate, then write everything.
    s.truncate(0).unwrap();
    s.write(0, &new).unwrap();
    let o = e.send("m.bin", &mut s, &base).await;
    assert_eq!(o.plan, "chunks");
    assert!(o.bytes_sent < 4 * MIB as u64, "sent {} bytes", o.bytes_sent);
    assert_eq!(e.remote("m.bin"), new);
}

#[tokio::test]
async fn a_new_file_like_an_existing_one_sends_only_what_differs() {
    let e = env();
    let old = data(24 * MIB, 5);
    e.mem.insert("doc.bin", old.clone());
    let mut new = old.clone();
    new.splice(3 * MIB..3 * MIB, b"an insertion".iter().copied());
    // A save through a temp file: a new file first.
    let mut s = Staged::create(e.dir.path().join("tmp")).unwrap();
    s.write(0, &new).unwrap();
    let o = e.send("doc.bin.tmp", &mut s, &Original(Bytes::new())).await;
    assert_eq!(o.plan, "chunks");
    assert!(o.bytes_sent < 4 * MIB as u64, "sent {} bytes", o.bytes_sent);
    assert_eq!(e.remote("doc.bin.tmp"), new);
}

#[tokio::test]
async fn a_change_on_the_remote_meanwhile_is_a_conflict_and_theirs_stays() {
    let e = env();
    let old = data(MIB, 6);
    let (mut s, base) = e.existing("c", &old);
    s.write(10, b"mine").unwrap();
    let theirs = e.mem.insert("c", b"theirs".to_vec());
    let err = e.up.upload("c", &s, &base).await.unwrap_err();
    assert!(matches!(err, UploadError::Conflict), "{err:?}");
    assert_eq!(e.mem.object("c").unwrap().1, theirs);
    // A new file that appeared meanwhile is a conflict too.
    let mut n = Staged::create(e.dir.path().join("n")).unwrap();
    n.write(0, b"new").unwrap();
    e.mem.insert("n", b"someone else's".to_vec());
    assert!(matches!(e.up.upload("n", &n, &base).await, Err(UploadError::Conflict)));
}

#[tokio::test]
async fn large_new_files_go_in_parallel_parts() {
    let caps = Capabilities {
        content_chunks: false,
        ..MemoryStore::new().capabilities()
    };
    let e = env_with(
        MemoryStore::new().with_capabilities(caps),
        PlanConfig {
            part_size: MIB as u64,
            ..PlanConfig::default()
        },
    );
    let new = data(20 * MIB + 17, 7);
    let mut s = Staged::create(e.dir.path().join("big")).unwrap();
    s.write(0, &new).unwrap();
    let o = e.send("big", &mut s, &Original(Bytes::new())).await;
    assert_eq!((o.plan, o.bytes_sent), ("parts", new.len() as u64));
    assert_eq!(e.remote("big"), new);
}

#[tokio::test]
async fn whole_file_uploads_read_unchanged_bytes_from_the_base() {
    let e = env_with(
        MemoryStore::new(),
        PlanConfig {
            incremental: false,
            put_max: MIB as u64,
            part_size: MIB as u64,
        },
    );
    let old = data(5 * MIB, 8);
    let (mut s, base) = e.existing("w", &old);
    s.write(MIB as u64, b"hello").unwrap();
    let o = e.send("w", &mut s, &base).await;
    assert_eq!((o.plan, o.bytes_sent), ("parts", old.len() as u64));
    let mut want = old.clone();
    want[MIB..MIB + 5].copy_from_slice(b"hello");
    assert_eq!(e.remote("w"), want);
}

#[tokio::test]
async fn truncations_and_holes() {
    let e = env();
    let old = data(3 * MIB, 9);
    let (mut s, base) = e.existing("t", &old);
    s.truncate(MIB as u64).unwrap();
    let o = e.send("t", &mut s, &base).await;
    assert_eq!((o.plan, o.bytes_sent), ("truncate", 0));
    assert_eq!(e.remote("t"), &old[..MIB]);
    // Shrink and grow: the gap reads as zeros on the remote too.
    s.truncate(10).unwrap();
    s.truncate(20).unwrap();
    s.write(20, b"end").unwrap();
    let o = e.send("t", &mut s, &base).await;
    assert_eq!(o.plan, "session");
    let mut want = old[..10].to_vec();
    want.extend_from_slice(&[0u8; 10]);
    want.extend_from_slice(b"end");
    assert_eq!(e.remote("t"), want);
    let _ = ETag::new("\"unused\"");
}

#[tokio::test]
async fn a_remote_with_a_minimum_part_size_gets_one_minimum_part_for_a_small_change() {
    let min = 5 * MIB as u64;
    let caps = Capabilities {
        partial_writes: false,
        content_chunks: false,
        min_part_size: min,
        ..MemoryStore::new().capabilities()
    };
    let e = env_with(MemoryStore::new().with_capabilities(caps), PlanConfig::default());
    let old = data(64 * MIB, 30);
    let (mut s, base) = e.existing("obj", &old);
    // A 4 KiB overwrite in the middle: copy, one 5 MiB part with the change, copy.
    s.write(30 * MIB as u64, &[1u8; 4096]).unwrap();
    let o = e.send("obj", &mut s, &base).await;
    assert_eq!(o.plan, "session");
    assert_eq!(o.bytes_sent, min, "one minimum-size part");
    let mut want = old.clone();
    want[30 * MIB..30 * MIB + 4096].fill(1);
    assert_eq!(e.remote("obj"), want);
    // An append: a copy of the object and the appended bytes as the (small) last part.
    s.write(want.len() as u64, b"tail").unwrap();
    let o = e.send("obj", &mut s, &base).await;
    assert_eq!(o.bytes_sent, 4);
    want.extend_from_slice(b"tail");
    assert_eq!(e.remote("obj"), want);
    // A change near the start: the copy before it is too small, so it goes as bytes too.
    s.write(10, b"head").unwrap();
    let o = e.send("obj", &mut s, &base).await;
    assert_eq!(o.bytes_sent, min);
    want[10..14].copy_from_slice(b"head");
    assert_eq!(e.remote("obj"), want);
}

#[test]
fn small_parts_are_grouped_up_to_the_minimum() {
    let parts = vec![
        Part::Copy(0..10),
        Part::Local(10..12),
        Part::Copy(12..100),
        Part::Zero(3),
        Part::Local(103..104),
    ];
    let out = meet_min_part_size(parts.clone(), 20);
    assert_eq!(
        out,
        vec![
            Part::Mixed(vec![Part::Base(0..10), Part::Local(10..12), Part::Base(12..20)]),
            Part::Copy(20..100),
            Part::Mixed(vec![Part::Zero(3), Part::Local(103..104)]),
        ]
    );
    assert_eq!(out.iter().map(Part::len).sum::<u64>(), 104);
    assert_eq!(meet_min_part_size(parts.clone(), 0), parts);
}

#[tokio::test]
async fn a_large_file_on_a_remote_without_sessions_is_put_whole_from_a_mapped_scratch_file() {
    let caps = Capabilities {
        server_side_copy: false,
        partial_writes: false,
        content_chunks: false,
        ..MemoryStore::new().capabilities()
    };
    let e = env_with(MemoryStore::new().with_capabilities(caps), PlanConfig::default());
    let mut old = data(20 * MIB, 4);
    let (mut s, base) = e.existing("big", &old);
    s.write(5 * MIB as u64, &[9u8; 4096]).unwrap();
    s.truncate(21 * MIB as u64).unwrap();
    old[5 * MIB..5 * MIB + 4096].fill(9);
    old.resize(21 * MIB, 0);
    let o = e.send("big", &mut s, &base).await;
    assert_eq!((o.plan, o.bytes_sent), ("put", 21 * MIB as u64));
    assert_eq!(blake3::hash(&e.remote("big")), blake3::hash(&old));
    let left: Vec<_> = std::fs::read_dir(e.dir.path())
        .unwrap()
        .map(|d| d.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 1, "the scratch file is gone: {left:?}");
}

#[tokio::test]
async fn a_partial_write_the_remote_refuses_as_unsupported_becomes_a_put() {
    let inner = Arc::new(MemoryStore::new());
    let faulty = crate::store::faulty::FaultyStore::new(inner.clone());
    let up = Uploader::new(faulty.clone(), PlanConfig::default(), 4);
    let dir = tempfile::tempdir().unwrap();
    let old = data(3 * MIB, 5);
    let etag = inner.insert("f", old.clone());
    let mut s = Staged::modify(
        dir.path().join("s"),
        RemoteVersion {
            etag,
            size: old.len() as u64,
        },
    )
    .unwrap();
    s.truncate(MIB as u64).unwrap();
    let base = Original(Bytes::from(old.clone()));
    faulty.inject(
        crate::store::faulty::Fault::Fail(crate::store::faulty::Op::Write, StoreError::Unsupported("truncate")),
        1,
    );
    let o = up.upload("f", &s, &base).await.unwrap().unwrap();
    assert_eq!(o.plan, "put");
    assert_eq!(faulty.pending(), 0, "the truncate was tried first");
    assert_eq!(inner.object("f").unwrap().0.to_vec(), &old[..MIB]);
}
