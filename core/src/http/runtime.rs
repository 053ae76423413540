//! [`HttpRuntime`]: the tokio runtime on its own threads, the queue of finished attempts and the
//! wake pipe the worker's main thread waits on.
//!
//! Every thread of the runtime has every signal blocked, so Postgres's signal handlers only
//! ever run on the main thread. `start` gets this by blocking them on the calling thread while
//! tokio spawns its threads (a new thread inherits its creator's mask), then restoring the
//! caller's mask. Threads tokio spawns later (`spawn_blocking`, a replacement worker after
//! `block_in_place`) are spawned by runtime threads, so they inherit the blocked mask too;
//! nothing here spawns a thread from the caller's thread after `start`.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::client::build_client;
use super::exchange::attempt;
use super::oauth::TokenCache;
use super::resolver::GuardedResolver;
use super::{Finished, HttpConfig, Job, ProxyChoice, ProxyUrl};

/// Most clients kept for client certificates and proxies; past it they are all dropped and
/// built again as needed (requests under way keep theirs).
const MAX_OTHER_CLIENTS: usize = 1024;

/// What a client is built with beyond the configuration: a client certificate (its digest), a
/// forward proxy (its URL), and whether that proxy is webhook.proxy (exempt from the guard).
type ClientKey = (Option<[u8; 32]>, Option<Arc<ProxyUrl>>, bool);

pub struct HttpRuntime {
    runtime: tokio::runtime::Runtime,
    /// The client of requests without a client certificate that go through webhook.proxy (or
    /// directly, without it); None when webhook.proxy is unusable.
    client: Option<reqwest::Client>,
    /// One client per other certificate and proxy in use (each has its own TLS configuration,
    /// proxy and connection pool).
    other_clients: Mutex<HashMap<ClientKey, reqwest::Client>>,
    /// Checks a proxied request's target (the proxy resolves it; this refuses it first).
    guard: Arc<GuardedResolver>,
    /// OAuth2 bearer tokens in use (kept across reconfigurations).
    tokens: Arc<TokenCache>,
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
    /// Starts the runtime threads and the HTTP client.
    ///
    /// The runtime's threads start with every signal blocked, so Postgres's handlers run only
    /// on the main thread: callers need not mask signals themselves. The calling thread's own
    /// mask is blocked only while the threads are spawned, and is restored afterwards, also
    /// when building the runtime fails or panics.
    pub fn start(config: HttpConfig) -> Result<HttpRuntime, String> {
        let runtime = {
            let _blocked = AllSignalsBlocked::new()
                .map_err(|e| format!("could not block signals for the HTTP runtime: {e}"))?;
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(config.threads.max(1))
                .max_blocking_threads(8)
                .thread_name("webhook-http")
                .enable_all()
                .build()
                .map_err(|e| format!("could not start the HTTP runtime: {e}"))?
        };
        let (wake_read, wake_write) =
            nonblocking_pipe().map_err(|e| format!("could not create the wake pipe: {e}"))?;
        let client = default_client(&config)?;
        let guard = Arc::new(GuardedResolver::new(
            config.policy.clone(),
            &config.dns_servers,
        ));
        Ok(HttpRuntime {
            runtime,
            client,
            other_clients: Mutex::new(HashMap::new()),
            guard,
            tokens: Arc::new(TokenCache::default()),
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
        self.client = default_client(&config)?;
        self.guard = Arc::new(GuardedResolver::new(
            config.policy.clone(),
            &config.dns_servers,
        ));
        self.other_clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
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
        let (client, proxied, own_proxy) = match self.client_for(&job) {
            Ok(found) => found,
            Err(why) => {
                return self.push_finished(Finished {
                    delivery_id: job.delivery_id,
                    endpoint_id: job.endpoint_id,
                    attempt: job.attempt,
                    started_at: std::time::SystemTime::now(),
                    duration: std::time::Duration::ZERO,
                    outcome: crate::retry::Outcome::Refused,
                    response_body: None,
                    error: Some(why),
                })
            }
        };
        let config = self.config.clone();
        let shared = self.shared.clone();
        let guard = proxied.then(|| self.guard.clone());
        let tokens = self.tokens.clone();
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        self.runtime.spawn(async move {
            let done = attempt(
                &client,
                &config,
                guard.as_deref(),
                own_proxy.as_deref(),
                &tokens,
                job,
            )
            .await;
            shared
                .finished
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(done);
            shared.in_flight.fetch_sub(1, Ordering::AcqRel);
            shared.signal();
        });
    }

    /// The client for a job (the shared one, or the one built for its client certificate and
    /// proxy), whether it goes through a proxy, and the endpoint's own proxy if it has one; or
    /// why it cannot be sent.
    fn client_for(
        &self,
        job: &Job,
    ) -> Result<(reqwest::Client, bool, Option<Arc<ProxyUrl>>), String> {
        let (proxy, trusted) = match &job.proxy {
            ProxyChoice::Default => match &self.config.proxy {
                Ok(p) => (p.clone(), true),
                Err(e) => return Err(format!("webhook.proxy is not usable: {e}")),
            },
            ProxyChoice::Direct => (None, false),
            ProxyChoice::Via(p) => (Some(p.clone()), false),
        };
        let proxied = proxy.is_some();
        // Without a proxy there is nothing to trust: one key (one client) for both ways of
        // having none.
        let trusted = trusted && proxied;
        let own = proxy.clone().filter(|_| !trusted);
        let default = matches!(job.proxy, ProxyChoice::Default) && job.identity.is_none();
        if default {
            if let Some(client) = &self.client {
                return Ok((client.clone(), proxied, own));
            }
        }
        let key: ClientKey = (job.identity.as_ref().map(|i| i.fingerprint), proxy, trusted);
        let mut clients = self.other_clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(client) = clients.get(&key) {
            return Ok((client.clone(), proxied, own));
        }
        let client = build_client(
            &self.config,
            job.identity.as_deref(),
            key.1.as_deref(),
            trusted,
        )?;
        if clients.len() >= MAX_OTHER_CLIENTS {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok((client, proxied, own))
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

/// The shared client: no client certificate, webhook.proxy if set; None when it is unusable (its
/// requests then fail with the reason, `client_for`).
fn default_client(config: &HttpConfig) -> Result<Option<reqwest::Client>, String> {
    match &config.proxy {
        Ok(proxy) => build_client(config, None, proxy.as_deref(), true).map(Some),
        Err(_) => Ok(None),
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

/// Every signal blocked on the current thread for as long as this lives; dropping it (also
/// while unwinding from a panic) puts back the mask the thread had before.
struct AllSignalsBlocked {
    old: libc::sigset_t,
}

impl AllSignalsBlocked {
    fn new() -> std::io::Result<AllSignalsBlocked> {
        // SAFETY: plain libc calls on locally owned signal sets; `old` is filled by the call.
        unsafe {
            let mut all: libc::sigset_t = std::mem::zeroed();
            let mut old: libc::sigset_t = std::mem::zeroed();
            libc::sigfillset(&mut all);
            // pthread_sigmask returns the error number instead of setting errno.
            match libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut old) {
                0 => Ok(AllSignalsBlocked { old }),
                err => Err(std::io::Error::from_raw_os_error(err)),
            }
        }
    }
}

impl Drop for AllSignalsBlocked {
    fn drop(&mut self) {
        // SAFETY: restores a mask pthread_sigmask itself filled in.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &self.old, std::ptr::null_mut()) };
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::testutil::{config, job, ok_server};
    use std::collections::HashSet;
    use std::time::{Duration, Instant};

    /// The main thread sleeps on the wake pipe only; every result must wake it, however the
    /// results and the draining interleave.
    #[test]
    fn every_result_wakes_the_waiter() {
        let url = format!("http://{}/", ok_server());
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

    /// The signals blocked on the calling thread (Linux numbers them 1 to 64).
    fn current_mask() -> Vec<i32> {
        // SAFETY: queries the thread's mask into a locally owned set.
        unsafe {
            let mut cur: libc::sigset_t = std::mem::zeroed();
            libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut cur);
            (1..=64)
                .filter(|&s| libc::sigismember(&cur, s) == 1)
                .collect()
        }
    }

    /// Sets the calling thread's mask to exactly `signals`.
    fn set_mask(signals: &[i32]) {
        // SAFETY: plain libc calls on a locally owned signal set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for &s in signals {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
        }
    }

    /// What "every signal blocked" looks like on this system (SIGKILL and SIGSTOP cannot be,
    /// and the C library keeps a few for itself), measured on a thread of its own.
    fn everything_blockable() -> Vec<i32> {
        std::thread::spawn(|| {
            // SAFETY: plain libc calls on a locally owned signal set.
            unsafe {
                let mut all: libc::sigset_t = std::mem::zeroed();
                libc::sigfillset(&mut all);
                libc::pthread_sigmask(libc::SIG_SETMASK, &all, std::ptr::null_mut());
            }
            current_mask()
        })
        .join()
        .unwrap()
    }

    /// Runs a probe on each of the runtime's `workers` worker threads: every probe holds its
    /// worker until all of them have started, so no worker runs two.
    fn probe_workers(rt: &HttpRuntime, workers: usize) -> Vec<(std::thread::ThreadId, Vec<i32>)> {
        let arrived = Arc::new(AtomicUsize::new(0));
        let probes: Vec<_> = (0..workers)
            .map(|_| {
                let arrived = arrived.clone();
                rt.runtime.spawn(async move {
                    let probe = (std::thread::current().id(), current_mask());
                    arrived.fetch_add(1, Ordering::SeqCst);
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while arrived.load(Ordering::SeqCst) < workers && Instant::now() < deadline {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    probe
                })
            })
            .collect();
        let probes: Vec<_> = probes
            .into_iter()
            .map(|p| rt.runtime.block_on(p).unwrap())
            .collect();
        let threads: HashSet<_> = probes.iter().map(|(id, _)| *id).collect();
        assert_eq!(
            threads.len(),
            workers,
            "the probes did not reach every worker"
        );
        probes
    }

    /// The masks of this process's threads named `webhook-http`, this runtime's and those of
    /// tests running alongside (all built by `start`), read from /proc.
    fn masks_in_proc() -> Vec<Vec<i32>> {
        let mut masks = Vec::new();
        for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
            // A thread may end while we look; skip it.
            let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
                continue;
            };
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .map(str::trim)
            };
            if field("Name:") != Some("webhook-http") {
                continue;
            }
            let bits = u64::from_str_radix(field("SigBlk:").unwrap(), 16).unwrap();
            masks.push((1..=64).filter(|s| bits & (1 << (s - 1)) != 0).collect());
        }
        masks
    }

    /// Every thread of the runtime starts with every signal blocked, whoever spawns it (`start`,
    /// or a runtime thread later: `spawn_blocking`, a replacement worker after
    /// `block_in_place`); the thread that called `start` keeps its own mask.
    #[test]
    fn runtime_threads_block_every_signal_and_the_caller_keeps_its_mask() {
        let full = everything_blockable();
        assert!(full.contains(&libc::SIGINT) && full.contains(&libc::SIGUSR1));
        std::thread::spawn(move || {
            // A caller with a mask of its own, as Postgres's main thread may have.
            set_mask(&[libc::SIGUSR2]);
            let workers = 3;
            let mut cfg = config(true);
            cfg.threads = workers;
            let mut rt = HttpRuntime::start(cfg.clone()).unwrap();
            assert_eq!(
                current_mask(),
                vec![libc::SIGUSR2],
                "start changed the caller's mask"
            );
            for (_, mask) in probe_workers(&rt, workers) {
                assert_eq!(mask, full, "a worker thread can take signals");
            }
            // Threads spawned later come from runtime threads, and inherit their mask.
            let blocking = rt
                .runtime
                .block_on(
                    rt.runtime
                        .spawn(async { tokio::task::spawn_blocking(current_mask).await.unwrap() }),
                )
                .unwrap();
            assert_eq!(blocking, full, "a blocking thread can take signals");
            rt.runtime
                .block_on(rt.runtime.spawn(async {
                    tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(50)))
                }))
                .unwrap();
            rt.reconfigure(cfg).unwrap();
            for (_, mask) in probe_workers(&rt, workers) {
                assert_eq!(mask, full, "a worker thread can take signals");
            }
            let named = masks_in_proc();
            assert!(
                named.len() > workers,
                "found {} runtime threads: the workers and the blocking thread",
                named.len()
            );
            for mask in named {
                assert_eq!(mask, full, "a runtime thread can take signals");
            }
            assert_eq!(current_mask(), vec![libc::SIGUSR2]);
            rt.shutdown();
        })
        .join()
        .unwrap();
    }

    /// The guard `start` blocks signals under puts the caller's mask back even on a panic.
    #[test]
    fn the_callers_mask_comes_back_after_a_panic() {
        let full = everything_blockable();
        std::thread::spawn(move || {
            set_mask(&[libc::SIGUSR2]);
            let unwound = std::panic::catch_unwind(|| {
                let _blocked = AllSignalsBlocked::new().unwrap();
                assert_eq!(current_mask(), full);
                panic!("while every signal is blocked");
            });
            assert!(unwound.is_err());
            assert_eq!(current_mask(), vec![libc::SIGUSR2]);
        })
        .join()
        .unwrap();
    }
}
