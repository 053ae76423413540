//! Several delivery workers per database (`webhook.workers`): which worker owns an endpoint.
//!
//! An endpoint belongs to exactly one worker, so everything kept per endpoint (its `max_in_flight`,
//! rate bucket, circuit breaker, ordering) lives in one process. The worker's SQL filters endpoints
//! with the same rule (`ep.id % parts = part`); a `#[pg_test]` holds the two to each other.

/// Most workers one database may have.
pub const MAX_WORKERS: i32 = 16;

/// Worker `part` of `parts` serving one database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    pub part: i32,
    pub parts: i32,
}

impl Split {
    /// The only worker of its database.
    pub const WHOLE: Split = Split { part: 0, parts: 1 };

    /// Worker `part` of `parts`; `None` when `part` is not one of them.
    pub fn new(part: i32, parts: i32) -> Option<Split> {
        (1..=MAX_WORKERS)
            .contains(&parts)
            .then_some(())
            .filter(|_| (0..parts).contains(&part))
            .map(|_| Split { part, parts })
    }

    /// Whether this worker delivers to endpoint `endpoint_id`.
    pub fn owns(self, endpoint_id: i32) -> bool {
        endpoint_id.rem_euclid(self.parts) == self.part
    }

    /// The worker that keeps the database's shared chores (retention).
    pub fn is_first(self) -> bool {
        self.part == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_endpoint_has_exactly_one_owner() {
        for parts in 1..=MAX_WORKERS {
            for id in [1, 2, 3, 7, 16, 17, 1000, 10_001, i32::MAX] {
                let owners: Vec<i32> = (0..parts)
                    .filter(|&p| Split::new(p, parts).unwrap().owns(id))
                    .collect();
                assert_eq!(owners, vec![id % parts], "endpoint {id} of {parts}");
            }
        }
    }

    #[test]
    fn endpoints_are_spread_evenly() {
        let two = [Split::new(0, 2).unwrap(), Split::new(1, 2).unwrap()];
        let counts: Vec<usize> = two
            .iter()
            .map(|s| (1..=1000).filter(|&id| s.owns(id)).count())
            .collect();
        assert_eq!(counts, vec![500, 500]);
    }

    #[test]
    fn only_existing_parts_are_made() {
        assert_eq!(Split::new(0, 1), Some(Split::WHOLE));
        assert!(Split::WHOLE.owns(42) && Split::WHOLE.is_first());
        assert_eq!(Split::new(1, 1), None);
        assert_eq!(Split::new(-1, 2), None);
        assert_eq!(Split::new(0, 0), None);
        assert_eq!(Split::new(0, MAX_WORKERS + 1), None);
        assert!(!Split::new(1, 2).unwrap().is_first());
    }
}
