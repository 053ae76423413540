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
               ' identity=' || a.attidentity::text || ' stattarget=' || a.attstattarget
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
            .any(|x| x.starts_with("column deliveries.status ") && x.ends_with(" stattarget=0")),
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
    let pg = Cluster::init(&conf("app"));
    pg.create_database("app");
    let blocks = readme_blocks("sql");
    assert!(blocks.len() >= 5, "the README has SQL examples");
    // The README has exactly this many ```sql blocks (the quick start, SQL API, Security): a
    // block the parser stops seeing fails here rather than going untested.
    assert_eq!(blocks.len(), 7, "```sql blocks in README.md");
    let mut ran = 0;
    for block in &blocks {
        let out = Command::new(pg_bin("psql"))
            .args([
                "-X",
                "-q",
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
            ])
            .args(["-c", block])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "README example failed:\n{block}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ran += 1;
    }
    assert_eq!(ran, blocks.len(), "every README SQL block ran");
}

#[test]
fn the_readme_snippets_verify_a_real_request() {
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
    let site = dir.join("py");
    run(Command::new("python3")
        .args(["-m", "pip", "install", "-q", "--target"])
        .arg(&site)
        .arg("standardwebhooks"));
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
    run(Command::new("npm")
        .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
        .arg(&dir)
        .arg("standardwebhooks"));
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
    assert!(!Command::new("node")
        .arg(dir.join("check.mjs"))
        .current_dir(&dir)
        .status()
        .unwrap()
        .success());
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
