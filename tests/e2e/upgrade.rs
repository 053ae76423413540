//! End-to-end: upgrading from the previous release, for real. The 0.2.0 library (built from its
//! commit by `scripts/previous-release`) runs on a private copy of the PostgreSQL installation and
//! delivers real history to loopback receivers; the same data directory then starts with the
//! installed (current) library, whose worker serves the database while `ALTER EXTENSION webhook_ext
//! UPDATE` runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::cluster::bin_dir;
use crate::harness::*;

/// The previous release, and what `scripts/previous-release` builds it into.
const PREVIOUS: &str = "0.2.0";

/// How long the receiver of the `later` endpoint holds a request while it is "down": longer than
/// the whole old phase, shorter than that endpoint's timeout (5 minutes).
const HOLD: Duration = Duration::from_secs(120);

/// `pg_config <flag>` of the installation the tests run against (`$PG_CONFIG`, else `pg_config`).
fn pg_config(flag: &str) -> PathBuf {
    let program = std::env::var_os("PG_CONFIG")
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "pg_config".into());
    let out = Command::new(&program)
        .arg(flag)
        .output()
        .unwrap_or_else(|e| panic!("running pg_config {flag}: {e}"));
    assert!(out.status.success(), "pg_config {flag} failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `root` + an absolute path.
fn under(root: &Path, path: &Path) -> PathBuf {
    root.join(path.strip_prefix("/").unwrap_or(path))
}

/// The packaged tree of the previous release (`usr/lib/…/webhook_ext.so`,
/// `usr/share/…/extension/webhook_ext*`): `$WEBHOOK_PREVIOUS_RELEASE`, else
/// `<target dir>/previous-release/pgNN/0.2.0` (NN: the major the tests run against), where
/// `scripts/previous-release` puts it.
fn previous_release() -> PathBuf {
    let dir = match std::env::var_os("WEBHOOK_PREVIOUS_RELEASE") {
        Some(d) => PathBuf::from(d),
        None => {
            // This binary is <target dir>/debug/deps/e2e-<hash>.
            let exe = std::env::current_exe().unwrap();
            let target = exe.ancestors().nth(3).unwrap().to_path_buf();
            // "PostgreSQL 17.11" -> "17"
            let version = pg_config("--version");
            let major = version
                .to_string_lossy()
                .trim_start_matches("PostgreSQL ")
                .split(['.', ' '])
                .next()
                .unwrap_or_default()
                .to_string();
            target
                .join("previous-release")
                .join(format!("pg{major}"))
                .join(PREVIOUS)
        }
    };
    assert!(
        dir.join(".complete").exists(),
        "webhook_ext {PREVIOUS} is not built at {}: run scripts/previous-release (with the same \
         CARGO_TARGET_DIR as the tests) first; scripts/test does",
        dir.display()
    );
    dir
}

/// A private PostgreSQL installation: the installed one's programs, library directory and share
/// directory at the same paths under a new root, with webhook_ext's files replaced by those of
/// the previous release. PostgreSQL finds its library and share directories relative to its
/// programs, so a server started from here loads the old extension, and the installed one is
/// never touched (other tests use it at the same time). Removed when dropped.
struct OldInstall {
    root: PathBuf,
}

impl OldInstall {
    fn new(release: &Path) -> OldInstall {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let root = PathBuf::from(format!(
            "/tmp/webhook_ext_pg_{PREVIOUS}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&root);
        let pkglib = pg_config("--pkglibdir");
        let share = extension_dir().parent().unwrap().to_path_buf();
        for dir in [bin_dir().to_path_buf(), pkglib.clone(), share.clone()] {
            let copy = under(&root, &dir);
            if copy.exists() {
                continue; // inside a directory copied already
            }
            std::fs::create_dir_all(copy.parent().unwrap()).unwrap();
            // Hard links are enough: nothing below is ever written through them, and the
            // extension's own files are replaced (unlinked, then copied), not overwritten.
            let linked = Command::new("cp")
                .arg("-al")
                .arg(&dir)
                .arg(&copy)
                .status()
                .unwrap()
                .success();
            if !linked {
                let _ = std::fs::remove_dir_all(&copy);
                let copied = Command::new("cp")
                    .arg("-a")
                    .arg(&dir)
                    .arg(&copy)
                    .status()
                    .unwrap();
                assert!(copied.success(), "copying {}", dir.display());
            }
        }
        // Out with the installed release's files, in with the previous one's.
        for dir in [
            under(&root, &pkglib),
            under(&root, &share.join("extension")),
        ] {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                if name.starts_with("webhook_ext") {
                    std::fs::remove_file(&path).unwrap();
                }
            }
        }
        for (from, to) in [
            (pkglib.clone(), under(&root, &pkglib)),
            (
                share.join("extension"),
                under(&root, &share.join("extension")),
            ),
        ] {
            let from = under(release, &from);
            for entry in
                std::fs::read_dir(&from).unwrap_or_else(|e| panic!("{}: {e}", from.display()))
            {
                let path = entry.unwrap().path();
                let name = path.file_name().unwrap().to_owned();
                if name.to_string_lossy().starts_with("webhook_ext") {
                    std::fs::copy(&path, to.join(&name)).unwrap();
                }
            }
        }
        let install = OldInstall { root };
        assert!(
            install.library().exists(),
            "no {}",
            install.library().display()
        );
        install
    }

    fn pg_ctl(&self) -> PathBuf {
        under(&self.root, bin_dir()).join("pg_ctl")
    }

    fn library(&self) -> PathBuf {
        under(&self.root, &pg_config("--pkglibdir")).join("webhook_ext.so")
    }
}

impl Drop for OldInstall {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// A server of `cluster`'s data directory run by `install`'s programs; stopped at once if the
/// test fails while it runs.
struct OldServer<'a> {
    install: &'a OldInstall,
    cluster: &'a Cluster,
    running: bool,
}

impl<'a> OldServer<'a> {
    fn pg_ctl(&self, args: &[&str]) -> std::process::Output {
        // SAFETY: geteuid has no preconditions.
        let mut c = if unsafe { libc_geteuid() } == 0 {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.install.pg_ctl());
            c
        } else {
            Command::new(self.install.pg_ctl())
        };
        c.arg("-D")
            .arg(self.cluster.data())
            .args(args)
            .env_remove("RUST_BACKTRACE")
            .env_remove("RUST_LIB_BACKTRACE")
            .output()
            .unwrap()
    }

    fn start(install: &'a OldInstall, cluster: &'a Cluster) -> OldServer<'a> {
        let mut s = OldServer {
            install,
            cluster,
            running: false,
        };
        let log = cluster.log_path();
        let out = s.pg_ctl(&["-l", log.to_str().unwrap(), "-w", "-t", "60", "start"]);
        assert!(
            out.status.success(),
            "starting the {PREVIOUS} server: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            cluster.log()
        );
        s.running = true;
        s
    }

    fn stop(mut self) {
        let out = self.pg_ctl(&["-m", "fast", "-w", "-t", "60", "stop"]);
        assert!(
            out.status.success(),
            "stopping the {PREVIOUS} server: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.running = false;
    }
}

impl Drop for OldServer<'_> {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        }
    }
}

/// The files the running server of `cluster` has mapped whose name is `webhook_ext.so`.
fn loaded_libraries(cluster: &Cluster) -> Vec<String> {
    let pidfile = std::fs::read_to_string(cluster.data().join("postmaster.pid")).unwrap();
    let pid = pidfile.lines().next().unwrap().trim();
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut libs: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.ends_with("/webhook_ext.so"))
        .map(str::to_string)
        .collect();
    libs.dedup();
    libs
}

fn versions_available(db: &mut postgres::Client) -> Vec<String> {
    db.query(
        "SELECT version FROM pg_available_extension_versions WHERE name = 'webhook_ext' ORDER BY 1",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

fn extversion(db: &mut postgres::Client) -> String {
    db.query_one(
        "SELECT extversion FROM pg_extension WHERE extname = 'webhook_ext'",
        &[],
    )
    .unwrap()
    .get(0)
}

/// Every delivery as text: id, endpoint, status, attempts, last status code, delivered_at, event.
fn delivery_rows(db: &mut postgres::Client) -> BTreeMap<i64, String> {
    db.query(
        "SELECT d.id, concat_ws(' ', e.name, d.status, d.attempts, d.last_status_code,
                                d.delivered_at, d.event_id, d.created_at)
           FROM webhook.deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// Every attempt as text, by (delivery, attempt).
fn attempt_rows(db: &mut postgres::Client) -> BTreeMap<(i64, i32), String> {
    db.query(
        "SELECT delivery_id, attempt, concat_ws(' ', endpoint_id, started_at, duration, status_code, error)
           FROM webhook.attempts",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| ((r.get(0), r.get(1)), r.get(2)))
    .collect()
}

/// Every event as text, by id.
fn event_rows(db: &mut postgres::Client) -> BTreeMap<i64, String> {
    db.query(
        "SELECT id, concat_ws(' ', type, payload, created_at) FROM webhook.events",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// How many deliveries of `endpoint` have `status`.
fn with_status(db: &mut postgres::Client, endpoint: &str, status: &str) -> i64 {
    db.query_one(
        "SELECT count(*) FROM webhook.deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id
          WHERE e.name = $1 AND d.status::text = $2",
        &[&endpoint, &status],
    )
    .unwrap()
    .get(0)
}

/// webhook.metrics' (pending, sending, delivered_total, failed_total) for `endpoint`.
fn metrics(db: &mut postgres::Client, endpoint: &str) -> (i64, i64, i64, i64) {
    let r = db
        .query_one(
            "SELECT pending, sending, delivered_total, failed_total FROM webhook.metrics
              WHERE endpoint = $1",
            &[&endpoint],
        )
        .unwrap();
    (r.get(0), r.get(1), r.get(2), r.get(3))
}

/// Waits for webhook.metrics to show `expected` for `endpoint` (the worker writes the counters
/// within a second of the deliveries' rows).
fn wait_for_metrics(db: &mut postgres::Client, endpoint: &str, expected: (i64, i64, i64, i64)) {
    wait_for_value(
        PATIENCE,
        &format!("{endpoint}'s (pending, sending, delivered, failed)"),
        expected,
        || metrics(db, endpoint),
    );
}

/// The ids of `endpoint`'s deliveries with `status`, in order.
fn ids_with_status(db: &mut postgres::Client, endpoint: &str, status: &str) -> Vec<i64> {
    db.query(
        "SELECT d.id FROM webhook.deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id
          WHERE e.name = $1 AND d.status::text = $2 ORDER BY d.id",
        &[&endpoint, &status],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// How many times each webhook-id reached a receiver.
fn times_sent(reqs: &[Request]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for r in reqs {
        *m.entry(r.webhook_id()).or_insert(0) += 1;
    }
    m
}

/// (type, new row's id) of each request, sorted, each verified with `secret`.
fn new_rows(reqs: &[Request], secret: &str) -> Vec<(String, i64)> {
    let mut rows: Vec<(String, i64)> = reqs
        .iter()
        .map(|r| {
            verify_with_standardwebhooks(secret, r).unwrap();
            let j = r.json();
            (
                j["type"].as_str().unwrap().to_string(),
                j["data"]["new"]["id"].as_i64().unwrap(),
            )
        })
        .collect();
    rows.sort();
    rows
}

/// The `install` part of a `webhook-id` (`msg_<install>_<delivery id>`).
fn install_of(req: &Request) -> String {
    let id = req.webhook_id();
    let parts: Vec<&str> = id.split('_').collect();
    assert_eq!(parts.len(), 3, "{id}");
    parts[1].to_string()
}

#[test]
fn upgrading_from_the_previous_release_keeps_history_and_delivers_what_was_pending() {
    let release = previous_release();
    let install = OldInstall::new(&release);

    // A cluster made by the installed initdb, first started without webhook_ext at all (so the
    // current library never touches it before the upgrade), to create the database.
    let mut pg = Cluster::init(&[
        ("shared_preload_libraries".into(), "''".into()),
        ("webhook.database".into(), "'app'".into()),
        ("webhook.allow_private_networks".into(), "on".into()),
        ("webhook.retry_schedule".into(), "'200ms,400ms'".into()),
        // Failures must end in `failed`, not wait for circuit-breaker probes.
        ("webhook.circuit_breaker_threshold".into(), "0".into()),
    ]);
    pg.create_database("app");
    pg.stop("fast");
    pg.set("shared_preload_libraries", "'webhook_ext'");

    // crm: always 200. bad: always 500 (2 attempts, then failed). later: "down" until the
    // upgrade: it holds every request (the worker's timeout for it is 5 minutes), then 200.
    let rx_crm = Receiver::start(always(Reply::ok()));
    let rx_bad = Receiver::start(always(Reply::status(500)));
    let up = Arc::new(AtomicBool::new(false));
    let rx_later = Receiver::start({
        let up = up.clone();
        Arc::new(move |_, _| {
            if up.load(Ordering::SeqCst) {
                Reply::ok()
            } else {
                Reply::ok().after(HOLD)
            }
        })
    });

    // ---- The previous release, running. ----
    let old = OldServer::start(&install, &pg);
    let libs = loaded_libraries(&pg);
    assert_eq!(
        libs,
        [install.library().display().to_string()],
        "the {PREVIOUS} server loads the previous release's library"
    );
    let mut db = pg.client();
    assert_eq!(
        versions_available(&mut db),
        ["0.1.0", PREVIOUS],
        "the {PREVIOUS} server sees only that release's scripts"
    );
    db.batch_execute(
        "CREATE EXTENSION webhook_ext;
         -- 0.3.0 computes delivery ids (event id * 2^20 + endpoint id). The old deliveries get
         -- the ids the rows written after the update would get if the update did not move the
         -- event ids past them (event 22 to crm, endpoint 1): those writes would fail.
         ALTER TABLE webhook.deliveries ALTER COLUMN id RESTART WITH 23068673;
         CREATE TABLE users (id int PRIMARY KEY, email text);
         CREATE TABLE orders (id int);
         CREATE TABLE invoices (id int);
         CREATE TABLE tickets (id int);",
    )
    .unwrap();
    assert_eq!(extversion(&mut db), PREVIOUS);
    let secret = create_endpoint(&mut db, "crm", &rx_crm.url("/"));
    db.batch_execute(&format!(
        "SELECT webhook.create_endpoint('bad', '{}', max_attempts => 2, retry_schedule => '100ms');
         SELECT webhook.create_endpoint('later', '{}', max_in_flight => 1, timeout => '5 minutes',
                                        secret => '{secret}');
         SELECT webhook.subscribe('users', 'crm');
         SELECT webhook.subscribe('invoices', 'bad');
         SELECT webhook.subscribe('tickets', 'later');
         -- A hand-written trigger, which 0.2.0 let publish without asking.
         CREATE TRIGGER orders_by_hand AFTER INSERT ON orders FOR EACH ROW
             EXECUTE FUNCTION webhook.enqueue('crm');
         INSERT INTO users SELECT g, 'u' || g || '@example.com' FROM generate_series(1, 10) g;
         INSERT INTO orders VALUES (1), (2);
         INSERT INTO invoices VALUES (1), (2), (3);
         INSERT INTO tickets VALUES (1), (2), (3), (4);",
        rx_bad.url("/"),
        rx_later.url("/"),
    ))
    .unwrap();
    // The old worker's real history: 12 delivered, 3 failed after 2 attempts each, and for
    // `later` one request under way (held by its receiver) with three waiting behind it.
    wait_until(PATIENCE, "the 0.2.0 worker's deliveries", || {
        (with_status(&mut db, "crm", "delivered") == 12
            && with_status(&mut db, "bad", "failed") == 3
            && with_status(&mut db, "later", "sending") == 1
            && with_status(&mut db, "later", "pending") == 3
            && rx_later.count() == 1)
            .then_some(())
    });
    assert_eq!(rx_crm.count(), 12);
    assert_eq!(rx_bad.count(), 6);
    assert_eq!(
        metrics(&mut db, "crm"),
        (0, 0, 12, 0),
        "crm: pending, sending, delivered, failed"
    );
    assert_eq!(metrics(&mut db, "bad"), (0, 0, 0, 3));
    assert_eq!(metrics(&mut db, "later"), (3, 1, 0, 0));
    let history = delivery_rows(&mut db);
    let attempts = attempt_rows(&mut db);
    let events = event_rows(&mut db);
    assert_eq!((history.len(), attempts.len(), events.len()), (19, 18, 19));
    let in_flight = ids_with_status(&mut db, "later", "sending");
    let waiting = ids_with_status(&mut db, "later", "pending");
    let finished: Vec<i64> = history
        .iter()
        .filter(|(_, row)| row.contains(" delivered ") || row.contains(" failed "))
        .map(|(id, _)| *id)
        .collect();
    assert_eq!(finished.len(), 15);
    let held = rx_later.requests()[0].clone();
    assert_eq!(delivery_id(&held), in_flight[0]);
    let install_id = install_of(&held);
    let old_crm_ids = times_sent(&rx_crm.requests());
    let old_bad_ids = times_sent(&rx_bad.requests());
    assert_eq!(old_crm_ids.len(), 12, "each crm delivery sent once");
    assert!(old_bad_ids.values().all(|&n| n == 2) && old_bad_ids.len() == 3);
    drop(db);
    old.stop();

    // ---- The current release, on the same data directory. ----
    up.store(true, Ordering::SeqCst);
    pg.start_again();
    let libs = loaded_libraries(&pg);
    assert_eq!(
        libs,
        [pg_config("--pkglibdir")
            .join("webhook_ext.so")
            .display()
            .to_string()],
        "the restarted server loads the installed library"
    );
    let (mut db, notices) = pg.client_with_notices("app");
    assert!(versions_available(&mut db).contains(&"0.3.0".to_string()));
    assert_eq!(extversion(&mut db), PREVIOUS);
    // Served by the new library before the update: the worker waits for it and sends nothing.
    wait_until(PATIENCE, "the worker to wait for the update", || {
        (worker(&mut db, "app").state == "waiting for ALTER EXTENSION webhook_ext UPDATE")
            .then_some(())
    });
    assert_eq!(
        (rx_crm.count(), rx_bad.count(), rx_later.count()),
        (12, 6, 1),
        "nothing is sent before the update"
    );
    assert_eq!(metrics(&mut db, "later"), (3, 1, 0, 0));
    // Writes go on under the current library on the 0.2.0 schema, through subscribe()'s trigger
    // and the hand-written one; what they record waits for the update too.
    db.batch_execute(
        "INSERT INTO users VALUES (11, 'before@example.com');
         INSERT INTO orders VALUES (3);",
    )
    .unwrap();
    assert_eq!(with_status(&mut db, "crm", "pending"), 2);
    assert_eq!(
        (rx_crm.count(), rx_bad.count(), rx_later.count()),
        (12, 6, 1),
        "nothing is sent before the update"
    );

    // An operator's monitoring grant on worker_status(), which 0.3.0 makes anew (its result has
    // a new column): kept through the update.
    db.batch_execute(
        "CREATE ROLE monitor LOGIN;
         GRANT USAGE ON SCHEMA webhook TO monitor;
         GRANT EXECUTE ON FUNCTION webhook.worker_status(), webhook._worker_slots() TO monitor;",
    )
    .unwrap();
    // A schema "webhook" owned by a role that is not a superuser (made by it before a 0.2.0
    // CREATE EXTENSION, which took it as it was): the update refuses it, naming the owner, and
    // changes nothing; given to a superuser, the update goes on.
    db.batch_execute("CREATE ROLE squatter; ALTER SCHEMA webhook OWNER TO squatter")
        .unwrap();
    let e = db_error(
        db.batch_execute("ALTER EXTENSION webhook_ext UPDATE"),
        "ALTER EXTENSION UPDATE with schema webhook owned by squatter",
    );
    assert!(
        e.message() == "schema \"webhook\" is owned by squatter, a role that is not a superuser",
        "{e:?}"
    );
    assert_eq!(extversion(&mut db), PREVIOUS);
    db.batch_execute("ALTER SCHEMA webhook OWNER TO CURRENT_USER; DROP ROLE squatter")
        .unwrap();
    db.batch_execute("ALTER EXTENSION webhook_ext UPDATE")
        .unwrap();
    assert_eq!(extversion(&mut db), "0.3.0");
    let kept: Vec<bool> = db
        .query(
            "SELECT has_function_privilege('monitor', f, 'EXECUTE')
               FROM unnest('{webhook.worker_status(),webhook._worker_slots()}'::regprocedure[]) f",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(
        kept,
        [true, true],
        "monitor keeps EXECUTE on worker_status()"
    );
    let warned: Vec<String> = notices
        .lock()
        .unwrap()
        .iter()
        .filter(|n| n.contains("orders_by_hand"))
        .cloned()
        .collect();
    assert_eq!(
        warned,
        ["webhook_ext: trigger orders_by_hand on table public.orders (owner postgres) may go on publishing to endpoint \"crm\""],
        "the update names the hand-written trigger it keeps"
    );

    // What was pending goes out: the request that was under way once more, the three behind it
    // once, each with its original webhook-id; and the two rows written before the update.
    let reqs = rx_later.wait_for(5, PATIENCE);
    let crm = rx_crm.wait_for(14, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    let sent = times_sent(&reqs);
    let expected: BTreeMap<String, usize> = in_flight
        .iter()
        .map(|id| (format!("msg_{install_id}_{id}"), 2))
        .chain(
            waiting
                .iter()
                .map(|id| (format!("msg_{install_id}_{id}"), 1)),
        )
        .collect();
    assert_eq!(sent, expected, "later: times each webhook-id was sent");
    let again: Vec<&Request> = reqs[1..]
        .iter()
        .filter(|r| r.webhook_id() == held.webhook_id())
        .collect();
    assert_eq!(again.len(), 1);
    assert_eq!(
        again[0].body, held.body,
        "the same body as the 0.2.0 worker sent"
    );
    for r in &reqs {
        verify_with_standardwebhooks(&secret, r).unwrap();
    }
    let ticket_ids: Vec<i64> = reqs[1..]
        .iter()
        .map(|r| r.json()["data"]["new"]["id"].as_i64().unwrap())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(ticket_ids, [1, 2, 3, 4]);
    assert_eq!(with_status(&mut db, "later", "delivered"), 4);

    // History intact: every finished delivery, every attempt and every event as it was.
    let history_after = delivery_rows(&mut db);
    for id in &finished {
        assert_eq!(history_after.get(id), history.get(id), "delivery {id}");
    }
    let attempts_after = attempt_rows(&mut db);
    for (key, row) in &attempts {
        assert_eq!(attempts_after.get(key), Some(row), "attempt {key:?}");
    }
    assert_eq!(
        attempts_after.len(),
        attempts.len() + 6,
        "one attempt more per delivery pending at the update"
    );
    let events_after = event_rows(&mut db);
    for (id, row) in &events {
        assert_eq!(events_after.get(id), Some(row), "event {id}");
    }
    assert_eq!(events_after.len(), events.len() + 2);
    assert_eq!(
        new_rows(&crm[12..], &secret),
        [
            ("public.orders.insert".to_string(), 3),
            ("public.users.insert".to_string(), 11)
        ]
    );
    wait_for_metrics(&mut db, "crm", (0, 0, 14, 0));
    wait_for_metrics(&mut db, "bad", (0, 0, 0, 3));
    wait_for_metrics(&mut db, "later", (0, 0, 4, 0));

    // Each trigger kept its right, recorded as what it is: subscribe()'s own triggers, and the
    // hand-written one as allowed (so unsubscribe() would not take it, disallow_publish() would).
    let rights: Vec<(String, String, String)> = db
        .query(
            "SELECT p.relid::regclass::text, e.name, p.via FROM webhook._publishers p
               JOIN webhook.endpoints e ON e.id = p.endpoint_id ORDER BY 1",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let right = |t: &str, e: &str, via: &str| (t.to_string(), e.to_string(), via.to_string());
    assert_eq!(
        rights,
        [
            right("invoices", "bad", "subscribe"),
            right("orders", "crm", "allow_publish"),
            right("tickets", "later", "subscribe"),
            right("users", "crm", "subscribe"),
        ]
    );
    // New rows after the update go through, through subscribe()'s trigger and the hand-written one.
    db.batch_execute(
        "INSERT INTO users VALUES (12, 'after@example.com');
         INSERT INTO orders VALUES (4);",
    )
    .unwrap();
    let crm = rx_crm.wait_for(16, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    assert_eq!(
        new_rows(&crm[14..], &secret),
        [
            ("public.orders.insert".to_string(), 4),
            ("public.users.insert".to_string(), 12)
        ]
    );
    wait_for_metrics(&mut db, "crm", (0, 0, 16, 0));
    // Nothing sent twice beyond the request that was under way.
    let crm_ids = times_sent(&rx_crm.requests());
    assert_eq!(crm_ids.len(), 16);
    assert!(crm_ids.values().all(|&n| n == 1), "{crm_ids:?}");
    assert!(old_crm_ids.keys().all(|k| crm_ids.contains_key(k)));
    assert_eq!(times_sent(&rx_bad.requests()), old_bad_ids);
    assert_eq!(rx_later.count(), 5);
    drop(db);
    pg.stop("fast");
}
