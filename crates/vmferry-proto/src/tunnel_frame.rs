//! The tunnel's control stream: the frames both ends of a tunnel exchange beside the data
//! streams (see `vmferry_channel::tunnel` for the mux they travel in).
//!
//! ```text
//!  frame = length (u32, big-endian, at most MAX_CONTROL) ‖ JSON body
//!  source → destination:  hello {version}  then any of the rest
//!  destination → source:  any but hello
//! ```
//! - `hello {version}`: the source's first frame; a destination refuses any other version
//!   (there is no downgrade) and any frame that comes before it.
//! - `message`: a caller's control message, any JSON value.
//! - `end {stream, bytes}`: "I sent all of stream k's bytes in my direction: this many".
//!   A mux stream's end alone cannot be trusted (a reset or a dead connection reads the
//!   same), so a direction ends cleanly only when its EOF and this count agree.
//! - `refused {stream, cause}` / `failed {stream, cause}`: the peer gave up on stream k,
//!   and why.
//!
//! # Versioning
//! [`VERSION`] names this framing; a change to any frame's meaning bumps it. Unknown frame
//! kinds are refused (a peer that speaks another version says so in its hello first).
//!
//! This module never does I/O: the tunnel reads the 4-byte header, asks
//! [`body_len`] whether to read on, and hands the body to [`Frame::decode_body`]; what it
//! decides about the sequence is [`Incoming`]'s. Everything here is fuzzed as plain bytes
//! (`fuzz/fuzz_targets/tunnel_frame.rs`). A peer's bytes end in a frame or an error,
//! never a panic, and never in a buffer larger than [`MAX_CONTROL`].

use serde::{Deserialize, Serialize};

/// The version of the framing described above, and of the tunnel's plaintext around it.
/// 2: the plaintext is framed in lanes (`vmferry_channel::tls_async::lanes`), bulk data
/// beside the mux instead of inside it.
pub const VERSION: u32 = 2;
/// Largest control frame body, once encoded (libvirt's whole tunnel moves 64 KiB at a time).
pub const MAX_CONTROL: usize = 64 * 1024;
/// Size of a frame's length header.
pub const HEADER_LEN: usize = 4;

/// One control frame.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Frame {
    Hello { version: u32 },
    Message(serde_json::Value),
    End { stream: u16, bytes: u64 },
    Refused { stream: u16, cause: String },
    Failed { stream: u16, cause: String },
}

/// What is wrong with the frames a peer sent. Each message completes "the peer ...".
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("sent a control message of {len} bytes; at most {MAX_CONTROL} are allowed")]
    TooLarge { len: usize },
    #[error("sent a control frame this host does not understand: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("speaks tunnel version {version}; this host speaks {VERSION}")]
    Version { version: u32 },
    #[error("did not start the control stream with hello")]
    NoHello,
}

impl Frame {
    /// Length-prefixed JSON.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing these types cannot fail (string keys, no foreign Serialize impls).
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// A frame's body (what follows its header).
    pub fn decode_body(body: &[u8]) -> Result<Frame, FrameError> {
        serde_json::from_slice(body).map_err(FrameError::Malformed)
    }

    /// The first whole frame in `buf` and the bytes it took; `Ok(None)` if `buf` holds
    /// only part of one. A header announcing more than [`MAX_CONTROL`] is refused at once.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        let Some((header, rest)) = buf.split_first_chunk::<HEADER_LEN>() else {
            return Ok(None);
        };
        let len = body_len(*header)?;
        let Some(body) = rest.get(..len) else {
            return Ok(None);
        };
        Ok(Some((Frame::decode_body(body)?, HEADER_LEN + len)))
    }
}

/// The body length a header announces, refused above [`MAX_CONTROL`] before any buffer
/// is made for it.
pub fn body_len(header: [u8; HEADER_LEN]) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header) as usize;
    if len > MAX_CONTROL {
        return Err(FrameError::TooLarge { len });
    }
    Ok(len)
}

/// The receiving end's view of a control stream: whether the hello has come.
#[derive(Debug, Clone)]
pub struct Incoming {
    hello: bool,
}

impl Incoming {
    /// The destination's: the source must say hello first.
    pub fn expecting_hello() -> Incoming {
        Incoming { hello: false }
    }

    /// The source's: the destination sends no hello.
    pub fn without_hello() -> Incoming {
        Incoming { hello: true }
    }

    /// Takes the next frame: `Ok(None)` for a hello that was in order (nothing to act
    /// on), the frame for the caller otherwise, Err if the peer broke the sequence.
    pub fn admit(&mut self, frame: Frame) -> Result<Option<Frame>, FrameError> {
        match frame {
            Frame::Hello { version } if version == VERSION => {
                self.hello = true;
                Ok(None)
            }
            Frame::Hello { version } => Err(FrameError::Version { version }),
            _ if !self.hello => Err(FrameError::NoHello),
            other => Ok(Some(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Frame> {
        vec![
            Frame::Hello { version: VERSION },
            Frame::Message(serde_json::json!({"op": "begin", "streams": 4})),
            Frame::End {
                stream: 3,
                bytes: u64::MAX,
            },
            Frame::Refused {
                stream: 0,
                cause: "no QEMU listens".into(),
            },
            Frame::Failed {
                stream: u16::MAX,
                cause: "é".into(),
            },
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in all() {
            let bytes = f.encode();
            assert_eq!(
                Frame::decode(&bytes).expect("decodes"),
                Some((f, bytes.len()))
            );
        }
    }

    #[test]
    fn the_wire_format_is_length_and_snake_case_json() {
        let b = Frame::End {
            stream: 1,
            bytes: 5,
        }
        .encode();
        let body = br#"{"end":{"stream":1,"bytes":5}}"#;
        assert_eq!(&b[..4], &(body.len() as u32).to_be_bytes());
        assert_eq!(&b[4..], body);
        assert_eq!(
            Frame::Hello { version: 1 }.encode()[4..],
            *br#"{"hello":{"version":1}}"#
        );
        assert_eq!(
            Frame::Message(serde_json::json!(1)).encode()[4..],
            *br#"{"message":1}"#
        );
    }

    #[test]
    fn a_partial_frame_asks_for_more() {
        let b = Frame::Hello { version: 1 }.encode();
        for cut in 0..b.len() {
            assert_eq!(Frame::decode(&b[..cut]).expect("partial"), None, "{cut}");
        }
    }

    #[test]
    fn an_oversized_header_is_refused_before_its_body() {
        let header = ((MAX_CONTROL + 1) as u32).to_be_bytes();
        let e = Frame::decode(&header).expect_err("too large");
        assert_eq!(
            e.to_string(),
            "sent a control message of 65537 bytes; at most 65536 are allowed"
        );
        assert_eq!(
            body_len((MAX_CONTROL as u32).to_be_bytes()).ok(),
            Some(MAX_CONTROL)
        );
    }

    #[test]
    fn unknown_or_malformed_frames_are_refused() {
        for body in [
            &b"{}"[..],
            b"{\"bye\":{}}",
            b"[1",
            b"\xff",
            b"{\"end\":{\"stream\":70000,\"bytes\":1}}",
        ] {
            let e = Frame::decode_body(body).expect_err("refused");
            assert!(
                e.to_string()
                    .starts_with("sent a control frame this host does not understand: "),
                "{e}"
            );
        }
    }

    #[test]
    fn the_destination_wants_hello_first_and_in_its_version() {
        let msg = Frame::Message(serde_json::json!("x"));
        let mut d = Incoming::expecting_hello();
        assert!(matches!(d.admit(msg.clone()), Err(FrameError::NoHello)));
        let mut d = Incoming::expecting_hello();
        let e = d.admit(Frame::Hello { version: 1 }).expect_err("version");
        assert_eq!(e.to_string(), "speaks tunnel version 1; this host speaks 2");
        let mut d = Incoming::expecting_hello();
        assert_eq!(
            d.admit(Frame::Hello { version: VERSION }).expect("hello"),
            None
        );
        assert_eq!(d.admit(msg.clone()).expect("msg"), Some(msg.clone()));
        let mut s = Incoming::without_hello();
        assert_eq!(s.admit(msg.clone()).expect("msg"), Some(msg));
    }
}
