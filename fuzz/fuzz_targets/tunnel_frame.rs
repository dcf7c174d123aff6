//! The tunnel's control stream, as the destination's end of a tunnel reads it.
//!
//! The tunnel (crates/vmferry-channel/src/tunnel.rs) reads its control frames inside an
//! async task, into a private type, and exposes no decode function: a 4-byte big-endian
//! length, refused above `MAX_CONTROL` (64 KiB) before any buffer is made, then JSON
//! (every frame is a JSON object, its `message` any JSON value). That is
//! `framed::read_json` into a `serde_json::Value` with the same limit, which this
//! target feeds frame after frame. (`tunnel_mux` fuzzes the yamux frames these travel
//! in.)

#![no_main]

use libfuzzer_sys::fuzz_target;

mod framed;
mod tunnel;

use framed::FrameError;
use tunnel::MAX_CONTROL;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    loop {
        match decode(&mut r) {
            Ok(Some(v)) => {
                // What decoded once must encode, and decode again.
                let mut frame = Vec::new();
                framed::write_json(&mut frame, &v).expect("a decoded frame encodes");
                let back = decode(&mut frame.as_slice()).expect("a re-encoded frame decodes");
                assert!(back.is_some());
            }
            Err(FrameError::Decode(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
});

fn decode(r: &mut &[u8]) -> Result<Option<serde_json::Value>, FrameError> {
    framed::read_json::<_, serde_json::Value>(r, MAX_CONTROL)
}
