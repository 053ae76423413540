-- webhook_ext SQL API: sources of events (subscribe, allow_publish, the subscriptions view).

-- A dropped table's publishing rights go with it (its oid may one day name another table).
-- It reads only the oids Postgres reports as dropped.
CREATE FUNCTION webhook._forget_dropped_tables() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- Only when one of them had rights: a DELETE refreshes every session's endpoint cache.
    IF EXISTS (SELECT FROM webhook._publishers p
                 JOIN pg_catalog.pg_event_trigger_dropped_objects() o
                   ON o.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND o.objsubid = 0
                  AND p.relid::pg_catalog.oid = o.objid) THEN
        DELETE FROM webhook._publishers p
         USING pg_catalog.pg_event_trigger_dropped_objects() o
         WHERE o.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND o.objsubid = 0
           AND p.relid::pg_catalog.oid = o.objid;
    END IF;
END
$$;
CREATE EVENT TRIGGER webhook_ext_forget_dropped_tables ON sql_drop
    EXECUTE FUNCTION webhook._forget_dropped_tables();

-- Triggers that deliver to an endpoint (made by subscribe() or written by hand).
CREATE VIEW webhook.subscriptions AS
SELECT t.tgrelid::regclass AS "table",
       a.args[1] AS endpoint,
       t.tgname AS trigger_name,
       array_remove(ARRAY[CASE WHEN t.tgtype & 4 <> 0 THEN 'INSERT' END,
                          CASE WHEN t.tgtype & 16 <> 0 THEN 'UPDATE' END,
                          CASE WHEN t.tgtype & 8 <> 0 THEN 'DELETE' END], NULL) AS events,
       CASE WHEN cardinality(a.args) > 1 THEN a.args[2:] END AS columns,
       t.tgenabled <> 'D' AS enabled,
       pg_catalog.pg_get_triggerdef(t.oid) AS definition
  FROM pg_catalog.pg_trigger t
 CROSS JOIN LATERAL (SELECT webhook._trigger_args(t.tgargs, t.tgnargs) AS args) a
 WHERE t.tgfoid = 'webhook.enqueue()'::regprocedure
   AND t.tgparentid = 0;

-- The statement trigger that writes a statement's events at its end ("webhook-flush", beside a
-- table's subscription triggers; see src/sql_api/capture.rs). Without it each row is written as
-- its trigger fires: the same rows, more slowly. A partitioned table gets none: its rows fire
-- their triggers on the partitions, which write them as they fire.
CREATE FUNCTION webhook._add_flush_trigger(tbl regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = tbl) IN ('r', 'f')
       AND NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgname = 'webhook-flush') THEN
        EXECUTE format('CREATE TRIGGER "webhook-flush" AFTER INSERT OR UPDATE OR DELETE ON %s FOR EACH STATEMENT EXECUTE FUNCTION webhook.flush()', tbl);
    END IF;
END
$$;

-- ... and goes when the last trigger it served does.
CREATE FUNCTION webhook._drop_flush_trigger(tbl regclass) RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_trigger t WHERE t.tgrelid = tbl AND t.tgfoid = 'webhook.enqueue()'::regprocedure)
       AND EXISTS (SELECT FROM pg_trigger t
                    WHERE t.tgrelid = tbl AND t.tgname = 'webhook-flush' AND t.tgfoid = 'webhook.flush()'::regprocedure) THEN
        EXECUTE format('DROP TRIGGER "webhook-flush" ON %s', tbl);
    END IF;
END
$$;

-- A table that may publish: an existing, permanent table (subscribe() and allow_publish()).
CREATE FUNCTION webhook._check_publishing_table(tbl regclass) RETURNS void
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'table must not be NULL' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (SELECT c.relkind FROM pg_class c WHERE c.oid = tbl) NOT IN ('r', 'p', 'f') THEN
        RAISE EXCEPTION '"%" is not a table', tbl USING ERRCODE = 'wrong_object_type';
    END IF;
    IF (SELECT c.relpersistence FROM pg_class c WHERE c.oid = tbl) = 't' THEN
        RAISE EXCEPTION '% is a temporary table', tbl
            USING ERRCODE = 'wrong_object_type', HINT = 'Only permanent tables can publish webhooks.';
    END IF;
END
$$;

CREATE FUNCTION webhook.subscribe(
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
    PERFORM webhook._check_publishing_table(tbl);
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
    PERFORM webhook._add_flush_trigger(tbl);
    INSERT INTO webhook._publishers (relid, endpoint_id, via)
    VALUES (tbl, webhook._endpoint_id(endpoint), 'subscribe')
    ON CONFLICT DO NOTHING;
    -- Named in full: a table name is resolved with the caller's search_path.
    RAISE NOTICE 'table % (owner %) publishes to endpoint "%"', tbl,
        (SELECT c.relowner::regrole FROM pg_class c WHERE c.oid = tbl), endpoint;
    IF current_database() <> ALL (webhook._served_databases()) THEN
        RAISE NOTICE 'database "%" is not in webhook.database: events are recorded but not delivered', current_database()
            USING HINT = 'Add it to webhook.database in postgresql.conf and SELECT pg_reload_conf().';
    END IF;
    RETURN trig;
END
$$;

CREATE FUNCTION webhook.unsubscribe(tbl regclass, endpoint text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    trig text;
BEGIN
    SELECT s.trigger_name INTO trig FROM webhook.subscriptions s
     WHERE s."table" = tbl AND s.endpoint = unsubscribe.endpoint
     ORDER BY s.trigger_name = 'webhook_' || unsubscribe.endpoint DESC
     LIMIT 1;
    IF trig IS NULL THEN
        RAISE EXCEPTION 'table % has no subscription for endpoint "%"', tbl, endpoint USING ERRCODE = 'undefined_object';
    END IF;
    EXECUTE format('DROP TRIGGER %I ON %s', trig, tbl);
    PERFORM webhook._drop_flush_trigger(tbl);
    -- The right subscribe() gave goes with its trigger; a hand-written trigger left on the table
    -- publishes only if allow_publish() allowed it.
    DELETE FROM webhook._publishers p
     WHERE p.relid = tbl AND p.endpoint_id = webhook._endpoint_id(unsubscribe.endpoint) AND p.via = 'subscribe';
END
$$;

-- Hand-written triggers (CREATE TRIGGER … EXECUTE FUNCTION webhook.enqueue('endpoint')) deliver
-- only on tables allowed to publish to that endpoint: subscribed ones and ones allowed here,
-- whoever owns them. Anything else is refused when the trigger fires.
CREATE FUNCTION webhook.allow_publish(tbl regclass, endpoint text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM webhook._check_publishing_table(tbl);
    INSERT INTO webhook._publishers (relid, endpoint_id, via)
    VALUES (tbl, webhook._endpoint_id(endpoint), 'allow_publish')
    ON CONFLICT DO NOTHING;
    -- Named in full: a table name is resolved with the caller's search_path.
    RAISE NOTICE 'hand-written triggers on table % (owner %) may publish to endpoint "%"', tbl,
        (SELECT c.relowner::regrole FROM pg_class c WHERE c.oid = tbl), endpoint;
END
$$;

CREATE FUNCTION webhook.disallow_publish(tbl regclass, endpoint text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM webhook._publishers p
     WHERE p.relid = tbl AND p.endpoint_id = webhook._endpoint_id(endpoint) AND p.via = 'allow_publish';
    IF NOT FOUND THEN
        RAISE EXCEPTION 'table % was not allowed to publish to endpoint "%"', tbl, endpoint
            USING ERRCODE = 'undefined_object',
                  HINT = 'Subscriptions made with webhook.subscribe() are removed with webhook.unsubscribe().';
    END IF;
END
$$;
