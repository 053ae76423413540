//! Housekeeping, every minute or as often as a short retention needs: leases that expired
//! without a result become due again, old history is purged, and the queue's statistics are
//! refreshed after a burst.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use pgrx::prelude::*;

use super::error::{transaction, WorkerError};
use super::queries as sql;
use super::session::Session;

/// Retention: deliveries deleted per transaction, and transactions per housekeeping round.
const PURGE_BATCH: i32 = 5000;
const PURGE_BATCHES_PER_ROUND: usize = 20;

impl Session {
    /// Leases that expired without a result become due again; old history is purged.
    pub(super) fn housekeeping(&mut self) {
        if self.replicated_by.is_some() {
            return;
        }
        let ids = self.in_flight.ids();
        let split = self.split;
        let recovered = transaction(|| {
            Ok(sql::RECOVER.run(&[
                ids.into(),
                false.into(),
                split.parts.into(),
                split.part.into(),
            ])?)
        });
        match recovered {
            // Recovered leases are new deliveries again when their first attempt had not been
            // recorded: read every endpoint from the start.
            Ok(n) if n > 0 => self.floors.drop_all(std::time::Instant::now()),
            Ok(_) => {}
            Err(e) => {
                if e.worth_saying() {
                    warning!("webhook_ext worker: recovering expired leases failed: {e}");
                }
            }
        }
        // Retention is the database's, not an endpoint's: one worker keeps it.
        if self.settings.retention.is_zero() || !split.is_first() {
            return;
        }
        let cutoff = SystemTime::now() - self.settings.retention;
        let cutoff = cutoff
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        if let Some(e) =
            transaction(|| Ok(sql::PURGE_ORPHANS.run(&[cutoff.into(), PURGE_BATCH.into()])?))
                .err()
                .filter(WorkerError::worth_saying)
        {
            warning!("webhook_ext worker: purging old events failed: {e}");
        }
        for _ in 0..PURGE_BATCHES_PER_ROUND {
            let step = transaction(|| {
                Ok(sql::PURGE_STEP.one::<i64>(&[cutoff.into(), PURGE_BATCH.into()])?)
            });
            match step {
                Ok(Some(n)) if n >= PURGE_BATCH as i64 => continue,
                Ok(_) => break,
                Err(e) => {
                    if e.worth_saying() {
                        warning!("webhook_ext worker: purging old history failed: {e}");
                    }
                    break;
                }
            }
        }
    }

    /// ANALYZE of the queue tables, when a burst has outgrown what the planner believes they
    /// hold (see `StatsWatch`); their kept plans are re-planned on next use. Skipped while
    /// another ANALYZE or VACUUM has the table.
    pub(super) fn refresh_statistics(&mut self) {
        let started = Instant::now();
        let done = transaction(|| {
            sql::ANALYZE.run(&[])?;
            Ok(sql::PLANNER_ROWS.one::<f64>(&[])?)
        });
        match done {
            Ok(rows) => {
                let rows = rows.unwrap_or(0.0);
                self.stats.refreshed(rows);
                debug1!(
                    "webhook_ext worker: refreshed the queue's statistics ({rows:.0} deliveries) in {} ms",
                    started.elapsed().as_millis()
                );
            }
            Err(e) => {
                self.stats.refreshed(0.0);
                if e.worth_saying() {
                    warning!("webhook_ext worker: refreshing the queue's statistics failed: {e}");
                }
            }
        }
    }
}
