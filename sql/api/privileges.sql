-- webhook_ext SQL API, last part: the endpoint cache's triggers, privileges, install-time steps.
-- The SQL API is split by topic in sql/api/ (endpoints, subscriptions, send, retention, views,
-- privileges), emitted in that order (src/lib.rs). Table writes live here; validation, signing
-- and the trigger are Rust.
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
   ON webhook.endpoints, webhook._events, webhook._deliveries, webhook.attempts, webhook._endpoint_state, webhook._meta,
      webhook._publishers
   TO webhook_admin;
-- The watermark is the worker's alone: lowered, it would make purged deliveries again; raised,
-- it would skip events not routed yet.
GRANT SELECT ON webhook._router TO webhook_admin;
-- Routing (webhook._route(), which retry() and the others run first) numbers its passes.
GRANT USAGE ON SEQUENCE webhook._routing_passes TO webhook_admin;
GRANT SELECT, UPDATE, DELETE ON webhook.deliveries TO webhook_admin;
GRANT SELECT ON webhook.events, webhook.subscriptions, webhook.endpoint_stats, webhook.metrics TO webhook_admin;
GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA webhook TO webhook_admin;
-- Public keys are public (the view shows nothing else; its function derives one from a key).
GRANT SELECT ON webhook.public_keys TO PUBLIC;
GRANT EXECUTE ON FUNCTION webhook._public_key(text) TO PUBLIC;
-- Firing the trigger needs no privilege on webhook.*; it refuses tables not allowed to publish.
GRANT EXECUTE ON FUNCTION webhook.enqueue() TO PUBLIC;
-- Nor does its statement trigger's: it writes only what webhook.enqueue() decided.
GRANT EXECUTE ON FUNCTION webhook.flush() TO PUBLIC;

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
