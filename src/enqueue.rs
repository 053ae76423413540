//! The trigger function `webhook.enqueue(endpoint, [column, …])`: turns a row change into an event
//! and a delivery inside the user's transaction, and asks for the worker to be woken at commit.
//!
//! It never fails the user's statement because of the endpoint: an unknown endpoint or an oversized
//! payload is recorded as a `failed` delivery with the reason, a disabled endpoint as `cancelled`.
//! One statement per row, from a plan prepared once per row type and kept for the session.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::{gucs, shmem};

/// Parameters: $1 type, $2 schema, $3 table, $4 op, $5 new row, $6 old row, $7 endpoint name,
/// $8 columns (NULL = all), $9 max payload bytes. Every name is schema-qualified and every
/// operator spelled out, so the caller's search_path cannot redirect anything.
const ENQUEUE_SQL: &str = r#"
WITH ep AS (
    SELECT e.id, e.enabled, e.event_types
      FROM webhook.endpoints e
     WHERE e.name OPERATOR(pg_catalog.=) $7
), body AS (
    SELECT CASE WHEN $8 IS NULL THEN pg_catalog.to_jsonb($5) ELSE webhook._pick(pg_catalog.to_jsonb($5), $8) END AS new_j,
           CASE WHEN $8 IS NULL THEN pg_catalog.to_jsonb($6) ELSE webhook._pick(pg_catalog.to_jsonb($6), $8) END AS old_j
), ev AS (
    INSERT INTO webhook.events (type, payload)
    SELECT $1, pg_catalog.jsonb_build_object('schema', $2, 'table', $3, 'op', $4,
                                             'new', b.new_j, 'old', b.old_j, 'txid', pg_catalog.txid_current())
      FROM body b LEFT JOIN ep ON true
     WHERE webhook._type_matches($1, ep.event_types)
       AND ($8 IS NULL OR $4 OPERATOR(pg_catalog.<>) 'UPDATE' OR b.new_j IS DISTINCT FROM b.old_j)
    RETURNING id, pg_catalog.pg_column_size(payload) AS size
)
INSERT INTO webhook.deliveries (event_id, endpoint_id, status, next_attempt_at, last_error)
SELECT ev.id, ep.id, s.status,
       CASE WHEN s.status OPERATOR(pg_catalog.=) 'pending' THEN pg_catalog.now() END,
       CASE WHEN ep.id IS NULL THEN pg_catalog.format('endpoint %s does not exist', pg_catalog.quote_literal($7))
            WHEN ev.size OPERATOR(pg_catalog.>) $9
                THEN pg_catalog.format('payload is %s bytes, more than webhook.max_payload_bytes (%s)', ev.size, $9)
            WHEN NOT ep.enabled THEN 'endpoint disabled'
       END
  FROM ev LEFT JOIN ep ON true
 CROSS JOIN LATERAL (
       SELECT CASE WHEN ep.id IS NULL OR ev.size OPERATOR(pg_catalog.>) $9 THEN 'failed'
                   WHEN NOT ep.enabled THEN 'cancelled'
                   ELSE 'pending' END::webhook.delivery_status AS status) s
"#;

thread_local! {
    /// Kept plans, one per row type. Postgres re-plans them itself when the tables change.
    static PLANS: RefCell<HashMap<pg_sys::Oid, pg_sys::SPIPlanPtr>> = RefCell::new(HashMap::new());
    /// Partition -> the root table its events are published under.
    static PARTITION_ROOTS: RefCell<HashMap<pg_sys::Oid, pg_sys::Oid>> = RefCell::new(HashMap::new());
}

#[pg_trigger]
fn enqueue<'a>(
    trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    if !trigger.event().fired_after() || !trigger.event().fired_for_row() {
        error!("webhook.enqueue must be used in an AFTER ... FOR EACH ROW trigger");
    }
    let args = trigger.extra_args()?;
    let endpoint = args.first().cloned().unwrap_or_default();
    let columns: Option<Vec<String>> = (args.len() > 1).then(|| args[1..].to_vec());
    let data = trigger.trigger_data();
    let event = data.tg_event;
    let op = if pgrx::trigger_support::trigger_fired_by_insert(event) {
        "INSERT"
    } else if pgrx::trigger_support::trigger_fired_by_update(event) {
        "UPDATE"
    } else if pgrx::trigger_support::trigger_fired_by_delete(event) {
        "DELETE"
    } else {
        error!("webhook.enqueue handles INSERT, UPDATE and DELETE only");
    };

    // SAFETY: the trigger manager hands us a valid relation and tuples for the duration of the call.
    unsafe {
        let rel = data.tg_relation;
        let tupdesc = (*rel).rd_att;
        let reltype = (*(*rel).rd_rel).reltype;
        let (schema, table) = published_name(rel);
        let as_datum = |t: pg_sys::HeapTuple| {
            (!t.is_null()).then(|| pg_sys::heap_copy_tuple_as_datum(t, tupdesc))
        };
        let (new_row, old_row) = match op {
            "INSERT" => (as_datum(data.tg_trigtuple), None),
            "UPDATE" => (as_datum(data.tg_newtuple), as_datum(data.tg_trigtuple)),
            _ => (None, as_datum(data.tg_trigtuple)),
        };
        let event_type = format!("{schema}.{table}.{}", op.to_ascii_lowercase());
        let mut values = [
            text_datum(&event_type),
            text_datum(&schema),
            text_datum(&table),
            text_datum(op),
            new_row.unwrap_or(pg_sys::Datum::from(0)),
            old_row.unwrap_or(pg_sys::Datum::from(0)),
            text_datum(&endpoint),
            columns
                .clone()
                .into_datum()
                .unwrap_or(pg_sys::Datum::from(0)),
            pg_sys::Datum::from(gucs::MAX_PAYLOAD_BYTES.get()),
        ];
        let nulls: [std::ffi::c_char; 9] = [
            b' ' as _,
            b' ' as _,
            b' ' as _,
            b' ' as _,
            if new_row.is_some() { b' ' } else { b'n' } as _,
            if old_row.is_some() { b' ' } else { b'n' } as _,
            b' ' as _,
            if columns.is_some() { b' ' } else { b'n' } as _,
            b' ' as _,
        ];
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("webhook.enqueue: SPI_connect failed");
        }
        let plan = plan_for(reltype);
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            error!("webhook.enqueue: could not record the event (SPI code {rc})");
        }
        pg_sys::SPI_finish();
    }
    shmem::wake_at_commit();
    Ok(None)
}

/// The schema and table name events are published under: for a partition, its root table's.
unsafe fn published_name(rel: pg_sys::Relation) -> (String, String) {
    unsafe {
        let mut relid = (*rel).rd_id;
        if (*(*rel).rd_rel).relispartition {
            relid = PARTITION_ROOTS.with(|roots| {
                *roots.borrow_mut().entry(relid).or_insert_with(|| {
                    pgrx::direct_function_call::<pg_sys::Oid>(
                        pg_sys::pg_partition_root,
                        &[relid.into_datum()],
                    )
                    .unwrap_or(relid)
                })
            });
        }
        let nsp = pg_sys::get_namespace_name(pg_sys::get_rel_namespace(relid));
        let name = pg_sys::get_rel_name(relid);
        let s =
            |p: *mut std::ffi::c_char| std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned();
        (s(nsp), s(name))
    }
}

fn text_datum(s: &str) -> pg_sys::Datum {
    s.into_datum().expect("text is never NULL")
}

/// The kept plan for rows of type `reltype`, prepared on first use in this session.
unsafe fn plan_for(reltype: pg_sys::Oid) -> pg_sys::SPIPlanPtr {
    if let Some(plan) = PLANS.with(|p| p.borrow().get(&reltype).copied()) {
        return plan;
    }
    let sql = CString::new(ENQUEUE_SQL).expect("no NUL in SQL");
    let mut types = [
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        reltype,
        reltype,
        pg_sys::TEXTOID,
        pg_sys::TEXTARRAYOID,
        pg_sys::INT4OID,
    ];
    // SAFETY: inside SPI_connect; the types array outlives the call.
    unsafe {
        let plan = pg_sys::SPI_prepare(sql.as_ptr(), types.len() as i32, types.as_mut_ptr());
        if plan.is_null() {
            let reason =
                std::ffi::CStr::from_ptr(pg_sys::SPI_result_code_string(pg_sys::SPI_result));
            error!(
                "webhook.enqueue: could not prepare the enqueue statement: {}",
                reason.to_string_lossy()
            );
        }
        pg_sys::SPI_keepplan(plan);
        PLANS.with(|p| p.borrow_mut().insert(reltype, plan));
        plan
    }
}
