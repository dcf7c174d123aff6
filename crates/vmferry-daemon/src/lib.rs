//! The vmferry daemon as a library: the control server, the registry of managed VMs, and
//! the source and destination halves of a migration.
//!
//! The binary (`vmferry serve`) is a thin wrapper; tests start a [`Server`] directly.
//! This crate must never build its own TLS configuration or copy migration bytes itself:
//! both belong to `vmferry-channel`, so that security lives in one place.

pub mod accel;
pub mod audit;
pub mod auth;
pub mod client;
pub mod config;
pub mod control;
pub mod controller;
pub mod error;
pub mod host;
pub mod libvirt;
pub mod metrics;
pub mod migration;
pub mod qemu_binary;
pub mod qemu_cmd;
pub mod server;
pub mod state;
pub mod vm_process;
pub mod vms;

pub use client::{ClientAuth, ControlClient, ControlTarget};
pub use config::DaemonConfig;
pub use error::DaemonError;
pub use server::Server;
