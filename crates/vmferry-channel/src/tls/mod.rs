//! The security layer: every rustls configuration vmferry uses, the blocking handshakes
//! with deadlines, and the wording of TLS failures for operators.
//!
//! Three kinds of trust live here and nowhere else:
//! - control connections: mutual TLS with the operator's CA ([`control_server_config`],
//!   [`control_client_config`]);
//! - pinned data connections: each side accepts exactly the per-migration certificate
//!   whose fingerprint the controller carried in the cookie ([`pinned_server_config`],
//!   [`pinned_client_config`]);
//! - x509 data connections: both daemons' CA-signed host certificates ([`x509`]).
//!
//! One port serves them all: [`accept`] reads the ClientHello first and lets the caller
//! pick a configuration by the server name the client sent ([`data_sni`]).
//!
//! What this module must never do: negotiate anything but TLS 1.3; accept a certificate
//! "for now" or fall back to an unauthenticated connection; accept a pinned peer without
//! checking that it holds the pinned certificate's private key (the handshake signature
//! is always verified); or let a handshake wait without a deadline.
//!
//! A TLS 1.3 client finishes its handshake before the server has checked the client's
//! certificate: a server's refusal of our client certificate therefore arrives as an
//! alert on the first read after [`connect`], worded by [`describe_io`].
//!
//! # Where things are
//! - `config`: the control and pinned configurations, and the crypto provider;
//! - [`x509`]: the x509 data configurations;
//! - `verify`: the one certificate verifier all of them use, parameterized by what it
//!   checks (a pin, or our CA with a fixed name, allowed subjects, optional client
//!   certificate);
//! - `handshake`: [`accept_any`] (and [`accept`]) and [`connect`], with deadlines;
//! - `data`: data connections' handshakes through rustls' unbuffered API, ending in a
//!   [`Session`](crate::pump::Session) ([`connect_data`]);
//! - `describe`: failures worded for operators, and [`subject_of`];
//! - `sni`: the server names vmferry sends ([`data_sni`], [`migration_id_from_sni`]).

mod config;
mod data;
mod describe;
mod handshake;
mod sni;
mod verify;
pub mod x509;

pub use config::{
    control_client_config, control_client_config_anonymous, control_server_config,
    control_server_config_with, pinned_client_config, pinned_server_config,
};
pub use data::connect_data;
pub use describe::{describe, describe_io, subject_of};
pub use handshake::{accept, accept_any, connect, Accepted, Choice};
pub use sni::{data_sni, migration_id_from_sni, PINNED_SERVER_NAME};

use crate::transport::fmt_duration;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot set up TLS: {0}")]
    Config(String),
    /// A handshake failure, already worded for an operator.
    #[error("{0}")]
    Handshake(String),
    #[error("TLS handshake with {peer} timed out after {}", fmt_duration(*.after))]
    Timeout { peer: String, after: Duration },
    #[error("{peer} closed the connection during the TLS handshake ({hint})")]
    Closed { peer: String, hint: &'static str },
    #[error("refused {peer}: {reason}")]
    Refused { peer: String, reason: String },
    #[error("TLS handshake with {peer} failed: {source}")]
    Io {
        peer: String,
        #[source]
        source: std::io::Error,
    },
}

#[cfg(test)]
mod data_tests;
#[cfg(test)]
mod tests;
