//! State shared between backends, the launcher and the delivery workers: one slot per delivery
//! worker (`webhook.workers` of them per served database), with the worker's latch, so a
//! committing backend can wake its database's workers directly.

use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering,
};

use pgrx::pg_sys;
use pgrx::prelude::*;

/// Most delivery workers at once, over all databases (each needs a background worker slot too).
pub const MAX_SLOTS: usize = 128;
const NAME_LEN: usize = 64;

/// What a worker is doing, for `worker_status()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum WorkerState {
    Stopped = 0,
    Starting = 1,
    WaitingForExtension = 2,
    Idle = 3,
    Working = 4,
    Stopping = 5,
    Paused = 6,
    Replica = 7,
    WaitingForUpdate = 8,
    Leaving = 9,
}

impl WorkerState {
    pub fn from_u32(v: u32) -> WorkerState {
        match v {
            1 => WorkerState::Starting,
            2 => WorkerState::WaitingForExtension,
            3 => WorkerState::Idle,
            4 => WorkerState::Working,
            5 => WorkerState::Stopping,
            6 => WorkerState::Paused,
            7 => WorkerState::Replica,
            8 => WorkerState::WaitingForUpdate,
            9 => WorkerState::Leaving,
            _ => WorkerState::Stopped,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Stopped => "stopped",
            WorkerState::Starting => "starting",
            WorkerState::WaitingForExtension => "waiting for CREATE EXTENSION",
            WorkerState::Idle => "idle",
            WorkerState::Working => "working",
            WorkerState::Stopping => "stopping",
            WorkerState::Paused => "paused",
            WorkerState::WaitingForUpdate => "waiting for ALTER EXTENSION webhook_ext UPDATE",
            WorkerState::Leaving => "leaving: webhook.workers changed",
            WorkerState::Replica => {
                "not delivering: webhook's tables arrive here by logical replication"
            }
        }
    }
}

/// One delivery worker. The launcher assigns `dboid` and `part`; the worker fills in the rest.
#[repr(C)]
pub struct Slot {
    pub dboid: AtomicU32,
    /// Which of its database's workers this is (`split::Split::part`).
    pub part: AtomicU32,
    /// How many workers the running worker splits endpoints between (0 while none runs): a
    /// worker starts serving only once no other worker of its database splits them otherwise.
    pub parts: AtomicU32,
    /// Set by a worker that left because webhook.workers changed: the launcher starts its
    /// successor at once rather than after the pause that follows a crash.
    pub resplit: AtomicBool,
    pub pid: AtomicI32,
    pub latch: AtomicPtr<pg_sys::Latch>,
    pub state: AtomicU32,
    pub started_at: AtomicI64,
    pub last_wake: AtomicI64,
    /// How often the worker was woken (counted before its latch is set). A latch set can be
    /// consumed by code that waits on the latch for something else (a lock wait; on PostgreSQL
    /// 18 a buffer read handed to an I/O worker), so the worker looks at this before it sleeps
    /// and does not sleep when it moved since it last looked at its work (`woken_since`).
    pub wakes: AtomicU64,
    /// New deliveries may have appeared above this id since the worker last looked
    /// (`floors::Floors`): its floors come down to it before the next claim (0: dropped;
    /// `i64::MAX`: nothing asked).
    pub floor_bound: AtomicI64,
    pub in_flight: AtomicU32,
    pub attempts: AtomicU64,
    pub delivered: AtomicU64,
    pub failed: AtomicU64,
    /// Set (until this timestamp) while DROP DATABASE or similar needs the worker gone.
    pub evict_until: AtomicI64,
    name_len: AtomicU32,
    name: [AtomicU32; NAME_LEN / 4],
}

impl Slot {
    pub fn set_name(&self, name: &str) {
        let bytes = name.as_bytes();
        let n = bytes.len().min(NAME_LEN);
        for (i, cell) in self.name.iter().enumerate() {
            let mut word = [0u8; 4];
            for (j, b) in word.iter_mut().enumerate() {
                *b = *bytes.get(i * 4 + j).filter(|_| i * 4 + j < n).unwrap_or(&0);
            }
            cell.store(u32::from_ne_bytes(word), Ordering::Relaxed);
        }
        self.name_len.store(n as u32, Ordering::Release);
    }

    pub fn name(&self) -> String {
        let n = self.name_len.load(Ordering::Acquire) as usize;
        let bytes: Vec<u8> = self
            .name
            .iter()
            .flat_map(|c| c.load(Ordering::Relaxed).to_ne_bytes())
            .take(n)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    pub fn state(&self) -> WorkerState {
        WorkerState::from_u32(self.state.load(Ordering::Acquire))
    }

    pub fn set_state(&self, s: WorkerState) {
        self.state.store(s as u32, Ordering::Release);
    }

    /// The wake count, to pass to `woken_since` before sleeping.
    pub fn wakes_now(&self) -> u64 {
        self.wakes.load(Ordering::Acquire)
    }

    /// Whether the worker was woken since `seen` (from `wakes_now`, read before the worker last
    /// looked at its work): then it must look again rather than sleep.
    pub fn woken_since(&self, seen: u64) -> bool {
        self.wakes.load(Ordering::Acquire) != seen
    }

    /// Wakes the worker serving this slot, if any.
    pub fn wake(&self) {
        self.wakes.fetch_add(1, Ordering::AcqRel);
        let latch = self.latch.load(Ordering::Acquire);
        if !latch.is_null() {
            // SAFETY: the latch is a PGPROC's procLatch in shared memory, valid for the cluster's life;
            // waking a process that has since left is harmless.
            unsafe { pg_sys::SetLatch(latch) };
        }
    }

    /// New deliveries may have appeared above `bound`: the worker's floors come down to it.
    pub fn lower_floors_to(&self, bound: i64) {
        self.floor_bound.fetch_min(bound, Ordering::AcqRel);
    }

    /// The lowest bound asked for since the last call (`i64::MAX`: none).
    pub fn take_floor_bound(&self) -> i64 {
        self.floor_bound.swap(i64::MAX, Ordering::AcqRel)
    }

    /// Prepares a free slot for a new database: counters start from zero.
    pub fn reset(&self, name: &str) {
        self.floor_bound.store(0, Ordering::Release);
        self.evict_until.store(0, Ordering::Release);
        self.resplit.store(false, Ordering::Release);
        self.started_at.store(0, Ordering::Relaxed);
        self.last_wake.store(0, Ordering::Relaxed);
        self.attempts.store(0, Ordering::Relaxed);
        self.delivered.store(0, Ordering::Relaxed);
        self.failed.store(0, Ordering::Relaxed);
        self.set_name(name);
    }

    /// Frees the slot's worker-owned fields when worker `pid` exits (only if the slot is still
    /// its own: a slot freed and taken again meanwhile belongs to another worker).
    pub fn clear_worker(&self, pid: i32) {
        if self
            .pid
            .compare_exchange(pid, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return;
        }
        self.latch.store(std::ptr::null_mut(), Ordering::Release);
        self.parts.store(0, Ordering::Release);
        self.in_flight.store(0, Ordering::Relaxed);
        self.set_state(WorkerState::Stopped);
    }
}

#[repr(C)]
pub struct Shared {
    /// Bumped whenever a transaction that changed webhook.endpoints commits (any database):
    /// sessions refresh their endpoint cache when it moves.
    pub endpoints_version: AtomicU64,
    /// `webhook.workers` as the launcher last read it (0 before its first round): the one value
    /// every worker splits endpoints by, so that no worker acts on a setting it alone missed.
    pub workers: AtomicU32,
    pub launcher_latch: AtomicPtr<pg_sys::Latch>,
    pub launcher_pid: AtomicI32,
    pub slots: [Slot; MAX_SLOTS],
}

impl Shared {
    /// The number of workers per database every worker splits endpoints by (at least 1).
    pub fn workers(&self) -> i32 {
        self.workers.load(Ordering::Acquire).max(1) as i32
    }

    /// The slots of the workers serving `dboid`.
    pub fn slots_of_db(&self, dboid: pg_sys::Oid) -> impl Iterator<Item = &Slot> {
        let want = u32::from(dboid);
        self.slots
            .iter()
            .filter(move |s| want != 0 && s.dboid.load(Ordering::Acquire) == want)
    }

    pub fn wake_launcher(&self) {
        let latch = self.launcher_latch.load(Ordering::Acquire);
        if !latch.is_null() {
            // SAFETY: as for Slot::wake.
            unsafe { pg_sys::SetLatch(latch) };
        }
    }
}

static mut SHARED: *mut Shared = std::ptr::null_mut();

/// The shared state; `None` only if the library was not preloaded (which `_PG_init` refuses).
pub fn shared() -> Option<&'static Shared> {
    // SAFETY: SHARED is written once per process in the shmem startup hook, before any reader runs.
    unsafe { SHARED.as_ref() }
}

static mut PREV_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;
#[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17", feature = "pg18"))]
static mut PREV_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;

/// Requests the shared memory and installs the hooks that set it up; called from `_PG_init`.
pub fn init() {
    // SAFETY: _PG_init runs once in the postmaster, before any other process exists.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17", feature = "pg18"))]
        {
            PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(shmem_request);
        }
        #[cfg(any(feature = "pg13", feature = "pg14"))]
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Shared>());

        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(shmem_startup);
        pg_sys::RegisterXactCallback(Some(xact_callback), std::ptr::null_mut());
    }
}

#[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17", feature = "pg18"))]
#[pg_guard]
unsafe extern "C-unwind" fn shmem_request() {
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            prev();
        }
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<Shared>());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn shmem_startup() {
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        // AddinShmemInitLock is MainLWLockArray[21] (ADDIN_SHMEM_INIT_LOCK) on every supported version.
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let ptr = pg_sys::ShmemInitStruct(
            c"webhook_ext shared state".as_ptr(),
            std::mem::size_of::<Shared>(),
            &mut found,
        );
        if !found {
            // All-zero bytes are a valid Shared: null latches, free slots, stopped workers.
            std::ptr::write_bytes(ptr.cast::<u8>(), 0, std::mem::size_of::<Shared>());
        }
        SHARED = ptr.cast();
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Set when this backend's transaction enqueued something; checked at commit.
static WAKE_AT_COMMIT: AtomicBool = AtomicBool::new(false);
/// Set when this backend's transaction created or renamed a database.
static WAKE_LAUNCHER_AT_COMMIT: AtomicBool = AtomicBool::new(false);

/// The database whose worker this backend's transaction asked to leave (0: none). If the
/// transaction fails, the worker may come back at once.
static EVICTED_DB: AtomicU32 = AtomicU32::new(0);

/// Remembers that this transaction evicted the worker of `dboid`.
pub fn evicted_in_this_transaction(dboid: pg_sys::Oid) {
    EVICTED_DB.store(u32::from(dboid), Ordering::Relaxed);
}

/// Set when this backend's transaction changed webhook.endpoints.
static ENDPOINTS_CHANGED_AT_COMMIT: AtomicBool = AtomicBool::new(false);

pub fn endpoints_changed_at_commit() {
    ENDPOINTS_CHANGED_AT_COMMIT.store(true, Ordering::Relaxed);
}

/// The current endpoints version (0 without shared memory, which `_PG_init` prevents).
pub fn endpoints_version() -> u64 {
    shared().map_or(0, |s| s.endpoints_version.load(Ordering::Acquire))
}

/// Asks for the launcher to be woken when the current transaction commits.
pub fn wake_launcher_at_commit() {
    WAKE_LAUNCHER_AT_COMMIT.store(true, Ordering::Relaxed);
}

/// Asks for this database's worker to be woken when the current transaction commits.
pub fn wake_at_commit() {
    WAKE_AT_COMMIT.store(true, Ordering::Relaxed);
}

/// Set when this backend's transaction made or reset pending work outside routing (the SQL API's
/// send(), retry(), replay(), enable_endpoint()): at commit the workers drop their floors.
static RESCAN_AT_COMMIT: AtomicBool = AtomicBool::new(false);

/// Set in the delivery worker's process: it keeps its floors itself (a routing pass lowers them
/// by the watermark), and must not wake itself or drop them at each commit of its own.
static IN_DELIVERY_WORKER: AtomicBool = AtomicBool::new(false);

/// Marks this process as a delivery worker (`IN_DELIVERY_WORKER`).
pub fn in_delivery_worker() {
    IN_DELIVERY_WORKER.store(true, Ordering::Relaxed);
}

/// Asks for this database's workers to read new deliveries from the start (`floors::Floors`)
/// and to be woken, when the current transaction commits (nothing in a delivery worker).
pub fn rescan_at_commit() {
    if IN_DELIVERY_WORKER.load(Ordering::Relaxed) {
        return;
    }
    RESCAN_AT_COMMIT.store(true, Ordering::Relaxed);
    wake_at_commit();
}

/// New deliveries may have appeared above `bound` (0: anywhere): every worker of this
/// database lowers its floors to it before its next claim.
pub fn lower_my_workers_floors(bound: i64) {
    // SAFETY: MyDatabaseId is a plain process-global read on the main thread.
    let db = unsafe { pg_sys::MyDatabaseId };
    if let Some(s) = shared() {
        s.slots_of_db(db)
            .for_each(|slot| slot.lower_floors_to(bound));
    }
}

/// Wakes this database's workers now.
pub fn wake_my_worker() {
    // SAFETY: MyDatabaseId is a plain process-global read on the main thread.
    let db = unsafe { pg_sys::MyDatabaseId };
    if let Some(s) = shared() {
        s.slots_of_db(db).for_each(Slot::wake);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn xact_callback(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_COMMIT => {
            EVICTED_DB.store(0, Ordering::Relaxed);
            // Before the wake: a worker woken looks at its floors first.
            if RESCAN_AT_COMMIT.swap(false, Ordering::Relaxed) {
                lower_my_workers_floors(0);
            }
            if WAKE_AT_COMMIT.swap(false, Ordering::Relaxed) {
                wake_my_worker();
            }
            if ENDPOINTS_CHANGED_AT_COMMIT.swap(false, Ordering::Relaxed) {
                if let Some(s) = shared() {
                    s.endpoints_version.fetch_add(1, Ordering::AcqRel);
                }
            }
            if WAKE_LAUNCHER_AT_COMMIT.swap(false, Ordering::Relaxed) {
                if let Some(s) = shared() {
                    s.wake_launcher();
                }
            }
        }
        pg_sys::XactEvent::XACT_EVENT_ABORT | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT => {
            let evicted = EVICTED_DB.swap(0, Ordering::Relaxed);
            if evicted != 0 {
                if let Some(s) = shared() {
                    for slot in s.slots_of_db(pg_sys::Oid::from(evicted)) {
                        slot.evict_until.store(0, Ordering::Release);
                    }
                    s.wake_launcher();
                }
            }
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
            RESCAN_AT_COMMIT.store(false, Ordering::Relaxed);
            WAKE_LAUNCHER_AT_COMMIT.store(false, Ordering::Relaxed);
            ENDPOINTS_CHANGED_AT_COMMIT.store(false, Ordering::Relaxed);
        }
        pg_sys::XactEvent::XACT_EVENT_PREPARE => {
            EVICTED_DB.store(0, Ordering::Relaxed);
            WAKE_AT_COMMIT.store(false, Ordering::Relaxed);
            RESCAN_AT_COMMIT.store(false, Ordering::Relaxed);
            WAKE_LAUNCHER_AT_COMMIT.store(false, Ordering::Relaxed);
            ENDPOINTS_CHANGED_AT_COMMIT.store(false, Ordering::Relaxed);
        }
        _ => {}
    }
}

/// Microseconds since the Unix epoch, for the timestamps kept in shared memory.
pub fn now_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
