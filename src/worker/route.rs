//! Routing: worker 0 of a database makes the deliveries of the events the trigger wrote with a
//! route (`webhook._route()`), in a transaction of its own before each claim (so a saturated
//! worker still routes for the others, and a routing pass that waits too long on another
//! transaction is given up without holding up the claim), and raises the watermark below
//! which every event is routed (`webhook._router.routed_below`; `webhook.deliveries` shows the
//! deliveries at or above it that are not stored yet as pending).
//!
//! When the watermark may rise, PgQ's way: at a pass the router notes the last event id handed
//! out (`M`, read first) and then its own transaction's xid (`X`, assigned by a later statement,
//! before the pass writes anything: an xid the transaction already had would be too old).
//! Every event with an id up to `M` was written by a transaction whose xid was assigned before
//! its id was drawn (a trigger's event follows the row change that took the xid), so before `X`:
//! its xid is below `X`. At a later pass whose snapshot has `xmin >= X`, all those transactions
//! have ended (`X` itself has: the noting pass committed, so its snapshot's xmax is above every
//! one of them and a running one would be in its xip), and that pass's `webhook._route()` (a
//! later snapshot still) saw every one that committed: the watermark becomes `M + 1`. (A
//! snapshot's xmax would not do for `X`: it is the last finished xid + 1, and a transaction
//! running with a newer xid holds back neither it nor a later xmin. An attacker review found
//! that; `workers::changing_webhook_workers_under_load…` lost 4 deliveries to it.) Only one pair is noted at a time, so a long
//! writing transaction delays the watermark (each pass then looks at more events) but nothing
//! else; read-only transactions (reports, pg_dump) have no xid and do not delay it.

use std::time::{Duration, Instant};

use super::error::WorkerError;
use super::queries as sql;
use super::session::LAGGING_WRITES_EVERY;

/// The note of the last pass that may raise the watermark, and the watermark it routes from.
#[derive(Default)]
pub struct Router {
    noted: Option<Note>,
    mark: Option<Mark>,
}

/// The watermark this router last raised (or read, before its first raise) for the events'
/// `sequence`, and what `webhook._router` holds as far as it knows. The table's follows at most
/// once a second, so a pass passes `below` to `webhook._route(from_id)`, which starts at the
/// higher of it and the table's (a restore may bring a higher row; starting below that would
/// make purged deliveries again). It is read again when the sequence changed or went back below
/// it (a restore of older data).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Mark {
    below: i64,
    sequence: i64,
    /// The table's value as this router last wrote or read it.
    in_table: i64,
    /// When this router last wrote it (None: read, not written).
    written_at: Option<Instant>,
}

impl Mark {
    /// How long until the table is due to be raised to `below`: not within
    /// `LAGGING_WRITES_EVERY` of the last write. None if it is not behind.
    fn write_due_in(&self) -> Option<Duration> {
        (self.below > self.in_table).then(|| {
            self.written_at.map_or(Duration::ZERO, |at| {
                LAGGING_WRITES_EVERY.saturating_sub(at.elapsed())
            })
        })
    }
}

/// What a pass noted: the last event id handed out, the noting pass's xid, and the sequence the
/// id came from. A note about another sequence (DROP and CREATE EXTENSION while the session
/// serves: a new `_router` and a new sequence starting at 1) or about ids the sequence has not
/// reached (reset by hand) says nothing about the events now, and is dropped.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Note {
    last: i64,
    xid: i64,
    sequence: i64,
}

impl Router {
    /// One routing pass, inside the caller's transaction: the deliveries made, and what to note
    /// if the transaction commits (pass it to `committed`).
    pub fn pass(&self) -> Result<(i64, Pass), WorkerError> {
        // The last id is read here, before the xid of a new note is assigned (below).
        let (xmin, sequence, last) = sql::SNAPSHOT_XMIN
            .rows(&[], |row| {
                Ok((
                    row.get::<i64>(1)?.unwrap_or(0),
                    row.get::<i64>(2)?.unwrap_or(0),
                    row.get::<i64>(3)?,
                ))
            })?
            .pop()
            .unwrap_or((0, 0, None));
        let noted = self
            .noted
            .filter(|n| n.sequence == sequence && last.is_some_and(|l| l >= n.last));
        let matured = noted.filter(|n| xmin >= n.xid);
        // The note is taken before anything is written: the xid must be assigned after the last
        // id is read (a routing INSERT would assign it earlier, and a writer whose xid came after
        // it could hold an id below the last one read; the held-snapshot benchmark lost 12 of
        // 60,001 events that way).
        let note = if matured.is_some() || noted.is_none() {
            match last {
                Some(last) => sql::OWN_XID.one::<i64>(&[])?.map(|xid| Note {
                    last,
                    xid,
                    sequence,
                }),
                None => None,
            }
        } else {
            noted
        };
        // The watermark this pass routes from: the one this router raised last, read from the
        // table when it has none for this sequence (once a session) or the sequence went back.
        let from = match self
            .mark
            .filter(|m| m.sequence == sequence && last.is_none_or(|l| l >= m.below - 1))
        {
            Some(m) => m,
            None => {
                let read = sql::ROUTED_BELOW.one::<i64>(&[])?.unwrap_or(0);
                Mark {
                    below: read,
                    sequence,
                    in_table: read,
                    written_at: None,
                }
            }
        };
        let made = sql::ROUTE.one::<i64>(&[from.below.into()])?.unwrap_or(0);
        // What this pass made is at or above that watermark.
        let made_above = from.below.saturating_mul(DELIVERY_IDS_PER_EVENT) - 1;
        let mut mark = from;
        if let Some(n) = matured {
            mark.below = mark.below.max(n.last + 1);
        }
        // The table's watermark follows at most once a second (readers other than this router —
        // the view, purge(), the SQL API's _route() — then start lower: more probes, never a
        // wrong answer).
        if mark.write_due_in() == Some(Duration::ZERO) {
            sql::RAISE_WATERMARK.run(&[mark.below.into()])?;
            mark.in_table = mark.below;
            mark.written_at = Some(Instant::now());
        }
        Ok((
            made,
            Pass {
                note,
                mark,
                made_above,
            },
        ))
    }

    /// How long until the table's watermark is due to be raised to the one held in memory;
    /// None if it is not behind.
    pub fn write_due_in(&self) -> Option<Duration> {
        self.mark.and_then(|m| m.write_due_in())
    }

    /// The pass's transaction committed.
    pub fn committed(&mut self, pass: Pass) {
        self.noted = pass.note;
        self.mark = Some(pass.mark);
    }
}

/// Computed delivery ids: `event id × 2^20 + endpoint id`.
const DELIVERY_IDS_PER_EVENT: i64 = 1 << 20;

/// What a pass noted, kept once its transaction commits.
pub struct Pass {
    note: Option<Note>,
    mark: Mark,
    /// Every delivery the pass made has an id above this (its events were at or above the
    /// watermark it routed from): the workers' floors come down to it
    /// (`floors::Floors::lower_to`).
    pub made_above: i64,
}

/// How long a routing pass waits for a row lock (another transaction routing the same events,
/// e.g. an administrator's `retry()` left open) before it gives up until the next pass.
pub const ROUTE_LOCK_TIMEOUT: &std::ffi::CStr = c"1s";
