//! Forward proxies (HTTP CONNECT, or absolute-form requests for plain http targets), for
//! receivers that allow-list the sender's egress addresses: `webhook.proxy` for every endpoint,
//! or an endpoint's own. A proxy URL may carry credentials, so nothing here puts the URL, or any
//! part of it but the scheme, in a message.

use std::sync::Arc;

/// What an endpoint's `proxy` column means (NULL: [`ProxyChoice::Default`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyChoice {
    /// webhook.proxy, whatever it is (none when it is empty).
    Default,
    /// No proxy, whatever webhook.proxy says (the column's value `direct`).
    Direct,
    Via(Arc<ProxyUrl>),
}

/// The value of an endpoint's `proxy` column that bypasses webhook.proxy.
pub const DIRECT: &str = "direct";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy URL cannot be parsed")]
    Unparsable,
    #[error("proxy URL must start with http:// or https://, not {0}://")]
    Scheme(String),
    #[error("proxy URL has no host")]
    NoHost,
    #[error(
        "proxy URL must be scheme://[user:password@]host[:port], without a path, query or fragment"
    )]
    Extra,
    #[error("proxy URL must not contain control characters or spaces")]
    Control,
    #[error("proxy URL is too long (at most 2048 bytes)")]
    TooLong,
    #[error("webhook.proxy must not hold a password (Postgres writes a changed setting's value to the server log): put it in the file webhook.proxy_password_file names")]
    PasswordInSetting,
    #[error("webhook.proxy_password_file: {0}")]
    PasswordFile(String),
}

/// A checked proxy URL.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ProxyUrl {
    /// As given (credentials included): what reqwest connects with.
    url: String,
    /// The proxy's host (a name or an address): the SSRF guard does not check the proxy's own
    /// addresses, which an administrator chose (the target's it checks).
    host: String,
}

impl std::fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ProxyUrl({})", self.host)
    }
}

impl ProxyUrl {
    pub fn parse(text: &str) -> Result<ProxyUrl, ProxyError> {
        let text = text.trim();
        if text.len() > 2048 {
            return Err(ProxyError::TooLong);
        }
        if text.chars().any(|c| c.is_control() || c == ' ') {
            return Err(ProxyError::Control);
        }
        let url = url::Url::parse(text).map_err(|e| match e {
            url::ParseError::EmptyHost => ProxyError::NoHost,
            _ => ProxyError::Unparsable,
        })?;
        match url.scheme() {
            "http" | "https" => {}
            // Only the scheme, which carries no secret.
            other => return Err(ProxyError::Scheme(other.chars().take(16).collect())),
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_ascii_lowercase(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(ProxyError::NoHost),
        };
        if !(url.path().is_empty() || url.path() == "/")
            || url.query().is_some()
            || url.fragment().is_some()
        {
            return Err(ProxyError::Extra);
        }
        // What reqwest's proxy matcher parses it with: a URL it cannot read would be no proxy
        // at all (the request sent directly), never an error.
        if text.parse::<http::Uri>().is_err() {
            return Err(ProxyError::Unparsable);
        }
        Ok(ProxyUrl {
            url: text.to_string(),
            host,
        })
    }

    /// The proxy's address, when its URL names one rather than a host name.
    pub fn literal_ip(&self) -> Option<std::net::IpAddr> {
        self.host.parse().ok()
    }

    /// Whether the URL carries a password.
    pub fn has_password(&self) -> bool {
        url::Url::parse(&self.url).is_ok_and(|u| u.password().is_some())
    }

    /// The same proxy with `password` (percent-encoded as a URL needs) for its user.
    pub fn with_password(&self, password: &str) -> Result<ProxyUrl, ProxyError> {
        let mut u = url::Url::parse(&self.url).map_err(|_| ProxyError::Unparsable)?;
        u.set_password(Some(password))
            .map_err(|_| ProxyError::PasswordFile("the proxy URL takes no password".into()))?;
        let mut text = u.to_string();
        // Url adds a "/" path; a proxy URL has none.
        if text.ends_with('/') && !self.url.ends_with('/') {
            text.pop();
        }
        if text.len() > 2048 || text.parse::<http::Uri>().is_err() {
            return Err(ProxyError::PasswordFile(
                "the password makes the proxy URL too long or unreadable".into(),
            ));
        }
        Ok(ProxyUrl {
            url: text,
            host: self.host.clone(),
        })
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    pub(super) fn url(&self) -> &str {
        &self.url
    }

    /// An endpoint's `proxy` column: NULL, `direct`, or a proxy URL.
    pub fn choice(column: Option<&str>) -> Result<ProxyChoice, ProxyError> {
        match column.map(str::trim) {
            None => Ok(ProxyChoice::Default),
            Some(DIRECT) => Ok(ProxyChoice::Direct),
            Some(text) => ProxyUrl::parse(text).map(|p| ProxyChoice::Via(Arc::new(p))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_are_checked_and_never_echoed() {
        let p = ProxyUrl::parse("http://user:s3cret@proxy.internal:3128").unwrap();
        assert_eq!(p.host(), "proxy.internal");
        assert!(!format!("{p:?}").contains("s3cret"));
        assert_eq!(
            ProxyUrl::parse("http://10.0.0.1:3128/").unwrap().host(),
            "10.0.0.1"
        );
        assert!(ProxyUrl::parse("https://[::1]:8443").is_ok());
        for (bad, err) in [
            (
                "socks5://u:s3cret@h:1080",
                ProxyError::Scheme("socks5".into()),
            ),
            ("http://u:s3cret@h:3128/path", ProxyError::Extra),
            ("http://u:s3cret@h:3128?q=1", ProxyError::Extra),
            ("http://u:s3cret@:3128", ProxyError::NoHost),
            ("not a url s3cret", ProxyError::Control),
            ("s3cret", ProxyError::Unparsable),
            ("http://h:99999", ProxyError::Unparsable),
            (
                &format!("http://u:{}@h:1", "s3cret".repeat(400)),
                ProxyError::TooLong,
            ),
        ] {
            let got = ProxyUrl::parse(bad).unwrap_err();
            assert_eq!(got, err, "{bad}");
            assert!(!got.to_string().contains("s3cret"), "{got}");
        }
    }

    #[test]
    fn a_password_is_added_encoded_and_never_shown() {
        let p = ProxyUrl::parse("http://hook@proxy.internal:3128").unwrap();
        assert!(!p.has_password());
        let with = p.with_password("p@ss:w/rd s3cret").unwrap();
        assert!(with.has_password());
        assert_eq!(with.host(), "proxy.internal");
        assert_eq!(
            url::Url::parse(with.url()).unwrap().password(),
            Some("p%40ss%3Aw%2Frd%20s3cret")
        );
        assert!(!format!("{with:?}").contains("s3cret"));
        assert!(ProxyUrl::parse("http://a:b@h:1").unwrap().has_password());
    }

    #[test]
    fn an_endpoints_column_chooses_the_setting_none_or_its_own() {
        assert_eq!(ProxyUrl::choice(None), Ok(ProxyChoice::Default));
        assert_eq!(ProxyUrl::choice(Some("direct")), Ok(ProxyChoice::Direct));
        assert!(matches!(
            ProxyUrl::choice(Some("http://p:3128")),
            Ok(ProxyChoice::Via(_))
        ));
        assert!(ProxyUrl::choice(Some("")).is_err());
    }
}
