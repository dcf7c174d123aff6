//! Everything the destination's end of a tunnel reads from the source, below TLS: yamux
//! frames (the mux, configured as the tunnel configures it), then inside the streams
//! the tunnel's own framing, as crates/vmferry-channel/src/tunnel.rs reads it: on the
//! control stream (yamux stream 1) 4-byte-length JSON frames of at most `MAX_CONTROL`
//! bytes, on every other stream a big-endian u16 stream index first.
//!
//! The tunnel runs this on a tokio runtime over a socket; here the mux reads the fuzz
//! input from memory and is polled by hand until the input is used up, so a run costs
//! no thread and no syscall. Whatever the mux writes back (window updates, pings'
//! answers, resets) is dropped. Control frames go through the tunnel's own codec
//! (`vmferry_proto::tunnel_frame`) and the destination's sequence rules.

#![no_main]

use futures::io::{AsyncRead, AsyncWrite};
use libfuzzer_sys::fuzz_target;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tunnel::{yamux_config, CONTROL_STREAM_ID};
use vmferry_proto::tunnel_frame::{Frame, Incoming, MAX_CONTROL};

mod tunnel;

/// The socket: reads the input, swallows writes, never waits.
struct Wire<'a> {
    input: &'a [u8],
}

impl AsyncRead for Wire<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let n = buf.len().min(self.input.len());
        buf[..n].copy_from_slice(&self.input[..n]);
        self.input = &self.input[n..];
        Poll::Ready(Ok(n))
    }
}

impl AsyncWrite for Wire<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// One inbound stream and what it carried so far.
struct Inbound {
    id: u32,
    stream: yamux::Stream,
    got: Vec<u8>,
    ended: bool,
}

fuzz_target!(|data: &[u8]| {
    let mut conn =
        yamux::Connection::new(Wire { input: data }, yamux_config(), yamux::Mode::Server);
    let waker = futures::task::noop_waker();
    let mut cx = Context::from_waker(&waker);
    let mut streams: Vec<Inbound> = Vec::new();
    let mut conn_ended = false;
    let mut buf = vec![0u8; 16 * 1024];
    // Bounded: the input is finite and always ready, so every round makes progress
    // until it is used up; the bound only guards against a mux that spins.
    for _ in 0..(4 * data.len() + 64) {
        let mut progress = false;
        if !conn_ended {
            match conn.poll_next_inbound(&mut cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    streams.push(Inbound {
                        id: stream.id().val(),
                        stream,
                        got: Vec::new(),
                        ended: false,
                    });
                    progress = true;
                }
                Poll::Ready(Some(Err(_))) | Poll::Ready(None) => {
                    conn_ended = true;
                    progress = true;
                }
                Poll::Pending => {}
            }
        }
        for s in streams.iter_mut().filter(|s| !s.ended) {
            match Pin::new(&mut s.stream).poll_read(&mut cx, &mut buf) {
                Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => {
                    s.ended = true;
                    progress = true;
                }
                Poll::Ready(Ok(n)) => {
                    // More than a control message and its header is never needed.
                    let keep = n.min((MAX_CONTROL + 6).saturating_sub(s.got.len()));
                    s.got.extend_from_slice(&buf[..keep]);
                    progress = true;
                }
                Poll::Pending => {}
            }
        }
        if !progress {
            break;
        }
    }
    for s in &streams {
        if s.id == CONTROL_STREAM_ID {
            read_control(&s.got);
        } else if let Some(k) = s.got.first_chunk::<2>() {
            let _ = u16::from_be_bytes(*k);
        }
    }
});

/// The control stream's frames, as the destination reads them until one is refused.
fn read_control(mut b: &[u8]) {
    let mut incoming = Incoming::expecting_hello();
    while let Ok(Some((frame, used))) = Frame::decode(b) {
        if incoming.admit(frame).is_err() {
            return;
        }
        b = &b[used..];
    }
}
