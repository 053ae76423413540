//! Statements: SQL with the types of its parameters declared beside it, planned once per process
//! and kept (Postgres re-plans a kept plan by itself when the tables it uses change). The trigger
//! and the worker run every statement they repeat through this one type.
//!
//! A statement's parameter count is checked when the program is compiled (`Statement::new` is a
//! `const fn` that counts `$n` in the SQL), and each call's arguments against the declared types
//! before anything runs, so a misplaced argument is an error that names the statement, never a
//! value bound to the wrong parameter.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, CStr, CString};

use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::pg_sys;

/// One SQL statement and the types of its parameters `$1…$n`.
pub struct Statement {
    /// Names the statement in errors; unique.
    pub name: &'static str,
    pub sql: &'static str,
    pub params: &'static [pg_sys::Oid],
    /// Reads only: run read-only (no command counter increment), as Postgres runs a SELECT.
    read_only: bool,
    /// Always the generic plan (`CURSOR_OPT_GENERIC_PLAN`), never one planned for the call's
    /// values.
    generic: bool,
}

/// Why a statement did not run or its result could not be read. A Postgres ERROR raised while it
/// runs is not one of these: it propagates as an ERROR does (the caller's transaction handles it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpiError {
    /// The call's arguments do not match the statement's declared parameters.
    Arguments {
        statement: &'static str,
        detail: String,
    },
    /// SPI refused to prepare or run it (the code is SPI's).
    Refused {
        statement: &'static str,
        what: &'static str,
        code: i32,
    },
    /// A result column the reader asked for is missing or of another type.
    Column {
        statement: &'static str,
        column: usize,
        detail: String,
    },
}

impl std::fmt::Display for SpiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SpiError::Arguments { statement, detail } => {
                write!(f, "statement {statement}: {detail}")
            }
            SpiError::Refused {
                statement,
                what,
                code,
            } => {
                // SAFETY: SPI_result_code_string returns a static string for any code.
                let text = unsafe { CStr::from_ptr(pg_sys::SPI_result_code_string(*code)) };
                write!(
                    f,
                    "statement {statement}: could not {what} ({})",
                    text.to_string_lossy()
                )
            }
            SpiError::Column {
                statement,
                column,
                detail,
            } => write!(f, "statement {statement}, column {column}: {detail}"),
        }
    }
}

impl std::error::Error for SpiError {}

/// Which snapshot a statement reads with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Snapshot {
    /// The transaction's own, as any statement would.
    Transaction,
    /// The latest committed state, whatever the transaction's isolation level (for caches that
    /// must see what committed after a REPEATABLE READ transaction began).
    Latest,
}

thread_local! {
    /// Kept plans, by statement name.
    static KEPT: RefCell<HashMap<&'static str, pg_sys::SPIPlanPtr>> = RefCell::new(HashMap::new());
}

/// The highest `$n` in `sql` (0 if none): how many parameters Postgres will see. `$` inside a
/// quoted literal or identifier or a `--` comment is not a parameter. (Dollar-quoted strings are
/// not recognised: no statement here uses them.)
pub const fn highest_param(sql: &str) -> usize {
    let b = sql.as_bytes();
    let (mut i, mut max) = (0, 0);
    while i < b.len() {
        match b[i] {
            quote @ (b'\'' | b'"') => {
                // To the closing quote; a doubled quote stays inside.
                i += 1;
                while i < b.len() && b[i] != quote {
                    i += 1;
                }
                i += 1;
            }
            b'-' if i + 1 < b.len() && b[i + 1] == b'-' => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'$' => {
                let mut n = 0;
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    n = n * 10 + (b[i] - b'0') as usize;
                    i += 1;
                }
                if n > max {
                    max = n;
                }
            }
            _ => i += 1,
        }
    }
    max
}

impl Statement {
    /// A statement that writes (or may). Fails to compile when `params` does not declare exactly
    /// the parameters the SQL uses.
    pub const fn new(
        name: &'static str,
        sql: &'static str,
        params: &'static [pg_sys::Oid],
    ) -> Statement {
        assert!(
            highest_param(sql) == params.len(),
            "a statement's declared parameter types do not match the $n its SQL uses"
        );
        Statement {
            name,
            sql,
            params,
            read_only: false,
            generic: false,
        }
    }

    /// The same, planned once for any values: the plan cache otherwise plans a statement whose
    /// plan looks cheaper for the call's values again at every call (the worker's claim: 2-3 ms
    /// a call, about a tenth of a drain's time). For statements whose plan does not depend on
    /// the values (the worker's, planned with index scans and nested loops only).
    pub const fn generic_plan(mut self) -> Statement {
        self.generic = true;
        self
    }

    /// A statement that only reads.
    pub const fn reading(
        name: &'static str,
        sql: &'static str,
        params: &'static [pg_sys::Oid],
    ) -> Statement {
        let mut s = Statement::new(name, sql, params);
        s.read_only = true;
        s
    }

    /// Runs the statement; returns how many rows it processed.
    pub fn run(&'static self, args: &[DatumWithOid]) -> Result<u64, SpiError> {
        self.query(args, Snapshot::Transaction, |_| Ok(()))
    }

    /// Runs the statement and hands every result row to `each`; returns how many rows there were.
    pub fn query(
        &'static self,
        args: &[DatumWithOid],
        snapshot: Snapshot,
        mut each: impl FnMut(&Row) -> Result<(), SpiError>,
    ) -> Result<u64, SpiError> {
        let (mut values, nulls) = self.bind(args)?;
        let _connection = Connection::open(self)?;
        let plan = self.plan()?;
        // SAFETY: inside an SPI connection, with a kept plan and one value and null flag per
        // declared parameter; the result table is read before the connection closes.
        unsafe {
            let rc = match snapshot {
                Snapshot::Transaction => pg_sys::SPI_execute_plan(
                    plan,
                    values.as_mut_ptr(),
                    nulls.as_ptr(),
                    self.read_only,
                    0,
                ),
                Snapshot::Latest => pg_sys::SPI_execute_snapshot(
                    plan,
                    values.as_mut_ptr(),
                    nulls.as_ptr(),
                    pg_sys::GetLatestSnapshot(),
                    std::ptr::null_mut(),
                    self.read_only,
                    false,
                    0,
                ),
            };
            if rc < 0 {
                return Err(self.refused("run", rc));
            }
            let processed = pg_sys::SPI_processed;
            let table = pg_sys::SPI_tuptable;
            if !table.is_null() {
                for i in 0..processed as usize {
                    each(&Row {
                        tuple: *(*table).vals.add(i),
                        desc: (*table).tupdesc,
                        statement: self.name,
                    })?;
                }
            }
            Ok(processed)
        }
    }

    /// How often the kept plan was planned for a call's values and how often its generic plan
    /// ran (None before the first run): what `generic_plan` promises, for tests.
    #[cfg(feature = "pg_test")]
    pub fn plannings(&'static self) -> Option<(i64, i64)> {
        let plan = KEPT.with(|k| k.borrow().get(self.name).copied())?;
        // SAFETY: a kept plan, on the main thread; its sources live as long as it does.
        unsafe {
            let sources = pgrx::PgList::<pg_sys::CachedPlanSource>::from_pg(
                pg_sys::SPI_plan_get_plan_sources(plan),
            );
            let source = sources.get_ptr(0)?;
            Some(((*source).num_custom_plans, (*source).num_generic_plans))
        }
    }

    /// Every result row, each read by `read`.
    pub fn rows<T>(
        &'static self,
        args: &[DatumWithOid],
        mut read: impl FnMut(&Row) -> Result<T, SpiError>,
    ) -> Result<Vec<T>, SpiError> {
        let mut out = Vec::new();
        self.query(args, Snapshot::Transaction, |row| {
            out.push(read(row)?);
            Ok(())
        })?;
        Ok(out)
    }

    /// The first column of the first row (None for no row or NULL).
    pub fn one<T: FromDatum + IntoDatum>(
        &'static self,
        args: &[DatumWithOid],
    ) -> Result<Option<T>, SpiError> {
        let mut out = None;
        self.query(args, Snapshot::Transaction, |row| {
            if out.is_none() {
                out = row.get::<T>(1)?;
            }
            Ok(())
        })?;
        Ok(out)
    }

    /// The values and null flags of `args`, checked against the declared parameters.
    fn bind(&self, args: &[DatumWithOid]) -> Result<(Vec<pg_sys::Datum>, Vec<c_char>), SpiError> {
        if args.len() != self.params.len() {
            return Err(SpiError::Arguments {
                statement: self.name,
                detail: format!(
                    "{} arguments for {} parameters",
                    args.len(),
                    self.params.len()
                ),
            });
        }
        let mut values = Vec::with_capacity(args.len());
        let mut nulls = Vec::with_capacity(args.len());
        for (i, (arg, &want)) in args.iter().zip(self.params).enumerate() {
            if arg.oid() != want {
                return Err(SpiError::Arguments {
                    statement: self.name,
                    detail: format!(
                        "argument ${} has type oid {}, the parameter is declared as {}",
                        i + 1,
                        arg.oid().to_u32(),
                        want.to_u32()
                    ),
                });
            }
            match arg.datum() {
                Some(d) => {
                    values.push(d.sans_lifetime());
                    nulls.push(b' ' as c_char);
                }
                None => {
                    values.push(pg_sys::Datum::from(0));
                    nulls.push(b'n' as c_char);
                }
            }
        }
        Ok((values, nulls))
    }

    /// The kept plan, prepared on first use (as the current user: names resolve with its rights).
    fn plan(&'static self) -> Result<pg_sys::SPIPlanPtr, SpiError> {
        if let Some(plan) = KEPT.with(|k| k.borrow().get(self.name).copied()) {
            return Ok(plan);
        }
        let text = CString::new(self.sql).expect("no NUL in a statement");
        let mut types = self.params.to_vec();
        // SAFETY: inside an SPI connection; the text and types outlive the call.
        let plan = unsafe {
            let options = if self.generic {
                pg_sys::CURSOR_OPT_GENERIC_PLAN as i32
            } else {
                0
            };
            let plan = pg_sys::SPI_prepare_cursor(
                text.as_ptr(),
                types.len() as i32,
                types.as_mut_ptr(),
                options,
            );
            if plan.is_null() {
                return Err(self.refused("prepare", pg_sys::SPI_result));
            }
            let rc = pg_sys::SPI_keepplan(plan);
            if rc != 0 {
                return Err(self.refused("keep the plan", rc));
            }
            plan
        };
        KEPT.with(|k| k.borrow_mut().insert(self.name, plan));
        Ok(plan)
    }

    fn refused(&self, what: &'static str, code: i32) -> SpiError {
        SpiError::Refused {
            statement: self.name,
            what,
            code,
        }
    }
}

/// Forgets every kept plan (after an error, or when the extension was dropped).
pub fn forget_all() {
    let plans: Vec<_> = KEPT.with(|k| k.borrow_mut().drain().map(|(_, p)| p).collect());
    for plan in plans {
        // SAFETY: each was kept by SPI_keepplan and is no longer reachable from KEPT.
        unsafe { pg_sys::SPI_freeplan(plan) };
    }
}

/// One SPI connection, closed when dropped. After a Postgres ERROR (unwinding) it is left to
/// the transaction's abort, which closes every connection of the aborted (sub)transaction.
struct Connection;

impl Connection {
    fn open(statement: &Statement) -> Result<Connection, SpiError> {
        // SAFETY: SPI_connect has no preconditions beyond a transaction, which the callers have.
        let rc = unsafe { pg_sys::SPI_connect() };
        if rc != pg_sys::SPI_OK_CONNECT as i32 {
            return Err(statement.refused("connect to SPI", rc));
        }
        Ok(Connection)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            // SAFETY: closes the connection `open` made.
            unsafe { pg_sys::SPI_finish() };
        }
    }
}

/// One result row, valid while the statement's connection is open.
pub struct Row {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    statement: &'static str,
}

impl Row {
    /// Column `column` (1-based) as `T`, copied out of the result.
    pub fn get<T: FromDatum + IntoDatum>(&self, column: usize) -> Result<Option<T>, SpiError> {
        let fail = |detail: String| SpiError::Column {
            statement: self.statement,
            column,
            detail,
        };
        // SAFETY: the tuple and descriptor belong to the open connection's result table.
        unsafe {
            if column == 0 || column > (*self.desc).natts as usize {
                return Err(fail("no such column".into()));
            }
            let typ = pg_sys::SPI_gettypeid(self.desc, column as i32);
            let mut isnull = false;
            let d = pg_sys::SPI_getbinval(self.tuple, self.desc, column as i32, &mut isnull);
            T::try_from_datum(d, isnull, typ).map_err(|e| fail(e.to_string()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::highest_param;

    #[test]
    fn counts_parameters_as_postgres_does() {
        assert_eq!(highest_param("SELECT 1"), 0);
        assert_eq!(highest_param("SELECT $1::int[], $2"), 2);
        assert_eq!(highest_param("SELECT $10, $2, $1"), 10);
        assert_eq!(highest_param("SELECT $3 + $3"), 3);
        assert_eq!(highest_param("SELECT '$' || $1"), 1);
        assert_eq!(highest_param("SELECT '$2' || $1"), 1, "inside a literal");
        assert_eq!(
            highest_param("SELECT 'it''s $3' || $1"),
            1,
            "a doubled quote"
        );
        assert_eq!(highest_param("SELECT \"$4\" FROM t WHERE a = $2"), 2);
        assert_eq!(highest_param("SELECT $1 -- not $5\n + $2"), 2, "a comment");
    }
}
