//! Operational events: what an operator must hear about before the endpoint's owner does. The
//! worker turns changes it sees (a circuit opening or closing, an endpoint disabled, a backlog
//! crossing `webhook.ops_backlog_threshold`) into events, each sent as a `NOTIFY webhook_ops`
//! and, when `webhook.ops_endpoint` names an endpoint, as a signed webhook to it. Pure logic:
//! which changes are events, and their payloads.

use std::collections::HashSet;
use std::time::SystemTime;

use crate::policy::Health;

/// One operational event about one endpoint.
#[derive(Debug, Clone, PartialEq)]
pub enum OpsEvent {
    /// The circuit breaker opened: the endpoint gets one probe at a time.
    CircuitOpened {
        consecutive_failures: u32,
        failing_since: Option<SystemTime>,
        last_error: Option<String>,
    },
    /// A probe succeeded: the circuit closed and the backlog flows again.
    CircuitClosed,
    /// The worker disabled the endpoint (410 Gone, or failing for webhook.auto_disable_after).
    Disabled { reason: String },
    /// The endpoint's pending deliveries passed the threshold.
    Backlog { pending: i64, threshold: i64 },
}

impl OpsEvent {
    /// The event type: `webhook.endpoint.<what>`.
    pub fn kind(&self) -> &'static str {
        match self {
            OpsEvent::CircuitOpened { .. } => "webhook.endpoint.circuit_opened",
            OpsEvent::CircuitClosed => "webhook.endpoint.circuit_closed",
            OpsEvent::Disabled { .. } => "webhook.endpoint.disabled",
            OpsEvent::Backlog { .. } => "webhook.endpoint.backlog",
        }
    }

    /// The payload: the event type, the endpoint's id, and what the event says, as JSON (the
    /// SQL side adds the endpoint's name, the database and the time: `webhook._ops_event`).
    pub fn payload(&self, endpoint_id: i32) -> String {
        let mut v = serde_json::json!({
            "type": self.kind(),
            "endpoint_id": endpoint_id,
        });
        let m = v.as_object_mut().expect("an object");
        match self {
            OpsEvent::CircuitOpened {
                consecutive_failures,
                failing_since,
                last_error,
            } => {
                m.insert(
                    "consecutive_failures".into(),
                    (*consecutive_failures).into(),
                );
                m.insert("failing_since".into(), failing_since.map(rfc3339).into());
                // Bounded: a NOTIFY payload holds at most 8000 bytes.
                let error = last_error
                    .as_deref()
                    .map(|e| e.chars().take(500).collect::<String>());
                m.insert("last_error".into(), error.into());
            }
            OpsEvent::CircuitClosed => {}
            OpsEvent::Disabled { reason } => {
                m.insert("reason".into(), reason.clone().into());
            }
            OpsEvent::Backlog { pending, threshold } => {
                m.insert("pending".into(), (*pending).into());
                m.insert("threshold".into(), (*threshold).into());
            }
        }
        v.to_string()
    }
}

fn rfc3339(t: SystemTime) -> String {
    let us = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as i64;
    crate::request::rfc3339_utc(us)
}

/// The breaker's change between two states of an endpoint's health, if it opened or closed.
pub fn breaker_change(
    before: &Health,
    after: &Health,
    threshold: u32,
    last_error: Option<&str>,
) -> Option<OpsEvent> {
    match (before.is_open(threshold), after.is_open(threshold)) {
        (false, true) => Some(OpsEvent::CircuitOpened {
            consecutive_failures: after.consecutive_failures,
            failing_since: after.failing_since,
            last_error: last_error.map(str::to_string),
        }),
        (true, false) => Some(OpsEvent::CircuitClosed),
        _ => None,
    }
}

/// Which endpoints' backlogs are above the threshold: an event when one crosses it, none again
/// until it has come down to half of it (so a backlog hovering at the threshold is one event).
#[derive(Debug, Default)]
pub struct BacklogWatch {
    above: HashSet<i32>,
}

impl BacklogWatch {
    /// The events for the endpoints' pending counts now (`pending`: every endpoint with any);
    /// `threshold` 0 = off.
    pub fn observe(&mut self, pending: &[(i32, i64)], threshold: i64) -> Vec<(i32, OpsEvent)> {
        if threshold <= 0 {
            self.above.clear();
            return Vec::new();
        }
        let mut events = Vec::new();
        let mut still = HashSet::new();
        for &(endpoint_id, count) in pending {
            let was_above = self.above.contains(&endpoint_id);
            if count > threshold && !was_above {
                events.push((
                    endpoint_id,
                    OpsEvent::Backlog {
                        pending: count,
                        threshold,
                    },
                ));
                still.insert(endpoint_id);
            } else if was_above && count > threshold / 2 {
                still.insert(endpoint_id);
            }
        }
        self.above = still;
        events
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_breaker_opening_and_closing_are_events_and_nothing_else_is() {
        let closed = Health::default();
        let mut failing = Health {
            consecutive_failures: 2,
            ..Health::default()
        };
        assert_eq!(breaker_change(&closed, &failing, 3, None), None);
        let before = failing.clone();
        failing.consecutive_failures = 3;
        failing.failing_since = Some(SystemTime::UNIX_EPOCH + Duration::from_secs(86400));
        let opened = breaker_change(&before, &failing, 3, Some("HTTP 503")).unwrap();
        assert_eq!(opened.kind(), "webhook.endpoint.circuit_opened");
        let json: serde_json::Value = serde_json::from_str(&opened.payload(7)).unwrap();
        assert_eq!(json["type"], "webhook.endpoint.circuit_opened");
        assert_eq!(json["endpoint_id"], 7);
        assert_eq!(json["consecutive_failures"], 3);
        assert_eq!(json["failing_since"], "1970-01-02T00:00:00.000000Z");
        assert_eq!(json["last_error"], "HTTP 503");
        // Failing further while open: no new event; closing: one.
        let mut more = failing.clone();
        more.consecutive_failures = 9;
        assert_eq!(breaker_change(&failing, &more, 3, None), None);
        assert_eq!(
            breaker_change(&more, &closed, 3, None),
            Some(OpsEvent::CircuitClosed)
        );
        // Breaker off: never.
        assert_eq!(breaker_change(&closed, &more, 0, None), None);
    }

    #[test]
    fn a_backlog_is_one_event_per_crossing() {
        let mut w = BacklogWatch::default();
        assert!(w.observe(&[(1, 100)], 100).is_empty());
        let e = w.observe(&[(1, 101), (2, 5)], 100);
        assert_eq!(
            e,
            [(
                1,
                OpsEvent::Backlog {
                    pending: 101,
                    threshold: 100
                }
            )]
        );
        // Hovering around the threshold, or coming down but not to half: nothing new.
        assert!(w.observe(&[(1, 99)], 100).is_empty());
        assert!(w.observe(&[(1, 150)], 100).is_empty());
        assert!(w.observe(&[(1, 51)], 100).is_empty());
        // Down to half (or gone), then up again: a new event.
        assert!(w.observe(&[], 100).is_empty());
        assert_eq!(w.observe(&[(1, 200)], 100).len(), 1);
        // Off clears it.
        assert!(w.observe(&[(1, 200)], 0).is_empty());
        assert_eq!(w.observe(&[(1, 200)], 100).len(), 1);
    }
}
