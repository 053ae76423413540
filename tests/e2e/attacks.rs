//! End-to-end attacks on the extension's privilege model, one test per attack of the 0.2.0
//! security review (test names carry its item numbers, §1–§14; README "Security" lists each
//! threat with its test): real clusters, real login roles that connect as themselves, real
//! receivers. Each test asserts the outcome 0.3.0 gives; against webhook_ext 0.2.0 each fails
//! because the attack it names works there.

use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;
use postgres::error::SqlState;

/// The key of 0.2.0's single-instance guard (src/worker.rs `WORKER_LOCK_KEY`, "webhook").
const OLD_WORKER_LOCK_KEY: i64 = 0x0077_6562_686f_6f6b;

/// A superuser session that never resolves a name through `public` (for checking results in a
/// database whose search_path an attacker has set).
fn checker(pg: &Cluster) -> postgres::Client {
    let mut db = pg.client();
    db.batch_execute("SET search_path = pg_catalog").unwrap();
    db
}

/// Waits until the app database's worker runs and has nothing to do; returns its pid.
fn worker_ready(db: &mut postgres::Client) -> i32 {
    wait_until(PATIENCE, "the worker to be idle", || {
        match worker(db, "app") {
            Worker {
                pid: Some(pid),
                state,
                ..
            } if state == "idle" => Some(pid),
            _ => None,
        }
    })
}

/// (pid, state) of the app database's delivery worker.
fn pid_and_state(db: &mut postgres::Client) -> (Option<i32>, String) {
    let w = worker(db, "app");
    (w.pid, w.state)
}

/// Checks a publish refusal (§3): SQLSTATE 42501, the message and the hint the README documents.
fn assert_publish_refused(e: &postgres::error::DbError, endpoint: &str) {
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{e:?}");
    assert!(
        e.message().contains(&format!(
            "may not publish to webhook endpoint \"{endpoint}\""
        )),
        "{}",
        e.message()
    );
    let hint = e.hint().unwrap_or_default();
    assert!(
        hint.contains("webhook.subscribe") && hint.contains("webhook.allow_publish"),
        "hint: {hint:?}"
    );
}

// §1 ------------------------------------------------------------------------------------------

/// What the planted cast is reached through.
#[derive(Clone, Copy, Debug)]
enum Carrier {
    Enum,
    Domain,
    Composite,
    Array,
    Range,
}

/// `app` owns a table of a type with a cast to json it wrote; an administrator subscribes the
/// table; `app` inserts a row. The cast logs who runs it and tries to make `app` superuser.
fn planted_cast(carrier: Carrier) {
    // The planted code's WARNINGs reach the log (the harness logs above ERROR otherwise).
    let pg = Cluster::start(&[("log_min_messages", "warning")]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE ROLE app LOGIN;
         CREATE SCHEMA app AUTHORIZATION app;",
    )
    .unwrap();
    create_endpoint(&mut db, "crm", &rx.url("/"));

    let mut app = pg.client_as("app", "app");
    app.batch_execute(
        r#"CREATE TABLE app.cast_log (who text NOT NULL, via text NOT NULL);
           CREATE TYPE app.flag AS ENUM ('red', 'green');
           CREATE FUNCTION app.log_and_escalate(via text) RETURNS void LANGUAGE plpgsql AS $$
           BEGIN
               INSERT INTO app.cast_log VALUES (current_user, via);
               RAISE WARNING 'planted cast ran as %', current_user;
               BEGIN
                   EXECUTE 'ALTER ROLE app SUPERUSER';
               EXCEPTION WHEN insufficient_privilege THEN NULL;
               END;
           END $$;"#,
    )
    .unwrap();
    let (column, value, expected) = match carrier {
        Carrier::Range => {
            // The cast is on the range type itself; its subtype (the enum) has none.
            app.batch_execute(
                r#"CREATE TYPE app.flag_range AS RANGE (subtype = app.flag);
                   CREATE FUNCTION app.flag_range_json(r app.flag_range) RETURNS json LANGUAGE plpgsql AS $$
                   BEGIN
                       PERFORM app.log_and_escalate('range');
                       RETURN pg_catalog.json_build_object('range', r::text);
                   END $$;
                   CREATE CAST (app.flag_range AS json) WITH FUNCTION app.flag_range_json(app.flag_range);"#,
            )
            .unwrap();
            (
                "app.flag_range",
                "'[red,green]'",
                serde_json::json!({"range": "[red,green]"}),
            )
        }
        _ => {
            app.batch_execute(
                r#"CREATE FUNCTION app.flag_json(f app.flag) RETURNS json LANGUAGE plpgsql AS $$
                   BEGIN
                       PERFORM app.log_and_escalate('flag');
                       RETURN pg_catalog.json_build_object('flag', f::text);
                   END $$;
                   CREATE CAST (app.flag AS json) WITH FUNCTION app.flag_json(app.flag);
                   CREATE DOMAIN app.flag_domain AS app.flag;
                   CREATE TYPE app.tagged AS (label text, f app.flag);"#,
            )
            .unwrap();
            match carrier {
                Carrier::Enum => ("app.flag", "'red'", serde_json::json!({"flag": "red"})),
                Carrier::Domain => (
                    "app.flag_domain",
                    "'red'",
                    serde_json::json!({"flag": "red"}),
                ),
                Carrier::Composite => (
                    "app.tagged",
                    "ROW('x', 'red')",
                    serde_json::json!({"label": "x", "f": {"flag": "red"}}),
                ),
                Carrier::Array => (
                    "app.flag[]",
                    "'{red}'",
                    serde_json::json!([{"flag": "red"}]),
                ),
                Carrier::Range => unreachable!(),
            }
        }
    };
    app.batch_execute(&format!(
        "CREATE TABLE app.t (id int PRIMARY KEY, f {column})"
    ))
    .unwrap();
    db.execute("SELECT webhook.subscribe('app.t', 'crm')", &[])
        .unwrap();

    app.batch_execute(&format!("INSERT INTO app.t VALUES (1, {value})"))
        .unwrap();

    assert_eq!(
        superusers(&mut db),
        ["postgres"],
        "{carrier:?}: the planted cast made app superuser"
    );
    let who: Vec<String> = db
        .query("SELECT DISTINCT who FROM app.cast_log ORDER BY who", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        who,
        ["app"],
        "{carrier:?}: the row image is built with the rights of the inserting session"
    );
    assert!(
        !pg.log().contains("planted cast ran as postgres"),
        "{carrier:?}: the cast ran as postgres"
    );
    // The cast did build what was sent.
    let req = rx.wait_for(1, PATIENCE).remove(0);
    assert_eq!(req.json()["data"]["new"]["f"], expected, "{carrier:?}");
    wait_settled(&mut db, PATIENCE);
    assert_eq!(statuses(&mut db), ["delivered"]);
    assert_eq!(rx.count(), 1);
}

#[test]
fn s1_a_planted_cast_on_an_enum_runs_as_the_inserting_role() {
    planted_cast(Carrier::Enum);
}

#[test]
fn s1_a_planted_cast_reached_through_a_domain_runs_as_the_inserting_role() {
    planted_cast(Carrier::Domain);
}

#[test]
fn s1_a_planted_cast_reached_through_a_composite_runs_as_the_inserting_role() {
    planted_cast(Carrier::Composite);
}

#[test]
fn s1_a_planted_cast_reached_through_an_array_runs_as_the_inserting_role() {
    planted_cast(Carrier::Array);
}

#[test]
fn s1_a_planted_cast_on_a_range_type_runs_as_the_inserting_role() {
    planted_cast(Carrier::Range);
}

/// A role with nothing but TEMP (every role has it) and USAGE on webhook: a temporary enum, a
/// cast to json on it (Postgres accepts CREATE CAST on a pg_temp type), a temporary table and a
/// hand-written trigger. The insert is refused (§3), and the cast never runs as a superuser.
///
/// Only the refusal is exercised here: the trigger refuses the temporary table before it builds
/// the row image, so the cast never runs at all (asserted below, so that the "ran as" checks are
/// known to hold because nothing ran). What a planted cast runs as when it does run is covered
/// by the other s1_* tests (`planted_cast`).
#[test]
fn s1_a_temp_only_role_cannot_escalate_through_a_temporary_cast() {
    // The harness logs from LOG up, which leaves WARNINGs out: the cast's WARNING must reach the
    // server log for the checks below to see it.
    let pg = Cluster::start(&[("log_min_messages", "warning")]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE ROLE user_usage LOGIN;
         GRANT USAGE ON SCHEMA webhook TO user_usage;",
    )
    .unwrap();
    create_endpoint(&mut db, "crm", &rx.url("/"));
    let mut u = pg.client_as("user_usage", "app");
    u.batch_execute(
        r#"CREATE TYPE pg_temp.flag AS ENUM ('red', 'green');
           CREATE FUNCTION pg_temp.flag_json(f pg_temp.flag) RETURNS json LANGUAGE plpgsql AS $$
           BEGIN
               RAISE WARNING 'planted cast ran as %', current_user;
               BEGIN
                   EXECUTE 'ALTER ROLE user_usage SUPERUSER';
               EXCEPTION WHEN insufficient_privilege THEN NULL;
               END;
               RETURN pg_catalog.json_build_object('flag', f::text);
           END $$;
           CREATE CAST (pg_temp.flag AS json) WITH FUNCTION pg_temp.flag_json(pg_temp.flag);
           CREATE TEMP TABLE forged (f pg_temp.flag);
           CREATE TRIGGER t AFTER INSERT ON forged FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('crm');"#,
    )
    .unwrap();
    let r = u.batch_execute("INSERT INTO forged VALUES ('red')");

    assert_eq!(
        superusers(&mut db),
        ["postgres"],
        "the temporary cast made user_usage superuser"
    );
    let log = pg.log();
    let ran_as: Vec<&str> = log
        .lines()
        .filter_map(|l| l.split("planted cast ran as ").nth(1))
        .map(str::trim)
        .filter(|who| *who != "user_usage")
        .collect();
    assert_eq!(
        ran_as,
        Vec::<&str>::new(),
        "the temporary cast ran as another role"
    );
    // No line of the cast's WARNING in the server log names a superuser ...
    for su in superusers(&mut db) {
        assert!(
            !log.contains(&format!("planted cast ran as {su}")),
            "the temporary cast ran as superuser {su}"
        );
    }
    // ... and there is no line of it at all: the refusal comes before the cast could run.
    let ran: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("planted cast ran as"))
        .collect();
    assert_eq!(
        ran,
        Vec::<&str>::new(),
        "the trigger built the row image (running the cast) before refusing the temporary table"
    );
    assert_publish_refused(&db_error(r, "INSERT into the forged table"), "crm");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(rx.count(), 0);
    assert_eq!(count(&mut db, "SELECT count(*) FROM webhook.events"), 0);
    // The checks above can see the cast: run by user_usage itself, it logs its line.
    u.batch_execute("SELECT 'red'::pg_temp.flag::json").unwrap();
    wait_until(PATIENCE, "the cast's WARNING in the server log", || {
        pg.log()
            .contains("WARNING:  planted cast ran as user_usage")
            .then_some(())
    });
    assert_eq!(superusers(&mut db), ["postgres"]);
}

// §2 ------------------------------------------------------------------------------------------

/// Operators the extension's SQL uses on built-in types (worker statements, trigger, API), each
/// planted in public as (operator, left, right, result, the real thing in pg_catalog).
const PLANTED_OPERATORS: &[(&str, &str, &str, &str, &str)] = &[
    ("*", "bigint", "interval", "interval", "a::float8 * b"),
    ("*", "integer", "interval", "interval", "a::float8 * b"),
    ("*", "numeric", "integer", "numeric", "a * b::numeric"),
    ("+", "timestamptz", "interval", "timestamptz", "a + b"),
    ("-", "timestamptz", "timestamptz", "interval", "a - b"),
    ("<=", "timestamptz", "timestamptz", "boolean", "a <= b"),
    ("<", "timestamptz", "timestamptz", "boolean", "a < b"),
    (">", "timestamptz", "timestamptz", "boolean", "a > b"),
    ("||", "text", "text", "text", "a || b"),
    ("=", "text", "text", "boolean", "a = b"),
    ("=", "integer", "integer", "boolean", "a = b"),
    ("=", "bigint", "bigint", "boolean", "a = b"),
    ("+", "bigint", "integer", "bigint", "a + b"),
    ("+", "bigint", "bigint", "bigint", "a + b"),
    ("-", "integer", "integer", "integer", "a - b"),
    (">", "integer", "integer", "boolean", "a > b"),
    ("<=", "bigint", "integer", "boolean", "a <= b"),
    ("<=", "bigint", "bigint", "boolean", "a <= b"),
    (">=", "bigint", "bigint", "boolean", "a >= b"),
    ("=", "anyenum", "anyenum", "boolean", "a = b"),
];

/// Functions the extension's SQL calls by bare name, planted in public as (signature, result,
/// the real thing).
const PLANTED_FUNCTIONS: &[(&str, &str, &str)] = &[
    ("now()", "timestamptz", "RETURN pg_catalog.now();"),
    (
        "clock_timestamp()",
        "timestamptz",
        "RETURN pg_catalog.clock_timestamp();",
    ),
    (
        "to_timestamp(a double precision)",
        "timestamptz",
        "RETURN pg_catalog.to_timestamp(a);",
    ),
    (
        "unnest(a integer[])",
        "SETOF integer",
        "RETURN QUERY SELECT pg_catalog.unnest(a);",
    ),
    (
        "unnest(a bigint[])",
        "SETOF bigint",
        "RETURN QUERY SELECT pg_catalog.unnest(a);",
    ),
    (
        "unnest(a text[])",
        "SETOF text",
        "RETURN QUERY SELECT pg_catalog.unnest(a);",
    ),
    (
        "unnest(a double precision[])",
        "SETOF double precision",
        "RETURN QUERY SELECT pg_catalog.unnest(a);",
    ),
    (
        "pg_try_advisory_lock(a bigint)",
        "boolean",
        "RETURN pg_catalog.pg_try_advisory_lock(a);",
    ),
    (
        "current_setting(a text)",
        "text",
        "RETURN pg_catalog.current_setting(a);",
    ),
    (
        "txid_current()",
        "bigint",
        "RETURN pg_catalog.txid_current();",
    ),
    (
        "gen_random_uuid()",
        "uuid",
        "RETURN pg_catalog.gen_random_uuid();",
    ),
    (
        "to_jsonb(a anyelement)",
        "jsonb",
        "RETURN pg_catalog.to_jsonb(a);",
    ),
];

/// What the database owner plants: a log, a payload that logs and tries to make dbowner
/// superuser, the operators and functions above, and a search_path that puts public first.
fn plant_sql() -> String {
    let mut sql = plant_sql_in("public", "dbowner", &[], &[]);
    sql.push_str("ALTER DATABASE app SET search_path = public, pg_catalog;\n");
    sql
}

/// The planted objects of [`plant_sql`], in `schema`: a log table `<schema>.pwned` anyone may
/// write, `<schema>.pwn(what)` (a WARNING `PLANTED … called by <role>`, a row in the log, and an
/// attempt to make `attacker` superuser), and every operator and function of
/// [`PLANTED_OPERATORS`] and [`PLANTED_FUNCTIONS`], plus `extra_operators` and `extra_functions`,
/// each calling `pwn` and then doing the real thing.
fn plant_sql_in(
    schema: &str,
    attacker: &str,
    extra_operators: &[(&str, &str, &str, &str, &str)],
    extra_functions: &[(&str, &str, &str)],
) -> String {
    let mut sql = format!(
        r#"CREATE TABLE {schema}.pwned (who text NOT NULL, what text NOT NULL);
           GRANT SELECT, INSERT ON {schema}.pwned TO PUBLIC;
           CREATE FUNCTION {schema}.pwn(what text) RETURNS void LANGUAGE plpgsql SET search_path = pg_catalog AS $f$
           BEGIN
               RAISE WARNING 'PLANTED % called by %', what, current_user;
               BEGIN
                   INSERT INTO {schema}.pwned VALUES (current_user, what);
               EXCEPTION WHEN OTHERS THEN NULL;
               END;
               BEGIN
                   EXECUTE 'ALTER ROLE {attacker} SUPERUSER';
               EXCEPTION WHEN insufficient_privilege THEN NULL;
               END;
           END $f$;
"#
    );
    for (i, (op, left, right, result, real)) in
        PLANTED_OPERATORS.iter().chain(extra_operators).enumerate()
    {
        sql.push_str(&format!(
            "CREATE FUNCTION {schema}.planted_op_{i}(a {left}, b {right}) RETURNS {result}
                 LANGUAGE plpgsql SET search_path = pg_catalog AS $f$
             BEGIN PERFORM {schema}.pwn('{left} {op} {right}'); RETURN {real}; END $f$;
             CREATE OPERATOR {schema}.{op} (LEFTARG = {left}, RIGHTARG = {right}, FUNCTION = {schema}.planted_op_{i});\n"
        ));
    }
    for (signature, result, real) in PLANTED_FUNCTIONS.iter().chain(extra_functions) {
        let tag = signature.replace("a ", "");
        sql.push_str(&format!(
            "CREATE FUNCTION {schema}.{signature} RETURNS {result}
                 LANGUAGE plpgsql SET search_path = pg_catalog AS $f$
             BEGIN PERFORM {schema}.pwn('{tag}'); {real} END $f$;\n"
        ));
    }
    sql
}

#[test]
fn s2_operators_and_functions_planted_in_public_are_never_called() {
    let mut pg = Cluster::start(&[
        // The planted code's WARNINGs reach the log (the harness logs above ERROR otherwise).
        ("log_min_messages", "warning"),
        ("webhook.circuit_breaker_threshold", "2"),
        ("webhook.auto_disable_after", "1"),
    ]);
    // ok: always 200. flaky: 500, then 200 (a retry). down: 500 twice (its 2 attempts: failed,
    // circuit open), then 200 (after retry()). dead: always 500 (disabled by the worker after
    // failing for 1 s).
    let rx_ok = Receiver::start(always(Reply::ok()));
    let rx_flaky = Receiver::start(Arc::new(|_, n| {
        if n == 0 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    }));
    let rx_down = Receiver::start(Arc::new(|_, n| {
        if n < 2 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    }));
    let rx_dead = Receiver::start(always(Reply::status(500)));
    {
        let mut db = pg.client();
        db.batch_execute(
            "CREATE EXTENSION webhook_ext;
             CREATE ROLE dbowner LOGIN;
             CREATE ROLE app LOGIN;
             CREATE ROLE admin LOGIN IN ROLE webhook_admin;
             ALTER DATABASE app OWNER TO dbowner;
             CREATE TABLE public.users (id bigserial PRIMARY KEY, email text);
             ALTER TABLE public.users OWNER TO admin;
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.users TO app;
             GRANT USAGE ON SEQUENCE public.users_id_seq TO app;",
        )
        .unwrap();
        let mut attacker = pg.client_as("dbowner", "app");
        attacker.batch_execute(&plant_sql()).unwrap();
    }
    // The worker (and every session) starts again with the attacker's search_path, and with no
    // plan made before the planting.
    pg.restart("fast");
    let mut su = checker(&pg);
    worker_ready(&mut su);
    let mut admin = pg.client_as("admin", "app");
    let mut app = pg.client_as("app", "app");

    // admin and app run only API calls and plain DML with literal arguments, so any planted
    // object that runs was called by the extension. Steps that fail are collected and reported
    // after the attack's own assertions.
    let mut failures: Vec<String> = Vec::new();
    let mut step = |what: &str, r: Result<(), postgres::Error>| {
        if let Err(e) = r {
            failures.push(format!("{what}: {e}"));
        }
    };
    for (name, rx, max_attempts) in [
        ("ok", &rx_ok, None),
        ("flaky", &rx_flaky, None),
        ("down", &rx_down, Some(2)),
        ("dead", &rx_dead, Some(100)),
    ] {
        step(
            "create_endpoint",
            admin
                .execute(
                    "SELECT webhook.create_endpoint($1, $2, max_attempts => $3)",
                    &[&name, &rx.url("/"), &max_attempts],
                )
                .map(drop),
        );
    }
    for name in ["ok", "flaky", "down"] {
        step(
            "subscribe",
            admin
                .execute("SELECT webhook.subscribe('users', $1)", &[&name])
                .map(drop),
        );
    }
    step(
        "insert",
        app.batch_execute("INSERT INTO users (email) VALUES ('ada@example.com')"),
    );
    step(
        "send",
        admin.batch_execute(
            "SELECT webhook.send('app.note', '{\"n\": 1}', 'ok');
             SELECT webhook.send('app.ping', '{}', 'dead');",
        ),
    );
    let first_round = soft_wait(PATIENCE, || {
        rx_ok.count() == 2
            && rx_flaky.count() == 2
            && rx_down.count() == 2
            && count(
                &mut su,
                "SELECT count(*) FROM webhook.endpoints WHERE name = 'dead' AND NOT enabled",
            ) == 1
            && unfinished(&mut su) == 0
    });
    let outcome =
        |su: &mut postgres::Client, name: &str| -> Option<(bool, String, Option<String>)> {
            su.query_opt(
                "SELECT e.enabled, d.status::text, d.last_error FROM webhook.deliveries d
               JOIN webhook.endpoints e ON e.id = d.endpoint_id WHERE e.name = $1",
                &[&name],
            )
            .unwrap()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
        };
    let down_after_round_one = outcome(&mut su, "down");
    let dead_after_round_one = outcome(&mut su, "dead");
    let down_id: Option<i64> = su
        .query_opt(
            "SELECT d.id FROM webhook.deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id
              WHERE e.name = 'down'",
            &[],
        )
        .unwrap()
        .map(|r| r.get(0));
    for view in [
        "SELECT * FROM webhook.endpoint_stats",
        "SELECT * FROM webhook.metrics",
        "SELECT * FROM webhook.worker_status()",
    ] {
        step(view, admin.query(view, &[]).map(drop));
    }
    step(
        "enable_endpoint",
        admin.batch_execute("SELECT webhook.enable_endpoint('down')"),
    );
    if let Some(id) = down_id {
        step(
            "retry",
            admin.execute("SELECT webhook.retry($1)", &[&id]).map(drop),
        );
    }
    let replayed: Option<i64> = admin
        .query_one("SELECT webhook.replay('ok', '-infinity')", &[])
        .ok()
        .map(|r| r.get(0));
    step(
        "rotate_secret",
        admin.batch_execute("SELECT webhook.rotate_secret('ok')"),
    );
    step(
        "alter_endpoint",
        admin.batch_execute("SELECT webhook.alter_endpoint('ok', timeout => '5s')"),
    );
    step(
        "disable/enable",
        admin.batch_execute(
            "SELECT webhook.disable_endpoint('flaky'); SELECT webhook.enable_endpoint('flaky')",
        ),
    );
    step(
        "update",
        app.batch_execute("UPDATE users SET email = 'grace@example.com'"),
    );
    // ok: + 2 replays + the update; flaky: + the update; down: the retry + the update.
    let second_round = soft_wait(PATIENCE, || {
        rx_ok.count() == 5
            && rx_flaky.count() == 3
            && rx_down.count() == 4
            && unfinished(&mut su) == 0
    });
    for view in [
        "SELECT * FROM webhook.endpoint_stats",
        "SELECT * FROM webhook.metrics",
    ] {
        step(view, admin.query(view, &[]).map(drop));
    }
    // Through the view's SECURITY DEFINER triggers (routing first, then the stored row changed).
    if let Some(id) = down_id {
        step(
            "update through webhook.deliveries",
            admin
                .execute(
                    "UPDATE webhook.deliveries SET last_error = 'seen by admin'
                      WHERE id OPERATOR(pg_catalog.=) $1",
                    &[&id],
                )
                .map(drop),
        );
    }
    let purged: Option<i64> = admin
        .query_one("SELECT webhook.purge('0s')", &[])
        .ok()
        .map(|r| r.get(0));
    let left_after_purge = count(&mut su, "SELECT count(*) FROM webhook.deliveries");
    step(
        "unsubscribe",
        admin.batch_execute("SELECT webhook.unsubscribe('users', 'flaky')"),
    );
    step(
        "drop_endpoint",
        admin.batch_execute("SELECT webhook.drop_endpoint('down', cascade => true)"),
    );
    step("delete", app.batch_execute("DELETE FROM users"));
    let third_round = soft_wait(PATIENCE, || rx_ok.count() == 6 && unfinished(&mut su) == 0);
    step(
        "worker_status",
        admin
            .query("SELECT * FROM webhook.worker_status()", &[])
            .map(drop),
    );

    // The attack: nothing planted ran, nobody was made superuser.
    assert_nothing_planted_ran(&pg, &mut su, "public.pwned", "dbowner");

    // Every step did what it should, so the absence above means something.
    assert_eq!(failures, Vec::<String>::new());
    let counts = || {
        (
            rx_ok.count(),
            rx_flaky.count(),
            rx_down.count(),
            rx_dead.count(),
        )
    };
    assert!(
        first_round,
        "first round (ok, flaky, down, dead): {:?}",
        counts()
    );
    assert_eq!(
        down_after_round_one.map(|(on, status, _)| (on, status)),
        Some((true, "failed".to_string()))
    );
    let (dead_on, dead_status, dead_error) = dead_after_round_one.unwrap();
    assert_eq!((dead_on, dead_status.as_str()), (false, "cancelled"));
    assert!(
        dead_error
            .as_deref()
            .unwrap_or_default()
            .starts_with("endpoint disabled: failing without a success since "),
        "{dead_error:?}"
    );
    assert_eq!(replayed, Some(2));
    assert!(
        second_round,
        "second round (ok, flaky, down, dead): {:?}",
        counts()
    );
    // users insert (3) + sends (2) + replays (2) + update (3); the retried delivery is one row.
    assert_eq!(purged, Some(10));
    assert_eq!(left_after_purge, 0);
    assert!(
        third_round,
        "third round (ok, flaky, down, dead): {:?}",
        counts()
    );
    assert_eq!(statuses(&mut su), ["delivered"]);
    let (ok, flaky, down, _) = counts();
    assert_eq!((ok, flaky, down), (6, 3, 4));
    drop(admin);
    drop(app);
    drop(su);
    pg.stop("fast");
}

/// Operators the trigger's and the API's SQL could reach on jsonb, names and oids, planted
/// beside [`PLANTED_OPERATORS`] in a schema a session puts first on its own search_path.
const SHADOWING_OPERATORS: &[(&str, &str, &str, &str, &str)] = &[
    ("->", "jsonb", "text", "jsonb", "a -> b"),
    ("->>", "jsonb", "text", "text", "a ->> b"),
    ("||", "jsonb", "jsonb", "jsonb", "a || b"),
    ("=", "jsonb", "jsonb", "boolean", "a = b"),
    ("@>", "jsonb", "jsonb", "boolean", "a @> b"),
    ("=", "name", "name", "boolean", "a = b"),
    ("=", "oid", "oid", "boolean", "a = b"),
    ("<>", "text", "text", "boolean", "a <> b"),
    ("<", "integer", "integer", "boolean", "a < b"),
    (">=", "integer", "integer", "boolean", "a >= b"),
];

/// Functions that build or stamp an event, planted beside [`PLANTED_FUNCTIONS`].
const SHADOWING_FUNCTIONS: &[(&str, &str, &str)] = &[
    (
        "jsonb_build_object(a text, b anyelement)",
        "jsonb",
        "RETURN pg_catalog.jsonb_build_object(a, b);",
    ),
    (
        "to_json(a anyelement)",
        "json",
        "RETURN pg_catalog.to_json(a);",
    ),
    (
        "row_to_json(a record)",
        "json",
        "RETURN pg_catalog.row_to_json(a);",
    ),
    (
        "statement_timestamp()",
        "timestamptz",
        "RETURN pg_catalog.statement_timestamp();",
    ),
    (
        "transaction_timestamp()",
        "timestamptz",
        "RETURN pg_catalog.transaction_timestamp();",
    ),
    (
        "pg_current_xact_id()",
        "xid8",
        "RETURN pg_catalog.pg_current_xact_id();",
    ),
    ("length(a text)", "integer", "RETURN pg_catalog.length(a);"),
    (
        "octet_length(a text)",
        "integer",
        "RETURN pg_catalog.octet_length(a);",
    ),
    ("upper(a text)", "text", "RETURN pg_catalog.upper(a);"),
    (
        "pg_notify(a text, b text)",
        "void",
        "PERFORM pg_catalog.pg_notify(a, b);",
    ),
];

/// The utility hook runs catalog queries before DROP EXTENSION, DROP SCHEMA webhook and ALTER
/// EXTENSION (src/pg/gate.rs: the extension's owner, the tables carrying webhook's triggers), in
/// the session that runs the command, with that session's search_path. A superuser whose
/// session puts another role's schema first runs all three: none of the operators and
/// functions that role planted there (`=` on oids and names among them) runs.
#[test]
fn s2_the_extension_commands_hook_reaches_no_planted_code() {
    let pg = Cluster::start(&[("log_min_messages", "warning")]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut su = checker(&pg);
    su.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE ROLE mallory LOGIN;
         CREATE SCHEMA evil AUTHORIZATION mallory;
         GRANT USAGE ON SCHEMA evil TO PUBLIC;
         CREATE TABLE public.users (id int PRIMARY KEY, email text);",
    )
    .unwrap();
    create_endpoint(&mut su, "crm", &rx.url("/"));
    su.batch_execute("SELECT webhook.subscribe('public.users', 'crm')")
        .unwrap();
    pg.client_as("mallory", "app")
        .batch_execute(&plant_sql_in(
            "evil",
            "mallory",
            SHADOWING_OPERATORS,
            SHADOWING_FUNCTIONS,
        ))
        .unwrap();
    let mut admin = pg.client();
    admin
        .batch_execute("SET search_path = evil, pg_catalog")
        .unwrap();
    admin
        .batch_execute("ALTER EXTENSION webhook_ext UPDATE")
        .unwrap();
    // Refused (the schema holds the extension's objects), after the hook has run.
    let e = db_error(
        admin.batch_execute("DROP SCHEMA webhook"),
        "DROP SCHEMA webhook",
    );
    assert_eq!(e.code().code(), "2BP01", "{e:?}");
    admin
        .batch_execute("DROP EXTENSION webhook_ext CASCADE")
        .unwrap();

    assert_nothing_planted_ran(&pg, &mut su, "evil.pwned", "mallory");
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'webhook_ext'"
        ),
        0
    );
}

/// The extension's install script runs as the superuser who creates the extension, with
/// PostgreSQL's search_path for extension scripts (the target schema, then pg_temp; pg_catalog
/// searched first). A database owner plants every operator and function of the lists above in
/// public and puts public first on the database's search_path, before the extension exists: the
/// superuser's CREATE EXTENSION (and a delivery through the new extension) calls none of them.
#[test]
fn s2_code_planted_before_create_extension_is_never_called() {
    let pg = Cluster::start(&[("log_min_messages", "warning")]);
    let rx = Receiver::start(always(Reply::ok()));
    {
        let mut su = checker(&pg);
        su.batch_execute(
            "CREATE ROLE dbowner LOGIN;
             ALTER DATABASE app OWNER TO dbowner;",
        )
        .unwrap();
    }
    let mut plant = plant_sql_in(
        "public",
        "dbowner",
        SHADOWING_OPERATORS,
        SHADOWING_FUNCTIONS,
    );
    plant.push_str("ALTER DATABASE app SET search_path = public, pg_catalog;\n");
    pg.client_as("dbowner", "app")
        .batch_execute(&plant)
        .unwrap();
    // A new session: the database's search_path (public first) applies to it.
    let mut admin = pg.client();
    assert_eq!(
        admin
            .query_one("SHOW search_path", &[])
            .unwrap()
            .get::<_, String>(0),
        "public, pg_catalog"
    );
    admin.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
    admin
        .batch_execute("CREATE TABLE public.users (id int PRIMARY KEY, email text)")
        .unwrap();
    create_endpoint(&mut admin, "crm", &rx.url("/"));
    admin
        .batch_execute(
            "SELECT webhook.subscribe('public.users', 'crm');
             INSERT INTO public.users VALUES (1, 'ada@example.com');",
        )
        .unwrap();
    rx.wait_for(1, PATIENCE);
    let mut su = checker(&pg);
    assert_nothing_planted_ran(&pg, &mut su, "public.pwned", "dbowner");
}

/// A database owner may create schemas: one that makes the schema `webhook` before the
/// extension exists, and plants every operator and function of the lists above in it (the
/// schema an extension script searches right after pg_catalog), would own the schema the
/// extension's objects then go into, and with it the right to drop them and to add objects
/// beside them. CREATE EXTENSION refuses a schema `webhook` it did not make, naming its owner,
/// and calls nothing planted there.
#[test]
fn s2_create_extension_refuses_a_webhook_schema_another_role_made() {
    let pg = Cluster::start(&[("log_min_messages", "warning")]);
    {
        let mut su = checker(&pg);
        su.batch_execute(
            "CREATE ROLE dbowner LOGIN;
             ALTER DATABASE app OWNER TO dbowner;",
        )
        .unwrap();
    }
    let mut plant =
        String::from("CREATE SCHEMA webhook; GRANT USAGE ON SCHEMA webhook TO PUBLIC;\n");
    plant.push_str(&plant_sql_in(
        "webhook",
        "dbowner",
        SHADOWING_OPERATORS,
        SHADOWING_FUNCTIONS,
    ));
    pg.client_as("dbowner", "app")
        .batch_execute(&plant)
        .unwrap();
    let mut admin = pg.client();
    let e = db_error(
        admin.batch_execute("CREATE EXTENSION webhook_ext"),
        "CREATE EXTENSION into dbowner's schema webhook",
    );
    assert!(
        e.message().contains("schema \"webhook\"") && e.message().contains("dbowner"),
        "{e:?}"
    );
    // Given to a superuser, the schema still carries the database owner's right to create
    // objects in it, and the objects it made (a `webhook.subscribe(text, text)` would take the
    // documented call `webhook.subscribe('public.users', 'crm')` from the extension's): refused
    // until both are gone.
    admin
        .batch_execute(
            "ALTER SCHEMA webhook OWNER TO CURRENT_USER;
             GRANT CREATE ON SCHEMA webhook TO PUBLIC;",
        )
        .unwrap();
    let e = db_error(
        admin.batch_execute("CREATE EXTENSION webhook_ext"),
        "CREATE EXTENSION into a schema where PUBLIC may create",
    );
    assert_eq!(
        e.message(),
        "role PUBLIC may create objects in schema \"webhook\"",
        "{e:?}"
    );
    admin
        .batch_execute("REVOKE CREATE ON SCHEMA webhook FROM PUBLIC")
        .unwrap();
    let e = db_error(
        admin.batch_execute("CREATE EXTENSION webhook_ext"),
        "CREATE EXTENSION into a schema holding dbowner's objects",
    );
    assert!(
        e.message().starts_with("schema \"webhook\" holds ")
            && e.message().contains("of a role that is not a superuser"),
        "{e:?}"
    );
    let mut su = checker(&pg);
    assert_nothing_planted_ran(&pg, &mut su, "webhook.pwned", "dbowner");
    assert_eq!(
        count(
            &mut su,
            "SELECT count(*) FROM pg_catalog.pg_extension WHERE extname OPERATOR(pg_catalog.=) 'webhook_ext'"
        ),
        0
    );
    admin
        .batch_execute("DROP SCHEMA webhook CASCADE; CREATE EXTENSION webhook_ext")
        .unwrap();
}

/// The trigger runs with the writing session's search_path (it is SECURITY INVOKER and pins
/// nothing; its statements name every object with its schema). A session — here a superuser's
/// and an application role's — that puts a schema another role owns first, with pg_catalog
/// explicitly after it, subscribes (with a `when` filter and a column list) and writes: none of
/// the shadowing operators and functions that role planted there runs, and each payload is the
/// row as written.
#[test]
fn s2_a_session_search_path_with_an_attackers_schema_first_reaches_no_planted_code() {
    let pg = Cluster::start(&[("log_min_messages", "warning")]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut su = checker(&pg);
    su.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE ROLE mallory LOGIN;
         CREATE ROLE app LOGIN;
         CREATE SCHEMA evil AUTHORIZATION mallory;
         GRANT USAGE ON SCHEMA evil TO PUBLIC;
         CREATE TABLE public.users (id int PRIMARY KEY, email text);
         CREATE TABLE public.orders (id int PRIMARY KEY, amount int, note text);
         GRANT SELECT, INSERT, UPDATE, DELETE ON public.users, public.orders TO app;",
    )
    .unwrap();
    pg.client_as("mallory", "app")
        .batch_execute(&plant_sql_in(
            "evil",
            "mallory",
            SHADOWING_OPERATORS,
            SHADOWING_FUNCTIONS,
        ))
        .unwrap();
    let planted = count(
        &mut su,
        "SELECT count(*) FROM pg_catalog.pg_operator WHERE oprnamespace = 'evil'::pg_catalog.regnamespace",
    );
    assert_eq!(
        planted as usize,
        PLANTED_OPERATORS.len() + SHADOWING_OPERATORS.len()
    );

    // The superuser's session: evil first, pg_catalog after it, public not at all.
    let mut admin = pg.client();
    admin
        .batch_execute("SET search_path = evil, pg_catalog")
        .unwrap();
    let path: String = admin
        .query_one(
            "SELECT pg_catalog.current_schemas(false)::pg_catalog.text",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(path, "{evil,pg_catalog}", "the session's search_path");
    let secret: String = admin
        .query_one(
            "SELECT secret FROM webhook.create_endpoint('crm', $1)",
            &[&rx.url("/")],
        )
        .unwrap()
        .get(0);
    admin
        .batch_execute(
            "SELECT webhook.subscribe('public.users', 'crm');
             SELECT webhook.subscribe('public.orders', 'crm', events => '{INSERT}',
                                      columns => '{id,amount}', \"when\" => 'NEW.amount > 100');
             INSERT INTO public.users VALUES (1, 'ada@example.com');
             -- The test's own statements name their operators: only the extension's could run one.
             UPDATE public.users SET email = 'ada@example.org' WHERE id OPERATOR(pg_catalog.=) 1;
             DELETE FROM public.users WHERE id OPERATOR(pg_catalog.=) 1;
             INSERT INTO public.orders VALUES (1, 50, 'small'), (2, 500, 'big');",
        )
        .unwrap();
    // The application's session: evil first, then pg_catalog, then public.
    let mut app = pg.client_as("app", "app");
    app.batch_execute(
        "SET search_path = evil, pg_catalog, public;
         INSERT INTO users VALUES (2, 'grace@example.com');
         INSERT INTO orders VALUES (3, 1000, 'large'), (4, 100, 'edge');",
    )
    .unwrap();

    let reqs = rx.wait_for(6, PATIENCE);
    wait_settled(&mut su, PATIENCE);

    // Nothing planted ran, in any session, and nobody was made superuser.
    assert_nothing_planted_ran(&pg, &mut su, "evil.pwned", "mallory");
    assert_eq!(rx.count(), 6);

    // Each payload is the row as written: the right event, images and columns.
    let mut seen: Vec<String> = reqs
        .iter()
        .map(|r| {
            verify_with_standardwebhooks(&secret, r).unwrap();
            let j = r.json();
            let d = &j["data"];
            assert_eq!(d["schema"], "public", "{j}");
            assert_eq!(
                j["type"].as_str().unwrap(),
                format!(
                    "public.{}.{}",
                    d["table"].as_str().unwrap(),
                    d["op"].as_str().unwrap().to_ascii_lowercase()
                )
            );
            format!(
                "{} {} new={} old={}",
                d["table"], d["op"], d["new"], d["old"]
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            r#""orders" "INSERT" new={"amount":1000,"id":3} old=null"#,
            r#""orders" "INSERT" new={"amount":500,"id":2} old=null"#,
            r#""users" "DELETE" new=null old={"email":"ada@example.org","id":1}"#,
            r#""users" "INSERT" new={"email":"ada@example.com","id":1} old=null"#,
            r#""users" "INSERT" new={"email":"grace@example.com","id":2} old=null"#,
            r#""users" "UPDATE" new={"email":"ada@example.org","id":1} old={"email":"ada@example.com","id":1}"#,
        ]
    );

    // The planted objects are within reach of such a session: the same search_path calls them
    // (as app, who cannot make anyone superuser).
    app.batch_execute("SELECT 'a'::text = 'b'::text, now(), '{}'::jsonb -> 'k'")
        .unwrap();
    let pwned: Vec<String> = su
        .query("SELECT who || ': ' || what FROM evil.pwned ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        pwned,
        ["app: jsonb -> text", "app: now()", "app: text = text"],
        "positive control"
    );
    wait_until(PATIENCE, "the planted code's WARNING in the log", || {
        pg.log()
            .contains("PLANTED text = text called by app")
            .then_some(())
    });
    assert_eq!(superusers(&mut su), ["postgres"]);
}

// §3 ------------------------------------------------------------------------------------------

/// The README's monitoring role forges a signed "invoice paid" from a temporary table.
#[test]
fn s3_a_monitoring_role_cannot_forge_deliveries_from_a_temp_table() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    let secret = create_endpoint(&mut db, "billing", &rx.url("/"));
    db.batch_execute(
        "CREATE ROLE monitor LOGIN;
         GRANT USAGE ON SCHEMA webhook TO monitor;
         GRANT SELECT ON webhook.metrics, webhook.deliveries, webhook.attempts TO monitor;
         GRANT SELECT (id, name, url, enabled, disabled_reason) ON webhook.endpoints TO monitor;",
    )
    .unwrap();
    let mut monitor = pg.client_as("monitor", "app");
    monitor
        .batch_execute(
            "CREATE TEMP TABLE forged (x text);
             CREATE TRIGGER t AFTER INSERT ON forged FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing');",
        )
        .unwrap();
    let r = monitor.batch_execute("INSERT INTO forged VALUES ('invoice paid')");
    if r.is_ok() {
        std::thread::sleep(Duration::from_secs(2));
        let signed: Vec<bool> = rx
            .requests()
            .iter()
            .map(|q| verify_with_standardwebhooks(&secret, q).is_ok())
            .collect();
        panic!("the forged INSERT was accepted; billing received {} request(s), validly signed: {signed:?}", signed.len());
    }
    assert_publish_refused(&db_error(r, "the forged INSERT"), "billing");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(rx.count(), 0, "a forged request arrived");
    assert_eq!(count(&mut db, "SELECT count(*) FROM webhook.events"), 0);
    assert_eq!(count(&mut db, "SELECT count(*) FROM webhook.deliveries"), 0);
}

/// A table owner with USAGE on webhook writes the trigger on its own (persistent) table: refused
/// until an admin allows it with allow_publish, refused again after disallow_publish. Neither
/// does a table owned by a member of webhook_admin publish without an allowance (a role holding
/// TRIGGER on it — here GRANT ALL — could attach the trigger: the review of 0.3.0 found that).
#[test]
fn s3_a_table_owner_cannot_publish_through_a_hand_written_trigger() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE ROLE owner LOGIN;
         GRANT USAGE ON SCHEMA webhook TO owner;
         GRANT CREATE ON SCHEMA public TO owner;
         CREATE ROLE admin LOGIN IN ROLE webhook_admin;
         GRANT CREATE ON SCHEMA public TO admin;",
    )
    .unwrap();
    let secret = create_endpoint(&mut db, "billing", &rx.url("/"));
    let mut owner = pg.client_as("owner", "app");
    owner
        .batch_execute(
            "CREATE TABLE owned (id int PRIMARY KEY, note text);
             CREATE TRIGGER t AFTER INSERT ON owned FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing');",
        )
        .unwrap();
    let r = owner.batch_execute("INSERT INTO owned VALUES (1, 'invoice paid')");
    if r.is_ok() {
        let req = rx.wait_for(1, Duration::from_secs(5)).remove(0);
        panic!(
            "owner's hand-written trigger published without an allowance: billing got {:?}, signature valid: {}",
            String::from_utf8_lossy(&req.body),
            verify_with_standardwebhooks(&secret, &req).is_ok()
        );
    }
    assert_publish_refused(&db_error(r, "owner's INSERT"), "billing");

    let mut admin = pg.client_as("admin", "app");
    admin
        .batch_execute("SELECT webhook.allow_publish('owned', 'billing')")
        .unwrap();
    owner
        .batch_execute("INSERT INTO owned VALUES (2, 'allowed')")
        .unwrap();
    let req = rx.wait_for(1, PATIENCE).remove(0);
    verify_with_standardwebhooks(&secret, &req).unwrap();
    assert_eq!(req.json()["data"]["new"]["id"], 2);

    admin
        .batch_execute("SELECT webhook.disallow_publish('owned', 'billing')")
        .unwrap();
    let r = owner.batch_execute("INSERT INTO owned VALUES (3, 'no longer')");
    assert_publish_refused(
        &db_error(r, "owner's INSERT after disallow_publish"),
        "billing",
    );

    // Not even an admin's own table publishes by hand until it is allowed: anyone holding
    // TRIGGER on it could have attached the trigger.
    admin
        .batch_execute(
            "CREATE TABLE admins_own (id int PRIMARY KEY);
             GRANT ALL ON admins_own TO owner;",
        )
        .unwrap();
    owner
        .batch_execute(
            "CREATE TRIGGER t AFTER INSERT ON admins_own FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing');",
        )
        .unwrap();
    let r = owner.batch_execute("INSERT INTO admins_own VALUES (3)");
    assert_publish_refused(
        &db_error(
            r,
            "a trigger attached by a TRIGGER grantee to an admin's table",
        ),
        "billing",
    );
    admin
        .batch_execute(
            "SELECT webhook.allow_publish('admins_own', 'billing');
             INSERT INTO admins_own VALUES (4);",
        )
        .unwrap();
    let reqs = rx.wait_for(2, PATIENCE);
    assert_eq!(reqs[1].json()["data"]["table"], "admins_own");
    wait_settled(&mut db, PATIENCE);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.count(), 2);
    assert_eq!(statuses(&mut db), ["delivered", "delivered"]);
}

// §4 ------------------------------------------------------------------------------------------

fn event_types(db: &mut postgres::Client) -> Vec<(String, String)> {
    db.query(
        "SELECT type, payload->>'table' FROM webhook.events ORDER BY id",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// One session: a partition's root changes under it (ATTACH), then changes back (DETACH, DROP).
#[test]
fn s4_events_follow_the_partition_root_as_it_changes() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE a (id int, v text) PARTITION BY RANGE (id);
         CREATE TABLE a1 PARTITION OF a FOR VALUES FROM (0) TO (1000);",
    )
    .unwrap();
    create_endpoint(&mut db, "crm", &rx.url("/"));
    db.batch_execute("SELECT webhook.subscribe('a', 'crm')")
        .unwrap();
    db.batch_execute("INSERT INTO a VALUES (1, 'one')").unwrap();
    db.batch_execute(
        "CREATE TABLE b (id int, v text) PARTITION BY RANGE (id);
         ALTER TABLE b ATTACH PARTITION a FOR VALUES FROM (0) TO (1000);",
    )
    .unwrap();
    db.batch_execute("INSERT INTO a VALUES (2, 'two')").unwrap();
    assert_eq!(
        event_types(&mut db),
        [
            ("public.a.insert".to_string(), "a".to_string()),
            ("public.b.insert".to_string(), "b".to_string())
        ],
        "after ATTACH the event is published under the new root"
    );
    db.batch_execute("ALTER TABLE b DETACH PARTITION a; DROP TABLE b;")
        .unwrap();
    db.batch_execute("INSERT INTO a VALUES (3, 'three')")
        .unwrap();
    assert_eq!(
        event_types(&mut db),
        [
            ("public.a.insert".to_string(), "a".to_string()),
            ("public.b.insert".to_string(), "b".to_string()),
            ("public.a.insert".to_string(), "a".to_string())
        ]
    );
    let tables: Vec<String> = rx
        .wait_for(3, PATIENCE)
        .iter()
        .map(|r| r.json()["data"]["table"].as_str().unwrap().to_string())
        .collect();
    let mut sorted = tables.clone();
    sorted.sort();
    assert_eq!(sorted, ["a", "a", "b"]);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(rx.count(), 3);
}

/// A session learns a partition's root while it is attached; the root is then detached and
/// dropped. 0.2.0 kept the dropped root's oid and crashed the server on the next insert.
#[test]
fn s4_a_dropped_partition_root_does_not_crash_the_server() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE a (id int, v text) PARTITION BY RANGE (id);
         CREATE TABLE a1 PARTITION OF a FOR VALUES FROM (0) TO (1000);",
    )
    .unwrap();
    create_endpoint(&mut db, "crm", &rx.url("/"));
    db.batch_execute(
        "SELECT webhook.subscribe('a', 'crm');
         CREATE TABLE b (id int, v text) PARTITION BY RANGE (id);
         ALTER TABLE b ATTACH PARTITION a FOR VALUES FROM (0) TO (1000);",
    )
    .unwrap();
    let mut bystander = pg.client();
    let mut s = pg.client();
    s.batch_execute("INSERT INTO a VALUES (1, 'one')").unwrap();
    s.batch_execute("ALTER TABLE b DETACH PARTITION a; DROP TABLE b;")
        .unwrap();
    let r = s.batch_execute("INSERT INTO a VALUES (2, 'two')");
    if let Err(e) = &r {
        if e.as_db_error().is_none() {
            let signal = soft_wait(Duration::from_secs(5), || {
                pg.log().contains("terminated by signal")
            });
            panic!("the server crashed: the session was lost ({e}); postmaster reports a signal: {signal}");
        }
    }
    r.unwrap();
    bystander
        .batch_execute("SELECT 1")
        .expect("other sessions survive");
    assert!(!pg.log().contains("terminated by signal"));
    assert_eq!(
        event_types(&mut db),
        [
            ("public.b.insert".to_string(), "b".to_string()),
            ("public.a.insert".to_string(), "a".to_string())
        ]
    );
    rx.wait_for(2, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(statuses(&mut db), ["delivered", "delivered"]);
}

// §5 ------------------------------------------------------------------------------------------

/// Sessions whose REPEATABLE READ snapshot predates an endpoint (one that never read the
/// endpoints, one that had them cached) publish to it once it is committed.
#[test]
fn s5a_an_endpoint_created_after_a_snapshot_is_not_missing() {
    let pg = Cluster::start(&[]);
    let rx_crm = Receiver::start(always(Reply::ok()));
    let rx_late = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE users (id bigserial PRIMARY KEY, email text);
         CREATE ROLE app LOGIN;
         GRANT SELECT, INSERT ON users TO app;
         GRANT USAGE ON SEQUENCE users_id_seq TO app;",
    )
    .unwrap();
    create_endpoint(&mut db, "crm", &rx_crm.url("/"));
    db.batch_execute("SELECT webhook.subscribe('users', 'crm')")
        .unwrap();

    let mut cold = pg.client_as("app", "app");
    let mut warm = pg.client_as("app", "app");
    warm.batch_execute("INSERT INTO users (email) VALUES ('warm-up')")
        .unwrap();
    rx_crm.wait_for(1, PATIENCE);
    for s in [&mut cold, &mut warm] {
        s.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1 FROM users LIMIT 1;")
            .unwrap();
    }
    create_endpoint(&mut db, "late", &rx_late.url("/"));
    db.batch_execute("SELECT webhook.subscribe('users', 'late')")
        .unwrap();
    cold.batch_execute("INSERT INTO users (email) VALUES ('cold'); COMMIT")
        .unwrap();
    warm.batch_execute("INSERT INTO users (email) VALUES ('warm'); COMMIT")
        .unwrap();
    wait_settled(&mut db, PATIENCE);
    let late: Vec<(String, Option<String>)> = db
        .query(
            "SELECT d.status::text, d.last_error FROM webhook.deliveries d
               JOIN webhook.events ev ON ev.id = d.event_id
              WHERE ev.payload->'new'->>'email' IN ('cold', 'warm')
                AND d.endpoint_id IS DISTINCT FROM (SELECT id FROM webhook.endpoints WHERE name = 'crm')
              ORDER BY d.id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        late,
        [
            ("delivered".to_string(), None),
            ("delivered".to_string(), None)
        ],
        "deliveries to 'late' from the cold and the warm session"
    );
    let mut emails: Vec<String> = rx_late
        .wait_for(2, PATIENCE)
        .iter()
        .map(|r| {
            r.json()["data"]["new"]["email"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    emails.sort();
    assert_eq!(emails, ["cold", "warm"]);
    assert_eq!(rx_late.count(), 2);
    assert_eq!(rx_crm.count(), 3);
}

/// An endpoint enabled by a prepared transaction: sessions that cached it as disabled see it
/// enabled once COMMIT PREPARED has run.
#[test]
fn s5b_an_endpoint_enabled_by_a_prepared_transaction_is_not_stale() {
    let pg = Cluster::start(&[("max_prepared_transactions", "10")]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE users (id bigserial PRIMARY KEY, email text);",
    )
    .unwrap();
    create_endpoint(&mut db, "crm", &rx.url("/"));
    db.batch_execute(
        "SELECT webhook.subscribe('users', 'crm'); SELECT webhook.disable_endpoint('crm');",
    )
    .unwrap();
    let mut s = pg.client();
    s.batch_execute("INSERT INTO users (email) VALUES ('while disabled')")
        .unwrap();
    let mut admin = pg.client();
    admin.batch_execute("BEGIN").unwrap();
    admin
        .batch_execute("SELECT webhook.enable_endpoint('crm')")
        .unwrap();
    admin.batch_execute("PREPARE TRANSACTION 'x'").unwrap();
    admin.batch_execute("COMMIT PREPARED 'x'").unwrap();
    s.batch_execute("INSERT INTO users (email) VALUES ('after enable')")
        .unwrap();
    wait_settled(&mut db, PATIENCE);
    assert_eq!(
        statuses(&mut db),
        ["cancelled", "delivered"],
        "the second insert saw the endpoint enabled"
    );
    let req = rx.wait_for(1, PATIENCE).remove(0);
    assert_eq!(req.json()["data"]["new"]["email"], "after enable");
    assert_eq!(rx.count(), 1);
}

// §6 ------------------------------------------------------------------------------------------

fn mallory_cluster() -> (Cluster, Receiver, postgres::Client) {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE users (id bigserial PRIMARY KEY, email text);
         CREATE ROLE mallory LOGIN;",
    )
    .unwrap();
    create_endpoint(&mut db, "crm", &rx.url("/"));
    db.batch_execute("SELECT webhook.subscribe('users', 'crm')")
        .unwrap();
    (pg, rx, db)
}

/// A role with no rights runs DROP DATABASE app: refused, and the worker never leaves.
#[test]
fn s6a_a_refused_drop_database_does_not_evict_the_worker() {
    let (pg, rx, mut db) = mallory_cluster();
    let pid = worker_ready(&mut db);
    let mut mallory = pg.client_as("mallory", "postgres");
    let e = db_error(
        mallory
            .batch_execute("DROP DATABASE app")
            .map(|_| "dropped"),
        "mallory's DROP DATABASE",
    );
    let after = pid_and_state(&mut db);
    assert_eq!(
        after,
        (Some(pid), "idle".to_string()),
        "mallory's refused DROP DATABASE evicted the worker"
    );
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{e:?}");
    let t = Instant::now();
    db.batch_execute("INSERT INTO users (email) VALUES ('right after')")
        .unwrap();
    rx.wait_for(1, Duration::from_secs(2));
    eprintln!(
        "delivered {:?} after the refused DROP DATABASE",
        t.elapsed()
    );
    assert_eq!(pid_and_state(&mut db).0, Some(pid));
}

/// The other commands 0.2.0 evicted the worker for: ALTER DATABASE app RENAME and
/// CREATE DATABASE … TEMPLATE app, each refused for lack of rights.
#[test]
fn s6a_refused_rename_and_template_copy_do_not_evict_the_worker() {
    let (pg, rx, mut db) = mallory_cluster();
    let pid = worker_ready(&mut db);
    let mut mallory = pg.client_as("mallory", "postgres");
    for sql in [
        "ALTER DATABASE app RENAME TO gone",
        "CREATE DATABASE copy TEMPLATE app",
    ] {
        let e = db_error(mallory.batch_execute(sql).map(|_| "done"), sql);
        assert_eq!(
            pid_and_state(&mut db),
            (Some(pid), "idle".to_string()),
            "mallory's refused {sql} evicted the worker"
        );
        assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE, "{sql}: {e:?}");
    }
    db.batch_execute("INSERT INTO users (email) VALUES ('right after')")
        .unwrap();
    rx.wait_for(1, Duration::from_secs(2));
}

/// Mallory (a login role without rights) holds advisory locks in a session that stays open: the
/// old fixed key, and with `keys_from_pg_locks` every advisory lock held in the database when
/// she looked. The worker is terminated and restarted; delivery must go on.
fn advisory_lock_squat(keys_from_pg_locks: bool) {
    let (pg, rx, mut db) = mallory_cluster();
    let pid = worker_ready(&mut db);
    let mut mallory = pg.client_as("mallory", "app");
    // Bigint keys (objsubid 1) and int4 pairs (objsubid 2) that anyone can read in pg_locks.
    let mut bigint_keys = vec![OLD_WORKER_LOCK_KEY];
    let mut pair_keys: Vec<(i32, i32)> = Vec::new();
    if keys_from_pg_locks {
        let held = mallory
            .query(
                "SELECT classid::int8, objid::int8, objsubid::int4 FROM pg_locks
                  WHERE locktype = 'advisory' AND granted
                    AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[],
            )
            .unwrap();
        // The running worker holds its own advisory lock: with none read, this variant would
        // silently be the fixed-key one.
        assert!(
            !held.is_empty(),
            "pg_locks showed mallory no advisory lock held in app to squat on"
        );
        for r in held {
            let (hi, lo, sub): (i64, i64, i32) = (r.get(0), r.get(1), r.get(2));
            if sub == 1 {
                bigint_keys.push(((hi as u64) << 32 | lo as u64) as i64);
            } else {
                pair_keys.push((hi as u32 as i32, lo as u32 as i32));
            }
        }
        bigint_keys.sort_unstable();
        bigint_keys.dedup();
    }
    let (acquired_tx, acquired_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        for k in &bigint_keys {
            mallory
                .execute("SELECT pg_advisory_lock($1)", &[k])
                .unwrap();
        }
        for (a, b) in &pair_keys {
            mallory
                .execute("SELECT pg_advisory_lock($1, $2)", &[a, b])
                .unwrap();
        }
        acquired_tx.send(()).unwrap();
        let _ = release_rx.recv();
        drop(mallory);
    });
    // Let mallory queue behind the worker's locks, then end the worker.
    std::thread::sleep(Duration::from_millis(300));
    let terminated: bool = db
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap()
        .get(0);
    assert!(terminated);
    acquired_rx
        .recv_timeout(PATIENCE)
        .expect("mallory got the locks once the worker was gone");
    let new_pid = wait_until(PATIENCE, "a new worker", || match pid_and_state(&mut db) {
        (Some(p), _) if p != pid => Some(p),
        _ => None,
    });
    db.batch_execute("INSERT INTO users (email) VALUES ('still delivered')")
        .unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rx.wait_for(1, PATIENCE);
    }));
    let state = pid_and_state(&mut db);
    let _ = release_tx.send(());
    holder.join().unwrap();
    assert!(
        r.is_ok(),
        "nothing delivered while mallory holds the advisory locks (worker {new_pid}: {state:?})"
    );
    wait_settled(&mut db, PATIENCE);
    assert_eq!(statuses(&mut db), ["delivered"]);
}

#[test]
fn s6b_the_old_advisory_lock_key_cannot_stop_a_restarted_worker() {
    advisory_lock_squat(false);
}

/// The strongest form of §6b: mallory reads the keys the running worker holds from pg_locks
/// (readable by every role) and squats on those.
#[test]
fn s6b_advisory_locks_read_from_pg_locks_cannot_stop_a_restarted_worker() {
    advisory_lock_squat(true);
}

// §14 -----------------------------------------------------------------------------------------

/// The refusal from inside the trigger reaches the client as one line with SQLSTATE 42501, and
/// the server log has it as one ERROR line with no backtrace.
#[test]
fn s14_a_refusal_inside_the_trigger_is_one_message_with_a_sqlstate() {
    // The harness logs at `log`, which Postgres ranks above ERROR: log errors too.
    let pg = Cluster::start(&[("log_min_messages", "error")]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE ROLE user_usage LOGIN;
         GRANT USAGE ON SCHEMA webhook TO user_usage;",
    )
    .unwrap();
    create_endpoint(&mut db, "billing", &rx.url("/"));
    let mut u = pg.client_as("user_usage", "app");
    u.batch_execute(
        "CREATE TEMP TABLE forged (x text);
         CREATE TRIGGER t AFTER INSERT ON forged FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing');",
    )
    .unwrap();
    let e = db_error(
        u.batch_execute("INSERT INTO forged VALUES ('invoice paid')")
            .map(|_| "inserted"),
        "the forged INSERT",
    );
    assert_eq!(e.code(), &SqlState::INSUFFICIENT_PRIVILEGE);
    assert_publish_refused(&e, "billing");
    let texts = [
        e.message().to_string(),
        e.detail().unwrap_or_default().to_string(),
        e.hint().unwrap_or_default().to_string(),
    ];
    for t in &texts {
        let lower = t.to_ascii_lowercase();
        assert!(
            !lower.contains("backtrace") && !lower.contains("stack") && !lower.contains("panicked"),
            "{t:?}"
        );
    }
    assert!(!e.message().contains('\n'), "{:?}", e.message());

    // Misuse of the trigger function: also one line, no backtrace.
    db.batch_execute(
        "CREATE TABLE misuse (x int);
         CREATE TRIGGER t BEFORE INSERT ON misuse FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing');",
    )
    .unwrap();
    let m = db_error(
        db.batch_execute("INSERT INTO misuse VALUES (1)")
            .map(|_| "inserted"),
        "a BEFORE trigger",
    );
    assert!(!m.message().contains('\n'), "{:?}", m.message());
    assert!(
        !format!("{:?} {:?}", m.message(), m.detail())
            .to_ascii_lowercase()
            .contains("backtrace"),
        "{m:?}"
    );

    let log = pg.log();
    let lines: Vec<&str> = log.lines().collect();
    let errors: Vec<usize> = lines
        .iter()
        .enumerate()
        .filter(|(_, l)| l.contains("ERROR:") && l.contains("may not publish to webhook endpoint"))
        .map(|(i, _)| i)
        .collect();
    assert_eq!(errors.len(), 1, "one ERROR line for the refusal:\n{log}");
    let i = errors[0];
    assert!(
        lines[i].trim_end().ends_with(e.message()),
        "the log line is the message: {}",
        lines[i]
    );
    // Its DETAIL/HINT/CONTEXT/STATEMENT lines carry no backtrace either.
    for l in lines[i + 1..].iter().take_while(|l| {
        l.starts_with('\t')
            || ["DETAIL:", "HINT:", "CONTEXT:", "STATEMENT:"]
                .iter()
                .any(|k| l.contains(k))
    }) {
        let lower = l.to_ascii_lowercase();
        assert!(
            !lower.contains("backtrace") && !lower.contains("panicked"),
            "{l}"
        );
    }
    assert!(!log.to_ascii_lowercase().contains("stack backtrace"));
    assert_eq!(rx.count(), 0);
}

// §9 (memory) --------------------------------------------------------------------------------

/// A claim is bounded by bytes as well as rows: with bodies of about 20 MB and a receiver that
/// holds each request, the worker has at most 64 MB of bodies (three requests) under way, however
/// many the endpoint's max_in_flight allows.
#[test]
fn s9_claims_are_bounded_by_bytes() {
    let pg = Cluster::start(&[("webhook.max_payload_bytes", "'32MB'")]);
    let rx = Receiver::start(always(Reply::ok().after(Duration::from_millis(1500))));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE blobs (id int PRIMARY KEY, body text);",
    )
    .unwrap();
    db.execute(
        "SELECT webhook.create_endpoint('big', $1, max_in_flight => 100)",
        &[&rx.url("/")],
    )
    .unwrap();
    db.batch_execute(
        "SELECT webhook.subscribe('blobs', 'big');
         INSERT INTO blobs SELECT g, repeat(md5(g::text), 20 * 1024 * 1024 / 32) FROM generate_series(1, 8) g;",
    )
    .unwrap();
    let got = rx.wait_for(8, Duration::from_secs(90));
    assert_eq!(got.len(), 8);
    for r in &got {
        assert!(r.body.len() > 20 * 1024 * 1024, "{}", r.body.len());
    }
    assert_eq!(
        rx.max_concurrent(),
        3,
        "20 MB bodies: 64 MB allows three at once"
    );
    wait_settled(&mut db, PATIENCE);
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) FROM webhook.deliveries WHERE status = 'delivered'"
        ),
        8
    );
}

// §13 ----------------------------------------------------------------------------------------

/// A `webhook_admin` role that exists before CREATE EXTENSION is never adopted silently: one that
/// can log in (or has other attributes) is refused; a plain NOLOGIN one is used, and its members
/// are named in a WARNING (CREATE EXTENSION hides a script's notices).
#[test]
fn s13_a_pre_existing_webhook_admin_is_not_adopted_silently() {
    let pg = Cluster::start(&[]);
    let mut db = pg.client();
    db.batch_execute("CREATE ROLE webhook_admin LOGIN").unwrap();
    let e = db_error(
        db.batch_execute("CREATE EXTENSION webhook_ext"),
        "CREATE EXTENSION with a LOGIN webhook_admin",
    );
    assert_eq!(e.code(), &SqlState::DUPLICATE_OBJECT);
    assert_eq!(
        e.message(),
        "role \"webhook_admin\" already exists with LOGIN, SUPERUSER, CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS"
    );
    db.batch_execute(
        "ALTER ROLE webhook_admin NOLOGIN; CREATE ROLE eve LOGIN IN ROLE webhook_admin",
    )
    .unwrap();
    let (mut db, notices) = pg.client_with_notices("app");
    db.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
    let notices = notices.lock().unwrap().clone();
    assert!(
        notices
            .iter()
            .any(|n| n == "webhook_ext: using the existing role webhook_admin (members: eve)"),
        "{notices:?}"
    );
}

// §10 ----------------------------------------------------------------------------------------

/// Renaming a subscribed table changes its event types: a NOTICE says so (endpoints filtering
/// by name stop receiving them); renaming a published column is refused.
#[test]
fn s10_renames_that_change_what_is_published_are_never_silent() {
    let pg = Cluster::start(&[]);
    let (mut db, notices) = pg.client_with_notices("app");
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE users (id int PRIMARY KEY, email text);
         SELECT webhook.create_endpoint('crm', 'https://crm.example.com/', event_types => '{public.users.*}');
         SELECT webhook.subscribe('users', 'crm', columns => '{id,email}');",
    )
    .unwrap();
    notices.lock().unwrap().clear();
    let e = db_error(
        db.batch_execute("ALTER TABLE users RENAME COLUMN email TO mail"),
        "renaming a published column",
    );
    assert_eq!(e.code(), &SqlState::DEPENDENT_OBJECTS_STILL_EXIST);
    db.batch_execute("ALTER TABLE users RENAME TO customers")
        .unwrap();
    assert_eq!(
        notices.lock().unwrap().clone(),
        vec!["the events of this table will be published under its new name; endpoints \"crm\" receive them only if their event_types allow the new name".to_string()]
    );
    db.batch_execute("INSERT INTO customers VALUES (1, 'a@example.com')")
        .unwrap();
    // The filter no longer matches: no delivery, as the NOTICE said.
    assert_eq!(count(&mut db, "SELECT count(*) FROM webhook.deliveries"), 0);
}

// Findings of the attacker review of 0.3.0 ---------------------------------------------------

/// The database owner may drop its database, but not while Postgres would refuse the command:
/// connected to it, inside a transaction block, or with another session connected. None of
/// those evicts the worker.
#[test]
fn r1_a_database_owners_drop_that_postgres_refuses_does_not_evict_the_worker() {
    let (pg, rx, mut db) = mallory_cluster();
    db.batch_execute("ALTER DATABASE app OWNER TO mallory")
        .unwrap();
    let pid = worker_ready(&mut db);
    let mut in_app = pg.client_as("mallory", "app");
    let mut elsewhere = pg.client_as("mallory", "postgres");
    let refused = [
        (
            true,
            "DROP DATABASE app",
            "cannot drop the currently open database",
        ),
        (
            false,
            "BEGIN; DROP DATABASE app",
            "DROP DATABASE cannot run inside a transaction block",
        ),
        (
            // `db` (a superuser session) stays connected to app.
            false,
            "DROP DATABASE app",
            "database \"app\" is being accessed by other users",
        ),
    ];
    for (from_app, sql, message) in refused {
        let client = if from_app {
            &mut in_app
        } else {
            &mut elsewhere
        };
        let e = db_error(client.batch_execute(sql).map(|_| "ran"), sql);
        assert_eq!(e.message(), message);
        client.batch_execute("ROLLBACK").unwrap();
        assert_eq!(
            pid_and_state(&mut db),
            (Some(pid), "idle".to_string()),
            "{sql} evicted the worker"
        );
    }
    db.batch_execute("INSERT INTO users (email) VALUES ('after the refused drops')")
        .unwrap();
    rx.wait_for(1, Duration::from_secs(2));
}

/// The database owner sets database-level settings that would make the worker run as the owner,
/// write nothing, or time out; the worker, restarted, overrides them and delivers.
#[test]
fn r2_database_settings_cannot_change_who_the_worker_is_or_stall_it() {
    let (pg, rx, mut db) = mallory_cluster();
    db.batch_execute(
        "ALTER DATABASE app OWNER TO mallory;
         GRANT USAGE, CREATE ON SCHEMA public TO mallory;",
    )
    .unwrap();
    let pid = worker_ready(&mut db);
    let mut mallory = pg.client_as("mallory", "app");
    mallory
        .batch_execute(
            "ALTER DATABASE app SET role = 'mallory';
             ALTER DATABASE app SET default_transaction_read_only = on;
             ALTER DATABASE app SET statement_timeout = '1ms';
             ALTER DATABASE app SET lock_timeout = '1ms';
             ALTER DATABASE app SET enable_indexscan = off;",
        )
        .unwrap();
    // The settings apply to every new session in app: check from another database.
    let mut admin = pg.client_to("postgres");
    admin
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .unwrap();
    let mut db = pg.client();
    db.batch_execute(
        "SET ROLE NONE; SET default_transaction_read_only = off; SET statement_timeout = 0;
         SET lock_timeout = 0; SET enable_indexscan = on;",
    )
    .unwrap();
    let new_pid = wait_until(PATIENCE, "a new worker", || match pid_and_state(&mut db) {
        (Some(p), state) if p != pid && state == "idle" => Some(p),
        _ => None,
    });
    let role: String = db
        .query_one(
            "SELECT usename::text FROM pg_stat_activity WHERE pid = $1",
            &[&new_pid],
        )
        .unwrap()
        .get(0);
    assert_eq!(role, "postgres");
    db.batch_execute("INSERT INTO users (email) VALUES ('despite the settings')")
        .unwrap();
    rx.wait_for(1, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(statuses(&mut db), ["delivered"]);
    assert!(!pg.log().contains("permission denied for schema webhook"));
}

/// Bodies much larger as JSON text than as stored (control characters) are budgeted at their
/// worst case: the worker never holds more than 64 MB of them.
#[test]
fn r4_claims_budget_bodies_at_their_json_size() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok().after(Duration::from_millis(1500))));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE notes (id int PRIMARY KEY, note text);",
    )
    .unwrap();
    db.execute(
        "SELECT webhook.create_endpoint('n', $1, max_in_flight => 1000)",
        &[&rx.url("/")],
    )
    .unwrap();
    db.batch_execute(
        "SELECT webhook.subscribe('notes', 'n');
         INSERT INTO notes SELECT g, repeat(chr(1), 170000) FROM generate_series(1, 100) g;",
    )
    .unwrap();
    let got = rx.wait_for(100, Duration::from_secs(120));
    let body = got[0].body.len();
    assert!(body > 1_000_000, "{body}");
    let most = rx.max_concurrent();
    assert!(
        most * body <= 64 * 1024 * 1024 && most >= 32,
        "{most} bodies of {body} bytes under way at once"
    );
}

/// A role with USAGE on webhook cannot block drop_endpoint with a (refused) trigger on its
/// temporary table, nor an upgrade with a column of one of webhook's row types; allow_publish
/// and subscribe name the table they resolved, and refuse temporary tables.
#[test]
fn r6_a_usage_role_blocks_neither_drop_endpoint_nor_upgrades() {
    let pg = Cluster::start(&[]);
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE ROLE monitor LOGIN;
         GRANT USAGE ON SCHEMA webhook TO monitor;
         CREATE TABLE orders (id int);
         SELECT webhook.create_endpoint('billing', 'https://billing.example.com/');",
    )
    .unwrap();
    let mut monitor = pg.client_as("monitor", "app");
    monitor
        .batch_execute(
            "CREATE TEMP TABLE f (x int);
             CREATE TRIGGER t AFTER INSERT ON f FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing');",
        )
        .unwrap();
    let e = db_error(
        monitor.batch_execute("CREATE TEMP TABLE hold (m webhook._meta)"),
        "a column of webhook's row type",
    );
    assert_eq!(e.message(), "permission denied for type webhook._meta");
    let (mut admin, notices) = pg.client_with_notices("app");
    admin
        .batch_execute("SELECT webhook.allow_publish('orders', 'billing')")
        .unwrap();
    assert_eq!(
        notices.lock().unwrap().clone(),
        vec!["hand-written triggers on table public.orders (owner postgres) may publish to endpoint \"billing\"".to_string()]
    );
    admin
        .batch_execute("CREATE TEMP TABLE mine (x int)")
        .unwrap();
    let e = db_error(
        admin.batch_execute("SELECT webhook.subscribe('mine', 'billing')"),
        "subscribing a temporary table",
    );
    assert_eq!(e.message(), "mine is a temporary table");
    admin
        .batch_execute("SELECT webhook.disallow_publish('orders', 'billing'); SELECT webhook.drop_endpoint('billing')")
        .unwrap();
    assert_eq!(count(&mut db, "SELECT count(*) FROM webhook.endpoints"), 0);
}

/// webhook_ext refuses to be installed in a database that is not UTF-8 (its bodies are JSON).
#[test]
fn r9_a_database_that_is_not_utf8_is_refused() {
    let pg = Cluster::start(&[]);
    let mut db = pg.client();
    db.batch_execute("CREATE DATABASE latin ENCODING 'SQL_ASCII' TEMPLATE template0")
        .unwrap();
    let mut latin = pg.client_to("latin");
    let e = db_error(
        latin.batch_execute("CREATE EXTENSION webhook_ext"),
        "CREATE EXTENSION in a SQL_ASCII database",
    );
    assert_eq!(e.code(), &SqlState::FEATURE_NOT_SUPPORTED);
    assert_eq!(
        e.message(),
        "webhook_ext needs a UTF8 database; \"latin\" is SQL_ASCII"
    );
}

// §12 ----------------------------------------------------------------------------------------

/// Forty receivers whose nameserver never answers do not hold up a receiver whose name
/// resolves: lookups are asynchronous and hold no thread. Run through the worker, with
/// `webhook.dns_servers` pointing at a nameserver on loopback.
#[test]
fn s12_receivers_whose_dns_never_answers_do_not_hold_up_others() {
    let ns = crate::harness::dns::nameserver(&[("good.test", [127, 0, 0, 1])]);
    let pg = Cluster::start(&[("webhook.dns_servers", &format!("'{ns}'"))]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    for i in 0..40 {
        db.execute(
            "SELECT webhook.create_endpoint($1, $2)",
            &[
                &format!("hang{i}"),
                &format!("http://hang{i}.test:{}/", rx.port()),
            ],
        )
        .unwrap();
        db.execute(
            "SELECT webhook.send('ping', '{}', $1)",
            &[&format!("hang{i}")],
        )
        .unwrap();
    }
    db.execute(
        "SELECT webhook.create_endpoint('good', $1)",
        &[&format!("http://good.test:{}/", rx.port())],
    )
    .unwrap();
    wait_until(PATIENCE, "the hanging lookups to be under way", || {
        (count(
            &mut db,
            "SELECT count(*) FROM webhook.deliveries WHERE status = 'sending'",
        ) == 40)
            .then_some(())
    });
    let t = Instant::now();
    db.execute(
        "SELECT webhook.send('ping', '{\"good\": true}', 'good')",
        &[],
    )
    .unwrap();
    let got = rx.wait_for(1, Duration::from_secs(2));
    assert_eq!(got[0].json()["data"]["good"], true);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // The hanging ones are still waiting for their nameserver, not failed by a stall elsewhere.
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) FROM webhook.deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id
              WHERE d.status = 'sending' AND e.name LIKE 'hang%'"
        ),
        40
    );
}

// Attacker review of the 0.3.0 change (e7f5dbe..): the trigger's kept plans, the utility hook,
// the worker's statements, and the 0.3.0 library running against an older schema -----------

/// The extension's library is replaced before `ALTER EXTENSION webhook_ext UPDATE` runs (the
/// README's upgrade steps; the trigger deliberately keeps working on the old schema, see
/// `Roles::legacy` in src/sql_api/trigger.rs). Until the update, `webhook.enqueue()` is still
/// the 0.2.0 function: SECURITY DEFINER. The 0.3.0 trigger builds the row images with
/// `to_jsonb` "as the current user", which inside a SECURITY DEFINER function is the extension
/// owner: the table owner's cast to json runs as the superuser, as in 0.2.0 (§1), in every
/// database not yet updated.
#[test]
fn x1_before_alter_extension_update_a_planted_cast_runs_as_the_inserting_role() {
    assert!(
        extension_dir().join("webhook_ext--0.2.0.sql").exists(),
        "the 0.2.0 install script is not installed"
    );
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext VERSION '0.2.0';
         CREATE ROLE app LOGIN;
         CREATE SCHEMA app AUTHORIZATION app;",
    )
    .unwrap();
    create_endpoint(&mut db, "crm", &rx.url("/"));
    let mut app = pg.client_as("app", "app");
    app.batch_execute(
        r#"CREATE TABLE app.cast_log (who text NOT NULL);
           CREATE TYPE app.flag AS ENUM ('red', 'green');
           CREATE FUNCTION app.flag_json(f app.flag) RETURNS json LANGUAGE plpgsql AS $$
           BEGIN
               INSERT INTO app.cast_log VALUES (current_user);
               RAISE WARNING 'planted cast ran as %', current_user;
               BEGIN
                   EXECUTE 'ALTER ROLE app SUPERUSER';
               EXCEPTION WHEN insufficient_privilege THEN NULL;
               END;
               RETURN pg_catalog.json_build_object('flag', f::text);
           END $$;
           CREATE CAST (app.flag AS json) WITH FUNCTION app.flag_json(app.flag);
           CREATE TABLE app.t (id int PRIMARY KEY, f app.flag);"#,
    )
    .unwrap();
    // An administrator subscribes the application's table, as before any upgrade.
    db.execute("SELECT webhook.subscribe('app.t', 'crm')", &[])
        .unwrap();

    app.batch_execute("INSERT INTO app.t VALUES (1, 'red')")
        .unwrap();

    let who: Vec<String> = db
        .query("SELECT DISTINCT who FROM app.cast_log ORDER BY who", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        superusers(&mut db),
        ["postgres"],
        "the 0.3.0 trigger on the 0.2.0 schema ran app's cast as {who:?}: app is superuser"
    );
    assert_eq!(
        who,
        ["app"],
        "the row image is built with the rights of the inserting session"
    );
    // A superuser's session may be running app's SECURITY DEFINER code: such rows wait for the
    // update rather than run app's cast with a superuser's rights.
    let refused = db_error(
        db.batch_execute("INSERT INTO app.t VALUES (2, 'green')"),
        "a superuser's write of user-defined types before the update",
    )
    .message()
    .to_string();
    assert!(
        refused.contains("after ALTER EXTENSION webhook_ext UPDATE"),
        "{refused}"
    );
    // After the update the trigger is SECURITY INVOKER and app's rows are app's again.
    db.batch_execute("ALTER EXTENSION webhook_ext UPDATE")
        .unwrap();
    app.batch_execute("INSERT INTO app.t VALUES (2, 'green')")
        .unwrap();
    assert_eq!(superusers(&mut db), ["postgres"]);
}

/// Same window: a role with USAGE on webhook (the README's monitoring role) forges a webhook
/// from a temporary table, and a table owner with USAGE writes a trigger on its own table. On
/// the old schema the 0.3.0 trigger refuses temporary tables (no release lets them publish) and
/// the update cancels what one queued before; the owner's trigger publishes as in 0.2.0, and
/// the update keeps it as an allowance and names it in a WARNING (the documented policy).
#[test]
fn x2_before_alter_extension_update_no_role_forges_a_delivery_that_is_sent_after_it() {
    assert!(
        extension_dir().join("webhook_ext--0.2.0.sql").exists(),
        "the 0.2.0 install script is not installed"
    );
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext VERSION '0.2.0';
         CREATE ROLE monitor LOGIN;
         GRANT USAGE ON SCHEMA webhook TO monitor;
         CREATE ROLE owner LOGIN;
         GRANT USAGE ON SCHEMA webhook TO owner;
         GRANT CREATE ON SCHEMA public TO owner;
         CREATE TABLE public.users (id int PRIMARY KEY);",
    )
    .unwrap();
    create_endpoint(&mut db, "billing", &rx.url("/"));
    db.batch_execute("SELECT webhook.subscribe('public.users', 'billing')")
        .unwrap();

    let mut failures: Vec<String> = Vec::new();
    let mut monitor = pg.client_as("monitor", "app");
    let forged_temp = monitor.batch_execute(
        "CREATE TEMP TABLE forged (x text);
         CREATE TRIGGER t AFTER INSERT ON forged FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing');
         INSERT INTO forged VALUES ('invoice paid');",
    );
    if forged_temp.is_ok() {
        failures.push(
            "monitor's INSERT into a temporary table with webhook.enqueue('billing') was accepted"
                .into(),
        );
    }
    let mut owner = pg.client_as("owner", "app");
    let forged_owned = owner.batch_execute(
        "CREATE TABLE public.owned (id int PRIMARY KEY, note text);
         CREATE TRIGGER t AFTER INSERT ON public.owned FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing');
         INSERT INTO public.owned VALUES (1, 'invoice paid');",
    );
    // A hand-written trigger on a permanent table publishes as it did in 0.2.0 until the update,
    // which keeps it (README: every trigger that publishes before the upgrade goes on
    // publishing) and names it in a WARNING with the command that stops it.
    forged_owned.expect("0.2.0's rule until the update: a hand-written trigger publishes");

    let (mut admin, notices) = pg.client_with_notices("app");
    admin
        .batch_execute("ALTER EXTENSION webhook_ext UPDATE")
        .unwrap();
    let warned = notices.lock().unwrap().clone();
    if !warned.iter().any(|n| {
        n.contains("trigger t on table public.owned (owner owner) may go on publishing to endpoint \"billing\"")
    }) {
        failures.push(format!(
            "the update did not name the hand-written trigger it kept: {warned:?}"
        ));
    }
    // A legitimate change after the update: once it arrives the worker has had its chance at
    // everything queued before it.
    db.batch_execute("INSERT INTO public.users VALUES (1)")
        .unwrap();
    wait_until(PATIENCE, "the legitimate delivery", || {
        rx.requests()
            .iter()
            .any(|r| r.json()["data"]["table"] == "users")
            .then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    for r in rx.requests() {
        let table = r.json()["data"]["table"].clone();
        if table != "users" && table != "owned" {
            failures.push(format!(
                "billing received a forged, signed webhook from table {table} (type {})",
                r.json()["type"]
            ));
        }
    }
    let allowed: Vec<String> = db
        .query(
            "SELECT relid::text FROM webhook._publishers ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    if allowed != ["owned", "users"] {
        failures.push(format!(
            "after the update these tables may publish to billing: {allowed:?}"
        ));
    }
    assert_eq!(failures, Vec::<String>::new());
}

/// The utility hook runs SQL of its own inside DROP DATABASE (and ALTER DATABASE … RENAME,
/// CREATE DATABASE … TEMPLATE), as the role running the command and with its search_path —
/// which the database owner sets for every session (the §2 attack). `count(*)` in
/// src/pg/utility.rs `allowed()` is not schema-qualified: the owner's `public.count(*)`
/// aggregate runs as the superuser who drops some other database while connected to `app`,
/// whether or not `app` has the extension (shared_preload_libraries puts the hook everywhere).
#[test]
fn x3_an_aggregate_planted_in_public_never_runs_inside_a_superusers_drop_database() {
    // The planted code's WARNINGs reach the log (the harness logs above ERROR otherwise).
    let pg = Cluster::start(&[("log_min_messages", "warning")]);
    pg.create_database("scratch");
    {
        let mut db = pg.client();
        // No CREATE EXTENSION: the hook is loaded into every database of the cluster.
        db.batch_execute(
            "CREATE ROLE dbowner LOGIN;
             ALTER DATABASE app OWNER TO dbowner;",
        )
        .unwrap();
        let mut attacker = pg.client_as("dbowner", "app");
        attacker
            .batch_execute(
                r#"CREATE TABLE public.pwned (who text NOT NULL, what text NOT NULL);
                   GRANT SELECT, INSERT ON public.pwned TO PUBLIC;
                   CREATE FUNCTION public.pwn_final(n bigint) RETURNS bigint LANGUAGE plpgsql
                       SET search_path = pg_catalog AS $f$
                   BEGIN
                       RAISE WARNING 'PLANTED count(*) called by %', current_user;
                       BEGIN
                           INSERT INTO public.pwned VALUES (current_user, 'count(*)');
                       EXCEPTION WHEN OTHERS THEN NULL;
                       END;
                       BEGIN
                           EXECUTE 'ALTER ROLE dbowner SUPERUSER';
                       EXCEPTION WHEN insufficient_privilege THEN NULL;
                       END;
                       RETURN n;
                   END $f$;
                   CREATE AGGREGATE public.count(*) (SFUNC = pg_catalog.int8inc, STYPE = bigint,
                                                     INITCOND = '0', FINALFUNC = public.pwn_final);
                   ALTER DATABASE app SET search_path = public, pg_catalog;"#,
            )
            .unwrap();
    }
    // A superuser's new session in app (it has the owner's search_path) drops another database:
    // a command that, without the extension, calls no function at all.
    let mut dba = pg.client();
    let path: String = dba.query_one("SHOW search_path", &[]).unwrap().get(0);
    assert_eq!(path, "public, pg_catalog");
    dba.batch_execute("DROP DATABASE scratch").unwrap();

    let mut su = checker(&pg);
    let pwned: Vec<String> = su
        .query("SELECT who || ': ' || what FROM public.pwned", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        superusers(&mut su),
        ["postgres"],
        "DROP DATABASE ran the planted count(*) ({pwned:?}): dbowner is superuser"
    );
    assert_eq!(pwned, Vec::<String>::new(), "planted objects were called");
    assert!(
        !pg.log().contains("PLANTED"),
        "a planted object ran (server log)"
    );
}

/// Nothing planted was called (the calls table `pwned`, schema-qualified, and the server log say
/// so), and `attacker` is not superuser.
fn assert_nothing_planted_ran(
    pg: &Cluster,
    su: &mut postgres::Client,
    pwned: &str,
    attacker: &str,
) {
    let calls: Vec<String> = su
        .query(
            &format!(
                "SELECT who || ': ' || what || ' (' || count(*) || 'x)' FROM {pwned}
                  GROUP BY who, what ORDER BY who, what"
            ),
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(calls, Vec::<String>::new(), "planted objects were called");
    assert!(
        !pg.log().contains("PLANTED"),
        "a planted object ran (server log)"
    );
    assert_eq!(superusers(su), ["postgres"], "{attacker} became superuser");
}
