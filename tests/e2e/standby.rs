//! End-to-end: a hot standby with webhook_ext preloaded, and failover to it. The launcher and
//! the workers start only once recovery has finished, so a standby sends nothing, logs nothing of
//! ours, and `worker_status()` says it is a standby; after `pg_ctl promote` they start without a
//! restart and deliver what the primary had committed.

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
    // The primary's postgresql.conf came with the base backup (paused): resume as an operator
    // would after a failover.
    db.batch_execute("ALTER SYSTEM SET webhook.paused = off")
        .unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    let rx = Receiver::start_at(down, always(Reply::ok()));
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
