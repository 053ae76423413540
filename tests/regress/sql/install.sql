-- CREATE EXTENSION in the test database (served by the worker, webhook.paused = on).
-- Every test file hides CONTEXT lines (PL/pgSQL line numbers and the statement inside the
-- function are implementation details) but shows each error's message, DETAIL and HINT, and
-- echoes its SQLSTATE on the next line (psql's :SQLSTATE; 00000 would mean it did not fail).
\set SHOW_CONTEXT never

-- A fresh cluster: CREATE EXTENSION creates the role webhook_admin and says nothing else
-- (the database is UTF8 and served by the worker).
SELECT count(*) AS webhook_admin_before FROM pg_roles WHERE rolname = 'webhook_admin';
CREATE EXTENSION webhook_ext;
SELECT extversion, extrelocatable, extnamespace::regnamespace AS schema
  FROM pg_extension WHERE extname = 'webhook_ext';

-- webhook_admin is NOLOGIN with no other attribute, and has no members yet.
SELECT rolname, rolcanlogin, rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, rolinherit
  FROM pg_roles WHERE rolname = 'webhook_admin';
SELECT count(*) AS members FROM pg_auth_members WHERE roleid = 'webhook_admin'::regrole;

-- The extension is not relocatable: its schema is fixed.
ALTER EXTENSION webhook_ext SET SCHEMA public;
\echo SQLSTATE :SQLSTATE

-- It is installed once per database.
CREATE EXTENSION webhook_ext;
\echo SQLSTATE :SQLSTATE

-- The worker for this database notices the extension and, with webhook.paused = on, says
-- "paused" (wait up to 30 s for it to get there).
DO $$
BEGIN
    FOR i IN 1..300 LOOP
        EXIT WHEN (SELECT s.state FROM webhook.worker_status() s WHERE s.database = current_database()) = 'paused';
        PERFORM pg_sleep(0.1);
    END LOOP;
END
$$;
SELECT database, pid IS NOT NULL AS has_pid, state, in_flight, queue_depth
  FROM webhook.worker_status();

-- Helpers for the later tests (schema regress is not the extension's).
CREATE SCHEMA regress;
-- Runs a statement that should fail and returns its error as a row, with the parts that vary
-- between runs masked: a temporary schema's number (pg_temp_N) and, when asked, numbers.
CREATE FUNCTION regress.error_of(stmt text, mask_numbers boolean DEFAULT false)
RETURNS TABLE (code text, message text, detail text, hint text)
LANGUAGE plpgsql AS $$
DECLARE
    c text;
    m text;
    d text;
    h text;
BEGIN
    EXECUTE stmt;
    RETURN QUERY SELECT '00000'::text, 'no error'::text, NULL::text, NULL::text;
EXCEPTION WHEN OTHERS THEN
    GET STACKED DIAGNOSTICS c = RETURNED_SQLSTATE, m = MESSAGE_TEXT, d = PG_EXCEPTION_DETAIL, h = PG_EXCEPTION_HINT;
    m := regexp_replace(m, 'pg_temp_\d+', 'pg_temp_N', 'g');
    h := regexp_replace(h, 'pg_temp_\d+', 'pg_temp_N', 'g');
    IF mask_numbers THEN
        m := regexp_replace(m, '\d+', 'N', 'g');
    END IF;
    RETURN QUERY SELECT c, m, nullif(d, ''), nullif(h, '');
END
$$;
-- Drops every endpoint (and the triggers that publish to them): each test file cleans up with it.
CREATE FUNCTION regress.drop_all_endpoints() RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n text;
    k bigint := 0;
BEGIN
    FOR n IN SELECT e.name FROM webhook.endpoints e ORDER BY e.name LOOP
        PERFORM webhook.drop_endpoint(n, cascade => true);
        k := k + 1;
    END LOOP;
    RETURN k;
END
$$;
