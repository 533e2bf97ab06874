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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Query {
    pub op: Op,
    /// Page size for listings, already capped at `LIST_MAX_LIMIT`.
    pub limit: usize,
    /// Exclusive start name for listings.
    pub after: Option<String>,
}

impl Query {
    pub fn parse(raw: Option<&str>) -> Result<Query, ServerError> {
        let mut q = Query {
            op: Op::Plain,
            limit: LIST_DEFAULT_LIMIT,
            after: None,
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
                _ => {}
            }
        }
        q.op = op.unwrap_or(Op::Plain);
        Ok(q)
    }
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
    }

    #[test]
    fn refuses_unknown_operations_and_bad_limits() {
        for raw in ["afs=nope", "afs=", "afs=list&limit=0", "afs=list&limit=-1", "limit=x"] {
            let e = Query::parse(Some(raw)).unwrap_err();
            assert_eq!(e.code(), "bad_request", "{raw}");
        }
    }
}
