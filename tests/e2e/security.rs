//! End-to-end: least privilege, the SSRF guard, TLS, hostile receivers and hostile input, and no
//! secret in any error or log line.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::tls::TlsReceiver;
use crate::harness::*;

/// What must never appear in a server log (README "Secrets": no secret, header value or URL in
/// any log line): each secret whole and its base64 key, header values sent (custom headers and
/// every `webhook-signature` value), endpoint URLs whole and their path and query. Every line is
/// checked, `STATEMENT:` lines included, and so is the literal `whsec_`.
#[derive(Default)]
pub(crate) struct Sensitive {
    items: Vec<(String, &'static str)>,
}

impl Sensitive {
    pub(crate) fn add(&mut self, text: &str, what: &'static str) -> &mut Self {
        assert!(text.len() >= 6, "too short to look for: {what}");
        self.items.push((text.to_string(), what));
        self
    }

    pub(crate) fn secret(&mut self, secret: &str) -> &mut Self {
        let key = secret.strip_prefix("whsec_").expect("a whsec_ secret");
        self.add(secret, "a secret")
            .add(key, "a secret's base64 key")
    }

    fn url(&mut self, url: &str) -> &mut Self {
        self.add(url, "an endpoint URL");
        let rest = url.splitn(4, '/').nth(3).unwrap_or_default();
        if rest.len() >= 6 {
            self.add(&format!("/{rest}"), "an endpoint URL's path and query");
        }
        self
    }

    /// The values of the headers the receiver got: every signature, and the custom ones named.
    pub(crate) fn sent(&mut self, requests: &[Request], custom: &[&str]) -> &mut Self {
        assert!(
            !requests.is_empty(),
            "no request to take header values from"
        );
        for r in requests {
            let sig = r.header("webhook-signature").expect("signed");
            for s in sig.split(' ') {
                let (_, b64) = s.split_once(',').expect("v1,<base64>");
                self.add(b64, "a webhook-signature value");
            }
            for name in custom {
                let v = r
                    .header(name)
                    .unwrap_or_else(|| panic!("header {name} sent"));
                self.add(v, "a custom header value");
            }
        }
        self
    }

    pub(crate) fn assert_not_in_log(&self, pg: &Cluster) {
        assert!(!self.items.is_empty());
        let log = pg.log();
        assert!(log.lines().count() > 3, "the server log is there");
        for (n, line) in log.lines().enumerate() {
            assert!(
                !line.contains("whsec_"),
                "line {} of the server log names a whsec_ secret",
                n + 1
            );
            for (text, what) in &self.items {
                assert!(
                    !line.contains(text.as_str()),
                    "line {} of the server log carries {what}: {}",
                    n + 1,
                    line.replace(text.as_str(), "<...>")
                );
            }
        }
    }
}

/// The attempts recorded for `endpoint`'s latest delivery.
fn attempts_of(db: &mut postgres::Client, endpoint: &str) -> i32 {
    db.query_one(
        "SELECT d.attempts FROM webhook.deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id
          WHERE e.name = $1 ORDER BY d.id DESC LIMIT 1",
        &[&endpoint],
    )
    .unwrap()
    .get(0)
}

/// The message of the database error `sql` has to fail with.
pub(crate) fn error_of(db: &mut postgres::Client, sql: &str) -> String {
    db_error(db.batch_execute(sql), sql).message().to_string()
}

pub(crate) fn last_error(db: &mut postgres::Client, endpoint: &str) -> (String, Option<String>) {
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
    let secret = create_endpoint(&mut db, "crm", &rx.url("/crm/hook"));
    db.execute("SELECT webhook.subscribe('users', 'crm')", &[])
        .unwrap();

    let mut app = pg.client_as("app", "app");
    // The application's trace context needs no right either: a setting any role may SET.
    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    app.batch_execute(&format!("SET webhook.traceparent = '{TRACE}'"))
        .unwrap();
    app.execute("INSERT INTO users (email) VALUES ('ada@example.com')", &[])
        .unwrap();
    let req = rx.wait_for(1, PATIENCE).remove(0);
    verify_with_standardwebhooks(&secret, &req).unwrap();
    assert_eq!(req.header("traceparent"), Some(TRACE));

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
    Sensitive::default()
        .secret(&secret)
        .url(&rx.url("/crm/hook"))
        .sent(&[req], &[])
        .assert_not_in_log(&pg);
}

#[test]
fn the_ssrf_guard_refuses_private_targets_after_resolution() {
    // debug1: whatever the worker says about a refusal, at any level, is in the log checked below.
    let mut pg = Cluster::start(&[
        ("webhook.allow_private_networks", "off"),
        ("log_min_messages", "debug1"),
    ]);
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
            "http://169.254.169.254/latest/meta-data/?token=imds_q7Zp0xK".to_string(),
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

    // allowed_networks opens one range, and only that one. No sleep after the reload: "v4" is
    // retried until the worker has the new setting (until then it is refused again).
    pg.set("webhook.allowed_networks", "'127.0.0.0/8'");
    pg.reload();
    let id_of = |db: &mut postgres::Client, name: &str| -> i64 {
        db.query_one("SELECT d.id FROM webhook.deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id WHERE e.name = $1", &[&name])
            .unwrap()
            .get(0)
    };
    let v4 = id_of(&mut db, "v4");
    wait_until(
        PATIENCE,
        "the worker to see allowed_networks",
        || match last_error(&mut db, "v4").0.as_str() {
            "delivered" => Some(()),
            "failed" => {
                db.execute("SELECT webhook.retry($1)", &[&v4]).unwrap();
                None
            }
            _ => None,
        },
    );
    assert_eq!(rx.count(), 1, "one delivery reached the opened range");
    // Now that the worker has the new setting, 10.0.0.1 is still refused, and for its own reason.
    let ten = id_of(&mut db, "ten");
    assert_eq!(attempts_of(&mut db, "ten"), 1);
    db.execute("SELECT webhook.retry($1)", &[&ten]).unwrap();
    wait_settled(&mut db, PATIENCE);
    assert_eq!(attempts_of(&mut db, "ten"), 2, "the retry made an attempt");
    let (status, err) = last_error(&mut db, "ten");
    assert_eq!(status, "failed");
    let err = err.unwrap_or_default();
    assert!(
        err.starts_with("refused to connect to 10.0.0.1: private (10.0.0.0/8) address"),
        "refused for 10.0.0.1 itself, not for another reason: {err}"
    );
    let mut sensitive = Sensitive::default();
    for (_, url, _) in &targets {
        sensitive.url(url);
    }
    sensitive
        .add("imds_q7Zp0xK", "a token in a URL")
        .sent(&rx.requests(), &[])
        .assert_not_in_log(&pg);
    drop(db);
    pg.stop("fast");
}

#[test]
fn https_only_refuses_plain_http_at_creation_and_at_send() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let probe = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "old", &rx.url("/"));
    create_endpoint(&mut db, "probe", &probe.url("/"));
    pg.set("webhook.https_only", "on");
    pg.reload();
    // No sleep: a probe endpoint is sent to until the worker refuses it (it has the setting).
    wait_until(PATIENCE, "the worker to see https_only", || {
        db.execute("SELECT webhook.send('p', '{}', 'probe')", &[])
            .unwrap();
        wait_settled(&mut db, PATIENCE);
        (last_error(&mut db, "probe").0 == "failed").then_some(())
    });
    wait_until(PATIENCE, "this session to see https_only", || {
        let on: String = db.query_one("SHOW webhook.https_only", &[]).unwrap().get(0);
        (on == "on").then_some(())
    });
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
    // No sleep: send until the worker has the new roots (until then each send fails, unserved).
    let mut sends = 0;
    wait_until(PATIENCE, "a delivery through the extra root", || {
        db.execute("SELECT webhook.send('x', '{}', 'tls')", &[])
            .unwrap();
        sends += 1;
        wait_settled(&mut db, PATIENCE);
        match last_error(&mut db, "tls") {
            (s, None) if s == "delivered" => Some(()),
            (s, Some(e)) if s == "failed" && e.contains("certificate") => None,
            other => panic!("neither delivered nor refused for its certificate: {other:?}"),
        }
    });
    eprintln!("delivered on send {sends} after the reload");
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
        ("log_min_messages", "debug1"),
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
    // Each URL carries a path and a token: neither may reach the log with the failures.
    let cases = [
        (
            "chunks",
            format!("http://127.0.0.1:{endless_chunks}/in/chunks?tok=hr_c7Qx"),
        ),
        (
            "silent",
            format!("http://127.0.0.1:{silent}/in/silent?tok=hr_s7Qx"),
        ),
        (
            "trickle",
            format!("http://127.0.0.1:{trickle}/in/trickle?tok=hr_t7Qx"),
        ),
        (
            "garbage",
            format!("http://127.0.0.1:{garbage}/in/garbage?tok=hr_g7Qx"),
        ),
        (
            "tls_stall",
            format!("https://127.0.0.1:{tls_stall}/in/tls?tok=hr_l7Qx"),
        ),
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
    let mut sensitive = Sensitive::default();
    for (name, url) in &cases {
        sensitive
            .url(url)
            .add(&format!("hr_{}7Qx", &name[..1]), "a token in a URL");
    }
    sensitive.assert_not_in_log(&pg);
}

/// A response body is read no further than webhook.response_body_limit, measured at the server:
/// it sends the first 256 KiB slowly (1 KiB every 5 ms, so the worker keeps up and nothing piles
/// up in socket buffers), then as fast as it can, up to 64 MiB. A worker that stops at the cap
/// and drops the connection leaves the server a few KiB into the slow part; one that reads on
/// lets it write all 64 MiB.
#[test]
fn a_response_body_is_read_no_further_than_the_cap() {
    const SLOW: usize = 256 * 1024;
    const TOTAL: usize = 64 * 1024 * 1024;
    let pg = Cluster::start(&[
        ("webhook.response_body_limit", "'1kB'"),
        ("webhook.default_max_attempts", "1"),
    ]);
    let written: Arc<Mutex<Vec<usize>>> = Arc::new(Mutex::new(Vec::new()));
    let w = written.clone();
    let port = raw_server(move |mut c| {
        read_some(&mut c);
        let mut sent = 0usize;
        let head = format!("HTTP/1.1 200 OK\r\ncontent-length: {TOTAL}\r\n\r\n");
        if c.write_all(head.as_bytes()).is_ok() {
            let chunk = [b'x'; 1024];
            while sent < TOTAL && c.write_all(&chunk).is_ok() {
                sent += chunk.len();
                if sent < SLOW {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        w.lock().unwrap().push(sent);
    });
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "big", &format!("http://127.0.0.1:{port}/"));
    for _ in 0..3 {
        db.execute("SELECT webhook.send('x', '{}', 'big')", &[])
            .unwrap();
    }
    wait_settled(&mut db, PATIENCE);
    assert_eq!(statuses(&mut db), vec!["delivered"; 3]);
    let lens: Vec<i32> = db
        .query(
            "SELECT octet_length(response_body) FROM webhook.attempts",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(lens, vec![1024; 3]);
    let written = wait_until(
        PATIENCE,
        "the server to see each connection dropped",
        || {
            let w = written.lock().unwrap().clone();
            (w.len() == 3).then_some(w)
        },
    );
    eprintln!("body bytes the server wrote before the worker dropped each connection: {written:?}");
    for n in &written {
        assert!(*n >= 1024, "the worker read the cap ({n} bytes written)");
        assert!(
            *n < SLOW / 2,
            "the server wrote {n} bytes for a 1 kB cap: the worker read far past it"
        );
    }
}

#[test]
fn ten_thousand_hanging_endpoints_do_not_stop_a_healthy_one() {
    // Hung requests outlive the whole measurement (60 s timeout), so the hanging endpoints hold
    // every slot they are allowed for as long as the healthy endpoint is timed.
    let pg = Cluster::start(&[
        ("webhook.default_timeout", "'60s'"),
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
    // "Security"); this cluster leaves it at its default (1000).
    let max_in_flight: i32 = db
        .query_one("SELECT current_setting('webhook.max_in_flight')::int", &[])
        .unwrap()
        .get(0);
    assert_eq!(max_in_flight, 1000);
    let suspect_cap = max_in_flight * 90 / 100;
    // Until the ticks only the hanging endpoints have work: what the worker holds is theirs, and
    // the connections the hanging server holds are theirs in any case.
    let mut most_hanging = 0;
    let mut most_connections = 0;
    let mut sample = |db: &mut postgres::Client| {
        let n = worker(db, "app").in_flight;
        most_hanging = most_hanging.max(n);
        most_connections = most_connections.max(held.lock().unwrap().len());
        n
    };
    // The cap is reached (within 2 %): without that, "at most 90 %" would mean nothing.
    wait_until(
        PATIENCE,
        "the hanging endpoints to fill their share",
        || (sample(&mut db) >= suspect_cap * 98 / 100).then_some(()),
    );
    // Go on sampling for a while: the worker goes on claiming for them, up to its cap only.
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        sample(&mut db);
        std::thread::sleep(Duration::from_millis(20));
    }
    let hanging_before = sample(&mut db);
    assert!(
        most_hanging <= suspect_cap,
        "the hanging endpoints held {most_hanging} requests, more than 90 % of webhook.max_in_flight ({max_in_flight})"
    );
    assert!(
        most_connections <= suspect_cap as usize,
        "the hanging server held {most_connections} connections, more than {suspect_cap}"
    );
    // The healthy endpoint still gets its deliveries through, promptly, while they all hang.
    let t = Instant::now();
    db.execute(
        "SELECT webhook.send('tick', to_jsonb(g), 'healthy') FROM generate_series(1, 20) g",
        &[],
    )
    .unwrap();
    let got = healthy.wait_for(21, Duration::from_secs(10));
    let took = t.elapsed();
    let ticks: std::collections::BTreeSet<i64> = got[1..]
        .iter()
        .map(|r| r.json()["data"].as_i64().expect("a tick number"))
        .collect();
    assert_eq!(ticks, (1..=20).collect(), "20 distinct ticks");
    let w = worker(&mut db, "app");
    let hanging_after = w.in_flight;
    let held_after = held.lock().unwrap().len();
    eprintln!(
        "healthy endpoint: 20 deliveries in {took:?}; {hanging_before} requests hanging before, \
         {hanging_after} after ({held_after} connections held); at most {most_hanging} (cap {suspect_cap})"
    );
    // Well inside the 60 s the hung requests hold their slots: a starved endpoint would wait
    // for those. (A 2 s bound failed under the full suite's load, at 2.1–2.5 s, since the
    // worker makes the deliveries of routed events itself.)
    assert!(
        took < Duration::from_secs(10),
        "the healthy endpoint's 20 deliveries took {took:?} while the others hang"
    );
    // Still hanging after the ticks: nothing timed out to make room for them.
    assert!(
        hanging_after >= suspect_cap * 98 / 100,
        "{hanging_after} still hanging"
    );
    assert!(
        held_after >= suspect_cap as usize * 98 / 100,
        "{held_after} connections held"
    );
    // worker_status answers, and the worker's own memory stays small.
    let pid = w.pid.expect("the worker runs");
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_anon_kb: u64 = status
        .lines()
        .find(|l| l.starts_with("RssAnon:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap();
    eprintln!("worker RssAnon {} MB", rss_anon_kb / 1024);
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
    Sensitive::default()
        .secret(&secret)
        .add("tok_9f8e7d6c5b4a", "an Authorization header value")
        .url(&rx.url("/"))
        .sent(&[req], &["authorization"])
        .assert_not_in_log(&pg);
}

/// A listener that records every connection made to it (a "proxy" no request may go through);
/// it answers 200 so a request that does go through it is not retried elsewhere.
fn recording_listener() -> (u16, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let port = raw_server(move |mut c| {
        let mut buf = [0u8; 4096];
        let n = c.read(&mut buf).unwrap_or(0);
        let first = String::from_utf8_lossy(&buf[..n]);
        s.lock()
            .unwrap()
            .push(first.lines().next().unwrap_or("").to_string());
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok");
    });
    (port, seen)
}

/// Stops a cluster started outside `Cluster` (which then believes it stopped), even on a panic.
struct StopOnDrop(std::path::PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = crate::harness::cluster::pg_command("pg_ctl")
            .args([
                "-D",
                self.0.to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .output();
    }
}

#[test]
fn proxies_in_the_servers_environment_are_ignored() {
    let (proxy_port, proxied) = recording_listener();
    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let tls = TlsReceiver::start();
    let mut pg = Cluster::start(&[]);
    let ca = pg.dir.join("test-ca.pem");
    tls.write_ca(&ca);
    pg.set("webhook.ssl_ca_file", &format!("'{}'", ca.display()));
    // Start the server again with every proxy variable reqwest knows pointing at the recorder.
    pg.stop("fast");
    let mut start = crate::harness::cluster::pg_command("pg_ctl");
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
        "all_proxy",
    ] {
        start.env(var, &proxy);
    }
    let out = start
        .env_remove("NO_PROXY")
        .env_remove("no_proxy")
        .args([
            "-D",
            pg.data().to_str().unwrap(),
            "-l",
            pg.log_path().to_str().unwrap(),
            "-w",
            "-t",
            "60",
            "start",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "pg_ctl start: {out:?}");
    let _stop = StopOnDrop(pg.data());

    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS webhook_ext")
        .unwrap();
    // The server really has the variables (else this test would prove nothing). The worker is
    // forked from the postmaster and inherits them; its own /proc/<pid>/environ is overwritten by
    // its process title, so the postmaster's is read.
    let postmaster_pid = std::fs::read_to_string(pg.data().join("postmaster.pid")).unwrap();
    let postmaster_pid = postmaster_pid.lines().next().unwrap().trim().to_string();
    let environ = std::fs::read(format!("/proc/{postmaster_pid}/environ")).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    for var in [
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "ALL_PROXY",
        "http_proxy",
        "https_proxy",
    ] {
        assert!(
            environ.split('\0').any(|kv| kv == format!("{var}={proxy}")),
            "the server's environment has {var}"
        );
    }
    wait_until(PATIENCE, "the worker to run", || worker(&mut db, "app").pid);
    create_endpoint(&mut db, "plain", &rx.url("/hook"));
    create_endpoint(&mut db, "tls", &tls.url());
    db.execute("SELECT webhook.send('x', '{}', 'plain')", &[])
        .unwrap();
    db.execute("SELECT webhook.send('x', '{}', 'tls')", &[])
        .unwrap();
    wait_settled(&mut db, PATIENCE);
    assert_eq!(last_error(&mut db, "plain"), ("delivered".into(), None));
    assert_eq!(last_error(&mut db, "tls"), ("delivered".into(), None));
    assert_eq!(
        rx.count(),
        1,
        "the plain request went straight to the receiver"
    );
    assert_eq!(tls.served.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(
        *proxied.lock().unwrap(),
        Vec::<String>::new(),
        "connections made to the proxy"
    );
    drop(db);
    pg.stop("fast");
}

/// A plain HTTP listener that answers 200 and closes each connection (so the next request needs
/// a new connection, hence a new lookup); records the first line of each request.
fn closing_receiver(listener: TcpListener) -> Arc<Mutex<Vec<String>>> {
    let seen: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    std::thread::spawn(move || {
        for mut c in listener.incoming().flatten() {
            let mut buf = [0u8; 8192];
            let n = c.read(&mut buf).unwrap_or(0);
            s.lock().unwrap().push(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            );
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok");
        }
    });
    seen
}

/// DNS rebinding: a real resolver in the loop (webhook.dns_servers, as in attacks.rs s12) asks a
/// nameserver that answers 127.0.0.2 (opened by webhook.allowed_networks) the first time and
/// 127.0.0.1 (refused; an "internal" service listens there on the same port) ever after, with
/// TTL 0. The guard checks the addresses the connector is handed, so the second answer is
/// refused by name and nothing ever connects to 127.0.0.1.
#[test]
fn dns_rebinding_never_reaches_the_refused_address() {
    // 127.0.0.2 and 127.0.0.1 on one port, both kept bound (no release-then-bind).
    let (outside, internal) = (0..50)
        .find_map(|_| {
            let outside = TcpListener::bind("127.0.0.2:0").unwrap();
            let port = outside.local_addr().unwrap().port();
            TcpListener::bind(("127.0.0.1", port))
                .ok()
                .map(|internal| (outside, internal))
        })
        .expect("a port free on both 127.0.0.2 and 127.0.0.1");
    let port = outside.local_addr().unwrap().port();
    let outside = closing_receiver(outside);
    let internal = closing_receiver(internal);
    let (ns, asked) =
        crate::harness::dns::rebinding_nameserver("rebind.test", [127, 0, 0, 2], [127, 0, 0, 1]);
    let pg = Cluster::start(&[
        ("webhook.allow_private_networks", "off"),
        ("webhook.allowed_networks", "'127.0.0.2/32'"),
        ("webhook.dns_servers", &format!("'{ns}'")),
        ("webhook.default_max_attempts", "1"),
        ("log_min_messages", "debug1"),
    ]);
    let mut db = pg.client_with_extension();
    let url = format!("http://rebind.test:{port}/hook?token=rb_tok_91Xz");
    let secret = create_endpoint(&mut db, "rebind", &url);
    for i in 1..=3 {
        db.execute(
            "SELECT webhook.send('x', to_jsonb($1::int), 'rebind')",
            &[&i],
        )
        .unwrap();
        wait_settled(&mut db, PATIENCE);
    }
    let rows: Vec<(String, Option<String>)> = db
        .query(
            "SELECT status::text, last_error FROM webhook.deliveries ORDER BY id",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(
        rows[0],
        ("delivered".into(), None),
        "the first answer is allowed"
    );
    for (status, err) in &rows[1..] {
        assert_eq!(status, "failed");
        let err = err.as_deref().unwrap_or_default();
        assert!(
            err.starts_with("refused to connect to 127.0.0.1: loopback address"),
            "refused for the rebound address: {err}"
        );
    }
    assert!(
        asked.load(std::sync::atomic::Ordering::SeqCst) >= 3,
        "the nameserver was asked for each delivery (rebinding was tried)"
    );
    assert_eq!(outside.lock().unwrap().len(), 1, "one request to 127.0.0.2");
    assert_eq!(
        *internal.lock().unwrap(),
        Vec::<String>::new(),
        "connections made to the refused address"
    );
    Sensitive::default()
        .secret(&secret)
        .url(&url)
        .add("rb_tok_91Xz", "a token in a URL")
        .assert_not_in_log(&pg);
}

/// DROP EXTENSION webhook_ext CASCADE and DROP SCHEMA webhook CASCADE lock the tables that
/// carry webhook's triggers before Postgres runs them (src/pg/gate.rs), but only for a role that
/// owns the extension: anyone else is refused at once and holds up no writer meanwhile. With the locks
/// taken for everyone, the refused DROP would wait for the open writer and end in lock_timeout.
#[test]
fn a_drop_postgres_will_refuse_takes_no_lock_on_the_users_tables() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    db.batch_execute(
        "CREATE TABLE users (id int PRIMARY KEY);
         CREATE ROLE mallory LOGIN;
         GRANT ALL ON users TO mallory;
         GRANT CREATE ON SCHEMA public TO mallory;",
    )
    .unwrap();
    create_endpoint(&mut db, "crm", &rx.url("/"));
    db.execute("SELECT webhook.subscribe('users', 'crm')", &[])
        .unwrap();
    let mut writer = pg.client();
    writer
        .batch_execute("BEGIN; INSERT INTO users VALUES (1)")
        .unwrap();
    let mut m = pg.client_as("mallory", "app");
    m.batch_execute("SET lock_timeout = '2s'").unwrap();
    for (sql, message) in [
        (
            "DROP EXTENSION webhook_ext CASCADE",
            "must be owner of extension webhook_ext",
        ),
        (
            "DROP SCHEMA webhook CASCADE",
            "must be owner of schema webhook",
        ),
        (
            "ALTER EXTENSION webhook_ext UPDATE",
            "must be owner of extension webhook_ext",
        ),
    ] {
        let e = db_error(m.batch_execute(sql), sql);
        assert_eq!((e.code().code(), e.message()), ("42501", message), "{sql}");
    }
    writer.batch_execute("COMMIT").unwrap();
    rx.wait_for(1, PATIENCE);
}
