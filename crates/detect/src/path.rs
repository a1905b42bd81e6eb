//! A request path in the one form policy judges and the application
//! receives, so a rule on `/public` cannot be passed by a path the
//! application resolves elsewhere (`/public/../admin`,
//! `/public/%2e%2e/admin`, `/public//../admin`).
//!
//! RFC 3986's normalisation (§6.2.2): percent-escapes of unreserved
//! characters decoded, the hex of the others in upper case, dot segments
//! removed (§5.2.4); and, as Envoy's `merge_slashes`, runs of `/` merged,
//! since servers that merge them would otherwise see a different path. An
//! escaped `/` or `\` (`%2F`, `%5C`) is refused: an application that
//! decodes it would see segments policy did not.

use std::borrow::Cow;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    #[error("the path has an escaped slash or backslash ({0}), which policy cannot judge")]
    EscapedSeparator(&'static str),
    #[error("the path has a malformed percent-escape")]
    BadEscape,
    #[error("the path does not start with /")]
    NotAbsolute,
}

/// `path` normalised; borrowed when it already is.
pub fn normalize_path(path: &str) -> Result<Cow<'_, str>, PathError> {
    if !path.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if is_normal(path.as_bytes()) {
        return Ok(Cow::Borrowed(path));
    }
    let decoded = decode_unreserved(path)?;
    Ok(Cow::Owned(remove_dot_segments(&decoded)))
}

/// No escapes, no `//`, no `.` or `..` segment: nothing to do, which is
/// every path of a well-behaved client.
fn is_normal(b: &[u8]) -> bool {
    if b.contains(&b'%') {
        return false;
    }
    let mut segment_start = 0;
    for i in 1..=b.len() {
        if i == b.len() || b[i] == b'/' {
            let seg = &b[segment_start + 1..i];
            let last = i == b.len();
            if seg == b"." || seg == b".." || (seg.is_empty() && !last) {
                return false;
            }
            segment_start = i;
        }
    }
    true
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let b = path.as_bytes();
    let mut out = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'%' {
            // `path` is a str and '%' is ASCII: this char boundary is one.
            let next = b[i..]
                .iter()
                .position(|&c| c == b'%')
                .map_or(b.len(), |p| i + p);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let (Some(hi), Some(lo)) = (
            b.get(i + 1).copied().and_then(hex),
            b.get(i + 2).copied().and_then(hex),
        ) else {
            return Err(PathError::BadEscape);
        };
        let c = (hi << 4) | lo;
        match c {
            b'/' => return Err(PathError::EscapedSeparator("%2F")),
            b'\\' => return Err(PathError::EscapedSeparator("%5C")),
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(char::from(c))
            }
            _ => {
                out.push('%');
                out.push(char::from(b"0123456789ABCDEF"[usize::from(hi)]));
                out.push(char::from(b"0123456789ABCDEF"[usize::from(lo)]));
            }
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on segments, with empty segments (`//`) dropped; `..`
/// above the root stays at the root. A trailing `/`, `/.` or `/..` leaves
/// a trailing `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in path.split('/').skip(1) {
        trailing_slash = false;
        match seg {
            "" | "." => trailing_slash = true,
            ".." => {
                out.pop();
                trailing_slash = true;
            }
            s => out.push(s),
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing_slash || out.is_empty() {
        s.push('/');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(p: &str) -> Result<String, PathError> {
        normalize_path(p).map(Cow::into_owned)
    }

    #[test]
    fn what_a_client_could_hide_behind_an_allowed_prefix_is_uncovered() {
        for (path, want) in [
            ("/public/../admin", "/admin"),
            ("/public/%2e%2e/admin", "/admin"),
            ("/public/%2E%2E/admin", "/admin"),
            ("/public/.%2e/admin", "/admin"),
            ("/public//../admin", "/admin"),
            ("/public/./../admin/", "/admin/"),
            ("/../../admin", "/admin"),
            ("//admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/public/..", "/"),
            ("/public/.", "/public/"),
        ] {
            assert_eq!(n(path).as_deref(), Ok(want), "{path}");
        }
    }

    #[test]
    fn ordinary_paths_are_kept_as_they_are() {
        for path in ["/", "/a", "/a/", "/a/b.c/d..e/.f", "/v1/users.json"] {
            assert!(
                matches!(normalize_path(path), Ok(Cow::Borrowed(p)) if p == path),
                "{path}"
            );
        }
        // Reserved characters stay escaped, in one spelling.
        assert_eq!(n("/a%3fb%20c").as_deref(), Ok("/a%3Fb%20c"));
    }

    #[test]
    fn what_cannot_be_judged_is_refused() {
        assert_eq!(
            n("/public/..%2fadmin"),
            Err(PathError::EscapedSeparator("%2F"))
        );
        assert_eq!(n("/a%5Cb"), Err(PathError::EscapedSeparator("%5C")));
        assert_eq!(n("/a%2"), Err(PathError::BadEscape));
        assert_eq!(n("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(n("*"), Err(PathError::NotAbsolute));
    }
}
