//! The tunnel's limits and yamux settings, as crates/vmferry-channel/src/tunnel.rs has
//! them (private there, and in a crate the targets do not link: see framed.rs).
//! scripts/fuzz.sh checks, before it builds, that every line below that defines a
//! constant (and ends in `;`) or calls a `yamux::Config` setter is still in tunnel.rs,
//! and that tunnel.rs calls no setter this file leaves out.
//!
//! Not a fuzz target: included with `mod tunnel;` by the tunnel targets.

#![allow(dead_code)]

/// The yamux stream id of the control stream: the client opens it first.
pub const CONTROL_STREAM_ID: u32 = 1; // tunnel.rs: `id == 1 && !have_control`

pub const MAX_CONTROL: usize = 64 * 1024;
const FRAME: usize = 256 * 1024;
const MAX_STREAMS: usize = 128;
const MAX_WINDOWS: usize = 256 << 20;

/// `yamux_config()` of the tunnel.
pub fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    c.set_max_num_streams(MAX_STREAMS);
    c.set_max_connection_receive_window(Some(MAX_WINDOWS));
    c.set_split_send_size(FRAME);
    c.set_read_after_close(true);
    c
}
