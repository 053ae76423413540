//! Retry timing: what an attempt's outcome means for its delivery, and when to try again.
//!
//! The schedule follows Standard Webhooks (5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h, ±20 % jitter).
//! A receiver's `Retry-After` is honoured on 429/502/503/504 but clamped, so a receiver can neither
//! make us hammer it nor park a delivery for a year.

use std::time::{Duration, SystemTime};

/// The default `webhook.retry_schedule`.
pub const DEFAULT_SCHEDULE_C: &std::ffi::CStr = c"5s,5min,30min,2h,5h,10h,10h";
/// The same, as text.
pub const DEFAULT_SCHEDULE: &str = match DEFAULT_SCHEDULE_C.to_str() {
    Ok(s) => s,
    Err(_) => panic!("the default schedule is ASCII"),
};
/// Jitter applied to every scheduled delay: ±20 %.
pub const JITTER: f64 = 0.2;
/// After a 429 or a timeout the receiver is overloaded: wait at least this long,
/// unless the configured schedule never waits that long (short test schedules).
pub const OVERLOAD_FLOOR: Duration = Duration::from_secs(60);
/// The longest single delay a schedule may hold.
pub const MAX_STEP: Duration = Duration::from_secs(7 * 24 * 3600);
/// The most steps a schedule may hold.
pub const MAX_STEPS: usize = 100;

/// Delays between consecutive attempts: `steps[0]` separates attempt 1 from attempt 2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    steps: Vec<Duration>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScheduleError {
    #[error("retry schedule is empty")]
    Empty,
    #[error("retry schedule step {0:?} is not a number followed by a unit (ms, s, min, h, d)")]
    BadStep(String),
    #[error("retry schedule step {0:?} is longer than 7 days")]
    TooLong(String),
    #[error("retry schedule has more than {MAX_STEPS} steps")]
    TooManySteps,
}

impl Schedule {
    /// Parses `"5s,5min,30min,2h"`; units are `ms`, `s`, `min`, `h`, `d`, as in Postgres settings.
    pub fn parse(text: &str) -> Result<Schedule, ScheduleError> {
        let parts: Vec<&str> = text.split(',').map(str::trim).collect();
        if parts.iter().all(|p| p.is_empty()) {
            return Err(ScheduleError::Empty);
        }
        if parts.len() > MAX_STEPS {
            return Err(ScheduleError::TooManySteps);
        }
        let steps = parts
            .iter()
            .map(|p| parse_duration(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Schedule { steps })
    }

    pub fn steps(&self) -> &[Duration] {
        &self.steps
    }

    /// The schedule's length + 1: the default number of attempts.
    pub fn default_max_attempts(&self) -> u32 {
        self.steps.len() as u32 + 1
    }

    /// The un-jittered wait after attempt number `attempt` (1-based); past the end the last step repeats.
    pub fn step_after(&self, attempt: u32) -> Duration {
        let i = (attempt.max(1) - 1) as usize;
        self.steps[i.min(self.steps.len() - 1)]
    }

    fn longest(&self) -> Duration {
        self.steps.iter().copied().max().unwrap_or_default()
    }
}

impl Default for Schedule {
    fn default() -> Self {
        Schedule::parse(DEFAULT_SCHEDULE).expect("default schedule parses")
    }
}

/// Parses one Postgres-style duration such as `250ms`, `5s`, `30min`, `2h`, `1d` (a bare `0` is allowed).
pub fn parse_duration(text: &str) -> Result<Duration, ScheduleError> {
    let t = text.trim();
    let bad = || ScheduleError::BadStep(t.to_string());
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(bad)?;
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| bad())?;
    let seconds_per_unit = match unit.trim() {
        "ms" => 0.001,
        "s" | "sec" => 1.0,
        "min" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        _ => return Err(bad()),
    };
    let seconds = value * seconds_per_unit;
    if !seconds.is_finite() || seconds > MAX_STEP.as_secs_f64() {
        return Err(ScheduleError::TooLong(t.to_string()));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// What happened on the wire, as far as retrying is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receiver answered with this status code; `retry_after` is its parsed `Retry-After`.
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    /// No answer within the endpoint's timeout.
    Timeout,
    /// Connection refused or reset, DNS failure, TLS failure, malformed response.
    Transport,
    /// We refused to send at all (SSRF guard, invalid URL, unusable secret): retrying cannot help.
    Refused,
}

/// What becomes of the delivery after this attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Try again after this delay.
    Retry(Duration),
    /// No more attempts: the delivery is a dead letter.
    Failed,
    /// 410 Gone: the receiver asked us to stop; the endpoint is disabled.
    Gone,
}

/// Decides a delivery's fate after attempt number `attempt` (1-based) of `max_attempts`.
/// `jitter` is a uniform random number in [-1, 1] (passed in so the logic is deterministic to test).
pub fn decide(
    outcome: &Outcome,
    attempt: u32,
    max_attempts: u32,
    schedule: &Schedule,
    jitter: f64,
) -> Verdict {
    let overloaded = match outcome {
        Outcome::Status {
            code: 200..=299, ..
        } => return Verdict::Delivered,
        Outcome::Status { code: 410, .. } => return Verdict::Gone,
        Outcome::Refused => return Verdict::Failed,
        Outcome::Status { code: 429, .. } | Outcome::Timeout => true,
        _ => false,
    };
    if attempt >= max_attempts {
        return Verdict::Failed;
    }
    let mut base = schedule.step_after(attempt);
    if overloaded {
        base = base.max(OVERLOAD_FLOOR.min(schedule.longest()));
    }
    let jittered = base.mul_f64(1.0 + JITTER * jitter.clamp(-1.0, 1.0));
    let delay = match outcome {
        Outcome::Status {
            code: 429 | 502 | 503 | 504,
            retry_after: Some(asked),
        } => (*asked).clamp(jittered, base * 2),
        _ => jittered,
    };
    Verdict::Retry(delay)
}

/// Parses a `Retry-After` header: delay-seconds or an HTTP-date (relative to `now`).
/// A date in the past means "now"; anything unparseable is ignored.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(MAX_STEP.as_secs())));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(
        when.duration_since(now)
            .unwrap_or(Duration::ZERO)
            .min(MAX_STEP),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }
    fn status(code: u16) -> Outcome {
        Outcome::Status {
            code,
            retry_after: None,
        }
    }

    #[test]
    fn default_schedule_is_standard_webhooks() {
        let d = Schedule::default();
        assert_eq!(
            d.steps(),
            &[s(5), s(300), s(1800), s(7200), s(18000), s(36000), s(36000)]
        );
        assert_eq!(d.default_max_attempts(), 8);
    }

    #[test]
    fn schedule_parsing_accepts_postgres_units_and_rejects_junk() {
        let p = Schedule::parse(" 250ms, 1.5s ,2min,1h,1d").unwrap();
        assert_eq!(
            p.steps(),
            &[
                Duration::from_millis(250),
                Duration::from_millis(1500),
                s(120),
                s(3600),
                s(86400)
            ]
        );
        assert_eq!(Schedule::parse(""), Err(ScheduleError::Empty));
        assert_eq!(
            Schedule::parse("5"),
            Err(ScheduleError::BadStep("5".into()))
        );
        assert_eq!(
            Schedule::parse("5s,,1h"),
            Err(ScheduleError::BadStep("".into()))
        );
        assert_eq!(
            Schedule::parse("5 parsecs"),
            Err(ScheduleError::BadStep("5 parsecs".into()))
        );
        assert_eq!(
            Schedule::parse("-5s"),
            Err(ScheduleError::BadStep("-5s".into()))
        );
        assert_eq!(
            Schedule::parse("8d"),
            Err(ScheduleError::TooLong("8d".into()))
        );
        assert_eq!(
            Schedule::parse(&vec!["1s"; 101].join(",")),
            Err(ScheduleError::TooManySteps)
        );
        assert_eq!(
            Schedule::parse("0,1s").unwrap().steps(),
            &[Duration::ZERO, s(1)]
        );
    }

    #[test]
    fn success_and_permanent_outcomes() {
        let d = Schedule::default();
        for code in [200, 201, 204, 299] {
            assert_eq!(decide(&status(code), 1, 8, &d, 0.0), Verdict::Delivered);
        }
        assert_eq!(decide(&status(410), 1, 8, &d, 0.0), Verdict::Gone);
        assert_eq!(decide(&Outcome::Refused, 1, 8, &d, 0.0), Verdict::Failed);
    }

    #[test]
    fn failures_follow_the_schedule_and_end_in_failed() {
        let d = Schedule::default();
        for code in [301, 302, 400, 404, 500] {
            assert_eq!(
                decide(&status(code), 1, 8, &d, 0.0),
                Verdict::Retry(s(5)),
                "{code}"
            );
        }
        assert_eq!(
            decide(&Outcome::Transport, 2, 8, &d, 0.0),
            Verdict::Retry(s(300))
        );
        assert_eq!(
            decide(&status(500), 7, 8, &d, 0.0),
            Verdict::Retry(s(36000))
        );
        assert_eq!(decide(&status(500), 8, 8, &d, 0.0), Verdict::Failed);
        // More attempts than steps: the last step repeats.
        assert_eq!(
            decide(&status(500), 9, 12, &d, 0.0),
            Verdict::Retry(s(36000))
        );
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let d = Schedule::default();
        assert_eq!(decide(&status(500), 2, 8, &d, 1.0), Verdict::Retry(s(360)));
        assert_eq!(decide(&status(500), 2, 8, &d, -1.0), Verdict::Retry(s(240)));
        assert_eq!(
            decide(&status(500), 2, 8, &d, 7.0),
            Verdict::Retry(s(360)),
            "clamped"
        );
    }

    #[test]
    fn overload_waits_at_least_a_minute_unless_the_schedule_is_shorter() {
        let d = Schedule::default();
        assert_eq!(decide(&status(429), 1, 8, &d, 0.0), Verdict::Retry(s(60)));
        assert_eq!(
            decide(&Outcome::Timeout, 1, 8, &d, 0.0),
            Verdict::Retry(s(60))
        );
        assert_eq!(
            decide(&Outcome::Timeout, 2, 8, &d, 0.0),
            Verdict::Retry(s(300))
        );
        let short = Schedule::parse("1s,2s").unwrap();
        assert_eq!(
            decide(&status(429), 1, 3, &short, 0.0),
            Verdict::Retry(s(2))
        );
    }

    #[test]
    fn retry_after_is_honoured_within_clamps() {
        let d = Schedule::default();
        let ra = |code, secs| Outcome::Status {
            code,
            retry_after: Some(s(secs)),
        };
        // 503 at attempt 2: base 300 s, Retry-After clamped into [300, 600].
        assert_eq!(decide(&ra(503, 450), 2, 8, &d, 0.0), Verdict::Retry(s(450)));
        assert_eq!(decide(&ra(503, 10), 2, 8, &d, 0.0), Verdict::Retry(s(300)));
        assert_eq!(
            decide(&ra(503, 99999), 2, 8, &d, 0.0),
            Verdict::Retry(s(600))
        );
        // 429 at attempt 1: base is the 60 s floor.
        assert_eq!(decide(&ra(429, 90), 1, 8, &d, 0.0), Verdict::Retry(s(90)));
        assert_eq!(
            decide(&ra(429, 1000), 1, 8, &d, 0.0),
            Verdict::Retry(s(120))
        );
        // Retry-After on other statuses is ignored.
        assert_eq!(decide(&ra(500, 450), 2, 8, &d, 0.0), Verdict::Retry(s(300)));
        // And never extends past the last attempt.
        assert_eq!(decide(&ra(503, 450), 8, 8, &d, 0.0), Verdict::Failed);
    }

    #[test]
    fn retry_after_parses_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + s(784111777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("120", now), Some(s(120)));
        assert_eq!(parse_retry_after(" 0 ", now), Some(s(0)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:51:37 GMT", now),
            Some(s(120))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:00:00 GMT", now),
            Some(s(0))
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-5", now), None);
        assert_eq!(parse_retry_after("99999999999", now), Some(MAX_STEP));
    }
}
