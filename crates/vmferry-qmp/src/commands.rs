//! The typed QMP commands vmferry uses: the run state (`query-status`, `stop`, `cont`,
//! `quit`) and migration (`migrate-set-capabilities`, `migrate-set-parameters`,
//! `query-migrate-parameters`, `migrate`, `migrate-incoming`, `migrate_cancel`,
//! `query-migrate`). Each is one [`Qmp::execute`] and the decoding of its reply.
//!
//! What it must never do:
//! - **wait on its own.** Every wait is the session's, under its timeout; a command that
//!   needs to follow progress returns at once and leaves polling or events to the caller.
//! - **decide.** It reports what QEMU said; what a state or failure means is the
//!   caller's policy.
//! - **break on a newer QEMU.** Replies decode through [`crate::types`], which ignores
//!   unknown fields and keeps unknown states as text.

use crate::client::Qmp;
use crate::error::QmpError;
use crate::types::{MigrationInfo, RunStatus};
use serde_json::{json, Value};

impl Qmp {
    /// `query-status`.
    pub fn query_status(&mut self) -> Result<RunStatus, QmpError> {
        let v = self.execute("query-status", None)?;
        typed("query-status", v)
    }

    /// Pauses the guest's CPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// Resumes (or first starts) the guest's CPUs.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// Asks QEMU to exit. QEMU may close the socket before its reply arrives, which
    /// counts as success.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `migrate-set-capabilities` with (capability, state) pairs, e.g. `("multifd", true)`.
    pub fn migrate_set_capabilities(&mut self, caps: &[(&str, bool)]) -> Result<(), QmpError> {
        let list: Vec<Value> = caps
            .iter()
            .map(|(c, s)| json!({ "capability": c, "state": s }))
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .map(drop)
    }

    /// `migrate-set-parameters` with QEMU's own names, e.g.
    /// `json!({"max-bandwidth": 1 << 30, "downtime-limit": 300})`.
    pub fn migrate_set_parameters(&mut self, params: Value) -> Result<(), QmpError> {
        self.execute("migrate-set-parameters", Some(params))
            .map(drop)
    }

    /// The names of the migration capabilities this QEMU has (`query-migrate-capabilities`).
    pub fn migrate_capabilities(&mut self) -> Result<Vec<String>, QmpError> {
        let v = self.execute("query-migrate-capabilities", None)?;
        let list = v.as_array().ok_or_else(|| {
            QmpError::Protocol(format!(
                "query-migrate-capabilities returned {v}, not a list"
            ))
        })?;
        Ok(list
            .iter()
            .filter_map(|c| c.get("capability").and_then(Value::as_str))
            .map(str::to_string)
            .collect())
    }

    /// `query-migrate-parameters`, untyped (its set of fields changes every release).
    pub fn query_migrate_parameters(&mut self) -> Result<Value, QmpError> {
        self.execute("query-migrate-parameters", None)
    }

    /// Starts an outgoing migration to `uri` (e.g. "unix:/run/x.sock"); returns at once,
    /// follow it with [`Qmp::query_migrate`] or `MIGRATION` events.
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// Resumes a post-copy migration QEMU holds paused (`postcopy-paused`) over a new
    /// channel to `uri` (QEMU 3.0+); the destination must be listening there after
    /// [`Qmp::migrate_recover`].
    pub fn migrate_resume(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri, "resume": true })))
            .map(drop)
    }

    /// Makes a destination in `postcopy-paused` listen on `uri` for the source's resume
    /// (QEMU 3.0+). Sent out of band where negotiated: a vCPU waiting for a page that
    /// only the lost link could bring may hold QEMU's main loop, and QEMU then takes the
    /// new channel in its monitor thread.
    pub fn migrate_recover(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute_oob("migrate-recover", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// Makes a QEMU started with `-incoming defer` listen on `uri`.
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// Switches a running migration to post-copy (the `postcopy-ram` capability must be
    /// on in both QEMUs; QEMU 2.5+). The guest then runs on the destination.
    pub fn migrate_start_postcopy(&mut self) -> Result<(), QmpError> {
        self.execute("migrate-start-postcopy", None).map(drop)
    }

    /// Whether the guest runs under KVM (`query-kvm`'s `enabled`); false under TCG.
    pub fn kvm_enabled(&mut self) -> Result<bool, QmpError> {
        let v = self.execute("query-kvm", None)?;
        v.get("enabled")
            .and_then(serde_json::Value::as_bool)
            .ok_or_else(|| QmpError::Protocol(format!("query-kvm: no boolean 'enabled' in {v}")))
    }

    /// Cancels the outgoing migration (the status passes through "cancelling").
    pub fn migrate_cancel(&mut self) -> Result<(), QmpError> {
        self.execute("migrate_cancel", None).map(drop)
    }

    /// `query-migrate`.
    pub fn query_migrate(&mut self) -> Result<MigrationInfo, QmpError> {
        let v = self.execute("query-migrate", None)?;
        typed("query-migrate", v)
    }
}

/// Decodes the reply to `cmd`; a reply of another shape is a protocol error.
fn typed<T: serde::de::DeserializeOwned>(cmd: &str, v: Value) -> Result<T, QmpError> {
    serde_json::from_value(v).map_err(|e| QmpError::Protocol(format!("the reply to {cmd}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake_qemu::*;

    #[test]
    fn a_reply_of_the_wrong_shape_is_a_protocol_error() {
        let why = protocol_error_for(b"{\"return\": {\"status\": 42}, \"id\": 2}\r\n");
        assert!(why.contains("query-status"), "{why}");
    }

    #[test]
    fn sends_commands_with_execute_arguments_and_id() {
        let (tx, rx) = std::sync::mpsc::channel();
        let (_d, p, _h) = answering(move |c| {
            let _ = tx.send(c.clone());
            format!("{{\"return\": {{}}, \"id\": {}}}\r\n", c["id"])
        });
        let mut q = connect(&p);
        q.migrate_set_capabilities(&[("events", true), ("multifd", false)])
            .expect("caps");
        q.migrate("unix:/x.sock").expect("migrate");
        q.stop().expect("stop");
        let caps = rx.recv().expect("first command");
        assert_eq!(
            caps,
            json!({"execute": "migrate-set-capabilities", "id": 2, "arguments": {"capabilities": [
                {"capability": "events", "state": true}, {"capability": "multifd", "state": false}]}})
        );
        let mig = rx.recv().expect("second command");
        assert_eq!(mig["arguments"], json!({"uri": "unix:/x.sock"}));
        assert_eq!(mig["id"], 3);
        let stop = rx.recv().expect("third command");
        assert_eq!(
            stop,
            json!({"execute": "stop", "id": 4}),
            "no arguments key"
        );
    }

    #[test]
    fn quit_succeeds_when_qemu_closes_before_replying() {
        let (_d, p, _h) = serve(|s| {
            let (mut r, mut w) = handshake(s);
            let _ = next_command(&mut r);
            reply(
                &mut w,
                "{\"event\": \"SHUTDOWN\", \"data\": {\"guest\": false}}",
            );
        });
        let mut q = connect(&p);
        q.quit().expect("closing is success");
    }
}
