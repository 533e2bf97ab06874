//! How to send a file's changes: the cheapest request the remote supports that makes the new
//! version atomically. Pure, so every choice is unit-tested.

use std::ops::Range;

use super::staged::Staged;
use crate::store::Capabilities;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanConfig {
    /// New files up to this size go in one `PUT`.
    pub put_max: u64,
    /// Size of the new-bytes parts of an upload session.
    pub part_size: u64,
    /// Send only what changed (append, ranged write, copies of unchanged ranges, chunks the
    /// remote holds); `false` uploads whole files.
    pub incremental: bool,
}

impl Default for PlanConfig {
    fn default() -> Self {
        PlanConfig {
            put_max: 8 << 20,
            part_size: 8 << 20,
            incremental: true,
        }
    }
}

/// Where a piece of the new version comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Bytes written locally.
    Local(Range<u64>),
    /// The same range of the remote version being replaced (copied on the server).
    Remote(Range<u64>),
    /// Zeros (a hole).
    Zero(Range<u64>),
}

impl Piece {
    pub fn range(&self) -> &Range<u64> {
        match self {
            Piece::Local(r) | Piece::Remote(r) | Piece::Zero(r) => r,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Nothing changed since the last upload.
    Nothing,
    /// The whole content in one request.
    Put,
    /// The whole content as new bytes, in the parts of an upload session.
    Parts,
    /// The bytes `offset..size` appended to the remote version.
    Append { offset: u64 },
    /// One range written in place (it may extend the file).
    WriteRange(Range<u64>),
    /// The remote version cut (or extended with zeros) to this size.
    Truncate(u64),
    /// An upload session of these pieces, in order.
    Session(Vec<Piece>),
    /// Everything was rewritten: cut the new content into content-defined chunks and send only
    /// those the remote does not hold.
    Rewrite,
}

/// The new version as pieces relative to the remote version (or to nothing).
pub fn pieces(s: &Staged) -> Vec<Piece> {
    let size = s.size();
    let keep = s.remote().map_or(0, |r| s.unsent_keep().min(r.size));
    let mut out: Vec<Piece> = Vec::new();
    for (r, local) in s.unsent().split(0..size) {
        if local {
            out.push(Piece::Local(r));
        } else if r.start < keep {
            let mid = r.end.min(keep);
            out.push(Piece::Remote(r.start..mid));
            if mid < r.end {
                out.push(Piece::Zero(mid..r.end));
            }
        } else {
            out.push(Piece::Zero(r));
        }
    }
    out
}

pub fn plan(s: &Staged, caps: &Capabilities, cfg: &PlanConfig) -> Plan {
    if !s.is_changed() {
        return Plan::Nothing;
    }
    let size = s.size();
    let sessions = caps.writes && caps.server_side_copy;
    let Some(remote) = s.remote() else {
        if cfg.incremental && caps.content_chunks && size > cfg.put_max {
            return Plan::Rewrite;
        }
        if size <= cfg.put_max || !sessions {
            return Plan::Put;
        }
        return Plan::Parts;
    };
    if !cfg.incremental {
        return if size <= cfg.put_max || !sessions {
            Plan::Put
        } else {
            Plan::Parts
        };
    }
    let keep = s.unsent_keep().min(remote.size);
    let ps = pieces(s);
    if size == remote.size && keep == remote.size && s.unsent().is_empty() {
        return Plan::Nothing;
    }
    if caps.partial_writes {
        let unsent: Vec<Range<u64>> = s.unsent().ranges().collect();
        if unsent.is_empty() && keep >= size.min(remote.size) {
            // Only a size change: shorter, or longer with zeros.
            return Plan::Truncate(size);
        }
        // One request carries the bytes: kept for changes that fit one part.
        if keep == remote.size && unsent.len() == 1 && unsent[0].end - unsent[0].start <= cfg.part_size {
            let u = unsent[0].clone();
            if u.start == remote.size && u.end == size {
                return Plan::Append { offset: remote.size };
            }
            if u.start <= remote.size && size == remote.size.max(u.end) {
                return Plan::WriteRange(u);
            }
        }
    }
    if keep == 0 && caps.content_chunks && size > 0 {
        return Plan::Rewrite;
    }
    if sessions {
        return Plan::Session(ps);
    }
    Plan::Put
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ETag;
    use crate::write::staged::RemoteVersion;

    fn caps(partial: bool, chunks: bool) -> Capabilities {
        Capabilities {
            writes: true,
            server_side_copy: true,
            partial_writes: partial,
            content_chunks: chunks,
            ..Capabilities::read_only()
        }
    }

    fn modify(size: u64) -> (tempfile::TempDir, Staged) {
        let d = tempfile::tempdir().unwrap();
        let s = Staged::modify(
            d.path().join("s"),
            RemoteVersion {
                etag: ETag::new("\"v\""),
                size,
            },
        )
        .unwrap();
        (d, s)
    }

    const MIB: u64 = 1 << 20;

    #[test]
    fn an_append_is_an_append() {
        let (_d, mut s) = modify(256 * MIB);
        s.write(256 * MIB, &[1; 1024]).unwrap();
        assert_eq!(
            plan(&s, &caps(true, true), &PlanConfig::default()),
            Plan::Append { offset: 256 * MIB }
        );
        // Without partial writes: a session copying the old bytes on the server.
        assert_eq!(
            plan(&s, &caps(false, true), &PlanConfig::default()),
            Plan::Session(vec![
                Piece::Remote(0..256 * MIB),
                Piece::Local(256 * MIB..256 * MIB + 1024)
            ])
        );
    }

    #[test]
    fn an_overwrite_in_place_is_a_ranged_write_and_two_are_a_session() {
        let (_d, mut s) = modify(10 * MIB);
        s.write(4096, &[2; 4096]).unwrap();
        assert_eq!(
            plan(&s, &caps(true, true), &PlanConfig::default()),
            Plan::WriteRange(4096..8192)
        );
        s.write(9 * MIB, &[3; 10]).unwrap();
        assert_eq!(
            plan(&s, &caps(true, true), &PlanConfig::default()),
            Plan::Session(vec![
                Piece::Remote(0..4096),
                Piece::Local(4096..8192),
                Piece::Remote(8192..9 * MIB),
                Piece::Local(9 * MIB..9 * MIB + 10),
                Piece::Remote(9 * MIB + 10..10 * MIB),
            ])
        );
    }

    #[test]
    fn a_large_append_goes_in_parts() {
        let (_d, mut s) = modify(MIB);
        s.write(MIB, &vec![1; 20 * MIB as usize]).unwrap();
        assert_eq!(
            plan(&s, &caps(true, true), &PlanConfig::default()),
            Plan::Session(vec![Piece::Remote(0..MIB), Piece::Local(MIB..21 * MIB)])
        );
    }

    #[test]
    fn a_write_that_extends_from_inside_is_one_ranged_write() {
        let (_d, mut s) = modify(100);
        s.write(90, &[1; 30]).unwrap();
        assert_eq!(
            plan(&s, &caps(true, false), &PlanConfig::default()),
            Plan::WriteRange(90..120)
        );
    }

    #[test]
    fn truncations_alone_are_truncates() {
        let (_d, mut s) = modify(100);
        s.truncate(40).unwrap();
        assert_eq!(plan(&s, &caps(true, false), &PlanConfig::default()), Plan::Truncate(40));
        let (_d, mut s) = modify(100);
        s.truncate(150).unwrap();
        assert_eq!(
            plan(&s, &caps(true, false), &PlanConfig::default()),
            Plan::Truncate(150)
        );
        // Shrunk then grown: the gap is zeros, not the old bytes.
        let (_d, mut s) = modify(100);
        s.truncate(40).unwrap();
        s.truncate(150).unwrap();
        assert_eq!(
            plan(&s, &caps(true, false), &PlanConfig::default()),
            Plan::Session(vec![Piece::Remote(0..40), Piece::Zero(40..150)])
        );
    }

    #[test]
    fn a_full_rewrite_goes_by_content_defined_chunks() {
        let (_d, mut s) = modify(100 * MIB);
        s.truncate(0).unwrap();
        s.write(0, &vec![7; 3 * MIB as usize]).unwrap();
        assert_eq!(plan(&s, &caps(true, true), &PlanConfig::default()), Plan::Rewrite);
        assert_eq!(
            plan(&s, &caps(true, false), &PlanConfig::default()),
            Plan::Session(vec![Piece::Local(0..3 * MIB)])
        );
        let whole = PlanConfig {
            incremental: false,
            ..PlanConfig::default()
        };
        assert_eq!(plan(&s, &caps(true, true), &whole), Plan::Put);
        s.write(0, &vec![7; 30 * MIB as usize]).unwrap();
        assert_eq!(plan(&s, &caps(true, true), &whole), Plan::Parts);
    }

    #[test]
    fn new_files_are_put_or_chunked_by_size() {
        let d = tempfile::tempdir().unwrap();
        let mut s = Staged::create(d.path().join("n")).unwrap();
        s.write(0, &[1; 1000]).unwrap();
        assert_eq!(plan(&s, &caps(true, true), &PlanConfig::default()), Plan::Put);
        s.write(0, &vec![1; 20 * MIB as usize]).unwrap();
        assert_eq!(plan(&s, &caps(true, true), &PlanConfig::default()), Plan::Rewrite);
        assert_eq!(plan(&s, &caps(true, false), &PlanConfig::default()), Plan::Parts);
        // An empty new file is still created.
        let e = Staged::create(d.path().join("e")).unwrap();
        assert_eq!(plan(&e, &caps(true, true), &PlanConfig::default()), Plan::Put);
    }

    #[test]
    fn nothing_after_an_upload_or_without_changes() {
        let (_d, mut s) = modify(100);
        assert_eq!(plan(&s, &caps(true, true), &PlanConfig::default()), Plan::Nothing);
        s.write(0, b"x").unwrap();
        s.uploaded(RemoteVersion {
            etag: ETag::new("\"w\""),
            size: 100,
        });
        assert_eq!(plan(&s, &caps(true, true), &PlanConfig::default()), Plan::Nothing);
    }
}
