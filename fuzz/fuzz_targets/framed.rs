//! vmferry-channel's control framing (`framed::read_json` and friends), compiled into a
//! target from the channel crate's own source file rather than by depending on the
//! crate: the crate would build TLS, certificates and an async runtime into every
//! target, tripling the build for code no target runs. framed.rs uses only std, serde,
//! serde_json and thiserror. Should it ever use more of its crate, this stops building:
//! then depend on vmferry-channel instead.
//!
//! Not a fuzz target: included with `mod framed;` by the targets that read frames.

#[allow(dead_code)]
#[path = "../../crates/vmferry-channel/src/framed.rs"]
mod source;

pub use source::*;
