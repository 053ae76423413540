//! The delivery worker: one background process per served database.
//!
//! ```text
//! loop { wait(latch | results pipe | next due time)
//!        record finished attempts           -- one transaction, one statement per table
//!        claim due deliveries, mark sending  -- one transaction, FOR UPDATE SKIP LOCKED
//!        hand them to the HTTP runtime }     -- no transaction open while requests run
//! ```
//! Only this (main) thread touches Postgres. Every transaction runs under a catch-all: an error
//! is logged and the loop goes on; it never takes the worker down.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::pg::process::{
    block_signals_while, in_transaction, reload_if_asked, shutdown_requested, spi_run, wait,
};
use crate::http::{Finished, HttpConfig, HttpRuntime, Job};
use crate::pg::spi as plans;
use crate::policy::{self, Gate, Health, StatsWatch, TokenBucket};
use crate::retry::{Outcome, Schedule};
use crate::pg::shmem::{self, Slot, WorkerState};
use queries as sql;
mod queries;

const INT4: pg_sys::Oid = pg_sys::INT4OID;
const INT8: pg_sys::Oid = pg_sys::INT8OID;
const BOOL: pg_sys::Oid = pg_sys::BOOLOID;
const INT4_ARRAY: pg_sys::Oid = pg_sys::INT4ARRAYOID;
const INT8_ARRAY: pg_sys::Oid = pg_sys::INT8ARRAYOID;
const TEXT_ARRAY: pg_sys::Oid = pg_sys::TEXTARRAYOID;
const FLOAT8_ARRAY: pg_sys::Oid = pg_sys::FLOAT8ARRAYOID;
use crate::pg::gucs;
use crate::{request, signing};

/// How often the worker looks for expired leases and purges old history when nothing wakes it.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);
/// How long a claimed delivery stays `sending` beyond its timeout before it is due again.
const LEASE_MARGIN_MS: i64 = 60_000;
/// Pause after a failed transaction, so a persistent error does not spin.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// The lock that makes the worker the only one for its database: an advisory lock tag in a
/// space SQL cannot reach (pg_advisory_lock uses field4 = 1 or 2), so no role can take it.
const WORKER_LOCK_SPACE: u16 = 0x7768; // "wh"
const WORKER_LOCK_KEY: (u32, u32) = (0x0077_6562, 0x686f_6f6b); // "webhook"
/// Most bytes of request bodies the worker holds at once (claimed and under way); a claim
/// takes at least one delivery whenever nothing is under way.
const MAX_BYTES_IN_FLIGHT: i64 = 64 * 1024 * 1024;
/// Retention: deliveries deleted per transaction, and transactions per housekeeping round.
const PURGE_BATCH: i32 = 5000;
const PURGE_BATCHES_PER_ROUND: usize = 20;
/// Endpoints whose last attempt did not succeed (failing, hanging, or new) may hold at most this
/// share of webhook.max_in_flight, so the rest always has room for healthy endpoints.
const SUSPECT_SHARE_PERCENT: i32 = 90;
/// The worker refreshes the queue's statistics after claiming at least this many deliveries, and
/// more than the planner believes the table holds.
const STATS_REFRESH_FLOOR: u64 = 10_000;
/// Reads what the planner believes the deliveries table holds.
const PLANNER_ROWS: &str =
    "SELECT reltuples::float8 FROM pg_catalog.pg_class WHERE oid = 'webhook.deliveries'::regclass";

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
    // SAFETY: plain reads of process globals on the main thread.
    slot.pid
        .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
    slot.latch
        .store(unsafe { pg_sys::MyLatch }, Ordering::Release);
    slot.started_at
        .store(shmem::now_micros(), Ordering::Relaxed);
    slot.set_state(WorkerState::Starting);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(dboid), None);
    // The worker's own bookkeeping commits asynchronously: a crash can undo its last moments,
    // which only means a delivery is sent again, with the same webhook-id (at-least-once).
    // Its queries are short and frequent: never worth compiling with JIT. Each one touches a few
    // hundred rows of tables that may hold millions, through indexes. A queue's statistics are
    // always somewhat wrong (a purge empties a table, a burst fills it, the finished rows sit at
    // the front of the id order): seen through them, whole-table plans (sequential scans, merge
    // joins along the primary key, hash joins) look cheap where they cost a full pass per batch.
    // So the worker plans with index lookups and nested loops only; see also `StatsWatch` and the
    // statistics target of deliveries.status.
    // The connection applied the database's settings (ALTER DATABASE … SET, which its owner
    // controls): every one that could change who the worker is, make its writes fail, or stall
    // it is overridden here.
    let settings = [
        // Run as the bootstrap superuser, never as a role a database owner named.
        (c"role", c"none"),
        // Everything the worker runs resolves in pg_catalog: no role can shadow an operator or
        // function it calls, whatever the database's or a role's search_path says.
        (c"search_path", c"pg_catalog, pg_temp"),
        (c"default_transaction_read_only", c"off"),
        (c"default_transaction_isolation", c"read committed"),
        (c"default_transaction_deferrable", c"off"),
        (c"statement_timeout", c"0"),
        (c"lock_timeout", c"0"),
        (c"idle_in_transaction_session_timeout", c"0"),
        (c"plan_cache_mode", c"auto"),
        (c"enable_indexscan", c"on"),
        (c"enable_indexonlyscan", c"on"),
        (c"enable_bitmapscan", c"on"),
        (c"enable_nestloop", c"on"),
        (c"enable_sort", c"on"),
        (c"enable_material", c"on"),
        (c"synchronous_commit", c"off"),
        (c"jit", c"off"),
        (c"enable_seqscan", c"off"),
        (c"enable_hashjoin", c"off"),
        (c"enable_mergejoin", c"off"),
    ];
    for (name, value) in settings {
        // SAFETY: setting a session GUC on the main thread after the connection is made.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            )
        };
    }

    // SAFETY: plain reads of the backend's user ids on the main thread.
    let (user, session) = unsafe { (pg_sys::GetUserId(), pg_sys::GetSessionUserId()) };
    if user != session || user != pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID) {
        error!("webhook_ext worker: not running as the bootstrap superuser (user {user:?}); refusing to serve");
    }
    Worker::new(slot).run();
    slot.set_state(WorkerState::Stopping);
    // Exit code 0: the launcher, not the postmaster, decides whether to start us again.
    // SAFETY: ends this process.
    unsafe { pg_sys::proc_exit(0) };
}

#[pg_guard]
unsafe extern "C-unwind" fn release_slot(_code: i32, arg: pg_sys::Datum) {
    if let Some(shared) = shmem::shared() {
        if let Some(slot) = shared.slots.get(arg.value()) {
            slot.clear_worker();
        }
        shared.wake_launcher();
    }
}

/// A delivery whose request is under way.
struct Tracked {
    endpoint_id: i32,
    /// The request body's size, counted against MAX_BYTES_IN_FLIGHT.
    bytes: i64,
    max_attempts: i32,
    schedule: Arc<Schedule>,
}

/// The settings the worker acts on, read at start and on every SIGHUP.
struct Settings {
    batch_size: i32,
    max_in_flight: usize,
    default_max_in_flight: i32,
    default_timeout_ms: i32,
    schedule: Arc<Schedule>,
    default_max_attempts: i32,
    breaker_threshold: u32,
    auto_disable_after: Duration,
    retention: Duration,
    paused: bool,
}

impl Settings {
    /// Housekeeping runs every minute, or often enough for a short retention.
    fn housekeeping_every(&self) -> Duration {
        if self.retention.is_zero() {
            HOUSEKEEPING_EVERY
        } else {
            (self.retention / 4).clamp(Duration::from_secs(1), HOUSEKEEPING_EVERY)
        }
    }

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
            breaker_threshold: gucs::CIRCUIT_BREAKER_THRESHOLD.get().max(0) as u32,
            auto_disable_after: Duration::from_secs(gucs::AUTO_DISABLE_AFTER_S.get().max(0) as u64),
            retention: Duration::from_secs(gucs::RETENTION_S.get().max(0) as u64),
            paused: gucs::PAUSED.get(),
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

/// Why the serving loop ended.
enum Stop {
    Shutdown,
    ExtensionGone,
    /// Serve again from the start (webhook's tables stopped arriving by replication).
    Again,
}

struct Worker {
    slot: &'static Slot,
    settings: Settings,
    tracked: HashMap<i64, Tracked>,
    /// Requests under way per endpoint (released when their results are recorded).
    busy: HashMap<i32, i32>,
    health: HashMap<i32, Health>,
    buckets: HashMap<i32, TokenBucket>,
    schedules: HashMap<String, Arc<Schedule>>,
    /// Deliveries whose result could not be written yet, and how often that failed.
    record_failures: HashMap<i64, u32>,
    stats: StatsWatch,
    policies: Option<Policies>,
    /// Bytes of the request bodies under way.
    bytes_in_flight: i64,
    /// The subscription that replicates webhook's tables into this database, if any: then the
    /// worker sends nothing (the publisher's worker does) and writes nothing to those tables.
    replicated_by: Option<String>,
}

impl Worker {
    fn new(slot: &'static Slot) -> Worker {
        Worker {
            slot,
            settings: Settings::read(),
            tracked: HashMap::new(),
            busy: HashMap::new(),
            health: HashMap::new(),
            buckets: HashMap::new(),
            schedules: HashMap::new(),
            record_failures: HashMap::new(),
            stats: StatsWatch::new(STATS_REFRESH_FLOOR),
            policies: None,
            bytes_in_flight: 0,
            replicated_by: None,
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
            match in_transaction(installed_version) {
                Ok(Some(v)) if v != env!("CARGO_PKG_VERSION") => {
                    self.slot.set_state(WorkerState::WaitingForUpdate);
                    if !told {
                        log!(
                            "webhook_ext worker: database \"{db}\" has webhook_ext {v}, this library is {}; waiting for ALTER EXTENSION webhook_ext UPDATE",
                            env!("CARGO_PKG_VERSION")
                        );
                        told = true;
                    }
                }
                Ok(Some(_)) => {
                    told = false;
                    match self.serve() {
                        Stop::Shutdown => return,
                        Stop::Again => continue,
                        Stop::ExtensionGone => {
                            log!("webhook_ext worker: the extension was dropped in database \"{db}\"; waiting for it");
                            continue;
                        }
                    }
                }
                Ok(None) => {
                    self.slot.set_state(WorkerState::WaitingForExtension);
                    if !told {
                        log!("webhook_ext worker: waiting for CREATE EXTENSION webhook_ext in database \"{db}\"");
                        told = true;
                    }
                }
                Err(e) => {
                    self.slot.set_state(WorkerState::WaitingForExtension);
                    warning!("webhook_ext worker: {e}");
                }
            }
            wait(None, Some(HOUSEKEEPING_EVERY));
            if reload_if_asked() {
                self.settings = Settings::read();
            }
        }
    }

    /// Delivers until shutdown or until the extension disappears.
    fn serve(&mut self) -> Stop {
        plans::forget_all();
        self.policies = None;
        if !self.become_the_only_worker() {
            return Stop::Shutdown;
        }
        self.replicated_by = None;
        // Before anything is written: a subscriber's copy of the queue is left alone.
        if let Ok(Ok(Some(sub))) = in_transaction(replicated_by) {
            return self.stay_away_from_replicated_tables(&sub);
        }
        let started = in_transaction(|| -> Result<(String, HashMap<i32, Health>, f64), String> {
            let id = Spi::get_one::<String>(
                "SELECT install_id FROM webhook._meta ORDER BY created_at, install_id LIMIT 1",
            )
            .map_err(|e| e.to_string())?;
            spi_run(sql::RECOVER, &[Vec::<i64>::new().into(), true.into()])?;
            let rows = Spi::get_one::<f64>(PLANNER_ROWS).map_err(|e| e.to_string())?;
            Ok((
                id.ok_or("webhook._meta is empty")?,
                load_health()?,
                rows.unwrap_or(0.0),
            ))
        });
        match started {
            Ok(Ok((_install_id, health, rows))) => {
                self.health = health;
                self.stats.refreshed(rows);
            }
            Ok(Err(e)) | Err(e) => {
                warning!("webhook_ext worker: could not start serving: {e}");
                // A persistent error must not spin.
                wait(None, Some(ERROR_BACKOFF));
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
        self.busy.clear();
        self.buckets.clear();
        self.bytes_in_flight = 0;
        let mut unrecorded: Vec<Finished> = Vec::new();
        let mut next_housekeeping = Instant::now();
        let stop = loop {
            if shutdown_requested() {
                break Stop::Shutdown;
            }
            if reload_if_asked() {
                self.settings = Settings::read();
                self.schedules.clear();
                next_housekeeping = Instant::now();
                if let Err(e) = http.reconfigure(Settings::http()) {
                    warning!("webhook_ext worker: keeping the previous HTTP settings: {e}");
                }
            }
            self.slot.set_state(WorkerState::Working);

            unrecorded.extend(http.take_finished());
            let mut failed = !self.record_all(&mut unrecorded);
            let mut sleep = None;
            if self.settings.paused {
                self.slot.set_state(WorkerState::Paused);
            } else if !failed {
                match self.claim_and_send(&http) {
                    Ok(next) => sleep = next,
                    Err(e) => {
                        failed = true;
                        warning!("webhook_ext worker: claiming deliveries failed: {e}");
                    }
                }
            }
            if let Some(sub) = self.replicated_by.clone() {
                if http.in_flight() == 0 && unrecorded.is_empty() {
                    http.shutdown();
                    return self.stay_away_from_replicated_tables(&sub);
                }
            }
            if failed {
                plans::forget_all();
                self.policies = None;
                if !matches!(in_transaction(extension_installed), Ok(true)) {
                    break Stop::ExtensionGone;
                }
                sleep = Some(ERROR_BACKOFF);
            }
            if Instant::now() >= next_housekeeping {
                next_housekeeping = Instant::now() + self.settings.housekeeping_every();
                self.housekeeping();
            }

            self.slot
                .in_flight
                .store(http.in_flight() as u32, Ordering::Relaxed);
            let until_housekeeping = next_housekeeping.saturating_duration_since(Instant::now());
            let timeout = sleep.map_or(until_housekeeping, |s| s.min(until_housekeeping));
            if !timeout.is_zero() {
                if !self.settings.paused {
                    self.slot.set_state(WorkerState::Idle);
                }
                wait(Some(http.wake_fd()), Some(timeout));
                self.slot
                    .last_wake
                    .store(shmem::now_micros(), Ordering::Relaxed);
            }
        };
        http.shutdown();
        stop
    }

    /// ANALYZE of the queue tables, when a burst has outgrown what the planner believes they
    /// hold (see `StatsWatch`); their kept plans are re-planned on next use. Skipped while
    /// another ANALYZE or VACUUM has the table.
    fn refresh_statistics(&mut self) {
        let started = Instant::now();
        let done = in_transaction(|| -> Result<Option<f64>, String> {
            Spi::run("ANALYZE (SKIP_LOCKED) webhook.deliveries, webhook._events")
                .map_err(|e| e.to_string())?;
            Spi::get_one::<f64>(PLANNER_ROWS).map_err(|e| e.to_string())
        });
        match done {
            Ok(Ok(rows)) => {
                let rows = rows.unwrap_or(0.0);
                self.stats.refreshed(rows);
                debug1!(
                    "webhook_ext worker: refreshed the queue's statistics ({rows:.0} deliveries) in {} ms",
                    started.elapsed().as_millis()
                );
            }
            Ok(Err(e)) | Err(e) => {
                self.stats.refreshed(0.0);
                warning!("webhook_ext worker: refreshing the queue's statistics failed: {e}");
            }
        }
    }

    /// Takes the session advisory lock that makes this the database's only worker (a previous
    /// worker may still be exiting).
    fn become_the_only_worker(&self) -> bool {
        let mut told = false;
        loop {
            let got = in_transaction(take_worker_lock);
            match got {
                Ok(true) => {
                    if told {
                        log!("webhook_ext worker: the previous worker has gone; serving database \"{}\"", self.slot.name());
                    }
                    return true;
                }
                Ok(false) if !told => {
                    log!(
                        "webhook_ext worker: another worker still holds database \"{}\"; waiting for it to exit",
                        self.slot.name()
                    );
                    told = true;
                }
                Ok(false) => {}
                Err(e) => warning!("webhook_ext worker: {e}"),
            }
            if !wait(None, Some(ERROR_BACKOFF)) {
                return false;
            }
        }
    }

    /// Sends nothing and writes nothing while webhook's tables are replicated into this database
    /// (the publisher delivers them); looks again every minute, or when woken.
    fn stay_away_from_replicated_tables(&mut self, subscription: &str) -> Stop {
        warning!(
            "webhook_ext worker: database \"{}\" receives webhook's tables by logical replication (subscription \"{}\"); this worker will not deliver them",
            self.slot.name(),
            subscription.replace('"', "\"\"")
        );
        self.replicated_by = Some(subscription.to_string());
        loop {
            self.slot.set_state(WorkerState::Replica);
            if !wait(None, Some(HOUSEKEEPING_EVERY)) {
                return Stop::Shutdown;
            }
            if reload_if_asked() {
                self.settings = Settings::read();
            }
            match in_transaction(replicated_by) {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => {
                    log!("webhook_ext worker: webhook's tables are no longer replicated into database \"{}\"; delivering", self.slot.name());
                    self.replicated_by = None;
                    return Stop::Again;
                }
                Ok(Err(e)) | Err(e) => warning!("webhook_ext worker: {e}"),
            }
        }
    }

    /// Leases that expired without a result become due again; old history is purged.
    fn housekeeping(&mut self) {
        if self.replicated_by.is_some() {
            return;
        }
        let ids: Vec<i64> = self.tracked.keys().copied().collect();
        if let Err(e) =
            in_transaction(|| spi_run(sql::RECOVER, &[ids.into(), false.into()])).and_then(|r| r)
        {
            warning!("webhook_ext worker: recovering expired leases failed: {e}");
        }
        if self.settings.retention.is_zero() {
            return;
        }
        let cutoff = SystemTime::now() - self.settings.retention;
        let cutoff = cutoff
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        if let Err(e) =
            in_transaction(|| spi_run(sql::PURGE_ORPHANS, &[cutoff.into(), PURGE_BATCH.into()]))
                .and_then(|r| r)
        {
            warning!("webhook_ext worker: purging old events failed: {e}");
        }
        for _ in 0..PURGE_BATCHES_PER_ROUND {
            let step = in_transaction(|| {
                Spi::get_one_with_args::<i64>(sql::PURGE_STEP, &[cutoff.into(), PURGE_BATCH.into()])
                    .map_err(|e| e.to_string())
            })
            .and_then(|r| r);
            match step {
                Ok(Some(n)) if n >= PURGE_BATCH as i64 => continue,
                Ok(_) => break,
                Err(e) => {
                    warning!("webhook_ext worker: purging old history failed: {e}");
                    break;
                }
            }
        }
    }

    /// The worker's own limits per endpoint, beyond `max_in_flight`: the circuit breaker and the
    /// rate limit. Returns (endpoint ids, requests each may start now) and when to look again.
    fn limits(&mut self) -> (Vec<i32>, Vec<i32>, Option<Duration>) {
        let now = SystemTime::now();
        let clock = Instant::now();
        let threshold = self.settings.breaker_threshold;
        let policies = self.policies.as_ref().expect("loaded before the claim");
        // An endpoint changed (enabled, altered) since its failures began gets a fresh start.
        for (id, h) in self.health.iter_mut() {
            if let Some(&changed) = policies.updated_at.get(id) {
                if h.is_open(threshold) && Some(changed) > h.failing_since {
                    *h = Health {
                        dirty: true,
                        ..Health::default()
                    };
                }
            }
        }
        let mut allowed: HashMap<i32, i32> = HashMap::new();
        let mut wake: Option<Duration> = None;
        let mut wake_in = |d: Duration| wake = Some(wake.map_or(d, |w: Duration| w.min(d)));
        for (&id, h) in &self.health {
            let busy = self.busy.get(&id).copied().unwrap_or(0);
            if let Gate::Limited {
                allowed: n,
                wake_at,
            } = h.gate(now, threshold, busy)
            {
                allowed.insert(id, n);
                if let Some(at) = wake_at {
                    wake_in(at.duration_since(now).unwrap_or_default());
                }
            }
        }
        self.buckets
            .retain(|id, _| policies.rate_limits.iter().any(|(p, _)| p == id));
        for &(id, rate) in &policies.rate_limits {
            let rate = rate.max(1) as u32;
            let bucket = self
                .buckets
                .entry(id)
                .or_insert_with(|| TokenBucket::new(rate, clock));
            if bucket.rate() != rate {
                *bucket = TokenBucket::new(rate, clock);
            }
            let tokens = bucket.available(clock);
            if tokens == 0 {
                wake_in(bucket.next_token_in(clock));
            }
            let entry = allowed.entry(id).or_insert(tokens);
            *entry = (*entry).min(tokens);
        }
        let (ids, counts) = allowed.into_iter().unzip();
        (ids, counts, wake)
    }

    /// Claims as much due work as capacity allows and starts it. Returns how long the loop may
    /// sleep: zero when more may be due right away, None when only a result or a commit can
    /// bring new work.
    fn claim_and_send(&mut self, http: &HttpRuntime) -> Result<Option<Duration>, String> {
        let room = self.settings.max_in_flight.saturating_sub(http.in_flight());
        if room == 0 {
            return Ok(None);
        }
        let nothing_in_flight = self.tracked.is_empty();
        let byte_budget = if nothing_in_flight {
            MAX_BYTES_IN_FLIGHT
        } else {
            MAX_BYTES_IN_FLIGHT - self.bytes_in_flight
        };
        if byte_budget <= 0 {
            return Ok(None);
        }
        let limit = room.min(self.settings.batch_size as usize) as i32;
        let default_timeout = self.settings.default_timeout_ms;
        // Read before the transaction's snapshot: a change committed after this is seen again.
        let version = shmem::endpoints_version();
        // One transaction: what the worker must limit itself (endpoints re-read only after they
        // changed), then the claim.
        let (claimed, args, limits_wake) =
            in_transaction(AssertUnwindSafe(|| -> Result<_, String> {
                // In the claim's own transaction: replicated rows it could see were copied by a
                // subscription whose catalog rows were committed before them.
                if let Some(sub) = replicated_by()? {
                    self.replicated_by = Some(sub);
                    return Ok((Vec::new(), self.claim_args(Vec::new(), Vec::new()), None));
                }
                if self.policies.as_ref().is_none_or(|p| p.version != version) {
                    self.policies = Some(Policies::load(version)?);
                }
                let (limit_ids, limit_counts, limits_wake) = self.limits();
                let args = self.claim_args(limit_ids, limit_counts);
                let a = args.clone();
                let claimed = plans::run(
                    sql::CLAIM,
                    &[
                        INT4_ARRAY, INT4_ARRAY, INT4, INT4, INT4, INT8, INT4_ARRAY, INT4_ARRAY,
                        INT4_ARRAY, INT4, INT8, BOOL,
                    ],
                    &[
                        a.busy_ids.into(),
                        a.busy_counts.into(),
                        a.default_max_in_flight.into(),
                        limit.into(),
                        default_timeout.into(),
                        LEASE_MARGIN_MS.into(),
                        a.limit_ids.into(),
                        a.limit_counts.into(),
                        a.healthy.into(),
                        a.suspect_room.into(),
                        byte_budget.into(),
                        nothing_in_flight.into(),
                    ],
                    |rows| {
                        rows.map(|row| Claimed::from_row(&row))
                            .collect::<Result<Vec<_>, _>>()
                    },
                )?;
                Ok((claimed, args, limits_wake))
            }))??;
        if self.replicated_by.is_some() {
            return Ok(None);
        }
        let full = claimed.len() as i32 >= limit;
        let refresh = self.stats.claimed(claimed.len() as u64);
        let clock = Instant::now();
        for c in claimed {
            if let Some(bucket) = self.buckets.get_mut(&c.endpoint_id) {
                bucket.take(1, clock);
            }
            self.start(http, c);
        }
        if refresh {
            // After the batch is on its way: its requests run while the statistics refresh.
            self.refresh_statistics();
        }
        if full {
            return Ok(Some(Duration::ZERO));
        }
        let args = self.claim_args(args.limit_ids, args.limit_counts);
        let next_ms = in_transaction(move || {
            plans::run(
                sql::NEXT_DUE,
                &[
                    INT4_ARRAY, INT4_ARRAY, INT4, INT4_ARRAY, INT4_ARRAY, INT4_ARRAY, BOOL,
                ],
                &[
                    args.busy_ids.into(),
                    args.busy_counts.into(),
                    args.default_max_in_flight.into(),
                    args.limit_ids.into(),
                    args.limit_counts.into(),
                    args.healthy.into(),
                    (args.suspect_room > 0).into(),
                ],
                |rows| rows.first().get_one::<i64>(),
            )
        })??;
        let due = next_ms.map(|ms| Duration::from_millis(ms.max(0) as u64 + 1));
        Ok(match (due, limits_wake) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        })
    }

    /// What CLAIM and NEXT_DUE need to know about the worker's state.
    fn claim_args(&self, limit_ids: Vec<i32>, limit_counts: Vec<i32>) -> ClaimArgs {
        let healthy: Vec<i32> = self
            .health
            .iter()
            .filter(|(_, h)| h.consecutive_failures == 0 && h.last_success_at.is_some())
            .map(|(id, _)| *id)
            .collect();
        let (busy_ids, busy_counts): (Vec<i32>, Vec<i32>) =
            self.busy.iter().map(|(k, v)| (*k, *v)).unzip();
        let suspect_busy: i32 = self
            .busy
            .iter()
            .filter(|(id, _)| !healthy.contains(id))
            .map(|(_, n)| *n)
            .sum();
        let suspect_share =
            (self.settings.max_in_flight as i32 * SUSPECT_SHARE_PERCENT / 100).max(1);
        ClaimArgs {
            busy_ids,
            busy_counts,
            default_max_in_flight: self.settings.default_max_in_flight,
            limit_ids,
            limit_counts,
            suspect_room: (suspect_share - suspect_busy).max(0),
            healthy,
        }
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
        let bytes = c.size;
        self.bytes_in_flight += bytes;
        self.tracked.insert(
            c.id,
            Tracked {
                endpoint_id: c.endpoint_id,
                bytes,
                max_attempts,
                schedule,
            },
        );
        *self.busy.entry(c.endpoint_id).or_default() += 1;
        let attempt = c.attempts + 1;
        let (delivery_id, endpoint_id) = (c.id, c.endpoint_id);
        match self.job(c, attempt) {
            Ok(job) => http.submit(job),
            Err(reason) => http.push_finished(Finished {
                delivery_id,
                endpoint_id,
                attempt,
                started_at: SystemTime::now(),
                duration: Duration::ZERO,
                outcome: Outcome::Refused,
                response_body: None,
                error: Some(reason),
            }),
        }
    }

    fn job(&self, c: Claimed, attempt: i32) -> Result<Job, String> {
        let mut keys =
            vec![signing::decode_secret(&c.secret).map_err(|e| format!("endpoint {e}"))?];
        if let Some(prev) = &c.previous_secret {
            keys.push(signing::decode_secret(prev).map_err(|e| format!("endpoint previous {e}"))?);
        }
        let headers =
            request::parse_headers(&c.headers).map_err(|e| format!("endpoint headers: {e}"))?;
        Ok(Job {
            delivery_id: c.id,
            endpoint_id: c.endpoint_id,
            attempt,
            msg_id: request::message_id(&c.install_id, c.id),
            body: c.body(),
            url: c.url,
            keys,
            headers,
            timeout: Duration::from_millis(c.timeout_ms.clamp(1, 3_600_000) as u64),
        })
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

    /// Stops tracking a delivery and frees its place in its endpoint's limit.
    fn forget(&mut self, delivery_id: i64) {
        if let Some(t) = self.tracked.remove(&delivery_id) {
            self.bytes_in_flight -= t.bytes;
            if let Some(n) = self.busy.get_mut(&t.endpoint_id) {
                *n -= 1;
                if *n <= 0 {
                    self.busy.remove(&t.endpoint_id);
                }
            }
        }
    }

    /// Writes one batch of results in one transaction: attempts, deliveries, endpoint health,
    /// and endpoints disabled by 410 Gone or by failing too long.
    fn record(&mut self, batch: &[Finished]) -> Result<(), String> {
        let mut rows = RecordRows::with_capacity(batch.len());
        // Changes go to copies, written back only once the transaction has committed.
        let mut health: HashMap<i32, Health> = self
            .health
            .iter()
            .filter(|(_, h)| h.dirty)
            .map(|(id, h)| (*id, h.clone()))
            .collect();
        let mut disable: Vec<(i32, String)> = Vec::new();
        let threshold = self.settings.breaker_threshold;
        let now = SystemTime::now();
        let (mut delivered, mut failed) = (0u64, 0u64);
        for f in batch {
            let Some(t) = self.tracked.get(&f.delivery_id) else {
                continue;
            };
            let jitter = fastrand::f64() * 2.0 - 1.0;
            let h = health
                .entry(t.endpoint_id)
                .or_insert_with(|| self.health.get(&t.endpoint_id).cloned().unwrap_or_default());
            let j = policy::judge(
                &f.outcome,
                f.error.as_deref(),
                f.attempt as u32,
                t.max_attempts as u32,
                &t.schedule,
                jitter,
                h,
                now,
                threshold,
                self.settings.auto_disable_after,
            );
            match j.status {
                "delivered" => delivered += 1,
                "failed" => failed += 1,
                _ => {}
            }
            if let Some(reason) = j.disable {
                disable.push((t.endpoint_id, reason));
            }
            let (status, delay, error) = (j.status, j.delay.as_millis() as i64, j.error);
            rows.push(f, t.endpoint_id, status, delay, error);
        }
        disable.sort_by_key(|(id, _)| *id);
        disable.dedup_by_key(|(id, _)| *id);
        let dirty: Vec<(i32, Health)> = health
            .iter()
            .filter(|(_, h)| h.dirty)
            .map(|(id, h)| (*id, h.clone()))
            .collect();
        let done_ids = rows.ids.clone();
        in_transaction(move || -> Result<(), String> {
            rows.write()?;
            save_health(&dirty)?;
            if !disable.is_empty() {
                let (ids, reasons): (Vec<i32>, Vec<String>) = disable.into_iter().unzip();
                spi_run(sql::DISABLE, &[ids.into(), reasons.into()])?;
            }
            Ok(())
        })??;
        for (id, mut h) in health {
            h.dirty = false;
            h.delivered_delta = 0;
            h.failed_delta = 0;
            self.health.insert(id, h);
        }
        for id in done_ids {
            self.forget(id);
            self.record_failures.remove(&id);
        }
        self.slot
            .attempts
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.slot.delivered.fetch_add(delivered, Ordering::Relaxed);
        self.slot.failed.fetch_add(failed, Ordering::Relaxed);
        Ok(())
    }
}

/// The columns of one RECORD statement.
struct RecordRows {
    ids: Vec<i64>,
    attempts: Vec<i32>,
    statuses: Vec<String>,
    codes: Vec<Option<i32>>,
    errors: Vec<Option<String>>,
    bodies: Vec<Option<String>>,
    started: Vec<f64>,
    micros: Vec<i64>,
    delays: Vec<i64>,
    endpoints: Vec<i32>,
}

impl RecordRows {
    fn with_capacity(n: usize) -> RecordRows {
        RecordRows {
            ids: Vec::with_capacity(n),
            attempts: Vec::with_capacity(n),
            statuses: Vec::with_capacity(n),
            codes: Vec::with_capacity(n),
            errors: Vec::with_capacity(n),
            bodies: Vec::with_capacity(n),
            started: Vec::with_capacity(n),
            micros: Vec::with_capacity(n),
            delays: Vec::with_capacity(n),
            endpoints: Vec::with_capacity(n),
        }
    }

    fn push(
        &mut self,
        f: &Finished,
        endpoint_id: i32,
        status: &str,
        delay_ms: i64,
        error: Option<String>,
    ) {
        self.ids.push(f.delivery_id);
        self.attempts.push(f.attempt);
        self.statuses.push(status.to_string());
        self.codes.push(f.status_code().map(i32::from));
        // Text columns cannot hold NUL bytes.
        self.errors.push(error.map(|e| e.replace('\0', "")));
        self.bodies
            .push(f.response_body.as_ref().map(|b| b.replace('\0', "")));
        self.started.push(
            f.started_at
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs_f64(),
        );
        self.micros.push(f.duration.as_micros() as i64);
        self.delays.push(delay_ms);
        self.endpoints.push(endpoint_id);
    }

    fn write(self) -> Result<(), String> {
        if self.ids.is_empty() {
            return Ok(());
        }
        plans::run(
            sql::RECORD,
            &[
                INT8_ARRAY,
                INT4_ARRAY,
                TEXT_ARRAY,
                INT4_ARRAY,
                TEXT_ARRAY,
                TEXT_ARRAY,
                FLOAT8_ARRAY,
                INT8_ARRAY,
                INT8_ARRAY,
                INT4_ARRAY,
            ],
            &[
                self.ids.into(),
                self.attempts.into(),
                self.statuses.into(),
                self.codes.into(),
                self.errors.into(),
                self.bodies.into(),
                self.started.into(),
                self.micros.into(),
                self.delays.into(),
                self.endpoints.into(),
            ],
            |_| Ok(()),
        )
    }
}

fn epoch(t: Option<SystemTime>) -> Option<f64> {
    t.map(|t| {
        t.duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64()
    })
}

fn from_epoch(secs: Option<f64>) -> Option<SystemTime> {
    secs.filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| UNIX_EPOCH + Duration::from_secs_f64(s))
}

fn save_health(dirty: &[(i32, Health)]) -> Result<(), String> {
    if dirty.is_empty() {
        return Ok(());
    }
    let ids: Vec<i32> = dirty.iter().map(|(id, _)| *id).collect();
    let failures: Vec<i32> = dirty
        .iter()
        .map(|(_, h)| h.consecutive_failures as i32)
        .collect();
    let since: Vec<Option<f64>> = dirty.iter().map(|(_, h)| epoch(h.failing_since)).collect();
    let ok: Vec<Option<f64>> = dirty
        .iter()
        .map(|(_, h)| epoch(h.last_success_at))
        .collect();
    let bad: Vec<Option<f64>> = dirty
        .iter()
        .map(|(_, h)| epoch(h.last_failure_at))
        .collect();
    let probe: Vec<Option<f64>> = dirty.iter().map(|(_, h)| epoch(h.next_probe_at)).collect();
    let delivered: Vec<i64> = dirty
        .iter()
        .map(|(_, h)| h.delivered_delta as i64)
        .collect();
    let failed: Vec<i64> = dirty.iter().map(|(_, h)| h.failed_delta as i64).collect();
    plans::run(
        sql::SAVE_HEALTH,
        &[
            INT4_ARRAY,
            INT4_ARRAY,
            FLOAT8_ARRAY,
            FLOAT8_ARRAY,
            FLOAT8_ARRAY,
            FLOAT8_ARRAY,
            INT8_ARRAY,
            INT8_ARRAY,
        ],
        &[
            ids.into(),
            failures.into(),
            since.into(),
            ok.into(),
            bad.into(),
            probe.into(),
            delivered.into(),
            failed.into(),
        ],
        |_| Ok(()),
    )
}

fn load_health() -> Result<HashMap<i32, Health>, String> {
    Spi::connect(|client| {
        let rows = client.select(sql::LOAD_HEALTH, None, &[])?;
        let mut out = HashMap::new();
        for row in rows {
            let id: i32 = row.get(1)?.unwrap_or_default();
            out.insert(
                id,
                Health {
                    consecutive_failures: row.get::<i32>(2)?.unwrap_or(0).max(0) as u32,
                    failing_since: from_epoch(row.get(3)?),
                    last_success_at: from_epoch(row.get(4)?),
                    last_failure_at: from_epoch(row.get(5)?),
                    next_probe_at: from_epoch(row.get(6)?),
                    ..Health::default()
                },
            );
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .map_err(|e| e.to_string())
}

/// Arguments shared by CLAIM and NEXT_DUE.
#[derive(Clone)]
struct ClaimArgs {
    busy_ids: Vec<i32>,
    busy_counts: Vec<i32>,
    default_max_in_flight: i32,
    limit_ids: Vec<i32>,
    limit_counts: Vec<i32>,
    healthy: Vec<i32>,
    suspect_room: i32,
}

/// What the worker's own limits need from webhook.endpoints (POLICIES), read again only when a
/// transaction that changed that table has committed (`shmem::endpoints_version`).
struct Policies {
    version: u64,
    /// Endpoints with a rate limit, and the limit.
    rate_limits: Vec<(i32, i32)>,
    /// When each enabled endpoint was last changed (an operator's change resets the breaker).
    updated_at: HashMap<i32, SystemTime>,
}

impl Policies {
    fn load(version: u64) -> Result<Policies, String> {
        let mut p = Policies {
            version,
            rate_limits: Vec::new(),
            updated_at: HashMap::new(),
        };
        plans::run(sql::POLICIES, &[], &[], |rows| {
            for row in rows {
                let id = row.get::<i32>(1)?.unwrap_or_default();
                if let Some(rate) = row.get::<i32>(2)? {
                    p.rate_limits.push((id, rate));
                }
                if let Some(at) = from_epoch(row.get(3)?) {
                    p.updated_at.insert(id, at);
                }
            }
            Ok(())
        })?;
        Ok(p)
    }
}

/// One row of CLAIM.
struct Claimed {
    id: i64,
    endpoint_id: i32,
    attempts: i32,
    event_type: String,
    created_at_us: i64,
    payload: Option<String>,
    url: String,
    secret: String,
    previous_secret: Option<String>,
    headers: String,
    timeout_ms: i64,
    max_attempts: Option<i32>,
    retry_schedule: Option<String>,
    /// A row change (None for a send() event).
    change: Option<RowChange>,
    /// The body's size, as the claim counted it against its byte budget.
    size: i64,
    /// The install id in force (part of the webhook-id).
    install_id: String,
}

struct RowChange {
    schema: String,
    table: String,
    op: String,
    new: Option<String>,
    old: Option<String>,
    txid: i64,
}

impl Claimed {
    /// The request body, built from the stored event the same way on every attempt.
    fn body(&self) -> String {
        match &self.change {
            None => request::envelope(
                &self.event_type,
                self.created_at_us,
                self.payload.as_deref().unwrap_or("null"),
            ),
            Some(c) => {
                let data = request::row_change_data(
                    &c.schema,
                    &c.table,
                    &c.op,
                    c.new.as_deref(),
                    c.old.as_deref(),
                    c.txid,
                );
                request::envelope(&self.event_type, self.created_at_us, &data)
            }
        }
    }

    fn from_row(row: &pgrx::spi::SpiHeapTupleData) -> Result<Claimed, pgrx::spi::Error> {
        Ok(Claimed {
            id: row.get(1)?.unwrap_or_default(),
            endpoint_id: row.get(2)?.unwrap_or_default(),
            attempts: row.get(3)?.unwrap_or_default(),
            event_type: row.get(4)?.unwrap_or_default(),
            created_at_us: row.get(5)?.unwrap_or_default(),
            payload: row.get(6)?,
            url: row.get(7)?.unwrap_or_default(),
            secret: row.get(8)?.unwrap_or_default(),
            previous_secret: row.get(9)?,
            headers: row.get(10)?.unwrap_or_else(|| "{}".into()),
            timeout_ms: row.get(11)?.unwrap_or(15_000),
            max_attempts: row.get(12)?,
            retry_schedule: row.get(13)?,
            change: match row.get::<String>(16)? {
                None => None,
                Some(op) => Some(RowChange {
                    schema: row.get(14)?.unwrap_or_default(),
                    table: row.get(15)?.unwrap_or_default(),
                    op,
                    new: row.get(17)?,
                    old: row.get(18)?,
                    txid: row.get(19)?.unwrap_or_default(),
                }),
            },
            size: row.get::<i32>(20)?.map_or(0, i64::from),
            install_id: row.get(21)?.unwrap_or_default(),
        })
    }
}

/// The subscription that replicates webhook's queue into this database, if one does.
fn replicated_by() -> Result<Option<String>, String> {
    plans::run(sql::REPLICATED_BY, &[], &[], |rows| {
        if rows.is_empty() {
            Ok(None)
        } else {
            rows.first().get_one::<String>()
        }
    })
}

/// Takes this database's worker lock (a session lock, held until the process exits).
fn take_worker_lock() -> bool {
    // SAFETY: MyDatabaseId is set once connected; LockAcquire with a session lock and
    // dontWait is safe inside a transaction on the main thread.
    unsafe {
        let tag = pg_sys::LOCKTAG {
            locktag_field1: pg_sys::MyDatabaseId.to_u32(),
            locktag_field2: WORKER_LOCK_KEY.0,
            locktag_field3: WORKER_LOCK_KEY.1,
            locktag_field4: WORKER_LOCK_SPACE,
            locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
            locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
        };
        let got = pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, true, true);
        got != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
    }
}

/// The version of webhook_ext installed in this database, if it is.
fn installed_version() -> Option<String> {
    if !extension_installed() {
        return None;
    }
    Spi::get_one::<String>(
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'webhook_ext'",
    )
    .ok()
    .flatten()
}

fn extension_installed() -> bool {
    // SAFETY: a catalog lookup inside a transaction.
    unsafe { pg_sys::get_extension_oid(c"webhook_ext".as_ptr(), true) != pg_sys::InvalidOid }
}
