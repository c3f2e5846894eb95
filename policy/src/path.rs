//! Request paths as policy must see them: one spelling per resource, so a
//! rule on `/admin/*` cannot be walked around by writing the same path
//! another way (`/%61dmin/x`, `/x/../admin/x`, `//admin/x`, `/admin/./x`).
//!
//! The callee's sidecar normalises every HTTP request path before any
//! decision, and the app receives the normalised path, so the app and the
//! policy always agree on which resource was asked for:
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded; other percent-encodings are kept, in upper case;
//! - `.` and `..` segments are resolved (RFC 3986 section 5.2.4; `..` at the
//!   root stays at the root) and empty segments (`//`) are merged;
//! - refused: an encoded `/` or `\` (`%2F`, `%5C`), a raw `\`, an encoded
//!   control character or NUL, a `%` not followed by two hex digits, and
//!   percent-encoded bytes that are not valid UTF-8 (overlong forms such as
//!   `%C0%AE` included): different servers read each of these differently.
//!
//! The query is not touched. A path that needs no change costs one scan and
//! no allocation.

use std::borrow::Cow;

/// Why a path is refused (the request gets 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// `%2F` or `%5C`, or a raw backslash: a separator in disguise.
    #[error("an encoded or backslash path separator")]
    EncodedSeparator,
    /// `%` not followed by two hex digits.
    #[error("a malformed percent-encoding")]
    BadEncoding,
    /// An encoded control character or NUL.
    #[error("an encoded control character")]
    ControlCharacter,
    /// Percent-encoded bytes that are not valid UTF-8 (overlong forms included).
    #[error("percent-encoded bytes that are not UTF-8")]
    NotUtf8,
    /// A `.` or `..` segment, where a policy refuses them.
    #[error("a dot segment")]
    DotSegment,
    /// An empty segment (`//`), where a policy refuses them.
    #[error("an empty segment")]
    EmptySegment,
}

/// `validation.pathNormalization`: how a workload's request paths are put
/// in normal form. The defaults are the mesh's: dot segments resolved,
/// empty segments merged, encoded separators refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Options {
    /// `.` and `..` segments (`%2e` spellings included): `resolve` or `refuse` (400).
    #[serde(default)]
    pub dot_segments: Resolve,
    /// Empty segments (`//`): `merge` or `refuse` (400).
    #[serde(default)]
    pub empty_segments: Merge,
    /// `%2F` and `%5C`: `refuse` (400), or `keep` them encoded, for apps
    /// whose identifiers hold a `/`. Kept, they are not separators to policy
    /// (`/a%2Fb` is one segment): only choose it for an app that reads them
    /// the same way.
    #[serde(default)]
    pub encoded_slashes: Encoded,
}

/// `dotSegments`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Resolve {
    /// Resolved (RFC 3986 section 5.2.4).
    #[default]
    Resolve,
    /// Refused.
    Refuse,
}

/// `emptySegments`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Merge {
    /// Merged into one `/`.
    #[default]
    Merge,
    /// Refused.
    Refuse,
}

/// `encodedSlashes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoded {
    /// Refused.
    #[default]
    Refuse,
    /// Kept encoded (upper case).
    Keep,
}

impl Options {
    /// The strictest of several policies' options (none given: the defaults).
    pub fn strictest<'a>(all: impl Iterator<Item = &'a Options>) -> Options {
        let mut out: Option<Options> = None;
        for o in all {
            let cur = out.get_or_insert(*o);
            if o.dot_segments == Resolve::Refuse {
                cur.dot_segments = Resolve::Refuse;
            }
            if o.empty_segments == Merge::Refuse {
                cur.empty_segments = Merge::Refuse;
            }
            if o.encoded_slashes == Encoded::Refuse {
                cur.encoded_slashes = Encoded::Refuse;
            }
        }
        out.unwrap_or_default()
    }
}

impl PathError {
    /// A short, stable reason for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::EncodedSeparator => "encoded_separator",
            Self::BadEncoding => "bad_percent_encoding",
            Self::ControlCharacter => "encoded_control_character",
            Self::NotUtf8 => "encoded_bytes_not_utf8",
            Self::DotSegment => "dot_segment",
            Self::EmptySegment => "empty_segment",
        }
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Whether `path` is already in normal form (the common case, checked
/// without allocating).
fn is_normal(p: &[u8]) -> bool {
    if p.first() != Some(&b'/') {
        return false;
    }
    let mut prev = 0u8;
    for (i, &b) in p.iter().enumerate() {
        match b {
            b'%' | b'\\' => return false,
            b'/' if prev == b'/' => return false,
            b'.' if prev == b'/' => {
                // A `.` or `..` segment.
                let rest = &p[i..];
                let seg = rest.iter().position(|c| *c == b'/').map_or(rest, |e| &rest[..e]);
                if seg == b"." || seg == b".." {
                    return false;
                }
            }
            _ => {}
        }
        prev = b;
    }
    true
}

/// The normal form of an origin-form path (see the module documentation).
/// `*` (as in `OPTIONS *`) and paths that do not start with `/` other than
/// empty ones are returned as they are: they name no resource rules match.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, PathError> {
    normalize_with(path, &Options::default())
}

/// [`normalize`] with a policy's [`Options`].
pub fn normalize_with<'a>(path: &'a str, opts: &Options) -> Result<Cow<'a, str>, PathError> {
    if path == "*" {
        return Ok(Cow::Borrowed(path));
    }
    let p = path.as_bytes();
    if is_normal(p) {
        return Ok(Cow::Borrowed(path));
    }
    // Decode what may be decoded; keep the rest encoded (upper case).
    let mut decoded: Vec<u8> = Vec::with_capacity(p.len() + 1);
    if p.first() != Some(&b'/') {
        decoded.push(b'/');
    }
    let mut i = 0;
    // Encoded bytes >= 0x80 seen in a row, checked as UTF-8 when the run ends.
    let mut high: Vec<u8> = Vec::new();
    let end_run = |high: &mut Vec<u8>| -> Result<(), PathError> {
        if !high.is_empty() {
            std::str::from_utf8(high).map_err(|_| PathError::NotUtf8)?;
            high.clear();
        }
        Ok(())
    };
    while i < p.len() {
        let b = p[i];
        if b == b'\\' {
            return Err(PathError::EncodedSeparator);
        }
        if b != b'%' {
            end_run(&mut high)?;
            decoded.push(b);
            i += 1;
            continue;
        }
        let (Some(h), Some(l)) = (p.get(i + 1).copied().and_then(hex), p.get(i + 2).copied().and_then(hex)) else {
            return Err(PathError::BadEncoding);
        };
        let v = h * 16 + l;
        i += 3;
        if v >= 0x80 {
            high.push(v);
            decoded.extend_from_slice(format!("%{v:02X}").as_bytes());
            continue;
        }
        end_run(&mut high)?;
        match v {
            b'/' | b'\\' if opts.encoded_slashes == Encoded::Keep => {
                decoded.extend_from_slice(format!("%{v:02X}").as_bytes())
            }
            b'/' | b'\\' => return Err(PathError::EncodedSeparator),
            0..=0x1f | 0x7f => return Err(PathError::ControlCharacter),
            v if unreserved(v) => decoded.push(v),
            v => decoded.extend_from_slice(format!("%{v:02X}").as_bytes()),
        }
    }
    end_run(&mut high)?;
    // Resolve dot segments and merge empty ones.
    let text = String::from_utf8(decoded).map_err(|_| PathError::NotUtf8)?;
    let mut out: Vec<&str> = Vec::new();
    let last = text.split('/').count() - 1;
    for (i, seg) in text.split('/').enumerate() {
        match seg {
            "." | ".." if opts.dot_segments == Resolve::Refuse => return Err(PathError::DotSegment),
            "" if i > 0 && i < last && opts.empty_segments == Merge::Refuse => return Err(PathError::EmptySegment),
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    // A trailing slash is kept when the last segment names a directory
    // (empty, `.` or `..`).
    let trailing = text.ends_with('/') || text.ends_with("/.") || text.ends_with("/..");
    let mut normal = String::with_capacity(text.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if normal.is_empty() || trailing {
        normal.push('/');
    }
    Ok(Cow::Owned(normal))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_per_resource() {
        let same = [
            ("/admin/x", "/admin/x"),
            ("/%61dmin/x", "/admin/x"),
            ("/adm%69n/x", "/admin/x"),
            ("/x/../admin/x", "/admin/x"),
            ("/x/%2e%2e/admin/x", "/admin/x"),
            ("/x/%2E%2E/admin/x", "/admin/x"),
            ("/x/.%2e/admin/x", "/admin/x"),
            ("//admin//x", "/admin/x"),
            ("/./admin/./x", "/admin/x"),
            ("/../../admin/x", "/admin/x"),
            ("/admin/x/", "/admin/x/"),
            ("/admin/x/.", "/admin/x/"),
            ("/admin/x/y/..", "/admin/x/"),
            ("/", "/"),
            ("", "/"),
            ("/..", "/"),
            ("/a%20b", "/a%20b"),
            ("/a%2fb%", "error"),
            ("/caf%c3%a9", "/caf%C3%A9"),
            ("/~user", "/~user"),
            ("/%7euser", "/~user"),
            ("/a.b/c..d/.e", "/a.b/c..d/.e"),
            ("*", "*"),
        ];
        for (input, want) in same {
            match normalize(input) {
                Ok(got) => assert_eq!(got, want, "{input}"),
                Err(e) => assert_eq!("error", want, "{input}: {e}"),
            }
        }
    }

    #[test]
    fn disguised_separators_controls_and_bad_bytes_are_refused() {
        for (input, err) in [
            ("/admin%2fx", PathError::EncodedSeparator),
            ("/admin%2Fx", PathError::EncodedSeparator),
            ("/admin%5cx", PathError::EncodedSeparator),
            ("/admin\\x", PathError::EncodedSeparator),
            ("/admin%00x", PathError::ControlCharacter),
            ("/admin%0ax", PathError::ControlCharacter),
            ("/admin%7f", PathError::ControlCharacter),
            ("/admin%", PathError::BadEncoding),
            ("/admin%g1", PathError::BadEncoding),
            ("/admin%2", PathError::BadEncoding),
            ("/%c0%ae%c0%ae/admin", PathError::NotUtf8),
            ("/%e0%80%af", PathError::NotUtf8),
            ("/%ff", PathError::NotUtf8),
            ("/%c3", PathError::NotUtf8),
        ] {
            assert_eq!(normalize(input), Err(err), "{input}");
        }
    }

    #[test]
    fn normal_paths_are_borrowed() {
        for p in ["/", "/api/orders/7", "/a.b/.hidden/x..y", "/v1/items?x"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
        // Idempotent (the last one found by the fuzzer).
        for p in ["/%61/../b//c/./%7e", "/x/%2e%2e/y/", "/.)/%21e/a-xi/."] {
            let once = normalize(p).unwrap().into_owned();
            assert_eq!(normalize(&once).unwrap(), once);
        }
    }

    #[test]
    fn policies_may_refuse_dot_and_empty_segments_or_keep_encoded_slashes() {
        let strict = Options { dot_segments: Resolve::Refuse, empty_segments: Merge::Refuse, ..Default::default() };
        assert_eq!(normalize_with("/a/../b", &strict), Err(PathError::DotSegment));
        assert_eq!(normalize_with("/a/%2e%2E/b", &strict), Err(PathError::DotSegment));
        assert_eq!(normalize_with("/a/./b", &strict), Err(PathError::DotSegment));
        assert_eq!(normalize_with("/a//b", &strict), Err(PathError::EmptySegment));
        assert_eq!(normalize_with("/a/b/", &strict).unwrap(), "/a/b/");
        assert_eq!(normalize_with("/%61/b", &strict).unwrap(), "/a/b");
        let keep = Options { encoded_slashes: Encoded::Keep, ..Default::default() };
        assert_eq!(normalize_with("/repo/a%2fb/x", &keep).unwrap(), "/repo/a%2Fb/x");
        assert_eq!(normalize_with("/repo/a%5Cb", &keep).unwrap(), "/repo/a%5Cb");
        assert_eq!(normalize_with("/repo/a\\b", &keep), Err(PathError::EncodedSeparator), "raw backslash");
        assert_eq!(normalize_with("/a/%2e%2e%2fadmin", &keep).unwrap(), "/a/..%2Fadmin", "one segment, not a walk up");
        let lax: Options = serde_json::from_value(serde_json::json!({"encodedSlashes": "keep"})).unwrap();
        let mixed = Options::strictest([lax, strict].iter());
        assert_eq!(mixed, Options { encoded_slashes: Encoded::Refuse, ..strict });
        assert_eq!(Options::strictest([lax].iter()).encoded_slashes, Encoded::Keep);
        assert_eq!(Options::strictest([].iter()), Options::default());
    }
}
