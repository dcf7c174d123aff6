//! The daemon's error type, and how it is worded for a controller.

use vmferry_proto::{ErrorKind, WireError};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("{0}")]
    Denied(String),
    #[error("QEMU: {0}")]
    Qemu(String),
    /// libvirt refused or failed; the text carries libvirt's own message.
    #[error("libvirt: {0}")]
    Libvirt(String),
    #[error("{0}")]
    Channel(String),
    #[error("migration cancelled: {0}")]
    Cancelled(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    Internal(String),
}

impl DaemonError {
    pub fn to_wire(&self) -> WireError {
        let kind = match self {
            DaemonError::BadRequest(_) => ErrorKind::BadRequest,
            DaemonError::NotFound(_) => ErrorKind::NotFound,
            DaemonError::Exists(_) => ErrorKind::Exists,
            DaemonError::Denied(_) => ErrorKind::Denied,
            DaemonError::Qemu(_) | DaemonError::Libvirt(_) => ErrorKind::Qemu,
            DaemonError::Channel(_) => ErrorKind::Channel,
            DaemonError::Cancelled(_) => ErrorKind::Cancelled,
            DaemonError::Timeout(_) => ErrorKind::Timeout,
            DaemonError::Internal(_) => ErrorKind::Internal,
        };
        WireError::new(kind, self.to_string())
    }
}

/// A peer's cookie or VM spec that fails its checks is a bad request.
impl From<vmferry_proto::CookieError> for DaemonError {
    fn from(e: vmferry_proto::CookieError) -> Self {
        DaemonError::BadRequest(e.to_string())
    }
}

impl From<vmferry_proto::SpecError> for DaemonError {
    fn from(e: vmferry_proto::SpecError) -> Self {
        DaemonError::BadRequest(e.to_string())
    }
}

impl From<vmferry_qmp::QmpError> for DaemonError {
    fn from(e: vmferry_qmp::QmpError) -> Self {
        DaemonError::Qemu(e.to_string())
    }
}

pub type Result<T, E = DaemonError> = std::result::Result<T, E>;
