//! The launcher: a background worker connected to no database that keeps `webhook.workers`
//! delivery workers running per database named in `webhook.database` — starting them once the
//! database exists, restarting one that dies, stopping them when the database leaves the list or
//! is being dropped, and stopping the surplus when `webhook.workers` goes down.
//!
//! Each shared-memory slot has a [`Runner`] at the same index: the launcher's handle on the
//! worker it started there and the pause before the next start. A round stops what must go
//! ([`Launcher::stop_unwanted`]), starts what should run ([`Launcher::start_wanted`]) and sleeps
//! ([`next_timeout`]); the decisions themselves are the pure functions [`verdict`],
//! [`after_stop`] and [`start_step`].

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, BgWorkerStartTime,
    DynamicBackgroundWorker, SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::pg::gucs;
use crate::pg::process;
use crate::pg::shmem::{self, Shared, Slot, MAX_SLOTS};

/// Pause before starting a worker again after it exited.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// How often to look again while a listed database does not exist yet.
const MISSING_DATABASE_POLL: Duration = Duration::from_secs(5);

/// The databases named in `webhook.database`, with their OIDs (`None`: not there yet).
type Wanted = [(String, Option<pg_sys::Oid>)];

/// Registers the launcher; called from `_PG_init` in the postmaster.
pub fn register() {
    BackgroundWorkerBuilder::new("webhook_ext launcher")
        .set_type("webhook_ext launcher")
        .set_library("webhook_ext")
        .set_function("webhook_launcher_main")
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn webhook_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let Some(shared) = shmem::shared() else {
        error!("webhook_ext launcher started without shared memory");
    };
    BackgroundWorker::connect_worker_to_spi(None, None);
    // Like the worker: nothing it runs may resolve a name outside pg_catalog.
    process::override_settings(&[(c"search_path", c"pg_catalog, pg_temp")]);
    // SAFETY: plain reads of this process's own globals, set before the worker's main runs.
    let (pid, latch) = unsafe { (pg_sys::MyProcPid, pg_sys::MyLatch) };
    shared.launcher_pid.store(pid, Ordering::Release);
    shared.launcher_latch.store(latch, Ordering::Release);

    let mut launcher = Launcher::new();
    while !process::shutdown_requested() {
        process::reload_if_asked();
        let timeout = launcher.round(shared);
        if !process::wait(None, timeout) {
            break;
        }
    }
    shared
        .launcher_latch
        .store(std::ptr::null_mut(), Ordering::Release);
    launcher.stop_all();
}

/// The launcher's own state across rounds.
struct Launcher {
    /// One per shared-memory slot, at the same index.
    runners: [Runner; MAX_SLOTS],
    /// Whether "no free background worker slot" was already said; a successful start resets
    /// it, so the warning comes once per shortage rather than once per retry.
    warned_full: bool,
}

impl Launcher {
    fn new() -> Launcher {
        Launcher {
            runners: std::array::from_fn(|_| Runner::default()),
            warned_full: false,
        }
    }

    /// One round: stop what must go, start what should run. Returns how long to sleep.
    fn round(&mut self, shared: &Shared) -> Option<Duration> {
        let names = gucs::databases();
        let wanted = lookup_databases(&names);
        let workers = gucs::WORKERS.get().max(1) as u32;
        // Published before any worker starts this round: every worker splits by this value. A
        // change wakes them all (each then sees it is out of date and leaves).
        if shared.workers.swap(workers, Ordering::AcqRel) != workers {
            shared.slots.iter().for_each(Slot::wake);
        }
        let any_missing = wanted.iter().any(|(_, oid)| oid.is_none());
        let now_us = shmem::now_micros();
        // Both passes run every round, whatever the first one found.
        let stopping = self.stop_unwanted(shared, &wanted, workers, now_us);
        let starting = self.start_wanted(shared, &wanted, workers, now_us);
        next_timeout(stopping || starting, any_missing)
    }

    /// Stops the workers whose database left the list, is gone, or is being dropped, and those
    /// beyond `workers`, and notices the ones that exited. True if a slot needs another look soon.
    fn stop_unwanted(
        &mut self,
        shared: &Shared,
        wanted: &Wanted,
        workers: u32,
        now_us: i64,
    ) -> bool {
        let mut retry_soon = false;
        for (slot, runner) in shared.slots.iter().zip(self.runners.iter_mut()) {
            let dboid = slot.dboid.load(Ordering::Acquire);
            if dboid == 0 {
                continue;
            }
            let db_listed = wanted
                .iter()
                .any(|(_, oid)| oid.map(u32::from) == Some(dboid));
            let evicted = is_evicted(slot, now_us);
            let handle = runner.handle();
            if db_listed && !evicted && slot.part.load(Ordering::Acquire) >= workers {
                // webhook.workers went down: the surplus worker leaves on its own once its
                // requests under way are recorded (a SIGTERM would cut them off, to be sent
                // again); the slot is freed after it has gone.
                if slot.pid.load(Ordering::Acquire) == 0 && handle != Handle::Alive {
                    runner.worker = None;
                    slot.dboid.store(0, Ordering::Release);
                } else {
                    retry_soon = true;
                }
                continue;
            }
            let listed = db_listed;
            match verdict(listed, evicted, handle) {
                Verdict::Keep => {}
                Verdict::Restart => {
                    // It exited: after a pause if it crashed, at once if it left because
                    // webhook.workers changed (its successor has endpoints waiting).
                    runner.exited();
                    if slot.resplit.swap(false, Ordering::AcqRel) {
                        runner.not_before = None;
                    }
                    retry_soon = true;
                }
                Verdict::Stop => {
                    if runner.stop() {
                        let why = if evicted {
                            "being dropped, renamed or copied"
                        } else {
                            "no longer served"
                        };
                        log!(
                            "webhook_ext launcher: stopping the worker of database \"{}\" ({why})",
                            slot.name()
                        );
                    }
                    // The slot's pid is read after asking the worker to stop.
                    let pid = slot.pid.load(Ordering::Acquire);
                    let after = after_stop(listed, evicted, handle, pid);
                    if after.free_slot {
                        slot.dboid.store(0, Ordering::Release);
                    }
                    retry_soon |= after.recheck;
                }
            }
        }
        retry_soon
    }

    /// Starts the workers that should run and do not. True if one must be tried again soon.
    fn start_wanted(
        &mut self,
        shared: &Shared,
        wanted: &Wanted,
        workers: u32,
        now_us: i64,
    ) -> bool {
        let mut retry_soon = false;
        for ((name, oid), part) in wanted
            .iter()
            .flat_map(|w| (0..workers).map(move |part| (w, part)))
        {
            let Some(oid) = oid else { continue };
            // A database being dropped or renamed gets no new worker, whichever part.
            if shared.slots_of_db(*oid).any(|s| is_evicted(s, now_us)) {
                continue;
            }
            let Some(index) = claim_slot(shared, name, u32::from(*oid), part) else {
                warning!("webhook_ext: no free worker slot for database \"{name}\" (at most {MAX_SLOTS} workers in all: lower webhook.workers or the number of databases)");
                continue;
            };
            let slot = &shared.slots[index];
            let runner = &mut self.runners[index];
            let step = start_step(
                runner.is_running(),
                is_evicted(slot, now_us),
                runner.pausing(),
                slot.pid.load(Ordering::Acquire),
            );
            match step {
                StartStep::Skip => continue,
                StartStep::Later => {
                    retry_soon = true;
                    continue;
                }
                StartStep::Now => {}
            }
            slot.set_name(name);
            match runner.start(name, index) {
                Ok(()) => self.warned_full = false,
                Err(NoWorkerSlot) => {
                    if !self.warned_full {
                        warning!(
                            "webhook_ext: could not start the worker for database \"{name}\": no free background worker slot (raise max_worker_processes)"
                        );
                        self.warned_full = true;
                    }
                    retry_soon = true;
                }
            }
        }
        retry_soon
    }

    /// Asks every worker this launcher started to stop (the launcher is leaving).
    fn stop_all(mut self) {
        for runner in &mut self.runners {
            let _ = runner.stop();
        }
    }
}

/// The launcher's side of one slot: the worker it started there and when it may start one again.
#[derive(Default)]
struct Runner {
    /// The worker started for this slot, until it is seen to exit or is stopped.
    worker: Option<DynamicBackgroundWorker>,
    /// No start before this: the pause after an exit or after a start that found no free
    /// background worker slot.
    not_before: Option<Instant>,
}

/// `Runner::start` found no free background worker slot.
struct NoWorkerSlot;

impl Runner {
    /// What the launcher's handle says about the worker it started here.
    fn handle(&self) -> Handle {
        match &self.worker {
            None => Handle::Absent,
            Some(w) if matches!(w.pid(), Err(BackgroundWorkerStatus::Stopped)) => Handle::Exited,
            Some(_) => Handle::Alive,
        }
    }

    /// Started here and not yet seen to exit or stopped.
    fn is_running(&self) -> bool {
        self.worker.is_some()
    }

    /// Still in the pause before the next start.
    fn pausing(&self) -> bool {
        self.not_before.is_some_and(|t| Instant::now() < t)
    }

    /// The worker exited on its own: forget it and start it again after `RESTART_DELAY`.
    fn exited(&mut self) {
        self.worker = None;
        self.not_before = Some(Instant::now() + RESTART_DELAY);
    }

    /// Asks the worker (if any) to stop and forgets it; its exit shows in the slot's pid. True
    /// if there was one to ask.
    fn stop(&mut self) -> bool {
        match self.worker.take() {
            Some(w) => {
                let _ = w.terminate();
                true
            }
            None => false,
        }
    }

    /// Starts the worker for slot `index`; on failure, tries again after `MISSING_DATABASE_POLL`.
    fn start(&mut self, name: &str, index: usize) -> Result<(), NoWorkerSlot> {
        match start_worker(name, index) {
            Some(w) => {
                self.worker = Some(w);
                self.not_before = None;
                Ok(())
            }
            None => {
                self.not_before = Some(Instant::now() + MISSING_DATABASE_POLL);
                Err(NoWorkerSlot)
            }
        }
    }
}

/// Whether DROP DATABASE (or similar) wants the slot's worker gone right now.
fn is_evicted(slot: &Slot, now_us: i64) -> bool {
    slot.evict_until.load(Ordering::Acquire) > now_us
}

/// The slot of worker `part` of `dboid`, or else a free one prepared for it; `None` when all
/// are taken.
fn claim_slot(shared: &Shared, name: &str, dboid: u32, part: u32) -> Option<usize> {
    if let Some(i) = shared.slots.iter().position(|s| {
        s.dboid.load(Ordering::Acquire) == dboid && s.part.load(Ordering::Acquire) == part
    }) {
        return Some(i);
    }
    let i = shared
        .slots
        .iter()
        .position(|s| s.dboid.load(Ordering::Acquire) == 0)?;
    // A DROP or RENAME of the database may be evicting its other workers right now: the new
    // slot is evicted as long as they are.
    let evicting = shared
        .slots_of_db(pg_sys::Oid::from(dboid))
        .map(|s| s.evict_until.load(Ordering::Acquire))
        .max()
        .unwrap_or(0);
    shared.slots[i].reset(name);
    shared.slots[i]
        .evict_until
        .store(evicting, Ordering::Release);
    shared.slots[i].part.store(part, Ordering::Release);
    shared.slots[i].dboid.store(dboid, Ordering::Release);
    Some(i)
}

/// What the launcher's own handle says about a slot's worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Handle {
    /// No handle: never started by this launcher, or already let go.
    Absent,
    /// Started, and Postgres has not reported it stopped (it may not be up yet).
    Alive,
    /// Started, and Postgres reports it stopped.
    Exited,
}

/// What to do with a served slot's worker this round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Leave it as it is.
    Keep,
    /// It exited on its own: start it again after `RESTART_DELAY`.
    Restart,
    /// Its database left the list, is gone, or is being dropped: make it stop.
    Stop,
}

/// The verdict for a slot whose database is `listed` (and exists) or not, and `evicted` or not.
fn verdict(listed: bool, evicted: bool, handle: Handle) -> Verdict {
    if !listed || evicted {
        Verdict::Stop
    } else if handle == Handle::Exited {
        Verdict::Restart
    } else {
        Verdict::Keep
    }
}

/// What follows a `Verdict::Stop`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct AfterStop {
    /// Give the slot up (another database may take it).
    free_slot: bool,
    /// Look again soon: the worker is still on its way out, or the eviction has yet to end.
    recheck: bool,
}

/// After asking a slot's worker to stop: `handle` as it was before, `pid` the slot's pid now.
fn after_stop(listed: bool, evicted: bool, handle: Handle, pid: i32) -> AfterStop {
    // Gone once no worker holds the slot and the one started here was not last seen alive.
    let gone = pid == 0 && handle != Handle::Alive;
    AfterStop {
        // A database that is only evicted keeps its slot (and its counters) for when it returns.
        free_slot: gone && !listed,
        recheck: !gone || evicted,
    }
}

/// Whether to start a listed database's worker now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum StartStep {
    /// Not now, and nothing to wait for here: it is already started (the stop pass watches
    /// it) or being evicted (the stop pass asked for a recheck).
    Skip,
    /// Not yet: the pause is not over, or the previous worker still holds the slot.
    Later,
    /// Start it.
    Now,
}

fn start_step(is_running: bool, evicted: bool, pausing: bool, pid: i32) -> StartStep {
    if is_running || evicted {
        StartStep::Skip
    } else if pausing || pid != 0 {
        StartStep::Later
    } else {
        StartStep::Now
    }
}

/// How long to sleep (unless woken): briefly while something is pending, longer while a listed
/// database does not exist yet, otherwise until woken.
fn next_timeout(retry_soon: bool, any_missing: bool) -> Option<Duration> {
    if retry_soon {
        Some(RESTART_DELAY)
    } else if any_missing {
        Some(MISSING_DATABASE_POLL)
    } else {
        None
    }
}

/// The OID of each named database, `None` for names that do not exist (yet) or do not accept
/// connections. The launcher has no database, so it scans the shared catalog pg_database directly
/// (as the autovacuum launcher does): index and syscache lookups need a database.
fn lookup_databases(names: &[String]) -> Vec<(String, Option<pg_sys::Oid>)> {
    let mut found: Vec<(String, pg_sys::Oid)> = Vec::new();
    // SAFETY: a heap scan of pg_database inside a short transaction, as in autovacuum.c.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        let rel = pg_sys::table_open(
            pg_sys::DatabaseRelationId,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        );
        let scan = pg_sys::table_beginscan_catalog(rel, 0, std::ptr::null_mut());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            let header = (*tuple).t_data;
            let form = header
                .cast::<u8>()
                .add((*header).t_hoff as usize)
                .cast::<pg_sys::FormData_pg_database>();
            // datconnlimit -2 marks a database whose DROP was interrupted.
            if !(*form).datallowconn || (*form).datconnlimit == -2 {
                continue;
            }
            let name = std::ffi::CStr::from_ptr((*form).datname.data.as_ptr())
                .to_string_lossy()
                .into_owned();
            if names.contains(&name) {
                found.push((name, (*form).oid));
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::table_close(rel, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        pg_sys::CommitTransactionCommand();
    }
    names
        .iter()
        .map(|n| {
            (
                n.clone(),
                found.iter().find(|(f, _)| f == n).map(|(_, oid)| *oid),
            )
        })
        .collect()
}

fn start_worker(dbname: &str, slot: usize) -> Option<DynamicBackgroundWorker> {
    BackgroundWorkerBuilder::new(&format!("webhook_ext worker for {dbname}"))
        .set_type("webhook_ext worker")
        .set_library("webhook_ext")
        .set_function("webhook_worker_main")
        .set_argument(Some(pg_sys::Datum::from(slot)))
        .enable_spi_access()
        .set_start_time(BgWorkerStartTime::RecoveryFinished)
        .set_restart_time(None)
        // SAFETY: a plain read of this process's own pid.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HANDLES: [Handle; 3] = [Handle::Absent, Handle::Alive, Handle::Exited];

    #[test]
    fn a_listed_database_keeps_its_worker_and_restarts_one_that_exited() {
        assert_eq!(verdict(true, false, Handle::Absent), Verdict::Keep);
        assert_eq!(verdict(true, false, Handle::Alive), Verdict::Keep);
        assert_eq!(verdict(true, false, Handle::Exited), Verdict::Restart);
    }

    #[test]
    fn unlisted_or_evicted_means_stop_whatever_the_handle_says() {
        for handle in HANDLES {
            assert_eq!(verdict(false, false, handle), Verdict::Stop);
            assert_eq!(verdict(false, true, handle), Verdict::Stop);
            assert_eq!(verdict(true, true, handle), Verdict::Stop);
        }
    }

    #[test]
    fn an_unlisted_slot_is_freed_only_once_its_worker_is_gone() {
        let gone = |handle, pid| after_stop(false, false, handle, pid);
        let freed = AfterStop {
            free_slot: true,
            recheck: false,
        };
        let waiting = AfterStop {
            free_slot: false,
            recheck: true,
        };
        assert_eq!(gone(Handle::Absent, 0), freed);
        assert_eq!(gone(Handle::Exited, 0), freed);
        // Last seen alive, or a pid still in the slot: look again soon, keep the slot.
        assert_eq!(gone(Handle::Alive, 0), waiting);
        assert_eq!(gone(Handle::Absent, 42), waiting);
        assert_eq!(gone(Handle::Exited, 42), waiting);
    }

    #[test]
    fn an_evicted_slot_is_rechecked_and_freed_only_if_also_unlisted() {
        for handle in HANDLES {
            for pid in [0, 42] {
                let listed = after_stop(true, true, handle, pid);
                assert!(!listed.free_slot && listed.recheck, "{handle:?} {pid}");
                let unlisted = after_stop(false, true, handle, pid);
                let gone = pid == 0 && handle != Handle::Alive;
                assert_eq!(unlisted.free_slot, gone, "{handle:?} {pid}");
                assert!(unlisted.recheck, "{handle:?} {pid}");
            }
        }
        // The same, spelled out rather than computed: freed only when no pid holds the slot and
        // the worker was not last seen alive.
        for (handle, pid, freed) in [
            (Handle::Absent, 0, true),
            (Handle::Exited, 0, true),
            (Handle::Alive, 0, false),
            (Handle::Absent, 42, false),
            (Handle::Exited, 42, false),
            (Handle::Alive, 42, false),
        ] {
            assert_eq!(
                after_stop(false, true, handle, pid).free_slot,
                freed,
                "{handle:?} {pid}"
            );
        }
    }

    #[test]
    fn a_worker_starts_only_when_nothing_holds_the_slot_back() {
        assert_eq!(start_step(false, false, false, 0), StartStep::Now);
        // Already started or evicted: skipped, without asking for a retry.
        for (pausing, pid) in [(false, 0), (true, 0), (false, 42), (true, 42)] {
            assert_eq!(start_step(true, false, pausing, pid), StartStep::Skip);
            assert_eq!(start_step(false, true, pausing, pid), StartStep::Skip);
            assert_eq!(start_step(true, true, pausing, pid), StartStep::Skip);
        }
        // In the pause, or the previous worker has not left the slot: try again soon.
        assert_eq!(start_step(false, false, true, 0), StartStep::Later);
        assert_eq!(start_step(false, false, false, 42), StartStep::Later);
        assert_eq!(start_step(false, false, true, 42), StartStep::Later);
    }

    #[test]
    fn the_sleep_is_short_while_something_is_pending() {
        assert_eq!(next_timeout(true, false), Some(RESTART_DELAY));
        assert_eq!(next_timeout(true, true), Some(RESTART_DELAY));
        assert_eq!(next_timeout(false, true), Some(MISSING_DATABASE_POLL));
        assert_eq!(next_timeout(false, false), None);
        assert_eq!(RESTART_DELAY, Duration::from_secs(1));
        assert_eq!(MISSING_DATABASE_POLL, Duration::from_secs(5));
    }
}
