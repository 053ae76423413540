-- Set-up of the isolation specs' database (scripts/regress --isolation runs it once, before the
-- specs): the extension, and schema iso with the delivery worker's steps as functions. Each
-- step runs the installed worker's own statement (webhook._worker_statements()) with the
-- arguments the worker would pass for one endpoint set served by a single worker with no limits,
-- so a spec interleaves exactly what the worker runs with the SQL API's functions. No worker
-- serves this database (webhook.database names another), so nothing else claims or routes.
\set ON_ERROR_STOP on
SET client_min_messages = error;
CREATE EXTENSION webhook_ext;
CREATE SCHEMA iso;

-- The text of the worker's statement `name`.
CREATE FUNCTION iso.stmt(name text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    q text;
BEGIN
    SELECT s.sql INTO q FROM webhook._worker_statements() s WHERE s.name = stmt.name;
    IF q IS NULL THEN
        RAISE EXCEPTION 'the worker has no statement %', name;
    END IF;
    RETURN q;
END
$$;

-- The worker's claim: every due delivery (up to n), marked sending with a lease; what a request
-- would be built from. No floors (every endpoint's new deliveries read from the start).
CREATE FUNCTION iso.claim(n integer DEFAULT 100)
RETURNS TABLE (id bigint, endpoint_id integer, attempts integer, url text, secret text, previous_secret text)
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r record;
    ids bigint[] := '{}';
    eps integer[] := '{}';
    tries integer[] := '{}';
    urls text[] := '{}';
    secrets text[] := '{}';
    previous text[] := '{}';
BEGIN
    FOR r IN EXECUTE iso.stmt('claim')
        USING '{}'::int[], '{}'::int[], 100, n, 5000, 1000::int8, '{}'::int[], '{}'::int[],
              (SELECT array_agg(e.id) FROM webhook.endpoints e), n, 1000000000::int8, true, 1, 0,
              '{}'::int[], '{}'::int8[], '{}'::int8[]
    LOOP
        ids := ids || r.id;
        eps := eps || r.endpoint_id;
        tries := tries || r.attempts;
        urls := urls || r.url;
        secrets := secrets || r.secret;
        previous := previous || r.previous_secret;
    END LOOP;
    RETURN QUERY SELECT u.* FROM unnest(ids, eps, tries, urls, secrets, previous) AS u ORDER BY 1;
END
$$;

-- The worker records one finished attempt of each delivery in ids (claimed before): status
-- 'delivered', 'failed' (given up) or 'pending' (to be retried, due at once), with an HTTP
-- status code.
CREATE FUNCTION iso.record(ids bigint[], status text, code integer DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    a int[];
    ep int[];
    n int := cardinality(ids);
BEGIN
    SELECT array_agg(d.attempts + 1 ORDER BY o), array_agg(d.endpoint_id ORDER BY o) INTO a, ep
      FROM unnest(ids) WITH ORDINALITY AS x(id, o) JOIN webhook._deliveries d ON d.id = x.id;
    EXECUTE iso.stmt('record')
        USING ids, a, array_fill(status, ARRAY[n]), array_fill(code, ARRAY[n]),
              array_fill(CASE WHEN status = 'delivered' THEN NULL ELSE 'HTTP ' || code END, ARRAY[n]),
              array_fill(NULL::text, ARRAY[n]), array_fill(extract(epoch FROM now())::float8, ARRAY[n]),
              array_fill(1000::int8, ARRAY[n]), array_fill(0::int8, ARRAY[n]), ep;
END
$$;

-- The worker's routing statement: makes the deliveries of committed events' routes (from the
-- table's watermark: the specs raise none).
CREATE FUNCTION iso.route() RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    n bigint;
BEGIN
    EXECUTE iso.stmt('route') INTO n USING (SELECT COALESCE(max(r.routed_below), 0) FROM webhook._router r);
    RETURN n;
END
$$;

-- The worker recovers leases: every delivery left sending (as when a worker starts).
CREATE FUNCTION iso.recover() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    EXECUTE iso.stmt('recover') USING '{}'::int8[], true, 1, 0;
END
$$;

-- Every stored delivery: endpoint, event, status, attempts, and whether its event is still
-- there (a delivery without one can never be sent: stuck).
CREATE FUNCTION iso.deliveries()
RETURNS TABLE (endpoint text, event_id bigint, status webhook.delivery_status, attempts integer, event_kept boolean)
LANGUAGE sql SET search_path = pg_catalog, pg_temp
AS $$
    SELECT COALESCE(e.name, '#' || d.endpoint_id), d.event_id, d.status, d.attempts,
           EXISTS (SELECT FROM webhook._events v WHERE v.id = d.event_id)
      FROM webhook._deliveries d LEFT JOIN webhook.endpoints e ON e.id = d.endpoint_id
     ORDER BY d.event_id, d.endpoint_id, d.id
$$;

-- A spec's fresh start (and its teardown): no endpoints, subscriptions or queue rows, ids from 1.
CREATE FUNCTION iso.reset() RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM webhook.drop_endpoint(e.name, cascade => true) FROM webhook.endpoints e;
    TRUNCATE webhook.attempts, webhook._deliveries, webhook._events, webhook._endpoint_state,
             webhook._publishers, webhook.endpoints RESTART IDENTITY;
    UPDATE webhook._router SET routed_below = 0;
END
$$;
