-- webhook.send(): application events that are not row changes, to one endpoint or to every
-- endpoint whose event_types match; every error it raises.
\set SHOW_CONTEXT never

SELECT (webhook.create_endpoint('all_types', 'https://all.example.com/hooks')).name;
SELECT (webhook.create_endpoint('invoices', 'https://inv.example.com/hooks', event_types => '{invoice.*}')).name;
SELECT (webhook.create_endpoint('exact', 'https://exact.example.com/hooks', event_types => '{customer.created,invoice.paid}')).name;
SELECT (webhook.create_endpoint('off', 'https://off.example.com/hooks')).name;
SELECT webhook.disable_endpoint('off', 'test');

-- The deliveries of one event: endpoint, status, error.
CREATE FUNCTION pg_temp.deliveries_of(ev bigint) RETURNS TABLE (endpoint text, status webhook.delivery_status, due boolean, last_error text)
LANGUAGE sql AS $$
    SELECT e.name, d.status, d.next_attempt_at IS NOT NULL, d.last_error
      FROM webhook.deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id
     WHERE d.event_id = ev ORDER BY e.name
$$;

-- To one endpoint: returns the event id; the event holds the type, the payload as given and
-- the sender's txid; one pending delivery, due now.
BEGIN;
SELECT webhook.send('invoice.paid', '{"invoice": 42, "amount": 99.5}', 'all_types') AS ev \gset
SELECT :ev > 0 AS has_id;
SELECT type, payload, txid = txid_current() AS senders_txid FROM webhook.events WHERE id = :ev;
COMMIT;
SELECT * FROM pg_temp.deliveries_of(:ev);

-- Naming an endpoint sends to it whatever its event_types say.
SELECT webhook.send('user.deleted', '{}', 'invoices') AS ev \gset
SELECT * FROM pg_temp.deliveries_of(:ev);

-- To a disabled endpoint: recorded, cancelled.
SELECT webhook.send('invoice.paid', '{}', 'off') AS ev \gset
SELECT * FROM pg_temp.deliveries_of(:ev);

-- Without an endpoint: every endpoint whose event_types match (NULL = all; "invoice.*" is a
-- prefix; other names match exactly); disabled ones get a cancelled delivery.
SELECT webhook.send('invoice.paid', '{"invoice": 43}') AS ev \gset
SELECT * FROM pg_temp.deliveries_of(:ev);
SELECT webhook.send('invoice.voided', '{"invoice": 44}') AS ev \gset
SELECT * FROM pg_temp.deliveries_of(:ev);
SELECT webhook.send('customer.created', '{"customer": 1}') AS ev \gset
SELECT * FROM pg_temp.deliveries_of(:ev);
SELECT webhook.send('customer.created.v2', '{"customer": 1}') AS ev \gset
SELECT * FROM pg_temp.deliveries_of(:ev);
-- ("invoice.*" matches the types that start with "invoice.", not "invoice" itself)
SELECT webhook.send('invoice', '{}') AS ev \gset
SELECT * FROM pg_temp.deliveries_of(:ev);
-- An event no endpoint takes is still recorded, without deliveries.
SELECT (webhook.alter_endpoint(n, event_types => '{other.*}')).name FROM unnest('{all_types,off}'::text[]) n;
SELECT webhook.send('nobody.cares', '{}', NULL) AS ev \gset
SELECT type FROM webhook.events WHERE id = :ev;
SELECT count(*) AS deliveries FROM webhook.deliveries WHERE event_id = :ev;
SELECT (webhook.alter_endpoint(n, reset => '{event_types}')).name FROM unnest('{all_types,off}'::text[]) n;

-- Any JSON value is a payload: a scalar, null, an array.
SELECT webhook.send('t.scalar', '42', 'all_types') AS ev \gset
SELECT payload FROM webhook.events WHERE id = :ev;
SELECT webhook.send('t.null', 'null', 'all_types') AS ev \gset
SELECT payload FROM webhook.events WHERE id = :ev;
SELECT webhook.send('t.array', '[1, "two", {"three": 3}]', 'all_types') AS ev \gset
SELECT payload FROM webhook.events WHERE id = :ev;

-- Transactional: rolled back, nothing is recorded.
SELECT count(*) AS events_before FROM webhook.events \gset
BEGIN;
SELECT webhook.send('rolled.back', '{}', 'all_types') > 0 AS sent;
ROLLBACK;
SELECT count(*) - :events_before AS events_added FROM webhook.events;

-- event_type: 1 to 255 bytes.
SELECT webhook.send(repeat('t', 255), '{}', 'all_types') AS ev \gset
SELECT length(type) FROM webhook.events WHERE id = :ev;
SELECT webhook.send(repeat('t', 256), '{}', 'all_types');
\echo SQLSTATE :SQLSTATE
SELECT webhook.send(repeat('é', 128), '{}', 'all_types');
\echo SQLSTATE :SQLSTATE
SELECT webhook.send('', '{}', 'all_types');
\echo SQLSTATE :SQLSTATE
SELECT webhook.send(NULL, '{}', 'all_types');
\echo SQLSTATE :SQLSTATE

-- payload must not be NULL (SQL NULL; JSON null is fine).
SELECT webhook.send('t.x', NULL, 'all_types');
\echo SQLSTATE :SQLSTATE

-- The endpoint must exist.
SELECT webhook.send('t.x', '{}', 'nope');
\echo SQLSTATE :SQLSTATE
SELECT webhook.send('t.x', '{}', '');
\echo SQLSTATE :SQLSTATE

-- The body as sent may not exceed webhook.max_payload_bytes: send() refuses it (the size is
-- the whole body: {"type":…,"timestamp":…,"data":…}; a control character counts six bytes).
SET webhook.max_payload_bytes = '1kB';
SELECT webhook.send('t.big', jsonb_build_object('s', repeat('x', 950)), 'all_types');
\echo SQLSTATE :SQLSTATE
SELECT webhook.send('t.big', jsonb_build_object('s', repeat('x', 949)), 'all_types') > 0 AS fits;
SELECT webhook.send('t.big', jsonb_build_object('s', repeat(E'\x01', 159)), 'all_types');
\echo SQLSTATE :SQLSTATE
RESET webhook.max_payload_bytes;
SELECT webhook.send('t.big', jsonb_build_object('s', repeat('x', 950)), 'all_types') > 0 AS fits_with_default_limit;

-- Clean up.
SELECT regress.drop_all_endpoints() AS endpoints_dropped;
