//! End-to-end: least privilege, the SSRF guard, TLS, hostile receivers and hostile input, and no
//! secret in any error or log line.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::tls::TlsReceiver;
use crate::harness::*;

/// Fails if any of `secrets` appears in the server log.
fn assert_log_clean(pg: &Cluster, secrets: &[&str]) {
    let log = pg.log();
    for s in secrets {
        assert!(!s.is_empty());
        assert!(
            !log.contains(s),
            "the server log contains a secret ({}…)",
            &s[..s.len().min(10)]
        );
    }
}

/// The message of the database error `sql` has to fail with.
fn error_of(db: &mut postgres::Client, sql: &str) -> String {
    db_error(db.batch_execute(sql), sql).message().to_string()
}

fn last_error(db: &mut postgres::Client, endpoint: &str) -> (String, Option<String>) {
    let r = db
        .query_one(
            "SELECT d.status::text, d.last_error FROM webhook.deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id
              WHERE e.name = $1 ORDER BY d.id DESC LIMIT 1",
            &[&endpoint],
        )
        .unwrap();
    (r.get(0), r.get(1))
}

#[test]
fn an_application_role_fires_webhooks_without_any_right_on_webhook() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         CREATE TABLE users (id bigserial PRIMARY KEY, email text);
         CREATE ROLE app LOGIN;
         GRANT SELECT, INSERT, UPDATE ON users TO app;
         GRANT USAGE ON SEQUENCE users_id_seq TO app;
         CREATE ROLE ops LOGIN IN ROLE webhook_admin;",
    )
    .unwrap();
    let secret = create_endpoint(&mut db, "crm", &rx.url("/"));
    db.execute("SELECT webhook.subscribe('users', 'crm')", &[])
        .unwrap();

    let mut app = pg.client_as("app", "app");
    app.execute("INSERT INTO users (email) VALUES ('ada@example.com')", &[])
        .unwrap();
    let req = rx.wait_for(1, PATIENCE).remove(0);
    verify_with_standardwebhooks(&secret, &req).unwrap();

    for sql in [
        "SELECT secret FROM webhook.endpoints",
        "SELECT * FROM webhook.events",
        "SELECT * FROM webhook.deliveries",
        "SELECT webhook.create_endpoint('evil', 'https://evil.example.com')",
    ] {
        assert_eq!(
            error_of(&mut app, sql),
            "permission denied for schema webhook",
            "{sql}"
        );
    }
    // Even with USAGE on the schema, every object stays closed.
    db.batch_execute("GRANT USAGE ON SCHEMA webhook TO app")
        .unwrap();
    assert_eq!(
        error_of(&mut app, "SELECT secret FROM webhook.endpoints"),
        "permission denied for table endpoints"
    );
    assert_eq!(
        error_of(&mut app, "SELECT * FROM webhook.events"),
        "permission denied for view events"
    );
    assert_eq!(
        error_of(&mut app, "SELECT * FROM webhook.attempts"),
        "permission denied for table attempts"
    );
    assert_eq!(
        error_of(
            &mut app,
            "SELECT webhook.create_endpoint('evil', 'https://evil.example.com')"
        ),
        "permission denied for function create_endpoint"
    );
    // A member of webhook_admin manages endpoints and sees secrets.
    let mut ops = pg.client_as("ops", "app");
    let seen: String = ops
        .query_one(
            "SELECT secret FROM webhook.endpoints WHERE name = 'crm'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(seen, secret);
    ops.execute(
        "SELECT webhook.create_endpoint('billing', 'https://billing.example.com')",
        &[],
    )
    .unwrap();
    assert_log_clean(&pg, &[&secret]);
}

#[test]
fn the_ssrf_guard_refuses_private_targets_after_resolution() {
    let mut pg = Cluster::start(&[("webhook.allow_private_networks", "off")]);
    let rx = Receiver::start(always(Reply::ok()));
    let port = rx.port();
    let mut db = pg.client_with_extension();
    let targets = [
        ("localhost", format!("http://localhost:{port}/"), "loopback"),
        ("v4", format!("http://127.0.0.1:{port}/"), "loopback"),
        ("short", format!("http://127.1:{port}/"), "loopback"),
        ("hex", format!("http://0x7f000001:{port}/"), "loopback"),
        ("v6", format!("http://[::1]:{port}/"), "loopback"),
        (
            "mapped",
            format!("http://[::ffff:127.0.0.1]:{port}/"),
            "loopback",
        ),
        (
            "ten",
            "http://10.0.0.1/".to_string(),
            "private (10.0.0.0/8)",
        ),
        (
            "metadata",
            "http://169.254.169.254/latest/meta-data/".to_string(),
            "link-local",
        ),
        (
            "home",
            "http://192.168.1.1/".to_string(),
            "private (192.168.0.0/16)",
        ),
        (
            "cgnat",
            "http://100.64.0.1/".to_string(),
            "carrier-grade NAT",
        ),
        ("ula", "http://[fd00::1]/".to_string(), "unique local"),
    ];
    for (name, url, _) in &targets {
        create_endpoint(&mut db, name, url);
        db.execute("SELECT webhook.send('probe', '{}', $1)", &[name])
            .unwrap();
    }
    wait_settled(&mut db, PATIENCE);
    for (name, _, why) in &targets {
        let (status, err) = last_error(&mut db, name);
        let err = err.unwrap_or_default();
        assert_eq!(status, "failed", "{name}");
        assert!(
            err.starts_with("refused to connect to ") && err.contains(why),
            "{name}: {err}"
        );
    }
    assert_eq!(rx.count(), 0, "no request reached the loopback receiver");

    // allowed_networks opens one range, and only that one.
    pg.set("webhook.allowed_networks", "'127.0.0.0/8'");
    pg.reload();
    std::thread::sleep(Duration::from_millis(500));
    for name in ["v4", "ten"] {
        let id: i64 = db
            .query_one("SELECT d.id FROM webhook.deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id WHERE e.name = $1", &[&name])
            .unwrap()
            .get(0);
        db.execute("SELECT webhook.retry($1)", &[&id]).unwrap();
    }
    rx.wait_for(1, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(last_error(&mut db, "v4").0, "delivered");
    assert_eq!(last_error(&mut db, "ten").0, "failed");
    drop(db);
    pg.stop("fast");
}

#[test]
fn https_only_refuses_plain_http_at_creation_and_at_send() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "old", &rx.url("/"));
    pg.set("webhook.https_only", "on");
    pg.reload();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        error_of(
            &mut db,
            "SELECT webhook.create_endpoint('new', 'http://example.com/')"
        ),
        "invalid endpoint url: URL scheme http is not allowed while webhook.https_only is on"
    );
    db.execute("SELECT webhook.send('x', '{}', 'old')", &[])
        .unwrap();
    wait_settled(&mut db, PATIENCE);
    assert_eq!(
        last_error(&mut db, "old"),
        (
            "failed".into(),
            Some("refused to send over plain http while webhook.https_only is on".into())
        )
    );
    assert_eq!(rx.count(), 0);
}

#[test]
fn tls_certificates_are_verified_and_extra_roots_can_be_trusted() {
    let pg = Cluster::start(&[
        ("webhook.retry_schedule", "'300ms'"),
        ("webhook.default_max_attempts", "2"),
    ]);
    let tls = TlsReceiver::start();
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "tls", &tls.url());
    db.execute("SELECT webhook.send('x', '{}', 'tls')", &[])
        .unwrap();
    wait_settled(&mut db, PATIENCE);
    let (status, err) = last_error(&mut db, "tls");
    assert_eq!(status, "failed");
    assert!(
        err.as_deref().unwrap_or_default().contains("certificate"),
        "{err:?}"
    );
    assert_eq!(tls.served.load(std::sync::atomic::Ordering::SeqCst), 0);

    let ca = pg.dir.join("test-ca.pem");
    tls.write_ca(&ca);
    pg.set("webhook.ssl_ca_file", &format!("'{}'", ca.display()));
    pg.reload();
    std::thread::sleep(Duration::from_millis(500));
    db.execute("SELECT webhook.send('x', '{}', 'tls')", &[])
        .unwrap();
    wait_settled(&mut db, PATIENCE);
    assert_eq!(last_error(&mut db, "tls"), ("delivered".into(), None));
    assert_eq!(tls.served.load(std::sync::atomic::Ordering::SeqCst), 1);
}

/// A raw TCP server: `serve` gets each accepted connection on its own thread.
fn raw_server(serve: impl Fn(TcpStream) + Send + Sync + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let serve = serve.clone();
            std::thread::spawn(move || serve(conn));
        }
    });
    port
}

fn read_some(conn: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    let _ = conn.read(&mut buf);
}

#[test]
fn hostile_receivers_are_cut_off_by_caps_and_timeouts() {
    let pg = Cluster::start(&[
        ("webhook.response_body_limit", "'1kB'"),
        ("webhook.default_max_attempts", "1"),
    ]);
    let mut db = pg.client_with_extension();
    let endless_chunks = raw_server(|mut c| {
        read_some(&mut c);
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n");
        let chunk = format!("1000\r\n{}\r\n", "z".repeat(4096));
        while c.write_all(chunk.as_bytes()).is_ok() {}
    });
    let silent = raw_server(|mut c| {
        read_some(&mut c);
        std::thread::sleep(Duration::from_secs(30));
    });
    let trickle = raw_server(|mut c| {
        read_some(&mut c);
        for b in b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok" {
            if c.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    });
    let garbage = raw_server(|mut c| {
        read_some(&mut c);
        let _ = c.write_all(b"SMTP ready, not HTTP at all\r\n\r\n");
    });
    let tls_stall = raw_server(|mut c| {
        read_some(&mut c); // the ClientHello, never answered
        std::thread::sleep(Duration::from_secs(30));
    });
    let cases = [
        ("chunks", format!("http://127.0.0.1:{endless_chunks}/")),
        ("silent", format!("http://127.0.0.1:{silent}/")),
        ("trickle", format!("http://127.0.0.1:{trickle}/")),
        ("garbage", format!("http://127.0.0.1:{garbage}/")),
        ("tls_stall", format!("https://127.0.0.1:{tls_stall}/")),
    ];
    for (name, url) in &cases {
        db.execute(
            "SELECT webhook.create_endpoint($1, $2, timeout => '2s')",
            &[name, url],
        )
        .unwrap();
        db.execute("SELECT webhook.send('x', '{}', $1)", &[name])
            .unwrap();
    }
    let started = Instant::now();
    wait_settled(&mut db, PATIENCE);
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "timeouts held: {:?}",
        started.elapsed()
    );
    let (status, _) = last_error(&mut db, "chunks");
    assert_eq!(status, "delivered", "an endless body is cut at the cap");
    let body: i32 = db.query_one("SELECT octet_length(response_body) FROM webhook.attempts a JOIN webhook.endpoints e ON e.id = a.endpoint_id WHERE e.name = 'chunks'", &[]).unwrap().get(0);
    assert_eq!(body, 1024);
    assert_eq!(
        last_error(&mut db, "silent"),
        (
            "failed".into(),
            Some("timed out after 2 s (gave up after 1 attempt)".into())
        )
    );
    assert_eq!(
        last_error(&mut db, "trickle"),
        (
            "failed".into(),
            Some("timed out after 2 s (gave up after 1 attempt)".into())
        )
    );
    assert_eq!(
        last_error(&mut db, "tls_stall"),
        (
            "failed".into(),
            Some("timed out after 2 s (gave up after 1 attempt)".into())
        )
    );
    let (status, err) = last_error(&mut db, "garbage");
    assert_eq!(status, "failed");
    assert!(
        err.unwrap_or_default().contains("invalid HTTP"),
        "a clear reason for a non-HTTP answer"
    );
    // The worker is fine afterwards.
    let state = worker_state(&mut db, "app").unwrap();
    assert!(state == "idle" || state == "working");
}

#[test]
fn ten_thousand_hanging_endpoints_do_not_stop_a_healthy_one() {
    let pg = Cluster::start(&[
        ("webhook.default_timeout", "'3s'"),
        ("webhook.retry_schedule", "'1h'"),
    ]);
    let held: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
    let h = held.clone();
    let hang = raw_server(move |c| h.lock().unwrap().push(c));
    let healthy = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "healthy", &healthy.url("/"));
    db.execute("SELECT webhook.send('warm-up', '{}', 'healthy')", &[])
        .unwrap();
    healthy.wait_for(1, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    db.execute(
        "SELECT webhook.create_endpoint('hang' || g, 'http://127.0.0.1:' || $1::int || '/' || g) FROM generate_series(1, 10000) g",
        &[&(hang as i32)],
    )
    .unwrap();
    db.execute(
        "SELECT webhook.send('flood', '{}', 'hang' || g) FROM generate_series(1, 10000) g",
        &[],
    )
    .unwrap();
    // Failing (and new) endpoints may hold at most 90 % of webhook.max_in_flight (README
    // "Security"); this cluster leaves it at its default.
    let max_in_flight: i32 = db
        .query_one("SELECT current_setting('webhook.max_in_flight')::int", &[])
        .unwrap()
        .get(0);
    let suspect_cap = max_in_flight * 90 / 100;
    // Only the hanging endpoints have work until the ticks below: sample what they hold.
    let mut most_hanging = 0;
    let mut sample = |db: &mut postgres::Client| {
        let n = worker(db, "app").in_flight;
        most_hanging = most_hanging.max(n);
        n
    };
    wait_until(PATIENCE, "hundreds of requests hanging", || {
        (sample(&mut db) >= 500).then_some(())
    });
    // Go on sampling for a while (under the 3 s timeout), as the worker claims up to its cap.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        sample(&mut db);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        most_hanging <= suspect_cap,
        "the hanging endpoints held {most_hanging} requests, more than 90 % of webhook.max_in_flight ({max_in_flight})"
    );
    // The healthy endpoint still gets its deliveries through, promptly.
    let t = Instant::now();
    db.execute(
        "SELECT webhook.send('tick', to_jsonb(g), 'healthy') FROM generate_series(1, 20) g",
        &[],
    )
    .unwrap();
    healthy.wait_for(21, Duration::from_secs(5));
    let took = t.elapsed();
    // worker_status answers, and the worker's own memory stays small.
    let (pid, in_flight) = {
        let w = worker(&mut db, "app");
        (w.pid.expect("the worker runs"), w.in_flight)
    };
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_anon_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    eprintln!("healthy endpoint: 20 deliveries in {took:?} with {in_flight} requests hanging; worker RssAnon {} MB", rss_anon_kb / 1024);
    assert!(in_flight >= 500);
    eprintln!("at most {most_hanging} requests hanging at once (cap {suspect_cap})");
    assert!(rss_anon_kb < 256 * 1024, "worker memory {rss_anon_kb} kB");
}

#[test]
fn hostile_names_and_odd_types_give_a_correct_payload() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        r#"CREATE EXTENSION webhook_ext;
           CREATE TYPE pair AS (a int, b text);
           CREATE DOMAIN positive AS int CHECK (VALUE > 0);
           CREATE TABLE "Üsers ""quoted"" table" (
               id int PRIMARY KEY, n numeric, d date, ts timestamptz, raw bytea, tags text[], p pair,
               pos positive, doc jsonb, note text);"#,
    )
    .unwrap();
    let name = "we'ird \"name\" ✓";
    db.execute(
        "SELECT webhook.create_endpoint($1, $2)",
        &[&name, &rx.url("/")],
    )
    .unwrap();
    let trigger: String = db
        .query_one(
            r#"SELECT webhook.subscribe('"Üsers ""quoted"" table"', $1)::text"#,
            &[&name],
        )
        .unwrap()
        .get(0);
    assert_eq!(trigger, format!("webhook_{name}"));
    db.batch_execute(
        r#"INSERT INTO "Üsers ""quoted"" table" VALUES
           (1, 'NaN', 'infinity', '-infinity', '\x00ff', '{a,"b c",NULL}', ROW(7, 'x'), 5,
            '{"nested": [1, {"k": null}]}', E'line\nbreak "quoted" \\ backslash ✓');"#,
    )
    .unwrap();
    let req = rx.wait_for(1, PATIENCE).remove(0);
    let body = req.json();
    assert_eq!(body["type"], "public.Üsers \"quoted\" table.insert");
    assert_eq!(body["data"]["table"], "Üsers \"quoted\" table");
    let new = &body["data"]["new"];
    assert_eq!(new["n"], "NaN");
    assert_eq!(new["d"], "infinity");
    assert_eq!(new["ts"], "-infinity");
    assert_eq!(new["raw"], "\\x00ff");
    assert_eq!(new["tags"], serde_json::json!(["a", "b c", null]));
    assert_eq!(new["p"], serde_json::json!({"a": 7, "b": "x"}));
    assert_eq!(new["pos"], 5);
    assert_eq!(new["doc"], serde_json::json!({"nested": [1, {"k": null}]}));
    assert_eq!(new["note"], "line\nbreak \"quoted\" \\ backslash ✓");
    db.execute(
        r#"SELECT webhook.unsubscribe('"Üsers ""quoted"" table"', $1)"#,
        &[&name],
    )
    .unwrap();
    db.execute("SELECT webhook.drop_endpoint($1)", &[&name])
        .unwrap();
}

#[test]
fn bad_endpoint_input_is_refused_and_oversized_payloads_are_recorded() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext; CREATE TABLE docs (id int PRIMARY KEY, body text)",
    )
    .unwrap();
    let token = "Bearer tok_9f8e7d6c5b4a";
    assert_eq!(
        error_of(&mut db, "SELECT webhook.create_endpoint('a', 'https://user:pa55word@example.com/')"),
        "invalid endpoint url: URL must not contain credentials: put them in the endpoint's headers (e.g. Authorization)"
    );
    let crlf = db_error(
        db.execute(
            "SELECT webhook.create_endpoint('a', 'https://x.example.com', headers => $1::text::jsonb)",
            &[&format!(
                r#"{{"Authorization": "{token}\r\nX-Injected: 1"}}"#
            )],
        ),
        "a header value with CR LF",
    );
    let msg = crlf.message().to_string();
    assert!(
        msg.starts_with("invalid endpoint headers: the value of header \"Authorization\""),
        "{msg}"
    );
    assert!(!msg.contains("tok_"), "header values are never echoed");
    let huge = format!(r#"{{"X-Big": "{}"}}"#, "h".repeat(100_000));
    let err = db_error(
        db.execute(
            "SELECT webhook.create_endpoint('a', 'https://x.example.com', headers => $1::text::jsonb)",
            &[&huge],
        ),
        "a 100,000-byte header",
    );
    assert!(err.message().contains("longer than 8192 bytes"));

    let secret: String = db
        .query_one(
            "SELECT secret FROM webhook.create_endpoint('docs', $1, headers => $2::text::jsonb)",
            &[
                &rx.url("/"),
                &serde_json::json!({"Authorization": token}).to_string(),
            ],
        )
        .unwrap()
        .get(0);
    db.batch_execute("SELECT webhook.subscribe('docs', 'docs')")
        .unwrap();
    // An oversized row: the user's transaction commits, the event is kept, the delivery says why.
    db.batch_execute("SET webhook.max_payload_bytes = '4kB'; INSERT INTO docs VALUES (1, repeat('x', 100000)); INSERT INTO docs VALUES (2, 'small');")
        .unwrap();
    let req = rx.wait_for(1, PATIENCE).remove(0);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(req.json()["data"]["new"]["id"], 2);
    assert_eq!(req.header("authorization"), Some(token));
    let rows: Vec<(String, Option<String>)> = db
        .query(
            "SELECT status::text, last_error FROM webhook.deliveries ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows[0].0, "failed");
    assert!(rows[0]
        .1
        .as_deref()
        .unwrap()
        .contains("more than webhook.max_payload_bytes (4096)"));
    assert_eq!(rows[1], ("delivered".into(), None));
    let kept = count(&mut db, "SELECT count(*) FROM docs");
    assert_eq!(kept, 2);
    assert_log_clean(&pg, &[&secret, "tok_9f8e7d6c5b4a"]);
}
