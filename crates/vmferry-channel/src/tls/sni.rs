//! The server names vmferry sends: the fixed name of pinned connections, and the name
//! that routes a data connection to its migration on a shared port.
//!
//! These names are labels, never resolved and never trusted by themselves: what a name
//! routes to must still be authenticated by its certificate (the pin or the CA). This
//! module must never accept a name that could be mistaken for another migration's
//! (the id is one DNS label, with no dots).

pub use crate::identity::PINNED_SERVER_NAME;

const DATA_SNI_PREFIX: &str = "m-";
const DATA_SNI_SUFFIX: &str = ".data.vmferry.invalid";

/// The server name a data connection of migration `migration_id` sends, so that the
/// destination can route it on its shared port. The id must fit one DNS label with the
/// `m-` prefix (61 characters; vmferry's ids have 32).
pub fn data_sni(migration_id: &str) -> String {
    format!("{DATA_SNI_PREFIX}{migration_id}{DATA_SNI_SUFFIX}")
}

/// The migration id a data connection's server name carries, if it is one.
pub fn migration_id_from_sni(sni: &str) -> Option<&str> {
    let id = sni
        .strip_prefix(DATA_SNI_PREFIX)?
        .strip_suffix(DATA_SNI_SUFFIX)?;
    (!id.is_empty() && !id.contains('.')).then_some(id)
}
