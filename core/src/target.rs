//! Where a webhook may be sent: URL validation and the SSRF guard's address policy.
//!
//! The guard is applied to the addresses a host name actually resolves to, at connect time
//! (see `http/resolver.rs`), so a name that resolves to a private address is refused too.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest URL accepted.
pub const MAX_URL_LEN: usize = 2048;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UrlError {
    #[error("URL is empty")]
    Empty,
    #[error("URL is longer than {MAX_URL_LEN} bytes")]
    TooLong,
    #[error("URL is not valid: {0}")]
    Unparseable(String),
    #[error("URL scheme \"{0}\" is not allowed: use http or https")]
    BadScheme(String),
    #[error("URL scheme http is not allowed while webhook.https_only is on")]
    HttpsOnly,
    #[error("URL has no host")]
    NoHost,
    #[error(
        "URL must not contain credentials: put them in the endpoint's headers (e.g. Authorization)"
    )]
    Credentials,
    #[error("URL must not contain a fragment (#...)")]
    Fragment,
}

/// Checks an endpoint URL and returns its normalised form. Error texts never echo the URL,
/// which may carry a token.
pub fn validate_url(text: &str, https_only: bool) -> Result<url::Url, UrlError> {
    let t = text.trim();
    if t.is_empty() {
        return Err(UrlError::Empty);
    }
    if t.len() > MAX_URL_LEN {
        return Err(UrlError::TooLong);
    }
    let url = url::Url::parse(t).map_err(|e| UrlError::Unparseable(e.to_string()))?;
    match url.scheme() {
        "https" => {}
        "http" if https_only => return Err(UrlError::HttpsOnly),
        "http" => {}
        other => return Err(UrlError::BadScheme(other.chars().take(32).collect())),
    }
    match url.host_str() {
        None | Some("") => return Err(UrlError::NoHost),
        Some(_) => {}
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::Credentials);
    }
    if url.fragment().is_some() {
        return Err(UrlError::Fragment);
    }
    Ok(url)
}

/// Why an address is not a public unicast address, or `None` when it is.
pub fn private_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_reason(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_reason(v4);
            }
            v6_reason(v6)
        }
    }
}

fn v4_reason(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b, c) {
        _ if ip.is_unspecified() => "unspecified",
        (0, _, _) => "\"this network\" (0.0.0.0/8)",
        (127, _, _) => "loopback",
        (10, _, _) => "private (10.0.0.0/8)",
        (172, 16..=31, _) => "private (172.16.0.0/12)",
        (192, 168, _) => "private (192.168.0.0/16)",
        (169, 254, _) => "link-local (169.254.0.0/16, cloud metadata)",
        (100, 64..=127, _) => "carrier-grade NAT (100.64.0.0/10)",
        (192, 0, 0) => "IETF protocol assignments (192.0.0.0/24)",
        (192, 0, 2) | (198, 51, 100) | (203, 0, 113) => "documentation range",
        (198, 18..=19, _) => "benchmarking (198.18.0.0/15)",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved (240.0.0.0/4) or broadcast",
        _ => return None,
    })
}

fn v6_reason(ip: Ipv6Addr) -> Option<&'static str> {
    let seg = ip.segments();
    Some(match seg[0] {
        _ if ip.is_unspecified() => "unspecified",
        _ if ip.is_loopback() => "loopback",
        0xfc00..=0xfdff => "unique local (fc00::/7)",
        0xfe80..=0xfebf => "link-local (fe80::/10)",
        0xfec0..=0xfeff => "site-local (fec0::/10)",
        0xff00..=0xffff => "multicast",
        0x0064 if seg[1] == 0xff9b => return ip_in_nat64(seg),
        0x2001 if seg[1] == 0x0db8 => "documentation range",
        0x2002 => {
            return v4_reason(Ipv4Addr::new(
                (seg[1] >> 8) as u8,
                seg[1] as u8,
                (seg[2] >> 8) as u8,
                seg[2] as u8,
            ))
        }
        0 if seg[1..6].iter().all(|&s| s == 0) => "IPv4-compatible",
        _ => return None,
    })
}

/// NAT64 (64:ff9b::/96) embeds an IPv4 address; judge that address.
fn ip_in_nat64(seg: [u16; 8]) -> Option<&'static str> {
    v4_reason(Ipv4Addr::new(
        (seg[6] >> 8) as u8,
        seg[6] as u8,
        (seg[7] >> 8) as u8,
        seg[7] as u8,
    ))
}

/// An address range written in CIDR form, e.g. `10.1.0.0/16` or `fd00::/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    prefix: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("\"{0}\" is not a CIDR range such as 10.0.0.0/8 or fd00::/8")]
pub struct CidrError(pub String);

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, CidrError> {
        let t = text.trim();
        let err = || CidrError(t.chars().take(64).collect());
        let (addr, prefix) = match t.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (t, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| err())?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) => p.parse::<u8>().ok().filter(|p| *p <= max).ok_or_else(err)?,
            None => max,
        };
        Ok(Cidr { net, prefix })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) if self.net.is_ipv4() => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            other => other,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.prefix),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], prefix: u8) -> bool {
    let full = (prefix / 8) as usize;
    let rest = prefix % 8;
    if a[..full] != b[..full] {
        return false;
    }
    rest == 0 || (a[full] ^ b[full]) & (0xffu8 << (8 - rest)) == 0
}

/// Parses `webhook.allowed_networks`: a comma-separated list of CIDR ranges (empty = none).
pub fn parse_networks(text: &str) -> Result<Vec<Cidr>, CidrError> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(Cidr::parse)
        .collect()
}

/// The SSRF guard's policy, built from the GUCs at the time of sending.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    pub allow_private: bool,
    pub allowed: Vec<Cidr>,
}

impl AddressPolicy {
    /// `Err(reason)` when the guard refuses to connect to `ip`.
    pub fn check(&self, ip: IpAddr) -> Result<(), String> {
        if self.allow_private || self.allowed.iter().any(|c| c.contains(ip)) {
            return Ok(());
        }
        match private_reason(ip) {
            None => Ok(()),
            Some(why) => Err(format!(
                "refused to connect to {ip}: {why} address (set webhook.allow_private_networks or webhook.allowed_networks to allow it)"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn urls_are_validated_with_clear_errors() {
        assert!(validate_url("https://crm.example.com/hooks?x=1", false).is_ok());
        assert!(validate_url("http://127.0.0.1:8080/", false).is_ok());
        assert_eq!(validate_url("  ", false), Err(UrlError::Empty));
        assert_eq!(
            validate_url("ftp://x.example/", false),
            Err(UrlError::BadScheme("ftp".into()))
        );
        assert_eq!(
            validate_url("file:///etc/passwd", false),
            Err(UrlError::BadScheme("file".into()))
        );
        assert_eq!(
            validate_url("http://x.example/", true),
            Err(UrlError::HttpsOnly)
        );
        assert_eq!(
            validate_url("https://user:pw@x.example/", false),
            Err(UrlError::Credentials)
        );
        assert_eq!(
            validate_url("https://x.example/#frag", false),
            Err(UrlError::Fragment)
        );
        assert!(matches!(
            validate_url("not a url", false),
            Err(UrlError::Unparseable(_))
        ));
        assert!(matches!(
            validate_url("http://", false),
            Err(UrlError::Unparseable(_))
        ));
        assert_eq!(
            validate_url(&format!("https://x.example/{}", "a".repeat(3000)), false),
            Err(UrlError::TooLong)
        );
    }

    #[test]
    fn url_errors_never_echo_the_url() {
        let e = validate_url("https://user:hunter2@x.example/", false)
            .unwrap_err()
            .to_string();
        assert!(!e.contains("hunter2"));
    }

    #[test]
    fn private_and_special_addresses_are_classified() {
        for a in [
            "127.0.0.1",
            "127.9.9.9",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00::1",
            "fe80::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::1",
        ] {
            assert!(private_reason(ip(a)).is_some(), "{a} should be refused");
        }
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(private_reason(ip(a)), None, "{a} should be allowed");
        }
    }

    #[test]
    fn cidr_ranges_parse_and_match() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(c.contains(ip("::ffff:10.1.0.9")));
        assert!(!c.contains(ip("10.2.0.1")));
        let c = Cidr::parse("fd00::/8").unwrap();
        assert!(c.contains(ip("fd12::1")));
        assert!(!c.contains(ip("fe80::1")));
        assert!(Cidr::parse("127.0.0.1").unwrap().contains(ip("127.0.0.1")));
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(ip("8.8.8.8")));
        assert!(Cidr::parse("10.0.0.0/33").is_err());
        assert!(Cidr::parse("banana/8").is_err());
        assert_eq!(
            parse_networks(" 10.0.0.0/8, ,127.0.0.1/32 ").unwrap().len(),
            2
        );
        assert!(parse_networks("10.0.0.0/8,x").is_err());
    }

    #[test]
    fn policy_opens_only_what_it_is_told() {
        let strict = AddressPolicy::default();
        assert!(strict
            .check(ip("127.0.0.1"))
            .unwrap_err()
            .contains("loopback"));
        assert!(strict.check(ip("93.184.216.34")).is_ok());
        let one_range = AddressPolicy {
            allow_private: false,
            allowed: parse_networks("127.0.0.0/8").unwrap(),
        };
        assert!(one_range.check(ip("127.0.0.1")).is_ok());
        assert!(one_range.check(ip("10.0.0.1")).is_err());
        let open = AddressPolicy {
            allow_private: true,
            allowed: vec![],
        };
        assert!(open.check(ip("169.254.169.254")).is_ok());
    }
}
