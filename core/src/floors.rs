//! Where each endpoint's claim of new deliveries starts (issue 13: a held snapshot must not slow
//! claims). A delivery that is claimed leaves a dead entry in the index of new deliveries; while
//! a snapshot older than it is held (a report, `pg_dump`, a standby's feedback) the entry cannot
//! be removed, and a claim that reads the index from its start walks every one of them: 30,000
//! deliveries made under a held snapshot cost an idle claim 3.9–7.7 ms in runs here
//! (tests/bench/snapshot_profile.sh).
//!
//! New deliveries are read in routing order: a [`Place`] is (routing pass, delivery id). Every
//! endpoint but an ordered one has routing pass 0 throughout, so its order is id order; an
//! ordered endpoint's deliveries carry the number of the routing pass that made them
//! (`webhook._routing_passes`), so that it gets them in commit order.
//!
//! A floor is a place at or below which the endpoint has no new (never attempted) pending
//! delivery; the claim reads new deliveries above it. It rises to the place of the last new
//! delivery a claim took (a claim takes an endpoint's new deliveries in order, so every one
//! before was taken too, except those it picked and could not take — held by another
//! transaction, or their event not visible yet —, below the first of which the floor stays) and
//! is lowered, or dropped, whenever new deliveries may appear below it:
//! - the worker's router made deliveries: they are of events at or above the routing watermark
//!   it raised last, so every floor of routing pass 0 comes down to just below
//!   `watermark × 2^20` ([`Floors::lower_to`]); an ordered endpoint's deliveries it made carry
//!   a pass numbered after every earlier one, so they lie above its floor already. (An endpoint
//!   made ordered or unordered changes `webhook.endpoints`, and the worker drops every floor
//!   when that table changed.) `webhook._route()` run by the SQL API (retry, disable, drop, the
//!   view's UPDATE) asks for a rescan when it made any (its pass may have drawn its number
//!   before the worker's and committed after);
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

/// A place in an endpoint's order of new deliveries: (routing pass, delivery id), compared in
/// that order.
pub type Place = (i64, i64);

/// The floors of one worker's endpoints.
#[derive(Debug)]
pub struct Floors {
    below: HashMap<i32, Place>,
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

    /// The endpoint's floor ((0, 0): read from the start).
    pub fn of(&self, endpoint_id: i32) -> Place {
        self.below.get(&endpoint_id).copied().unwrap_or((0, 0))
    }

    /// A claim took the endpoint's new delivery at `place`.
    pub fn took(&mut self, endpoint_id: i32, place: Place) {
        let f = self.below.entry(endpoint_id).or_insert((0, 0));
        *f = (*f).max(place);
    }

    /// A look at the endpoint's new deliveries above its floor found none, and `top` was the
    /// highest delivery id then: none of its new deliveries of routing pass 0 lies at or below
    /// `top` either, and any made later is below only if the router or the SQL API made it
    /// (which lower or drop the floors, as for every floor); one of a later pass lies above
    /// anyway. The floor rises to (0, `top`).
    pub fn none_new_up_to(&mut self, endpoint_id: i32, top: i64) {
        self.took(endpoint_id, (0, top));
    }

    /// The endpoint's new delivery at `place` was not taken: its floor stays below it.
    pub fn keep_below(&mut self, endpoint_id: i32, place: Place) {
        if let Some(f) = self.below.get_mut(&endpoint_id) {
            *f = (*f).min((place.0, place.1 - 1));
        }
    }

    /// The router made deliveries above `bound` (ids of routing pass 0; those of ordered
    /// endpoints in a pass after every floor's): no floor of pass 0 stays above it.
    pub fn lower_to(&mut self, bound: i64) {
        if bound <= 0 {
            self.below.clear();
            return;
        }
        for f in self.below.values_mut() {
            if f.0 == 0 {
                f.1 = f.1.min(bound);
            }
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

    /// The floors as the claim's parameters: endpoint ids, floors' routing passes and ids, in
    /// the same order.
    pub fn arrays(&self) -> (Vec<i32>, Vec<i64>, Vec<i64>) {
        let mut ids = Vec::new();
        let mut passes = Vec::new();
        let mut floors = Vec::new();
        for (k, f) in self.below.iter().filter(|(_, f)| **f > (0, 0)) {
            ids.push(*k);
            passes.push(f.0);
            floors.push(f.1);
        }
        (ids, passes, floors)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_floor_rises_to_the_last_new_delivery_taken() {
        let mut f = Floors::new(Instant::now());
        assert_eq!(
            f.of(1),
            (0, 0),
            "read from the start until a claim took one"
        );
        f.took(1, (0, 2_097_153));
        f.took(1, (0, 1_048_577));
        assert_eq!(f.of(1), (0, 2_097_153), "never lowered by a claim");
        assert_eq!(f.of(2), (0, 0), "per endpoint");
        f.took(3, (7, 2_097_153));
        f.took(3, (8, 1_048_577));
        assert_eq!(
            f.of(3),
            (8, 1_048_577),
            "a later routing pass comes after any id"
        );
    }

    #[test]
    fn a_delivery_the_claim_could_not_take_keeps_the_floor_below_it() {
        let mut f = Floors::new(Instant::now());
        f.took(1, (0, 30));
        f.took(1, (0, 50));
        f.keep_below(1, (0, 40));
        assert_eq!(f.of(1), (0, 39));
        f.keep_below(2, (0, 10));
        assert_eq!(
            f.of(2),
            (0, 0),
            "an endpoint without a floor has none to lower"
        );
        f.took(3, (5, 50));
        f.keep_below(3, (4, 90));
        assert_eq!(f.of(3), (4, 89), "below it in routing order");
    }

    #[test]
    fn an_endpoint_found_without_new_deliveries_rises_to_the_top_and_comes_down_with_routing() {
        let mut f = Floors::new(Instant::now());
        f.took(1, (0, 70 << 20));
        f.none_new_up_to(1, 60 << 20);
        assert_eq!(f.of(1), (0, 70 << 20), "never lowered by a look");
        f.none_new_up_to(2, 60 << 20);
        assert_eq!(f.of(2), (0, 60 << 20));
        f.lower_to((50 << 20) - 1);
        assert_eq!(
            f.of(2),
            (0, (50 << 20) - 1),
            "routing lowers it like any floor"
        );
    }

    #[test]
    fn routing_lowers_every_floor_of_pass_0_to_its_bound() {
        let mut f = Floors::new(Instant::now());
        f.took(1, (0, 50 << 20));
        f.took(2, (0, 10 << 20));
        f.took(3, (9, 50 << 20));
        f.lower_to((20 << 20) - 1);
        assert_eq!(f.of(1), (0, (20 << 20) - 1));
        assert_eq!(f.of(2), (0, 10 << 20), "a floor below the bound stays");
        assert_eq!(
            f.of(3),
            (9, 50 << 20),
            "an ordered endpoint's new deliveries come in a later pass, above it"
        );
        f.lower_to(0);
        assert_eq!(
            (f.of(1), f.of(2), f.of(3)),
            ((0, 0), (0, 0), (0, 0)),
            "a bound of 0 drops them all"
        );
    }

    #[test]
    fn floors_expire_after_the_rescan_interval() {
        let start = Instant::now();
        let mut f = Floors::new(start);
        f.took(1, (0, 5));
        assert!(!f.expire(start + RESCAN_EVERY / 2));
        assert_eq!(f.of(1), (0, 5));
        assert!(f.expire(start + RESCAN_EVERY));
        assert_eq!(f.of(1), (0, 0));
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
        f.took(1, (0, 5));
        assert_eq!(
            f.expires_in(start + Duration::from_secs(2)),
            Some(RESCAN_EVERY - Duration::from_secs(2))
        );
        assert_eq!(f.expires_in(start + RESCAN_EVERY * 2), Some(Duration::ZERO));
    }

    #[test]
    fn arrays_pair_each_endpoint_with_its_floor() {
        let mut f = Floors::new(Instant::now());
        f.took(3, (0, 30));
        f.took(4, (2, 40));
        let (ids, passes, floors) = f.arrays();
        let mut rows: Vec<_> = ids
            .into_iter()
            .zip(passes)
            .zip(floors)
            .map(|((i, p), f)| (i, p, f))
            .collect();
        rows.sort();
        assert_eq!(rows, vec![(3, 0, 30), (4, 2, 40)]);
    }
}
