//! What the tests of `runtime`, `resolver` and `exchange` share: a config, a job, HTTP servers
//! on loopback (one-shot, and one that answers everything), and waiting for one result.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use super::{Finished, HttpConfig, HttpRuntime, Job};
use crate::target::AddressPolicy;

pub(super) fn config(allow_private: bool) -> HttpConfig {
    HttpConfig {
        policy: AddressPolicy {
            allow_private,
            allowed: vec![],
        },
        https_only: false,
        response_body_limit: 16,
        user_agent: "webhook_ext/test".into(),
        extra_roots_pem: None,
        threads: 1,
        dns_servers: vec![],
        proxy: Ok(None),
    }
}

pub(super) fn job(url: String) -> Job {
    Job {
        delivery_id: 7,
        endpoint_id: 1,
        attempt: 1,
        url,
        msg_id: "msg_t_7".into(),
        body: "{}".into(),
        keys: vec![vec![1u8; 32]],
        signing_keys: Vec::new(),
        identity: None,
        proxy: crate::http::ProxyChoice::Default,
        oauth: None,
        headers: vec![("X-Extra".into(), "yes".into())],
        timeout: Duration::from_secs(5),
    }
}

/// An HTTP server on loopback that answers every request (`{}` bodies) 200, on kept-alive
/// connections, until the test ends; its address.
pub(super) fn ok_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let mut conn = conn.unwrap();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                let mut req = Vec::new();
                loop {
                    while !String::from_utf8_lossy(&req).contains("\r\n\r\n{}") {
                        match conn.read(&mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    req.clear();
                    if conn
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .is_err()
                    {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A one-shot HTTP server on loopback that answers with `response` and returns the request it read.
pub(super) fn one_shot(response: &'static str) -> (String, std::thread::JoinHandle<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let handle = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&req).contains("\r\n\r\n{}") {
            let n = s.read(&mut buf).unwrap();
            req.extend_from_slice(&buf[..n]);
        }
        s.write_all(response.as_bytes()).unwrap();
        String::from_utf8_lossy(&req).into_owned()
    });
    (url, handle)
}

pub(super) fn wait_one(rt: &HttpRuntime) -> Finished {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut done = rt.take_finished();
        if let Some(f) = done.pop() {
            return f;
        }
        assert!(Instant::now() < deadline, "no result");
        std::thread::sleep(Duration::from_millis(5));
    }
}
