//! The extension's gate: a lock on webhook_ext's pg_extension row that orders the worker against
//! commands that change or drop the extension's objects.
//!
//! Without it, DROP EXTENSION (or ALTER EXTENSION … UPDATE) and a worker transaction could each
//! hold a lock on one of webhook's tables and wait for the other's: DROP locks the members in
//! the order it finds them, the worker in the order its statements touch them. The deadlock
//! detector then aborts one of them, and it was the user's DROP that failed (a CI run).
//!
//! So every worker transaction first takes a share lock on the extension object, without
//! waiting: if a command holds it, the worker skips that transaction and tries again shortly.
//! DROP EXTENSION takes the exclusive lock on the extension object before any of its members
//! (Postgres's own `get_object_address`); ALTER EXTENSION and DROP SCHEMA of the extension's
//! schema do not, so the utility hook takes it for them first (for DROP EXTENSION too, after
//! the user's tables that carry webhook's triggers: see `close`). Either side then holds the gate
//! before the first table lock, and neither can wait for the other while holding one.

use pgrx::pg_sys;
use pgrx::prelude::*;

/// The lock tag of webhook_ext's pg_extension row in this database, if it is installed.
unsafe fn tag() -> Option<pg_sys::LOCKTAG> {
    // SAFETY: a catalog lookup inside a transaction (the callers' contract).
    let oid = unsafe { pg_sys::get_extension_oid(c"webhook_ext".as_ptr(), true) };
    if oid == pg_sys::InvalidOid {
        return None;
    }
    // As SET_LOCKTAG_OBJECT does (lmgr's LockDatabaseObject).
    Some(pg_sys::LOCKTAG {
        // SAFETY: set once the process is connected to its database.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: pg_sys::ExtensionRelationId.to_u32(),
        locktag_field3: oid.to_u32(),
        locktag_field4: 0,
        locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    })
}

/// The worker's side, first thing in each of its transactions: false if a command changing or
/// dropping the extension holds the gate (the transaction should do nothing). Held until the
/// transaction ends. True when the extension is not installed (the statements will say so).
pub fn enter() -> bool {
    // SAFETY: inside a transaction on the process's main thread; a transaction lock, not
    // waited for.
    unsafe {
        let Some(tag) = tag() else {
            return true;
        };
        let got = pg_sys::LockAcquire(&tag, pg_sys::AccessShareLock as i32, false, true);
        got != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
    }
}

/// The command's side, before Postgres runs it: waits for the worker's transaction under way (if
/// any) and keeps the worker out until this transaction ends. With `tables` (DROP), first locks
/// the user's tables that carry webhook's triggers, as dropping those triggers will: a writer
/// holds its table and then writes webhook's queue, and DROP took the queue first and then
/// waited for the table (the other deadlock the test found). Only for a role that owns the
/// extension: anyone else is refused by Postgres, and must not hold up writers meanwhile.
pub fn close(tables: bool) {
    // SAFETY: inside a transaction (a utility command's); the locks are released at its end, or
    // at once if the command fails.
    unsafe {
        let Some(tag) = tag() else {
            return;
        };
        let ext = pg_sys::Oid::from(tag.locktag_field3);
        let owner = Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT e.extowner FROM pg_catalog.pg_extension e WHERE e.oid OPERATOR(pg_catalog.=) $1",
            &[ext.into()],
        );
        let Ok(Some(owner)) = owner else {
            return;
        };
        if !pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner) {
            return;
        }
        if tables {
            for rel in triggered_tables(ext) {
                pg_sys::LockRelationOid(rel, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE);
            }
        }
        pg_sys::LockAcquire(&tag, pg_sys::AccessExclusiveLock as i32, false, false);
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
