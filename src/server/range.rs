//! `Range` and conditional-request evaluation (RFC 9110 §13 and §14), as pure functions.
//!
//! Owns the decision "200, 206, 304, 412 or 416" from request headers and the file's
//! validators; knows nothing of files, sockets or bodies, so every form is unit-tested here.

use http::{HeaderMap, header};

/// What the conditionals are compared against: the file's strong tag and its mtime in whole
/// seconds (the precision of `Last-Modified`).
#[derive(Debug, Clone, Copy)]
pub struct Validators<'a> {
    /// The entity tag without quotes.
    pub etag: &'a str,
    pub last_modified_secs: i64,
}

/// Outcome of the precondition headers (steps 1–4 of RFC 9110 §13.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precondition {
    Proceed,
    NotModified,
    Failed,
}

/// Outcome of `Range` (after `If-Range`) for a representation of `size` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeOutcome {
    /// Send the whole representation with `200`.
    Full,
    /// Send bytes `start..=end` with `206`.
    Partial { start: u64, end: u64 },
    /// `416` with `Content-Range: bytes */size`.
    Unsatisfiable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum TagList {
    Any,
    Tags(Vec<EntityTag>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct EntityTag {
    weak: bool,
    opaque: String,
}

/// Parses `*` or a comma-separated list of entity tags; a malformed element ends the list
/// (what was parsed before it still counts).
fn parse_tag_list(value: &str) -> TagList {
    let value = value.trim();
    if value == "*" {
        return TagList::Any;
    }
    let mut tags = Vec::new();
    let mut rest = value;
    loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            break;
        }
        match parse_tag(rest) {
            Some((tag, after)) => {
                tags.push(tag);
                rest = after;
            }
            None => break,
        }
    }
    TagList::Tags(tags)
}

/// Parses one entity tag at the start of `s`; returns it and the rest of `s`.
fn parse_tag(s: &str) -> Option<(EntityTag, &str)> {
    let (weak, s) = match s.strip_prefix("W/") {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let s = s.strip_prefix('"')?;
    let end = s.find('"')?;
    let tag = EntityTag {
        weak,
        opaque: s[..end].to_string(),
    };
    Some((tag, &s[end + 1..]))
}

/// Every value of a header joined as one list (a list header may be sent on several lines).
fn joined(headers: &HeaderMap, name: &header::HeaderName) -> Option<String> {
    let mut out: Option<String> = None;
    for v in headers.get_all(name) {
        let s = v.to_str().ok()?;
        match &mut out {
            Some(o) => {
                o.push(',');
                o.push_str(s);
            }
            None => out = Some(s.to_string()),
        }
    }
    out
}

fn http_date_secs(headers: &HeaderMap, name: &header::HeaderName) -> Option<i64> {
    let s = headers.get(name)?.to_str().ok()?;
    parse_http_date_secs(s)
}

fn parse_http_date_secs(s: &str) -> Option<i64> {
    let t = httpdate::parse_http_date(s.trim()).ok()?;
    let secs = t.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    i64::try_from(secs).ok()
}

/// Strong comparison: both tags strong and equal (used by `If-Match` and `If-Range`).
fn strong_match(list: &TagList, etag: &str) -> bool {
    match list {
        TagList::Any => true,
        TagList::Tags(tags) => tags.iter().any(|t| !t.weak && t.opaque == etag),
    }
}

/// Weak comparison: opaque parts equal, weakness ignored (used by `If-None-Match`).
fn weak_match(list: &TagList, etag: &str) -> bool {
    match list {
        TagList::Any => true,
        TagList::Tags(tags) => tags.iter().any(|t| t.opaque == etag),
    }
}

/// Steps 1–4 of RFC 9110 §13.2.2 for a `GET` or `HEAD` of an existing representation.
pub fn evaluate_preconditions(headers: &HeaderMap, v: &Validators<'_>) -> Precondition {
    if let Some(im) = joined(headers, &header::IF_MATCH) {
        if !strong_match(&parse_tag_list(&im), v.etag) {
            return Precondition::Failed;
        }
    } else if let Some(date) = http_date_secs(headers, &header::IF_UNMODIFIED_SINCE)
        && v.last_modified_secs > date
    {
        return Precondition::Failed;
    }
    if let Some(inm) = joined(headers, &header::IF_NONE_MATCH) {
        if weak_match(&parse_tag_list(&inm), v.etag) {
            return Precondition::NotModified;
        }
    } else if let Some(date) = http_date_secs(headers, &header::IF_MODIFIED_SINCE)
        && v.last_modified_secs <= date
    {
        return Precondition::NotModified;
    }
    Precondition::Proceed
}

/// Whether the write preconditions need the current file's tag (computing it may mean hashing
/// the file, so it is skipped when only `If-None-Match: *` or nothing was sent).
pub fn write_needs_tag(headers: &HeaderMap) -> bool {
    headers.contains_key(header::IF_MATCH)
        || headers.contains_key(header::IF_UNMODIFIED_SINCE)
        || joined(headers, &header::IF_NONE_MATCH).is_some_and(|v| parse_tag_list(&v) != TagList::Any)
}

/// Steps 1–3 of RFC 9110 §13.2.2 for a write: `current` is the file at the path (`None` when
/// nothing is there; a folder has no tag and so never matches a tag). Returns whether the
/// write may proceed (otherwise `412`).
pub fn write_preconditions_pass(headers: &HeaderMap, current: Option<&Validators<'_>>) -> bool {
    if let Some(im) = joined(headers, &header::IF_MATCH) {
        match current {
            Some(v) if !v.etag.is_empty() && strong_match(&parse_tag_list(&im), v.etag) => {}
            _ => return false,
        }
    } else if let Some(date) = http_date_secs(headers, &header::IF_UNMODIFIED_SINCE)
        && current.is_some_and(|v| v.last_modified_secs > date)
    {
        return false;
    }
    if let Some(inm) = joined(headers, &header::IF_NONE_MATCH)
        && let Some(v) = current
        && (parse_tag_list(&inm) == TagList::Any || (!v.etag.is_empty() && weak_match(&parse_tag_list(&inm), v.etag)))
    {
        return false;
    }
    true
}

/// Whether `If-None-Match` matches `etag` (weak comparison); for listings, which have no
/// other validator.
pub fn none_match(headers: &HeaderMap, etag: &str) -> bool {
    joined(headers, &header::IF_NONE_MATCH).is_some_and(|inm| weak_match(&parse_tag_list(&inm), etag))
}

/// Step 5 (`If-Range`) and the `Range` header of a `GET`; call only after the preconditions
/// said [`Precondition::Proceed`].
pub fn evaluate_range(headers: &HeaderMap, size: u64, v: &Validators<'_>) -> RangeOutcome {
    let Some(range) = headers.get(header::RANGE) else {
        return RangeOutcome::Full;
    };
    let Ok(range) = range.to_str() else {
        return RangeOutcome::Full;
    };
    if let Some(if_range) = headers.get(header::IF_RANGE) {
        let matches = if_range.to_str().is_ok_and(|s| if_range_matches(s, v));
        if !matches {
            return RangeOutcome::Full;
        }
    }
    parse_range(range, size)
}

/// `If-Range`: a strong tag equal to ours, or a date equal to `Last-Modified`.
fn if_range_matches(value: &str, v: &Validators<'_>) -> bool {
    let value = value.trim();
    if value.starts_with('"') || value.starts_with("W/") {
        return match parse_tag(value) {
            Some((tag, rest)) if rest.trim().is_empty() => !tag.weak && tag.opaque == v.etag,
            _ => false,
        };
    }
    parse_http_date_secs(value) == Some(v.last_modified_secs)
}

/// Parses a `Range` header value against a representation of `size` bytes. Only one range is
/// served; several ranges or bad syntax give [`RangeOutcome::Full`].
pub fn parse_range(value: &str, size: u64) -> RangeOutcome {
    let value = value.trim();
    let Some((unit, set)) = value.split_once('=') else {
        return RangeOutcome::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return RangeOutcome::Full;
    }
    let mut specs = set.split(',').map(str::trim).filter(|s| !s.is_empty());
    let (Some(spec), None) = (specs.next(), specs.next()) else {
        return RangeOutcome::Full;
    };
    let Some((first, last)) = spec.split_once('-') else {
        return RangeOutcome::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    if first.is_empty() {
        // Suffix range `-n`: the last n bytes.
        let Some(n) = parse_digits(last) else {
            return RangeOutcome::Full;
        };
        if n == 0 || size == 0 {
            return RangeOutcome::Unsatisfiable;
        }
        let n = n.min(u128::from(size)) as u64;
        return RangeOutcome::Partial {
            start: size - n,
            end: size - 1,
        };
    }
    let Some(start) = parse_digits(first) else {
        return RangeOutcome::Full;
    };
    let end = if last.is_empty() {
        None
    } else {
        match parse_digits(last) {
            Some(e) if e >= start => Some(e),
            _ => return RangeOutcome::Full,
        }
    };
    if start >= u128::from(size) {
        return RangeOutcome::Unsatisfiable;
    }
    let end = end.map_or(size - 1, |e| e.min(u128::from(size - 1)) as u64);
    RangeOutcome::Partial {
        start: start as u64,
        end,
    }
}

/// ASCII digits only (no sign, no spaces); values past u64 stay comparable as u128, and longer
/// numbers saturate, which keeps "past the end" meaning past the end.
fn parse_digits(s: &str) -> Option<u128> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.parse::<u128>().unwrap_or(u128::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    use RangeOutcome::{Full, Partial, Unsatisfiable};

    const TAG: &str = "0123abcd";
    const LM: i64 = 1_700_000_000;

    fn v() -> Validators<'static> {
        Validators {
            etag: TAG,
            last_modified_secs: LM,
        }
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, val) in pairs {
            h.append(k.clone(), HeaderValue::from_str(val).unwrap());
        }
        h
    }

    fn date(secs: i64) -> String {
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64))
    }

    fn pre(pairs: &[(header::HeaderName, &str)]) -> Precondition {
        evaluate_preconditions(&headers(pairs), &v())
    }

    #[test]
    fn range_forms() {
        assert_eq!(parse_range("bytes=0-9", 100), Partial { start: 0, end: 9 });
        assert_eq!(parse_range("bytes=10-", 100), Partial { start: 10, end: 99 });
        assert_eq!(parse_range("bytes=-10", 100), Partial { start: 90, end: 99 });
        assert_eq!(parse_range("bytes=-1000", 100), Partial { start: 0, end: 99 });
        assert_eq!(parse_range("bytes=5-5", 100), Partial { start: 5, end: 5 });
        assert_eq!(parse_range("bytes=99-99", 100), Partial { start: 99, end: 99 });
        assert_eq!(parse_range(" Bytes = 1-2 ", 100), Partial { start: 1, end: 2 });
        assert_eq!(parse_range("bytes=1-2,", 100), Partial { start: 1, end: 2 });
    }

    #[test]
    fn overlong_end_is_clamped() {
        assert_eq!(parse_range("bytes=50-1000", 100), Partial { start: 50, end: 99 });
        assert_eq!(
            parse_range("bytes=0-99999999999999999999999999999999999999999", 100),
            Partial { start: 0, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=-99999999999999999999999999999", 100),
            Partial { start: 0, end: 99 }
        );
    }

    #[test]
    fn start_past_end_is_unsatisfiable() {
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=100-200", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=99999999999999999999999-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
    }

    #[test]
    fn every_range_of_an_empty_file_is_unsatisfiable() {
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-0", 0), Unsatisfiable);
        assert_eq!(parse_range("bytes=-5", 0), Unsatisfiable);
    }

    #[test]
    fn multi_range_and_bad_syntax_send_everything() {
        for bad in [
            "bytes=0-1,5-6",
            "bytes=0-1, -5",
            "bytes=5-1",
            "bytes=a-b",
            "bytes=-",
            "bytes=",
            "bytes=1",
            "bytes=+1-2",
            "bytes=1--2",
            "items=0-1",
            "0-1",
            "",
        ] {
            assert_eq!(parse_range(bad, 100), Full, "{bad:?}");
        }
    }

    #[test]
    fn if_match_uses_strong_comparison() {
        use header::IF_MATCH;
        assert_eq!(pre(&[(IF_MATCH, "\"0123abcd\"")]), Precondition::Proceed);
        assert_eq!(pre(&[(IF_MATCH, "\"x\", \"0123abcd\"")]), Precondition::Proceed);
        assert_eq!(pre(&[(IF_MATCH, "\"x\"")]), Precondition::Failed);
        assert_eq!(pre(&[(IF_MATCH, "W/\"0123abcd\"")]), Precondition::Failed);
        assert_eq!(pre(&[(IF_MATCH, "*")]), Precondition::Proceed);
        assert_eq!(pre(&[(IF_MATCH, "garbage")]), Precondition::Failed);
        // A list spread over two header lines.
        assert_eq!(
            pre(&[(IF_MATCH, "\"x\""), (IF_MATCH, "\"0123abcd\"")]),
            Precondition::Proceed
        );
    }

    #[test]
    fn if_none_match_uses_weak_comparison() {
        use header::IF_NONE_MATCH;
        assert_eq!(pre(&[(IF_NONE_MATCH, "\"0123abcd\"")]), Precondition::NotModified);
        assert_eq!(pre(&[(IF_NONE_MATCH, "W/\"0123abcd\"")]), Precondition::NotModified);
        assert_eq!(
            pre(&[(IF_NONE_MATCH, "\"a\",W/\"0123abcd\"")]),
            Precondition::NotModified
        );
        assert_eq!(pre(&[(IF_NONE_MATCH, "*")]), Precondition::NotModified);
        assert_eq!(pre(&[(IF_NONE_MATCH, "\"other\"")]), Precondition::Proceed);
    }

    #[test]
    fn write_preconditions() {
        use header::{IF_MATCH, IF_NONE_MATCH};
        let pass = |pairs: &[(header::HeaderName, &str)], cur: Option<&Validators<'_>>| {
            write_preconditions_pass(&headers(pairs), cur)
        };
        let folder = Validators {
            etag: "",
            last_modified_secs: LM,
        };
        assert!(pass(&[], None));
        assert!(pass(&[], Some(&v())));
        assert!(pass(&[(IF_MATCH, "\"0123abcd\"")], Some(&v())));
        assert!(pass(&[(IF_MATCH, "*")], Some(&v())));
        assert!(!pass(&[(IF_MATCH, "*")], None));
        assert!(!pass(&[(IF_MATCH, "\"x\"")], Some(&v())));
        assert!(!pass(&[(IF_MATCH, "W/\"0123abcd\"")], Some(&v())));
        assert!(!pass(&[(IF_MATCH, "\"\"")], Some(&folder)));
        assert!(pass(&[(IF_NONE_MATCH, "*")], None));
        assert!(!pass(&[(IF_NONE_MATCH, "*")], Some(&v())));
        assert!(!pass(&[(IF_NONE_MATCH, "*")], Some(&folder)));
        assert!(!pass(&[(IF_NONE_MATCH, "\"0123abcd\"")], Some(&v())));
        assert!(pass(&[(IF_NONE_MATCH, "\"other\"")], Some(&v())));
        assert!(!write_needs_tag(&headers(&[(IF_NONE_MATCH, "*")])));
        assert!(write_needs_tag(&headers(&[(IF_NONE_MATCH, "\"a\"")])));
        assert!(write_needs_tag(&headers(&[(IF_MATCH, "*")])));
    }

    #[test]
    fn dates() {
        use header::{IF_MODIFIED_SINCE, IF_UNMODIFIED_SINCE};
        assert_eq!(pre(&[(IF_MODIFIED_SINCE, &date(LM))]), Precondition::NotModified);
        assert_eq!(pre(&[(IF_MODIFIED_SINCE, &date(LM + 5))]), Precondition::NotModified);
        assert_eq!(pre(&[(IF_MODIFIED_SINCE, &date(LM - 1))]), Precondition::Proceed);
        assert_eq!(pre(&[(IF_MODIFIED_SINCE, "not a date")]), Precondition::Proceed);
        assert_eq!(pre(&[(IF_UNMODIFIED_SINCE, &date(LM))]), Precondition::Proceed);
        assert_eq!(pre(&[(IF_UNMODIFIED_SINCE, &date(LM - 1))]), Precondition::Failed);
        assert_eq!(pre(&[(IF_UNMODIFIED_SINCE, "junk")]), Precondition::Proceed);
    }

    #[test]
    fn evaluation_order() {
        use header::{IF_MATCH, IF_MODIFIED_SINCE, IF_NONE_MATCH, IF_UNMODIFIED_SINCE};
        // If-Unmodified-Since is ignored when If-Match is present.
        assert_eq!(
            pre(&[(IF_MATCH, "\"0123abcd\""), (IF_UNMODIFIED_SINCE, &date(LM - 10))]),
            Precondition::Proceed
        );
        // If-Match failing wins over If-None-Match matching.
        assert_eq!(
            pre(&[(IF_MATCH, "\"no\""), (IF_NONE_MATCH, "\"0123abcd\"")]),
            Precondition::Failed
        );
        // If-Modified-Since is ignored when If-None-Match is present.
        assert_eq!(
            pre(&[(IF_NONE_MATCH, "\"other\""), (IF_MODIFIED_SINCE, &date(LM + 10))]),
            Precondition::Proceed
        );
        assert_eq!(
            pre(&[(IF_UNMODIFIED_SINCE, &date(LM - 1)), (IF_NONE_MATCH, "*")]),
            Precondition::Failed
        );
    }

    #[test]
    fn if_range() {
        let range = (header::RANGE, "bytes=0-9");
        let eval = |ir: &str| evaluate_range(&headers(&[range.clone(), (header::IF_RANGE, ir)]), 100, &v());
        let part = Partial { start: 0, end: 9 };
        assert_eq!(eval("\"0123abcd\""), part);
        assert_eq!(eval("\"other\""), Full);
        assert_eq!(eval("W/\"0123abcd\""), Full);
        assert_eq!(eval(&date(LM)), part);
        assert_eq!(eval(&date(LM + 1)), Full);
        assert_eq!(eval(&date(LM - 1)), Full);
        assert_eq!(eval("junk"), Full);
        assert_eq!(evaluate_range(&headers(std::slice::from_ref(&range)), 100, &v()), part);
        assert_eq!(evaluate_range(&headers(&[]), 100, &v()), Full);
        // If-Range without Range changes nothing.
        assert_eq!(
            evaluate_range(&headers(&[(header::IF_RANGE, "\"x\"")]), 100, &v()),
            Full
        );
    }
}
