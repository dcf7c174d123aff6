//! The two daemons as a controller sees them: one request to one of them at a time.
//!
//! [`Daemons`] is the seam the driver runs over, so its phase logic can be tested with a
//! fake pair; [`Connected`] is the real pair of control connections. The [`Renewer`]
//! keeps a migration's lease alive from connections of its own, so a phase that blocks
//! on one daemon (a slow `finish`) never lets the other's lease run out.

use crate::client::{ClientAuth, ClientError, ControlClient, ControlTarget};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use vmferry_proto::{MigrationId, RequestBody, ResponseBody, Role};

/// What the driver needs from the daemons.
pub trait Daemons {
    /// One request to the daemon in `role`, answered within `timeout`.
    fn call(
        &mut self,
        role: Role,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<ResponseBody, ClientError>;

    /// The control protocol version both this controller and that daemon speak.
    fn version(&self, role: Role) -> u32;
}

/// Two authenticated control connections.
#[derive(Debug)]
pub struct Connected {
    pub source: ControlClient,
    pub destination: ControlClient,
}

impl Daemons for Connected {
    fn call(
        &mut self,
        role: Role,
        body: RequestBody,
        timeout: Duration,
    ) -> Result<ResponseBody, ClientError> {
        match role {
            Role::Source => self.source.call(body, timeout),
            Role::Destination => self.destination.call(body, timeout),
        }
    }

    fn version(&self, role: Role) -> u32 {
        match role {
            Role::Source => self.source.version(),
            Role::Destination => self.destination.version(),
        }
    }
}

/// Renews a migration's lease on both daemons until dropped.
#[derive(Debug)]
pub struct Renewer {
    stop: Arc<AtomicBool>,
}

impl Renewer {
    /// Starts renewing every third of the lease. Its connections are made on its own
    /// thread; a renewal that fails is retried at the next tick (the lease's slack).
    pub fn start(
        targets: [ControlTarget; 2],
        auth: ClientAuth,
        id: MigrationId,
        lease: Duration,
    ) -> Renewer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let every = (lease / 3).max(Duration::from_millis(200));
        let spawned = std::thread::Builder::new()
            .name("lease-renewer".into())
            .spawn(move || {
                let mut clients: [Option<ControlClient>; 2] = [None, None];
                while !s.load(Ordering::SeqCst) {
                    for (slot, target) in clients.iter_mut().zip(&targets) {
                        if slot.is_none() {
                            *slot = ControlClient::connect_with(target, &auth, None).ok();
                        }
                        let Some(c) = slot else { continue };
                        let r = c.call(
                            RequestBody::Status {
                                migration: id.clone(),
                                wait_ms: 0,
                                renew: true,
                            },
                            every,
                        );
                        // A lost connection is made again next time; "not found" only
                        // means that half does not exist yet (or any more).
                        if matches!(
                            r,
                            Err(ClientError::Timeout { .. } | ClientError::Protocol { .. })
                        ) {
                            *slot = None;
                        }
                    }
                    let mut waited = Duration::ZERO;
                    while waited < every && !s.load(Ordering::SeqCst) {
                        std::thread::sleep(Duration::from_millis(50));
                        waited += Duration::from_millis(50);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("cannot start the lease renewer: {e}");
        }
        Renewer { stop }
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}
