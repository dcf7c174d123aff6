//! The tunnel transport: every stream of one migration (QEMU's main channel, its multifd
//! channels) and a control stream, multiplexed by yamux inside ONE already-established,
//! already-authenticated TLS connection, for when no new connection can be made at all.
//!
//! ```text
//!  local sockets ⇄ [mux thread: tokio + yamux ⇄ TLS (tls_async)] ⇄ TCP
//!  local sockets ⇄ [mux thread: bulk lanes       ⇄ TLS (tls_async)] ⇄ TCP
//! ```
//! Uncompressed data streams carry their bytes on lanes of their own
//! ([`lanes`](crate::tls_async::lanes)): read from the local socket straight into TLS
//! records and written from records straight to it, as the pump does, with a credit
//! window per lane; yamux carries the control stream, each stream's opening and close,
//! and (compressed) streams' bytes. Measured with `examples/tunnel_throughput.rs` and the
//! bench: yamux's copies and per-frame allocations cost ~30 % more CPU than the pump;
//! lanes cost the same.
//! The security layer is [`tls_async`](crate::tls_async), the pump's rules as a byte stream for tokio: it
//! carries plaintext between yamux and the TLS connection, in the same thread (no local
//! socket pair, no second thread in between). The framing layer is yamux, run by a
//! single-threaded tokio runtime over it. yamux gives every stream its own flow-control
//! window: a QEMU that stops reading stalls its own stream only (the sender blocks once
//! the window is spent), and the control stream keeps moving.
//!
//! This module must never touch keys or records (that is [`tls_async`](crate::tls_async)'s job, and only
//! its), and never buffer without bound: every queue here has a limit, every copy a
//! fixed buffer, and yamux's receive windows are capped per connection.
//!
//! # Where things are
//! - `api`: [`Tunnel`], [`TunnelStop`], [`TunnelError`], [`Accept`]: what callers use.
//! - `shared`: the state callers, the mux and its tasks share, and how it changes.
//! - `mailbox`: the bounded control-message queues between threads and tasks.
//! - `mux`: the task that drives yamux, opens and accepts streams.
//! - `carry`: one data stream, both directions; `bulk`: the same on a lane of its own.
//! - `control`: the control stream (its frames are [`vmferry_proto::tunnel_frame`]).
//! - `config`: yamux's settings (also compiled into the fuzz targets).
//!
//! # Inside the mux
//! The client (the migration source) opens the control stream first, then one stream per
//! local connection; the server (the destination) never opens streams. Each data stream
//! begins with its index k as a big-endian u16 and its lane (a byte; 0: none, its raw
//! bytes follow in the yamux stream). The server hands
//! streams to its `accept` callback in yamux stream-id order, which is the order they
//! were opened (QEMU needs its main channel first), whatever order their first frames
//! arrive in.
//!
//! The control stream carries frames of a 4-byte big-endian length and JSON (at most
//! 64 KiB): the client's `hello` (protocol version) first, then the callers' messages
//! and the tunnel's own notes:
//! - `end {stream, bytes}`: "I sent all of stream k's bytes in my direction: this many".
//!   A yamux stream end alone cannot be trusted: a reset, or a connection that died,
//!   also reads as end-of-stream. A direction counts as ended cleanly only when its EOF
//!   came and the byte count matches this note, as TLS's close_notify does for a
//!   connection.
//! - `refused {stream, cause}` / `failed {stream, cause}`: the peer gave up on stream k,
//!   and why; the other side reports the cause instead of a bare reset.
//!
//! # Ending
//! `close` on either side sends the remaining control messages, closes yamux (GoAway),
//! then sends close_notify. The other side's yamux ends on the GoAway, and its mux
//! answers in the same way by itself, so TLS ends cleanly both ways. Both muxes keep
//! reading TLS until the peer's close_notify, so neither closes its socket on data the

mod api;
mod bulk;
mod carry;
mod config;
mod control;
mod mailbox;
mod mux;
mod shared;

pub use api::{Accept, AcceptError, Tunnel, TunnelError, TunnelStop};

use std::time::Duration;
use vmferry_proto::tunnel_frame;

/// Largest control frame, once encoded (libvirt's whole tunnel moves 64 KiB at a time).
pub const MAX_CONTROL: usize = tunnel_frame::MAX_CONTROL;
/// Data streams one tunnel may open (main channel + multifd channels + spares).
const MAX_DATA_STREAMS: usize = config::MAX_STREAMS - 8;
/// Control messages queued in each direction before the sender waits.
const MAILBOX: usize = 64;
/// How long `open`, `send_control` and the server's wait for a stream's index may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server's `accept` callback may take for one stream.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests;
