//! A throwaway PostgreSQL cluster with webhook_ext preloaded, run as the `postgres` OS user
//! (Postgres refuses root), on 127.0.0.1 and a private socket directory.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where Debian's PostgreSQL 15 keeps its programs: used only when there is no `pg_config`.
const FALLBACK_BIN: &str = "/usr/lib/postgresql/15/bin";
/// Debian's PostgreSQL 15 share directory: used only when there is no `pg_config`.
const FALLBACK_SHARE: &str = "/usr/share/postgresql/15";

/// `pg_config <flag>` (e.g. `--bindir`) of the PostgreSQL the tests run against: the `pg_config`
/// named by `PG_CONFIG` if that is set, else the one on PATH. `None` only when `PG_CONFIG` is unset
/// and there is no `pg_config` on PATH; a `pg_config` that exists but fails is an error.
fn pg_config(flag: &str) -> Option<PathBuf> {
    let (program, named) = match std::env::var_os("PG_CONFIG").filter(|v| !v.is_empty()) {
        Some(p) => (PathBuf::from(p), true),
        None => (PathBuf::from("pg_config"), false),
    };
    let out = match Command::new(&program).arg(flag).output() {
        Ok(out) => out,
        Err(e) if !named && e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => panic!("running {} {flag}: {e}", program.display()),
    };
    assert!(
        out.status.success(),
        "{} {flag} failed: {}",
        program.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The directory of the PostgreSQL programs (initdb, pg_ctl, psql, pg_dump, …): `pg_config
/// --bindir` (see [`pg_config`]), or /usr/lib/postgresql/15/bin when there is no `pg_config`.
/// Asked once per process.
pub fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| pg_config("--bindir").unwrap_or_else(|| PathBuf::from(FALLBACK_BIN)))
}

/// The path of a PostgreSQL program in [`bin_dir`].
pub fn pg_bin(program: &str) -> PathBuf {
    bin_dir().join(program)
}

/// Where the installed extensions' control and script files are: `pg_config --sharedir` +
/// `/extension`. Asked once per process.
pub fn extension_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        pg_config("--sharedir")
            .unwrap_or_else(|| PathBuf::from(FALLBACK_SHARE))
            .join("extension")
    })
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A new, empty directory for a cluster, owned by the user Postgres runs as.
fn new_cluster_dir() -> PathBuf {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let dir = PathBuf::from(format!("/tmp/webhook_ext_test_{}_{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    if is_root() {
        check(
            Command::new("chown")
                .args(["postgres:postgres", dir.to_str().unwrap()])
                .output()
                .unwrap(),
            "chown",
        );
    }
    dir
}

pub struct Cluster {
    pub dir: PathBuf,
    pub port: u16,
    stopped: bool,
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc_geteuid() == 0 }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

/// Runs a Postgres binary as the `postgres` user when we are root.
pub fn pg_command(program: &str) -> Command {
    let path = pg_bin(program);
    let mut c = if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(&path);
        c
    } else {
        Command::new(path)
    };
    // The server runs as it would in production, without the test runner's backtrace settings.
    c.env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    if let Some(dir) = private_libdir() {
        c.env("LD_LIBRARY_PATH", dir);
    }
    c
}

/// The installation's own library directory, when it is not the system's: a relocatable
/// PostgreSQL (the other majors' trees, ../shared/TOOLCHAIN.md) has modules whose run path
/// names where it was built (postgres_fdw, libpqwalreceiver), which would find the system's older
/// libpq without this.
pub fn private_libdir() -> Option<&'static Path> {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        pg_config("--libdir").filter(|d| d.join("libpq.so.5").exists() && !d.starts_with("/usr/"))
    })
    .as_deref()
}

fn check(out: Output, what: &str) -> Output {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A free port for a cluster, below the kernel's range of ephemeral ports (32768–60999 by
/// default): a receiver or client that binds port 0 can never take it while the cluster is
/// stopped for a restart (the upgrade test once failed on 16 with "could not bind … Address
/// already in use" when it started the old release on its cluster's port).
pub fn free_port() -> u16 {
    for _ in 0..1000 {
        let port = fastrand::u16(20000..32768);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32767");
}

impl Cluster {
    /// A new cluster serving database `app` (created), with a fast retry schedule and the
    /// SSRF guard opened for loopback receivers. `settings` are appended to postgresql.conf.
    pub fn start(settings: &[(&str, &str)]) -> Cluster {
        let mut conf: Vec<(String, String)> = vec![
            ("webhook.database".into(), "'app'".into()),
            ("webhook.allow_private_networks".into(), "on".into()),
            (
                "webhook.retry_schedule".into(),
                "'200ms,400ms,800ms'".into(),
            ),
        ];
        for (k, v) in settings {
            conf.retain(|(ck, _)| ck != k);
            conf.push((k.to_string(), v.to_string()));
        }
        let c = Cluster::init(&conf);
        c.create_database("app");
        c
    }

    /// A new cluster with exactly these webhook settings and no database created. `settings` are
    /// written after the harness's own lines, so they override them: `("fsync", "on")` for a
    /// crash test with production's durability (the default here is `fsync = off`), or
    /// `("shared_preload_libraries", "''")` for a server without the library preloaded.
    pub fn init(settings: &[(String, String)]) -> Cluster {
        let dir = new_cluster_dir();
        let data = dir.join("data");
        check(
            pg_command("initdb")
                .args([
                    "-D",
                    data.to_str().unwrap(),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ])
                .output()
                .unwrap(),
            "initdb",
        );
        let port = free_port();
        let mut conf = format!(
            "port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             shared_preload_libraries = 'webhook_ext'\nfsync = off\nmax_connections = 50\n\
             log_min_messages = log\nlog_line_prefix = '%m [%p] %b '\n",
            dir.display()
        );
        for (k, v) in settings {
            conf.push_str(&format!("{k} = {v}\n"));
        }
        append(&data.join("postgresql.conf"), &conf);
        let mut c = Cluster {
            dir,
            port,
            stopped: true,
        };
        c.first_start();
        c
    }

    /// Starts a new cluster. Its port was free when asked for, but Postgres binds it only now:
    /// if another process took it meanwhile, it takes another (a later `port` line overrides the
    /// earlier one).
    fn first_start(&mut self) {
        for _ in 0..5 {
            match self.try_start() {
                Ok(()) => return,
                Err(e) if self.log().contains("could not bind") => {
                    eprintln!("port {} was taken before Postgres bound it: {e}", self.port);
                    self.port = free_port();
                    append(
                        &self.data().join("postgresql.conf"),
                        &format!("port = {}\n", self.port),
                    );
                }
                Err(e) => panic!("pg_ctl start failed: {e}"),
            }
        }
        panic!("no free port for the cluster after 5 tries");
    }

    /// A hot standby of `primary` (`pg_basebackup -R`, WAL streamed), started. The primary's
    /// postgresql.conf comes with the backup; only where the standby listens is changed.
    pub fn standby_of(primary: &Cluster) -> Cluster {
        let dir = new_cluster_dir();
        let data = dir.join("data");
        check(
            pg_command("pg_basebackup")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &primary.port.to_string(),
                    "-U",
                    "postgres",
                    "-D",
                    data.to_str().unwrap(),
                    "-R",
                    "-X",
                    "stream",
                    "-c",
                    "fast",
                    "--no-sync",
                ])
                .output()
                .unwrap(),
            "pg_basebackup",
        );
        let port = free_port();
        append(
            &data.join("postgresql.conf"),
            &format!(
                "port = {port}\nunix_socket_directories = '{}'\n",
                dir.display()
            ),
        );
        let mut c = Cluster {
            dir,
            port,
            stopped: true,
        };
        c.first_start();
        c
    }

    /// `pg_ctl promote`: the standby leaves recovery (waits until it has).
    pub fn promote(&self) {
        check(
            pg_command("pg_ctl")
                .args([
                    "-D",
                    self.data().to_str().unwrap(),
                    "-w",
                    "-t",
                    "60",
                    "promote",
                ])
                .output()
                .unwrap(),
            "pg_ctl promote",
        );
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// The server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn start_again(&mut self) {
        if let Err(e) = self.try_start() {
            panic!("pg_ctl start failed: {e}");
        }
    }

    fn try_start(&mut self) -> Result<(), String> {
        let out = pg_command("pg_ctl")
            .args([
                "-D",
                self.data().to_str().unwrap(),
                "-l",
                self.log_path().to_str().unwrap(),
                "-w",
                "-t",
                "60",
                "start",
            ])
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(format!(
                "{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        self.stopped = false;
        Ok(())
    }

    /// `pg_ctl stop -m <mode>`; returns how long it took.
    pub fn stop(&mut self, mode: &str) -> Duration {
        let t = Instant::now();
        check(
            pg_command("pg_ctl")
                .args([
                    "-D",
                    self.data().to_str().unwrap(),
                    "-m",
                    mode,
                    "-w",
                    "-t",
                    "60",
                    "stop",
                ])
                .output()
                .unwrap(),
            "pg_ctl stop",
        );
        self.stopped = true;
        t.elapsed()
    }

    pub fn restart(&mut self, mode: &str) {
        self.stop(mode);
        self.start_again();
    }

    pub fn reload(&self) {
        check(
            pg_command("pg_ctl")
                .args(["-D", self.data().to_str().unwrap(), "reload"])
                .output()
                .unwrap(),
            "pg_ctl reload",
        );
    }

    pub fn set(&self, key: &str, value: &str) {
        append(
            &self.data().join("postgresql.conf"),
            &format!("{key} = {value}\n"),
        );
    }

    pub fn connstr(&self, db: &str) -> String {
        self.connstr_as("postgres", db)
    }

    /// A connection string for login role `role` to database `db`.
    pub fn connstr_as(&self, role: &str, db: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={role} dbname={db} connect_timeout=10",
            self.port
        )
    }

    pub fn client(&self) -> postgres::Client {
        self.client_to("app")
    }

    pub fn client_to(&self, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.connstr(db), postgres::NoTls).unwrap()
    }

    /// A session of login role `role` (connecting as itself, no SET ROLE) in database `db`.
    pub fn client_as(&self, role: &str, db: &str) -> postgres::Client {
        postgres::Client::connect(&self.connstr_as(role, db), postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting as {role}: {e}"))
    }

    /// A superuser session in `app` in which `CREATE EXTENSION webhook_ext` has just run.
    pub fn client_with_extension(&self) -> postgres::Client {
        let mut db = self.client();
        db.batch_execute("CREATE EXTENSION webhook_ext").unwrap();
        db
    }

    /// A superuser session in `db` that records the message of every notice (and warning) the
    /// server sends it, in arrival order.
    pub fn client_with_notices(&self, db: &str) -> (postgres::Client, Arc<Mutex<Vec<String>>>) {
        let notices = Arc::new(Mutex::new(Vec::<String>::new()));
        let seen = notices.clone();
        let mut config: postgres::Config = self.connstr(db).parse().unwrap();
        config.notice_callback(move |n| seen.lock().unwrap().push(n.message().to_string()));
        (config.connect(postgres::NoTls).unwrap(), notices)
    }

    pub fn create_database(&self, db: &str) {
        self.client_to("postgres")
            .batch_execute(&format!("CREATE DATABASE {db}"))
            .unwrap();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Every test doubles as a leak check: nothing webhook_ext logs may carry a secret.
        // (Postgres itself echoes the text of a failed statement; a literal in it is the caller's.)
        if !std::thread::panicking() {
            let log = self.log();
            // Secrets, ed25519 signing keys, PEM private keys (client certificates').
            let leak = log.lines().find(|l| {
                (l.contains("whsec_") || l.contains("whsk_") || l.contains("PRIVATE KEY"))
                    && !l.contains("STATEMENT:")
            });
            assert!(
                leak.is_none(),
                "a secret in the server log: {}",
                leak.unwrap_or_default()
            );
        }
        if !self.stopped {
            let _ = pg_command("pg_ctl")
                .args([
                    "-D",
                    self.data().to_str().unwrap(),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ])
                .output();
        }
        if std::env::var_os("WEBHOOK_KEEP_CLUSTERS").is_none() && !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else if std::thread::panicking() {
            eprintln!(
                "cluster kept for inspection: {} (log: {})",
                self.dir.display(),
                self.log_path().display()
            );
        }
    }
}

fn append(path: &Path, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

/// Runs a PostgreSQL client program from [`bin_dir`] (pg_dump, createdb, pg_restore, psql, …) as
/// the current user and insists it succeeds.
pub fn client_program(program: &str, args: &[&str]) {
    let out = Command::new(pg_bin(program)).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Polls `f` until it holds or `timeout` passes; says which (for a wait whose failure the
/// caller reports itself).
pub fn soft_wait(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` until it returns `Some`, or panics after `timeout` with `what`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
