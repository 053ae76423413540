//! What goes on the wire: the JSON envelope, the `webhook-id`, and the endpoint's extra headers.

use crate::trace::TraceParent;

/// Longest header name or value accepted from `create_endpoint(headers => …)`.
pub const MAX_HEADER_LEN: usize = 8192;
/// Most extra headers one endpoint may carry.
pub const MAX_HEADERS: usize = 32;
/// Headers we set ourselves; an endpoint may not override them.
pub const RESERVED_HEADERS: &[&str] = &[
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "content-type",
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "upgrade",
    "te",
    "trailer",
    "keep-alive",
    "expect",
];

/// The event's W3C `traceparent` (a checked one: `trace::parse`) replaces one the endpoint's own
/// headers carry, whatever its case.
pub fn set_traceparent(headers: &mut Vec<(String, String)>, traceparent: &TraceParent) {
    headers.retain(|(name, _)| !name.eq_ignore_ascii_case("traceparent"));
    headers.push(("traceparent".to_owned(), traceparent.as_str().to_owned()));
}

/// `webhook-id`: unique per delivery, the same on every retry and after a crash.
/// `install` is a random tag chosen at CREATE EXTENSION, so ids never repeat across databases
/// or after the extension is dropped and created again.
pub fn message_id(install: &str, delivery_id: i64) -> String {
    format!("msg_{install}_{delivery_id}")
}

/// The request body: `{"type": …, "timestamp": "<RFC 3339 UTC>", "data": …}`.
/// `data_json` is the stored payload's text, inserted verbatim so that what was stored is what is signed.
pub fn envelope(event_type: &str, created_at_unix_micros: i64, data_json: &str) -> String {
    let ty = serde_json::to_string(event_type).expect("a string always serialises");
    let ts = rfc3339_utc(created_at_unix_micros);
    let mut body = String::with_capacity(data_json.len() + ty.len() + 64);
    body.push_str("{\"type\":");
    body.push_str(&ty);
    body.push_str(",\"timestamp\":\"");
    body.push_str(&ts);
    body.push_str("\",\"data\":");
    body.push_str(data_json);
    body.push('}');
    body
}

/// The `data` of a row change: `{"schema", "table", "op", "new", "old", "txid"}`, with the
/// stored row images (`to_jsonb` text, or `null`) inserted verbatim.
pub fn row_change_data(
    schema: &str,
    table: &str,
    op: &str,
    new: Option<&str>,
    old: Option<&str>,
    txid: i64,
) -> String {
    let s = |v: &str| serde_json::to_string(v).expect("a string always serialises");
    format!(
        "{{\"schema\":{},\"table\":{},\"op\":{},\"new\":{},\"old\":{},\"txid\":{txid}}}",
        s(schema),
        s(table),
        s(op),
        new.unwrap_or("null"),
        old.unwrap_or("null")
    )
}

/// Bytes of a row change's request body whose row images' texts are `new_len` and `old_len`
/// bytes long (an absent image is `null`, 4 bytes): what `webhook.max_payload_bytes` bounds.
/// The timestamp always has the same width, so the event's time does not matter.
///
/// Computed, not built: the trigger asks once per row change, and building the body's text to
/// measure it cost the trigger as much as its own statement's index entries (a property test
/// holds this to the length of the text `envelope` and `row_change_data` build).
pub fn row_change_body_len(
    event_type: &str,
    schema: &str,
    table: &str,
    op: &str,
    new_len: usize,
    old_len: usize,
    txid: i64,
) -> usize {
    // {"type":<type>,"timestamp":"<27>","data":<data>}
    const ENVELOPE: usize = r#"{"type":,"timestamp":"","data":}"#.len() + TIMESTAMP_LEN;
    // {"schema":<s>,"table":<t>,"op":<o>,"new":<new>,"old":<old>,"txid":<txid>}
    const DATA: usize = r#"{"schema":,"table":,"op":,"new":,"old":,"txid":}"#.len();
    ENVELOPE
        + json_string_len(event_type)
        + DATA
        + json_string_len(schema)
        + json_string_len(table)
        + json_string_len(op)
        + new_len
        + old_len
        + decimal_len(txid)
}

/// Characters of an RFC 3339 UTC timestamp as `rfc3339_utc` writes it (years 0000–9999).
const TIMESTAMP_LEN: usize = "YYYY-MM-DDTHH:MM:SS.ffffffZ".len();

/// Bytes of `s` as a JSON string, quotes included, escaped as serde_json escapes it: `"` and `\`
/// and the control characters \b \f \n \r \t take two bytes, the other control characters
/// six (`\u00XX`), everything else its UTF-8 bytes.
fn json_string_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | 0x0c | b'\n' | b'\r' | b'\t' => 2,
            0x00..=0x1f => 6,
            _ => 1,
        })
        .sum::<usize>()
}

/// Characters of `n` in decimal.
fn decimal_len(n: i64) -> usize {
    let sign = usize::from(n < 0);
    let mut m = n.unsigned_abs();
    let mut digits = 1;
    while m >= 10 {
        m /= 10;
        digits += 1;
    }
    sign + digits
}

/// Formats unix microseconds as `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
pub fn rfc3339_utc(unix_micros: i64) -> String {
    let secs = unix_micros.div_euclid(1_000_000);
    let micros = unix_micros.rem_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let sod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// True when `event_type` passes an endpoint's `event_types` filter (None = everything;
/// a pattern ending in `*` matches by prefix).
pub fn type_matches(event_type: &str, patterns: Option<&[String]>) -> bool {
    patterns.is_none_or(|ps| {
        ps.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => event_type.starts_with(prefix),
            None => p == event_type,
        })
    })
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeaderError {
    #[error("headers must be a JSON object of string values")]
    NotAnObject,
    #[error("more than {MAX_HEADERS} headers")]
    TooMany,
    #[error("header name {0:?} is not a valid HTTP header name")]
    BadName(String),
    #[error("header {0:?} is set by webhook_ext and cannot be overridden")]
    Reserved(String),
    #[error("the value of header {0:?} must be a string")]
    NotAString(String),
    // The value itself is never echoed: headers often carry credentials.
    #[error("the value of header {0:?} contains a control character (such as CR, LF or NUL) or is longer than {MAX_HEADER_LEN} bytes")]
    BadValue(String),
}

/// Validates an endpoint's extra headers (a JSON object of strings) and returns them as pairs.
pub fn parse_headers(json: &str) -> Result<Vec<(String, String)>, HeaderError> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|_| HeaderError::NotAnObject)?;
    let obj = value.as_object().ok_or(HeaderError::NotAnObject)?;
    if obj.len() > MAX_HEADERS {
        return Err(HeaderError::TooMany);
    }
    let shown = |name: &str| name.chars().take(64).collect::<String>();
    obj.iter()
        .map(|(name, v)| {
            let valid_name = !name.is_empty()
                && name.len() <= 256
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !valid_name {
                return Err(HeaderError::BadName(shown(name)));
            }
            if RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()) {
                return Err(HeaderError::Reserved(shown(name)));
            }
            let value = v
                .as_str()
                .ok_or_else(|| HeaderError::NotAString(shown(name)))?;
            // What HTTP allows in a field value: visible ASCII, space, tab, and non-ASCII bytes.
            let allowed = |b: u8| b == b'\t' || (0x20..0x7f).contains(&b) || b >= 0x80;
            if value.len() > MAX_HEADER_LEN || !value.bytes().all(allowed) {
                return Err(HeaderError::BadValue(shown(name)));
            }
            Ok((name.clone(), value.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_events_traceparent_replaces_the_endpoints() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut headers = parse_headers(r#"{"X-Team": "crm", "TraceParent": "static"}"#).unwrap();
        set_traceparent(&mut headers, &crate::trace::parse(tp).unwrap());
        headers.sort();
        assert_eq!(
            headers,
            vec![
                ("X-Team".to_owned(), "crm".to_owned()),
                ("traceparent".to_owned(), tp.to_owned())
            ]
        );
    }

    #[test]
    fn body_length_is_measured_as_sent() {
        let new = r#"{"id": 1, "note": "\u0001\u0002"}"#;
        for (n, o) in [
            (Some(new), None),
            (None, Some(new)),
            (Some(new), Some("{}")),
        ] {
            let data = row_change_data("pub\"lic", "t\u{e9}", "UPDATE", n, o, 1_234_567_890_123);
            let body = envelope("pub\"lic.t\u{e9}.update", 1_649_367_553_123_456, &data);
            let len = row_change_body_len(
                "pub\"lic.t\u{e9}.update",
                "pub\"lic",
                "t\u{e9}",
                "UPDATE",
                n.map_or(4, str::len),
                o.map_or(4, str::len),
                1_234_567_890_123,
            );
            assert_eq!(len, body.len(), "{body}");
        }
    }

    #[test]
    fn envelope_is_type_timestamp_data_and_valid_json() {
        let body = envelope(
            "public.users.insert",
            1_649_367_553_123_456,
            r#"{"op": "INSERT", "new": {"id": 1}}"#,
        );
        assert_eq!(
            body,
            r#"{"type":"public.users.insert","timestamp":"2022-04-07T21:39:13.123456Z","data":{"op": "INSERT", "new": {"id": 1}}}"#
        );
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["data"]["new"]["id"], 1);
    }

    #[test]
    fn row_change_data_is_valid_json_in_a_fixed_order() {
        let d = row_change_data(
            "public",
            "us\"ers",
            "UPDATE",
            Some(r#"{"id": 1}"#),
            None,
            42,
        );
        assert_eq!(
            d,
            r#"{"schema":"public","table":"us\"ers","op":"UPDATE","new":{"id": 1},"old":null,"txid":42}"#
        );
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["table"], "us\"ers");
        assert_eq!(v["new"]["id"], 1);
        assert!(v["old"].is_null());
    }

    #[test]
    fn event_types_are_escaped() {
        let body = envelope("we\"ird\ntype", 0, "null");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["type"], "we\"ird\ntype");
        assert_eq!(v["timestamp"], "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn rfc3339_handles_leap_years_and_pre_epoch() {
        assert_eq!(
            rfc3339_utc(951_782_400_000_000),
            "2000-02-29T00:00:00.000000Z"
        );
        assert_eq!(rfc3339_utc(-1), "1969-12-31T23:59:59.999999Z");
        assert_eq!(
            rfc3339_utc(4_102_444_800_000_000),
            "2100-01-01T00:00:00.000000Z"
        );
    }

    #[test]
    fn message_ids_are_stable_and_distinct() {
        assert_eq!(message_id("a1b2c3", 42), "msg_a1b2c3_42");
        assert_ne!(message_id("a1b2c3", 42), message_id("a1b2c3", 43));
        assert_ne!(message_id("a1b2c3", 42), message_id("ffffff", 42));
    }

    #[test]
    fn event_type_filters() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(type_matches("public.users.insert", None));
        assert!(type_matches("invoice.paid", Some(&p(&["invoice.*"]))));
        assert!(type_matches(
            "invoice.paid",
            Some(&p(&["user.created", "invoice.paid"]))
        ));
        assert!(!type_matches("invoice.paid", Some(&p(&["invoice.voided"]))));
        assert!(!type_matches("user.created", Some(&p(&["invoice.*"]))));
        assert!(type_matches("anything", Some(&p(&["*"]))));
        assert!(!type_matches("x", Some(&[])));
    }

    #[test]
    fn headers_are_validated() {
        assert_eq!(
            parse_headers(r#"{"Authorization": "Bearer x", "X-Tenant": "7"}"#).unwrap(),
            vec![
                ("Authorization".into(), "Bearer x".into()),
                ("X-Tenant".into(), "7".into())
            ]
        );
        assert_eq!(parse_headers("{}").unwrap(), vec![]);
        assert_eq!(parse_headers("[1]"), Err(HeaderError::NotAnObject));
        assert_eq!(
            parse_headers(r#"{"Bad Name": "x"}"#),
            Err(HeaderError::BadName("Bad Name".into()))
        );
        assert_eq!(
            parse_headers(r#"{"X\r\nEvil": "x"}"#),
            Err(HeaderError::BadName("X\r\nEvil".into()))
        );
        assert_eq!(
            parse_headers(r#"{"webhook-signature": "x"}"#),
            Err(HeaderError::Reserved("webhook-signature".into()))
        );
        assert_eq!(
            parse_headers(r#"{"Content-Type": "x"}"#),
            Err(HeaderError::Reserved("Content-Type".into()))
        );
        assert_eq!(
            parse_headers(r#"{"X-N": 5}"#),
            Err(HeaderError::NotAString("X-N".into()))
        );
        assert_eq!(
            parse_headers(r#"{"X-A": "a\r\nInjected: 1"}"#),
            Err(HeaderError::BadValue("X-A".into()))
        );
        // Found by the property tests: HTTP refuses every control character but tab.
        assert_eq!(
            parse_headers(r#"{"X-A": "\u000b"}"#),
            Err(HeaderError::BadValue("X-A".into()))
        );
        assert_eq!(
            parse_headers(r#"{"X-A": "tab\tand ünïcode"}"#).unwrap()[0].1,
            "tab\tand ünïcode"
        );
        let huge = format!(r#"{{"X-Big": "{}"}}"#, "a".repeat(MAX_HEADER_LEN + 1));
        assert_eq!(
            parse_headers(&huge),
            Err(HeaderError::BadValue("X-Big".into()))
        );
        let many: Vec<String> = (0..33).map(|i| format!(r#""X-{i}": "v""#)).collect();
        assert_eq!(
            parse_headers(&format!("{{{}}}", many.join(","))),
            Err(HeaderError::TooMany)
        );
    }

    #[test]
    fn header_errors_never_echo_values() {
        let e = parse_headers(r#"{"Authorization": "Bearer s3cr3t\n"}"#)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("s3cr3t"));
    }
}
