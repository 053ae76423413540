//! Postgres plumbing shared by the backends' code and the background processes.

pub mod gate;
pub mod gucs;
pub mod process;
pub mod shmem;
pub mod spi;
pub mod utility;
