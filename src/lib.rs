//! webhook_ext: PostgreSQL as a native webhook source.
//!
//! The folders are the architecture:
//!
//! ```text
//! core/          webhook_core: pure logic, no pgrx (signing, retry, policy, target, request,
//!                http), re-exported here under the same names
//! src/pg/        Postgres plumbing: settings (gucs), shared memory and wake-ups (shmem), the
//!                utility hook, process helpers (latch, reload, shutdown), statements (spi)
//! src/sql_api/   what SQL calls: the trigger and the Rust half of the SQL API
//! src/worker/    the delivery worker (one per served database)
//! src/launcher.rs  the launcher (starts and stops the workers)
//! sql/           tables (schema.sql), the plpgsql half of the SQL API by topic (api/), release
//!                and upgrade scripts
//! ```

use pgrx::pg_sys;
use pgrx::prelude::*;

pub use webhook_core::{
    floors, http, limits, ops, policy, request, retry, signing, split, target, trace,
};

mod launcher;
mod pg;
mod sql_api;
mod sql_tests;
pub(crate) mod worker;

::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
// The SQL API, by topic, in this order: each file requires the one before it, and the last is
// emitted after every Rust function (`finalize`). A file whose statements name a Rust function
// when they are created (a view's call, a trigger) requires that function too.
pgrx::extension_sql_file!(
    "../sql/api/endpoints.sql",
    name = "api_endpoints",
    requires = ["schema"]
);
pgrx::extension_sql_file!(
    "../sql/api/subscriptions.sql",
    name = "api_subscriptions",
    requires = ["api_endpoints", _trigger_args, enqueue]
);
pgrx::extension_sql_file!(
    "../sql/api/send.sql",
    name = "api_send",
    requires = ["api_subscriptions"]
);
pgrx::extension_sql_file!(
    "../sql/api/retention.sql",
    name = "api_retention",
    requires = ["api_send"]
);
pgrx::extension_sql_file!(
    "../sql/api/views.sql",
    name = "api_views",
    requires = [
        "api_retention",
        _worker_slots,
        _served_databases,
        _public_key
    ]
);
pgrx::extension_sql_file!(
    "../sql/api/privileges.sql",
    name = "api_privileges",
    finalize
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a flag Postgres sets while loading preload libraries.
    if unsafe { !pg_sys::process_shared_preload_libraries_in_progress } {
        pg_sys::panic::ErrorReport::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "webhook_ext must be loaded via shared_preload_libraries",
            "_PG_init",
        )
        .set_hint("Add webhook_ext to shared_preload_libraries in postgresql.conf, set webhook.database, and restart PostgreSQL.")
        .report(PgLogLevel::ERROR);
    }
    pg::gucs::init();
    pg::shmem::init();
    pg::utility::init();
    launcher::register();
}

#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![
            "shared_preload_libraries = 'webhook_ext'",
            "webhook.database = 'pgrx_tests'",
        ]
    }
}
