//! Control frames a daemon reads from a controller: a stream of 4-byte big-endian
//! lengths, each followed by a JSON `Request`, read exactly as the control server reads
//! them (`framed::read_json` with `MAX_FRAME`).
//!
//! Beyond "no panic": a request that decodes must survive the checks the daemon runs on
//! it, and must encode to a frame that decodes to the same request.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod framed;

use framed::{FrameError, MAX_FRAME};
use vmferry_proto::{Request, RequestBody};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    loop {
        match framed::read_json::<_, Request>(&mut r, MAX_FRAME) {
            Ok(Some(req)) => exercise(&req),
            // A frame that is whole but not a request: the server answers it with an
            // error and reads on, so the next frame is fuzzed too.
            Err(FrameError::Decode(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
});

fn exercise(req: &Request) {
    let _ = req.body.op();
    let _ = req.body.is_read_only();
    match &req.body {
        RequestBody::VmStart { spec } => {
            let _ = spec.check();
        }
        RequestBody::Prepare { cookie, .. }
        | RequestBody::Connect { cookie, .. }
        | RequestBody::Perform { cookie } => {
            let _ = cookie.check();
            let _ = cookie.streams();
        }
        _ => {}
    }
    let mut frame = Vec::new();
    framed::write_json(&mut frame, req).expect("a decoded request encodes");
    let back: Request = framed::read_json(&mut frame.as_slice(), MAX_FRAME)
        .expect("a re-encoded request decodes")
        .expect("one frame");
    assert_eq!(&back, req, "request changed in a round trip");
}
