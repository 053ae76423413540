//! Name resolution behind the SSRF guard: hickory looks the host up asynchronously, and only
//! the addresses [`AddressPolicy`] allows reach reqwest's connector.
//!
//! URLs with a literal IP address never reach a resolver; `exchange` checks those itself.

use std::net::SocketAddr;
use std::time::Duration;

use crate::target::AddressPolicy;

/// Resolves host names and keeps only the addresses the SSRF guard allows, so the connection is
/// made to an address that was checked (no window for DNS rebinding). Lookups are asynchronous
/// (hickory): a nameserver that never answers costs the request its deadline, and no thread.
pub(super) struct GuardedResolver {
    policy: AddressPolicy,
    resolver: hickory_resolver::TokioAsyncResolver,
    /// A host whose addresses are not checked: the forward proxy a client goes through.
    exempt: Option<String>,
}

impl GuardedResolver {
    /// Asks `servers`, or the system's nameservers when it is empty.
    pub(super) fn new(policy: AddressPolicy, servers: &[SocketAddr]) -> GuardedResolver {
        GuardedResolver {
            policy,
            resolver: build_resolver(servers),
            exempt: None,
        }
    }

    /// Resolves `host` and fails, with the guard's reason, if any of its addresses is refused:
    /// for a target a proxy connects to, which picks among them itself.
    pub(super) async fn check_every_address(&self, host: &str) -> Result<(), String> {
        let addrs = lookup(&self.resolver, host).await?;
        if addrs.is_empty() {
            return Err(format!("host {host} has no address"));
        }
        addrs.iter().try_for_each(|ip| self.policy.check(*ip))
    }

    pub(super) fn exempt(mut self, host: Option<String>) -> GuardedResolver {
        self.exempt = host.map(|h| h.to_ascii_lowercase());
        self
    }
}

/// How long one DNS query may take, and how often it is sent; the request's own deadline
/// bounds the whole lookup as well.
const DNS_TIMEOUT: Duration = Duration::from_secs(5);
const DNS_ATTEMPTS: usize = 2;

fn build_resolver(servers: &[SocketAddr]) -> hickory_resolver::TokioAsyncResolver {
    use hickory_resolver::config::{
        LookupIpStrategy, NameServerConfig, NameServerConfigGroup, Protocol, ResolverConfig,
        ResolverOpts,
    };
    let (config, mut opts) = if servers.is_empty() {
        // No /etc/resolv.conf: no nameserver at all (lookups fail with the reason), never a
        // public resolver chosen for the user.
        hickory_resolver::system_conf::read_system_conf().unwrap_or_else(|_| {
            (
                ResolverConfig::from_parts(None, vec![], NameServerConfigGroup::new()),
                ResolverOpts::default(),
            )
        })
    } else {
        let mut group = NameServerConfigGroup::new();
        for s in servers {
            group.push(NameServerConfig::new(*s, Protocol::Udp));
            group.push(NameServerConfig::new(*s, Protocol::Tcp));
        }
        (
            ResolverConfig::from_parts(None, vec![], group),
            ResolverOpts::default(),
        )
    };
    opts.timeout = DNS_TIMEOUT;
    opts.attempts = DNS_ATTEMPTS;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    opts.use_hosts_file = true;
    hickory_resolver::TokioAsyncResolver::tokio(config, opts)
}

/// Parses webhook.dns_servers: comma-separated `ip` or `ip:port` (`[v6]:port`); port 53 by default.
pub fn parse_dns_servers(text: &str) -> Result<Vec<SocketAddr>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<SocketAddr>()
                .or_else(|_| {
                    s.parse::<std::net::IpAddr>()
                        .map(|ip| SocketAddr::new(ip, 53))
                })
                .map_err(|_| format!("\"{s}\" is not an IP address or IP:port"))
        })
        .collect()
}

/// The SSRF guard refused every address of a host; carried through reqwest's error chain
/// (`exchange` finds it there and reports the attempt as refused).
#[derive(Debug)]
pub(super) struct Refused(pub(super) String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Refused {}

/// The addresses of `host`, or why the lookup failed.
async fn lookup(
    resolver: &hickory_resolver::TokioAsyncResolver,
    host: &str,
) -> Result<Vec<std::net::IpAddr>, String> {
    resolver
        .lookup_ip(host)
        .await
        .map(|found| found.iter().collect())
        .map_err(|e| format!("could not resolve {host}: {e}"))
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        let resolver = self.resolver.clone();
        let exempt = self
            .exempt
            .as_deref()
            .is_some_and(|e| e.eq_ignore_ascii_case(&host));
        Box::pin(async move {
            let addrs = lookup(&resolver, &host)
                .await
                .map_err(|e| Box::new(Refused(e)))?;
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|ip| match policy.check(*ip) {
                    Ok(()) => true,
                    Err(_) if exempt => true,
                    Err(why) => {
                        refusal.get_or_insert(why);
                        false
                    }
                })
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            if allowed.is_empty() {
                let why = refusal.unwrap_or_else(|| format!("host {host} has no address"));
                return Err(Box::new(Refused(why)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testutil::{config, job, ok_server, wait_one};
    use crate::http::HttpRuntime;
    use crate::retry::Outcome;
    use std::time::Instant;

    #[test]
    fn dns_servers_parse_with_and_without_ports() {
        assert_eq!(
            parse_dns_servers(" 10.0.0.2, 127.0.0.1:5353,[::1]:53 ,::1").unwrap(),
            vec![
                "10.0.0.2:53".parse().unwrap(),
                "127.0.0.1:5353".parse().unwrap(),
                "[::1]:53".parse().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
        assert_eq!(parse_dns_servers("").unwrap(), vec![]);
        assert_eq!(
            parse_dns_servers("8.8.8.8, dns.example").unwrap_err(),
            "\"dns.example\" is not an IP address or IP:port"
        );
    }

    /// A nameserver on loopback that answers A queries for `good.test` with 127.0.0.1 and never
    /// answers anything else (the receiver whose DNS hangs).
    fn nameserver() -> SocketAddr {
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = sock.local_addr().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((n, from)) = sock.recv_from(&mut buf) {
                let q = &buf[..n];
                // Question name: labels from byte 12 to the zero byte, then type and class.
                let mut i = 12;
                let mut labels = Vec::new();
                while i < n && q[i] != 0 {
                    let len = q[i] as usize;
                    labels.push(String::from_utf8_lossy(&q[i + 1..i + 1 + len]).into_owned());
                    i += 1 + len;
                }
                let end = i + 5;
                let qtype = u16::from_be_bytes([q[i + 1], q[i + 2]]);
                if labels.join(".") != "good.test" {
                    continue;
                }
                let mut r = q[..end].to_vec();
                r[2] = 0x81; // response, recursion desired
                r[3] = 0x80; // recursion available, no error
                let answers: u16 = if qtype == 1 { 1 } else { 0 };
                r[6..8].copy_from_slice(&answers.to_be_bytes());
                r[8..12].copy_from_slice(&[0, 0, 0, 0]);
                if qtype == 1 {
                    r.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, 127, 0, 0, 1]);
                }
                let _ = sock.send_to(&r, from);
            }
        });
        addr
    }

    /// Lookups that never get an answer hold no thread: a host whose nameserver answers is
    /// reached at once while many lookups for a silent one are under way.
    #[test]
    fn a_silent_nameserver_does_not_hold_up_other_lookups() {
        let port = ok_server().port();
        let mut cfg = config(true);
        cfg.dns_servers = vec![nameserver()];
        let rt = HttpRuntime::start(cfg).unwrap();
        for i in 0..64 {
            let mut j = job(format!("http://hang{i}.test:{port}/"));
            j.delivery_id = 1000 + i;
            j.timeout = Duration::from_secs(30);
            rt.submit(j);
        }
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        let mut good = job(format!("http://good.test:{port}/"));
        good.delivery_id = 1;
        rt.submit(good);
        let done = wait_one(&rt);
        assert_eq!(done.delivery_id, 1, "{:?}", done.error);
        assert_eq!(
            done.outcome,
            Outcome::Status {
                code: 200,
                retry_after: None
            },
            "{:?}",
            done.error
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}",
            started.elapsed()
        );
    }

    #[test]
    fn guard_refuses_loopback_literals_and_names() {
        let rt = HttpRuntime::start(config(false)).unwrap();
        rt.submit(job("http://127.0.0.1:9/x".into()));
        let done = wait_one(&rt);
        assert_eq!(done.outcome, Outcome::Refused);
        assert!(done.error.unwrap().contains("loopback"));
        rt.submit(job("http://localhost:9/x".into()));
        let done = wait_one(&rt);
        assert_eq!(done.outcome, Outcome::Refused, "{:?}", done.error);
        assert!(done.error.unwrap().contains("loopback"));
    }
}
