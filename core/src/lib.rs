//! webhook_core: the part of webhook_ext that needs no Postgres, so `cargo test -p webhook_core`
//! runs without pgrx or a server.
//!
//! `signing` (Standard Webhooks HMAC), `retry` (schedules, verdicts, Retry-After), `policy`
//! (circuit breaker, rate limits), `limits` (an endpoint's settings' ranges), `target` (URL checks and the SSRF guard), `request` (request
//! bodies and headers), `http` (the HTTP runtime the worker hands requests to).

pub mod floors;
pub mod http;
pub mod limits;
pub mod ops;
pub mod policy;
pub mod request;
pub mod retry;
pub mod signing;
pub mod split;
pub mod target;
pub mod trace;

#[cfg(test)]
mod proptests;
