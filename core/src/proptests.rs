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

    /// The body's length as computed is the length of the body as built, whatever the names
    /// (quotes, backslashes, control characters, any Unicode), images and txid.
    #[test]
    fn a_row_changes_body_length_is_computed_exactly(
        schema in "\\PC{0,12}|[\"\\\\\u{0}-\u{1f}a-z\u{e9}\u{1F600}]{0,12}",
        table in "\\PC{0,12}|[\"\\\\\u{0}-\u{1f}a-z\u{e9}]{0,12}",
        op in prop_oneof![Just("INSERT"), Just("UPDATE"), Just("DELETE")],
        new in proptest::option::of("\\PC{0,40}"),
        old in proptest::option::of("\\PC{0,40}"),
        txid in any::<i64>(),
        at in 0i64..253_402_300_799_000_000,
    ) {
        let event_type = format!("{schema}.{table}.{}", op.to_ascii_lowercase());
        let data = request::row_change_data(&schema, &table, op, new.as_deref(), old.as_deref(), txid);
        let body = request::envelope(&event_type, at, &data);
        let len = request::row_change_body_len(
            &event_type,
            &schema,
            &table,
            op,
            new.as_deref().map_or(4, str::len),
            old.as_deref().map_or(4, str::len),
            txid,
        );
        prop_assert_eq!(len, body.len(), "{}", body);
    }

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

    /// Addresses drawn FROM each refused range (uniform 32- or 128-bit addresses almost never
    /// land in 169.254/16, 192.168/16, ::1 or CGNAT): every one is refused with its range's
    /// reason, as IPv4 and as IPv4-mapped IPv6, unless the range is opened.
    #[test]
    fn every_address_of_every_refused_range_is_refused(
        (range, ip) in refused_address(), other in any::<u32>()
    ) {
        let strict = AddressPolicy::default();
        let err = strict.check(ip).expect_err(&format!("{ip} ({range}) must be refused"));
        prop_assert!(err.starts_with(&format!("refused to connect to {ip}: ")), "{}", err);
        prop_assert!(err.contains(reason_word(range)), "{} ({}): {}", ip, range, err);
        if let IpAddr::V4(v4) = ip {
            let mapped = IpAddr::V6(v4.to_ipv6_mapped());
            let err = strict.check(mapped).expect_err(&format!("{mapped} ({range}) must be refused"));
            prop_assert!(err.contains(reason_word(range)), "{} ({}): {}", mapped, range, err);
        }
        // Opening the range (and only it) lets the address through; another range stays shut.
        let opened = AddressPolicy { allow_private: false, allowed: vec![Cidr::parse(range).unwrap()] };
        prop_assert!(opened.check(ip).is_ok(), "{} with {} opened", ip, range);
        let elsewhere = AddressPolicy {
            allow_private: false,
            allowed: vec![Cidr::parse(&format!("{}/32", Ipv4Addr::from(other | 1))).unwrap()],
        };
        if !Cidr::parse(&format!("{}/32", Ipv4Addr::from(other | 1))).unwrap().contains(ip) {
            prop_assert!(elsewhere.check(ip).is_err(), "{} with only {} opened", ip, Ipv4Addr::from(other | 1));
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

    /// Real `whsec_` secrets (base64 of 24-64 random bytes, as generated or as Svix issues them),
    /// and the same damaged the ways a paste goes wrong: whatever the error (refused, too short,
    /// too long), it names neither the secret nor its base64 key nor any 8 characters of it.
    #[test]
    fn errors_never_echo_a_whsec_secret_or_its_key(
        key in prop::collection::vec(any::<u8>(), 24..=64),
        damage in 0u8..6, at in any::<prop::sample::Index>(), cut in 1usize..20,
        junk in prop::sample::select(vec!['!', '*', ' ', '-', '_', '.', '\u{e9}', '%']),
    ) {
        let secret = signing::encode_secret(&key);
        let b64 = secret.strip_prefix("whsec_").unwrap().to_string();
        prop_assert!(secret.starts_with("whsec_") && b64.len() >= 32);
        let pos = at.index(b64.len());
        let damaged = match damage {
            0 => secret.clone(),                                                 // as issued
            1 => format!("whsec_{}{junk}{}", &b64[..pos], &b64[pos..]),           // a stray char
            2 => format!("whsec_{}", &b64[..b64.len().saturating_sub(cut)]),     // cut short
            3 => format!("whsec_{b64}{b64}"),                                   // pasted twice
            4 => format!("whsec_{}", &b64[..pos.min(20)]),                       // far too short
            _ => b64.clone(),                                                   // no prefix
        };
        let key_part = damaged.strip_prefix("whsec_").unwrap_or(&damaged).to_string();
        let mut errors = vec![];
        match signing::decode_secret(&damaged) {
            Err(e) => errors.push(e.to_string()),
            // As issued (with or without its prefix), it decodes to its key.
            Ok(k) => prop_assert!(damage > 0 && damage < 5 || k == key),
        }
        if damage == 4 {
            prop_assert!(signing::decode_secret(&damaged).is_err(), "{} is far too short", damaged);
        }
        // The secret in the places a user might put it by mistake: a URL, a header value.
        if let Err(e) = target::validate_url(&format!("https://x.example/#{damaged}"), false) {
            errors.push(e.to_string());
        }
        if let Err(e) = target::validate_url(&format!("https://u:{damaged}@x.example/"), false) {
            errors.push(e.to_string());
        }
        if let Err(e) = request::parse_headers(&serde_json::json!({ "Authorization": format!("{damaged}\r\n") }).to_string()) {
            errors.push(e.to_string());
        }
        prop_assert!(errors.len() >= 2, "{} refused in fewer places than expected: {:?}", damaged, errors);
        for msg in &errors {
            prop_assert!(!msg.contains(&secret) && !msg.contains(&b64), "{}", msg);
            // (A damaged key cut to nothing leaves only the prefix, which errors may name.)
            prop_assert!(key_part.len() < 8 || !msg.contains(&damaged) && !msg.contains(&key_part), "{}", msg);
            let chars: Vec<char> = key_part.chars().collect();
            for w in chars.windows(8) {
                let w: String = w.iter().collect();
                prop_assert!(!msg.contains(&w), "the error {:?} contains {:?} of the key", msg, w);
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

/// The ranges the README says the guard refuses, as CIDR text, each with an address drawn from
/// inside it (uniformly over the range's host bits).
fn refused_address() -> impl Strategy<Value = (&'static str, IpAddr)> {
    fn v4(net: [u8; 4], prefix: u32) -> impl Strategy<Value = IpAddr> {
        let base = u32::from(Ipv4Addr::from(net));
        let host_mask = u32::MAX >> prefix;
        any::<u32>().prop_map(move |r| IpAddr::V4(Ipv4Addr::from(base | (r & host_mask))))
    }
    fn v6(net: u128, prefix: u32) -> impl Strategy<Value = IpAddr> {
        let host_mask = u128::MAX.checked_shr(prefix).unwrap_or(0);
        any::<u128>().prop_map(move |r| IpAddr::V6(Ipv6Addr::from(net | (r & host_mask))))
    }
    prop_oneof![
        v4([169, 254, 0, 0], 16).prop_map(|ip| ("169.254.0.0/16", ip)),
        v4([192, 168, 0, 0], 16).prop_map(|ip| ("192.168.0.0/16", ip)),
        v4([10, 0, 0, 0], 8).prop_map(|ip| ("10.0.0.0/8", ip)),
        v4([172, 16, 0, 0], 12).prop_map(|ip| ("172.16.0.0/12", ip)),
        v4([127, 0, 0, 0], 8).prop_map(|ip| ("127.0.0.0/8", ip)),
        v4([100, 64, 0, 0], 10).prop_map(|ip| ("100.64.0.0/10", ip)),
        Just(("::1/128", IpAddr::V6(Ipv6Addr::LOCALHOST))),
        v6(0xfc00 << 112, 7).prop_map(|ip| ("fc00::/7", ip)),
        v6(0xfe80 << 112, 10).prop_map(|ip| ("fe80::/10", ip)),
    ]
}

/// The word the guard's refusal uses for a range.
fn reason_word(range: &str) -> &'static str {
    match range {
        "169.254.0.0/16" => "link-local",
        "192.168.0.0/16" => "private (192.168.0.0/16)",
        "10.0.0.0/8" => "private (10.0.0.0/8)",
        "172.16.0.0/12" => "private (172.16.0.0/12)",
        "127.0.0.0/8" | "::1/128" => "loopback",
        "100.64.0.0/10" => "carrier-grade NAT",
        "fc00::/7" => "unique local",
        "fe80::/10" => "link-local",
        _ => unreachable!("{range}"),
    }
}

/// The HTTP library accepts what we accepted (so a request is never refused at send time).
fn http_header_ok(name: &str, value: &str) -> bool {
    reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_ok()
        && reqwest::header::HeaderValue::from_str(value).is_ok()
}
