//! A ProcessUtility hook for the few commands that concern the workers:
//! - CREATE DATABASE: wake the launcher at commit, so a listed database is served at once;
//! - DROP DATABASE, ALTER DATABASE … RENAME, CREATE DATABASE … TEMPLATE: these need the database
//!   free of connections, so its worker is asked to leave first (and comes back if the command fails);
//! - COMMIT PREPARED: wake the worker, as a plain COMMIT does.

use std::ffi::CStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::shmem;

/// How long a worker stays away after being asked to leave its database.
const EVICTION: Duration = Duration::from_secs(10);
/// How long the command waits for the worker to disconnect.
const EVICTION_WAIT: Duration = Duration::from_secs(5);

static mut PREV: pg_sys::ProcessUtility_hook_type = None;

pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster before any backend exists.
    unsafe {
        PREV = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

// The hook itself is not #[pg_guard]ed: an ERROR raised by the command (or by the hooks after us)
// must reach the caller exactly as Postgres raised it, not be turned into a Rust panic and back.
// Nothing here needs dropping, so a longjmp through this frame is harmless; our own logic runs in
// `before`, which is guarded.
#[cfg(not(feature = "pg13"))]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    unsafe {
        before((*pstmt).utilityStmt);
        match PREV {
            Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => raw::standard_ProcessUtility(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                env,
                dest,
                qc,
            ),
        }
    }
}

#[cfg(feature = "pg13")]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    unsafe {
        before((*pstmt).utilityStmt);
        match PREV {
            Some(prev) => prev(pstmt, query, context, params, env, dest, qc),
            None => raw::standard_ProcessUtility(pstmt, query, context, params, env, dest, qc),
        }
    }
}

/// Postgres's standard_ProcessUtility without pgrx's error-catching wrapper.
mod raw {
    use pgrx::pg_sys;

    extern "C-unwind" {
        #[cfg(not(feature = "pg13"))]
        #[allow(clippy::too_many_arguments)]
        pub fn standard_ProcessUtility(
            pstmt: *mut pg_sys::PlannedStmt,
            query: *const std::ffi::c_char,
            read_only_tree: bool,
            context: pg_sys::ProcessUtilityContext::Type,
            params: pg_sys::ParamListInfo,
            env: *mut pg_sys::QueryEnvironment,
            dest: *mut pg_sys::DestReceiver,
            qc: *mut pg_sys::QueryCompletion,
        );
        #[cfg(feature = "pg13")]
        pub fn standard_ProcessUtility(
            pstmt: *mut pg_sys::PlannedStmt,
            query: *const std::ffi::c_char,
            context: pg_sys::ProcessUtilityContext::Type,
            params: pg_sys::ParamListInfo,
            env: *mut pg_sys::QueryEnvironment,
            dest: *mut pg_sys::DestReceiver,
            qc: *mut pg_sys::QueryCompletion,
        );
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn before(node: *mut pg_sys::Node) {
    if node.is_null() {
        return;
    }
    unsafe {
        match (*node).type_ {
            pg_sys::NodeTag::T_CreatedbStmt => {
                shmem::wake_launcher_at_commit();
                let stmt = node.cast::<pg_sys::CreatedbStmt>();
                if let Some(template) = def_string((*stmt).options, c"template") {
                    evict(&template);
                }
            }
            pg_sys::NodeTag::T_DropdbStmt => {
                let stmt = node.cast::<pg_sys::DropdbStmt>();
                evict(&CStr::from_ptr((*stmt).dbname).to_string_lossy());
            }
            pg_sys::NodeTag::T_RenameStmt => {
                let stmt = node.cast::<pg_sys::RenameStmt>();
                if (*stmt).renameType == pg_sys::ObjectType::OBJECT_DATABASE
                    && !(*stmt).subname.is_null()
                {
                    shmem::wake_launcher_at_commit();
                    evict(&CStr::from_ptr((*stmt).subname).to_string_lossy());
                }
            }
            pg_sys::NodeTag::T_TransactionStmt => {
                let stmt = node.cast::<pg_sys::TransactionStmt>();
                if (*stmt).kind == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED {
                    shmem::wake_at_commit();
                }
            }
            _ => {}
        }
    }
}

/// The string value of option `name` in a DefElem list, if present.
unsafe fn def_string(options: *mut pg_sys::List, name: &CStr) -> Option<String> {
    if options.is_null() {
        return None;
    }
    unsafe {
        for i in 0..(*options).length as usize {
            let def = (*(*options).elements.add(i))
                .ptr_value
                .cast::<pg_sys::DefElem>();
            if !def.is_null() && CStr::from_ptr((*def).defname) == name && !(*def).arg.is_null() {
                return Some(
                    CStr::from_ptr(pg_sys::defGetString(def))
                        .to_string_lossy()
                        .into_owned(),
                );
            }
        }
    }
    None
}

/// Asks the worker serving `dbname` (if any) to leave, and waits briefly until it has.
fn evict(dbname: &str) {
    let Some(shared) = shmem::shared() else {
        return;
    };
    let Ok(name) = std::ffi::CString::new(dbname) else {
        return;
    };
    // SAFETY: catalog lookup in a backend inside a transaction.
    let oid = unsafe { pg_sys::get_database_oid(name.as_ptr(), true) };
    let Some(slot) = shared.slot_for_db(oid) else {
        return;
    };
    let until = shmem::now_micros() + EVICTION.as_micros() as i64;
    slot.evict_until.store(until, Ordering::Release);
    shared.wake_launcher();
    let deadline = Instant::now() + EVICTION_WAIT;
    while slot.pid.load(Ordering::Acquire) != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        // Lets the user cancel the wait.
        pg_sys::check_for_interrupts!();
    }
}
