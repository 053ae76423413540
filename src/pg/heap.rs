//! One row into a plain table without the executor. The trigger's write of a one-row
//! statement's event was an `INSERT … VALUES` through SPI whose executor start-up alone (its
//! result projection, the result relation, the indexes opened) took a tenth of a whole one-row
//! transaction; inserting the heap tuple and its index entries directly, as Postgres's own
//! catalog code does, leaves only the work itself.
//!
//! Only where nothing the executor would do is skipped: a heap table with no triggers, no row
//! security, no CHECK constraints and no generated columns; every column not given has no
//! default; every index is valid, ready, immediate, not an exclusion constraint, with plain
//! columns and no predicate. Anything else (an administrator's trigger or index on the table, a
//! future column) returns `false` having written nothing, and the caller goes through SPI.

use std::ffi::CStr;

use pgrx::pg_sys;

/// Inserts a row into the table `relid`, locked as an INSERT locks it: the columns `names` (in
/// any order) get the values `values()` returns for them, in the same order (None: NULL), and
/// the others NULL. False, with nothing written and `values` not called, where only the
/// executor may write the row (see the module).
///
/// # Safety
/// Inside a transaction, on the main thread; each value is a valid datum of its column's type.
pub unsafe fn insert(
    relid: pg_sys::Oid,
    names: &[&CStr],
    values: impl FnOnce() -> Vec<Option<pg_sys::Datum>>,
) -> bool {
    // SAFETY: the caller's transaction; the relation is closed below, its lock kept until the
    // transaction ends, as the executor keeps an INSERT's.
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as i32);
        let done = insert_into(rel, names, values);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        done
    }
}

/// # Safety
/// `rel` is open and locked; as for [`insert`].
unsafe fn insert_into(
    rel: pg_sys::Relation,
    names: &[&CStr],
    values: impl FnOnce() -> Vec<Option<pg_sys::Datum>>,
) -> bool {
    // SAFETY: reads of an open relation's relcache entry and catalog rows.
    unsafe {
        let class = &*(*rel).rd_rel;
        if class.relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char
            || class.relam != pg_sys::HEAP_TABLE_AM_OID
            || class.relrowsecurity
            || !(*rel).trigdesc.is_null()
        {
            return false;
        }
        let desc = (*rel).rd_att;
        let constr = (*desc).constr;
        if !constr.is_null() && ((*constr).num_check > 0 || (*constr).has_generated_stored) {
            return false;
        }
        let natts = (*desc).natts as usize;
        // Where each name's value goes (its attribute), and which attributes must not be NULL.
        let mut slot_of = vec![usize::MAX; names.len()];
        let mut not_null = Vec::new();
        for i in 0..natts {
            let att = &*crate::pg::tuple_attribute(desc, i);
            if att.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(att.attname.data.as_ptr());
            match names.iter().position(|n| *n == name) {
                Some(k) => slot_of[k] = i,
                // A column left out gets NULL, which is what it would get only without a
                // default or an identity.
                None if att.atthasdef
                    || att.attidentity != 0
                    || att.attgenerated != 0
                    || att.attnotnull =>
                {
                    return false
                }
                None => {}
            }
            if att.attnotnull {
                not_null.push(i);
            }
        }
        if slot_of.contains(&usize::MAX) {
            return false;
        }
        // The indexes, checked before anything is written.
        let list = pg_sys::RelationGetIndexList(rel);
        let n = if list.is_null() {
            0
        } else {
            (*list).length as usize
        };
        let mut indexes = Vec::with_capacity(n);
        let mut plain = true;
        for k in 0..n {
            let oid = (*(*list).elements.add(k)).oid_value;
            let index = pg_sys::index_open(oid, pg_sys::RowExclusiveLock as i32);
            indexes.push(index);
            let form = &*(*index).rd_index;
            let keys =
                std::slice::from_raw_parts(form.indkey.values.as_ptr(), form.indnatts as usize);
            if !form.indisvalid
                || !form.indisready
                || !form.indimmediate
                || form.indisexclusion
                || keys.iter().any(|&a| a <= 0)
                || !pg_sys::RelationGetIndexExpressions(index).is_null()
                || !pg_sys::RelationGetIndexPredicate(index).is_null()
            {
                plain = false;
            }
        }
        let mut values_of = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        if plain {
            let given = values();
            debug_assert_eq!(given.len(), names.len());
            for (k, v) in given.into_iter().enumerate() {
                if let Some(v) = v {
                    values_of[slot_of[k]] = v;
                    nulls[slot_of[k]] = false;
                }
            }
            // NOT NULL is the executor's error to raise, with its message.
            plain = not_null.iter().all(|&i| !nulls[i]);
        }
        let mut values = values_of;
        if plain {
            let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::heap_insert(
                rel,
                tuple,
                pg_sys::GetCurrentCommandId(true),
                0,
                std::ptr::null_mut(),
            );
            for &index in &indexes {
                let form = &*(*index).rd_index;
                let keys =
                    std::slice::from_raw_parts(form.indkey.values.as_ptr(), form.indnatts as usize);
                let mut key_values: Vec<pg_sys::Datum> =
                    keys.iter().map(|&a| values[a as usize - 1]).collect();
                let mut key_nulls: Vec<bool> =
                    keys.iter().map(|&a| nulls[a as usize - 1]).collect();
                let info = pg_sys::BuildIndexInfo(index);
                let check = if form.indisunique {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
                } else {
                    pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
                };
                pg_sys::index_insert(
                    index,
                    key_values.as_mut_ptr(),
                    key_nulls.as_mut_ptr(),
                    &mut (*tuple).t_self,
                    rel,
                    check,
                    false,
                    info,
                );
                #[cfg(any(feature = "pg17", feature = "pg18"))]
                pg_sys::index_insert_cleanup(index, info);
            }
            pg_sys::heap_freetuple(tuple);
        }
        for index in indexes {
            pg_sys::index_close(index, pg_sys::NoLock as i32);
        }
        if !list.is_null() {
            pg_sys::list_free(list);
        }
        plain
    }
}
