//! Directory listings of plain web servers, in the three forms they come in: a WebDAV
//! `PROPFIND` multistatus (RFC 4918), nginx's JSON autoindex, and HTML index pages (nginx,
//! Apache). Pure parsers: bytes in, entries out, so each form is tested on captured answers.

use std::time::{SystemTime, UNIX_EPOCH};

use percent_encoding::percent_decode_str;
use quick_xml::events::Event;
use quick_xml::name::{Namespace, ResolveResult};
use quick_xml::reader::NsReader;

use crate::protocol::EntryKind;

/// One entry as a listing described it. `size` is `None` when the listing did not give an
/// exact size (the caller asks with `HEAD`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub name: String,
    pub kind: EntryKind,
    pub size: Option<u64>,
    pub mtime: Option<SystemTime>,
    pub etag: Option<String>,
}

/// The request body of a `PROPFIND` asking for what a listing needs.
pub const PROPFIND_BODY: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<D:propfind xmlns:D="DAV:"><D:prop><D:resourcetype/><D:getcontentlength/><D:getlastmodified/><D:getetag/></D:prop></D:propfind>"#;

const DAV: Namespace<'static> = Namespace("DAV:");

/// The DAV elements the parser cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tag {
    Response,
    Href,
    Propstat,
    Status,
    Collection,
    Length,
    Modified,
    Etag,
    Other,
}

fn tag_of(local: &str) -> Tag {
    match local {
        "response" => Tag::Response,
        "href" => Tag::Href,
        "propstat" => Tag::Propstat,
        "status" => Tag::Status,
        "collection" => Tag::Collection,
        "getcontentlength" => Tag::Length,
        "getlastmodified" => Tag::Modified,
        "getetag" => Tag::Etag,
        _ => Tag::Other,
    }
}

#[derive(Debug, Default)]
struct Response {
    href: String,
    collection: bool,
    length: Option<u64>,
    modified: Option<SystemTime>,
    etag: Option<String>,
}

#[derive(Debug, Default)]
struct Propstat {
    ok: bool,
    collection: bool,
    length: Option<u64>,
    modified: Option<SystemTime>,
    etag: Option<String>,
}

/// Parses a `207 Multi-Status` answer to a `Depth: 1` `PROPFIND` of the folder whose URL
/// path is `dir_path` (percent-encoded, ending in `/`). The folder's own entry is left out,
/// and so is any href that is not a direct child of it (logged).
pub fn parse_multistatus(xml: &str, dir_path: &str) -> Result<Vec<Found>, String> {
    let mut reader = NsReader::from_str(xml);
    let mut responses = Vec::new();
    let mut stack: Vec<Tag> = Vec::new();
    let mut text = String::new();
    let mut resp = Response::default();
    let mut ps = Propstat::default();
    loop {
        let (ns, ev) = reader
            .read_resolved_event()
            .map_err(|e| format!("bad PROPFIND XML: {e}"))?;
        let dav = matches!(ns, ResolveResult::Bound(n) if n == DAV);
        match ev {
            Event::Start(e) => {
                let t = if dav {
                    tag_of(e.local_name().as_ref())
                } else {
                    Tag::Other
                };
                match t {
                    Tag::Response => resp = Response::default(),
                    Tag::Propstat => ps = Propstat::default(),
                    Tag::Collection => ps.collection = true,
                    _ => {}
                }
                stack.push(t);
                text.clear();
            }
            Event::Empty(e) if dav && tag_of(e.local_name().as_ref()) == Tag::Collection => {
                ps.collection = true;
            }
            Event::Text(t) => text.push_str(&t.xml10_content()),
            Event::CData(t) => text.push_str(&t),
            Event::GeneralRef(r) => match r.resolve_char_ref() {
                Ok(Some(c)) => text.push(c),
                _ => match quick_xml::escape::resolve_predefined_entity(&r) {
                    Some(s) => text.push_str(s),
                    None => return Err(format!("bad PROPFIND XML: unknown entity &{};", &*r)),
                },
            },
            Event::End(_) => {
                let t = stack.pop().unwrap_or(Tag::Other);
                let value = text.trim();
                match t {
                    Tag::Href => resp.href = value.to_string(),
                    Tag::Status => ps.ok = status_ok(value),
                    Tag::Length => ps.length = value.parse().ok(),
                    Tag::Modified => ps.modified = httpdate::parse_http_date(value).ok(),
                    Tag::Etag if !value.is_empty() => ps.etag = Some(value.to_string()),
                    Tag::Propstat if ps.ok => {
                        resp.collection |= ps.collection;
                        resp.length = resp.length.or(ps.length);
                        resp.modified = resp.modified.or(ps.modified);
                        resp.etag = resp.etag.take().or(ps.etag.take());
                    }
                    Tag::Response => responses.push(std::mem::take(&mut resp)),
                    _ => {}
                }
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let dir = decode_path(dir_path);
    let mut out = Vec::new();
    for r in responses {
        let path = decode_path(href_path(&r.href));
        if path.trim_end_matches('/') == dir.trim_end_matches('/') {
            continue;
        }
        let Some(name) = child_name(&dir, &path) else {
            tracing::warn!(href = %r.href, dir = %dir, "a PROPFIND entry outside the folder, left out");
            continue;
        };
        out.push(Found {
            name,
            kind: if r.collection { EntryKind::Dir } else { EntryKind::File },
            size: if r.collection { Some(0) } else { r.length },
            mtime: r.modified,
            etag: r.etag,
        });
    }
    Ok(out)
}

fn status_ok(line: &str) -> bool {
    // "HTTP/1.1 200 OK"
    line.split_whitespace().nth(1).is_some_and(|c| c.starts_with('2'))
}

/// The path of an href, which may be a full URL or an absolute path.
fn href_path(href: &str) -> &str {
    match href.find("://") {
        Some(i) => {
            let rest = &href[i + 3..];
            rest.find('/').map_or("/", |j| &rest[j..])
        }
        None => href,
    }
}

fn decode_path(p: &str) -> String {
    percent_decode_str(p).decode_utf8_lossy().into_owned()
}

/// `path`'s name when it is a direct child of folder `dir` (both decoded).
fn child_name(dir: &str, path: &str) -> Option<String> {
    let dir = if dir.ends_with('/') {
        dir.to_string()
    } else {
        format!("{dir}/")
    };
    let rest = path.strip_prefix(&dir)?.trim_end_matches('/');
    (!rest.is_empty() && !rest.contains('/')).then(|| rest.to_string())
}

#[derive(Debug, serde::Deserialize)]
struct JsonEntry {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    mtime: Option<String>,
    #[serde(default)]
    size: Option<u64>,
}

/// Parses nginx's `autoindex_format json` listing. Entries of type `other` (devices,
/// sockets) are left out.
pub fn parse_nginx_json(body: &[u8]) -> Result<Vec<Found>, String> {
    let entries: Vec<JsonEntry> = serde_json::from_slice(body).map_err(|e| format!("bad JSON index: {e}"))?;
    Ok(entries
        .into_iter()
        .filter_map(|e| {
            let kind = match e.kind.as_str() {
                "directory" => EntryKind::Dir,
                "file" => EntryKind::File,
                _ => return None,
            };
            Some(Found {
                name: e.name,
                kind,
                size: if kind == EntryKind::Dir { Some(0) } else { e.size },
                mtime: e.mtime.as_deref().and_then(|m| httpdate::parse_http_date(m).ok()),
                etag: None,
            })
        })
        .collect())
}

/// Parses an HTML index page: every link to a direct child (`name` or `name/`, relative, no
/// query) is an entry; names come from the href, not the (possibly shortened) link text.
/// nginx's default format puts the exact size after the link; other formats round sizes
/// ("1.2K"), so those entries carry no size.
pub fn parse_html_index(html: &str) -> Vec<Found> {
    let mut out: Vec<Found> = Vec::new();
    let lower = html.to_ascii_lowercase();
    let mut pos = 0;
    while let Some(i) = lower[pos..].find("<a ") {
        let start = pos + i;
        let Some(tag_end) = lower[start..].find('>').map(|j| start + j) else {
            break;
        };
        pos = tag_end + 1;
        let Some(href) = attr(&html[start..tag_end], &lower[start..tag_end], "href") else {
            continue;
        };
        let Some((name, dir)) = index_link(&href) else { continue };
        if out.iter().any(|f| f.name == name) {
            continue;
        }
        // What follows the link up to the end of the line: nginx's "date time size".
        let close = lower[pos..].find("</a>").map_or(pos, |j| pos + j + 4);
        let line_end = html[close..].find(['\n', '<']).map_or(html.len(), |j| close + j);
        let tail: Vec<&str> = html[close..line_end].split_whitespace().collect();
        let size = match (dir, tail.as_slice()) {
            (true, _) => Some(0),
            (false, [_, _, n]) => n.parse().ok(),
            _ => None,
        };
        let mtime = match tail.as_slice() {
            [d, t, _] => parse_index_time(d, t),
            _ => None,
        };
        out.push(Found {
            name,
            kind: if dir { EntryKind::Dir } else { EntryKind::File },
            size,
            mtime,
            etag: None,
        });
    }
    out
}

/// The value of attribute `name` in the tag text `tag` (`lower` is the same, lowercased).
fn attr(tag: &str, lower: &str, name: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = lower[from..].find(name) {
        let at = from + i;
        from = at + name.len();
        let before_ok = at > 0 && lower.as_bytes()[at - 1].is_ascii_whitespace();
        let rest = lower[from..].trim_start();
        if !before_ok || !rest.starts_with('=') {
            continue;
        }
        let vstart = tag.len() - rest.len() + 1;
        let v = tag[vstart..].trim_start();
        let value = match v.chars().next()? {
            q @ ('"' | '\'') => &v[1..][..v[1..].find(q)?],
            _ => v.split(|c: char| c.is_whitespace()).next()?,
        };
        return Some(quick_xml::escape::unescape(value).map_or_else(|_| value.to_string(), |c| c.into_owned()));
    }
    None
}

/// A link of an index page to a direct child: its decoded name and whether it is a folder.
fn index_link(href: &str) -> Option<(String, bool)> {
    if href.is_empty() || href.starts_with(['/', '?', '#']) || href.contains("://") || href.contains('?') {
        return None;
    }
    let (seg, dir) = match href.strip_suffix('/') {
        Some(s) => (s, true),
        None => (href, false),
    };
    if seg.is_empty() || seg.contains('/') {
        return None;
    }
    let name = percent_decode_str(seg).decode_utf8().ok()?.into_owned();
    if name.contains('/') || name == "." || name == ".." {
        return None;
    }
    Some((name, dir))
}

/// nginx's `23-Nov-2026 06:44` (UTC, minutes).
fn parse_index_time(date: &str, time: &str) -> Option<SystemTime> {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let mut d = date.split('-');
    let day: i64 = d.next()?.parse().ok()?;
    let mon = d.next()?;
    let month = MONTHS.iter().position(|m| *m == mon)? as i64 + 1;
    let year: i64 = d.next()?.parse().ok()?;
    let (h, m) = time.split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    if !(1..=31).contains(&day) || !(0..24).contains(&h) || !(0..60).contains(&m) {
        return None;
    }
    let secs = days_from_civil(year, month, day) * 86_400 + h * 3600 + m * 60;
    (secs > 0).then(|| UNIX_EPOCH + std::time::Duration::from_secs(secs as u64))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    // Captured from nginx 1.22 with the dav_ext module (no getetag).
    const NGINX_PROPFIND: &str = r#"<?xml version="1.0" encoding="utf-8" ?>
<D:multistatus xmlns:D="DAV:">
<D:response>
<D:href>/pre/</D:href>
<D:propstat><D:prop><D:displayname>/</D:displayname>
<D:getlastmodified>Mon, 23 Nov 2026 06:44:16 GMT</D:getlastmodified>
<D:resourcetype><D:collection/></D:resourcetype><D:lockdiscovery/><D:supportedlock>
</D:supportedlock></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat>
</D:response>
<D:response>
<D:href>/pre/sp%20ace/</D:href>
<D:propstat><D:prop><D:displayname>sp ace</D:displayname>
<D:getlastmodified>Mon, 23 Nov 2026 06:44:16 GMT</D:getlastmodified>
<D:resourcetype><D:collection/></D:resourcetype></D:prop>
<D:status>HTTP/1.1 200 OK</D:status></D:propstat>
</D:response>
<D:response>
<D:href>/pre/a%26b.txt</D:href>
<D:propstat><D:prop><D:displayname>a&amp;b.txt</D:displayname>
<D:getcontentlength>6</D:getcontentlength>
<D:getlastmodified>Mon, 23 Nov 2026 06:44:16 GMT</D:getlastmodified>
<D:resourcetype></D:resourcetype></D:prop>
<D:status>HTTP/1.1 200 OK</D:status></D:propstat>
</D:response>
</D:multistatus>"#;

    // Captured from Apache 2.4 mod_dav_fs: other prefixes, getetag, full-URL-free hrefs.
    const APACHE_PROPFIND: &str = r#"<?xml version="1.0" encoding="utf-8"?>
<D:multistatus xmlns:D="DAV:">
<D:response xmlns:lp2="http://apache.org/dav/props/" xmlns:lp1="DAV:">
<D:href>/</D:href>
<D:propstat><D:prop><lp1:resourcetype><D:collection/></lp1:resourcetype>
<lp1:getetag>"1000-660ebf18b4495"</lp1:getetag></D:prop>
<D:status>HTTP/1.1 200 OK</D:status></D:propstat>
</D:response>
<D:response xmlns:lp2="http://apache.org/dav/props/" xmlns:lp1="DAV:">
<D:href>http://127.0.0.1:18081/a.txt</D:href>
<D:propstat><D:prop><lp1:resourcetype/>
<lp1:getcontentlength>6</lp1:getcontentlength>
<lp1:getlastmodified>Mon, 23 Nov 2026 06:45:46 GMT</lp1:getlastmodified>
<lp1:getetag>"6-660ebf18b4495"</lp1:getetag><lp2:executable>F</lp2:executable>
</D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat>
<D:propstat><D:prop><D:quota/></D:prop><D:status>HTTP/1.1 404 Not Found</D:status></D:propstat>
</D:response>
<D:response><D:href>/elsewhere/x</D:href>
<D:propstat><D:prop><D:resourcetype/></D:prop><D:status>HTTP/1.1 200 OK</D:status></D:propstat>
</D:response>
</D:multistatus>"#;

    #[test]
    fn nginx_multistatus() {
        let got = parse_multistatus(NGINX_PROPFIND, "/pre/").unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].name, "sp ace");
        assert_eq!(got[0].kind, EntryKind::Dir);
        assert_eq!(got[1].name, "a&b.txt");
        assert_eq!(got[1].kind, EntryKind::File);
        assert_eq!(got[1].size, Some(6));
        assert_eq!(
            got[1].mtime,
            Some(httpdate::parse_http_date("Mon, 23 Nov 2026 06:44:16 GMT").unwrap())
        );
        assert_eq!(got[1].etag, None);
    }

    #[test]
    fn apache_multistatus_with_prefixes_urls_and_failed_propstats() {
        let got = parse_multistatus(APACHE_PROPFIND, "/").unwrap();
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0].name, "a.txt");
        assert_eq!(got[0].size, Some(6));
        assert_eq!(got[0].etag.as_deref(), Some("\"6-660ebf18b4495\""));
    }

    #[test]
    fn broken_xml_is_an_error() {
        assert!(parse_multistatus("<D:multistatus xmlns:D=\"DAV:\"><D:response>&bogus;", "/").is_err());
    }

    #[test]
    fn nginx_json_index() {
        let body = br#"[
{ "name":"d", "type":"directory", "mtime":"Mon, 23 Nov 2026 06:43:04 GMT" },
{ "name":"a.txt", "type":"file", "mtime":"Mon, 23 Nov 2026 06:44:16 GMT", "size":6 },
{ "name":"sock", "type":"other", "mtime":"Mon, 23 Nov 2026 06:44:16 GMT" }
]"#;
        let got = parse_nginx_json(body).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!((got[0].name.as_str(), got[0].kind), ("d", EntryKind::Dir));
        assert_eq!((got[1].name.as_str(), got[1].size), ("a.txt", Some(6)));
        assert!(parse_nginx_json(b"<html>").is_err());
    }

    #[test]
    fn nginx_html_index_names_come_from_hrefs() {
        let html = r#"<html>
<head><title>Index of /sp ace/</title></head>
<body>
<h1>Index of /sp ace/</h1><hr><pre><a href="../">../</a>
<a href="sub/">sub/</a>                                               23-Nov-2026 06:43                   -
<a href="a%26b%20%3Cc%3E.txt">a&amp;b &lt;c&gt;.txt</a>                                        23-Nov-2026 06:46                   2
<a href="LLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLL.txt">LLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLL..&gt;</a> 23-Nov-2026 06:46                  61
</pre><hr></body>
</html>"#;
        let got = parse_html_index(html);
        assert_eq!(got.len(), 3, "{got:?}");
        assert_eq!((got[0].name.as_str(), got[0].kind), ("sub", EntryKind::Dir));
        assert_eq!(got[1].name, "a&b <c>.txt");
        assert_eq!(got[1].size, Some(2));
        assert_eq!(
            got[1].mtime,
            Some(httpdate::parse_http_date("Mon, 23 Nov 2026 06:46:00 GMT").unwrap())
        );
        assert_eq!(got[2].name.len(), 74);
        assert_eq!(got[2].size, Some(61));
    }

    #[test]
    fn apache_html_index_has_no_exact_sizes() {
        let html = r#"<html><body><h1>Index of /sp ace</h1>
<ul><li><a href="/"> Parent Directory</a></li>
<li><a href="f&amp;g%20%3cx%3e.txt"> f&amp;g &lt;x&gt;.txt</a></li>
<li><a href="?C=N;O=D">Name</a></li>
<li><a HREF='sub/'> sub/</a></li>
<li><a href="http://elsewhere/x">x</a></li>
</ul></body></html>"#;
        let got = parse_html_index(html);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(got[0].name, "f&g <x>.txt");
        assert_eq!(got[0].size, None);
        assert_eq!((got[1].name.as_str(), got[1].kind), ("sub", EntryKind::Dir));
    }

    #[test]
    fn index_times() {
        assert_eq!(
            parse_index_time("29-Feb-2024", "23:59"),
            Some(httpdate::parse_http_date("Thu, 29 Feb 2024 23:59:00 GMT").unwrap())
        );
        assert_eq!(parse_index_time("1-Jan-1970", "00:00"), None);
        assert_eq!(parse_index_time("1-Foo-2020", "00:00"), None);
    }

    #[test]
    fn links_that_are_not_children_are_ignored() {
        for bad in ["../", "./", "/abs", "a/b", "?q", "#top", "https://x/y", "%2F", ".."] {
            assert_eq!(index_link(bad), None, "{bad}");
        }
        assert_eq!(index_link("x%20y"), Some(("x y".into(), false)));
        assert_eq!(index_link(".hidden"), Some((".hidden".into(), false)));
    }
}
