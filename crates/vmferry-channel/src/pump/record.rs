//! The TLS 1.3 record layer of a pump: records sealed and opened in place, in buffers the
//! pump owns and reuses, with the traffic keys rustls extracted once its handshake was
//! done — what kernel TLS offload does with the same keys, in userspace.
//!
//! rustls' buffered connection copies every record at least twice on the way in (into its
//! deframer, then into a new `Vec` per record, then out again) and once on the way out,
//! with an allocation per record. Here a record's plaintext is read from QEMU's socket
//! straight into the place where it is encrypted, and decrypted where it arrived from TCP.
//! The wire format is unchanged: the peer may be rustls itself.
//!
//! What this module must never do: use a nonce twice (sequence numbers only go up, and a
//! direction ends with an error before the cipher's confidentiality limit — we cannot send
//! a KeyUpdate, as rustls hands out keys, not traffic secrets), hand out any byte of a
//! record that failed authentication, or accept a record larger than TLS 1.3 allows.

use aws_lc_rs::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use rustls::ConnectionTrafficSecrets;
use std::ops::Range;

/// A record header: content type, legacy version, length.
pub const HEADER: usize = 5;
/// The AEAD tag of every suite TLS 1.3 has.
pub const TAG: usize = 16;
/// The most plaintext one record carries (RFC 8446 §5.1).
pub const MAX_PLAIN: usize = 16 * 1024;
/// The largest ciphertext a record may have (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = MAX_PLAIN + 256;
/// The room a full record takes on the wire: header, plaintext, content type, tag.
pub const SLOT: usize = HEADER + MAX_PLAIN + 1 + TAG;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;

/// Why a record could not be sealed or opened. Messages are sentences about the peer's
/// stream, for `PumpError::Peer`.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("a TLS record failed authentication (bad_record_mac): the stream was altered on the way, or is not from the peer")]
    BadRecordMac,
    #[error("a TLS record of {0} bytes is larger than TLS 1.3 allows (record_overflow)")]
    Overflow(usize),
    #[error("a TLS record of type {0} arrived where only encrypted records may")]
    Unprotected(u8),
    #[error("a TLS record has no content type (all padding)")]
    NoContentType,
    #[error("the peer sent the TLS alert {0}")]
    Alert(String),
    #[error("the peer sent a malformed TLS alert")]
    MalformedAlert,
    #[error("the peer updated its TLS keys (KeyUpdate), which this data path cannot follow")]
    KeyUpdate,
    #[error("the peer sent the TLS handshake message {0} after the handshake")]
    Handshake(u8),
    #[error("a TLS record of content type {0} is not one TLS 1.3 knows")]
    ContentType(u8),
    /// One key may seal at most this many records (AES-128-GCM: 2^24, 256 GiB of full
    /// records); we cannot send a KeyUpdate (see the module docs), so the stream ends.
    #[error(
        "this stream reached the cipher's confidentiality limit of {0} records (16 KiB each) \
         in one direction; with more streams (--multifd N) each carries a part under its own key"
    )]
    Exhausted(u64),
    #[error("the negotiated cipher suite's keys cannot be used by the data path")]
    Key,
}

/// One direction's key, its IV and the next record's sequence number.
struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
    /// Records this key may protect in all (the suite's confidentiality limit).
    limit: u64,
}

impl Keys {
    fn new(seq: u64, secrets: ConnectionTrafficSecrets, limit: u64) -> Result<Keys, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (&CHACHA20_POLY1305, key, iv),
            _ => return Err(RecordError::Key),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Key)?;
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| RecordError::Key)?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
            limit,
        })
    }

    /// The nonce of the next record (RFC 8446 §5.3); each is handed out once.
    fn next_nonce(&mut self) -> Result<Nonce, RecordError> {
        if self.seq >= self.limit {
            return Err(RecordError::Exhausted(self.limit));
        }
        let mut nonce = self.iv;
        for (n, s) in nonce[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *n ^= s;
        }
        self.seq += 1;
        Ok(Nonce::assume_unique_for_key(nonce))
    }
}

/// The sending direction.
pub struct Sealer(Keys);

impl Sealer {
    pub fn new(
        seq: u64,
        secrets: ConnectionTrafficSecrets,
        limit: u64,
    ) -> Result<Self, RecordError> {
        Keys::new(seq, secrets, limit).map(Sealer)
    }

    /// Seals the record whose plaintext (`len` ≤ [`MAX_PLAIN`] bytes) is already in place
    /// at `slot[HEADER..]`; `slot` must have room for the content type and the tag after
    /// it. Returns the record's length on the wire, from `slot[0]`.
    pub fn seal(
        &mut self,
        slot: &mut [u8],
        len: usize,
        content_type: u8,
    ) -> Result<usize, RecordError> {
        let inner = len + 1;
        let wire = HEADER + inner + TAG;
        let header = record_header(inner + TAG);
        slot[..HEADER].copy_from_slice(&header);
        slot[HEADER + len] = content_type;
        let nonce = self.0.next_nonce()?;
        let tag = self
            .0
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), &mut slot[HEADER..HEADER + inner])
            .map_err(|_| RecordError::Key)?;
        slot[HEADER + inner..wire].copy_from_slice(tag.as_ref());
        Ok(wire)
    }

    /// Seals application data that is in place at `slot[HEADER..HEADER + len]`.
    pub fn seal_data(&mut self, slot: &mut [u8], len: usize) -> Result<usize, RecordError> {
        self.seal(slot, len, APPLICATION_DATA)
    }

    /// Writes a sealed close_notify alert at the start of `slot` (at least 64 bytes).
    pub fn seal_close_notify(&mut self, slot: &mut [u8]) -> Result<usize, RecordError> {
        slot[HEADER..HEADER + 2].copy_from_slice(&[1, 0]);
        self.seal(slot, 2, ALERT)
    }
}

fn record_header(len: usize) -> [u8; HEADER] {
    let len = (len as u16).to_be_bytes();
    [APPLICATION_DATA, 3, 3, len[0], len[1]]
}

/// What one opened record carried.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// Application data, at this range of the buffer given to [`Opener::open`].
    Data(Range<usize>),
    /// The peer's close_notify: its direction ended cleanly.
    CloseNotify,
    /// Something that needs no action (a session ticket, a warning alert).
    Nothing,
}

/// The receiving direction.
pub struct Opener(Keys);

impl Opener {
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        // Receiving has no confidentiality limit of ours to keep; a wrap would be an error.
        Keys::new(seq, secrets, u64::MAX).map(Opener)
    }

    /// Opens the record at the start of `buf` in place. Returns `None` if `buf` does not
    /// yet hold all of it, else how many bytes it took and what it carried.
    pub fn open(&mut self, buf: &mut [u8]) -> Result<Option<(usize, Opened)>, RecordError> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let header: [u8; HEADER] = [buf[0], buf[1], buf[2], buf[3], buf[4]];
        if header[0] != APPLICATION_DATA {
            return Err(RecordError::Unprotected(header[0]));
        }
        let len = u16::from_be_bytes([header[3], header[4]]) as usize;
        if len > MAX_CIPHERTEXT {
            return Err(RecordError::Overflow(len));
        }
        if buf.len() < HEADER + len {
            return Ok(None);
        }
        if len < TAG + 1 {
            return Err(RecordError::BadRecordMac);
        }
        let nonce = self.0.next_nonce()?;
        let plain = self
            .0
            .key
            .open_in_place(nonce, Aad::from(header), &mut buf[HEADER..HEADER + len])
            .map_err(|_| RecordError::BadRecordMac)?;
        // The inner plaintext: content, content type, zero padding.
        let Some(end) = plain.iter().rposition(|&b| b != 0) else {
            return Err(RecordError::NoContentType);
        };
        if end > MAX_PLAIN {
            return Err(RecordError::Overflow(end));
        }
        let content = HEADER..HEADER + end;
        let opened = match plain[end] {
            APPLICATION_DATA => Opened::Data(content),
            ALERT => alert(&plain[..end])?,
            HANDSHAKE => handshake(&plain[..end])?,
            other => return Err(RecordError::ContentType(other)),
        };
        Ok(Some((HEADER + len, opened)))
    }
}

/// close_notify ends the direction, user_canceled is a warning; any other alert is fatal.
fn alert(body: &[u8]) -> Result<Opened, RecordError> {
    match body {
        [_, 0] => Ok(Opened::CloseNotify),
        [_, 90] => Ok(Opened::Nothing),
        [_, desc] => Err(RecordError::Alert(format!(
            "{:?}",
            rustls::AlertDescription::from(*desc)
        ))),
        _ => Err(RecordError::MalformedAlert),
    }
}

/// Post-handshake messages: tickets are ignored (we never resume); KeyUpdate cannot be
/// followed, so it ends the stream with an error rather than garbling it.
fn handshake(mut body: &[u8]) -> Result<Opened, RecordError> {
    while !body.is_empty() {
        let [kind, a, b, c, ..] = *body else {
            return Err(RecordError::Handshake(body[0]));
        };
        let len = u32::from_be_bytes([0, a, b, c]) as usize;
        match kind {
            NEW_SESSION_TICKET => {}
            KEY_UPDATE => return Err(RecordError::KeyUpdate),
            other => return Err(RecordError::Handshake(other)),
        }
        body = body.get(4 + len..).ok_or(RecordError::Handshake(kind))?;
    }
    Ok(Opened::Nothing)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AES-256-GCM: `AeadKey::from` takes the 32 bytes of its largest key.
    fn keys() -> ConnectionTrafficSecrets {
        ConnectionTrafficSecrets::Aes256Gcm {
            key: rustls::crypto::cipher::AeadKey::from([7u8; 32]),
            iv: rustls::crypto::cipher::Iv::from([9u8; 12]),
        }
    }

    #[test]
    fn a_sealed_record_opens_to_its_plaintext_and_a_flipped_bit_does_not() {
        let mut s = Sealer::new(0, keys(), 10).expect("sealer");
        let mut o = Opener::new(0, keys()).expect("opener");
        let mut buf = vec![0u8; SLOT];
        buf[HEADER..HEADER + 5].copy_from_slice(b"hello");
        let n = s.seal_data(&mut buf, 5).expect("seal");
        let mut copy = buf[..n].to_vec();
        let (used, opened) = o.open(&mut buf[..n]).expect("open").expect("whole");
        assert_eq!(used, n);
        assert_eq!(opened, Opened::Data(HEADER..HEADER + 5));
        assert_eq!(&buf[HEADER..HEADER + 5], b"hello");

        let mut o = Opener::new(0, keys()).expect("opener");
        copy[HEADER + 2] ^= 1;
        assert!(matches!(o.open(&mut copy), Err(RecordError::BadRecordMac)));
    }

    #[test]
    fn a_record_arriving_in_parts_waits_for_the_rest() {
        let mut s = Sealer::new(0, keys(), 10).expect("sealer");
        let mut o = Opener::new(0, keys()).expect("opener");
        let mut buf = vec![0u8; SLOT];
        let n = s.seal_data(&mut buf, 1000).expect("seal");
        assert!(o.open(&mut buf[..n - 1]).expect("partial").is_none());
        assert!(o.open(&mut buf[..3]).expect("partial").is_none());
        assert!(o.open(&mut buf[..n]).expect("open").is_some());
    }

    #[test]
    fn sealing_stops_at_the_confidentiality_limit() {
        let mut s = Sealer::new(8, keys(), 10).expect("sealer");
        let mut buf = vec![0u8; SLOT];
        s.seal_data(&mut buf, 1).expect("9th");
        s.seal_data(&mut buf, 1).expect("10th");
        assert!(matches!(
            s.seal_data(&mut buf, 1),
            Err(RecordError::Exhausted(10))
        ));
    }

    #[test]
    fn chacha20_poly1305_records_round_trip_too() {
        let chacha = || ConnectionTrafficSecrets::Chacha20Poly1305 {
            key: rustls::crypto::cipher::AeadKey::from([3u8; 32]),
            iv: rustls::crypto::cipher::Iv::from([5u8; 12]),
        };
        let mut s = Sealer::new(7, chacha(), u64::MAX).expect("sealer");
        let mut o = Opener::new(7, chacha()).expect("opener");
        let mut buf = vec![0u8; SLOT];
        buf[HEADER..HEADER + MAX_PLAIN].fill(0xab);
        let n = s.seal_data(&mut buf, MAX_PLAIN).expect("seal");
        assert_eq!(n, SLOT);
        let (_, opened) = o.open(&mut buf).expect("open").expect("whole");
        assert_eq!(opened, Opened::Data(HEADER..HEADER + MAX_PLAIN));
        assert!(buf[HEADER..HEADER + MAX_PLAIN].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn a_close_notify_opens_as_the_end_and_a_fatal_alert_as_an_error() {
        let mut s = Sealer::new(0, keys(), 10).expect("sealer");
        let mut o = Opener::new(0, keys()).expect("opener");
        let mut buf = vec![0u8; SLOT];
        let n = s.seal_close_notify(&mut buf).expect("seal");
        let (_, opened) = o.open(&mut buf[..n]).expect("open").expect("whole");
        assert_eq!(opened, Opened::CloseNotify);
        buf[HEADER..HEADER + 2].copy_from_slice(&[2, 40]); // fatal handshake_failure
        let n = s.seal(&mut buf, 2, ALERT).expect("seal");
        let e = o.open(&mut buf[..n]).expect_err("fatal");
        assert!(e.to_string().contains("HandshakeFailure"), "{e}");
    }

    #[test]
    fn records_out_of_order_or_unprotected_or_too_large_are_refused() {
        let mut s = Sealer::new(0, keys(), 10).expect("sealer");
        let mut buf = vec![0u8; SLOT];
        let n = s.seal_data(&mut buf, 100).expect("first");
        let mut second = buf[..n].to_vec();
        s.seal_data(&mut second, 100).expect("second");
        // The second record first: its nonce is not the one expected.
        let mut o = Opener::new(0, keys()).expect("opener");
        assert!(matches!(
            o.open(&mut second),
            Err(RecordError::BadRecordMac)
        ));
        let mut o = Opener::new(0, keys()).expect("opener");
        let mut plain = [22u8, 3, 3, 0, 1, 0];
        assert!(matches!(
            o.open(&mut plain),
            Err(RecordError::Unprotected(22))
        ));
        let mut huge = [23u8, 3, 3, 0x48, 0x01];
        assert!(matches!(
            o.open(&mut huge),
            Err(RecordError::Overflow(0x4801))
        ));
    }
}
