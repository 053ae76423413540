//! webhook_ext benchmark: starts its own cluster (as the postgres user) and receivers on
//! 127.0.0.1, measures delivery throughput, commit-to-arrival latency, trigger cost (pgbench),
//! worker memory and backlog drain, prints a table and writes BENCHMARKS.md.
//!
//! Run with `scripts/bench` (installs the release build first). Options:
//!   --quick          smaller sizes, for a smoke run
//!   --only a,b       run only these sections: throughput, latency, trigger, memory, backlog
//!   --out PATH       where to write the report (default BENCHMARKS.md)

#[path = "../common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

struct Options {
    quick: bool,
    only: Option<Vec<String>>,
    out: String,
}

impl Options {
    fn parse() -> Options {
        let mut o = Options {
            quick: false,
            only: None,
            out: "BENCHMARKS.md".into(),
        };
        let mut args = std::env::args().skip(1);
        while let Some(a) = args.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--only" => {
                    o.only = args
                        .next()
                        .map(|s| s.split(',').map(str::to_string).collect())
                }
                "--out" => o.out = args.next().expect("--out PATH"),
                "--bench" => {}
                other => panic!("unknown option {other}"),
            }
        }
        o
    }
    fn wants(&self, section: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|s| s == section))
    }
}

/// One line of the report.
struct Row {
    section: &'static str,
    what: String,
    figure: String,
    target: String,
}

struct Report {
    rows: Vec<Row>,
    notes: Vec<String>,
}

impl Report {
    fn add(
        &mut self,
        section: &'static str,
        what: impl Into<String>,
        figure: impl Into<String>,
        target: impl Into<String>,
    ) {
        let row = Row {
            section,
            what: what.into(),
            figure: figure.into(),
            target: target.into(),
        };
        println!(
            "{:<12} {:<62} {:>22}   {}",
            row.section, row.what, row.figure, row.target
        );
        self.rows.push(row);
    }
}

fn bench_cluster() -> Cluster {
    Cluster::start(&[
        ("webhook.max_in_flight", "2000"),
        ("webhook.batch_size", "1000"),
        ("shared_buffers", "'512MB'"),
        ("max_wal_size", "'4GB'"),
        ("synchronous_commit", "on"),
        ("fsync", "on"),
        ("log_min_messages", "warning"),
    ])
}

/// A receiver that answers 200 after `delay` and remembers when each payload's `new.v` arrived.
fn timed_receiver(delay: Duration) -> (Receiver, Arc<Mutex<HashMap<i64, Instant>>>) {
    let seen: Arc<Mutex<HashMap<i64, Instant>>> = Arc::new(Mutex::new(HashMap::new()));
    let s = seen.clone();
    let rx = Receiver::start(Arc::new(move |req: &Request, _| {
        let v = req.json()["data"]["new"]["v"].as_i64().unwrap_or(-1);
        s.lock().unwrap().entry(v).or_insert(req.at);
        Reply::ok().after(delay)
    }));
    (rx, seen)
}

fn setup_table(db: &mut postgres::Client, url: &str, max_in_flight: i32) {
    db.batch_execute("CREATE EXTENSION IF NOT EXISTS webhook_ext; DROP TABLE IF EXISTS t; CREATE TABLE t (id bigserial PRIMARY KEY, v bigint, note text)")
        .unwrap();
    db.execute(
        "SELECT webhook.create_endpoint('bench', $1, max_in_flight => $2)",
        &[&url, &max_in_flight],
    )
    .unwrap();
    db.execute(
        "SELECT webhook.subscribe('t', 'bench', events => '{INSERT}')",
        &[],
    )
    .unwrap();
}

fn throughput(
    report: &mut Report,
    events: i64,
    delay: Duration,
    max_in_flight: i32,
    target: &str,
) -> f64 {
    let pg = bench_cluster();
    let (rx, _) = timed_receiver(delay);
    let mut db = pg.client();
    setup_table(&mut db, &rx.url("/"), max_in_flight);
    let t0 = Instant::now();
    db.execute("INSERT INTO t (v, note) SELECT g, 'user' || g || '@example.com' FROM generate_series(1, $1::bigint) g", &[&events])
        .unwrap();
    let committed = Instant::now();
    rx.wait_for(events as usize, Duration::from_secs(600));
    let arrived = Instant::now();
    wait_settled(&mut db, Duration::from_secs(600));
    let recorded = Instant::now();
    let secs = (arrived - committed).as_secs_f64();
    let rate = events as f64 / secs;
    let label = if delay.is_zero() {
        "fast receiver".to_string()
    } else {
        format!("receiver answering after {} ms", delay.as_millis())
    };
    report.add(
        "throughput",
        format!("{events} events from one INSERT … SELECT, {label}"),
        format!("{rate:.0} deliveries/s ({secs:.2} s)"),
        target,
    );
    report.notes.push(format!(
        "throughput ({label}): INSERT of {events} rows took {:.2} s; commit → last arrival {:.2} s; commit → all recorded delivered {:.2} s; receiver max concurrency {}.",
        (committed - t0).as_secs_f64(),
        secs,
        (recorded - committed).as_secs_f64(),
        rx.max_concurrent()
    ));
    rate
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn latency(report: &mut Report, rate: u32, seconds: u32) {
    let pg = bench_cluster();
    let (rx, seen) = timed_receiver(Duration::ZERO);
    let mut db = pg.client();
    setup_table(&mut db, &rx.url("/"), 100);
    let stmt = db.prepare("INSERT INTO t (v) VALUES ($1)").unwrap();
    // Warm up: the worker's first request opens the connection.
    db.execute(&stmt, &[&-1i64]).unwrap();
    rx.wait_for(1, PATIENCE);
    let n = (rate * seconds) as i64;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut sent: Vec<Instant> = Vec::with_capacity(n as usize);
    let start = Instant::now();
    for i in 0..n {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        sent.push(Instant::now());
        db.execute(&stmt, &[&i]).unwrap();
    }
    let achieved = n as f64 / start.elapsed().as_secs_f64();
    rx.wait_for(n as usize + 1, Duration::from_secs(120));
    let seen = seen.lock().unwrap();
    let mut ms: Vec<f64> = (0..n)
        .map(|i| (seen[&i] - sent[i as usize]).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let (p50, p99, max) = (
        percentile(&ms, 0.5),
        percentile(&ms, 0.99),
        ms[ms.len() - 1],
    );
    report.add(
        "latency",
        format!("insert → arrival, single-row autocommit inserts at {rate}/s ({n} samples)"),
        format!("p50 {p50:.2} ms, p99 {p99:.2} ms"),
        "p50 ≤ 2 ms, p99 ≤ 10 ms",
    );
    report.notes.push(format!(
        "latency at {rate}/s: achieved {achieved:.0} inserts/s; max {max:.2} ms; measured from just before the INSERT is sent (so it includes the statement and its commit) to the request's arrival at the receiver."
    ));
}

fn main() {
    let opts = Options::parse();
    let mut report = Report {
        rows: Vec::new(),
        notes: Vec::new(),
    };
    let started = std::time::SystemTime::now();
    println!(
        "{:<12} {:<62} {:>22}   target",
        "section", "measurement", "figure"
    );
    if opts.wants("throughput") {
        throughput(&mut report, 20_000, Duration::ZERO, 1000, "≥ 10,000/s");
        if !opts.quick {
            throughput(&mut report, 100_000, Duration::ZERO, 1000, "≥ 10,000/s");
        }
        throughput(
            &mut report,
            20_000,
            Duration::from_millis(50),
            1000,
            "≥ 5,000/s",
        );
    }
    if opts.wants("latency") {
        let secs = if opts.quick { 3 } else { 10 };
        latency(&mut report, 50, secs);
        latency(&mut report, 1000, secs);
    }
    write_report(&opts, &report, started);
}

fn write_report(opts: &Options, report: &Report, started: std::time::SystemTime) {
    let mut md = String::new();
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let _ = writeln!(md, "# webhook_ext benchmarks\n");
    let _ = writeln!(
        md,
        "Produced by `scripts/bench{}` on {date}.",
        if opts.quick { " --quick" } else { "" }
    );
    let _ = writeln!(md, "Machine: {cores} cores ({cpu}), PostgreSQL 15, release build, receivers on 127.0.0.1 in the same process as the benchmark.");
    let _ = writeln!(
        md,
        "Took {:.0} s.\n",
        started.elapsed().map(|d| d.as_secs_f64()).unwrap_or(0.0)
    );
    let _ = writeln!(
        md,
        "| section | measurement | figure | target |\n|---|---|---|---|"
    );
    for r in &report.rows {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} |",
            r.section, r.what, r.figure, r.target
        );
    }
    let _ = writeln!(md, "\n## Notes\n");
    for n in &report.notes {
        let _ = writeln!(md, "- {n}");
    }
    std::fs::write(&opts.out, md).unwrap();
    println!("\nwrote {}", opts.out);
}
