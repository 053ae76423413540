//! A real HTTP/1.1 receiver on 127.0.0.1 whose answers a test scripts: status, headers, body,
//! delay, or a misbehaviour. It records every request, what it answered and when the answer went
//! out ([`Receiver::exchanges`]), and the most it ever handled at once.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Request {
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub at: Instant,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("body is JSON")
    }
    pub fn webhook_id(&self) -> String {
        self.header("webhook-id")
            .expect("webhook-id header")
            .to_string()
    }
}

#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Wait this long before answering.
    pub delay: Duration,
    /// Close the connection without answering.
    pub hang_up: bool,
    /// Announce and send this many body bytes (`x`) instead of `body`, for as long as the
    /// client keeps reading.
    pub stream: Option<u64>,
}

impl Reply {
    pub fn status(status: u16) -> Reply {
        Reply {
            status,
            headers: vec![],
            body: b"ok".to_vec(),
            delay: Duration::ZERO,
            hang_up: false,
            stream: None,
        }
    }
    pub fn ok() -> Reply {
        Reply::status(200)
    }
    pub fn after(mut self, delay: Duration) -> Reply {
        self.delay = delay;
        self
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Reply {
        self.body = body.into();
        self
    }
    pub fn streaming(mut self, bytes: u64) -> Reply {
        self.stream = Some(bytes);
        self
    }
}

/// One request as the receiver handled it: what came in, what went out, and when.
#[derive(Debug, Clone)]
pub struct Exchange {
    pub request: Request,
    /// The status answered; `None` when the connection was closed without an answer.
    pub status: Option<u16>,
    /// When the answer started to go out (or the connection was dropped): the client cannot
    /// have had it earlier. `None` while still busy.
    pub done: Option<Instant>,
}

impl Exchange {
    /// When the request had arrived (read in full).
    pub fn at(&self) -> Instant {
        self.request.at
    }
}

/// The most exchanges open (arrived, not yet answered) at one instant; an exchange still
/// busy counts as open to the end.
pub fn most_at_once(exchanges: &[Exchange]) -> usize {
    let mut edges: Vec<(Instant, i32)> = Vec::new();
    for e in exchanges {
        edges.push((e.at(), 1));
        if let Some(d) = e.done {
            edges.push((d, -1));
        }
    }
    // At the same instant an end comes before a start: touching spans do not overlap.
    edges.sort_by_key(|&(t, d)| (t, d));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    most as usize
}

/// Decides the reply to the `n`th request (0-based, counted over the receiver's life).
pub type Behavior = Arc<dyn Fn(&Request, usize) -> Reply + Send + Sync>;

pub fn always(reply: Reply) -> Behavior {
    Arc::new(move |_, _| reply.clone())
}

struct State {
    requests: Mutex<Vec<Request>>,
    /// Per request, in the order of `requests`: the status answered and when it was done.
    answers: Mutex<Vec<(Option<u16>, Option<Instant>)>>,
    arrived: Condvar,
    active: AtomicUsize,
    max_active: AtomicUsize,
    count: AtomicUsize,
    stop: AtomicBool,
    streamed: std::sync::atomic::AtomicU64,
}

pub struct Receiver {
    pub addr: SocketAddr,
    state: Arc<State>,
}

impl Receiver {
    pub fn start(behavior: Behavior) -> Receiver {
        Receiver::start_on(TcpListener::bind("127.0.0.1:0").unwrap(), behavior)
    }

    /// Starts listening on a port held since `Down::new()` (a receiver that was down comes up
    /// where it was; no other process can have taken the port meanwhile).
    pub fn start_at(down: Down, behavior: Behavior) -> Receiver {
        down.0.listen(128).unwrap();
        Receiver::start_on(down.0.into(), behavior)
    }

    fn start_on(listener: TcpListener, behavior: Behavior) -> Receiver {
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            requests: Mutex::new(Vec::new()),
            answers: Mutex::new(Vec::new()),
            arrived: Condvar::new(),
            active: AtomicUsize::new(0),
            max_active: AtomicUsize::new(0),
            count: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            streamed: std::sync::atomic::AtomicU64::new(0),
        });
        let s = state.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                let b = behavior.clone();
                std::thread::spawn(move || serve(conn, s, b));
            }
        });
        Receiver { addr, state }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.state.requests.lock().unwrap().clone()
    }

    /// Every request with its answer and when that was done, in arrival order.
    pub fn exchanges(&self) -> Vec<Exchange> {
        let reqs = self.state.requests.lock().unwrap();
        let answers = self.state.answers.lock().unwrap();
        reqs.iter()
            .zip(answers.iter())
            .map(|(r, &(status, done))| Exchange {
                request: r.clone(),
                status,
                done,
            })
            .collect()
    }

    pub fn count(&self) -> usize {
        self.state.requests.lock().unwrap().len()
    }

    /// Waits until at least `n` requests have arrived; returns them all.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<Request> {
        let deadline = Instant::now() + timeout;
        let mut reqs = self.state.requests.lock().unwrap();
        while reqs.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "receiver got {} of {n} requests within {timeout:?}",
                reqs.len()
            );
            reqs = self.state.arrived.wait_timeout(reqs, left).unwrap().0;
        }
        reqs.clone()
    }

    /// The most requests this receiver ever had open at the same time.
    pub fn max_concurrent(&self) -> usize {
        self.state.max_active.load(Ordering::SeqCst)
    }

    /// Body bytes written by streaming replies (as far as the client took them).
    pub fn streamed(&self) -> u64 {
        self.state.streamed.load(Ordering::SeqCst)
    }

    /// Stops accepting; connections already open are closed when their handlers return.
    pub fn stop(&self) {
        self.state.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop();
    }
}

fn serve(conn: TcpStream, state: Arc<State>, behavior: Behavior) {
    let _ = conn.set_nodelay(true);
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut reader = BufReader::new(conn);
    loop {
        if state.stop.load(Ordering::SeqCst) {
            return;
        }
        let Some(req) = read_request(&mut reader) else {
            return;
        };
        let now_active = state.active.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_active.fetch_max(now_active, Ordering::SeqCst);
        let n = state.count.fetch_add(1, Ordering::SeqCst);
        let reply = behavior(&req, n);
        let index = {
            let mut reqs = state.requests.lock().unwrap();
            let status = (!reply.hang_up).then_some(reply.status);
            state.answers.lock().unwrap().push((status, None));
            reqs.push(req);
            state.arrived.notify_all();
            reqs.len() - 1
        };

        if !reply.delay.is_zero() {
            std::thread::sleep(reply.delay);
        }
        // Not counted as open any more from here: the client may send its next request as soon
        // as it has read this answer.
        state.answers.lock().unwrap()[index].1 = Some(Instant::now());
        state.active.fetch_sub(1, Ordering::SeqCst);
        if reply.hang_up {
            return;
        }
        let length = reply.stream.unwrap_or(reply.body.len() as u64);
        let mut head = format!(
            "HTTP/1.1 {} X\r\ncontent-length: {length}\r\n",
            reply.status
        );
        for (k, v) in &reply.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        let ok = match reply.stream {
            None => writer
                .write_all(head.as_bytes())
                .and_then(|_| writer.write_all(&reply.body))
                .is_ok(),
            Some(total) => {
                let chunk = vec![b'x'; 64 * 1024];
                let mut sent = 0u64;
                let mut ok = writer.write_all(head.as_bytes()).is_ok();
                // Counted as it goes, so a reader never sees less than what was written.
                while ok && sent < total {
                    let n = chunk.len().min((total - sent) as usize);
                    ok = writer.write_all(&chunk[..n]).is_ok();
                    sent += n as u64;
                    state.streamed.fetch_add(n as u64, Ordering::SeqCst);
                }
                ok
            }
        };
        if !ok {
            return;
        }
    }
}

fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let path = line.split_whitespace().nth(1)?.to_string();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (k, v) = h.split_once(':')?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        path,
        headers,
        body,
        at: Instant::now(),
    })
}

/// A receiver that is down: a loopback port bound but not listening, so connections to it are
/// refused, and held, so nothing else can take it before `Receiver::start_at` brings it up.
pub struct Down(socket2::Socket);

impl Down {
    pub fn new() -> Down {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&std::net::SocketAddr::from(([127, 0, 0, 1], 0)).into())
            .unwrap();
        Down(s)
    }

    pub fn port(&self) -> u16 {
        self.0
            .local_addr()
            .unwrap()
            .as_socket()
            .expect("an IP socket")
            .port()
    }
}
