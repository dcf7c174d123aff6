//! libvirt test hosts: one `libvirtd` per netns test host, so a test can run libvirt's own
//! peer-to-peer migration (and later vmferry under it) between two "machines" on one.
//!
//! Each [`LibvirtHost`] is a `libvirtd` started as
//! `ip netns exec HOST unshare --mount --uts -- sh -c '<bind mounts>; exec libvirtd'`:
//!
//! ```text
//!   inside the host (what libvirtd and its QEMUs see)   outside (the test's files)
//!   /run/libvirt        (sockets, running state)         DIR/run
//!   /var/lib/libvirt    (domain dirs, monitor sockets)   DIR/lib
//!   /var/cache/libvirt  (QEMU capabilities cache)        DIR/cache
//!   /var/log/libvirt    (libvirtd.log, qemu/NAME.log)    DIR/log
//!   /etc/libvirt        (libvirtd.conf, qemu.conf only)  DIR/etc
//!   WORK                (disks, serial logs, sockets)    DIR/work
//!   /run/systemd, /run/dbus (if present)                 empty tmpfs: hidden
//! ```
//! `WORK` is the same path on every host (the test's `<tmp>/work`) but a different directory
//! behind it: libvirt migration needs every path in the domain XML, and the migration and
//! NBD socket paths, to be equal on both sides, while each side must see its own files.
//! (A tmpfs there would do too; a bind of a directory of the test's keeps the files readable
//! from outside, for the heartbeat checks and failure messages, until the test's temporary
//! directory goes.) The UTS namespace gives each host its own host name, and libvirtd.conf
//! its own `host_uuid`: migration refuses a destination with the source's name or UUID.
//! systemd and D-Bus are hidden so that libvirtd neither registers the test's QEMUs with the
//! machine's systemd-machined (A and B would both register `qemu-1-NAME`) nor asks polkit.
//!
//! libvirtd's pid file is moved into /run/libvirt: its default, /run/libvirtd.pid, lies
//! outside the private directories, so the second host failed to lock it (and the first
//! wrote into the machine's /run). The settings libvirtd needs here, each for a reason, are
//! in [`QEMU_CONF`] and [`LibvirtHost::spawn`]; docs/libvirt.md has the whole story, with
//! timings.
//!
//! libvirt's probe of the QEMU binaries (the bulk of its start-up time) is kept in
//! `<repo>/.cache/libvirt-qemu-caps` and copied into each new host's cache; libvirt
//! re-validates it and probes again when it is stale.
//!
//! This module must never touch the system's libvirt: not its sockets, state, logs or
//! configuration (everything libvirt writes lands in the private directories above; the only
//! thing made outside is an empty /run/libvirt mount point if the machine has none). Every
//! process it starts dies on drop — libvirtd, the QEMUs it started, anything else in the
//! host's UTS namespace — and with the last of them the mount namespace and its mounts go.
//! Every wait has a timeout. The fixture drives libvirt with `virsh` (simple to read and
//! debug); the product will use the `virt` crate.
//!
//! The module's parts: [`host`] (the libvirtd and its namespaces, `virsh`, disks, logs),
//! [`domain`] (the test guest's domain XML), [`bridge`] (unix sockets forwarded between
//! hosts by socat), `caps` (the kept QEMU capabilities) and [`run`] (commands with a
//! deadline).

pub mod bridge;
mod caps;
pub mod domain;
pub mod host;
pub mod run;

pub use bridge::UnixBridge;
pub use domain::Domain;
pub use host::{LibvirtHost, QEMU_CONF};
pub use run::output_within;

use std::time::Duration;

/// How long libvirtd may take to answer after it was started. It probes every QEMU binary
/// it finds first (4–9 s here, more when two start at once on 2 cores), unless the
/// capabilities kept from an earlier start are still valid (then 0.5–2 s).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long one `virsh` call may take unless the caller says otherwise.
pub const VIRSH_TIMEOUT: Duration = Duration::from_secs(30);
