//! Per-endpoint delivery policy that spans deliveries: the circuit breaker (with auto-disable)
//! and the rate limiter. Pure logic; the worker persists `Health` in `webhook._endpoint_state`.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime};

use crate::retry::{Schedule, JITTER};

/// An endpoint's recent record, as the circuit breaker sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Health {
    pub consecutive_failures: u32,
    /// When the current run of failures began (None while healthy).
    pub failing_since: Option<SystemTime>,
    pub last_success_at: Option<SystemTime>,
    pub last_failure_at: Option<SystemTime>,
    /// While the circuit is open: when the next probe may go.
    pub next_probe_at: Option<SystemTime>,
    /// Deliveries delivered / failed since the last time these were written out.
    pub delivered_delta: u64,
    pub failed_delta: u64,
    /// Changed since it was last written out.
    pub dirty: bool,
}

/// What the breaker allows an endpoint right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Circuit closed: the endpoint's normal limits apply.
    Open,
    /// Circuit open: at most this many requests now (0 or 1, the probe); if 0, look again at `wake_at`.
    Limited {
        allowed: i32,
        wake_at: Option<SystemTime>,
    },
}

impl Health {
    pub fn on_success(&mut self, now: SystemTime) {
        self.consecutive_failures = 0;
        self.failing_since = None;
        self.next_probe_at = None;
        self.last_success_at = Some(now);
        self.delivered_delta += 1;
        self.dirty = true;
    }

    /// Records a failed attempt; `final_` when the delivery itself gave up. When the run of failures
    /// reaches `threshold` (0 = breaker off) the circuit opens, and each further failure (a failed
    /// probe) pushes the next probe out along `schedule`.
    pub fn on_failure(
        &mut self,
        now: SystemTime,
        final_: bool,
        threshold: u32,
        schedule: &Schedule,
        jitter: f64,
    ) {
        self.consecutive_failures += 1;
        self.failing_since.get_or_insert(now);
        self.last_failure_at = Some(now);
        if final_ {
            self.failed_delta += 1;
        }
        if threshold > 0 && self.consecutive_failures >= threshold {
            let probes_failed = self.consecutive_failures - threshold + 1;
            let step = schedule
                .step_after(probes_failed)
                .mul_f64(1.0 + JITTER * jitter.clamp(-1.0, 1.0));
            self.next_probe_at = Some(now + step);
        }
        self.dirty = true;
    }

    /// Written out: nothing left to write until it changes again.
    pub fn saved(&mut self) {
        self.dirty = false;
        self.delivered_delta = 0;
        self.failed_delta = 0;
    }

    /// Whether `other` is in the same breaker state: the run of failures, when it began, the
    /// next probe. Only those must be written out as they change (a restarted worker goes on
    /// from them); the counters and the last success and failure times may lag.
    pub fn same_breaker(&self, other: &Health) -> bool {
        self.consecutive_failures == other.consecutive_failures
            && self.failing_since == other.failing_since
            && self.next_probe_at == other.next_probe_at
    }

    pub fn is_open(&self, threshold: u32) -> bool {
        threshold > 0 && self.consecutive_failures >= threshold
    }

    /// How many requests the breaker lets through now, given `busy` requests under way.
    pub fn gate(&self, now: SystemTime, threshold: u32, busy: i32) -> Gate {
        if !self.is_open(threshold) {
            return Gate::Open;
        }
        if busy > 0 {
            // A probe is under way; its result decides.
            return Gate::Limited {
                allowed: 0,
                wake_at: None,
            };
        }
        match self.next_probe_at {
            Some(at) if at > now => Gate::Limited {
                allowed: 0,
                wake_at: Some(at),
            },
            _ => Gate::Limited {
                allowed: 1,
                wake_at: None,
            },
        }
    }

    /// True when the endpoint has failed without a success for longer than `after` (0 = never).
    pub fn should_auto_disable(&self, now: SystemTime, after: Duration, threshold: u32) -> bool {
        !after.is_zero()
            && self.is_open(threshold.max(1))
            && self
                .failing_since
                .is_some_and(|since| now.duration_since(since).unwrap_or_default() >= after)
    }
}

/// A token bucket: `rate` tokens per second, holding at most a tenth of a second's worth (at
/// least one), so bursts stay small and the long-run rate stays within a few percent of `rate`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub fn new(rate: u32, now: Instant) -> TokenBucket {
        let rate = f64::from(rate.max(1));
        let capacity = (rate / 10.0).max(1.0);
        TokenBucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    pub fn rate(&self) -> u32 {
        self.rate as u32
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Whole tokens available now.
    pub fn available(&mut self, now: Instant) -> i32 {
        self.refill(now);
        self.tokens.floor() as i32
    }

    pub fn take(&mut self, n: i32, now: Instant) {
        self.refill(now);
        self.tokens -= f64::from(n);
    }

    /// How long until one whole token is available.
    pub fn next_token_in(&mut self, now: Instant) -> Duration {
        self.refill(now);
        if self.tokens >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }
}

/// When the planner's statistics of the queue are stale. A queue is emptied by a purge and
/// refilled by a burst faster than autovacuum's ANALYZE notices (it looks once a minute), and
/// plans made for an empty table walk whole indexes per row: a million-event burst then drains
/// slower with every batch. The worker counts what it claims; once that exceeds both `floor` and
/// the number of rows the planner believes the deliveries table holds, it refreshes the
/// statistics itself.
#[derive(Debug, Clone)]
pub struct StatsWatch {
    floor: u64,
    claimed: u64,
    planner_rows: u64,
}

impl StatsWatch {
    pub fn new(floor: u64) -> StatsWatch {
        StatsWatch {
            floor,
            claimed: 0,
            planner_rows: 0,
        }
    }

    /// Counts `n` claimed deliveries; true when the statistics should be refreshed now.
    pub fn claimed(&mut self, n: u64) -> bool {
        self.claimed = self.claimed.saturating_add(n);
        self.claimed >= self.floor.max(self.planner_rows)
    }

    /// The statistics were refreshed (or read): the planner now believes the table holds
    /// `planner_rows` rows (`pg_class.reltuples`; negative = never analyzed).
    pub fn refreshed(&mut self, planner_rows: f64) {
        self.claimed = 0;
        self.planner_rows = if planner_rows.is_finite() && planner_rows > 0.0 {
            planner_rows as u64
        } else {
            0
        };
    }
}

/// What the next claim may take beyond each endpoint's own `max_in_flight`, by endpoint health:
/// endpoints whose last attempt succeeded (and none failed since) go first; all the others
/// (failing, hanging, or new) may hold at most `suspect_share_percent` of the worker's
/// `max_in_flight` together, so they can never take every request slot from healthy ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimRoom {
    /// Healthy endpoints, sorted.
    pub healthy: Vec<i32>,
    /// How many more requests the other endpoints may start, in all.
    pub suspect_room: i32,
}

pub fn claim_room(
    health: &HashMap<i32, Health>,
    busy: &HashMap<i32, i32>,
    max_in_flight: usize,
    suspect_share_percent: i32,
) -> ClaimRoom {
    let mut healthy: Vec<i32> = health
        .iter()
        .filter(|(_, h)| h.consecutive_failures == 0 && h.last_success_at.is_some())
        .map(|(id, _)| *id)
        .collect();
    healthy.sort_unstable();
    let suspect_busy: i32 = busy
        .iter()
        .filter(|(id, _)| healthy.binary_search(id).is_err())
        .map(|(_, n)| *n)
        .sum();
    let share = (max_in_flight as i32 * suspect_share_percent / 100).max(1);
    ClaimRoom {
        healthy,
        suspect_room: (share - suspect_busy).max(0),
    }
}

/// The worker's own per-endpoint limits for the next claim, beyond `max_in_flight`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    /// Endpoints limited now (open circuit, rate limit), and how many requests each may start.
    pub allowed: HashMap<i32, i32>,
    /// When a limited endpoint may start more (a probe is due, a token refills).
    pub wake: Option<Duration>,
}

/// Applies the circuit breaker and the rate limits: an endpoint changed by an operator (enabled,
/// altered: `updated_at`) after its failures began gets a fresh start; an open circuit lets one
/// probe through when due; a rate-limited endpoint may start as many requests as its bucket has
/// tokens. Buckets of endpoints that lost their rate limit are dropped; a changed rate starts a
/// new bucket.
#[allow(clippy::too_many_arguments)]
pub fn limits(
    health: &mut HashMap<i32, Health>,
    busy: &HashMap<i32, i32>,
    updated_at: &HashMap<i32, SystemTime>,
    rate_limits: &[(i32, i32)],
    buckets: &mut HashMap<i32, TokenBucket>,
    threshold: u32,
    now: SystemTime,
    clock: Instant,
) -> Limits {
    for (id, h) in health.iter_mut() {
        if let Some(&changed) = updated_at.get(id) {
            if h.is_open(threshold) && Some(changed) > h.failing_since {
                *h = Health {
                    dirty: true,
                    ..Health::default()
                };
            }
        }
    }
    let mut out = Limits::default();
    let mut wake_in = |d: Duration| out.wake = Some(out.wake.map_or(d, |w: Duration| w.min(d)));
    for (&id, h) in health.iter() {
        let running = busy.get(&id).copied().unwrap_or(0);
        if let Gate::Limited { allowed, wake_at } = h.gate(now, threshold, running) {
            out.allowed.insert(id, allowed);
            if let Some(at) = wake_at {
                wake_in(at.duration_since(now).unwrap_or_default());
            }
        }
    }
    buckets.retain(|id, _| rate_limits.iter().any(|(p, _)| p == id));
    for &(id, rate) in rate_limits {
        let rate = rate.max(1) as u32;
        let bucket = buckets
            .entry(id)
            .or_insert_with(|| TokenBucket::new(rate, clock));
        if bucket.rate() != rate {
            *bucket = TokenBucket::new(rate, clock);
        }
        let tokens = bucket.available(clock);
        if tokens == 0 {
            wake_in(bucket.next_token_in(clock));
        }
        let entry = out.allowed.entry(id).or_insert(tokens);
        *entry = (*entry).min(tokens);
    }
    out
}

/// What one finished attempt means for its delivery and its endpoint: the worker's decision,
/// apart from writing it down.
#[derive(Debug, Clone, PartialEq)]
pub struct Judgement {
    /// The delivery's new status: `delivered`, `pending` (a retry) or `failed`.
    pub status: &'static str,
    /// For a retry, how long until it is due.
    pub delay: Duration,
    /// The attempt's error with what the worker adds to it (why it gave up).
    pub error: Option<String>,
    /// The endpoint must be disabled, for this reason.
    pub disable: Option<String>,
}

/// Judges one finished attempt (`attempt` of at most `max_attempts`) and updates the endpoint's
/// `health` (the circuit breaker; `threshold` consecutive failures open it). `jitter` is in
/// [-1, 1]; `auto_disable_after` is webhook.auto_disable_after (zero: never).
#[allow(clippy::too_many_arguments)]
pub fn judge(
    outcome: &crate::retry::Outcome,
    error: Option<&str>,
    attempt: u32,
    max_attempts: u32,
    schedule: &Schedule,
    jitter: f64,
    health: &mut Health,
    now: SystemTime,
    threshold: u32,
    auto_disable_after: Duration,
) -> Judgement {
    use crate::retry::{decide, Outcome, Verdict};
    let micros = |t: SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros() as i64
    };
    let verdict = decide(outcome, attempt, max_attempts, schedule, jitter);
    let (status, delay, note, mut disable) = match verdict {
        Verdict::Delivered => {
            health.on_success(now);
            ("delivered", Duration::ZERO, None, None)
        }
        Verdict::Retry(d) => {
            health.on_failure(now, false, threshold, schedule, jitter);
            ("pending", d, None, None)
        }
        Verdict::Failed => {
            health.on_failure(now, true, threshold, schedule, jitter);
            let note = (!matches!(outcome, Outcome::Refused)).then(|| {
                format!(
                    " (gave up after {attempt} attempt{})",
                    if attempt == 1 { "" } else { "s" }
                )
            });
            ("failed", Duration::ZERO, note, None)
        }
        Verdict::Gone => {
            health.on_failure(now, true, threshold, schedule, jitter);
            let reason = format!(
                "receiver answered 410 Gone at {}",
                crate::request::rfc3339_utc(micros(now))
            );
            (
                "failed",
                Duration::ZERO,
                Some(": endpoint disabled".to_string()),
                Some(reason),
            )
        }
    };
    if disable.is_none() && health.should_auto_disable(now, auto_disable_after, threshold) {
        disable = Some(format!(
            "failing without a success since {} (webhook.auto_disable_after = {} s)",
            crate::request::rfc3339_utc(micros(health.failing_since.unwrap_or(now))),
            auto_disable_after.as_secs()
        ));
    }
    let error = match (error, note) {
        (Some(e), Some(n)) => Some(format!("{e}{n}")),
        (e, _) => e.map(str::to_string),
    };
    Judgement {
        status,
        delay,
        error,
        disable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    mod claim_capacity {
        use super::super::*;
        use std::time::UNIX_EPOCH;

        fn at(secs: u64) -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(secs)
        }

        fn healthy() -> Health {
            Health {
                last_success_at: Some(at(100)),
                ..Health::default()
            }
        }

        fn open(next_probe: u64) -> Health {
            Health {
                consecutive_failures: 5,
                failing_since: Some(at(50)),
                next_probe_at: Some(at(next_probe)),
                ..Health::default()
            }
        }

        #[test]
        fn healthy_endpoints_go_first_and_the_others_share_ninety_percent() {
            let health = HashMap::from([(1, healthy()), (2, open(0)), (3, Health::default())]);
            let busy = HashMap::from([(1, 40), (2, 30), (3, 20)]);
            let room = claim_room(&health, &busy, 100, 90);
            assert_eq!(room.healthy, vec![1]);
            // 90 of 100 slots for suspects; 2 and 3 (new) hold 50 of them.
            assert_eq!(room.suspect_room, 40);
            // An endpoint that failed after its last success is a suspect again.
            let mut failing = healthy();
            failing.consecutive_failures = 1;
            let room = claim_room(&HashMap::from([(1, failing)]), &busy, 100, 90);
            assert!(room.healthy.is_empty());
            assert_eq!(room.suspect_room, 0, "90 - (40 + 30 + 20) busy");
        }

        #[test]
        fn suspects_always_have_one_slot_of_a_tiny_worker_and_never_negative_room() {
            let room = claim_room(&HashMap::new(), &HashMap::new(), 1, 90);
            assert_eq!(room.suspect_room, 1);
            let room = claim_room(&HashMap::new(), &HashMap::from([(7, 500)]), 100, 90);
            assert_eq!(room.suspect_room, 0);
        }

        #[test]
        fn an_open_circuit_lets_one_probe_through_when_due_and_says_when() {
            let mut health = HashMap::from([(1, open(200)), (2, open(90)), (3, healthy())]);
            let mut buckets = HashMap::new();
            let clock = Instant::now();
            let l = limits(
                &mut health,
                &HashMap::new(),
                &HashMap::new(),
                &[],
                &mut buckets,
                5,
                at(100),
                clock,
            );
            assert_eq!(l.allowed, HashMap::from([(1, 0), (2, 1)]));
            assert_eq!(l.wake, Some(Duration::from_secs(100)));
            // A probe under way: nothing more until its result.
            let l = limits(
                &mut health,
                &HashMap::from([(2, 1)]),
                &HashMap::new(),
                &[],
                &mut buckets,
                5,
                at(100),
                clock,
            );
            assert_eq!(l.allowed.get(&2), Some(&0));
        }

        #[test]
        fn an_operators_change_after_the_failures_began_closes_the_circuit() {
            let mut health = HashMap::from([(1, open(500)), (2, open(500))]);
            let updated = HashMap::from([(1, at(60)), (2, at(40))]);
            let l = limits(
                &mut health,
                &HashMap::new(),
                &updated,
                &[],
                &mut HashMap::new(),
                5,
                at(100),
                Instant::now(),
            );
            assert_eq!(
                health[&1],
                Health {
                    dirty: true,
                    ..Health::default()
                }
            );
            assert_eq!(
                l.allowed,
                HashMap::from([(2, 0)]),
                "changed before the failures: still open"
            );
        }

        #[test]
        fn rate_limits_allow_the_bucket_and_the_lower_of_two_limits() {
            let clock = Instant::now();
            let mut buckets = HashMap::from([(9, TokenBucket::new(5, clock))]);
            let mut health = HashMap::from([(1, open(90))]);
            let l = limits(
                &mut health,
                &HashMap::new(),
                &HashMap::new(),
                &[(1, 100), (2, 10)],
                &mut buckets,
                5,
                at(100),
                clock,
            );
            assert!(
                !buckets.contains_key(&9),
                "a bucket without a rate limit is dropped"
            );
            assert_eq!(
                l.allowed[&1], 1,
                "the probe, fewer than the bucket's tokens"
            );
            assert_eq!(l.allowed[&2], buckets[&2].clone().available(clock));
            assert_eq!(
                l.allowed[&2], 1,
                "a tenth of a second's worth of 10/s: one token"
            );
            buckets.get_mut(&2).unwrap().take(l.allowed[&2], clock);
            let l = limits(
                &mut health,
                &HashMap::new(),
                &HashMap::new(),
                &[(2, 10)],
                &mut buckets,
                5,
                at(100),
                clock,
            );
            assert_eq!(l.allowed[&2], 0);
            assert!(l
                .wake
                .is_some_and(|w| w > Duration::ZERO && w <= Duration::from_millis(100)));
            // A changed rate starts a new bucket.
            let l = limits(
                &mut health,
                &HashMap::new(),
                &HashMap::new(),
                &[(2, 20)],
                &mut buckets,
                5,
                at(100),
                clock,
            );
            assert_eq!(buckets[&2].rate(), 20);
            assert!(l.allowed[&2] > 0);
            assert_eq!(l.allowed[&2], 2, "a new, full bucket of 20/s: two tokens");
        }
    }

    mod same_breaker {
        use super::super::*;
        use std::time::UNIX_EPOCH;

        fn at(secs: u64) -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(secs)
        }

        #[test]
        fn successes_only_move_what_may_lag() {
            let before = Health::default();
            let mut h = before.clone();
            h.on_success(at(10));
            h.on_success(at(11));
            assert!(h.same_breaker(&before), "counters and times only");
            assert_eq!(h.delivered_delta, 2);
        }

        #[test]
        fn a_failure_and_the_recovery_change_the_breaker() {
            let schedule = Schedule::parse("1s").unwrap();
            let healthy = Health::default();
            let mut h = healthy.clone();
            h.on_failure(at(10), false, 3, &schedule, 0.0);
            assert!(!h.same_breaker(&healthy), "a run of failures began");
            let failing = h.clone();
            h.on_failure(at(11), false, 3, &schedule, 0.0);
            assert!(!h.same_breaker(&failing), "the run grew");
            let mut open = h.clone();
            open.on_failure(at(12), false, 3, &schedule, 0.0);
            assert!(open.next_probe_at.is_some());
            assert!(!open.same_breaker(&h), "the circuit opened");
            h.on_success(at(13));
            assert!(h.same_breaker(&healthy), "back to healthy");
            assert!(!h.same_breaker(&failing));
        }
    }

    mod judge {
        use super::super::*;
        use crate::retry::Outcome;
        use std::time::UNIX_EPOCH;

        fn at(secs: u64) -> SystemTime {
            UNIX_EPOCH + Duration::from_secs(secs)
        }

        fn schedule() -> Schedule {
            Schedule::parse("5s,5min").unwrap()
        }

        fn status(code: u16) -> Outcome {
            Outcome::Status {
                code,
                retry_after: None,
            }
        }

        #[test]
        fn success_is_delivered_and_closes_the_circuit() {
            let mut h = Health::default();
            h.on_failure(at(0), false, 10, &schedule(), 0.0);
            let j = judge(
                &status(204),
                None,
                2,
                3,
                &schedule(),
                0.0,
                &mut h,
                at(9),
                10,
                Duration::ZERO,
            );
            assert_eq!(
                j,
                Judgement {
                    status: "delivered",
                    delay: Duration::ZERO,
                    error: None,
                    disable: None
                }
            );
            assert_eq!(h.consecutive_failures, 0);
            assert_eq!(h.last_success_at, Some(at(9)));
        }

        #[test]
        fn a_failure_with_attempts_left_is_retried_on_the_schedule() {
            let mut h = Health::default();
            let j = judge(
                &status(500),
                Some("HTTP 500"),
                1,
                3,
                &schedule(),
                0.0,
                &mut h,
                at(1),
                10,
                Duration::ZERO,
            );
            assert_eq!(
                j,
                Judgement {
                    status: "pending",
                    delay: Duration::from_secs(5),
                    error: Some("HTTP 500".into()),
                    disable: None
                }
            );
            assert_eq!(h.consecutive_failures, 1);
            assert_eq!(h.failing_since, Some(at(1)));
        }

        #[test]
        fn the_last_attempt_fails_and_says_so() {
            let mut h = Health::default();
            let j = judge(
                &status(500),
                Some("HTTP 500"),
                3,
                3,
                &schedule(),
                0.0,
                &mut h,
                at(1),
                10,
                Duration::ZERO,
            );
            assert_eq!(j.status, "failed");
            assert_eq!(
                j.error.as_deref(),
                Some("HTTP 500 (gave up after 3 attempts)")
            );
            let j = judge(
                &Outcome::Transport,
                Some("connection refused"),
                1,
                1,
                &schedule(),
                0.0,
                &mut h,
                at(1),
                10,
                Duration::ZERO,
            );
            assert_eq!(
                j.error.as_deref(),
                Some("connection refused (gave up after 1 attempt)")
            );
            // A request refused before sending (SSRF guard, bad secret) fails as it is.
            let j = judge(
                &Outcome::Refused,
                Some("refused to connect to 10.0.0.1"),
                1,
                8,
                &schedule(),
                0.0,
                &mut h,
                at(1),
                10,
                Duration::ZERO,
            );
            assert_eq!(j.status, "failed");
            assert_eq!(j.error.as_deref(), Some("refused to connect to 10.0.0.1"));
        }

        #[test]
        fn gone_fails_and_disables_the_endpoint() {
            let mut h = Health::default();
            let j = judge(
                &status(410),
                Some("HTTP 410"),
                1,
                8,
                &schedule(),
                0.0,
                &mut h,
                at(1_649_367_553),
                10,
                Duration::ZERO,
            );
            assert_eq!(
                j,
                Judgement {
                    status: "failed",
                    delay: Duration::ZERO,
                    error: Some("HTTP 410: endpoint disabled".into()),
                    disable: Some(
                        "receiver answered 410 Gone at 2022-04-07T21:39:13.000000Z".into()
                    )
                }
            );
        }

        #[test]
        fn an_endpoint_failing_for_too_long_is_disabled() {
            let mut h = Health::default();
            let day = Duration::from_secs(86_400);
            for i in 0..3 {
                let j = judge(
                    &status(500),
                    Some("HTTP 500"),
                    1,
                    8,
                    &schedule(),
                    0.0,
                    &mut h,
                    at(i),
                    2,
                    day,
                );
                assert_eq!(j.disable, None);
            }
            let j = judge(
                &status(500),
                Some("HTTP 500"),
                1,
                8,
                &schedule(),
                0.0,
                &mut h,
                at(86_400),
                2,
                day,
            );
            assert_eq!(
                j.disable.as_deref(),
                Some("failing without a success since 1970-01-01T00:00:00.000000Z (webhook.auto_disable_after = 86400 s)")
            );
        }
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + secs)
    }

    #[test]
    fn stats_refresh_after_claiming_more_than_the_planner_believes() {
        let mut w = StatsWatch::new(10_000);
        w.refreshed(0.0);
        assert!(!w.claimed(9_999), "below the floor");
        assert!(w.claimed(1), "an emptied table refills past the floor");
        w.refreshed(1_000_000.0);
        assert!(!w.claimed(500_000));
        assert!(!w.claimed(499_999));
        assert!(
            w.claimed(1),
            "claimed as many as the planner thought there were"
        );
        w.refreshed(-1.0);
        assert!(!w.claimed(9_999), "never analyzed counts as empty");
        assert!(w.claimed(1));
        w.refreshed(f64::NAN);
        assert!(w.claimed(u64::MAX) && w.claimed(u64::MAX), "saturates");
    }

    #[test]
    fn circuit_opens_after_threshold_and_probes_at_the_schedules_pace() {
        let schedule = Schedule::parse("10s,20s,40s").unwrap();
        let mut h = Health::default();
        for i in 0..4 {
            h.on_failure(at(i), false, 5, &schedule, 0.0);
            assert_eq!(
                h.gate(at(i), 5, 0),
                Gate::Open,
                "still closed after {} failures",
                i + 1
            );
        }
        h.on_failure(at(4), false, 5, &schedule, 0.0);
        assert!(h.is_open(5));
        // First probe waits one schedule step after the failure that opened the circuit.
        assert_eq!(
            h.gate(at(5), 5, 0),
            Gate::Limited {
                allowed: 0,
                wake_at: Some(at(14))
            }
        );
        assert_eq!(
            h.gate(at(14), 5, 0),
            Gate::Limited {
                allowed: 1,
                wake_at: None
            }
        );
        assert_eq!(
            h.gate(at(14), 5, 1),
            Gate::Limited {
                allowed: 0,
                wake_at: None
            },
            "one probe at a time"
        );
        assert!(
            h.is_open(5),
            "open while the probe runs (half-open in webhook.endpoint_stats)"
        );
        // A failed probe: the next waits the next step.
        h.on_failure(at(15), false, 5, &schedule, 0.0);
        assert_eq!(
            h.gate(at(15), 5, 0),
            Gate::Limited {
                allowed: 0,
                wake_at: Some(at(35))
            }
        );
        // A successful probe closes the circuit.
        h.on_success(at(40));
        assert_eq!(h.gate(at(40), 5, 0), Gate::Open);
        assert_eq!(h.consecutive_failures, 0);
        assert_eq!(h.failing_since, None);
        assert!(!h.is_open(5));
    }

    #[test]
    fn threshold_zero_turns_the_breaker_off() {
        let schedule = Schedule::default();
        let mut h = Health::default();
        for i in 0..100 {
            h.on_failure(at(i), false, 0, &schedule, 0.0);
        }
        assert_eq!(h.gate(at(100), 0, 0), Gate::Open);
        // The views' rule (webhook._circuits) says the same: never open with a threshold of 0;
        // the golden settings test shows the views at that setting.
        assert!(!h.is_open(0));
    }

    #[test]
    fn auto_disable_after_failing_long_enough() {
        let schedule = Schedule::default();
        let mut h = Health::default();
        h.on_failure(at(0), false, 2, &schedule, 0.0);
        h.on_failure(at(10), true, 2, &schedule, 0.0);
        assert_eq!(h.failing_since, Some(at(0)));
        assert_eq!(h.failed_delta, 1);
        assert!(!h.should_auto_disable(at(99), Duration::from_secs(100), 2));
        assert!(h.should_auto_disable(at(100), Duration::from_secs(100), 2));
        assert!(
            !h.should_auto_disable(at(1000), Duration::ZERO, 2),
            "0 = never"
        );
        h.on_success(at(101));
        assert!(!h.should_auto_disable(at(1000), Duration::from_secs(100), 2));
    }

    #[test]
    fn token_bucket_holds_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(50, t0);
        // Starts with a tenth of a second's worth.
        assert_eq!(b.available(t0), 5);
        b.take(5, t0);
        assert_eq!(b.available(t0), 0);
        assert_eq!(b.next_token_in(t0), Duration::from_millis(20));
        // Over ten simulated seconds, taking everything as it comes: about 500 + the initial 5.
        let mut sent = 5;
        for ms in (0..10_000).step_by(7) {
            let now = t0 + Duration::from_millis(ms);
            let n = b.available(now);
            b.take(n, now);
            sent += n;
        }
        assert!((500..=506).contains(&sent), "{sent}");
        // Slow rates still allow one at a time.
        let mut slow = TokenBucket::new(1, t0);
        assert_eq!(slow.available(t0), 1);
    }
}
