//! Several delivery workers per database (`webhook.workers`): endpoints split between them, each
//! endpoint's limits and order kept, nothing lost or sent twice when the number changes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;

/// `(worker, pid, delivered)` of each of `app`'s workers, by worker number.
fn workers(db: &mut postgres::Client) -> Vec<(i32, Option<i32>, i64)> {
    db.query(
        "SELECT worker, pid, delivered FROM webhook.worker_status() WHERE database = 'app' ORDER BY worker",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// Waits until `app` has exactly `n` running workers, numbered 0..n, with distinct pids.
fn wait_for_workers(db: &mut postgres::Client, n: usize) -> Vec<(i32, Option<i32>, i64)> {
    wait_until(PATIENCE, &format!("{n} workers"), || {
        let w = workers(db);
        let numbers: Vec<i32> = w.iter().map(|(k, _, _)| *k).collect();
        let mut pids: Vec<i32> = w.iter().filter_map(|(_, p, _)| *p).collect();
        pids.sort();
        pids.dedup();
        (numbers == (0..n as i32).collect::<Vec<_>>() && pids.len() == n).then_some(w)
    })
}

/// Every request a receiver got, counted by webhook-id.
fn by_id(reqs: &[Request]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in reqs {
        *m.entry(r.webhook_id()).or_insert(0) += 1;
    }
    m
}

/// The `n` values of an ordered endpoint's requests, in arrival order.
fn arrival_order(rx: &Receiver) -> Vec<i64> {
    rx.requests()
        .iter()
        .map(|r| r.json()["data"]["new"]["n"].as_i64().unwrap())
        .collect()
}

#[test]
fn two_workers_split_the_endpoints_and_keep_each_ones_limits_and_order() {
    let pg = Cluster::start(&[("webhook.workers", "2")]);
    let mut db = pg.client_with_extension();
    let first = wait_for_workers(&mut db, 2);
    assert_eq!(first.len(), 2);
    // Four endpoints: ids 1..4, so two for each worker.
    let fast = Receiver::start(always(Reply::ok()));
    let slow = Receiver::start(always(Reply::ok().after(Duration::from_millis(30))));
    let ordered = Receiver::start(Arc::new(|_, n| {
        // Every fifth request fails once: the head is retried before the next is sent.
        if n % 5 == 4 {
            Reply::status(500)
        } else {
            Reply::ok()
        }
    }));
    let other = Receiver::start(always(Reply::ok()));
    db.batch_execute("CREATE TABLE items (n int PRIMARY KEY)")
        .unwrap();
    db.execute(
        "SELECT webhook.create_endpoint('fast', $1),
                webhook.create_endpoint('slow', $2, max_in_flight => 3),
                webhook.create_endpoint('ordered', $3, ordered => true),
                webhook.create_endpoint('other', $4)",
        &[
            &fast.url("/"),
            &slow.url("/"),
            &ordered.url("/"),
            &other.url("/"),
        ],
    )
    .unwrap();
    let ids: Vec<i32> = db
        .query("SELECT id FROM webhook.endpoints ORDER BY id", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4], "two endpoints for each worker");
    db.batch_execute(
        "SELECT webhook.subscribe('items', e, events => '{INSERT}') FROM unnest('{fast,slow,ordered,other}'::text[]) e",
    )
    .unwrap();
    for chunk in 0..10 {
        db.execute(
            "INSERT INTO items SELECT g FROM generate_series($1::int * 20 + 1, $1::int * 20 + 20) g",
            &[&chunk],
        )
        .unwrap();
    }
    wait_settled(&mut db, Duration::from_secs(90));
    for (name, rx) in [("fast", &fast), ("slow", &slow), ("other", &other)] {
        let ids = by_id(&rx.requests());
        assert_eq!(ids.len(), 200, "{name}: distinct deliveries");
        assert!(ids.values().all(|&n| n == 1), "{name}: sent twice: {ids:?}");
    }
    // The limited endpoint reached its limit and never passed it, though two workers ran.
    assert_eq!(slow.max_concurrent(), 3, "slow: requests at once");
    // The ordered endpoint: one at a time, in order, each failed head retried first.
    assert_eq!(ordered.max_concurrent(), 1);
    let mut expected = Vec::new();
    let mut n_request = 0;
    for n in 1..=200 {
        loop {
            expected.push(n);
            n_request += 1;
            if n_request % 5 != 0 {
                break;
            }
        }
    }
    assert_eq!(arrival_order(&ordered), expected, "ordered: arrival order");
    // Both workers delivered (each to its own endpoints), and the same two are still running.
    let after = workers(&mut db);
    assert_eq!(
        after.iter().map(|(k, p, _)| (*k, *p)).collect::<Vec<_>>(),
        first.iter().map(|(k, p, _)| (*k, *p)).collect::<Vec<_>>()
    );
    let delivered: Vec<i64> = after.iter().map(|(_, _, d)| *d).collect();
    assert_eq!(delivered.iter().sum::<i64>(), 800, "{delivered:?}");
    assert!(
        delivered.iter().all(|&d| d >= 400),
        "each worker delivered to its two endpoints: {delivered:?}"
    );
}

#[test]
fn changing_webhook_workers_under_load_loses_nothing_and_sends_nothing_twice() {
    let pg = Cluster::start(&[]);
    let mut db = pg.client_with_extension();
    wait_for_workers(&mut db, 1);
    // Slow enough that requests are always under way when the number changes: a new worker
    // that took over endpoints before the previous one had recorded them would send them again.
    let rxs: Vec<Receiver> = (0..3)
        .map(|_| Receiver::start(always(Reply::ok().after(Duration::from_millis(150)))))
        .collect();
    let ordered = Receiver::start(always(Reply::ok()));
    db.batch_execute("CREATE TABLE items (n int PRIMARY KEY)")
        .unwrap();
    for (i, rx) in rxs.iter().enumerate() {
        create_endpoint(&mut db, &format!("e{i}"), &rx.url("/"));
    }
    // One endpoint limited to 2 at once: two owners at once (even without a duplicate) would
    // show as more.
    db.execute(
        "SELECT webhook.alter_endpoint('e0', max_in_flight => 2)",
        &[],
    )
    .unwrap();
    db.execute(
        "SELECT webhook.create_endpoint('ordered', $1, ordered => true)",
        &[&ordered.url("/")],
    )
    .unwrap();
    db.batch_execute(
        "SELECT webhook.subscribe('items', name, events => '{INSERT}') FROM webhook.endpoints",
    )
    .unwrap();
    // Inserts go on in another session while the number of workers changes 1 -> 2 -> 3 -> 1.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut w = pg.client();
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) || n < 600 {
                n += 1;
                w.execute("INSERT INTO items VALUES ($1)", &[&n]).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            n
        })
    };
    for workers in [2, 3, 1] {
        std::thread::sleep(Duration::from_millis(700));
        pg.set("webhook.workers", &workers.to_string());
        pg.reload();
        wait_for_workers(&mut db, workers);
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let rows = writer.join().unwrap() as usize;
    wait_settled(&mut db, Duration::from_secs(90));
    let delivered: i64 = db
        .query_one(
            "SELECT count(*) FROM webhook.deliveries WHERE status = 'delivered'",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(delivered as usize, rows * 4, "every delivery delivered");
    for (name, rx) in rxs.iter().map(|r| ("e", r)).chain([("ordered", &ordered)]) {
        let ids = by_id(&rx.requests());
        assert_eq!(ids.len(), rows, "{name}: one delivery per row");
        let twice: Vec<_> = ids.iter().filter(|(_, &n)| n > 1).collect();
        assert!(twice.is_empty(), "{name}: sent more than once: {twice:?}");
    }
    assert_eq!(
        arrival_order(&ordered),
        (1..=rows as i64).collect::<Vec<_>>(),
        "ordered: arrival order across the changes"
    );
    assert_eq!(ordered.max_concurrent(), 1, "ordered: one at a time");
    assert_eq!(rxs[0].max_concurrent(), 2, "e0: its limit of 2, never more");
    // Each change was a new set of workers, the previous set having left first.
    assert!(pg
        .log()
        .contains("webhook.workers changed from 3; leaving database \"app\""));
}

#[test]
fn a_database_with_two_workers_can_be_dropped_and_renamed() {
    let pg = Cluster::start(&[
        ("webhook.workers", "2"),
        ("webhook.database", "'app, other, moved'"),
    ]);
    let mut db = pg.client_with_extension();
    pg.create_database("other");
    let rx = Receiver::start(always(Reply::ok()));
    {
        let mut other = pg.client_to("other");
        other.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
        create_endpoint(&mut other, "a", &rx.url("/"));
        create_endpoint(&mut other, "b", &rx.url("/"));
        other
            .batch_execute(
                "SELECT webhook.send('before', '{}', 'a'), webhook.send('before', '{}', 'b')",
            )
            .unwrap();
    }
    rx.wait_for(2, PATIENCE);
    let of = |db: &mut postgres::Client, name: &str| -> i64 {
        db.query_one(
            "SELECT count(pid) FROM webhook.worker_status() WHERE database = $1",
            &[&name],
        )
        .unwrap()
        .get(0)
    };
    wait_until(PATIENCE, "two workers for other", || {
        (of(&mut db, "other") == 2).then_some(())
    });
    let mut admin = pg.client_to("postgres");
    // Both workers step aside: the commands succeed at once, not "being accessed by other users".
    for statement in [
        "ALTER DATABASE other RENAME TO moved",
        "ALTER DATABASE moved RENAME TO other",
        "DROP DATABASE other",
    ] {
        let t = std::time::Instant::now();
        admin
            .batch_execute(statement)
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{statement} took {:?}",
            t.elapsed()
        );
    }
    wait_until(PATIENCE, "the dropped database's workers to go", || {
        (of(&mut db, "other") == 0).then_some(())
    });
    // app's two workers are untouched by all this, and deliver.
    assert_eq!(of(&mut db, "app"), 2);
    create_endpoint(&mut db, "c", &rx.url("/"));
    db.execute("SELECT webhook.send('after', '{}', 'c')", &[])
        .unwrap();
    let got = rx.wait_for(3, PATIENCE);
    assert_eq!(got[2].json()["type"], "after");
}
