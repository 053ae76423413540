//! What SQL calls: the trigger (`webhook.enqueue`) and the Rust half of the SQL API.

mod capture;
mod functions;
mod trigger;
