//! The settings the worker acts on, read when it begins serving and on every SIGHUP.

use std::sync::Arc;
use std::time::Duration;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::http::HttpConfig;
use crate::pg::gucs;
use crate::retry::Schedule;

use super::HOUSEKEEPING_EVERY;

/// The settings the worker acts on, read at start and on every SIGHUP.
pub struct Settings {
    pub batch_size: i32,
    pub max_in_flight: usize,
    pub default_max_in_flight: i32,
    pub default_timeout_ms: i32,
    pub schedule: Arc<Schedule>,
    pub default_max_attempts: i32,
    pub breaker_threshold: u32,
    pub auto_disable_after: Duration,
    pub retention: Duration,
    pub paused: bool,
}

impl Settings {
    /// Housekeeping runs every minute, or often enough for a short retention.
    pub fn housekeeping_every(&self) -> Duration {
        if self.retention.is_zero() {
            HOUSEKEEPING_EVERY
        } else {
            (self.retention / 4).clamp(Duration::from_secs(1), HOUSEKEEPING_EVERY)
        }
    }

    pub fn read() -> Settings {
        let schedule = Arc::new(gucs::retry_schedule());
        let wanted = gucs::MAX_IN_FLIGHT.get() as usize;
        let budget = socket_budget();
        if wanted > budget {
            warning!(
                "webhook_ext worker: webhook.max_in_flight = {wanted} needs more file descriptors than this process may open; using {budget} (raise the open-files limit, ulimit -n, of the postgres service)"
            );
        }
        Settings {
            batch_size: gucs::BATCH_SIZE.get(),
            max_in_flight: wanted.min(budget),
            default_max_in_flight: gucs::DEFAULT_MAX_IN_FLIGHT.get(),
            default_timeout_ms: gucs::DEFAULT_TIMEOUT_MS.get(),
            default_max_attempts: gucs::default_max_attempts(&schedule),
            schedule,
            breaker_threshold: gucs::CIRCUIT_BREAKER_THRESHOLD.get().max(0) as u32,
            auto_disable_after: Duration::from_secs(gucs::AUTO_DISABLE_AFTER_S.get().max(0) as u64),
            retention: Duration::from_secs(gucs::RETENTION_S.get().max(0) as u64),
            paused: gucs::PAUSED.get(),
        }
    }

    pub fn http() -> HttpConfig {
        let ca = gucs::string(&gucs::SSL_CA_FILE);
        let extra_roots_pem = if ca.is_empty() {
            None
        } else {
            match std::fs::read(&ca) {
                Ok(pem) => Some(pem),
                Err(e) => {
                    warning!("webhook.ssl_ca_file {ca:?} cannot be read ({e}); using the built-in roots only");
                    None
                }
            }
        };
        let proxy = gucs::proxy();
        if let Err(e) = &proxy {
            // LOG, as Postgres reports a setting it cannot use on reload (a WARNING would not
            // reach a log kept at the default level).
            log!("webhook.proxy is not usable: {e}; the requests of endpoints without a proxy of their own fail until it is fixed");
        }
        HttpConfig {
            proxy,
            policy: gucs::address_policy(),
            https_only: gucs::HTTPS_ONLY.get(),
            response_body_limit: gucs::RESPONSE_BODY_LIMIT.get().max(0) as usize,
            user_agent: concat!("webhook_ext/", env!("CARGO_PKG_VERSION")).to_string(),
            extra_roots_pem,
            threads: 2,
            dns_servers: gucs::dns_servers(),
        }
    }
}

/// Raises this process's open-files limit to its hard limit and returns how many requests may be
/// under way at once: each holds a socket, idle pooled connections may hold as many again, and
/// Postgres keeps up to max_files_per_process files of its own.
fn socket_budget() -> usize {
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    let soft = unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 64;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
        lim.rlim_cur as usize
    };
    // SAFETY: a plain read of a setting.
    let postgres_files = unsafe { pg_sys::max_files_per_process }.max(0) as usize + 100;
    (soft.saturating_sub(postgres_files) / 2).max(16)
}
