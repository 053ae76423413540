-- The monitoring views, filled with fixtures (the worker is paused, so what it would record is
-- set by hand): webhook.endpoint_stats, webhook.metrics, and worker_status().queue_depth.
-- Their column lists are in catalog.sql; webhook.events and webhook.subscriptions are
-- exercised in triggers.sql, send.sql and subscriptions.sql.
\set SHOW_CONTEXT never
SET timezone = 'UTC';
TRUNCATE webhook._deliveries, webhook._events, webhook.attempts, webhook._endpoint_state;

-- Endpoints: "ordered" (ordered), "plain", "broken" (failing, nothing being sent), "off"
-- (disabled), "idle" (nothing ever happened).
SELECT count(*) AS created FROM (
    SELECT webhook.create_endpoint('ordered', 'https://o.example.com', ordered => true)
    UNION ALL SELECT webhook.create_endpoint('plain', 'https://p.example.com')
    UNION ALL SELECT webhook.create_endpoint('broken', 'https://b.example.com')
    UNION ALL SELECT webhook.create_endpoint('off', 'https://x.example.com')
    UNION ALL SELECT webhook.create_endpoint('idle', 'https://i.example.com')) c;
SELECT webhook.disable_endpoint('off', 'maintenance');

BEGIN;
-- Deliveries of "ordered" and "plain", each: two new ones (created 90 and 30 seconds ago, due
-- 2030-01-01 and 2030-01-02), one retry (created an hour ago, due 2030-01-03), one being sent.
-- "broken": one retry (created two hours ago).
CREATE TEMP TABLE ids AS SELECT name, id FROM webhook.endpoints;
INSERT INTO webhook._events (id, type, payload) VALUES (1, 't.x', '{}');
INSERT INTO webhook._deliveries (event_id, endpoint_id, status, attempts, created_at, next_attempt_at)
SELECT 1, ids.id, f.status::webhook.delivery_status, f.attempts, now() - f.age, f.due
  FROM ids, (VALUES ('pending', 0, interval '90 s', timestamptz '2030-01-01 00:00+00'),
                    ('pending', 0, interval '30 s', timestamptz '2030-01-02 00:00+00'),
                    ('pending', 3, interval '60 min', timestamptz '2030-01-03 00:00+00'),
                    ('sending', 1, interval '10 s', now() + interval '1 min')) f(status, attempts, age, due)
 WHERE ids.name IN ('ordered', 'plain');
INSERT INTO webhook._deliveries (event_id, endpoint_id, status, attempts, created_at, next_attempt_at)
SELECT 1, id, 'pending', 12, now() - interval '2 hours', timestamptz '2030-02-01 00:00+00' FROM ids WHERE name = 'broken';
-- The worker's per-endpoint state: totals, the failure streak (12 >= the threshold of 10 opens
-- the circuit), when it began, the next probe.
INSERT INTO webhook._endpoint_state (endpoint_id, consecutive_failures, failing_since, last_success_at, last_failure_at, next_probe_at, delivered_total, failed_total)
SELECT id, CASE name WHEN 'plain' THEN 0 ELSE 12 END,
       CASE WHEN name <> 'plain' THEN timestamptz '2029-12-01 00:00+00' END,
       timestamptz '2029-11-30 00:00+00', timestamptz '2029-12-02 00:00+00',
       CASE WHEN name <> 'plain' THEN timestamptz '2030-01-05 00:00+00' END,
       100, 7
  FROM ids WHERE name IN ('ordered', 'plain', 'broken', 'off');
-- Attempts of "plain" in the last hour: 4, three 2xx, durations 10 to 40 ms; one older one
-- (not counted).
INSERT INTO webhook.attempts (delivery_id, attempt, endpoint_id, started_at, duration, status_code)
SELECT 1000 + a, 1, (SELECT id FROM ids WHERE name = 'plain'), now() - interval '5 min',
       a * interval '10 ms', CASE WHEN a = 4 THEN 503 ELSE 200 + a END
  FROM generate_series(1, 4) a
UNION ALL
SELECT 2000, 1, (SELECT id FROM ids WHERE name = 'plain'), now() - interval '2 hours', interval '5 s', 500;

\x on
SELECT name, enabled, pending, sending, delivered, failed, attempts_last_hour, success_rate, latency_p50, latency_p95,
       consecutive_failures, circuit, failing_since, last_success_at, last_failure_at, next_attempt_at, next_probe_at
  FROM webhook.endpoint_stats ORDER BY name;

SELECT endpoint, enabled, pending, sending, delivered_total, failed_total, consecutive_failures, circuit_open,
       oldest_pending_seconds
  FROM webhook.metrics ORDER BY endpoint;
\x off

-- endpoint_stats.endpoint_id is the endpoint's id.
SELECT bool_and(s.endpoint_id = e.id) AS ids_match FROM webhook.endpoint_stats s JOIN webhook.endpoints e ON e.name = s.name;

-- worker_status(): queue_depth counts this database's pending deliveries.
SELECT database, state, queue_depth FROM webhook.worker_status();

-- (webhook.circuit_breaker_threshold = 0, which turns the breaker off, is in settings.sql.)
SHOW webhook.circuit_breaker_threshold;
ROLLBACK;

-- Clean up.
SELECT regress.drop_all_endpoints() AS endpoints_dropped;
