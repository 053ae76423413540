//! Property tests (bounded fuzzing on stable Rust) of everything that parses untrusted input:
//! URLs, addresses and CIDR lists (the SSRF guard), retry schedules and Retry-After, secrets,
//! and endpoint headers. Each property runs a few thousand generated cases in `cargo test`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, SystemTime};

use proptest::prelude::*;

use crate::retry::{self, Outcome, Schedule, Verdict};
use crate::target::{self, AddressPolicy, Cidr};
use crate::{request, signing};

fn config() -> ProptestConfig {
    // Failures found here are kept as ordinary unit tests next to the code, not as seed files.
    ProptestConfig {
        cases: 3000,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// URL-ish strings: sometimes random junk, sometimes built from plausible parts.
fn urlish() -> impl Strategy<Value = String> {
    let scheme = prop_oneof![
        "http",
        "https",
        "ftp",
        "file",
        "javascript",
        "HTTP",
        "",
        "h t t p"
    ];
    let userinfo = prop_oneof![
        Just(String::new()),
        "[a-z]{1,5}@",
        "[a-z]{1,5}:[a-z]{1,5}@",
        ":@"
    ];
    let host = prop_oneof![
        "[a-z0-9.-]{0,20}",
        "\\[[0-9a-f:]{2,20}\\]",
        "[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}\\.[0-9]{1,3}",
        "\\PC{0,10}",
    ];
    let rest = prop_oneof![
        Just(String::new()),
        ":[0-9]{1,6}",
        "/\\PC{0,30}",
        "\\?[a-z=&]{0,10}",
        "#\\PC{0,5}",
        "[\r\n ]{1,3}"
    ];
    prop_oneof![
        "\\PC{0,60}",
        (scheme, userinfo, host, rest).prop_map(|(s, u, h, r)| format!("{s}://{u}{h}{r}")),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn accepted_urls_are_http_with_a_host_and_no_credentials(text in urlish(), https_only in any::<bool>()) {
        if let Ok(url) = target::validate_url(&text, https_only) {
            prop_assert!(url.scheme() == "https" || (url.scheme() == "http" && !https_only));
            prop_assert!(url.host_str().is_some_and(|h| !h.is_empty()));
            prop_assert!(url.username().is_empty() && url.password().is_none());
            prop_assert!(url.fragment().is_none());
            prop_assert!(!url.as_str().contains(['\r', '\n']));
            // Normalising is stable: the stored form validates to itself.
            let again = target::validate_url(url.as_str(), https_only).unwrap();
            prop_assert_eq!(again.as_str(), url.as_str());
        }
    }

    #[test]
    fn ipv4_mapped_addresses_are_judged_like_ipv4(a in any::<u32>()) {
        let v4 = Ipv4Addr::from(a);
        let mapped = IpAddr::V6(v4.to_ipv6_mapped());
        prop_assert_eq!(target::private_reason(IpAddr::V4(v4)), target::private_reason(mapped));
    }

    #[test]
    fn the_guard_refuses_every_loopback_private_and_link_local_address(
        a in any::<u32>(), b in any::<u128>(), allow in any::<bool>()
    ) {
        let strict = AddressPolicy { allow_private: allow, allowed: vec![] };
        for ip in [IpAddr::V4(Ipv4Addr::from(a)), IpAddr::V6(Ipv6Addr::from(b))] {
            let special = match ip {
                IpAddr::V4(v4) => v4.is_loopback() || v4.is_private() || v4.is_link_local() || v4.is_unspecified()
                    || v4.is_broadcast() || v4.is_multicast(),
                IpAddr::V6(v6) => v6.is_loopback() || v6.is_unspecified() || v6.is_multicast()
                    || (v6.segments()[0] & 0xfe00) == 0xfc00 || (v6.segments()[0] & 0xffc0) == 0xfe80,
            };
            if special {
                prop_assert_eq!(strict.check(ip).is_ok(), allow, "{}", ip);
            }
            if allow {
                prop_assert!(strict.check(ip).is_ok());
            }
        }
    }

    #[test]
    fn cidr_ranges_contain_their_own_network(a in any::<u32>(), prefix in 0u8..=32, text in "\\PC{0,24}") {
        let net = Ipv4Addr::from(a & (u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)));
        let cidr = Cidr::parse(&format!("{net}/{prefix}")).unwrap();
        prop_assert!(cidr.contains(IpAddr::V4(net)));
        let too_long = format!("{}/{}", net, u32::from(prefix) + 33);
        prop_assert!(Cidr::parse(&too_long).is_err());
        let _ = target::parse_networks(&text);
    }

    #[test]
    fn schedules_parse_or_refuse_but_never_panic(text in "\\PC{0,40}") {
        if let Ok(s) = Schedule::parse(&text) {
            prop_assert!(!s.steps().is_empty() && s.steps().len() <= retry::MAX_STEPS);
            prop_assert!(s.steps().iter().all(|d| *d <= retry::MAX_STEP));
        }
    }

    #[test]
    fn schedules_round_trip(steps in prop::collection::vec(0u64..604_800_000, 1..20)) {
        let text = steps.iter().map(|ms| format!("{ms}ms")).collect::<Vec<_>>().join(",");
        let parsed = Schedule::parse(&text).unwrap();
        prop_assert_eq!(parsed.steps(), &steps.iter().map(|ms| Duration::from_millis(*ms)).collect::<Vec<_>>()[..]);
    }

    #[test]
    fn decisions_stay_within_the_schedule(
        code in 100u16..600, attempt in 1u32..20, max in 1u32..20, jitter in -5.0f64..5.0,
        retry_after in prop::option::of(0u64..10_000_000),
    ) {
        let schedule = Schedule::default();
        let outcome = Outcome::Status { code, retry_after: retry_after.map(Duration::from_secs) };
        match retry::decide(&outcome, attempt, max, &schedule, jitter) {
            Verdict::Delivered => prop_assert!((200..300).contains(&code)),
            Verdict::Gone => prop_assert_eq!(code, 410),
            Verdict::Failed => prop_assert!(attempt >= max),
            Verdict::Retry(d) => {
                prop_assert!(attempt < max);
                prop_assert!(d <= retry::MAX_STEP * 2);
                prop_assert!(d >= schedule.step_after(attempt).mul_f64(0.8) - Duration::from_millis(1));
            }
        }
    }

    #[test]
    fn retry_after_never_panics_and_is_bounded(text in "\\PC{0,40}") {
        if let Some(d) = retry::parse_retry_after(&text, SystemTime::now()) {
            prop_assert!(d <= retry::MAX_STEP);
        }
    }

    #[test]
    fn secrets_decode_or_refuse_without_echoing(text in "\\PC{0,80}") {
        match signing::decode_secret(&text) {
            Ok(key) => prop_assert!((signing::MIN_KEY_BYTES..=signing::MAX_KEY_BYTES).contains(&key.len())),
            Err(e) => {
                let msg = e.to_string();
                prop_assert!(text.chars().count() < 6 || !msg.contains(&text));
            }
        }
    }

    #[test]
    fn accepted_headers_cannot_smuggle_lines(
        pairs in prop::collection::vec(("\\PC{0,12}|[A-Za-z-]{1,12}", "\\PC{0,20}|[\\x00-\\x7f]{0,20}"), 0..40)
    ) {
        let obj: serde_json::Map<String, serde_json::Value> =
            pairs.into_iter().map(|(k, v)| (k, serde_json::Value::String(v))).collect();
        let json = serde_json::Value::Object(obj).to_string();
        if let Ok(headers) = request::parse_headers(&json) {
            prop_assert!(headers.len() <= request::MAX_HEADERS);
            for (name, value) in headers {
                prop_assert!(!name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':'));
                prop_assert!(!value.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0));
                prop_assert!(!request::RESERVED_HEADERS.contains(&name.to_ascii_lowercase().as_str()));
                prop_assert!(http_header_ok(&name, &value));
            }
        }
    }
}

/// The HTTP library accepts what we accepted (so a request is never refused at send time).
fn http_header_ok(name: &str, value: &str) -> bool {
    reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
        && reqwest::header::HeaderValue::from_str(value).is_ok()
}
