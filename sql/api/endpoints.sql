-- webhook_ext SQL API: endpoints (create, alter, enable/disable, drop, rotate the secret).
-- The rules every file here follows are in privileges.sql's header.

-- Clear errors for bad endpoint arguments (the table's CHECKs are only a backstop).
CREATE FUNCTION webhook._check_endpoint_args(
    name text, max_attempts integer, timeout interval, max_in_flight integer, rate_limit integer,
    event_types text[])
RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF name IS NULL OR name = '' THEN
        RAISE EXCEPTION 'endpoint name must not be empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(name) > 55 THEN
        RAISE EXCEPTION 'endpoint name is too long (% bytes, at most 55)', octet_length(name)
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'The subscription trigger is named webhook_<endpoint>, and Postgres names hold 63 bytes.';
    END IF;
    IF name ~ '[[:cntrl:]]' THEN
        RAISE EXCEPTION 'endpoint name must not contain control characters' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_attempts IS NOT NULL AND max_attempts NOT BETWEEN 1 AND 100 THEN
        RAISE EXCEPTION 'max_attempts must be between 1 and 100, not %', max_attempts USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF timeout IS NOT NULL AND (timeout <= '0' OR timeout > '5 minutes') THEN
        RAISE EXCEPTION 'timeout must be more than 0 and at most 5 minutes, not %', timeout USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF max_in_flight IS NOT NULL AND max_in_flight NOT BETWEEN 1 AND 10000 THEN
        RAISE EXCEPTION 'max_in_flight must be between 1 and 10000, not %', max_in_flight USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF rate_limit IS NOT NULL AND rate_limit < 1 THEN
        RAISE EXCEPTION 'rate_limit must be at least 1 delivery per second, not %', rate_limit USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF event_types IS NOT NULL AND (cardinality(event_types) = 0 OR EXISTS (SELECT FROM unnest(event_types) t WHERE t IS NULL OR t = '')) THEN
        RAISE EXCEPTION 'event_types must be NULL (all types) or a list of non-empty type names' USING ERRCODE = 'invalid_parameter_value';
    END IF;
END
$$;

CREATE FUNCTION webhook._check_signing(signing text) RETURNS void
LANGUAGE plpgsql IMMUTABLE SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF signing IS NULL OR signing NOT IN ('hmac', 'ed25519', 'both') THEN
        -- The value is quoted only when it looks like a word: a key given here by mistake
        -- (signing => 'whsk_…' for signing_key) must not reach the message and the log.
        RAISE EXCEPTION 'signing must be ''hmac'', ''ed25519'' or ''both'', not %',
                        CASE WHEN signing IS NULL THEN 'NULL'
                             WHEN signing ~ '^[a-z0-9]{1,16}$' THEN quote_literal(signing)
                             ELSE 'that value' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'hmac: v1 signatures with the secret; ed25519: v1a signatures that receivers verify with the public key (webhook.public_keys); both: each request carries both.';
    END IF;
END
$$;

CREATE FUNCTION webhook._endpoint_id(endpoint text) RETURNS integer
LANGUAGE plpgsql STABLE SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    found integer;
BEGIN
    SELECT e.id INTO found FROM webhook.endpoints e WHERE e.name = endpoint;
    IF found IS NULL THEN
        RAISE EXCEPTION 'endpoint "%" does not exist', endpoint
            USING ERRCODE = 'undefined_object', HINT = 'Create it with webhook.create_endpoint(name, url).';
    END IF;
    RETURN found;
END
$$;

CREATE FUNCTION webhook.create_endpoint(
    name text,
    url text,
    secret text DEFAULT NULL,
    headers jsonb DEFAULT '{}',
    event_types text[] DEFAULT NULL,
    max_attempts integer DEFAULT NULL,
    timeout interval DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    rate_limit integer DEFAULT NULL,
    ordered boolean DEFAULT false,
    retry_schedule text DEFAULT NULL,
    signing text DEFAULT 'hmac',
    signing_key text DEFAULT NULL,
    client_cert text DEFAULT NULL,
    client_key text DEFAULT NULL,
    proxy text DEFAULT NULL,
    oauth_token_url text DEFAULT NULL,
    oauth_client_id text DEFAULT NULL,
    oauth_client_secret text DEFAULT NULL,
    oauth_scope text DEFAULT NULL)
RETURNS webhook.endpoints
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r webhook.endpoints;
    how text := COALESCE(create_endpoint.signing, 'hmac');
BEGIN
    PERFORM webhook._check_endpoint_args(create_endpoint.name, create_endpoint.max_attempts, create_endpoint.timeout,
                                         create_endpoint.max_in_flight, create_endpoint.rate_limit, create_endpoint.event_types);
    PERFORM webhook._check_signing(how);
    PERFORM webhook._check_client_identity(create_endpoint.client_cert, create_endpoint.client_key);
    PERFORM webhook._check_oauth(create_endpoint.oauth_token_url, create_endpoint.oauth_client_id,
                                 create_endpoint.oauth_client_secret, create_endpoint.oauth_scope);
    IF create_endpoint.url IS NULL THEN
        RAISE EXCEPTION 'invalid endpoint url: URL is empty' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF EXISTS (SELECT FROM webhook.endpoints e WHERE e.name = create_endpoint.name) THEN
        RAISE EXCEPTION 'endpoint "%" already exists', create_endpoint.name
            USING ERRCODE = 'duplicate_object', HINT = 'Use webhook.alter_endpoint() to change it.';
    END IF;
    INSERT INTO webhook.endpoints AS e
           (name, url, secret, headers, event_types, max_attempts, timeout, max_in_flight, rate_limit, ordered, retry_schedule,
            signing, signing_key, client_cert, client_key, proxy,
            oauth_token_url, oauth_client_id, oauth_client_secret, oauth_scope)
    VALUES (create_endpoint.name,
            webhook._check_url(create_endpoint.url),
            webhook._check_secret(create_endpoint.secret),
            webhook._check_headers(COALESCE(create_endpoint.headers, '{}')),
            create_endpoint.event_types,
            create_endpoint.max_attempts,
            create_endpoint.timeout,
            create_endpoint.max_in_flight,
            create_endpoint.rate_limit,
            COALESCE(create_endpoint.ordered, false),
            CASE WHEN create_endpoint.retry_schedule IS NOT NULL THEN webhook._check_schedule(create_endpoint.retry_schedule) END,
            how,
            -- A key given is checked; one is generated for an endpoint that signs with ed25519.
            CASE WHEN create_endpoint.signing_key IS NOT NULL OR how <> 'hmac'
                 THEN webhook._check_signing_key(create_endpoint.signing_key) END,
            create_endpoint.client_cert,
            create_endpoint.client_key,
            webhook._check_proxy(create_endpoint.proxy),
            -- Checked by _check_oauth above; stored as _check_url writes it (scheme lower case).
            CASE WHEN create_endpoint.oauth_token_url IS NOT NULL THEN webhook._check_url(create_endpoint.oauth_token_url) END,
            create_endpoint.oauth_client_id,
            create_endpoint.oauth_client_secret,
            create_endpoint.oauth_scope)
    RETURNING * INTO r;
    RETURN r;
END
$$;

-- NULL arguments leave a setting unchanged; list settings in "reset" to return them to the default.
CREATE FUNCTION webhook.alter_endpoint(
    name text,
    url text DEFAULT NULL,
    secret text DEFAULT NULL,
    headers jsonb DEFAULT NULL,
    event_types text[] DEFAULT NULL,
    max_attempts integer DEFAULT NULL,
    timeout interval DEFAULT NULL,
    max_in_flight integer DEFAULT NULL,
    rate_limit integer DEFAULT NULL,
    ordered boolean DEFAULT NULL,
    retry_schedule text DEFAULT NULL,
    reset text[] DEFAULT '{}',
    signing text DEFAULT NULL,
    signing_key text DEFAULT NULL,
    client_cert text DEFAULT NULL,
    client_key text DEFAULT NULL,
    proxy text DEFAULT NULL,
    oauth_token_url text DEFAULT NULL,
    oauth_client_id text DEFAULT NULL,
    oauth_client_secret text DEFAULT NULL,
    oauth_scope text DEFAULT NULL)
RETURNS webhook.endpoints
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    r webhook.endpoints;
    cur webhook.endpoints;
    token_url text;
    client_id text;
    client_secret text;
    scope text;
    bad text;
    how text;
    key text;
    cert text;
    cert_key text;
BEGIN
    PERFORM webhook._endpoint_id(alter_endpoint.name);
    PERFORM webhook._check_endpoint_args(alter_endpoint.name, alter_endpoint.max_attempts, alter_endpoint.timeout,
                                         alter_endpoint.max_in_flight, alter_endpoint.rate_limit, alter_endpoint.event_types);
    SELECT s INTO bad FROM unnest(COALESCE(reset, '{}')) s
     WHERE s IS NULL OR s NOT IN ('headers', 'event_types', 'max_attempts', 'timeout', 'max_in_flight', 'rate_limit', 'retry_schedule',
                                  'signing', 'client_cert', 'proxy', 'oauth', 'oauth_scope')
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'cannot reset "%"', CASE WHEN bad ~ '^[A-Za-z0-9_]{1,32}$' OR bad IS NULL THEN bad ELSE '(not a setting name)' END
            USING ERRCODE = 'invalid_parameter_value',
                  HINT = 'reset accepts headers, event_types, max_attempts, timeout, max_in_flight, rate_limit, retry_schedule, signing, client_cert, proxy, oauth, oauth_scope.';
    END IF;
    SELECT * INTO cur FROM webhook.endpoints e WHERE e.name = alter_endpoint.name FOR UPDATE;
    how := CASE WHEN 'signing' = ANY (reset) THEN 'hmac' ELSE COALESCE(alter_endpoint.signing, cur.signing) END;
    PERFORM webhook._check_signing(how);
    key := CASE WHEN alter_endpoint.signing_key IS NOT NULL THEN webhook._check_signing_key(alter_endpoint.signing_key)
                ELSE cur.signing_key END;
    IF how <> 'hmac' AND key IS NULL THEN
        key := webhook._check_signing_key(NULL);
    END IF;
    -- reset client_cert drops the certificate and its key; either given alone replaces its half
    -- (a renewed certificate for the same key), and the pair is checked again.
    IF 'client_cert' = ANY (reset) THEN
        cert := NULL;
        cert_key := NULL;
    ELSE
        cert := COALESCE(alter_endpoint.client_cert, cur.client_cert);
        cert_key := COALESCE(alter_endpoint.client_key, cur.client_key);
        IF alter_endpoint.client_cert IS NOT NULL OR alter_endpoint.client_key IS NOT NULL THEN
            PERFORM webhook._check_client_identity(cert, cert_key);
        END IF;
    END IF;
    -- reset oauth drops the credentials (and the scope); a part given alone replaces its part,
    -- and the credentials are checked again (only then: a change of another setting must not
    -- fail on a token URL that webhook.https_only, turned on since, would now refuse).
    IF 'oauth' = ANY (reset) THEN
        token_url := NULL;
        client_id := NULL;
        client_secret := NULL;
        scope := NULL;
    ELSE
        token_url := COALESCE(alter_endpoint.oauth_token_url, cur.oauth_token_url);
        client_id := COALESCE(alter_endpoint.oauth_client_id, cur.oauth_client_id);
        client_secret := COALESCE(alter_endpoint.oauth_client_secret, cur.oauth_client_secret);
        scope := CASE WHEN 'oauth_scope' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.oauth_scope, cur.oauth_scope) END;
        IF alter_endpoint.oauth_token_url IS NOT NULL OR alter_endpoint.oauth_client_id IS NOT NULL
           OR alter_endpoint.oauth_client_secret IS NOT NULL OR alter_endpoint.oauth_scope IS NOT NULL
           OR 'oauth_scope' = ANY (reset) THEN
            PERFORM webhook._check_oauth(token_url, client_id, client_secret, scope);
            token_url := webhook._check_url(token_url);
        END IF;
    END IF;
    UPDATE webhook.endpoints e SET
        url            = COALESCE(webhook._check_url(alter_endpoint.url), e.url),
        secret         = COALESCE(CASE WHEN alter_endpoint.secret IS NOT NULL THEN webhook._check_secret(alter_endpoint.secret) END, e.secret),
        headers        = CASE WHEN 'headers' = ANY (reset) THEN '{}'
                              ELSE COALESCE(webhook._check_headers(alter_endpoint.headers), e.headers) END,
        event_types    = CASE WHEN 'event_types' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.event_types, e.event_types) END,
        max_attempts   = CASE WHEN 'max_attempts' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.max_attempts, e.max_attempts) END,
        timeout        = CASE WHEN 'timeout' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.timeout, e.timeout) END,
        max_in_flight  = CASE WHEN 'max_in_flight' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.max_in_flight, e.max_in_flight) END,
        rate_limit     = CASE WHEN 'rate_limit' = ANY (reset) THEN NULL ELSE COALESCE(alter_endpoint.rate_limit, e.rate_limit) END,
        ordered        = COALESCE(alter_endpoint.ordered, e.ordered),
        retry_schedule = CASE WHEN 'retry_schedule' = ANY (reset) THEN NULL
                              ELSE COALESCE(webhook._check_schedule(alter_endpoint.retry_schedule), e.retry_schedule) END,
        signing        = how,
        signing_key    = key,
        client_cert    = cert,
        client_key     = cert_key,
        proxy          = CASE WHEN 'proxy' = ANY (reset) THEN NULL
                              ELSE COALESCE(webhook._check_proxy(alter_endpoint.proxy), e.proxy) END,
        oauth_token_url     = token_url,
        oauth_client_id     = client_id,
        oauth_client_secret = client_secret,
        oauth_scope         = scope,
        updated_at     = now()
     WHERE e.name = alter_endpoint.name
    RETURNING * INTO r;
    PERFORM webhook._wake();
    RETURN r;
END
$$;

CREATE FUNCTION webhook.drop_endpoint(name text, cascade boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep integer := webhook._endpoint_id(drop_endpoint.name);
    s record;
    tables text;
BEGIN
    -- Only triggers on tables allowed to publish to it count: any role with USAGE on webhook can
    -- put a (refused) trigger on a temporary table, and must not be able to block this.
    SELECT string_agg(DISTINCT format('%s', x."table"), ', ') INTO tables
      FROM webhook.subscriptions x JOIN webhook._publishers p ON p.relid = x."table" AND p.endpoint_id = ep
     WHERE x.endpoint = drop_endpoint.name;
    IF tables IS NOT NULL AND NOT cascade THEN
        RAISE EXCEPTION 'endpoint "%" is subscribed to %', drop_endpoint.name, tables
            USING ERRCODE = 'dependent_objects_still_exist',
                  HINT = 'Use webhook.unsubscribe() first, or webhook.drop_endpoint(name, cascade => true) to drop the triggers too.';
    END IF;
    FOR s IN SELECT DISTINCT x."table", x.trigger_name
               FROM webhook.subscriptions x JOIN webhook._publishers p ON p.relid = x."table" AND p.endpoint_id = ep
              WHERE x.endpoint = drop_endpoint.name LOOP
        EXECUTE format('DROP TRIGGER %I ON %s', s.trigger_name, s."table");
        PERFORM webhook._drop_flush_trigger(s."table");
    END LOOP;
    PERFORM webhook._route();
    UPDATE webhook._deliveries d SET status = 'cancelled', next_attempt_at = NULL, last_error = 'endpoint dropped'
     WHERE d.endpoint_id = ep AND d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0);
    DELETE FROM webhook._endpoint_state st WHERE st.endpoint_id = ep;
    DELETE FROM webhook._publishers p WHERE p.endpoint_id = ep;
    DELETE FROM webhook.endpoints e WHERE e.id = ep;
END
$$;

CREATE FUNCTION webhook.enable_endpoint(name text)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    UPDATE webhook.endpoints e SET enabled = true, disabled_reason = NULL, updated_at = now()
     WHERE e.id = webhook._endpoint_id(enable_endpoint.name);
    -- A fresh start for the circuit breaker (the worker sees updated_at move and does the same).
    UPDATE webhook._endpoint_state s SET consecutive_failures = 0, failing_since = NULL, next_probe_at = NULL
     WHERE s.endpoint_id = webhook._endpoint_id(enable_endpoint.name);
    PERFORM webhook._wake();
END
$$;

-- Disabling cancels what is still pending for the endpoint; webhook.replay() sends it again later.
CREATE FUNCTION webhook.disable_endpoint(name text, reason text DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep integer := webhook._endpoint_id(disable_endpoint.name);
BEGIN
    UPDATE webhook.endpoints e SET enabled = false, disabled_reason = COALESCE(reason, 'disabled by ' || current_user), updated_at = now()
     WHERE e.id = ep;
    PERFORM webhook._route();
    UPDATE webhook._deliveries d SET status = 'cancelled', next_attempt_at = NULL, last_error = 'endpoint disabled'
     WHERE d.endpoint_id = ep AND d.status = 'pending' AND (d.attempts = 0 OR d.attempts > 0);
END
$$;

-- A new generated secret; until the grace period ends every request carries a signature with
-- the old secret too (space-separated in webhook-signature), so receivers can switch at leisure.
CREATE FUNCTION webhook.rotate_secret(name text, grace interval DEFAULT '24 hours')
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep integer := webhook._endpoint_id(rotate_secret.name);
    fresh text := webhook._check_secret(NULL);
BEGIN
    IF grace IS NULL OR grace < '0' THEN
        RAISE EXCEPTION 'grace must be an interval of 0 or more, not %', grace USING ERRCODE = 'invalid_parameter_value';
    END IF;
    UPDATE webhook.endpoints e
       SET previous_secret = CASE WHEN grace > '0' THEN e.secret END,
           previous_secret_expires_at = CASE WHEN grace > '0' THEN now() + grace END,
           secret = fresh,
           updated_at = now()
     WHERE e.id = ep;
    RETURN fresh;
END
$$;

-- A new ed25519 signing key; until the grace period ends every request carries a v1a signature
-- with the old key too, and webhook.public_keys shows both public keys. Returns the new public key.
CREATE FUNCTION webhook.rotate_signing_key(name text, grace interval DEFAULT '24 hours')
RETURNS text
LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ep integer := webhook._endpoint_id(rotate_signing_key.name);
    fresh text := webhook._check_signing_key(NULL);
BEGIN
    IF grace IS NULL OR grace < '0' THEN
        RAISE EXCEPTION 'grace must be an interval of 0 or more, not %', grace USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF (SELECT e.signing_key FROM webhook.endpoints e WHERE e.id = ep) IS NULL THEN
        RAISE EXCEPTION 'endpoint "%" has no signing key to rotate', rotate_signing_key.name
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  HINT = 'Sign with ed25519 first: webhook.alter_endpoint(name, signing => ''ed25519'') (or ''both'').';
    END IF;
    UPDATE webhook.endpoints e
       SET previous_signing_key = CASE WHEN grace > '0' THEN e.signing_key END,
           previous_signing_key_expires_at = CASE WHEN grace > '0' THEN now() + grace END,
           signing_key = fresh,
           updated_at = now()
     WHERE e.id = ep;
    RETURN webhook._public_key(fresh);
END
$$;
