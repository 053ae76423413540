-- webhook_ext: tables, types and indexes. The extension's schema is "webhook" (fixed by the
-- control file). Objects whose names start with "_" are private, not part of the contract.

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

-- Request bodies are JSON text, which is UTF-8: in a database of another encoding a row's text
-- could not be sent as it is stored (and one such row would hold up the worker's claims).
DO $$
BEGIN
    IF pg_catalog.getdatabaseencoding() <> 'UTF8' THEN
        RAISE EXCEPTION 'webhook_ext needs a UTF8 database; "%" is %', pg_catalog.current_database(), pg_catalog.getdatabaseencoding()
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Create the database with ENCODING ''UTF8'' (e.g. CREATE DATABASE app ENCODING ''UTF8'' TEMPLATE template0).';
    END IF;
END
$$;

-- webhook_admin is cluster-wide (roles are), so it may exist already: from this extension in
-- another database, or made by hand. It is used as it is, but never silently: a role that can
-- log in or has more than NOLOGIN's rights is refused, and members are named.
DO $$
DECLARE
    r record;
    members text;
BEGIN
    SELECT a.rolcanlogin, a.rolsuper, a.rolcreaterole, a.rolcreatedb, a.rolreplication, a.rolbypassrls
      INTO r FROM pg_catalog.pg_roles a WHERE a.rolname = 'webhook_admin';
    IF NOT FOUND THEN
        CREATE ROLE webhook_admin NOLOGIN;
        RETURN;
    END IF;
    IF r.rolcanlogin OR r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls THEN
        RAISE EXCEPTION 'role "webhook_admin" already exists with LOGIN, SUPERUSER, CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS'
            USING ERRCODE = 'duplicate_object',
                  HINT = 'webhook_ext manages endpoints through this role; make it NOLOGIN with no other attributes (ALTER ROLE webhook_admin NOLOGIN NOSUPERUSER ...), or drop it.';
    END IF;
    SELECT pg_catalog.string_agg(pg_catalog.quote_ident(m.rolname), ', ' ORDER BY m.rolname) INTO members
      FROM pg_catalog.pg_auth_members am JOIN pg_catalog.pg_roles m ON m.oid = am.member
     WHERE am.roleid = (SELECT a.oid FROM pg_catalog.pg_roles a WHERE a.rolname = 'webhook_admin');
    -- A WARNING: CREATE EXTENSION hides notices from its script.
    RAISE WARNING 'webhook_ext: using the existing role webhook_admin (members: %)', COALESCE(members, 'none')
        USING DETAIL = 'Roles are shared by every database of the cluster: its members manage webhook endpoints in every database where webhook_ext is installed.';
END
$$;

CREATE TYPE webhook.delivery_status AS ENUM ('pending', 'sending', 'delivered', 'failed', 'cancelled');

-- Facts about this installation of the extension. install_id is part of every webhook-id, so
-- ids never repeat across databases or re-installs. pg_dump keeps the rows: a restored copy adds
-- the source's row beside the one its own CREATE EXTENSION made, and the oldest row is the one
-- in force (the worker reads the oldest), so pending work keeps its webhook-ids across dump and restore.
CREATE TABLE webhook._meta (
    install_id text PRIMARY KEY DEFAULT pg_catalog.substr(pg_catalog.md5(pg_catalog.gen_random_uuid()::text), 1, 10),
    created_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp()
);
INSERT INTO webhook._meta DEFAULT VALUES;

CREATE TABLE webhook.endpoints (
    -- Below 2^20: a delivery's id is computed from its event's and its endpoint's.
    id                          integer GENERATED BY DEFAULT AS IDENTITY (MAXVALUE 1048575) PRIMARY KEY
                                CONSTRAINT endpoints_id_check CHECK (id BETWEEN 0 AND 1048575),
    name                        text NOT NULL UNIQUE,
    url                         text NOT NULL,
    secret                      text NOT NULL,
    previous_secret             text,
    previous_secret_expires_at  timestamptz,
    headers                     jsonb NOT NULL DEFAULT '{}',
    event_types                 text[],
    max_attempts                integer CHECK (max_attempts BETWEEN 1 AND 100),
    timeout                     interval CHECK (timeout > '0' AND timeout <= '5 minutes'),
    max_in_flight               integer CHECK (max_in_flight BETWEEN 1 AND 10000),
    rate_limit                  integer CHECK (rate_limit > 0),
    ordered                     boolean NOT NULL DEFAULT false,
    retry_schedule              text,
    enabled                     boolean NOT NULL DEFAULT true,
    disabled_reason             text,
    created_at                  timestamptz NOT NULL DEFAULT now(),
    updated_at                  timestamptz NOT NULL DEFAULT now(),
    -- How requests are signed (webhook-signature): 'hmac' (v1, with secret), 'ed25519' (v1a,
    -- with signing_key: receivers verify with its public key, webhook.public_keys), or 'both'.
    signing                     text NOT NULL DEFAULT 'hmac'
                                CONSTRAINT endpoints_signing_check CHECK (signing IN ('hmac', 'ed25519', 'both')),
    signing_key                 text,
    previous_signing_key        text,
    previous_signing_key_expires_at timestamptz,
    -- Mutual TLS: the client certificate (PEM, its own first, then intermediates) and its key.
    client_cert                 text,
    client_key                  text,
    -- The forward proxy: NULL follows webhook.proxy, 'direct' goes around it, else a proxy URL.
    proxy                       text,
    -- OAuth2 client credentials: the worker sends a bearer token it gets from the token URL.
    oauth_token_url             text,
    oauth_client_id             text,
    oauth_client_secret         text,
    oauth_scope                 text,
    CONSTRAINT endpoints_signing_key_check CHECK (signing = 'hmac' OR signing_key IS NOT NULL),
    CONSTRAINT endpoints_client_identity_check CHECK ((client_cert IS NULL) = (client_key IS NULL)),
    CONSTRAINT endpoints_oauth_check CHECK ((oauth_token_url IS NULL) = (oauth_client_id IS NULL)
                                           AND (oauth_client_id IS NULL) = (oauth_client_secret IS NULL)
                                           AND (oauth_scope IS NULL OR oauth_token_url IS NOT NULL))
);
COMMENT ON TABLE webhook.endpoints IS 'Receivers of webhooks. NULL limits follow the webhook.* settings.';

-- One row per change (or send() call); never updated. Users read it through the view
-- webhook.events. A row change keeps its row images as they are (to_jsonb of the row) next to
-- where they came from, rather than nested in one document: nesting costs the trigger about as
-- much again as the row image itself. The worker puts the request body together from these
-- columns, the same way on every attempt.
CREATE TABLE webhook._events (
    -- Below 2^42, so that computed delivery ids stay below replay()'s range.
    id          bigint GENERATED BY DEFAULT AS IDENTITY (MAXVALUE 4398046511103) PRIMARY KEY,
    type        text NOT NULL,
    -- send(): the application's payload; row changes: NULL.
    payload     jsonb,
    -- row changes: where from, what happened, and the row before and after.
    schema_name text,
    table_name  text,
    op          text,
    new         jsonb,
    old         jsonb,
    txid        bigint NOT NULL DEFAULT pg_catalog.txid_current(),
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Bytes of the request body (measured as sent where it could pass max_payload_bytes,
    -- estimated from the stored size below that); bounds how much one claim takes into memory.
    size        integer,
    -- The endpoints an event is to be delivered to, as the trigger (with the writer's rights) or
    -- send() decided; the worker makes the deliveries (webhook._route()). NULL: its deliveries
    -- were written with it (events from before 0.3.0, and those no enabled endpoint wanted).
    route       integer[],
    -- The writer's W3C trace context (webhook.traceparent, checked when set), sent with every
    -- attempt of its deliveries as the traceparent header. NULL: none.
    traceparent text
);

-- Events with an id below routed_below have had their route made into deliveries; at or above
-- it, a delivery that is not stored yet is shown pending by webhook.deliveries. Only the worker
-- raises it (src/worker/route.rs says when it may). A restored dump brings its own row beside the
-- one CREATE EXTENSION made: readers take the highest.
CREATE TABLE webhook._router (
    routed_below bigint NOT NULL
);
-- No key (see above); a publication FOR ALL TABLES still replicates its updates.
ALTER TABLE webhook._router REPLICA IDENTITY FULL;
INSERT INTO webhook._router VALUES (0);

-- The stored deliveries: one row per (event, endpoint) once routed (users read them, and the
-- ones not yet routed, through the view webhook.deliveries below). "failed" is final (dead
-- letter) until webhook.retry().
-- endpoint_id is NULL only for an event whose trigger named an endpoint that did not exist.
-- id: event_id * 2^20 + endpoint_id for the deliveries an event gets when it is written (no
-- sequence drawn per delivery; an event's deliveries are adjacent in the primary key); replay()'s
-- new deliveries (and those to an endpoint that did not exist) draw from the identity, which
-- starts at 2^62, above every computed id.
CREATE TABLE webhook._deliveries (
    id                bigint GENERATED BY DEFAULT AS IDENTITY (SEQUENCE NAME webhook.deliveries_id_seq START WITH 4611686018427387904)
                      CONSTRAINT deliveries_pkey PRIMARY KEY,
    event_id          bigint NOT NULL,
    endpoint_id       integer,
    status            webhook.delivery_status NOT NULL DEFAULT 'pending',
    attempts          integer NOT NULL DEFAULT 0,
    -- pending: when it is due; sending: when its lease expires; NULL once finished.
    next_attempt_at   timestamptz DEFAULT now(),
    last_status_code  integer,
    last_error        text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    delivered_at      timestamptz,
    -- A delivery to an ordered endpoint: the routing pass that made it (webhook._routing_passes),
    -- so that the endpoint gets its events in the order their transactions committed, as the
    -- router found them (by id within one pass), not in id order, which a transaction that drew
    -- its id first and committed last breaks. 0 for every other delivery (and for those made
    -- before their endpoint was ordered: they go first, by id).
    routing_pass      bigint NOT NULL DEFAULT 0
);
-- Numbers routing passes that made deliveries to ordered endpoints (above).
CREATE SEQUENCE webhook._routing_passes;
-- The worker's claim, per endpoint. New deliveries (no attempt yet, due since they were made),
-- in routing order (every endpoint but an ordered one: id order): the only index the router
-- writes besides the keys.
CREATE INDEX deliveries_pending_idx ON webhook._deliveries (endpoint_id, routing_pass, id)
    WHERE status = 'pending' AND attempts = 0;
-- Retries, by when they are due: a claim reads only those due now, however many wait for later.
CREATE INDEX deliveries_retry_idx ON webhook._deliveries (endpoint_id, next_attempt_at)
    WHERE status = 'pending' AND attempts > 0;
-- Leases to recover after a crash.
CREATE INDEX deliveries_sending_idx ON webhook._deliveries (next_attempt_at) WHERE status = 'sending';
CREATE INDEX deliveries_event_idx ON webhook._deliveries (event_id);
-- Users' queries by endpoint and time ("the latest deliveries to crm", "crm's failures of the
-- last hour"): without it, a scan of the whole table (1.2-1.8 s on ten million rows).
CREATE INDEX deliveries_endpoint_time_idx ON webhook._deliveries (endpoint_id, created_at);

-- No statistics on status: the share of pending rows swings from none to all and back within
-- minutes, and the finished rows sit at the front of the id order. Statistics taken during a
-- burst make "walk the primary key until enough pending rows turn up" look cheap, when it means
-- passing over every delivered row on each claim. Without them the planner assumes pending rows
-- are few (as they are in a steady state) and takes the partial indexes.
ALTER TABLE webhook._deliveries ALTER COLUMN status SET STATISTICS 0;

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

-- What users query: the event's data, as the request body's "data" carries it.
CREATE VIEW webhook.events AS
SELECT e.id,
       e.type,
       COALESCE(e.payload,
                pg_catalog.jsonb_build_object('schema', e.schema_name, 'table', e.table_name, 'op', e.op,
                                              'new', e.new, 'old', e.old, 'txid', e.txid)) AS payload,
       e.txid,
       e.created_at,
       e.traceparent
  FROM webhook._events e;

CREATE TABLE webhook.attempts (
    delivery_id    bigint NOT NULL,
    attempt        integer NOT NULL,
    endpoint_id    integer,
    started_at     timestamptz NOT NULL,
    duration       interval NOT NULL,
    status_code    integer,
    response_body  text,
    error          text,
    PRIMARY KEY (delivery_id, attempt)
);
CREATE INDEX attempts_started_brin ON webhook.attempts USING brin (started_at);

-- Per-endpoint delivery health, kept by the worker: the circuit breaker and the counters of
-- webhook.endpoint_stats.
CREATE TABLE webhook._endpoint_state (
    endpoint_id           integer PRIMARY KEY,
    consecutive_failures  integer NOT NULL DEFAULT 0,
    failing_since         timestamptz,
    last_success_at       timestamptz,
    last_failure_at       timestamptz,
    next_probe_at         timestamptz,
    delivered_total       bigint NOT NULL DEFAULT 0,
    failed_total          bigint NOT NULL DEFAULT 0
);

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

-- pg_dump keeps what users put in these tables.
SELECT pg_catalog.pg_extension_config_dump('webhook._meta', '');
SELECT pg_catalog.pg_extension_config_dump('webhook._publishers', '');
SELECT pg_catalog.pg_extension_config_dump('webhook.endpoints', '');
SELECT pg_catalog.pg_extension_config_dump('webhook._events', '');
SELECT pg_catalog.pg_extension_config_dump('webhook._deliveries', '');
SELECT pg_catalog.pg_extension_config_dump('webhook._router', '');
SELECT pg_catalog.pg_extension_config_dump('webhook.attempts', '');
SELECT pg_catalog.pg_extension_config_dump('webhook._endpoint_state', '');
-- ... and where their ids are, so a restored database does not hand out ids it already has.
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('webhook.endpoints', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('webhook._events', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump(pg_catalog.pg_get_serial_sequence('webhook._deliveries', 'id')::regclass, '');
SELECT pg_catalog.pg_extension_config_dump('webhook._routing_passes', '');
