//! Routing: worker 0 of a database makes the deliveries of the events the trigger wrote with a
//! route (`webhook._route()`), inside its claim's transaction, and raises the watermark below
//! which every event is routed (`webhook._router.routed_below`; `webhook.deliveries` shows the
//! deliveries at or above it that are not stored yet as pending).
//!
//! When the watermark may rise, PgQ's way: at a pass the router notes the last event id handed
//! out (`M`, read first) and then a snapshot's `xmax` (`X`, a later statement). Every event with
//! an id up to `M` was written by a transaction whose xid was assigned before its id was drawn (a
//! trigger's event follows the row change that took the xid), so before the snapshot: its xid is
//! below `X`. At a later pass whose snapshot has `xmin >= X`, all those transactions have ended,
//! and that pass's `webhook._route()` (a later snapshot still) saw every one of them that
//! committed: the watermark becomes `M + 1`. Only one pair is noted at a time, so a long
//! writing transaction delays the watermark (each pass then looks at more events) but nothing
//! else; read-only transactions (reports, pg_dump) have no xid and do not delay it.

use super::error::WorkerError;
use super::queries as sql;

/// The note of the last pass that may raise the watermark: (last event id, snapshot xmax).
#[derive(Default)]
pub struct Router {
    noted: Option<(i64, i64)>,
}

impl Router {
    /// One routing pass, inside the caller's transaction: the deliveries made, and what to note
    /// if the transaction commits (pass it to `committed`).
    pub fn pass(&self) -> Result<(i64, Pass), WorkerError> {
        let xmin = sql::SNAPSHOT_XMIN.one::<i64>(&[])?.unwrap_or(0);
        let matured = self.noted.filter(|&(_, xmax)| xmin >= xmax);
        let made = sql::ROUTE.one::<i64>(&[])?.unwrap_or(0);
        if let Some((last, _)) = matured {
            sql::RAISE_WATERMARK.run(&[(last + 1).into()])?;
        }
        let note = if matured.is_some() || self.noted.is_none() {
            let last = sql::LAST_EVENT_ID.one::<i64>(&[])?.unwrap_or(0);
            let xmax = sql::SNAPSHOT_XMAX.one::<i64>(&[])?.unwrap_or(0);
            Some((last, xmax))
        } else {
            self.noted
        };
        Ok((made, Pass { note }))
    }

    /// The pass's transaction committed.
    pub fn committed(&mut self, pass: Pass) {
        self.noted = pass.note;
    }
}

/// What a pass noted, kept once its transaction commits.
pub struct Pass {
    note: Option<(i64, i64)>,
}
