//! webhook_ext: PostgreSQL as a native webhook source.
use pgrx::prelude::*;

pub mod http;
pub mod request;
pub mod retry;
pub mod signing;
pub mod target;

::pgrx::pg_module_magic!();

#[pg_extern]
fn hello() -> &'static str {
    "hi"
}
