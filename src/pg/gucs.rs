//! Every `webhook.*` setting, defined once in `_PG_init`. The context of each is chosen by who reads
//! it: the worker reads its settings again on SIGHUP; backends read the trigger-path ones per call.

use std::ffi::{c_char, c_void, CStr, CString};

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::limits;
use crate::retry::{self, Schedule};
use crate::split;
use crate::target;
use crate::trace;

pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));
pub static WORKERS: GucSetting<i32> = GucSetting::<i32>::new(1);
pub static MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(1000);
pub static DEFAULT_MAX_IN_FLIGHT: GucSetting<i32> = GucSetting::<i32>::new(100);
pub static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(500);
pub static DEFAULT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(15_000);
pub static DEFAULT_MAX_ATTEMPTS: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static RETRY_SCHEDULE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(retry::DEFAULT_SCHEDULE_C));
pub static RESPONSE_BODY_LIMIT: GucSetting<i32> = GucSetting::<i32>::new(4096);
pub static MAX_PAYLOAD_BYTES: GucSetting<i32> = GucSetting::<i32>::new(1024 * 1024);
pub static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(7 * 24 * 3600);
pub static ALLOW_PRIVATE_NETWORKS: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static ALLOWED_NETWORKS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static HTTPS_ONLY: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static PAUSED: GucSetting<bool> = GucSetting::<bool>::new(false);
pub static DNS_SERVERS: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SSL_CA_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static PROXY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static OPS_ENDPOINT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static OPS_BACKLOG_THRESHOLD: GucSetting<i32> = GucSetting::<i32>::new(10_000);
pub static PROXY_PASSWORD_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static CIRCUIT_BREAKER_THRESHOLD: GucSetting<i32> = GucSetting::<i32>::new(10);
pub static AUTO_DISABLE_AFTER_S: GucSetting<i32> = GucSetting::<i32>::new(5 * 24 * 3600);
pub static TRACEPARENT: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

/// Defines every setting and reserves the `webhook` prefix (typos become errors, not silent no-ops).
/// Long, and kept whole on purpose: one flat list of definitions, one per setting, in the order
/// the README lists them; splitting it would only scatter the list.
pub fn init() {
    let none = GucFlags::default();
    GucRegistry::define_string_guc(
        c"webhook.database",
        c"Database(s) the delivery worker serves (comma-separated).",
        c"One worker runs per listed database; it waits until the database exists and CREATE EXTENSION webhook_ext has run there.",
        &DATABASE,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"webhook.workers",
        c"Delivery workers per served database; endpoints are split between them.",
        c"Each endpoint is served by one of them (its limits, circuit breaker and order stay in one process); more workers spread the HTTP and TLS work over more cores.",
        &WORKERS,
        1,
        split::MAX_WORKERS,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"webhook.max_in_flight",
        c"Most requests one worker has under way at once, over all endpoints.",
        c"",
        &MAX_IN_FLIGHT,
        1,
        100_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"webhook.default_max_in_flight",
        c"Most requests under way at once to one endpoint, unless the endpoint sets max_in_flight.",
        c"",
        &DEFAULT_MAX_IN_FLIGHT,
        limits::MAX_IN_FLIGHT.0,
        limits::MAX_IN_FLIGHT.1,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"webhook.batch_size",
        c"Most deliveries claimed or recorded in one transaction.",
        c"",
        &BATCH_SIZE,
        1,
        10_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"webhook.default_timeout",
        c"How long one request may take (connect, send, answer, body), unless the endpoint sets timeout.",
        c"",
        &DEFAULT_TIMEOUT_MS,
        limits::TIMEOUT_MS.0,
        limits::TIMEOUT_MS.1,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"webhook.default_max_attempts",
        c"Attempts before a delivery is failed, unless the endpoint sets max_attempts; 0 = retry_schedule's length + 1.",
        c"",
        &DEFAULT_MAX_ATTEMPTS,
        0,
        limits::MAX_ATTEMPTS.1,
        GucContext::Sighup,
        none,
    );
    // SAFETY: the hook is a #[pg_guard]ed extern function with the signature Postgres expects.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"webhook.retry_schedule",
            c"Delays between attempts, comma-separated, in units ms, s, min, h, d; ±20 % jitter is added.",
            c"",
            &RETRY_SCHEDULE,
            GucContext::Sighup,
            none,
            Some(check_retry_schedule),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"webhook.response_body_limit",
        c"Bytes of each response body kept in webhook.attempts; the rest is not read.",
        c"",
        &RESPONSE_BODY_LIMIT,
        0,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"webhook.max_payload_bytes",
        c"Largest event payload that is sent; larger events are recorded and their deliveries failed with a reason.",
        c"",
        &MAX_PAYLOAD_BYTES,
        1024,
        100 * 1024 * 1024,
        GucContext::Suset,
        GucFlags::UNIT_BYTE,
    );
    GucRegistry::define_int_guc(
        c"webhook.retention",
        c"How long finished deliveries, their attempts and events are kept before the worker purges them; 0 keeps them forever.",
        c"",
        &RETENTION_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"webhook.allow_private_networks",
        c"Allow requests to loopback, private, link-local and other non-public addresses (off = SSRF guard on).",
        c"",
        &ALLOW_PRIVATE_NETWORKS,
        GucContext::Sighup,
        none,
    );
    // SAFETY: as above.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"webhook.allowed_networks",
            c"CIDR ranges the SSRF guard lets through even though they are not public (comma-separated).",
            c"",
            &ALLOWED_NETWORKS,
            GucContext::Sighup,
            none,
            Some(check_allowed_networks),
            None,
            None,
        );
    }
    // SAFETY: as above.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"webhook.dns_servers",
            c"Nameservers the worker asks (comma-separated IP or IP:port); empty = those of /etc/resolv.conf.",
            c"",
            &DNS_SERVERS,
            GucContext::Sighup,
            none,
            Some(check_dns_servers),
            None,
            None,
        );
    }
    GucRegistry::define_bool_guc(
        c"webhook.paused",
        c"Workers claim nothing while on: events are still recorded, and sent once it is off again.",
        c"Start a restored copy or a clone of a database with it on, to look at its pending work before anything is sent.",
        &PAUSED,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_bool_guc(
        c"webhook.https_only",
        c"Refuse endpoints and requests with plain http URLs.",
        c"",
        &HTTPS_ONLY,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_string_guc(
        c"webhook.ssl_ca_file",
        c"PEM file of extra root certificates trusted for https endpoints (the built-in Mozilla roots stay trusted).",
        c"",
        &SSL_CA_FILE,
        GucContext::Sighup,
        none,
    );
    // No password in it (Postgres logs a reloaded setting's new value): that comes from
    // webhook.proxy_password_file. No check hook either: Postgres would quote a refused value in
    // its message; the worker says what is wrong instead, and sends nothing through or around
    // it meanwhile.
    GucRegistry::define_string_guc(
        c"webhook.proxy",
        c"Forward proxy for every endpoint without its own: http(s)://[user@]host[:port]; empty = none.",
        c"HTTP CONNECT for https targets, absolute-form requests for http ones. The SSRF guard checks each target before the request goes to the proxy.",
        &PROXY,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"webhook.proxy_password_file",
        c"File whose first line is the password of webhook.proxy's user (read at start and on reload).",
        c"",
        &PROXY_PASSWORD_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"webhook.ops_endpoint",
        c"Endpoint that gets operational events (circuit opened or closed, endpoint disabled, backlog past the threshold) as webhooks; empty = NOTIFY webhook_ops only.",
        c"",
        &OPS_ENDPOINT,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"webhook.ops_backlog_threshold",
        c"Pending deliveries of one endpoint past which an operational event says so; 0 = off.",
        c"",
        &OPS_BACKLOG_THRESHOLD,
        0,
        i32::MAX,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"webhook.circuit_breaker_threshold",
        c"Consecutive failed attempts after which an endpoint gets one probe at a time instead of its backlog; 0 = off.",
        c"",
        &CIRCUIT_BREAKER_THRESHOLD,
        0,
        100_000,
        GucContext::Sighup,
        none,
    );
    GucRegistry::define_int_guc(
        c"webhook.auto_disable_after",
        c"Disable an endpoint that has failed without a single success for this long; 0 = never.",
        c"",
        &AUTO_DISABLE_AFTER_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    // SAFETY: as above.
    unsafe {
        GucRegistry::define_string_guc_with_hooks(
            c"webhook.traceparent",
            c"W3C traceparent stored with the events this session or transaction writes and sent with their deliveries.",
            c"Set it per transaction (SET LOCAL) to the application's trace context: the receiver's span then joins the trace. Empty = none.",
            &TRACEPARENT,
            GucContext::Userset,
            none,
            Some(check_traceparent),
            None,
            None,
        );
    }
    // SAFETY: called once from _PG_init, on the main thread.
    #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17", feature = "pg18"))]
    unsafe {
        pg_sys::MarkGUCPrefixReserved(c"webhook".as_ptr())
    };
    #[cfg(any(feature = "pg13", feature = "pg14"))]
    unsafe {
        pg_sys::EmitWarningsOnPlaceholders(c"webhook".as_ptr())
    };
}

/// A string setting's value, `""` when unset.
pub fn string(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// `webhook.traceparent` as stored and sent (version 00), None when unset or empty. The check
/// hook guarantees it parses.
pub fn traceparent() -> Option<String> {
    let value = TRACEPARENT.get()?;
    trace::parse_setting(&value.to_string_lossy())
        .ok()
        .flatten()
        .map(|t| t.as_str().to_owned())
}

/// The configured schedule; the check hook guarantees it parses.
pub fn retry_schedule() -> Schedule {
    Schedule::parse(&string(&RETRY_SCHEDULE)).unwrap_or_default()
}

/// `webhook.default_max_attempts`, or the schedule's length + 1 when it is 0.
pub fn default_max_attempts(schedule: &Schedule) -> i32 {
    match DEFAULT_MAX_ATTEMPTS.get() {
        0 => schedule.default_max_attempts() as i32,
        n => n,
    }
}

pub fn address_policy() -> target::AddressPolicy {
    target::AddressPolicy {
        allow_private: ALLOW_PRIVATE_NETWORKS.get(),
        allowed: target::parse_networks(&string(&ALLOWED_NETWORKS)).unwrap_or_default(),
    }
}

/// `webhook.dns_servers` (checked when set, so never malformed here).
pub fn dns_servers() -> Vec<std::net::SocketAddr> {
    crate::http::parse_dns_servers(&string(&DNS_SERVERS)).unwrap_or_default()
}

/// `webhook.proxy`, with the password of `webhook.proxy_password_file`: none, a proxy, or why
/// it cannot be used (never quoting either).
pub fn proxy() -> Result<Option<std::sync::Arc<crate::http::ProxyUrl>>, crate::http::ProxyError> {
    use crate::http::{ProxyError, ProxyUrl};
    let text = string(&PROXY);
    if text.trim().is_empty() {
        return Ok(None);
    }
    let proxy = ProxyUrl::parse(&text)?;
    if proxy.has_password() {
        return Err(ProxyError::PasswordInSetting);
    }
    let file = string(&PROXY_PASSWORD_FILE);
    let proxy = if file.trim().is_empty() {
        proxy
    } else {
        let content = std::fs::read_to_string(file.trim())
            .map_err(|e| ProxyError::PasswordFile(format!("cannot read {:?}: {e}", file.trim())))?;
        let password = content.lines().next().unwrap_or_default();
        if password.is_empty() {
            return Err(ProxyError::PasswordFile(format!(
                "{:?} holds no password on its first line",
                file.trim()
            )));
        }
        proxy.with_password(password)?
    };
    Ok(Some(std::sync::Arc::new(proxy)))
}

/// The databases named by `webhook.database`, trimmed, de-duplicated, in order.
pub fn databases() -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in string(&DATABASE)
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        if !out.iter().any(|n| n == name) {
            out.push(name.to_string());
        }
    }
    out
}

/// Reports a check-hook failure the way Postgres expects (`GUC_check_errdetail`).
unsafe fn reject(detail: &str) -> bool {
    let detail = CString::new(detail.replace('\0', "")).unwrap_or_default();
    unsafe { pg_sys::GUC_check_errdetail_string = pg_sys::pstrdup(detail.as_ptr()) };
    false
}

unsafe fn new_value(newval: *mut *mut c_char) -> String {
    unsafe {
        if newval.is_null() || (*newval).is_null() {
            String::new()
        } else {
            CStr::from_ptr(*newval).to_string_lossy().into_owned()
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_retry_schedule(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    match Schedule::parse(&unsafe { new_value(newval) }) {
        Ok(_) => true,
        Err(e) => unsafe { reject(&e.to_string()) },
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_allowed_networks(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    match target::parse_networks(&unsafe { new_value(newval) }) {
        Ok(_) => true,
        Err(e) => unsafe { reject(&e.to_string()) },
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_traceparent(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    match trace::parse_setting(&unsafe { new_value(newval) }) {
        Ok(_) => true,
        Err(e) => unsafe { reject(&e.to_string()) },
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn check_dns_servers(
    newval: *mut *mut c_char,
    _extra: *mut *mut c_void,
    _source: pg_sys::GucSource::Type,
) -> bool {
    match crate::http::parse_dns_servers(&unsafe { new_value(newval) }) {
        Ok(_) => true,
        Err(e) => unsafe { reject(&e) },
    }
}
