-- webhook_ext SQL API: retention (purge, and the steps the worker runs).

-- The highest id in tbl (webhook._deliveries or webhook._events) created before cutoff: a binary
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
    bound bigint := webhook._last_id_before('webhook._deliveries', cutoff);
    routed_below bigint := (SELECT COALESCE(max(r.routed_below), 0) FROM webhook._router r);
    gone bigint[];
    evs bigint[];
    n bigint := 0;
BEGIN
    IF bound IS NULL THEN
        RETURN 0;
    END IF;
    -- Deliveries of events routing is done with: below the watermark, or written with their
    -- deliveries (no route).
    WITH d AS (
        DELETE FROM webhook._deliveries x
         WHERE x.id IN (SELECT y.id FROM webhook._deliveries y
                         WHERE y.id <= bound AND y.created_at < cutoff
                           AND y.status IN ('delivered', 'failed', 'cancelled')
                           AND (y.event_id < routed_below
                                OR NOT EXISTS (SELECT FROM webhook._events e WHERE e.id = y.event_id AND e.route IS NOT NULL))
                         ORDER BY y.id
                         LIMIT max_rows
                           FOR UPDATE SKIP LOCKED)
        RETURNING x.id, x.event_id)
    SELECT array_agg(d.id), array_agg(DISTINCT d.event_id) INTO gone, evs FROM d;
    IF gone IS NOT NULL THEN
        DELETE FROM webhook.attempts a WHERE a.delivery_id = ANY (gone);
        -- An event goes once no delivery needs it. replay() and INSERTs through webhook.deliveries
        -- lock the event they add a delivery to (FOR KEY SHARE): one they hold is skipped here
        -- and kept, and the DELETE (a later statement, so a later snapshot) sees every delivery
        -- added by one that committed before the lock was taken. One DELETE with the lock in a
        -- subquery would not: its snapshot is older than its lock (tests/isolation,
        -- purge-vs-redelivery, left replayed deliveries without their event).
        evs := ARRAY(SELECT e.id FROM webhook._events e WHERE e.id = ANY (evs) ORDER BY e.id FOR UPDATE SKIP LOCKED);
        DELETE FROM webhook._events e
         WHERE e.id = ANY (evs) AND NOT EXISTS (SELECT FROM webhook._deliveries d WHERE d.event_id = e.id);
        n := cardinality(gone);
    END IF;
    IF n >= max_rows THEN
        RETURN n;
    END IF;
    -- At or above the watermark, a delivery missing from webhook._deliveries is one not routed
    -- yet: routing would make a deleted one again (and send it). So there an event goes whole or
    -- not at all: with every delivery it has, all finished and old enough, and one stored for
    -- each endpoint of its route. A delivery of it made or retried meanwhile (replay(), retry(),
    -- an INSERT through the view) keeps the event; then this part is undone.
    BEGIN
        WITH ev AS (
            SELECT e.id FROM webhook._events e
             WHERE e.id >= routed_below AND e.id <= (bound / 1048576) AND e.route IS NOT NULL
               AND NOT EXISTS (SELECT FROM webhook._deliveries y
                                WHERE y.event_id = e.id
                                  AND (y.status NOT IN ('delivered', 'failed', 'cancelled') OR y.created_at >= cutoff))
               AND NOT EXISTS (SELECT FROM pg_catalog.unnest(e.route) AS r(endpoint_id)
                                WHERE NOT EXISTS (SELECT FROM webhook._deliveries y
                                                   WHERE y.id = e.id * 1048576 + r.endpoint_id))
             ORDER BY e.id
             LIMIT max_rows - n
               FOR UPDATE OF e SKIP LOCKED),
        d AS (
            -- A delivery another transaction holds (retry(), an UPDATE through the view) is
            -- skipped, not waited for: its event keeps it, and this part is undone.
            DELETE FROM webhook._deliveries x
             WHERE x.id IN (SELECT y.id FROM webhook._deliveries y JOIN ev ON y.event_id = ev.id
                             WHERE y.status IN ('delivered', 'failed', 'cancelled')
                               FOR UPDATE OF y SKIP LOCKED)
            RETURNING x.id, x.event_id)
        SELECT array_agg(d.id), array_agg(DISTINCT d.event_id) INTO gone, evs FROM d;
        IF gone IS NOT NULL THEN
            DELETE FROM webhook.attempts a WHERE a.delivery_id = ANY (gone);
            DELETE FROM webhook._events e
             WHERE e.id = ANY (evs) AND NOT EXISTS (SELECT FROM webhook._deliveries d WHERE d.event_id = e.id);
            IF EXISTS (SELECT FROM webhook._events e WHERE e.id = ANY (evs)) THEN
                RAISE EXCEPTION 'an event being purged got a delivery meanwhile' USING ERRCODE = 'WHP01';
            END IF;
            n := n + cardinality(gone);
        END IF;
    EXCEPTION WHEN SQLSTATE 'WHP01' THEN
        NULL; -- undone; the next purge looks again
    END;
    RETURN n;
END
$$;

-- Events older than cutoff that never had a delivery (no endpoint matched them).
CREATE FUNCTION webhook._purge_orphans(cutoff timestamptz, max_rows integer)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    bound bigint := webhook._last_id_before('webhook._events', cutoff);
    evs bigint[];
    n bigint;
BEGIN
    IF bound IS NULL THEN
        RETURN 0;
    END IF;
    -- Locked first, then deleted by a later statement: see _purge_step (an event replay() is
    -- adding a delivery to is skipped; one it added a delivery to before the lock is kept).
    evs := ARRAY(SELECT x.id FROM webhook._events x
                  WHERE x.id <= bound AND x.created_at < cutoff
                    AND (x.id < (SELECT COALESCE(max(r.routed_below), 0) FROM webhook._router r) OR x.route IS NULL)
                    AND NOT EXISTS (SELECT FROM webhook._deliveries d WHERE d.event_id = x.id)
                  ORDER BY x.id
                  LIMIT max_rows
                    FOR UPDATE OF x SKIP LOCKED);
    DELETE FROM webhook._events e
     WHERE e.id = ANY (evs) AND NOT EXISTS (SELECT FROM webhook._deliveries d WHERE d.event_id = e.id);
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
