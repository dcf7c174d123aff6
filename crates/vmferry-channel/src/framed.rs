//! Framing for control messages: a 4-byte big-endian length, then the payload.
//!
//! A peer decides how much it announces, never how much we allocate: lengths above the
//! limit are refused before any buffer is made. A read that times out is reported as
//! such, so callers can tell a silent peer from a broken one.

use serde::{de::DeserializeOwned, Serialize};
use std::io::{ErrorKind, Read, Write};

/// Largest control frame accepted.
pub const MAX_FRAME: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("peer announced a {len}-byte frame; the limit is {max}")]
    TooLarge { len: u64, max: usize },
    #[error("connection closed in the middle of a frame")]
    Truncated,
    #[error("timed out waiting for the peer")]
    Timeout,
    #[error("cannot decode message: {0}")]
    Decode(String),
    #[error("{0}")]
    Io(std::io::Error),
}

fn io(e: std::io::Error) -> FrameError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => FrameError::Timeout,
        ErrorKind::UnexpectedEof => FrameError::Truncated,
        _ => FrameError::Io(e),
    }
}

pub fn write_frame<W: Write>(w: &mut W, payload: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(payload.len()).map_err(|_| FrameError::TooLarge {
        len: payload.len() as u64,
        max: MAX_FRAME,
    })?;
    let mut buf = Vec::with_capacity(4 + payload.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(payload);
    w.write_all(&buf).map_err(io)?;
    w.flush().map_err(io)
}

/// Reads one frame; `Ok(None)` on a clean close before a frame starts.
pub fn read_frame<R: Read>(r: &mut R, max: usize) -> Result<Option<Vec<u8>>, FrameError> {
    let mut hdr = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut hdr[got..]) {
            Ok(0) if got == 0 => return Ok(None),
            Ok(0) => return Err(FrameError::Truncated),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    let len = u32::from_be_bytes(hdr) as usize;
    if len > max {
        return Err(FrameError::TooLarge {
            len: len as u64,
            max,
        });
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).map_err(io)?;
    Ok(Some(buf))
}

/// A reader that fails with `TimedOut` once `deadline` has passed, however the bytes
/// trickle in. Per-read socket timeouts alone let a peer that sends one byte a second
/// hold a session forever; wrap the stream in this for every frame read from a peer.
#[derive(Debug)]
pub struct Deadline<'a, R> {
    inner: &'a mut R,
    deadline: std::time::Instant,
}

impl<'a, R> Deadline<'a, R> {
    pub fn new(inner: &'a mut R, within: std::time::Duration) -> Self {
        Deadline {
            inner,
            deadline: std::time::Instant::now() + within,
        }
    }
}

impl<R: Read> Read for Deadline<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if std::time::Instant::now() >= self.deadline {
            return Err(std::io::Error::new(
                ErrorKind::TimedOut,
                "the peer did not finish its message in time",
            ));
        }
        self.inner.read(buf)
    }
}

pub fn write_json<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    let v = serde_json::to_vec(msg).map_err(|e| FrameError::Decode(e.to_string()))?;
    write_frame(w, &v)
}

pub fn read_json<R: Read, T: DeserializeOwned>(
    r: &mut R,
    max: usize,
) -> Result<Option<T>, FrameError> {
    match read_frame(r, max)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| FrameError::Decode(e.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// Yields one byte per read, slowly.
    struct Trickle(Vec<u8>, usize);
    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::thread::sleep(std::time::Duration::from_millis(20));
            if self.1 >= self.0.len() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.0[self.1];
            self.1 += 1;
            Ok(1)
        }
    }

    #[test]
    fn a_trickling_peer_is_cut_off_at_the_deadline() {
        let mut frame = Vec::new();
        write_json(&mut frame, &serde_json::json!({"pad": "x".repeat(200)})).expect("write");
        let mut t = Trickle(frame, 0);
        let started = std::time::Instant::now();
        let e = read_json::<_, serde_json::Value>(
            &mut Deadline::new(&mut t, std::time::Duration::from_millis(300)),
            MAX_FRAME,
        )
        .expect_err("must time out");
        assert!(matches!(e, FrameError::Timeout), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn frames_round_trip() {
        let mut v = Vec::new();
        write_json(&mut v, &serde_json::json!({"a": 1})).expect("write");
        let back: serde_json::Value = read_json(&mut Cursor::new(v), MAX_FRAME)
            .expect("read")
            .expect("some");
        assert_eq!(back["a"], 1);
    }

    #[test]
    fn an_announced_four_gigabyte_frame_is_refused_without_allocating() {
        let mut c = Cursor::new(vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3]);
        let e = read_frame(&mut c, MAX_FRAME).expect_err("too large");
        assert!(e.to_string().contains("4294967295"), "{e}");
    }

    #[test]
    fn eof_mid_frame_is_an_error_and_eof_between_frames_is_not() {
        assert!(matches!(
            read_frame(&mut Cursor::new(vec![]), MAX_FRAME),
            Ok(None)
        ));
        assert!(matches!(
            read_frame(&mut Cursor::new(vec![0, 0, 0, 9, 1]), MAX_FRAME),
            Err(FrameError::Truncated)
        ));
        assert!(matches!(
            read_frame(&mut Cursor::new(vec![0, 0]), MAX_FRAME),
            Err(FrameError::Truncated)
        ));
    }

    #[test]
    fn garbage_json_is_a_decode_error() {
        let mut v = Vec::new();
        write_frame(&mut v, b"{not json").expect("write");
        let r: Result<Option<serde_json::Value>, _> = read_json(&mut Cursor::new(v), MAX_FRAME);
        assert!(matches!(r, Err(FrameError::Decode(_))));
    }
}
