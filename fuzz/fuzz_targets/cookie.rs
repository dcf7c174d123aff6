//! The migration cookie and what it carries, as a daemon receives it inside a request:
//! `Cookie` and `VmSpec` from JSON, then the checks serde cannot do (`check`), and the
//! names that end up in paths and command lines (`VmName`, `MigrationId`).
//!
//! Beyond "no panic": a name that is accepted must be safe to put in a path, and a
//! cookie that decodes must encode to JSON that decodes to the same cookie.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmferry_proto::{Cookie, MigrationId, VmName, VmSpec};

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = serde_json::from_slice::<Cookie>(data) {
        let checked = c.check();
        let streams = c.streams();
        if checked.is_ok() {
            assert!((1..=1 + vmferry_proto::MAX_MULTIFD).contains(&streams));
        }
        let text = serde_json::to_vec(&c).expect("a decoded cookie encodes");
        let back: Cookie = serde_json::from_slice(&text).expect("a re-encoded cookie decodes");
        assert_eq!(back, c, "cookie changed in a round trip");
    }
    if let Ok(spec) = serde_json::from_slice::<VmSpec>(data) {
        if spec.check().is_ok() {
            assert!((16..=vmferry_proto::MAX_MEMORY_MIB).contains(&spec.memory_mib));
            assert!((1..=vmferry_proto::MAX_CPUS).contains(&spec.cpus));
            for p in spec.kernel.iter().chain(&spec.initrd).chain(&spec.disks) {
                assert!(p.starts_with('/') && !p.contains(','), "{p:?} accepted");
            }
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(n) = VmName::new(s) {
            let n = n.as_str();
            assert!(!n.is_empty() && n.len() <= 64, "{n:?} accepted");
            assert!(!n.contains('/') && n != "." && n != "..", "{n:?} accepted");
            assert!(!n.starts_with('-'), "{n:?} accepted");
        }
        if let Ok(id) = MigrationId::new(s) {
            let id = id.as_str();
            assert!((8..=64).contains(&id.len()), "{id:?} accepted");
            assert!(id
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        }
    }
});
