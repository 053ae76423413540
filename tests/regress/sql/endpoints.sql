-- Endpoints: create_endpoint, alter_endpoint, rotate_secret, disable_endpoint, enable_endpoint,
-- drop_endpoint; their happy paths and every error they raise.
\set SHOW_CONTEXT never

-- What these tests print of an endpoint: everything but ids, timestamps and secrets.
CREATE TEMP VIEW ep AS
SELECT name, url, secret ~ '^whsec_[A-Za-z0-9+/]+={0,2}$' AS whsec, headers, event_types,
       max_attempts, timeout, max_in_flight, rate_limit, ordered, retry_schedule, enabled, disabled_reason,
       previous_secret IS NOT NULL AS has_previous_secret
  FROM webhook.endpoints;

--
-- create_endpoint
--

-- With only a name and a URL: a generated whsec_ secret of 32 random bytes, NULL limits
-- (they follow the webhook.* settings), not ordered, enabled. The returned row is the new row.
SELECT name, url, secret ~ '^whsec_' AS whsec,
       length(decode(substr(secret, 7), 'base64')) AS key_bytes,
       headers, event_types, max_attempts, timeout, max_in_flight, rate_limit, ordered, retry_schedule,
       enabled, disabled_reason, previous_secret, previous_secret_expires_at, created_at = updated_at AS fresh
  FROM webhook.create_endpoint('ep_min', 'https://crm.example.com/hooks');

-- Two generated secrets differ.
SELECT (SELECT secret FROM webhook.create_endpoint('ep_min2', 'https://crm.example.com/hooks'))
    <> (SELECT secret FROM webhook.endpoints WHERE name = 'ep_min') AS secrets_differ;

-- With every argument, by name (the README's example plus the rest).
SELECT (webhook.create_endpoint('ep_full', 'https://billing.example.com/webhooks',
        secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw',
        headers => '{"Authorization": "Bearer token-123", "X-Tenant": "7"}',
        event_types => '{invoice.*,customer.created}', max_attempts => 3, timeout => '5 seconds',
        max_in_flight => 10, rate_limit => 50, ordered => true, retry_schedule => ' 1min, 10min,1h ')).name;
SELECT * FROM ep WHERE name = 'ep_full';
-- The given secret is stored as given.
SELECT secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw' AS stored_as_given FROM webhook.endpoints WHERE name = 'ep_full';

-- A secret without the whsec_ prefix is accepted as raw base64 (as the official libraries do);
-- surrounding spaces are trimmed.
SELECT (webhook.create_endpoint('ep_raw', 'https://a.example.com', secret => '  MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw ')).name;
SELECT secret = 'MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw' AS trimmed FROM webhook.endpoints WHERE name = 'ep_raw';

-- The URL is stored normalised (scheme and host lower-cased, default port and dot segments
-- removed); http is allowed (webhook.https_only is off); ordered => NULL means false, headers =>
-- NULL means none.
SELECT url, ordered, headers
  FROM webhook.create_endpoint('ep_norm', 'HTTPS://Example.COM:443/a/../b?q=1', ordered => NULL, headers => NULL);
SELECT url FROM webhook.create_endpoint('ep_http', 'http://127.0.0.1:8080/hook');
SELECT url FROM webhook.create_endpoint('ep_v6', 'https://[::1]:9443/x');

-- Names: up to 55 bytes (the trigger webhook_<name> must fit in 63), any characters but
-- control characters (quotes and spaces included).
SELECT length(name) FROM webhook.create_endpoint(repeat('n', 55), 'https://a.example.com');
SELECT name FROM webhook.create_endpoint('it''s "quoted" & spaced', 'https://a.example.com');

-- Names must be unique.
SELECT webhook.create_endpoint('ep_min', 'https://other.example.com');
\echo SQLSTATE :SQLSTATE
-- Name errors.
SELECT webhook.create_endpoint(NULL, 'https://a.example.com');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('', 'https://a.example.com');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint(repeat('n', 56), 'https://a.example.com');
\echo SQLSTATE :SQLSTATE
-- (a multi-byte name is measured in bytes: 28 characters of 2 bytes each)
SELECT webhook.create_endpoint(repeat('é', 28), 'https://a.example.com');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint(E'tab\there', 'https://a.example.com');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint(E'new\nline', 'https://a.example.com');
\echo SQLSTATE :SQLSTATE

-- URL errors: none of them echoes the URL (it may carry a token).
SELECT webhook.create_endpoint('ep_bad', NULL);
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', '   ');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com/' || repeat('x', 2048));
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'not a url');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://exa mple.com/');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'ftp://files.example.com/');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'file:///etc/passwd');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'mailto:ops@example.com');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://user:s3cret-token@a.example.com/');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://s3cret-token@a.example.com/');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com/#s3cret-token');
\echo SQLSTATE :SQLSTATE

-- Secret errors: never echo the secret.
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', secret => 'whsec_not!base64');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', secret => 'whsec_c2hvcnQ=');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', secret => replace('whsec_' || encode(convert_to(repeat('k', 65), 'UTF8'), 'base64'), E'\n', ''));
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', secret => '');
\echo SQLSTATE :SQLSTATE
-- (16 and 64 bytes are the limits, both accepted)
SELECT (webhook.create_endpoint('ep_key16', 'https://a.example.com', secret => 'whsec_' || encode(convert_to(repeat('k', 16), 'UTF8'), 'base64'))).name;
SELECT (webhook.create_endpoint('ep_key64', 'https://a.example.com', secret => replace('whsec_' || encode(convert_to(repeat('k', 64), 'UTF8'), 'base64'), E'\n', ''))).name;

-- Header errors: a JSON object of at most 32 string values, valid names, no reserved names,
-- no control characters, values of at most 8192 bytes; values are never echoed.
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', headers => '[1]');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', headers => '"Authorization: Bearer x"');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com',
       headers => (SELECT jsonb_object_agg('X-H' || i, 'v') FROM generate_series(1, 33) i));
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', headers => '{"Bad Name": "v"}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', headers => '{"": "v"}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', headers => '{"webhook-signature": "v1,forged"}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', headers => '{"Content-Type": "text/plain"}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', headers => '{"Host": "internal"}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', headers => '{"X-Count": 1}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', headers => '{"X-Evil": "a\r\nX-Injected: b"}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', headers => jsonb_build_object('X-Big', repeat('v', 8193)));
\echo SQLSTATE :SQLSTATE
-- (32 headers, and a value of 8192 bytes, are accepted)
SELECT (SELECT count(*) FROM jsonb_object_keys(headers)) AS headers
  FROM webhook.create_endpoint('ep_hdr32', 'https://a.example.com',
       headers => (SELECT jsonb_object_agg('X-H' || i, repeat('v', 8192)) FROM generate_series(1, 32) i));

-- Retry schedule errors.
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', retry_schedule => '');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', retry_schedule => ' , ');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', retry_schedule => '5s,,5min');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', retry_schedule => '5');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', retry_schedule => '5 parsecs');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', retry_schedule => '-5s');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', retry_schedule => '5s,8d');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', retry_schedule => (SELECT string_agg('1s', ',') FROM generate_series(1, 101)));
\echo SQLSTATE :SQLSTATE
-- (units ms, s, sec, min, h, d; a bare 0; 7 days; 100 steps are accepted)
SELECT retry_schedule FROM webhook.create_endpoint('ep_sched', 'https://a.example.com', retry_schedule => '0,250ms,1.5s,2sec,5min,2h,7d');
SELECT cardinality(string_to_array(retry_schedule, ',')) AS steps
  FROM webhook.alter_endpoint('ep_sched', retry_schedule => (SELECT string_agg('1s', ',') FROM generate_series(1, 100)));

-- Limit errors: max_attempts 1..100, timeout (0, 5 min], max_in_flight 1..10000,
-- rate_limit >= 1, event_types NULL or non-empty names.
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', max_attempts => 0);
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', max_attempts => 101);
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', timeout => '0');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', timeout => '-1 second');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', timeout => '5 minutes 1 second');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', max_in_flight => 0);
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', max_in_flight => 10001);
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', rate_limit => 0);
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', event_types => '{}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', event_types => '{a.b,""}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'https://a.example.com', event_types => '{a.b,NULL}');
\echo SQLSTATE :SQLSTATE
-- (the limits themselves are accepted)
SELECT max_attempts, timeout, max_in_flight, rate_limit
  FROM webhook.create_endpoint('ep_lim_lo', 'https://a.example.com', max_attempts => 1, timeout => '1 millisecond', max_in_flight => 1, rate_limit => 1);
SELECT max_attempts, timeout, max_in_flight
  FROM webhook.create_endpoint('ep_lim_hi', 'https://a.example.com', max_attempts => 100, timeout => '5 minutes', max_in_flight => 10000);

-- Nothing was created by the failed calls.
SELECT count(*) AS bad_endpoints FROM webhook.endpoints WHERE name = 'ep_bad';

--
-- alter_endpoint
--

-- NULL arguments leave settings as they are; the others change them; updated_at moves.
SELECT name, url, max_attempts, timeout, max_in_flight, rate_limit, ordered, retry_schedule, event_types, headers,
       updated_at > created_at AS updated
  FROM webhook.alter_endpoint('ep_full', url => 'https://billing2.example.com/v2', max_attempts => 5);
SELECT name, url, max_attempts, timeout, max_in_flight, rate_limit, ordered, retry_schedule, event_types, headers
  FROM webhook.alter_endpoint('ep_full', timeout => '10 seconds', max_in_flight => 20, rate_limit => 5,
                              ordered => false, retry_schedule => '1s,2s', event_types => '{order.*}',
                              headers => '{"X-Only": "this"}');
-- With no argument but the name, nothing changes.
SELECT * FROM ep WHERE name = 'ep_full';
SELECT (webhook.alter_endpoint('ep_full')).name;
SELECT * FROM ep WHERE name = 'ep_full';

-- A new secret by alter_endpoint replaces the old one at once (no grace period).
SELECT (webhook.alter_endpoint('ep_full', secret => 'whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD')).name;
SELECT secret = 'whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD' AS replaced, previous_secret IS NULL AS no_previous
  FROM webhook.endpoints WHERE name = 'ep_full';

-- reset returns settings to their defaults (NULL: follow the settings; headers: none).
SELECT headers, event_types, max_attempts, timeout, max_in_flight, rate_limit, retry_schedule
  FROM webhook.alter_endpoint('ep_full', reset => '{headers,event_types,max_attempts,timeout,max_in_flight,rate_limit,retry_schedule}');

-- A setting given and reset in the same call ends up reset (reset wins, silently).
SELECT max_attempts FROM webhook.alter_endpoint('ep_full', max_attempts => 7, reset => '{max_attempts}');

-- reset accepts only those names (url, secret, ordered and name cannot be reset).
SELECT webhook.alter_endpoint('ep_full', reset => '{url}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', reset => '{ordered}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', reset => '{MAX_ATTEMPTS}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', reset => '{timeout,NULL}');
\echo SQLSTATE :SQLSTATE
-- (reset => NULL is no reset)
SELECT (webhook.alter_endpoint('ep_full', reset => NULL)).name;

-- An endpoint that does not exist.
SELECT webhook.alter_endpoint('nope', max_attempts => 3);
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint(NULL, max_attempts => 3);
\echo SQLSTATE :SQLSTATE

-- alter_endpoint checks what create_endpoint checks.
SELECT webhook.alter_endpoint('ep_full', url => 'ftp://files.example.com/');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', url => '');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', secret => 'whsec_c2hvcnQ=');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', headers => '{"webhook-id": "x"}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', retry_schedule => 'soon');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', max_attempts => 0);
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', timeout => '1 hour');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', max_in_flight => -1);
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', rate_limit => -1);
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_full', event_types => '{}');
\echo SQLSTATE :SQLSTATE
-- ... and none of the failed calls changed anything.
SELECT * FROM ep WHERE name = 'ep_full';

--
-- rotate_secret
--

-- A new generated secret is returned and stored; the old one stays valid until the grace
-- period ends (default 24 hours).
SELECT secret AS s0 FROM webhook.endpoints WHERE name = 'ep_min' \gset
BEGIN;
SELECT webhook.rotate_secret('ep_min') AS s1 \gset
SELECT :'s1' ~ '^whsec_' AS whsec, length(decode(substr(:'s1', 7), 'base64')) AS key_bytes,
       secret = :'s1' AS stored, previous_secret = :'s0' AS previous_is_old,
       previous_secret_expires_at - now() AS grace, updated_at = now() AS updated
  FROM webhook.endpoints WHERE name = 'ep_min';
COMMIT;

-- Rotating again within the grace period drops the oldest secret: the previous one is now the
-- secret of the first rotation.
BEGIN;
SELECT webhook.rotate_secret('ep_min', grace => '1 hour') AS s2 \gset
SELECT secret = :'s2' AS stored, previous_secret = :'s1' AS previous_is_first_rotation,
       :'s2' NOT IN (:'s0', :'s1') AS new, previous_secret_expires_at - now() AS grace
  FROM webhook.endpoints WHERE name = 'ep_min';
COMMIT;

-- grace => '0' switches at once: no previous secret.
SELECT webhook.rotate_secret('ep_min', grace => '0') AS s3 \gset
SELECT secret = :'s3' AS stored, previous_secret, previous_secret_expires_at
  FROM webhook.endpoints WHERE name = 'ep_min';

-- A secret set by alter_endpoint during a grace period replaces the current secret only: the
-- previous one (from before the rotation) stays valid until the grace period ends.
SELECT webhook.rotate_secret('ep_full', grace => '1 hour') AS r1 \gset
SELECT (webhook.alter_endpoint('ep_full', secret => 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw')).name;
SELECT secret = 'whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw' AS replaced,
       previous_secret = 'whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD' AS previous_still_valid,
       previous_secret_expires_at > now() AS until_grace_ends
  FROM webhook.endpoints WHERE name = 'ep_full';

-- Errors.
SELECT webhook.rotate_secret('nope');
\echo SQLSTATE :SQLSTATE
SELECT webhook.rotate_secret('ep_min', grace => NULL);
\echo SQLSTATE :SQLSTATE
SELECT webhook.rotate_secret('ep_min', grace => '-1 hour');
\echo SQLSTATE :SQLSTATE
SELECT secret = :'s3' AS unchanged FROM webhook.endpoints WHERE name = 'ep_min';

--
-- disable_endpoint / enable_endpoint
--

-- Disabling cancels the endpoint's pending deliveries (of other endpoints: untouched) and
-- records the reason; a delivery being sent is left alone.
SELECT webhook.send('test.disable', '{"n": 1}', 'ep_min') AS ev1 \gset
SELECT webhook.send('test.disable', '{"n": 2}', 'ep_min') AS ev2 \gset
SELECT webhook.send('test.disable', '{"n": 3}', 'ep_min2') AS ev3 \gset
UPDATE webhook.deliveries SET status = 'sending', next_attempt_at = now() + interval '1 hour' WHERE event_id = :ev2;
SELECT webhook.disable_endpoint('ep_min', 'receiver maintenance');
SELECT enabled, disabled_reason FROM webhook.endpoints WHERE name = 'ep_min';
SELECT d.event_id - :ev1 AS event, e.name, d.status, d.next_attempt_at IS NULL AS not_due, d.last_error
  FROM webhook.deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id
 WHERE d.event_id IN (:ev1, :ev2, :ev3) ORDER BY d.event_id;
UPDATE webhook.deliveries SET status = 'cancelled', next_attempt_at = NULL WHERE event_id = :ev2;

-- Without a reason: "disabled by <role>".
SELECT webhook.disable_endpoint('ep_min2');
SELECT enabled, disabled_reason FROM webhook.endpoints WHERE name = 'ep_min2';

-- Enabling clears the reason and resets the circuit breaker (the worker's per-endpoint state);
-- cancelled deliveries stay cancelled (replay() sends them again).
INSERT INTO webhook._endpoint_state (endpoint_id, consecutive_failures, failing_since, next_probe_at)
SELECT id, 12, now() - interval '1 hour', now() + interval '1 minute' FROM webhook.endpoints WHERE name = 'ep_min';
SELECT webhook.enable_endpoint('ep_min');
SELECT enabled, disabled_reason FROM webhook.endpoints WHERE name = 'ep_min';
SELECT s.consecutive_failures, s.failing_since, s.next_probe_at
  FROM webhook._endpoint_state s JOIN webhook.endpoints e ON e.id = s.endpoint_id WHERE e.name = 'ep_min';
SELECT status, count(*) FROM webhook.deliveries WHERE event_id IN (:ev1, :ev2) GROUP BY 1;
-- Enabling an enabled endpoint, or disabling a disabled one (with a new reason), is allowed.
SELECT webhook.enable_endpoint('ep_min');
SELECT webhook.disable_endpoint('ep_min2', 'second reason');
SELECT enabled, disabled_reason FROM webhook.endpoints WHERE name = 'ep_min2';

-- Errors.
SELECT webhook.disable_endpoint('nope');
\echo SQLSTATE :SQLSTATE
SELECT webhook.enable_endpoint('nope');
\echo SQLSTATE :SQLSTATE
SELECT webhook.disable_endpoint(NULL);
\echo SQLSTATE :SQLSTATE

--
-- drop_endpoint
--

-- Dropping an endpoint no table publishes to: its pending deliveries become cancelled
-- ("endpoint dropped"), its history stays.
SELECT webhook.send('test.drop', '{}', 'ep_raw') AS ev4 \gset
SELECT webhook.drop_endpoint('ep_raw');
SELECT count(*) AS endpoints_left FROM webhook.endpoints WHERE name = 'ep_raw';
SELECT status, last_error, next_attempt_at FROM webhook.deliveries WHERE event_id = :ev4;

-- While tables are subscribed to it (or allowed to publish to it, with a hand-written trigger)
-- it is refused, naming the tables.
CREATE TABLE ep_orders (id int PRIMARY KEY, total numeric);
CREATE TABLE ep_users (id int PRIMARY KEY, email text);
SELECT webhook.subscribe('ep_orders', 'ep_norm');
SELECT webhook.allow_publish('ep_users', 'ep_norm');
CREATE TRIGGER by_hand AFTER INSERT ON ep_users FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('ep_norm');
SELECT webhook.drop_endpoint('ep_norm');
\echo SQLSTATE :SQLSTATE
SELECT webhook.drop_endpoint('ep_norm', cascade => false);
\echo SQLSTATE :SQLSTATE

-- cascade => true drops those triggers too, and the tables' rights to publish.
SELECT webhook.drop_endpoint('ep_norm', cascade => true);
SELECT tgname FROM pg_trigger WHERE tgrelid IN ('ep_orders'::regclass, 'ep_users'::regclass) ORDER BY 1;
SELECT count(*) AS publishers_left FROM webhook._publishers WHERE relid IN ('ep_orders'::regclass, 'ep_users'::regclass);

-- A trigger on a table that was never allowed to publish to the endpoint does not block it
-- (any role with USAGE on webhook could put one on a temporary table), and is left in place.
CREATE TABLE ep_stray (id int);
CREATE TRIGGER stray AFTER INSERT ON ep_stray FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('ep_http');
SELECT webhook.drop_endpoint('ep_http');
SELECT tgname FROM pg_trigger WHERE tgrelid = 'ep_stray'::regclass;

-- Errors.
SELECT webhook.drop_endpoint('nope');
\echo SQLSTATE :SQLSTATE
SELECT webhook.drop_endpoint(NULL);
\echo SQLSTATE :SQLSTATE
SELECT webhook.drop_endpoint('ep_raw');
\echo SQLSTATE :SQLSTATE

-- Signing with ed25519: a key is made for an endpoint that signs with it, or checked when given;
-- webhook.public_keys shows its public key (derived, so comparable here: RFC 8032's test key).
SELECT signing, signing_key IS NOT NULL AS has_key FROM webhook.create_endpoint('ep_ed', 'http://127.0.0.1:9/', signing => 'ed25519');
SELECT signing, signing_key FROM webhook.create_endpoint('ep_rfc', 'http://127.0.0.1:9/', signing => 'both',
       signing_key => 'whsk_nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=');
SELECT endpoint, signing, public_key, previous_public_key FROM webhook.public_keys WHERE endpoint = 'ep_rfc';
SELECT count(*) AS listed FROM webhook.public_keys WHERE endpoint IN ('ep_ed', 'ep_rfc', 'ep_full');
SELECT webhook.rotate_signing_key('ep_rfc', '1 hour') <> 'whpk_11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=' AS rotated;
SELECT previous_public_key FROM webhook.public_keys WHERE endpoint = 'ep_rfc';
SELECT webhook.create_endpoint('ep_bad', 'http://127.0.0.1:9/', signing => 'ecdsa');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'http://127.0.0.1:9/', signing => 'ed25519', signing_key => 'whsk_AAAA');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_ed', signing_key => 'whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD');
\echo SQLSTATE :SQLSTATE
SELECT webhook.rotate_signing_key('ep_full');
\echo SQLSTATE :SQLSTATE
SELECT webhook.rotate_signing_key('ep_ed', NULL);
\echo SQLSTATE :SQLSTATE
-- Client certificates (mutual TLS): both halves or neither, and PEM; e2e receivers:: test the rest.
SELECT webhook.create_endpoint('ep_bad', 'http://127.0.0.1:9/', client_cert => 'x');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'http://127.0.0.1:9/', client_cert => 'x', client_key => 'y');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_ed', client_key => 'y');
\echo SQLSTATE :SQLSTATE
-- Forward proxies: 'direct', or a URL (checked, never quoted: it may hold a password).
SELECT proxy FROM webhook.create_endpoint('ep_direct', 'http://127.0.0.1:9/', proxy => 'direct');
SELECT proxy FROM webhook.alter_endpoint('ep_direct', proxy => 'http://egress.internal:3128');
SELECT webhook.alter_endpoint('ep_direct', proxy => 'socks5://user:pw-not-shown@egress.internal:1080');
\echo SQLSTATE :SQLSTATE
SELECT webhook.alter_endpoint('ep_direct', proxy => 'http://user:pw-not-shown@egress.internal:3128/path');
\echo SQLSTATE :SQLSTATE
SELECT proxy IS NULL AS follows_setting FROM webhook.alter_endpoint('ep_direct', reset => '{proxy}');
-- OAuth2 client credentials: token URL, id and secret together; reset => '{oauth}' drops them.
SELECT oauth_token_url, oauth_client_id, oauth_scope
  FROM webhook.alter_endpoint('ep_direct', oauth_token_url => 'https://auth.example.com/token',
                              oauth_client_id => 'hooks', oauth_client_secret => 'not-shown', oauth_scope => 'hooks.write');
SELECT webhook.alter_endpoint('ep_direct', reset => '{oauth_scope}', oauth_client_secret => '');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'http://127.0.0.1:9/', oauth_token_url => 'https://auth.example.com/token');
\echo SQLSTATE :SQLSTATE
SELECT webhook.create_endpoint('ep_bad', 'http://127.0.0.1:9/', oauth_token_url => 'file:///token', oauth_client_id => 'a', oauth_client_secret => 'b');
\echo SQLSTATE :SQLSTATE
SELECT oauth_token_url IS NULL AND oauth_client_secret IS NULL AS dropped FROM webhook.alter_endpoint('ep_direct', reset => '{oauth}');

-- Clean up: drop this file's endpoints and tables.
SELECT regress.drop_all_endpoints() AS endpoints_dropped;
DROP TABLE ep_orders, ep_users, ep_stray;
SELECT count(*) AS endpoints FROM webhook.endpoints;
