//! Trace context on the wire: W3C `traceparent` (with `tracestate` passed
//! through untouched), B3 single (`b3`) and B3 multi (`X-B3-*`). A request
//! keeps the format it came with; one that came with none gets a
//! `traceparent`.

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

const TRACEPARENT: &str = "traceparent";
const B3: &str = "b3";
const B3_TRACE_ID: &str = "x-b3-traceid";
const B3_SPAN_ID: &str = "x-b3-spanid";
const B3_PARENT: &str = "x-b3-parentspanid";
const B3_SAMPLED: &str = "x-b3-sampled";
const B3_FLAGS: &str = "x-b3-flags";

/// Which headers carried the context, so the upstream request gets the
/// same kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// What the client said: whose trace, which span is the parent, and
/// whether it was sampled (`None`: the client left it to us).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Incoming {
    pub trace_id: u128,
    pub parent: u64,
    pub sampled: Option<bool>,
    pub format: Format,
}

fn hex_u128(s: &str) -> Option<u128> {
    // B3 allows 64-bit trace ids: the high half is zero.
    if !(s.len() == 32 || s.len() == 16) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u128::from_str_radix(s, 16).ok().filter(|v| *v != 0)
}

fn hex_u64(s: &str) -> Option<u64> {
    if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u64::from_str_radix(s, 16).ok().filter(|v| *v != 0)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name)?.to_str().ok().map(str::trim)
}

/// `traceparent: 00-<trace>-<parent>-<flags>`; a later version may add
/// fields after the flags, which are ignored as the spec says.
fn w3c(v: &str) -> Option<Incoming> {
    let mut parts = v.split('-');
    let version = parts.next()?;
    if version.len() != 2 || version == "ff" || !version.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let trace = parts.next().filter(|t| t.len() == 32).and_then(hex_u128)?;
    let parent = parts.next().and_then(hex_u64)?;
    let flags = parts.next().filter(|f| f.len() == 2)?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    if version == "00" && parts.next().is_some() {
        return None;
    }
    Some(Incoming {
        trace_id: trace,
        parent,
        sampled: Some(flags & 1 == 1),
        format: Format::W3c,
    })
}

/// A `b3` header: the trace and span ids, if any, and the sampling
/// decision, if any.
type B3 = (Option<(u128, u64)>, Option<bool>);

/// `b3: <trace>-<span>[-<sampled>[-<parent>]]`; a lone `0`/`1`/`d` is a
/// sampling decision without a context, which starts a new trace.
fn b3_single(v: &str) -> Option<B3> {
    let sampled = |s: &str| match s {
        "1" | "d" => Some(Some(true)),
        "0" => Some(Some(false)),
        _ => None,
    };
    let mut parts = v.split('-');
    let first = parts.next()?;
    let Some(second) = parts.next() else {
        return Some((None, sampled(first)?));
    };
    let ids = (hex_u128(first)?, hex_u64(second)?);
    let decision = match parts.next() {
        Some(s) => sampled(s)?,
        None => None,
    };
    Some((Some(ids), decision))
}

impl Incoming {
    /// The context the request carries, if any is well formed; and a bare
    /// sampling decision (`b3: 1`) when that is all it carries.
    pub fn read(headers: &HeaderMap) -> (Option<Incoming>, Option<bool>) {
        if let Some(ctx) = header(headers, TRACEPARENT).and_then(w3c) {
            return (Some(ctx), ctx.sampled);
        }
        if let Some(v) = header(headers, B3) {
            return match b3_single(v) {
                Some((Some((trace_id, parent)), sampled)) => (
                    Some(Incoming {
                        trace_id,
                        parent,
                        sampled,
                        format: Format::B3Single,
                    }),
                    sampled,
                ),
                Some((None, sampled)) => (None, sampled),
                None => (None, None),
            };
        }
        let trace = header(headers, B3_TRACE_ID).and_then(hex_u128);
        let span = header(headers, B3_SPAN_ID).and_then(hex_u64);
        let debug = header(headers, B3_FLAGS) == Some("1");
        let sampled = match header(headers, B3_SAMPLED) {
            Some("1" | "true") => Some(true),
            Some("0" | "false") => Some(false),
            _ if debug => Some(true),
            _ => None,
        };
        match (trace, span) {
            (Some(trace_id), Some(parent)) => (
                Some(Incoming {
                    trace_id,
                    parent,
                    sampled,
                    format: Format::B3Multi,
                }),
                sampled,
            ),
            _ => (None, sampled),
        }
    }
}

fn set(headers: &mut HeaderMap, name: &'static str, value: String) {
    // Takes the string's buffer: no second copy per request.
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

/// Writes the context the upstream request carries: this span as its
/// parent, in the format the request came with.
pub fn write(
    headers: &mut HeaderMap,
    format: Format,
    trace_id: u128,
    span_id: u64,
    parent: Option<u64>,
    sampled: bool,
) {
    match format {
        Format::W3c => set(
            headers,
            TRACEPARENT,
            format!(
                "00-{trace_id:032x}-{span_id:016x}-{:02x}",
                u8::from(sampled)
            ),
        ),
        Format::B3Single => set(
            headers,
            B3,
            format!("{trace_id:032x}-{span_id:016x}-{}", u8::from(sampled)),
        ),
        Format::B3Multi => {
            set(headers, B3_TRACE_ID, format!("{trace_id:032x}"));
            set(headers, B3_SPAN_ID, format!("{span_id:016x}"));
            match parent {
                Some(p) => set(headers, B3_PARENT, format!("{p:016x}")),
                None => {
                    headers.remove(B3_PARENT);
                }
            }
            set(headers, B3_SAMPLED, u8::from(sampled).to_string());
            headers.remove(B3_FLAGS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn w3c_traceparent() {
        let h = headers(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]);
        let (ctx, sampled) = Incoming::read(&h);
        assert_eq!(
            ctx,
            Some(Incoming {
                trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736,
                parent: 0x00f067aa0ba902b7,
                sampled: Some(true),
                format: Format::W3c,
            })
        );
        assert_eq!(sampled, Some(true));
        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "zz",
        ] {
            let h = headers(&[("traceparent", bad)]);
            assert_eq!(Incoming::read(&h).0, None, "{bad}");
        }
        // A future version may append fields.
        let h = headers(&[(
            "traceparent",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more",
        )]);
        assert_eq!(Incoming::read(&h).0.map(|c| c.sampled), Some(Some(false)));
    }

    #[test]
    fn b3_single_and_multi() {
        let h = headers(&[(
            "b3",
            "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
        )]);
        let ctx = Incoming::read(&h).0;
        assert_eq!(
            ctx.map(|c| (c.parent, c.sampled, c.format)),
            Some((0xe457b5a2e4d86bd1, Some(true), Format::B3Single))
        );
        let h = headers(&[("b3", "0")]);
        assert_eq!(Incoming::read(&h), (None, Some(false)));
        let h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-flags", "1"),
        ]);
        let ctx = Incoming::read(&h).0;
        assert_eq!(
            ctx.map(|c| (c.trace_id, c.sampled, c.format)),
            Some((0x463ac35c9f6413ad, Some(true), Format::B3Multi))
        );
    }

    #[test]
    fn written_as_received() {
        let mut h = HeaderMap::new();
        write(&mut h, Format::W3c, 1, 2, None, true);
        assert_eq!(
            h["traceparent"],
            "00-00000000000000000000000000000001-0000000000000002-01"
        );
        let mut h = headers(&[("x-b3-flags", "1")]);
        write(&mut h, Format::B3Multi, 0xab, 0xcd, Some(0xef), false);
        assert_eq!(h["x-b3-traceid"], "000000000000000000000000000000ab");
        assert_eq!(h["x-b3-spanid"], "00000000000000cd");
        assert_eq!(h["x-b3-parentspanid"], "00000000000000ef");
        assert_eq!(h["x-b3-sampled"], "0");
        assert!(h.get("x-b3-flags").is_none());
        let (back, _) = Incoming::read(&h);
        assert_eq!(back.map(|c| (c.trace_id, c.parent)), Some((0xab, 0xcd)));
    }
}
