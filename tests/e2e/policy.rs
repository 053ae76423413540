//! End-to-end: the delivery policy against receivers that misbehave on purpose — status classes,
//! Retry-After, 410, redirects, timeouts, dead letters and redelivery, per-endpoint limits, the
//! circuit breaker, ordered endpoints, secret rotation, response caps, purge and retention.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::harness::*;

fn send(db: &mut postgres::Client, endpoint: &str, n: i64) {
    db.execute(
        "SELECT webhook.send('seq', jsonb_build_object('n', g), $1) FROM generate_series(1, $2::bigint) g",
        &[&endpoint, &n],
    )
    .unwrap();
}

fn one_delivery(db: &mut postgres::Client) -> (String, i32, Option<i32>, Option<String>) {
    let r = db
        .query_one(
            "SELECT status::text, attempts, last_status_code, last_error FROM webhook.deliveries",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

fn gaps(reqs: &[Request]) -> Vec<Duration> {
    reqs.windows(2).map(|w| w[1].at - w[0].at).collect()
}

#[test]
fn client_errors_are_retried_and_end_failed_after_the_endpoints_max_attempts() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::status(400).body("bad payload")));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('e', $1, max_attempts => 2)",
        &[&rx.url("/")],
    )
    .unwrap();
    send(&mut db, "e", 1);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(rx.count(), 2);
    assert_eq!(
        one_delivery(&mut db),
        (
            "failed".into(),
            2,
            Some(400),
            Some("HTTP 400 (gave up after 2 attempts)".into())
        )
    );
    let bodies: Vec<Option<String>> = db
        .query(
            "SELECT response_body FROM webhook.attempts ORDER BY attempt",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(bodies, vec![Some("bad payload".to_string()); 2]);
}

#[test]
fn redirects_are_failures_and_never_followed() {
    let pg = Cluster::start(&[]);
    let target = Receiver::start(always(Reply::ok()));
    let location = target.url("/elsewhere");
    let rx = Receiver::start(Arc::new(move |_, _| {
        Reply::status(301).header("location", &location)
    }));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('e', $1, max_attempts => 2)",
        &[&rx.url("/")],
    )
    .unwrap();
    send(&mut db, "e", 1);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(target.count(), 0, "the redirect was not followed");
    assert_eq!(
        one_delivery(&mut db),
        (
            "failed".into(),
            2,
            Some(301),
            Some("HTTP 301: redirects are not followed (gave up after 2 attempts)".into())
        )
    );
}

#[test]
fn gone_disables_the_endpoint_and_cancels_its_backlog() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::status(410).after(Duration::from_millis(200))));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('e', $1, max_in_flight => 1)",
        &[&rx.url("/")],
    )
    .unwrap();
    send(&mut db, "e", 5);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(rx.count(), 1, "nothing is sent after 410");
    let (enabled, reason): (bool, String) = {
        let r = db
            .query_one(
                "SELECT enabled, disabled_reason FROM webhook.endpoints",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(!enabled);
    assert!(
        reason.starts_with("receiver answered 410 Gone at "),
        "{reason}"
    );
    let rows = deliveries(&mut db);
    assert_eq!(rows.iter().filter(|(_, s, _)| s == "failed").count(), 1);
    assert_eq!(rows.iter().filter(|(_, s, _)| s == "cancelled").count(), 4);
    let err: String = db
        .query_one(
            "SELECT last_error FROM webhook.deliveries WHERE status = 'failed'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(err, "HTTP 410: endpoint disabled");
}

#[test]
fn retry_after_in_seconds_and_as_a_date_is_honoured_within_clamps() {
    let pg = Cluster::start(&[
        ("webhook.retry_schedule", "'1s,1s,1s'"),
        ("webhook.circuit_breaker_threshold", "0"),
    ]);
    // 503 with Retry-After: 2 (seconds), then 429 with Retry-After as an HTTP date ~2 s ahead,
    // then 503 with Retry-After: 3600 (clamped to 2 x 1 s), then 200.
    let rx = Receiver::start(Arc::new(|_, n| match n {
        0 => Reply::status(503).header("retry-after", "2"),
        1 => Reply::status(429).header(
            "retry-after",
            &httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(3)),
        ),
        2 => Reply::status(503).header("retry-after", "3600"),
        _ => Reply::ok(),
    }));
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "e", &rx.url("/"));
    send(&mut db, "e", 1);
    let reqs = rx.wait_for(4, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    let g = gaps(&reqs);
    let within = |d: Duration, lo: f64, hi: f64| d.as_secs_f64() >= lo && d.as_secs_f64() <= hi;
    // Base step 1 s (±20 %), Retry-After clamped into [step, 2 x step].
    assert!(within(g[0], 1.9, 2.6), "Retry-After: 2 -> {:?}", g[0]);
    assert!(
        within(g[1], 1.5, 2.6),
        "Retry-After: <date ~2-3 s ahead> -> {:?}",
        g[1]
    );
    assert!(
        within(g[2], 1.9, 2.6),
        "Retry-After: 3600 clamped to 2 s -> {:?}",
        g[2]
    );
    assert_eq!(one_delivery(&mut db).0, "delivered");
}

#[test]
fn timeouts_are_retried_and_the_endpoint_timeout_applies() {
    let pg = Cluster::start(&[("webhook.retry_schedule", "'300ms'")]);
    let rx = Receiver::start(Arc::new(|_, n| {
        if n == 0 {
            Reply::ok().after(Duration::from_secs(3))
        } else {
            Reply::ok()
        }
    }));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('e', $1, timeout => '500ms')",
        &[&rx.url("/")],
    )
    .unwrap();
    send(&mut db, "e", 1);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(one_delivery(&mut db).0, "delivered");
    let first: (Option<i32>, String) = {
        let r = db
            .query_one(
                "SELECT status_code, error FROM webhook.attempts WHERE attempt = 1",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(first, (None, "timed out after 500 ms".to_string()));
}

#[test]
fn alter_endpoint_applies_to_pending_deliveries() {
    let pg = Cluster::start(&[
        ("webhook.retry_schedule", "'1s'"),
        ("webhook.circuit_breaker_threshold", "0"),
    ]);
    let rx = Receiver::start(always(Reply::status(500)));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('e', $1, max_attempts => 50)",
        &[&rx.url("/")],
    )
    .unwrap();
    send(&mut db, "e", 1);
    rx.wait_for(1, PATIENCE);
    db.execute("SELECT webhook.alter_endpoint('e', max_attempts => 2)", &[])
        .unwrap();
    wait_settled(&mut db, PATIENCE);
    assert_eq!(one_delivery(&mut db).0, "failed");
    assert_eq!(rx.count(), 2);
}

#[test]
fn retry_resends_a_dead_letter_with_the_same_id_and_replay_makes_new_ones() {
    let pg = Cluster::start(&[]);
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let rx = Receiver::start(Arc::new(move |_, _| {
        if h.load(Ordering::SeqCst) {
            Reply::ok()
        } else {
            Reply::status(500)
        }
    }));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('e', $1, max_attempts => 1)",
        &[&rx.url("/")],
    )
    .unwrap();
    send(&mut db, "e", 3);
    wait_settled(&mut db, PATIENCE);
    let outcomes: Vec<(String, i32)> = deliveries(&mut db)
        .into_iter()
        .map(|(_, status, attempts)| (status, attempts))
        .collect();
    assert_eq!(outcomes, vec![("failed".to_string(), 1); 3]);
    healthy.store(true, Ordering::SeqCst);
    let first: i64 = db
        .query_one("SELECT min(id) FROM webhook.deliveries", &[])
        .unwrap()
        .get(0);
    db.execute("SELECT webhook.retry($1)", &[&first]).unwrap();
    wait_settled(&mut db, PATIENCE);
    let reqs = rx.requests();
    assert_eq!(reqs.len(), 4);
    assert_eq!(
        reqs[3].webhook_id(),
        reqs.iter()
            .take(3)
            .find(|r| delivery_id(r) == first)
            .unwrap()
            .webhook_id()
    );
    let row: (String, i32) = {
        let r = db
            .query_one(
                "SELECT status::text, attempts FROM webhook.deliveries WHERE id = $1",
                &[&first],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        row,
        ("delivered".into(), 2),
        "attempts continue from where they stopped"
    );

    let n: i64 = db
        .query_one("SELECT webhook.replay('e', now() - interval '1 hour')", &[])
        .unwrap()
        .get(0);
    assert_eq!(n, 3);
    let reqs = rx.wait_for(7, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    let replayed: HashSet<String> = reqs[4..].iter().map(|r| r.webhook_id()).collect();
    let earlier: HashSet<String> = reqs[..4].iter().map(|r| r.webhook_id()).collect();
    assert_eq!(replayed.len(), 3);
    assert!(
        replayed.is_disjoint(&earlier),
        "replays are new deliveries with new ids"
    );
    assert_eq!(
        deliveries(&mut db)
            .iter()
            .filter(|(_, s, _)| s == "delivered")
            .count(),
        4
    );
}

#[test]
fn max_in_flight_is_never_exceeded() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok().after(Duration::from_millis(100))));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('e', $1, max_in_flight => 5)",
        &[&rx.url("/")],
    )
    .unwrap();
    send(&mut db, "e", 60);
    rx.wait_for(60, PATIENCE);
    assert_eq!(rx.max_concurrent(), 5);
}

#[test]
fn rate_limit_holds_and_does_not_starve_other_endpoints() {
    let pg = Cluster::start(&[]);
    let limited = Receiver::start(always(Reply::ok()));
    let other = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('limited', $1, rate_limit => 20)",
        &[&limited.url("/")],
    )
    .unwrap();
    create_endpoint(&mut db, "other", &other.url("/"));
    send(&mut db, "limited", 100);
    send(&mut db, "other", 50);
    let got = other.wait_for(50, Duration::from_secs(3));
    assert!(
        limited.count() < 100,
        "the other endpoint finished while the limited one was still going"
    );
    drop(got);
    let reqs = limited.wait_for(100, PATIENCE);
    // Steady rate over the whole run, first request excluded.
    let span = (reqs[99].at - reqs[0].at).as_secs_f64();
    let rate = 99.0 / span;
    assert!(
        (18.0..=22.0).contains(&rate),
        "rate {rate:.2}/s for a limit of 20/s"
    );
}

#[test]
fn circuit_opens_after_consecutive_failures_probes_one_at_a_time_and_closes() {
    let pg = Cluster::start(&[
        ("webhook.circuit_breaker_threshold", "3"),
        (
            "webhook.retry_schedule",
            "'500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms,500ms'",
        ),
    ]);
    let healthy = Arc::new(AtomicBool::new(false));
    let h = healthy.clone();
    let rx = Receiver::start(Arc::new(move |_, _| {
        if h.load(Ordering::SeqCst) {
            Reply::ok()
        } else {
            Reply::status(500).after(Duration::from_millis(20))
        }
    }));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('e', $1, max_in_flight => 1)",
        &[&rx.url("/")],
    )
    .unwrap();
    send(&mut db, "e", 40);
    std::thread::sleep(Duration::from_millis(2500));
    let while_open = rx.count();
    // 3 failures open the circuit; then one probe per ~500 ms: far fewer than 40 requests.
    assert!(
        (3..=12).contains(&while_open),
        "{while_open} requests while failing"
    );
    let (circuit, failures): (String, i32) = {
        let r = db
            .query_one(
                "SELECT circuit, consecutive_failures FROM webhook.endpoint_stats",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert!(circuit == "open" || circuit == "half-open", "{circuit}");
    assert!(failures >= 3);
    healthy.store(true, Ordering::SeqCst);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(
        deliveries(&mut db)
            .iter()
            .filter(|(_, s, _)| s == "delivered")
            .count(),
        40
    );
    let circuit: String = db
        .query_one("SELECT circuit FROM webhook.endpoint_stats", &[])
        .unwrap()
        .get(0);
    assert_eq!(circuit, "closed");
}

#[test]
fn an_endpoint_failing_too_long_is_disabled_with_the_reason() {
    let pg = Cluster::start(&[
        ("webhook.circuit_breaker_threshold", "2"),
        ("webhook.auto_disable_after", "'2s'"),
        (
            "webhook.retry_schedule",
            "'300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms'",
        ),
    ]);
    let rx = Receiver::start(always(Reply::status(502)));
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "e", &rx.url("/"));
    send(&mut db, "e", 5);
    let reason: String = wait_until(PATIENCE, "auto-disable", || {
        db.query_one(
            "SELECT disabled_reason FROM webhook.endpoints WHERE NOT enabled",
            &[],
        )
        .ok()
        .map(|r| r.get(0))
    });
    assert!(
        reason.starts_with("failing without a success since "),
        "{reason}"
    );
    assert!(
        reason.ends_with("(webhook.auto_disable_after = 2 s)"),
        "{reason}"
    );
    wait_settled(&mut db, PATIENCE);
    assert!(deliveries(&mut db).iter().any(|(_, s, _)| s == "cancelled"));
    // Enabling it again gives the breaker a fresh start.
    db.execute("SELECT webhook.enable_endpoint('e')", &[])
        .unwrap();
    let failures: i32 = db
        .query_one(
            "SELECT consecutive_failures FROM webhook.endpoint_stats",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(failures, 0);
}

#[test]
fn ordered_endpoint_delivers_in_order_through_failures() {
    let pg = Cluster::start(&[("webhook.retry_schedule", "'100ms,100ms,100ms,100ms,100ms'")]);
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    // Every third request fails (500, then a timeout-free hang-up), so heads are retried.
    let rx = Receiver::start(Arc::new(move |_, _| {
        let n = c.fetch_add(1, Ordering::SeqCst);
        match n % 3 {
            2 if n.is_multiple_of(2) => Reply::status(500),
            2 => Reply {
                hang_up: true,
                ..Reply::ok()
            },
            _ => Reply::ok().after(Duration::from_millis(5)),
        }
    }));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('e', $1, ordered => true)",
        &[&rx.url("/")],
    )
    .unwrap();
    db.batch_execute("CREATE TABLE items (n int PRIMARY KEY); SELECT webhook.subscribe('items', 'e', events => '{INSERT}')")
        .unwrap();
    for n in 1..=50 {
        db.execute("INSERT INTO items VALUES ($1)", &[&n]).unwrap();
    }
    wait_settled(&mut db, Duration::from_secs(60));
    assert_eq!(rx.max_concurrent(), 1, "one delivery at a time");
    // The successful deliveries arrived in order; a failed head was retried before the next went.
    let attempts = db
        .query(
            "SELECT e.payload->'new'->>'n', a.status_code FROM webhook.attempts a
               JOIN webhook.deliveries d ON d.id = a.delivery_id JOIN webhook.events e ON e.id = d.event_id
              ORDER BY a.started_at",
            &[],
        )
        .unwrap();
    let delivered: Vec<i32> = attempts
        .iter()
        .filter(|r| r.get::<_, Option<i32>>(1) == Some(200))
        .map(|r| r.get::<_, String>(0).parse().unwrap())
        .collect();
    assert_eq!(delivered, (1..=50).collect::<Vec<_>>());
    assert!(
        attempts.len() > 55,
        "failures were injected: {} attempts",
        attempts.len()
    );
    assert_eq!(statuses(&mut db), vec!["delivered"; 50]);
}

#[test]
fn both_signatures_verify_during_rotation_and_only_the_new_one_after() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    let old = create_endpoint(&mut db, "e", &rx.url("/"));
    let new: String = db
        .query_one(
            "SELECT webhook.rotate_secret('e', grace => '2 seconds')",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(new.starts_with("whsec_") && new != old);
    send(&mut db, "e", 1);
    let during = rx.wait_for(1, PATIENCE).remove(0);
    assert_eq!(
        during
            .header("webhook-signature")
            .unwrap()
            .split(' ')
            .count(),
        2
    );
    verify_with_standardwebhooks(&old, &during)
        .expect("the old secret verifies during the grace period");
    verify_with_standardwebhooks(&new, &during)
        .expect("the new secret verifies during the grace period");
    std::thread::sleep(Duration::from_millis(2200));
    send(&mut db, "e", 1);
    let after = rx.wait_for(2, PATIENCE).remove(1);
    assert_eq!(
        after
            .header("webhook-signature")
            .unwrap()
            .split(' ')
            .count(),
        1
    );
    verify_with_standardwebhooks(&new, &after).unwrap();
    assert!(
        verify_with_standardwebhooks(&old, &after).is_err(),
        "the old secret no longer verifies"
    );
}

#[test]
fn a_one_gib_response_is_cut_at_the_cap() {
    let pg = Cluster::start(&[("webhook.response_body_limit", "'1kB'")]);
    let rx = Receiver::start(always(Reply::ok().streaming(1 << 30)));
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "e", &rx.url("/"));
    send(&mut db, "e", 3);
    wait_settled(&mut db, PATIENCE);
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
    assert_eq!(statuses(&mut db), vec!["delivered"; 3]);
    // The worker read the cap and dropped the connection: nowhere near a GiB crossed the wire.
    assert!(
        rx.streamed() < 3 * 64 * 1024 * 1024,
        "{} bytes streamed",
        rx.streamed()
    );
}

#[test]
fn purge_and_retention_leave_pending_work_alone() {
    let pg = Cluster::start(&[("webhook.retry_schedule", "'1h'")]);
    let ok = Receiver::start(always(Reply::ok()));
    let down = Receiver::start(always(Reply::status(503)));
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "ok", &ok.url("/"));
    create_endpoint(&mut db, "down", &down.url("/"));
    send(&mut db, "ok", 20);
    send(&mut db, "down", 5);
    down.wait_for(5, PATIENCE);
    ok.wait_for(20, PATIENCE);
    wait_until(PATIENCE, "results recorded", || {
        let n = count(
            &mut db,
            "SELECT count(*) FROM webhook.deliveries WHERE status = 'delivered'",
        );
        let m = count(&mut db, "SELECT count(*) FROM webhook.attempts");
        (n == 20 && m == 25).then_some(())
    });
    let purged: i64 = db
        .query_one("SELECT webhook.purge('0 seconds')", &[])
        .unwrap()
        .get(0);
    assert_eq!(purged, 20);
    assert_eq!(
        history_counts(&mut db),
        (5, 5, 5),
        "the 5 pending deliveries, their events and attempts stay"
    );

    // Retention: the worker purges finished history on its own.
    send(&mut db, "ok", 10);
    ok.wait_for(30, PATIENCE);
    pg.set("webhook.retention", "'2s'");
    pg.reload();
    wait_until(PATIENCE, "the worker to purge delivered history", || {
        let n = count(
            &mut db,
            "SELECT count(*) FROM webhook.deliveries WHERE status = 'delivered'",
        );
        (n == 0).then_some(())
    });
    let pending = count(
        &mut db,
        "SELECT count(*) FROM webhook.deliveries WHERE status = 'pending'",
    );
    assert_eq!(pending, 5);
    let events = count(&mut db, "SELECT count(*) FROM webhook.events");
    assert_eq!(events, 5);
}

#[test]
fn endpoint_stats_reports_queue_outcomes_and_latency() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(Arc::new(|_, n| {
        if n % 2 == 0 {
            Reply::ok()
        } else {
            Reply::status(500)
        }
    }));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('e', $1, max_attempts => 1, max_in_flight => 1)",
        &[&rx.url("/")],
    )
    .unwrap();
    send(&mut db, "e", 10);
    wait_settled(&mut db, PATIENCE);
    let r = db
        .query_one(
            "SELECT pending, sending, delivered, failed, attempts_last_hour, success_rate::float8,
                    latency_p50 IS NOT NULL AND latency_p95 >= latency_p50, circuit, next_attempt_at IS NULL
               FROM webhook.endpoint_stats WHERE name = 'e'",
            &[],
        )
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 0);
    assert_eq!(r.get::<_, i64>(1), 0);
    assert_eq!(r.get::<_, i64>(2), 5);
    assert_eq!(r.get::<_, i64>(3), 5);
    assert_eq!(r.get::<_, i64>(4), 10);
    assert_eq!(r.get::<_, f64>(5), 0.5);
    assert!(r.get::<_, bool>(6));
    assert_eq!(r.get::<_, String>(7), "closed");
    assert!(r.get::<_, bool>(8));
}
