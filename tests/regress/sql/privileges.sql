-- Who may do what (README, Security: "Who may do what"): nothing in schema webhook is granted
-- to PUBLIC but EXECUTE on the trigger function; webhook_admin members manage everything; a role
-- with USAGE on webhook still may not call the functions or read the tables; application roles
-- write subscribed tables without any right on webhook.*; a table owner's hand-written trigger
-- publishes only where an administrator allowed it.
\set SHOW_CONTEXT never

CREATE ROLE regress_nobody LOGIN;                     -- nothing at all
CREATE ROLE regress_monitor LOGIN;                    -- the README's monitoring recipe
GRANT USAGE ON SCHEMA webhook TO regress_monitor;
GRANT SELECT ON webhook.metrics, webhook.deliveries, webhook.attempts TO regress_monitor;
GRANT SELECT (id, name, url, enabled, disabled_reason) ON webhook.endpoints TO regress_monitor;
CREATE ROLE regress_ops LOGIN;                        -- a webhook_admin member
GRANT webhook_admin TO regress_ops;
CREATE ROLE regress_app LOGIN;                        -- writes a subscribed table
CREATE ROLE regress_owner LOGIN;                      -- owns a table, USAGE on webhook
GRANT USAGE ON SCHEMA webhook TO regress_owner;
GRANT CREATE ON SCHEMA public TO regress_owner, regress_nobody;

--
-- The grants as the catalog has them
--

-- EXECUTE on every public function, by role (PUBLIC = every role).
SELECT p.proname AS function,
       has_function_privilege('public', p.oid, 'EXECUTE') AS "public",
       has_function_privilege('regress_monitor', p.oid, 'EXECUTE') AS monitor,
       has_function_privilege('webhook_admin', p.oid, 'EXECUTE') AS webhook_admin,
       has_function_privilege('regress_ops', p.oid, 'EXECUTE') AS ops
  FROM pg_proc p WHERE p.pronamespace = 'webhook'::regnamespace AND p.proname !~ '^_'
 ORDER BY 1;
-- Private functions executable by PUBLIC: only _public_key, which webhook.public_keys calls.
SELECT p.proname AS private_function_public_may_execute
  FROM pg_proc p WHERE p.pronamespace = 'webhook'::regnamespace AND p.proname ~ '^_'
   AND has_function_privilege('public', p.oid, 'EXECUTE')
 ORDER BY 1;
-- Tables and views (private ones included), by role: SELECT/INSERT/UPDATE/DELETE as "siud".
SELECT c.relname AS relation,
       concat(CASE WHEN has_table_privilege('public', c.oid, 'SELECT') THEN 's' END,
              CASE WHEN has_table_privilege('public', c.oid, 'INSERT') THEN 'i' END,
              CASE WHEN has_table_privilege('public', c.oid, 'UPDATE') THEN 'u' END,
              CASE WHEN has_table_privilege('public', c.oid, 'DELETE') THEN 'd' END) AS "public",
       concat(CASE WHEN has_table_privilege('webhook_admin', c.oid, 'SELECT') THEN 's' END,
              CASE WHEN has_table_privilege('webhook_admin', c.oid, 'INSERT') THEN 'i' END,
              CASE WHEN has_table_privilege('webhook_admin', c.oid, 'UPDATE') THEN 'u' END,
              CASE WHEN has_table_privilege('webhook_admin', c.oid, 'DELETE') THEN 'd' END) AS webhook_admin,
       has_any_column_privilege('regress_monitor', c.oid, 'SELECT') AS monitor_reads_some
  FROM pg_class c
 WHERE c.relnamespace = 'webhook'::regnamespace AND c.relkind IN ('r', 'v', 'p')
 ORDER BY 1;
-- Schema USAGE, and the types: the row types of webhook's tables are not usable by PUBLIC; the
-- status enum is (to roles that also have USAGE on the schema).
SELECT r AS role, has_schema_privilege(r, 'webhook', 'USAGE') AS schema_usage,
       has_type_privilege(r, 'webhook.endpoints', 'USAGE') AS endpoints_type,
       has_type_privilege(r, 'webhook.delivery_status', 'USAGE') AS status_enum
  FROM unnest('{public,regress_monitor,webhook_admin}'::text[]) r ORDER BY 1;

--
-- A role with nothing
--
SET ROLE regress_nobody;
SELECT webhook.create_endpoint('x', 'https://x.example.com');
\echo SQLSTATE :SQLSTATE
SELECT webhook.sign('whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD', 'm', 1, 'b');
\echo SQLSTATE :SQLSTATE
SELECT * FROM webhook.worker_status();
\echo SQLSTATE :SQLSTATE
SELECT count(*) FROM webhook.deliveries;
\echo SQLSTATE :SQLSTATE
SELECT count(*) FROM webhook.metrics;
\echo SQLSTATE :SQLSTATE
CREATE TABLE nobody_t (id int);
CREATE TRIGGER t AFTER INSERT ON nobody_t FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('crm');
\echo SQLSTATE :SQLSTATE
RESET ROLE;

--
-- A webhook_admin member manages endpoints and subscriptions, and reads everything
--
SET ROLE regress_ops;
SELECT name, secret ~ '^whsec_' AS sees_secret FROM webhook.create_endpoint('crm', 'https://crm.example.com/hooks');
SELECT (webhook.alter_endpoint('crm', max_attempts => 3)).max_attempts;
SELECT length(webhook.rotate_secret('crm', grace => '0')) > 10 AS rotated;
SELECT webhook.disable_endpoint('crm');
SELECT disabled_reason FROM webhook.endpoints WHERE name = 'crm';
SELECT webhook.enable_endpoint('crm');
SELECT webhook.send('t.ops', '{}', 'crm') > 0 AS sent;
SELECT webhook.purge(older_than => '30 days') AS purged;
SELECT webhook.replay('crm', since => now() - interval '1 day') AS replayed;
SELECT webhook.verify('whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD', 'm', 1, 'b', webhook.sign('whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD', 'm', 1, 'b')) AS verified;
SELECT database, state FROM webhook.worker_status();
SELECT (SELECT count(*) FROM webhook.endpoint_stats) AS endpoint_stats, (SELECT count(*) FROM webhook.metrics) AS metrics,
       (SELECT count(*) FROM webhook.events) AS events, (SELECT count(*) FROM webhook.subscriptions) AS subscriptions,
       (SELECT count(*) FROM webhook.attempts) AS attempts;
-- It may change webhook.deliveries by hand (the README's recipe for a restored copy).
UPDATE webhook.deliveries SET status = 'cancelled', next_attempt_at = NULL WHERE status = 'pending' AND false;
-- But not the superuser-only setting.
SET webhook.max_payload_bytes = '2MB';
\echo SQLSTATE :SQLSTATE
RESET ROLE;

-- subscribe() creates a trigger with the caller's rights: on a table the member neither owns
-- nor holds TRIGGER on, Postgres refuses it.
CREATE TABLE users (id int PRIMARY KEY, email text);
SET ROLE regress_ops;
SELECT webhook.subscribe('users', 'crm');
\echo SQLSTATE :SQLSTATE
RESET ROLE;
GRANT TRIGGER ON users TO regress_ops;
SET ROLE regress_ops;
SELECT webhook.subscribe('users', 'crm');
SELECT p.relid AS "table", p.via, p.granted_by FROM webhook._publishers p JOIN webhook.endpoints e ON e.id = p.endpoint_id WHERE e.name = 'crm';
RESET ROLE;

--
-- An application role writes a subscribed table with no right on webhook.*
--
GRANT INSERT, UPDATE, DELETE, SELECT ON users TO regress_app;
SET ROLE regress_app;
INSERT INTO users VALUES (1, 'ada@example.com');
UPDATE users SET email = 'ada@example.org' WHERE id = 1;
DELETE FROM users WHERE id = 1;
SELECT count(*) FROM webhook.events;
\echo SQLSTATE :SQLSTATE
RESET ROLE;
SELECT type, payload -> 'new' ->> 'email' AS new_email FROM webhook.events WHERE type LIKE 'public.users.%' ORDER BY id;

--
-- The monitoring recipe: reads what it was granted, nothing else
--
SET ROLE regress_monitor;
SELECT endpoint, pending FROM webhook.metrics ORDER BY endpoint;
SELECT name, url, enabled, disabled_reason FROM webhook.endpoints ORDER BY name;
SELECT (SELECT count(*) FROM webhook.deliveries) AS deliveries, (SELECT count(*) FROM webhook.attempts) AS attempts;
SELECT secret FROM webhook.endpoints;
\echo SQLSTATE :SQLSTATE
SELECT * FROM webhook.endpoints;
\echo SQLSTATE :SQLSTATE
SELECT count(*) FROM webhook.endpoint_stats;
\echo SQLSTATE :SQLSTATE
SELECT count(*) FROM webhook.events;
\echo SQLSTATE :SQLSTATE
SELECT count(*) FROM webhook._events;
\echo SQLSTATE :SQLSTATE
SELECT * FROM webhook.worker_status();
\echo SQLSTATE :SQLSTATE
SELECT webhook.send('t.forged', '{}', 'crm');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('mine', 'https://evil.example.com');
\echo SQLSTATE :SQLSTATE
SELECT webhook.sign('whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD', 'm', 1, 'b');
\echo SQLSTATE :SQLSTATE
UPDATE webhook.deliveries SET status = 'failed' WHERE false;
\echo SQLSTATE :SQLSTATE
RESET ROLE;

--
-- A table owner with USAGE on webhook: its hand-written trigger publishes only once allowed
--
SET ROLE regress_owner;
CREATE TABLE owned (id int, note text);
CREATE TRIGGER owned_webhook AFTER INSERT ON owned FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('crm');
INSERT INTO owned VALUES (1, 'forged?');
\echo SQLSTATE :SQLSTATE
-- A trigger naming an endpoint that does not exist is refused as well (not recorded), since the
-- owner is not an administrator.
CREATE TRIGGER owned_typo AFTER INSERT ON owned FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('crn');
DROP TRIGGER owned_webhook ON owned;
INSERT INTO owned VALUES (1, 'typo');
\echo SQLSTATE :SQLSTATE
DROP TRIGGER owned_typo ON owned;
-- It may not allow itself, nor subscribe.
SELECT webhook.allow_publish('owned', 'crm');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('owned', 'crm');
\echo SQLSTATE :SQLSTATE
-- Nor use webhook's row types or its status enum (a column of one would block an upgrade's
-- ALTER TABLE or ALTER TYPE).
CREATE TABLE holds_type (e webhook.endpoints);
\echo SQLSTATE :SQLSTATE
CREATE TABLE holds_enum (s webhook.delivery_status);
\echo SQLSTATE :SQLSTATE
RESET ROLE;

-- An administrator allows it (the NOTICE names the owner); now the trigger publishes.
SET ROLE regress_ops;
SELECT webhook.allow_publish('public.owned', 'crm');
RESET ROLE;
SET ROLE regress_owner;
CREATE TRIGGER owned_webhook AFTER INSERT ON owned FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('crm', 'id');
INSERT INTO owned VALUES (2, 'allowed');
-- ... and the owner still cannot read what it published.
SELECT count(*) FROM webhook.deliveries;
\echo SQLSTATE :SQLSTATE
RESET ROLE;
SELECT type, payload -> 'new' AS new FROM webhook.events WHERE type = 'public.owned.insert' ORDER BY id;

-- Clean up.
DROP TABLE users, owned, nobody_t;
SELECT regress.drop_all_endpoints() AS endpoints_dropped;
REVOKE CREATE ON SCHEMA public FROM regress_owner, regress_nobody;
DROP OWNED BY regress_monitor, regress_owner;
DROP ROLE regress_nobody, regress_monitor, regress_ops, regress_app, regress_owner;
