//! Nameservers on 127.0.0.1 for tests: one answers A queries for the names it is given and never
//! answers anything else (a receiver whose DNS hangs); one answers a name with one address the
//! first time and another ever after, uncached (a DNS rebinding attacker's).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Starts the nameserver; returns its address (for `webhook.dns_servers`).
pub fn nameserver(answers: &[(&str, [u8; 4])]) -> SocketAddr {
    let known: HashMap<String, [u8; 4]> = answers
        .iter()
        .map(|(n, a)| (n.to_ascii_lowercase(), *a))
        .collect();
    serve(60, move |name, qtype| {
        known.get(name).map(|ip| (qtype == 1).then_some(*ip))
    })
}

/// A rebinding nameserver: the first A query for `name` is answered `first`, every later one
/// `then`, with TTL 0 (nothing may be cached); AAAA queries get no address. Returns its address
/// and how many A queries it has answered.
pub fn rebinding_nameserver(
    name: &str,
    first: [u8; 4],
    then: [u8; 4],
) -> (SocketAddr, Arc<AtomicUsize>) {
    let name = name.to_ascii_lowercase();
    let asked = Arc::new(AtomicUsize::new(0));
    let count = asked.clone();
    let addr = serve(0, move |q, qtype| {
        if q != name {
            return None;
        }
        if qtype != 1 {
            return Some(None);
        }
        let n = count.fetch_add(1, Ordering::SeqCst);
        Some(Some(if n == 0 { first } else { then }))
    });
    (addr, asked)
}

/// Answers each query by `answer(name, qtype)`: `None` leaves it unanswered, `Some(None)` answers
/// with no address, `Some(Some(ip))` with one A record of `ttl` seconds.
fn serve(
    ttl: u32,
    mut answer: impl FnMut(&str, u16) -> Option<Option<[u8; 4]>> + Send + 'static,
) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 512];
        while let Ok((n, from)) = sock.recv_from(&mut buf) {
            let q = &buf[..n];
            // The question: labels from byte 12 up to a zero byte, then type and class.
            let mut i = 12;
            let mut labels = Vec::new();
            while i < n && q[i] != 0 {
                let len = q[i] as usize;
                if i + 1 + len > n {
                    break;
                }
                labels.push(String::from_utf8_lossy(&q[i + 1..i + 1 + len]).to_ascii_lowercase());
                i += 1 + len;
            }
            if i + 5 > n {
                continue;
            }
            let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
            let Some(ip) = answer(&labels.join("."), qtype) else {
                continue;
            };
            let mut r = q[..i + 5].to_vec();
            r[2] = 0x81; // a response; recursion desired
            r[3] = 0x80; // recursion available; no error
            let answers: u16 = u16::from(ip.is_some());
            r[6..8].copy_from_slice(&answers.to_be_bytes());
            r[8..12].copy_from_slice(&[0, 0, 0, 0]);
            if let Some(ip) = ip {
                r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
                r.extend_from_slice(&ttl.to_be_bytes());
                r.extend_from_slice(&[0, 4]);
                r.extend_from_slice(&ip);
            }
            let _ = sock.send_to(&r, from);
        }
    });
    addr
}
