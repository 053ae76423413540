//! The Rust half of the SQL API: validation, signing and status functions called by the
//! plpgsql functions in `sql/api/` (which own the table writes) or directly by users.

use std::ffi::{CStr, CString};
use std::sync::atomic::Ordering;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::pg::{gucs, shmem};
use crate::{request, retry, signing, target};

/// Raises an "invalid parameter value" ERROR.
fn invalid(msg: impl Into<String>) -> ! {
    pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        msg.into(),
        "webhook_ext",
    )
    .report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// Validates an endpoint URL (http/https, host present, no credentials) and returns it normalised.
#[pg_extern(stable, parallel_safe)]
fn _check_url(url: &str) -> String {
    match target::validate_url(url, gucs::HTTPS_ONLY.get()) {
        Ok(u) => u.to_string(),
        Err(e) => invalid(format!("invalid endpoint url: {e}")),
    }
}

/// Returns `secret` after checking it decodes to a usable key, or a freshly generated secret when NULL.
#[pg_extern(volatile)]
fn _check_secret(secret: Option<&str>) -> String {
    match secret {
        None => signing::generate_secret()
            .unwrap_or_else(|e| error!("could not generate a secret: {e}")),
        Some(s) => match signing::decode_secret(s) {
            Ok(_) => s.trim().to_string(),
            Err(e) => invalid(format!("invalid endpoint {e}")),
        },
    }
}

/// Returns an ed25519 signing key (`whsk_…`) after checking it, or a fresh one when NULL.
#[pg_extern(volatile)]
fn _check_signing_key(key: Option<&str>) -> String {
    match key {
        None => signing::SigningKey::generate()
            .unwrap_or_else(|e| error!("could not generate a signing key: {e}")),
        Some(k) => match signing::SigningKey::decode(k) {
            Ok(_) => k.trim().to_string(),
            Err(e) => invalid(format!("invalid endpoint {e}")),
        },
    }
}

/// The public key (`whpk_…`) of a signing key; NULL for one that is not valid (a value written
/// into the table by hand), so that reading webhook.public_keys never fails.
#[pg_extern(immutable, strict, parallel_safe)]
fn _public_key(key: &str) -> Option<String> {
    // (SigningKey::decode refuses a long text before decoding it: PUBLIC may call this.)
    signing::SigningKey::decode(key)
        .ok()
        .map(|k| k.public_key())
}

/// Checks an endpoint's client certificate (PEM chain, its own first) and private key (PEM):
/// both or neither, readable, and the key the certificate's.
#[pg_extern(immutable, parallel_safe)]
fn _check_client_identity(cert: Option<&str>, key: Option<&str>) {
    match (cert, key) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            if let Err(e) = crate::http::ClientIdentity::from_pem(cert, key) {
                invalid(format!("invalid endpoint client certificate: {e}"));
            }
        }
        _ => invalid(format!(
            "invalid endpoint client certificate: {}",
            crate::http::IdentityError::Half
        )),
    }
}

/// Checks an endpoint's forward proxy: `direct` (none, whatever webhook.proxy says) or a proxy
/// URL, `http(s)://[user:password@]host[:port]`. The error never quotes it (it may hold a password).
#[pg_extern(immutable, strict, parallel_safe)]
fn _check_proxy(proxy: &str) -> String {
    match crate::http::ProxyUrl::choice(Some(proxy)) {
        Ok(_) => proxy.trim().to_string(),
        Err(e) => invalid(format!(
            "invalid endpoint proxy: {e} (or 'direct' for none)"
        )),
    }
}

/// Checks an endpoint's OAuth2 client credentials: none, or a token URL, client id and secret
/// (and optionally a scope). The token URL is checked as an endpoint URL is.
#[pg_extern(stable, parallel_safe)]
fn _check_oauth(
    token_url: Option<&str>,
    client_id: Option<&str>,
    client_secret: Option<&str>,
    scope: Option<&str>,
) {
    let err = match (token_url, client_id, client_secret) {
        (None, None, None) if scope.is_none() => return,
        (Some(url), Some(id), Some(secret)) => {
            if let Err(e) = target::validate_url(url, gucs::HTTPS_ONLY.get()) {
                invalid(format!(
                    "invalid endpoint OAuth2 credentials: oauth_token_url: {e}"
                ));
            }
            match crate::http::OAuthClient::new(url, id, secret, scope) {
                Ok(_) => return,
                Err(e) => e,
            }
        }
        _ => crate::http::OAuthError::Incomplete,
    };
    invalid(format!("invalid endpoint OAuth2 credentials: {err}"))
}

/// Checks an endpoint's extra headers: a JSON object of string values, no reserved names, no CR/LF.
#[pg_extern(immutable, parallel_safe)]
fn _check_headers(headers: pgrx::JsonB) -> pgrx::JsonB {
    let text = headers.0.to_string();
    if let Err(e) = request::parse_headers(&text) {
        invalid(format!("invalid endpoint headers: {e}"));
    }
    headers
}

/// Checks a retry schedule such as `5s,5min,30min`.
#[pg_extern(immutable, parallel_safe)]
fn _check_schedule(schedule: &str) -> String {
    match retry::Schedule::parse(schedule) {
        Ok(_) => schedule.trim().to_string(),
        Err(e) => invalid(format!("invalid {e}")),
    }
}

/// Checks that `condition` is one SQL expression and nothing else, so that it can be placed in
/// `WHEN (...)` of a trigger without changing the statement around it.
#[pg_extern(immutable, parallel_safe)]
fn _check_when(condition: &str) -> String {
    let sql = CString::new(format!("SELECT ({condition}\n)"))
        .unwrap_or_else(|_| invalid("the when condition contains a NUL byte"));
    // SAFETY: raw_parser returns a List of RawStmt allocated in the current memory context.
    let single_expression = unsafe {
        let list = pg_sys::raw_parser(sql.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
        !list.is_null() && (*list).length == 1 && {
            let raw = (*(*list).elements).ptr_value as *mut pg_sys::RawStmt;
            let stmt = (*raw).stmt;
            !stmt.is_null() && (*stmt).type_ == pg_sys::NodeTag::T_SelectStmt && {
                let s = stmt as *mut pg_sys::SelectStmt;
                let s = &*s;
                !s.targetList.is_null()
                    && (*s.targetList).length == 1
                    && s.fromClause.is_null()
                    && s.whereClause.is_null()
                    && s.groupClause.is_null()
                    && s.havingClause.is_null()
                    && s.windowClause.is_null()
                    && s.valuesLists.is_null()
                    && s.sortClause.is_null()
                    && s.limitCount.is_null()
                    && s.limitOffset.is_null()
                    && s.lockingClause.is_null()
                    && s.withClause.is_null()
                    && s.distinctClause.is_null()
                    && s.intoClause.is_null()
                    && s.op == pg_sys::SetOperation::SETOP_NONE
            }
        }
    };
    if !single_expression {
        invalid("the when condition must be a single SQL expression, e.g. NEW.plan = 'pro'");
    }
    condition.to_string()
}

/// The arguments stored in `pg_trigger.tgargs` (NUL-separated).
#[pg_extern(immutable, parallel_safe)]
fn _trigger_args(tgargs: &[u8], nargs: i32) -> Vec<String> {
    tgargs
        .split(|b| *b == 0)
        .take(nargs.max(0) as usize)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// Asks for this database's workers to be woken when the current transaction commits, and to
/// read new deliveries from the start then: the SQL API calls it after it made or reset pending
/// work (`floors::Floors`).
#[pg_extern(volatile, parallel_unsafe)]
fn _wake() {
    shmem::rescan_at_commit();
}

/// The Standard Webhooks signature (`v1,<base64>`) of `body` for message `msg_id` at unix time `ts`.
#[pg_extern(immutable, parallel_safe)]
fn sign(secret: &str, msg_id: &str, ts: i64, body: &str) -> String {
    let key = signing::decode_secret(secret).unwrap_or_else(|e| invalid(format!("invalid {e}")));
    signing::sign(&key, msg_id, ts, body.as_bytes())
}

/// True when one of the space-separated `v1,` signatures matches (as a receiver would check).
#[pg_extern(immutable, parallel_safe)]
fn verify(secret: &str, msg_id: &str, ts: i64, body: &str, signature: &str) -> bool {
    let key = signing::decode_secret(secret).unwrap_or_else(|e| invalid(format!("invalid {e}")));
    signing::verify(&key, msg_id, ts, body.as_bytes(), signature)
}

/// One row per delivery worker the launcher runs (`webhook.workers` per served database), read
/// from shared memory.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_safe)]
fn _worker_slots() -> TableIterator<
    'static,
    (
        name!(database, String),
        name!(pid, Option<i32>),
        name!(state, String),
        name!(started_us, Option<i64>),
        name!(last_wake_us, Option<i64>),
        name!(in_flight, i32),
        name!(attempts, i64),
        name!(delivered, i64),
        name!(failed, i64),
        name!(worker, i32),
    ),
> {
    let Some(shared) = shmem::shared() else {
        error!("webhook_ext is not loaded via shared_preload_libraries");
    };
    let rows: Vec<_> = shared
        .slots
        .iter()
        .filter(|s| s.dboid.load(Ordering::Acquire) != 0)
        .map(|s| {
            let pid = s.pid.load(Ordering::Acquire);
            let ts = |v: i64| (v != 0).then_some(v);
            (
                s.name(),
                (pid != 0).then_some(pid),
                s.state().as_str().to_string(),
                ts(s.started_at.load(Ordering::Relaxed)),
                ts(s.last_wake.load(Ordering::Relaxed)),
                s.in_flight.load(Ordering::Relaxed) as i32,
                s.attempts.load(Ordering::Relaxed) as i64,
                s.delivered.load(Ordering::Relaxed) as i64,
                s.failed.load(Ordering::Relaxed) as i64,
                s.part.load(Ordering::Acquire) as i32,
            )
        })
        .collect();
    TableIterator::new(rows)
}

/// The delivery worker's statements: name, the types of `$1…$n`, and the SQL. The isolation
/// specs (tests/isolation) run them to interleave exactly what this build's worker runs with the
/// SQL API's functions.
#[pg_extern(stable, parallel_safe)]
fn _worker_statements() -> TableIterator<
    'static,
    (
        name!(name, String),
        name!(params, Vec<String>),
        name!(sql, String),
    ),
> {
    let rows: Vec<_> = crate::worker::queries::ALL
        .iter()
        .map(|s| {
            let params = s
                .params
                .iter()
                .map(|&oid| {
                    // SAFETY: format_type_be returns a palloc'd C string for any type oid (an
                    // unknown one is an ERROR; these are built-in types).
                    unsafe { CStr::from_ptr(pg_sys::format_type_be(oid)) }
                        .to_string_lossy()
                        .into_owned()
                })
                .collect();
            (s.name.to_string(), params, s.sql.to_string())
        })
        .collect();
    TableIterator::new(rows)
}

/// `webhook.max_payload_bytes` in bytes.
#[pg_extern(stable, parallel_safe)]
fn _max_payload_bytes() -> i32 {
    gucs::MAX_PAYLOAD_BYTES.get()
}

/// `webhook.traceparent` as events store it (version 00), NULL when unset.
#[pg_extern(stable, parallel_safe)]
fn _traceparent() -> Option<String> {
    gucs::traceparent()
}

/// The databases listed in `webhook.database`.
#[pg_extern(stable, parallel_safe)]
fn _served_databases() -> Vec<String> {
    gucs::databases()
}

/// `webhook.retention` in seconds.
#[pg_extern(stable, parallel_safe)]
fn _retention_seconds() -> i32 {
    gucs::RETENTION_S.get()
}

/// Whether `event_type` passes an `event_types` filter (NULL = all; `prefix*` matches a prefix).
#[pg_extern(immutable, parallel_safe)]
fn _type_matches(event_type: &str, patterns: Option<Vec<Option<String>>>) -> bool {
    let patterns: Option<Vec<String>> = patterns.map(|v| v.into_iter().flatten().collect());
    request::type_matches(event_type, patterns.as_deref())
}
