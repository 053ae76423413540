//! The delivery worker: one background process per served database.
//!
//! ```text
//! loop { wait(latch | results pipe | next due time)
//!        record finished attempts          -- one transaction, one statement per table
//!        claim due deliveries, mark sending -- one transaction, FOR UPDATE SKIP LOCKED
//!        hand them to the HTTP runtime }    -- no transaction open while requests run
//! ```
//! Only this (main) thread touches Postgres. Every transaction runs under a catch-all: an error
//! is logged and the loop goes on; it never takes the worker down.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::http::{Finished, HttpConfig, HttpRuntime, Job};
use crate::retry::{self, Outcome, Schedule, Verdict};
use crate::shmem::{self, Slot, WorkerState};
use crate::{gucs, request, signing};

/// How often the worker looks for expired leases and runs retention when nothing wakes it.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);
/// How long a claimed delivery stays `sending` beyond its timeout before it is due again.
const LEASE_MARGIN_MS: i64 = 60_000;
/// Pause after a failed transaction, so a persistent error does not spin.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// Key of the session advisory lock that makes the worker the only one for its database.
const WORKER_LOCK_KEY: i64 = 0x0077_6562_686f_6f6b; // "webhook"

/// Claims up to $4 due deliveries, at most each endpoint's free capacity, fairly across endpoints.
/// $1/$2: endpoints with requests under way and how many; $3 default per-endpoint limit;
/// $5 default timeout (ms); $6 lease margin (ms).
const CLAIM_SQL: &str = r#"
WITH cap AS (
    SELECT ep.id, LEAST(COALESCE(ep.max_in_flight, $3) - COALESCE(b.n, 0), $4) AS n
      FROM webhook.endpoints ep
      LEFT JOIN unnest($1::int[], $2::int[]) AS b(id, n) ON b.id = ep.id
     WHERE ep.enabled
), cand AS (
    SELECT d.id, d.next_attempt_at,
           row_number() OVER (PARTITION BY d.endpoint_id ORDER BY d.next_attempt_at, d.id) AS rn
      FROM cap
     CROSS JOIN LATERAL (
           SELECT id, endpoint_id, next_attempt_at
             FROM webhook.deliveries
            WHERE status = 'pending' AND endpoint_id = cap.id AND next_attempt_at <= now()
            ORDER BY next_attempt_at, id
            LIMIT cap.n) d
     WHERE cap.n > 0
), pick AS (
    SELECT id FROM cand ORDER BY rn, next_attempt_at, id LIMIT $4
), locked AS (
    SELECT d.id FROM webhook.deliveries d
     WHERE d.id IN (SELECT id FROM pick) AND d.status = 'pending'
       FOR UPDATE SKIP LOCKED
)
UPDATE webhook.deliveries d
   SET status = 'sending',
       next_attempt_at = now() + (COALESCE(ep.timeout, $5 * interval '1 ms') + $6 * interval '1 ms')
  FROM locked, webhook.events e, webhook.endpoints ep
 WHERE d.id = locked.id AND e.id = d.event_id AND ep.id = d.endpoint_id
RETURNING d.id, d.endpoint_id, d.attempts, e.type,
          (extract(epoch FROM e.created_at) * 1000000)::int8,
          e.payload::text, ep.url, ep.secret,
          CASE WHEN ep.previous_secret_expires_at > now() THEN ep.previous_secret END,
          ep.headers::text,
          COALESCE((extract(epoch FROM ep.timeout) * 1000)::int8, $5::int8),
          ep.max_attempts, ep.retry_schedule
"#;

/// Milliseconds until the next pending delivery of an endpoint with free capacity is due.
const NEXT_DUE_SQL: &str = r#"
SELECT (extract(epoch FROM min(h.t) - clock_timestamp()) * 1000)::int8
  FROM webhook.endpoints ep
  LEFT JOIN unnest($1::int[], $2::int[]) AS b(id, n) ON b.id = ep.id
 CROSS JOIN LATERAL (
       SELECT next_attempt_at AS t FROM webhook.deliveries
        WHERE status = 'pending' AND endpoint_id = ep.id
        ORDER BY next_attempt_at LIMIT 1) h
 WHERE ep.enabled AND COALESCE(ep.max_in_flight, $3) > COALESCE(b.n, 0)
"#;

/// Writes a batch of finished attempts: one row each in `attempts`, and the deliveries' new state.
const RECORD_SQL: &str = r#"
WITH r AS (
    SELECT * FROM unnest($1::int8[], $2::int4[], $3::text[], $4::int4[], $5::text[], $6::text[],
                         $7::float8[], $8::int8[], $9::int8[])
           AS r(id, attempt, status, code, error, body, started, micros, delay_ms)
), a AS (
    INSERT INTO webhook.attempts (delivery_id, attempt, started_at, duration, status_code, response_body, error)
    SELECT id, attempt, to_timestamp(started), micros * interval '1 microsecond', code, body, error FROM r
)
UPDATE webhook.deliveries d
   SET status = r.status::webhook.delivery_status,
       attempts = r.attempt,
       last_status_code = r.code,
       last_error = r.error,
       next_attempt_at = CASE WHEN r.status = 'pending' THEN clock_timestamp() + r.delay_ms * interval '1 ms' END,
       delivered_at = CASE WHEN r.status = 'delivered' THEN clock_timestamp() END
  FROM r
 WHERE d.id = r.id AND d.status = 'sending'
"#;

/// 410 Gone: disable the endpoints and cancel what is still waiting for them.
const GONE_SQL: &str = r#"
WITH off AS (
    UPDATE webhook.endpoints
       SET enabled = false, updated_at = now(),
           disabled_reason = 'receiver answered 410 Gone at ' || clock_timestamp()
     WHERE id = ANY($1) AND enabled
    RETURNING id
)
UPDATE webhook.deliveries SET status = 'cancelled', next_attempt_at = NULL,
       last_error = 'endpoint disabled: receiver answered 410 Gone'
 WHERE endpoint_id IN (SELECT id FROM off) AND status = 'pending'
"#;

/// Deliveries left `sending` by a worker that is gone: due again now, same `webhook-id`.
const RECOVER_SQL: &str = r#"
UPDATE webhook.deliveries SET status = 'pending', next_attempt_at = now()
 WHERE status = 'sending' AND NOT (id = ANY($1)) AND ($2 OR next_attempt_at < now())
"#;

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn webhook_worker_main(arg: pg_sys::Datum) {
    let slot_index = arg.value();
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let Some(slot) = shmem::shared().and_then(|s| s.slots.get(slot_index)) else {
        error!("webhook_ext worker started without shared memory (is webhook_ext in shared_preload_libraries?)");
    };
    let dboid = pg_sys::Oid::from(slot.dboid.load(Ordering::Acquire));
    // SAFETY: registering a process-exit callback with a plain integer argument.
    unsafe { pg_sys::before_shmem_exit(Some(release_slot), pg_sys::Datum::from(slot_index)) };
    slot.pid
        .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
    slot.latch
        .store(unsafe { pg_sys::MyLatch }, Ordering::Release);
    slot.started_at
        .store(shmem::now_micros(), Ordering::Relaxed);
    slot.set_state(WorkerState::Starting);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(dboid), None);

    let mut worker = Worker::new(slot);
    worker.run();
    slot.set_state(WorkerState::Stopping);
    // Exit code 0: the launcher, not the postmaster, decides whether to start us again.
    unsafe { pg_sys::proc_exit(0) };
}

#[pg_guard]
unsafe extern "C-unwind" fn release_slot(_code: i32, arg: pg_sys::Datum) {
    if let Some(slot) = shmem::shared().and_then(|s| s.slots.get(arg.value())) {
        slot.clear_worker();
    }
    if let Some(s) = shmem::shared() {
        s.wake_launcher();
    }
}

/// A delivery whose request is under way.
struct Tracked {
    endpoint_id: i32,
    max_attempts: i32,
    schedule: Arc<Schedule>,
}

/// The GUCs the worker acts on, read at start and on every SIGHUP.
struct Settings {
    batch_size: i32,
    max_in_flight: usize,
    default_max_in_flight: i32,
    default_timeout_ms: i32,
    schedule: Arc<Schedule>,
    default_max_attempts: i32,
}

impl Settings {
    fn read() -> Settings {
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
        }
    }

    fn http() -> HttpConfig {
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
        HttpConfig {
            policy: gucs::address_policy(),
            response_body_limit: gucs::RESPONSE_BODY_LIMIT.get().max(0) as usize,
            user_agent: concat!("webhook_ext/", env!("CARGO_PKG_VERSION")).to_string(),
            extra_roots_pem,
            threads: 2,
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
    let postgres_files = unsafe { pg_sys::max_files_per_process }.max(0) as usize + 100;
    (soft.saturating_sub(postgres_files) / 2).max(16)
}

/// Why the serving loop ended.
enum Stop {
    Shutdown,
    ExtensionGone,
}

struct Worker {
    slot: &'static Slot,
    settings: Settings,
    tracked: HashMap<i64, Tracked>,
    per_endpoint: HashMap<i32, i32>,
    schedules: HashMap<String, Arc<Schedule>>,
    /// Deliveries whose result could not be written yet, and how often that failed.
    record_failures: HashMap<i64, u32>,
    install_id: String,
}

impl Worker {
    fn new(slot: &'static Slot) -> Worker {
        Worker {
            slot,
            settings: Settings::read(),
            tracked: HashMap::new(),
            per_endpoint: HashMap::new(),
            schedules: HashMap::new(),
            record_failures: HashMap::new(),
            install_id: String::new(),
        }
    }

    fn run(&mut self) {
        let db = self.slot.name();
        log!("webhook_ext worker started for database \"{db}\"");
        let mut told = false;
        loop {
            if shutdown_requested() {
                return;
            }
            match in_transaction(extension_installed) {
                Ok(true) => {
                    told = false;
                    match self.serve() {
                        Stop::Shutdown => return,
                        Stop::ExtensionGone => {
                            log!("webhook_ext worker: the extension was dropped in database \"{db}\"; waiting for it");
                            continue;
                        }
                    }
                }
                Ok(false) => {
                    if !told {
                        log!("webhook_ext worker: waiting for CREATE EXTENSION webhook_ext in database \"{db}\"");
                        told = true;
                    }
                }
                Err(e) => warning!("webhook_ext worker: {e}"),
            }
            self.slot.set_state(WorkerState::WaitingForExtension);
            wait(None, Some(HOUSEKEEPING_EVERY));
            self.reload_if_asked(None);
        }
    }

    /// Delivers until shutdown or until the extension disappears.
    fn serve(&mut self) -> Stop {
        if !self.become_the_only_worker() {
            return Stop::Shutdown;
        }
        match in_transaction(|| -> Result<String, String> {
            let id = Spi::get_one::<String>("SELECT install_id FROM webhook._meta")
                .map_err(|e| e.to_string())?;
            spi_update(RECOVER_SQL, &[Vec::<i64>::new().into(), true.into()])?;
            id.ok_or_else(|| "webhook._meta is empty".to_string())
        }) {
            Ok(Ok(id)) => self.install_id = id,
            Ok(Err(e)) | Err(e) => {
                warning!("webhook_ext worker: could not start serving: {e}");
                return Stop::ExtensionGone;
            }
        }
        let mut http = match block_signals_while(|| HttpRuntime::start(Settings::http())) {
            Ok(h) => h,
            Err(e) => {
                warning!("webhook_ext worker: {e}");
                wait(None, Some(ERROR_BACKOFF));
                return Stop::ExtensionGone;
            }
        };
        self.tracked.clear();
        self.per_endpoint.clear();
        let mut unrecorded: Vec<Finished> = Vec::new();
        let mut next_housekeeping = Instant::now() + HOUSEKEEPING_EVERY;
        let stop = loop {
            if shutdown_requested() {
                break Stop::Shutdown;
            }
            self.reload_if_asked(Some(&mut http));
            self.slot.set_state(WorkerState::Working);

            unrecorded.extend(http.take_finished());
            let failed_txn = !self.record_all(&mut unrecorded);

            let mut sleep: Option<Duration> = Some(HOUSEKEEPING_EVERY);
            let mut failed_txn = failed_txn;
            if !failed_txn {
                match self.claim_and_send(&http) {
                    Ok(next) => sleep = next,
                    Err(e) => {
                        failed_txn = true;
                        warning!("webhook_ext worker: claiming deliveries failed: {e}");
                    }
                }
            }
            if failed_txn {
                if !matches!(in_transaction(extension_installed), Ok(true)) {
                    break Stop::ExtensionGone;
                }
                sleep = Some(ERROR_BACKOFF);
            }

            if Instant::now() >= next_housekeeping {
                next_housekeeping = Instant::now() + HOUSEKEEPING_EVERY;
                let ids: Vec<i64> = self.tracked.keys().copied().collect();
                if let Err(e) =
                    in_transaction(|| spi_update(RECOVER_SQL, &[ids.into(), false.into()]))
                        .and_then(|r| r)
                {
                    warning!("webhook_ext worker: housekeeping failed: {e}");
                }
            }
            self.slot
                .in_flight
                .store(http.in_flight() as u32, Ordering::Relaxed);
            let until_housekeeping = next_housekeeping.saturating_duration_since(Instant::now());
            let timeout = Some(sleep.map_or(until_housekeeping, |s| s.min(until_housekeeping)));
            if timeout != Some(Duration::ZERO) {
                self.slot.set_state(WorkerState::Idle);
                wait(Some(http.wake_fd()), timeout);
                self.slot
                    .last_wake
                    .store(shmem::now_micros(), Ordering::Relaxed);
            }
        };
        http.shutdown();
        stop
    }

    /// Takes the session advisory lock that makes this the database's only worker (a previous
    /// worker may still be exiting).
    fn become_the_only_worker(&self) -> bool {
        loop {
            match in_transaction(|| {
                Spi::get_one_with_args::<bool>(
                    "SELECT pg_try_advisory_lock($1)",
                    &[WORKER_LOCK_KEY.into()],
                )
            }) {
                Ok(Ok(Some(true))) => return true,
                Ok(Err(e)) => warning!("webhook_ext worker: {e}"),
                Err(e) => warning!("webhook_ext worker: {e}"),
                _ => {}
            }
            if !wait(None, Some(ERROR_BACKOFF)) || shutdown_requested() {
                return false;
            }
        }
    }

    fn reload_if_asked(&mut self, http: Option<&mut HttpRuntime>) {
        // SAFETY: flag set by the SIGHUP handler on this thread.
        if unsafe { pg_sys::ConfigReloadPending } == 0 {
            return;
        }
        unsafe {
            pg_sys::ConfigReloadPending = 0;
            pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
        }
        self.settings = Settings::read();
        self.schedules.clear();
        if let Some(http) = http {
            if let Err(e) = http.reconfigure(Settings::http()) {
                warning!("webhook_ext worker: keeping the previous HTTP settings: {e}");
            }
        }
    }

    fn busy_arrays(&self) -> (Vec<i32>, Vec<i32>) {
        self.per_endpoint
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(id, n)| (*id, *n))
            .unzip()
    }

    /// Claims as much due work as capacity allows and starts it. Returns how long the loop may
    /// sleep: `Some(ZERO)` when more may be due right away, `None` when nothing is pending.
    fn claim_and_send(&mut self, http: &HttpRuntime) -> Result<Option<Duration>, String> {
        let room = self.settings.max_in_flight.saturating_sub(http.in_flight());
        if room == 0 {
            return Ok(None); // a finishing request will wake us
        }
        let limit = room.min(self.settings.batch_size as usize) as i32;
        let (busy_ids, busy_counts) = self.busy_arrays();
        let s = &self.settings;
        let args_claim = (
            busy_ids.clone(),
            busy_counts.clone(),
            s.default_max_in_flight,
            limit,
            s.default_timeout_ms,
        );
        let claimed = in_transaction(|| -> Result<Vec<Claimed>, String> {
            Spi::connect_mut(|client| {
                let rows = client
                    .update(
                        CLAIM_SQL,
                        None,
                        &[
                            args_claim.0.into(),
                            args_claim.1.into(),
                            args_claim.2.into(),
                            args_claim.3.into(),
                            args_claim.4.into(),
                            LEASE_MARGIN_MS.into(),
                        ],
                    )
                    .map_err(|e| e.to_string())?;
                rows.map(|row| Claimed::from_row(&row))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())
            })
        })??;
        let full = claimed.len() as i32 >= limit;
        for c in claimed {
            self.start(http, c);
        }
        if full {
            return Ok(Some(Duration::ZERO));
        }
        let (busy_ids, busy_counts) = self.busy_arrays();
        let dmif = self.settings.default_max_in_flight;
        let next_ms = in_transaction(|| {
            Spi::get_one_with_args::<i64>(
                NEXT_DUE_SQL,
                &[busy_ids.into(), busy_counts.into(), dmif.into()],
            )
            .map_err(|e| e.to_string())
        })??;
        Ok(next_ms.map(|ms| Duration::from_millis(ms.max(0) as u64 + 1)))
    }

    /// Builds the request for one claimed delivery and hands it to the runtime. A delivery that
    /// cannot be sent at all (unusable secret or headers) fails at once with the reason.
    fn start(&mut self, http: &HttpRuntime, c: Claimed) {
        let schedule = match &c.retry_schedule {
            None => self.settings.schedule.clone(),
            Some(text) => self
                .schedules
                .entry(text.clone())
                .or_insert_with(|| {
                    Arc::new(
                        Schedule::parse(text).unwrap_or_else(|_| (*self.settings.schedule).clone()),
                    )
                })
                .clone(),
        };
        let max_attempts = c.max_attempts.unwrap_or(self.settings.default_max_attempts);
        self.tracked.insert(
            c.id,
            Tracked {
                endpoint_id: c.endpoint_id,
                max_attempts,
                schedule,
            },
        );
        *self.per_endpoint.entry(c.endpoint_id).or_default() += 1;
        let attempt = c.attempts + 1;
        let prepared = (|| -> Result<Job, String> {
            let mut keys =
                vec![signing::decode_secret(&c.secret).map_err(|e| format!("endpoint {e}"))?];
            if let Some(prev) = &c.previous_secret {
                keys.push(
                    signing::decode_secret(prev).map_err(|e| format!("endpoint previous {e}"))?,
                );
            }
            let headers =
                request::parse_headers(&c.headers).map_err(|e| format!("endpoint headers: {e}"))?;
            Ok(Job {
                delivery_id: c.id,
                endpoint_id: c.endpoint_id,
                attempt,
                url: c.url,
                msg_id: request::message_id(&self.install_id, c.id),
                body: request::envelope(&c.event_type, c.created_at_us, &c.payload),
                keys,
                headers,
                timeout: Duration::from_millis(c.timeout_ms.clamp(1, 3_600_000) as u64),
            })
        })();
        match prepared {
            Ok(job) => http.submit(job),
            Err(reason) => http.push_finished(Finished {
                delivery_id: c.id,
                endpoint_id: c.endpoint_id,
                attempt,
                started_at: std::time::SystemTime::now(),
                duration: Duration::ZERO,
                outcome: Outcome::Refused,
                response_body: None,
                error: Some(reason),
            }),
        }
    }

    /// Records `results` in batches. A batch that fails is tried again row by row, so one bad row
    /// cannot hold up the rest; results that still fail stay in `results` for the next round
    /// (after three rounds they are given up: their deliveries stay `sending` until the lease
    /// expires and are then sent again). Returns false if anything failed.
    fn record_all(&mut self, results: &mut Vec<Finished>) -> bool {
        let batch = self.settings.batch_size.max(1) as usize;
        let mut kept: Vec<Finished> = Vec::new();
        let mut ok = true;
        for chunk in results.chunks(batch) {
            if let Err(e) = self.record(chunk) {
                ok = false;
                warning!(
                    "webhook_ext worker: recording {} results failed, retrying one by one: {e}",
                    chunk.len()
                );
                for one in chunk {
                    if let Err(e) = self.record(std::slice::from_ref(one)) {
                        let tries = self.record_failures.entry(one.delivery_id).or_insert(0);
                        *tries += 1;
                        if *tries < 3 {
                            kept.push(one.clone());
                        } else {
                            warning!(
                                "webhook_ext worker: giving up recording delivery {}: {e}",
                                one.delivery_id
                            );
                            self.record_failures.remove(&one.delivery_id);
                            self.forget(one.delivery_id);
                        }
                    }
                }
            }
        }
        *results = kept;
        ok
    }

    /// Stops tracking a delivery and frees its endpoint's slot.
    fn forget(&mut self, delivery_id: i64) {
        if let Some(t) = self.tracked.remove(&delivery_id) {
            if let Some(n) = self.per_endpoint.get_mut(&t.endpoint_id) {
                *n -= 1;
                if *n <= 0 {
                    self.per_endpoint.remove(&t.endpoint_id);
                }
            }
        }
    }

    /// Writes one batch of results in one transaction.
    fn record(&mut self, batch: &[Finished]) -> Result<(), String> {
        let n = batch.len();
        let mut ids = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        let mut statuses = Vec::with_capacity(n);
        let mut codes: Vec<Option<i32>> = Vec::with_capacity(n);
        let mut errors: Vec<Option<String>> = Vec::with_capacity(n);
        let mut bodies: Vec<Option<String>> = Vec::with_capacity(n);
        let mut started = Vec::with_capacity(n);
        let mut micros = Vec::with_capacity(n);
        let mut delays = Vec::with_capacity(n);
        let mut gone: Vec<i32> = Vec::new();
        let (mut delivered, mut failed) = (0u64, 0u64);
        for f in batch {
            let Some(t) = self.tracked.get(&f.delivery_id) else {
                continue;
            };
            let verdict = retry::decide(
                &f.outcome,
                f.attempt as u32,
                t.max_attempts as u32,
                &t.schedule,
                fastrand::f64() * 2.0 - 1.0,
            );
            let (status, delay, extra) = match verdict {
                Verdict::Delivered => ("delivered", 0, None),
                Verdict::Retry(d) => ("pending", d.as_millis() as i64, None),
                Verdict::Failed if matches!(f.outcome, Outcome::Refused) => ("failed", 0, None),
                Verdict::Failed => (
                    "failed",
                    0,
                    Some(format!(" (gave up after {} attempts)", f.attempt)),
                ),
                Verdict::Gone => {
                    gone.push(t.endpoint_id);
                    ("failed", 0, Some(": endpoint disabled".to_string()))
                }
            };
            match status {
                "delivered" => delivered += 1,
                "failed" => failed += 1,
                _ => {}
            }
            ids.push(f.delivery_id);
            attempts.push(f.attempt);
            statuses.push(status.to_string());
            codes.push(f.status_code().map(i32::from));
            errors.push(match (&f.error, extra) {
                (Some(e), Some(x)) => Some(format!("{e}{x}")),
                (e, _) => e.clone(),
            });
            bodies.push(f.response_body.as_ref().map(|b| b.replace('\0', "")));
            started.push(
                f.started_at
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs_f64(),
            );
            micros.push(f.duration.as_micros() as i64);
            delays.push(delay);
        }
        gone.sort_unstable();
        gone.dedup();
        let done_ids = ids.clone();
        in_transaction(|| -> Result<(), String> {
            spi_update(
                RECORD_SQL,
                &[
                    ids.into(),
                    attempts.into(),
                    statuses.into(),
                    codes.into(),
                    errors.into(),
                    bodies.into(),
                    started.into(),
                    micros.into(),
                    delays.into(),
                ],
            )?;
            if !gone.is_empty() {
                spi_update(GONE_SQL, &[gone.into()])?;
            }
            Ok(())
        })??;
        for id in done_ids {
            self.forget(id);
            self.record_failures.remove(&id);
        }
        self.slot.attempts.fetch_add(n as u64, Ordering::Relaxed);
        self.slot.delivered.fetch_add(delivered, Ordering::Relaxed);
        self.slot.failed.fetch_add(failed, Ordering::Relaxed);
        Ok(())
    }
}

/// One row of CLAIM_SQL.
struct Claimed {
    id: i64,
    endpoint_id: i32,
    attempts: i32,
    event_type: String,
    created_at_us: i64,
    payload: String,
    url: String,
    secret: String,
    previous_secret: Option<String>,
    headers: String,
    timeout_ms: i64,
    max_attempts: Option<i32>,
    retry_schedule: Option<String>,
}

impl Claimed {
    fn from_row(row: &pgrx::spi::SpiHeapTupleData) -> Result<Claimed, pgrx::spi::Error> {
        Ok(Claimed {
            id: row.get(1)?.unwrap_or_default(),
            endpoint_id: row.get(2)?.unwrap_or_default(),
            attempts: row.get(3)?.unwrap_or_default(),
            event_type: row.get(4)?.unwrap_or_default(),
            created_at_us: row.get(5)?.unwrap_or_default(),
            payload: row.get(6)?.unwrap_or_else(|| "null".into()),
            url: row.get(7)?.unwrap_or_default(),
            secret: row.get(8)?.unwrap_or_default(),
            previous_secret: row.get(9)?,
            headers: row.get(10)?.unwrap_or_else(|| "{}".into()),
            timeout_ms: row.get(11)?.unwrap_or(15_000),
            max_attempts: row.get(12)?,
            retry_schedule: row.get(13)?,
        })
    }
}

fn spi_update(sql: &str, args: &[pgrx::datum::DatumWithOid]) -> Result<(), String> {
    Spi::connect_mut(|client| client.update(sql, None, args).map(|_| ())).map_err(|e| e.to_string())
}

fn extension_installed() -> bool {
    // SAFETY: catalog lookup inside a transaction.
    unsafe { pg_sys::get_extension_oid(c"webhook_ext".as_ptr(), true) != pg_sys::InvalidOid }
}

/// Runs `f` in its own transaction. A Postgres ERROR (or a panic) inside is caught: the
/// transaction is rolled back and the message returned, so the worker carries on.
fn in_transaction<R>(f: impl FnOnce() -> R) -> Result<R, String> {
    // SAFETY: the worker's main thread, outside any transaction.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let f = AssertUnwindSafe(f);
    PgTryBuilder::new(move || {
        let f = f;
        let result = (f.0)();
        // SAFETY: ends the transaction started above; an error while committing is caught below.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(result)
    })
    .catch_others(|caught| {
        // SAFETY: the error state was flushed by pgrx; abort returns us to TopMemoryContext.
        unsafe { pg_sys::AbortCurrentTransaction() };
        Err(describe(caught))
    })
    .execute()
}

fn describe(caught: pg_sys::panic::CaughtError) -> String {
    match caught {
        pg_sys::panic::CaughtError::PostgresError(e)
        | pg_sys::panic::CaughtError::ErrorReport(e) => e.message().to_string(),
        pg_sys::panic::CaughtError::RustPanic { ereport, .. } => {
            format!("internal error: {}", ereport.message())
        }
    }
}

fn shutdown_requested() -> bool {
    // SAFETY: flag set by the SIGTERM handler on this thread.
    unsafe { pg_sys::ShutdownRequestPending != 0 }
}

/// Sleeps on the latch (and on `fd`, if given) for at most `timeout`; false once shutdown is asked.
fn wait(fd: Option<i32>, timeout: Option<Duration>) -> bool {
    let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_EXIT_ON_PM_DEATH;
    if fd.is_some() {
        events |= pg_sys::WL_SOCKET_READABLE;
    }
    let ms = match timeout {
        Some(t) => {
            events |= pg_sys::WL_TIMEOUT;
            t.as_millis().min(i32::MAX as u128) as std::ffi::c_long
        }
        None => -1,
    };
    // SAFETY: waiting on our own latch from the main thread.
    unsafe {
        pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events as i32,
            fd.unwrap_or(-1),
            ms,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
        pg_sys::check_for_interrupts!();
    }
    !shutdown_requested()
}

/// Runs `f` with every signal blocked, so threads it spawns start with signals blocked.
fn block_signals_while<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: plain libc calls on locally owned signal sets.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old);
        let r = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
        r
    }
}
