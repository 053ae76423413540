//! The delivery worker: `webhook.workers` background processes per served database, each
//! delivering to its own share of the endpoints (`split::Split`).
//!
//! ```text
//! webhook_worker_main       pins its settings, runs as the bootstrap superuser
//!  └ Worker::run            waits for CREATE EXTENSION / ALTER EXTENSION UPDATE, takes the
//!     │                     database's worker lock, steps aside for a logical replica
//!     └ Session::serve      (session.rs) one serving session:
//!         loop { record finished attempts   -- record.rs: one transaction per batch
//!                claim due deliveries       -- claim.rs: FOR UPDATE SKIP LOCKED, then each
//!                                              handed to the HTTP runtime (no transaction
//!                                              open while requests run)
//!                housekeeping when due      -- housekeeping.rs
//!                wait(latch | results pipe | next due time) }
//! ```
//! Only this (main) thread touches Postgres; the HTTP runtime's threads never do. Every
//! transaction runs under a catch-all (`error::transaction`): an error is logged, the loop goes
//! on, and never takes the worker down. The statements are in queries.rs.

mod claim;
mod credentials;
mod error;
mod housekeeping;
mod inflight;
mod ops;
pub(crate) mod queries;
mod record;
mod route;
mod session;
mod settings;

use std::sync::atomic::Ordering;
use std::time::Duration;

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::pg::process::{override_settings, reload_if_asked, shutdown_requested, wait};
use crate::pg::shmem::{self, Slot, WorkerState};
use crate::split::Split;
use error::{catalog_transaction, WorkerError};
use session::Session;

/// How often the worker looks for expired leases and purges old history when nothing wakes it.
const HOUSEKEEPING_EVERY: Duration = Duration::from_secs(60);
/// Pause after a failed transaction, so a persistent error does not spin.
const ERROR_BACKOFF: Duration = Duration::from_secs(1);
/// The lock that makes the worker the only one for its database: an advisory lock tag in a
/// space SQL cannot reach (pg_advisory_lock uses field4 = 1 or 2), so no role can take it.
const WORKER_LOCK_SPACE: u16 = 0x7768; // "wh"
const WORKER_LOCK_KEY: (u32, u32) = (0x0077_6562, 0x686f_6f6b); // "webhook"
/// The worker refreshes the queue's statistics after claiming at least this many deliveries, and
/// more than the planner believes the table holds.
const STATS_REFRESH_FLOOR: u64 = 10_000;

/// How the worker plans (the `#[pg_test]`s plan its statements with the same): index lookups and
/// nested loops only.
pub(crate) const PLANNER_SETTINGS: &[(&std::ffi::CStr, &std::ffi::CStr)] = &[
    (c"enable_indexscan", c"on"),
    (c"enable_indexonlyscan", c"on"),
    (c"enable_bitmapscan", c"on"),
    (c"enable_nestloop", c"on"),
    (c"enable_sort", c"on"),
    // Off: over a scan the statistics call tiny (taken while the table was empty), a nested loop
    // materializes the whole scan and reads it all for every outer row once the table has
    // filled, and the kept plan stays that way for the session (webhook._route()'s probe did:
    // the backlog benchmark's second round drained at 1,108/s). Without it a nested loop's inner
    // side is an index lookup.
    (c"enable_material", c"off"),
    (c"enable_seqscan", c"off"),
    (c"enable_hashjoin", c"off"),
    (c"enable_mergejoin", c"off"),
];

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn webhook_worker_main(arg: pg_sys::Datum) {
    let slot_index = arg.value();
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    shmem::in_delivery_worker();
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
        (c"synchronous_commit", c"off"),
        (c"jit", c"off"),
    ];
    override_settings(&settings);
    override_settings(PLANNER_SETTINGS);

    // SAFETY: plain reads of the backend's user ids on the main thread.
    let (user, session) = unsafe { (pg_sys::GetUserId(), pg_sys::GetSessionUserId()) };
    if user != session || user != pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID) {
        error!("webhook_ext worker: not running as the bootstrap superuser (user {user:?}); refusing to serve");
    }
    // Its share of the endpoints, for the whole of its life: when webhook.workers changes (as
    // the launcher published it), the worker exits and the launcher starts the new set.
    let part = slot.part.load(Ordering::Acquire) as i32;
    let parts = shmem::shared().map_or(1, |s| s.workers());
    match Split::new(part, parts) {
        Some(split) => {
            slot.parts.store(split.parts as u32, Ordering::SeqCst);
            Worker { slot, split }.run();
        }
        None => log!(
            "webhook_ext worker: worker {part} of database \"{}\" is not needed with webhook.workers = {parts}; leaving",
            slot.name()
        ),
    }
    slot.set_state(WorkerState::Stopping);
    // Exit code 0: the launcher, not the postmaster, decides whether to start us again.
    // SAFETY: ends this process.
    unsafe { pg_sys::proc_exit(0) };
}

#[pg_guard]
unsafe extern "C-unwind" fn release_slot(_code: i32, arg: pg_sys::Datum) {
    if let Some(shared) = shmem::shared() {
        if let Some(slot) = shared.slots.get(arg.value()) {
            // SAFETY: a plain read of this process's pid.
            slot.clear_worker(unsafe { pg_sys::MyProcPid });
        }
        shared.wake_launcher();
    }
}

/// Why a serving session ended.
pub enum Stop {
    Shutdown,
    /// webhook.workers changed: the endpoints are split anew by a new set of workers.
    Resplit,
    ExtensionGone,
    /// webhook's tables arrive by logical replication (this subscription): step aside.
    Replica(String),
}

/// The worker's life outside serving: waiting for the extension, the lock, a replica's end.
struct Worker {
    slot: &'static Slot,
    split: Split,
}

impl Worker {
    fn run(&mut self) {
        let db = self.slot.name();
        log!("webhook_ext worker started for database \"{db}\"");
        let mut told = false;
        loop {
            // Read before looking at the catalog: a wake (CREATE EXTENSION's commit) after this
            // means look again, even if the latch set was consumed meanwhile.
            let seen = self.slot.wakes_now();
            if shutdown_requested() {
                return;
            }
            if stale(self.split) {
                log!(
                    "webhook_ext worker: webhook.workers changed from {}; leaving database \"{db}\" to the new set of workers",
                    self.split.parts
                );
                self.slot.resplit.store(true, Ordering::Release);
                return;
            }
            match catalog_transaction(|| Ok(installed_version())) {
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
                        Stop::Shutdown => {
                            log!("webhook_ext worker: asked to stop; leaving database \"{db}\"");
                            return;
                        }
                        // Said and done at the top of the loop.
                        Stop::Resplit => continue,
                        Stop::Replica(sub) => {
                            if !self.stay_away_from_replicated_tables(&sub) {
                                return;
                            }
                            continue;
                        }
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
            if !self.slot.woken_since(seen) {
                wait(None, Some(HOUSEKEEPING_EVERY));
            }
            reload_if_asked();
        }
    }

    /// One serving session, once this is the database's only worker and its queue is not a
    /// logical replica's copy.
    fn serve(&mut self) -> Stop {
        if !self.become_the_only_worker() {
            return Stop::Shutdown;
        }
        if !self.wait_for_the_same_split() {
            return Stop::Resplit;
        }
        // Before anything is written: a subscriber's copy of the queue is left alone.
        if let Ok(Some(sub)) = catalog_transaction(replicated_by) {
            return Stop::Replica(sub);
        }
        let opened = loop {
            match Session::open(self.slot, self.split) {
                // DROP or ALTER EXTENSION under way: what it leaves decides.
                Err(WorkerError::Busy) => {
                    if !wait(None, Some(ERROR_BACKOFF)) {
                        return Stop::Shutdown;
                    }
                }
                opened => break opened,
            }
        };
        match opened {
            Ok(session) => session.serve(),
            Err(e) => {
                warning!("webhook_ext worker: could not start serving: {e}");
                // A persistent error must not spin.
                wait(None, Some(ERROR_BACKOFF));
                Stop::ExtensionGone
            }
        }
    }

    /// Waits until no other worker of this database splits the endpoints otherwise (one of a
    /// previous `webhook.workers` still finishing): until then two processes could deliver to
    /// the same endpoint. False if this worker's own split is out of date by then.
    fn wait_for_the_same_split(&self) -> bool {
        let Some(shared) = shmem::shared() else {
            return false;
        };
        // SAFETY: a plain read of a process global.
        let (db, me) = unsafe { (pg_sys::MyDatabaseId, pg_sys::MyProcPid) };
        let mut told = false;
        loop {
            if stale(self.split) {
                return false;
            }
            let other = shared.slots_of_db(db).any(|s| {
                let pid = s.pid.load(Ordering::SeqCst);
                let parts = s.parts.load(Ordering::SeqCst);
                pid != 0 && pid != me && parts != 0 && parts != self.split.parts as u32
            });
            if !other {
                return true;
            }
            if !told {
                log!("webhook_ext worker: waiting for the workers of the previous webhook.workers to leave database \"{}\"", self.slot.name());
                told = true;
            }
            if !wait(None, Some(Duration::from_millis(100))) {
                return false;
            }
            reload_if_asked();
        }
    }

    /// Takes the session advisory lock that makes this the only worker of its part of the
    /// database (a previous worker of the same part may still be exiting).
    fn become_the_only_worker(&self) -> bool {
        let mut told = false;
        loop {
            let got = catalog_transaction(|| Ok(take_worker_lock(self.split.part)));
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
    /// Returns false once shutdown is asked, true when the tables are no longer replicated.
    fn stay_away_from_replicated_tables(&mut self, subscription: &str) -> bool {
        warning!(
            "webhook_ext worker: database \"{}\" receives webhook's tables by logical replication (subscription \"{}\"); this worker will not deliver them",
            self.slot.name(),
            subscription.replace('"', "\"\"")
        );
        loop {
            self.slot.set_state(WorkerState::Replica);
            if !wait(None, Some(HOUSEKEEPING_EVERY)) {
                return false;
            }
            reload_if_asked();
            if stale(self.split) {
                return true;
            }
            match catalog_transaction(replicated_by) {
                Ok(Some(_)) => continue,
                Ok(None) => {
                    log!("webhook_ext worker: webhook's tables are no longer replicated into database \"{}\"; delivering", self.slot.name());
                    return true;
                }
                Err(e) => warning!("webhook_ext worker: {e}"),
            }
        }
    }
}

/// The subscription that replicates webhook's queue into this database, if one does.
fn replicated_by() -> Result<Option<String>, WorkerError> {
    Ok(queries::REPLICATED_BY.one::<String>(&[])?)
}

/// Whether webhook.workers (as the launcher published it) no longer matches `split`.
pub(crate) fn stale(split: Split) -> bool {
    shmem::shared().is_some_and(|s| s.workers() != split.parts)
}

/// Takes the worker lock of this database's part `part` (a session lock, held until the process
/// exits).
fn take_worker_lock(part: i32) -> bool {
    // SAFETY: MyDatabaseId is set once connected; LockAcquire with a session lock and
    // dontWait is safe inside a transaction on the main thread.
    unsafe {
        let tag = pg_sys::LOCKTAG {
            locktag_field1: pg_sys::MyDatabaseId.to_u32(),
            locktag_field2: WORKER_LOCK_KEY.0,
            locktag_field3: WORKER_LOCK_KEY.1.wrapping_add(part as u32),
            locktag_field4: WORKER_LOCK_SPACE,
            locktag_type: pg_sys::LockTagType::LOCKTAG_ADVISORY as u8,
            locktag_lockmethodid: pg_sys::USER_LOCKMETHOD as u8,
        };
        let got = pg_sys::LockAcquire(&tag, pg_sys::ExclusiveLock as i32, true, true);
        got != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
    }
}

/// The version of webhook_ext installed in this database, if it is. Read from pg_extension with
/// the transaction's snapshot, not through the catalog caches: CREATE EXTENSION wakes the worker
/// from its commit callback, before its cache invalidations are sent, so a cached "not
/// installed" (PostgreSQL 18 caches extension lookups by name) could outlive the wake and keep
/// the worker waiting for its next poll; a snapshot taken after the wake sees the commit.
fn installed_version() -> Option<String> {
    Spi::get_one::<String>(
        "SELECT extversion FROM pg_catalog.pg_extension WHERE extname = 'webhook_ext'",
    )
    .ok()
    .flatten()
}
