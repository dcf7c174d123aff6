//! The data path's TLS 1.3 record decoder (vmferry-channel's `pump/record.rs`, compiled
//! here from its source file, as `framed.rs` is: linking the crate would build tokio,
//! yamux and certificates into the target for code it never runs).
//!
//! Two kinds of input, by the first byte's low bit:
//! - 0: raw bytes from TCP, opened record after record — what anyone on the path can
//!   send without the key (headers, lengths, truncation, bad tags);
//! - 1: records sealed with the key from pieces `[content type][length][bytes]` — what
//!   the peer itself can send: every content type, alerts, post-handshake messages
//!   (KeyUpdate with any value, tickets, anything else), padding.
//!
//! Checks: never a panic; a record takes bytes it was given; application data lies
//! inside its record and is exactly what was sealed.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../crates/vmferry-channel/src/pump/record.rs"]
mod record;

use record::{Opened, Opener, Sealer, HEADER, SLOT};
use rustls::crypto::cipher::{AeadKey, Iv};
use rustls::ConnectionTrafficSecrets;

fn secrets() -> ConnectionTrafficSecrets {
    // `AeadKey::from` takes 32 bytes: AES-256-GCM (the code path is AES-128's).
    ConnectionTrafficSecrets::Aes256Gcm {
        key: AeadKey::from([0x42u8; 32]),
        iv: Iv::from([0x24u8; 12]),
    }
}

/// Opens every record in `wire`; returns the application data ranges, in order.
fn open_all(wire: &mut [u8]) -> Vec<std::ops::Range<usize>> {
    let mut opener = Opener::new(0, secrets()).expect("a fixed key");
    let mut at = 0;
    let mut data = Vec::new();
    while at < wire.len() {
        match opener.open(&mut wire[at..]) {
            Ok(Some((used, opened))) => {
                assert!(used > 0 && at + used <= wire.len(), "a record took {used} bytes");
                match opened {
                    Opened::Data(r) => {
                        assert!(r.start >= HEADER && r.end <= used, "{r:?} outside {used}");
                        data.push(at + r.start..at + r.end);
                    }
                    Opened::CloseNotify => break,
                    Opened::Nothing => {}
                }
                at += used;
            }
            Ok(None) | Err(_) => break,
        }
    }
    data
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        let mut wire = rest.to_vec();
        open_all(&mut wire);
        return;
    }
    let mut sealer = Sealer::new(0, secrets(), u64::MAX).expect("a fixed key");
    let mut slot = vec![0u8; SLOT];
    let mut wire = Vec::new();
    let mut sent = Vec::new();
    let mut rest = rest;
    while let [content_type, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        slot[HEADER..HEADER + n].copy_from_slice(&tail[..n]);
        let w = sealer.seal(&mut slot, n, *content_type).expect("a record fits its slot");
        wire.extend_from_slice(&slot[..w]);
        sent.push((*content_type, tail[..n].to_vec()));
        rest = &tail[n..];
    }
    let data = open_all(&mut wire);
    // The application data records before any record of another type open to exactly
    // what was sealed (empty ones carry nothing); later records depend on what came
    // before them (an alert ends the stream).
    let expected: Vec<&[u8]> = sent
        .iter()
        .take_while(|(t, _)| *t == 23)
        .filter(|(_, b)| !b.is_empty())
        .map(|(_, b)| b.as_slice())
        .collect();
    let got: Vec<&[u8]> = data
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| &wire[r.clone()])
        .collect();
    assert!(got.len() >= expected.len(), "application data was lost");
    assert_eq!(&got[..expected.len()], &expected[..], "application data changed");
});
