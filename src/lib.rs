//! webhook_ext: PostgreSQL as a native webhook source.
//!
//! Pure logic (no Postgres) lives in the `webhook_core` crate (`core/`): `signing`, `retry`,
//! `policy`, `target`, `request`, `http`, re-exported here under the same names.
//! Postgres-facing: `gucs`, `shmem`, `enqueue` (the trigger), `api` (SQL helpers),
//! `launcher` and `worker` (background processes). Tables and the SQL API live in `sql/`.

use pgrx::pg_sys;
use pgrx::prelude::*;

pub use webhook_core::{http, policy, request, retry, signing, target};

mod api;
mod bgutil;
mod enqueue;
mod gucs;
mod launcher;
mod plans;
mod shmem;
mod sql_tests;
mod utility;
mod worker;
mod worker_sql;

::pgrx::pg_module_magic!();

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!("../sql/api.sql", name = "api", finalize);

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
    gucs::init();
    shmem::init();
    utility::init();
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
