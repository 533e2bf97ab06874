//! Reading a file version to derive what the server keeps about it: the 1 MiB chunk digests
//! of its ETag, its content-defined chunks (`protocol::cdc_chunks`, computed here from a
//! stream so a large file is never held in memory), and the blake3 of given byte ranges (the
//! parts of a commit), all in one pass. Also the incremental forms used after a write in
//! place: only the 1 MiB chunks a write touched are hashed again, and content-defined chunking
//! restarts at the first chunk the write (or the new end of the file) can have changed.
//!
//! Owns no policy: callers check the file's identity around a scan and decide what to keep.

use std::fs::File;
use std::io::{self, Read};
use std::ops::Range;
use std::os::unix::fs::FileExt;

use crate::protocol::{CDC_AVG, CDC_MAX, CDC_MIN, CdcChunk, Crc32c, DIGEST_CHUNK_SIZE, crc32c};

/// What the server keeps of each 1 MiB chunk of a version, in order: its blake3 (the input of
/// the version's tag) and its CRC32C (what readers check the bytes they fetched against).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChunkSums {
    pub blake3: Vec<[u8; 32]>,
    pub crc32c: Vec<u32>,
}

impl ChunkSums {
    /// The sums of `data`, hashed in 1 MiB chunks.
    #[cfg(test)]
    pub fn of(data: &[u8]) -> ChunkSums {
        ChunkSums {
            blake3: crate::protocol::chunk_digests(data, DIGEST_CHUNK_SIZE),
            crc32c: crate::protocol::chunk_crc32c(data, DIGEST_CHUNK_SIZE),
        }
    }

    pub fn push(&mut self, blake3: [u8; 32], crc32c: u32) {
        self.blake3.push(blake3);
        self.crc32c.push(crc32c);
    }

    fn get(&self, i: usize) -> Option<([u8; 32], u32)> {
        Some((*self.blake3.get(i)?, *self.crc32c.get(i)?))
    }
}

/// What one full scan found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scan {
    pub digests: ChunkSums,
    pub cdc: Vec<CdcChunk>,
    /// blake3 of each requested segment, in order.
    pub segments: Vec<[u8; 32]>,
}

/// blake3 (and, for the 1 MiB chunks, CRC32C) of consecutive byte ranges fed in order, each
/// ending at one of `ends`.
struct Segmenter {
    ends: Vec<u64>,
    next: usize,
    pos: u64,
    hasher: blake3::Hasher,
    crc: Option<Crc32c>,
    out: ChunkSums,
}

impl Segmenter {
    /// Segments starting at `start` and ending at each of `ends` (ascending, all ≥ `start`).
    fn new(start: u64, ends: Vec<u64>) -> Segmenter {
        let mut s = Segmenter {
            out: ChunkSums::default(),
            ends,
            next: 0,
            pos: start,
            hasher: blake3::Hasher::new(),
            crc: None,
        };
        s.close_empty();
        s
    }

    /// The 1 MiB digest chunks from the chunk-aligned `start` to `size`.
    fn fixed(start: u64, size: u64) -> Segmenter {
        let mut ends = Vec::new();
        let mut e = start;
        while e < size {
            e = (e + DIGEST_CHUNK_SIZE).min(size);
            ends.push(e);
        }
        let mut s = Segmenter::new(start, ends);
        s.crc = Some(Crc32c::new());
        s
    }

    fn close_empty(&mut self) {
        while self.next < self.ends.len() && self.ends[self.next] <= self.pos {
            self.out.blake3.push(*self.hasher.finalize().as_bytes());
            self.hasher.reset();
            if let Some(c) = &mut self.crc {
                self.out.crc32c.push(c.finalize());
                c.reset();
            }
            self.next += 1;
        }
    }

    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() && self.next < self.ends.len() {
            let take = ((self.ends[self.next] - self.pos) as usize).min(data.len());
            self.hasher.update(&data[..take]);
            if let Some(c) = &mut self.crc {
                c.update(&data[..take]);
            }
            self.pos += take as u64;
            data = &data[take..];
            self.close_empty();
        }
    }

    fn finish(self) -> io::Result<ChunkSums> {
        if self.next < self.ends.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shorter than expected",
            ));
        }
        Ok(self.out)
    }
}

/// Positioned reads of `file` from `pos` to `end`, handing every byte to the segmenters.
struct RangeReader<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
    sinks: Vec<&'a mut Segmenter>,
}

impl Read for RangeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = ((self.end - self.pos) as usize).min(buf.len());
        if want == 0 {
            return Ok(0);
        }
        let n = loop {
            match self.file.read_at(&mut buf[..want], self.pos) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while it was read",
            ));
        }
        for s in &mut self.sinks {
            s.feed(&buf[..n]);
        }
        self.pos += n as u64;
        Ok(n)
    }
}

fn cdc_error(e: fastcdc::v2020::Error) -> io::Error {
    match e {
        fastcdc::v2020::Error::IoError(e) => e,
        other => io::Error::other(other.to_string()),
    }
}

/// Content-defined chunks of `reader`'s bytes, whose first byte is at `base` in the file.
/// `stop` is asked after each chunk whether the rest is known (then chunking stops early).
fn cdc_stream(reader: impl Read, base: u64, mut stop: impl FnMut(&CdcChunk) -> bool) -> io::Result<Vec<CdcChunk>> {
    let mut out = Vec::new();
    for chunk in fastcdc::v2020::StreamCDC::new(reader, CDC_MIN, CDC_AVG, CDC_MAX) {
        let chunk = chunk.map_err(cdc_error)?;
        let c = CdcChunk {
            offset: base + chunk.offset,
            len: chunk.length as u64,
            hash: blake3::hash(&chunk.data).to_hex().to_string(),
        };
        let done = stop(&c);
        out.push(c);
        if done {
            break;
        }
    }
    Ok(out)
}

/// Reads `size` bytes of `file` once: 1 MiB digests, content-defined chunks, and the blake3 of
/// the segments ending at each of `segment_ends`.
pub fn scan(file: &File, size: u64, segment_ends: Vec<u64>) -> io::Result<Scan> {
    let mut digests = Segmenter::fixed(0, size);
    let mut segments = Segmenter::new(0, segment_ends);
    let reader = RangeReader {
        file,
        pos: 0,
        end: size,
        sinks: vec![&mut digests, &mut segments],
    };
    let cdc = cdc_stream(reader, 0, |_| false)?;
    Ok(Scan {
        digests: digests.finish()?,
        cdc,
        segments: segments.finish()?.blake3,
    })
}

/// Content-defined chunks of the whole file (for versions whose digests are already known).
pub fn chunk_file(file: &File, size: u64) -> io::Result<Vec<CdcChunk>> {
    let reader = RangeReader {
        file,
        pos: 0,
        end: size,
        sinks: Vec::new(),
    };
    cdc_stream(reader, 0, |_| false)
}

/// A run of the bytes of a new file whose 1 MiB digests may be known already: `len` bytes at
/// `offset`, and `pieces`, the sums of each 1 MiB piece from `offset` on (the last one
/// possibly short), known only when `offset` is a multiple of the chunk size (empty otherwise).
#[derive(Debug, Clone, Copy)]
pub struct Known<'a> {
    pub offset: u64,
    pub len: u64,
    pub pieces: &'a ChunkSums,
}

/// The 1 MiB digests of the first `size` bytes of `file`, which `runs` tile in order from 0.
/// A chunk's digest is taken from the run holding a piece with the same start and end;
/// any other chunk (across two runs, in a run that is not aligned, or the short end of a run
/// that does not end the file) is read and hashed. Returns the digests and the bytes read.
pub fn digests_from_pieces(file: &File, size: u64, runs: &[Known<'_>]) -> io::Result<(ChunkSums, u64)> {
    let n = size.div_ceil(DIGEST_CHUNK_SIZE);
    let mut out = ChunkSums::default();
    let (mut buf, mut read, mut j) = (Vec::new(), 0, 0);
    for i in 0..n {
        let start = i * DIGEST_CHUNK_SIZE;
        let end = (start + DIGEST_CHUNK_SIZE).min(size);
        while runs.get(j).is_some_and(|r| r.offset + r.len <= start) {
            j += 1;
        }
        let known = runs.get(j).and_then(|r| {
            if r.offset > start || !(start - r.offset).is_multiple_of(DIGEST_CHUNK_SIZE) {
                return None;
            }
            let k = (start - r.offset) / DIGEST_CHUNK_SIZE;
            let piece_end = (r.offset + (k + 1) * DIGEST_CHUNK_SIZE).min(r.offset + r.len);
            (piece_end == end).then(|| r.pieces.get(k as usize)).flatten()
        });
        if let Some((b3, crc)) = known {
            out.push(b3, crc);
            continue;
        }
        buf.resize((end - start) as usize, 0);
        let got = super::digests::read_full_at(file, &mut buf, start)?;
        if got < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shorter than its parts",
            ));
        }
        read += got as u64;
        out.push(*blake3::hash(&buf).as_bytes(), crc32c(&buf));
    }
    Ok((out, read))
}

/// Digests of the new version after bytes `dirty` changed (a write, an append, a truncation)
/// and the size went from `old_size` to `new_size`: a 1 MiB chunk is hashed again only when
/// its bytes or its extent changed. Returns the digests and the bytes read.
pub fn rehash(
    file: &File,
    old: &ChunkSums,
    old_size: u64,
    new_size: u64,
    dirty: Range<u64>,
) -> io::Result<(ChunkSums, u64)> {
    let n = new_size.div_ceil(DIGEST_CHUNK_SIZE);
    let mut out = ChunkSums::default();
    let mut buf = Vec::new();
    let mut read = 0;
    for i in 0..n {
        let start = i * DIGEST_CHUNK_SIZE;
        let new_end = (start + DIGEST_CHUNK_SIZE).min(new_size);
        let old_end = (start < old_size).then(|| (start + DIGEST_CHUNK_SIZE).min(old_size));
        let untouched = dirty.end <= start || dirty.start >= new_end;
        if old_end == Some(new_end)
            && untouched
            && let Some((b3, crc)) = old.get(i as usize)
        {
            out.push(b3, crc);
            continue;
        }
        buf.resize((new_end - start) as usize, 0);
        let got = super::digests::read_full_at(file, &mut buf, start)?;
        if got < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while it was read",
            ));
        }
        read += got as u64;
        out.push(*blake3::hash(&buf).as_bytes(), crc32c(&buf));
    }
    Ok((out, read))
}

/// Content-defined chunks of the new version after bytes `dirty` changed and the size went
/// from `old_size` to `new_size`. A FastCDC cut depends only on the bytes from the chunk's
/// start to the cut, so old chunks that end before the change are kept, except the last one
/// (cut by the end of the file). As a margin against the end-of-data handling of the cut
/// routine (its window is bounded by the bytes left), chunks starting within `CDC_AVG` of
/// either end are cut again too when the size changed. Chunking restarts at the first chunk
/// not kept and, when the size did not change, stops at the first old boundary past the
/// change. Returns the chunks and the bytes read.
pub fn rechunk(
    file: &File,
    old: &[CdcChunk],
    old_size: u64,
    new_size: u64,
    dirty: Range<u64>,
) -> io::Result<(Vec<CdcChunk>, u64)> {
    let avg = CDC_AVG as u64;
    let same_size = old_size == new_size;
    let keep = old
        .iter()
        .enumerate()
        .take_while(|(i, c)| {
            let end = c.offset + c.len;
            let last = *i + 1 == old.len();
            let far_from_ends = old_size - c.offset >= avg && new_size.saturating_sub(c.offset) >= avg;
            end <= dirty.start && (same_size || (!last && far_from_ends))
        })
        .count();
    let restart = old
        .get(keep)
        .map_or_else(|| old.last().map_or(0, |c| c.offset + c.len), |c| c.offset);
    let restart = restart.min(new_size);
    let mut out: Vec<CdcChunk> = old[..keep].to_vec();
    let reader = RangeReader {
        file,
        pos: restart,
        end: new_size,
        sinks: Vec::new(),
    };
    let mut resume_at = None;
    let fresh = cdc_stream(reader, restart, |c| {
        let end = c.offset + c.len;
        if same_size
            && end >= dirty.end
            && end < new_size
            && let Ok(i) = old.binary_search_by_key(&end, |o| o.offset)
        {
            resume_at = Some(i);
            return true;
        }
        false
    })?;
    let read = fresh.iter().map(|c| c.len).sum();
    out.extend(fresh);
    if let Some(i) = resume_at {
        out.extend_from_slice(&old[i..]);
    }
    Ok((out, read))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{cdc_chunks, chunk_digests};
    use crate::testing::noise as data;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> (tempfile::NamedTempFile, File) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(bytes).unwrap();
        let file = File::open(f.path()).unwrap();
        (f, file)
    }

    #[test]
    fn scan_matches_the_protocol_functions() {
        for len in [0usize, 1, 1000, CDC_MIN - 1, CDC_MIN + 1, (1 << 20) + 7, 3 << 20] {
            let bytes = data(len, len as u64 + 1);
            let (_t, f) = file_with(&bytes);
            let ends = vec![0, (len / 3) as u64, (len / 3) as u64, len as u64];
            let s = scan(&f, len as u64, ends.clone()).unwrap();
            assert_eq!(s.digests.blake3, chunk_digests(&bytes, DIGEST_CHUNK_SIZE), "{len}");
            assert_eq!(
                s.digests.crc32c,
                crate::protocol::chunk_crc32c(&bytes, DIGEST_CHUNK_SIZE),
                "{len}"
            );
            assert_eq!(s.cdc, cdc_chunks(&bytes), "{len}");
            let mut start = 0;
            let want: Vec<[u8; 32]> = ends
                .iter()
                .map(|&e| {
                    let h = *blake3::hash(&bytes[start..e as usize]).as_bytes();
                    start = e as usize;
                    h
                })
                .collect();
            assert_eq!(s.segments, want, "{len}");
            assert_eq!(chunk_file(&f, len as u64).unwrap(), s.cdc);
        }
    }

    #[test]
    fn a_file_shorter_than_said_is_an_error() {
        let (_t, f) = file_with(&data(1000, 1));
        assert!(scan(&f, 2000, vec![]).is_err());
    }

    #[test]
    fn digests_from_pieces_equal_a_full_hash_and_read_only_what_no_piece_covers() {
        const M: usize = DIGEST_CHUNK_SIZE as usize;
        let bytes = data(7 * M + 1234, 42);
        let (_t, f) = file_with(&bytes);
        // Each layout: the lengths of consecutive runs, and whether a run's pieces are known.
        let layouts: &[&[(usize, bool)]] = &[
            &[(2 * M, true), (2 * M, true), (3 * M + 1234, true)],
            &[(2 * M, true), (M / 2, true), (3 * M / 2, true), (3 * M + 1234, true)],
            &[(3 * M, true), (0, true), (4 * M + 1234, false)],
            &[(M + 7, true), (6 * M + 1227, true)],
            &[(7 * M + 1234, true)],
            &[(7 * M, true), (1234, true)],
            &[(5 * M + 1234, true), (2 * M, true)],
        ];
        for (n, layout) in layouts.iter().enumerate() {
            let mut at = 0;
            let pieces: Vec<(u64, u64, ChunkSums)> = layout
                .iter()
                .map(|&(len, known)| {
                    let run = &bytes[at..at + len];
                    let p = if known && at % M == 0 {
                        ChunkSums::of(run)
                    } else {
                        ChunkSums::default()
                    };
                    at += len;
                    ((at - len) as u64, len as u64, p)
                })
                .collect();
            let runs: Vec<Known<'_>> = pieces
                .iter()
                .map(|(offset, len, p)| Known {
                    offset: *offset,
                    len: *len,
                    pieces: p,
                })
                .collect();
            let size = bytes.len() as u64;
            let (d, read) = digests_from_pieces(&f, size, &runs).unwrap();
            assert_eq!(d, ChunkSums::of(&bytes), "layout {n}");
            let want_read: u64 = match n {
                0 | 4 => 0,
                // The chunk across the short run and its neighbours.
                1 => M as u64 + M as u64,
                // The unknown run, whole.
                2 => 4 * M as u64 + 1234,
                // Everything from the unaligned run on, and the chunk the first run ends in.
                3 => size - M as u64,
                // The short piece of the last run is the file's last chunk.
                5 => 0,
                // The short piece of the first run is not a chunk of the file; the second run
                // is not aligned.
                6 => 2 * M as u64 + 1234,
                _ => unreachable!(),
            };
            assert_eq!(read, want_read, "layout {n}");
        }
        assert!(digests_from_pieces(&f, bytes.len() as u64 + M as u64, &[]).is_err());
    }

    /// Applies `edit` to a copy of `old` and checks the incremental results against a full
    /// computation of the new content.
    fn check(old: &[u8], edit: impl FnOnce(&mut Vec<u8>) -> Range<u64>) -> (u64, u64) {
        let old_d = ChunkSums::of(old);
        let old_c = cdc_chunks(old);
        let mut new = old.to_vec();
        let dirty = edit(&mut new);
        let (_t, f) = file_with(&new);
        let (d, hashed) = rehash(&f, &old_d, old.len() as u64, new.len() as u64, dirty.clone()).unwrap();
        assert_eq!(d, ChunkSums::of(&new));
        let (c, chunked) = rechunk(&f, &old_c, old.len() as u64, new.len() as u64, dirty).unwrap();
        assert_eq!(c, cdc_chunks(&new));
        (hashed, chunked)
    }

    #[test]
    fn incremental_digests_and_chunks_equal_a_full_scan() {
        let old = data(5 << 20, 9);
        let n = old.len() as u64;
        // Append: only the last partial 1 MiB chunk and the new bytes are hashed.
        let (hashed, chunked) = check(&old, |v| {
            v.extend_from_slice(&data(70_000, 2));
            n..n + 70_000
        });
        assert!(hashed <= (1 << 20) + 70_000, "{hashed}");
        assert!(chunked <= 3 * CDC_MAX as u64, "{chunked}");
        // A write in the middle, same size: chunking meets the old boundaries again.
        let (hashed, chunked) = check(&old, |v| {
            v[2_500_000..2_500_010].copy_from_slice(b"0123456789");
            2_500_000..2_500_010
        });
        assert_eq!(hashed, 1 << 20);
        assert!(chunked <= 4 * CDC_MAX as u64, "{chunked}");
        // A write across the end, growing the file.
        check(&old, |v| {
            let at = v.len() - 100;
            v.truncate(at);
            v.extend_from_slice(&data(300_000, 3));
            at as u64..at as u64 + 300_000
        });
        // Truncations, shorter and longer.
        check(&old, |v| {
            v.truncate(3_000_001);
            3_000_001..n
        });
        check(&old, |v| {
            v.resize(n as usize + 5000, 0);
            n..n + 5000
        });
        check(&old, |v| {
            v.truncate(10);
            10..n
        });
        // From and to empty.
        check(&[], |v| {
            v.extend_from_slice(&data(400_000, 4));
            0..400_000
        });
        check(&old, |v| {
            v.clear();
            0..n
        });
        // Many small appends in a row stay exact.
        let mut cur = data(200_000, 5);
        for i in 0..6 {
            let extra = data(50_000 + i * 9999, 10 + i as u64);
            let at = cur.len() as u64;
            check(&cur, |v| {
                v.extend_from_slice(&extra);
                at..at + extra.len() as u64
            });
            cur.extend_from_slice(&extra);
        }
    }
}
