//! The query string of a request: which protocol operation (`afs=`) and its parameters.
//!
//! Owns parsing only; values are percent-decoded once (`+` stays a plus sign, so a name
//! with `+` round-trips), unknown parameters are ignored.

use percent_encoding::percent_decode_str;

use super::error::ServerError;
use crate::protocol::{LIST_DEFAULT_LIMIT, LIST_MAX_LIMIT, QUERY_KEY};

/// The protocol operation a request selects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// No `afs`: the file's bytes, or the listing of a folder.
    Plain,
    Info,
    Stats,
    List,
    Digests,
    Chunks,
    /// A folder's small files in one response.
    Bundle,
    HasChunks,
    Mkdir,
    Move,
    Append,
    Write,
    Truncate,
    Upload,
    Part,
    Commit,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub op: Op,
    /// Page size for listings, already capped at `LIST_MAX_LIMIT`.
    pub limit: usize,
    /// Exclusive start name for listings.
    pub after: Option<String>,
    /// `offset=` of `append` and `write`.
    pub offset: Option<u64>,
    /// `size=` of `truncate`.
    pub size: Option<u64>,
    /// `to=` of `move`: a request path, percent-decoded here once like every value (the
    /// path itself is checked by `paths`).
    pub to: Option<String>,
    /// `replace=false` of `move`.
    pub replace: bool,
    /// `upload=`, `part=`, `copy=A-B` and `chunk=HASH` of upload sessions.
    pub upload: Option<String>,
    pub part: Option<u32>,
    pub copy: Option<(u64, u64)>,
    pub chunk: Option<String>,
    /// `max_file=` and `max_total=` of `bundle`.
    pub max_file: Option<u64>,
    pub max_total: Option<u64>,
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Query, ServerError> {
        let mut q = Query {
            op: Op::Plain,
            limit: LIST_DEFAULT_LIMIT,
            after: None,
            offset: None,
            size: None,
            to: None,
            replace: true,
            upload: None,
            part: None,
            copy: None,
            chunk: None,
            max_file: None,
            max_total: None,
        };
        let Some(raw) = raw else {
            return Ok(q);
        };
        let mut op = None;
        for pair in raw.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode_str(value)
                .decode_utf8()
                .map_err(|_| ServerError::BadRequest(format!("query parameter {key} is not UTF-8")))?;
            match key {
                QUERY_KEY => {
                    op = Some(match &*value {
                        "info" => Op::Info,
                        "stats" => Op::Stats,
                        "list" => Op::List,
                        "digests" => Op::Digests,
                        "chunks" => Op::Chunks,
                        "bundle" => Op::Bundle,
                        "has-chunks" => Op::HasChunks,
                        "mkdir" => Op::Mkdir,
                        "move" => Op::Move,
                        "append" => Op::Append,
                        "write" => Op::Write,
                        "truncate" => Op::Truncate,
                        "upload" => Op::Upload,
                        "part" => Op::Part,
                        "commit" => Op::Commit,
                        other => {
                            return Err(ServerError::BadRequest(format!(
                                "unknown operation {QUERY_KEY}={other}"
                            )));
                        }
                    })
                }
                "limit" => {
                    q.limit = match value.parse::<usize>() {
                        Ok(0) | Err(_) => {
                            return Err(ServerError::BadRequest(format!(
                                "limit must be a positive integer, not {value:?}"
                            )));
                        }
                        Ok(n) => n.min(LIST_MAX_LIMIT),
                    }
                }
                "after" => q.after = Some(value.into_owned()),
                "offset" => q.offset = Some(number(key, &value)?),
                "size" => q.size = Some(number(key, &value)?),
                "to" => q.to = Some(value.into_owned()),
                "replace" => {
                    q.replace = match &*value {
                        "true" => true,
                        "false" => false,
                        _ => {
                            return Err(ServerError::BadRequest(format!(
                                "replace must be true or false, not {value:?}"
                            )));
                        }
                    }
                }
                "upload" => q.upload = Some(value.into_owned()),
                "part" => {
                    q.part = match number(key, &value)? {
                        n @ 1..=PART_MAX => Some(n as u32),
                        n => {
                            return Err(ServerError::BadRequest(format!(
                                "part must be 1 to {PART_MAX}, not {n}"
                            )));
                        }
                    }
                }
                "copy" => {
                    let range = value
                        .split_once('-')
                        .and_then(|(a, b)| Some((digits(a)?, digits(b)?)))
                        .filter(|(a, b)| a <= b);
                    q.copy = Some(range.ok_or_else(|| {
                        ServerError::BadRequest(format!("copy must be A-B with A <= B, not {value:?}"))
                    })?);
                }
                "chunk" => q.chunk = Some(value.into_owned()),
                "max_file" => q.max_file = Some(number(key, &value)?),
                "max_total" => q.max_total = Some(number(key, &value)?),
                _ => {}
            }
        }
        q.op = op.unwrap_or(Op::Plain);
        Ok(q)
    }
}

/// Highest part number of an upload session.
pub const PART_MAX: u64 = 10_000;

/// ASCII digits only, fitting in a u64.
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn number(key: &str, value: &str) -> Result<u64, ServerError> {
    digits(value).ok_or_else(|| ServerError::BadRequest(format!("{key} must be a non-negative integer, not {value:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_operations_and_parameters() {
        assert_eq!(Query::parse(None).unwrap().op, Op::Plain);
        assert_eq!(Query::parse(Some("afs=info")).unwrap().op, Op::Info);
        let q = Query::parse(Some("afs=list&limit=20000&after=a%20b%2Bc+d")).unwrap();
        assert_eq!(q.op, Op::List);
        assert_eq!(q.limit, LIST_MAX_LIMIT);
        assert_eq!(q.after.as_deref(), Some("a b+c+d"));
        assert_eq!(Query::parse(Some("afs=list")).unwrap().limit, LIST_DEFAULT_LIMIT);
        assert_eq!(Query::parse(Some("x=1&afs=digests")).unwrap().op, Op::Digests);
        let q = Query::parse(Some("afs=part&upload=ab&part=10000&copy=0-99&chunk=c")).unwrap();
        assert_eq!(q.op, Op::Part);
        assert_eq!(
            (q.upload.as_deref(), q.part, q.copy, q.chunk.as_deref()),
            (Some("ab"), Some(10_000), Some((0, 99)), Some("c"))
        );
        let q = Query::parse(Some("afs=move&to=%2Fa%20b%2Fc&replace=false")).unwrap();
        assert_eq!((q.op, q.to.as_deref(), q.replace), (Op::Move, Some("/a b/c"), false));
        assert!(Query::parse(Some("afs=move")).unwrap().replace);
        let q = Query::parse(Some("afs=append&offset=12")).unwrap();
        assert_eq!((q.op, q.offset), (Op::Append, Some(12)));
        assert_eq!(Query::parse(Some("afs=truncate&size=0")).unwrap().size, Some(0));
        assert_eq!(Query::parse(Some("afs=has-chunks")).unwrap().op, Op::HasChunks);
    }

    #[test]
    fn refuses_unknown_operations_and_bad_limits() {
        for raw in [
            "afs=nope",
            "afs=",
            "afs=list&limit=0",
            "afs=list&limit=-1",
            "limit=x",
            "afs=append&offset=-1",
            "afs=append&offset=+1",
            "afs=truncate&size=1e3",
            "afs=part&part=0",
            "afs=part&part=10001",
            "afs=part&copy=5-4",
            "afs=part&copy=5",
            "afs=move&replace=no",
        ] {
            let e = Query::parse(Some(raw)).unwrap_err();
            assert_eq!(e.code(), "bad_request", "{raw}");
        }
    }
}
