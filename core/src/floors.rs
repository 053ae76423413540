//! Where each endpoint's claim of new deliveries starts (issue 13: a held snapshot must not slow
//! claims). A delivery that is claimed leaves a dead entry in the index of new deliveries; while
//! a snapshot older than it is held (a report, `pg_dump`, a standby's feedback) the entry cannot
//! be removed, and a claim that reads the index from its start walks every one of them: 30,000
//! deliveries made under a held snapshot cost an idle claim 3.9–7.7 ms in runs here
//! (tests/bench/snapshot_profile.sh).
//!
//! A floor is a delivery id at or below which the endpoint has no new (never attempted) pending
//! delivery; the claim reads new deliveries above it. It rises to the highest new delivery a
//! claim took (a claim takes an endpoint's new deliveries in id order, so every one below was
//! taken too, except those it picked and could not take — held by another transaction, or
//! their event not visible yet —, below the lowest of which the floor stays) and is lowered, or
//! dropped, whenever new deliveries may appear below it:
//! - the worker's router made deliveries: they are of events at or above the routing watermark
//!   it raised last, so every floor comes down to just below `watermark × 2^20`
//!   ([`Floors::lower_to`]); `webhook._route()` run by the SQL API (retry, disable, drop, the
//!   view's UPDATE) asks for a rescan when it made any;
//! - the SQL API made or reset pending work (`send()`, `retry()`, `replay()`, `enable_endpoint()`
//!   wake the worker to rescan), or leases were recovered: all floors are dropped;
//! - an administrator's hand-written change (an `UPDATE` of `webhook.deliveries`, a row another
//!   transaction held while the claim skipped it) wakes nothing: every floor is dropped after
//!   [`RESCAN_EVERY`] all the same, as the idle poll would find such a row.
//!
//! A floor is only ever a place to start reading: dropping one costs a claim that reads from the
//! start, never a delivery.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Floors are dropped at least this often (the worker's idle poll).
pub const RESCAN_EVERY: Duration = Duration::from_secs(5);

/// The floors of one worker's endpoints.
#[derive(Debug)]
pub struct Floors {
    below: HashMap<i32, i64>,
    since: Instant,
}

impl Default for Floors {
    fn default() -> Self {
        Floors::new(Instant::now())
    }
}

impl Floors {
    pub fn new(now: Instant) -> Floors {
        Floors {
            below: HashMap::new(),
            since: now,
        }
    }

    /// The endpoint's floor (0: read from the start).
    pub fn of(&self, endpoint_id: i32) -> i64 {
        self.below.get(&endpoint_id).copied().unwrap_or(0)
    }

    /// A claim took the endpoint's new delivery `id`.
    pub fn took(&mut self, endpoint_id: i32, id: i64) {
        let f = self.below.entry(endpoint_id).or_insert(0);
        *f = (*f).max(id);
    }

    /// A look at the endpoint's new deliveries above its floor found none, and `top` was the
    /// highest delivery id then: none of its new deliveries lies at or below `top` either, and
    /// any made later is below only if the router or the SQL API made it (which lower or drop
    /// the floors, as for every floor). The floor rises to `top`.
    pub fn none_new_up_to(&mut self, endpoint_id: i32, top: i64) {
        self.took(endpoint_id, top);
    }

    /// The endpoint's new delivery `id` was not taken: its floor stays below it.
    pub fn keep_below(&mut self, endpoint_id: i32, id: i64) {
        if let Some(f) = self.below.get_mut(&endpoint_id) {
            *f = (*f).min(id - 1);
        }
    }

    /// New deliveries may have appeared above `bound`: no floor stays above it.
    pub fn lower_to(&mut self, bound: i64) {
        if bound <= 0 {
            self.below.clear();
            return;
        }
        for f in self.below.values_mut() {
            *f = (*f).min(bound);
        }
    }

    /// Every endpoint is read from the start again.
    pub fn drop_all(&mut self, now: Instant) {
        self.below.clear();
        self.since = now;
    }

    /// Drops every floor when they are [`RESCAN_EVERY`] old; true if it did.
    pub fn expire(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.since) < RESCAN_EVERY {
            return false;
        }
        self.drop_all(now);
        true
    }

    /// How long until the floors expire (None while there are none): the worker sleeps no
    /// longer, so a row only the rescan finds waits at most [`RESCAN_EVERY`].
    pub fn expires_in(&self, now: Instant) -> Option<Duration> {
        (!self.below.is_empty()).then(|| (self.since + RESCAN_EVERY).saturating_duration_since(now))
    }

    /// The floors as the claim's parameters: endpoint ids and floors, in the same order.
    pub fn arrays(&self) -> (Vec<i32>, Vec<i64>) {
        self.below
            .iter()
            .filter(|(_, f)| **f > 0)
            .map(|(k, v)| (*k, *v))
            .unzip()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_rises_to_the_highest_new_delivery_taken() {
        let mut f = Floors::new(Instant::now());
        assert_eq!(f.of(1), 0, "read from the start until a claim took one");
        f.took(1, 2_097_153);
        f.took(1, 1_048_577);
        assert_eq!(f.of(1), 2_097_153, "never lowered by a claim");
        assert_eq!(f.of(2), 0, "per endpoint");
    }

    #[test]
    fn a_delivery_the_claim_could_not_take_keeps_the_floor_below_it() {
        let mut f = Floors::new(Instant::now());
        f.took(1, 30);
        f.took(1, 50);
        f.keep_below(1, 40);
        assert_eq!(f.of(1), 39);
        f.keep_below(2, 10);
        assert_eq!(f.of(2), 0, "an endpoint without a floor has none to lower");
    }

    #[test]
    fn an_endpoint_found_without_new_deliveries_rises_to_the_top_and_comes_down_with_routing() {
        let mut f = Floors::new(Instant::now());
        f.took(1, 70 << 20);
        f.none_new_up_to(1, 60 << 20);
        assert_eq!(f.of(1), 70 << 20, "never lowered by a look");
        f.none_new_up_to(2, 60 << 20);
        assert_eq!(f.of(2), 60 << 20);
        f.lower_to((50 << 20) - 1);
        assert_eq!(f.of(2), (50 << 20) - 1, "routing lowers it like any floor");
    }

    #[test]
    fn routing_lowers_every_floor_to_its_bound() {
        let mut f = Floors::new(Instant::now());
        f.took(1, 50 << 20);
        f.took(2, 10 << 20);
        f.lower_to((20 << 20) - 1);
        assert_eq!(f.of(1), (20 << 20) - 1);
        assert_eq!(f.of(2), 10 << 20, "a floor below the bound stays");
        f.lower_to(0);
        assert_eq!((f.of(1), f.of(2)), (0, 0), "a bound of 0 drops them all");
    }

    #[test]
    fn floors_expire_after_the_rescan_interval() {
        let start = Instant::now();
        let mut f = Floors::new(start);
        f.took(1, 5);
        assert!(!f.expire(start + RESCAN_EVERY / 2));
        assert_eq!(f.of(1), 5);
        assert!(f.expire(start + RESCAN_EVERY));
        assert_eq!(f.of(1), 0);
        assert!(
            !f.expire(start + RESCAN_EVERY + Duration::from_secs(1)),
            "counted afresh"
        );
    }

    #[test]
    fn the_wait_for_the_rescan_is_bounded_only_while_there_are_floors() {
        let start = Instant::now();
        let mut f = Floors::new(start);
        assert_eq!(f.expires_in(start), None);
        f.took(1, 5);
        assert_eq!(
            f.expires_in(start + Duration::from_secs(2)),
            Some(RESCAN_EVERY - Duration::from_secs(2))
        );
        assert_eq!(f.expires_in(start + RESCAN_EVERY * 2), Some(Duration::ZERO));
    }

    #[test]
    fn arrays_pair_each_endpoint_with_its_floor() {
        let mut f = Floors::new(Instant::now());
        f.took(3, 30);
        f.took(4, 40);
        let (ids, floors) = f.arrays();
        let mut pairs: Vec<_> = ids.into_iter().zip(floors).collect();
        pairs.sort();
        assert_eq!(pairs, vec![(3, 30), (4, 40)]);
    }
}
