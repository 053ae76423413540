//! Shared by the end-to-end tests (and the benchmark, which includes this module by path): real
//! clusters, real receivers, independent verification, and the small queries several tests ask.

pub mod cluster;
pub mod dns;
pub mod proxy;
pub mod receiver;
pub mod tls;

pub use cluster::{client_program, extension_dir, pg_bin, soft_wait, wait_until, Cluster};
pub use receiver::{always, Down, Receiver, Reply, Request};

use std::time::Duration;

pub const PATIENCE: Duration = Duration::from_secs(30);

/// Verifies a request with the official Standard Webhooks library (not our own code).
pub fn verify_with_standardwebhooks(secret: &str, req: &Request) -> Result<(), String> {
    let wh = standardwebhooks::Webhook::new(secret).map_err(|e| format!("{e:?}"))?;
    let mut headers = http::HeaderMap::new();
    for (k, v) in &req.headers {
        headers.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    wh.verify(&req.body, &headers).map_err(|e| format!("{e:?}"))
}

/// Creates an endpoint and returns its secret.
pub fn create_endpoint(db: &mut postgres::Client, name: &str, url: &str) -> String {
    db.query_one(
        "SELECT secret FROM webhook.create_endpoint($1, $2)",
        &[&name, &url],
    )
    .unwrap()
    .get(0)
}

/// The status of every delivery, oldest first.
pub fn statuses(db: &mut postgres::Client) -> Vec<String> {
    deliveries(db)
        .into_iter()
        .map(|(_, status, _)| status)
        .collect()
}

/// (id, status, attempts) of every delivery, by id.
pub fn deliveries(db: &mut postgres::Client) -> Vec<(i64, String, i32)> {
    db.query(
        "SELECT id, status::text, attempts FROM webhook.deliveries ORDER BY id",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// The one `bigint` a query returns (a `count(*)`, say).
pub fn count(db: &mut postgres::Client, sql: &str) -> i64 {
    db.query_one(sql, &[]).unwrap().get(0)
}

/// How many deliveries are still pending or sending.
pub fn unfinished(db: &mut postgres::Client) -> i64 {
    count(
        db,
        "SELECT count(*) FROM webhook.deliveries WHERE status IN ('pending', 'sending')",
    )
}

/// How many (events, deliveries, attempts) there are.
pub fn history_counts(db: &mut postgres::Client) -> (i64, i64, i64) {
    let r = db
        .query_one(
            "SELECT (SELECT count(*) FROM webhook.events), (SELECT count(*) FROM webhook.deliveries),
                    (SELECT count(*) FROM webhook.attempts)",
            &[],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2))
}

/// Waits until `read()` gives `expected` (what the worker writes within a second, e.g. an
/// endpoint's counters); panics with the last value read after `timeout`.
pub fn wait_for_value<T: PartialEq + std::fmt::Debug>(
    timeout: Duration,
    what: &str,
    expected: T,
    mut read: impl FnMut() -> T,
) {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let seen = read();
        if seen == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out after {timeout:?}: {what} is {seen:?}, not {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `count(db, sql)` is `expected` (`wait_for_value`).
pub fn wait_for_count(db: &mut postgres::Client, sql: &str, expected: i64, timeout: Duration) {
    wait_for_value(timeout, sql, expected, || count(db, sql));
}

/// Waits until no delivery is pending or sending.
pub fn wait_settled(db: &mut postgres::Client, timeout: Duration) {
    wait_until(timeout, "all deliveries to finish", || {
        (unfinished(db) == 0).then_some(())
    });
}

/// The `state` that `webhook.worker_status()` reports for `database`; `None` if it has no row.
pub fn worker_state(db: &mut postgres::Client, database: &str) -> Option<String> {
    db.query_opt(
        "SELECT state FROM webhook.worker_status() WHERE database = $1",
        &[&database],
    )
    .unwrap()
    .map(|r| r.get(0))
}

/// A database's row in `webhook.worker_status()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Worker {
    pub pid: Option<i32>,
    pub state: String,
    pub in_flight: i32,
}

/// `database`'s row in `webhook.worker_status()`; panics if it has none.
pub fn worker(db: &mut postgres::Client, database: &str) -> Worker {
    let r = db
        .query_one(
            "SELECT pid, state, in_flight FROM webhook.worker_status() WHERE database = $1",
            &[&database],
        )
        .unwrap();
    Worker {
        pid: r.get(0),
        state: r.get(1),
        in_flight: r.get(2),
    }
}

/// The database error of a statement that had to fail; panics naming `what` if it succeeded or
/// failed without one (a lost connection, say).
pub fn db_error(
    r: Result<impl std::fmt::Debug, postgres::Error>,
    what: &str,
) -> postgres::error::DbError {
    match r {
        Ok(v) => panic!("{what}: succeeded ({v:?}) where it had to be refused"),
        Err(e) => match e.as_db_error() {
            Some(d) => d.clone(),
            None => panic!("{what}: not a database error: {e}"),
        },
    }
}

/// Every role with rolsuper, by name (read through pg_catalog, whatever the search_path).
pub fn superusers(db: &mut postgres::Client) -> Vec<String> {
    db.query(
        "SELECT rolname::text FROM pg_catalog.pg_roles WHERE rolsuper ORDER BY rolname",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// The delivery id at the end of a `webhook-id` (`msg_<install>_<delivery id>`).
pub fn delivery_id(req: &Request) -> i64 {
    req.webhook_id()
        .rsplit('_')
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Waits until `table` of the subscription on `sub` is synchronised (state 'r'): what is written
/// on the publisher after that goes through the apply worker, not the initial COPY.
pub fn wait_synchronised(sub: &mut postgres::Client, table: &str) {
    wait_until(PATIENCE, &format!("{table} to be synchronised"), || {
        let ready: Option<String> = sub
            .query_opt(
                "SELECT srsubstate::text FROM pg_subscription_rel WHERE srrelid = $1::text::regclass",
                &[&table],
            )
            .unwrap()
            .map(|r| r.get(0));
        (ready.as_deref() == Some("r")).then_some(())
    });
}

/// A superuser client of `app` where `CREATE EXTENSION webhook_ext` has run and table
/// `users (id int PRIMARY KEY, email text)` is subscribed to endpoint `crm` at `rx`.
pub fn users_subscribed_to_crm(pg: &Cluster, rx: &Receiver) -> postgres::Client {
    let mut db = pg.client_with_extension();
    db.batch_execute("CREATE TABLE users (id int PRIMARY KEY, email text)")
        .unwrap();
    create_endpoint(&mut db, "crm", &rx.url("/"));
    db.execute("SELECT webhook.subscribe('users', 'crm')", &[])
        .unwrap();
    db
}
