-- webhook_ext SQL API: application events and redelivery (send, retry, replay).

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
    route integer[];
    disabled integer[];
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
    -- The event's route names the enabled endpoints it goes to; the worker makes their deliveries
    -- once it commits, as for a row change's (so an ordered endpoint gets it in commit order).
    -- The transaction's xid is taken before the event's id is drawn, as a row change's is: the
    -- router's watermark counts on it (src/worker/route.rs).
    PERFORM pg_current_xact_id();
    -- The endpoints it goes to, enabled and not, from one look at webhook.endpoints: with two,
    -- an endpoint enabled in between would be in neither (its delivery never made).
    SELECT array_agg(e.id ORDER BY e.id) FILTER (WHERE e.enabled),
           array_agg(e.id ORDER BY e.id) FILTER (WHERE NOT e.enabled)
      INTO route, disabled
      FROM webhook.endpoints e
     WHERE CASE WHEN endpoint IS NOT NULL THEN e.id = ep.id ELSE webhook._type_matches(event_type, e.event_types) END;
    INSERT INTO webhook._events (type, payload, size, traceparent, route)
    VALUES (event_type, payload, size, webhook._traceparent(), route)
    RETURNING id INTO event_id;
    INSERT INTO webhook._deliveries (id, event_id, endpoint_id, status, next_attempt_at, last_error)
    SELECT event_id * 1048576 + d.id, event_id, d.id, 'cancelled', NULL, 'endpoint disabled'
      FROM unnest(disabled) AS d(id);
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
    d webhook._deliveries;
    ep webhook.endpoints;
BEGIN
    PERFORM webhook._route();
    SELECT * INTO d FROM webhook._deliveries x WHERE x.id = delivery_id FOR UPDATE;
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
    UPDATE webhook._deliveries x SET status = 'pending', next_attempt_at = now() WHERE x.id = delivery_id;
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
    PERFORM webhook._route();
    INSERT INTO webhook._deliveries (event_id, endpoint_id, routing_pass)
    SELECT ev.id, ep.id, CASE WHEN ep.ordered THEN (SELECT nextval('webhook._routing_passes')) ELSE 0 END
      FROM webhook._events ev
     WHERE ev.created_at >= since AND ev.created_at < until
       AND EXISTS (SELECT FROM webhook._deliveries d WHERE d.event_id = ev.id AND d.endpoint_id = ep.id)
       -- Not a row change whose images were not kept (too large), as retry() refuses it.
       AND NOT (ev.op IS NOT NULL AND ev.new IS NULL AND ev.old IS NULL)
     ORDER BY ev.id
     -- As a foreign key would: purge() does not take an event while this adds a delivery to it,
     -- and one purge() took meanwhile is skipped.
       FOR KEY SHARE OF ev;
    GET DIAGNOSTICS n = ROW_COUNT;
    PERFORM webhook._wake();
    RETURN n;
END
$$;

-- An operational event (src/worker/ops.rs: a circuit opened or closed, an endpoint disabled, a
-- backlog past webhook.ops_backlog_threshold): a webhook of its type to webhook.ops_endpoint
-- when that names an enabled endpoint other than the one it is about, its payload completed
-- with the endpoint's name, the database and when; and a NOTIFY webhook_ops. Any role of the
-- database may LISTEN (and NOTIFY), so the notification says only what happened to which
-- endpoint id, and when: the details are in the signed webhook and in webhook.endpoint_stats.
CREATE FUNCTION webhook._ops_event(endpoint_id integer, kind text, payload jsonb)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ops_name text := NULLIF(current_setting('webhook.ops_endpoint', true), '');
    ops_id integer;
    body jsonb := payload || jsonb_build_object(
        'endpoint', (SELECT e.name FROM webhook.endpoints e WHERE e.id = _ops_event.endpoint_id),
        'database', current_database(),
        'occurred_at', to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'));
BEGIN
    PERFORM pg_notify('webhook_ops', jsonb_build_object('type', kind, 'endpoint_id', _ops_event.endpoint_id,
                                                        'occurred_at', body -> 'occurred_at')::text);
    IF ops_name IS NOT NULL THEN
        SELECT e.id INTO ops_id FROM webhook.endpoints e WHERE e.name = ops_name AND e.enabled;
        IF ops_id IS NOT NULL AND ops_id <> _ops_event.endpoint_id THEN
            PERFORM webhook.send(kind, body, ops_name);
        END IF;
    END IF;
END
$$;
