//! The limits of an endpoint's settings, defined once. The extension's settings
//! (`webhook.default_*`) take their ranges from here; the SQL side (the endpoints table's CHECKs
//! and create_endpoint/alter_endpoint's argument checks, which SQL cannot share with Rust) is
//! held to these figures by a `#[pg_test]` (`endpoint_limits_are_the_same_everywhere`).

/// An endpoint's `max_attempts` (and webhook.default_max_attempts, where 0 means "the retry
/// schedule's length + 1").
pub const MAX_ATTEMPTS: (i32, i32) = (1, 100);
/// An endpoint's `timeout` (and webhook.default_timeout), in milliseconds: more than 0, at most
/// five minutes.
pub const TIMEOUT_MS: (i32, i32) = (1, 300_000);
/// An endpoint's `max_in_flight` (and webhook.default_max_in_flight).
pub const MAX_IN_FLIGHT: (i32, i32) = (1, 10_000);
/// An endpoint's `rate_limit`: at least one delivery per second.
pub const MIN_RATE_LIMIT: i32 = 1;
