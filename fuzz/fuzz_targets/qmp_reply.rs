//! QMP replies as the QMP client types them: `query-migrate` (`MigrationInfo`),
//! `query-status` (`RunStatus`) and the greeting's version (`QemuVersion`), each read
//! straight from the bytes and also the way the client reads them (a line parsed to a
//! `Value` first, then typed from it).
//!
//! Beyond "no panic": a migration state survives being named and read again, and the
//! lenient counters never hold what JSON cannot say.

#![no_main]

use libfuzzer_sys::fuzz_target;
use vmferry_qmp::{MigrationInfo, MigrationStatus, QemuVersion, RunStatus};

fuzz_target!(|data: &[u8]| {
    if let Ok(i) = serde_json::from_slice::<MigrationInfo>(data) {
        check_info(&i);
    }
    let _ = serde_json::from_slice::<RunStatus>(data);
    if let Ok(v) = serde_json::from_slice::<QemuVersion>(data) {
        let _ = v.to_string();
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(i) = serde_json::from_value::<MigrationInfo>(v.clone()) {
            check_info(&i);
        }
        let _ = serde_json::from_value::<RunStatus>(v.clone());
        if let Ok(q) = serde_json::from_value::<QemuVersion>(v) {
            let _ = q.to_string();
        }
    }
});

fn check_info(i: &MigrationInfo) {
    let s = &i.status;
    assert_eq!(
        &MigrationStatus::parse(s.as_str()),
        s,
        "state changed when named"
    );
    assert!(
        !(s.is_active() && s.is_terminal()),
        "{s} both active and finished"
    );
    let _ = s.to_string();
    for stats in i.ram.iter().chain(&i.disk) {
        assert!(stats.mbps.is_finite(), "mbps {}", stats.mbps);
    }
}
