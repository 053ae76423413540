//! What each signature scheme costs the worker per request: HMAC-SHA256 (`v1`) against
//! ed25519 (`v1a`), over a body the size of the throughput benchmark's, on one core.
//! Prints the figures and writes them to the file given (a Markdown table):
//!   cargo run --release -p webhook_core --example signing_cost -- tests/bench/<date>-signing-cost.md

use std::sync::Arc;
use std::time::Instant;

use webhook_core::signing::{self, SigningKey};

fn main() {
    let out = std::env::args().nth(1);
    let body = br#"{"type":"public.t.insert","timestamp":"2026-12-07T03:40:00.000000Z","data":{"schema":"public","table":"t","op":"INSERT","new":{"v":1,"id":1,"note":"user1@example.com"},"old":null,"txid":751}}"#;
    let hmac = signing::decode_secret(&signing::generate_secret().unwrap()).unwrap();
    let ed = Arc::new(SigningKey::decode(&SigningKey::generate().unwrap()).unwrap());
    let n = 200_000u32;
    let mut rows = Vec::new();
    for (name, keys, eds) in [
        ("hmac (v1)", vec![hmac.clone()], vec![]),
        ("ed25519 (v1a)", vec![], vec![ed.clone()]),
        ("both (v1 + v1a)", vec![hmac.clone()], vec![ed.clone()]),
    ] {
        // Warm up, then time.
        for i in 0..1000u32 {
            std::hint::black_box(signing::signatures_header(
                &keys,
                &eds,
                "msg_x_1",
                i64::from(i),
                body,
            ));
        }
        let t = Instant::now();
        for i in 0..n {
            std::hint::black_box(signing::signatures_header(
                &keys,
                &eds,
                "msg_benchceiling_1048577",
                1_765_000_000 + i64::from(i),
                body,
            ));
        }
        let per = t.elapsed().as_secs_f64() / f64::from(n);
        rows.push((name, per * 1e6, 1.0 / per));
    }
    let decode = {
        let text = SigningKey::generate().unwrap();
        let t = Instant::now();
        for _ in 0..20_000 {
            std::hint::black_box(SigningKey::decode(&text).unwrap());
        }
        t.elapsed().as_secs_f64() / 20_000.0 * 1e6
    };
    let mut md = format!(
        "# Signing cost per request ({} bytes of body, one core, {n} signatures each)\n\n\
         Command: `cargo run --release -p webhook_core --example signing_cost -- <file>`\n\n\
         | scheme | µs per request | signatures/s on one core |\n|---|---|---|\n",
        body.len()
    );
    for (name, us, per_s) in &rows {
        md.push_str(&format!("| {name} | {us:.2} | {per_s:.0} |\n"));
    }
    md.push_str(&format!(
        "\nDecoding a `whsk_` key (done once per key by the worker, `worker/credentials.rs`): {decode:.1} µs.\n"
    ));
    print!("{md}");
    if let Some(path) = out {
        std::fs::write(&path, &md).unwrap();
        println!("written to {path}");
    }
}
