//! Test hosts (network namespaces joined by veth pairs), the test guest image, packet
//! captures, serial-console readers and QEMU helpers for end-to-end tests.
//!
//! Everything it creates it removes in `Drop` — processes, namespaces, files — even when a
//! test panics. It never touches addresses outside its own namespaces or loopback.
//!
//! Modules: [`guest`] (kernel + initramfs), [`netns`] (two hosts, or n on a bridge),
//! [`capture`] (tcpdump), [`serial`] (heartbeats), [`qemu`] (attach-mode QEMUs),
//! [`libvirt`] (a libvirtd per host, domains of the test guest, unix sockets bridged
//! between hosts), [`process`] (kill-on-drop children), [`ports`], and [`require`]: what a
//! test needs from the machine — a test that cannot run here fails, naming what is
//! missing, and never passes by returning early.
#![forbid(unsafe_code)]

pub mod capture;
pub mod guest;
pub mod libvirt;
pub mod netns;
pub mod ports;
pub mod process;
pub mod qemu;
pub mod require;
pub mod serial;

pub use require::{require, require_ok};
