//! One exchange: sign the job's body, POST it, time the attempt, cap the response body, and
//! classify what went wrong (refused by the guard, timed out, transport error, HTTP status).

use std::net::IpAddr;
use std::time::{Duration, Instant, SystemTime};

use super::oauth::{self, OAuthClient, TokenCache, TokenFailure};
use super::resolver::{GuardedResolver, Refused};
use super::{Finished, HttpConfig, Job, ProxyUrl};
use crate::retry::{self, Outcome};
use crate::signing;

/// Runs one attempt under the job's deadline and reports what happened.
/// `proxy_guard`: for a request through a forward proxy, the guard that checks its target (the
/// proxy resolves and connects to it, so the client's own resolver never sees it);
/// `own_proxy`: the endpoint's own proxy (not webhook.proxy), whose address the guard checks too.
pub(super) async fn attempt(
    client: &reqwest::Client,
    config: &HttpConfig,
    proxy_guard: Option<&GuardedResolver>,
    own_proxy: Option<&ProxyUrl>,
    tokens: &TokenCache,
    job: Job,
) -> Finished {
    let started_at = SystemTime::now();
    let clock = Instant::now();
    let (outcome, response_body, error) = match tokio::time::timeout(
        job.timeout,
        exchange(client, config, proxy_guard, own_proxy, tokens, &job),
    )
    .await
    {
        Ok(result) => result,
        Err(_) => (
            Outcome::Timeout,
            None,
            Some(format!("timed out after {}", human(job.timeout))),
        ),
    };
    Finished {
        delivery_id: job.delivery_id,
        endpoint_id: job.endpoint_id,
        attempt: job.attempt,
        started_at,
        duration: clock.elapsed(),
        outcome,
        response_body,
        error,
    }
}

/// Sends the job once: the outcome, the capped response body, and why it failed, if it did.
/// What the SSRF guard and webhook.https_only check of a URL before anything is sent to it
/// (the guarded resolver checks the addresses of a host name it resolves itself).
async fn check_target(
    config: &HttpConfig,
    proxy_guard: Option<&GuardedResolver>,
    url: &str,
) -> Result<(), String> {
    if config.https_only && !url.starts_with("https:") {
        return Err("refused to send over plain http while webhook.https_only is on".into());
    }
    // Literal addresses never reach the resolver, so the guard checks them here.
    if let Some(ip) = literal_ip(url) {
        config.policy.check(ip)?;
    } else if let Some(guard) = proxy_guard {
        // Through a proxy the target's name is resolved by the proxy: it is resolved and
        // checked here first, as it would be without one (the proxy's own lookup may differ).
        if let Some(host) = url::Url::parse(url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_string))
        {
            // Every address: the proxy chooses among them, not the guard.
            guard.check_every_address(&host).await?;
        }
    }
    Ok(())
}

/// A 401 makes the worker fetch a token again when the one it sent is at least this old (or the
/// receiver says `invalid_token`).
const TOKEN_RETRY_AGE: Duration = Duration::from_secs(10);

/// The bearer token for a job with OAuth2 credentials (`stale`: the one its receiver refused),
/// and when it was fetched.
async fn bearer(
    client: &reqwest::Client,
    config: &HttpConfig,
    proxy_guard: Option<&GuardedResolver>,
    tokens: &TokenCache,
    oauth: &OAuthClient,
    stale: Option<&str>,
) -> Result<(String, Instant), (Outcome, Option<String>, Option<String>)> {
    // The token URL is checked when a token is fetched, not for every use of a cached one.
    tokens
        .token(oauth, stale, || async {
            check_target(config, proxy_guard, &oauth.token_url)
                .await
                .map_err(|why| {
                    TokenFailure::Refused(format!("OAuth2 token request refused: {why}"))
                })?;
            oauth::fetch(client, oauth).await
        })
        .await
        .map_err(|f| match f {
            TokenFailure::Refused(why) => (Outcome::Refused, None, Some(why)),
            TokenFailure::Failed(why) => (Outcome::Transport, None, Some(why)),
        })
}

async fn exchange(
    client: &reqwest::Client,
    config: &HttpConfig,
    proxy_guard: Option<&GuardedResolver>,
    own_proxy: Option<&ProxyUrl>,
    tokens: &TokenCache,
    job: &Job,
) -> (Outcome, Option<String>, Option<String>) {
    // An endpoint's own proxy is its administrator's choice, not the superuser's: the guard
    // checks its address as a target's (a name, when the client resolves it; a literal here).
    if let Some(ip) = own_proxy.and_then(ProxyUrl::literal_ip) {
        if let Err(why) = config.policy.check(ip) {
            return (
                Outcome::Refused,
                None,
                Some(format!("endpoint proxy: {why}")),
            );
        }
    }
    if let Err(why) = check_target(config, proxy_guard, &job.url).await {
        return (Outcome::Refused, None, Some(why));
    }
    let mut token = None;
    if let Some(oauth) = &job.oauth {
        match bearer(client, config, proxy_guard, tokens, oauth, None).await {
            Ok(t) => token = Some(t),
            Err(failed) => return failed,
        }
    }
    let fetched_at = token.as_ref().map(|(_, at)| *at);
    let token = token.map(|(t, _)| t);
    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let signature = signing::signatures_header(
        &job.keys,
        &job.signing_keys,
        &job.msg_id,
        timestamp,
        job.body.as_bytes(),
    );
    let request = |token: Option<&str>| {
        let mut request = client
            .post(&job.url)
            .header("content-type", "application/json")
            .header("webhook-id", &job.msg_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature.as_str());
        for (name, value) in &job.headers {
            // The bearer token replaces an Authorization header of the endpoint's own.
            if token.is_some() && name.eq_ignore_ascii_case("authorization") {
                continue;
            }
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        request.body(job.body.clone())
    };
    let mut response = match request(token.as_deref()).send().await {
        Ok(r) => r,
        Err(e) => return transport_failure(e),
    };
    // A 401 with a token: the token is fetched again (unless another request already did)
    // and the request sent once more, within the same attempt and deadline.
    // Only when the receiver says the token is bad (RFC 6750 `invalid_token`) or the token is
    // not brand new: a receiver that answers 401 for another reason (its signature check,
    // say) would otherwise cost a token request per attempt, and could get the client locked
    // out at the token server.
    let invalid_token = response
        .headers()
        .get_all("www-authenticate")
        .iter()
        .any(|v| v.to_str().is_ok_and(|v| v.contains("invalid_token")));
    let not_new = fetched_at.is_some_and(|at| at.elapsed() >= TOKEN_RETRY_AGE);
    if let (401, Some(oauth), Some(refused), true) = (
        response.status().as_u16(),
        &job.oauth,
        &token,
        invalid_token || not_new,
    ) {
        let fresh = match bearer(client, config, proxy_guard, tokens, oauth, Some(refused)).await {
            Ok((t, _)) => t,
            Err(failed) => return failed,
        };
        response = match request(Some(&fresh)).send().await {
            Ok(r) => r,
            Err(e) => return transport_failure(e),
        };
    }
    let code = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
    let (body, body_error) = read_capped(response, config.response_body_limit).await;
    let outcome = Outcome::Status { code, retry_after };
    let error = match code {
        200..=299 => None,
        300..=399 => Some(format!("HTTP {code}: redirects are not followed")),
        _ => Some(format!("HTTP {code}")),
    };
    (outcome, body, error.or(body_error))
}

/// Reads at most `limit` bytes of the body; a longer body is cut and the connection dropped.
pub(super) async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> (Option<String>, Option<String>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if chunk.len() > room {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                return (
                    Some(String::from_utf8_lossy(&buf).into_owned()),
                    Some(format!("reading the response body: {}", describe(&e))),
                )
            }
        }
    }
    (Some(String::from_utf8_lossy(&buf).into_owned()), None)
}

/// The SSRF guard's refusal somewhere in a request's error, if that is why it failed.
pub(super) fn refusal(e: &reqwest::Error) -> Option<String> {
    find_source::<Refused>(e).map(|r| r.0.clone())
}

fn transport_failure(e: reqwest::Error) -> (Outcome, Option<String>, Option<String>) {
    if let Some(refused) = find_source::<Refused>(&e) {
        return (Outcome::Refused, None, Some(refused.0.clone()));
    }
    let outcome = if e.is_timeout() {
        Outcome::Timeout
    } else {
        Outcome::Transport
    };
    (outcome, None, Some(describe(&e)))
}

fn find_source<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

/// The error and its causes in one line, without the URL (it may carry a token).
pub(super) fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "bad response body"
    } else if e.is_request() {
        "request failed"
    } else {
        "HTTP error"
    };
    let mut parts = vec![kind.to_string()];
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

fn literal_ip(url: &str) -> Option<IpAddr> {
    match url::Url::parse(url).ok()?.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

fn human(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use crate::http::testutil::{config, job, one_shot, wait_one};
    use crate::http::HttpRuntime;
    use crate::retry::Outcome;
    use crate::signing;
    use std::net::TcpListener;
    use std::time::Duration;

    #[test]
    fn sends_signed_request_and_caps_the_response() {
        let (url, server) = one_shot(
            "HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n0123456789012345678901234567890123456789",
        );
        let rt = HttpRuntime::start(config(true)).unwrap();
        rt.submit(job(url));
        let done = wait_one(&rt);
        let request = server.join().unwrap();
        assert_eq!(
            done.outcome,
            Outcome::Status {
                code: 200,
                retry_after: None
            }
        );
        assert_eq!(done.response_body.as_deref(), Some("0123456789012345"));
        assert_eq!(done.error, None);
        let lower = request.to_ascii_lowercase();
        assert!(lower.starts_with("post /hook http/1.1"));
        assert!(lower.contains("webhook-id: msg_t_7"));
        assert!(lower.contains("webhook-signature: v1,"));
        assert!(lower.contains("x-extra: yes"));
        assert!(lower.contains("user-agent: webhook_ext/test"));
        // The signature verifies with the key and the timestamp that were sent.
        let header = |name: &str| {
            request
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with(name)
                        .then(|| l.split_once(": ").unwrap().1.to_string())
                })
                .unwrap()
        };
        let ts: i64 = header("webhook-timestamp").parse().unwrap();
        assert!(signing::verify(
            &[1u8; 32],
            "msg_t_7",
            ts,
            b"{}",
            &header("webhook-signature")
        ));
    }

    #[test]
    fn redirects_are_failures_and_retry_after_is_parsed() {
        let (url, _s) = one_shot(
            "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/\r\ncontent-length: 0\r\n\r\n",
        );
        let rt = HttpRuntime::start(config(true)).unwrap();
        rt.submit(job(url));
        let done = wait_one(&rt);
        assert_eq!(done.status_code(), Some(302));
        assert!(done.error.unwrap().contains("redirects are not followed"));

        let (url, _s) =
            one_shot("HTTP/1.1 503 Busy\r\nretry-after: 42\r\ncontent-length: 0\r\n\r\n");
        rt.submit(job(url));
        let done = wait_one(&rt);
        assert_eq!(
            done.outcome,
            Outcome::Status {
                code: 503,
                retry_after: Some(Duration::from_secs(42))
            }
        );
    }

    #[test]
    fn connection_refused_and_timeouts_are_classified() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rt = HttpRuntime::start(config(true)).unwrap();
        rt.submit(job(format!("http://127.0.0.1:{port}/")));
        let done = wait_one(&rt);
        assert_eq!(done.outcome, Outcome::Transport);
        assert!(done.error.unwrap().contains("connection"));

        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut j = job(format!("http://{}/", silent.local_addr().unwrap()));
        j.timeout = Duration::from_millis(300);
        rt.submit(j);
        let done = wait_one(&rt);
        assert_eq!(done.outcome, Outcome::Timeout);
        assert!(done.duration >= Duration::from_millis(300));
        assert_eq!(done.error.as_deref(), Some("timed out after 300 ms"));
    }
}
