//! Small pieces every background process here needs: transactions that survive errors, latch
//! waits, reloads, shutdown, and the settings a process pins for itself.

use std::ffi::CStr;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use pgrx::pg_sys;
use pgrx::prelude::*;

/// A Postgres ERROR (or a panic) caught by `in_transaction`; its transaction was rolled back.
#[derive(Debug, Clone)]
pub struct Caught {
    pub code: PgSqlErrorCode,
    pub message: String,
}

impl std::fmt::Display for Caught {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Runs `f` in its own transaction: committed when `f` returns Ok, rolled back when it returns
/// Err. A Postgres ERROR (or a panic) inside is caught and rolled back too, and returned as
/// `Caught`, so the process carries on.
pub fn in_transaction<R, E>(f: impl FnOnce() -> Result<R, E>) -> Result<Result<R, E>, Caught> {
    // SAFETY: the process's main thread, outside any transaction.
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
            if result.is_ok() {
                pg_sys::CommitTransactionCommand();
            } else {
                pg_sys::AbortCurrentTransaction();
            }
        }
        Ok(result)
    })
    .catch_others(|caught| {
        // SAFETY: pgrx flushed the error state; aborting returns us to TopMemoryContext.
        unsafe { pg_sys::AbortCurrentTransaction() };
        Err(describe(caught))
    })
    .execute()
}

fn describe(caught: pg_sys::panic::CaughtError) -> Caught {
    match caught {
        pg_sys::panic::CaughtError::PostgresError(e)
        | pg_sys::panic::CaughtError::ErrorReport(e) => Caught {
            code: e.sql_error_code(),
            message: e.message().to_string(),
        },
        pg_sys::panic::CaughtError::RustPanic { ereport, .. } => Caught {
            code: ereport.sql_error_code(),
            message: format!("internal error: {}", ereport.message()),
        },
    }
}

/// Sets session settings with the highest precedence (PGC_S_OVERRIDE): neither ALTER DATABASE
/// nor ALTER ROLE … SET can change them for this process.
pub fn override_settings(settings: &[(&CStr, &CStr)]) {
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
}

pub fn shutdown_requested() -> bool {
    // SAFETY: a flag set by the SIGTERM handler on this thread.
    unsafe { pg_sys::ShutdownRequestPending != 0 }
}

/// Re-reads postgresql.conf if a SIGHUP arrived; true if it did.
pub fn reload_if_asked() -> bool {
    // SAFETY: a flag set by the SIGHUP handler on this thread; ProcessConfigFile on the main thread.
    unsafe {
        if pg_sys::ConfigReloadPending == 0 {
            return false;
        }
        pg_sys::ConfigReloadPending = 0;
        pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP);
    }
    true
}

/// Sleeps on the latch (and on `fd`, if given) for at most `timeout` (None = until woken);
/// false once shutdown is asked.
pub fn wait(fd: Option<i32>, timeout: Option<Duration>) -> bool {
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
    }
    pg_sys::check_for_interrupts!();
    !shutdown_requested()
}
