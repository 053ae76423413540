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
    raised: Option<Raised>,
    /// What `webhook._router` holds as far as this router knows: what it last wrote there, and
    /// when (None: read, not written).
    written: Option<(Raised, Option<Instant>)>,
}

/// The watermark this router last raised (or read, before its first raise), and the events'
/// sequence it is about. The table's follows it at most once a second, so a pass passes it to
/// `webhook._route(from_id)`, which starts at the higher of it and the table's (a restore may
/// bring a higher row; starting below that would make purged deliveries again). It is read
/// again when the sequence changed or went back below it (a restore of older data).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct Raised {
    below: i64,
    sequence: i64,
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
        // table only when it has raised none yet for this sequence (once a session).
        // What the table holds, as far as this router knows: what it wrote last, or what it
        // read (a raise of that is due at once).
        let kept = self
            .raised
            .filter(|r| r.sequence == sequence && last.is_none_or(|l| l >= r.below - 1));
        let (from, written) = match kept {
            Some(r) => (r, self.written.filter(|(w, _)| w.sequence == sequence)),
            None => {
                let read = Raised {
                    below: sql::ROUTED_BELOW.one::<i64>(&[])?.unwrap_or(0),
                    sequence,
                };
                (read, Some((read, None)))
            }
        };
        let made = sql::ROUTE.one::<i64>(&[from.below.into()])?.unwrap_or(0);
        // What this pass made is at or above that watermark.
        let made_above = from.below.saturating_mul(DELIVERY_IDS_PER_EVENT) - 1;
        let raised = match matured {
            Some(n) => Raised {
                below: (n.last + 1).max(from.below),
                sequence,
            },
            None => from,
        };
        // The table's watermark follows at most once a second (readers other than this router —
        // the view, purge(), the SQL API's _route() — then start lower: more probes, never a
        // wrong answer).
        let mut written = written;
        if due_in(raised, written) == Some(Duration::ZERO) {
            sql::RAISE_WATERMARK.run(&[raised.below.into()])?;
            written = Some((raised, Some(Instant::now())));
        }
        Ok((
            made,
            Pass {
                note,
                raised: Some(raised),
                written,
                made_above,
            },
        ))
    }

    /// How long until the table's watermark is due to be raised to the one held in memory;
    /// None if it is not behind.
    pub fn write_due_in(&self) -> Option<Duration> {
        let raised = self.raised?;
        due_in(
            raised,
            self.written.filter(|(w, _)| w.sequence == raised.sequence),
        )
    }

    /// The pass's transaction committed.
    pub fn committed(&mut self, pass: Pass) {
        self.noted = pass.note;
        self.raised = pass.raised;
        self.written = pass.written;
    }
}

/// How long until the table's watermark, `written` (when, if by this router), is due to be raised
/// to `raised`: not within `LAGGING_WRITES_EVERY` of the last write. None if it is not behind.
fn due_in(raised: Raised, written: Option<(Raised, Option<Instant>)>) -> Option<Duration> {
    match written {
        None => Some(Duration::ZERO),
        Some((w, at)) => (raised.below > w.below).then(|| {
            at.map_or(Duration::ZERO, |at| {
                LAGGING_WRITES_EVERY.saturating_sub(at.elapsed())
            })
        }),
    }
}

/// Computed delivery ids: `event id × 2^20 + endpoint id`.
const DELIVERY_IDS_PER_EVENT: i64 = 1 << 20;

/// What a pass noted, kept once its transaction commits.
pub struct Pass {
    note: Option<Note>,
    raised: Option<Raised>,
    written: Option<(Raised, Option<Instant>)>,
    /// Every delivery the pass made has an id above this (its events were at or above the
    /// watermark it routed from): the workers' floors come down to it
    /// (`floors::Floors::lower_to`).
    pub made_above: i64,
}

/// How long a routing pass waits for a row lock (another transaction routing the same events,
/// e.g. an administrator's `retry()` left open) before it gives up until the next pass.
pub const ROUTE_LOCK_TIMEOUT: &std::ffi::CStr = c"1s";
