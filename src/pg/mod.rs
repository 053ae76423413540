//! Postgres plumbing shared by the backends' code and the background processes.

pub mod gate;
pub mod gucs;
pub mod heap;
pub mod process;
pub mod shmem;
pub mod spi;
pub mod utility;

/// Attribute `i` (0-based) of a tuple descriptor. PostgreSQL 18 keeps the attributes beside a
/// compact copy, reached through `TupleDescAttr`; earlier majors have them in `attrs`.
///
/// # Safety
/// `desc` is valid and has more than `i` attributes.
pub unsafe fn tuple_attribute(
    desc: pgrx::pg_sys::TupleDesc,
    i: usize,
) -> *const pgrx::pg_sys::FormData_pg_attribute {
    // SAFETY: as the caller promised.
    #[cfg(feature = "pg18")]
    return unsafe { pgrx::pg_sys::TupleDescAttr(desc, i as std::ffi::c_int) };
    #[cfg(not(feature = "pg18"))]
    return unsafe { (*desc).attrs.as_ptr().add(i) };
}
