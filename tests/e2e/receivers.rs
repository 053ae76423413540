//! End-to-end: receivers as enterprises run them (README "Signatures" and "Mutual TLS"):
//! asymmetric signatures (Standard Webhooks `v1a`, ed25519) verified by an independent
//! implementation with the public key a role without rights on the endpoints reads, and client
//! certificates presented to a receiver that requires them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};

use crate::harness::proxy::Proxy;
use crate::harness::tls::{ClientCa, TlsReceiver};
use crate::harness::*;
use crate::security::{error_of, last_error, Sensitive};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The `v1a` signatures of a request that `public_key` (`whpk_…`) verifies, checked with
/// ed25519-dalek (not the ring code that signed them) over `id.timestamp.body`.
fn v1a_verified_by(req: &Request, public_key: &str) -> usize {
    let raw = B64
        .decode(public_key.strip_prefix("whpk_").expect("a whpk_ key"))
        .unwrap();
    let key = VerifyingKey::from_bytes(&raw.try_into().expect("32 bytes")).unwrap();
    let mut content = format!(
        "{}.{}.",
        req.header("webhook-id").unwrap(),
        req.header("webhook-timestamp").unwrap()
    )
    .into_bytes();
    content.extend_from_slice(&req.body);
    req.header("webhook-signature")
        .unwrap()
        .split(' ')
        .filter_map(|s| s.strip_prefix("v1a,"))
        .filter(|sig| {
            let sig = Signature::from_slice(&B64.decode(sig).unwrap()).unwrap();
            key.verify(&content, &sig).is_ok()
        })
        .count()
}

/// The schemes of a request's signatures, in order (`v1`, `v1a`).
fn schemes(req: &Request) -> Vec<String> {
    req.header("webhook-signature")
        .unwrap()
        .split(' ')
        .map(|s| s.split_once(',').unwrap().0.to_string())
        .collect()
}

#[test]
fn ed25519_signatures_verify_with_the_public_key_any_schema_user_may_read() {
    let pg = Cluster::start(&[]);
    let rx = Receiver::start(always(Reply::ok()));
    let mut db = pg.client_with_extension();
    db.batch_execute(
        "CREATE ROLE key_reader LOGIN;
         GRANT USAGE ON SCHEMA webhook TO key_reader;",
    )
    .unwrap();
    let secret: String = db
        .query_one(
            "SELECT secret FROM webhook.create_endpoint('ed', $1, signing => 'ed25519')",
            &[&rx.url("/ed")],
        )
        .unwrap()
        .get(0);
    let both_secret: String = db
        .query_one(
            "SELECT secret FROM webhook.create_endpoint('both', $1, signing => 'both')",
            &[&rx.url("/both")],
        )
        .unwrap()
        .get(0);
    create_endpoint(&mut db, "plain", &rx.url("/plain"));

    // A role with nothing but USAGE on the schema reads the public keys, and only those.
    let mut reader = pg.client_as("key_reader", "app");
    let keys: Vec<(String, String, String)> = reader
        .query(
            "SELECT endpoint, signing, public_key FROM webhook.public_keys ORDER BY endpoint",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    assert_eq!(
        keys.iter()
            .map(|(e, s, _)| (e.as_str(), s.as_str()))
            .collect::<Vec<_>>(),
        [("both", "both"), ("ed", "ed25519")],
        "endpoints without a signing key are not listed"
    );
    let key_of = |name: &str| keys.iter().find(|k| k.0 == name).unwrap().2.clone();
    let (ed_key, both_key) = (key_of("ed"), key_of("both"));
    assert!(ed_key.starts_with("whpk_") && ed_key != both_key);
    for sql in [
        "SELECT signing_key FROM webhook.endpoints",
        "SELECT * FROM webhook.deliveries",
        "SELECT webhook.rotate_signing_key('ed')",
    ] {
        let err = error_of(&mut reader, sql);
        assert!(err.contains("permission denied"), "{sql}: {err}");
    }
    // The function the view calls is PUBLIC's: what is not a key gives NULL, no error (that a
    // long one is refused by its length before decoding is signing.rs's unit test).
    let none: Option<String> = reader
        .query_one(
            "SELECT webhook._public_key('whsk_' || repeat('A', 5000))",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(none, None);
    // Without USAGE on the schema, not even the public keys.
    db.batch_execute("CREATE ROLE stranger LOGIN").unwrap();
    let err = error_of(
        &mut pg.client_as("stranger", "app"),
        "SELECT * FROM webhook.public_keys",
    );
    assert!(
        err.contains("permission denied for schema webhook"),
        "{err}"
    );

    for ep in ["ed", "both", "plain"] {
        db.execute(
            "SELECT webhook.send('user.created', '{\"id\": 1}', $1)",
            &[&ep],
        )
        .unwrap();
    }
    rx.wait_for(3, PATIENCE);
    let by_path = |path: &str| {
        rx.requests()
            .into_iter()
            .filter(|r| r.path == path)
            .collect::<Vec<_>>()
    };
    let ed = by_path("/ed").pop().unwrap();
    assert_eq!(schemes(&ed), ["v1a"], "ed25519 only: no HMAC signature");
    assert_eq!(v1a_verified_by(&ed, &ed_key), 1);
    assert_eq!(
        v1a_verified_by(&ed, &both_key),
        0,
        "another key does not verify"
    );
    assert!(verify_with_standardwebhooks(&secret, &ed).is_err());
    // A changed body no longer verifies.
    let mut forged = ed.clone();
    forged.body = b"{\"id\": 2}".to_vec();
    assert_eq!(v1a_verified_by(&forged, &ed_key), 0);

    let both = by_path("/both").pop().unwrap();
    assert_eq!(schemes(&both), ["v1", "v1a"]);
    verify_with_standardwebhooks(&both_secret, &both).unwrap();
    assert_eq!(v1a_verified_by(&both, &both_key), 1);
    let plain = by_path("/plain").pop().unwrap();
    assert_eq!(schemes(&plain), ["v1"]);

    // Rotation: the new public key is returned; until the grace period ends, requests carry a
    // signature with each key, and public_keys shows both.
    let fresh: String = db
        .query_one("SELECT webhook.rotate_signing_key('ed', '1 hour')", &[])
        .unwrap()
        .get(0);
    assert!(fresh.starts_with("whpk_") && fresh != ed_key);
    let (now, previous): (String, Option<String>) = {
        let r = reader
            .query_one(
                "SELECT public_key, previous_public_key FROM webhook.public_keys WHERE endpoint = 'ed'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(
        (now.as_str(), previous.as_deref()),
        (fresh.as_str(), Some(ed_key.as_str()))
    );
    db.execute(
        "SELECT webhook.send('user.created', '{\"id\": 3}', 'ed')",
        &[],
    )
    .unwrap();
    rx.wait_for(4, PATIENCE);
    let rotated = by_path("/ed").pop().unwrap();
    assert_eq!(schemes(&rotated), ["v1a", "v1a"]);
    assert_eq!(v1a_verified_by(&rotated, &fresh), 1);
    assert_eq!(v1a_verified_by(&rotated, &ed_key), 1);
    // Without grace the old key goes at once.
    db.execute("SELECT webhook.rotate_signing_key('ed', '0')", &[])
        .unwrap();
    db.execute(
        "SELECT webhook.send('user.created', '{\"id\": 4}', 'ed')",
        &[],
    )
    .unwrap();
    rx.wait_for(5, PATIENCE);
    let last = by_path("/ed").pop().unwrap();
    assert_eq!(schemes(&last), ["v1a"]);
    let current: String = reader
        .query_one(
            "SELECT public_key FROM webhook.public_keys WHERE endpoint = 'ed' AND previous_public_key IS NULL",
            &[],
        )
        .unwrap()
        .get(0);
    assert_eq!(v1a_verified_by(&last, &current), 1);

    // No signing key, nor any signature, in the server log.
    let mut sensitive = Sensitive::default();
    sensitive.sent(&rx.requests(), &[]);
    for row in db
        .query(
            "SELECT signing_key FROM webhook.endpoints WHERE signing_key IS NOT NULL",
            &[],
        )
        .unwrap()
    {
        let key: String = row.get(0);
        sensitive
            .add(&key, "a signing key")
            .add(key.strip_prefix("whsk_").unwrap(), "a signing key's base64");
    }
    sensitive.assert_not_in_log(&pg);
}

#[test]
fn signing_settings_are_checked_and_changed_by_alter_endpoint() {
    let pg = Cluster::start(&[]);
    let mut db = pg.client_with_extension();
    let url = "http://127.0.0.1:9/x";
    for (sql, expected) in [
        (
            format!("SELECT webhook.create_endpoint('a', '{url}', signing => 'rsa')"),
            "signing must be 'hmac', 'ed25519' or 'both', not 'rsa'",
        ),
        (
            format!("SELECT webhook.create_endpoint('a', '{url}', signing => NULL)"),
            "",
        ),
        (
            format!("SELECT webhook.create_endpoint('b', '{url}', signing => 'ed25519', signing_key => 'whsk_AAAA')"),
            "invalid endpoint signing key has 3 bytes; an ed25519 key has 32 (the seed) or 64 (the seed, then its public key)",
        ),
        (
            format!("SELECT webhook.create_endpoint('b', '{url}', signing => 'ed25519', signing_key => 'whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD')"),
            "invalid endpoint signing key must start with \"whsk_\"",
        ),
        (
            "SELECT webhook.rotate_signing_key('a')".to_string(),
            "endpoint \"a\" has no signing key to rotate",
        ),
        (
            "SELECT webhook.alter_endpoint('a', signing => 'ed')".to_string(),
            "signing must be 'hmac', 'ed25519' or 'both', not 'ed'",
        ),
    ] {
        match db.batch_execute(&sql) {
            Ok(()) => assert_eq!(expected, "", "{sql} succeeded"),
            Err(e) => assert_eq!(
                db_error(Err::<(), _>(e), &sql).message(),
                expected,
                "{sql}"
            ),
        }
    }
    let signing = |db: &mut postgres::Client| -> (String, Option<String>) {
        let r = db
            .query_one(
                "SELECT signing, signing_key FROM webhook.endpoints WHERE name = 'a'",
                &[],
            )
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(signing(&mut db), ("hmac".to_string(), None));
    // Switching to ed25519 makes a key; going back keeps it for later; a key given is kept as given.
    db.batch_execute("SELECT webhook.alter_endpoint('a', signing => 'both')")
        .unwrap();
    let (how, key) = signing(&mut db);
    assert_eq!(how, "both");
    let key = key.expect("a key was made");
    assert!(key.starts_with("whsk_"), "{key}");
    db.batch_execute("SELECT webhook.alter_endpoint('a', reset => '{signing}')")
        .unwrap();
    assert_eq!(signing(&mut db), ("hmac".to_string(), Some(key.clone())));
    let mine = format!("whsk_{}", B64.encode([7u8; 32]));
    db.execute(
        "SELECT webhook.alter_endpoint('a', signing => 'ed25519', signing_key => $1)",
        &[&mine],
    )
    .unwrap();
    assert_eq!(
        signing(&mut db),
        ("ed25519".to_string(), Some(mine.clone()))
    );
    // The table refuses an ed25519 endpoint without a key, whoever writes it.
    let err = error_of(
        &mut db,
        "UPDATE webhook.endpoints SET signing_key = NULL WHERE name = 'a'",
    );
    assert!(err.contains("endpoints_signing_key_check"), "{err}");
}

#[test]
fn mutual_tls_presents_the_endpoints_client_certificate() {
    let pg = Cluster::start(&[
        ("webhook.retry_schedule", "'200ms'"),
        ("webhook.default_max_attempts", "1"),
    ]);
    let trusted = ClientCa::new("clients the receiver trusts");
    let stranger = ClientCa::new("someone else");
    let tls = TlsReceiver::start_requiring(Some(&trusted));
    let ca = pg.dir.join("receiver-ca.pem");
    tls.write_ca(&ca);
    pg.set("webhook.ssl_ca_file", &format!("'{}'", ca.display()));
    pg.reload();
    let mut db = pg.client_with_extension();
    let (cert, key) = trusted.issue("webhook_ext");
    let (other_cert, other_key) = stranger.issue("webhook_ext");

    // Checked when given, with errors that name the problem and never the key.
    for (c, k, expected) in [
        (
            Some(&cert),
            None,
            "client_cert and client_key must be given together",
        ),
        (
            None,
            Some(&key),
            "client_cert and client_key must be given together",
        ),
        (
            Some(&cert),
            Some(&other_key),
            "client_key is not the private key of client_cert's first certificate",
        ),
        (
            Some(&key),
            Some(&key),
            "client_cert must hold certificates only, and holds a private key",
        ),
        (
            Some(&cert),
            Some(&cert),
            "client_key holds no PEM private key (PKCS#8, PKCS#1 RSA or SEC1 EC; not encrypted)",
        ),
    ] {
        let err = db
            .execute(
                "SELECT webhook.create_endpoint('mtls', $1, client_cert => $2, client_key => $3)",
                &[&tls.url(), &c, &k],
            )
            .unwrap_err();
        let msg = err.as_db_error().unwrap().message().to_string();
        assert_eq!(
            msg,
            format!("invalid endpoint client certificate: {expected}")
        );
    }

    // Without a certificate the receiver refuses the handshake, and the attempt says so.
    db.execute("SELECT webhook.create_endpoint('mtls', $1)", &[&tls.url()])
        .unwrap();
    let send = |db: &mut postgres::Client| {
        db.execute("SELECT webhook.send('x', '{}', 'mtls')", &[])
            .unwrap();
        wait_settled(db, PATIENCE);
        last_error(db, "mtls")
    };
    let (status, err) = send(&mut db);
    assert_eq!(status, "failed");
    let err = err.unwrap_or_default();
    assert!(err.contains("CertificateRequired"), "{err}");
    assert_eq!(tls.served.load(Ordering::SeqCst), 0);

    // With the trusted certificate it is served.
    db.execute(
        "SELECT webhook.alter_endpoint('mtls', client_cert => $1, client_key => $2)",
        &[&cert, &key],
    )
    .unwrap();
    assert_eq!(send(&mut db), ("delivered".to_string(), None));
    assert_eq!(tls.served.load(Ordering::SeqCst), 1);

    // A certificate from another CA: the worker uses the new one at once (and is refused).
    db.execute(
        "SELECT webhook.alter_endpoint('mtls', client_cert => $1, client_key => $2)",
        &[&other_cert, &other_key],
    )
    .unwrap();
    let (status, err) = send(&mut db);
    assert_eq!(status, "failed");
    let err = err.unwrap_or_default();
    assert!(err.contains("fatal alert"), "{err}");
    eprintln!("another CA's certificate: {err}");
    assert_eq!(tls.served.load(Ordering::SeqCst), 1);

    // A renewed certificate for the same key is given alone.
    let renewed = {
        let again = ClientCa::new("someone else, again");
        let (c, _) = again.issue("x");
        c
    };
    let err = db
        .execute(
            "SELECT webhook.alter_endpoint('mtls', client_cert => $1)",
            &[&renewed],
        )
        .unwrap_err();
    assert!(
        err.as_db_error()
            .unwrap()
            .message()
            .contains("client_key is not the private key"),
        "{err}"
    );
    db.execute(
        "SELECT webhook.alter_endpoint('mtls', client_cert => $1, client_key => $2)",
        &[&cert, &key],
    )
    .unwrap();
    assert_eq!(send(&mut db), ("delivered".to_string(), None));
    // Reset: no certificate any more, refused again.
    db.execute(
        "SELECT webhook.alter_endpoint('mtls', reset => '{client_cert}')",
        &[],
    )
    .unwrap();
    assert!(db
        .query_one(
            "SELECT client_cert IS NULL AND client_key IS NULL FROM webhook.endpoints WHERE name = 'mtls'",
            &[]
        )
        .unwrap()
        .get::<_, bool>(0));
    assert_eq!(send(&mut db).0, "failed");
    assert_eq!(tls.served.load(Ordering::SeqCst), 2);

    // Neither key is in the server log (the cluster's own check looks for PEM private keys).
    let mut sensitive = Sensitive::default();
    for k in [&key, &other_key] {
        let body = k.lines().nth(1).unwrap();
        sensitive.add(body, "a client key's PEM body");
    }
    sensitive.assert_not_in_log(&pg);
}

#[test]
fn a_forward_proxy_carries_requests_with_its_credentials_and_endpoints_may_choose_their_own() {
    let password = "pr0xy-s3cret-pass";
    let own_password = "0wn-pr0xy-s3cret";
    let proxy = Proxy::start(Some(("hook", password)), &[]);
    let other = Proxy::start(Some(("own", own_password)), &[]);
    let rx = Receiver::start(always(Reply::ok()));
    let tls = TlsReceiver::start();
    let pg = Cluster::start(&[
        ("webhook.retry_schedule", "'200ms'"),
        ("webhook.default_max_attempts", "1"),
    ]);
    let ca = pg.dir.join("receiver-ca.pem");
    tls.write_ca(&ca);
    pg.set("webhook.ssl_ca_file", &format!("'{}'", ca.display()));
    // The password comes from a file: Postgres logs a reloaded setting's new value.
    let password_file = pg.dir.join("proxy-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    pg.set(
        "webhook.proxy",
        &format!("'http://hook@127.0.0.1:{}'", proxy.port),
    );
    pg.set(
        "webhook.proxy_password_file",
        &format!("'{}'", password_file.display()),
    );
    pg.reload();
    let mut db = pg.client_with_extension();
    create_endpoint(&mut db, "plain", &rx.url("/plain"));
    create_endpoint(&mut db, "tls", &tls.url());
    db.execute(
        "SELECT webhook.create_endpoint('direct', $1, proxy => 'direct')",
        &[&rx.url("/direct")],
    )
    .unwrap();
    db.execute(
        "SELECT webhook.create_endpoint('own', $1, proxy => $2)",
        &[
            &rx.url("/own"),
            &format!("http://own:{own_password}@127.0.0.1:{}", other.port),
        ],
    )
    .unwrap();
    let send = |db: &mut postgres::Client, ep: &str| {
        db.execute("SELECT webhook.send('x', '{}', $1)", &[&ep])
            .unwrap();
        wait_settled(db, PATIENCE);
        last_error(db, ep)
    };
    for ep in ["plain", "tls", "direct", "own"] {
        assert_eq!(send(&mut db, ep), ("delivered".to_string(), None), "{ep}");
    }
    assert_eq!(rx.count(), 3);
    assert_eq!(tls.served.load(Ordering::SeqCst), 1);
    // webhook.proxy carried plain http in absolute form and https in a CONNECT tunnel, with its
    // credentials; the endpoint with its own proxy went there, the direct one nowhere.
    let lines = |p: &Proxy| {
        p.asked()
            .into_iter()
            .map(|a| {
                assert!(a.authorized, "{a:?}");
                a.line
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(
        lines(&proxy),
        [
            format!("POST {}", rx.url("/plain")),
            format!("CONNECT 127.0.0.1:{}", tls.port),
        ]
    );
    assert_eq!(lines(&other), [format!("POST {}", rx.url("/own"))]);

    // Wrong credentials: the proxy's refusal is the attempt's error; an endpoint's own proxy URL
    // is checked when given, and the error never quotes it.
    db.execute(
        "SELECT webhook.alter_endpoint('own', proxy => $1)",
        &[&format!(
            "http://own:wrong-{own_password}@127.0.0.1:{}",
            other.port
        )],
    )
    .unwrap();
    assert_eq!(
        send(&mut db, "own"),
        (
            "failed".to_string(),
            Some("HTTP 407 (gave up after 1 attempt)".to_string())
        )
    );
    let err = db
        .execute(
            "SELECT webhook.alter_endpoint('own', proxy => $1)",
            &[&format!("socks5://hook:{password}@127.0.0.1:1080")],
        )
        .unwrap_err();
    assert_eq!(
        err.as_db_error().unwrap().message(),
        "invalid endpoint proxy: proxy URL must start with http:// or https://, not socks5:// (or 'direct' for none)"
    );
    // reset => '{proxy}' follows webhook.proxy again.
    db.execute(
        "SELECT webhook.alter_endpoint('own', reset => '{proxy}')",
        &[],
    )
    .unwrap();
    assert_eq!(send(&mut db, "own"), ("delivered".to_string(), None));
    assert_eq!(
        proxy.asked().last().unwrap().line,
        format!("POST {}", rx.url("/own"))
    );

    // Only superusers may read the setting (its URL holds the password).
    db.batch_execute("CREATE ROLE snoop LOGIN").unwrap();
    let err = error_of(&mut pg.client_as("snoop", "app"), "SHOW webhook.proxy");
    assert!(err.contains("must be superuser"), "{err}");

    // An unusable webhook.proxy: requests that would go through it fail with the reason (none is
    // sent around it); the endpoint that goes direct is not concerned.
    pg.set("webhook.proxy", "'socks5://hook@127.0.0.1:1080'");
    pg.reload();
    wait_until(
        PATIENCE,
        "the worker refusing to send around a broken proxy",
        || match send(&mut db, "plain") {
            (s, Some(e)) if s == "failed" && e.starts_with("webhook.proxy is not usable") => {
                Some(e)
            }
            (s, None) if s == "delivered" => None,
            other => panic!("{other:?}"),
        },
    );
    let (_, err) = send(&mut db, "plain");
    assert_eq!(
        err.as_deref(),
        Some("webhook.proxy is not usable: proxy URL must start with http:// or https://, not socks5://")
    );
    assert_eq!(send(&mut db, "direct"), ("delivered".to_string(), None));
    // A password in the setting itself is refused (Postgres has logged it by then: the message
    // says where it goes instead).
    pg.set(
        "webhook.proxy",
        &format!("'http://hook:inline-pw@127.0.0.1:{}'", proxy.port),
    );
    pg.reload();
    wait_until(
        PATIENCE,
        "the worker refusing a password in webhook.proxy",
        || {
            let (_, err) = send(&mut db, "plain");
            err.filter(|e| e.contains("must not hold a password"))
        },
    );
    // An unreadable password file likewise.
    pg.set(
        "webhook.proxy",
        &format!("'http://hook@127.0.0.1:{}'", proxy.port),
    );
    pg.set(
        "webhook.proxy_password_file",
        "'/nonexistent/proxy-password'",
    );
    pg.reload();
    let err = wait_until(
        PATIENCE,
        "the worker refusing an unreadable password file",
        || {
            let (_, err) = send(&mut db, "plain");
            err.filter(|e| e.contains("cannot read"))
        },
    );
    assert!(
        err.starts_with("webhook.proxy is not usable: webhook.proxy_password_file: cannot read \"/nonexistent/proxy-password\""),
        "{err}"
    );

    let mut sensitive = Sensitive::default();
    sensitive.add(password, "the proxy's password");
    sensitive.add(own_password, "an endpoint proxy's password");
    sensitive.assert_not_in_log(&pg);
    assert!(
        pg.log().contains("webhook.proxy is not usable"),
        "the worker says so in the log"
    );
}

#[test]
fn through_a_proxy_the_guard_checks_each_target_and_not_the_proxy() {
    let rx = Receiver::start(always(Reply::ok()));
    let port = rx.port();
    // The proxy has its own view of partner.test (as a proxy with its own DNS would).
    let proxy = Proxy::start(None, &[("partner.test", "127.0.0.1")]);
    // The worker's nameserver: the proxy and internal.test are on loopback; partner.test on an
    // address the guard is told to allow (nothing listens there: a request that went around
    // the proxy would fail).
    let ns = crate::harness::dns::nameserver(&[
        ("proxy.test", [127, 0, 0, 1]),
        ("internal.test", [127, 0, 0, 1]),
        ("partner.test", [127, 0, 0, 3]),
    ]);
    let pg = Cluster::start(&[
        ("webhook.allow_private_networks", "off"),
        ("webhook.allowed_networks", "'127.0.0.3/32'"),
        ("webhook.dns_servers", &format!("'{ns}'")),
        (
            "webhook.proxy",
            &format!("'http://proxy.test:{}'", proxy.port),
        ),
        ("webhook.default_max_attempts", "1"),
    ]);
    let mut db = pg.client_with_extension();
    for (name, url) in [
        ("partner", format!("http://partner.test:{port}/p")),
        ("internal", format!("http://internal.test:{port}/i")),
        ("literal", format!("http://127.0.0.1:{port}/l")),
    ] {
        create_endpoint(&mut db, name, &url);
        db.execute("SELECT webhook.send('x', '{}', $1)", &[&name])
            .unwrap();
    }
    // An endpoint's own proxy is an administrator's choice, not the superuser's: the guard
    // checks its address like a target's, named or literal.
    for (name, proxy_url) in [
        ("own_named", format!("http://proxy.test:{}", proxy.port)),
        ("own_literal", format!("http://127.0.0.1:{}", proxy.port)),
    ] {
        db.execute(
            "SELECT webhook.create_endpoint($1, $2, proxy => $3)",
            &[
                &name,
                &format!("http://partner.test:{port}/{name}"),
                &proxy_url,
            ],
        )
        .unwrap();
        db.execute("SELECT webhook.send('x', '{}', $1)", &[&name])
            .unwrap();
    }
    wait_settled(&mut db, PATIENCE);
    // The proxy itself, named by a host name that resolves to loopback, is used: the guard
    // checks targets, and the administrator chose the proxy.
    assert_eq!(
        last_error(&mut db, "partner"),
        ("delivered".to_string(), None)
    );
    assert_eq!(rx.requests()[0].path, "/p");
    // Targets the guard refuses never reach the proxy, by name or literal.
    for ep in ["internal", "literal"] {
        let (status, err) = last_error(&mut db, ep);
        assert_eq!(status, "failed", "{ep}");
        let err = err.unwrap_or_default();
        assert!(
            err.starts_with("refused to connect to 127.0.0.1: loopback address"),
            "{ep}: {err}"
        );
    }
    let (status, err) = last_error(&mut db, "own_literal");
    assert_eq!(status, "failed");
    assert!(
        err.as_deref()
            .unwrap_or_default()
            .starts_with("endpoint proxy: refused to connect to 127.0.0.1: loopback address"),
        "{err:?}"
    );
    let (status, err) = last_error(&mut db, "own_named");
    assert_eq!(status, "failed");
    assert!(
        err.as_deref()
            .unwrap_or_default()
            .starts_with("refused to connect to 127.0.0.1: loopback address"),
        "{err:?}"
    );
    assert_eq!(
        proxy
            .asked()
            .into_iter()
            .map(|a| a.line)
            .collect::<Vec<_>>(),
        [format!("POST http://partner.test:{port}/p")]
    );
}

/// A token endpoint (RFC 6749 client credentials) on 127.0.0.1 and the receiver that accepts
/// its tokens: tokens `tok-1`, `tok-2`, … each valid until revoked, for `lifetime` seconds as
/// the answer says (`expires_in`).
struct Tokens {
    server: Receiver,
    issued: Arc<Mutex<Vec<String>>>,
    valid: Arc<Mutex<Vec<String>>>,
    lifetime: Arc<AtomicU64>,
}

impl Tokens {
    fn start(client_id: &'static str, secret: &'static str) -> Tokens {
        let issued = Arc::new(Mutex::new(Vec::<String>::new()));
        let valid = Arc::new(Mutex::new(Vec::<String>::new()));
        let lifetime = Arc::new(AtomicU64::new(3600));
        let (i, v, l) = (issued.clone(), valid.clone(), lifetime.clone());
        let server = Receiver::start(Arc::new(move |req: &Request, _| {
            let basic = format!("Basic {}", B64.encode(format!("{client_id}:{secret}")));
            let body = String::from_utf8_lossy(&req.body);
            if req.header("authorization") != Some(basic.as_str()) {
                return Reply::status(401).body(
                    r#"{"error":"invalid_client","error_description":"unknown client or wrong secret"}"#,
                );
            }
            if body != "grant_type=client_credentials&scope=hooks.write" {
                return Reply::status(400).body(r#"{"error":"invalid_request"}"#);
            }
            let mut issued = i.lock().unwrap();
            let token = format!("tok-{}", issued.len() + 1);
            issued.push(token.clone());
            v.lock().unwrap().push(token.clone());
            Reply::ok().body(format!(
                r#"{{"access_token":"{token}","token_type":"Bearer","expires_in":{}}}"#,
                l.load(Ordering::SeqCst)
            ))
        }));
        Tokens {
            server,
            issued,
            valid,
            lifetime,
        }
    }

    /// The receiver: 200 for a valid token, 401 with `WWW-Authenticate: Bearer
    /// error="invalid_token"` (RFC 6750) for another; a plain 401 whatever the token while
    /// `plain_401` is set.
    fn receiver(&self, plain_401: Arc<std::sync::atomic::AtomicBool>) -> Receiver {
        let valid = self.valid.clone();
        Receiver::start(Arc::new(move |req: &Request, _| {
            if plain_401.load(Ordering::SeqCst) {
                return Reply::status(401);
            }
            let ok = req
                .header("authorization")
                .and_then(|a| a.strip_prefix("Bearer "))
                .is_some_and(|t| valid.lock().unwrap().iter().any(|v| v == t));
            if ok {
                Reply::ok()
            } else {
                Reply::status(401).header("www-authenticate", "Bearer error=\"invalid_token\"")
            }
        }))
    }

    fn issued(&self) -> Vec<String> {
        self.issued.lock().unwrap().clone()
    }

    fn revoke_all(&self) {
        self.valid.lock().unwrap().clear();
    }
}

#[test]
fn oauth2_client_credentials_fetch_cache_refresh_and_fail_clearly() {
    let tokens = Tokens::start("hooks-client", "cl1ent-s3cret-value");
    let plain_401 = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rx = tokens.receiver(plain_401.clone());
    let pg = Cluster::start(&[
        ("webhook.retry_schedule", "'200ms'"),
        ("webhook.default_max_attempts", "2"),
    ]);
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('api', $1, headers => '{\"Authorization\": \"Basic not-this\"}',
                oauth_token_url => $2, oauth_client_id => 'hooks-client',
                oauth_client_secret => $3, oauth_scope => 'hooks.write')",
        &[
            &rx.url("/hooks"),
            &tokens.server.url("/token"),
            &"cl1ent-s3cret-value",
        ],
    )
    .unwrap();
    let send = |db: &mut postgres::Client| {
        db.execute("SELECT webhook.send('x', '{}', 'api')", &[])
            .unwrap();
        wait_settled(db, PATIENCE);
        let r = db
            .query_one(
                "SELECT d.status::text, d.attempts, d.last_error FROM webhook.deliveries d
                  ORDER BY d.created_at DESC, d.id DESC LIMIT 1",
                &[],
            )
            .unwrap();
        (
            r.get::<_, String>(0),
            r.get::<_, i32>(1),
            r.get::<_, Option<String>>(2),
        )
    };
    let bearer = |r: &Request| r.header("authorization").unwrap_or_default().to_string();
    // One token for both deliveries; the endpoint's own Authorization header gives way to it.
    assert_eq!(send(&mut db), ("delivered".into(), 1, None));
    assert_eq!(send(&mut db), ("delivered".into(), 1, None));
    assert_eq!(tokens.issued(), ["tok-1"]);
    let got = rx.requests();
    assert!(got.iter().all(|r| bearer(r) == "Bearer tok-1"), "{got:?}");
    assert!(got.iter().all(|r| r
        .headers
        .iter()
        .filter(|(n, _)| n == "authorization")
        .count()
        == 1));

    // The receiver refuses the token (revoked): one new token, the request sent again in the
    // same attempt.
    tokens.revoke_all();
    assert_eq!(send(&mut db), ("delivered".into(), 1, None));
    assert_eq!(tokens.issued(), ["tok-1", "tok-2"]);
    let last_two: Vec<String> = rx.requests().iter().rev().take(2).map(bearer).collect();
    assert_eq!(last_two, ["Bearer tok-2", "Bearer tok-1"]);

    // A token that expires is fetched again before it is used (no 401 on the way).
    tokens.lifetime.store(1, Ordering::SeqCst);
    tokens.revoke_all();
    assert_eq!(send(&mut db), ("delivered".into(), 1, None));
    assert_eq!(tokens.issued().last().unwrap(), "tok-3");
    std::thread::sleep(Duration::from_millis(1200));
    let before = rx.count();
    assert_eq!(send(&mut db), ("delivered".into(), 1, None));
    assert_eq!(tokens.issued().last().unwrap(), "tok-4");
    assert_eq!(rx.count(), before + 1, "sent once, with the new token");
    assert_eq!(bearer(&rx.requests()[before]), "Bearer tok-4");

    // A 401 that does not say the token is bad, for a token just fetched: no new token (a
    // receiver refusing for another reason must not cost a token request per attempt).
    plain_401.store(true, Ordering::SeqCst);
    let (status, attempts, err) = send(&mut db);
    assert_eq!((status.as_str(), attempts), ("failed", 2));
    assert_eq!(err.as_deref(), Some("HTTP 401 (gave up after 2 attempts)"));
    assert_eq!(tokens.issued().len(), 4);
    plain_401.store(false, Ordering::SeqCst);

    // The token endpoint refuses the client: the attempt says why (its error and description).
    db.execute(
        "SELECT webhook.alter_endpoint('api', oauth_client_secret => 'wrong-secret')",
        &[],
    )
    .unwrap();
    let (status, attempts, err) = send(&mut db);
    assert_eq!((status.as_str(), attempts), ("failed", 2));
    assert_eq!(
        err.as_deref(),
        Some("OAuth2 token request failed: HTTP 401: invalid_client (gave up after 2 attempts)")
    );
    // The token endpoint is down (nothing listens at its port): retried, then failed, saying so.
    let down = Down::new();
    db.execute(
        "SELECT webhook.alter_endpoint('api', oauth_client_secret => 'cl1ent-s3cret-value',
                oauth_token_url => $1)",
        &[&format!("http://127.0.0.1:{}/token", down.port())],
    )
    .unwrap();
    let (status, attempts, err) = send(&mut db);
    assert_eq!((status.as_str(), attempts), ("failed", 2));
    let err = err.unwrap_or_default();
    assert!(
        err.starts_with("OAuth2 token request failed: connection failed"),
        "{err}"
    );

    // With webhook.https_only turned on since, the stored http token URL would be refused if
    // given now; a change of another setting does not check it again (nor fail on it).
    let https_only = |db: &mut postgres::Client, on: bool| {
        db.batch_execute(&format!("ALTER SYSTEM SET webhook.https_only = {on}"))
            .unwrap();
        db.batch_execute("SELECT pg_reload_conf()").unwrap();
        wait_until(PATIENCE, "the reload", || {
            let now: String = db.query_one("SHOW webhook.https_only", &[]).unwrap().get(0);
            (now == if on { "on" } else { "off" }).then_some(())
        });
    };
    https_only(&mut db, true);
    db.execute(
        "SELECT webhook.alter_endpoint('api', max_attempts => 3)",
        &[],
    )
    .unwrap();
    https_only(&mut db, false);

    // Checked when given: all three parts or none, the token URL as an endpoint URL.
    for (sql, expected) in [
        (
            "SELECT webhook.alter_endpoint('api', reset => '{oauth}', oauth_client_id => 'x')",
            None,
        ),
        (
            "SELECT webhook.create_endpoint('b', 'http://127.0.0.1:9/', oauth_client_id => 'x')",
            Some("invalid endpoint OAuth2 credentials: oauth_token_url, oauth_client_id and oauth_client_secret must be given together"),
        ),
        (
            "SELECT webhook.create_endpoint('b', 'http://127.0.0.1:9/', oauth_token_url => 'ftp://auth/token', oauth_client_id => 'x', oauth_client_secret => 'y')",
            Some("invalid endpoint OAuth2 credentials: oauth_token_url: URL scheme \"ftp\" is not allowed: use http or https"),
        ),
        (
            "SELECT webhook.create_endpoint('b', 'http://127.0.0.1:9/', oauth_token_url => 'http://auth/token', oauth_client_id => 'x', oauth_client_secret => '')",
            Some("invalid endpoint OAuth2 credentials: oauth_client_secret must not be empty"),
        ),
    ] {
        match (db.batch_execute(sql), expected) {
            (Ok(()), None) => {}
            (Err(e), Some(msg)) => {
                assert_eq!(db_error(Err::<(), _>(e), sql).message(), msg, "{sql}")
            }
            (got, _) => panic!("{sql}: {got:?}"),
        }
    }
    assert!(db
        .query_one(
            "SELECT oauth_token_url IS NULL AND oauth_client_secret IS NULL FROM webhook.endpoints WHERE name = 'api'",
            &[]
        )
        .unwrap()
        .get::<_, bool>(0));

    let mut sensitive = Sensitive::default();
    sensitive.add("cl1ent-s3cret-value", "the OAuth2 client secret");
    for t in tokens.issued() {
        sensitive.add(&format!("Bearer {t}"), "a bearer token");
    }
    sensitive.assert_not_in_log(&pg);
}

#[test]
fn an_oauth2_token_url_goes_through_the_ssrf_guard() {
    // The webhook's host is allowed (nothing listens there); the token URL is on loopback.
    let ns = crate::harness::dns::nameserver(&[("partner.test", [127, 0, 0, 3])]);
    let tokens = Tokens::start("id", "s3cret-for-guard");
    let pg = Cluster::start(&[
        ("webhook.allow_private_networks", "off"),
        ("webhook.allowed_networks", "'127.0.0.3/32'"),
        ("webhook.dns_servers", &format!("'{ns}'")),
        ("webhook.default_max_attempts", "1"),
    ]);
    let mut db = pg.client_with_extension();
    db.execute(
        "SELECT webhook.create_endpoint('api', 'http://partner.test:9/hooks',
                oauth_token_url => $1, oauth_client_id => 'id', oauth_client_secret => 's3cret-for-guard',
                oauth_scope => 'hooks.write')",
        &[&tokens.server.url("/token")],
    )
    .unwrap();
    db.execute("SELECT webhook.send('x', '{}', 'api')", &[])
        .unwrap();
    wait_settled(&mut db, PATIENCE);
    let (status, err) = last_error(&mut db, "api");
    assert_eq!(status, "failed");
    assert!(
        err.as_deref().unwrap_or_default().starts_with(
            "OAuth2 token request refused: refused to connect to 127.0.0.1: loopback address"
        ),
        "{err:?}"
    );
    assert_eq!(
        tokens.server.count(),
        0,
        "the token endpoint was never asked"
    );
}

/// The notifications `listener` got on channel webhook_ops within `wait`, as JSON.
fn ops_notifications(listener: &mut postgres::Client, wait: Duration) -> Vec<serde_json::Value> {
    use postgres::fallible_iterator::FallibleIterator;
    let mut got = Vec::new();
    let mut n = listener.notifications();
    let mut it = n.timeout_iter(wait);
    while let Ok(Some(note)) = it.next() {
        assert_eq!(note.channel(), "webhook_ops");
        got.push(serde_json::from_str(note.payload()).unwrap());
    }
    got
}

#[test]
fn operational_events_go_to_the_ops_endpoint_and_to_notify() {
    let ops_rx = Receiver::start(always(Reply::ok()));
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let h = healthy.clone();
    let flaky = Receiver::start(Arc::new(move |_: &Request, _| {
        if h.load(Ordering::SeqCst) {
            Reply::ok()
        } else {
            Reply::status(503)
        }
    }));
    let gone = Receiver::start(always(Reply::status(410)));
    let slow = Receiver::start(always(Reply::ok().after(Duration::from_secs(30))));
    let pg = Cluster::start(&[
        ("webhook.retry_schedule", "'300ms'"),
        ("webhook.default_max_attempts", "20"),
        ("webhook.circuit_breaker_threshold", "2"),
        ("webhook.ops_endpoint", "'ops'"),
        ("webhook.ops_backlog_threshold", "3"),
    ]);
    let mut db = pg.client_with_extension();
    let ops_secret = create_endpoint(&mut db, "ops", &ops_rx.url("/ops"));
    create_endpoint(&mut db, "crm", &flaky.url("/crm"));
    create_endpoint(&mut db, "gone", &gone.url("/gone"));
    db.execute(
        "SELECT webhook.create_endpoint('slow', $1, max_in_flight => 1)",
        &[&slow.url("/slow")],
    )
    .unwrap();
    let mut listener = pg.client();
    listener.batch_execute("LISTEN webhook_ops").unwrap();

    // crm fails twice: its circuit opens. Then it recovers: the probe closes it.
    db.execute("SELECT webhook.send('x', '{}', 'crm')", &[])
        .unwrap();
    let opened = ops_rx.wait_for(1, PATIENCE);
    healthy.store(true, Ordering::SeqCst);
    let closed = ops_rx.wait_for(2, PATIENCE);
    // gone answers 410: disabled.
    db.execute("SELECT webhook.send('x', '{}', 'gone')", &[])
        .unwrap();
    let disabled = ops_rx.wait_for(3, PATIENCE);
    // slow holds one request and has five more pending: past the threshold of 3.
    db.execute(
        "SELECT webhook.send('x', to_jsonb(g), 'slow') FROM generate_series(1, 6) g",
        &[],
    )
    .unwrap();
    let backlog = ops_rx.wait_for(4, Duration::from_secs(40));
    let events: Vec<serde_json::Value> = [&opened[0], &closed[1], &disabled[2], &backlog[3]]
        .iter()
        .map(|r| {
            // Signed like any other webhook, with the ops endpoint's secret.
            verify_with_standardwebhooks(&ops_secret, r).unwrap();
            r.json()
        })
        .collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "webhook.endpoint.circuit_opened",
            "webhook.endpoint.circuit_closed",
            "webhook.endpoint.disabled",
            "webhook.endpoint.backlog"
        ]
    );
    let data: Vec<&serde_json::Value> = events.iter().map(|e| &e["data"]).collect();
    assert_eq!(data[0]["endpoint"], "crm");
    assert_eq!(data[0]["database"], "app");
    assert_eq!(data[0]["consecutive_failures"], 2);
    assert_eq!(data[0]["last_error"], "HTTP 503");
    assert!(data[0]["failing_since"].as_str().unwrap().ends_with('Z'));
    assert_eq!(data[1]["endpoint"], "crm");
    assert_eq!(data[2]["endpoint"], "gone");
    assert!(
        data[2]["reason"].as_str().unwrap().contains("410"),
        "{}",
        data[2]
    );
    assert_eq!(data[3]["endpoint"], "slow");
    assert_eq!(data[3]["pending"], 5);
    assert_eq!(data[3]["threshold"], 3);
    // The same four on NOTIFY webhook_ops, in the same order.
    // Any role may LISTEN: the notification says what, which endpoint id and when, no more.
    let notes = ops_notifications(&mut listener, Duration::from_secs(1));
    let noted: Vec<&str> = notes.iter().map(|n| n["type"].as_str().unwrap()).collect();
    assert_eq!(noted, kinds);
    let id_of = |db: &mut postgres::Client, name: &str| -> i32 {
        db.query_one("SELECT id FROM webhook.endpoints WHERE name = $1", &[&name])
            .unwrap()
            .get(0)
    };
    assert_eq!(notes[3]["endpoint_id"], id_of(&mut db, "slow"));
    assert_eq!(notes[3]["endpoint_id"], data[3]["endpoint_id"]);
    for n in &notes {
        let mut keys: Vec<&str> = n.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["endpoint_id", "occurred_at", "type"], "{n}");
    }
    // A backlog that stays high is not said again.
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(ops_rx.count(), 4);

    // An event about the ops endpoint itself goes to NOTIFY only.
    db.execute(
        "SELECT webhook.alter_endpoint('ops', url => $1)",
        &[&gone.url("/ops")],
    )
    .unwrap();
    db.execute("SELECT webhook.send('x', '{}', 'ops')", &[])
        .unwrap();
    let notes = wait_until(PATIENCE, "the ops endpoint's own event", || {
        let n = ops_notifications(&mut listener, Duration::from_millis(500));
        (!n.is_empty()).then_some(n)
    });
    assert_eq!(notes[0]["type"], "webhook.endpoint.disabled");
    assert_eq!(notes[0]["endpoint_id"], id_of(&mut db, "ops"));
    assert_eq!(ops_rx.count(), 4);
}
