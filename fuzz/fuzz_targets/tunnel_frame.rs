//! The tunnel's control stream, as either end of a tunnel reads it: frame after frame
//! through the real codec (`vmferry_proto::tunnel_frame`), with the sequence rules the
//! destination applies (`Incoming`: hello first, in this version). (`tunnel_mux` fuzzes
//! the yamux frames these travel in.)
//!
//! Beyond "no panic": no frame is accepted past `MAX_CONTROL`, a frame that decodes
//! encodes to bytes that decode to the same kind of frame (to the same frame, unless it
//! carries a JSON number, which JSON may not carry back bit for bit), and the tunnel's
//! two ends disagree only about hello.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmferry_proto::tunnel_frame::{Frame, Incoming, HEADER_LEN, MAX_CONTROL};

fuzz_target!(|data: &[u8]| {
    let mut destination = Incoming::expecting_hello();
    let mut source = Incoming::without_hello();
    let mut r = data;
    while let Ok(Some((frame, used))) = Frame::decode(r) {
        assert!(used <= HEADER_LEN + MAX_CONTROL, "a frame of {used} bytes");
        r = &r[used..];
        round_trip(&frame);
        let at_destination = destination.admit(frame.clone());
        let at_source = source.admit(frame.clone());
        match (&frame, &at_source) {
            (Frame::Hello { .. }, _) => {}
            (_, Ok(Some(f))) => assert_eq!(f, &frame, "the source changed a frame"),
            (_, other) => panic!("the source refused {frame:?}: {other:?}"),
        }
        if at_destination.is_err() {
            break;
        }
    }
});

fn round_trip(frame: &Frame) {
    let bytes = frame.encode();
    let (back, used) = Frame::decode(&bytes)
        .expect("a re-encoded frame decodes")
        .expect("one whole frame");
    assert_eq!(used, bytes.len());
    assert_eq!(
        std::mem::discriminant(&back),
        std::mem::discriminant(frame),
        "{frame:?} came back as {back:?}"
    );
    if !matches!(frame, Frame::Message(_)) {
        assert_eq!(&back, frame, "frame changed in a round trip");
    }
}
