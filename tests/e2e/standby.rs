//! End-to-end: a hot standby with webhook_ext preloaded, and failover to it. The launcher and
//! the workers start only once recovery has finished, so a standby sends nothing, logs nothing of
//! ours, and `worker_status()` says it is a standby; after `pg_ctl promote` they start without a
//! restart and deliver what the primary had committed.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::*;

/// A primary with committed, undelivered work (its worker paused, so nothing was sent), a
/// streaming replica made with `pg_basebackup -R` that receives more of it, then the primary
/// killed (`-m immediate`) and the standby promoted: every event arrives, each once.
#[test]
fn a_promoted_standby_delivers_what_the_primary_committed() {
    let down = Down::new();
    let mut primary = Cluster::start(&[("webhook.paused", "on")]);
    let mut db = primary.client_with_extension();
    db.batch_execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
        .unwrap();
    create_endpoint(
        &mut db,
        "crm",
        &format!("http://127.0.0.1:{}/", down.port()),
    );
    db.execute("SELECT webhook.subscribe('users', 'crm')", &[])
        .unwrap();
    db.batch_execute(
        "INSERT INTO users SELECT g, 'before@example.com' FROM generate_series(1, 40) g",
    )
    .unwrap();
    let standby = Cluster::standby_of(&primary);
    let mut sb = standby.client();
    // Streamed after the base backup.
    for i in 41..=60 {
        db.execute("INSERT INTO users VALUES ($1, 'after@example.com')", &[&i])
            .unwrap();
    }
    wait_until(PATIENCE, "the standby to replay all 60 rows", || {
        (count(&mut sb, "SELECT count(*) FROM users") == 60).then_some(())
    });
    let states: Vec<String> = sb
        .query("SELECT state FROM webhook.worker_status()", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(states, ["standby: delivers once promoted"]);
    let queued = count(&mut sb, "SELECT queue_depth FROM webhook.worker_status()");
    assert_eq!(queued, 60, "the standby shows the primary's queue");
    drop(sb);
    drop(db);

    primary.stop("immediate");
    standby.promote();
    let mut db = standby.client();
    let before_resume: Vec<String> = standby
        .log()
        .lines()
        .filter(|l| {
            (l.contains("webhook_ext") || l.contains("webhook."))
                && ["WARNING", "ERROR", "FATAL", "PANIC"]
                    .iter()
                    .any(|k| l.contains(k))
        })
        .map(str::to_string)
        .collect();
    assert_eq!(
        before_resume,
        Vec::<String>::new(),
        "the standby logged nothing of ours above LOG"
    );
    // The receiver is up before delivery resumes (a first attempt at a closed port would wait
    // for its retry).
    let rx = Receiver::start_at(down, always(Reply::ok()));
    // The primary's postgresql.conf came with the base backup (paused): resume as an operator
    // would after a failover.
    db.batch_execute("ALTER SYSTEM SET webhook.paused = off")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    let got = rx.wait_for(60, PATIENCE);
    let ids: std::collections::HashSet<String> = got.iter().map(|r| r.webhook_id()).collect();
    assert_eq!(ids.len(), 60, "every event arrived");
    eprintln!(
        "failover: {} requests for 60 events ({} duplicates)",
        got.len(),
        got.len() - ids.len()
    );
    assert_eq!(
        got.len(),
        60,
        "nothing was in flight at the crash: no duplicate"
    );
    wait_settled(&mut db, PATIENCE);
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) FROM webhook.deliveries WHERE status = 'delivered'"
        ),
        60
    );
    // The promoted server's worker settles (a single look raced a round in progress: "working").
    wait_until(PATIENCE, "the promoted server's worker to be idle", || {
        (worker_state(&mut db, "app").as_deref() == Some("idle")).then_some(())
    });
}

/// Failover with requests under way: the primary's worker has requests out to a receiver that
/// holds them (10 s) when the primary is killed (`-m immediate`) and its streaming replica
/// promoted. Each of those is sent again by the new primary under the same `webhook-id` (at
/// least once: the receiver sees it twice, and deduplicates on the id), everything else once;
/// every event arrives and ends delivered. Prints how many requests were under way and how many
/// duplicates the receiver saw.
#[test]
fn a_failover_with_requests_under_way_sends_them_again_under_the_same_webhook_id() {
    const EVENTS: i64 = 200;
    let crashed = Arc::new(AtomicBool::new(false));
    let holding = crashed.clone();
    let rx = Receiver::start(Arc::new(move |_, _| {
        if holding.load(Ordering::SeqCst) {
            Reply::ok()
        } else {
            Reply::ok().after(Duration::from_secs(10))
        }
    }));
    let mut primary = Cluster::start(&[]);
    let mut db = users_subscribed_to_crm(&primary, &rx);
    let standby = Cluster::standby_of(&primary);
    let mut sb = standby.client();
    db.batch_execute(&format!(
        "INSERT INTO users SELECT g, 'u' || g || '@example.com' FROM generate_series(1, {EVENTS}) g"
    ))
    .unwrap();
    // The application's rows have reached the standby (asynchronous replication loses what has
    // not: that is the application's data as much as its events) and requests are out.
    wait_until(PATIENCE, "the standby to replay every row", || {
        (count(&mut sb, "SELECT count(*) FROM users") == EVENTS).then_some(())
    });
    // The claims too: the promoted server finds those deliveries `sending` (its worker takes
    // the leases of the dead one) rather than still pending (the worker's own commits are
    // asynchronous: a claim the crash cut off before it reached the standby is pending there).
    wait_until(
        PATIENCE,
        "requests to be under way, and their claims on the standby",
        || {
            (rx.count() >= 20
                && count(
                    &mut sb,
                    "SELECT count(*) FROM webhook.deliveries WHERE status = 'sending'",
                ) >= 20)
                .then_some(())
        },
    );
    drop(sb);
    drop(db);
    primary.stop("immediate");
    let under_way: Vec<String> = rx.requests().iter().map(|r| r.webhook_id()).collect();
    assert!(
        rx.exchanges().iter().all(|x| x.done.is_none()),
        "no request was answered before the crash (each is held 10 s): all were under way"
    );
    crashed.store(true, Ordering::SeqCst);

    standby.promote();
    let mut db = standby.client();
    wait_settled(&mut db, PATIENCE);
    let got = rx.requests();
    let ids: HashSet<String> = got.iter().map(|r| r.webhook_id()).collect();
    assert_eq!(ids.len() as i64, EVENTS, "every event arrived");
    let after: Vec<String> = got[under_way.len()..]
        .iter()
        .map(|r| r.webhook_id())
        .collect();
    for id in &under_way {
        assert!(
            after.contains(id),
            "{id}, under way at the crash, was sent again by the promoted server"
        );
    }
    eprintln!(
        "failover with requests under way: {} under way at the crash, {} requests for {EVENTS} events ({} duplicates)",
        under_way.len(),
        got.len(),
        got.len() - ids.len()
    );
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) FROM webhook.deliveries WHERE status = 'delivered'"
        ),
        EVENTS
    );
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) FROM webhook.deliveries WHERE status IN ('pending', 'sending')"
        ),
        0
    );
}
