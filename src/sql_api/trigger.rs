//! The trigger function `webhook.enqueue(endpoint, [column, …])`: turns a row change into an event
//! and a delivery inside the user's transaction, and asks for the worker to be woken at commit.
//!
//! Rights. The function is SECURITY INVOKER: the row images (`to_jsonb`, and with it every cast
//! to json and output function of a user's type) are built with the rights of the session that
//! changed the row, never more. Only the finished values are written into webhook's tables, and
//! only that step runs as the extension's owner (`SetUserIdAndSecContext`, as Postgres itself does
//! for REFRESH MATERIALIZED VIEW), in a security-restricted operation that evaluates nothing of
//! the user's: built-in jsonb functions and operators, every one schema-qualified.
//!
//! Publishing. A trigger delivers only where an administrator allowed its table to publish to
//! that endpoint: `webhook.subscribe()` and `webhook.allow_publish()` record (table, endpoint) in
//! `webhook._publishers`. Anything else is refused with SQLSTATE 42501, so no role can make the
//! worker sign content for an endpoint it does not manage — not even through a table owned by
//! an administrator, since a role holding TRIGGER on it could attach the trigger.
//!
//! It never fails the user's statement because of the receiver: an unknown endpoint or an
//! oversized payload is recorded as a `failed` delivery with the reason, a disabled endpoint as
//! `cancelled`.
//!
//! This is the hot path: per row it runs one statement from a plan kept for the session, and
//! decides everything about the endpoint from a per-session cache of `webhook.endpoints` and
//! `webhook._publishers`, read with a fresh snapshot whenever a transaction that changed either
//! has committed (see `shmem::endpoints_version`).

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::ffi::{c_char, CStr, CString};

use pgrx::pg_sys;
use pgrx::prelude::*;

use super::capture;
use crate::pg::spi::{Snapshot, SpiError, Statement};
use crate::pg::{gucs, shmem};
use crate::request;

/// Rows larger than this (before JSON encoding) are never built: jsonb holds at most 256 MB, and
/// a bytea doubles in its JSON form. webhook.max_payload_bytes is at most 100 MB, so such a row
/// is over the limit whatever its encoding.
const LARGEST_ROW_BUILT: i64 = 120 * 1024 * 1024;

/// What the trigger needs to know about an endpoint.
struct Endpoint {
    id: i32,
    enabled: bool,
    event_types: Option<Vec<String>>,
    /// Tables allowed to publish to it (webhook._publishers).
    publishers: HashSet<pg_sys::Oid>,
}

struct Cache {
    version: u64,
    endpoints: HashMap<String, Endpoint>,
}

/// Who the queue's writes run as, and the role whose members publish anywhere.
#[derive(Clone, Copy)]
struct Roles {
    owner: pg_sys::Oid,
    admin: pg_sys::Oid,
    /// The installed schema is from before 0.3.0 (this library is installed, ALTER EXTENSION …
    /// UPDATE has not run yet): no webhook._publishers, no _events.size. The trigger keeps
    /// working as that release did, so no write fails in between.
    legacy: bool,
}

thread_local! {
    /// Partition -> the root table its events are published under. Cleared on every relcache
    /// invalidation, so ATTACH / DETACH / DROP are seen at once.
    static PARTITION_ROOTS: RefCell<HashMap<pg_sys::Oid, pg_sys::Oid>> = RefCell::new(HashMap::new());
    /// Cloned partition trigger -> (table it was created on, that table's owner). Cleared likewise.
    static TRIGGER_HOMES: RefCell<HashMap<pg_sys::Oid, (pg_sys::Oid, pg_sys::Oid)>> = RefCell::new(HashMap::new());
    /// Records of a subscription's chosen columns, per (row type, columns). Cleared likewise.
    static PROJECTIONS: RefCell<HashMap<(pg_sys::Oid, String), Option<Projection>>> =
        RefCell::new(HashMap::new());
    /// `to_jsonb` set up for one argument type, per type.
    static TO_JSONB: RefCell<HashMap<pg_sys::Oid, *mut pg_sys::FmgrInfo>> = RefCell::new(HashMap::new());
    /// This session's copy of webhook.endpoints and webhook._publishers.
    static ENDPOINTS: RefCell<Option<Cache>> = const { RefCell::new(None) };
    static ROLES: Cell<Option<Roles>> = const { Cell::new(None) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// This transaction changed webhook.endpoints or webhook._publishers.
    static OWN_CHANGES: Cell<bool> = const { Cell::new(false) };
}

/// A record type of some of a row's columns, and which attributes of the row they are.
type Projection = (pg_sys::TupleDesc, std::rc::Rc<Vec<usize>>);

/// What the trigger decided about an endpoint (a pure rule, tested below).
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Route {
    /// Record a delivery with this status and reason.
    Record {
        endpoint_id: Option<i32>,
        status: &'static str,
        reason: Option<String>,
    },
    /// The endpoint's event_types filter excludes this event.
    Skip,
}

/// The rule for an endpoint as the cache knows it: unknown → failed, filtered out → skip,
/// disabled → cancelled, else pending.
pub(crate) fn route(
    name: &str,
    found: Option<(i32, bool, bool)>, // (id, enabled, type matches)
) -> Route {
    match found {
        None => Route::Record {
            endpoint_id: None,
            status: "failed",
            reason: Some(format!("endpoint '{name}' does not exist")),
        },
        Some((_, _, false)) => Route::Skip,
        Some((id, false, true)) => Route::Record {
            endpoint_id: Some(id),
            status: "cancelled",
            reason: Some("endpoint disabled".into()),
        },
        Some((id, true, true)) => Route::Record {
            endpoint_id: Some(id),
            status: "pending",
            reason: None,
        },
    }
}

#[pg_trigger]
fn enqueue<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    let data = trigger.trigger_data();
    let event = data.tg_event;
    if !pgrx::trigger_support::trigger_fired_after(event)
        || !pgrx::trigger_support::trigger_fired_for_row(event)
    {
        raise(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            "webhook.enqueue must be used in an AFTER ... FOR EACH ROW trigger".into(),
            None,
        );
    }
    let op = if pgrx::trigger_support::trigger_fired_by_insert(event) {
        "INSERT"
    } else if pgrx::trigger_support::trigger_fired_by_update(event) {
        "UPDATE"
    } else if pgrx::trigger_support::trigger_fired_by_delete(event) {
        "DELETE"
    } else {
        raise(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            "webhook.enqueue handles INSERT, UPDATE and DELETE only".into(),
            None,
        );
    };
    let args = trigger.extra_args()?;
    register_invalidation_callback();
    // SAFETY: the trigger manager hands us a valid relation, trigger and tuples for the call.
    if unsafe { fire(data, op, &args) } {
        shmem::wake_at_commit();
    }
    Ok(None)
}

/// Records the row change for the trigger's endpoint; true if a delivery is now pending.
unsafe fn fire(data: &pg_sys::TriggerData, op: &'static str, args: &[String]) -> bool {
    let endpoint_name = args.first().map(String::as_str).unwrap_or_default();
    let rel = data.tg_relation;
    // SAFETY: the relation and trigger of the call.
    let (schema, table) = unsafe { published_name(rel) };
    let event_type = format!("{schema}.{table}.{}", op.to_ascii_lowercase());
    let (home, home_owner) = unsafe { trigger_home(rel, data.tg_trigger) };
    let Some((roles, endpoint_id, status, reason)) =
        endpoint_for(endpoint_name, &event_type, home, home_owner)
    else {
        return false;
    };
    let (new_tuple, old_tuple) = match op {
        "INSERT" => (data.tg_trigtuple, std::ptr::null_mut()),
        "UPDATE" => (data.tg_newtuple, data.tg_trigtuple),
        _ => (std::ptr::null_mut(), data.tg_trigtuple),
    };
    let columns: Option<Vec<String>> = (args.len() > 1).then(|| args[1..].to_vec());
    // SAFETY: the trigger manager's data for this call.
    let later = !roles.legacy && unsafe { capture::flush_follows(data, op) };
    // SAFETY: the relation and tuples of the call.
    let key = unsafe { capture::Key::of((*rel).rd_id, op, new_tuple, old_tuple, &columns) };
    // Another subscription's trigger made this row change's event with the same columns a
    // moment ago: this one's delivery goes with it (the images are not built again).
    if later {
        if let Some(shared) = capture::shared(&key) {
            let (status, reason) = match shared.too_large.clone() {
                Some(why) => ("failed", Some(why)),
                None => (status, reason),
            };
            capture::add_delivery(
                shared,
                capture::Delivery {
                    endpoint_id,
                    status,
                    reason,
                },
                later,
            );
            return status == "pending";
        }
    }
    // SAFETY: the tuples and descriptor of the call.
    let build = || unsafe { row_images(rel, new_tuple, old_tuple, columns.as_deref()) };
    // Before ALTER EXTENSION … UPDATE the trigger function is still the old release's SECURITY
    // DEFINER one: this call runs as the extension's owner. A cast to json of a user-defined
    // type is its owner's code, so such rows are built as the session's role, restricted.
    // SAFETY: the relation of the call.
    let images = if roles.legacy && unsafe { has_user_types(rel, columns.as_deref()) } {
        let session = unsafe { pg_sys::GetOuterUserId() };
        // A superuser's session may be running another role's SECURITY DEFINER code: nothing
        // tells whose rights the row's writer had, so the write waits for the update.
        if unsafe { pg_sys::superuser_arg(session) } {
            raise(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("webhook.enqueue: table {schema}.{table} has columns of user-defined types, which webhook_ext publishes from a superuser's session only after ALTER EXTENSION webhook_ext UPDATE"),
                Some("Run ALTER EXTENSION webhook_ext UPDATE in this database.".into()),
            );
        }
        as_role(session, build)
    } else {
        build()
    };
    let Some(images) = images else {
        // An UPDATE that changed none of the chosen columns records nothing.
        return false;
    };
    let txid = unsafe { pg_sys::GetTopFullTransactionId() }.value as i64;
    let base = request::row_change_body_len(&event_type, &schema, &table, op, 0, 0, txid);
    let limit = gucs::MAX_PAYLOAD_BYTES.get();
    let size = (images.raw <= LARGEST_ROW_BUILT)
        .then(|| unsafe { body_size(base as i64, images.new, images.old, limit) });
    let mut event = capture::Event {
        event_type,
        schema,
        table,
        op,
        new: images.new,
        old: images.old,
        size: size.map(|n| n.min(i64::from(i32::MAX)) as i32),
        traceparent: gucs::traceparent(),
        too_large: None,
    };
    let too_large = match size {
        None => Some(format!(
            "row is {} bytes before JSON encoding, too large to publish: more than webhook.max_payload_bytes ({limit})",
            images.raw
        )),
        Some(n) if n > i64::from(limit) => Some(format!(
            "payload is {n} bytes, more than webhook.max_payload_bytes ({limit})"
        )),
        Some(_) => None,
    };
    // Too large to send: its delivery failed with the reason, and no row image kept.
    let (status, reason) = match too_large {
        Some(why) => {
            event.new = None;
            event.old = None;
            event.too_large = Some(why.clone());
            ("failed", Some(why))
        }
        None => (status, reason),
    };
    let delivery = capture::Delivery {
        endpoint_id,
        status,
        reason,
    };
    if roles.legacy {
        // Written now, by the statement that schema takes.
        as_owner(roles, || capture::write_one(&event, &delivery, true));
    } else {
        capture::add(event, key, delivery, later);
    }
    status == "pending"
}

/// What the trigger records for its endpoint (roles, endpoint id, status, reason), or None when
/// the endpoint's event types leave this event out. Refuses (42501) a table that may not
/// publish to the endpoint.
fn endpoint_for(
    name: &str,
    event_type: &str,
    home: pg_sys::Oid,
    home_owner: pg_sys::Oid,
) -> Option<(Roles, Option<i32>, &'static str, Option<String>)> {
    let (roles, found) = lookup(name, |ep| {
        (
            (
                ep.id,
                ep.enabled,
                request::type_matches(event_type, ep.event_types.as_deref()),
            ),
            ep.publishers.contains(&home),
        )
    });
    let (found, allowed) = found.map_or((None, false), |(f, a)| (Some(f), a));
    // Only tables an administrator subscribed or allowed publish. Not even a table owned by
    // an administrator is exempt: anyone holding TRIGGER on it could attach the trigger.
    // A trigger naming an endpoint that does not exist sends nothing; on an administrator's
    // table it is recorded as a failed delivery (a typo), elsewhere refused like the rest.
    // SAFETY: catalog lookups inside the trigger's transaction.
    let trusted_owner =
        || unsafe { pg_sys::superuser_arg(home_owner) } || is_admin(home_owner, roles);
    // Before ALTER EXTENSION … UPDATE there is no record of who may publish: tables publish as
    // in the old release, except temporary ones, which no release lets publish.
    // SAFETY: a catalog lookup of the trigger's table.
    let temporary =
        || unsafe { pg_sys::get_rel_persistence(home) } == pg_sys::RELPERSISTENCE_TEMP as c_char;
    if (roles.legacy && temporary())
        || (!allowed && !roles.legacy && (found.is_some() || !trusted_owner()))
    {
        // SAFETY: as above.
        unsafe { refuse_publishing(home, name) };
    }
    match route(name, found) {
        Route::Skip => None,
        Route::Record {
            endpoint_id,
            status,
            reason,
        } => Some((roles, endpoint_id, status, reason)),
    }
}

/// A row change's images, built as the session's own user, and the row's size before JSON
/// encoding (the images are not built above LARGEST_ROW_BUILT).
struct Images {
    new: Option<pg_sys::Datum>,
    old: Option<pg_sys::Datum>,
    raw: i64,
}

/// The images of the new and old row (all columns, or `columns`); None for an UPDATE that
/// changed none of `columns`.
unsafe fn row_images(
    rel: pg_sys::Relation,
    new_tuple: pg_sys::HeapTuple,
    old_tuple: pg_sys::HeapTuple,
    columns: Option<&[String]>,
) -> Option<Images> {
    // SAFETY: the relation and tuples of the trigger call.
    unsafe {
        let tupdesc = (*rel).rd_att;
        let raw = raw_size(new_tuple, tupdesc, columns) + raw_size(old_tuple, tupdesc, columns);
        let (new, old) = if raw > LARGEST_ROW_BUILT {
            (None, None)
        } else if let Some(cols) = columns {
            let (new, old) = (
                columns_json(new_tuple, tupdesc, cols),
                columns_json(old_tuple, tupdesc, cols),
            );
            if let (Some(n), Some(o)) = (new, old) {
                if jsonb_equal(n, o) {
                    return None;
                }
            }
            (new, old)
        } else {
            let reltype = (*(*rel).rd_rel).reltype;
            (
                row_json(new_tuple, tupdesc, reltype),
                row_json(old_tuple, tupdesc, reltype),
            )
        };
        Some(Images { new, old, raw })
    }
}

/// The request body's size: exact (the images' text, as sent) where it could pass `limit`, else
/// the bound that proves it cannot (six times the images' stored size: a control character's
/// one byte is six in JSON text). The worker budgets its memory by this figure, so it must
/// never be below what is sent.
unsafe fn body_size(
    base: i64,
    new: Option<pg_sys::Datum>,
    old: Option<pg_sys::Datum>,
    limit: i32,
) -> i64 {
    let stored = |d: Option<pg_sys::Datum>| {
        d.map_or(4, |d| unsafe { pg_sys::toast_raw_datum_size(d) } as i64)
    };
    let packed = stored(new) + stored(old);
    if packed * 6 + base <= i64::from(limit) {
        return packed * 6 + base;
    }
    let text = |d: Option<pg_sys::Datum>| {
        d.map_or(4, |d| unsafe {
            let out = pgrx::direct_function_call::<pg_sys::Datum>(pg_sys::jsonb_out, &[Some(d)])
                .expect("jsonb_out never returns NULL");
            CStr::from_ptr(out.cast_mut_ptr::<c_char>())
                .to_bytes()
                .len() as i64
        })
    };
    base + text(new) + text(old)
}

/// The event could not be written: an internal error, named.
pub(super) fn record_failed(e: SpiError) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("webhook.enqueue: could not record the event: {e}"),
        None,
    )
}

/// Runs `f` as the extension's owner (see [`as_role`]).
pub(super) fn as_extension_owner(f: &dyn Fn()) {
    as_owner(roles(), f)
}

/// Runs `f` as the extension's owner in a security-restricted operation; the caller's user and
/// security context come back however `f` ends (an ERROR unwinds through the guard).
fn as_owner<R>(roles: Roles, f: impl FnOnce() -> R) -> R {
    as_role(roles.owner, f)
}

/// Runs `f` as `role` in a security-restricted operation (as Postgres itself does for REFRESH
/// MATERIALIZED VIEW); the caller's user and security context come back however `f` ends.
fn as_role<R>(role: pg_sys::Oid, f: impl FnOnce() -> R) -> R {
    struct Restore(pg_sys::Oid, i32);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: restores what GetUserIdAndSecContext returned, on the main thread.
            unsafe { pg_sys::SetUserIdAndSecContext(self.0, self.1) };
        }
    }
    let mut uid = pg_sys::InvalidOid;
    let mut ctx = 0;
    // SAFETY: plain reads and writes of the backend's current user, as Postgres's own
    // security-restricted operations do.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut uid, &mut ctx);
        let _restore = Restore(uid, ctx);
        pg_sys::SetUserIdAndSecContext(
            role,
            ctx | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32
                | pg_sys::SECURITY_RESTRICTED_OPERATION as i32,
        );
        f()
    }
}

/// Raises an ERROR with a SQLSTATE and one clear line (no Rust location or backtrace).
pub(super) fn raise(code: PgSqlErrorCode, message: String, hint: Option<String>) -> ! {
    let mut report = pg_sys::panic::ErrorReport::new(code, message, "webhook.enqueue");
    if let Some(h) = hint {
        report = report.set_hint(h);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

unsafe fn refuse_publishing(home: pg_sys::Oid, endpoint: &str) -> ! {
    let table = unsafe { qualified_name(home) }.unwrap_or_else(|| format!("{}", home.to_u32()));
    let quoted = endpoint.replace('\'', "''");
    raise(
        PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        format!("table {table} may not publish to webhook endpoint \"{endpoint}\""),
        Some(format!(
            "A member of webhook_admin subscribes it with webhook.subscribe('{table}', '{quoted}'), \
             or allows hand-written triggers on it with webhook.allow_publish('{table}', '{quoted}')."
        )),
    )
}

fn is_admin(role: pg_sys::Oid, roles: Roles) -> bool {
    // SAFETY: catalog lookups (cached by Postgres) inside a transaction.
    roles.admin != pg_sys::InvalidOid && unsafe { pg_sys::has_privs_of_role(role, roles.admin) }
}

static ROLES_SQL: Statement = Statement::reading(
    "enqueue_roles",
    "SELECT e.extowner, e.extversion OPERATOR(pg_catalog.=) ANY ('{0.1.0,0.2.0}'::pg_catalog.text[])
       FROM pg_catalog.pg_extension e WHERE e.extname OPERATOR(pg_catalog.=) 'webhook_ext'",
    &[],
);

/// The extension's owner and the webhook_admin role, read once per session.
fn roles() -> Roles {
    if let Some(r) = ROLES.get() {
        return r;
    }
    let found = ROLES_SQL
        .rows(&[], |row| {
            Ok((row.get::<pg_sys::Oid>(1)?, row.get::<bool>(2)?))
        })
        .unwrap_or_else(|e| spi_failed(e));
    let Some((Some(owner), Some(legacy))) = found.first().copied() else {
        raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "webhook.enqueue: the webhook_ext extension is not installed in this database".into(),
            None,
        )
    };
    // SAFETY: a catalog lookup inside a transaction.
    let admin = unsafe { pg_sys::get_role_oid(c"webhook_admin".as_ptr(), true) };
    let r = Roles {
        owner,
        admin,
        legacy,
    };
    ROLES.set(Some(r));
    r
}

/// A statement that could not run or be read: an internal error, named.
pub(super) fn spi_failed(e: SpiError) -> ! {
    raise(
        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
        format!("webhook.enqueue: {e}"),
        None,
    )
}

/// `read` applied to the endpoint named `name` (None if there is none), from this session's
/// cache, re-read when any transaction that changed endpoints or publishers has committed.
/// Also returns the roles, read again with it (a re-installed extension may have a new owner).
fn lookup<R>(name: &str, read: impl FnOnce(&Endpoint) -> R) -> (Roles, Option<R>) {
    // The version is read before the snapshot is taken: a change that commits after this read
    // moves the version again, so this cache is read anew next time.
    let version = shmem::endpoints_version();
    let stale = ENDPOINTS.with(|cell| cell.borrow().as_ref().is_none_or(|c| c.version != version));
    if stale {
        ROLES.set(None);
        let roles = roles();
        let endpoints = as_owner(roles, || load_endpoints(roles.legacy));
        ENDPOINTS.with(|cell| *cell.borrow_mut() = Some(Cache { version, endpoints }));
    }
    let roles = roles();
    let found = ENDPOINTS.with(|cell| {
        cell.borrow()
            .as_ref()
            .and_then(|c| c.endpoints.get(name).map(read))
    });
    (roles, found)
}

static LOAD_ENDPOINTS: Statement = Statement::reading(
    "enqueue_endpoints",
    "SELECT e.name, e.id, e.enabled, e.event_types,
       ARRAY(SELECT p.relid::pg_catalog.oid FROM webhook._publishers p WHERE p.endpoint_id OPERATOR(pg_catalog.=) e.id)
  FROM webhook.endpoints e",
    &[],
);
/// Before 0.3.0's schema: no publishers table.
static LOAD_ENDPOINTS_LEGACY: Statement = Statement::reading(
    "enqueue_endpoints_legacy",
    "SELECT e.name, e.id, e.enabled, e.event_types, NULL::pg_catalog.oid[] FROM webhook.endpoints e",
    &[],
);

/// Reads webhook.endpoints and webhook._publishers with the latest snapshot, not the
/// transaction's: a REPEATABLE READ transaction must still see an endpoint created after it began.
fn load_endpoints(legacy: bool) -> HashMap<String, Endpoint> {
    let statement = if legacy {
        &LOAD_ENDPOINTS_LEGACY
    } else {
        &LOAD_ENDPOINTS
    };
    let mut out = HashMap::new();
    let read = statement.query(&[], Snapshot::Latest, |row| {
        let event_types = row
            .get::<Vec<Option<String>>>(4)?
            .map(|v| v.into_iter().flatten().collect());
        let publishers = row
            .get::<Vec<Option<pg_sys::Oid>>>(5)?
            .unwrap_or_default()
            .into_iter()
            .flatten()
            .collect();
        out.insert(
            row.get::<String>(1)?.unwrap_or_default(),
            Endpoint {
                id: row.get(2)?.unwrap_or_default(),
                enabled: row.get(3)?.unwrap_or(false),
                event_types,
                publishers,
            },
        );
        Ok(())
    });
    if let Err(e) = read {
        spi_failed(e);
    }
    out
}

/// Statement trigger on webhook.endpoints and webhook._publishers: every session's endpoint
/// cache is refreshed once this transaction commits, and this session's at once (a table
/// subscribed in this transaction publishes in it too); a cache that read this transaction's
/// changes is dropped if they roll back (see `forget_own_changes`).
#[pg_trigger]
fn _endpoints_changed<'a>(
    _trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    shmem::endpoints_changed_at_commit();
    capture::register_callbacks();
    OWN_CHANGES.set(true);
    ENDPOINTS.with(|cell| *cell.borrow_mut() = None);
    Ok(None)
}

/// At the end of a transaction (or the abort of a subtransaction) that changed endpoints or
/// publishers: this session's cache may hold what did not commit, so it is read again.
pub(super) fn forget_own_changes(transaction_ended: bool) {
    if OWN_CHANGES.get() {
        ENDPOINTS.with(|cell| {
            if let Ok(mut c) = cell.try_borrow_mut() {
                *c = None;
            }
        });
        if transaction_ended {
            OWN_CHANGES.set(false);
        }
    }
}

fn register_invalidation_callback() {
    if CALLBACK_REGISTERED.get() {
        return;
    }
    // SAFETY: registers a callback for the life of this backend (there is no unregister).
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(relcache_changed), pg_sys::Datum::from(0))
    };
    CALLBACK_REGISTERED.set(true);
}

/// Any relcache invalidation (ATTACH, DETACH, DROP, ALTER … OWNER) drops what this session
/// remembered about partitions and cloned triggers; both are cheap to look up again.
#[pg_guard]
unsafe extern "C-unwind" fn relcache_changed(_arg: pg_sys::Datum, _relid: pg_sys::Oid) {
    PARTITION_ROOTS.with(|m| m.try_borrow_mut().map(|mut m| m.clear()).ok());
    capture::forget_catalog_lookups();
    TRIGGER_HOMES.with(|m| m.try_borrow_mut().map(|mut m| m.clear()).ok());
    // Blessed descriptors stay valid (the type cache holds its own copy); ours are freed.
    PROJECTIONS.with(|m| {
        m.try_borrow_mut()
            .map(|mut m| {
                for (desc, _) in m.drain().filter_map(|(_, v)| v) {
                    // SAFETY: allocated by us in TopMemoryContext, referenced nowhere else.
                    unsafe { pg_sys::FreeTupleDesc(desc) };
                }
            })
            .ok()
    });
}

/// The schema and table name events are published under: for a partition, its root table's.
unsafe fn published_name(rel: pg_sys::Relation) -> (String, String) {
    unsafe {
        let own = (*rel).rd_id;
        let mut relid = own;
        if (*(*rel).rd_rel).relispartition {
            // Looked up outside the borrow: the lookup may run the invalidation callback.
            relid = match PARTITION_ROOTS.with(|roots| roots.borrow().get(&own).copied()) {
                Some(root) => root,
                None => {
                    let root = pgrx::direct_function_call::<pg_sys::Oid>(
                        pg_sys::pg_partition_root,
                        &[own.into_datum()],
                    )
                    .unwrap_or(own);
                    PARTITION_ROOTS.with(|roots| roots.borrow_mut().insert(own, root));
                    root
                }
            };
        }
        match names(relid).or_else(|| names(own)) {
            Some(n) => n,
            None => raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("webhook.enqueue: relation {} has no name", own.to_u32()),
                None,
            ),
        }
    }
}

/// (schema, name) of a relation, or None if it does not exist (any more).
unsafe fn names(relid: pg_sys::Oid) -> Option<(String, String)> {
    unsafe {
        let name = pg_sys::get_rel_name(relid);
        if name.is_null() {
            return None;
        }
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        if nsp.is_null() {
            return None;
        }
        let s = |p: *mut c_char| CStr::from_ptr(p).to_string_lossy().into_owned();
        Some((s(nsp), s(name)))
    }
}

/// `schema.table`, quoted as needed, for messages.
unsafe fn qualified_name(relid: pg_sys::Oid) -> Option<String> {
    let (nsp, name) = unsafe { names(relid) }?;
    let q = |s: &str| {
        // SAFETY: quote_identifier reads a NUL-terminated string and returns one.
        let c = CString::new(s).unwrap_or_default();
        unsafe { CStr::from_ptr(pg_sys::quote_identifier(c.as_ptr())) }
            .to_string_lossy()
            .into_owned()
    };
    Some(format!("{}.{}", q(&nsp), q(&name)))
}

static TRIGGER_HOME: Statement = Statement::reading(
    "enqueue_trigger_home",
    "WITH RECURSIVE t AS (
    SELECT g.oid, g.tgrelid, g.tgparentid FROM pg_catalog.pg_trigger g WHERE g.oid OPERATOR(pg_catalog.=) $1
    UNION ALL
    SELECT g.oid, g.tgrelid, g.tgparentid FROM pg_catalog.pg_trigger g JOIN t ON g.oid OPERATOR(pg_catalog.=) t.tgparentid
)
SELECT t.tgrelid, c.relowner FROM t JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) t.tgrelid
 WHERE t.tgparentid OPERATOR(pg_catalog.=) 0",
    &[pg_sys::OIDOID],
);

/// The table the firing trigger was created on, and its owner: the relation itself, or for a
/// trigger a partition inherited, the partitioned table it was created on.
unsafe fn trigger_home(
    rel: pg_sys::Relation,
    trigger: *mut pg_sys::Trigger,
) -> (pg_sys::Oid, pg_sys::Oid) {
    unsafe {
        let own = ((*rel).rd_id, (*(*rel).rd_rel).relowner);
        if trigger.is_null() || !(*trigger).tgisclone {
            return own;
        }
        let tgoid = (*trigger).tgoid;
        if let Some(h) = TRIGGER_HOMES.with(|m| m.borrow().get(&tgoid).copied()) {
            return h;
        }
        let found = TRIGGER_HOME
            .rows(&[tgoid.into()], |row| {
                Ok((row.get::<pg_sys::Oid>(1)?, row.get::<pg_sys::Oid>(2)?))
            })
            .unwrap_or_else(|e| spi_failed(e));
        let home = match found.first() {
            Some((Some(relid), Some(owner))) => (*relid, *owner),
            _ => own,
        };
        TRIGGER_HOMES.with(|m| m.borrow_mut().insert(tgoid, home));
        home
    }
}

/// Bytes of a row's values before JSON encoding (uncompressed, as stored), counting only
/// `columns` when given; 0 for no row.
unsafe fn raw_size(
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
    columns: Option<&[String]>,
) -> i64 {
    if tuple.is_null() {
        return 0;
    }
    unsafe {
        // Without out-of-line values a row is at most a page, and whatever is compressed
        // inline in it: far below LARGEST_ROW_BUILT. Only such rows need counting.
        if (*(*tuple).t_data).t_infomask & pg_sys::HEAP_HASEXTERNAL as u16 == 0 {
            return i64::from((*tuple).t_len);
        }
        let natts = (*tupdesc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(tuple, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let mut total: i64 = 0;
        for i in 0..natts {
            let att = crate::pg::tuple_attribute(tupdesc, i);
            if (*att).attisdropped || nulls[i] || !wanted(att, columns) {
                continue;
            }
            total += match (*att).attlen {
                -1 => pg_sys::toast_raw_datum_size(values[i]) as i64,
                -2 => CStr::from_ptr(values[i].cast_mut_ptr::<c_char>())
                    .to_bytes()
                    .len() as i64,
                n => i64::from(n),
            };
        }
        total
    }
}

unsafe fn wanted(att: *const pg_sys::FormData_pg_attribute, columns: Option<&[String]>) -> bool {
    let Some(cols) = columns else {
        return true;
    };
    let name = unsafe { CStr::from_ptr((*att).attname.data.as_ptr()) };
    cols.iter().any(|c| c.as_bytes() == name.to_bytes())
}

/// True when a published column of `rel` (all, or `columns`) has a type created after initdb:
/// its cast to json, if any, is code its owner wrote.
unsafe fn has_user_types(rel: pg_sys::Relation, columns: Option<&[String]>) -> bool {
    // SAFETY: the relation's descriptor, valid for the call.
    unsafe {
        let desc = (*rel).rd_att;
        (0..(*desc).natts as usize).any(|i| {
            let att = crate::pg::tuple_attribute(desc, i);
            !(*att).attisdropped
                && wanted(att, columns)
                && (*att).atttypid.to_u32() >= pg_sys::FirstNormalObjectId
        })
    }
}

/// `to_jsonb` of the whole row, as the current user.
unsafe fn row_json(
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
    reltype: pg_sys::Oid,
) -> Option<pg_sys::Datum> {
    if tuple.is_null() {
        return None;
    }
    unsafe {
        let row = pg_sys::heap_copy_tuple_as_datum(tuple, tupdesc);
        Some(to_jsonb(row, reltype))
    }
}

/// `to_jsonb` of the chosen columns (an anonymous record of just those), as the current user;
/// None for no row, or when none of the columns exists.
unsafe fn columns_json(
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
    columns: &[String],
) -> Option<pg_sys::Datum> {
    if tuple.is_null() {
        return None;
    }
    unsafe {
        let (desc, picked) = projection(tupdesc, columns)?;
        let natts = (*tupdesc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![false; natts];
        pg_sys::heap_deform_tuple(tuple, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let mut pv: Vec<pg_sys::Datum> = picked.iter().map(|&i| values[i]).collect();
        let mut pn: Vec<bool> = picked.iter().map(|&i| nulls[i]).collect();
        let row = pg_sys::heap_form_tuple(desc, pv.as_mut_ptr(), pn.as_mut_ptr());
        let datum = pg_sys::heap_copy_tuple_as_datum(row, desc);
        Some(to_jsonb(datum, pg_sys::RECORDOID))
    }
}

/// The blessed descriptor of a record of the chosen columns of a row type, and which of the
/// row's attributes they are; kept per (row type, columns) until the next relcache invalidation.
unsafe fn projection(tupdesc: pg_sys::TupleDesc, columns: &[String]) -> Option<Projection> {
    let key = (unsafe { (*tupdesc).tdtypeid }, columns.join("\0"));
    if let Some(found) = PROJECTIONS.with(|m| m.borrow().get(&key).cloned()) {
        return found;
    }
    let built = unsafe {
        let natts = (*tupdesc).natts as usize;
        let picked: Vec<usize> = (0..natts)
            .filter(|&i| {
                let att = crate::pg::tuple_attribute(tupdesc, i);
                !(*att).attisdropped && wanted(att, Some(columns))
            })
            .collect();
        if picked.is_empty() {
            None
        } else {
            let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let desc = pg_sys::CreateTemplateTupleDesc(picked.len() as i32);
            for (k, &i) in picked.iter().enumerate() {
                let att = crate::pg::tuple_attribute(tupdesc, i);
                pg_sys::TupleDescInitEntry(
                    desc,
                    (k + 1) as pg_sys::AttrNumber,
                    (*att).attname.data.as_ptr(),
                    (*att).atttypid,
                    (*att).atttypmod,
                    0,
                );
            }
            let desc = pg_sys::BlessTupleDesc(desc);
            pg_sys::MemoryContextSwitchTo(old);
            Some((desc, std::rc::Rc::new(picked)))
        }
    };
    PROJECTIONS.with(|m| m.borrow_mut().insert(key, built.clone()));
    built
}

/// jsonb equality (the built-in `=`).
unsafe fn jsonb_equal(a: pg_sys::Datum, b: pg_sys::Datum) -> bool {
    unsafe {
        pgrx::direct_function_call::<bool>(pg_sys::jsonb_eq, &[Some(a), Some(b)]).unwrap_or(false)
    }
}

/// `to_jsonb(value)` for a value of type `typid`, called directly with the current user's
/// rights (a user type's cast to json runs as that user, as in their own query).
unsafe fn to_jsonb(value: pg_sys::Datum, typid: pg_sys::Oid) -> pg_sys::Datum {
    let flinfo = TO_JSONB.with(|m| {
        *m.borrow_mut().entry(typid).or_insert_with(|| unsafe {
            let cxt = pg_sys::TopMemoryContext;
            let old = pg_sys::MemoryContextSwitchTo(cxt);
            let fl =
                pg_sys::palloc0(std::mem::size_of::<pg_sys::FmgrInfo>()).cast::<pg_sys::FmgrInfo>();
            pg_sys::fmgr_info_cxt(pg_sys::Oid::from(pg_sys::F_TO_JSONB), fl, cxt);
            // to_jsonb reads its argument's type from the call expression.
            let arg = pg_sys::makeNullConst(typid, -1, pg_sys::InvalidOid);
            let args = pg_sys::lappend(std::ptr::null_mut(), arg.cast());
            let call = pg_sys::makeFuncExpr(
                pg_sys::Oid::from(pg_sys::F_TO_JSONB),
                pg_sys::JSONBOID,
                args,
                pg_sys::InvalidOid,
                pg_sys::InvalidOid,
                pg_sys::CoercionForm::COERCE_EXPLICIT_CALL,
            );
            (*fl).fn_expr = call.cast();
            pg_sys::MemoryContextSwitchTo(old);
            fl
        })
    });
    unsafe { pg_sys::FunctionCall1Coll(flinfo, pg_sys::InvalidOid, value) }
}

#[cfg(test)]
mod tests {
    use super::{route, Route};

    #[test]
    fn unknown_endpoints_fail_disabled_ones_cancel_filtered_ones_skip() {
        assert_eq!(
            route("it's", None),
            Route::Record {
                endpoint_id: None,
                status: "failed",
                reason: Some("endpoint 'it's' does not exist".into())
            }
        );
        assert_eq!(route("crm", Some((3, true, false))), Route::Skip);
        assert_eq!(route("crm", Some((3, false, false))), Route::Skip);
        assert_eq!(
            route("crm", Some((3, false, true))),
            Route::Record {
                endpoint_id: Some(3),
                status: "cancelled",
                reason: Some("endpoint disabled".into())
            }
        );
        assert_eq!(
            route("crm", Some((3, true, true))),
            Route::Record {
                endpoint_id: Some(3),
                status: "pending",
                reason: None
            }
        );
    }
}
