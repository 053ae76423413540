//! End-to-end: a real cluster with webhook_ext preloaded, real receivers on 127.0.0.1.
//! The core pipeline: commit -> signed request -> recorded delivery; retries; crashes.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::*;

/// Sets webhook.paused with ALTER SYSTEM and reloads; when pausing, waits for the worker to say
/// it is paused.
fn pause_the_worker(db: &mut postgres::Client, paused: bool) {
    db.batch_execute(&format!(
        "ALTER SYSTEM SET webhook.paused = {}",
        if paused { "on" } else { "off" }
    ))
    .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    if paused {
        wait_until(PATIENCE, "the worker to pause", || {
            (worker_state(db, "app").as_deref() == Some("paused")).then_some(())
        });
    }
}

fn users_table(db: &mut postgres::Client) {
    db.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS webhook_ext;
         CREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL, plan text DEFAULT 'free', secret_note text);",
    )
    .unwrap();
}

#[test]
fn committed_insert_arrives_signed_and_is_recorded() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    users_table(&mut db);
    let secret = create_endpoint(&mut db, "crm", &rx.url("/hooks"));
    db.execute(
        "SELECT webhook.subscribe('users', 'crm', events => '{INSERT}')",
        &[],
    )
    .unwrap();
    db.execute("INSERT INTO users (email) VALUES ('ada@example.com')", &[])
        .unwrap();

    let req = rx.wait_for(1, PATIENCE).remove(0);
    verify_with_standardwebhooks(&secret, &req)
        .expect("signature verifies with the standardwebhooks crate");
    assert_eq!(req.path, "/hooks");
    assert_eq!(req.header("content-type"), Some("application/json"));
    assert!(req
        .header("user-agent")
        .unwrap()
        .starts_with("webhook_ext/"));
    let body = req.json();
    assert_eq!(body["type"], "public.users.insert");
    assert!(body["timestamp"].as_str().unwrap().ends_with('Z'));
    let data = &body["data"];
    assert_eq!(data["schema"], "public");
    assert_eq!(data["table"], "users");
    assert_eq!(data["op"], "INSERT");
    assert_eq!(data["new"]["email"], "ada@example.com");
    assert_eq!(data["new"]["plan"], "free");
    assert!(data["old"].is_null());
    assert!(data["txid"].as_i64().unwrap() > 0);

    wait_settled(&mut db, PATIENCE);
    let row = db
        .query_one(
            "SELECT d.status::text, d.attempts, d.last_status_code, d.delivered_at IS NOT NULL, e.type, e.payload::text
               FROM webhook.deliveries d JOIN webhook.events e ON e.id = d.event_id",
            &[],
        )
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "delivered");
    assert_eq!(row.get::<_, i32>(1), 1);
    assert_eq!(row.get::<_, Option<i32>>(2), Some(200));
    assert!(row.get::<_, bool>(3));
    assert_eq!(row.get::<_, String>(4), "public.users.insert");
    // What was stored is what was signed.
    let stored: serde_json::Value = serde_json::from_str(&row.get::<_, String>(5)).unwrap();
    assert_eq!(stored, body["data"]);
    let att = db
        .query_one(
            "SELECT attempt, status_code, response_body, error FROM webhook.attempts",
            &[],
        )
        .unwrap();
    assert_eq!(att.get::<_, i32>(0), 1);
    assert_eq!(att.get::<_, Option<i32>>(1), Some(200));
    assert_eq!(att.get::<_, Option<String>>(2).as_deref(), Some("ok"));
    assert_eq!(att.get::<_, Option<String>>(3), None);
}

#[test]
fn rolled_back_insert_sends_nothing() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    users_table(&mut db);
    create_endpoint(&mut db, "crm", &rx.url("/"));
    db.execute("SELECT webhook.subscribe('users', 'crm')", &[])
        .unwrap();

    let mut tx = db.transaction().unwrap();
    tx.execute(
        "INSERT INTO users (email) VALUES ('ghost@example.com')",
        &[],
    )
    .unwrap();
    tx.rollback().unwrap();
    // A later committed insert proves the worker is awake; the rolled-back one never shows up.
    db.execute("INSERT INTO users (email) VALUES ('real@example.com')", &[])
        .unwrap();
    let reqs = rx.wait_for(1, PATIENCE);
    std::thread::sleep(Duration::from_millis(500));
    let reqs = if rx.count() > reqs.len() {
        rx.requests()
    } else {
        reqs
    };
    assert_eq!(reqs.len(), 1);
    assert_eq!(reqs[0].json()["data"]["new"]["email"], "real@example.com");
    let events = count(&mut db, "SELECT count(*) FROM webhook.events");
    assert_eq!(events, 1);
}

#[test]
fn update_and_delete_carry_old_and_new_and_respect_the_column_filter() {
    let pg = Cluster::start(&[]);
    let all = Receiver::start(always(Reply::ok()));
    let some = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    users_table(&mut db);
    create_endpoint(&mut db, "all", &all.url("/"));
    create_endpoint(&mut db, "plans", &some.url("/"));
    db.execute("SELECT webhook.subscribe('users', 'all')", &[])
        .unwrap();
    db.execute(
        "SELECT webhook.subscribe('users', 'plans', events => '{UPDATE}', columns => '{id,plan}')",
        &[],
    )
    .unwrap();
    db.batch_execute(
        "INSERT INTO users (email) VALUES ('a@example.com');
         UPDATE users SET secret_note = 'not watched by plans';
         UPDATE users SET plan = 'pro';
         DELETE FROM users;",
    )
    .unwrap();

    // Deliveries to an unordered endpoint run concurrently: put them back in event order.
    let mut reqs = all.wait_for(4, PATIENCE);
    reqs.sort_by_key(delivery_id);
    let ops: Vec<String> = reqs
        .iter()
        .map(|r| r.json()["data"]["op"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ops, ["INSERT", "UPDATE", "UPDATE", "DELETE"]);
    let upd = reqs[2].json();
    assert_eq!(upd["type"], "public.users.update");
    assert_eq!(upd["data"]["old"]["plan"], "free");
    assert_eq!(upd["data"]["new"]["plan"], "pro");
    let del = reqs[3].json();
    assert_eq!(del["type"], "public.users.delete");
    assert!(del["data"]["new"].is_null());
    assert_eq!(del["data"]["old"]["email"], "a@example.com");

    // "plans" sees only the UPDATE that changed a watched column, and only those columns.
    let got = some.wait_for(1, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(
        some.count(),
        1,
        "the update of an unwatched column must not fire"
    );
    let body = got[0].json();
    assert_eq!(
        body["data"]["old"],
        serde_json::json!({"id": 1, "plan": "free"})
    );
    assert_eq!(
        body["data"]["new"],
        serde_json::json!({"id": 1, "plan": "pro"})
    );
}

#[test]
fn when_condition_and_hand_written_trigger() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    users_table(&mut db);
    create_endpoint(&mut db, "pro", &rx.url("/"));
    db.execute("SELECT webhook.subscribe('users', 'pro', events => '{INSERT}', \"when\" => $$NEW.plan = 'pro'$$)", &[])
        .unwrap();
    db.batch_execute(
        "CREATE TABLE orders (id int PRIMARY KEY, total numeric);
         SELECT webhook.allow_publish('orders', 'pro');
         CREATE TRIGGER orders_hook AFTER INSERT ON orders FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('pro');
         INSERT INTO users (email, plan) VALUES ('free@example.com', 'free'), ('pro@example.com', 'pro');
         INSERT INTO orders VALUES (7, 12.50);",
    )
    .unwrap();
    let reqs = rx.wait_for(2, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(rx.count(), 2);
    let mut types: Vec<String> = reqs
        .iter()
        .map(|r| r.json()["type"].as_str().unwrap().to_string())
        .collect();
    types.sort();
    assert_eq!(types, ["public.orders.insert", "public.users.insert"]);
    let user = reqs
        .iter()
        .find(|r| r.json()["type"] == "public.users.insert")
        .unwrap()
        .json();
    assert_eq!(user["data"]["new"]["email"], "pro@example.com");
    let order = reqs
        .iter()
        .find(|r| r.json()["type"] == "public.orders.insert")
        .unwrap()
        .json();
    assert_eq!(order["data"]["new"]["total"], 12.50);
}

#[test]
fn send_reaches_named_and_matching_endpoints() {
    let pg = Cluster::start(&[]);
    let billing = Receiver::start(always(Reply::ok()));
    let audit = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    let secret = create_endpoint(&mut db, "billing", &billing.url("/"));
    db.execute(
        "SELECT webhook.create_endpoint('audit', $1, event_types => '{invoice.*}')",
        &[&audit.url("/")],
    )
    .unwrap();
    let id: i64 = db
        .query_one("SELECT webhook.send('invoice.paid', '{\"invoice\": 42, \"amount\": 9.99}', endpoint => 'billing')", &[])
        .unwrap()
        .get(0);
    assert!(id > 0);
    // Broadcast: every endpoint whose event_types match (billing has none = all).
    db.execute(
        "SELECT webhook.send('invoice.voided', '{\"invoice\": 43}')",
        &[],
    )
    .unwrap();
    db.execute("SELECT webhook.send('user.login', '{\"user\": 1}')", &[])
        .unwrap();

    let got = billing.wait_for(3, PATIENCE);
    let first = got
        .iter()
        .find(|r| r.json()["type"] == "invoice.paid")
        .unwrap();
    verify_with_standardwebhooks(&secret, first).unwrap();
    assert_eq!(
        first.json()["data"],
        serde_json::json!({"invoice": 42, "amount": 9.99})
    );
    let a = audit.wait_for(1, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(audit.count(), 1);
    assert_eq!(a[0].json()["type"], "invoice.voided");
    // Naming an endpoint is explicit: its event_types filter only what is routed by type.
    db.execute(
        "SELECT webhook.send('user.login', '{\"user\": 2}', endpoint => 'audit')",
        &[],
    )
    .unwrap();
    let a = audit.wait_for(2, PATIENCE);
    assert_eq!(a[1].json()["type"], "user.login");
    assert_eq!(a[1].json()["data"], serde_json::json!({"user": 2}));
}

#[test]
fn a_subscriptions_events_pass_the_endpoints_event_types() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('updates', $1, event_types => '{public.items.update}')",
        &[&rx.url("/")],
    )
    .unwrap();
    db.batch_execute(
        "CREATE TABLE items (id int PRIMARY KEY, v text);
         SELECT webhook.subscribe('items', 'updates');
         INSERT INTO items VALUES (1, 'a'), (2, 'b');
         UPDATE items SET v = 'c' WHERE id = 1;
         DELETE FROM items WHERE id = 2;",
    )
    .unwrap();
    let got = rx.wait_for(1, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(rx.count(), 1, "only the update passes the filter");
    assert_eq!(got[0].json()["type"], "public.items.update");
    let deliveries: i64 = db
        .query_one("SELECT count(*) FROM webhook.deliveries", &[])
        .unwrap()
        .get(0);
    assert_eq!(deliveries, 1, "filtered events make no delivery rows");
}

#[test]
fn server_errors_are_retried_with_one_webhook_id() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(Arc::new(|_, n| {
        if n < 2 {
            Reply::status(500).body("boom")
        } else {
            Reply::ok()
        }
    }));
    let mut db = pg.client();
    users_table(&mut db);
    let secret = create_endpoint(&mut db, "crm", &rx.url("/"));
    db.execute("SELECT webhook.subscribe('users', 'crm')", &[])
        .unwrap();
    db.execute(
        "INSERT INTO users (email) VALUES ('retry@example.com')",
        &[],
    )
    .unwrap();

    let reqs = rx.wait_for(3, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    let ids: HashSet<String> = reqs.iter().map(|r| r.webhook_id()).collect();
    assert_eq!(ids.len(), 1, "every retry carries the same webhook-id");
    for r in &reqs {
        verify_with_standardwebhooks(&secret, r).unwrap();
    }
    // Event 1 to endpoint 1: delivery id 1 * 2^20 + 1.
    assert_eq!(
        deliveries(&mut db),
        vec![(1048577, "delivered".to_string(), 3)]
    );
    assert!(reqs[0].webhook_id().ends_with("_1048577"));
    type Attempt = (i32, Option<i32>, Option<String>, Option<String>);
    let attempts: Vec<Attempt> = db
        .query("SELECT attempt, status_code, response_body, error FROM webhook.attempts ORDER BY attempt", &[])
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
        .collect();
    assert_eq!(attempts.len(), 3);
    assert_eq!(
        attempts[0],
        (1, Some(500), Some("boom".into()), Some("HTTP 500".into()))
    );
    assert_eq!(attempts[2], (3, Some(200), Some("ok".into()), None));
    // The schedule (200ms, 400ms, ±20 %) spaced the attempts out.
    assert!(reqs[1].at - reqs[0].at >= Duration::from_millis(150));
    assert!(reqs[2].at - reqs[1].at >= Duration::from_millis(300));
}

#[test]
fn failing_receiver_ends_in_failed_after_max_attempts() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::status(503)));
    let mut db = pg.client();
    users_table(&mut db);
    create_endpoint(&mut db, "crm", &rx.url("/"));
    db.execute("SELECT webhook.subscribe('users', 'crm')", &[])
        .unwrap();
    db.execute("INSERT INTO users (email) VALUES ('x@example.com')", &[])
        .unwrap();
    wait_settled(&mut db, PATIENCE);
    // Schedule of 3 steps -> 4 attempts by default.
    assert_eq!(
        deliveries(&mut db),
        vec![(1048577, "failed".to_string(), 4)]
    );
    assert_eq!(rx.count(), 4);
    let err: String = db
        .query_one("SELECT last_error FROM webhook.deliveries", &[])
        .unwrap()
        .get(0);
    assert_eq!(err, "HTTP 503 (gave up after 4 attempts)");
}

#[test]
fn receiver_down_then_back_is_delivered_and_the_insert_never_fails() {
    let pg = Cluster::start(&[(
        "webhook.retry_schedule",
        "'300ms,300ms,300ms,300ms,300ms,300ms,300ms,300ms'",
    )]);
    let down = Down::new();
    let mut db = pg.client();
    users_table(&mut db);
    let secret = create_endpoint(
        &mut db,
        "crm",
        &format!("http://127.0.0.1:{}/", down.port()),
    );
    db.execute("SELECT webhook.subscribe('users', 'crm')", &[])
        .unwrap();
    // Nothing listens: the user's statements still succeed.
    for i in 0..5 {
        db.execute(
            "INSERT INTO users (email) VALUES ($1)",
            &[&format!("u{i}@example.com")],
        )
        .unwrap();
    }
    wait_until(PATIENCE, "a failed attempt", || {
        let n = count(
            &mut db,
            "SELECT count(*) FROM webhook.attempts WHERE error LIKE 'connection failed%'",
        );
        (n >= 5).then_some(())
    });
    let rx = Receiver::start_at(down, always(Reply::ok()));
    let reqs = rx.wait_for(5, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    for r in &reqs {
        verify_with_standardwebhooks(&secret, r).unwrap();
    }
    let rows = deliveries(&mut db);
    assert_eq!(rows.len(), 5, "one delivery per insert: {rows:?}");
    assert!(
        rows.iter().all(|(_, s, a)| s == "delivered" && *a >= 2),
        "{rows:?}"
    );
}

/// What the crash test's receiver saw: requests held open until after the crash, and those that
/// arrived after the restart (webhook-id, email), each in arrival order.
#[derive(Default)]
struct CrashLog {
    open: bool,
    held: Vec<(String, String)>,
    after: Vec<(String, String)>,
}

fn email_of(req: &Request) -> String {
    req.json()["data"]["new"]["email"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn crash_with_two_thousand_in_flight_loses_nothing() {
    // fsync = on (the harness turns it off by default): the crash runs with production's
    // durability. The timeout (lease = timeout + 60 s) is longer than the wait for the queue to
    // drain after the restart, so only the new worker's recovery of `sending` rows can send the
    // held deliveries again.
    let mut pg = Cluster::start(&[
        ("fsync", "on"),
        ("webhook.max_in_flight", "4000"),
        ("webhook.default_max_in_flight", "4000"),
        ("webhook.default_timeout", "'60s'"),
    ]);
    // The receiver holds every request open (unanswered) until the server has crashed, so the
    // requests in flight at the crash are ones the receiver really has; after the restart it
    // answers at once.
    let log = Arc::new((
        std::sync::Mutex::new(CrashLog::default()),
        std::sync::Condvar::new(),
    ));
    let l = log.clone();
    let rx = Receiver::start(Arc::new(move |req, _| {
        let (lock, opened) = &*l;
        let mut log = lock.lock().unwrap();
        let seen = (req.webhook_id(), email_of(req));
        if log.open {
            log.after.push(seen);
        } else {
            log.held.push(seen);
            // Bounded, so a failed test does not leave threads behind for long.
            let (log, _) = opened
                .wait_timeout_while(log, Duration::from_secs(120), |l| !l.open)
                .unwrap();
            drop(log);
        }
        Reply::ok()
    }));
    let held = |log: &Arc<(std::sync::Mutex<CrashLog>, std::sync::Condvar)>| {
        log.0.lock().unwrap().held.clone()
    };
    let mut db = pg.client();
    let fsync: String = db.query_one("SHOW fsync", &[]).unwrap().get(0);
    assert_eq!(fsync, "on");
    users_table(&mut db);
    create_endpoint(&mut db, "crm", &rx.url("/"));
    db.execute(
        "SELECT webhook.subscribe('users', 'crm', events => '{INSERT}')",
        &[],
    )
    .unwrap();
    db.execute("INSERT INTO users (email) SELECT 'u' || g || '@example.com' FROM generate_series(1, 2500) g", &[])
        .unwrap();
    wait_until(PATIENCE, "the receiver to hold 2,000 requests", || {
        (held(&log).len() >= 2000).then_some(())
    });
    // The worker claimed at least as many, and none of them was answered.
    let sending = count(
        &mut db,
        "SELECT count(*) FROM webhook.deliveries WHERE status = 'sending'",
    );
    let held_at_crash = held(&log);
    assert!(sending >= 2000, "{sending} deliveries sending");
    assert!(
        held_at_crash.len() >= 2000,
        "the receiver holds {} unanswered requests",
        held_at_crash.len()
    );
    drop(db);
    pg.stop("immediate");
    // Answered only now, into connections the crash closed.
    log.0.lock().unwrap().open = true;
    log.1.notify_all();
    pg.start_again();
    let mut db = pg.client();
    wait_settled(&mut db, Duration::from_secs(90));

    let (held, after) = {
        let log = log.0.lock().unwrap();
        (log.held.clone(), log.after.clone())
    };
    // Every event arrived at least once, each under one webhook-id however often it was sent,
    // and a webhook-id always carries the same event.
    let mut ids_of: HashMap<String, HashSet<String>> = HashMap::new();
    let mut emails_of: HashMap<String, HashSet<String>> = HashMap::new();
    for (id, email) in held.iter().chain(&after) {
        ids_of.entry(email.clone()).or_default().insert(id.clone());
        emails_of
            .entry(id.clone())
            .or_default()
            .insert(email.clone());
    }
    assert_eq!(ids_of.len(), 2500, "every event arrives");
    let unstable: Vec<_> = ids_of.iter().filter(|(_, ids)| ids.len() != 1).collect();
    assert!(
        unstable.is_empty(),
        "events sent under several webhook-ids: {unstable:?}"
    );
    assert_eq!(emails_of.len(), 2500, "one webhook-id per delivery");
    // What the receiver held at the crash was never answered, so it came again after the
    // restart, under the same webhook-id.
    let again: HashSet<&(String, String)> = after.iter().collect();
    let lost: Vec<_> = held.iter().filter(|h| !again.contains(h)).collect();
    assert!(
        lost.is_empty(),
        "{} of the {} requests held at the crash were not sent again with the same webhook-id, e.g. {:?}",
        lost.len(),
        held.len(),
        lost.first()
    );
    let rows = deliveries(&mut db);
    assert_eq!(rows.len(), 2500);
    let not_delivered: Vec<_> = rows.iter().filter(|(_, s, _)| s != "delivered").collect();
    assert!(not_delivered.is_empty(), "{not_delivered:?}");
    // The webhook-ids name exactly the deliveries in the table.
    let in_table: HashSet<i64> = rows.iter().map(|(id, _, _)| *id).collect();
    let sent: HashSet<i64> = emails_of
        .keys()
        .map(|id| id.rsplit('_').next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(sent, in_table);
}

#[test]
fn fast_shutdown_is_not_held_up_by_a_hanging_receiver() {
    let mut pg = Cluster::start(&[("webhook.default_timeout", "'60s'")]);
    let rx = Receiver::start(always(Reply::ok().after(Duration::from_secs(120))));
    let mut db = pg.client();
    users_table(&mut db);
    create_endpoint(&mut db, "slow", &rx.url("/"));
    db.execute("SELECT webhook.subscribe('users', 'slow')", &[])
        .unwrap();
    db.execute("INSERT INTO users (email) VALUES ('slow@example.com')", &[])
        .unwrap();
    rx.wait_for(1, PATIENCE);
    drop(db);
    let took = pg.stop("fast");
    eprintln!("pg_ctl stop -m fast with a hanging request took {took:?}");
    // A generous bound: the point is that shutdown does not wait for the 60 s request timeout.
    assert!(
        took < Duration::from_secs(5),
        "pg_ctl stop -m fast took {took:?}"
    );
}

#[test]
fn a_slow_receiver_does_not_stall_others() {
    let pg = Cluster::start(&[("webhook.default_timeout", "'20s'")]);
    let slow = Receiver::start(always(Reply::ok().after(Duration::from_secs(10))));
    let fast = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "slow", &slow.url("/"));
    create_endpoint(&mut db, "fast", &fast.url("/"));
    db.execute(
        "SELECT webhook.send('tick', to_jsonb(g), 'slow') FROM generate_series(1, 300) g",
        &[],
    )
    .unwrap();
    slow.wait_for(50, PATIENCE);
    db.execute(
        "SELECT webhook.send('tick', to_jsonb(g), 'fast') FROM generate_series(1, 100) g",
        &[],
    )
    .unwrap();
    // All fast deliveries arrive while the slow receiver still holds its first requests.
    fast.wait_for(100, Duration::from_secs(8));
    // The slow endpoint has exactly its default max_in_flight (100) under way: the limit is
    // reached and never passed, though 300 are due. (The last of the 100 may still be on its way
    // into the receiver under load: it is given until the first ones are answered.)
    let until = Instant::now() + Duration::from_secs(5);
    while slow.max_concurrent() < 100 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        slow.max_concurrent(),
        100,
        "requests open at once at the slow receiver"
    );
}

#[test]
fn worker_waits_for_its_database_and_extension_without_restart() {
    let pg = Cluster::init(&[
        ("webhook.database".into(), "'later'".into()),
        ("webhook.allow_private_networks".into(), "on".into()),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    pg.create_database("later");
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_to("later");
    db.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
    create_endpoint(&mut db, "e", &rx.url("/"));
    db.execute("SELECT webhook.send('hello', '{}')", &[])
        .unwrap();
    rx.wait_for(1, PATIENCE);
    let state = worker_state(&mut db, "later").unwrap();
    assert!(state == "idle" || state == "working", "{state}");
    // Quiet while waiting: no error lines in the log.
    assert!(!pg.log().contains("ERROR"), "{}", pg.log());
}

#[test]
fn bad_rows_are_recorded_not_fatal() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    users_table(&mut db);
    create_endpoint(&mut db, "good", &rx.url("/good"));
    create_endpoint(&mut db, "broken", &rx.url("/broken"));
    create_endpoint(&mut db, "off", &rx.url("/off"));
    db.batch_execute(
        "SELECT webhook.subscribe('users', 'good');
         SELECT webhook.subscribe('users', 'broken');
         SELECT webhook.subscribe('users', 'off');
         SELECT webhook.disable_endpoint('off', 'maintenance');
         CREATE TRIGGER typo AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION webhook.enqueue('nope');
         -- Corrupt a secret behind the API's back: the worker must record, not crash.
         UPDATE webhook.endpoints SET secret = 'whsec_short' WHERE name = 'broken';
         INSERT INTO users (email) VALUES ('a@example.com');",
    )
    .unwrap();
    rx.wait_for(1, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    let rows: Vec<(Option<String>, String, Option<String>)> = db
        .query(
            "SELECT e.name, d.status::text, d.last_error FROM webhook.deliveries d
               LEFT JOIN webhook.endpoints e ON e.id = d.endpoint_id ORDER BY e.name NULLS LAST",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert_eq!(rows[0].0.as_deref(), Some("broken"));
    assert_eq!(rows[0].1, "failed");
    assert!(
        rows[0]
            .2
            .as_deref()
            .unwrap()
            .contains("secret is not valid base64")
            || rows[0].2.as_deref().unwrap().contains("too short"),
        "{rows:?}"
    );
    assert!(
        !rows[0].2.as_deref().unwrap().contains("whsec_short"),
        "errors never echo a secret"
    );
    assert_eq!(rows[1], (Some("good".into()), "delivered".into(), None));
    assert_eq!(
        rows[2],
        (
            Some("off".into()),
            "cancelled".into(),
            Some("endpoint disabled".into())
        )
    );
    assert_eq!(
        rows[3],
        (
            None,
            "failed".into(),
            Some("endpoint 'nope' does not exist".into())
        )
    );
    // The worker is still alive and delivering.
    db.execute("INSERT INTO users (email) VALUES ('b@example.com')", &[])
        .unwrap();
    rx.wait_for(2, PATIENCE);
}

#[test]
fn deliveries_wait_for_capacity_and_all_arrive() {
    let pg = Cluster::start(&[("webhook.max_in_flight", "8"), ("webhook.batch_size", "3")]);
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    let rx = Receiver::start(Arc::new(move |_, _| {
        s.fetch_add(1, Ordering::SeqCst);
        Reply::ok().after(Duration::from_millis(100))
    }));
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "e", &rx.url("/"));
    db.execute(
        "SELECT webhook.send('n', to_jsonb(g)) FROM generate_series(1, 200) g",
        &[],
    )
    .unwrap();
    rx.wait_for(200, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    // webhook.max_in_flight = 8 is reached and never passed (200 were due at once).
    assert_eq!(rx.max_concurrent(), 8, "requests open at once");
    assert_eq!(seen.load(Ordering::SeqCst), 200, "each delivery sent once");
    let payloads: HashSet<i64> = rx
        .requests()
        .iter()
        .map(|r| r.json()["data"].as_i64().unwrap())
        .collect();
    assert_eq!(payloads.len(), 200);
}

#[test]
fn errors_from_utility_commands_pass_through_untouched() {
    let pg = Cluster::start(&[]);
    let mut db = pg.client();
    db.batch_execute(
        "CREATE EXTENSION webhook_ext; CREATE TABLE t (id int); CREATE VIEW v AS SELECT * FROM t",
    )
    .unwrap();
    let e = db_error(db.batch_execute("DROP TABLE t"), "DROP TABLE t");
    assert_eq!(
        e.code(),
        &postgres::error::SqlState::DEPENDENT_OBJECTS_STILL_EXIST
    );
    assert_eq!(
        e.message(),
        "cannot drop table t because other objects depend on it"
    );
    assert_eq!(e.detail(), Some("view v depends on table t"));
    assert_eq!(
        e.hint(),
        Some("Use DROP ... CASCADE to drop the dependent objects too.")
    );
    let e = db_error(
        db.batch_execute("BEGIN; VACUUM; COMMIT"),
        "VACUUM in a transaction block",
    );
    assert_eq!(e.message(), "VACUUM cannot run inside a transaction block");
    assert_eq!(e.detail(), None);
}

#[test]
fn a_hand_written_trigger_publishes_only_the_columns_it_names() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client();
    users_table(&mut db);
    create_endpoint(&mut db, "crm", &rx.url("/"));
    // README: extra arguments of webhook.enqueue() name the columns to include.
    db.batch_execute(
        "SELECT webhook.allow_publish('users', 'crm');
         CREATE TRIGGER by_hand AFTER INSERT OR UPDATE ON users FOR EACH ROW
             EXECUTE FUNCTION webhook.enqueue('crm', 'id', 'plan');
         INSERT INTO users (email, secret_note) VALUES ('ada@example.com', 'private');
         UPDATE users SET secret_note = 'still private';
         UPDATE users SET plan = 'pro';",
    )
    .unwrap();
    let mut reqs = rx.wait_for(2, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    // The update of a column not named published nothing.
    assert_eq!(rx.count(), 2, "{:?}", rx.requests());
    reqs.sort_by_key(delivery_id);
    let insert = reqs[0].json();
    assert_eq!(insert["type"], "public.users.insert");
    assert_eq!(
        insert["data"]["new"],
        serde_json::json!({"id": 1, "plan": "free"})
    );
    assert!(insert["data"]["old"].is_null());
    let update = reqs[1].json();
    assert_eq!(update["type"], "public.users.update");
    assert_eq!(
        update["data"]["old"],
        serde_json::json!({"id": 1, "plan": "free"})
    );
    assert_eq!(
        update["data"]["new"],
        serde_json::json!({"id": 1, "plan": "pro"})
    );
    let stored = count(&mut db, "SELECT count(*) FROM webhook.events");
    assert_eq!(stored, 2, "one event per published change");
}

/// How a raw receiver treats the first request it gets (later ones are answered 200 at once).
#[derive(Clone, Copy, Debug)]
enum FirstRequest {
    /// Reads the whole request, then closes the connection without a response.
    CloseBeforeAnswering,
    /// Reads the whole request and answers 200 only after the endpoint's timeout.
    AnswerAfterTheTimeout,
    /// Reads part of the body, then resets the connection (RST).
    ResetMidBody,
}

/// A receiver on a raw socket: per connection, one request; the webhook-id of each request
/// whose headers arrived, in order.
fn raw_receiver(first: FirstRequest) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let ids = seen.clone();
    std::thread::spawn(move || {
        for (n, conn) in listener.incoming().enumerate() {
            let Ok(mut conn) = conn else { continue };
            let ids = ids.clone();
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                // The head.
                let head_end = loop {
                    let Ok(k) = conn.read(&mut chunk) else { return };
                    if k == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..k]);
                    if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                        break i + 4;
                    }
                };
                let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                let header = |name: &str| {
                    head.lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}: ")).map(str::to_string))
                };
                ids.lock()
                    .unwrap()
                    .push(header("webhook-id").unwrap_or_default());
                let length: usize = header("content-length")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if n == 0 {
                    if let FirstRequest::ResetMidBody = first {
                        // SO_LINGER 0: close sends RST, with the rest of the body unread.
                        let s = socket2::SockRef::from(&conn);
                        let _ = s.set_linger(Some(Duration::ZERO));
                        return;
                    }
                }
                while buf.len() - head_end < length {
                    let Ok(k) = conn.read(&mut chunk) else { return };
                    if k == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..k]);
                }
                if n == 0 {
                    match first {
                        FirstRequest::CloseBeforeAnswering => return,
                        FirstRequest::AnswerAfterTheTimeout => {
                            std::thread::sleep(Duration::from_millis(6000))
                        }
                        FirstRequest::ResetMidBody => unreachable!(),
                    }
                }
                let _ = conn.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            });
        }
    });
    (url, seen)
}

/// Receivers that misbehave on the first request: one closes the connection before answering,
/// one answers 200 after the endpoint's timeout, one resets the connection in the middle of the
/// body. Each first attempt is recorded as what the worker saw (no status code; the error: the
/// connection closed, the timeout, the reset), every retry carries the same webhook-id, and the
/// delivery ends delivered with the receiver's 200.
#[test]
fn misbehaving_receivers_are_recorded_and_retried_under_one_webhook_id() {
    let pg = Cluster::start(&[("webhook.max_payload_bytes", "'8MB'")]);
    let mut db = pg.client_with_extension();
    db.batch_execute("CREATE TABLE docs (id int PRIMARY KEY, body text)")
        .unwrap();
    // Timeouts wide enough that only the late receiver's first answer passes one, however
    // loaded the machine (a 4 MB body on a busy 2-core machine took more than 1 s once).
    let cases = [
        ("closes", FirstRequest::CloseBeforeAnswering, "30s"),
        ("late", FirstRequest::AnswerAfterTheTimeout, "3s"),
        ("resets", FirstRequest::ResetMidBody, "30s"),
    ];
    let mut seen = Vec::new();
    for (name, how, timeout) in cases {
        let (url, ids) = raw_receiver(how);
        db.execute(
            "SELECT webhook.create_endpoint($1, $2, timeout => $3::text::interval)",
            &[&name, &url, &timeout],
        )
        .unwrap();
        db.execute("SELECT webhook.subscribe('docs', $1)", &[&name])
            .unwrap();
        seen.push((name, how, ids));
    }
    // A body of 4 MB: more than the socket buffers take, so the reset comes mid-body.
    db.batch_execute("INSERT INTO docs VALUES (1, repeat('x', 4 * 1024 * 1024))")
        .unwrap();
    wait_settled(&mut db, PATIENCE);
    for (name, how, ids) in seen {
        let rows = db
            .query(
                "SELECT a.attempt, a.status_code, a.error, d.status::text
                   FROM webhook.attempts a
                   JOIN webhook.deliveries d ON d.id = a.delivery_id
                   JOIN webhook.endpoints e ON e.id = d.endpoint_id
                  WHERE e.name = $1 ORDER BY a.attempt",
                &[&name],
            )
            .unwrap();
        let attempts: Vec<(i32, Option<i32>, Option<String>, String)> = rows
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
            .collect();
        eprintln!("{how:?}: {attempts:?}");
        assert_eq!(attempts.len(), 2, "{how:?}: one retry: {attempts:?}");
        let (_, code, error, status) = &attempts[0];
        assert_eq!(*code, None, "{how:?}: no status code was received");
        let error = error.clone().unwrap_or_default();
        match how {
            FirstRequest::AnswerAfterTheTimeout => assert_eq!(error, "timed out after 3 s"),
            _ => assert!(
                !error.is_empty() && !error.contains("timed out"),
                "{how:?}: {error}"
            ),
        }
        assert_eq!(attempts[1].1, Some(200));
        assert_eq!(status, "delivered");
        let ids = ids.lock().unwrap().clone();
        assert_eq!(
            ids.len(),
            2,
            "{how:?}: the receiver saw two requests: {ids:?}"
        );
        assert!(
            !ids[0].is_empty() && ids[0] == ids[1],
            "{how:?}: one webhook-id: {ids:?}"
        );
    }
}

/// The claim reads an endpoint's new deliveries above the last one it took (its floor, so that
/// a held snapshot's dead index entries are not walked again and again). A delivery that turns
/// up below the floor is still sent at once, not at the next rescan (every 5 s): `send()` in a
/// transaction that commits after later events were delivered (its event id, and so its
/// delivery id, is lower than theirs), and `retry()` of a delivery cancelled before its first
/// attempt. Each arrives well within the 5 s (the test allows 3 s; it takes milliseconds).
#[test]
fn deliveries_below_the_claims_floor_are_sent_at_once() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "crm", &rx.url("/"));
    let mut late = pg.client();
    let mut tx = late.transaction().unwrap();
    let early: i64 = tx
        .query_one("SELECT webhook.send('late.one', '{}', 'crm')", &[])
        .unwrap()
        .get(0);
    for i in 0..5 {
        db.execute(
            "SELECT webhook.send('on.time', jsonb_build_object('n', $1::int), 'crm')",
            &[&i],
        )
        .unwrap();
    }
    rx.wait_for(5, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    let committed = Instant::now();
    tx.commit().unwrap();
    let got = rx.wait_for(6, PATIENCE);
    let waited = committed.elapsed();
    assert_eq!(got[5].json()["type"], "late.one");
    assert!(
        waited < Duration::from_secs(3),
        "event {early}, below the floor, arrived {waited:?} after its commit: it waited for a rescan"
    );

    // Cancelled before its first attempt (pending → cancelled through the view), then retried
    // once later deliveries raised the floor past it.
    pause_the_worker(&mut db, true);
    let cancelled: i64 = db
        .query_one("SELECT webhook.send('cancelled.first', '{}', 'crm')", &[])
        .unwrap()
        .get(0);
    db.execute(
        "UPDATE webhook.deliveries SET status = 'cancelled' WHERE event_id = $1",
        &[&cancelled],
    )
    .unwrap();
    db.execute("SELECT webhook.send('after.it', '{}', 'crm')", &[])
        .unwrap();
    pause_the_worker(&mut db, false);
    rx.wait_for(7, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    let retried = Instant::now();
    db.execute(
        "SELECT webhook.retry(d.id) FROM webhook.deliveries d WHERE d.event_id = $1",
        &[&cancelled],
    )
    .unwrap();
    let got = rx.wait_for(8, PATIENCE);
    let waited = retried.elapsed();
    assert_eq!(got[7].json()["type"], "cancelled.first");
    assert!(
        waited < Duration::from_secs(3),
        "the retried delivery arrived {waited:?} after retry(): it waited for a rescan"
    );
}

/// A new delivery the claim skips (another transaction holds its row) keeps the endpoint's floor
/// below it: once released it goes out with the next claim, not at the next rescan. Here the
/// held delivery and a later one then arrive within a second of each other (they share a
/// claim); with the floor raised past the held one it waits for the rescan (up to 5 s).
#[test]
fn a_delivery_the_claim_skipped_goes_with_the_next_claim() {
    let pg = Cluster::start(&[("webhook.paused", "on")]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = users_subscribed_to_crm(&pg, &rx);
    db.execute("INSERT INTO users VALUES (1)", &[]).unwrap();
    // Routed and the watermark past it, as the worker would have done: the router's lowering of
    // the floors (to below the watermark) then never reaches the held delivery, and only the
    // claim's own account of what it skipped can keep the floor below it.
    db.execute("SELECT webhook._route()", &[]).unwrap();
    db.execute(
        "UPDATE webhook._router SET routed_below = (SELECT max(id) + 1 FROM webhook._events)",
        &[],
    )
    .unwrap();
    let held: i64 = db
        .query_one("SELECT id FROM webhook._deliveries", &[])
        .unwrap()
        .get(0);
    let mut holder = pg.client();
    let mut tx = holder.transaction().unwrap();
    tx.execute(
        "SELECT 1 FROM webhook._deliveries WHERE id = $1 FOR UPDATE",
        &[&held],
    )
    .unwrap();
    pause_the_worker(&mut db, false);
    db.execute("INSERT INTO users VALUES (2)", &[]).unwrap();
    let got = rx.wait_for(1, PATIENCE);
    assert_eq!(
        got[0].json()["data"]["new"]["id"],
        2,
        "the held one is skipped"
    );
    tx.rollback().unwrap();
    db.execute("INSERT INTO users VALUES (3)", &[]).unwrap();
    let got = rx.wait_for(3, PATIENCE);
    let at = |id: i64| {
        got.iter()
            .find(|r| r.json()["data"]["new"]["id"] == id)
            .map(|r| r.at)
            .unwrap()
    };
    let (first, third) = (at(1), at(3));
    let apart = if first > third {
        first - third
    } else {
        third - first
    };
    assert!(
        apart < Duration::from_secs(1),
        "the released delivery arrived {apart:?} apart from the next claim's: it waited for the rescan"
    );
}

/// Every version of a row stays while a snapshot is held, and each later read of the row walks
/// them all: the worker writes its single rows — an endpoint's health and counters, the routing
/// watermark — at most once a second, not at every record batch and routing pass (it holds them
/// in memory), and still writes them within a second once the queue is quiet.
#[test]
fn under_a_held_snapshot_the_worker_writes_its_single_rows_at_most_once_a_second() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = users_subscribed_to_crm(&pg, &rx);
    db.batch_execute("CREATE EXTENSION pgstattuple").unwrap();
    db.execute("INSERT INTO users VALUES (0)", &[]).unwrap();
    rx.wait_for(1, PATIENCE);
    let mut holder = pg.client();
    let mut held = holder
        .build_transaction()
        .isolation_level(postgres::IsolationLevel::RepeatableRead)
        .start()
        .unwrap();
    held.query("SELECT FROM webhook.endpoints", &[]).unwrap();
    // Versions of each row on disk, live and dead (none can be pruned under the snapshot).
    let versions = |db: &mut postgres::Client| -> (i64, i64) {
        let r = db
            .query_one(
                "SELECT (SELECT tuple_count + dead_tuple_count FROM pgstattuple('webhook._endpoint_state')),
                        (SELECT tuple_count + dead_tuple_count FROM pgstattuple('webhook._router'))",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    let before = versions(&mut db);
    let started = Instant::now();
    // One event at a time, each sent before the next is written: a record batch and a routing
    // pass each.
    let events = 150;
    for i in 1..=events {
        db.execute("INSERT INTO users VALUES ($1)", &[&i]).unwrap();
        rx.wait_for(i as usize + 1, PATIENCE);
    }
    let seconds = started.elapsed().as_secs_f64();
    // Written within a second of the last delivery, the queue being quiet.
    wait_for_count(
        &mut db,
        "SELECT delivered FROM webhook.endpoint_stats WHERE name = 'crm'",
        events as i64 + 1,
        PATIENCE,
    );
    wait_for_count(
        &mut db,
        "SELECT ((SELECT max(routed_below) FROM webhook._router) > (SELECT max(id) FROM webhook._events))::int::int8",
        1,
        PATIENCE,
    );
    let after = versions(&mut db);
    let (health, watermark) = (after.0 - before.0, after.1 - before.1);
    println!(
        "{events} events one at a time in {seconds:.1} s under a held snapshot: {health} versions of the health row, {watermark} of the watermark's"
    );
    let bound = seconds.ceil() as i64 + 2;
    assert!(
        health <= bound,
        "{health} versions of the endpoint's health row in {seconds:.1} s"
    );
    assert!(
        watermark <= bound,
        "{watermark} versions of the watermark's row in {seconds:.1} s"
    );
    assert_eq!(unfinished(&mut db), 0);
    held.commit().unwrap();
}

/// The worker routes from the watermark it holds in memory, which the table's follows at most once
/// a second, but never from below the table's: a restore may bring a higher watermark row, below
/// which an event whose delivery is not stored was purged (or deleted), and making it again would
/// send it again. (A review found `webhook._route(from_id)` starting at the worker's value alone.)
#[test]
fn the_worker_never_routes_from_below_the_tables_watermark() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = users_subscribed_to_crm(&pg, &rx);
    db.execute("INSERT INTO users VALUES (1)", &[]).unwrap();
    rx.wait_for(1, PATIENCE);
    pause_the_worker(&mut db, true);
    // An event the worker has not routed, then a watermark row above it, as a restore of a dump
    // taken after its delivery was made, sent and purged would bring.
    db.execute("INSERT INTO users VALUES (2)", &[]).unwrap();
    db.batch_execute("INSERT INTO webhook._router SELECT max(id) + 1 FROM webhook._events")
        .unwrap();
    assert_eq!(
        count(&mut db, "SELECT count(*) FROM webhook.deliveries d JOIN webhook._events e ON e.id = d.event_id WHERE e.new->>'id' = '2'"),
        0,
        "below the watermark with no stored delivery: purged"
    );
    pause_the_worker(&mut db, false);
    db.execute("INSERT INTO users VALUES (3)", &[]).unwrap();
    let got = rx.wait_for(2, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    std::thread::sleep(Duration::from_millis(500));
    let ids: Vec<i64> = rx
        .requests()
        .iter()
        .map(|r| r.json()["data"]["new"]["id"].as_i64().unwrap())
        .collect();
    assert_eq!(
        ids,
        [1, 3],
        "row 2's delivery, purged, was made and sent again"
    );
    // Nor from below it when a caller (webhook_admin may call it) passes a lower watermark.
    assert_eq!(
        count(&mut db, "SELECT webhook._route(0)"),
        0,
        "_route(0) made the purged delivery again"
    );
    assert_eq!(got[1].json()["data"]["new"]["id"], 3);
}

/// W3C trace context (issue 16): the `traceparent` an application sets for its transaction (or
/// session) is stored with each event it writes, shown by `webhook.events`, and sent with every
/// attempt of the event's deliveries, replacing one the endpoint's own headers carry. A value
/// that is not a traceparent is refused when it is set, naming what is wrong; a later version is
/// sent as version 00.
#[test]
fn the_writers_traceparent_goes_with_its_events_to_every_attempt() {
    const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    const OTHER: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00";
    let pg = Cluster::start(&[("webhook.retry_schedule", "'100ms'")]);
    // Every event's first attempt fails: the retry must carry the same traceparent.
    let seen = Arc::new(std::sync::Mutex::new(HashSet::<String>::new()));
    let s = seen.clone();
    let rx = Receiver::start(Arc::new(move |req, _| {
        if s.lock().unwrap().insert(req.webhook_id()) {
            Reply::status(503)
        } else {
            Reply::ok()
        }
    }));
    let mut db = pg.client_with_extension();
    db.batch_execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
        .unwrap();
    db.execute(
        r#"SELECT webhook.create_endpoint('crm', $1, headers => '{"TraceParent": "from-the-endpoint"}')"#,
        &[&rx.url("/")],
    )
    .unwrap();
    db.execute("SELECT webhook.subscribe('users', 'crm')", &[])
        .unwrap();

    let refused = db_error(
        db.batch_execute(
            "SET webhook.traceparent = '00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01'",
        ),
        "an upper-case trace-id",
    );
    assert_eq!(
        refused.code(),
        &postgres::error::SqlState::INVALID_PARAMETER_VALUE
    );
    assert!(
        refused.message().contains("webhook.traceparent")
            && refused
                .detail()
                .unwrap_or_default()
                .contains("trace-id is not 32 lower-case hex digits"),
        "{refused:?}"
    );
    let refused = db_error(
        db.batch_execute("SET webhook.traceparent = 'abc'"),
        "a short value",
    );
    assert!(
        refused
            .detail()
            .unwrap_or_default()
            .contains("3 characters long, not 55"),
        "{refused:?}"
    );

    // One row (written without the executor), a statement of three (written together), both in
    // a transaction with SET LOCAL; then one without; then send() under a session's setting of
    // a later version.
    db.batch_execute(&format!(
        "BEGIN; SET LOCAL webhook.traceparent = '{TRACE}';
         INSERT INTO users VALUES (1);
         INSERT INTO users SELECT g FROM generate_series(2, 4) g;
         COMMIT;
         INSERT INTO users VALUES (5);"
    ))
    .unwrap();
    db.batch_execute(&format!(
        "SET webhook.traceparent = 'cc{}-and-more';
         SELECT webhook.send('note', '{{\"id\": 6}}', 'crm');
         RESET webhook.traceparent;",
        &OTHER[2..]
    ))
    .unwrap();
    let exchanges = wait_until(Duration::from_secs(60), "two attempts of each of 6", || {
        let ex = rx.exchanges();
        (ex.len() >= 12).then_some(ex)
    });
    let mut by_id: HashMap<i64, Vec<Option<String>>> = HashMap::new();
    for e in &exchanges {
        let body = e.request.json();
        let id = body["data"]["new"]["id"]
            .as_i64()
            .or_else(|| body["data"]["id"].as_i64())
            .expect("an id");
        by_id
            .entry(id)
            .or_default()
            .push(e.request.header("traceparent").map(str::to_owned));
    }
    for id in 1..=6 {
        let expected = match id {
            1..=4 => Some(TRACE.to_owned()),
            5 => Some("from-the-endpoint".to_owned()),
            _ => Some(OTHER.to_owned()),
        };
        assert_eq!(
            by_id.get(&id),
            Some(&vec![expected.clone(), expected]),
            "event {id}: both attempts"
        );
    }
    let stored: Vec<Option<String>> = db
        .query("SELECT traceparent FROM webhook.events ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        stored,
        vec![
            Some(TRACE.to_owned()),
            Some(TRACE.to_owned()),
            Some(TRACE.to_owned()),
            Some(TRACE.to_owned()),
            None,
            Some(OTHER.to_owned())
        ]
    );
}
