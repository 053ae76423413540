-- CREATE EXTENSION's checks and warnings, in other databases of the cluster: a database not
-- served by the worker (warnings, worker_status(), subscribe()'s NOTICE), an existing
-- webhook_admin role (used with a warning naming its members, or refused when it can log in),
-- a database that is not UTF8 (refused); and DROP EXTENSION.
\set SHOW_CONTEXT never

CREATE DATABASE regress_other TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C';
CREATE ROLE regress_admin_member;
GRANT webhook_admin TO regress_admin_member;

-- In a database the worker does not serve (webhook.database = 'contrib_regression' here):
-- CREATE EXTENSION warns that webhook_admin already exists (naming its members) and that the
-- database is not served.
\c regress_other
\set SHOW_CONTEXT never
CREATE EXTENSION webhook_ext;
-- worker_status() lists the served database's worker (its queue depth is not this database's)
-- and this database as not served.
SELECT database, pid IS NOT NULL AS has_pid, state, in_flight, queue_depth FROM webhook.worker_status() ORDER BY database;
-- subscribe() says so too (events are recorded, not delivered).
SELECT (webhook.create_endpoint('crm', 'https://crm.example.com/hooks')).name;
CREATE TABLE users (id int);
SELECT webhook.subscribe('users', 'crm');
INSERT INTO users VALUES (1);
SELECT status, count(*) FROM webhook.deliveries GROUP BY 1;

-- DROP EXTENSION removes everything in the schema; the triggers that call webhook.enqueue()
-- and webhook.flush() need CASCADE; the role webhook_admin stays (it is cluster-wide). (Terse:
-- Postgres lists the dependent triggers in no fixed order.)
SELECT tgname FROM pg_trigger WHERE tgrelid = 'users'::regclass ORDER BY 1;
\set VERBOSITY terse
DROP EXTENSION webhook_ext;
\echo SQLSTATE :SQLSTATE
DROP EXTENSION webhook_ext CASCADE;
\set VERBOSITY default
-- (The schema webhook stays behind, empty, with its grant to webhook_admin: CREATE EXTENSION
-- made it because the control file names it, so it is not a member of the extension.)
SELECT nspname, nspacl FROM pg_namespace WHERE nspname = 'webhook';
SELECT count(*) AS objects_left FROM pg_class WHERE relnamespace = 'webhook'::regnamespace;
SELECT count(*) AS functions_left FROM pg_proc WHERE pronamespace = 'webhook'::regnamespace;
SELECT count(*) AS event_triggers FROM pg_event_trigger WHERE evtname LIKE 'webhook%';
SELECT tgname FROM pg_trigger WHERE tgrelid = 'users'::regclass;
SELECT count(*) AS webhook_admin_roles FROM pg_roles WHERE rolname = 'webhook_admin';
-- It can be created again.
CREATE EXTENSION webhook_ext;
SELECT count(*) AS endpoints FROM webhook.endpoints;
DROP EXTENSION webhook_ext;

-- An existing webhook_admin that can log in (or has any other attribute) is refused.
ALTER ROLE webhook_admin LOGIN;
CREATE EXTENSION webhook_ext;
\echo SQLSTATE :SQLSTATE
ALTER ROLE webhook_admin NOLOGIN CREATEDB;
CREATE EXTENSION webhook_ext;
\echo SQLSTATE :SQLSTATE
ALTER ROLE webhook_admin NOCREATEDB;

-- A database that is not UTF8 is refused.
\c contrib_regression
CREATE DATABASE regress_latin1 TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C';
\c regress_latin1
\set SHOW_CONTEXT never
CREATE EXTENSION webhook_ext;
\echo SQLSTATE :SQLSTATE

-- Clean up.
\c contrib_regression
DROP DATABASE regress_other;
DROP DATABASE regress_latin1;
DROP ROLE regress_admin_member;
SELECT count(*) AS endpoints FROM webhook.endpoints;
