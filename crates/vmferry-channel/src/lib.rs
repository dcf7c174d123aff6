//! The layered channel every vmferry byte path goes through:
//! transport (TCP, unix) → security (TLS 1.3, pinned or x509) → filters (metering, compression) →
//! framing.
//!
//! Security lives here and nowhere else: no other crate builds a rustls config, opens a
//! data connection, or copies migration bytes. This crate never speaks QMP and never
//! decides migration policy; it only moves and protects bytes.

pub mod certs;
pub mod compress;
pub mod dn;
pub mod framed;
pub mod identity;
pub mod meter;
pub mod peercred;
pub mod pump;
#[doc(hidden)]
pub mod testing;
pub mod tls;
pub mod tls_async;
pub mod transport;
pub mod tunnel;
/// The x509 data configurations, by their old path (they live in [`tls::x509`]).
pub use tls::x509 as x509_data;
