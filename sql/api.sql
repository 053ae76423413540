-- webhook_ext: the SQL API. Table writes live here; validation, signing and the trigger are Rust.
-- Every function pins search_path, and names every object with its schema.

-- The trigger webhook.enqueue() is SECURITY INVOKER: it builds the row images with the rights of
-- the session that changed the row, and raises its rights (to the extension's owner, in a
-- security-restricted operation) only to write the finished values into the queue. Application
-- roles need no rights on webhook.*. Its statements name every object with its schema and write
-- every operator OPERATOR(pg_catalog.…), since they are parsed under the caller's search_path.

-- Sessions cache webhook.endpoints and webhook._publishers for the trigger; any change makes them
-- re-read both at commit.
CREATE TRIGGER endpoints_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON webhook.endpoints
    FOR EACH STATEMENT EXECUTE FUNCTION webhook._endpoints_changed();
CREATE TRIGGER publishers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON webhook._publishers
    FOR EACH STATEMENT EXECUTE FUNCTION webhook._endpoints_changed();

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

-- Clear errors for bad endpoint arguments (the table's CHECKs are only a backstop).
CREATE FUNCTION webhook._check_endpoint_args(
    name text, max_attempts integer, timeout interval, max_in_flight integer, rate_limit integer,
    event_types text[])
RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'endpoint name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(name) > 55 THEN
        RAISE EXCEPTION 'endpoint name is too long (% bytes, at most 55)', octet_length(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The subscription trigger is named webhook_<endpoint>, and Postgres names hold 63 bytes.';
    END IF;
    IF name ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'endpoint name must not contain control characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_attempts IS NOT NULL AND max_attempts NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'max_attempts must be between 1 and 100, not %', max_attempts USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout IS NOT NULL AND (timeout <= '0' OR timeout > '5 minutes') THEN
        RAISE EXCEPTION 'timeout must be more than 0 and at most 5 minutes, not %', timeout USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_in_flight IS NOT NULL AND max_in_flight NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'max_in_flight must be between 1 and 10000, not %', max_in_flight USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF rate_limit IS NOT NULL AND rate_limit < 1 THEN
        RAISE EXCEPTION 'rate_limit must be at least 1 delivery per second, not %', rate_limit USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF event_types IS NOT NULL AND (cardinality(event_types) = 0 OR EXISTS (SELECT FROM unnest(event_types) t WHERE t IS NULL OR t = '')) THEN
        RAISE EXCEPTION 'event_types must be NULL (all types) or a list of non-empty type names' USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

CREATE FUNCTION webhook._endpoint_id(endpoint text) RETURNS integer
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found integer;
BEGIN
    SELECT e.id INTO found FROM webhook.endpoints e WHERE e.name = endpoint;
    IF found IS NULL THEN
        RAISE EXCEPTION 'endpoint "%" does not exist', endpoint
            USING ERRCODE = 'undefined_object', HINT = 'Create it with webhook.create_endpoint(name, url).';
    END IF;
    RETURN found;
END
$$;

CREATE FUNCTION webhook.create_endpoint(
    name text,
    url text,
    secret text DEFAULT NULL,
    headers jsonb DEFAULT '{}',
    event_types text[] DEFAULT NULL,
    max_attempts integer DEFAULT NULL,
    timeout interval DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    rate_limit integer DEFAULT NULL,
    ordered boolean DEFAULT false,
    retry_schedule text DEFAULT NULL)
RETURNS webhook.endpoints
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r webhook.endpoints;
BEGIN
    PERFORM webhook._check_endpoint_args(create_endpoint.name, create_endpoint.max_attempts, create_endpoint.timeout,
                                         create_endpoint.max_in_flight, create_endpoint.rate_limit, create_endpoint.event_types);
    IF create_endpoint.url IS NULL THEN
        RAISE EXCEPTION 'invalid endpoint url: URL is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM webhook.endpoints e WHERE e.name = create_endpoint.name) THEN
        RAISE EXCEPTION 'endpoint "%" already exists', create_endpoint.name
            USING ERRCODE = 'duplicate_object', HINT = 'Use webhook.alter_endpoint() to change it.';
    END IF;
    INSERT INTO webhook.endpoints AS e
           (name, url, secret, headers, event_types, max_attempts, timeout, max_in_flight, rate_limit, ordered, retry_schedule)
    VALUES (create_endpoint.name,
            webhook._check_url(create_endpoint.url),
            webhook._check_secret(create_endpoint.secret),
            webhook._check_headers(COALESCE(create_endpoint.headers, '{}')),
            create_endpoint.event_types,
            create_endpoint.max_attempts,
            create_endpoint.timeout,
            create_endpoint.max_in_flight,
            create_endpoint.rate_limit,
            COALESCE(create_endpoint.ordered, false),
            CASE WHEN create_endpoint.retry_schedule IS NOT NULL THEN webhook._check_schedule(create_endpoint.retry_schedule) END)
    RETURNING * INTO r;
    RETURN r;
END
$$;

-- NULL arguments leave a setting unchanged; list settings in "reset" to return them to the default.
CREATE FUNCTION webhook.alter_endpoint(
    name text,
    url text DEFAULT NULL,
    secret text DEFAULT NULL,
    headers jsonb DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    max_attempts integer DEFAULT NULL,
    timeout interval DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    rate_limit integer DEFAULT NULL,
    ordered boolean DEFAULT NULL,
    retry_schedule text DEFAULT NULL,
    reset text[] DEFAULT '{}')
RETURNS webhook.endpoints
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r webhook.endpoints;
    bad text;
BEGIN
    PERFORM webhook._endpoint_id(alter_endpoint.name);
    PERFORM webhook._check_endpoint_args(alter_endpoint.name, alter_endpoint.max_attempts, alter_endpoint.timeout,
                                         alter_endpoint.max_in_flight, alter_endpoint.rate_limit, alter_endpoint.event_types);
    SELECT s INTO bad FROM unnest(COALESCE(reset, '{}')) s
     WHERE s IS NULL OR s NOT IN ('headers', 'event_types', 'max_attempts', 'timeout', 'max_in_flight', 'rate_limit', 'retry_schedule')
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'cannot reset "%"', bad
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'reset accepts headers, event_types, max_attempts, timeout, max_in_flight, rate_limit, retry_schedule.';
    END IF;
    UPDATE webhook.endpoints e SET
        url            = COALESCE(webhook._check_url(alter_endpoint.url), e.url),
        secret         = COALESCE(CASE WHEN alter_endpoint.secret IS NOT NULL THEN webhook._check_secret(alter_endpoint.secret) END, e.secret),
        headers        = CASE WHEN 'headers' = ANY (reset) THEN '{}'
                              ELSE COALESCE(webhook._check_headers(alter_endpoint.headers), e.headers) END,
        event_types    = CASE WHEN 'event_types' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.event_types, e.event_types) END,
        max_attempts   = CASE WHEN 'max_attempts' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.max_attempts, e.max_attempts) END,
        timeout        = CASE WHEN 'timeout' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.timeout, e.timeout) END,
        max_in_flight  = CASE WHEN 'max_in_flight' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.max_in_flight, e.max_in_flight) END,
        rate_limit     = CASE WHEN 'rate_limit' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.rate_limit, e.rate_limit) END,
        ordered        = COALESCE(alter_endpoint.ordered, e.ordered),
        retry_schedule = CASE WHEN 'retry_schedule' = ANY (reset) THEN NULL
                              ELSE COALESCE(webhook._check_schedule(alter_endpoint.retry_schedule), e.retry_schedule) END,
        updated_at     = now()
     WHERE e.name = alter_endpoint.name
    RETURNING * INTO r;
    PERFORM webhook._wake();
    RETURN r;
END
$$;

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

CREATE FUNCTION webhook.drop_endpoint(name text, cascade boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep integer := webhook._endpoint_id(drop_endpoint.name);
    s record;
    tables text;
BEGIN
    -- Only triggers on tables allowed to publish to it count: any role with USAGE on webhook can
    -- put a (refused) trigger on a temporary table, and must not be able to block this.
    SELECT string_agg(DISTINCT format('%s', x."table"), ', ') INTO tables
      FROM webhook.subscriptions x JOIN webhook._publishers p ON p.relid = x."table" AND p.endpoint_id = ep
     WHERE x.endpoint = drop_endpoint.name;
    IF tables IS NOT NULL AND NOT cascade THEN
        RAISE EXCEPTION 'endpoint "%" is subscribed to %', drop_endpoint.name, tables
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Use webhook.unsubscribe() first, or webhook.drop_endpoint(name, cascade => true) to drop the triggers too.';
    END IF;
    FOR s IN SELECT DISTINCT x."table", x.trigger_name
               FROM webhook.subscriptions x JOIN webhook._publishers p ON p.relid = x."table" AND p.endpoint_id = ep
              WHERE x.endpoint = drop_endpoint.name LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', s.trigger_name, s."table");
    END LOOP;
    UPDATE webhook.deliveries d SET status = 'cancelled', next_attempt_at = NULL, last_error = 'endpoint dropped'
     WHERE d.endpoint_id = ep AND d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0);
    DELETE FROM webhook._endpoint_state st WHERE st.endpoint_id = ep;
    DELETE FROM webhook._publishers p WHERE p.endpoint_id = ep;
    DELETE FROM webhook.endpoints e WHERE e.id = ep;
END
$$;

CREATE FUNCTION webhook.enable_endpoint(name text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE webhook.endpoints e SET enabled = true, disabled_reason = NULL, updated_at = now()
     WHERE e.id = webhook._endpoint_id(enable_endpoint.name);
    -- A fresh start for the circuit breaker (the worker sees updated_at move and does the same).
    UPDATE webhook._endpoint_state s SET consecutive_failures = 0, failing_since = NULL, next_probe_at = NULL
     WHERE s.endpoint_id = webhook._endpoint_id(enable_endpoint.name);
    PERFORM webhook._wake();
END
$$;

-- Disabling cancels what is still pending for the endpoint; webhook.replay() sends it again later.
CREATE FUNCTION webhook.disable_endpoint(name text, reason text DEFAULT NULL)
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

-- Application events that are not row changes. Returns the event id.
CREATE FUNCTION webhook.send(event_type text, payload jsonb, endpoint text DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep webhook.endpoints;
    event_id bigint;
    size bigint;
    limit_bytes integer := webhook._max_payload_bytes();
BEGIN
    IF event_type IS NULL OR event_type = '' OR octet_length(event_type) > 255 THEN
        RAISE EXCEPTION 'event_type must be between 1 and 255 bytes long' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF payload IS NULL THEN
        RAISE EXCEPTION 'payload must not be NULL' USING ERRCODE = 'null_value_not_allowed', HINT = 'Send ''{}'' or ''null''::jsonb for no data.';
    END IF;
    -- The body as sent: {"type":…,"timestamp":"<27 characters>","data":…} is 59 bytes besides
    -- the type and the payload's text (where a control character takes six bytes).
    size := 59 + octet_length(to_json(event_type)::text) + octet_length(payload::text);
    IF size > limit_bytes THEN
        RAISE EXCEPTION 'payload is % bytes, more than webhook.max_payload_bytes (%)', size, limit_bytes
            USING ERRCODE = 'program_limit_exceeded';
    END IF;
    IF endpoint IS NOT NULL THEN
        SELECT * INTO ep FROM webhook.endpoints e WHERE e.id = webhook._endpoint_id(endpoint);
    END IF;
    INSERT INTO webhook._events (type, payload, size) VALUES (event_type, payload, size) RETURNING id INTO event_id;
    INSERT INTO webhook.deliveries (event_id, endpoint_id, status, next_attempt_at, last_error)
    SELECT event_id, e.id,
           CASE WHEN e.enabled THEN 'pending' ELSE 'cancelled' END::webhook.delivery_status,
           CASE WHEN e.enabled THEN now() END,
           CASE WHEN NOT e.enabled THEN 'endpoint disabled' END
      FROM webhook.endpoints e
     WHERE CASE WHEN endpoint IS NOT NULL THEN e.id = ep.id ELSE webhook._type_matches(event_type, e.event_types) END;
    PERFORM webhook._wake();
    RETURN event_id;
END
$$;

-- Sends a delivery again: same webhook-id, attempts continue from where they stopped.
CREATE FUNCTION webhook.retry(delivery_id bigint)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    d webhook.deliveries;
    ep webhook.endpoints;
BEGIN
    SELECT * INTO d FROM webhook.deliveries x WHERE x.id = delivery_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'delivery % does not exist', delivery_id USING ERRCODE = 'undefined_object';
    END IF;
    IF d.status = 'delivered' THEN
        RAISE EXCEPTION 'delivery % was already delivered', delivery_id
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Use webhook.replay() to send its event again as a new delivery.';
    END IF;
    IF d.status = 'sending' THEN
        RAISE NOTICE 'delivery % is being sent right now', delivery_id;
        RETURN;
    END IF;
    -- A row change without either image: it was over webhook.max_payload_bytes and not kept.
    IF EXISTS (SELECT FROM webhook._events e
                WHERE e.id = d.event_id AND e.op IS NOT NULL AND e.new IS NULL AND e.old IS NULL) THEN
        RAISE EXCEPTION 'delivery % cannot be sent again: its event was too large (%), so its row was not kept', delivery_id, d.last_error
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    SELECT * INTO ep FROM webhook.endpoints e WHERE e.id = d.endpoint_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'delivery % has no endpoint (%)', delivery_id, COALESCE(d.last_error, 'it was dropped')
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    IF NOT ep.enabled THEN
        RAISE EXCEPTION 'endpoint "%" is disabled', ep.name
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Enable it first with webhook.enable_endpoint().';
    END IF;
    UPDATE webhook.deliveries x SET status = 'pending', next_attempt_at = now() WHERE x.id = delivery_id;
    PERFORM webhook._wake();
END
$$;

-- New deliveries (new webhook-ids) to an endpoint for the events it was sent in [since, until).
CREATE FUNCTION webhook.replay(endpoint text, since timestamptz, until timestamptz DEFAULT now())
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep webhook.endpoints;
    n bigint;
BEGIN
    SELECT * INTO ep FROM webhook.endpoints e WHERE e.id = webhook._endpoint_id(endpoint);
    IF NOT ep.enabled THEN
        RAISE EXCEPTION 'endpoint "%" is disabled', ep.name
            USING ERRCODE = 'object_not_in_prerequisite_state', HINT = 'Enable it first with webhook.enable_endpoint().';
    END IF;
    IF since IS NULL OR until IS NULL OR since >= until THEN
        RAISE EXCEPTION 'since must be earlier than until' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO webhook.deliveries (event_id, endpoint_id)
    SELECT ev.id, ep.id
      FROM webhook._events ev
     WHERE ev.created_at >= since AND ev.created_at < until
       AND EXISTS (SELECT FROM webhook.deliveries d WHERE d.event_id = ev.id AND d.endpoint_id = ep.id)
       -- Not a row change whose images were not kept (too large), as retry() refuses it.
       AND NOT (ev.op IS NOT NULL AND ev.new IS NULL AND ev.old IS NULL)
     ORDER BY ev.id;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM webhook._wake();
    RETURN n;
END
$$;

-- A new generated secret; until the grace period ends every request carries a signature with
-- the old secret too (space-separated in webhook-signature), so receivers can switch at leisure.
CREATE FUNCTION webhook.rotate_secret(name text, grace interval DEFAULT '24 hours')
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep integer := webhook._endpoint_id(rotate_secret.name);
    fresh text := webhook._check_secret(NULL);
BEGIN
    IF grace IS NULL OR grace < '0' THEN
        RAISE EXCEPTION 'grace must be an interval of 0 or more, not %', grace USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE webhook.endpoints e
       SET previous_secret = CASE WHEN grace > '0' THEN e.secret END,
           previous_secret_expires_at = CASE WHEN grace > '0' THEN now() + grace END,
           secret = fresh,
           updated_at = now()
     WHERE e.id = ep;
    RETURN fresh;
END
$$;

-- The highest id in tbl (webhook.deliveries or webhook._events) created before cutoff: a binary
-- search over the primary key, a few index probes instead of a scan or an index on created_at
-- (which would cost every insert). It assumes created_at grows with id, which holds up to the
-- length of a transaction; callers still check created_at row by row.
CREATE FUNCTION webhook._last_id_before(tbl regclass, cutoff timestamptz)
RETURNS bigint
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lo bigint;
    hi bigint;
    mid bigint;
    at_id bigint;
    t timestamptz;
BEGIN
    EXECUTE format('SELECT min(id), max(id) FROM %s', tbl) INTO lo, hi;
    IF lo IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE format('SELECT created_at FROM %s WHERE id = $1', tbl) INTO t USING lo;
    IF t >= cutoff THEN
        RETURN lo - 1;
    END IF;
    WHILE lo < hi LOOP
        mid := lo + (hi - lo + 1) / 2;
        EXECUTE format('SELECT id, created_at FROM %s WHERE id >= $1 ORDER BY id LIMIT 1', tbl) INTO at_id, t USING mid;
        IF t < cutoff THEN
            lo := at_id;
        ELSE
            hi := mid - 1;
        END IF;
    END LOOP;
    RETURN lo;
END
$$;

-- Deletes up to max_rows finished deliveries created before cutoff, with their attempts and the
-- events they leave without deliveries. Returns how many deliveries went.
CREATE FUNCTION webhook._purge_step(cutoff timestamptz, max_rows integer)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bound bigint := webhook._last_id_before('webhook.deliveries', cutoff);
    gone bigint[];
    evs bigint[];
BEGIN
    IF bound IS NULL THEN
        RETURN 0;
    END IF;
    WITH d AS (
        DELETE FROM webhook.deliveries x
         WHERE x.id IN (SELECT y.id FROM webhook.deliveries y
                         WHERE y.id <= bound AND y.created_at < cutoff
                           AND y.status IN ('delivered', 'failed', 'cancelled')
                         ORDER BY y.id
                         LIMIT max_rows
                           FOR UPDATE SKIP LOCKED)
        RETURNING x.id, x.event_id)
    SELECT array_agg(d.id), array_agg(DISTINCT d.event_id) INTO gone, evs FROM d;
    IF gone IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM webhook.attempts a WHERE a.delivery_id = ANY (gone);
    DELETE FROM webhook._events e
     WHERE e.id = ANY (evs) AND NOT EXISTS (SELECT FROM webhook.deliveries d WHERE d.event_id = e.id);
    RETURN cardinality(gone);
END
$$;

-- Events older than cutoff that never had a delivery (no endpoint matched them).
CREATE FUNCTION webhook._purge_orphans(cutoff timestamptz, max_rows integer)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bound bigint := webhook._last_id_before('webhook._events', cutoff);
    n bigint;
BEGIN
    IF bound IS NULL THEN
        RETURN 0;
    END IF;
    DELETE FROM webhook._events e
     WHERE e.id IN (SELECT x.id FROM webhook._events x
                     WHERE x.id <= bound AND x.created_at < cutoff
                       AND NOT EXISTS (SELECT FROM webhook.deliveries d WHERE d.event_id = x.id)
                     ORDER BY x.id
                     LIMIT max_rows);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;

-- Deletes finished deliveries (delivered, failed, cancelled) older than older_than (default:
-- webhook.retention), their attempts, and events no delivery needs any more; pending and sending
-- deliveries and their events are never touched. Works in batches; returns the deliveries deleted.
CREATE FUNCTION webhook.purge(older_than interval DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    keep interval := COALESCE(older_than, make_interval(secs => webhook._retention_seconds()));
    cutoff timestamptz;
    n bigint;
    total bigint := 0;
BEGIN
    IF keep < '0' THEN
        RAISE EXCEPTION 'older_than must not be negative, not %', older_than USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF older_than IS NULL AND keep = '0' THEN
        RAISE EXCEPTION 'webhook.retention is 0 (keep forever)' USING ERRCODE = 'invalid_parameter_value',
              HINT = 'Pass older_than, e.g. webhook.purge(''30 days'').';
    END IF;
    cutoff := now() - keep;
    LOOP
        n := webhook._purge_step(cutoff, 10000);
        total := total + n;
        EXIT WHEN n < 10000;
    END LOOP;
    PERFORM webhook._purge_orphans(cutoff, 2147483647);
    RETURN total;
END
$$;

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

CREATE FUNCTION webhook.worker_status()
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

-- Privileges: nothing for PUBLIC; webhook_admin manages endpoints and reads everything.
REVOKE ALL ON ALL TABLES IN SCHEMA webhook FROM PUBLIC;
-- Nor the tables' row types: a column of one (in a temporary table, say) would block every
-- ALTER TABLE of an upgrade.
DO $$
DECLARE
    t regtype;
BEGIN
    FOR t IN SELECT c.reltype::regtype FROM pg_catalog.pg_class c
              WHERE c.relnamespace = 'webhook'::regnamespace AND c.relkind IN ('r', 'v', 'p') LOOP
        EXECUTE pg_catalog.format('REVOKE USAGE ON TYPE %s FROM PUBLIC', t);
    END LOOP;
END
$$;
REVOKE USAGE ON TYPE webhook.delivery_status FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA webhook FROM PUBLIC;
GRANT USAGE ON SCHEMA webhook TO webhook_admin;
GRANT SELECT, INSERT, UPDATE, DELETE
   ON webhook.endpoints, webhook._events, webhook.deliveries, webhook.attempts, webhook._endpoint_state, webhook._meta,
      webhook._publishers
   TO webhook_admin;
GRANT SELECT ON webhook.events, webhook.subscriptions, webhook.endpoint_stats, webhook.metrics TO webhook_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA webhook TO webhook_admin;
-- Firing the trigger needs no privilege on webhook.*; it refuses tables not allowed to publish.
GRANT EXECUTE ON FUNCTION webhook.enqueue() TO PUBLIC;

DO $$
BEGIN
    IF current_database() <> ALL (webhook._served_databases()) THEN
        -- A WARNING: CREATE EXTENSION hides notices from its script.
        RAISE WARNING 'webhook_ext: database "%" is not served by the delivery worker', current_database()
            USING HINT = format('Add it to webhook.database (now %L) and reload: webhooks are queued but not sent until then.',
                                current_setting('webhook.database'));
    END IF;
END
$$;

-- Wake this database's worker (it may be waiting for CREATE EXTENSION) when the install commits,
-- and make every session drop any endpoint cache left from an earlier install.
SELECT webhook._wake();
DELETE FROM webhook.endpoints WHERE false;
