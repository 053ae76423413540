-- The webhook.* settings: their names, defaults, units and contexts (a reviewable diff of the
-- README's Configuration table), the reserved prefix, and the behaviour of settings the SQL API
-- reads at call time (webhook.https_only, webhook.retention = 0,
-- webhook.circuit_breaker_threshold = 0), changed with ALTER SYSTEM and pg_reload_conf() in
-- this throwaway cluster.
\set SHOW_CONTEXT never

-- Every setting: its default (boot value), its value here, its unit, who may change it.
-- (scripts/regress sets webhook.database and webhook.paused for this cluster.)
SELECT name, boot_val, reset_val, unit, vartype, context, min_val, max_val
  FROM pg_settings WHERE name LIKE 'webhook.%' ORDER BY name;

-- The prefix is reserved: a misspelt setting is an error, not a silent no-op.
SET webhook.max_payload_byte = '1MB';
\echo SQLSTATE :SQLSTATE
-- Only webhook.max_payload_bytes may be SET in a session (by a superuser); the others are
-- server settings.
SET webhook.https_only = on;
\echo SQLSTATE :SQLSTATE
SET webhook.retention = '1d';
\echo SQLSTATE :SQLSTATE

-- Changes the server's settings and waits (up to 10 s) until this session sees them (the wait,
-- not echoed, runs up to 100 statements that sleep 0.1 s while the last setting still has its
-- old value: a session reads a reloaded configuration between statements).
ALTER SYSTEM SET webhook.https_only = on;
ALTER SYSTEM SET webhook.retention = 0;
ALTER SYSTEM SET webhook.circuit_breaker_threshold = 0;
SELECT pg_reload_conf();
\set ECHO none
\o /dev/null
SELECT 'SELECT pg_sleep(0.1) WHERE current_setting(''webhook.circuit_breaker_threshold'') <> ''0''' FROM generate_series(1, 100) \gexec
\o
\set ECHO all
SELECT name, setting FROM pg_settings
 WHERE name IN ('webhook.https_only', 'webhook.retention', 'webhook.circuit_breaker_threshold') ORDER BY name;

-- webhook.https_only: create_endpoint and alter_endpoint refuse plain http; https is fine.
SELECT (webhook.create_endpoint('tls', 'https://tls.example.com/hooks')).url;
SELECT webhook.create_endpoint('plain', 'http://plain.example.com/hooks');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('tls', url => 'http://tls.example.com/hooks');
\echo SQLSTATE :SQLSTATE

-- webhook.retention = 0 (keep forever): purge() without older_than refuses, with a hint;
-- with older_than it works.
SELECT webhook.purge();
\echo SQLSTATE :SQLSTATE
SELECT webhook.purge(older_than => '30 days') AS purged;

-- webhook.circuit_breaker_threshold = 0 turns the circuit breaker off: an endpoint with a long
-- failure streak shows a closed circuit (a disabled one still shows "disabled").
SELECT (webhook.create_endpoint('failing', 'https://failing.example.com')).name;
INSERT INTO webhook._endpoint_state (endpoint_id, consecutive_failures)
SELECT id, 50 FROM webhook.endpoints WHERE name IN ('failing', 'tls');
SELECT webhook.disable_endpoint('tls');
SELECT name, consecutive_failures, circuit FROM webhook.endpoint_stats ORDER BY name;
SELECT endpoint, consecutive_failures, circuit_open FROM webhook.metrics ORDER BY endpoint;

-- Back to the defaults (waiting the same way).
ALTER SYSTEM RESET webhook.https_only;
ALTER SYSTEM RESET webhook.retention;
ALTER SYSTEM RESET webhook.circuit_breaker_threshold;
SELECT pg_reload_conf();
\set ECHO none
\o /dev/null
SELECT 'SELECT pg_sleep(0.1) WHERE current_setting(''webhook.circuit_breaker_threshold'') <> ''10''' FROM generate_series(1, 100) \gexec
\o
\set ECHO all
SELECT name, setting FROM pg_settings
 WHERE name IN ('webhook.https_only', 'webhook.retention', 'webhook.circuit_breaker_threshold') ORDER BY name;
SELECT name, consecutive_failures, circuit FROM webhook.endpoint_stats ORDER BY name;
SELECT endpoint, consecutive_failures, circuit_open FROM webhook.metrics ORDER BY endpoint;
-- (http is accepted again)
SELECT (webhook.create_endpoint('plain', 'http://plain.example.com/hooks')).url;

-- webhook.traceparent: any role sets it; a value that is not a W3C traceparent is refused when
-- set, naming the field; a later version is read as version 00 (what events store).
SET webhook.traceparent = 'abc';
SET webhook.traceparent = '€0-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01';
SET webhook.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01';
SET webhook.traceparent = '00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01';
SET webhook.traceparent = '01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-later';
SELECT webhook._traceparent();
CREATE ROLE regress_tracer;
SET ROLE regress_tracer;
SET webhook.traceparent = '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00';
SHOW webhook.traceparent;
RESET ROLE;
DROP ROLE regress_tracer;
RESET webhook.traceparent;
SELECT webhook._traceparent() IS NULL AS unset;

-- Clean up.
SELECT regress.drop_all_endpoints() AS endpoints_dropped;
