//! The HTTP side of the worker: a tokio runtime on its own threads that signs, sends and times
//! each request, caps the response, and hands the result back to the worker's main thread.
//!
//! Nothing here touches Postgres. Results wait in a queue; a byte on a pipe wakes the main thread,
//! which waits on that pipe together with its latch.
//!
//! ```text
//!  worker's main thread (Postgres)       runtime threads (tokio; every signal blocked)
//!  ───────────────────────────────       ─────────────────────────────────────────────
//!  HttpRuntime::start ─ builds ────────▶ the threads          (runtime)
//!                                        + the reqwest client  (client)
//!  HttpRuntime::submit(Job) ──── task ─▶ exchange::attempt     (exchange)
//!                                          sign, POST ── client ── GuardedResolver (resolver)
//!                                          │                       hickory lookup, then the
//!                                          │                       SSRF guard on each address
//!                                          time, cap the body, classify ─▶ Finished
//!  take_finished() ◀─────── queue ◀─────── push; one byte on the wake pipe
//!  waits on wake_fd() + its latch
//! ```
//!
//! - `runtime`: [`HttpRuntime`]: the threads, the queue of finished requests, the wake pipe.
//! - `client`: the reqwest client (no redirects, extra roots, the guarded resolver), one per
//!   client certificate (`identity`: an endpoint's mutual TLS certificate, checked) and forward
//!   proxy (`proxy`: webhook.proxy or an endpoint's own) in use.
//! - `resolver`: asynchronous DNS behind the SSRF guard; [`parse_dns_servers`].
//! - `exchange`: one attempt: sign, send, time, cap the response, classify failures.
//! - `oauth`: OAuth2 client credentials: bearer tokens fetched, cached, refreshed on a 401.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::retry::Outcome;
use crate::signing::SigningKey;
use crate::target::AddressPolicy;

mod client;
mod exchange;
mod identity;
mod oauth;
mod proxy;
mod resolver;
mod runtime;

#[cfg(test)]
mod testutil;

pub use identity::{ClientIdentity, IdentityError};
pub use oauth::{OAuthClient, OAuthError};
pub use proxy::{ProxyChoice, ProxyError, ProxyUrl, DIRECT};
pub use resolver::parse_dns_servers;
pub use runtime::HttpRuntime;

/// One attempt to deliver one delivery.
#[derive(Debug, Clone)]
pub struct Job {
    pub delivery_id: i64,
    pub endpoint_id: i32,
    /// The number of this attempt, 1-based.
    pub attempt: i32,
    pub url: String,
    pub msg_id: String,
    pub body: String,
    /// HMAC keys: the current secret's, plus the previous one's during a rotation's grace period
    /// (none for an endpoint that signs with ed25519 alone).
    pub keys: Vec<Vec<u8>>,
    /// ed25519 keys (`v1a` signatures), after the HMAC ones, likewise.
    pub signing_keys: Vec<Arc<SigningKey>>,
    /// The endpoint's client certificate (mutual TLS), if it has one.
    pub identity: Option<Arc<ClientIdentity>>,
    /// The forward proxy the request goes through.
    pub proxy: ProxyChoice,
    /// OAuth2 client credentials: the request carries a bearer token fetched with them.
    pub oauth: Option<Arc<OAuthClient>>,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
}

/// What one attempt did.
#[derive(Debug, Clone)]
pub struct Finished {
    pub delivery_id: i64,
    pub endpoint_id: i32,
    pub attempt: i32,
    pub started_at: SystemTime,
    pub duration: Duration,
    pub outcome: Outcome,
    /// The response body, cut at the configured limit (lossy UTF-8).
    pub response_body: Option<String>,
    /// Why the attempt failed, in words, when it did not get a 2xx.
    pub error: Option<String>,
}

impl Finished {
    pub fn status_code(&self) -> Option<u16> {
        match self.outcome {
            Outcome::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Settings read from the GUCs when the runtime is (re)built.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub policy: AddressPolicy,
    /// Refuse plain http URLs (webhook.https_only).
    pub https_only: bool,
    pub response_body_limit: usize,
    pub user_agent: String,
    /// Extra trusted root certificates (PEM), on top of the built-in Mozilla roots.
    pub extra_roots_pem: Option<Vec<u8>>,
    pub threads: usize,
    /// Nameservers to ask (webhook.dns_servers); empty: the system's (/etc/resolv.conf).
    pub dns_servers: Vec<SocketAddr>,
    /// webhook.proxy: the forward proxy of endpoints without their own, or why it is unusable
    /// (their requests then fail: sending around a proxy the administrator set is not an option).
    pub proxy: Result<Option<Arc<ProxyUrl>>, ProxyError>,
}
