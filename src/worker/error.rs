//! The worker's one error type, so the serving loop can tell what to do about a failure without
//! asking the catalog again.

use pgrx::PgSqlErrorCode;

use crate::pg::gate;
use crate::pg::process::{in_transaction, Caught};
use crate::pg::spi::SpiError;

#[derive(Debug)]
pub enum WorkerError {
    /// webhook's schema, a table, type or function of it is gone (DROP EXTENSION): the worker
    /// waits for the extension and serves again once it is back.
    ExtensionGone(String),
    /// A command changing or dropping the extension holds its gate (`pg::gate`): the transaction
    /// did nothing and is tried again shortly. Not worth a log line.
    Busy,
    /// A statement raised an ERROR; its transaction was rolled back.
    Sql(String),
    /// A statement ran but its result could not be used (SPI refused it, a column was not what
    /// the worker reads).
    BadRow(SpiError),
    /// The worker could not start what it needs (its HTTP runtime, its state).
    Start(String),
}

impl std::fmt::Display for WorkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerError::ExtensionGone(m) | WorkerError::Sql(m) | WorkerError::Start(m) => {
                f.write_str(m)
            }
            WorkerError::BadRow(e) => write!(f, "{e}"),
            WorkerError::Busy => {
                f.write_str("the extension is being changed or dropped by another transaction")
            }
        }
    }
}

impl From<SpiError> for WorkerError {
    fn from(e: SpiError) -> Self {
        WorkerError::BadRow(e)
    }
}

impl From<Caught> for WorkerError {
    fn from(e: Caught) -> Self {
        use PgSqlErrorCode::*;
        match e.code {
            // Names that resolved when the worker began serving no longer do.
            ERRCODE_UNDEFINED_TABLE
            | ERRCODE_INVALID_SCHEMA_NAME
            | ERRCODE_UNDEFINED_OBJECT
            | ERRCODE_UNDEFINED_FUNCTION
            | ERRCODE_UNDEFINED_COLUMN => WorkerError::ExtensionGone(e.message),
            _ => WorkerError::Sql(e.message),
        }
    }
}

impl WorkerError {
    /// Whether this failure is worth a log line (Busy is not: it passes by itself).
    pub fn worth_saying(&self) -> bool {
        !matches!(self, WorkerError::Busy)
    }

    /// Whether the failure is the extension's state (dropped, or being changed), not the
    /// statement's: work that met it waits, uncounted, for the next round.
    pub fn about_the_extension(&self) -> bool {
        matches!(self, WorkerError::ExtensionGone(_) | WorkerError::Busy)
    }
}

/// Runs `f` in its own transaction on webhook's tables: committed if it returns Ok, rolled back
/// if it returns Err or raises an ERROR (then classified, see `From<Caught>`). The extension's
/// gate is taken first; while a command holds it, `f` does not run and the result is Busy.
pub fn transaction<R>(f: impl FnOnce() -> Result<R, WorkerError>) -> Result<R, WorkerError> {
    catalog_transaction(|| {
        if !gate::enter() {
            return Err(WorkerError::Busy);
        }
        f()
    })
}

/// A transaction that reads only Postgres's catalogs (whether the extension is installed, the
/// worker's own lock): no gate.
pub fn catalog_transaction<R>(
    f: impl FnOnce() -> Result<R, WorkerError>,
) -> Result<R, WorkerError> {
    in_transaction(f).map_err(WorkerError::from).and_then(|r| r)
}
