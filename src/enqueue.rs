//! The trigger function `webhook.enqueue(endpoint, [column, …])`: turns a row change into an event
//! and a delivery inside the user's transaction, and asks for the worker to be woken at commit.
//!
//! It never fails the user's statement because of the endpoint: an unknown endpoint or an oversized
//! payload is recorded as a `failed` delivery with the reason, a disabled endpoint as `cancelled`.
//!
//! This is the hot path, so per row it runs one statement from a plan prepared once per row type
//! and kept for the session, and decides everything about the endpoint from a per-session cache
//! of `webhook.endpoints` (refreshed when any transaction that changed that table commits).

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;

use pgrx::pg_sys;
use pgrx::prelude::*;

use crate::{gucs, request, shmem};

/// Parameters: $1 type, $2 schema, $3 table, $4 op, $5 new row, $6 old row, $7 endpoint id
/// (NULL if unknown), $8 status, $9 reason, $10 max payload bytes, and for a column-filtered
/// subscription $11 the columns. Every name is schema-qualified and every operator spelled out,
/// so the caller's search_path cannot redirect anything (the function runs as its owner).
const ENQUEUE_SQL: &str = r#"
WITH ev AS (
    INSERT INTO webhook._events (type, schema_name, table_name, op, new, old)
    VALUES ($1, $2, $3, $4, pg_catalog.to_jsonb($5), pg_catalog.to_jsonb($6))
    RETURNING id, COALESCE(pg_catalog.pg_column_size(new), 0) OPERATOR(pg_catalog.+)
                  COALESCE(pg_catalog.pg_column_size(old), 0) AS size
)
"#;

/// The same for a subscription limited to some columns: only those are published, and an
/// UPDATE that changed none of them records nothing.
const ENQUEUE_COLUMNS_SQL: &str = r#"
WITH j AS (
    SELECT (SELECT pg_catalog.jsonb_object_agg(e.key, e.value) FROM pg_catalog.jsonb_each(pg_catalog.to_jsonb($5)) AS e
             WHERE e.key OPERATOR(pg_catalog.=) ANY ($11)) AS new_j,
           (SELECT pg_catalog.jsonb_object_agg(e.key, e.value) FROM pg_catalog.jsonb_each(pg_catalog.to_jsonb($6)) AS e
             WHERE e.key OPERATOR(pg_catalog.=) ANY ($11)) AS old_j
), ev AS (
    INSERT INTO webhook._events (type, schema_name, table_name, op, new, old)
    SELECT $1, $2, $3, $4, j.new_j, j.old_j
      FROM j
     WHERE $4 OPERATOR(pg_catalog.<>) 'UPDATE' OR pg_catalog.jsonb_ne(COALESCE(j.new_j, '{}'), COALESCE(j.old_j, '{}'))
    RETURNING id, COALESCE(pg_catalog.pg_column_size(new), 0) OPERATOR(pg_catalog.+)
                  COALESCE(pg_catalog.pg_column_size(old), 0) AS size
)
"#;

/// The delivery for the event just recorded (shared tail of both statements).
const DELIVERY_SQL: &str = r#"
INSERT INTO webhook.deliveries (event_id, endpoint_id, status, next_attempt_at, last_error)
SELECT ev.id, $7,
       CASE WHEN ev.size OPERATOR(pg_catalog.>) $10 THEN 'failed' ELSE $8 END::webhook.delivery_status,
       CASE WHEN ev.size OPERATOR(pg_catalog.<=) $10 AND $8 OPERATOR(pg_catalog.=) 'pending' THEN pg_catalog.now() END,
       CASE WHEN ev.size OPERATOR(pg_catalog.>) $10
            THEN pg_catalog.format('payload is %s bytes, more than webhook.max_payload_bytes (%s)', ev.size, $10)
            ELSE $9 END
  FROM ev
"#;

/// What the trigger needs to know about an endpoint.
struct Endpoint {
    id: i32,
    enabled: bool,
    event_types: Option<Vec<String>>,
}

struct Cache {
    version: u64,
    endpoints: HashMap<String, Endpoint>,
}

thread_local! {
    /// Kept plans, one per row type. Postgres re-plans them itself when the tables change.
    static PLANS: RefCell<HashMap<(pg_sys::Oid, bool), pg_sys::SPIPlanPtr>> = RefCell::new(HashMap::new());
    /// Partition -> the root table its events are published under.
    static PARTITION_ROOTS: RefCell<HashMap<pg_sys::Oid, pg_sys::Oid>> = RefCell::new(HashMap::new());
    /// This session's copy of webhook.endpoints (name -> what the trigger needs).
    static ENDPOINTS: RefCell<Option<Cache>> = const { RefCell::new(None) };
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
        error!("webhook.enqueue must be used in an AFTER ... FOR EACH ROW trigger");
    }
    let op = if pgrx::trigger_support::trigger_fired_by_insert(event) {
        "INSERT"
    } else if pgrx::trigger_support::trigger_fired_by_update(event) {
        "UPDATE"
    } else if pgrx::trigger_support::trigger_fired_by_delete(event) {
        "DELETE"
    } else {
        error!("webhook.enqueue handles INSERT, UPDATE and DELETE only");
    };
    let args = trigger.extra_args()?;
    let endpoint_name = args.first().map(String::as_str).unwrap_or_default();

    // SAFETY: the trigger manager hands us a valid relation and tuples for the duration of the call.
    let wake = unsafe {
        let rel = data.tg_relation;
        let (schema, table) = published_name(rel);
        let event_type = format!("{schema}.{table}.{}", op.to_ascii_lowercase());
        let found = lookup(endpoint_name, |ep| {
            request::type_matches(&event_type, ep.event_types.as_deref())
                .then_some((ep.id, ep.enabled))
        });
        let (endpoint_id, status, reason) = match found {
            None => (
                None,
                "failed",
                Some(format!(
                    "endpoint '{}' does not exist",
                    endpoint_name.replace('\'', "''")
                )),
            ),
            Some(None) => return Ok(None),
            Some(Some((id, false))) => {
                (Some(id), "cancelled", Some("endpoint disabled".to_string()))
            }
            Some(Some((id, true))) => (Some(id), "pending", None),
        };
        let tupdesc = (*rel).rd_att;
        let as_datum = |t: pg_sys::HeapTuple| {
            (!t.is_null()).then(|| pg_sys::heap_copy_tuple_as_datum(t, tupdesc))
        };
        let (new_row, old_row) = match op {
            "INSERT" => (as_datum(data.tg_trigtuple), None),
            "UPDATE" => (as_datum(data.tg_newtuple), as_datum(data.tg_trigtuple)),
            _ => (None, as_datum(data.tg_trigtuple)),
        };
        let columns: Option<Vec<String>> = (args.len() > 1).then(|| args[1..].to_vec());
        let with_columns = columns.is_some();
        let none = pg_sys::Datum::from(0);
        let mut values = [
            text_datum(&event_type),
            text_datum(&schema),
            text_datum(&table),
            text_datum(op),
            new_row.unwrap_or(none),
            old_row.unwrap_or(none),
            endpoint_id.map_or(none, pg_sys::Datum::from),
            text_datum(status),
            reason.as_deref().map_or(none, text_datum),
            pg_sys::Datum::from(gucs::MAX_PAYLOAD_BYTES.get()),
            columns.into_datum().unwrap_or(none),
        ];
        let flag = |present: bool| {
            if present {
                b' ' as std::ffi::c_char
            } else {
                b'n' as std::ffi::c_char
            }
        };
        let nulls = [
            flag(true),
            flag(true),
            flag(true),
            flag(true),
            flag(new_row.is_some()),
            flag(old_row.is_some()),
            flag(endpoint_id.is_some()),
            flag(true),
            flag(reason.is_some()),
            flag(true),
            flag(with_columns),
        ];
        if pg_sys::SPI_connect() != pg_sys::SPI_OK_CONNECT as i32 {
            error!("webhook.enqueue: SPI_connect failed");
        }
        let plan = plan_for((*(*rel).rd_rel).reltype, with_columns);
        let rc = pg_sys::SPI_execute_plan(plan, values.as_mut_ptr(), nulls.as_ptr(), false, 0);
        if rc != pg_sys::SPI_OK_INSERT as i32 {
            error!("webhook.enqueue: could not record the event (SPI code {rc})");
        }
        // A column-filtered UPDATE that changed none of the columns records nothing.
        let recorded = pg_sys::SPI_processed > 0;
        pg_sys::SPI_finish();
        recorded && status == "pending"
    };
    if wake {
        shmem::wake_at_commit();
    }
    Ok(None)
}

/// `read` applied to the endpoint named `name` (None if there is none), from this session's
/// cache of webhook.endpoints.
fn lookup<R>(name: &str, read: impl FnOnce(&Endpoint) -> R) -> Option<R> {
    let version = shmem::endpoints_version();
    ENDPOINTS.with(|cell| {
        let mut cache = cell.borrow_mut();
        if cache.as_ref().is_none_or(|c| c.version != version) {
            *cache = Some(Cache {
                version,
                endpoints: load_endpoints(),
            });
        }
        cache.as_ref().and_then(|c| c.endpoints.get(name).map(read))
    })
}

fn load_endpoints() -> HashMap<String, Endpoint> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT name, id, enabled, event_types FROM webhook.endpoints",
            None,
            &[],
        )?;
        let mut out = HashMap::new();
        for row in rows {
            let name: String = row.get(1)?.unwrap_or_default();
            let event_types: Option<Vec<Option<String>>> = row.get(4)?;
            out.insert(
                name,
                Endpoint {
                    id: row.get(2)?.unwrap_or_default(),
                    enabled: row.get(3)?.unwrap_or(false),
                    event_types: event_types.map(|v| v.into_iter().flatten().collect()),
                },
            );
        }
        Ok::<_, pgrx::spi::Error>(out)
    })
    .unwrap_or_else(|e| error!("webhook.enqueue: could not read webhook.endpoints: {e}"))
}

/// Statement trigger on webhook.endpoints: every session's endpoint cache is refreshed once
/// this transaction commits.
#[pg_trigger]
fn _endpoints_changed<'a>(
    _trigger: &'a PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
    shmem::endpoints_changed_at_commit();
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

/// The kept plan for rows of type `reltype` (with or without a column filter), prepared on
/// first use in this session.
unsafe fn plan_for(reltype: pg_sys::Oid, with_columns: bool) -> pg_sys::SPIPlanPtr {
    let key = (reltype, with_columns);
    if let Some(plan) = PLANS.with(|p| p.borrow().get(&key).copied()) {
        return plan;
    }
    let head = if with_columns {
        ENQUEUE_COLUMNS_SQL
    } else {
        ENQUEUE_SQL
    };
    let sql = CString::new(format!("{head}{DELIVERY_SQL}")).expect("no NUL in SQL");
    let mut types = vec![
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        reltype,
        reltype,
        pg_sys::INT4OID,
        pg_sys::TEXTOID,
        pg_sys::TEXTOID,
        pg_sys::INT4OID,
    ];
    if with_columns {
        types.push(pg_sys::TEXTARRAYOID);
    }
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
        PLANS.with(|p| p.borrow_mut().insert(key, plan));
        plan
    }
}
