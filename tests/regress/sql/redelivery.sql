-- Redelivery: webhook.retry() (the same delivery again) and webhook.replay() (new deliveries of
-- past events); their happy paths and every error they raise. The worker is paused, so the
-- outcomes it would record (failed, delivered, sending) are set by hand as fixtures.
\set SHOW_CONTEXT never

SELECT (webhook.create_endpoint('crm', 'https://crm.example.com/hooks')).name;
SELECT (webhook.create_endpoint('other', 'https://other.example.com/hooks')).name;
SELECT (webhook.create_endpoint('gone', 'https://gone.example.com/hooks')).name;

-- Number this file's events from 1000 on. A delivery made with its event has the id
-- event id * 2^20 + endpoint id (these appear in error messages), so the fixtures below are named
-- by their event: "1000" is the delivery of event 1000.
SELECT setval(pg_get_serial_sequence('webhook._events', 'id'), 1000, false) IS NOT NULL AS renumbered;

CREATE TEMP VIEW d AS
SELECT d.event_id AS event, d.id, e.name AS endpoint, d.status, d.attempts, d.next_attempt_at IS NOT NULL AS due,
       d.next_attempt_at <= now() AS due_now, d.last_status_code, d.last_error
  FROM webhook.deliveries d LEFT JOIN webhook.endpoints e ON e.id = d.endpoint_id
 WHERE d.event_id >= 1000;

--
-- retry
--

-- Fixtures: 1000 failed (a dead letter after 8 attempts), 1001 cancelled, 1002 delivered,
-- 1003 being sent (its lease runs for an hour), 1004 pending (not yet due).
SELECT webhook.send('t.retry', jsonb_build_object('n', i), 'crm') > 0 AS sent FROM generate_series(0, 4) i;
UPDATE webhook.deliveries SET status = 'failed', attempts = 8, next_attempt_at = NULL, last_status_code = 500, last_error = 'HTTP 500' WHERE event_id = 1000;
UPDATE webhook.deliveries SET status = 'cancelled', next_attempt_at = NULL, last_error = 'endpoint disabled' WHERE event_id = 1001;
UPDATE webhook.deliveries SET status = 'delivered', attempts = 1, next_attempt_at = NULL, last_status_code = 200, delivered_at = now() WHERE event_id = 1002;
UPDATE webhook.deliveries SET status = 'sending', attempts = 1, next_attempt_at = now() + interval '1 hour' WHERE event_id = 1003;
UPDATE webhook.deliveries SET attempts = 2, next_attempt_at = now() + interval '1 hour', last_error = 'HTTP 503' WHERE event_id = 1004;
SELECT * FROM d ORDER BY id;

-- A failed or cancelled delivery becomes pending, due now; its attempts continue from where
-- they stopped (its last error stays until the next attempt).
SELECT webhook.retry((SELECT id FROM webhook.deliveries WHERE event_id = 1000));
SELECT webhook.retry((SELECT id FROM webhook.deliveries WHERE event_id = 1001));
SELECT * FROM d WHERE event IN (1000, 1001) ORDER BY id;

-- A pending delivery is made due now.
SELECT webhook.retry((SELECT id FROM webhook.deliveries WHERE event_id = 1004));
SELECT * FROM d WHERE event = 1004;

-- A delivery being sent is left alone, with a NOTICE.
SELECT webhook.retry((SELECT id FROM webhook.deliveries WHERE event_id = 1003));
SELECT * FROM d WHERE event = 1003;

-- A delivered one is refused (replay() sends its event again).
SELECT webhook.retry((SELECT id FROM webhook.deliveries WHERE event_id = 1002));
\echo SQLSTATE :SQLSTATE

-- A delivery that does not exist.
SELECT webhook.retry(-1);
\echo SQLSTATE :SQLSTATE
SELECT webhook.retry(NULL);
\echo SQLSTATE :SQLSTATE

-- A delivery whose endpoint is disabled: enable it first.
SELECT webhook.send('t.retry', '{}', 'other') > 0 AS sent;
SELECT webhook.disable_endpoint('other');
SELECT webhook.retry((SELECT id FROM webhook.deliveries WHERE event_id = 1005));
\echo SQLSTATE :SQLSTATE
SELECT webhook.enable_endpoint('other');
SELECT webhook.retry((SELECT id FROM webhook.deliveries WHERE event_id = 1005));
SELECT * FROM d WHERE event = 1005;

-- A delivery whose endpoint was dropped: pending ones were cancelled with "endpoint dropped";
-- a failed one keeps its own last error, which the message then shows as the reason.
SELECT webhook.send('t.retry', jsonb_build_object('n', i), 'gone') > 0 AS sent FROM generate_series(6, 7) i;
UPDATE webhook.deliveries SET status = 'failed', attempts = 8, next_attempt_at = NULL, last_status_code = 500, last_error = 'HTTP 500' WHERE event_id = 1007;
SELECT webhook.drop_endpoint('gone');
SELECT * FROM d WHERE event IN (1006, 1007) ORDER BY id;
SELECT webhook.retry((SELECT id FROM webhook.deliveries WHERE event_id = 1006));
\echo SQLSTATE :SQLSTATE
SELECT webhook.retry((SELECT id FROM webhook.deliveries WHERE event_id = 1007));
\echo SQLSTATE :SQLSTATE

-- A delivery whose trigger named an endpoint that does not exist (a typo on a table of a
-- superuser or webhook_admin member): failed, without an endpoint.
CREATE TABLE typos (id int);
CREATE TRIGGER typo AFTER INSERT ON typos FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('crn');
INSERT INTO typos VALUES (1);
SELECT * FROM d WHERE event = 1008;
SELECT webhook.retry((SELECT id FROM webhook.deliveries WHERE event_id = 1008));
\echo SQLSTATE :SQLSTATE

-- A delivery of a row too large to send: its row was not kept, so it cannot be sent again
-- (numbers masked: the size counts the txid's digits).
CREATE TABLE notes (id int, body text);
SELECT webhook.subscribe('notes', 'crm');
SET webhook.max_payload_bytes = '1kB';
INSERT INTO notes VALUES (1, repeat('x', 2000));
RESET webhook.max_payload_bytes;
SELECT event, endpoint, status, regexp_replace(last_error, '\d+ bytes', 'N bytes') AS last_error FROM d WHERE event = 1009;
SELECT * FROM regress.error_of('SELECT webhook.retry((SELECT id FROM webhook.deliveries WHERE event_id = 1009))', mask_numbers => true);

--
-- replay
--

-- Fixtures: four events dated in 2020 (three sent to crm, one to other), one in 2021 (sent to
-- every endpoint).
SELECT count(webhook.send('t.replay', jsonb_build_object('n', i), CASE WHEN i = 3 THEN 'other' ELSE 'crm' END)) AS sent
  FROM generate_series(1, 4) i;
SELECT webhook.send('t.replay', '{"n": 5}') > 0 AS sent_to_all;
SELECT max(id) AS last_ev FROM webhook.events \gset
UPDATE webhook._events SET created_at = CASE WHEN id = :last_ev THEN timestamptz '2021-06-01 12:00+00'
                                             ELSE timestamptz '2020-01-01 00:00+00' + (id - :last_ev + 4) * interval '1 day' END
 WHERE id > :last_ev - 5;
SELECT ev.id - :last_ev AS event, ev.created_at AT TIME ZONE 'UTC' AS created_at_utc,
       array_agg(e.name ORDER BY e.name) AS sent_to
  FROM webhook.events ev JOIN webhook.deliveries x ON x.event_id = ev.id JOIN webhook.endpoints e ON e.id = x.endpoint_id
 WHERE ev.id > :last_ev - 5 GROUP BY ev.id, ev.created_at ORDER BY ev.id;

-- New pending deliveries of the events sent to the endpoint in [since, until), oldest first;
-- returns how many. Events sent only to other endpoints are not replayed.
SELECT max(id) AS last_delivery FROM webhook.deliveries \gset
SELECT webhook.replay('crm', since => '2020-01-01 00:00+00', until => '2020-01-04 00:00+00');
SELECT x.event_id - :last_ev AS event, e.name, x.status, x.attempts, x.next_attempt_at <= now() AS due
  FROM webhook.deliveries x JOIN webhook.endpoints e ON e.id = x.endpoint_id
 WHERE x.id > :last_delivery ORDER BY x.id;
-- until is exclusive, since inclusive.
SELECT webhook.replay('crm', since => '2020-01-02 00:00+00', until => '2020-01-03 00:00+00');
-- until defaults to now(): what was sent to other since 2021 (the 2021 event, and the one sent
-- for retry's tests above).
SELECT webhook.replay('other', since => '2021-01-01 00:00+00');
-- Nothing in the range: 0.
SELECT webhook.replay('crm', since => '1999-01-01 00:00+00', until => '1999-12-31 00:00+00');

-- An event replayed earlier is replayed again (each replay is a new delivery).
SELECT webhook.replay('crm', since => '2020-01-01 00:00+00', until => '2020-01-02 00:00+00');

-- retry() refuses a delivery of a row too large to send (above), because its row was not kept;
-- replay() leaves that event out too (0), rather than send "new": null and "old": null.
UPDATE webhook._events SET created_at = '2019-01-01 00:00+00'
 WHERE id = 1009;
SELECT webhook.replay('crm', since => '2019-01-01 00:00+00', until => '2019-01-02 00:00+00');

-- Errors.
SELECT webhook.replay('nope', since => '2020-01-01 00:00+00');
\echo SQLSTATE :SQLSTATE
SELECT webhook.replay(NULL, since => '2020-01-01 00:00+00');
\echo SQLSTATE :SQLSTATE
SELECT webhook.replay('crm', since => '2020-01-02 00:00+00', until => '2020-01-01 00:00+00');
\echo SQLSTATE :SQLSTATE
SELECT webhook.replay('crm', since => '2020-01-01 00:00+00', until => '2020-01-01 00:00+00');
\echo SQLSTATE :SQLSTATE
SELECT webhook.replay('crm', since => NULL);
\echo SQLSTATE :SQLSTATE
SELECT webhook.replay('crm', since => '2020-01-01 00:00+00', until => NULL);
\echo SQLSTATE :SQLSTATE
SELECT webhook.replay('crm', since => now() + interval '1 day');
\echo SQLSTATE :SQLSTATE
SELECT webhook.disable_endpoint('other');
SELECT webhook.replay('other', since => '2020-01-01 00:00+00');
\echo SQLSTATE :SQLSTATE

-- Clean up.
DROP TABLE typos, notes;
SELECT regress.drop_all_endpoints() AS endpoints_dropped;
