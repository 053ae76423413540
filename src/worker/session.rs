//! One serving session: from taking over a database's queue to shutdown, DROP EXTENSION or
//! replication. The session owns everything that lives only while it serves (the HTTP runtime,
//! what is under way, the endpoints' health, kept plans) and lets go of it when dropped.
//!
//! ```text
//! open:  recover leases of a previous worker, load health, start the HTTP runtime
//! loop { record  finished attempts                -- stage 1 (record.rs)
//!        claim   due deliveries, hand them over   -- stage 2 (claim.rs), unless paused
//!        housekeeping when due                    -- leases, retention, statistics
//!        wait    latch | results pipe | next due time }
//! ```

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgrx::prelude::*;

use super::claim::Policies;
use super::credentials::Credentials;
use super::error::{transaction, WorkerError};
use super::inflight::InFlight;
use super::ops::BACKLOG_CHECK_EVERY;
use super::queries as sql;
use super::record::load_health;
use super::route::{Router, ROUTE_LOCK_TIMEOUT};
use super::settings::Settings;
use super::{Stop, ERROR_BACKOFF, STATS_REFRESH_FLOOR};
use crate::floors::Floors;
use crate::http::{Finished, HttpRuntime};
use crate::ops::BacklogWatch;
use crate::pg::process::{override_settings, reload_if_asked, shutdown_requested, wait};
use crate::pg::shmem::{self, Slot, WorkerState};
use crate::pg::spi;
use crate::policy::{Health, StatsWatch, TokenBucket};
use crate::retry::Schedule;
use crate::split::Split;

/// How long a worker whose `webhook.workers` changed waits for its requests under way before it
/// leaves (those still running are sent again by their endpoint's new worker, same webhook-id).
const RESPLIT_GRACE: Duration = Duration::from_secs(5);
/// The longest the worker sleeps with nothing due. Commits of webhook's writers wake it at once;
/// this is for rows that arrive without that wake: a restore's COPY into the queue tables, an
/// administrator's INSERT, a logical replica's tables once it is promoted.
const IDLE_POLL: Duration = Duration::from_secs(5);
/// How often the worker writes what it keeps in memory ahead of the tables: the endpoints'
/// counters (record.rs) and the routing watermark (route.rs). Under a held snapshot each write of
/// such a single row leaves a version that every later read walks.
pub(super) const LAGGING_WRITES_EVERY: Duration = Duration::from_secs(1);
/// The shortest wait for a lagging write that is overdue (its last try failed or was busy).
const LAGGING_RETRY: Duration = Duration::from_millis(100);

pub struct Session {
    pub(super) slot: &'static Slot,
    /// This worker's share of the endpoints.
    pub(super) split: Split,
    /// Set when webhook.workers changed: claim nothing more, leave once what is under way is
    /// recorded (or at this deadline).
    leaving_by: Option<Instant>,
    pub(super) settings: Settings,
    http: Option<HttpRuntime>,
    pub(super) in_flight: InFlight,
    pub(super) health: HashMap<i32, Health>,
    pub(super) buckets: HashMap<i32, TokenBucket>,
    /// Endpoints' own retry schedules, parsed once.
    pub(super) schedules: HashMap<String, Arc<Schedule>>,
    /// Endpoints' signing keys and client certificates, checked once.
    pub(super) credentials: Credentials,
    /// Which endpoints' backlogs are past webhook.ops_backlog_threshold (ops.rs).
    pub(super) backlogs: BacklogWatch,
    next_backlog_check: Instant,
    /// Results not recorded yet (a failed batch is tried again next round).
    pub(super) unrecorded: Vec<Finished>,
    /// Deliveries whose result could not be written yet, and how often that failed.
    pub(super) record_failures: HashMap<i64, u32>,
    pub(super) stats: StatsWatch,
    /// The endpoints' policies, re-read when endpoints changed (`shmem::endpoints_version`).
    pub(super) policies: Option<Policies>,
    /// The subscription that replicates webhook's tables into this database, once seen: the
    /// session then finishes what is under way and ends.
    pub(super) replicated_by: Option<String>,
    /// Worker 0's routing state (route.rs).
    pub(super) router: Router,
    /// Where each endpoint's claim of new deliveries starts (claim.rs).
    pub(super) floors: Floors,
    /// The last routing pass failed (said once until one succeeds).
    route_failing: bool,
    next_housekeeping: Instant,
    /// When the endpoints' health was last written (record.rs).
    pub(super) health_saved_at: Instant,
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(http) = self.http.take() {
            http.shutdown();
        }
        spi::forget_all();
    }
}

impl Session {
    /// Takes over the queue: deliveries a previous worker left `sending` are due again, the
    /// endpoints' health is loaded, the HTTP runtime started.
    pub fn open(slot: &'static Slot, split: Split) -> Result<Session, WorkerError> {
        spi::forget_all();
        let (health, rows) = transaction(|| {
            sql::RECOVER.run(&[
                Vec::<i64>::new().into(),
                true.into(),
                split.parts.into(),
                split.part.into(),
            ])?;
            let rows = sql::PLANNER_ROWS.one::<f64>(&[])?.unwrap_or(0.0);
            Ok((load_health()?, rows))
        })?;
        let settings = Settings::read();
        let http = HttpRuntime::start(Settings::http()).map_err(WorkerError::Start)?;
        let mut stats = StatsWatch::new(STATS_REFRESH_FLOOR);
        stats.refreshed(rows);
        Ok(Session {
            slot,
            split,
            leaving_by: None,
            settings,
            http: Some(http),
            in_flight: InFlight::default(),
            health,
            buckets: HashMap::new(),
            schedules: HashMap::new(),
            credentials: Credentials::default(),
            backlogs: BacklogWatch::default(),
            next_backlog_check: Instant::now(),
            unrecorded: Vec::new(),
            record_failures: HashMap::new(),
            stats,
            policies: None,
            replicated_by: None,
            router: Router::default(),
            floors: Floors::default(),
            route_failing: false,
            next_housekeeping: Instant::now(),
            health_saved_at: Instant::now(),
        })
    }

    pub(super) fn http(&self) -> &HttpRuntime {
        self.http
            .as_ref()
            .expect("the runtime lives as long as the session")
    }

    /// Serves until shutdown, DROP EXTENSION, or replication of webhook's tables.
    pub fn serve(mut self) -> Stop {
        loop {
            // Read before this round looks at the queue: a wake after it means another round.
            let seen = self.slot.wakes_now();
            if shutdown_requested() {
                self.flush_on_leaving();
                return Stop::Shutdown;
            }
            if reload_if_asked() {
                self.reload();
            }
            if self.leaving_by.is_none() && super::stale(self.split) {
                self.leaving_by = Some(Instant::now() + RESPLIT_GRACE);
            }
            self.slot.set_state(WorkerState::Working);
            let mut sleep = None;
            let mut failure = self.record_stage().err();
            if let Some(deadline) = self.leaving_by {
                self.slot.set_state(WorkerState::Leaving);
                // At the deadline it leaves whatever is left: results not recorded are sent
                // again by the endpoint's new worker (at least once), and a record that keeps
                // failing must not hold up the new set of workers.
                if self.drained() || Instant::now() >= deadline {
                    self.flush_on_leaving();
                    return Stop::Resplit;
                }
                self.rest(Some(Duration::from_millis(100)), seen, false);
                continue;
            } else if self.settings.paused {
                self.slot.set_state(WorkerState::Paused);
            } else if failure.is_none() {
                if self.split.part == 0 {
                    self.route_stage();
                }
                match self.claim_and_send() {
                    Ok(next) => sleep = next,
                    Err(e) => {
                        if e.worth_saying() {
                            warning!("webhook_ext worker: claiming deliveries failed: {e}");
                        }
                        failure = Some(e);
                    }
                }
            }
            if self.replicated_by.is_some() && self.drained() {
                self.flush_on_leaving();
                return Stop::Replica(self.replicated_by.clone().unwrap_or_default());
            }
            let mut failed = failure.is_some();
            if let Some(e) = failure {
                if let WorkerError::ExtensionGone(_) = e {
                    return Stop::ExtensionGone;
                }
                // A kept plan or cached policy may be what failed: start those afresh.
                spi::forget_all();
                self.policies = None;
                sleep = Some(ERROR_BACKOFF);
            }
            if Instant::now() >= self.next_housekeeping {
                self.next_housekeeping = Instant::now() + self.settings.housekeeping_every();
                self.housekeeping();
            }
            if !failed && Instant::now() >= self.next_backlog_check {
                self.next_backlog_check = Instant::now() + BACKLOG_CHECK_EVERY;
                self.check_backlogs();
            }
            if !failed && self.health_due_in().is_some_and(|d| d.is_zero()) {
                if let Err(e) = self.flush_health() {
                    if e.worth_saying() {
                        warning!("webhook_ext worker: writing the endpoints' health failed: {e}");
                    }
                    sleep = Some(ERROR_BACKOFF);
                    failed = true;
                }
            }
            // Not during an error's backoff: the round that failed skipped the lagging writes,
            // and they would fail again (a review found the 1 s backoff cut to 100 ms, with its
            // warning each time).
            self.rest(sleep, seen, !failed);
        }
    }

    /// postgresql.conf changed: settings, schedules and HTTP settings are read again, and
    /// housekeeping runs now (the retention may have changed).
    fn reload(&mut self) {
        self.settings = Settings::read();
        self.schedules.clear();
        self.next_housekeeping = Instant::now();
        let http = self
            .http
            .as_mut()
            .expect("the runtime lives as long as the session");
        if let Err(e) = http.reconfigure(Settings::http()) {
            warning!("webhook_ext worker: keeping the previous HTTP settings: {e}");
        }
    }

    /// Publishes the gauges and waits for a result, a wake-up, `sleep` or housekeeping; not at
    /// all if the worker was woken since `seen` (the latch set may have been consumed by a wait
    /// inside the round: a lock, or an I/O on PostgreSQL 18).
    /// `lagging`: also wake for what is kept in memory ahead of the tables.
    fn rest(&mut self, sleep: Option<Duration>, seen: u64, lagging: bool) {
        // Floors due to be dropped go now; the others bound the sleep, so a delivery only the
        // rescan finds (a hand-written change) waits at most floors::RESCAN_EVERY.
        let now = Instant::now();
        self.floors.expire(now);
        let until_rescan = self.floors.expires_in(now).unwrap_or(IDLE_POLL);
        let http = self.http();
        self.slot
            .in_flight
            .store(http.in_flight() as u32, Ordering::Relaxed);
        let until_housekeeping = self
            .next_housekeeping
            .saturating_duration_since(Instant::now());
        // What is kept in memory ahead of the tables is written within a second, also when
        // the queue goes quiet (not sooner than LAGGING_RETRY after a busy try).
        let until_lagging = self
            .health_due_in()
            .into_iter()
            .chain(
                (!self.settings.paused && self.split.part == 0)
                    .then(|| self.router.write_due_in())
                    .flatten(),
            )
            .min()
            .filter(|_| lagging)
            .map_or(IDLE_POLL, |d| d.max(LAGGING_RETRY));
        let timeout = sleep
            .unwrap_or(IDLE_POLL)
            .min(IDLE_POLL)
            .min(until_housekeeping)
            .min(until_rescan)
            .min(until_lagging);
        if timeout.is_zero() || self.slot.woken_since(seen) {
            return;
        }
        if !self.settings.paused {
            self.slot.set_state(WorkerState::Idle);
        }
        wait(Some(http.wake_fd()), Some(timeout));
        self.slot
            .last_wake
            .store(shmem::now_micros(), Ordering::Relaxed);
    }

    /// The endpoints' counters kept in memory are written before the session ends (a failure
    /// is said; the counters then lag by what was not written).
    fn flush_on_leaving(&mut self) {
        if let Err(e) = self.flush_health() {
            warning!("webhook_ext worker: writing the endpoints' health on leaving failed: {e}");
        }
    }

    /// Nothing under way and every result recorded. The results that arrived since the last
    /// record stage are recorded first: a request that finished after it would otherwise be
    /// lost with the session, and sent again. (The runtime counts a request out only after its
    /// result is queued, so none can arrive after `in_flight()` says 0.)
    fn drained(&mut self) -> bool {
        if self.http().in_flight() != 0 {
            return false;
        }
        self.record_stage().is_ok() && self.unrecorded.is_empty()
    }

    /// Worker 0 makes the deliveries of the events committed since (route.rs), in a transaction
    /// of its own, and wakes the other workers if it made any. A failure is logged (once until
    /// a pass succeeds again) and the claim goes on with what is stored.
    fn route_stage(&mut self) {
        let router = &self.router;
        let result = transaction(|| {
            // A subscriber's copy of webhook's tables is the publisher's to route.
            if super::replicated_by()?.is_some() {
                return Ok(None);
            }
            override_settings(&[(c"lock_timeout", ROUTE_LOCK_TIMEOUT)]);
            let pass = router.pass()?;
            override_settings(&[(c"lock_timeout", c"0")]);
            Ok(Some(pass))
        });
        match result {
            Ok(Some((made, pass))) => {
                let made_above = pass.made_above;
                self.router.committed(pass);
                self.route_failing = false;
                if made > 0 {
                    // Every worker's floors, this one's included (read before its next claim).
                    shmem::lower_my_workers_floors(made_above);
                    if self.split.parts > 1 {
                        shmem::wake_my_worker();
                    }
                }
            }
            Ok(None) | Err(WorkerError::Busy) => {}
            Err(e) => {
                // The transaction's settings went with it (lock_timeout is 0 again).
                if !self.route_failing {
                    warning!("webhook_ext worker: routing new events failed (the stored deliveries are still sent; it is tried again at each pass): {e}");
                    self.route_failing = true;
                }
            }
        }
    }

    /// Stage 1: collects finished requests and records them.
    fn record_stage(&mut self) -> Result<(), WorkerError> {
        let finished = self.http().take_finished();
        self.unrecorded.extend(finished);
        self.record_all()
    }
}
