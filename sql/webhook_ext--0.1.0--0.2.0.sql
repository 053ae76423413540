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
       (SELECT count(*) FROM webhook.deliveries d WHERE d.endpoint_id = ep.id AND d.status = 'pending') AS pending,
       (SELECT count(*) FROM webhook.deliveries d WHERE d.endpoint_id = ep.id AND d.status = 'sending') AS sending,
       COALESCE(s.delivered_total, 0) AS delivered_total,
       COALESCE(s.failed_total, 0) AS failed_total,
       COALESCE(s.consecutive_failures, 0) AS consecutive_failures,
       (t.threshold > 0 AND COALESCE(s.consecutive_failures, 0) >= t.threshold)::int AS circuit_open,
       COALESCE(extract(epoch FROM now() - (SELECT d.created_at FROM webhook.deliveries d
                                             WHERE d.endpoint_id = ep.id AND d.status = 'pending'
                                             ORDER BY d.id LIMIT 1)), 0)::float8 AS oldest_pending_seconds
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
