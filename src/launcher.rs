//! The launcher: a background worker connected to no database that keeps one delivery worker
//! running per database named in `webhook.database` — starting it once the database exists,
//! restarting it if it dies, stopping it when the database leaves the list or is being dropped.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BgWorkerStartTime, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::pg::gucs;
use crate::pg::shmem::{self, MAX_DATABASES};

/// Pause before starting a worker again after it exited.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// How often to look again while a listed database does not exist yet.
const MISSING_DATABASE_POLL: Duration = Duration::from_secs(5);

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
    // SAFETY: setting a session GUC on the main thread after the connection is made.
    unsafe {
        pg_sys::SetConfigOption(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_OVERRIDE,
        )
    };
    shared
        .launcher_pid
        .store(unsafe { pg_sys::MyProcPid }, Ordering::Release);
    shared
        .launcher_latch
        .store(unsafe { pg_sys::MyLatch }, Ordering::Release);

    let mut workers: Vec<Option<DynamicBackgroundWorker>> =
        (0..MAX_DATABASES).map(|_| None).collect();
    let mut not_before: Vec<Option<Instant>> = vec![None; MAX_DATABASES];
    let mut warned_full = false;
    loop {
        unsafe {
            if pg_sys::ShutdownRequestPending != 0 {
                break;
            }
            if pg_sys::ConfigReloadPending != 0 {
                pg_sys::ConfigReloadPending = 0;
                pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
            }
        }
        let names = gucs::databases();
        let wanted = lookup_databases(&names);
        let any_missing = wanted.iter().any(|(_, oid)| oid.is_none());
        let now_us = shmem::now_micros();
        let mut retry_soon = false;

        // Stop workers whose database left the list, is gone, or is being dropped.
        for (i, slot) in shared.slots.iter().enumerate() {
            let dboid = slot.dboid.load(Ordering::Acquire);
            if dboid == 0 {
                continue;
            }
            let listed = wanted
                .iter()
                .any(|(_, oid)| oid.map(u32::from) == Some(dboid));
            let evicted = slot.evict_until.load(Ordering::Acquire) > now_us;
            let running = workers[i].as_ref().map(|w| {
                !matches!(
                    w.pid(),
                    Err(pgrx::bgworkers::BackgroundWorkerStatus::Stopped)
                )
            });
            if !listed || evicted {
                if let Some(w) = workers[i].take() {
                    let _ = w.terminate();
                }
                if slot.pid.load(Ordering::Acquire) == 0 && running != Some(true) {
                    if !listed {
                        slot.dboid.store(0, Ordering::Release);
                    }
                } else {
                    retry_soon = true;
                }
                if evicted {
                    retry_soon = true;
                }
            } else if running == Some(false) {
                // It exited (crashed or asked to): start it again after a pause.
                workers[i] = None;
                not_before[i] = Some(Instant::now() + RESTART_DELAY);
                retry_soon = true;
            }
        }

        // Start the workers that should run and do not.
        for (name, oid) in &wanted {
            let Some(oid) = oid else { continue };
            let want = u32::from(*oid);
            let index = match shared
                .slots
                .iter()
                .position(|s| s.dboid.load(Ordering::Acquire) == want)
            {
                Some(i) => i,
                None => match shared
                    .slots
                    .iter()
                    .position(|s| s.dboid.load(Ordering::Acquire) == 0)
                {
                    Some(i) => {
                        shared.slots[i].reset(name);
                        shared.slots[i].dboid.store(want, Ordering::Release);
                        i
                    }
                    None => {
                        warning!("webhook_ext: more than {MAX_DATABASES} databases listed in webhook.database; \"{name}\" is not served");
                        continue;
                    }
                },
            };
            let slot = &shared.slots[index];
            if workers[index].is_some() || slot.evict_until.load(Ordering::Acquire) > now_us {
                continue;
            }
            if not_before[index].is_some_and(|t| Instant::now() < t)
                || slot.pid.load(Ordering::Acquire) != 0
            {
                retry_soon = true;
                continue;
            }
            slot.set_name(name);
            match start_worker(name, index) {
                Some(w) => {
                    workers[index] = Some(w);
                    not_before[index] = None;
                    warned_full = false;
                }
                None => {
                    if !warned_full {
                        warning!(
                            "webhook_ext: could not start the worker for database \"{name}\": no free background worker slot (raise max_worker_processes)"
                        );
                        warned_full = true;
                    }
                    not_before[index] = Some(Instant::now() + MISSING_DATABASE_POLL);
                    retry_soon = true;
                }
            }
        }

        let timeout = if retry_soon {
            Some(RESTART_DELAY)
        } else if any_missing {
            Some(MISSING_DATABASE_POLL)
        } else {
            None
        };
        let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_EXIT_ON_PM_DEATH;
        let ms = match timeout {
            Some(t) => {
                events |= pg_sys::WL_TIMEOUT;
                t.as_millis() as std::ffi::c_long
            }
            None => -1,
        };
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                events as i32,
                ms,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
            pg_sys::check_for_interrupts!();
        }
    }
    shared
        .launcher_latch
        .store(std::ptr::null_mut(), Ordering::Release);
    for w in workers.into_iter().flatten() {
        let _ = w.terminate();
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
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .load_dynamic()
        .ok()
}
