//! End-to-end tests of webhook_ext, one test binary (`cargo test --test e2e`): real clusters with
//! the installed extension preloaded (run as the `postgres` OS user), real receivers on 127.0.0.1,
//! real crashes and upgrades. One module per area; `harness` holds what they share. Filter by
//! module or name, e.g. `cargo test --test e2e -- policy::` or `-- pipeline::rolled_back`.
//!
//! The PostgreSQL programs come from `pg_config --bindir` (`$PG_CONFIG` if set, else `pg_config`
//! on PATH), so the tests run against whichever installation the extension was built for.

mod harness;

mod attacks;
mod capture;
mod operations;
mod pipeline;
mod policy;
mod receivers;
mod roles;
mod security;
mod standby;
mod upgrade;
mod workers;
