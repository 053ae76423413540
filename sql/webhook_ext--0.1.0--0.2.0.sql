-- webhook_ext 0.1.0 -> 0.2.0
-- New: the webhook.metrics view (for Prometheus' postgres_exporter, see sql/postgres_exporter.yaml);
-- subscribe() says when the database is not one the worker serves; webhook_admin may only read views;
-- pg_dump keeps the id sequences' positions (a restored database reused ids before).

SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('webhook.endpoints', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('webhook._events', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('webhook.deliveries', 'id')::regclass, '');

-- Counters and gauges for monitoring, one row per endpoint (see sql/postgres_exporter.yaml).
CREATE VIEW webhook.metrics AS
SELECT ep.name AS endpoint,
       ep.enabled,
       (SELECT count(*) FROM webhook.deliveries d WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0)) AS pending,
       (SELECT count(*) FROM webhook.deliveries d WHERE d.endpoint_id = ep.id AND d.status = 'sending') AS sending,
       COALESCE(s.delivered_total, 0) AS delivered_total,
       COALESCE(s.failed_total, 0) AS failed_total,
       COALESCE(s.consecutive_failures, 0) AS consecutive_failures,
       (t.threshold > 0 AND COALESCE(s.consecutive_failures, 0) >= t.threshold)::int AS circuit_open,
       COALESCE(extract(epoch FROM now() - LEAST(
           (SELECT d.created_at FROM webhook.deliveries d
             WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.attempts = 0 ORDER BY d.id LIMIT 1),
           (SELECT min(d.created_at) FROM webhook.deliveries d
             WHERE d.endpoint_id = ep.id AND d.status = 'pending' AND d.attempts > 0))), 0)::float8 AS oldest_pending_seconds
  FROM webhook.endpoints ep
 CROSS JOIN (SELECT current_setting('webhook.circuit_breaker_threshold')::int AS threshold) t
  LEFT JOIN webhook._endpoint_state s ON s.endpoint_id = ep.id;

REVOKE ALL ON webhook.metrics FROM PUBLIC;
GRANT SELECT ON webhook.metrics TO webhook_admin;
REVOKE INSERT, UPDATE, DELETE ON webhook.events, webhook.subscriptions, webhook.endpoint_stats FROM webhook_admin;

CREATE OR REPLACE FUNCTION webhook.subscribe(
    tbl regclass,
    endpoint text,
    events text[] DEFAULT '{INSERT,UPDATE,DELETE}',
    columns text[] DEFAULT NULL,
    "when" text DEFAULT NULL)
RETURNS name
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    trig text := 'webhook_' || endpoint;
    ops text[];
    missing text;
    args text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'table must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    PERFORM webhook._endpoint_id(endpoint);
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = tbl) NOT IN ('r', 'p', 'f') THEN
        RAISE EXCEPTION '"%" is not a table', tbl USING ERRCODE = 'wrong_object_type';
    END IF;
    SELECT array_agg(DISTINCT upper(trim(e)) ORDER BY upper(trim(e))) INTO ops FROM unnest(events) e;
    IF ops IS NULL OR NOT ops <@ ARRAY['INSERT', 'UPDATE', 'DELETE'] OR array_position(ops, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'events must be a non-empty list of INSERT, UPDATE and DELETE, not %', events
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF columns IS NOT NULL THEN
        IF cardinality(columns) = 0 THEN
            RAISE EXCEPTION 'columns must be NULL (all columns) or a non-empty list' USING ERRCODE = 'invalid_parameter_value';
        END IF;
        SELECT c INTO missing FROM unnest(columns) c
         WHERE c IS NULL OR NOT EXISTS (SELECT FROM pg_attribute a
                                         WHERE a.attrelid = tbl AND a.attname = c AND a.attnum > 0 AND NOT a.attisdropped)
         LIMIT 1;
        IF FOUND THEN
            RAISE EXCEPTION 'column "%" does not exist in table %', missing, tbl USING ERRCODE = 'undefined_column';
        END IF;
    END IF;
    SELECT string_agg(quote_literal(a), ', ') INTO args FROM unnest(ARRAY[endpoint] || columns) a;
    IF EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = trig) THEN
        EXECUTE format('DROP TRIGGER %I ON %s', trig, tbl);
    END IF;
    EXECUTE format('CREATE TRIGGER %I AFTER %s ON %s FOR EACH ROW %s EXECUTE FUNCTION webhook.enqueue(%s)',
                   trig, array_to_string(ops, ' OR '), tbl,
                   CASE WHEN "when" IS NOT NULL THEN 'WHEN (' || webhook._check_when("when") || E'\n)' ELSE '' END,
                   args);
    IF current_database() <> ALL (webhook._served_databases()) THEN
        RAISE NOTICE 'database "%" is not in webhook.database: events are recorded but not delivered', current_database()
            USING HINT = 'Add it to webhook.database in postgresql.conf and SELECT pg_reload_conf().';
    END IF;
    RETURN trig;
END
$$;

-- No statistics on deliveries.status (see schema.sql): plans taken from them during a burst
-- walked the primary key past every delivered row on each claim.
ALTER TABLE webhook.deliveries ALTER COLUMN status SET STATISTICS 0;
DELETE FROM pg_catalog.pg_statistic
 WHERE starelid = 'webhook.deliveries'::regclass
   AND staattnum = (SELECT attnum FROM pg_catalog.pg_attribute
                     WHERE attrelid = 'webhook.deliveries'::regclass AND attname = 'status');

-- Retries waiting for later get their own index, by due time: the claim read every one of them
-- on each wake-up (80 ms per claim with 200,000 waiting), slowing every other endpoint.
DROP INDEX webhook.deliveries_pending_idx;
CREATE INDEX deliveries_pending_idx ON webhook.deliveries (endpoint_id, id)
    WHERE status = 'pending' AND attempts = 0;
CREATE INDEX deliveries_retry_idx ON webhook.deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending' AND attempts > 0;

-- ... and what counts or cancels pending deliveries reads both indexes.
CREATE OR REPLACE FUNCTION webhook.drop_endpoint(name text, cascade boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep integer := webhook._endpoint_id(drop_endpoint.name);
    s record;
    tables text;
BEGIN
    SELECT string_agg(format('%s', x."table"), ', ' ORDER BY x."table"::text) INTO tables
      FROM webhook.subscriptions x WHERE x.endpoint = drop_endpoint.name;
    IF tables IS NOT NULL AND NOT cascade THEN
        RAISE EXCEPTION 'endpoint "%" is subscribed to %', drop_endpoint.name, tables
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Use webhook.unsubscribe() first, or webhook.drop_endpoint(name, cascade => true) to drop the triggers too.';
    END IF;
    FOR s IN SELECT x."table", x.trigger_name FROM webhook.subscriptions x WHERE x.endpoint = drop_endpoint.name LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', s.trigger_name, s."table");
    END LOOP;
    UPDATE webhook.deliveries d SET status = 'cancelled', next_attempt_at = NULL, last_error = 'endpoint dropped'
     WHERE d.endpoint_id = ep AND d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0);
    DELETE FROM webhook._endpoint_state st WHERE st.endpoint_id = ep;
    DELETE FROM webhook.endpoints e WHERE e.id = ep;
END
$$;

CREATE OR REPLACE FUNCTION webhook.disable_endpoint(name text, reason text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep integer := webhook._endpoint_id(disable_endpoint.name);
BEGIN
    UPDATE webhook.endpoints e SET enabled = false, disabled_reason = COALESCE(reason, 'disabled by ' || current_user), updated_at = now()
     WHERE e.id = ep;
    UPDATE webhook.deliveries d SET status = 'cancelled', next_attempt_at = NULL, last_error = 'endpoint disabled'
     WHERE d.endpoint_id = ep AND d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0);
END
$$;

CREATE OR REPLACE FUNCTION webhook.worker_status()
RETURNS TABLE (database text, pid integer, state text, started_at timestamptz, last_wake timestamptz,
               in_flight integer, queue_depth bigint, attempts bigint, delivered bigint, failed bigint)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp
AS $$
    SELECT s.database, s.pid, s.state, to_timestamp(s.started_us / 1e6), to_timestamp(s.last_wake_us / 1e6),
           s.in_flight,
           CASE WHEN s.database = current_database()
                THEN (SELECT count(*) FROM webhook.deliveries d WHERE d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0)) END,
           s.attempts, s.delivered, s.failed
      FROM webhook._worker_slots() s
    UNION ALL
    SELECT current_database(), NULL, 'not served: add this database to webhook.database',
           NULL, NULL, 0, (SELECT count(*) FROM webhook.deliveries d WHERE d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0)), 0, 0, 0
     WHERE current_database() <> ALL (webhook._served_databases())
    ORDER BY 1
$$;

CREATE OR REPLACE VIEW webhook.endpoint_stats AS
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
            WHEN t.threshold = 0 OR COALESCE(s.consecutive_failures, 0) < t.threshold THEN 'closed'
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
 CROSS JOIN (SELECT current_setting('webhook.circuit_breaker_threshold')::int AS threshold) t
  LEFT JOIN webhook._endpoint_state s ON s.endpoint_id = ep.id
  LEFT JOIN (SELECT a.endpoint_id,
                    count(*) AS attempts,
                    round(avg(CASE WHEN a.status_code BETWEEN 200 AND 299 THEN 1 ELSE 0 END), 4) AS success_rate,
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY a.duration) AS latency_p50,
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY a.duration) AS latency_p95
               FROM webhook.attempts a
              WHERE a.started_at > now() - interval '1 hour'
              GROUP BY a.endpoint_id) h ON h.endpoint_id = ep.id;
