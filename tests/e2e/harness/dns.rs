//! A nameserver on 127.0.0.1 for tests: answers A queries for the names it is given, and never
//! answers anything else (a receiver whose DNS hangs).

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};

/// Starts the nameserver; returns its address (for `webhook.dns_servers`).
pub fn nameserver(answers: &[(&str, [u8; 4])]) -> SocketAddr {
    let known: HashMap<String, [u8; 4]> = answers
        .iter()
        .map(|(n, a)| (n.to_ascii_lowercase(), *a))
        .collect();
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
            let Some(ip) = known.get(&labels.join(".")) else {
                continue;
            };
            let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
            let mut r = q[..i + 5].to_vec();
            r[2] = 0x81; // a response; recursion desired
            r[3] = 0x80; // recursion available; no error
            let answers: u16 = u16::from(qtype == 1);
            r[6..8].copy_from_slice(&answers.to_be_bytes());
            r[8..12].copy_from_slice(&[0, 0, 0, 0]);
            if qtype == 1 {
                r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
                r.extend_from_slice(ip);
            }
            let _ = sock.send_to(&r, from);
        }
    });
    addr
}
