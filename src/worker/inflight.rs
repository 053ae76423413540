//! The deliveries whose requests are under way: what recording their results needs, and the
//! counts the claim limits itself by (per endpoint, and bytes of request bodies held).

use std::collections::HashMap;
use std::sync::Arc;

use crate::retry::Schedule;

/// A delivery whose request is under way.
pub struct Tracked {
    pub endpoint_id: i32,
    /// The request body's size, counted against the worker's byte budget.
    pub bytes: i64,
    pub max_attempts: i32,
    pub schedule: Arc<Schedule>,
}

#[derive(Default)]
pub struct InFlight {
    tracked: HashMap<i64, Tracked>,
    /// Requests under way per endpoint.
    busy: HashMap<i32, i32>,
    /// Bytes of the request bodies under way.
    bytes: i64,
}

impl InFlight {
    pub fn add(&mut self, delivery_id: i64, t: Tracked) {
        self.bytes += t.bytes;
        *self.busy.entry(t.endpoint_id).or_default() += 1;
        if let Some(old) = self.tracked.insert(delivery_id, t) {
            // Claimed twice without a result in between cannot happen (the row is `sending`);
            // if it did, count it once.
            self.release(&old);
        }
    }

    pub fn get(&self, delivery_id: i64) -> Option<&Tracked> {
        self.tracked.get(&delivery_id)
    }

    /// Stops tracking a delivery and frees its place in its endpoint's limit.
    pub fn forget(&mut self, delivery_id: i64) {
        if let Some(t) = self.tracked.remove(&delivery_id) {
            self.release(&t);
        }
    }

    fn release(&mut self, t: &Tracked) {
        self.bytes -= t.bytes;
        if let Some(n) = self.busy.get_mut(&t.endpoint_id) {
            *n -= 1;
            if *n <= 0 {
                self.busy.remove(&t.endpoint_id);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.tracked.is_empty()
    }

    pub fn bytes(&self) -> i64 {
        self.bytes
    }

    pub fn busy(&self) -> &HashMap<i32, i32> {
        &self.busy
    }

    pub fn ids(&self) -> Vec<i64> {
        self.tracked.keys().copied().collect()
    }
}
