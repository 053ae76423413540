//! A ProcessUtility hook for the few commands that concern the workers:
//! - CREATE DATABASE: wake the launcher at commit, so a listed database is served at once;
//! - DROP DATABASE, ALTER DATABASE … RENAME, CREATE DATABASE … TEMPLATE: these need the database
//!   free of connections, so its worker is asked to leave first (and comes back if the command
//!   fails) — but only when the role running the command is allowed to run it: a command that
//!   Postgres will refuse must not stop delivery;
//! - COMMIT PREPARED: wake the worker and refresh every session's endpoint cache, as a plain
//!   COMMIT of the same work would (the prepared transaction's own signals were lost at PREPARE);
//! - DROP EXTENSION webhook_ext, DROP SCHEMA webhook, ALTER EXTENSION webhook_ext: take the
//!   extension's gate first (gate.rs: otherwise they can deadlock with the worker, and a drop
//!   with the user's writers);
//! - RENAME COLUMN / DROP COLUMN of a column a subscription publishes by name: refused, since
//!   the subscription would silently stop publishing it; RENAME of a table with subscriptions:
//!   a notice that its event types change.

use std::ffi::CStr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::pg::{gate, shmem};

/// The extension's name, and its schema (webhook_ext.control; the extension is not relocatable).
const EXTENSION: &str = "webhook_ext";
const SCHEMA: &str = "webhook";

/// How long a worker stays away after being asked to leave its database.
const EVICTION: Duration = Duration::from_secs(10);
/// How long the command waits for the worker to disconnect.
const EVICTION_WAIT: Duration = Duration::from_secs(5);
/// How long the command waits for other sessions to leave before it decides the worker need not.
const OTHERS_WAIT: Duration = Duration::from_secs(3);

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
                    if allowed(&template, Command::CopyFrom) {
                        evict(&template);
                    }
                }
            }
            pg_sys::NodeTag::T_DropdbStmt => {
                let stmt = node.cast::<pg_sys::DropdbStmt>();
                let name = CStr::from_ptr((*stmt).dbname).to_string_lossy();
                let force = def_present((*stmt).options, c"force");
                if allowed(&name, Command::Drop { force }) {
                    evict(&name);
                }
            }
            pg_sys::NodeTag::T_RenameStmt => {
                let stmt = node.cast::<pg_sys::RenameStmt>();
                if (*stmt).renameType == pg_sys::ObjectType::OBJECT_DATABASE
                    && !(*stmt).subname.is_null()
                {
                    let name = CStr::from_ptr((*stmt).subname).to_string_lossy();
                    if allowed(&name, Command::Rename) {
                        shmem::wake_launcher_at_commit();
                        evict(&name);
                    }
                } else if (*stmt).renameType == pg_sys::ObjectType::OBJECT_COLUMN
                    && !(*stmt).subname.is_null()
                {
                    let column = CStr::from_ptr((*stmt).subname).to_string_lossy();
                    refuse_if_published((*stmt).relation, &column, "rename");
                } else if (*stmt).renameType == pg_sys::ObjectType::OBJECT_TABLE {
                    note_table_rename((*stmt).relation);
                }
            }
            pg_sys::NodeTag::T_AlterTableStmt => {
                let stmt = node.cast::<pg_sys::AlterTableStmt>();
                for cmd in list_nodes((*stmt).cmds) {
                    let cmd = cmd.cast::<pg_sys::AlterTableCmd>();
                    if (*cmd).subtype == pg_sys::AlterTableType::AT_DropColumn
                        && !(*cmd).name.is_null()
                    {
                        let column = CStr::from_ptr((*cmd).name).to_string_lossy();
                        refuse_if_published((*stmt).relation, &column, "drop");
                    }
                }
            }
            pg_sys::NodeTag::T_AlterExtensionStmt => {
                let stmt = node.cast::<pg_sys::AlterExtensionStmt>();
                if is_ours((*stmt).extname) {
                    gate::close(false);
                }
            }
            pg_sys::NodeTag::T_AlterExtensionContentsStmt => {
                let stmt = node.cast::<pg_sys::AlterExtensionContentsStmt>();
                if is_ours((*stmt).extname) {
                    gate::close(false);
                }
            }
            pg_sys::NodeTag::T_DropStmt => {
                let stmt = node.cast::<pg_sys::DropStmt>();
                let names = || {
                    list_nodes((*stmt).objects)
                        .into_iter()
                        .map(|n| string_node(n))
                };
                let drops_us = match (*stmt).removeType {
                    pg_sys::ObjectType::OBJECT_EXTENSION => {
                        names().any(|n| n.as_deref() == Some(EXTENSION))
                    }
                    pg_sys::ObjectType::OBJECT_SCHEMA => {
                        names().any(|n| n.as_deref() == Some(SCHEMA))
                    }
                    _ => false,
                };
                if drops_us {
                    // Only CASCADE drops the triggers on the user's tables (without it the drop
                    // is refused while any exist): only then are those tables locked first.
                    gate::close((*stmt).behavior == pg_sys::DropBehavior::DROP_CASCADE);
                }
            }
            pg_sys::NodeTag::T_TransactionStmt => {
                let stmt = node.cast::<pg_sys::TransactionStmt>();
                if (*stmt).kind == pg_sys::TransactionStmtKind::TRANS_STMT_COMMIT_PREPARED {
                    // What it made (send(), retry() …) may lie below the claim's floors.
                    shmem::rescan_at_commit();
                    shmem::endpoints_changed_at_commit();
                }
            }
            _ => {}
        }
    }
}

#[derive(Clone, Copy)]
enum Command {
    Drop { force: bool },
    Rename,
    CopyFrom,
}

/// Whether `command` on database `dbname` will get past Postgres's own checks, the worker
/// aside: the role's rights (owner to drop; owner with CREATEDB to rename; CREATEDB, and owner
/// unless it is a template, to copy), not the database this session is connected to, not in a
/// read-only transaction or (for DROP and CREATE) a transaction block, and no other session
/// connected to it (unless DROP … WITH (FORCE)). A database that does not exist: false.
fn allowed(dbname: &str, command: Command) -> bool {
    let Ok(name) = std::ffi::CString::new(dbname) else {
        return false;
    };
    // SAFETY: catalog lookups and reads of backend state, inside a transaction.
    unsafe {
        let oid = pg_sys::get_database_oid(name.as_ptr(), true);
        if oid == pg_sys::InvalidOid || oid == pg_sys::MyDatabaseId || pg_sys::XactReadOnly {
            return false;
        }
        if !matches!(command, Command::Rename) && pg_sys::IsTransactionBlock() {
            return false;
        }
        let me = pg_sys::GetUserId();
        let row = Spi::get_three_with_args::<pg_sys::Oid, bool, bool>(
            "SELECT d.datdba, d.datistemplate, r.rolcreatedb OR r.rolsuper
               FROM pg_catalog.pg_database d, pg_catalog.pg_roles r
              WHERE d.oid OPERATOR(pg_catalog.=) $1 AND r.oid OPERATOR(pg_catalog.=) $2",
            &[oid.into(), me.into()],
        );
        let Ok((Some(owner), Some(template), Some(createdb))) = row else {
            return false;
        };
        let owns = pg_sys::has_privs_of_role(me, owner);
        let may = match command {
            Command::Drop { .. } => owns,
            Command::Rename => owns && createdb,
            Command::CopyFrom => createdb && (template || owns),
        };
        // The rights first: a role that may not run the command does not wait for anything.
        if !may {
            return false;
        }
        // Sessions the command would find there besides the worker (autovacuum steps aside).
        // Postgres itself waits up to 5 s for them to leave; so does this, for up to
        // OTHERS_WAIT: a client that has just disconnected is still listed for a moment, and
        // judging by that instant kept the worker there to fail the command.
        let others = || {
            // Each look reads the sessions anew (they are otherwise read once per transaction).
            pg_sys::pgstat_clear_snapshot();
            Spi::get_one_with_args::<i64>(
                "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity a
                  WHERE a.datid OPERATOR(pg_catalog.=) $1
                    AND a.pid OPERATOR(pg_catalog.<>) pg_catalog.pg_backend_pid()
                    AND a.backend_type OPERATOR(pg_catalog.<>) ALL ('{autovacuum worker,webhook_ext worker}'::pg_catalog.text[])",
                &[oid.into()],
            )
        };
        if matches!(command, Command::Drop { force: true }) {
            return true;
        }
        let deadline = Instant::now() + OTHERS_WAIT;
        loop {
            if matches!(others(), Ok(Some(0))) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
            pg_sys::check_for_interrupts!();
        }
    }
}

/// Whether an extension name in a statement is webhook_ext.
unsafe fn is_ours(extname: *const std::ffi::c_char) -> bool {
    // SAFETY: a name from a parsed statement: NUL-terminated, or NULL.
    !extname.is_null() && unsafe { CStr::from_ptr(extname) }.to_bytes() == EXTENSION.as_bytes()
}

/// The text of a String node (a schema's name in DROP SCHEMA), None for any other node.
unsafe fn string_node(node: *mut pg_sys::Node) -> Option<String> {
    // SAFETY: the node's tag says what it is.
    unsafe {
        if node.is_null() || (*node).type_ != pg_sys::NodeTag::T_String {
            return None;
        }
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        let text = (*node.cast::<pg_sys::Value>()).val.str_;
        #[cfg(not(any(feature = "pg13", feature = "pg14")))]
        let text = (*node.cast::<pg_sys::String>()).sval;
        (!text.is_null()).then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
    }
}

/// The nodes of a List (empty for NIL).
unsafe fn list_nodes(list: *mut pg_sys::List) -> Vec<*mut pg_sys::Node> {
    if list.is_null() {
        return Vec::new();
    }
    unsafe {
        (0..(*list).length as usize)
            .map(|i| (*(*list).elements.add(i)).ptr_value.cast::<pg_sys::Node>())
            .collect()
    }
}

/// The webhook.enqueue triggers of a table: (trigger name, endpoint, published columns).
unsafe fn webhook_triggers(relation: *mut pg_sys::RangeVar) -> Vec<(String, String, Vec<String>)> {
    let mut out = Vec::new();
    if relation.is_null() {
        return out;
    }
    unsafe {
        let nsp = pg_sys::get_namespace_oid(c"webhook".as_ptr(), true);
        if nsp == pg_sys::InvalidOid
            || pg_sys::get_extension_oid(c"webhook_ext".as_ptr(), true) == pg_sys::InvalidOid
        {
            return out;
        }
        // Looked up without a lock, and locked only for the table's owner, as Postgres's own
        // RENAME does (RangeVarCallbackOwnsTable): a role the command will refuse neither waits
        // for nor takes a lock on another's table here.
        let relid = pg_sys::RangeVarGetRelidExtended(
            relation,
            pg_sys::NoLock as i32,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        );
        if relid == pg_sys::InvalidOid {
            return out;
        }
        let owner = Spi::get_one_with_args::<pg_sys::Oid>(
            "SELECT c.relowner FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $1",
            &[relid.into()],
        );
        match owner {
            Ok(Some(owner)) if pg_sys::has_privs_of_role(pg_sys::GetUserId(), owner) => {}
            _ => return out,
        }
        let rel = pg_sys::relation_open(relid, pg_sys::AccessShareLock as i32);
        let desc = (*rel).trigdesc;
        if !desc.is_null() {
            for i in 0..(*desc).numtriggers as usize {
                let t = (*desc).triggers.add(i);
                let name = pg_sys::get_func_name((*t).tgfoid);
                if name.is_null()
                    || CStr::from_ptr(name) != c"enqueue"
                    || pg_sys::get_func_namespace((*t).tgfoid) != nsp
                {
                    continue;
                }
                let args: Vec<String> = (0..(*t).tgnargs as usize)
                    .map(|a| {
                        CStr::from_ptr(*(*t).tgargs.add(a))
                            .to_string_lossy()
                            .into_owned()
                    })
                    .collect();
                let trigger = CStr::from_ptr((*t).tgname).to_string_lossy().into_owned();
                let endpoint = args.first().cloned().unwrap_or_default();
                out.push((trigger, endpoint, args.into_iter().skip(1).collect()));
            }
        }
        pg_sys::relation_close(rel, pg_sys::NoLock as i32);
    }
    out
}

/// Refuses to rename or drop a column that a subscription publishes by name.
unsafe fn refuse_if_published(relation: *mut pg_sys::RangeVar, column: &str, verb: &str) {
    for (trigger, endpoint, columns) in unsafe { webhook_triggers(relation) } {
        if columns.iter().any(|c| c == column) {
            pg_sys::panic::ErrorReport::new(
                PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!(
                    "cannot {verb} column \"{column}\": webhook trigger \"{trigger}\" publishes it to endpoint \"{endpoint}\" by name"
                ),
                "webhook_ext",
            )
            .set_hint(
                "Unsubscribe first (webhook.unsubscribe), then subscribe again with the new column list.",
            )
            .report(PgLogLevel::ERROR);
        }
    }
}

/// A renamed table publishes under its new name: endpoints filtering by the old one stop
/// receiving its events, so say so.
unsafe fn note_table_rename(relation: *mut pg_sys::RangeVar) {
    let triggers = unsafe { webhook_triggers(relation) };
    if triggers.is_empty() {
        return;
    }
    let endpoints: Vec<String> = triggers
        .into_iter()
        .map(|(_, e, _)| format!("\"{e}\""))
        .collect();
    pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_WARNING,
        format!(
            "the events of this table will be published under its new name; endpoints {} receive them only if their event_types allow the new name",
            endpoints.join(", ")
        ),
        "webhook_ext",
    )
    .report(PgLogLevel::NOTICE);
}

/// Whether option `name` is in a DefElem list (DROP DATABASE … WITH (FORCE)).
unsafe fn def_present(options: *mut pg_sys::List, name: &CStr) -> bool {
    unsafe { list_nodes(options) }.into_iter().any(|n| {
        let def = n.cast::<pg_sys::DefElem>();
        // SAFETY: the options of a DropdbStmt are DefElems.
        !def.is_null() && unsafe { CStr::from_ptr((*def).defname) } == name
    })
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

/// Asks the workers serving `dbname` (if any) to leave, and waits briefly until they have.
fn evict(dbname: &str) {
    let Some(shared) = shmem::shared() else {
        return;
    };
    let Ok(name) = std::ffi::CString::new(dbname) else {
        return;
    };
    // SAFETY: catalog lookup in a backend inside a transaction.
    let oid = unsafe { pg_sys::get_database_oid(name.as_ptr(), true) };
    if shared.slots_of_db(oid).next().is_none() {
        return;
    }
    let until = shmem::now_micros() + EVICTION.as_micros() as i64;
    for slot in shared.slots_of_db(oid) {
        slot.evict_until.store(until, Ordering::Release);
    }
    // If the command fails after all, the workers come back at once (not after EVICTION).
    shmem::evicted_in_this_transaction(oid);
    shared.wake_launcher();
    // The launcher stops them too, but only when its next round comes: signalled here, they
    // leave at once whatever the launcher is doing. (A worker's pid is cleared by the worker
    // itself as it exits, so a pid read here is a live worker's or one on its way out.)
    for slot in shared.slots_of_db(oid) {
        let pid = slot.pid.load(Ordering::Acquire);
        if pid > 0 {
            // SAFETY: a signal to a process of this cluster, as pg_terminate_backend sends.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let deadline = Instant::now() + EVICTION_WAIT;
    let running = || {
        shared
            .slots_of_db(oid)
            .any(|s| s.pid.load(Ordering::Acquire) != 0)
    };
    while running() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
        // Lets the user cancel the wait.
        pg_sys::check_for_interrupts!();
    }
}
