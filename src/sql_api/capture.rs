//! The trigger's writes, a statement at a time: `webhook.enqueue` decides each row change (rights,
//! images, size, endpoint) as it fires and hands the finished values here; they are written into
//! webhook's tables by one statement for the whole user statement, run by the statement trigger
//! `webhook.flush()` that `subscribe()` puts beside its row triggers (`"webhook-flush"`).
//!
//! Why: a kept plan still costs an executor start-up, run and shut-down for every row, which was
//! most of the trigger's cost on multi-row statements. One `INSERT … SELECT FROM unnest(…)` per
//! statement writes the same rows, in the same order, with the same values.
//!
//! When the values wait. Only where Postgres is certain to fire the flush trigger after the row
//! trigger within the same statement ([`flush_follows`]): the table itself has an enabled
//! `webhook.flush()` AFTER … FOR EACH STATEMENT trigger for the operation, the row trigger is not
//! deferrable, and the table is not a partition (a row reaching a partition through its parent
//! fires the parent's statement triggers, not the partition's). Anywhere else (hand-written
//! triggers, partitions, tables subscribed before this release) each row is written as it fires.
//! Nothing is kept across statements on purpose, but two nets make sure nothing can be lost or
//! written late: rows of an aborted subtransaction are dropped with it, and whatever is still
//! waiting when the transaction commits or prepares is written then (a logical replication apply
//! worker fires row triggers but no statement triggers: its rows are written at its commit).
//! The number of rows and bytes waiting is bounded ([`full`]); past it they are written at once.
//!
//! One event per row change. The subscriptions of a table fire one after another for each row;
//! where the next one publishes the same columns of the same row change as the event waiting
//! last ([`Key`]), it adds only its delivery to that event: the row images are built once, and
//! one event row is written whatever the number of such subscriptions (each delivery keeps its
//! own endpoint, status and reason).

use std::cell::RefCell;
use std::ffi::c_char;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::pg::spi::Statement;

/// Writes a statement's events, in the order they were decided: $1 the events' id sequence; $2
/// type, $3 schema, $4 table, $5 op, $6/$7 new and old row images (NULL when absent or not kept),
/// $8 size of the body, $9 route (the endpoints of its pending deliveries, as an array literal;
/// the worker makes those deliveries, `webhook._route()`), $10 the writer's `traceparent` (NULL
/// if none). Deliveries that are not pending (an endpoint disabled or missing, a body too large)
/// are written here, in order: $11 which event (its position in the events' arrays, from 1), $12
/// endpoint id (NULL if unknown), $13 status, $14 reason; each with its computed id (event id * 2^20 + endpoint id) or, to an endpoint that
/// does not exist, one from the identity. Event ids are drawn in order, so ids follow the rows as
/// they did when each row was written by itself.
static WRITE: Statement = Statement::new("enqueue_write", WRITE_SQL, WRITE_PARAMS);
const WRITE_SQL: &str = "WITH ev AS MATERIALIZED (
    SELECT pg_catalog.nextval($1::pg_catalog.regclass) AS id, u.*
      FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3), pg_catalog.unnest($4),
                      pg_catalog.unnest($5), pg_catalog.unnest($6), pg_catalog.unnest($7),
                      pg_catalog.unnest($8), pg_catalog.unnest($9), pg_catalog.unnest($10)) WITH ORDINALITY
           AS u(type, schema_name, table_name, op, new, old, size, route, traceparent, n)
), written AS (
    INSERT INTO webhook._events (id, type, schema_name, table_name, op, new, old, size, route, traceparent)
    SELECT ev.id, ev.type, ev.schema_name, ev.table_name, ev.op, ev.new, ev.old, ev.size,
           ev.route::pg_catalog.int4[], ev.traceparent
      FROM ev
)
INSERT INTO webhook._deliveries (id, event_id, endpoint_id, status, next_attempt_at, last_error)
SELECT COALESCE(ev.id OPERATOR(pg_catalog.*) 1048576 OPERATOR(pg_catalog.+) d.endpoint_id, pg_catalog.nextval(pg_catalog.pg_get_serial_sequence('webhook._deliveries', 'id')::pg_catalog.regclass)),
       ev.id, d.endpoint_id, d.status::webhook.delivery_status,
       CASE WHEN d.status OPERATOR(pg_catalog.=) 'pending' THEN pg_catalog.now() END, d.reason
  FROM ROWS FROM (pg_catalog.unnest($11), pg_catalog.unnest($12), pg_catalog.unnest($13),
                  pg_catalog.unnest($14)) WITH ORDINALITY AS d(event, endpoint_id, status, reason, k)
  JOIN ev ON ev.n OPERATOR(pg_catalog.=) d.event
 ORDER BY d.k";
const WRITE_PARAMS: &[pg_sys::Oid] = &[
    pg_sys::OIDOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::JSONBARRAYOID,
    pg_sys::JSONBARRAYOID,
    pg_sys::INT4ARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::INT4ARRAYOID,
    pg_sys::INT4ARRAYOID,
    pg_sys::TEXTARRAYOID,
    pg_sys::TEXTARRAYOID,
];

/// The same events as WRITE when none of their deliveries is stored now (the common case): a
/// plain INSERT … SELECT, whose rows need not be materialised for a second use. $1–$10 as WRITE's.
static WRITE_EVENTS: Statement = Statement::new(
    "enqueue_write_events",
    "INSERT INTO webhook._events (id, type, schema_name, table_name, op, new, old, size, route, traceparent)
     SELECT pg_catalog.nextval($1::pg_catalog.regclass), u.type, u.schema_name, u.table_name, u.op,
            u.new, u.old, u.size, u.route::pg_catalog.int4[], u.traceparent
       FROM ROWS FROM (pg_catalog.unnest($2), pg_catalog.unnest($3), pg_catalog.unnest($4),
                       pg_catalog.unnest($5), pg_catalog.unnest($6), pg_catalog.unnest($7),
                       pg_catalog.unnest($8), pg_catalog.unnest($9), pg_catalog.unnest($10))
            AS u(type, schema_name, table_name, op, new, old, size, route, traceparent)",
    WRITE_PARAMS.split_at(10).0,
);

/// One event with one pending delivery (the common case: a one-row statement with one
/// subscription, or a row written as it fires): the event row alone, its route the one
/// endpoint. $1 type, $2 schema, $3 table, $4 op, $5/$6 new and old images, $7 size, $8 endpoint,
/// $9 traceparent.
static WRITE_ONE_ROUTED: Statement = Statement::new(
    "enqueue_write_one_routed",
    "INSERT INTO webhook._events (type, schema_name, table_name, op, new, old, size, route, traceparent)
     VALUES ($1, $2, $3, $4, $5, $6, $7, ARRAY[$8]::pg_catalog.int4[], $9)",
    &[
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::JSONBOID,
        pg_sys::JSONBOID,
        pg_sys::INT4OID,
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
    ],
);

/// One event and its one delivery that is not pending (or any, on a schema from before 0.3.0):
/// the same rows as WRITE, by a statement whose plan is cheaper to run than unnesting arrays of
/// one. $1 type, $2 schema, $3 table, $4 op, $5/$6 new and old
/// images, $7 endpoint id, $8 status, $9 reason, and $10 the body's size and $11 the traceparent
/// where the schema has the columns (`$size_column`/`$size_value` are empty for a schema from before 0.3.0: this
/// library installed, ALTER EXTENSION … UPDATE not yet run). From 0.3.0 on the stored
/// deliveries are `webhook._deliveries` (`$deliveries`) and a delivery's id is computed
/// (`$id_column`/`$id_value`); before, `webhook.deliveries` and the identity.
macro_rules! write_one_sql {
    ($size_column:literal, $size_value:literal, $deliveries:literal, $id_column:literal, $id_value:literal) => {
        concat!(
            "WITH ev AS (
    INSERT INTO webhook._events (type, schema_name, table_name, op, new, old",
            $size_column,
            ")
    VALUES ($1, $2, $3, $4, $5, $6",
            $size_value,
            ")
    RETURNING id
)
INSERT INTO webhook.",
            $deliveries,
            " (",
            $id_column,
            "event_id, endpoint_id, status, next_attempt_at, last_error)
SELECT ",
            $id_value,
            "ev.id, $7, $8::webhook.delivery_status,
       CASE WHEN $8 OPERATOR(pg_catalog.=) 'pending' THEN pg_catalog.now() END, $9
  FROM ev
"
        )
    };
}

const ONE_ROW: &[pg_sys::Oid] = &[
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::JSONBOID,
    pg_sys::JSONBOID,
    pg_sys::INT4OID,
    pg_sys::TEXTOID,
    pg_sys::TEXTOID,
    pg_sys::INT4OID,
    pg_sys::TEXTOID,
];
static WRITE_ONE: Statement = Statement::new(
    "enqueue_write_one",
    write_one_sql!(
        ", size, traceparent",
        ", $10, $11",
        "_deliveries",
        "id, ",
        "COALESCE(ev.id OPERATOR(pg_catalog.*) 1048576 OPERATOR(pg_catalog.+) $7, pg_catalog.nextval(pg_catalog.pg_get_serial_sequence('webhook._deliveries', 'id')::pg_catalog.regclass)), "
    ),
    ONE_ROW,
);
static WRITE_ONE_LEGACY: Statement = Statement::new(
    "enqueue_write_one_legacy",
    write_one_sql!("", "", "deliveries", "", ""),
    ONE_ROW.split_at(9).0,
);

/// The events' id sequence (whatever name an upgraded schema gave it).
static SEQUENCE: Statement = Statement::reading(
    "enqueue_sequence",
    "SELECT pg_catalog.pg_get_serial_sequence('webhook._events', 'id')::pg_catalog.regclass::pg_catalog.oid",
    &[],
);

/// At most this many row changes wait for their statement's end …
const MOST_ROWS: usize = 1000;
/// … and at most this many bytes of row images.
const MOST_BYTES: usize = 8 * 1024 * 1024;

/// A row change's event, decided: the values it is written with.
pub(crate) struct Event {
    pub event_type: String,
    pub schema: String,
    pub table: String,
    pub op: &'static str,
    pub new: Option<pg_sys::Datum>,
    pub old: Option<pg_sys::Datum>,
    pub size: Option<i32>,
    /// The writer's W3C `traceparent` (`webhook.traceparent`), sent with its deliveries.
    pub traceparent: Option<String>,
    /// Why no delivery of it can be sent (too large to publish), if so.
    pub too_large: Option<String>,
}

/// A delivery of an event, decided.
pub(crate) struct Delivery {
    pub endpoint_id: Option<i32>,
    pub status: &'static str,
    pub reason: Option<String>,
}

impl Delivery {
    /// Whether the worker makes this delivery from its event's route (a pending one to a known
    /// endpoint) rather than it being stored with the event.
    fn routed(&self) -> bool {
        self.status == "pending" && self.endpoint_id.is_some()
    }
}

/// What makes two triggers' events the same event: the same row change (relation, operation,
/// and the row versions it made and replaced) published with the same columns.
#[derive(Clone, PartialEq, Eq, Debug)]
pub(crate) struct Key {
    pub relid: pg_sys::Oid,
    pub op: &'static str,
    pub new: Option<(u32, u16)>,
    pub old: Option<(u32, u16)>,
    pub columns: Option<Vec<String>>,
}

struct WaitingEvent {
    event: Event,
    key: Key,
    /// Bytes of its images.
    bytes: usize,
    /// The subtransaction it was made in: dropped if that one aborts.
    subxact: pg_sys::SubTransactionId,
}

struct WaitingDelivery {
    /// Its event's position in `Buffer::events`.
    event: usize,
    delivery: Delivery,
    subxact: pg_sys::SubTransactionId,
}

/// What a trigger may add its delivery to: the event waiting last, when it is the same.
pub(crate) struct Shared {
    index: usize,
    pub too_large: Option<String>,
}

#[derive(Default)]
struct Buffer {
    events: Vec<WaitingEvent>,
    deliveries: Vec<WaitingDelivery>,
    bytes: usize,
    /// Holds the waiting rows' images; a child of TopTransactionContext (gone with the
    /// transaction, so `rows` is emptied at its end), reset after each write.
    memory: Option<pg_sys::MemoryContext>,
    callbacks: bool,
}

thread_local! {
    static BUFFER: RefCell<Buffer> = RefCell::new(Buffer::default());
    /// Whether a table inherits from another, per table.
    static INHERITING: RefCell<std::collections::HashMap<pg_sys::Oid, bool>> =
        RefCell::new(std::collections::HashMap::new());
    /// The events' id sequence, read as the extension's owner.
    static SEQUENCE_OID: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
    /// The table `webhook._events`, once found.
    static EVENTS_OID: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
    /// The oid of `webhook.flush()`, once found.
    static FLUSH: std::cell::Cell<Option<pg_sys::Oid>> = const { std::cell::Cell::new(None) };
}

/// True when what waits must be written now rather than at the statement's end: `rows`
/// deliveries, `bytes` of their events' images.
pub(crate) fn full(rows: usize, bytes: usize) -> bool {
    rows >= MOST_ROWS || bytes >= MOST_BYTES
}

impl Key {
    /// The key of a row change: the relation, the operation, and the addresses (ctids) of the row
    /// versions it made and replaced (null tuples for none).
    ///
    /// # Safety
    /// The tuples are the trigger call's (or null).
    pub(crate) unsafe fn of(
        relid: pg_sys::Oid,
        op: &'static str,
        new: pg_sys::HeapTuple,
        old: pg_sys::HeapTuple,
        columns: &Option<Vec<String>>,
    ) -> Key {
        let tid = |t: pg_sys::HeapTuple| {
            // SAFETY: a tuple of the call, when not null.
            (!t.is_null()).then(|| unsafe {
                let ip = (*t).t_self;
                (
                    (u32::from(ip.ip_blkid.bi_hi) << 16) | u32::from(ip.ip_blkid.bi_lo),
                    ip.ip_posid,
                )
            })
        };
        Key {
            relid,
            op,
            new: tid(new),
            old: tid(old),
            columns: columns.clone(),
        }
    }

    /// Every row version it names has an address: a foreign table's rows come back to AFTER
    /// triggers without one (offset 0), so two of its row changes would look the same.
    fn addressed(&self) -> bool {
        [self.new, self.old]
            .iter()
            .flatten()
            .all(|&(_, pos)| pos != 0)
    }

    /// The same row change (whatever the columns); never for a row change without addresses.
    fn same_row(&self, other: &Key) -> bool {
        self.addressed()
            && self.relid == other.relid
            && self.op == other.op
            && self.new == other.new
            && self.old == other.old
    }
}

/// Which of the waiting events a trigger's event (`key`, in subtransaction `subxact`) is, if any:
/// `latest_first` are the waiting events' keys and subtransactions, the latest first. Only the
/// events at the end made by the same row change are looked at (a row's triggers fire one after
/// another); returns how many places back from the latest it is.
pub(crate) fn same_event<'k>(
    latest_first: impl Iterator<Item = (&'k Key, pg_sys::SubTransactionId)>,
    key: &Key,
    subxact: pg_sys::SubTransactionId,
) -> Option<usize> {
    for (back, (k, s)) in latest_first.enumerate() {
        if s != subxact || !k.same_row(key) {
            return None;
        }
        if k.columns == key.columns {
            return Some(back);
        }
    }
    None
}

/// The waiting rows that survive the abort of subtransaction `aborted`: those made before it
/// began. Subtransaction ids only grow within a transaction, so its own rows and its children's
/// have ids at or above it, and rows of subtransactions that committed before it began below.
pub(crate) fn survives(
    made_in: pg_sys::SubTransactionId,
    aborted: pg_sys::SubTransactionId,
) -> bool {
    made_in < aborted
}

/// Whether a trigger enabled as `tgenabled` fires under `session_replication_role`
/// (`replica`: only ENABLE REPLICA and ENABLE ALWAYS triggers; otherwise all but those two
/// kinds' opposite, as Postgres decides in its trigger manager).
pub(crate) fn fires(tgenabled: c_char, replica: bool) -> bool {
    let e = tgenabled as u8;
    if replica {
        e == b'R' || e == b'A'
    } else {
        e == b'O' || e == b'A'
    }
}

/// True when Postgres will fire a `webhook.flush()` statement trigger of `rel` after this row
/// trigger, within the same statement (see the module's notes).
///
/// # Safety
/// `data` is the trigger manager's data for the current call.
pub(crate) unsafe fn flush_follows(data: &pg_sys::TriggerData, op: &str) -> bool {
    unsafe {
        let rel = data.tg_relation;
        let row_trigger = data.tg_trigger;
        // A partition's or an inheritance child's rows fire its row triggers when a statement
        // names its parent, whose statement triggers fire instead of its own.
        if (*(*rel).rd_rel).relispartition
            || row_trigger.is_null()
            || (*row_trigger).tgdeferrable
            || inherits((*rel).rd_id)
        {
            return false;
        }
        let desc = (*rel).trigdesc;
        if desc.is_null() {
            return false;
        }
        let Some(flush) = flush_oid() else {
            return false;
        };
        let replica =
            pg_sys::SessionReplicationRole == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32;
        let event = match op {
            "INSERT" => pg_sys::TRIGGER_TYPE_INSERT,
            "UPDATE" => pg_sys::TRIGGER_TYPE_UPDATE,
            _ => pg_sys::TRIGGER_TYPE_DELETE,
        } as i16;
        let not_statement_after = (pg_sys::TRIGGER_TYPE_ROW
            | pg_sys::TRIGGER_TYPE_BEFORE
            | pg_sys::TRIGGER_TYPE_INSTEAD) as i16;
        (0..(*desc).numtriggers as usize).any(|i| {
            let t = &*(*desc).triggers.add(i);
            t.tgfoid == flush
                && t.tgtype & not_statement_after == 0 // FOR EACH STATEMENT, AFTER
                && t.tgtype & event != 0
                && t.tgnattr == 0
                && t.tgqual.is_null()
                && fires(t.tgenabled, replica)
        })
    }
}

/// The oid of `webhook.flush()`, looked up once per session (None before it exists: a schema
/// older than this library, where every row is written as it fires).
fn flush_oid() -> Option<pg_sys::Oid> {
    if let Some(found) = FLUSH.get() {
        return Some(found);
    }
    // SAFETY: catalog lookups inside a transaction (no privilege is checked: the trigger runs as
    // any role, and this only learns whether the function exists).
    let found = unsafe {
        let nsp = pg_sys::get_namespace_oid(c"webhook".as_ptr(), true);
        let oid = if nsp == pg_sys::InvalidOid {
            pg_sys::InvalidOid
        } else {
            let no_args = pg_sys::buildoidvector(std::ptr::null(), 0);
            pg_sys::GetSysCacheOid(
                pg_sys::SysCacheIdentifier::PROCNAMEARGSNSP as i32,
                pg_sys::Anum_pg_proc_oid as pg_sys::AttrNumber,
                pg_sys::Datum::from(c"flush".as_ptr()),
                pg_sys::Datum::from(no_args),
                pg_sys::Datum::from(nsp),
                pg_sys::Datum::from(0),
            )
        };
        (oid != pg_sys::InvalidOid).then_some(oid)
    };
    // Kept only once found: ALTER EXTENSION UPDATE may add it later in this session.
    FLUSH.set(found);
    found
}

static INHERITS: Statement = Statement::reading(
    "enqueue_inherits",
    "SELECT EXISTS (SELECT FROM pg_catalog.pg_inherits i WHERE i.inhrelid OPERATOR(pg_catalog.=) $1)",
    &[pg_sys::OIDOID],
);

/// Whether a table inherits from another (kept per table until the next relcache invalidation:
/// ALTER TABLE … INHERIT / NO INHERIT sends one).
fn inherits(relid: pg_sys::Oid) -> bool {
    if let Some(found) = INHERITING.with(|m| m.borrow().get(&relid).copied()) {
        return found;
    }
    let found = INHERITS
        .one::<bool>(&[relid.into()])
        .unwrap_or_else(|e| super::trigger::spi_failed(e))
        .unwrap_or(false);
    INHERITING.with(|m| m.borrow_mut().insert(relid, found));
    found
}

/// Forgets the oids and inheritance looked up (on any relcache invalidation: a dropped
/// extension's triggers and sequence go with relcache entries, a re-created one has new oids).
pub(crate) fn forget_catalog_lookups() {
    FLUSH.set(None);
    SEQUENCE_OID.set(None);
    EVENTS_OID.set(None);
    INHERITING.with(|m| m.try_borrow_mut().map(|mut m| m.clear()).ok());
}

/// The waiting event of the same row change with the same columns, if there is one (made in
/// the current subtransaction): a trigger for it adds its delivery with [`add_delivery`].
pub(crate) fn shared(key: &Key) -> Option<Shared> {
    // SAFETY: a read of the backend's transaction state.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    BUFFER.with(|cell| {
        let b = cell.borrow();
        let back = same_event(
            b.events.iter().rev().map(|w| (&w.key, w.subxact)),
            key,
            subxact,
        )?;
        let index = b.events.len() - 1 - back;
        Some(Shared {
            index,
            too_large: b.events[index].event.too_large.clone(),
        })
    })
}

/// Adds a delivery of a waiting event ([`shared`]); written as [`add`] says.
pub(crate) fn add_delivery(to: Shared, delivery: Delivery, later: bool) {
    // SAFETY: a read of the backend's transaction state.
    let subxact = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let (rows, bytes) = BUFFER.with(|cell| {
        let mut b = cell.borrow_mut();
        // Two triggers publishing the same row change to the same endpoint (a subscription and
        // a hand-written trigger, say) make one delivery: its id is the event's and the
        // endpoint's, so a second would be the same delivery. (An event's deliveries are the
        // last ones waiting.)
        let known = delivery.endpoint_id.is_some()
            && b.deliveries
                .iter()
                .rev()
                .take_while(|w| w.event == to.index)
                .any(|w| w.delivery.endpoint_id == delivery.endpoint_id);
        if !known {
            b.deliveries.push(WaitingDelivery {
                event: to.index,
                delivery,
                subxact,
            });
        }
        (b.deliveries.len(), b.bytes)
    });
    if !later || full(rows, bytes) {
        super::trigger::as_extension_owner(&write_waiting);
    }
}

/// Keeps an event and its first delivery to be written at the statement's end (`later`), or
/// writes them now with whatever is waiting.
pub(crate) fn add(event: Event, key: Key, delivery: Delivery, later: bool) {
    register_callbacks();
    // SAFETY: copies the images into the buffer's memory, on the backend's main thread.
    let (rows, bytes) = BUFFER.with(|cell| unsafe {
        let mut b = cell.borrow_mut();
        let memory = *b.memory.get_or_insert_with(|| {
            pg_sys::AllocSetContextCreateInternal(
                pg_sys::TopTransactionContext,
                c"webhook_ext waiting events".as_ptr(),
                0,
                8 * 1024,
                8 * 1024 * 1024,
            )
        });
        let copy = |d: Option<pg_sys::Datum>| {
            d.map(|d| {
                let old = pg_sys::MemoryContextSwitchTo(memory);
                let c = pg_sys::Datum::from(pg_sys::pg_detoast_datum_copy(
                    d.cast_mut_ptr::<pg_sys::varlena>(),
                ));
                pg_sys::MemoryContextSwitchTo(old);
                c
            })
        };
        let size = |d: Option<pg_sys::Datum>| d.map_or(0, |d| pg_sys::toast_raw_datum_size(d));
        let mut event = event;
        let bytes = size(event.new) + size(event.old);
        b.bytes += bytes;
        event.new = copy(event.new);
        event.old = copy(event.old);
        let subxact = pg_sys::GetCurrentSubTransactionId();
        b.events.push(WaitingEvent {
            event,
            key,
            bytes,
            subxact,
        });
        let index = b.events.len() - 1;
        b.deliveries.push(WaitingDelivery {
            event: index,
            delivery,
            subxact,
        });
        (b.deliveries.len(), b.bytes)
    });
    if !later || full(rows, bytes) {
        super::trigger::as_extension_owner(&write_waiting);
    }
}

/// Writes every waiting event and delivery (nothing if none), in the order they were decided.
///
/// Only what the current subtransaction (and its committed children) decided: rows an enclosing
/// subtransaction decided stay waiting for its own statement's end (or the commit). Written
/// here, they would roll back with this subtransaction while already gone from the buffer: a
/// user's trigger that writes another table inside an exception block and raises would lose
/// the enclosing statement's events.
pub(crate) fn write_waiting() {
    // SAFETY: a read of the backend's transaction state.
    let current = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let (events, deliveries, empty) = BUFFER.with(|cell| {
        let mut b = cell.borrow_mut();
        let e_at = own_from(b.events.iter().map(|w| w.subxact), current);
        let d_at = own_from(b.deliveries.iter().map(|w| w.subxact), current);
        let events = b.events.split_off(e_at);
        let mut deliveries = b.deliveries.split_off(d_at);
        b.bytes = b.events.iter().map(|w| w.bytes).sum();
        // A delivery shares only an event of its own subtransaction: its event is in the part
        // taken, at its position less what stays.
        for d in &mut deliveries {
            d.event -= e_at;
        }
        (events, deliveries, b.deliveries.is_empty())
    });
    match (events.as_slice(), deliveries.as_slice()) {
        (_, []) => {}
        ([e], ds) if write_routed_directly(&e.event, ds.iter().map(|d| &d.delivery)) => {}
        ([e], [d]) => write_one(&e.event, &d.delivery, false),
        (events, deliveries) => write_many(events, deliveries),
    }
    drop(events);
    if empty {
        BUFFER.with(|cell| {
            if let Some(m) = cell.borrow().memory {
                // SAFETY: nothing points into it any more (the buffer is empty and the events
                // taken above are dropped).
                unsafe { pg_sys::MemoryContextReset(m) };
            }
        });
    }
}

/// Where the rows of subtransaction `current` and its children begin in a list tagged with the
/// subtransactions that made them (they are its end: everything decided since it began).
pub(crate) fn own_from(
    made_in: impl ExactSizeIterator<Item = pg_sys::SubTransactionId>,
    current: pg_sys::SubTransactionId,
) -> usize {
    let len = made_in.len();
    made_in
        .enumerate()
        .find(|&(_, s)| s >= current)
        .map_or(len, |(i, _)| i)
}

/// The events' id sequence, looked up once.
fn sequence_oid() -> pg_sys::Oid {
    if let Some(s) = SEQUENCE_OID.get() {
        return s;
    }
    let s = SEQUENCE
        .one::<pg_sys::Oid>(&[])
        .unwrap_or_else(|e| super::trigger::spi_failed(e))
        .unwrap_or_else(|| {
            super::trigger::spi_failed(crate::pg::spi::SpiError::Column {
                statement: SEQUENCE.name,
                column: 1,
                detail: "webhook._events.id has no sequence".into(),
            })
        });
    SEQUENCE_OID.set(Some(s));
    s
}

/// Writes events and their deliveries with one statement.
fn write_many(events: &[WaitingEvent], deliveries: &[WaitingDelivery]) {
    let sequence = sequence_oid();
    // Pending deliveries go into their event's route (as an array literal: "{3,7}"); the rest
    // are stored now.
    let mut routes: Vec<Option<String>> = vec![None; events.len()];
    let mut stored = Vec::new();
    for d in deliveries {
        match (d.delivery.routed(), d.delivery.endpoint_id) {
            (true, Some(id)) => {
                let r = routes[d.event].get_or_insert_with(|| String::from("{"));
                if r.len() > 1 {
                    r.push(',');
                }
                r.push_str(&id.to_string());
            }
            _ => stored.push(d),
        }
    }
    for r in routes.iter_mut().flatten() {
        r.push('}');
    }
    let texts = |v: Vec<Option<&str>>| -> DatumWithOid<'static> { v.into() };
    let ints = |v: Vec<Option<i32>>| -> DatumWithOid<'static> { v.into() };
    let ev = |f: &dyn Fn(&Event) -> &str| texts(events.iter().map(|w| Some(f(&w.event))).collect());
    // SAFETY: the images live in the buffer's memory until write_waiting resets it.
    let jsonbs = |f: &dyn Fn(&Event) -> Option<pg_sys::Datum>| unsafe {
        DatumWithOid::new(
            jsonb_array(&events.iter().map(|w| f(&w.event)).collect::<Vec<_>>()),
            pg_sys::JSONBARRAYOID,
        )
    };
    let args = [
        sequence.into(),
        ev(&|e| &e.event_type),
        ev(&|e| &e.schema),
        ev(&|e| &e.table),
        ev(&|e| e.op),
        jsonbs(&|e| e.new),
        jsonbs(&|e| e.old),
        ints(events.iter().map(|w| w.event.size).collect()),
        texts(routes.iter().map(|r| r.as_deref()).collect()),
        texts(
            events
                .iter()
                .map(|w| w.event.traceparent.as_deref())
                .collect(),
        ),
        ints(stored.iter().map(|d| Some(d.event as i32 + 1)).collect()),
        ints(stored.iter().map(|d| d.delivery.endpoint_id).collect()),
        texts(stored.iter().map(|d| Some(d.delivery.status)).collect()),
        texts(
            stored
                .iter()
                .map(|d| d.delivery.reason.as_deref())
                .collect(),
        ),
    ];
    let written = if stored.is_empty() {
        WRITE_EVENTS.run(&args[..10])
    } else {
        WRITE.run(&args)
    };
    if let Err(e) = written {
        super::trigger::record_failed(e);
    }
}

/// Writes one event with its one delivery now; `legacy`: on a schema from before 0.3.0 (no
/// `_events.size`). Runs as the caller: the extension's owner, from `write_waiting` or the
/// trigger's legacy path.
pub(crate) fn write_one(e: &Event, d: &Delivery, legacy: bool) {
    let jsonb = |v: Option<pg_sys::Datum>| match v {
        // SAFETY: a jsonb value built by to_jsonb (or copied into the buffer's memory), bound as
        // jsonb.
        Some(v) => unsafe { DatumWithOid::new(v, pg_sys::JSONBOID) },
        None => DatumWithOid::null_oid(pg_sys::JSONBOID),
    };
    let mut args = vec![
        e.event_type.as_str().into(),
        e.schema.as_str().into(),
        e.table.as_str().into(),
        e.op.into(),
        jsonb(e.new),
        jsonb(e.old),
        d.endpoint_id.into(),
        d.status.into(),
        d.reason.as_deref().into(),
    ];
    let statement = if legacy {
        &WRITE_ONE_LEGACY
    } else if d.routed() {
        args.truncate(6);
        args.push(e.size.into());
        args.push(d.endpoint_id.into());
        args.push(e.traceparent.as_deref().into());
        &WRITE_ONE_ROUTED
    } else {
        args.push(e.size.into());
        args.push(e.traceparent.as_deref().into());
        &WRITE_ONE
    };
    if let Err(err) = statement.run(&args) {
        super::trigger::record_failed(err);
    }
}

/// The columns of a row change's event as the trigger writes it without the executor, in the
/// order of [`event_values`].
const EVENT_COLUMNS: [(&std::ffi::CStr, pg_sys::Oid); 13] = [
    (c"id", pg_sys::INT8OID),
    (c"type", pg_sys::TEXTOID),
    (c"payload", pg_sys::JSONBOID),
    (c"schema_name", pg_sys::TEXTOID),
    (c"table_name", pg_sys::TEXTOID),
    (c"op", pg_sys::TEXTOID),
    (c"new", pg_sys::JSONBOID),
    (c"old", pg_sys::JSONBOID),
    (c"txid", pg_sys::INT8OID),
    (c"created_at", pg_sys::TIMESTAMPTZOID),
    (c"size", pg_sys::INT4OID),
    (c"route", pg_sys::INT4ARRAYOID),
    (c"traceparent", pg_sys::TEXTOID),
];

/// An event's row, as WRITE_ONE_ROUTED writes it: its id drawn now from the
/// events' sequence, the column defaults' txid_current() and now(), and its route.
///
/// # Safety
/// Inside the user's transaction; the event's images are valid jsonb datums.
unsafe fn event_values(
    e: &Event,
    sequence: pg_sys::Oid,
    route: &[i32],
) -> Vec<Option<pg_sys::Datum>> {
    // SAFETY: datums of the columns' types (int8, text, jsonb, int8, timestamptz, int4, int4[])
    // built in the current memory context.
    unsafe {
        let text = |s: &str| {
            Some(pg_sys::Datum::from(pg_sys::cstring_to_text_with_len(
                s.as_ptr().cast(),
                s.len() as std::ffi::c_int,
            )))
        };
        let id = pgrx::direct_function_call_as_datum(
            pg_sys::nextval_oid,
            &[Some(pg_sys::Datum::from(sequence))],
        );
        let txid = pg_sys::GetTopFullTransactionId().value as i64;
        let now = pg_sys::GetCurrentTransactionStartTimestamp();
        let mut elements: Vec<pg_sys::Datum> =
            route.iter().map(|&r| pg_sys::Datum::from(r)).collect();
        let route = (!route.is_empty()).then(|| {
            pg_sys::Datum::from(pg_sys::construct_array(
                elements.as_mut_ptr(),
                elements.len() as std::ffi::c_int,
                pg_sys::INT4OID,
                4,
                true,
                pg_sys::TYPALIGN_INT as c_char,
            ))
        });
        vec![
            id,
            text(&e.event_type),
            None,
            text(&e.schema),
            text(&e.table),
            text(e.op),
            e.new,
            e.old,
            Some(pg_sys::Datum::from(txid)),
            Some(pg_sys::Datum::from(now)),
            e.size.map(pg_sys::Datum::from),
            route,
            e.traceparent.as_deref().and_then(text),
        ]
    }
}

/// Writes one row change's event when every delivery of it is routed (one subscription or
/// several: its route names each endpoint), as WRITE_ONE_ROUTED or WRITE_EVENTS would write
/// it, but without the executor (`crate::pg::heap`). False, with nothing written, where a
/// delivery must be stored now or the table needs the executor (an administrator's trigger or
/// index on it, say). A statement's many events stay with WRITE_EVENTS: written this way they
/// went no faster (tests/bench/2026-12-06-one-row-direct-write.md), their executor's start-up
/// being shared by the statement's rows.
fn write_routed_directly<'a>(e: &Event, deliveries: impl Iterator<Item = &'a Delivery>) -> bool {
    let Some(route) = deliveries
        .map(|d| d.endpoint_id.filter(|_| d.routed()))
        .collect::<Option<Vec<i32>>>()
    else {
        return false;
    };
    let Some(table) = events_oid() else {
        return false;
    };
    let sequence = sequence_oid();
    // SAFETY: inside the user's transaction; the images live in the buffer's memory until the
    // write is done.
    unsafe {
        let Some(mut inserter) = crate::pg::heap::Inserter::open(table, &EVENT_COLUMNS) else {
            return false;
        };
        inserter.insert(&event_values(e, sequence, &route));
        inserter.close();
    }
    true
}

/// The table `webhook._events`, once found (None: not there).
fn events_oid() -> Option<pg_sys::Oid> {
    if let Some(oid) = EVENTS_OID.get() {
        return Some(oid);
    }
    // SAFETY: catalog lookups by name, inside a transaction.
    let oid = unsafe {
        let schema = pg_sys::get_namespace_oid(c"webhook".as_ptr(), true);
        if schema == pg_sys::InvalidOid {
            return None;
        }
        pg_sys::get_relname_relid(c"_events".as_ptr(), schema)
    };
    (oid != pg_sys::InvalidOid).then(|| {
        EVENTS_OID.set(Some(oid));
        oid
    })
}

/// A one-dimensional jsonb[] of `items` (NULL elements for None).
///
/// # Safety
/// Every `Some` is a valid jsonb datum.
unsafe fn jsonb_array(items: &[Option<pg_sys::Datum>]) -> pg_sys::Datum {
    let mut values: Vec<pg_sys::Datum> = items
        .iter()
        .map(|d| d.unwrap_or(pg_sys::Datum::from(0)))
        .collect();
    let mut nulls: Vec<bool> = items.iter().map(Option::is_none).collect();
    let mut dims = [items.len() as i32];
    let mut lbs = [1];
    // SAFETY: values and nulls have one entry per element; jsonb is a 4-byte aligned varlena.
    unsafe {
        pg_sys::Datum::from(pg_sys::construct_md_array(
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
            1,
            dims.as_mut_ptr(),
            lbs.as_mut_ptr(),
            pg_sys::JSONBOID,
            -1,
            false,
            pg_sys::TYPALIGN_INT as c_char,
        ))
    }
}

/// The statement trigger `webhook.flush()`: writes the row changes its statement's
/// `webhook.enqueue` triggers decided.
#[pg_trigger]
fn flush<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    let event = trigger.trigger_data().tg_event;
    if !pgrx::trigger_support::trigger_fired_after(event)
        || pgrx::trigger_support::trigger_fired_for_row(event)
    {
        super::trigger::raise(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            "webhook.flush must be used in an AFTER ... FOR EACH STATEMENT trigger".into(),
            None,
        );
    }
    if BUFFER.with(|cell| !cell.borrow().deliveries.is_empty()) {
        super::trigger::as_extension_owner(&write_waiting);
    }
    Ok(None)
}

pub(crate) fn register_callbacks() {
    let done = BUFFER.with(|cell| std::mem::replace(&mut cell.borrow_mut().callbacks, true));
    if done {
        return;
    }
    // SAFETY: registered once for the life of the backend (there is no unregister).
    unsafe {
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(subxact_callback), std::ptr::null_mut());
    }
}

/// Rows still waiting at commit or prepare are written then; at the transaction's end the
/// buffer is emptied (its memory goes with the transaction), and an endpoint cache that read
/// this transaction's own changes is dropped.
#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_PRE_COMMIT | XACT_EVENT_PRE_PREPARE
            if BUFFER.with(|cell| !cell.borrow().deliveries.is_empty()) =>
        {
            // Nothing is running at commit, so no snapshot is active: the write needs one.
            let push = !pg_sys::ActiveSnapshotSet();
            if push {
                pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            }
            super::trigger::as_extension_owner(&write_waiting);
            if push {
                pg_sys::PopActiveSnapshot();
            }
        }
        XACT_EVENT_COMMIT
        | XACT_EVENT_ABORT
        | XACT_EVENT_PREPARE
        | XACT_EVENT_PARALLEL_COMMIT
        | XACT_EVENT_PARALLEL_ABORT => {
            BUFFER.with(|cell| {
                let mut b = cell.borrow_mut();
                b.events.clear();
                b.deliveries.clear();
                b.bytes = 0;
                b.memory = None;
            });
            super::trigger::forget_own_changes(true);
        }
        _ => {}
    }
}

/// Rows decided in an aborted subtransaction (a failed statement inside a savepoint or an
/// exception block) are dropped with it (and the endpoint cache, if it read what it changed).
#[pg_guard]
unsafe extern "C-unwind" fn subxact_callback(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        super::trigger::forget_own_changes(false);
        BUFFER.with(|cell| {
            // What an aborted subtransaction (and its children) decided is the end of both
            // lists: everything decided since it began. Cut there, so positions stay valid.
            let mut b = cell.borrow_mut();
            let events = b.events.iter().position(|w| !survives(w.subxact, my_subid));
            let deliveries = b
                .deliveries
                .iter()
                .position(|w| !survives(w.subxact, my_subid));
            if let Some(n) = events {
                b.events.truncate(n);
            }
            if let Some(n) = deliveries {
                b.deliveries.truncate(n);
            }
            b.bytes = b.events.iter().map(|w| w.bytes).sum();
        });
    }
}

#[cfg(test)]
mod tests {
    use super::{fires, full, same_event, survives, Key, MOST_BYTES, MOST_ROWS};
    use pgrx::pg_sys::Oid;

    #[test]
    fn a_trigger_shares_an_event_of_the_same_row_change_and_columns_only() {
        let key = |new: (u32, u16), columns: Option<&[&str]>| Key {
            relid: Oid::from(16384),
            op: "UPDATE",
            new: Some(new),
            old: Some((0, 1)),
            columns: columns.map(|c| c.iter().map(|s| s.to_string()).collect()),
        };
        let all = key((0, 2), None);
        let some = key((0, 2), Some(&["id"]));
        let earlier_row = key((0, 1), None);
        // Latest first: this row's events with some columns, then all columns, then the row before.
        let waiting = [(&some, 1), (&all, 1), (&earlier_row, 1)];
        let find = |k: &Key, subxact| same_event(waiting.iter().copied(), k, subxact);
        assert_eq!(find(&key((0, 2), Some(&["id"])), 1), Some(0));
        assert_eq!(
            find(&key((0, 2), None), 1),
            Some(1),
            "behind another subscription's event"
        );
        assert_eq!(
            find(&key((0, 2), Some(&["plan"])), 1),
            None,
            "other columns"
        );
        assert_eq!(
            find(&key((0, 1), None), 1),
            None,
            "an earlier row's event is not looked at"
        );
        assert_eq!(find(&key((0, 3), None), 1), None, "another row");
        assert_eq!(find(&key((0, 2), None), 2), None, "another subtransaction");
        let mut other_op = key((0, 2), None);
        other_op.op = "INSERT";
        assert_eq!(find(&other_op, 1), None);
        assert_eq!(same_event(std::iter::empty(), &all, 1), None);
    }

    /// Pins the statements' columns against edits; that they run against their schemas is the
    /// upgrade test's job (tests/e2e/upgrade.rs writes through the new library on 0.2.0's
    /// schema before the update).
    #[test]
    fn only_the_legacy_statement_writes_no_size_column() {
        let sql = super::WRITE_ONE_LEGACY.sql;
        assert!(sql.contains(
            "INSERT INTO webhook._events (type, schema_name, table_name, op, new, old)\n"
        ));
        assert!(sql.contains("VALUES ($1, $2, $3, $4, $5, $6)\n"), "{sql}");
        assert!(!sql.contains("$10"), "{sql}");
        assert!(
            super::WRITE_ONE
                .sql
                .contains("new, old, size, traceparent)")
                && super::WRITE_ONE.sql.contains("$6, $10, $11)")
        );
        assert!(super::WRITE_SQL.contains(
            "(id, type, schema_name, table_name, op, new, old, size, route, traceparent)"
        ));
        // Before 0.3.0 the deliveries table was webhook.deliveries (now a view of
        // webhook._deliveries, which the current statements write).
        assert!(sql.contains("INSERT INTO webhook.deliveries ("), "{sql}");
        assert!(super::WRITE_ONE
            .sql
            .contains("INSERT INTO webhook._deliveries ("));
        assert!(super::WRITE_SQL.contains("INSERT INTO webhook._deliveries ("));
        assert!(super::WRITE_ONE_ROUTED
            .sql
            .contains("(type, schema_name, table_name, op, new, old, size, route, traceparent)"));
    }

    #[test]
    fn a_row_change_without_addresses_shares_no_event() {
        let key = |new: (u32, u16)| Key {
            relid: Oid::from(16384),
            op: "INSERT",
            new: Some(new),
            old: None,
            columns: None,
        };
        // A foreign table's rows: every one at offset 0.
        let waiting = [(&key((0, 0)), 1)];
        assert_eq!(same_event(waiting.iter().copied(), &key((0, 0)), 1), None);
        let waiting = [(&key((0, 7)), 1)];
        assert_eq!(
            same_event(waiting.iter().copied(), &key((0, 7)), 1),
            Some(0)
        );
    }

    #[test]
    fn a_subtransaction_writes_only_what_it_and_its_children_decided() {
        use super::own_from;
        // Top level 1 decided two rows, savepoint 2 one, its child 3 two.
        let made_in = [1, 1, 2, 3, 3];
        assert_eq!(own_from(made_in.iter().copied(), 1), 0, "at top level: all");
        assert_eq!(own_from(made_in.iter().copied(), 2), 2);
        assert_eq!(own_from(made_in.iter().copied(), 3), 3);
        assert_eq!(own_from(made_in.iter().copied(), 4), 5, "a newer one: none");
        assert_eq!(own_from(std::iter::empty(), 1), 0);
    }

    #[test]
    fn rows_wait_up_to_a_thousand_or_eight_megabytes() {
        assert!(!full(1, 0));
        assert!(!full(MOST_ROWS - 1, MOST_BYTES - 1));
        assert!(full(MOST_ROWS, 0));
        assert!(full(1, MOST_BYTES));
    }

    #[test]
    fn an_aborted_subtransaction_drops_its_rows_and_its_childrens_only() {
        // Top level is 1; savepoint a = 2 (released), b = 3 aborts, with child c = 4.
        assert!(survives(1, 3));
        assert!(survives(2, 3));
        assert!(!survives(3, 3));
        assert!(!survives(4, 3));
    }

    #[test]
    fn flush_triggers_fire_as_postgres_fires_triggers() {
        let c = |b: u8| b as std::ffi::c_char;
        assert!(fires(c(b'O'), false) && fires(c(b'A'), false));
        assert!(!fires(c(b'R'), false) && !fires(c(b'D'), false));
        assert!(fires(c(b'R'), true) && fires(c(b'A'), true));
        assert!(!fires(c(b'O'), true) && !fires(c(b'D'), true));
    }
}
