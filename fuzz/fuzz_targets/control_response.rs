//! Control frames a controller reads from a daemon: the daemon's `Hello`, then one
//! `Response` per request, each a 4-byte big-endian length and JSON, read as the client
//! reads them (`framed::read_json` with `MAX_FRAME`). Every frame is decoded both as a
//! `Hello` and as a `Response`, so either decoder sees every input.

#![no_main]

use libfuzzer_sys::fuzz_target;

mod framed;

use framed::MAX_FRAME;
use vmferry_proto::{Hello, Response, ResponseBody};

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    // read_frame once, then both decoders through read_json on the same bytes, so a
    // frame is consumed once whatever the decoders make of it.
    while let Ok(Some(payload)) = framed::read_frame(&mut r, MAX_FRAME) {
        let mut frame = Vec::with_capacity(4 + payload.len());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(&payload);
        if let Ok(Some(h)) = framed::read_json::<_, Hello>(&mut frame.as_slice(), MAX_FRAME) {
            let back: Hello = round_trip(&h);
            assert_eq!(back, h, "hello changed in a round trip");
        }
        if let Ok(Some(resp)) = framed::read_json::<_, Response>(&mut frame.as_slice(), MAX_FRAME) {
            exercise(&resp);
        }
    }
});

fn exercise(resp: &Response) {
    match &resp.body {
        ResponseBody::Cookie { cookie } => {
            let _ = cookie.check();
            // The controller sizes its waits by this before any check.
            let _ = cookie.streams();
        }
        ResponseBody::Vm { vm } => {
            let _ = vm.spec.check();
        }
        ResponseBody::Vms { vms } => {
            for vm in vms {
                let _ = vm.spec.check();
            }
        }
        _ => {}
    }
    // Responses carry floats (mbps), which JSON may not carry back bit for bit: only
    // require that what decoded once decodes again.
    let _: Response = round_trip(resp);
}

fn round_trip<T: serde::Serialize + serde::de::DeserializeOwned>(v: &T) -> T {
    let mut frame = Vec::new();
    framed::write_json(&mut frame, v).expect("a decoded message encodes");
    framed::read_json(&mut frame.as_slice(), MAX_FRAME)
        .expect("a re-encoded message decodes")
        .expect("one frame")
}
