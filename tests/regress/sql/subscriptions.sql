-- Sources of events: subscribe, unsubscribe, allow_publish, disallow_publish, the
-- webhook.subscriptions view, and the guards on subscribed tables (column rename/drop,
-- table rename, table drop). What the triggers record is in triggers.sql.
\set SHOW_CONTEXT never

SELECT (webhook.create_endpoint('crm', 'https://crm.example.com/hooks')).name;
SELECT (webhook.create_endpoint('billing', 'https://billing.example.com/hooks')).name;
CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL, plan text DEFAULT 'free');
CREATE TABLE orders (id int PRIMARY KEY, total numeric);

-- What the tests print of a subscription.
CREATE TEMP VIEW subs AS
SELECT "table", endpoint, trigger_name, events, columns, enabled, definition
  FROM webhook.subscriptions ORDER BY 1::text, 2, 3;
-- The tables allowed to publish, and how.
CREATE TEMP VIEW pubs AS
SELECT p.relid AS "table", e.name AS endpoint, p.via, p.granted_by
  FROM webhook._publishers p JOIN webhook.endpoints e ON e.id = p.endpoint_id ORDER BY 1::text, 2, 3;

--
-- subscribe
--

-- Default events (INSERT, UPDATE, DELETE), all columns: the trigger webhook_<endpoint>, AFTER
-- ... FOR EACH ROW; a NOTICE names the table in full and its owner; the table may now publish
-- to the endpoint.
SELECT webhook.subscribe('users', 'crm');
SELECT * FROM subs;
SELECT * FROM pubs;

-- Subscribing again replaces the trigger (same name): events are upper-cased, trimmed and
-- de-duplicated; columns become the trigger's extra arguments.
SELECT webhook.subscribe('users', 'crm', events => '{update, Update ," insert"}', columns => '{id,plan}');
SELECT * FROM subs;
SELECT * FROM pubs;

-- "when" becomes the trigger's WHEN condition.
SELECT webhook.subscribe('users', 'billing', events => '{INSERT}', "when" => $$NEW.plan = 'pro'$$);
SELECT * FROM subs WHERE endpoint = 'billing';

-- A table is named by regclass: schema-qualified and quoted names work; the NOTICE and the view
-- show it in full. The trigger of an endpoint whose name needs quoting is quoted.
CREATE SCHEMA app;
CREATE TABLE app."Order Items" (id int, sku text);
SELECT (webhook.create_endpoint('it''s "odd"', 'https://odd.example.com')).name;
SELECT webhook.subscribe('app."Order Items"', 'it''s "odd"', events => '{DELETE}');
SELECT * FROM subs WHERE endpoint = 'it''s "odd"';

-- A partitioned table: the trigger is on the root (its partitions' clones are not listed).
CREATE TABLE measurements (id int, at date) PARTITION BY RANGE (at);
CREATE TABLE measurements_2024 PARTITION OF measurements FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
SELECT webhook.subscribe('measurements', 'crm', events => '{INSERT}');
SELECT "table", trigger_name FROM subs WHERE "table"::text LIKE 'measurements%';
SELECT tgrelid::regclass AS "table", tgname, tgparentid <> 0 AS clone
  FROM pg_trigger WHERE tgrelid IN ('measurements'::regclass, 'measurements_2024'::regclass) ORDER BY 1::text;

-- webhook.subscriptions.enabled follows ALTER TABLE ... DISABLE TRIGGER; subscribing again
-- makes a new, enabled trigger.
SELECT webhook.subscribe('orders', 'crm');
ALTER TABLE orders DISABLE TRIGGER webhook_crm;
SELECT "table", endpoint, enabled FROM subs WHERE "table" = 'orders'::regclass;
SELECT webhook.subscribe('orders', 'crm');
SELECT "table", endpoint, enabled FROM subs WHERE "table" = 'orders'::regclass;

-- Errors: the table.
SELECT webhook.subscribe(NULL, 'crm');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('no_such_table', 'crm');
\echo SQLSTATE :SQLSTATE
CREATE VIEW users_view AS SELECT * FROM users;
CREATE VIEW "Odd View" AS SELECT * FROM users;
CREATE MATERIALIZED VIEW users_mat AS SELECT * FROM users;
CREATE SEQUENCE a_sequence;
SELECT webhook.subscribe('users_view', 'crm');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('"Odd View"', 'crm');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users_mat', 'crm');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('a_sequence', 'crm');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users_pkey', 'crm');
\echo SQLSTATE :SQLSTATE
CREATE TEMP TABLE scratch (id int);
SELECT webhook.subscribe('scratch', 'crm');
\echo SQLSTATE :SQLSTATE
-- Errors: the endpoint.
SELECT webhook.subscribe('users', 'nope');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', NULL);
\echo SQLSTATE :SQLSTATE
-- Errors: events.
SELECT webhook.subscribe('users', 'crm', events => '{}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', events => NULL);
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', events => '{TRUNCATE}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', events => '{INSERT,NULL}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', events => '{INSERT,""}');
\echo SQLSTATE :SQLSTATE
-- Errors: columns.
SELECT webhook.subscribe('users', 'crm', columns => '{}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', columns => '{id,nope}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', columns => '{id,NULL}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', columns => '{ctid}');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', columns => '{ID}');
\echo SQLSTATE :SQLSTATE
-- Errors: "when" must be one SQL expression that Postgres accepts as a trigger condition.
SELECT webhook.subscribe('users', 'crm', "when" => 'true) FROM pg_class WHERE (true');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', "when" => 'true) OR (SELECT true');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', "when" => 'true; DROP TABLE users');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', "when" => '');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', events => '{INSERT}', "when" => 'OLD.plan = ''pro''');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', events => '{DELETE}', "when" => 'NEW.plan = ''pro''');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', "when" => 'NEW.nope = 1');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', "when" => 'NEW.id');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', "when" => 'NEW.id IN (SELECT 1)');
\echo SQLSTATE :SQLSTATE
SELECT webhook.subscribe('users', 'crm', "when" => '1, 2');
\echo SQLSTATE :SQLSTATE
-- None of the failed calls changed the existing subscriptions.
SELECT * FROM subs WHERE "table" = 'users'::regclass;

--
-- Guards on subscribed tables
--

-- A column published by name cannot be renamed or dropped while subscribed; other columns can.
ALTER TABLE users RENAME COLUMN plan TO tier;
\echo SQLSTATE :SQLSTATE
ALTER TABLE users DROP COLUMN plan;
\echo SQLSTATE :SQLSTATE
ALTER TABLE users RENAME COLUMN email TO mail;
ALTER TABLE users RENAME COLUMN mail TO email;

-- Renaming a subscribed table says that its event types change with it.
ALTER TABLE orders RENAME TO orders2;
ALTER TABLE orders2 RENAME TO orders;

--
-- unsubscribe
--

-- Drops the trigger and the table's right to publish to that endpoint.
SELECT webhook.unsubscribe('orders', 'crm');
SELECT * FROM subs WHERE "table" = 'orders'::regclass;
SELECT * FROM pubs WHERE "table" = 'orders'::regclass;

-- Errors.
SELECT webhook.unsubscribe('orders', 'crm');
\echo SQLSTATE :SQLSTATE
SELECT webhook.unsubscribe('orders', 'nope');
\echo SQLSTATE :SQLSTATE
SELECT webhook.unsubscribe(NULL, 'crm');
\echo SQLSTATE :SQLSTATE
SELECT webhook.unsubscribe('no_such_table', 'crm');
\echo SQLSTATE :SQLSTATE

--
-- allow_publish / disallow_publish
--

-- Lets hand-written triggers on a table publish to an endpoint; a NOTICE names the table in
-- full and its owner. Allowing twice is harmless.
SELECT webhook.allow_publish('orders', 'billing');
SELECT webhook.allow_publish('orders', 'billing');
SELECT * FROM pubs WHERE "table" = 'orders'::regclass;

-- Errors (the same table checks as subscribe()).
SELECT webhook.allow_publish(NULL, 'billing');
\echo SQLSTATE :SQLSTATE
SELECT webhook.allow_publish('users_view', 'billing');
\echo SQLSTATE :SQLSTATE
SELECT webhook.allow_publish('scratch', 'billing');
\echo SQLSTATE :SQLSTATE
SELECT webhook.allow_publish('orders', 'nope');
\echo SQLSTATE :SQLSTATE
SELECT webhook.allow_publish('orders', NULL);
\echo SQLSTATE :SQLSTATE

-- A table both subscribed and allowed holds both rights; unsubscribe() takes only its own.
SELECT webhook.subscribe('orders', 'billing', events => '{INSERT}');
SELECT * FROM pubs WHERE "table" = 'orders'::regclass;
CREATE TRIGGER orders_by_hand AFTER UPDATE ON orders FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing', 'id');
SELECT webhook.unsubscribe('orders', 'billing');
SELECT * FROM pubs WHERE "table" = 'orders'::regclass;
-- (unsubscribe() removed webhook_billing, not the hand-written trigger, which is listed too)
SELECT * FROM subs WHERE "table" = 'orders'::regclass;

-- disallow_publish takes back the right allow_publish gave (the hand-written trigger stays).
SELECT webhook.disallow_publish('orders', 'billing');
SELECT * FROM pubs WHERE "table" = 'orders'::regclass;
SELECT "table", trigger_name FROM subs WHERE "table" = 'orders'::regclass;
-- unsubscribe() took the right subscribe() gave, disallow_publish() the one allow_publish()
-- gave: the hand-written trigger left on the table is refused with 42501 (the README's promise).
-- (The trigger publishes column id: the UPDATE changes it.)
INSERT INTO orders VALUES (1, 10);
UPDATE orders SET id = 2 WHERE id = 1;
\echo SQLSTATE :SQLSTATE
SELECT type, count(*) FROM webhook.events WHERE type LIKE 'public.orders.%' GROUP BY 1 ORDER BY 1;

-- Errors: a table that was not allowed, or was subscribed rather than allowed.
SELECT webhook.disallow_publish('orders', 'billing');
\echo SQLSTATE :SQLSTATE
SELECT webhook.disallow_publish('users', 'crm');
\echo SQLSTATE :SQLSTATE
SELECT webhook.disallow_publish('orders', 'nope');
\echo SQLSTATE :SQLSTATE
SELECT webhook.disallow_publish(NULL, 'billing');
\echo SQLSTATE :SQLSTATE

-- unsubscribe() also removes a hand-written trigger when there is no subscription trigger.
SELECT webhook.unsubscribe('orders', 'billing');
SELECT "table", trigger_name FROM subs WHERE "table" = 'orders'::regclass;

--
-- Dropping a subscribed table drops its triggers and its rights to publish.
--
SELECT count(*) AS rights_before FROM pubs WHERE "table"::text LIKE 'app.%';
DROP TABLE app."Order Items";
SELECT count(*) AS rights_after FROM webhook._publishers p
 WHERE NOT EXISTS (SELECT FROM pg_class c WHERE c.oid = p.relid);

-- Clean up.
DROP SCHEMA app CASCADE;
DROP TABLE users, orders, measurements, scratch CASCADE;
DROP SEQUENCE a_sequence;
SELECT * FROM pubs;
SELECT * FROM subs;
SELECT regress.drop_all_endpoints() AS endpoints_dropped;
