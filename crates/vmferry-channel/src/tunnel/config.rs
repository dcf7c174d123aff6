//! The tunnel's mux settings: yamux's configuration and the limits it is built from.
//!
//! This file is also compiled into the fuzz targets from its source
//! (`fuzz/fuzz_targets/tunnel.rs` includes it with `#[path]`), so that they fuzz the mux
//! exactly as the tunnel configures it. It must therefore never use anything but `std`
//! and `yamux` (no `crate::` paths): should it need more, the fuzz crate stops building.

/// The yamux stream id of the control stream: the client (source) opens it first.
pub const CONTROL_STREAM_ID: u32 = 1;
/// Largest yamux data frame we send. yamux's own default (16 KiB) costs a frame, a
/// channel message and a wake-up per 16 KiB; larger frames measured faster (see
/// `examples/tunnel_throughput.rs`). yamux refuses frames over 1 MiB.
pub const FRAME: usize = 256 * 1024;
/// yamux streams per connection (the control stream included). Each is guaranteed a
/// 256 KiB window; windows grow with measured bandwidth up to the connection's cap.
pub const MAX_STREAMS: usize = 128;
/// Cap of all receive windows of the connection together: what a stalled receiver can
/// be made to buffer at most.
pub const MAX_WINDOWS: usize = 256 << 20;

/// The largest receive window one stream can reach: the connection's cap, less the
/// minimum window yamux guarantees every other stream (yamux grows a busy stream's window
/// into whatever the others do not use, and never shrinks it).
pub const MAX_STREAM_WINDOW: usize =
    MAX_WINDOWS - (MAX_STREAMS - 1) * yamux::DEFAULT_CREDIT as usize;

/// yamux as the tunnel runs it, at both ends.
pub fn yamux_config() -> yamux::Config {
    let mut c = yamux::Config::default();
    // In this order: each setter checks windows ≥ 256 KiB × streams.
    c.set_max_num_streams(MAX_STREAMS);
    c.set_max_connection_receive_window(Some(MAX_WINDOWS));
    c.set_split_send_size(FRAME);
    // Data the peer sent before it closed is still delivered.
    c.set_read_after_close(true);
    c
}
