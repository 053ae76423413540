-- webhook.sign() and webhook.verify(): Standard Webhooks signatures in SQL
-- (v1,<base64 HMAC-SHA256(key, "<msg_id>.<ts>.<body>")>, key = the base64 after "whsec_").
\set SHOW_CONTEXT never

-- The Standard Webhooks test vector (the README's example).
SELECT webhook.sign('whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD', 'msg_27UH4WbU6Z5A5EzD8u03UvzRbpk',
                    1649367553, '{"email":"test@example.com","username":"test_user"}') AS signature;
-- The same key without the whsec_ prefix (raw base64) signs the same.
SELECT webhook.sign('C2FVsBQIhrscChlQIMV+b5sSYspob7oD', 'msg_27UH4WbU6Z5A5EzD8u03UvzRbpk',
                    1649367553, '{"email":"test@example.com","username":"test_user"}') AS signature;

-- It is HMAC-SHA256 over "<msg_id>.<ts>.<body>" (checked against an HMAC built here from
-- sha256(), on a generated secret, a non-ASCII body and a negative timestamp).
CREATE FUNCTION pg_temp.hmac_sha256(key bytea, msg bytea) RETURNS bytea LANGUAGE sql AS $$
    WITH k AS (SELECT key || decode(repeat('00', 64 - length(key)), 'hex') AS k)
    SELECT sha256((SELECT string_agg(set_byte('\x00'::bytea, 0, get_byte(k, i) # 92), ''::bytea ORDER BY i) FROM k, generate_series(0, 63) i)
               || sha256((SELECT string_agg(set_byte('\x00'::bytea, 0, get_byte(k, i) # 54), ''::bytea ORDER BY i) FROM k, generate_series(0, 63) i)
                         || msg))
$$;
SELECT secret AS s FROM webhook.create_endpoint('sig', 'https://sig.example.com') \gset
SELECT webhook.sign(:'s', 'msg_1', ts, body)
     = 'v1,' || encode(pg_temp.hmac_sha256(decode(substr(:'s', 7), 'base64'), convert_to('msg_1.' || ts || '.' || body, 'UTF8')), 'base64') AS same
  FROM (VALUES (0::bigint, ''), (1700000000, '{"ünïcødé": "✓"}'), (-5, 'not json at all')) v(ts, body);

-- verify: true when one of the space-separated signatures matches.
CREATE TEMP TABLE vec AS
SELECT 'whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD'::text AS secret, 'msg_27UH4WbU6Z5A5EzD8u03UvzRbpk'::text AS msg_id,
       1649367553::bigint AS ts, '{"email":"test@example.com","username":"test_user"}'::text AS body,
       'v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw='::text AS sig;
SELECT webhook.verify(secret, msg_id, ts, body, sig) AS valid FROM vec;
SELECT webhook.verify(secret, msg_id, ts, body, 'v1,bm90IGl0 ' || sig) AS second_of_two FROM vec;
SELECT webhook.verify(secret, msg_id, ts, body, sig || ' v1,bm90IGl0') AS first_of_two FROM vec;
-- ... and false for anything else.
SELECT webhook.verify(secret, msg_id, ts, body || ' ', sig) AS other_body,
       webhook.verify(secret, msg_id, ts + 1, body, sig) AS other_ts,
       webhook.verify(secret, msg_id || 'x', ts, body, sig) AS other_msg_id,
       webhook.verify('whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw', msg_id, ts, body, sig) AS other_secret,
       webhook.verify(secret, msg_id, ts, body, substr(sig, 4)) AS without_v1,
       webhook.verify(secret, msg_id, ts, body, 'v2,' || substr(sig, 4)) AS other_version,
       webhook.verify(secret, msg_id, ts, body, '') AS empty,
       webhook.verify(secret, msg_id, ts, body, 'v1,') AS empty_v1,
       webhook.verify(secret, msg_id, ts, body, 'v1,not base64!') AS garbage
  FROM vec;

-- Both are strict: NULL in, NULL out.
SELECT webhook.sign(NULL, 'm', 1, 'b') IS NULL AS sign_null, webhook.verify(secret, msg_id, ts, body, NULL) IS NULL AS verify_null FROM vec;

-- Errors: the secret must decode to a key of 16 to 64 bytes.
SELECT webhook.sign('whsec_not!base64', 'm', 1, 'b');
\echo SQLSTATE :SQLSTATE
SELECT webhook.sign('whsec_c2hvcnQ=', 'm', 1, 'b');
\echo SQLSTATE :SQLSTATE
SELECT webhook.sign(replace('whsec_' || encode(convert_to(repeat('k', 65), 'UTF8'), 'base64'), E'\n', ''), 'm', 1, 'b');
\echo SQLSTATE :SQLSTATE
SELECT webhook.verify('whsec_not!base64', 'm', 1, 'b', 'v1,x');
\echo SQLSTATE :SQLSTATE
SELECT webhook.verify('', 'm', 1, 'b', 'v1,x');
\echo SQLSTATE :SQLSTATE

-- Clean up.
SELECT regress.drop_all_endpoints() AS endpoints_dropped;
