-- Retention: webhook.purge() deletes finished deliveries older than older_than (default
-- webhook.retention, 7 days here), their attempts, and the events no delivery needs; pending
-- and sending deliveries are never touched. (purge() with webhook.retention = 0 is in
-- settings.sql.)
-- Fixtures are aged by hand, oldest first: purge() finds its bound by a binary search over ids
-- that assumes created_at grows with the id. Each step ages its fixtures and purges in one
-- transaction, so the worker's own purge (every minute, paused or not) cannot take them first.
\set SHOW_CONTEXT never
-- Ages are computed in UTC (pg_regress's default time zone has daylight saving time).
SET timezone = 'UTC';

SELECT (webhook.create_endpoint('crm', 'https://crm.example.com/hooks', event_types => '{t.*}')).name;

-- Each step starts from empty queue tables, so counts do not depend on other tests.
CREATE PROCEDURE pg_temp.reset() LANGUAGE sql AS $$
    TRUNCATE webhook._deliveries, webhook._events, webhook.attempts
$$;
-- One event per status, sent to crm, created "age" ago (delivery and event), each delivery with
-- two attempts.
CREATE PROCEDURE pg_temp.fixtures(age interval) LANGUAGE plpgsql AS $$
DECLARE
    s webhook.delivery_status;
    ev bigint;
BEGIN
    FOREACH s IN ARRAY enum_range(NULL::webhook.delivery_status) LOOP
        ev := webhook.send('t.' || s, '{}', 'crm');
        UPDATE webhook.deliveries SET status = s, created_at = now() - age,
               next_attempt_at = CASE WHEN s IN ('pending', 'sending') THEN now() + interval '1 hour' END
         WHERE event_id = ev;
        UPDATE webhook._events SET created_at = now() - age WHERE id = ev;
        INSERT INTO webhook.attempts (delivery_id, attempt, started_at, duration, status_code)
        SELECT d.id, a, now() - age, interval '10 ms', 500 FROM webhook.deliveries d, generate_series(1, 2) a WHERE d.event_id = ev;
    END LOOP;
END
$$;
-- What is left, by status and age.
CREATE TEMP VIEW left_over AS
SELECT d.status, now() - d.created_at AS age, count(DISTINCT d.id) AS deliveries, count(a.*) AS attempts,
       count(DISTINCT e.id) AS events
  FROM webhook.deliveries d
  LEFT JOIN webhook.attempts a ON a.delivery_id = d.id
  LEFT JOIN webhook.events e ON e.id = d.event_id
 GROUP BY 1, 2 ORDER BY 2 DESC, 1;

-- purge(older_than): the finished deliveries (delivered, failed, cancelled) created before
-- now() - older_than go, with their attempts and events; returns how many deliveries went.
-- Purging again finds nothing.
BEGIN;
CALL pg_temp.reset();
CALL pg_temp.fixtures(interval '40 days');
CALL pg_temp.fixtures(interval '0');
SELECT webhook.purge(older_than => '30 days');
SELECT * FROM left_over;
SELECT count(*) AS events FROM webhook.events;
SELECT webhook.purge(older_than => '30 days');
COMMIT;

-- older_than => '0': every finished delivery created before this transaction began.
SELECT webhook.purge(older_than => '0');
SELECT status, count(*) FROM webhook.deliveries GROUP BY 1 ORDER BY 1;

-- Without older_than (or with NULL): webhook.retention, 7 days here.
SHOW webhook.retention;
BEGIN;
CALL pg_temp.reset();
CALL pg_temp.fixtures(interval '8 days');
CALL pg_temp.fixtures(interval '6 days');
SELECT webhook.purge();
SELECT * FROM left_over;
COMMIT;
BEGIN;
CALL pg_temp.reset();
CALL pg_temp.fixtures(interval '8 days');
SELECT webhook.purge(NULL);
COMMIT;

-- An event that never had a delivery (no endpoint took it) goes once it is older than the cutoff.
BEGIN;
CALL pg_temp.reset();
SELECT webhook.send('nobody.cares', '{}') AS orphan \gset
SELECT count(*) AS deliveries FROM webhook.deliveries WHERE event_id = :orphan;
SELECT webhook.purge(older_than => '1 day');
SELECT count(*) AS orphan_kept FROM webhook.events WHERE id = :orphan;
UPDATE webhook._events SET created_at = now() - interval '2 days' WHERE id = :orphan;
SELECT webhook.purge(older_than => '1 day');
SELECT count(*) AS orphan_kept FROM webhook.events WHERE id = :orphan;
COMMIT;

-- An event stays while any of its deliveries does (here a replay of it, still pending).
BEGIN;
CALL pg_temp.reset();
SELECT webhook.send('t.shared', '{}', 'crm') AS shared \gset
UPDATE webhook.deliveries SET status = 'delivered', next_attempt_at = NULL, created_at = now() - interval '40 days' WHERE event_id = :shared;
UPDATE webhook._events SET created_at = now() - interval '40 days' WHERE id = :shared;
-- Its delivery is stored (the UPDATE routed it first); the watermark passes it, as the worker's
-- would once its transaction ended: below it, an event's deliveries may go one by one.
UPDATE webhook._router SET routed_below = :shared + 1;
SELECT webhook.replay('crm', since => now() - interval '41 days');
SELECT webhook.purge(older_than => '30 days');
SELECT * FROM left_over;
COMMIT;

-- Work goes in batches of 10,000: 10,001 old delivered rows all go, and the count says so.
BEGIN;
CALL pg_temp.reset();
SELECT webhook.send('t.many', '{}', 'crm') AS many \gset
UPDATE webhook.deliveries SET status = 'delivered', next_attempt_at = NULL, created_at = now() - interval '40 days' WHERE event_id = :many;
INSERT INTO webhook._deliveries (event_id, endpoint_id, status, created_at, next_attempt_at)
SELECT :many, d.endpoint_id, 'delivered', now() - interval '40 days', NULL
  FROM webhook.deliveries d, generate_series(1, 10000) WHERE d.event_id = :many;
SELECT count(*) AS old_delivered FROM webhook.deliveries;
SELECT webhook.purge(older_than => '30 days');
SELECT count(*) AS events_left FROM webhook.events;
COMMIT;

-- Errors.
SELECT webhook.purge(older_than => '-1 day');
\echo SQLSTATE :SQLSTATE
SELECT webhook.purge(older_than => '-1 second');
\echo SQLSTATE :SQLSTATE

-- Clean up.
CALL pg_temp.reset();
SELECT regress.drop_all_endpoints() AS endpoints_dropped;
