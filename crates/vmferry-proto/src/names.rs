//! Validation of names that arrive from peers and end up in file names or command lines.
//!
//! Parse, don't validate: a `VmName` or `MigrationId` that exists is safe to put in a path.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A VM name: 1–64 characters of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct VmName(String);

/// A migration id: 8–64 lowercase hex characters, chosen by the controller at random.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct MigrationId(String);

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("VM name {0:?} is not allowed: use 1-64 characters of letters, digits, '_', '.', '-', not starting with '.' or '-'")]
    BadVmName(String),
    #[error("migration id {0:?} is not 8-64 lowercase hex characters")]
    BadMigrationId(String),
}

impl VmName {
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        let ok = !s.is_empty()
            && s.len() <= 64
            && !s.starts_with('.')
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if ok {
            Ok(VmName(s))
        } else {
            Err(NameError::BadVmName(s))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl MigrationId {
    pub fn new(s: impl Into<String>) -> Result<Self, NameError> {
        let s = s.into();
        let ok = (8..=64).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if ok {
            Ok(MigrationId(s))
        } else {
            Err(NameError::BadMigrationId(s))
        }
    }
    /// Builds an id from random bytes supplied by the caller (this crate has no RNG).
    pub fn from_random(bytes: [u8; 16]) -> Self {
        MigrationId(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype {
    ($t:ty) => {
        impl TryFrom<String> for $t {
            type Error = NameError;
            fn try_from(s: String) -> Result<Self, NameError> {
                <$t>::new(s)
            }
        }
        impl From<$t> for String {
            fn from(n: $t) -> String {
                n.0
            }
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.pad(&self.0)
            }
        }
        impl std::str::FromStr for $t {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                <$t>::new(s)
            }
        }
    };
}
string_newtype!(VmName);
string_newtype!(MigrationId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_that_could_escape_a_directory_are_refused() {
        for bad in [
            "",
            "../x",
            "a/b",
            ".hidden",
            "-flag",
            "a b",
            &"x".repeat(65),
        ] {
            assert!(VmName::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(VmName::new("guest-1.prod_a").is_ok());
    }

    #[test]
    fn migration_ids_must_be_lowercase_hex() {
        assert!(MigrationId::new("0123abcd").is_ok());
        assert!(MigrationId::new("0123ABCD").is_err());
        assert!(MigrationId::new("0123abc").is_err());
        assert!(MigrationId::new("../../etc/passwd").is_err());
        assert_eq!(MigrationId::from_random([0xab; 16]).as_str().len(), 32);
    }

    #[test]
    fn names_are_checked_when_deserialized() {
        let r: Result<VmName, _> = serde_json::from_str("\"../etc\"");
        assert!(r.is_err());
        let r: Result<MigrationId, _> = serde_json::from_str("\"deadbeef\"");
        assert!(r.is_ok());
    }
}
