//! The HTTP side of the worker: a tokio runtime on its own threads that signs, sends and times
//! each request, caps the response, and hands the result back to the worker's main thread.
//!
//! Nothing here touches Postgres. Results wait in a queue; a byte on a pipe wakes the main thread,
//! which waits on that pipe together with its latch.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::retry::{self, Outcome};
use crate::signing;
use crate::target::AddressPolicy;

/// One attempt to deliver one delivery.
#[derive(Debug, Clone)]
pub struct Job {
    pub delivery_id: i64,
    pub endpoint_id: i32,
    /// The number of this attempt, 1-based.
    pub attempt: i32,
    pub url: String,
    pub msg_id: String,
    pub body: String,
    /// HMAC keys: the current secret's, plus the previous one's during a rotation's grace period.
    pub keys: Vec<Vec<u8>>,
    pub headers: Vec<(String, String)>,
    pub timeout: Duration,
}

/// What one attempt did.
#[derive(Debug, Clone)]
pub struct Finished {
    pub delivery_id: i64,
    pub endpoint_id: i32,
    pub attempt: i32,
    pub started_at: SystemTime,
    pub duration: Duration,
    pub outcome: Outcome,
    /// The response body, cut at the configured limit (lossy UTF-8).
    pub response_body: Option<String>,
    /// Why the attempt failed, in words, when it did not get a 2xx.
    pub error: Option<String>,
}

impl Finished {
    pub fn status_code(&self) -> Option<u16> {
        match self.outcome {
            Outcome::Status { code, .. } => Some(code),
            _ => None,
        }
    }
}

/// Settings read from the GUCs when the runtime is (re)built.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub policy: AddressPolicy,
    /// Refuse plain http URLs (webhook.https_only).
    pub https_only: bool,
    pub response_body_limit: usize,
    pub user_agent: String,
    /// Extra trusted root certificates (PEM), on top of the built-in Mozilla roots.
    pub extra_roots_pem: Option<Vec<u8>>,
    pub threads: usize,
    /// Nameservers to ask (webhook.dns_servers); empty: the system's (/etc/resolv.conf).
    pub dns_servers: Vec<SocketAddr>,
}

pub struct HttpRuntime {
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
    config: Arc<HttpConfig>,
    shared: Arc<Shared>,
    wake_read: OwnedFd,
}

struct Shared {
    finished: Mutex<Vec<Finished>>,
    signalled: AtomicBool,
    in_flight: AtomicUsize,
    wake_write: OwnedFd,
}

impl HttpRuntime {
    /// Starts the runtime threads (with every signal blocked, so Postgres's handlers run only
    /// on the main thread) and the HTTP client.
    pub fn start(config: HttpConfig) -> Result<HttpRuntime, String> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads.max(1))
            .max_blocking_threads(8)
            .thread_name("webhook-http")
            .on_thread_start(block_all_signals)
            .enable_all()
            .build()
            .map_err(|e| format!("could not start the HTTP runtime: {e}"))?;
        let (wake_read, wake_write) =
            nonblocking_pipe().map_err(|e| format!("could not create the wake pipe: {e}"))?;
        let client = build_client(&config)?;
        Ok(HttpRuntime {
            runtime,
            client,
            config: Arc::new(config),
            shared: Arc::new(Shared {
                finished: Mutex::new(Vec::new()),
                signalled: AtomicBool::new(false),
                in_flight: AtomicUsize::new(0),
                wake_write,
            }),
            wake_read,
        })
    }

    /// Replaces the client (new policy, limits or roots); requests under way finish on the old one.
    pub fn reconfigure(&mut self, config: HttpConfig) -> Result<(), String> {
        self.client = build_client(&config)?;
        self.config = Arc::new(config);
        Ok(())
    }

    /// The descriptor that becomes readable when results are waiting.
    pub fn wake_fd(&self) -> RawFd {
        self.wake_read.as_raw_fd()
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::Acquire)
    }

    /// Starts one attempt; its result arrives through `take_finished`.
    pub fn submit(&self, job: Job) {
        let client = self.client.clone();
        let config = self.config.clone();
        let shared = self.shared.clone();
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        self.runtime.spawn(async move {
            let done = attempt(&client, &config, job).await;
            shared
                .finished
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(done);
            shared.in_flight.fetch_sub(1, Ordering::AcqRel);
            shared.signal();
        });
    }

    /// Queues a result that needed no request (the attempt was refused before sending).
    pub fn push_finished(&self, done: Finished) {
        self.shared
            .finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(done);
        self.shared.signal();
    }

    /// Every result that has arrived since the last call.
    pub fn take_finished(&self) -> Vec<Finished> {
        // Order matters: empty the pipe, then clear the flag, then take the results. A task that
        // finishes after the flag is cleared writes a new byte; one that finished before has its
        // result in the queue we take.
        let mut buf = [0u8; 64];
        // SAFETY: reading into a valid stack buffer from our own non-blocking pipe until it is empty.
        while unsafe {
            libc::read(
                self.wake_read.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        } > 0
        {}
        self.shared.signalled.store(false, Ordering::SeqCst);
        std::mem::take(
            &mut *self
                .shared
                .finished
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Stops without waiting for requests under way: their deliveries stay claimed and are sent
    /// again (with the same `webhook-id`) when the worker next starts.
    pub fn shutdown(self) {
        self.runtime.shutdown_background();
    }
}

impl Shared {
    /// Wakes the main thread, once per batch of results.
    fn signal(&self) {
        if !self.signalled.swap(true, Ordering::SeqCst) {
            let byte = 1u8;
            // SAFETY: writing one byte from a valid buffer to our own non-blocking pipe.
            unsafe { libc::write(self.wake_write.as_raw_fd(), (&byte as *const u8).cast(), 1) };
        }
    }
}

fn block_all_signals() {
    // SAFETY: plain libc calls on a locally owned, initialised signal set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
    }
}

fn nonblocking_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 fills two descriptors we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn build_client(config: &HttpConfig) -> Result<reqwest::Client, String> {
    let mut builder = reqwest::Client::builder()
        .user_agent(config.user_agent.clone())
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .http1_only()
        .tcp_nodelay(true)
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .dns_resolver(Arc::new(GuardedResolver {
            policy: config.policy.clone(),
            resolver: build_resolver(&config.dns_servers),
        }));
    if let Some(pem) = &config.extra_roots_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("webhook.ssl_ca_file: {e}"))?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| format!("could not build the HTTP client: {e}"))
}

/// Resolves host names and keeps only the addresses the SSRF guard allows, so the connection is
/// made to an address that was checked (no window for DNS rebinding). Lookups are asynchronous
/// (hickory): a nameserver that never answers costs the request its deadline, and no thread.
struct GuardedResolver {
    policy: AddressPolicy,
    resolver: hickory_resolver::TokioAsyncResolver,
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

/// The SSRF guard refused every address of a host; carried through reqwest's error chain.
#[derive(Debug)]
struct Refused(String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Refused {}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let host = name.as_str().to_string();
        let resolver = self.resolver.clone();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = resolver
                .lookup_ip(host.as_str())
                .await
                .map_err(|e| Box::new(Refused(format!("could not resolve {host}: {e}"))))?
                .iter()
                .map(|ip| SocketAddr::new(ip, 0))
                .collect();
            let mut refusal = None;
            let allowed: Vec<SocketAddr> = addrs
                .into_iter()
                .filter(|a| match policy.check(a.ip()) {
                    Ok(()) => true,
                    Err(why) => {
                        refusal.get_or_insert(why);
                        false
                    }
                })
                .collect();
            if allowed.is_empty() {
                let why = refusal.unwrap_or_else(|| format!("host {host} has no address"));
                return Err(Box::new(Refused(why)) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

async fn attempt(client: &reqwest::Client, config: &HttpConfig, job: Job) -> Finished {
    let started_at = SystemTime::now();
    let clock = Instant::now();
    let (outcome, response_body, error) =
        match tokio::time::timeout(job.timeout, exchange(client, config, &job)).await {
            Ok(result) => result,
            Err(_) => (
                Outcome::Timeout,
                None,
                Some(format!("timed out after {}", human(job.timeout))),
            ),
        };
    Finished {
        delivery_id: job.delivery_id,
        endpoint_id: job.endpoint_id,
        attempt: job.attempt,
        started_at,
        duration: clock.elapsed(),
        outcome,
        response_body,
        error,
    }
}

async fn exchange(
    client: &reqwest::Client,
    config: &HttpConfig,
    job: &Job,
) -> (Outcome, Option<String>, Option<String>) {
    if config.https_only && !job.url.starts_with("https:") {
        return (
            Outcome::Refused,
            None,
            Some("refused to send over plain http while webhook.https_only is on".into()),
        );
    }
    // Literal addresses never reach the resolver, so the guard checks them here.
    if let Some(ip) = literal_ip(&job.url) {
        if let Err(why) = config.policy.check(ip) {
            return (Outcome::Refused, None, Some(why));
        }
    }
    let timestamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let signature =
        signing::signature_header(&job.keys, &job.msg_id, timestamp, job.body.as_bytes());
    let mut request = client
        .post(&job.url)
        .header("content-type", "application/json")
        .header("webhook-id", &job.msg_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature);
    for (name, value) in &job.headers {
        request = request.header(name.as_str(), value.as_str());
    }
    let response = match request.body(job.body.clone()).send().await {
        Ok(r) => r,
        Err(e) => return transport_failure(e),
    };
    let code = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry::parse_retry_after(v, SystemTime::now()));
    let (body, body_error) = read_capped(response, config.response_body_limit).await;
    let outcome = Outcome::Status { code, retry_after };
    let error = match code {
        200..=299 => None,
        300..=399 => Some(format!("HTTP {code}: redirects are not followed")),
        _ => Some(format!("HTTP {code}")),
    };
    (outcome, body, error.or(body_error))
}

/// Reads at most `limit` bytes of the body; a longer body is cut and the connection dropped.
async fn read_capped(
    mut response: reqwest::Response,
    limit: usize,
) -> (Option<String>, Option<String>) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit.saturating_sub(buf.len());
                buf.extend_from_slice(&chunk[..chunk.len().min(room)]);
                if chunk.len() > room {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                return (
                    Some(String::from_utf8_lossy(&buf).into_owned()),
                    Some(format!("reading the response body: {}", describe(&e))),
                )
            }
        }
    }
    (Some(String::from_utf8_lossy(&buf).into_owned()), None)
}

fn transport_failure(e: reqwest::Error) -> (Outcome, Option<String>, Option<String>) {
    if let Some(refused) = find_source::<Refused>(&e) {
        return (Outcome::Refused, None, Some(refused.0.clone()));
    }
    let outcome = if e.is_timeout() {
        Outcome::Timeout
    } else {
        Outcome::Transport
    };
    (outcome, None, Some(describe(&e)))
}

fn find_source<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if let Some(found) = err.downcast_ref::<T>() {
            return Some(found);
        }
        cur = err.source();
    }
    None
}

/// The error and its causes in one line, without the URL (it may carry a token).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_connect() {
        "connection failed"
    } else if e.is_timeout() {
        "timed out"
    } else if e.is_body() || e.is_decode() {
        "bad response body"
    } else if e.is_request() {
        "request failed"
    } else {
        "HTTP error"
    };
    let mut parts = vec![kind.to_string()];
    let mut cur = std::error::Error::source(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

fn literal_ip(url: &str) -> Option<IpAddr> {
    match url::Url::parse(url).ok()?.host()? {
        url::Host::Ipv4(v4) => Some(IpAddr::V4(v4)),
        url::Host::Ipv6(v6) => Some(IpAddr::V6(v6)),
        url::Host::Domain(_) => None,
    }
}

fn human(d: Duration) -> String {
    if d.as_millis().is_multiple_of(1000) {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn config(allow_private: bool) -> HttpConfig {
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
        }
    }

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
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let mut conn = conn.unwrap();
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let mut req = Vec::new();
                    while !String::from_utf8_lossy(&req).contains("\r\n\r\n{}") {
                        let n = conn.read(&mut buf).unwrap();
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                    }
                    let _ = conn.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                });
            }
        });
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

    fn job(url: String) -> Job {
        Job {
            delivery_id: 7,
            endpoint_id: 1,
            attempt: 1,
            url,
            msg_id: "msg_t_7".into(),
            body: "{}".into(),
            keys: vec![vec![1u8; 32]],
            headers: vec![("X-Extra".into(), "yes".into())],
            timeout: Duration::from_secs(5),
        }
    }

    /// A one-shot HTTP server on loopback that answers with `response` and returns the request it read.
    fn one_shot(response: &'static str) -> (String, std::thread::JoinHandle<String>) {
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

    fn wait_one(rt: &HttpRuntime) -> Finished {
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

    #[test]
    fn sends_signed_request_and_caps_the_response() {
        let (url, server) = one_shot(
            "HTTP/1.1 200 OK\r\ncontent-length: 40\r\n\r\n0123456789012345678901234567890123456789",
        );
        let rt = HttpRuntime::start(config(true)).unwrap();
        rt.submit(job(url));
        let done = wait_one(&rt);
        let request = server.join().unwrap();
        assert_eq!(
            done.outcome,
            Outcome::Status {
                code: 200,
                retry_after: None
            }
        );
        assert_eq!(done.response_body.as_deref(), Some("0123456789012345"));
        assert_eq!(done.error, None);
        let lower = request.to_ascii_lowercase();
        assert!(lower.starts_with("post /hook http/1.1"));
        assert!(lower.contains("webhook-id: msg_t_7"));
        assert!(lower.contains("webhook-signature: v1,"));
        assert!(lower.contains("x-extra: yes"));
        assert!(lower.contains("user-agent: webhook_ext/test"));
        // The signature verifies with the key and the timestamp that were sent.
        let header = |name: &str| {
            request
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .starts_with(name)
                        .then(|| l.split_once(": ").unwrap().1.to_string())
                })
                .unwrap()
        };
        let ts: i64 = header("webhook-timestamp").parse().unwrap();
        assert!(signing::verify(
            &[1u8; 32],
            "msg_t_7",
            ts,
            b"{}",
            &header("webhook-signature")
        ));
    }

    /// The main thread sleeps on the wake pipe only; every result must wake it, however the
    /// results and the draining interleave.
    #[test]
    fn every_result_wakes_the_waiter() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/", listener.local_addr().unwrap());
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
        let rt = HttpRuntime::start(config(true)).unwrap();
        let total = 3000;
        let (mut submitted, mut done) = (0, 0);
        while done < total {
            while submitted < total && submitted - done < 200 {
                rt.submit(job(url.clone()));
                submitted += 1;
            }
            let mut pfd = libc::pollfd {
                fd: rt.wake_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one valid descriptor.
            let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
            assert!(
                ready > 0,
                "results pending but the wake pipe stayed silent ({done} of {total} done)"
            );
            done += rt.take_finished().len();
        }
        assert_eq!(done, total);
    }

    #[test]
    fn redirects_are_failures_and_retry_after_is_parsed() {
        let (url, _s) = one_shot(
            "HTTP/1.1 302 Found\r\nlocation: http://127.0.0.1:1/\r\ncontent-length: 0\r\n\r\n",
        );
        let rt = HttpRuntime::start(config(true)).unwrap();
        rt.submit(job(url));
        let done = wait_one(&rt);
        assert_eq!(done.status_code(), Some(302));
        assert!(done.error.unwrap().contains("redirects are not followed"));

        let (url, _s) =
            one_shot("HTTP/1.1 503 Busy\r\nretry-after: 42\r\ncontent-length: 0\r\n\r\n");
        rt.submit(job(url));
        let done = wait_one(&rt);
        assert_eq!(
            done.outcome,
            Outcome::Status {
                code: 503,
                retry_after: Some(Duration::from_secs(42))
            }
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

    #[test]
    fn connection_refused_and_timeouts_are_classified() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let rt = HttpRuntime::start(config(true)).unwrap();
        rt.submit(job(format!("http://127.0.0.1:{port}/")));
        let done = wait_one(&rt);
        assert_eq!(done.outcome, Outcome::Transport);
        assert!(done.error.unwrap().contains("connection"));

        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut j = job(format!("http://{}/", silent.local_addr().unwrap()));
        j.timeout = Duration::from_millis(300);
        rt.submit(j);
        let done = wait_one(&rt);
        assert_eq!(done.outcome, Outcome::Timeout);
        assert!(done.duration >= Duration::from_millis(300));
        assert_eq!(done.error.as_deref(), Some("timed out after 300 ms"));
    }
}
