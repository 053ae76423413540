//! Statements the delivery worker runs again and again, each planned once and kept for the life of
//! the process (Postgres re-plans a kept plan by itself when the tables it uses change).

use std::cell::RefCell;
use std::collections::HashMap;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, PgOid};
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiTupleTable};

thread_local! {
    static KEPT: RefCell<HashMap<usize, OwnedPreparedStatement>> = RefCell::new(HashMap::new());
}

/// Runs `sql` (a `'static` statement whose parameters have `types`) from its kept plan and hands
/// the result to `read`.
pub fn run<R>(
    sql: &'static str,
    types: &[pg_sys::Oid],
    args: &[DatumWithOid],
    read: impl FnOnce(SpiTupleTable) -> Result<R, pgrx::spi::Error>,
) -> Result<R, String> {
    let key = sql.as_ptr() as usize;
    Spi::connect_mut(|client| {
        let missing = KEPT.with(|k| !k.borrow().contains_key(&key));
        if missing {
            let types: Vec<PgOid> = types.iter().map(|t| PgOid::from(*t)).collect();
            let plan = client.prepare_mut(sql, &types)?.keep();
            KEPT.with(|k| k.borrow_mut().insert(key, plan));
        }
        let table = KEPT.with(|k| {
            let kept = k.borrow();
            let plan = kept.get(&key).expect("prepared above");
            client.update(plan, None, args)
        })?;
        read(table)
    })
    .map_err(|e| e.to_string())
}

/// Forgets every kept plan (after an error, or when the extension was dropped).
pub fn forget_all() {
    KEPT.with(|k| k.borrow_mut().clear());
}
