//! The extension's gate: a lock on webhook_ext's pg_extension row that orders the worker against
//! commands that change or drop the extension's objects.
//!
//! Without it, DROP EXTENSION (or ALTER EXTENSION … UPDATE) and a worker transaction could each
//! hold a lock on one of webhook's tables and wait for the other's: DROP locks the members in
//! the order it finds them, the worker in the order its statements touch them. The deadlock
//! detector then aborts one of them, and it was the user's DROP that failed (a CI run).
//!
//! So every worker transaction first takes a share lock on the gate (a sub-object of the
//! extension's pg_extension row that no SQL command names), without waiting: if a command
//! holds it, the worker skips that transaction and tries again shortly. The utility hook takes
//! the gate exclusively before Postgres runs DROP EXTENSION webhook_ext, DROP SCHEMA webhook and
//! ALTER EXTENSION webhook_ext (for a DROP … CASCADE after the user's tables that carry
//! webhook's triggers: see `close`). Either side then holds the gate
//! before the first table lock, and neither can wait for the other while holding one.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The gate: a lock on a sub-object of webhook_ext's pg_extension row that no SQL command
/// names (objsubid 1; Postgres's own commands lock the extension with 0), so only the worker and
/// this hook ever take it. (On the extension object itself, any role could hold the worker off:
/// DROP EXTENSION queues its exclusive lock there before it checks ownership, and a conditional
/// lock fails while anything is queued.)
const GATE_SUBID: u16 = 1;

/// webhook_ext's oid in this database, if it is installed.
fn extension() -> Option<pg_sys::Oid> {
    // SAFETY: a catalog lookup inside a transaction (the callers' contract).
    let oid = unsafe { pg_sys::get_extension_oid(c"webhook_ext".as_ptr(), true) };
    (oid != pg_sys::InvalidOid).then_some(oid)
}

/// The worker's side, first thing in each of its transactions: false if a command changing or
/// dropping the extension holds the gate (the transaction should do nothing). Held until the
/// transaction ends. True when the extension is not installed (the statements will say so).
pub fn enter() -> bool {
    let Some(ext) = extension() else {
        return true;
    };
    // SAFETY: inside a transaction on the process's main thread; a transaction lock, not
    // waited for.
    unsafe {
        pg_sys::ConditionalLockDatabaseObject(
            pg_sys::ExtensionRelationId,
            ext,
            GATE_SUBID,
            pg_sys::AccessShareLock as pg_sys::LOCKMODE,
        )
    }
}

/// The command's side, before Postgres runs it: waits for the worker's transaction under way (if
/// any) and keeps the worker out until this transaction ends. With `tables` (DROP … CASCADE,
/// which drops the triggers on the user's tables; without CASCADE it is refused), first locks
/// the user's tables that carry webhook's triggers, as dropping those triggers will: a writer
/// holds its table and then writes webhook's queue, and DROP took the queue first and then
/// waited for the table (the other deadlock the test found). Only for a role that owns the
/// extension: anyone else is refused by Postgres, and must not hold up writers meanwhile.
pub fn close(tables: bool) {
    // A command Postgres refuses anyway (read-only, on a standby) waits for nothing.
    // SAFETY: reads of backend state.
    if unsafe { pg_sys::XactReadOnly || pg_sys::RecoveryInProgress() } {
        return;
    }
    let Some(ext) = extension() else {
        return;
    };
    let owner = Spi::get_one_with_args::<pg_sys::Oid>(
        "SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.oid OPERATOR(pg_catalog.=) $1",
        &[ext.into()],
    );
    let Ok(Some(owner)) = owner else {
        return;
    };
    // SAFETY: inside a transaction (a utility command's); the locks are released at its end, or
    // at once if the command fails.
    unsafe {
        if !pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner) {
            return;
        }
        if tables {
            for rel in triggered_tables(ext) {
                pg_sys::LockRelationOid(rel, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE);
            }
        }
        pg_sys::LockDatabaseObject(
            pg_sys::ExtensionRelationId,
            ext,
            GATE_SUBID,
            pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE,
        );
    }
}

/// The tables outside the extension with a trigger that runs one of its functions, in oid order.
fn triggered_tables(ext: pg_sys::Oid) -> Vec<pg_sys::Oid> {
    Spi::connect(|c| {
        let rows = c.select(
            "SELECT DISTINCT t.tgrelid
               FROM pg_catalog.pg_trigger t
               JOIN pg_catalog.pg_depend d
                 ON d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
                AND d.objid OPERATOR(pg_catalog.=) t.tgfoid
                AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
                AND d.refobjid OPERATOR(pg_catalog.=) $1
                AND d.deptype OPERATOR(pg_catalog.=) 'e'
              WHERE NOT EXISTS (SELECT FROM pg_catalog.pg_depend m
                                 WHERE m.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                                   AND m.objid OPERATOR(pg_catalog.=) t.tgrelid
                                   AND m.refobjid OPERATOR(pg_catalog.=) $1
                                   AND m.deptype OPERATOR(pg_catalog.=) 'e')
              ORDER BY 1",
            None,
            &[ext.into()],
        )?;
        rows.map(|r| r.get::<pg_sys::Oid>(1))
            .filter_map(Result::transpose)
            .collect::<Result<Vec<_>, _>>()
    })
    .unwrap_or_default()
}
