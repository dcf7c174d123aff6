//! The data-channel preamble: the first bytes a source sends inside a fresh TLS data
//! connection, saying which stream of the migration this is.
//!
//! The destination needs the index because QEMU 7.2 takes the first connection it sees as
//! the main migration channel: stream 0 must reach the destination QEMU before any multifd
//! stream. The migration itself is already bound by the TLS identity (SNI + pinned
//! certificate); the preamble adds no authority of its own.

use crate::cookie::Transport;

/// Size of an encoded preamble.
pub const PREAMBLE_LEN: usize = 10;
const MAGIC: &[u8; 4] = b"VMF2";

/// What a data connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StreamKind {
    /// One of QEMU's migration streams (or, for a tunnel, all of them).
    #[default]
    Qemu,
    /// The peer link: the two daemons' own messages about the migration
    /// ([`crate::peer::PeerMessage`]), one per migration, beside the QEMU streams.
    Peer,
    /// One disk's NBD connection (disk copy): `stream` is the disk's index in the
    /// cookie's disks, `streams` their number.
    Nbd,
    /// libvirt's RPC, from the source's libvirtd to the destination's (a libvirt
    /// migration: `stream` counts the connections in the order they were made).
    Libvirt,
}

impl StreamKind {
    fn code(self) -> u8 {
        match self {
            StreamKind::Qemu => 0,
            StreamKind::Peer => 1,
            StreamKind::Nbd => 2,
            StreamKind::Libvirt => 3,
        }
    }

    fn from_code(c: u8) -> Option<StreamKind> {
        match c {
            0 => Some(StreamKind::Qemu),
            1 => Some(StreamKind::Peer),
            2 => Some(StreamKind::Nbd),
            3 => Some(StreamKind::Libvirt),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// How this connection travels. For a tunnel, the connection carries every stream
    /// and `stream` is 0.
    pub transport: Transport,
    /// 0 is QEMU's main channel, 1.. are multifd channels.
    pub stream: u16,
    /// How many streams the migration has in all.
    pub streams: u16,
    /// Byte 5; version-1 daemons always sent 0 (a QEMU stream).
    pub kind: StreamKind,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PreambleError {
    #[error("data connection does not start with a vmferry preamble (got {0:02x?}); is the peer a vmferry daemon of the same version?")]
    BadMagic([u8; 4]),
    #[error("data connection claims to be stream {stream} of {streams}")]
    BadIndex { stream: u16, streams: u16 },
    #[error("data connection names unknown transport code {0}")]
    BadTransport(u8),
    #[error("data connection names unknown stream kind {0}")]
    BadKind(u8),
}

impl Preamble {
    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[..4].copy_from_slice(MAGIC);
        b[4] = self.transport.code();
        b[5] = self.kind.code();
        b[6..8].copy_from_slice(&self.stream.to_be_bytes());
        b[8..10].copy_from_slice(&self.streams.to_be_bytes());
        b
    }

    pub fn decode(b: &[u8; PREAMBLE_LEN]) -> Result<Self, PreambleError> {
        let magic = [b[0], b[1], b[2], b[3]];
        if &magic != MAGIC {
            return Err(PreambleError::BadMagic(magic));
        }
        let transport = Transport::from_code(b[4]).ok_or(PreambleError::BadTransport(b[4]))?;
        let kind = StreamKind::from_code(b[5]).ok_or(PreambleError::BadKind(b[5]))?;
        let p = Preamble {
            kind,
            transport,
            stream: u16::from_be_bytes([b[6], b[7]]),
            streams: u16::from_be_bytes([b[8], b[9]]),
        };
        if p.streams == 0 || p.stream >= p.streams {
            return Err(PreambleError::BadIndex {
                stream: p.stream,
                streams: p.streams,
            });
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preamble_round_trips() {
        for transport in Transport::AUTO_ORDER {
            for kind in [
                StreamKind::Qemu,
                StreamKind::Peer,
                StreamKind::Nbd,
                StreamKind::Libvirt,
            ] {
                let p = Preamble {
                    transport,
                    stream: 3,
                    streams: 5,
                    kind,
                };
                assert_eq!(Preamble::decode(&p.encode()), Ok(p));
            }
        }
    }

    #[test]
    fn a_preamble_with_wrong_magic_or_index_is_refused() {
        assert!(matches!(
            Preamble::decode(b"QEVM\x01\0\0\0\0\x01"),
            Err(PreambleError::BadMagic(_))
        ));
        assert_eq!(
            Preamble::decode(b"VMF2\x09\0\0\0\0\x01"),
            Err(PreambleError::BadTransport(9))
        );
        assert_eq!(
            Preamble::decode(b"VMF2\x01\x07\0\0\0\x01"),
            Err(PreambleError::BadKind(7))
        );
        let p = Preamble {
            transport: Transport::Direct,
            stream: 5,
            streams: 5,
            kind: StreamKind::Qemu,
        };
        assert!(matches!(
            Preamble::decode(&p.encode()),
            Err(PreambleError::BadIndex { .. })
        ));
    }
}
