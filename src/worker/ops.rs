//! Operational events (`webhook_core::ops`): the breaker's changes and endpoints disabled, as
//! `record` finds them, and backlogs past `webhook.ops_backlog_threshold`, looked at every
//! BACKLOG_CHECK_EVERY. Each goes out in a transaction of its own after what caused it was
//! written: `NOTIFY webhook_ops`, and a webhook to `webhook.ops_endpoint` (`webhook._ops_event`).
//! An event that cannot be written is said in the log and not tried again (operators hear of a
//! change at most once; the change itself is in the tables).

use std::time::Duration;

use pgrx::prelude::*;

use super::error::transaction;
use super::queries as sql;
use super::session::Session;
use crate::ops::OpsEvent;
use crate::pg::gucs;

/// How often the backlogs are counted (each endpoint's up to the threshold + 1).
pub(super) const BACKLOG_CHECK_EVERY: Duration = Duration::from_secs(10);

impl Session {
    /// Sends operational events, each in a transaction of its own (one that fails, a send()
    /// over webhook.max_payload_bytes say, takes no other with it).
    pub(super) fn ops_events(&mut self, events: Vec<(i32, OpsEvent)>) {
        for (endpoint_id, e) in events {
            let sent = transaction(|| {
                sql::OPS_EVENT.run(&[
                    endpoint_id.into(),
                    e.kind().into(),
                    e.payload(endpoint_id).into(),
                ])?;
                Ok(())
            });
            if let Err(err) = sent {
                warning!(
                    "webhook_ext worker: operational event {} of endpoint {endpoint_id} could not be sent: {err}",
                    e.kind()
                );
            }
        }
    }

    /// Counts the pending deliveries of this worker's endpoints; one that has passed the
    /// threshold is an event (`BacklogWatch`).
    pub(super) fn check_backlogs(&mut self) {
        let threshold = i64::from(gucs::OPS_BACKLOG_THRESHOLD.get().max(0));
        if threshold == 0 {
            self.backlogs.observe(&[], 0);
            return;
        }
        let split = self.split;
        let backlogs = &mut self.backlogs;
        // One transaction: the bounded counts, then, for the endpoints that crossed the
        // threshold, the exact count the payload says (the check counts up to threshold + 1).
        let events = transaction(|| {
            let counts = sql::BACKLOGS.rows(
                &[
                    (threshold + 1).into(),
                    split.parts.into(),
                    split.part.into(),
                ],
                |row| {
                    Ok((
                        row.get::<i32>(1)?.unwrap_or_default(),
                        row.get::<i64>(2)?.unwrap_or_default(),
                    ))
                },
            )?;
            let mut crossed = backlogs.observe(&counts, threshold);
            for (id, e) in &mut crossed {
                if let OpsEvent::Backlog { pending, .. } = e {
                    *pending = sql::BACKLOG_OF
                        .one::<i64>(&[(*id).into()])?
                        .unwrap_or(*pending);
                }
            }
            Ok(crossed)
        });
        match events {
            Ok(events) => self.ops_events(events),
            Err(e) => {
                if e.worth_saying() {
                    warning!("webhook_ext worker: counting the backlogs failed: {e}");
                }
            }
        }
    }
}
