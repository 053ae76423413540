//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>): the `traceparent` an application
//! sets for its transaction (`SET LOCAL webhook.traceparent = …`) is checked here, stored with
//! each event the transaction writes, and sent with every attempt of its deliveries, so that a
//! trace spans the write, the delivery and the receiver.
//!
//! `version-traceid-parentid-flags`, lower-case hex: `00-<32>-<16>-<2>`. A version above `00`
//! is read as `00` is (its first four fields; anything after them must follow a `-`), and sent
//! as version `00`, as the specification asks of a participant that knows only `00`. Trace and
//! parent ids of all zeros are invalid, and so is version `ff`.

/// A checked `traceparent`, in the form it is stored and sent (version `00`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParent(String);

impl TraceParent {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why a value is not a `traceparent`; the text names the field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceParentError(pub String);

impl std::fmt::Display for TraceParentError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The expected form, for error messages.
pub const FORM: &str =
    "00-<trace-id: 32 lower-case hex digits>-<parent-id: 16 lower-case hex digits>-<flags: 2 lower-case hex digits>";

fn lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Checks `value` (surrounding spaces and tabs allowed, as in an HTTP header).
pub fn parse(value: &str) -> Result<TraceParent, TraceParentError> {
    let v = value.trim_matches(|c| c == ' ' || c == '\t');
    let err = |what: &str| Err(TraceParentError(format!("{what}; expected {FORM}")));
    // Byte positions below: a character of several bytes would put them inside it (and the
    // worker, which checks a stored value again, would panic).
    if !v.is_ascii() {
        return err("traceparent has a character that is not ASCII");
    }
    if v.len() < 55 {
        return err(&format!(
            "traceparent is {} characters long, not 55",
            v.len()
        ));
    }
    let (version, rest) = v.split_at(2);
    if !lower_hex(version) {
        return err("traceparent's version is not two lower-case hex digits");
    }
    if version == "ff" {
        return err("traceparent's version ff is invalid");
    }
    if version == "00" && v.len() != 55 {
        return err(&format!(
            "traceparent of version 00 is {} characters long, not 55",
            v.len()
        ));
    }
    if v.len() > 55 && v.as_bytes()[55] != b'-' {
        return err("traceparent has characters after its flags that do not follow a '-'");
    }
    let b = rest.as_bytes();
    if b[0] != b'-' || b[33] != b'-' || b[50] != b'-' {
        return err("traceparent's fields are not separated by '-' at positions 3, 36 and 53");
    }
    let (trace_id, parent_id, flags) = (&rest[1..33], &rest[34..50], &rest[51..53]);
    if !lower_hex(trace_id) {
        return err("traceparent's trace-id is not 32 lower-case hex digits");
    }
    if trace_id.bytes().all(|c| c == b'0') {
        return err("traceparent's trace-id is all zeros");
    }
    if !lower_hex(parent_id) {
        return err("traceparent's parent-id is not 16 lower-case hex digits");
    }
    if parent_id.bytes().all(|c| c == b'0') {
        return err("traceparent's parent-id is all zeros");
    }
    if !lower_hex(flags) {
        return err("traceparent's flags are not two lower-case hex digits");
    }
    Ok(TraceParent(format!("00-{trace_id}-{parent_id}-{flags}")))
}

/// `webhook.traceparent` as set: empty is none; anything else must parse.
pub fn parse_setting(value: &str) -> Result<Option<TraceParent>, TraceParentError> {
    if value.is_empty() {
        return Ok(None);
    }
    parse(value).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn the_specifications_example_is_kept_as_it_is() {
        assert_eq!(parse(GOOD).unwrap().as_str(), GOOD);
        assert_eq!(parse(&format!(" \t{GOOD} ")).unwrap().as_str(), GOOD);
    }

    #[test]
    fn an_empty_setting_is_none() {
        assert_eq!(parse_setting(""), Ok(None));
        assert_eq!(parse_setting(GOOD).unwrap().unwrap().as_str(), GOOD);
        assert!(parse_setting(" ").is_err());
    }

    #[test]
    fn a_later_version_is_read_and_sent_as_version_00() {
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        assert_eq!(parse(v).unwrap().as_str(), GOOD);
        let v = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(parse(v).unwrap().as_str(), GOOD);
        let bad = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x";
        assert!(parse(bad).unwrap_err().0.contains("after its flags"));
    }

    #[test]
    fn each_wrong_field_is_named() {
        let cases = [
            ("", "0 characters long"),
            (&GOOD[..54], "54 characters long"),
            (&format!("€{}", &GOOD[1..]), "not ASCII"),
            (&format!("0€{}", &GOOD[2..]), "not ASCII"),
            (&format!("{GOOD}-00"), "version 00 is 58 characters long"),
            (&GOOD.replace("00-4b", "ff-4b"), "version ff"),
            (&GOOD.replacen("00", "0g", 1), "version is not"),
            (&GOOD.to_uppercase(), "trace-id is not"),
            (
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
                "trace-id is all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
                "parent-id is all zeros",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bZ-01",
                "parent-id is not",
            ),
            (
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0x",
                "flags are not",
            ),
            (
                "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                "separated by '-'",
            ),
        ];
        for (value, says) in cases {
            let e = parse(value).unwrap_err();
            assert!(e.0.contains(says), "{value:?}: {e}");
            assert!(e.0.contains(FORM), "{value:?}: names the form");
        }
    }
}
