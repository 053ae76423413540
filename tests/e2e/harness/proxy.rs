//! A forward proxy on 127.0.0.1 for tests: HTTP CONNECT tunnels (https targets) and
//! absolute-form requests (http targets), with optional basic credentials it requires, a view of
//! its own of some host names (as a proxy with its own DNS has), and a record of what it was
//! asked.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use base64::Engine;

/// One request the proxy got: `CONNECT host:port` or `<METHOD> <absolute URL>`, and whether it
/// carried the credentials the proxy requires (true when it requires none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    pub line: String,
    pub authorized: bool,
}

pub struct Proxy {
    pub port: u16,
    asked: Arc<Mutex<Vec<Asked>>>,
}

impl Proxy {
    /// `credentials`: (user, password) it requires; `hosts`: names it connects to elsewhere
    /// (`name` → `127.0.0.1`), other hosts as they are.
    pub fn start(credentials: Option<(&str, &str)>, hosts: &[(&str, &str)]) -> Proxy {
        let expected = credentials.map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        let hosts: Arc<HashMap<String, String>> = Arc::new(
            hosts
                .iter()
                .map(|(n, a)| (n.to_ascii_lowercase(), a.to_string()))
                .collect(),
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let asked = Arc::new(Mutex::new(Vec::new()));
        let record = asked.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let (expected, hosts, record) = (expected.clone(), hosts.clone(), record.clone());
                std::thread::spawn(move || serve(conn, expected, &hosts, &record));
            }
        });
        Proxy { port, asked }
    }

    pub fn asked(&self) -> Vec<Asked> {
        self.asked.lock().unwrap().clone()
    }
}

/// `host:port` with `host` mapped through the proxy's own view.
fn route(target: &str, hosts: &HashMap<String, String>) -> String {
    match target.rsplit_once(':') {
        Some((host, port)) => {
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let mapped = hosts
                .get(&host.to_ascii_lowercase())
                .map(String::as_str)
                .unwrap_or(host);
            format!("{mapped}:{port}")
        }
        None => target.to_string(),
    }
}

fn serve(
    conn: TcpStream,
    expected: Option<String>,
    hosts: &HashMap<String, String>,
    record: &Mutex<Vec<Asked>>,
) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut first = String::new();
    if reader.read_line(&mut first).unwrap_or(0) == 0 {
        return;
    }
    let first = first.trim_end().to_string();
    let mut headers = Vec::new();
    let mut authorized = expected.is_none();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let line = line.trim_end().to_string();
        if line.is_empty() {
            break;
        }
        match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("proxy-authorization") => {
                authorized |= expected.as_deref() == Some(value.trim());
            }
            Some((name, _))
                if name.eq_ignore_ascii_case("proxy-connection")
                    || name.eq_ignore_ascii_case("connection") => {}
            _ => headers.push(line),
        }
    }
    let mut parts = first.splitn(3, ' ');
    let (method, target) = (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
    );
    record.lock().unwrap().push(Asked {
        line: format!("{method} {target}"),
        authorized,
    });
    let mut client = conn;
    if !authorized {
        let _ = client.write_all(
            b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        );
        return;
    }
    let buffered = reader.buffer().to_vec();
    if method == "CONNECT" {
        let Ok(mut upstream) = TcpStream::connect(route(&target, hosts)) else {
            let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n");
            return;
        };
        let _ = client.write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n");
        let _ = upstream.write_all(&buffered);
        pipe(client, upstream);
    } else {
        // Absolute form: one request, passed on in origin form with `connection: close`, so
        // that the next request comes on a new connection (and is seen here).
        let Some(rest) = target.strip_prefix("http://") else {
            let _ = client.write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n");
            return;
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let authority = if authority.contains(':') {
            authority.to_string()
        } else {
            format!("{authority}:80")
        };
        let Ok(mut upstream) = TcpStream::connect(route(&authority, hosts)) else {
            let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n");
            return;
        };
        let mut head = format!("{method} {path} HTTP/1.1\r\n");
        let mut length = 0usize;
        for h in &headers {
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            head.push_str(h);
            head.push_str("\r\n");
        }
        head.push_str("connection: close\r\n\r\n");
        let mut body = vec![0u8; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let _ = upstream.write_all(head.as_bytes());
        let _ = upstream.write_all(&body);
        // One response, passed back with `connection: close`; then the connection ends, so
        // that the client's next request comes on a new one (and is seen here).
        let mut up = BufReader::new(upstream);
        let mut response = String::new();
        let mut length = None;
        loop {
            let mut line = String::new();
            if up.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            if line.trim_end().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("connection") {
                    continue;
                }
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse::<usize>().ok();
                }
            }
            response.push_str(&line);
        }
        response.push_str("connection: close\r\n\r\n");
        let mut body = Vec::new();
        match length {
            Some(n) => {
                body.resize(n, 0);
                let _ = up.read_exact(&mut body);
            }
            None => {
                let _ = up.read_to_end(&mut body);
            }
        }
        let _ = client.write_all(response.as_bytes());
        let _ = client.write_all(&body);
        let _ = client.shutdown(std::net::Shutdown::Both);
    }
}

/// Copies bytes both ways until either side closes.
fn pipe(client: TcpStream, upstream: TcpStream) {
    let (mut c_read, mut u_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    let forward = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(std::net::Shutdown::Write);
    });
    let (mut u_read, mut c_write) = (upstream, client);
    let mut buf = [0u8; 16384];
    loop {
        match u_read.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if c_write.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = c_write.shutdown(std::net::Shutdown::Both);
    let _ = forward.join();
}
