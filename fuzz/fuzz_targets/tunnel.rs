//! The tunnel's yamux settings, compiled into the tunnel targets from the channel
//! crate's own source (`crates/vmferry-channel/src/tunnel/config.rs`), for the reason
//! given in framed.rs: linking the crate would build TLS and tokio into every target.
//! config.rs uses only std and yamux; should it ever use more, this stops building.
//!
//! Not a fuzz target: included with `mod tunnel;` by the tunnel targets.

#[allow(dead_code)]
#[path = "../../crates/vmferry-channel/src/tunnel/config.rs"]
mod source;

pub use source::*;
