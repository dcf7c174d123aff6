//! The data-channel preamble: the first 10 bytes a destination reads on a fresh data
//! connection (`Preamble::decode`). Inputs shorter than a preamble are padded with
//! zeros, longer ones are cut, as a reader that read exactly `PREAMBLE_LEN` bytes sees.
//!
//! Beyond "no panic": an accepted preamble names a stream inside the migration, and
//! encodes to bytes that decode to it again.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmferry_proto::preamble::{Preamble, PREAMBLE_LEN};

fuzz_target!(|data: &[u8]| {
    let mut b = [0u8; PREAMBLE_LEN];
    let n = data.len().min(PREAMBLE_LEN);
    b[..n].copy_from_slice(&data[..n]);
    if let Ok(p) = Preamble::decode(&b) {
        assert!(p.streams >= 1 && p.stream < p.streams, "{p:?} accepted");
        assert_eq!(Preamble::decode(&p.encode()), Ok(p));
        // Byte 5 is reserved (not read); everything else must be what was sent.
        let mut e = p.encode();
        e[5] = b[5];
        assert_eq!(e, b, "preamble decoded to something else than was sent");
    }
});
