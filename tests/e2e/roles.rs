//! End-to-end, against the 0.3.0 security model (README "Security"): what every kind of role may
//! and may not do with schema webhook (the role matrix), and the review's operational cases: logical
//! replication, dump and restore with `webhook.paused`, payload limits measured on the request
//! body as sent, and a delivery in flight when its endpoint is disabled or dropped.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;

/// What a statement did: succeeded, or failed with a SQLSTATE and a message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Ok,
    Err { code: String, message: String },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Ok => write!(f, "success"),
            Outcome::Err { code, message } => write!(f, "{code} {message:?}"),
        }
    }
}

fn outcome(db: &mut postgres::Client, sql: &str) -> Outcome {
    match db.batch_execute(sql) {
        Ok(()) => Outcome::Ok,
        Err(e) => match e.as_db_error() {
            Some(d) => Outcome::Err {
                code: d.code().code().to_string(),
                message: d.message().to_string(),
            },
            None => Outcome::Err {
                code: "(no SQLSTATE)".into(),
                message: e.to_string(),
            },
        },
    }
}

/// `insufficient_privilege` with exactly this message.
fn denied(message: impl Into<String>) -> Outcome {
    Outcome::Err {
        code: "42501".into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------------------------
// §7 Logical replication
// ---------------------------------------------------------------------------------------------

/// A publisher with the extension replicates every table (webhook's included, as `FOR ALL
/// TABLES` does) to a subscriber that serves the same database name with the extension
/// installed. Each webhook goes out once, from the publisher; the subscriber's worker says why it
/// stays out of it, and replication keeps running.
#[test]
fn logical_replication_sends_each_webhook_once() {
    let publisher = Cluster::start(&[("wal_level", "logical")]);
    let subscriber = Cluster::start(&[]);
    // Slow enough, one at a time, that the subscriber holds replicated pending deliveries for
    // a few seconds.
    let rx = Receiver::start(always(Reply::ok().after(Duration::from_millis(300))));
    let mut db = publisher.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE users (id int PRIMARY KEY, email text);",
    )
    .unwrap();
    db.execute(
        "SELECT webhook.create_endpoint('crm', $1, max_in_flight => 1)",
        &[&rx.url("/")],
    )
    .unwrap();
    db.batch_execute(
        "SELECT webhook.subscribe('users', 'crm');
         CREATE PUBLICATION p FOR ALL TABLES;",
    )
    .unwrap();

    let mut sub = subscriber.client();
    sub.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE users (id int PRIMARY KEY, email text);",
    )
    .unwrap();
    sub.batch_execute(&format!(
        "CREATE SUBSCRIPTION s CONNECTION 'host=127.0.0.1 port={} dbname=app user=postgres' PUBLICATION p",
        publisher.port
    ))
    .unwrap();
    wait_synchronised(&mut sub, "users");

    db.batch_execute(
        "INSERT INTO users SELECT g, 'u' || g || '@example.com' FROM generate_series(1, 10) g",
    )
    .unwrap();
    // Anything wakes the subscriber's worker now and then (housekeeping, a reload, local work);
    // a reload every 100 ms makes sure it looks at the queue while the replicated deliveries
    // are still pending there.
    let started = Instant::now();
    loop {
        sub.batch_execute("SELECT pg_reload_conf()").unwrap();
        std::thread::sleep(Duration::from_millis(100));
        if started.elapsed() > Duration::from_secs(3) && unfinished(&mut db) == 0 {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the publisher did not deliver within {PATIENCE:?}"
        );
    }
    // Well after the publisher's deliveries are done: nothing else arrives.
    std::thread::sleep(Duration::from_secs(3));
    let reqs = rx.requests();
    let ids: BTreeSet<String> = reqs.iter().map(|r| r.webhook_id()).collect();
    assert_eq!(
        (reqs.len(), ids.len()),
        (10, 10),
        "10 inserts: 10 requests with 10 distinct webhook-ids, got {} requests with ids {ids:?}",
        reqs.len()
    );

    let state = wait_until(
        PATIENCE,
        "the subscriber's worker to report logical replication",
        || worker_state(&mut sub, "app").filter(|s| s.contains("logical replication")),
    );
    eprintln!("subscriber worker state: {state}");

    // Replication still runs, and the new row is published once.
    db.batch_execute("INSERT INTO users VALUES (100, 'late@example.com')")
        .unwrap();
    wait_until(PATIENCE, "the new row on the subscriber", || {
        let n = count(&mut sub, "SELECT count(*) FROM users WHERE id = 100");
        (n == 1).then_some(())
    });
    rx.wait_for(11, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    std::thread::sleep(Duration::from_secs(2));
    let ids: BTreeSet<String> = rx.requests().iter().map(|r| r.webhook_id()).collect();
    assert_eq!((rx.count(), ids.len()), (11, 11));
}

// ---------------------------------------------------------------------------------------------
// §8 Dump and restore, webhook.paused
// ---------------------------------------------------------------------------------------------

/// A paused source with pending work is dumped (`pg_dump -Fc`) and restored (`pg_restore`) into
/// a paused cluster: neither sends anything while paused; once unpaused, the copy sends the
/// pending work with exactly the webhook-ids (and bodies) the source sends it with.
#[test]
fn a_restored_copy_sends_pending_work_under_the_sources_webhook_ids() {
    let rx = Receiver::start(always(Reply::ok()));
    let src_pg = Cluster::start(&[("webhook.paused", "on")]);
    let mut src = src_pg.client();
    src.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE users (id int PRIMARY KEY, email text);",
    )
    .unwrap();
    let secret = create_endpoint(&mut src, "crm", &rx.url("/"));
    src.batch_execute(
        "SELECT webhook.subscribe('users', 'crm');
         INSERT INTO users SELECT g, 'u' || g || '@example.com' FROM generate_series(1, 5) g;
         SELECT webhook.send('invoice.paid', jsonb_build_object('n', g), 'crm') FROM generate_series(1, 3) g;",
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        rx.count(),
        0,
        "the source runs with webhook.paused = on: nothing may be sent"
    );
    assert_eq!(statuses(&mut src), vec!["pending"; 8]);
    wait_until(PATIENCE, "the source's worker to say paused", || {
        (worker_state(&mut src, "app").as_deref() == Some("paused")).then_some(())
    });

    let dump = src_pg.dir.join("app.dump");
    let dump = dump.to_str().unwrap();
    let src_port = src_pg.port.to_string();
    client_program(
        "pg_dump",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &src_port,
            "-U",
            "postgres",
            "-Fc",
            "-f",
            dump,
            "app",
        ],
    );

    let dst_pg = Cluster::init(&[
        ("webhook.database".into(), "'app2'".into()),
        ("webhook.allow_private_networks".into(), "on".into()),
        (
            "webhook.retry_schedule".into(),
            "'200ms,400ms,800ms'".into(),
        ),
        ("webhook.paused".into(), "on".into()),
    ]);
    let dst_port = dst_pg.port.to_string();
    let conn = ["-h", "127.0.0.1", "-p", &dst_port, "-U", "postgres"];
    client_program("createdb", &[&conn[..], &["app2"][..]].concat());
    client_program(
        "pg_restore",
        &[&conn[..], &["-d", "app2", dump][..]].concat(),
    );
    let mut dst = dst_pg.client_to("app2");
    assert_eq!(statuses(&mut dst), vec!["pending"; 8], "the restored queue");
    wait_until(PATIENCE, "the restored copy's worker to say paused", || {
        (worker_state(&mut dst, "app2").as_deref() == Some("paused")).then_some(())
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        rx.count(),
        0,
        "a paused cluster sends nothing after a restore"
    );

    // The copy first, then the source: each sends the 8 deliveries once.
    dst_pg.set("webhook.paused", "off");
    dst_pg.reload();
    rx.wait_for(8, PATIENCE);
    wait_settled(&mut dst, PATIENCE);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.count(), 8);
    src_pg.set("webhook.paused", "off");
    src_pg.reload();
    rx.wait_for(16, PATIENCE);
    wait_settled(&mut src, PATIENCE);
    std::thread::sleep(Duration::from_millis(500));
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 16);
    for r in &reqs {
        verify_with_standardwebhooks(&secret, r).unwrap();
    }
    let by_id = |reqs: &[Request]| -> BTreeMap<String, Vec<u8>> {
        reqs.iter()
            .map(|r| (r.webhook_id(), r.body.clone()))
            .collect()
    };
    let (copy, source) = (by_id(&reqs[..8]), by_id(&reqs[8..]));
    assert_eq!(copy.len(), 8, "8 distinct webhook-ids from the copy");
    assert_eq!(
        copy.keys().collect::<Vec<_>>(),
        source.keys().collect::<Vec<_>>(),
        "the restored copy uses the source's webhook-ids"
    );
    assert_eq!(copy, source, "the same bodies under the same ids");
}

// ---------------------------------------------------------------------------------------------
// §9 Payload limits
// ---------------------------------------------------------------------------------------------

fn digits(n: i64) -> usize {
    n.to_string().len()
}

/// `webhook.max_payload_bytes` bounds the request body as sent: rows are let through or failed
/// by the size of the JSON text, and a row too large for jsonb commits with a failed delivery.
#[test]
fn payload_limits_measure_the_request_body_as_sent() {
    let pg = Cluster::start(&[("webhook.max_payload_bytes", "'1kB'")]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE docs (id int PRIMARY KEY, body text, nums int[]);",
    )
    .unwrap();
    create_endpoint(&mut db, "docs", &rx.url("/"));
    db.batch_execute("SELECT webhook.subscribe('docs', 'docs')")
        .unwrap();
    // 1: plain text, a body well under the limit.
    db.batch_execute("INSERT INTO docs VALUES (1, repeat('a', 600), NULL)")
        .unwrap();
    // 2: 200 zeros: about 800 bytes of body from over 2 kB of jsonb.
    db.batch_execute("INSERT INTO docs VALUES (2, NULL, array_fill(0, ARRAY[200]))")
        .unwrap();
    // 3: 300 control characters: about 350 bytes of jsonb, over 1800 bytes of body.
    db.batch_execute("INSERT INTO docs VALUES (3, repeat(chr(1), 300), NULL)")
        .unwrap();
    wait_settled(&mut db, PATIENCE);
    std::thread::sleep(Duration::from_millis(500));

    let jsonb_size = |db: &mut postgres::Client, id: i32| -> i32 {
        db.query_one(
            "SELECT pg_column_size(to_jsonb(d)) FROM docs d WHERE id = $1",
            &[&id],
        )
        .unwrap()
        .get(0)
    };
    let text_len = |db: &mut postgres::Client, id: i32| -> usize {
        let n: i32 = db
            .query_one(
                "SELECT octet_length(to_jsonb(d)::text) FROM docs d WHERE id = $1",
                &[&id],
            )
            .unwrap()
            .get(0);
        n as usize
    };
    // The cases test what they say.
    assert!(jsonb_size(&mut db, 2) > 1024 && jsonb_size(&mut db, 3) < 1024);

    // (delivery status, last_error, txid, size of the event's payload), by row id: one
    // insert per statement, so the n-th delivery is row n's.
    let rows = |db: &mut postgres::Client| -> BTreeMap<i32, (String, Option<String>, i64, i32)> {
        db.query(
            "SELECT (row_number() OVER (ORDER BY d.id))::int, d.status::text, d.last_error, e.txid,
                    pg_column_size(e.payload)
               FROM webhook.deliveries d JOIN webhook.events e ON e.id = d.event_id ORDER BY d.id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), (r.get(1), r.get(2), r.get(3), r.get(4))))
        .collect()
    };
    let got = rows(&mut db);
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3]);
    let bodies: BTreeMap<i64, usize> = rx
        .requests()
        .iter()
        .map(|r| {
            (
                r.json()["data"]["new"]["id"].as_i64().unwrap(),
                r.body.len(),
            )
        })
        .collect();

    // Row 1 is delivered; its body calibrates the envelope: body = overhead + row text + txid.
    assert_eq!(got[&1].0, "delivered");
    let body1 = bodies[&1];
    assert!(body1 <= 1024, "row 1's body is {body1} bytes");
    let overhead = body1 - text_len(&mut db, 1) - digits(got[&1].2);
    let expected_len =
        |db: &mut postgres::Client, id: i32, txid: i64| overhead + text_len(db, id) + digits(txid);

    // Row 3: 300 bytes of jsonb, but its body would be over 1800 bytes.
    let n3 = expected_len(&mut db, 3, got[&3].2);
    assert!(n3 > 1800, "{n3}");
    assert_eq!(
        (got[&3].0.as_str(), got[&3].1.as_deref()),
        (
            "failed",
            Some(
                format!("payload is {n3} bytes, more than webhook.max_payload_bytes (1024)")
                    .as_str()
            )
        ),
        "row 3 (300 control characters)"
    );
    assert!(
        got[&3].3 < 1024,
        "the failed event keeps no row image: its payload is {} bytes",
        got[&3].3
    );

    // Row 2: over 2 kB of jsonb, a body under 1 kB: delivered.
    assert_eq!(got[&2].0, "delivered", "row 2 (200 zeros): {:?}", got[&2]);
    assert_eq!(bodies.get(&2), Some(&expected_len(&mut db, 2, got[&2].2)));
    assert!(bodies[&2] <= 1024);
    assert_eq!(rx.count(), 2);

    // Row 4: ~300 MB, over jsonb's 256 MB: the statement commits, the delivery fails.
    db.batch_execute("INSERT INTO docs VALUES (4, repeat('x', 300000000), NULL)")
        .unwrap_or_else(|e| panic!("a 300 MB row must commit: {e}"));
    db.batch_execute("INSERT INTO docs VALUES (5, 'after', NULL)")
        .unwrap();
    rx.wait_for(3, Duration::from_secs(120));
    wait_settled(&mut db, Duration::from_secs(120));
    std::thread::sleep(Duration::from_millis(500));
    let stored: i32 = db
        .query_one("SELECT octet_length(body) FROM docs WHERE id = 4", &[])
        .unwrap()
        .get(0);
    assert_eq!(stored, 300_000_000);
    let got = rows(&mut db);
    assert_eq!(got.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    let (status, error, _, size) = got[&4].clone();
    assert_eq!(status, "failed");
    let error = error.unwrap_or_default();
    // Too large to encode at all: measured before encoding (the row's 300 MB of text).
    let n4: u64 = error
        .strip_prefix("row is ")
        .and_then(|s| {
            s.strip_suffix(
                " bytes before JSON encoding, too large to publish: more than webhook.max_payload_bytes (1024)",
            )
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("row 4's last_error: {error:?}"));
    assert!(
        (300_000_000..300_001_000).contains(&n4),
        "row 4's body would be {n4} bytes"
    );
    assert!(
        size < 1024,
        "the 300 MB event keeps no row image ({size} bytes)"
    );
    assert_eq!(got[&5].0, "delivered");
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[2].json()["data"]["new"]["id"], 5);
}

// ---------------------------------------------------------------------------------------------
// §11 A delivery in flight when its endpoint is disabled or dropped
// ---------------------------------------------------------------------------------------------

#[test]
fn a_delivery_in_flight_ends_cancelled_when_its_endpoint_is_disabled_or_dropped() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::status(500).after(Duration::from_secs(1))));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE users (id int PRIMARY KEY);
         CREATE TABLE orders (id int PRIMARY KEY);",
    )
    .unwrap();
    create_endpoint(&mut db, "crm", &rx.url("/crm"));
    create_endpoint(&mut db, "shop", &rx.url("/shop"));
    db.batch_execute(
        "SELECT webhook.subscribe('users', 'crm');
         SELECT webhook.subscribe('orders', 'shop');",
    )
    .unwrap();
    let cases = [
        ("users", "/crm", "SELECT webhook.disable_endpoint('crm')"),
        (
            "orders",
            "/shop",
            "SELECT webhook.drop_endpoint('shop', cascade => true)",
        ),
    ];
    for (table, path, stop) in cases {
        db.batch_execute(&format!("INSERT INTO {table} VALUES (1)"))
            .unwrap();
        let id: i64 = db
            .query_one("SELECT max(id) FROM webhook.deliveries", &[])
            .unwrap()
            .get(0);
        let status = |db: &mut postgres::Client| -> String {
            db.query_one(
                "SELECT status::text FROM webhook.deliveries WHERE id = $1",
                &[&id],
            )
            .unwrap()
            .get(0)
        };
        let at_receiver = || rx.requests().iter().filter(|r| r.path == path).count();
        wait_until(PATIENCE, "the delivery to be in flight", || {
            (status(&mut db) == "sending" && at_receiver() == 1).then_some(())
        });
        // The receiver holds the request for a second: the endpoint goes away meanwhile.
        db.batch_execute(stop).unwrap();
        let after = wait_until(PATIENCE, "the attempt's result", || {
            let s = status(&mut db);
            (s != "sending").then_some(s)
        });
        assert_eq!(after, "cancelled", "{stop}: the in-flight delivery");
        std::thread::sleep(Duration::from_secs(2));
        assert_eq!(status(&mut db), "cancelled", "{stop}: it stays cancelled");
        assert_eq!(at_receiver(), 1, "{stop}: no further attempt");
    }
}

// ---------------------------------------------------------------------------------------------
// The role matrix
// ---------------------------------------------------------------------------------------------

const NO_USAGE: [&str; 4] = ["nobody", "owner", "temp_only", "dbowner"];
const SCHEMA_DENIED: &str = "permission denied for schema webhook";
/// The Standard Webhooks test vector's secret: sign/verify need a well-formed one.
const TEST_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";

/// Every public function of the API, called as an admin would (in this order each
/// succeeds). `tbl` is a table the caller can name; `retry` a cancelled delivery.
fn public_calls(tbl: &str, url: &str, retry: i64) -> Vec<(&'static str, String)> {
    vec![
        (
            "create_endpoint",
            format!("SELECT webhook.create_endpoint('m', '{url}')"),
        ),
        (
            "alter_endpoint",
            "SELECT webhook.alter_endpoint('m', max_attempts => 3)".into(),
        ),
        (
            "rotate_secret",
            "SELECT webhook.rotate_secret('m', grace => '1 hour')".into(),
        ),
        (
            "disable_endpoint",
            "SELECT webhook.disable_endpoint('m', 'matrix')".into(),
        ),
        (
            "enable_endpoint",
            "SELECT webhook.enable_endpoint('m')".into(),
        ),
        (
            "subscribe",
            format!("SELECT webhook.subscribe('{tbl}', 'm')"),
        ),
        (
            "unsubscribe",
            format!("SELECT webhook.unsubscribe('{tbl}', 'm')"),
        ),
        (
            "allow_publish",
            format!("SELECT webhook.allow_publish('{tbl}', 'm')"),
        ),
        (
            "disallow_publish",
            format!("SELECT webhook.disallow_publish('{tbl}', 'm')"),
        ),
        (
            "send",
            "SELECT webhook.send('matrix.test', '{}', 'm')".into(),
        ),
        ("retry", format!("SELECT webhook.retry({retry})")),
        ("replay", "SELECT webhook.replay('m', '2000-01-01')".into()),
        ("purge", "SELECT webhook.purge('1 day')".into()),
        (
            "sign",
            format!("SELECT webhook.sign('{TEST_SECRET}', 'msg_1', 1, 'x')"),
        ),
        (
            "verify",
            format!("SELECT webhook.verify('{TEST_SECRET}', 'msg_1', 1, 'x', 'v1,AAAA')"),
        ),
        (
            "worker_status",
            "SELECT * FROM webhook.worker_status()".into(),
        ),
        (
            "drop_endpoint",
            "SELECT webhook.drop_endpoint('m', cascade => true)".into(),
        ),
    ]
}

/// The public tables and views, with the noun Postgres uses for each.
const PUBLIC_RELATIONS: [(&str, &str); 7] = [
    ("endpoints", "table"),
    ("events", "view"),
    ("deliveries", "view"),
    ("attempts", "table"),
    ("subscriptions", "view"),
    ("endpoint_stats", "view"),
    ("metrics", "view"),
];

/// Every function and relation in schema webhook, public or private (read as superuser).
struct Catalog {
    /// (name, a call with one scalar-subquery NULL per argument: never folded away by the
    /// planner, so the EXECUTE check always runs)
    functions: Vec<(String, String)>,
    /// (name, relkind)
    relations: Vec<(String, String)>,
}

fn catalog(db: &mut postgres::Client) -> Catalog {
    // A pseudo-type argument gets a concrete type where one fits (polymorphic), else the
    // function cannot be called from SQL at all (internal, cstring, ...) and is left out.
    let functions = db
        .query(
            "SELECT p.proname::text, p.prokind::text,
                    array(SELECT CASE WHEN ty.typtype <> 'p' THEN format_type(u.t, NULL)
                                      WHEN ty.typname IN ('anyelement', 'anynonarray', 'anycompatible', 'anycompatiblenonarray') THEN 'integer'
                                      WHEN ty.typname IN ('anyarray', 'anycompatiblearray') THEN 'integer[]'
                                 END
                            FROM unnest(p.proargtypes::oid[]) WITH ORDINALITY u(t, n) JOIN pg_type ty ON ty.oid = u.t
                           ORDER BY u.n)
               FROM pg_proc p WHERE p.pronamespace = 'webhook'::regnamespace AND p.prokind IN ('f', 'p') ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .filter_map(|r| {
            let (name, kind, args): (String, String, Vec<Option<String>>) =
                (r.get(0), r.get(1), r.get(2));
            let args: Vec<String> = args
                .into_iter()
                .map(|t| t.map(|t| format!("(SELECT NULL::{t})")))
                .collect::<Option<_>>()?;
            let verb = if kind == "p" { "CALL" } else { "SELECT" };
            let call = format!("{verb} webhook.\"{name}\"({})", args.join(", "));
            Some((name, call))
        })
        .collect();
    let relations = db
        .query(
            "SELECT relname::text, relkind::text FROM pg_class
              WHERE relnamespace = 'webhook'::regnamespace AND relkind IN ('r', 'p', 'v', 'm', 'S', 'f')
              ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    Catalog {
        functions,
        relations,
    }
}

fn noun(relkind: &str) -> &'static str {
    match relkind {
        "r" | "p" => "table",
        "v" => "view",
        "m" => "materialized view",
        "S" => "sequence",
        "f" => "foreign table",
        other => panic!("relkind {other}"),
    }
}

/// Collects every cell that differs from the contract, so one run shows them all.
#[derive(Default)]
struct Matrix {
    cells: usize,
    diffs: Vec<String>,
}

impl Matrix {
    fn expect(&mut self, role: &str, what: &str, expected: &Outcome, got: Outcome) {
        self.cells += 1;
        if &got != expected {
            self.diffs
                .push(format!("{role} | {what}: expected {expected}, got {got}"));
        }
    }

    fn run(
        &mut self,
        db: &mut postgres::Client,
        role: &str,
        what: &str,
        sql: &str,
        expected: &Outcome,
    ) {
        let got = outcome(db, sql);
        self.expect(role, what, expected, got);
    }

    fn fact(&mut self, what: &str, ok: bool, detail: String) {
        self.cells += 1;
        if !ok {
            self.diffs.push(format!("{what}: {detail}"));
        }
    }

    /// A hand-written trigger firing into an endpoint the table was never subscribed to:
    /// refused with 42501, one line, a hint naming the two ways to allow it.
    fn refused(&mut self, db: &mut postgres::Client, role: &str, what: &str, sql: &str) {
        self.cells += 1;
        let problem = match db.batch_execute(sql) {
            Ok(()) => Some("succeeded: the row was published".to_string()),
            Err(e) => match e.as_db_error() {
                None => Some(format!("failed without a SQLSTATE: {e}")),
                Some(d) => {
                    let msg = d.message();
                    let detail = d.detail().unwrap_or_default();
                    let hint = d.hint().unwrap_or_default();
                    let noisy = |s: &str| {
                        let s = s.to_ascii_lowercase();
                        s.contains("backtrace") || s.contains("stack") || s.contains("panicked")
                    };
                    if d.code().code() != "42501"
                        || !msg.contains("may not publish to webhook endpoint \"billing\"")
                    {
                        Some(format!("{} {msg:?}", d.code().code()))
                    } else if msg.contains('\n') || noisy(msg) || noisy(detail) {
                        Some(format!("not one clean line: {msg:?} / {detail:?}"))
                    } else if !hint.contains("webhook.subscribe")
                        || !hint.contains("webhook.allow_publish")
                    {
                        Some(format!("the hint does not name webhook.subscribe and webhook.allow_publish: {hint:?}"))
                    } else {
                        None
                    }
                }
            },
        };
        if let Some(p) = problem {
            self.diffs.push(format!(
                "{role} | {what}: expected 42501 \"... may not publish to webhook endpoint \\\"billing\\\"\", got {p}"
            ));
        }
    }
}

/// Each kind of role tries every public function, every table and view of schema webhook (and,
/// for roles that must have none, every private object too), and CREATE TRIGGER with
/// webhook.enqueue; the outcome must be exactly the README's role table. The database owner plants
/// operators and functions in public, the table owner a cast on its row type: none of it runs
/// with more rights than the role that triggered it.
#[test]
fn every_role_gets_exactly_what_the_contract_grants() {
    let pg = Cluster::start(&[]);
    let first = std::sync::atomic::AtomicBool::new(true);
    // The first request fails, so the worker also records a failed attempt and retries.
    let rx = Receiver::start(Arc::new(move |_: &Request, _: usize| {
        if first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    }));
    let rx_api = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE ROLE nobody LOGIN;
         CREATE ROLE owner LOGIN;
         CREATE ROLE user_usage LOGIN;
         CREATE ROLE temp_only LOGIN;
         CREATE ROLE dbowner LOGIN;
         GRANT TEMP ON DATABASE app TO temp_only, user_usage;
         ALTER DATABASE app OWNER TO dbowner;
         GRANT CREATE ON SCHEMA public TO dbowner;
         CREATE SCHEMA own AUTHORIZATION owner;
         GRANT USAGE ON SCHEMA own TO PUBLIC;
         CREATE TABLE public.uu_owned (x text);
         ALTER TABLE public.uu_owned OWNER TO user_usage;",
    )
    .unwrap();

    // The database owner plants operators and functions the worker or the API might pick up
    // (before the extension exists, so nothing of it was planned earlier), and puts public
    // first for every session of the database.
    let mut dbowner = pg.client_as("dbowner", "app");
    dbowner
        .batch_execute(
            r#"
        CREATE TABLE public.planted_log (what text, who text);
        GRANT INSERT ON public.planted_log TO PUBLIC;
        CREATE FUNCTION public.planted(what text) RETURNS void LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO public.planted_log VALUES (what, current_user);
            BEGIN
                ALTER ROLE dbowner SUPERUSER;
            EXCEPTION WHEN insufficient_privilege THEN NULL;
            END;
        END $$;
        CREATE FUNCTION public.mul(bigint, interval) RETURNS interval LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.planted('*(bigint, interval)'); RETURN pg_catalog.interval_mul($2, $1::pg_catalog.float8); END $$;
        CREATE OPERATOR public.* (LEFTARG = bigint, RIGHTARG = interval, FUNCTION = public.mul);
        CREATE FUNCTION public.mul(integer, interval) RETURNS interval LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.planted('*(integer, interval)'); RETURN pg_catalog.interval_mul($2, $1::pg_catalog.float8); END $$;
        CREATE OPERATOR public.* (LEFTARG = integer, RIGHTARG = interval, FUNCTION = public.mul);
        CREATE FUNCTION public.plus(timestamptz, interval) RETURNS timestamptz LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.planted('+(timestamptz, interval)'); RETURN pg_catalog.timestamptz_pl_interval($1, $2); END $$;
        CREATE OPERATOR public.+ (LEFTARG = timestamptz, RIGHTARG = interval, FUNCTION = public.plus);
        CREATE FUNCTION public.now() RETURNS timestamptz LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.planted('now()'); RETURN pg_catalog.now(); END $$;
        CREATE FUNCTION public.to_timestamp(double precision) RETURNS timestamptz LANGUAGE plpgsql AS $$
        BEGIN PERFORM public.planted('to_timestamp(double precision)'); RETURN pg_catalog.to_timestamp($1); END $$;
        ALTER DATABASE app SET search_path = public, pg_catalog;
        "#,
        )
        .unwrap();
    // The table owner: a cast to json for a column type of its table, which logs who runs it and
    // tries to make the owner superuser.
    let mut owner = pg.client_as("owner", "app");
    owner
        .batch_execute(
            r#"
        CREATE TYPE own.flag AS ENUM ('on', 'off');
        CREATE TABLE own.cast_log (who text);
        GRANT INSERT ON own.cast_log TO PUBLIC;
        CREATE FUNCTION own.flag_json(own.flag) RETURNS json LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO own.cast_log VALUES (current_user);
            BEGIN
                ALTER ROLE owner SUPERUSER;
            EXCEPTION WHEN insufficient_privilege THEN NULL;
            END;
            RETURN pg_catalog.to_json($1::pg_catalog.text);
        END $$;
        CREATE CAST (own.flag AS json) WITH FUNCTION own.flag_json(own.flag);
        CREATE TABLE own.owned (id int PRIMARY KEY, f own.flag);
        "#,
        )
        .unwrap();

    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE ROLE admin LOGIN IN ROLE webhook_admin;
         GRANT USAGE ON SCHEMA webhook TO user_usage;
         CREATE SCHEMA adm AUTHORIZATION admin;",
    )
    .unwrap();
    create_endpoint(&mut db, "billing", &rx.url("/billing"));
    db.batch_execute("SELECT webhook.subscribe('own.owned', 'billing')")
        .unwrap();
    // A cancelled delivery for webhook.retry() to take up.
    create_endpoint(&mut db, "pre", &rx_api.url("/pre"));
    db.batch_execute(
        "SELECT webhook.disable_endpoint('pre');
         SELECT webhook.send('pre.test', '{}', 'pre');
         SELECT webhook.enable_endpoint('pre');",
    )
    .unwrap();
    let retry_id: i64 = db
        .query_one("SELECT max(id) FROM webhook.deliveries", &[])
        .unwrap()
        .get(0);
    let cat = catalog(&mut db);
    assert!(cat.functions.iter().any(|(n, _)| n == "enqueue"));
    assert!(cat.relations.len() >= PUBLIC_RELATIONS.len());
    // The matrix's lists name what exists: a renamed function or view cannot drop out unseen.
    for (name, _) in PUBLIC_RELATIONS {
        assert!(
            cat.relations.iter().any(|(n, _)| n == name),
            "{name} is not in schema webhook"
        );
    }
    for (name, _) in public_calls("public.t", "http://127.0.0.1/", retry_id) {
        assert!(
            cat.functions.iter().any(|(n, _)| n == name),
            "{name}() is not in schema webhook, or cannot be called from SQL"
        );
    }

    let mut m = Matrix::default();
    let schema_denied = denied(SCHEMA_DENIED);

    // Roles without USAGE on webhook: nothing in it can even be named.
    for role in NO_USAGE {
        let mut c = pg.client_as(role, "app");
        for (name, sql) in public_calls("public.uu_owned", &rx_api.url("/m"), retry_id) {
            m.run(&mut c, role, &format!("{name}()"), &sql, &schema_denied);
        }
        for (name, _) in PUBLIC_RELATIONS {
            m.run(
                &mut c,
                role,
                &format!("SELECT {name}"),
                &format!("SELECT * FROM webhook.{name} LIMIT 1"),
                &schema_denied,
            );
        }
        for (name, call) in &cat.functions {
            m.run(&mut c, role, &format!("call {name}"), call, &schema_denied);
        }
        for (name, kind) in &cat.relations {
            relation_cells(&mut m, &mut c, role, name, kind, &schema_denied);
        }
        let table = match role {
            "owner" => "own.owned".to_string(),
            "dbowner" => {
                m.run(
                    &mut c,
                    role,
                    "CREATE TABLE in public",
                    "CREATE TABLE public.dbowner_t (x text)",
                    &Outcome::Ok,
                );
                "public.dbowner_t".to_string()
            }
            _ => {
                m.run(
                    &mut c,
                    role,
                    "CREATE TEMP TABLE",
                    "CREATE TEMP TABLE forged (x text)",
                    &Outcome::Ok,
                );
                "forged".to_string()
            }
        };
        m.run(
            &mut c,
            role,
            &format!("CREATE TRIGGER on {table}"),
            &format!("CREATE TRIGGER forge AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing')"),
            &schema_denied,
        );
    }

    // USAGE on the schema and nothing else: every function but the trigger function and every
    // table and view are closed by their own privileges.
    {
        let role = "user_usage";
        let mut c = pg.client_as(role, "app");
        for (name, sql) in public_calls("public.uu_owned", &rx_api.url("/m"), retry_id) {
            m.run(
                &mut c,
                role,
                &format!("{name}()"),
                &sql,
                &denied(format!("permission denied for function {name}")),
            );
        }
        for (name, kind) in PUBLIC_RELATIONS {
            m.run(
                &mut c,
                role,
                &format!("SELECT {name}"),
                &format!("SELECT * FROM webhook.{name} LIMIT 1"),
                &denied(format!("permission denied for {kind} {name}")),
            );
        }
        // The trigger functions are PUBLIC's (firing them needs EXECUTE): enqueue refuses a
        // table not allowed to publish (below), flush writes only what enqueue decided. So are
        // the ed25519 public keys (a view and the function it calls): public by nature.
        for (name, call) in cat
            .functions
            .iter()
            .filter(|(n, _)| n != "enqueue" && n != "flush")
        {
            let expected = if name == "_public_key" {
                Outcome::Ok
            } else {
                denied(format!("permission denied for function {name}"))
            };
            m.run(&mut c, role, &format!("call {name}"), call, &expected);
        }
        for (name, kind) in &cat.relations {
            let expected = if name == "public_keys" {
                Outcome::Ok
            } else {
                denied(format!("permission denied for {} {name}", noun(kind)))
            };
            relation_cells(&mut m, &mut c, role, name, kind, &expected);
        }
        m.run(
            &mut c,
            role,
            "DELETE public_keys",
            "DELETE FROM webhook.public_keys",
            &denied("permission denied for view public_keys"),
        );
        // The README's monitoring recipe gives exactly this much: a forged event on a temp
        // table, or on a table of its own, must not reach the billing receiver.
        m.run(
            &mut c,
            role,
            "CREATE TEMP TABLE",
            "CREATE TEMP TABLE forged (x text)",
            &Outcome::Ok,
        );
        for table in ["forged", "public.uu_owned"] {
            m.run(
                &mut c,
                role,
                &format!("CREATE TRIGGER on {table}"),
                &format!("CREATE TRIGGER forge AFTER INSERT ON {table} FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing')"),
                &Outcome::Ok,
            );
            m.refused(
                &mut c,
                role,
                &format!("INSERT INTO {table} (trigger fires)"),
                &format!("INSERT INTO {table} VALUES ('invoice paid')"),
            );
        }
    }

    // webhook_admin: the whole API, every table and view, and hand-written triggers on its own
    // tables publish once it allows them.
    {
        let role = "admin";
        let mut c = pg.client_as(role, "app");
        m.run(
            &mut c,
            role,
            "CREATE TABLE in adm",
            "CREATE TABLE adm.t (x text); CREATE TABLE adm.hand (x text);",
            &Outcome::Ok,
        );
        for (name, sql) in public_calls("adm.t", &rx_api.url("/m"), retry_id) {
            m.run(&mut c, role, &format!("{name}()"), &sql, &Outcome::Ok);
        }
        for (name, _) in PUBLIC_RELATIONS {
            m.run(
                &mut c,
                role,
                &format!("SELECT {name}"),
                &format!("SELECT * FROM webhook.{name} LIMIT 1"),
                &Outcome::Ok,
            );
        }
        m.run(
            &mut c,
            role,
            "CREATE TRIGGER on adm.hand",
            "CREATE TRIGGER by_hand AFTER INSERT ON adm.hand FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('billing')",
            &Outcome::Ok,
        );
        // Its own table too publishes only once allowed (a TRIGGER grantee could attach one).
        m.refused(
            &mut c,
            role,
            "INSERT INTO adm.hand before allow_publish",
            "INSERT INTO adm.hand VALUES ('not yet')",
        );
        m.run(
            &mut c,
            role,
            "allow_publish(adm.hand)",
            "SELECT webhook.allow_publish('adm.hand', 'billing')",
            &Outcome::Ok,
        );
        m.run(
            &mut c,
            role,
            "INSERT INTO adm.hand (trigger fires)",
            "INSERT INTO adm.hand VALUES ('by admin')",
            &Outcome::Ok,
        );
    }

    // The table owner writes its subscribed table: published, with its cast run as itself.
    m.run(
        &mut owner,
        "owner",
        "INSERT INTO own.owned (subscribed through the API)",
        "INSERT INTO own.owned VALUES (1, 'on')",
        &Outcome::Ok,
    );

    // What reached the billing receiver: the owner's row and the admin's, once each (plus the
    // retry of the first request, which got a 500).
    wait_settled(&mut db, PATIENCE);
    std::thread::sleep(Duration::from_secs(1));
    let reqs = rx.requests();
    let published: BTreeMap<String, String> = reqs
        .iter()
        .map(|r| {
            (
                r.webhook_id(),
                r.json()["type"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect();
    let types: BTreeSet<&str> = published.values().map(String::as_str).collect();
    m.fact(
        "billing receiver",
        reqs.len() == 3
            && published.len() == 2
            && types == BTreeSet::from(["own.owned.insert", "adm.hand.insert"]),
        format!(
            "expected own.owned.insert and adm.hand.insert once each (3 requests, one retried), got {} requests: {published:?}",
            reqs.len()
        ),
    );
    if let Some(r) = reqs.iter().find(|r| r.json()["type"] == "own.owned.insert") {
        m.fact(
            "own.owned row image",
            r.json()["data"]["new"] == serde_json::json!({"id": 1, "f": "on"}),
            format!("{}", r.json()["data"]["new"]),
        );
    }
    let forged = count(
        &mut db,
        "SELECT count(*) FROM webhook.events WHERE payload ->> 'table' IN ('forged', 'uu_owned', 'dbowner_t')",
    );
    m.fact(
        "events of refused triggers",
        forged == 0,
        format!("{forged} recorded"),
    );

    // Nobody was escalated: the only superuser is still postgres, no planted code ran as it, and
    // the cast ran as the role that wrote the row.
    let supers = superusers(&mut db);
    m.fact("superusers", supers == ["postgres"], format!("{supers:?}"));
    let planted: Vec<String> = db
        .query(
            "SELECT what || ' x' || count(*) FROM public.planted_log WHERE who = 'postgres' GROUP BY what ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    m.fact(
        "planted operators/functions run as postgres",
        planted.is_empty(),
        format!("{planted:?}"),
    );
    let cast_by: Vec<String> = db
        .query("SELECT DISTINCT who FROM own.cast_log ORDER BY 1", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    m.fact(
        "the planted cast ran as",
        cast_by == ["owner"],
        format!("{cast_by:?}"),
    );
    // The refusal reaches the server log as one clean message too.
    let log = pg.log();
    let noisy: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("may not publish"))
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("backtrace") || l.contains("stack") || l.contains("panicked")
        })
        .collect();
    m.fact(
        "server log of the refusal",
        noisy.is_empty(),
        format!("{noisy:?}"),
    );

    eprintln!(
        "role matrix: {} cells, {} differ from the README's role table",
        m.cells,
        m.diffs.len()
    );
    assert!(
        m.diffs.is_empty(),
        "{} of {} cells differ from the README's role table:\n{}",
        m.diffs.len(),
        m.cells,
        m.diffs.join("\n")
    );
}

/// SELECT from every relation; also INSERT and DELETE on tables and nextval on sequences (a
/// write grant alone would be a hole too). INSERT runs in a transaction that is rolled back.
fn relation_cells(
    m: &mut Matrix,
    c: &mut postgres::Client,
    role: &str,
    name: &str,
    kind: &str,
    expected: &Outcome,
) {
    if kind == "S" {
        m.run(
            c,
            role,
            &format!("nextval {name}"),
            &format!("SELECT nextval('webhook.\"{name}\"')"),
            expected,
        );
    }
    m.run(
        c,
        role,
        &format!("SELECT {name}"),
        &format!("SELECT 1 FROM webhook.\"{name}\" LIMIT 1"),
        expected,
    );
    if kind == "r" || kind == "p" {
        c.batch_execute("BEGIN").unwrap();
        let got = outcome(c, &format!("INSERT INTO webhook.\"{name}\" DEFAULT VALUES"));
        c.batch_execute("ROLLBACK").unwrap();
        m.expect(role, &format!("INSERT {name}"), expected, got);
        m.run(
            c,
            role,
            &format!("DELETE {name}"),
            &format!("DELETE FROM webhook.\"{name}\" WHERE false"),
            expected,
        );
    }
}
