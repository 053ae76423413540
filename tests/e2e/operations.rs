//! End-to-end: operating webhook_ext — several databases in one cluster, DROP DATABASE, settings
//! reloads, upgrades from the previous release, the installed artefact, and the README's own
//! examples (its SQL, and its signature-verification snippets run against real requests).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;

fn conf(db: &str) -> Vec<(String, String)> {
    vec![
        ("webhook.database".into(), format!("'{db}'")),
        ("webhook.allow_private_networks".into(), "on".into()),
        ("webhook.retry_schedule".into(), "'200ms,400ms'".into()),
    ]
}

fn served(db: &mut postgres::Client) -> BTreeSet<String> {
    db.query(
        "SELECT database FROM webhook.worker_status() WHERE pid IS NOT NULL",
        &[],
    )
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

#[test]
fn two_databases_deliver_at_once_and_one_can_be_dropped() {
    let pg = Cluster::init(&conf("one,two"));
    pg.create_database("one");
    pg.create_database("two");
    let (rx1, rx2) = (
        Receiver::start(always(Reply::ok())),
        Receiver::start(always(Reply::ok())),
    );
    let mut one = pg.client_to("one");
    let mut two = pg.client_to("two");
    for (db, rx) in [(&mut one, &rx1), (&mut two, &rx2)] {
        db.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
        create_endpoint(db, "e", &rx.url("/"));
    }
    let expected: BTreeSet<String> = ["one".to_string(), "two".to_string()].into();
    wait_until(PATIENCE, "a worker for each database", || {
        (served(&mut one) == expected).then_some(())
    });
    one.execute(
        "SELECT webhook.send('x', to_jsonb(g), 'e') FROM generate_series(1, 50) g",
        &[],
    )
    .unwrap();
    two.execute(
        "SELECT webhook.send('x', to_jsonb(g), 'e') FROM generate_series(1, 50) g",
        &[],
    )
    .unwrap();
    rx1.wait_for(50, PATIENCE);
    rx2.wait_for(50, PATIENCE);
    // The two workers use separate webhook-id namespaces.
    assert_ne!(
        rx1.requests()[0].webhook_id().rsplit_once('_').unwrap().0,
        rx2.requests()[0].webhook_id().rsplit_once('_').unwrap().0
    );

    // DROP DATABASE needs the database free of connections: the worker steps aside at once.
    drop(one);
    let mut admin = pg.client_to("postgres");
    let t = Instant::now();
    admin.batch_execute("DROP DATABASE one").unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "DROP DATABASE took {:?}",
        t.elapsed()
    );
    two.execute(
        "SELECT webhook.send('after', to_jsonb(g), 'e') FROM generate_series(1, 20) g",
        &[],
    )
    .unwrap();
    rx2.wait_for(70, PATIENCE);
    assert_eq!(served(&mut two), BTreeSet::from(["two".to_string()]));
    assert!(!pg.log().contains("is being accessed by other users"));
}

#[test]
fn reloading_the_database_list_starts_and_stops_workers() {
    let pg = Cluster::init(&conf("one"));
    pg.create_database("one");
    pg.create_database("two");
    let rx = Receiver::start(always(Reply::ok()));
    let mut two = pg.client_to("two");
    two.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
    create_endpoint(&mut two, "e", &rx.url("/"));
    // Not served yet: the events wait, and the API says why.
    let mut status = worker_state(&mut two, "two").unwrap();
    assert_eq!(status, "not served: add this database to webhook.database");
    two.execute(
        "SELECT webhook.send('x', to_jsonb(g), 'e') FROM generate_series(1, 10) g",
        &[],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.count(), 0);

    pg.set("webhook.database", "'one, two'");
    pg.reload();
    rx.wait_for(10, PATIENCE);
    status = worker_state(&mut two, "two").unwrap();
    assert!(status == "idle" || status == "working", "{status}");

    pg.set("webhook.database", "'one'");
    pg.reload();
    wait_until(PATIENCE, "the worker for two to stop", || {
        (!served(&mut two).contains("two")).then_some(())
    });
    two.execute("SELECT webhook.send('later', '{}', 'e')", &[])
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(rx.count(), 10);
}

/// Everything in schema webhook, as text: what a fresh install and an upgraded one must agree on.
fn catalog(db: &mut postgres::Client) -> Vec<String> {
    let q = r#"
        SELECT 'function ' || p.oid::regprocedure || ' ' || pg_get_functiondef(p.oid) || coalesce(p.proacl::text, '')
          FROM pg_proc p WHERE p.pronamespace = 'webhook'::regnamespace
        UNION ALL
        SELECT 'relation ' || c.relname || ' ' || c.relkind::text || ' ' || coalesce(c.relacl::text, '') ||
               coalesce(' view ' || pg_get_viewdef(c.oid), '')
          FROM pg_class c WHERE c.relnamespace = 'webhook'::regnamespace AND c.relkind IN ('r', 'v', 'S')
        UNION ALL
        SELECT 'column ' || c.relname || '.' || a.attname || ' ' || format_type(a.atttypid, a.atttypmod) ||
               ' notnull=' || a.attnotnull || ' default=' || coalesce(pg_get_expr(d.adbin, d.adrelid), '') ||
               ' identity=' || a.attidentity::text || ' stattarget=' || coalesce(a.attstattarget, -1)
          FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
          LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
         WHERE c.relnamespace = 'webhook'::regnamespace AND a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'v')
        UNION ALL
        SELECT 'index ' || pg_get_indexdef(i.indexrelid) FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid
         WHERE c.relnamespace = 'webhook'::regnamespace
        UNION ALL
        SELECT 'constraint ' || conrelid::regclass || ' ' || pg_get_constraintdef(oid) FROM pg_constraint
         WHERE connamespace = 'webhook'::regnamespace
        UNION ALL
        SELECT 'trigger ' || pg_get_triggerdef(t.oid) FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid
         WHERE c.relnamespace = 'webhook'::regnamespace
        UNION ALL
        SELECT 'type ' || t.typname || ' ' || coalesce(string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder), '')
               || ' ' || coalesce(t.typacl::text, '')
          FROM pg_type t LEFT JOIN pg_enum e ON e.enumtypid = t.oid
         WHERE t.typnamespace = 'webhook'::regnamespace AND t.typtype = 'e' GROUP BY t.typname, t.typacl::text
        UNION ALL
        SELECT 'member ' || pg_describe_object(classid, objid, objsubid) FROM pg_depend
         WHERE refclassid = 'pg_extension'::regclass AND deptype = 'e'
           AND refobjid = (SELECT oid FROM pg_extension WHERE extname = 'webhook_ext')
        ORDER BY 1"#;
    db.query(q, &[]).unwrap().iter().map(|r| r.get(0)).collect()
}

#[test]
fn a_fresh_install_and_an_upgraded_one_are_the_same() {
    let pg = Cluster::init(&conf("none"));
    pg.create_database("fresh");
    pg.create_database("upgraded");
    let mut fresh = pg.client_to("fresh");
    let mut upgraded = pg.client_to("upgraded");
    fresh.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
    upgraded
        .batch_execute(
            "CREATE EXTENSION webhook_ext VERSION '0.1.0'; ALTER EXTENSION webhook_ext UPDATE",
        )
        .unwrap();
    let (a, b) = (catalog(&mut fresh), catalog(&mut upgraded));
    // The claim's plans depend on the planner knowing nothing of deliveries.status.
    assert!(
        a.iter()
            .any(|x| x.starts_with("column _deliveries.status ") && x.ends_with(" stattarget=0")),
        "deliveries.status keeps no statistics"
    );
    let only_fresh: Vec<&String> = a.iter().filter(|x| !b.contains(x)).collect();
    let only_upgraded: Vec<&String> = b.iter().filter(|x| !a.contains(x)).collect();
    assert!(
        only_fresh.is_empty() && only_upgraded.is_empty(),
        "schemas differ\nonly in a fresh install:\n{only_fresh:#?}\nonly after the upgrade:\n{only_upgraded:#?}"
    );
}

#[test]
fn a_dump_restores_into_a_working_queue() {
    let pg = Cluster::init(&conf("dst"));
    pg.create_database("src");
    pg.create_database("dst");
    let rx = Receiver::start(always(Reply::ok()));
    let mut src = pg.client_to("src");
    src.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
    create_endpoint(&mut src, "e", &rx.url("/"));
    src.execute(
        "SELECT webhook.send('before', to_jsonb(g), 'e') FROM generate_series(1, 5) g",
        &[],
    )
    .unwrap();
    let dump = pg.dir.join("src.sql");
    let dump = dump.to_str().unwrap();
    let port = pg.port.to_string();
    client_program(
        "pg_dump",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-f",
            dump,
            "src",
        ],
    );
    client_program(
        "psql",
        &[
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-d",
            "dst",
            "-f",
            dump,
        ],
    );
    // The restored queue is delivered (dst is served), and new events get new ids.
    let mut dst = pg.client_to("dst");
    rx.wait_for(5, PATIENCE);
    dst.execute(
        "SELECT webhook.send('after', to_jsonb(g), 'e') FROM generate_series(1, 5) g",
        &[],
    )
    .unwrap();
    rx.wait_for(10, PATIENCE);
    wait_settled(&mut dst, PATIENCE);
    let events = count(&mut dst, "SELECT count(DISTINCT id) FROM webhook.events");
    assert_eq!(events, 10);
    // The restored queue hands out new delivery ids: no webhook-id is sent twice.
    let ids: std::collections::HashSet<String> =
        rx.requests().iter().map(|r| r.webhook_id()).collect();
    assert_eq!(ids.len(), 10, "webhook-ids repeated after the restore");
}

/// Rows that reach the queue without a committing writer's wake (as a restore's COPY does) are
/// picked up by the idle worker within seconds, not at its next housekeeping (a minute).
#[test]
fn rows_copied_into_the_queue_are_picked_up_without_a_wake() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "e", &rx.url("/"));
    // The worker has done its start-up housekeeping and sleeps.
    wait_until(PATIENCE, "the worker to be idle", || {
        (worker_state(&mut db, "app").as_deref() == Some("idle")).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    let t = Instant::now();
    let mut copy = db
        .copy_in("COPY webhook._events (id, type, payload) FROM STDIN")
        .unwrap();
    std::io::Write::write_all(&mut copy, b"1000\tcopied\t{}\n").unwrap();
    copy.finish().unwrap();
    let mut copy = db
        .copy_in("COPY webhook._deliveries (event_id, endpoint_id) FROM STDIN")
        .unwrap();
    std::io::Write::write_all(&mut copy, b"1000\t1\n").unwrap();
    copy.finish().unwrap();
    let got = rx.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].json()["type"], "copied");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "picked up after {:?}",
        t.elapsed()
    );
}

/// The fenced blocks of `lang` in README.md.
fn readme_blocks(lang: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in readme.lines() {
        match &mut current {
            None if line.trim_start() == format!("```{lang}") => current = Some(String::new()),
            Some(block) if line.trim_start().starts_with("```") => {
                blocks.push(std::mem::take(block));
                current = None;
            }
            Some(block) => {
                block.push_str(line);
                block.push('\n');
            }
            None => {}
        }
    }
    blocks
}

#[test]
fn every_sql_example_in_the_readme_runs() {
    // Retries an hour apart: the examples' deliveries (to hosts that do not resolve here) stay
    // pending while the blocks run, so what they show does not depend on timing.
    let mut settings = conf("app");
    settings.push(("webhook.retry_schedule".into(), "'1h'".into()));
    let pg = Cluster::init(&settings);
    pg.create_database("app");
    let blocks = readme_blocks("sql");
    assert!(blocks.len() >= 5, "the README has SQL examples");
    // The README has exactly this many ```sql blocks (the quick start, SQL API, operational
    // events, Security): a block the parser stops seeing fails here rather than going untested.
    assert_eq!(blocks.len(), 8, "```sql blocks in README.md");
    let mut ran = 0;
    let mut outputs: Vec<String> = Vec::new();
    let mut db = pg.client_to("app");
    for block in &blocks {
        // What the blocks before sent has had its (failed) attempt recorded: a block that shows
        // the queue shows it settled, however loaded the machine.
        wait_until(PATIENCE, "no delivery being sent", || {
            let installed: bool = db
                .query_one("SELECT to_regclass('webhook._deliveries') IS NOT NULL", &[])
                .unwrap()
                .get(0);
            (!installed
                || count(
                    &mut db,
                    "SELECT count(*) FROM webhook._deliveries WHERE status = 'sending'",
                ) == 0)
                .then_some(())
        });
        let out = Command::new(pg_bin("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "app",
                // From standard input, statement by statement: with -c a psql before 15 sends
                // the block as one query and prints only its last result.
                "-f",
                "-",
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .and_then(|mut child| {
                use std::io::Write;
                child
                    .stdin
                    .take()
                    .expect("piped")
                    .write_all(block.as_bytes())?;
                child.wait_with_output()
            })
            .unwrap();
        assert!(
            out.status.success(),
            "README example failed:\n{block}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
        outputs.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    assert_eq!(ran, blocks.len(), "every README SQL block ran");

    // What the blocks show, where they show something (psql -A -t: one line per row).
    let lines: Vec<Vec<&str>> = outputs
        .iter()
        .map(|o| o.lines().filter(|l| !l.is_empty()).collect())
        .collect();
    // Quick start: a generated secret, the trigger, and one delivery for the INSERT (the
    // worker cannot reach crm.example.com here, so it is still pending).
    assert!(lines[0][0].starts_with("whsec_"), "{:?}", lines[0]);
    assert_eq!(lines[0][1], "webhook_crm");
    assert!(
        ["pending|0|", "pending|1|", "sending|0|"].contains(&lines[0][2]) && lines[0].len() == 3,
        "{:?}",
        lines[0]
    );
    // Endpoints: rotate_secret returns a new secret.
    let created = lines[1][0].split(',').nth(3).unwrap();
    assert!(
        lines[1][3].starts_with("whsec_") && lines[1][3] != created,
        "{:?}",
        lines[1]
    );
    assert!(lines[1][1].contains(",3,") && lines[1][1].contains("\"1min,10min,1h\""));
    assert!(
        !lines[1][2].contains("1min,10min,1h"),
        "reset returns to the default"
    );
    // ... and signing with ed25519 too shows a public key.
    assert_eq!(lines[1][4], "both");
    assert!(lines[1][5].starts_with("billing|whpk_"), "{:?}", lines[1]);
    // Sources: webhook.subscriptions lists both subscriptions and the hand-written trigger.
    assert_eq!(
        lines[2][lines[2].len() - 3..],
        [
            "users|billing|{INSERT}|",
            "users|crm|{UPDATE}|{id,plan}",
            "orders|crm|{INSERT}|"
        ]
    );
    // Redelivery: nothing failed; crm's two events of the day (the INSERT, invoice.paid) are
    // replayed; nothing is 30 days old.
    assert_eq!(lines[3], ["2", "0"]);
    // Signatures: the value the block's comment gives.
    let vector = blocks[4]
        .split("-- ")
        .nth(1)
        .and_then(|c| c.split_whitespace().next())
        .unwrap();
    assert_eq!(lines[4], [vector]);
    // Tables and views: metrics and worker_status rows for what the blocks above made.
    assert!(lines[5].contains(&"pending|5"), "{:?}", lines[5]);
    for name in ["billing", "crm"] {
        assert!(
            lines[5]
                .iter()
                .any(|l| l.starts_with(&format!("{name}|t|"))),
            "no metrics row for {name}: {:?}",
            lines[5]
        );
    }
    let worker_row = lines[5].last().unwrap();
    assert!(
        worker_row.starts_with("app|") && worker_row.ends_with("|5"),
        "worker_status(): {worker_row}"
    );
    // Operational events: the ops endpoint made, the setting reloaded.
    assert!(
        lines[6].len() == 2 && lines[6][0].contains(",ops,") && lines[6][1] == "t",
        "{:?}",
        lines[6]
    );
    assert!(lines[7].is_empty(), "{:?}", lines[7]);
}

/// The standardwebhooks packages from PyPI and npm, installed once into a directory kept
/// between runs (cargo's target tmp dir): (Python site dir, Node node_modules). Installed before
/// anything is signed, so a slow install cannot push a signature past its 5-minute tolerance.
fn verifiers() -> (std::path::PathBuf, std::path::PathBuf) {
    let cache = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("e2e-verifiers");
    let site = cache.join("py");
    let node = cache.join("node");
    if !site.join("standardwebhooks").is_dir() {
        // Into a fresh directory, renamed into place once complete.
        let part = cache.join(format!("py.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&part);
        run(Command::new("python3")
            .args(["-m", "pip", "install", "-q", "--target"])
            .arg(&part)
            .arg("standardwebhooks"));
        let _ = std::fs::remove_dir_all(&site);
        std::fs::rename(&part, &site).unwrap();
    }
    if !node
        .join("node_modules/standardwebhooks/package.json")
        .is_file()
    {
        let part = cache.join(format!("node.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&part);
        std::fs::create_dir_all(&part).unwrap();
        run(Command::new("npm")
            .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
            .arg(&part)
            .arg("standardwebhooks"));
        let _ = std::fs::remove_dir_all(&node);
        std::fs::rename(&part, &node).unwrap();
    }
    (site, node.join("node_modules"))
}

#[test]
fn the_readme_snippets_verify_a_real_request() {
    let (site, node_modules) = verifiers();
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    let secret = create_endpoint(&mut db, "e", &rx.url("/"));
    db.execute(
        "SELECT webhook.send('user.created', '{\"id\": 1, \"email\": \"ada@example.com\"}', 'e')",
        &[],
    )
    .unwrap();
    let req = rx.wait_for(1, PATIENCE).remove(0);
    let dir = pg.dir.join("snippets");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("body"), &req.body).unwrap();
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    std::fs::write(
        dir.join("headers.json"),
        serde_json::Value::Object(headers).to_string(),
    )
    .unwrap();

    // Python, with the standardwebhooks package from PyPI.
    let py = readme_blocks("python")
        .into_iter()
        .next()
        .expect("a Python snippet")
        .replace("whsec_...", &secret);
    let py_program = format!(
        "import json, pathlib\nd = pathlib.Path({dir:?})\nrequest_body_bytes = (d / 'body').read_bytes()\n\
         request_headers = json.loads((d / 'headers.json').read_text())\n{py}\nprint(json.dumps(payload))\n",
        dir = dir.display().to_string()
    );
    let out = run(Command::new("python3")
        .arg("-c")
        .arg(&py_program)
        .env("PYTHONPATH", &site));
    assert!(out.contains("ada@example.com"), "{out}");

    // Node, with the standardwebhooks package from npm.
    let js = readme_blocks("js")
        .into_iter()
        .next()
        .expect("a Node snippet")
        .replace("whsec_...", &secret);
    // check.mjs resolves the package through dir/node_modules.
    std::os::unix::fs::symlink(&node_modules, dir.join("node_modules")).unwrap();
    let program = format!(
        "import fs from 'fs';\nconst rawBody = fs.readFileSync({body:?}, 'utf8');\n\
         const headers = JSON.parse(fs.readFileSync({headers:?}, 'utf8'));\n{js}\nconsole.log(JSON.stringify(payload));\n",
        body = dir.join("body").display().to_string(),
        headers = dir.join("headers.json").display().to_string()
    );
    std::fs::write(dir.join("check.mjs"), program).unwrap();
    let out = run(Command::new("node")
        .arg(dir.join("check.mjs"))
        .current_dir(&dir));
    assert!(out.contains("ada@example.com"), "{out}");

    // A tampered body fails with both.
    std::fs::write(
        dir.join("body"),
        String::from_utf8_lossy(&req.body).replace("ada", "eve"),
    )
    .unwrap();
    let tampered = Command::new("node")
        .arg(dir.join("check.mjs"))
        .current_dir(&dir)
        .output()
        .unwrap();
    assert!(
        !tampered.status.success(),
        "the Node snippet accepted a tampered body"
    );
    // It fails in verify() (the library's error), not for some other reason.
    let stderr = String::from_utf8_lossy(&tampered.stderr);
    assert!(
        stderr.contains("No matching signature found"),
        "the Node snippet failed otherwise: {stderr}"
    );
    let tampered = Command::new("python3")
        .arg("-c")
        .arg(&py_program)
        .env("PYTHONPATH", &site)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&tampered.stderr);
    assert!(
        !tampered.status.success(),
        "the Python snippet accepted a tampered body: {}",
        String::from_utf8_lossy(&tampered.stdout)
    );
    // It fails in verify() (the library's verification error), not for some other reason.
    assert!(
        stderr.contains("WebhookVerificationError"),
        "the Python snippet failed otherwise: {stderr}"
    );
    assert!(!String::from_utf8_lossy(&tampered.stdout).contains("eve@example.com"));
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------------
// The worker alone: stopped or killed, it comes back and delivers everything.

/// The pid of the launcher, from pg_stat_activity.
fn launcher_pid(db: &mut postgres::Client) -> i32 {
    db.query_one(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = 'webhook_ext launcher'",
        &[],
    )
    .unwrap()
    .get(0)
}

fn kill(pid: i32, signal: &str) {
    run(Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string()));
}

/// Twenty events to a receiver that holds the first requests for a second; returns once some
/// are under way, with the worker's pid.
fn deliveries_under_way(pg: &Cluster, rx: &Receiver) -> (postgres::Client, i32) {
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "e", &rx.url("/"));
    let pid = wait_until(PATIENCE, "the worker", || worker(&mut db, "app").pid);
    db.execute(
        "SELECT webhook.send('n', to_jsonb(g), 'e') FROM generate_series(1, 20) g",
        &[],
    )
    .unwrap();
    rx.wait_for(1, PATIENCE);
    (db, pid)
}

/// Every one of the twenty events arrived, each under one webhook-id, and all are delivered.
fn all_twenty_delivered_under_stable_ids(db: &mut postgres::Client, rx: &Receiver) {
    wait_settled(db, Duration::from_secs(60));
    let mut ids_of: std::collections::HashMap<i64, BTreeSet<String>> = Default::default();
    for r in rx.requests() {
        ids_of
            .entry(r.json()["data"].as_i64().unwrap())
            .or_default()
            .insert(r.webhook_id());
    }
    assert_eq!(ids_of.len(), 20, "every event arrives");
    assert!(
        ids_of.values().all(|ids| ids.len() == 1),
        "an event sent again under another webhook-id: {ids_of:?}"
    );
    let delivered = count(
        db,
        "SELECT count(*) FROM webhook.deliveries WHERE status = 'delivered'",
    );
    assert_eq!(delivered, 20);
}

fn holding_receiver() -> Receiver {
    Receiver::start(std::sync::Arc::new(|_, n| {
        if n < 5 {
            Reply::ok().after(Duration::from_secs(1))
        } else {
            Reply::ok()
        }
    }))
}

#[test]
fn a_worker_stopped_alone_is_started_again_by_the_launcher() {
    let pg = Cluster::start(&[]);
    let rx = holding_receiver();
    let (mut db, old) = deliveries_under_way(&pg, &rx);
    let launcher = launcher_pid(&mut db);
    kill(old, "TERM");
    let new = wait_until(PATIENCE, "a new worker", || {
        worker(&mut db, "app").pid.filter(|p| *p != old)
    });
    assert_ne!(new, old);
    // Only the worker went: this session and the launcher were never interrupted.
    assert_eq!(launcher_pid(&mut db), launcher);
    all_twenty_delivered_under_stable_ids(&mut db, &rx);
    assert!(
        !pg.log()
            .contains("terminating any other active server processes"),
        "SIGTERM of the worker restarted the server"
    );
}

#[test]
fn a_worker_killed_alone_restarts_the_server_processes_and_delivers_everything() {
    let pg = Cluster::start(&[]);
    let rx = holding_receiver();
    let (mut db, old) = deliveries_under_way(&pg, &rx);
    kill(old, "KILL");
    // PostgreSQL treats a background worker killed by a signal as a crash: it ends every
    // session (this one too) and reinitialises; the launcher then starts the worker again.
    wait_until(PATIENCE, "the server to end this session", || {
        db.simple_query("SELECT 1").is_err().then_some(())
    });
    let (mut db, new) = wait_until(Duration::from_secs(60), "a new worker", || {
        let mut db = postgres::Client::connect(&pg.connstr("app"), postgres::NoTls).ok()?;
        let pid = worker(&mut db, "app").pid.filter(|p| *p != old)?;
        Some((db, pid))
    });
    assert_ne!(new, old);
    all_twenty_delivered_under_stable_ids(&mut db, &rx);
    let log = pg.log();
    assert!(
        log.contains(&format!("(PID {old}) was terminated by signal 9")),
        "{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Installing: unserved databases are told so; the library needs preloading.

#[test]
fn an_unserved_database_is_told_so_and_loading_without_preload_is_refused() {
    let pg = Cluster::init(&conf("app"));
    pg.create_database("app");
    pg.create_database("other");
    let (mut other, said) = pg.client_with_notices("other");
    other.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
    other
        .batch_execute(
            "CREATE TABLE t (id int); SELECT webhook.create_endpoint('e', 'http://127.0.0.1:9/');",
        )
        .unwrap();
    other
        .batch_execute("SELECT webhook.subscribe('t', 'e')")
        .unwrap();
    let said = said.lock().unwrap().clone();
    assert!(
        said.contains(
            &"webhook_ext: database \"other\" is not served by the delivery worker".to_string()
        ),
        "CREATE EXTENSION said {said:?}"
    );
    assert!(
        said.contains(
            &"database \"other\" is not in webhook.database: events are recorded but not delivered"
                .to_string()
        ),
        "subscribe() said {said:?}"
    );
    // A served database hears neither.
    let (mut app, said) = pg.client_with_notices("app");
    app.batch_execute(
        "CREATE EXTENSION webhook_ext; CREATE TABLE t (id int);
         SELECT webhook.create_endpoint('e', 'http://127.0.0.1:9/'); SELECT webhook.subscribe('t', 'e');",
    )
    .unwrap();
    let said = said.lock().unwrap().clone();
    assert!(
        !said
            .iter()
            .any(|m| m.contains("not served") || m.contains("not in webhook.database")),
        "{said:?}"
    );

    // Without shared_preload_libraries (the setting appended last wins), the library refuses to load.
    let bare = Cluster::init(&[("shared_preload_libraries".into(), "''".into())]);
    let mut db = bare.client_to("postgres");
    for statement in ["CREATE EXTENSION webhook_ext", "LOAD 'webhook_ext'"] {
        let e = db_error(db.batch_execute(statement), statement);
        assert_eq!(
            e.message(),
            "webhook_ext must be loaded via shared_preload_libraries",
            "{statement}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// No restart needed: DROP EXTENSION, renames and template copies.

fn postmaster_start(db: &mut postgres::Client) -> String {
    db.query_one("SELECT pg_postmaster_start_time()::text", &[])
        .unwrap()
        .get(0)
}

#[test]
fn drop_extension_and_create_it_again_without_a_restart() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    let started = postmaster_start(&mut db);
    create_endpoint(&mut db, "e", &rx.url("/"));
    db.execute("SELECT webhook.send('before', '{}', 'e')", &[])
        .unwrap();
    rx.wait_for(1, PATIENCE);
    wait_settled(&mut db, PATIENCE);
    let worker_pid = |db: &mut postgres::Client| -> i32 {
        db.query_one(
            "SELECT pid FROM pg_catalog.pg_stat_activity WHERE backend_type = 'webhook_ext worker'",
            &[],
        )
        .unwrap()
        .get(0)
    };
    let pid = worker_pid(&mut db);
    db.batch_execute("DROP EXTENSION webhook_ext").unwrap();
    // A reload makes the worker run its housekeeping now, which finds the tables gone: it says
    // so and waits for the extension (the same process, not a restart).
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
    wait_until(PATIENCE, "the worker to notice the DROP", || {
        pg.log()
            .contains("the extension was dropped in database \"app\"; waiting for it")
            .then_some(())
    });
    db.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
    let secret = create_endpoint(&mut db, "e", &rx.url("/"));
    db.execute("SELECT webhook.send('after', '{}', 'e')", &[])
        .unwrap();
    let reqs = rx.wait_for(2, PATIENCE);
    assert_eq!(reqs[1].json()["type"], "after");
    verify_with_standardwebhooks(&secret, &reqs[1]).unwrap();
    wait_settled(&mut db, PATIENCE);
    assert_eq!(
        postmaster_start(&mut db),
        started,
        "the server was restarted"
    );
    assert_eq!(
        worker_pid(&mut db),
        pid,
        "the worker waited for the extension"
    );
}

#[test]
fn rename_and_template_copy_succeed_and_the_worker_comes_back() {
    let pg = Cluster::init(&conf("app, moved"));
    pg.create_database("app");
    let rx = Receiver::start(always(Reply::ok()));
    {
        let mut db = pg.client_to("app");
        db.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
        create_endpoint(&mut db, "e", &rx.url("/"));
    }
    let mut admin = pg.client_to("postgres");
    // Delivers from `db`, then lets go of it (the commands need the database free).
    let mut delivered = 0;
    let mut deliver = |db: &str, what: &str| {
        let mut c = pg.client_to(db);
        wait_until(PATIENCE, &format!("a worker for {db}"), || {
            served(&mut c).contains(db).then_some(())
        });
        c.execute("SELECT webhook.send($1, '{}', 'e')", &[&what])
            .unwrap();
        delivered += 1;
        let got = rx.wait_for(delivered, PATIENCE);
        assert!(
            got.iter().any(|r| r.json()["type"] == what),
            "{what} did not arrive"
        );
        // Recorded before the next command evicts the worker (else it is sent again, rightly:
        // at least once), so the count of requests stays the count of events.
        wait_settled(&mut c, PATIENCE);
    };
    deliver("app", "first");
    for (statement, then) in [
        ("ALTER DATABASE app RENAME TO moved", "moved"),
        ("ALTER DATABASE moved RENAME TO app", "app"),
        ("CREATE DATABASE copy TEMPLATE app", "app"),
    ] {
        // The worker is connected to the database: it steps aside, so the command succeeds.
        let t = Instant::now();
        admin
            .batch_execute(statement)
            .unwrap_or_else(|e| panic!("{statement}: {e:?}"));
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{statement} took {:?}",
            t.elapsed()
        );
        deliver(then, statement);
    }
    assert!(!pg.log().contains("is being accessed by other users"));
}

// ---------------------------------------------------------------------------------------------
// What operators see: webhook.metrics and the postgres_exporter queries.

/// Known traffic: ok (3 delivered), bad (2 failed, circuit open at threshold 2), later (1
/// pending after one failed attempt), hanging (1 sending), off (disabled, nothing sent).
fn known_traffic() -> (Cluster, postgres::Client, Vec<Receiver>) {
    let pg = Cluster::start(&[("webhook.circuit_breaker_threshold", "2")]);
    let ok = Receiver::start(always(Reply::ok()));
    let bad = Receiver::start(always(Reply::status(500)));
    let hanging = Receiver::start(always(Reply::ok().after(Duration::from_secs(120))));
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('ok', $1),
                webhook.create_endpoint('bad', $2, max_attempts => 1),
                webhook.create_endpoint('later', $2, retry_schedule => '1h'),
                webhook.create_endpoint('hanging', $3, timeout => '100 seconds'),
                webhook.create_endpoint('off', $1)",
        &[&ok.url("/"), &bad.url("/"), &hanging.url("/")],
    )
    .unwrap();
    db.batch_execute(
        "SELECT webhook.disable_endpoint('off');
         SELECT webhook.send('x', to_jsonb(g), 'ok') FROM generate_series(1, 3) g;
         SELECT webhook.send('x', to_jsonb(g), 'bad') FROM generate_series(1, 2) g;
         SELECT webhook.send('x', '1', 'later');
         SELECT webhook.send('x', '1', 'hanging');",
    )
    .unwrap();
    wait_until(PATIENCE, "the known traffic to settle", || {
        let r = db
            .query_one(
                "SELECT (SELECT count(*) FROM webhook.deliveries WHERE status IN ('delivered', 'failed')),
                        (SELECT count(*) FROM webhook.attempts),
                        (SELECT sum(delivered_total + failed_total)::int8 FROM webhook.metrics)",
                &[],
            )
            .unwrap();
        let (finished, attempts, counted): (i64, i64, i64) = (r.get(0), r.get(1), r.get(2));
        // The counters follow the deliveries' rows within a second (the worker writes them at
        // most once a second while the breaker's state stays as it is).
        (finished == 5 && attempts == 6 && counted == 5 && hanging.count() == 1).then_some(())
    });
    (pg, db, vec![ok, bad, hanging])
}

#[test]
fn webhook_metrics_has_its_columns_and_counts_known_traffic() {
    let (_pg, mut db, _rx) = known_traffic();
    let columns: Vec<String> = db
        .prepare("SELECT * FROM webhook.metrics")
        .unwrap()
        .columns()
        .iter()
        .map(|c| c.name().to_string())
        .collect();
    assert_eq!(
        columns,
        [
            "endpoint",
            "enabled",
            "pending",
            "sending",
            "delivered_total",
            "failed_total",
            "consecutive_failures",
            "circuit_open",
            "oldest_pending_seconds"
        ]
    );
    type Row = (String, bool, i64, i64, i64, i64, i64, i32, f64);
    let rows: Vec<Row> = db
        .query("SELECT * FROM webhook.metrics ORDER BY endpoint", &[])
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.get(0),
                r.get(1),
                r.get(2),
                r.get(3),
                r.get(4),
                r.get(5),
                r.get::<_, i32>(6) as i64,
                r.get(7),
                r.get(8),
            )
        })
        .collect();
    let by_name: std::collections::HashMap<&str, &Row> =
        rows.iter().map(|r| (r.0.as_str(), r)).collect();
    assert_eq!(rows.len(), 5, "{rows:?}");
    assert_eq!(*by_name["ok"], ("ok".into(), true, 0, 0, 3, 0, 0, 0, 0.0));
    assert_eq!(*by_name["bad"], ("bad".into(), true, 0, 0, 0, 2, 2, 1, 0.0));
    assert_eq!(
        *by_name["hanging"],
        ("hanging".into(), true, 0, 1, 0, 0, 0, 0, 0.0)
    );
    assert_eq!(
        *by_name["off"],
        ("off".into(), false, 0, 0, 0, 0, 0, 0, 0.0)
    );
    let later = by_name["later"];
    assert_eq!(
        (later.1, later.2, later.3, later.4, later.5, later.6, later.7),
        (true, 1, 0, 0, 0, 1, 0),
        "{later:?}"
    );
    let age: f64 = db
        .query_one(
            "SELECT extract(epoch FROM now() - d.created_at)::float8 FROM webhook.deliveries d
               JOIN webhook.endpoints e ON e.id = d.endpoint_id WHERE e.name = 'later'",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(
        later.8 > 0.0 && (later.8 - age).abs() < 1.0,
        "oldest_pending_seconds {} for a delivery {age} s old",
        later.8
    );
}

/// (name, query, metric columns) of each entry of sql/postgres_exporter.yaml: a line parser for
/// its shape (`name:`, `  query: |` and its indented block, `  metrics:` and `    - column:`).
fn exporter_queries() -> Vec<(String, String, Vec<String>)> {
    let yaml = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/sql/postgres_exporter.yaml"
    ))
    .unwrap();
    let mut entries: Vec<(String, String, Vec<String>)> = Vec::new();
    let mut in_query = false;
    for line in yaml.lines() {
        let indent = line.len() - line.trim_start().len();
        let text = line.trim();
        if text.is_empty() || text.starts_with('#') {
            continue;
        }
        if indent == 0 {
            let name = text.strip_suffix(':').expect("a top-level key");
            entries.push((name.to_string(), String::new(), Vec::new()));
            in_query = false;
            continue;
        }
        let entry = entries.last_mut().expect("an entry");
        if indent == 2 {
            in_query = text == "query: |";
            assert!(in_query || text == "metrics:", "unexpected line {line:?}");
        } else if in_query {
            entry.1.push_str(text);
            entry.1.push('\n');
        } else if let Some(metric) = text.strip_prefix("- ") {
            entry.2.push(metric.strip_suffix(':').unwrap().to_string());
        }
    }
    entries
}

#[test]
fn every_postgres_exporter_query_returns_the_metrics_it_declares() {
    let (pg, mut db, _rx) = known_traffic();
    // The role the file says: one granted webhook_admin.
    db.batch_execute("CREATE ROLE exporter LOGIN; GRANT webhook_admin TO exporter")
        .unwrap();
    let mut exporter = pg.client_as("exporter", "app");
    let queries = exporter_queries();
    let names: Vec<&str> = queries.iter().map(|q| q.0.as_str()).collect();
    assert_eq!(names, ["webhook_endpoint", "webhook_worker"]);
    let mut results = std::collections::HashMap::new();
    for (name, query, metrics) in &queries {
        let columns: Vec<String> = exporter
            .prepare(query)
            .unwrap_or_else(|e| panic!("{name}: {e}"))
            .columns()
            .iter()
            .map(|c| c.name().to_string())
            .collect();
        assert_eq!(
            &columns, metrics,
            "{name}: columns against its metrics list"
        );
        // Every row as "column=value" text, as the exporter reads it.
        let rows: Vec<Vec<String>> = exporter
            .simple_query(query)
            .unwrap()
            .into_iter()
            .filter_map(|m| match m {
                postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| format!("{}={}", r.columns()[i].name(), r.get(i).unwrap_or("")))
                        .collect(),
                ),
                _ => None,
            })
            .collect();
        results.insert(name.as_str(), rows);
    }
    let mut endpoints = results["webhook_endpoint"].clone();
    endpoints.sort();
    assert_eq!(endpoints.len(), 5, "{endpoints:?}");
    assert_eq!(
        endpoints[0].join(" "),
        "endpoint=bad enabled=1 pending=0 sending=0 delivered_total=0 failed_total=2 consecutive_failures=2 circuit_open=1 oldest_pending_seconds=0"
    );
    assert!(endpoints
        .iter()
        .any(|r| r.join(" ") == "endpoint=ok enabled=1 pending=0 sending=0 delivered_total=3 failed_total=0 consecutive_failures=0 circuit_open=0 oldest_pending_seconds=0"), "{endpoints:?}");
    assert_eq!(
        results["webhook_worker"],
        [[
            "database=app",
            "worker=0",
            "running=1",
            "in_flight=1",
            "queue_depth=1",
            "attempts=6",
            "delivered=3",
            "failed=2"
        ]
        .map(String::from)
        .to_vec()]
    );
}

// ---------------------------------------------------------------------------------------------
// scripts/receiver.py as the endpoint.

#[test]
fn scripts_receiver_py_verifies_a_real_delivery_and_rejects_a_tampered_one() {
    use std::io::{BufRead, BufReader, Read, Write};
    let pg = Cluster::start(&[]);
    let mut db = pg.client_with_extension();
    // The endpoint first (for its secret), its URL once the receiver listens.
    let secret = create_endpoint(&mut db, "py", "http://127.0.0.1:9/");
    let secret_file = pg.dir.join("secret");
    std::fs::write(&secret_file, &secret).unwrap();
    let mut child = Command::new("python3")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/receiver.py"))
        .args(["--port", "0", "--secret-file"])
        .arg(&secret_file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let child = Kill(child);
    let mut first = String::new();
    out.read_line(&mut first).unwrap();
    // It picked its own port (--port 0) and says which: no release-then-bind race.
    let url = first
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("receiver.py said {first:?}"))
        .to_string();
    db.execute(
        "SELECT webhook.alter_endpoint('py', url => $1)",
        &[&format!("{url}/hooks")],
    )
    .unwrap();
    // Another endpoint with another secret, to the same receiver: refused (401), so the 200
    // above is the script's verdict and not a default.
    db.execute(
        "SELECT webhook.create_endpoint('wrong', $1, max_attempts => 1)",
        &[&format!("{url}/hooks")],
    )
    .unwrap();
    db.batch_execute(
        "SELECT webhook.send('user.created', '{\"id\": 1}', 'py');
         SELECT webhook.send('user.created', '{\"id\": 2}', 'wrong');",
    )
    .unwrap();
    wait_settled(&mut db, PATIENCE);
    let rows: Vec<(String, String, Option<i32>)> = db
        .query(
            "SELECT e.name, d.status::text, d.last_status_code FROM webhook.deliveries d
               JOIN webhook.endpoints e ON e.id = d.endpoint_id ORDER BY e.name",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        rows,
        [
            ("py".to_string(), "delivered".to_string(), Some(200)),
            ("wrong".to_string(), "failed".to_string(), Some(401)),
        ]
    );

    // A request signed with the right secret (by webhook.sign) and then tampered with.
    let post = |body: &str, signed_body: &str| -> String {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let sig: String = db_sign(&pg, &secret, "msg_tamper", ts, signed_body);
        let addr = url.strip_prefix("http://").unwrap();
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "POST /hooks HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
             webhook-id: msg_tamper\r\nwebhook-timestamp: {ts}\r\nwebhook-signature: {sig}\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        answer.lines().next().unwrap_or_default().to_string()
    };
    assert!(
        post("{\"id\": 3}", "{\"id\": 3}").contains(" 200 "),
        "an intact hand-signed request"
    );
    let tampered = post("{\"id\": 4}", "{\"id\": 3}");
    assert!(
        tampered.contains(" 401 "),
        "a tampered request got {tampered:?}"
    );
    drop(child);
    let mut printed = String::new();
    out.read_to_string(&mut printed).unwrap();
    assert_eq!(printed.matches("signature: VALID").count(), 2, "{printed}");
    assert_eq!(
        printed.matches("signature: INVALID").count(),
        2,
        "{printed}"
    );
}

fn db_sign(pg: &Cluster, secret: &str, id: &str, ts: i64, body: &str) -> String {
    pg.client()
        .query_one(
            "SELECT webhook.sign($1, $2, $3, $4)",
            &[&secret, &id, &ts, &body],
        )
        .unwrap()
        .get(0)
}

// ---------------------------------------------------------------------------------------------
// "Every setting takes effect on SELECT pg_reload_conf()": each one, by what the worker does.

/// `ALTER SYSTEM SET key = value` (RESET when `None`), then `pg_reload_conf()`.
fn alter_system(db: &mut postgres::Client, key: &str, value: Option<&str>) {
    let statement = match value {
        Some(v) => format!("ALTER SYSTEM SET {key} = {v}"),
        None => format!("ALTER SYSTEM RESET {key}"),
    };
    db.batch_execute(&statement).unwrap();
    db.batch_execute("SELECT pg_reload_conf()").unwrap();
}

/// What the reload probes share: a cluster serving `app` (and `two` once listed), receivers,
/// and endpoints made before a setting could refuse them.
struct Reloads {
    pg: Cluster,
    db: postgres::Client,
    two: postgres::Client,
    ok: Receiver,
    two_rx: Receiver,
    failing: Receiver,
    hanging: Receiver,
    long_body: Receiver,
    tls: crate::harness::tls::TlsReceiver,
    /// A forward proxy (webhook.proxy), and one that requires a password (webhook.proxy_password_file).
    proxy: crate::harness::proxy::Proxy,
    auth_proxy: crate::harness::proxy::Proxy,
    /// The receiver of endpoint `opsrx` (for webhook.ops_endpoint).
    ops_rx: Receiver,
    /// A delivery finished when the test began (for webhook.retention).
    old_delivery: i64,
    n: usize,
}

impl Reloads {
    /// A new endpoint (`options` are extra create_endpoint arguments); returns its name.
    fn endpoint(&mut self, url: &str, options: &str) -> String {
        self.n += 1;
        let name = format!("p{}", self.n);
        self.db
            .execute(
                &format!("SELECT webhook.create_endpoint($1, $2{options})"),
                &[&name, &url],
            )
            .unwrap();
        name
    }

    /// Sends one event to `endpoint`; returns its delivery id.
    fn send(&mut self, endpoint: &str) -> i64 {
        delivery_of(&mut self.db, "probe", endpoint)
    }

    /// (status, attempts, last_error) of a delivery once it is finished, within `within`.
    fn finished(&mut self, id: i64, within: Duration) -> Option<(String, i32, Option<String>)> {
        let mut out = None;
        soft_wait(within, || {
            let r = self
                .db
                .query_one(
                    "SELECT status::text, attempts, last_error FROM webhook.deliveries WHERE id = $1",
                    &[&id],
                )
                .unwrap();
            let status: String = r.get(0);
            if status == "pending" || status == "sending" {
                return false;
            }
            out = Some((status, r.get(1), r.get(2)));
            true
        });
        out
    }

    /// One event to a new endpoint at `url` (one attempt only): its outcome.
    fn one_attempt(&mut self, url: &str, options: &str) -> Option<(String, i32, Option<String>)> {
        let name = self.endpoint(url, &format!(", max_attempts => 1{options}"));
        let id = self.send(&name);
        self.finished(id, Duration::from_secs(10))
    }

    /// Most requests a new endpoint had open at once for nine events answered after 300 ms.
    fn concurrency(&mut self) -> usize {
        let rx = Receiver::start(always(Reply::ok().after(Duration::from_millis(300))));
        let name = self.endpoint(&rx.url("/"), "");
        self.db
            .execute(
                "SELECT webhook.send('probe', to_jsonb(g), $1) FROM generate_series(1, 9) g",
                &[&name],
            )
            .unwrap();
        if !soft_wait(Duration::from_secs(10), || rx.count() >= 9) {
            return 0;
        }
        rx.max_concurrent()
    }
}

/// Sends an event of type `kind` to `endpoint`; returns its delivery's id.
fn delivery_of(db: &mut postgres::Client, kind: &str, endpoint: &str) -> i64 {
    let event: i64 = db
        .query_one("SELECT webhook.send($1, '{}', $2)", &[&kind, &endpoint])
        .unwrap()
        .get(0);
    db.query_one(
        "SELECT id FROM webhook.deliveries WHERE event_id = $1",
        &[&event],
    )
    .unwrap()
    .get(0)
}

fn p_database(r: &mut Reloads) -> bool {
    // (While the list changes, `two` may have its worker's row and the "not served" one.)
    if !served(&mut r.two).contains("two") {
        return false;
    }
    let before = r.two_rx.count();
    r.two
        .execute("SELECT webhook.send('probe', '{}', 'e')", &[])
        .unwrap();
    soft_wait(Duration::from_secs(5), || r.two_rx.count() > before)
}

fn p_workers(r: &mut Reloads) -> bool {
    // Two workers of `app`, each running, and each delivering to its share of the endpoints
    // (consecutive endpoint ids belong to different workers).
    let pids: Vec<Option<i32>> =
        r.db.query(
            "SELECT pid FROM webhook.worker_status() WHERE database = 'app' ORDER BY worker",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    if pids.len() != 2 || pids.iter().any(Option::is_none) || pids[0] == pids[1] {
        return false;
    }
    let delivered = |r: &mut Reloads| -> Vec<i64> {
        r.db.query(
            "SELECT delivered FROM webhook.worker_status() WHERE database = 'app' ORDER BY worker",
            &[],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
    };
    let before = delivered(r);
    let url = r.ok.url("/");
    let (a, b) = (r.endpoint(&url, ""), r.endpoint(&url, ""));
    let (a, b) = (r.send(&a), r.send(&b));
    let both = [a, b].into_iter().all(|id| {
        r.finished(id, Duration::from_secs(5))
            .is_some_and(|(status, _, _)| status == "delivered")
    });
    // Each worker delivered one of them: its own endpoint's.
    let after = delivered(r);
    both && before.len() == 2
        && after.len() == 2
        && after.iter().zip(&before).all(|(a, b)| a - b == 1)
}

fn p_paused(r: &mut Reloads) -> bool {
    if worker_state(&mut r.db, "app").as_deref() != Some("paused") {
        return false;
    }
    let url = r.ok.url("/");
    let name = r.endpoint(&url, "");
    let id = r.send(&name);
    // Nothing is claimed while paused (sent once it is off: the test's last wait_settled).
    r.finished(id, Duration::from_secs(1)).is_none()
        && count(
            &mut r.db,
            &format!("SELECT count(*) FROM webhook.deliveries WHERE id = {id} AND status = 'pending' AND attempts = 0"),
        ) == 1
}

fn p_max_in_flight(r: &mut Reloads) -> bool {
    r.concurrency() == 3
}

fn p_default_max_in_flight(r: &mut Reloads) -> bool {
    r.concurrency() == 2
}

fn p_batch_size(r: &mut Reloads) -> bool {
    // Ten deliveries due at once, held by the receiver: each claim transaction is the xmin of
    // the rows it marked `sending`.
    let rx = Receiver::start(always(Reply::ok().after(Duration::from_secs(2))));
    let name = r.endpoint(&rx.url("/"), "");
    r.db.execute(
        "SELECT webhook.send('probe', to_jsonb(g), $1) FROM generate_series(1, 10) g",
        &[&name],
    )
    .unwrap();
    if !soft_wait(Duration::from_secs(3), || rx.count() >= 10) {
        return false;
    }
    let claims: Vec<i64> = r
        .db
        .query(
            "SELECT count(*) FROM webhook._deliveries d JOIN webhook.endpoints e ON e.id = d.endpoint_id
              WHERE e.name = $1 AND d.status = 'sending' GROUP BY d.xmin::text",
            &[&name],
        )
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    claims.iter().sum::<i64>() == 10 && claims.iter().max() == Some(&3)
}

fn p_default_timeout(r: &mut Reloads) -> bool {
    let url = r.hanging.url("/");
    matches!(r.one_attempt(&url, ""), Some((_, _, Some(e))) if e.starts_with("timed out after 1 s"))
}

fn p_default_max_attempts(r: &mut Reloads) -> bool {
    let url = r.failing.url("/");
    let name = r.endpoint(&url, "");
    let id = r.send(&name);
    matches!(r.finished(id, Duration::from_secs(10)), Some((s, 2, _)) if s == "failed")
}

fn p_retry_schedule(r: &mut Reloads) -> bool {
    let url = r.failing.url("/");
    let name = r.endpoint(&url, "");
    let id = r.send(&name);
    if !matches!(r.finished(id, Duration::from_secs(10)), Some((s, 2, _)) if s == "failed") {
        return false;
    }
    // One step of 1 s (±20 %) between the two attempts.
    let gap: f64 = r
        .db
        .query_one(
            "SELECT extract(epoch FROM max(started_at) - min(started_at))::float8 FROM webhook.attempts WHERE delivery_id = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    gap >= 0.8
}

fn p_response_body_limit(r: &mut Reloads) -> bool {
    let url = r.long_body.url("/");
    let name = r.endpoint(&url, "");
    let id = r.send(&name);
    if r.finished(id, Duration::from_secs(10)).is_none() {
        return false;
    }
    let kept: i32 =
        r.db.query_one(
            "SELECT length(response_body) FROM webhook.attempts WHERE delivery_id = $1",
            &[&id],
        )
        .unwrap()
        .get(0);
    kept == 10
}

fn p_max_payload_bytes(r: &mut Reloads) -> bool {
    match r.db.execute(
        "SELECT webhook.send('probe', jsonb_build_object('x', repeat('a', 4000)), 'ok')",
        &[],
    ) {
        Ok(_) => false,
        Err(e) => {
            let e = e.as_db_error().expect("a database error");
            assert!(
                e.message()
                    .contains("more than webhook.max_payload_bytes (2048)"),
                "{}",
                e.message()
            );
            true
        }
    }
}

fn p_retention(r: &mut Reloads) -> bool {
    let id = r.old_delivery;
    count(
        &mut r.db,
        &format!("SELECT count(*) FROM webhook.deliveries WHERE id = {id}"),
    ) == 0
}

fn p_private_networks_off(r: &mut Reloads) -> bool {
    let url = r.ok.url("/");
    matches!(r.one_attempt(&url, ""), Some((s, _, Some(e))) if s == "failed" && e.starts_with("refused to connect to 127.0.0.1: loopback address"))
}

fn p_allowed_networks(r: &mut Reloads) -> bool {
    let url = r.ok.url("/");
    matches!(r.one_attempt(&url, ""), Some((s, _, _)) if s == "delivered")
}

fn p_https_only(r: &mut Reloads) -> bool {
    let id = r.send("plain");
    matches!(r.finished(id, Duration::from_secs(10)), Some((_, _, Some(e))) if e == "refused to send over plain http while webhook.https_only is on")
}

fn p_dns_servers(r: &mut Reloads) -> bool {
    let id = r.send("named");
    matches!(r.finished(id, Duration::from_secs(10)), Some((s, _, _)) if s == "delivered")
}

fn p_ssl_ca_file(r: &mut Reloads) -> bool {
    let url = r.tls.url();
    matches!(r.one_attempt(&url, ""), Some((s, _, _)) if s == "delivered")
}

/// An endpoint disabled by a 410: its operational event reached endpoint `opsrx`.
fn p_ops_endpoint(r: &mut Reloads) -> bool {
    let gone = Receiver::start(always(Reply::status(410)));
    let seen = r.ops_rx.count();
    let name = r.endpoint(&gone.url("/"), "");
    r.send(&name);
    soft_wait(Duration::from_secs(10), || r.ops_rx.count() > seen)
        && r.ops_rx.requests()[seen].json()["type"] == "webhook.endpoint.disabled"
}

/// Eight events for an endpoint that takes one request at a time (to a receiver that answers
/// after 5 s): more than two pending for half a minute, so a backlog event (NOTIFY webhook_ops)
/// at the next backlog check. The endpoint is disabled afterwards (its pending deliveries cancelled: the test ends
/// with everything settled).
fn p_ops_backlog_threshold(r: &mut Reloads) -> bool {
    let mut listener = r.pg.client();
    listener.batch_execute("LISTEN webhook_ops").unwrap();
    let slow = Receiver::start(always(Reply::ok().after(Duration::from_secs(5))));
    let name = r.endpoint(&slow.url("/"), ", max_in_flight => 1");
    let seen = backlog_noted(&mut listener, r, &name);
    r.db.execute("SELECT webhook.disable_endpoint($1)", &[&name])
        .unwrap();
    seen
}

fn backlog_noted(listener: &mut postgres::Client, r: &mut Reloads, name: &str) -> bool {
    use postgres::fallible_iterator::FallibleIterator;
    r.db.execute(
        "SELECT webhook.send('probe', to_jsonb(g), $1) FROM generate_series(1, 8) g",
        &[&name],
    )
    .unwrap();
    let endpoint_id: i32 =
        r.db.query_one("SELECT id FROM webhook.endpoints WHERE name = $1", &[&name])
            .unwrap()
            .get(0);
    let deadline = Instant::now() + Duration::from_secs(22);
    while Instant::now() < deadline {
        let mut n = listener.notifications();
        let mut it = n.timeout_iter(Duration::from_millis(500));
        while let Ok(Some(note)) = it.next() {
            let v: serde_json::Value = serde_json::from_str(note.payload()).unwrap();
            if v["type"] == "webhook.endpoint.backlog" && v["endpoint_id"] == endpoint_id {
                return true;
            }
        }
    }
    false
}

/// A request to the ok receiver went through the proxy.
fn p_proxy(r: &mut Reloads) -> bool {
    let seen = r.proxy.asked().len();
    let url = r.ok.url("/");
    matches!(r.one_attempt(&url, ""), Some((s, _, _)) if s == "delivered")
        && r.proxy.asked().len() > seen
}

/// A request went through the proxy that requires a password (with it: delivered).
fn p_proxy_password_file(r: &mut Reloads) -> bool {
    let url = r.ok.url("/");
    matches!(r.one_attempt(&url, ""), Some((s, _, _)) if s == "delivered")
        && r.auth_proxy.asked().last().is_some_and(|a| a.authorized)
}

fn p_circuit_breaker_threshold(r: &mut Reloads) -> bool {
    // One failed attempt, then five more events: with the circuit open (threshold 1) they go
    // one probe at a time; closed, all at once.
    let rx = Receiver::start(always(Reply::status(500).after(Duration::from_millis(300))));
    let name = r.endpoint(&rx.url("/"), "");
    r.send(&name);
    let failed_once = soft_wait(Duration::from_secs(5), || {
        count(
            &mut r.db,
            &format!("SELECT count(*) FROM webhook.attempts a JOIN webhook.endpoints e ON e.id = a.endpoint_id WHERE e.name = '{name}'"),
        ) >= 1
    });
    if !failed_once {
        return false;
    }
    r.db.execute(
        "SELECT webhook.send('probe', to_jsonb(g), $1) FROM generate_series(1, 5) g",
        &[&name],
    )
    .unwrap();
    soft_wait(Duration::from_secs(8), || rx.count() >= 4) && rx.max_concurrent() == 1
}

fn p_auto_disable_after(r: &mut Reloads) -> bool {
    let url = r.failing.url("/");
    let name = r.endpoint(&url, "");
    let deadline = Instant::now() + Duration::from_secs(8);
    while Instant::now() < deadline {
        r.send(&name);
        let row =
            r.db.query_one(
                "SELECT enabled, disabled_reason FROM webhook.endpoints WHERE name = $1",
                &[&name],
            )
            .unwrap();
        if !row.get::<_, bool>(0) {
            let reason: String = row.get(1);
            return reason.contains("(webhook.auto_disable_after = 1 s)");
        }
        // Pacing the events, not waiting for the reload.
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

type ReloadProbe = fn(&mut Reloads) -> bool;

/// One row per setting: the value set, settings set (and in effect) first, whether the probe is
/// shown false before the change and again after the reset (where it is cheap, and the effect
/// can be undone), and the probe: true once the worker (or, for max_payload_bytes, the session)
/// acts on the new value.
struct ReloadCase {
    setting: &'static str,
    value: &'static str,
    first: &'static [(&'static str, &'static str)],
    before: bool,
    after: bool,
    probe: ReloadProbe,
}

#[test]
fn every_setting_takes_effect_on_reload() {
    let pg = Cluster::start(&[]);
    pg.create_database("two");
    let ok = Receiver::start(always(Reply::ok()));
    let two_rx = Receiver::start(always(Reply::ok()));
    let tls = crate::harness::tls::TlsReceiver::start();
    let ca = pg.dir.join("ca.pem");
    tls.write_ca(&ca);
    let nameserver = crate::harness::dns::nameserver(&[("receiver.test", [127, 0, 0, 1])]);
    let mut db = pg.client_with_extension();
    let mut two = pg.client_to("two");
    two.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
    create_endpoint(&mut two, "e", &two_rx.url("/"));
    create_endpoint(&mut db, "ok", &ok.url("/"));
    db.execute(
        "SELECT webhook.create_endpoint('plain', $1, max_attempts => 1),
                webhook.create_endpoint('named', $2, max_attempts => 1, timeout => '3 seconds')",
        &[
            &ok.url("/"),
            &format!("http://receiver.test:{}/", ok.port()),
        ],
    )
    .unwrap();
    let old_delivery = delivery_of(&mut db, "old", "ok");
    wait_settled(&mut db, PATIENCE);
    let mut r = Reloads {
        pg,
        db,
        two,
        ok,
        two_rx,
        failing: Receiver::start(always(Reply::status(500))),
        hanging: Receiver::start(always(Reply::ok().after(Duration::from_secs(60)))),
        long_body: Receiver::start(always(Reply::ok().body(vec![b'x'; 100]))),
        tls,
        proxy: crate::harness::proxy::Proxy::start(None, &[]),
        auth_proxy: crate::harness::proxy::Proxy::start(Some(("hook", "reload-pw")), &[]),
        ops_rx: Receiver::start(always(Reply::ok())),
        old_delivery,
        n: 0,
    };
    create_endpoint(&mut r.db, "opsrx", &r.ops_rx.url("/"));
    let password_file = r.pg.dir.join("proxy-password");
    std::fs::write(&password_file, "reload-pw\n").unwrap();
    let leak = |s: String| -> &'static str { Box::leak(s.into_boxed_str()) };
    let proxy = leak(format!("'http://127.0.0.1:{}'", r.proxy.port));
    let auth_proxy: &'static [(&'static str, &'static str)] = Box::leak(Box::new([(
        "webhook.proxy",
        leak(format!("'http://hook@127.0.0.1:{}'", r.auth_proxy.port)),
    )]));
    let password_file = leak(format!("'{}'", password_file.display()));
    let dns = format!("'{nameserver}'");
    let ca_file = format!("'{}'", ca.display());
    let dns: &'static str = Box::leak(dns.into_boxed_str());
    let ca_file: &'static str = Box::leak(ca_file.into_boxed_str());
    let case = |setting, value, before_and_after, probe| ReloadCase {
        setting,
        value,
        first: &[],
        before: before_and_after,
        after: before_and_after,
        probe,
    };
    let cases = [
        case(
            "webhook.database",
            "'app, two'",
            true,
            p_database as ReloadProbe,
        ),
        case("webhook.workers", "2", true, p_workers),
        case("webhook.max_in_flight", "3", true, p_max_in_flight),
        case(
            "webhook.default_max_in_flight",
            "2",
            true,
            p_default_max_in_flight,
        ),
        case("webhook.batch_size", "3", true, p_batch_size),
        // Before: a request to the hanging receiver runs for the default 15 s.
        case("webhook.default_timeout", "'1s'", false, p_default_timeout),
        case(
            "webhook.default_max_attempts",
            "2",
            true,
            p_default_max_attempts,
        ),
        case("webhook.retry_schedule", "'1s'", true, p_retry_schedule),
        case(
            "webhook.response_body_limit",
            "'10B'",
            true,
            p_response_body_limit,
        ),
        case(
            "webhook.max_payload_bytes",
            "'2kB'",
            true,
            p_max_payload_bytes,
        ),
        case(
            "webhook.allow_private_networks",
            "off",
            true,
            p_private_networks_off,
        ),
        ReloadCase {
            setting: "webhook.allowed_networks",
            value: "'127.0.0.0/8'",
            first: &[("webhook.allow_private_networks", "off")],
            // Shown refused under `first`; after both resets loopback is open again.
            before: false,
            after: false,
            probe: p_allowed_networks,
        },
        case("webhook.https_only", "on", true, p_https_only),
        // Before: the system's resolver may take the whole timeout to give up on the name.
        case("webhook.dns_servers", dns, false, p_dns_servers),
        case("webhook.paused", "on", true, p_paused),
        case("webhook.ssl_ca_file", ca_file, true, p_ssl_ca_file),
        case("webhook.proxy", proxy, true, p_proxy),
        case("webhook.ops_endpoint", "'opsrx'", true, p_ops_endpoint),
        // Before: the default threshold, 10,000.
        case(
            "webhook.ops_backlog_threshold",
            "2",
            false,
            p_ops_backlog_threshold,
        ),
        ReloadCase {
            setting: "webhook.proxy_password_file",
            value: password_file,
            // Shown refused by the proxy (407) under `first`; after both resets: direct.
            first: auth_proxy,
            before: false,
            after: false,
            probe: p_proxy_password_file,
        },
        case(
            "webhook.circuit_breaker_threshold",
            "1",
            true,
            p_circuit_breaker_threshold,
        ),
        // Before: 5 days.
        case(
            "webhook.auto_disable_after",
            "'1s'",
            false,
            p_auto_disable_after,
        ),
        // Last: it purges the other cases' history (for good: nothing to show after the reset).
        ReloadCase {
            setting: "webhook.retention",
            value: "'1s'",
            first: &[],
            before: true,
            after: false,
            probe: p_retention,
        },
    ];

    // The table covers exactly the settings README's Configuration table lists, and none of
    // them needs a restart (README: every setting takes effect on reload).
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let configuration = readme
        .split("\n## Configuration\n")
        .nth(1)
        .and_then(|rest| rest.split("\n## ").next())
        .expect("README has a Configuration section");
    let listed: BTreeSet<String> = configuration
        .lines()
        .filter_map(|l| l.strip_prefix("| `webhook."))
        .map(|l| format!("webhook.{}", l.split('`').next().unwrap()))
        .collect();
    let covered: BTreeSet<String> = cases.iter().map(|c| c.setting.to_string()).collect();
    assert_eq!(
        listed, covered,
        "README's settings against this test's cases"
    );
    for name in &listed {
        let context: String =
            r.db.query_one("SELECT context FROM pg_settings WHERE name = $1", &[name])
                .unwrap()
                .get(0);
        assert!(
            context == "sighup" || (name == "webhook.max_payload_bytes" && context == "superuser"),
            "{name} is a {context} setting"
        );
    }

    for c in &cases {
        let what = format!("{} = {}", c.setting, c.value);
        for (k, v) in c.first {
            alter_system(&mut r.db, k, Some(v));
        }
        if !c.first.is_empty() {
            wait_until(PATIENCE, &format!("{:?} before {what}", c.first), || {
                (!(c.probe)(&mut r)).then_some(())
            });
        } else if c.before {
            assert!(
                !(c.probe)(&mut r),
                "{what}: the effect is there before the change"
            );
        }
        alter_system(&mut r.db, c.setting, Some(c.value));
        let t = Instant::now();
        wait_until(PATIENCE, &format!("{what} to take effect"), || {
            (c.probe)(&mut r).then_some(())
        });
        eprintln!("{what}: in effect after {:?}", t.elapsed());
        alter_system(&mut r.db, c.setting, None);
        for (k, _) in c.first {
            alter_system(&mut r.db, k, None);
        }
        if c.after {
            wait_until(
                PATIENCE,
                &format!("RESET {} to take effect", c.setting),
                || (!(c.probe)(&mut r)).then_some(()),
            );
        }
    }
    // What was held back (paused) went out once the setting was reset.
    wait_settled(&mut r.db, Duration::from_secs(60));
    drop(r.pg);
}

/// Crash torture: 50,000 events drained through five `pg_ctl stop -m immediate` restarts and two
/// `kill -9` of the worker alone (a crash for PostgreSQL: every session ends and it
/// reinitialises), each at a moment drawn from a seeded generator (the seed is printed): every
/// event arrives at least once, nothing is left pending or sending, and the duplicates (requests
/// in flight at a crash, sent again under their webhook-id) are counted and reported.
#[test]
fn crash_torture_loses_nothing() {
    const EVENTS: usize = 50_000;
    let mut pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = users_subscribed_to_crm(&pg, &rx);
    db.batch_execute("SELECT webhook.alter_endpoint('crm', max_in_flight => 500)")
        .unwrap();
    db.batch_execute(&format!(
        "INSERT INTO users SELECT g, 'u' || g || '@example.com' FROM generate_series(1, {EVENTS}) g"
    ))
    .unwrap();
    drop(db);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("crash torture: seed {seed}");
    let mut state = seed | 1;
    let mut next = |below: u64| {
        // xorshift64
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % below
    };
    let connect = |pg: &Cluster| {
        wait_until(Duration::from_secs(60), "a connection", || {
            postgres::Client::connect(&pg.connstr("app"), postgres::NoTls).ok()
        })
    };
    let mut crashes = Vec::new();
    for round in 0..7 {
        // A moment: after another 1,000–6,000 requests, or 3 s, whichever comes first.
        let target = rx.count() + 1_000 + next(5_000) as usize;
        let until = Instant::now() + Duration::from_secs(3);
        while rx.count() < target && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5 + next(20)));
        }
        let seen = rx.count();
        if round == 2 || round == 5 {
            let mut db = connect(&pg);
            let pid = wait_until(PATIENCE, "the worker", || worker(&mut db, "app").pid);
            kill(pid, "KILL");
            wait_until(PATIENCE, "the server to end the sessions", || {
                db.simple_query("SELECT 1").is_err().then_some(())
            });
            crashes.push(format!("kill -9 worker at {seen}"));
        } else {
            pg.restart("immediate");
            crashes.push(format!("immediate restart at {seen}"));
        }
    }
    let mut db = connect(&pg);
    let all = wait_until(Duration::from_secs(300), "every event to arrive", || {
        let ids: std::collections::HashSet<String> =
            rx.requests().iter().map(|r| r.webhook_id()).collect();
        (ids.len() >= EVENTS).then_some(ids.len())
    });
    assert_eq!(all, EVENTS);
    wait_settled(&mut db, Duration::from_secs(120));
    assert_eq!(
        count(
            &mut db,
            "SELECT count(*) FROM webhook.deliveries WHERE status <> 'delivered'"
        ),
        0,
        "nothing left pending, sending or failed"
    );
    assert_eq!(
        count(&mut db, "SELECT count(*) FROM webhook.deliveries"),
        EVENTS as i64
    );
    let requests = rx.count();
    eprintln!(
        "crash torture: {} ; {requests} requests for {EVENTS} events, {} duplicates",
        crashes.join(", "),
        requests - EVENTS
    );
}
