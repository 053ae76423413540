-- webhook_ext SQL API: what operators watch (endpoint_stats, metrics, worker_status).

-- Whether each endpoint's circuit is open, by the worker's rule (Health::is_open in
-- core/src/policy.rs; a #[pg_test] holds the two to the same answers): after
-- webhook.circuit_breaker_threshold consecutive failures, never with a threshold of 0. The two
-- views below read it from here. Not for PUBLIC (like every relation here); they read it with
-- their owner's rights.
CREATE VIEW webhook._circuits AS
SELECT ep.id AS endpoint_id,
       t.threshold > 0 AND COALESCE(s.consecutive_failures, 0) >= t.threshold AS open
  FROM webhook.endpoints ep
 CROSS JOIN (SELECT current_setting('webhook.circuit_breaker_threshold')::int AS threshold) t
  LEFT JOIN webhook._endpoint_state s ON s.endpoint_id = ep.id;

-- Per endpoint: queue, outcomes, the last hour's success rate and latency, the circuit breaker.
CREATE VIEW webhook.endpoint_stats AS
SELECT ep.id AS endpoint_id,
       ep.name,
       ep.enabled,
       (SELECT count(*) FROM webhook.deliveries d WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0)) AS pending,
       (SELECT count(*) FROM webhook.deliveries d WHERE d.endpoint_id = ep.id AND d.status = 'sending') AS sending,
       COALESCE(s.delivered_total, 0) AS delivered,
       COALESCE(s.failed_total, 0) AS failed,
       COALESCE(h.attempts, 0) AS attempts_last_hour,
       h.success_rate,
       h.latency_p50,
       h.latency_p95,
       COALESCE(s.consecutive_failures, 0) AS consecutive_failures,
       CASE WHEN NOT ep.enabled THEN 'disabled'
            WHEN NOT c.open THEN 'closed'
            WHEN EXISTS (SELECT FROM webhook.deliveries d WHERE d.endpoint_id = ep.id AND d.status = 'sending') THEN 'half-open'
            ELSE 'open' END AS circuit,
       s.failing_since,
       s.last_success_at,
       s.last_failure_at,
       CASE WHEN ep.ordered
            THEN (SELECT u.next_attempt_at FROM (
                      (SELECT d.id, d.next_attempt_at FROM webhook.deliveries d
                        WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.attempts = 0 ORDER BY d.id LIMIT 1)
                      UNION ALL
                      (SELECT d.id, d.next_attempt_at FROM webhook.deliveries d
                        WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.attempts > 0 ORDER BY d.id + 0 LIMIT 1)) u
                   ORDER BY u.id LIMIT 1)
            ELSE LEAST((SELECT d.next_attempt_at FROM webhook.deliveries d
                         WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.attempts = 0 ORDER BY d.id LIMIT 1),
                       (SELECT d.next_attempt_at FROM webhook.deliveries d
                         WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.attempts > 0 ORDER BY d.next_attempt_at LIMIT 1))
            END AS next_attempt_at,
       s.next_probe_at
  FROM webhook.endpoints ep
 JOIN webhook._circuits c ON c.endpoint_id = ep.id
  LEFT JOIN webhook._endpoint_state s ON s.endpoint_id = ep.id
  LEFT JOIN (SELECT a.endpoint_id,
                    count(*) AS attempts,
                    round(avg(CASE WHEN a.status_code BETWEEN 200 AND 299 THEN 1 ELSE 0 END), 4) AS success_rate,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration) AS latency_p50,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration) AS latency_p95
               FROM webhook.attempts a
              WHERE a.started_at > now() - interval '1 hour'
              GROUP BY a.endpoint_id) h ON h.endpoint_id = ep.id;

-- Counters and gauges for monitoring, one row per endpoint (see sql/postgres_exporter.yaml).
CREATE VIEW webhook.metrics AS
SELECT ep.name AS endpoint,
       ep.enabled,
       (SELECT count(*) FROM webhook.deliveries d WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0)) AS pending,
       (SELECT count(*) FROM webhook.deliveries d WHERE d.endpoint_id = ep.id AND d.status = 'sending') AS sending,
       COALESCE(s.delivered_total, 0) AS delivered_total,
       COALESCE(s.failed_total, 0) AS failed_total,
       COALESCE(s.consecutive_failures, 0) AS consecutive_failures,
       c.open::int AS circuit_open,
       COALESCE(extract(epoch FROM now() - LEAST(
           (SELECT d.created_at FROM webhook.deliveries d
             WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.attempts = 0 ORDER BY d.id LIMIT 1),
           (SELECT min(d.created_at) FROM webhook.deliveries d
             WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.attempts > 0))), 0)::float8 AS oldest_pending_seconds
  FROM webhook.endpoints ep
 JOIN webhook._circuits c ON c.endpoint_id = ep.id
  LEFT JOIN webhook._endpoint_state s ON s.endpoint_id = ep.id;

CREATE FUNCTION webhook.worker_status()
RETURNS TABLE (database text, pid integer, state text, started_at timestamptz, last_wake timestamptz,
               in_flight integer, queue_depth bigint, attempts bigint, delivered bigint, failed bigint,
               worker integer)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.database, s.pid, s.state, to_timestamp(s.started_us / 1e6), to_timestamp(s.last_wake_us / 1e6),
           s.in_flight,
           CASE WHEN s.database = current_database()
                THEN (SELECT count(*) FROM webhook.deliveries d WHERE d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0)) END,
           s.attempts, s.delivered, s.failed, s.worker
      FROM webhook._worker_slots() s
    UNION ALL
    -- This database when no worker serves it: not listed, or a hot standby (workers start when
    -- recovery ends, on promotion).
    SELECT current_database(), NULL,
           CASE WHEN current_database() <> ALL (webhook._served_databases())
                THEN 'not served: add this database to webhook.database'
                ELSE 'standby: delivers once promoted' END,
           NULL, NULL, 0, (SELECT count(*) FROM webhook.deliveries d WHERE d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0)), 0, 0, 0, NULL
     WHERE current_database() <> ALL (webhook._served_databases()) OR pg_is_in_recovery()
    ORDER BY 1, 11
$$;

-- The ed25519 public keys receivers verify v1a signatures with: public, so readable by every
-- role that may use the schema (GRANT USAGE ON SCHEMA webhook TO a role that serves them), which
-- sees nothing else of webhook.endpoints. The previous key is shown while its grace period runs.
CREATE VIEW webhook.public_keys WITH (security_barrier) AS
SELECT e.name AS endpoint,
       e.signing,
       webhook._public_key(e.signing_key) AS public_key,
       CASE WHEN e.previous_signing_key_expires_at > now() THEN webhook._public_key(e.previous_signing_key) END AS previous_public_key,
       CASE WHEN e.previous_signing_key_expires_at > now() THEN e.previous_signing_key_expires_at END AS previous_expires_at
  FROM webhook.endpoints e
 WHERE e.signing_key IS NOT NULL;
