//! Shared by the end-to-end tests: real clusters, real receivers, independent verification.
#![allow(dead_code, unused_imports)]

pub mod cluster;
pub mod dns;
pub mod receiver;
pub mod tls;

pub use cluster::{wait_until, Cluster};
pub use receiver::{always, Receiver, Reply, Request};

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

/// (status, attempts) of every delivery, by id.
/// The status of every delivery, oldest first.
pub fn statuses(db: &mut postgres::Client) -> Vec<String> {
    deliveries(db)
        .into_iter()
        .map(|(_, status, _)| status)
        .collect()
}

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

/// Waits until no delivery is pending or sending.
pub fn wait_settled(db: &mut postgres::Client, timeout: Duration) {
    wait_until(timeout, "all deliveries to finish", || {
        let n: i64 = db
            .query_one(
                "SELECT count(*) FROM webhook.deliveries WHERE status IN ('pending', 'sending')",
                &[],
            )
            .unwrap()
            .get(0);
        (n == 0).then_some(())
    });
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
