//! Rows into a plain table without the executor. The trigger's write of a one-row statement's
//! event was an `INSERT … VALUES` through SPI whose executor start-up alone (its result
//! projection, the result relation, the indexes opened) took a tenth of a whole one-row
//! transaction; inserting the heap tuple and its index entries directly, as Postgres's own
//! catalog code does, leaves only the work itself.
//!
//! Only where nothing the executor would do is skipped: a heap table (not a partition) with no
//! triggers, no rules, no row security, no CHECK constraints and no generated columns; every
//! column given of the type the caller's values are (so no domain, whose CHECK the executor
//! would test, and no other type, whose datum would be misread); every column not given without
//! a default and nullable; every index valid, ready, immediate, not an exclusion constraint,
//! with plain columns and no predicate. Anything else (an administrator's trigger or index on the
//! table, a future column) is refused by [`Inserter::open`] having written nothing, and the
//! caller goes through SPI. No executor hook (pg_stat_statements, an audit extension) sees these
//! rows: they are webhook_ext's own queue rows.

use std::ffi::CStr;

use pgrx::pg_sys;

/// An open table that rows may be inserted into directly (see the module).
pub struct Inserter {
    rel: pg_sys::Relation,
    indexes: Vec<Index>,
    /// The attribute (0-based) each given column goes to, in the order of the names.
    slot_of: Vec<usize>,
    /// Attributes that must not be NULL.
    not_null: Vec<usize>,
    natts: usize,
}

struct Index {
    rel: pg_sys::Relation,
    info: *mut pg_sys::IndexInfo,
    /// The table's attributes (0-based) the index's columns are.
    columns: Vec<usize>,
    unique: bool,
}

impl Inserter {
    /// Opens the table `relid`, locked as an INSERT locks it, for rows of the columns `names`
    /// (each with the type of the values that will be given for it; the others get NULL);
    /// None, with nothing written and the table closed again (its lock kept to the
    /// transaction's end), where only the executor may write it.
    ///
    /// # Safety
    /// Inside a transaction, on the main thread.
    pub unsafe fn open(relid: pg_sys::Oid, names: &[(&CStr, pg_sys::Oid)]) -> Option<Inserter> {
        // SAFETY: the caller's transaction; reads of an open relation's relcache entry.
        unsafe {
            let rel = pg_sys::table_open(relid, pg_sys::RowExclusiveLock as i32);
            let mut inserter = Inserter {
                rel,
                indexes: Vec::new(),
                slot_of: Vec::new(),
                not_null: Vec::new(),
                natts: 0,
            };
            if inserter.check(names) {
                Some(inserter)
            } else {
                inserter.close();
                None
            }
        }
    }

    /// # Safety
    /// `self.rel` is open and locked.
    unsafe fn check(&mut self, names: &[(&CStr, pg_sys::Oid)]) -> bool {
        // SAFETY: as for `open`.
        unsafe {
            let rel = self.rel;
            let class = &*(*rel).rd_rel;
            if class.relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char
                || class.relam != pg_sys::HEAP_TABLE_AM_OID
                || class.relispartition
                || class.relhasrules
                || !(*rel).rd_rules.is_null()
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
            self.natts = (*desc).natts as usize;
            self.slot_of = vec![usize::MAX; names.len()];
            for i in 0..self.natts {
                let att = &*crate::pg::tuple_attribute(desc, i);
                if att.attisdropped {
                    continue;
                }
                let name = CStr::from_ptr(att.attname.data.as_ptr());
                match names.iter().position(|(n, _)| *n == name) {
                    Some(k) if names[k].1 == att.atttypid => self.slot_of[k] = i,
                    Some(_) => return false,
                    // A column left out gets NULL: what it would get only without a default or
                    // an identity, and allowed only if it may be NULL.
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
                    self.not_null.push(i);
                }
            }
            if self.slot_of.contains(&usize::MAX) {
                return false;
            }
            let list = pg_sys::RelationGetIndexList(rel);
            let n = if list.is_null() {
                0
            } else {
                (*list).length as usize
            };
            let mut plain = true;
            for k in 0..n {
                let oid = (*(*list).elements.add(k)).oid_value;
                let index = pg_sys::index_open(oid, pg_sys::RowExclusiveLock as i32);
                let form = &*(*index).rd_index;
                let keys =
                    std::slice::from_raw_parts(form.indkey.values.as_ptr(), form.indnatts as usize);
                plain &= form.indisvalid
                    && form.indisready
                    && form.indimmediate
                    && !form.indisexclusion
                    && keys.iter().all(|&a| a > 0)
                    && pg_sys::RelationGetIndexExpressions(index).is_null()
                    && pg_sys::RelationGetIndexPredicate(index).is_null();
                self.indexes.push(Index {
                    rel: index,
                    info: pg_sys::BuildIndexInfo(index),
                    columns: keys
                        .iter()
                        .map(|&a| (a as usize).saturating_sub(1))
                        .collect(),
                    unique: form.indisunique,
                });
            }
            if !list.is_null() {
                pg_sys::list_free(list);
            }
            plain
        }
    }

    /// Inserts one row: `values` in the order of the names given to `open` (None: NULL).
    ///
    /// # Safety
    /// Each value is a valid datum of its column's type.
    pub unsafe fn insert(&mut self, values: &[Option<pg_sys::Datum>]) {
        assert_eq!(values.len(), self.slot_of.len(), "one value a column");
        let mut datums = vec![pg_sys::Datum::from(0); self.natts];
        let mut nulls = vec![true; self.natts];
        for (k, v) in values.iter().enumerate() {
            if let Some(v) = v {
                datums[self.slot_of[k]] = *v;
                nulls[self.slot_of[k]] = false;
            }
        }
        if let Some(&i) = self.not_null.iter().find(|&&i| nulls[i]) {
            pgrx::error!(
                "webhook_ext: a row for the queue has no value for its column {}",
                i + 1
            );
        }
        // SAFETY: the table and its indexes are open and locked; datums of their types.
        unsafe {
            let desc = (*self.rel).rd_att;
            let tuple = pg_sys::heap_form_tuple(desc, datums.as_mut_ptr(), nulls.as_mut_ptr());
            pg_sys::heap_insert(
                self.rel,
                tuple,
                pg_sys::GetCurrentCommandId(true),
                0,
                std::ptr::null_mut(),
            );
            for index in &self.indexes {
                let mut key: Vec<pg_sys::Datum> =
                    index.columns.iter().map(|&a| datums[a]).collect();
                let mut key_nulls: Vec<bool> = index.columns.iter().map(|&a| nulls[a]).collect();
                pg_sys::index_insert(
                    index.rel,
                    key.as_mut_ptr(),
                    key_nulls.as_mut_ptr(),
                    &mut (*tuple).t_self,
                    self.rel,
                    if index.unique {
                        pg_sys::IndexUniqueCheck::UNIQUE_CHECK_YES
                    } else {
                        pg_sys::IndexUniqueCheck::UNIQUE_CHECK_NO
                    },
                    false,
                    index.info,
                );
            }
            pg_sys::heap_freetuple(tuple);
        }
    }

    /// Closes the indexes and the table; their locks stay to the transaction's end, as an
    /// INSERT's do. (Not a Drop: after an ERROR the transaction's abort releases them.)
    ///
    /// # Safety
    /// On the main thread, in the transaction that opened it.
    pub unsafe fn close(self) {
        // SAFETY: each was opened by `open` and is closed once.
        unsafe {
            for index in &self.indexes {
                #[cfg(any(feature = "pg17", feature = "pg18"))]
                pg_sys::index_insert_cleanup(index.rel, index.info);
                pg_sys::index_close(index.rel, pg_sys::NoLock as i32);
            }
            pg_sys::table_close(self.rel, pg_sys::NoLock as i32);
        }
    }
}
