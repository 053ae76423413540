-- webhook.enqueue(), the trigger: what subscribe() triggers and hand-written triggers record
-- (events and their deliveries), and every error the trigger raises.
\set SHOW_CONTEXT never

SELECT (webhook.create_endpoint('crm', 'https://crm.example.com/hooks')).name;
SELECT (webhook.create_endpoint('billing', 'https://billing.example.com/hooks', event_types => '{public.invoices.*}')).name;
SELECT (webhook.create_endpoint('pro', 'https://pro.example.com/hooks')).name;
CREATE TABLE users (id int PRIMARY KEY, email text NOT NULL, plan text DEFAULT 'free');

-- What the tests print of what was recorded since this file started: one row per delivery
-- (event type, its payload without the txid, whether the txid is the event's, the endpoint,
-- the delivery's status and error).
SELECT coalesce(max(id), 0) AS ev0 FROM webhook.events \gset
CREATE TEMP VIEW recorded AS
SELECT ev.id AS event_id, ev.type, ev.payload - 'txid' AS payload,
       (ev.payload ->> 'txid')::bigint IS NOT DISTINCT FROM ev.txid AS txid_ok,
       e.name AS endpoint, d.status, d.last_error
  FROM webhook.events ev
  LEFT JOIN webhook.deliveries d ON d.event_id = ev.id
  LEFT JOIN webhook.endpoints e ON e.id = d.endpoint_id
 WHERE ev.id > :ev0;
-- The mark: the last event id before a step (each step shows what it recorded).
CREATE FUNCTION pg_temp.mark() RETURNS bigint LANGUAGE sql AS $$ SELECT coalesce(max(id), 0) FROM webhook.events $$;
SELECT pg_temp.mark() AS mark \gset

--
-- Triggers made by subscribe()
--

-- INSERT, UPDATE and DELETE each record one event ("<schema>.<table>.<op>", the row before and
-- after as to_jsonb renders it, the writer's txid) and one pending delivery.
SELECT webhook.subscribe('users', 'crm');
BEGIN;
INSERT INTO users (id, email) VALUES (1, 'ada@example.com');
UPDATE users SET plan = 'pro' WHERE id = 1;
DELETE FROM users WHERE id = 1;
COMMIT;
SELECT type, payload, txid_ok, endpoint, status, last_error FROM recorded WHERE event_id > :mark ORDER BY event_id;
-- The three events carry the same txid: the writer's transaction.
SELECT count(DISTINCT payload ->> 'txid') AS txids FROM webhook.events WHERE id > :mark;
SELECT pg_temp.mark() AS mark \gset

-- One event per row; none for a rolled-back transaction.
INSERT INTO users (id, email) VALUES (2, 'b@example.com'), (3, 'c@example.com');
BEGIN;
INSERT INTO users (id, email) VALUES (4, 'rolled-back@example.com');
ROLLBACK;
SELECT type, payload -> 'new' ->> 'email' AS email, status FROM recorded WHERE event_id > :mark ORDER BY event_id;
SELECT pg_temp.mark() AS mark \gset

-- An UPDATE that changes nothing still publishes (all columns are published).
UPDATE users SET plan = plan WHERE id = 2;
SELECT type, payload -> 'old' = payload -> 'new' AS unchanged FROM recorded WHERE event_id > :mark ORDER BY event_id;
SELECT pg_temp.mark() AS mark \gset

-- TRUNCATE publishes nothing.
TRUNCATE users;
SELECT count(*) AS recorded FROM recorded WHERE event_id > :mark;

-- columns: the payload holds only those columns, and an UPDATE publishes only when one of them
-- changed.
SELECT webhook.subscribe('users', 'crm', columns => '{id,plan}');
INSERT INTO users (id, email) VALUES (5, 'e@example.com');
UPDATE users SET email = 'e2@example.com' WHERE id = 5;
UPDATE users SET plan = 'pro' WHERE id = 5;
DELETE FROM users WHERE id = 5;
SELECT type, payload, status FROM recorded WHERE event_id > :mark ORDER BY event_id;
SELECT pg_temp.mark() AS mark \gset

-- "when": only rows for which the condition holds.
SELECT webhook.subscribe('users', 'pro', events => '{INSERT}', "when" => $$NEW.plan = 'pro'$$);
INSERT INTO users (id, email, plan) VALUES (6, 'free@example.com', 'free'), (7, 'pro@example.com', 'pro');
SELECT type, payload -> 'new' ->> 'id' AS id, endpoint FROM recorded WHERE event_id > :mark ORDER BY event_id, endpoint;
SELECT pg_temp.mark() AS mark \gset

-- event_types: an endpoint whose filter does not match the event type records nothing for it
-- (billing takes public.invoices.* only).
SELECT webhook.subscribe('users', 'billing', events => '{INSERT}');
INSERT INTO users (id, email) VALUES (8, 'h@example.com');
SELECT type, endpoint FROM recorded WHERE event_id > :mark ORDER BY event_id, endpoint;
SELECT webhook.unsubscribe('users', 'billing');
SELECT pg_temp.mark() AS mark \gset

-- A disabled endpoint: the event is recorded with a cancelled delivery.
SELECT webhook.disable_endpoint('crm');
INSERT INTO users (id, email) VALUES (9, 'i@example.com');
SELECT type, endpoint, status, last_error FROM recorded WHERE event_id > :mark ORDER BY event_id;
SELECT webhook.enable_endpoint('crm');
SELECT pg_temp.mark() AS mark \gset

-- A partitioned table publishes under the root table's name, whichever partition the row is in.
-- An UPDATE that moves a row to another partition is published as a DELETE and an INSERT
-- (Postgres fires those row triggers for a row movement, not UPDATE).
CREATE TABLE measurements (id int, at date, value float8) PARTITION BY RANGE (at);
CREATE TABLE measurements_2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE measurements_2025 PARTITION OF measurements FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
SELECT webhook.subscribe('measurements', 'crm');
INSERT INTO measurements VALUES (1, '2024-06-01', 'NaN'), (2, '2025-06-01', '-Infinity');
UPDATE measurements SET at = '2025-02-01' WHERE id = 1;
SELECT type, payload ->> 'table' AS "table", payload -> 'new' AS new FROM recorded WHERE event_id > :mark ORDER BY event_id;
SELECT pg_temp.mark() AS mark \gset

-- A row whose request body would be larger than webhook.max_payload_bytes (superuser may SET it,
-- at least 1kB) is recorded without its row images, with a failed delivery saying how large it
-- was (the size depends on the txid's digits, so it is shown masked); the writer's statement
-- succeeds.
CREATE TABLE notes (id int, body text);
SELECT webhook.subscribe('notes', 'crm');
SET webhook.max_payload_bytes = '1kB';
SHOW webhook.max_payload_bytes;
INSERT INTO notes VALUES (1, repeat('x', 2000));
SELECT type, payload, status, regexp_replace(last_error, '\d+ bytes', 'N bytes') AS last_error
  FROM recorded WHERE event_id > :mark ORDER BY event_id;
SELECT pg_temp.mark() AS mark \gset
-- (a row that fits is recorded whole)
INSERT INTO notes VALUES (2, repeat('y', 800));
SELECT type, length(payload -> 'new' ->> 'body') AS body, status FROM recorded WHERE event_id > :mark ORDER BY event_id;
RESET webhook.max_payload_bytes;
SET webhook.max_payload_bytes = '512B';
\echo SQLSTATE :SQLSTATE
SET webhook.max_payload_bytes = '101MB';
\echo SQLSTATE :SQLSTATE
SELECT pg_temp.mark() AS mark \gset

--
-- Hand-written triggers
--

-- On a table not allowed to publish to the endpoint, the trigger fails the statement with
-- 42501 and a hint naming both ways to allow it; nothing is recorded. This holds for tables
-- of superusers and webhook_admin members too.
CREATE TABLE invoices (id int PRIMARY KEY, amount numeric, note text);
CREATE TRIGGER invoices_webhook AFTER INSERT OR UPDATE ON invoices FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing');
INSERT INTO invoices VALUES (1, 99.5, 'first');
\echo SQLSTATE :SQLSTATE
SELECT count(*) AS recorded FROM recorded WHERE event_id > :mark;

-- Once allowed, it publishes (billing's event_types filter matches public.invoices.*).
SELECT webhook.allow_publish('invoices', 'billing');
INSERT INTO invoices VALUES (1, 99.5, 'first');
SELECT type, payload, endpoint, status FROM recorded WHERE event_id > :mark ORDER BY event_id;
SELECT pg_temp.mark() AS mark \gset

-- Extra trigger arguments name the columns to publish.
DROP TRIGGER invoices_webhook ON invoices;
CREATE TRIGGER invoices_webhook AFTER INSERT OR UPDATE ON invoices FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing', 'id', 'amount');
INSERT INTO invoices VALUES (2, 10, 'second');
UPDATE invoices SET note = 'not published' WHERE id = 2;
UPDATE invoices SET amount = 11 WHERE id = 2;
SELECT type, payload, endpoint FROM recorded WHERE event_id > :mark ORDER BY event_id;
SELECT pg_temp.mark() AS mark \gset

-- After disallow_publish() the trigger fails again.
SELECT webhook.disallow_publish('invoices', 'billing');
INSERT INTO invoices VALUES (3, 1, 'third');
\echo SQLSTATE :SQLSTATE
DROP TRIGGER invoices_webhook ON invoices;

-- A trigger naming an endpoint that does not exist, on a table owned by a superuser or a
-- webhook_admin member (a typo): recorded as a failed delivery without an endpoint, never sent.
CREATE TABLE typos (id int);
CREATE TRIGGER typo AFTER INSERT ON typos FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('crn');
CREATE TRIGGER typo2 AFTER INSERT ON typos FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('it''s');
CREATE TRIGGER typo3 AFTER INSERT ON typos FOR EACH ROW EXECUTE FUNCTION webhook.enqueue();
INSERT INTO typos VALUES (1);
SELECT type, endpoint, status, last_error FROM recorded WHERE event_id > :mark ORDER BY event_id;
SELECT d.endpoint_id IS NULL AS no_endpoint, d.next_attempt_at IS NULL AS never_due
  FROM webhook.deliveries d WHERE d.event_id > :mark ORDER BY d.id;
SELECT pg_temp.mark() AS mark \gset

-- The trigger must be AFTER ... FOR EACH ROW.
CREATE TABLE wrong (id int);
SELECT webhook.allow_publish('wrong', 'crm');
CREATE TRIGGER before_row BEFORE INSERT ON wrong FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('crm');
INSERT INTO wrong VALUES (1);
\echo SQLSTATE :SQLSTATE
DROP TRIGGER before_row ON wrong;
CREATE TRIGGER after_statement AFTER INSERT ON wrong FOR EACH STATEMENT EXECUTE FUNCTION webhook.enqueue('crm');
INSERT INTO wrong VALUES (1);
\echo SQLSTATE :SQLSTATE
DROP TRIGGER after_statement ON wrong;
CREATE TRIGGER after_truncate AFTER TRUNCATE ON wrong FOR EACH STATEMENT EXECUTE FUNCTION webhook.enqueue('crm');
TRUNCATE wrong;
\echo SQLSTATE :SQLSTATE
DROP TRIGGER after_truncate ON wrong;
CREATE VIEW wrong_view AS SELECT * FROM wrong;
CREATE TRIGGER instead_of INSTEAD OF INSERT ON wrong_view FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('crm');
INSERT INTO wrong_view VALUES (1);
\echo SQLSTATE :SQLSTATE
SELECT count(*) AS recorded FROM recorded WHERE event_id > :mark;

-- A temporary table cannot publish (it cannot be allowed to), whoever owns it.
CREATE TEMP TABLE scratch (id int);
-- (The hint suggests subscribe() and allow_publish(), which both refuse temporary tables.)
CREATE TRIGGER scratch_webhook AFTER INSERT ON scratch FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('crm');
SELECT * FROM regress.error_of('INSERT INTO scratch VALUES (1)');

-- Two subscriptions on one table that publish the same columns share one event per row (a
-- delivery each).
CREATE TABLE both_ways (id int);
SELECT webhook.subscribe('both_ways', 'crm');
SELECT webhook.subscribe('both_ways', 'pro');
INSERT INTO both_ways VALUES (1);
SELECT type, endpoint, status FROM recorded WHERE event_id > :mark ORDER BY event_id, endpoint;
SELECT count(DISTINCT event_id) AS events FROM recorded WHERE event_id > :mark;

-- Clean up.
DROP TABLE users, measurements, notes, invoices, typos, wrong, scratch, both_ways CASCADE;
SELECT regress.drop_all_endpoints() AS endpoints_dropped;
