//! The statements the delivery worker runs. Each is one round trip; arrays carry batches.

use pgrx::pg_sys::{
    BOOLOID as BOOL, FLOAT8ARRAYOID as FLOAT8_ARRAY, FLOAT8OID as FLOAT8,
    INT4ARRAYOID as INT4_ARRAY, INT4OID as INT4, INT8ARRAYOID as INT8_ARRAY, INT8OID as INT8,
    TEXTARRAYOID as TEXT_ARRAY, TEXTOID as TEXT,
};

use crate::pg::spi::Statement;

// Two idioms of the queue, defined once here and used by the statements below.
//
// The deliveries table has two partial indexes for pending work: new deliveries
// (`status = 'pending' AND attempts = 0`, in id order) and retries (`status = 'pending' AND
// attempts > 0`, by due time). `status = 'pending'` alone implies neither index's predicate, so
// a query that wants every pending delivery says `(attempts = 0 OR attempts > 0)`: always true
// for a pending delivery, and what lets the planner answer from both indexes. Only the backlog
// benchmark notices its removal, and the EXPLAIN test (src/sql_tests.rs) that guards it.

/// Every pending delivery of alias `$d` (new or retry), readable from both partial indexes.
macro_rules! pending {
    ($d:literal) => {
        concat!(
            $d,
            ".status = 'pending' AND (",
            $d,
            ".attempts = 0 OR ",
            $d,
            ".attempts > 0)"
        )
    };
}

/// The endpoints of one worker's share (`split::Split::owns`): `$id mod $parts = $part`, the
/// remainder taken non-negative (as Rust's `rem_euclid`), whatever the id's sign.
macro_rules! owned_by {
    ($id:literal, $parts:literal, $part:literal) => {
        concat!("(", $id, " % ", $parts, " + ", $parts, ") % ", $parts, " = ", $part)
    };
}

/// The head of the endpoint whose id is `$ep`: its first pending delivery in routing order
/// (`routing_pass`, then id: the order its events' transactions committed in, as the router
/// found them), new or retry, due or not (an ordered endpoint sends only its head). Columns `id,
/// event_id, next_attempt_at`, `fresh` (never attempted).
/// The first new one (above the endpoint's floor `($pass, $floor)`: `floors::Floors`) and the first
/// retry — the latter sorted by `routing_pass + 0, id + 0`, so it is read from the retry index
/// and sorted, never found by walking the primary key.
macro_rules! head_of {
    ($ep:literal, $pass:literal, $floor:literal) => {
        concat!(
            "SELECT u.id, u.event_id, u.next_attempt_at, u.fresh, u.routing_pass FROM (
               (SELECT x.id, x.event_id, x.next_attempt_at, true AS fresh, x.routing_pass FROM webhook._deliveries x
                 WHERE x.status = 'pending' AND x.attempts = 0 AND x.endpoint_id = ",
            $ep,
            " AND (x.routing_pass, x.id) > (",
            $pass,
            ", ",
            $floor,
            ")
                 ORDER BY x.routing_pass, x.id LIMIT 1)
               UNION ALL
               (SELECT x.id, x.event_id, x.next_attempt_at, false, x.routing_pass FROM webhook._deliveries x
                 WHERE x.status = 'pending' AND x.attempts > 0 AND x.endpoint_id = ",
            $ep,
            "
                 ORDER BY x.routing_pass + 0, x.id + 0 LIMIT 1)) u
            ORDER BY u.routing_pass, u.id
            LIMIT 1"
        )
    };
}

/// Claims up to $4 due deliveries: per endpoint at most its free capacity, taken round-robin
/// across endpoints (every endpoint's oldest first), `FOR UPDATE SKIP LOCKED`, marked `sending`
/// with a lease. An ordered endpoint offers only its head (oldest pending), and only when due.
/// $1/$2: endpoints with requests under way, and how many; $3 default per-endpoint limit;
/// $5 default timeout (ms); $6 lease margin (ms); $7/$8: endpoints the worker limits further
/// (circuit breaker, rate limit), and how many each may take now; $9: healthy endpoints (their
/// last attempt succeeded), which go first; $10: how many the others may take in all, so that
/// endpoints that hang or fail can never hold every request slot; $11: bytes of request bodies
/// the claim may take, by the sizes events recorded; $12: take the first delivery even if it is
/// larger (when nothing else is under way, so a large body is never stuck); $13/$14: this
/// worker's share of the endpoints (`split::Split`: `id mod parts = part`, the remainder taken
/// non-negative as Rust's `rem_euclid`, whatever the id's sign); $15/$16/$17: endpoints'
/// floors, as ids and routing passes (`floors::Floors`: new deliveries are read above them in
/// routing order; (0, 0) for an endpoint not listed). The last columns: the delivery's routing
/// pass, its event's traceparent, and the endpoint's first new delivery (routing pass, id) the claim picked but did not
/// take, if any.
pub static CLAIM: Statement = Statement::new(
    "claim",
    concat!(
        r#"
WITH cap AS (
    SELECT ep.id, ep.ordered, NOT (ep.id = ANY ($9::int[])) AS suspect, COALESCE(f.below, 0) AS floor,
           COALESCE(f.pass, 0) AS floor_pass,
           LEAST(CASE WHEN ep.ordered THEN 1 ELSE COALESCE(ep.max_in_flight, $3) END - COALESCE(b.n, 0),
                 COALESCE(o.n, $4), $4) AS n
      FROM webhook.endpoints ep
      LEFT JOIN unnest($1::int[], $2::int[]) AS b(id, n) ON b.id = ep.id
      LEFT JOIN unnest($7::int[], $8::int[]) AS o(id, n) ON o.id = ep.id
      LEFT JOIN unnest($15::int[], $16::int8[], $17::int8[]) AS f(id, below, pass) ON f.id = ep.id
     WHERE ep.enabled AND "#,
        owned_by!("ep.id", "$13", "$14"),
        r#"
), cand AS (
    SELECT d.id, d.event_id, cap.suspect, row_number() OVER (PARTITION BY d.endpoint_id ORDER BY d.routing_pass, d.id) AS rn,
           d.endpoint_id, d.fresh, d.routing_pass
      FROM cap
     CROSS JOIN LATERAL (
           -- New deliveries (due since they were made) oldest first, and retries that are due,
           -- each from its own index: retries waiting for later are never read.
           SELECT u.id, u.endpoint_id, u.event_id, u.fresh, u.routing_pass FROM (
               (SELECT x.id, x.endpoint_id, x.event_id, true AS fresh, x.routing_pass FROM webhook._deliveries x
                 WHERE x.status = 'pending' AND x.attempts = 0 AND x.endpoint_id = cap.id
                   AND (x.routing_pass, x.id) > (cap.floor_pass, cap.floor) AND x.next_attempt_at <= now()
                 ORDER BY x.routing_pass, x.id LIMIT cap.n)
               UNION ALL
               (SELECT x.id, x.endpoint_id, x.event_id, false, x.routing_pass FROM webhook._deliveries x
                 WHERE x.status = 'pending' AND x.attempts > 0 AND x.endpoint_id = cap.id
                   AND x.next_attempt_at <= now()
                 ORDER BY x.next_attempt_at LIMIT cap.n)) u
            -- In routing order, so that the new ones taken are the first of theirs (floors).
            ORDER BY u.routing_pass, u.id
            LIMIT cap.n) d
     WHERE cap.n > 0 AND NOT cap.ordered AND (NOT cap.suspect OR $10 > 0)
    UNION ALL
    SELECT h.id, h.event_id, cap.suspect, 1, cap.id, h.fresh, h.routing_pass
      FROM cap
     CROSS JOIN LATERAL ("#,
        head_of!("cap.id", "cap.floor_pass", "cap.floor"),
        r#") h
     WHERE cap.n > 0 AND cap.ordered AND h.next_attempt_at <= now() AND (NOT cap.suspect OR $10 > 0)
), pick AS (
    SELECT c.id, c.event_id, c.endpoint_id, c.fresh, c.routing_pass,
           row_number() OVER (ORDER BY c.suspect, c.rn, c.id) AS ord
      FROM (SELECT cand.*, row_number() OVER (PARTITION BY cand.suspect ORDER BY cand.rn, cand.id) AS k FROM cand) c
     WHERE NOT c.suspect OR c.k <= $10
     ORDER BY c.suspect, c.rn, c.id
     LIMIT $4
), sized AS (
    -- Events from before 0.3.0 have no size: measured here (rare, and only until they drain).
    SELECT z.*, sum(z.size) OVER (ORDER BY z.ord) AS running
      FROM (SELECT p.id, p.ord,
                   COALESCE(e.size, 64 + COALESCE(octet_length(e.payload::text), 0)
                            + COALESCE(octet_length(e.new::text), 0) + COALESCE(octet_length(e.old::text), 0)) AS size
              FROM pick p
              JOIN webhook._events e ON e.id = p.event_id) z
), locked AS (
    -- A primary-key lookup: `status = 'pending'` alone implies neither partial index.
    SELECT d.id, sized.size FROM webhook._deliveries d
      JOIN sized ON sized.id = d.id
     WHERE ((sized.ord = 1 AND $12) OR sized.running <= $11)
       AND d.status = 'pending'
       FOR UPDATE OF d SKIP LOCKED
), upd AS (
UPDATE webhook._deliveries d
   SET status = 'sending',
       next_attempt_at = now() + (COALESCE(ep.timeout, $5 * interval '1 ms') + $6 * interval '1 ms')
  FROM locked, webhook._events e, webhook.endpoints ep
 WHERE d.id = locked.id AND e.id = d.event_id AND ep.id = d.endpoint_id
RETURNING d.id, d.endpoint_id, d.attempts, e.type,
          (extract(epoch FROM e.created_at) * 1000000)::int8,
          e.payload::text, ep.url, ep.secret,
          CASE WHEN ep.previous_secret_expires_at > now() THEN ep.previous_secret END AS previous_secret,
          ep.headers::text,
          COALESCE((extract(epoch FROM ep.timeout) * 1000)::int8, $5::int8),
          ep.max_attempts, ep.retry_schedule,
          e.schema_name, e.table_name, e.op, e.new::text, e.old::text, e.txid, locked.size,
          -- Read with every claim: a restore adds the source's (older) row after CREATE EXTENSION.
          (SELECT m.install_id FROM webhook._meta m ORDER BY m.created_at, m.install_id LIMIT 1),
          d.routing_pass, e.traceparent,
          ep.signing, ep.signing_key,
          CASE WHEN ep.previous_signing_key_expires_at > now() THEN ep.previous_signing_key END,
          -- The endpoint row's version when it has a client certificate: the worker keeps each
          -- certificate checked in memory, and reads it (IDENTITIES) when its row changed.
          CASE WHEN ep.client_cert IS NOT NULL THEN ep.xmin::text::int8 END,
          ep.proxy, ep.oauth_token_url, ep.oauth_client_id, ep.oauth_client_secret, ep.oauth_scope
)
-- And, per endpoint, the lowest new delivery picked but not taken (held by another transaction,
-- its event not visible, or over the byte budget): the endpoint's floor stays below it. (A set
-- difference, sorted or hashed: as an anti-join the worker's planner settings made it a nested
-- loop over picked × taken rows, 94 of the 100 ms a claim of 1,000 took.)
, hole AS (
    SELECT DISTINCT ON (z.endpoint_id) z.endpoint_id, z.routing_pass AS hole_pass, z.id AS hole
      FROM (SELECT p.endpoint_id, p.routing_pass, p.id FROM pick p WHERE p.fresh
            EXCEPT
            SELECT u.endpoint_id, u.routing_pass, u.id FROM upd u) z
     ORDER BY z.endpoint_id, z.routing_pass, z.id
)
SELECT upd.*, h.hole_pass, h.hole
  FROM upd
  LEFT JOIN hole h ON h.endpoint_id = upd.endpoint_id
"#
    ),
    &[
        INT4_ARRAY, INT4_ARRAY, INT4, INT4, INT4, INT8, INT4_ARRAY, INT4_ARRAY, INT4_ARRAY, INT4,
        INT8, BOOL, INT4, INT4, INT4_ARRAY, INT8_ARRAY, INT8_ARRAY,
    ],
)
.generic_plan();

/// An operational event about endpoint $1, of type $2 with payload $3: a NOTIFY webhook_ops,
/// and a webhook to webhook.ops_endpoint (`webhook._ops_event`).
pub static OPS_EVENT: Statement = Statement::new(
    "ops_event",
    "SELECT webhook._ops_event($1, $2, $3::jsonb)",
    &[INT4, TEXT, TEXT],
);

/// The pending deliveries (new and retries) of each enabled endpoint of this worker's share
/// ($2/$3), each kind counted up to $1 (the backlog threshold + 1: index entries read stay
/// bounded however large a backlog grows).
pub static BACKLOGS: Statement = Statement::new(
    "backlogs",
    concat!(
        r#"
SELECT ep.id,
       (SELECT count(*) FROM (SELECT 1 FROM webhook._deliveries d
                               WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.attempts = 0
                               LIMIT $1) n)
     + (SELECT count(*) FROM (SELECT 1 FROM webhook._deliveries d
                               WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.attempts > 0
                               LIMIT $1) r)
  FROM webhook.endpoints ep
 WHERE ep.enabled AND "#,
        owned_by!("ep.id", "$2", "$3"),
        "
"
    ),
    &[INT8, INT4, INT4],
);

/// The pending deliveries of endpoint $1, all counted (for a backlog event's payload).
pub static BACKLOG_OF: Statement = Statement::new(
    "backlog_of",
    concat!(
        "SELECT count(*) FROM webhook._deliveries d WHERE d.endpoint_id = $1 AND ",
        pending!("d"),
        "
"
    ),
    &[INT4],
);

/// The client certificates (mutual TLS) of endpoints $1, with their rows' versions.
pub static IDENTITIES: Statement = Statement::new(
    "identities",
    r#"
SELECT ep.id, ep.xmin::text::int8, ep.client_cert, ep.client_key
  FROM webhook.endpoints ep
 WHERE ep.id = ANY ($1) AND ep.client_cert IS NOT NULL
"#,
    &[INT4_ARRAY],
);

/// Milliseconds until the next pending delivery of an endpoint with room is due (an ordered
/// endpoint: its head). $1/$2 busy, $3 default limit, $4/$5 limits, as for CLAIM; $6 healthy
/// endpoints and $7 whether the others have room left; $8/$9 this worker's share of the
/// endpoints (`split::Split`); $10/$11/$12 the endpoints' floors, as for CLAIM.
/// Also the endpoints (not ordered) it found no new delivery of above their floors, and the
/// highest computed delivery id there is (the identity's ids, from 2^62, left out): their floors
/// may rise to it (`floors::Floors::none_new_up_to`), so that neither the claim nor this reads
/// again the dead index entries an endpoint's new deliveries left when they were all changed
/// by hand (200,000 made retries by an UPDATE: 0.6 ms a claim and 0.5 ms a look here, at every
/// wake-up, for every endpoint, until VACUUM).
pub static NEXT_DUE: Statement = Statement::new(
    "next_due",
    concat!(
        r#"
SELECT (extract(epoch FROM min(s.t) - clock_timestamp()) * 1000)::int8,
       array_agg(s.id) FILTER (WHERE s.none_new),
       CASE WHEN bool_or(s.none_new)
            THEN (SELECT x.id FROM webhook._deliveries x WHERE x.id < 4611686018427387904
                   ORDER BY x.id DESC LIMIT 1)
       END
  FROM (SELECT ep.id,
               CASE WHEN ep.ordered
                    THEN (SELECT h.next_attempt_at FROM ("#,
        head_of!("ep.id", "COALESCE(f.pass, 0)", "COALESCE(f.below, 0)"),
        r#") h)
                    ELSE LEAST(
                        n.next_attempt_at,
                        (SELECT x.next_attempt_at FROM webhook._deliveries x
                          WHERE x.status = 'pending' AND x.attempts > 0 AND x.endpoint_id = ep.id
                          ORDER BY x.next_attempt_at LIMIT 1))
               END AS t,
               NOT ep.ordered AND n.id IS NULL AS none_new
          FROM webhook.endpoints ep
          LEFT JOIN unnest($1::int[], $2::int[]) AS b(id, n) ON b.id = ep.id
          LEFT JOIN unnest($4::int[], $5::int[]) AS o(id, n) ON o.id = ep.id
          LEFT JOIN unnest($10::int[], $11::int8[], $12::int8[]) AS f(id, below, pass) ON f.id = ep.id
          LEFT JOIN LATERAL (
                SELECT x.id, x.next_attempt_at FROM webhook._deliveries x
                 WHERE x.status = 'pending' AND x.attempts = 0 AND x.endpoint_id = ep.id
                   AND (x.routing_pass, x.id) > (COALESCE(f.pass, 0), COALESCE(f.below, 0))
                 ORDER BY x.routing_pass, x.id LIMIT 1) n ON NOT ep.ordered
         WHERE ep.enabled AND "#,
        owned_by!("ep.id", "$8", "$9"),
        r#"
           AND CASE WHEN ep.ordered THEN 1 ELSE COALESCE(ep.max_in_flight, $3) END > COALESCE(b.n, 0)
           AND COALESCE(o.n, 1) > 0
           AND (ep.id = ANY ($6::int[]) OR $7)) s
"#
    ),
    &[
        INT4_ARRAY, INT4_ARRAY, INT4, INT4_ARRAY, INT4_ARRAY, INT4_ARRAY, BOOL, INT4, INT4,
        INT4_ARRAY, INT8_ARRAY, INT8_ARRAY,
    ],
)
.generic_plan();

/// What the worker needs to know about its endpoints ($1/$2: its share, as for CLAIM) to limit
/// them itself: rate limits, and when each was last changed (an operator's change resets an
/// open circuit).
pub static POLICIES: Statement = Statement::new(
    "policies",
    concat!(
        r#"
SELECT id, rate_limit, extract(epoch FROM updated_at)::float8
  FROM webhook.endpoints
 WHERE enabled AND "#,
        owned_by!("id", "$1", "$2"),
        "\n"
    ),
    &[INT4, INT4],
);

/// Writes a batch of finished attempts: a row each in `attempts`, and the deliveries' new state.
///
/// `was`, the status a delivery being recorded has, is a column of the batch rather than a
/// constant in the UPDATE's WHERE, so the planner cannot drive the UPDATE from the sending index
/// (every delivery under way) and read the batch again for each of them: after the worker's
/// ANALYZE of a burst it did, and recording 20,000 deliveries took 3.3 s instead of 0.6
/// (`#[pg_test] recording_probes_the_deliveries_by_key_whatever_the_statistics`).
pub static RECORD: Statement = Statement::new(
    "record",
    r#"
WITH r AS (
    SELECT u.*, 'sending'::webhook.delivery_status AS was
      FROM unnest($1::int8[], $2::int4[], $3::text[], $4::int4[], $5::text[], $6::text[],
                  $7::float8[], $8::int8[], $9::int8[], $10::int4[])
           AS u(id, attempt, status, code, error, body, started, micros, delay_ms, endpoint_id)
), a AS (
    INSERT INTO webhook.attempts (delivery_id, attempt, endpoint_id, started_at, duration, status_code, response_body, error)
    SELECT id, attempt, endpoint_id, to_timestamp(started), micros * interval '1 microsecond', code, body, error FROM r
    ON CONFLICT (delivery_id, attempt) DO NOTHING
)
-- A retry for an endpoint that was disabled or dropped while the request was under way would
-- never be claimed: it is cancelled instead, as disable_endpoint/drop_endpoint cancel the rest.
, v AS (
    SELECT r.*,
           CASE WHEN r.status <> 'pending' THEN r.status
                WHEN EXISTS (SELECT FROM webhook.endpoints e WHERE e.id = r.endpoint_id AND e.enabled) THEN 'pending'
                ELSE 'cancelled' END AS final,
           CASE WHEN r.status <> 'pending' THEN NULL
                WHEN NOT EXISTS (SELECT FROM webhook.endpoints e WHERE e.id = r.endpoint_id) THEN 'endpoint dropped'
                WHEN NOT EXISTS (SELECT FROM webhook.endpoints e WHERE e.id = r.endpoint_id AND e.enabled) THEN 'endpoint disabled'
           END AS why
      FROM r
)
UPDATE webhook._deliveries d
   SET status = v.final::webhook.delivery_status,
       attempts = v.attempt,
       last_status_code = v.code,
       last_error = CASE WHEN v.why IS NULL THEN v.error
                         ELSE v.why || COALESCE(' (last attempt: ' || v.error || ')', '') END,
       next_attempt_at = CASE WHEN v.final = 'pending' THEN clock_timestamp() + v.delay_ms * interval '1 ms' END,
       delivered_at = CASE WHEN v.final = 'delivered' THEN clock_timestamp() END
  FROM v
 WHERE d.id = v.id AND d.status = v.was
"#,
    &[
        INT8_ARRAY,
        INT4_ARRAY,
        TEXT_ARRAY,
        INT4_ARRAY,
        TEXT_ARRAY,
        TEXT_ARRAY,
        FLOAT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
        INT4_ARRAY,
    ],
)
.generic_plan();

/// Writes changed endpoint health (the circuit breaker's state and the delivered/failed counters).
pub static SAVE_HEALTH: Statement = Statement::new(
    "save_health",
    r#"
INSERT INTO webhook._endpoint_state AS s
       (endpoint_id, consecutive_failures, failing_since, last_success_at, last_failure_at, next_probe_at,
        delivered_total, failed_total)
SELECT h.id, h.failures, to_timestamp(h.since), to_timestamp(h.ok), to_timestamp(h.bad), to_timestamp(h.probe),
       h.delivered, h.failed
  FROM unnest($1::int4[], $2::int4[], $3::float8[], $4::float8[], $5::float8[], $6::float8[], $7::int8[], $8::int8[])
       AS h(id, failures, since, ok, bad, probe, delivered, failed)
  WHERE EXISTS (SELECT FROM webhook.endpoints e WHERE e.id = h.id)
ON CONFLICT (endpoint_id) DO UPDATE
   SET consecutive_failures = excluded.consecutive_failures,
       failing_since = excluded.failing_since,
       last_success_at = COALESCE(excluded.last_success_at, s.last_success_at),
       last_failure_at = COALESCE(excluded.last_failure_at, s.last_failure_at),
       next_probe_at = excluded.next_probe_at,
       delivered_total = s.delivered_total + excluded.delivered_total,
       failed_total = s.failed_total + excluded.failed_total
"#,
    &[
        INT4_ARRAY,
        INT4_ARRAY,
        FLOAT8_ARRAY,
        FLOAT8_ARRAY,
        FLOAT8_ARRAY,
        FLOAT8_ARRAY,
        INT8_ARRAY,
        INT8_ARRAY,
    ],
)
.generic_plan();

/// The circuit breaker's state of every endpoint, read when the worker starts.
pub static LOAD_HEALTH: Statement = Statement::new(
    "load_health",
    r#"
SELECT endpoint_id, consecutive_failures, extract(epoch FROM failing_since)::float8,
       extract(epoch FROM last_success_at)::float8, extract(epoch FROM last_failure_at)::float8,
       extract(epoch FROM next_probe_at)::float8
  FROM webhook._endpoint_state
"#,
    &[],
);

/// Disables endpoints ($1) with a reason each ($2) and cancels what is still pending for them.
pub static DISABLE: Statement = Statement::new(
    "disable",
    concat!(
        r#"
WITH off AS (
    UPDATE webhook.endpoints e
       SET enabled = false, updated_at = now(), disabled_reason = r.reason
      FROM unnest($1::int4[], $2::text[]) AS r(id, reason)
     WHERE e.id = r.id AND e.enabled
    RETURNING e.id, r.reason
)
UPDATE webhook._deliveries d
   SET status = 'cancelled', next_attempt_at = NULL, last_error = 'endpoint disabled: ' || off.reason
  FROM off
 WHERE d.endpoint_id = off.id AND d.endpoint_id = ANY ($1::int4[])
   AND "#,
        pending!("d"),
        "\n"
    ),
    &[INT4_ARRAY, TEXT_ARRAY],
);

/// Deliveries left `sending` by a worker that is gone, or whose lease expired: due again now,
/// with the same `webhook-id`. $1: deliveries this worker still has under way; $2: all of them;
/// $3/$4: this worker's share of the endpoints (`split::Split`).
pub static RECOVER: Statement = Statement::new(
    "recover",
    concat!(
        r#"
UPDATE webhook._deliveries SET status = 'pending', next_attempt_at = now()
 WHERE status = 'sending' AND NOT (id = ANY($1)) AND ($2 OR next_attempt_at < now())
   AND "#,
        owned_by!("endpoint_id", "$3", "$4"),
        "\n"
    ),
    &[INT8_ARRAY, BOOL, INT4, INT4],
);

/// Deletes up to $2 finished deliveries created before $1 (unix seconds), their attempts, and
/// events left without deliveries; returns how many deliveries went.
pub static PURGE_STEP: Statement = Statement::new(
    "purge_step",
    "SELECT webhook._purge_step(to_timestamp($1), $2)",
    &[FLOAT8, INT4],
);

/// Deletes up to $2 events older than $1 (unix seconds) that never had a delivery.
pub static PURGE_ORPHANS: Statement = Statement::new(
    "purge_orphans",
    "SELECT webhook._purge_orphans(to_timestamp($1), $2)",
    &[FLOAT8, INT4],
);

/// The subscription, if any, that replicates webhook's queue into this database (the catalog
/// of a logical replication subscriber).
pub static REPLICATED_BY: Statement = Statement::new(
    "replicated_by",
    r#"
SELECT s.subname::text
  FROM pg_catalog.pg_subscription_rel r
  JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid
 WHERE r.srrelid IN ('webhook._deliveries'::regclass, 'webhook._events'::regclass, 'webhook.endpoints'::regclass)
 LIMIT 1
"#,
    &[],
);

/// What the planner believes the deliveries table holds (see `StatsWatch`).
pub static PLANNER_ROWS: Statement = Statement::new(
    "planner_rows",
    "SELECT reltuples::float8 FROM pg_catalog.pg_class WHERE oid = 'webhook._deliveries'::regclass",
    &[],
);

/// Refreshes the queue's statistics; skipped while another ANALYZE or VACUUM has the table.
pub static ANALYZE: Statement = Statement::new(
    "analyze",
    "ANALYZE (SKIP_LOCKED) webhook._deliveries, webhook._events",
    &[],
);

// Routing (route.rs): each statement takes its own snapshot, in this order.

/// The oldest xid still running (`txid_current_snapshot()`'s xmin), the events' id sequence, and
/// the last id it handed out (0 if none yet); NULL for that if the sequence caches values per
/// backend (CACHE > 1: an id at or below it may still be handed out later, so the watermark must
/// not rise on it).
pub static SNAPSHOT_XMIN: Statement = Statement::new(
    "route_xmin",
    "SELECT pg_catalog.txid_snapshot_xmin(pg_catalog.txid_current_snapshot()), s.seqrelid::pg_catalog.int8,
            CASE WHEN s.seqcache OPERATOR(pg_catalog.=) 1
                 THEN COALESCE(pg_catalog.pg_sequence_last_value(s.seqrelid), 0) END
       FROM pg_catalog.pg_sequence s
      WHERE s.seqrelid OPERATOR(pg_catalog.=) pg_catalog.pg_get_serial_sequence('webhook._events', 'id')::pg_catalog.regclass",
    &[],
);
/// The routing watermark (a restored dump brings its own row beside ours: the highest counts).
pub static ROUTED_BELOW: Statement = Statement::new(
    "route_watermark",
    "SELECT COALESCE(pg_catalog.max(r.routed_below), 0) FROM webhook._router r",
    &[],
);
/// Makes the deliveries of committed events' routes at or above the watermark $1 (the one the
/// router holds in memory); returns how many.
pub static ROUTE: Statement =
    Statement::new("route", "SELECT webhook._route($1)", &[INT8]).generic_plan();
/// Raises the watermark to $1.
pub static RAISE_WATERMARK: Statement = Statement::new(
    "route_raise",
    "WITH raised AS (UPDATE webhook._router SET routed_below = $1 WHERE routed_below < $1 RETURNING 1)
     INSERT INTO webhook._router SELECT $1 WHERE NOT EXISTS (SELECT FROM webhook._router)",
    &[INT8],
);
/// This transaction's own xid, assigned by this statement (NULL if it had one already: an xid
/// assigned earlier is not above every xid assigned before this statement). (A snapshot's xmax is not that: it is the last *finished* xid + 1, and a
/// transaction still running with a newer xid holds back neither it nor a later xmin.)
pub static OWN_XID: Statement =
    Statement::new(
        "route_own_xid",
        "SELECT CASE WHEN pg_catalog.txid_current_if_assigned() IS NULL THEN pg_catalog.txid_current() END",
        &[],
    );

/// Every statement above, for `webhook._worker_statements()`: the isolation specs
/// (tests/isolation) prepare them and race exactly what the installed worker runs against the
/// SQL API. A statement missing here is missing from the specs' reach, not from the worker.
pub static ALL: &[&Statement] = &[
    &CLAIM,
    &NEXT_DUE,
    &POLICIES,
    &RECORD,
    &SAVE_HEALTH,
    &LOAD_HEALTH,
    &DISABLE,
    &RECOVER,
    &PURGE_STEP,
    &PURGE_ORPHANS,
    &REPLICATED_BY,
    &PLANNER_ROWS,
    &ANALYZE,
    &SNAPSHOT_XMIN,
    &ROUTED_BELOW,
    &ROUTE,
    &RAISE_WATERMARK,
    &OWN_XID,
];
