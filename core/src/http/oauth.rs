//! OAuth 2.0 client credentials (RFC 6749 §4.4) for receivers that want a bearer token: the
//! token is fetched from the endpoint's token URL (through the same client, so the same SSRF
//! guard, TLS roots and proxy as the webhook itself), cached until shortly before it expires,
//! and fetched again once when the receiver answers 401. Neither the client secret nor a token
//! is ever put in a message.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use sha2::{Digest, Sha256};

/// A token is fetched again this long before it expires (or halfway through a shorter life).
const REFRESH_MARGIN: Duration = Duration::from_secs(30);
/// How long a token whose answer gives no `expires_in` is used.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(300);
/// Most bytes of a token answer read.
const MAX_TOKEN_RESPONSE: usize = 64 * 1024;
/// Most token slots kept (one per endpoint credentials in use); past it they are all dropped.
const MAX_SLOTS: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OAuthError {
    #[error("oauth_token_url, oauth_client_id and oauth_client_secret must be given together")]
    Incomplete,
    #[error("{0} must not be empty")]
    Empty(&'static str),
    #[error("{0} must not contain control characters")]
    Control(&'static str),
    #[error("{0} is too long (at most {1} bytes)")]
    TooLong(&'static str, usize),
}

/// An endpoint's client credentials, checked.
pub struct OAuthClient {
    pub(super) token_url: String,
    client_id: String,
    client_secret: String,
    scope: Option<String>,
    /// Names these credentials (the token cache's key), without holding them in clear.
    key: [u8; 32],
}

impl std::fmt::Debug for OAuthClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OAuthClient({:02x?})", &self.key[..6])
    }
}

fn checked(field: &'static str, value: &str, max: usize) -> Result<(), OAuthError> {
    if value.is_empty() {
        return Err(OAuthError::Empty(field));
    }
    if value.len() > max {
        return Err(OAuthError::TooLong(field, max));
    }
    if value.chars().any(char::is_control) {
        return Err(OAuthError::Control(field));
    }
    Ok(())
}

impl OAuthClient {
    /// Checks the credentials (the token URL is checked as an endpoint URL is, by the caller).
    pub fn new(
        token_url: &str,
        client_id: &str,
        client_secret: &str,
        scope: Option<&str>,
    ) -> Result<Arc<OAuthClient>, OAuthError> {
        checked("oauth_token_url", token_url, 2048)?;
        checked("oauth_client_id", client_id, 1024)?;
        checked("oauth_client_secret", client_secret, 1024)?;
        if let Some(scope) = scope {
            checked("oauth_scope", scope, 1024)?;
        }
        let mut h = Sha256::new();
        for part in [
            token_url,
            client_id,
            client_secret,
            scope.unwrap_or("\u{0}"),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        Ok(Arc::new(OAuthClient {
            token_url: token_url.to_string(),
            client_id: client_id.to_string(),
            client_secret: client_secret.to_string(),
            scope: scope.map(str::to_string),
            key: h.finalize().into(),
        }))
    }

    /// The token request: `grant_type=client_credentials` (and the scope), the client
    /// authenticated with HTTP Basic (RFC 6749 §2.3.1: each part form-encoded first).
    fn request(&self, client: &reqwest::Client) -> reqwest::RequestBuilder {
        let enc = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
        let basic = base64::engine::general_purpose::STANDARD.encode(format!(
            "{}:{}",
            enc(&self.client_id),
            enc(&self.client_secret)
        ));
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "client_credentials");
        if let Some(scope) = &self.scope {
            form.append_pair("scope", scope);
        }
        client
            .post(&self.token_url)
            .header("authorization", format!("Basic {basic}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .header("accept", "application/json")
            .body(form.finish())
    }
}

#[derive(Clone)]
pub(super) struct Token {
    value: String,
    fetched_at: Instant,
    refresh_at: Instant,
}

/// One credentials' token, and the lock a fetch of it holds.
type Slot = Arc<tokio::sync::Mutex<Option<Token>>>;

/// The tokens in use, one slot per credentials; a slot's lock makes one fetch at a time (the
/// requests that need it meanwhile wait for that fetch rather than each making their own).
#[derive(Default)]
pub(super) struct TokenCache {
    slots: Mutex<HashMap<[u8; 32], Slot>>,
}

/// Why no token could be had: refused by the SSRF guard (final) or failed (retried).
pub(super) enum TokenFailure {
    Refused(String),
    Failed(String),
}

impl TokenCache {
    fn slot(&self, oauth: &OAuthClient) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if !slots.contains_key(&oauth.key) && slots.len() >= MAX_SLOTS {
            slots.clear();
        }
        slots.entry(oauth.key).or_default().clone()
    }

    /// A token for these credentials (and when it was fetched): the cached one while it is
    /// fresh, else a new one. `stale`: a token the receiver refused (401), fetched again unless
    /// another request already replaced it.
    pub(super) async fn token<F, Fut>(
        &self,
        oauth: &OAuthClient,
        stale: Option<&str>,
        fetch: F,
    ) -> Result<(String, Instant), TokenFailure>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<Token, TokenFailure>>,
    {
        let slot = self.slot(oauth);
        let mut held = slot.lock().await;
        if let Some(t) = held.as_ref() {
            let refused = stale.is_some_and(|s| s == t.value);
            if !refused && Instant::now() < t.refresh_at {
                return Ok((t.value.clone(), t.fetched_at));
            }
        }
        *held = None;
        let fresh = fetch().await?;
        let got = (fresh.value.clone(), fresh.fetched_at);
        *held = Some(fresh);
        Ok(got)
    }
}

/// Fetches a token with `client` (whose resolver is the SSRF guard; the caller has checked the
/// token URL as it checks a webhook's). The answer is read as a webhook's is, up to
/// MAX_TOKEN_RESPONSE bytes (a longer one is cut, so it does not parse).
pub(super) async fn fetch(
    client: &reqwest::Client,
    oauth: &OAuthClient,
) -> Result<Token, TokenFailure> {
    use super::exchange::{describe, read_capped, refusal};
    let response = match oauth.request(client).send().await {
        Ok(r) => r,
        Err(e) => {
            if let Some(refused) = refusal(&e) {
                return Err(TokenFailure::Refused(format!(
                    "OAuth2 token request refused: {refused}"
                )));
            }
            return Err(TokenFailure::Failed(format!(
                "OAuth2 token request failed: {}",
                describe(&e)
            )));
        }
    };
    let code = response.status().as_u16();
    let (body, _) = read_capped(response, MAX_TOKEN_RESPONSE).await;
    parse_answer(code, body.unwrap_or_default().as_bytes(), Instant::now())
        .map_err(TokenFailure::Failed)
}

/// Reads a token endpoint's answer (RFC 6749 §5.1, §5.2).
fn parse_answer(code: u16, body: &[u8], now: Instant) -> Result<Token, String> {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let text = |key: &str| {
        json.as_ref()
            .and_then(|j| j.get(key))
            .and_then(|v| v.as_str())
            .map(|s| {
                s.chars()
                    .filter(|c| !c.is_control())
                    .take(200)
                    .collect::<String>()
            })
    };
    if !(200..300).contains(&code) {
        // The server's error code (RFC 6749 §5.2) says why; only the registered codes are kept,
        // and never its description: the token server is not trusted, and some echo what they
        // were sent (the client secret) into it, which would land in webhook.attempts.
        const CODES: [&str; 6] = [
            "invalid_request",
            "invalid_client",
            "invalid_grant",
            "unauthorized_client",
            "unsupported_grant_type",
            "invalid_scope",
        ];
        let why = match text("error") {
            Some(e) if CODES.contains(&e.as_str()) => format!(": {e}"),
            _ => String::new(),
        };
        return Err(format!("OAuth2 token request failed: HTTP {code}{why}"));
    }
    let Some(value) = json
        .as_ref()
        .and_then(|j| j.get("access_token"))
        .and_then(|v| v.as_str())
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic()))
    else {
        return Err("OAuth2 token request failed: the answer has no usable access_token".into());
    };
    if let Some(kind) = text("token_type") {
        if !kind.eq_ignore_ascii_case("bearer") {
            return Err(format!(
                "OAuth2 token request failed: token_type {kind:?} is not Bearer"
            ));
        }
    }
    let lifetime = json
        .as_ref()
        .and_then(|j| j.get("expires_in"))
        .and_then(|v| {
            v.as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        })
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(1e9)))
        .unwrap_or(DEFAULT_LIFETIME);
    let usable = lifetime.saturating_sub(REFRESH_MARGIN).max(lifetime / 2);
    Ok(Token {
        value: value.to_string(),
        fetched_at: now,
        refresh_at: now + usable,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_as_rfc_6749_says() {
        let now = Instant::now();
        let t = parse_answer(
            200,
            br#"{"access_token":"abc","token_type":"bearer","expires_in":3600}"#,
            now,
        )
        .ok()
        .unwrap();
        assert_eq!(t.value, "abc");
        assert_eq!(t.refresh_at, now + Duration::from_secs(3570));
        // Short lives are used for half their length; no expires_in: five minutes.
        let t = parse_answer(200, br#"{"access_token":"abc","expires_in":"40"}"#, now)
            .ok()
            .unwrap();
        assert_eq!(t.refresh_at, now + Duration::from_secs(20));
        let t = parse_answer(200, br#"{"access_token":"abc"}"#, now)
            .ok()
            .unwrap();
        assert_eq!(t.refresh_at, now + Duration::from_secs(270));
        for (code, body, err) in [
            (
                401,
                &br#"{"error":"invalid_client","error_description":"bad secret"}"#[..],
                "OAuth2 token request failed: HTTP 401: invalid_client",
            ),
            (
                400,
                &br#"{"error":"client s3cret rejected"}"#[..],
                "OAuth2 token request failed: HTTP 400",
            ),
            (503, b"down", "OAuth2 token request failed: HTTP 503"),
            (
                200,
                br#"{"token_type":"bearer"}"#,
                "OAuth2 token request failed: the answer has no usable access_token",
            ),
            (
                200,
                br#"{"access_token":"a b"}"#,
                "OAuth2 token request failed: the answer has no usable access_token",
            ),
            (
                200,
                br#"{"access_token":"abc","token_type":"mac"}"#,
                "OAuth2 token request failed: token_type \"mac\" is not Bearer",
            ),
        ] {
            assert_eq!(parse_answer(code, body, now).err().unwrap(), err);
        }
    }

    #[test]
    fn credentials_are_checked_and_never_shown() {
        let c = OAuthClient::new("https://auth/token", "id", "s3cret", Some("a b")).unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(
            OAuthClient::new("https://auth/token", "id", "", None).unwrap_err(),
            OAuthError::Empty("oauth_client_secret")
        );
        assert_eq!(
            OAuthClient::new("https://auth/token", "i\nd", "s", None).unwrap_err(),
            OAuthError::Control("oauth_client_id")
        );
        // Different credentials, different cache keys.
        let d = OAuthClient::new("https://auth/token", "id", "s3cret", Some("a")).unwrap();
        assert_ne!(c.key, d.key);
    }

    #[test]
    fn the_request_is_basic_authenticated_and_form_encoded() {
        let c = OAuthClient::new(
            "http://127.0.0.1:9/token",
            "my id",
            "p:ss&w",
            Some("hooks.write"),
        )
        .unwrap();
        let req = c.request(&reqwest::Client::new()).build().unwrap();
        let auth = req.headers()["authorization"].to_str().unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.strip_prefix("Basic ").unwrap())
            .unwrap();
        assert_eq!(decoded, b"my+id:p%3Ass%26w");
        let body = std::str::from_utf8(req.body().unwrap().as_bytes().unwrap()).unwrap();
        assert_eq!(body, "grant_type=client_credentials&scope=hooks.write");
    }
}
