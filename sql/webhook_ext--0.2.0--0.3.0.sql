-- webhook_ext 0.2.0 -> 0.3.0: the security release.
-- - webhook.enqueue() is SECURITY INVOKER: row images are built with the writer's rights, and only
--   the finished values are written with the extension owner's.
-- - Only tables allowed to publish to an endpoint produce deliveries (webhook._publishers, filled
--   by subscribe() and allow_publish()); the triggers that exist now are allowed as they are.
-- - install_id survives pg_dump/pg_restore (the oldest _meta row is in force).
-- - Payload limits measure the body as sent; events record their size; send() measures as sent.

-- The schema "webhook" is made by CREATE EXTENSION, owned by the superuser who runs it. One that
-- already existed (a database owner may create schemas) could carry a role's objects or rights
-- into the schema of the extension's objects: functions that shadow the API's by signature,
-- the right to add more, to drop the extension's objects or to give that right away. Refused:
-- a schema owned by a role that is not a superuser, one where such a role may create objects,
-- and one holding objects such a role owns that are not part of the extension (ALTER SCHEMA …
-- OWNER TO would leave those). Every name and operator here is pg_catalog's, whatever the schema
-- holds.
DO $$
DECLARE
    nsp pg_catalog.oid;
    owner pg_catalog.name;
    trusted boolean;
    creator pg_catalog.text;
    foreign_object pg_catalog.text;
BEGIN
    SELECT n.oid, r.rolname, r.rolsuper INTO nsp, owner, trusted
      FROM pg_catalog.pg_namespace n
      JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) n.nspowner
     WHERE n.nspname OPERATOR(pg_catalog.=) 'webhook';
    IF trusted IS NOT TRUE THEN
        RAISE EXCEPTION 'schema "webhook" is owned by %, a role that is not a superuser', owner
            USING ERRCODE = 'insufficient_privilege',
                  DETAIL = 'webhook_ext''s tables, functions and queue live in schema "webhook"; its owner could drop them or add objects beside them.',
                  HINT = 'Give the schema to a superuser (ALTER SCHEMA webhook OWNER TO postgres) and run the command again: it then also refuses objects and CREATE rights other roles keep there. Before CREATE EXTENSION, DROP SCHEMA webhook CASCADE is simpler.';
    END IF;
    SELECT COALESCE(r.rolname::pg_catalog.text, 'PUBLIC') INTO creator
      FROM pg_catalog.pg_namespace n
     CROSS JOIN LATERAL pg_catalog.aclexplode(n.nspacl) a
      LEFT JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) a.grantee
     WHERE n.oid OPERATOR(pg_catalog.=) nsp
       AND a.privilege_type OPERATOR(pg_catalog.=) 'CREATE'
       AND r.rolsuper IS NOT TRUE
     LIMIT 1;
    IF creator IS NOT NULL THEN
        RAISE EXCEPTION 'role % may create objects in schema "webhook"', creator
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Revoke it (REVOKE CREATE ON SCHEMA webhook FROM ...), check what the schema holds, then run the command again.';
    END IF;
    -- Objects in the schema owned by a role that is not a superuser and not the extension's
    -- (a member, or a part of one: a table's row type and indexes, a type's array, a column's
    -- sequence).
    SELECT o.what INTO foreign_object
      FROM (SELECT 'pg_catalog.pg_class'::pg_catalog.regclass AS classid, c.oid AS objid, c.relowner AS owner,
                   'relation ' OPERATOR(pg_catalog.||) c.relname::pg_catalog.text AS what
              FROM pg_catalog.pg_class c WHERE c.relnamespace OPERATOR(pg_catalog.=) nsp
            UNION ALL
            SELECT 'pg_catalog.pg_proc'::pg_catalog.regclass, p.oid, p.proowner,
                   'function ' OPERATOR(pg_catalog.||) p.oid::pg_catalog.regprocedure::pg_catalog.text
              FROM pg_catalog.pg_proc p WHERE p.pronamespace OPERATOR(pg_catalog.=) nsp
            UNION ALL
            SELECT 'pg_catalog.pg_type'::pg_catalog.regclass, t.oid, t.typowner,
                   'type ' OPERATOR(pg_catalog.||) t.typname::pg_catalog.text
              FROM pg_catalog.pg_type t WHERE t.typnamespace OPERATOR(pg_catalog.=) nsp
            UNION ALL
            SELECT 'pg_catalog.pg_operator'::pg_catalog.regclass, o.oid, o.oprowner,
                   'operator ' OPERATOR(pg_catalog.||) o.oid::pg_catalog.regoperator::pg_catalog.text
              FROM pg_catalog.pg_operator o WHERE o.oprnamespace OPERATOR(pg_catalog.=) nsp
            UNION ALL
            SELECT 'pg_catalog.pg_opclass'::pg_catalog.regclass, c.oid, c.opcowner,
                   'operator class ' OPERATOR(pg_catalog.||) c.opcname::pg_catalog.text
              FROM pg_catalog.pg_opclass c WHERE c.opcnamespace OPERATOR(pg_catalog.=) nsp
            UNION ALL
            SELECT 'pg_catalog.pg_opfamily'::pg_catalog.regclass, f.oid, f.opfowner,
                   'operator family ' OPERATOR(pg_catalog.||) f.opfname::pg_catalog.text
              FROM pg_catalog.pg_opfamily f WHERE f.opfnamespace OPERATOR(pg_catalog.=) nsp
            UNION ALL
            SELECT 'pg_catalog.pg_collation'::pg_catalog.regclass, c.oid, c.collowner,
                   'collation ' OPERATOR(pg_catalog.||) c.collname::pg_catalog.text
              FROM pg_catalog.pg_collation c WHERE c.collnamespace OPERATOR(pg_catalog.=) nsp
            UNION ALL
            SELECT 'pg_catalog.pg_conversion'::pg_catalog.regclass, c.oid, c.conowner,
                   'conversion ' OPERATOR(pg_catalog.||) c.conname::pg_catalog.text
              FROM pg_catalog.pg_conversion c WHERE c.connamespace OPERATOR(pg_catalog.=) nsp
            UNION ALL
            SELECT 'pg_catalog.pg_ts_config'::pg_catalog.regclass, c.oid, c.cfgowner,
                   'text search configuration ' OPERATOR(pg_catalog.||) c.cfgname::pg_catalog.text
              FROM pg_catalog.pg_ts_config c WHERE c.cfgnamespace OPERATOR(pg_catalog.=) nsp
            UNION ALL
            SELECT 'pg_catalog.pg_ts_dict'::pg_catalog.regclass, d.oid, d.dictowner,
                   'text search dictionary ' OPERATOR(pg_catalog.||) d.dictname::pg_catalog.text
              FROM pg_catalog.pg_ts_dict d WHERE d.dictnamespace OPERATOR(pg_catalog.=) nsp
            UNION ALL
            SELECT 'pg_catalog.pg_statistic_ext'::pg_catalog.regclass, s.oid, s.stxowner,
                   'statistics object ' OPERATOR(pg_catalog.||) s.stxname::pg_catalog.text
              FROM pg_catalog.pg_statistic_ext s WHERE s.stxnamespace OPERATOR(pg_catalog.=) nsp) o
      JOIN pg_catalog.pg_roles r ON r.oid OPERATOR(pg_catalog.=) o.owner
     WHERE NOT r.rolsuper
       AND NOT EXISTS (
           SELECT FROM pg_catalog.pg_depend d
            WHERE d.classid OPERATOR(pg_catalog.=) o.classid AND d.objid OPERATOR(pg_catalog.=) o.objid
              AND (d.deptype OPERATOR(pg_catalog.=) 'e'
                   OR (d.deptype OPERATOR(pg_catalog.=) ANY ('{i,a}'::pg_catalog."char"[])
                       AND EXISTS (SELECT FROM pg_catalog.pg_depend m
                                    WHERE m.classid OPERATOR(pg_catalog.=) d.refclassid
                                      AND m.objid OPERATOR(pg_catalog.=) d.refobjid
                                      AND m.deptype OPERATOR(pg_catalog.=) 'e'))))
     LIMIT 1;
    IF foreign_object IS NOT NULL THEN
        RAISE EXCEPTION 'schema "webhook" holds % of a role that is not a superuser, not part of webhook_ext', foreign_object
            USING ERRCODE = 'insufficient_privilege',
                  HINT = 'Drop it (or the schema, if webhook_ext is not installed yet), then run the command again.';
    END IF;
END
$$;

ALTER FUNCTION webhook.enqueue() SECURITY INVOKER;

ALTER TABLE webhook._meta DROP CONSTRAINT _meta_pkey;
ALTER TABLE webhook._meta DROP COLUMN singleton;
ALTER TABLE webhook._meta ADD COLUMN created_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp();
ALTER TABLE webhook._meta ADD PRIMARY KEY (install_id);
SELECT pg_catalog.pg_extension_config_dump('webhook._meta', '');

ALTER TABLE webhook._events ADD COLUMN size integer;

-- Delivery ids are computed from 0.3.0 on (event id * 2^20 + endpoint id):
-- endpoint ids stay below 2^20, event ids below 2^42, and the identity, which replay() still
-- draws from, starts at 2^62. Events written from now on get ids whose computed delivery ids lie
-- above every delivery id handed out before (the sequences' last values cover transactions
-- still open), so no webhook-id is ever used twice.
DO $$
BEGIN
    IF EXISTS (SELECT FROM webhook.endpoints e WHERE e.id NOT BETWEEN 0 AND 1048575) THEN
        RAISE EXCEPTION 'webhook_ext 0.3.0 needs endpoint ids between 0 and 1048575; endpoint % has id %',
            (SELECT e.name FROM webhook.endpoints e WHERE e.id NOT BETWEEN 0 AND 1048575 ORDER BY e.id LIMIT 1),
            (SELECT e.id FROM webhook.endpoints e WHERE e.id NOT BETWEEN 0 AND 1048575 ORDER BY e.id LIMIT 1)
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Give it a free id in that range (UPDATE webhook.endpoints SET id = … while nothing is queued for it), then update again.';
    END IF;
END
$$;
ALTER TABLE webhook.endpoints ALTER COLUMN id SET MAXVALUE 1048575;
ALTER TABLE webhook.endpoints ADD CONSTRAINT endpoints_id_check CHECK (id BETWEEN 0 AND 1048575);
ALTER TABLE webhook._events ALTER COLUMN id SET MAXVALUE 4398046511103;
SELECT pg_catalog.setval(pg_catalog.pg_get_serial_sequence('webhook._events', 'id'),
       GREATEST(COALESCE(pg_catalog.pg_sequence_last_value(pg_catalog.pg_get_serial_sequence('webhook._events', 'id')::regclass), 1),
                COALESCE(pg_catalog.pg_sequence_last_value(pg_catalog.pg_get_serial_sequence('webhook.deliveries', 'id')::regclass), 0)
                    / 1048576 + 1));
ALTER TABLE webhook.deliveries ALTER COLUMN id SET START WITH 4611686018427387904 RESTART;

-- Routing moves to the worker: the trigger writes an event with its route (the endpoints it
-- decided on), the worker makes the deliveries. The stored deliveries are webhook._deliveries;
-- webhook.deliveries is a view of them and of those not routed yet.
ALTER TABLE webhook.deliveries RENAME TO _deliveries;
CREATE INDEX deliveries_endpoint_time_idx ON webhook._deliveries (endpoint_id, created_at);
-- Ordered endpoints get their events in routing order (commit order as the router finds it),
-- not id order: the routing pass that made a delivery to one, 0 for every other (and for the
-- deliveries already made: they go first, by id, as before).
ALTER TABLE webhook._deliveries ADD COLUMN routing_pass bigint NOT NULL DEFAULT 0;
CREATE SEQUENCE webhook._routing_passes;
SELECT pg_catalog.pg_extension_config_dump('webhook._routing_passes', '');
GRANT USAGE ON SEQUENCE webhook._routing_passes TO webhook_admin;
DROP INDEX webhook.deliveries_pending_idx;
CREATE INDEX deliveries_pending_idx ON webhook._deliveries (endpoint_id, routing_pass, id)
    WHERE status = 'pending' AND attempts = 0;
ALTER TABLE webhook._events ADD COLUMN route integer[];

-- Trace context: the writer's webhook.traceparent, stored with each event and sent with its
-- deliveries; webhook.events shows it (a new last column).
ALTER TABLE webhook._events ADD COLUMN traceparent text;
CREATE FUNCTION webhook."_traceparent"() RETURNS TEXT /* core::option::Option<alloc::string::String> */
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_traceparent_wrapper';
REVOKE ALL ON FUNCTION webhook._traceparent() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION webhook._traceparent() TO webhook_admin;
CREATE OR REPLACE VIEW webhook.events AS
SELECT e.id,
       e.type,
       COALESCE(e.payload,
                pg_catalog.jsonb_build_object('schema', e.schema_name, 'table', e.table_name, 'op', e.op,
                                              'new', e.new, 'old', e.old, 'txid', e.txid)) AS payload,
       e.txid,
       e.created_at,
       e.traceparent
  FROM webhook._events e;
-- Events with an id below routed_below have had their route made into deliveries; at or above
-- it, a delivery that is not stored yet is shown pending by webhook.deliveries. Only the worker
-- raises it (src/worker/route.rs says when it may). A restored dump brings its own row beside the
-- one CREATE EXTENSION made: readers take the highest.
CREATE TABLE webhook._router (
    routed_below bigint NOT NULL
);
-- No key (see above); a publication FOR ALL TABLES still replicates its updates.
ALTER TABLE webhook._router REPLICA IDENTITY FULL;
-- Every event written before the update has its deliveries stored.
INSERT INTO webhook._router SELECT COALESCE(max(e.id), 0) + 1 FROM webhook._events e;

SELECT pg_catalog.pg_extension_config_dump('webhook._router', '');

-- What users query: every delivery, stored or not yet routed (pending, under the id the worker
-- will give it). UPDATE and DELETE go to the stored row, routed first (the triggers below).
CREATE VIEW webhook.deliveries AS
SELECT d.id, d.event_id, d.endpoint_id, d.status, d.attempts, d.next_attempt_at, d.last_status_code,
       d.last_error, d.created_at, d.delivered_at
  FROM webhook._deliveries d
UNION ALL
SELECT e.id * 1048576 + r.endpoint_id, e.id, r.endpoint_id,
       CASE WHEN ep.enabled THEN 'pending' ELSE 'cancelled' END::webhook.delivery_status, 0,
       CASE WHEN ep.enabled THEN e.created_at END, NULL::integer,
       CASE WHEN NOT ep.enabled THEN 'endpoint disabled' END, e.created_at, NULL::timestamptz
  FROM webhook._events e
 CROSS JOIN LATERAL pg_catalog.unnest(e.route) AS r(endpoint_id)
  JOIN webhook.endpoints ep ON ep.id = r.endpoint_id
 WHERE e.id >= (SELECT COALESCE(max(x.routed_below), 0) FROM webhook._router x)
   -- Always true (the events' MAXVALUE), and needed: the planner cannot see the watermark when
   -- it plans, and with one bound alone it takes a third of the events to lie above it (on ten
   -- million: a parallel scan and JIT, 40-90 ms for one row); with two, it takes a few.
   AND e.id <= 4398046511103
   AND e.route IS NOT NULL
   AND NOT EXISTS (SELECT FROM webhook._deliveries d WHERE d.id = e.id * 1048576 + r.endpoint_id);

-- Makes the deliveries of every committed event at or above the watermark whose route has not
-- been made into deliveries yet, as webhook.deliveries shows them: pending (due since the event),
-- or cancelled to an endpoint disabled since. An endpoint that does not exist is left out: it
-- was dropped since (drop_endpoint() routes first, so only a writer that had not seen the drop
-- yet names it), or a restore has not brought webhook.endpoints back yet. The worker runs it
-- before each claim; functions that change deliveries run it first, so they find every delivery
-- stored. Returns how many it made. Several may run at once: a delivery another made meanwhile
-- is left alone. from_id: a watermark the caller knows of, when it may be above the table's (the
-- worker passes the one it holds in memory; the table's follows it at most once a second). The
-- higher of the two counts: starting below the table's would make deliveries again that purge()
-- or a DELETE took below it (and send them), e.g. after a restore brought a higher row.
CREATE FUNCTION webhook._route(from_id bigint DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    made bigint;
BEGIN
    -- PL/pgSQL keeps this statement's plan for the session; a LANGUAGE sql function plans its
    -- body at every call, and the worker calls this before every claim. The plan is the generic
    -- one: from_id is a parameter, and with the planner's choice each call was planned again
    -- for its value (0.48 ms a call against 0.10, tests/bench/snapshot_profile.sh).
    INSERT INTO webhook._deliveries (id, event_id, endpoint_id, status, next_attempt_at, last_error, created_at,
                                     routing_pass)
    SELECT e.id * 1048576 + r.endpoint_id, e.id, r.endpoint_id,
           CASE WHEN ep.enabled THEN 'pending' ELSE 'cancelled' END::webhook.delivery_status,
           CASE WHEN ep.enabled THEN e.created_at END,
           CASE WHEN NOT ep.enabled THEN 'endpoint disabled' END,
           e.created_at,
           -- One number for the pass, drawn only if it routes to an ordered endpoint.
           CASE WHEN ep.ordered THEN (SELECT nextval('webhook._routing_passes')) ELSE 0 END
      FROM webhook._events e
     CROSS JOIN LATERAL unnest(e.route) WITH ORDINALITY AS r(endpoint_id, n)
      JOIN webhook.endpoints ep ON ep.id = r.endpoint_id
     WHERE e.id >= GREATEST(from_id, (SELECT COALESCE(max(x.routed_below), 0) FROM webhook._router x))
       AND e.route IS NOT NULL
       -- With this statement's snapshot: a delivery a concurrent purge is deleting (with its
       -- event) is still seen, and none is made again for the event (ON CONFLICT alone waits for
       -- the purge and then inserts one, without its event: tests/isolation, purge-vs-redelivery).
       -- The worker keeps this plan for its session and plans without Materialize, so the probe
       -- stays an index lookup whatever the statistics (made while the table was empty, the
       -- probe read the whole table materialized for every event: the backlog benchmark's second
       -- round drained at 1,108/s against 11,491).
       AND NOT EXISTS (SELECT FROM webhook._deliveries d WHERE d.id = e.id * 1048576 + r.endpoint_id)
     ORDER BY e.id, r.n
    ON CONFLICT (id) DO NOTHING;
    GET DIAGNOSTICS made = ROW_COUNT;
    -- New deliveries may lie below the floors the workers claim from (src/worker/claim.rs):
    -- they read from the start after this commits (the worker itself lowers its floors by the
    -- watermark instead; there this does nothing).
    IF made > 0 THEN
        PERFORM webhook._wake();
    END IF;
    RETURN made;
END
$$;

-- INSERT, UPDATE and DELETE on webhook.deliveries. UPDATE and DELETE route first (a statement
-- trigger), so that each row they change is a stored one; each row is then changed in
-- webhook._deliveries. They run as the extension's owner (a role allowed to write the view need
-- not be allowed to write the table); nothing of the caller's is evaluated but the values given.
CREATE FUNCTION webhook._deliveries_route_first()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM webhook._route();
    RETURN NULL;
END
$$;

-- UPDATE changes only the columns the statement changed, and only while the stored row is still
-- as the statement saw it (status, attempts, due time): the worker may have claimed or finished
-- it since, and writing the statement's picture back would send it again. INSERT is what a
-- writer of 0.2.0's table does (a trigger that began before the update): the row is stored.
-- DELETE of a delivery whose event is not past the watermark is refused: routing would make it
-- again (and send it).
CREATE FUNCTION webhook._deliveries_write()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        -- As a foreign key would (see replay()): the event stays while its delivery is added.
        PERFORM FROM webhook._events e WHERE e.id = NEW.event_id FOR KEY SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'event % does not exist', NEW.event_id USING ERRCODE = 'foreign_key_violation';
        END IF;
        INSERT INTO webhook._deliveries (id, event_id, endpoint_id, status, attempts, next_attempt_at,
                                         last_status_code, last_error, created_at, delivered_at, routing_pass)
        VALUES (COALESCE(NEW.id, nextval(pg_get_serial_sequence('webhook._deliveries', 'id')::regclass)),
                NEW.event_id, NEW.endpoint_id, COALESCE(NEW.status, 'pending'), COALESCE(NEW.attempts, 0),
                NEW.next_attempt_at, NEW.last_status_code, NEW.last_error, COALESCE(NEW.created_at, now()),
                NEW.delivered_at,
                -- To an ordered endpoint it goes after what was routed so far.
                CASE WHEN EXISTS (SELECT FROM webhook.endpoints ep WHERE ep.id = NEW.endpoint_id AND ep.ordered)
                     THEN nextval('webhook._routing_passes') ELSE 0 END);
        -- A new pending delivery: the worker reads new deliveries from the start (floors).
        IF COALESCE(NEW.status, 'pending') = 'pending' AND COALESCE(NEW.attempts, 0) = 0 THEN
            PERFORM webhook._wake();
        END IF;
        RETURN NEW;
    END IF;
    IF TG_OP = 'DELETE' THEN
        IF OLD.event_id >= (SELECT COALESCE(max(x.routed_below), 0) FROM webhook._router x)
           AND EXISTS (SELECT FROM webhook._events e WHERE e.id = OLD.event_id AND OLD.endpoint_id = ANY (e.route)) THEN
            RAISE EXCEPTION 'delivery % cannot be deleted yet: its event is still being routed', OLD.id
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      HINT = 'Cancel it instead (UPDATE webhook.deliveries SET status = ''cancelled''), or delete it a moment later.';
        END IF;
        DELETE FROM webhook._deliveries d WHERE d.id = OLD.id;
        RETURN CASE WHEN FOUND THEN OLD END;
    END IF;
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.event_id IS DISTINCT FROM OLD.event_id
       OR NEW.endpoint_id IS DISTINCT FROM OLD.endpoint_id THEN
        RAISE EXCEPTION 'a delivery''s id, event_id and endpoint_id cannot be changed'
            USING ERRCODE = 'feature_not_supported';
    END IF;
    UPDATE webhook._deliveries d
       SET status = CASE WHEN NEW.status IS DISTINCT FROM OLD.status THEN NEW.status ELSE d.status END,
           attempts = CASE WHEN NEW.attempts IS DISTINCT FROM OLD.attempts THEN NEW.attempts ELSE d.attempts END,
           next_attempt_at = CASE WHEN NEW.next_attempt_at IS DISTINCT FROM OLD.next_attempt_at THEN NEW.next_attempt_at ELSE d.next_attempt_at END,
           last_status_code = CASE WHEN NEW.last_status_code IS DISTINCT FROM OLD.last_status_code THEN NEW.last_status_code ELSE d.last_status_code END,
           last_error = CASE WHEN NEW.last_error IS DISTINCT FROM OLD.last_error THEN NEW.last_error ELSE d.last_error END,
           created_at = CASE WHEN NEW.created_at IS DISTINCT FROM OLD.created_at THEN NEW.created_at ELSE d.created_at END,
           delivered_at = CASE WHEN NEW.delivered_at IS DISTINCT FROM OLD.delivered_at THEN NEW.delivered_at ELSE d.delivered_at END
     WHERE d.id = OLD.id
       AND (d.status, d.attempts, d.next_attempt_at) IS NOT DISTINCT FROM (OLD.status, OLD.attempts, OLD.next_attempt_at);
    RETURN CASE WHEN FOUND THEN NEW END;
END
$$;

CREATE TRIGGER deliveries_route_first BEFORE UPDATE OR DELETE ON webhook.deliveries
    FOR EACH STATEMENT EXECUTE FUNCTION webhook._deliveries_route_first();
CREATE TRIGGER deliveries_write INSTEAD OF INSERT OR UPDATE OR DELETE ON webhook.deliveries
    FOR EACH ROW EXECUTE FUNCTION webhook._deliveries_write();

-- Whoever was granted rights on webhook.deliveries (a monitoring role, say) keeps them on the
-- view, grant option included; the stored table keeps only the extension's own grants.
DO $$
DECLARE
    g record;
    who text;
BEGIN
    FOR g IN SELECT a.grantee, a.privilege_type, bool_or(a.is_grantable) AS grantable
               FROM pg_catalog.pg_class c, pg_catalog.aclexplode(c.relacl) a
              WHERE c.oid = 'webhook._deliveries'::regclass
                AND a.grantee <> c.relowner
                AND a.grantee <> (SELECT r.oid FROM pg_catalog.pg_roles r WHERE r.rolname = 'webhook_admin')
              GROUP BY a.grantee, a.privilege_type
    LOOP
        who := CASE WHEN g.grantee = 0 THEN 'PUBLIC' ELSE pg_catalog.quote_ident(pg_catalog.pg_get_userbyid(g.grantee)) END;
        EXECUTE pg_catalog.format('GRANT %s ON webhook.deliveries TO %s%s', g.privilege_type, who,
                                  CASE WHEN g.grantable THEN ' WITH GRANT OPTION' ELSE '' END);
        EXECUTE pg_catalog.format('REVOKE %s ON webhook._deliveries FROM %s CASCADE', g.privilege_type, who);
    END LOOP;
END
$$;
GRANT SELECT ON webhook._router TO webhook_admin;
GRANT SELECT, UPDATE, DELETE ON webhook.deliveries TO webhook_admin;
REVOKE ALL ON FUNCTION webhook._route(bigint), webhook._deliveries_route_first(), webhook._deliveries_write() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION webhook._route(bigint), webhook._deliveries_route_first(), webhook._deliveries_write() TO webhook_admin;

CREATE OR REPLACE FUNCTION webhook.disable_endpoint(name text, reason text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep integer := webhook._endpoint_id(disable_endpoint.name);
BEGIN
    UPDATE webhook.endpoints e SET enabled = false, disabled_reason = COALESCE(reason, 'disabled by ' || current_user), updated_at = now()
     WHERE e.id = ep;
    PERFORM webhook._route();
    UPDATE webhook._deliveries d SET status = 'cancelled', next_attempt_at = NULL, last_error = 'endpoint disabled'
     WHERE d.endpoint_id = ep AND d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0);
END
$$;

CREATE OR REPLACE FUNCTION webhook._purge_step(cutoff timestamptz, max_rows integer)
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

CREATE OR REPLACE FUNCTION webhook._purge_orphans(cutoff timestamptz, max_rows integer)
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


-- Tables allowed to publish to an endpoint: a trigger calling webhook.enqueue(endpoint) on a
-- table that is not here is refused (whoever owns the table). subscribe() adds
-- a row ('subscribe'), allow_publish() one for hand-written triggers ('allow_publish').
CREATE TABLE webhook._publishers (
    relid       regclass NOT NULL,
    endpoint_id integer NOT NULL,
    via         text NOT NULL CHECK (via IN ('subscribe', 'allow_publish')),
    granted_by  name NOT NULL DEFAULT current_user,
    granted_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (relid, endpoint_id, via)
);
CREATE INDEX publishers_endpoint_idx ON webhook._publishers (endpoint_id);
SELECT pg_catalog.pg_extension_config_dump('webhook._publishers', '');
CREATE TRIGGER publishers_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON webhook._publishers
    FOR EACH STATEMENT EXECUTE FUNCTION webhook._endpoints_changed();

-- Every trigger that publishes today keeps doing so (temporary tables excepted: they were never
-- made through the API and end with their session).
INSERT INTO webhook._publishers (relid, endpoint_id, via, granted_by)
SELECT DISTINCT s."table", e.id,
       -- subscribe()'s own trigger, or one written by hand (which allow_publish() governs now).
       CASE WHEN s.trigger_name = 'webhook_' || s.endpoint THEN 'subscribe' ELSE 'allow_publish' END,
       'upgrade to 0.3.0'
  FROM webhook.subscriptions s
  JOIN webhook.endpoints e ON e.name = s.endpoint
  JOIN pg_catalog.pg_class c ON c.oid = s."table"
 WHERE c.relpersistence <> 't'
ON CONFLICT DO NOTHING;

-- What a temporary table queued (any role with USAGE on webhook could) is never sent: no
-- release lets a temporary table publish any more.
UPDATE webhook._deliveries d
   SET status = 'cancelled', next_attempt_at = NULL,
       last_error = 'published by a temporary table, which webhook_ext 0.3.0 does not allow'
  FROM webhook._events e
 WHERE e.id = d.event_id AND d.status IN ('pending', 'sending') AND e.schema_name LIKE 'pg\_temp\_%';

-- Hand-written triggers keep publishing (above); the administrator is told which, and how to stop one.
DO $$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT s."table", s.trigger_name, s.endpoint, c.relowner::regrole AS owner
               FROM webhook.subscriptions s JOIN pg_catalog.pg_class c ON c.oid = s."table"
              WHERE s.trigger_name <> 'webhook_' || s.endpoint AND c.relpersistence <> 't'
              ORDER BY 1, 2 LOOP
        RAISE WARNING 'webhook_ext: trigger % on table % (owner %) may go on publishing to endpoint "%"',
                      r.trigger_name, r."table", r.owner, r.endpoint
            USING HINT = format('It was written by hand; if it should not publish, run SELECT webhook.disallow_publish(%L, %L).',
                                r."table"::text, r.endpoint);
    END LOOP;
END
$$;

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

CREATE OR REPLACE FUNCTION webhook.drop_endpoint(name text, cascade boolean DEFAULT false)
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
        PERFORM webhook._drop_flush_trigger(s."table");
    END LOOP;
    PERFORM webhook._route();
    UPDATE webhook._deliveries d SET status = 'cancelled', next_attempt_at = NULL, last_error = 'endpoint dropped'
     WHERE d.endpoint_id = ep AND d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0);
    DELETE FROM webhook._endpoint_state st WHERE st.endpoint_id = ep;
    DELETE FROM webhook._publishers p WHERE p.endpoint_id = ep;
    DELETE FROM webhook.endpoints e WHERE e.id = ep;
END
$$;

-- A table that may publish: an existing, permanent table (subscribe() and allow_publish()).
CREATE OR REPLACE FUNCTION webhook._check_publishing_table(tbl regclass) RETURNS void
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

-- Each statement's events are written at its end by one statement ("webhook-flush", a statement
-- trigger beside a table's subscription triggers): src/sql_api/capture.rs.
CREATE FUNCTION webhook."flush"()
	RETURNS TRIGGER
	LANGUAGE c
	AS 'MODULE_PATHNAME', 'flush_wrapper';

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

CREATE OR REPLACE FUNCTION webhook.unsubscribe(tbl regclass, endpoint text)
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

CREATE OR REPLACE FUNCTION webhook.allow_publish(tbl regclass, endpoint text)
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

CREATE OR REPLACE FUNCTION webhook.disallow_publish(tbl regclass, endpoint text)
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

CREATE OR REPLACE FUNCTION webhook.send(event_type text, payload jsonb, endpoint text DEFAULT NULL)
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

CREATE OR REPLACE FUNCTION webhook.retry(delivery_id bigint)
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

-- replay() leaves out events too large to keep (retry() refuses them).
-- New deliveries (new webhook-ids) to an endpoint for the events it was sent in [since, until).
CREATE OR REPLACE FUNCTION webhook.replay(endpoint text, since timestamptz, until timestamptz DEFAULT now())
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

-- The views' circuit state, from one rule.
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
CREATE OR REPLACE VIEW webhook.metrics AS
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

REVOKE ALL ON webhook._publishers FROM PUBLIC;
REVOKE ALL ON webhook._circuits FROM PUBLIC;
REVOKE ALL ON FUNCTION webhook.allow_publish(regclass, text), webhook.disallow_publish(regclass, text),
                       webhook._forget_dropped_tables(), webhook._check_publishing_table(regclass) FROM PUBLIC;
GRANT SELECT, INSERT, UPDATE, DELETE ON webhook._publishers TO webhook_admin;
GRANT EXECUTE ON FUNCTION webhook.allow_publish(regclass, text), webhook.disallow_publish(regclass, text),
                          webhook._forget_dropped_tables(), webhook._check_publishing_table(regclass) TO webhook_admin;
REVOKE ALL ON FUNCTION webhook.flush(), webhook._add_flush_trigger(regclass), webhook._drop_flush_trigger(regclass) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION webhook.flush(), webhook._add_flush_trigger(regclass), webhook._drop_flush_trigger(regclass) TO webhook_admin;
-- Firing the flush trigger needs no privilege on webhook.*: it writes only what webhook.enqueue() decided.
GRANT EXECUTE ON FUNCTION webhook.flush() TO PUBLIC;
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

-- webhook.workers: worker_status() has a row per worker, with its number (a new last column).
-- Its result type changes, so it is made anew; the EXECUTE grants operators gave on it (a
-- monitoring role, say) are given again below.
SELECT pg_catalog.set_config('webhook_ext.worker_status_grantees',
         COALESCE(pg_catalog.string_agg(a.grantee::pg_catalog.text, ' '), ''), true)
  FROM pg_catalog.pg_proc p, LATERAL pg_catalog.aclexplode(p.proacl) a
 WHERE p.oid = 'webhook.worker_status()'::pg_catalog.regprocedure
   AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
   AND a.grantee <> 'webhook_admin'::pg_catalog.regrole;
DROP FUNCTION webhook.worker_status();
DROP FUNCTION webhook._worker_slots();
CREATE FUNCTION webhook."_worker_slots"() RETURNS TABLE (
	"database" TEXT,
	"pid" INT,
	"state" TEXT,
	"started_us" bigint,
	"last_wake_us" bigint,
	"in_flight" INT,
	"attempts" bigint,
	"delivered" bigint,
	"failed" bigint,
	"worker" INT
)
STRICT VOLATILE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_worker_slots_wrapper';

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

REVOKE ALL ON FUNCTION webhook._worker_slots(), webhook.worker_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION webhook._worker_slots(), webhook.worker_status() TO webhook_admin;
DO $$
DECLARE
    g pg_catalog.oid;
BEGIN
    FOR g IN SELECT x::pg_catalog.oid
               FROM pg_catalog.regexp_split_to_table(pg_catalog.current_setting('webhook_ext.worker_status_grantees', true), ' ') x
              WHERE x <> ''
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION webhook._worker_slots(), webhook.worker_status() TO %I',
                                  (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = g));
    END LOOP;
END
$$;

-- The worker's statements, for the isolation specs (tests/isolation).
CREATE FUNCTION webhook."_worker_statements"() RETURNS TABLE (
	"name" TEXT,
	"params" TEXT[],
	"sql" TEXT
)
STRICT STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_worker_statements_wrapper';
REVOKE ALL ON FUNCTION webhook._worker_statements() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION webhook._worker_statements() TO webhook_admin;

-- Tables subscribed with subscribe() get their statement's writes at its end.
SELECT webhook._add_flush_trigger(t."table")
  FROM (SELECT DISTINCT s."table" FROM webhook.subscriptions s WHERE s.trigger_name = 'webhook_' || s.endpoint) t;

-- Signatures with ed25519 (Standard Webhooks v1a: receivers verify with a public key, which
-- webhook.public_keys shows to every role that may use the schema), client certificates
-- (mutual TLS), forward proxies and OAuth2 client credentials: new last columns of webhook.endpoints, in the order a fresh
-- install has them.
ALTER TABLE webhook.endpoints
    ADD COLUMN signing text NOT NULL DEFAULT 'hmac'
        CONSTRAINT endpoints_signing_check CHECK (signing IN ('hmac', 'ed25519', 'both')),
    ADD COLUMN signing_key text,
    ADD COLUMN previous_signing_key text,
    ADD COLUMN previous_signing_key_expires_at timestamptz,
    ADD COLUMN client_cert text,
    ADD COLUMN client_key text,
    ADD COLUMN proxy text,
    ADD COLUMN oauth_token_url text,
    ADD COLUMN oauth_client_id text,
    ADD COLUMN oauth_client_secret text,
    ADD COLUMN oauth_scope text,
    ADD CONSTRAINT endpoints_signing_key_check CHECK (signing = 'hmac' OR signing_key IS NOT NULL),
    ADD CONSTRAINT endpoints_client_identity_check CHECK ((client_cert IS NULL) = (client_key IS NULL)),
    ADD CONSTRAINT endpoints_oauth_check CHECK ((oauth_token_url IS NULL) = (oauth_client_id IS NULL)
                                               AND (oauth_client_id IS NULL) = (oauth_client_secret IS NULL)
                                               AND (oauth_scope IS NULL OR oauth_token_url IS NOT NULL));
CREATE FUNCTION webhook."_check_client_identity"(
	"cert" TEXT, /* Option < & str > */
	"key" TEXT /* Option < & str > */
) RETURNS void
IMMUTABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_check_client_identity_wrapper';
CREATE FUNCTION webhook."_check_signing_key"(
	"key" TEXT /* Option < & str > */
) RETURNS TEXT /* String */
VOLATILE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_check_signing_key_wrapper';
CREATE FUNCTION webhook."_public_key"(
	"key" TEXT /* & str */
) RETURNS TEXT /* Option < String > */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_public_key_wrapper';
CREATE FUNCTION webhook."_check_oauth"(
	"token_url" TEXT, /* Option < & str > */
	"client_id" TEXT, /* Option < & str > */
	"client_secret" TEXT, /* Option < & str > */
	"scope" TEXT /* Option < & str > */
) RETURNS void
STABLE PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_check_oauth_wrapper';
CREATE FUNCTION webhook."_check_proxy"(
	"proxy" TEXT /* & str */
) RETURNS TEXT /* String */
IMMUTABLE STRICT PARALLEL SAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', '_check_proxy_wrapper';

CREATE FUNCTION webhook._check_signing(signing text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF signing IS NULL OR signing NOT IN ('hmac', 'ed25519', 'both') THEN
        -- The value is quoted only when it looks like a word: a key given here by mistake
        -- (signing => 'whsk_…' for signing_key) must not reach the message and the log.
        RAISE EXCEPTION 'signing must be ''hmac'', ''ed25519'' or ''both'', not %',
                        CASE WHEN signing IS NULL THEN 'NULL'
                             WHEN signing ~ '^[a-z0-9]{1,16}$' THEN quote_literal(signing)
                             ELSE 'that value' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'hmac: v1 signatures with the secret; ed25519: v1a signatures that receivers verify with the public key (webhook.public_keys); both: each request carries both.';
    END IF;
END
$$;

-- create_endpoint() and alter_endpoint() take the new settings (new last arguments), so they are
-- made anew; the EXECUTE grants operators gave on them are given again below.
SELECT pg_catalog.set_config('webhook_ext.endpoint_api_grantees',
         COALESCE(pg_catalog.string_agg(DISTINCT a.grantee::pg_catalog.text, ' '), ''), true)
  FROM pg_catalog.pg_proc p, LATERAL pg_catalog.aclexplode(p.proacl) a
 WHERE p.oid IN ('webhook.create_endpoint(text, text, text, jsonb, text[], integer, interval, integer, integer, boolean, text)'::pg_catalog.regprocedure,
                 'webhook.alter_endpoint(text, text, text, jsonb, text[], integer, interval, integer, integer, boolean, text, text[])'::pg_catalog.regprocedure)
   AND a.privilege_type = 'EXECUTE' AND a.grantee <> 0 AND a.grantee <> p.proowner
   AND a.grantee <> 'webhook_admin'::pg_catalog.regrole;
DROP FUNCTION webhook.create_endpoint(text, text, text, jsonb, text[], integer, interval, integer, integer, boolean, text);
DROP FUNCTION webhook.alter_endpoint(text, text, text, jsonb, text[], integer, interval, integer, integer, boolean, text, text[]);

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
    retry_schedule text DEFAULT NULL,
    signing text DEFAULT 'hmac',
    signing_key text DEFAULT NULL,
    client_cert text DEFAULT NULL,
    client_key text DEFAULT NULL,
    proxy text DEFAULT NULL,
    oauth_token_url text DEFAULT NULL,
    oauth_client_id text DEFAULT NULL,
    oauth_client_secret text DEFAULT NULL,
    oauth_scope text DEFAULT NULL)
RETURNS webhook.endpoints
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r webhook.endpoints;
    how text := COALESCE(create_endpoint.signing, 'hmac');
BEGIN
    PERFORM webhook._check_endpoint_args(create_endpoint.name, create_endpoint.max_attempts, create_endpoint.timeout,
                                         create_endpoint.max_in_flight, create_endpoint.rate_limit, create_endpoint.event_types);
    PERFORM webhook._check_signing(how);
    PERFORM webhook._check_client_identity(create_endpoint.client_cert, create_endpoint.client_key);
    PERFORM webhook._check_oauth(create_endpoint.oauth_token_url, create_endpoint.oauth_client_id,
                                 create_endpoint.oauth_client_secret, create_endpoint.oauth_scope);
    IF create_endpoint.url IS NULL THEN
        RAISE EXCEPTION 'invalid endpoint url: URL is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM webhook.endpoints e WHERE e.name = create_endpoint.name) THEN
        RAISE EXCEPTION 'endpoint "%" already exists', create_endpoint.name
            USING ERRCODE = 'duplicate_object', HINT = 'Use webhook.alter_endpoint() to change it.';
    END IF;
    INSERT INTO webhook.endpoints AS e
           (name, url, secret, headers, event_types, max_attempts, timeout, max_in_flight, rate_limit, ordered, retry_schedule,
            signing, signing_key, client_cert, client_key, proxy,
            oauth_token_url, oauth_client_id, oauth_client_secret, oauth_scope)
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
            CASE WHEN create_endpoint.retry_schedule IS NOT NULL THEN webhook._check_schedule(create_endpoint.retry_schedule) END,
            how,
            -- A key given is checked; one is generated for an endpoint that signs with ed25519.
            CASE WHEN create_endpoint.signing_key IS NOT NULL OR how <> 'hmac'
                 THEN webhook._check_signing_key(create_endpoint.signing_key) END,
            create_endpoint.client_cert,
            create_endpoint.client_key,
            webhook._check_proxy(create_endpoint.proxy),
            -- Checked by _check_oauth above; stored as _check_url writes it (scheme lower case).
            CASE WHEN create_endpoint.oauth_token_url IS NOT NULL THEN webhook._check_url(create_endpoint.oauth_token_url) END,
            create_endpoint.oauth_client_id,
            create_endpoint.oauth_client_secret,
            create_endpoint.oauth_scope)
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
    reset text[] DEFAULT '{}',
    signing text DEFAULT NULL,
    signing_key text DEFAULT NULL,
    client_cert text DEFAULT NULL,
    client_key text DEFAULT NULL,
    proxy text DEFAULT NULL,
    oauth_token_url text DEFAULT NULL,
    oauth_client_id text DEFAULT NULL,
    oauth_client_secret text DEFAULT NULL,
    oauth_scope text DEFAULT NULL)
RETURNS webhook.endpoints
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r webhook.endpoints;
    cur webhook.endpoints;
    token_url text;
    client_id text;
    client_secret text;
    scope text;
    bad text;
    how text;
    key text;
    cert text;
    cert_key text;
BEGIN
    PERFORM webhook._endpoint_id(alter_endpoint.name);
    PERFORM webhook._check_endpoint_args(alter_endpoint.name, alter_endpoint.max_attempts, alter_endpoint.timeout,
                                         alter_endpoint.max_in_flight, alter_endpoint.rate_limit, alter_endpoint.event_types);
    SELECT s INTO bad FROM unnest(COALESCE(reset, '{}')) s
     WHERE s IS NULL OR s NOT IN ('headers', 'event_types', 'max_attempts', 'timeout', 'max_in_flight', 'rate_limit', 'retry_schedule',
                                  'signing', 'client_cert', 'proxy', 'oauth', 'oauth_scope')
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'cannot reset "%"', CASE WHEN bad ~ '^[A-Za-z0-9_]{1,32}$' OR bad IS NULL THEN bad ELSE '(not a setting name)' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'reset accepts headers, event_types, max_attempts, timeout, max_in_flight, rate_limit, retry_schedule, signing, client_cert, proxy, oauth, oauth_scope.';
    END IF;
    SELECT * INTO cur FROM webhook.endpoints e WHERE e.name = alter_endpoint.name FOR UPDATE;
    how := CASE WHEN 'signing' = ANY (reset) THEN 'hmac' ELSE COALESCE(alter_endpoint.signing, cur.signing) END;
    PERFORM webhook._check_signing(how);
    key := CASE WHEN alter_endpoint.signing_key IS NOT NULL THEN webhook._check_signing_key(alter_endpoint.signing_key)
                ELSE cur.signing_key END;
    IF how <> 'hmac' AND key IS NULL THEN
        key := webhook._check_signing_key(NULL);
    END IF;
    -- reset client_cert drops the certificate and its key; either given alone replaces its half
    -- (a renewed certificate for the same key), and the pair is checked again.
    IF 'client_cert' = ANY (reset) THEN
        cert := NULL;
        cert_key := NULL;
    ELSE
        cert := COALESCE(alter_endpoint.client_cert, cur.client_cert);
        cert_key := COALESCE(alter_endpoint.client_key, cur.client_key);
        IF alter_endpoint.client_cert IS NOT NULL OR alter_endpoint.client_key IS NOT NULL THEN
            PERFORM webhook._check_client_identity(cert, cert_key);
        END IF;
    END IF;
    -- reset oauth drops the credentials (and the scope); a part given alone replaces its part,
    -- and the credentials are checked again (only then: a change of another setting must not
    -- fail on a token URL that webhook.https_only, turned on since, would now refuse).
    IF 'oauth' = ANY (reset) THEN
        token_url := NULL;
        client_id := NULL;
        client_secret := NULL;
        scope := NULL;
    ELSE
        token_url := COALESCE(alter_endpoint.oauth_token_url, cur.oauth_token_url);
        client_id := COALESCE(alter_endpoint.oauth_client_id, cur.oauth_client_id);
        client_secret := COALESCE(alter_endpoint.oauth_client_secret, cur.oauth_client_secret);
        scope := CASE WHEN 'oauth_scope' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.oauth_scope, cur.oauth_scope) END;
        IF alter_endpoint.oauth_token_url IS NOT NULL OR alter_endpoint.oauth_client_id IS NOT NULL
           OR alter_endpoint.oauth_client_secret IS NOT NULL OR alter_endpoint.oauth_scope IS NOT NULL
           OR 'oauth_scope' = ANY (reset) THEN
            PERFORM webhook._check_oauth(token_url, client_id, client_secret, scope);
            token_url := webhook._check_url(token_url);
        END IF;
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
        signing        = how,
        signing_key    = key,
        client_cert    = cert,
        client_key     = cert_key,
        proxy          = CASE WHEN 'proxy' = ANY (reset) THEN NULL
                              ELSE COALESCE(webhook._check_proxy(alter_endpoint.proxy), e.proxy) END,
        oauth_token_url     = token_url,
        oauth_client_id     = client_id,
        oauth_client_secret = client_secret,
        oauth_scope         = scope,
        updated_at     = now()
     WHERE e.name = alter_endpoint.name
    RETURNING * INTO r;
    PERFORM webhook._wake();
    RETURN r;
END
$$;
-- A new ed25519 signing key; until the grace period ends every request carries a v1a signature
-- with the old key too, and webhook.public_keys shows both public keys. Returns the new public key.
CREATE FUNCTION webhook.rotate_signing_key(name text, grace interval DEFAULT '24 hours')
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep integer := webhook._endpoint_id(rotate_signing_key.name);
    fresh text := webhook._check_signing_key(NULL);
BEGIN
    IF grace IS NULL OR grace < '0' THEN
        RAISE EXCEPTION 'grace must be an interval of 0 or more, not %', grace USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (SELECT e.signing_key FROM webhook.endpoints e WHERE e.id = ep) IS NULL THEN
        RAISE EXCEPTION 'endpoint "%" has no signing key to rotate', rotate_signing_key.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Sign with ed25519 first: webhook.alter_endpoint(name, signing => ''ed25519'') (or ''both'').';
    END IF;
    UPDATE webhook.endpoints e
       SET previous_signing_key = CASE WHEN grace > '0' THEN e.signing_key END,
           previous_signing_key_expires_at = CASE WHEN grace > '0' THEN now() + grace END,
           signing_key = fresh,
           updated_at = now()
     WHERE e.id = ep;
    RETURN webhook._public_key(fresh);
END
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

REVOKE ALL ON FUNCTION webhook._check_client_identity(text, text), webhook._check_signing_key(text), webhook._public_key(text),
    webhook._check_proxy(text), webhook._check_oauth(text, text, text, text), webhook._check_signing(text), webhook.create_endpoint(text, text, text, jsonb, text[], integer, interval, integer, integer, boolean, text, text, text, text, text, text, text, text, text, text),
    webhook.alter_endpoint(text, text, text, jsonb, text[], integer, interval, integer, integer, boolean, text, text[], text, text, text, text, text, text, text, text, text),
    webhook.rotate_signing_key(text, interval), webhook._ops_event(integer, text, jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION webhook._check_client_identity(text, text), webhook._check_signing_key(text), webhook._public_key(text),
    webhook._check_proxy(text), webhook._check_oauth(text, text, text, text), webhook._check_signing(text), webhook.create_endpoint(text, text, text, jsonb, text[], integer, interval, integer, integer, boolean, text, text, text, text, text, text, text, text, text, text),
    webhook.alter_endpoint(text, text, text, jsonb, text[], integer, interval, integer, integer, boolean, text, text[], text, text, text, text, text, text, text, text, text),
    webhook.rotate_signing_key(text, interval), webhook._ops_event(integer, text, jsonb) TO webhook_admin;
REVOKE USAGE ON TYPE webhook.public_keys FROM PUBLIC;
-- Public keys are public (the view shows nothing else; its function derives one from a key).
GRANT SELECT ON webhook.public_keys TO PUBLIC;
GRANT EXECUTE ON FUNCTION webhook._public_key(text) TO PUBLIC;
DO $$
DECLARE
    g pg_catalog.oid;
BEGIN
    FOR g IN SELECT x::pg_catalog.oid
               FROM pg_catalog.regexp_split_to_table(pg_catalog.current_setting('webhook_ext.endpoint_api_grantees', true), ' ') x
              WHERE x <> ''
    LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION webhook.create_endpoint(text, text, text, jsonb, text[], integer, interval, integer, integer, boolean, text, text, text, text, text, text, text, text, text, text), '
                                  'webhook.alter_endpoint(text, text, text, jsonb, text[], integer, interval, integer, integer, boolean, text, text[], text, text, text, text, text, text, text, text, text) TO %I',
                                  (SELECT r.rolname FROM pg_catalog.pg_roles r WHERE r.oid = g));
    END LOOP;
END
$$;

-- Sessions drop their endpoint caches when this commits, and the worker (waiting for this
-- update) is woken.
DELETE FROM webhook.endpoints WHERE false;
SELECT webhook._wake();
