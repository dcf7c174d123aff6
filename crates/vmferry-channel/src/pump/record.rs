//! The TLS 1.3 record layer of a pump: records sealed and opened in place, in buffers the
//! pump owns and reuses, with the traffic keys rustls handed over once its handshake was
//! done — what kernel TLS offload does with the same keys, in userspace.
//!
//! rustls' buffered connection copies every record at least twice on the way in (into its
//! deframer, then into a new `Vec` per record, then out again) and once on the way out,
//! with an allocation per record. Here a record's plaintext is read from QEMU's socket
//! straight into the place where it is encrypted, and decrypted where it arrived from TCP.
//! The wire format is unchanged: the peer may be rustls itself.
//!
//! Keys are renewed as TLS 1.3 does it (RFC 8446 §4.6.3): rustls' [`KernelConnection`]
//! (shared by both directions in a [`Renewal`]) derives the next traffic secret. A sender
//! sends a KeyUpdate and switches its key once half the suite's confidentiality limit of
//! records was sealed under one key; a KeyUpdate from the peer switches the receiving key
//! (and, if the peer asks, ours too).
//!
//! What this module must never do: use a nonce twice (sequence numbers only go up, and
//! restart at 0 only with a new key), seal more records under one key than the suite's
//! confidentiality limit, hand out any byte of a record that failed authentication, accept
//! a record larger than TLS 1.3 allows, or panic on anything the peer sent.

use aws_lc_rs::aead::{
    Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305,
};
use rustls::client::ClientConnectionData;
use rustls::kernel::KernelConnection;
use rustls::server::ServerConnectionData;
use rustls::ConnectionTrafficSecrets;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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
/// A KeyUpdate message: type, 3-byte length, request_update.
const KEY_UPDATE_MSG: usize = 5;
/// The record of one KeyUpdate on the wire.
pub const KEY_UPDATE_WIRE: usize = HEADER + KEY_UPDATE_MSG + 1 + TAG;

const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
const HANDSHAKE: u8 = 22;
const NEW_SESSION_TICKET: u8 = 4;
const KEY_UPDATE: u8 = 24;
/// KeyUpdateRequest values (RFC 8446 §4.6.3).
const UPDATE_NOT_REQUESTED: u8 = 0;
const UPDATE_REQUESTED: u8 = 1;

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
    #[error("the peer sent the TLS alert {0:?}")]
    Alert(rustls::AlertDescription),
    #[error("the peer sent a malformed TLS alert")]
    MalformedAlert,
    #[error(
        "the peer updated its TLS keys (KeyUpdate) on a connection whose keys cannot be renewed"
    )]
    KeyUpdate,
    #[error("the peer sent a TLS KeyUpdate with request_update {0}, which is neither 0 nor 1 (illegal_parameter)")]
    KeyUpdateValue(u8),
    #[error("the peer sent a malformed TLS KeyUpdate (decode_error)")]
    MalformedKeyUpdate,
    #[error("the peer sent more after a TLS KeyUpdate in the same record (unexpected_message)")]
    AfterKeyUpdate,
    #[error("the peer sent the TLS handshake message {0} after the handshake")]
    Handshake(u8),
    #[error("the peer sent a truncated TLS handshake message (type {0}) after the handshake")]
    TruncatedHandshake(u8),
    #[error("a TLS record of content type {0} is not one TLS 1.3 knows")]
    ContentType(u8),
    /// One key may seal at most this many records (AES-128-GCM: 2^24, 256 GiB of full
    /// records). Keys are renewed long before; only a connection without a [`Renewal`]
    /// (a test) gets here.
    #[error("this stream reached the cipher's confidentiality limit of {0} records in one direction without renewing its key")]
    Exhausted(u64),
    #[error("the negotiated cipher suite's keys cannot be used by the data path")]
    Key,
    #[error("cannot derive the next TLS traffic secret: {0}")]
    Renew(String),
}

/// rustls' half of a connection whose records we seal and open: it derives the next
/// traffic secrets after a KeyUpdate.
pub enum Kernel {
    Client(KernelConnection<ClientConnectionData>),
    Server(KernelConnection<ServerConnectionData>),
}

/// What both directions of one connection share to renew their keys. Used once per
/// KeyUpdate (every 2^23 records at the most), so a mutex costs nothing.
pub struct Renewal {
    kernel: Mutex<Kernel>,
    /// The peer asked us (update_requested) to renew our sending key too.
    tx_requested: AtomicBool,
    /// KeyUpdates sent and followed.
    sent: AtomicU64,
    received: AtomicU64,
}

impl Renewal {
    pub fn new(kernel: Kernel) -> Arc<Renewal> {
        Arc::new(Renewal {
            kernel: Mutex::new(kernel),
            tx_requested: AtomicBool::new(false),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        })
    }

    /// KeyUpdates (sent, followed) so far.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed),
        )
    }

    fn next(&self, tx: bool) -> Result<(u64, ConnectionTrafficSecrets), RecordError> {
        // A poisoned lock means another thread panicked mid-call; the kernel state is
        // only ever replaced whole by rustls, so it is still consistent.
        let mut k = self.kernel.lock().unwrap_or_else(|p| p.into_inner());
        let r = match (&mut *k, tx) {
            (Kernel::Client(c), true) => c.update_tx_secret(),
            (Kernel::Client(c), false) => c.update_rx_secret(),
            (Kernel::Server(c), true) => c.update_tx_secret(),
            (Kernel::Server(c), false) => c.update_rx_secret(),
        };
        r.map_err(|e| RecordError::Renew(e.to_string()))
    }
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
pub struct Sealer {
    keys: Keys,
    /// Renew the key once this many records were sealed under it.
    renew_at: u64,
    renewal: Option<Arc<Renewal>>,
    /// Our KeyUpdates ask the peer to update too (tests only: we never need it).
    #[cfg(test)]
    pub request_peer_update: bool,
}

impl Sealer {
    /// A sealer that cannot renew its key: it stops at `limit` records. For tests and
    /// the fuzz target (fuzz/fuzz_targets/record_layer.rs), which compiles this file.
    #[allow(dead_code)]
    pub fn new(
        seq: u64,
        secrets: ConnectionTrafficSecrets,
        limit: u64,
    ) -> Result<Self, RecordError> {
        Ok(Sealer {
            keys: Keys::new(seq, secrets, limit)?,
            renew_at: u64::MAX,
            renewal: None,
            #[cfg(test)]
            request_peer_update: false,
        })
    }

    /// A sealer that renews its key (through `renewal`) every `renew_at` records; the
    /// caller keeps `renew_at` well below `limit` (the pump uses half of it).
    pub fn renewing(
        seq: u64,
        secrets: ConnectionTrafficSecrets,
        limit: u64,
        renew_at: u64,
        renewal: Arc<Renewal>,
    ) -> Result<Self, RecordError> {
        Ok(Sealer {
            keys: Keys::new(seq, secrets, limit)?,
            renew_at: renew_at.clamp(1, limit),
            renewal: Some(renewal),
            #[cfg(test)]
            request_peer_update: false,
        })
    }

    /// Renews after this many records per key from now on (tests force frequent updates).
    #[cfg(test)]
    pub fn set_renew_at(&mut self, records: u64) {
        self.renew_at = records.clamp(1, self.keys.limit);
    }

    /// Whether the next record must be preceded by a KeyUpdate ([`Self::seal_key_update`]).
    pub fn renewal_due(&self) -> bool {
        self.renewal.as_ref().is_some_and(|r| {
            self.keys.seq >= self.renew_at || r.tx_requested.load(Ordering::SeqCst)
        })
    }

    /// Writes a KeyUpdate (update_not_requested) at the start of `slot` (at least
    /// [`KEY_UPDATE_WIRE`] bytes), sealed with the current key, then switches to the next
    /// key at sequence 0. Returns the record's length on the wire.
    pub fn seal_key_update(&mut self, slot: &mut [u8]) -> Result<usize, RecordError> {
        let Some(renewal) = self.renewal.clone() else {
            return Err(RecordError::Exhausted(self.keys.limit));
        };
        #[cfg(not(test))]
        let request = UPDATE_NOT_REQUESTED;
        #[cfg(test)]
        let request = if self.request_peer_update {
            UPDATE_REQUESTED
        } else {
            UPDATE_NOT_REQUESTED
        };
        slot[HEADER..HEADER + KEY_UPDATE_MSG].copy_from_slice(&[KEY_UPDATE, 0, 0, 1, request]);
        let wire = self.seal(slot, KEY_UPDATE_MSG, HANDSHAKE)?;
        // A request from the peer is answered by this update; clear it before deriving,
        // so that a request arriving meanwhile asks for another one.
        renewal.tx_requested.store(false, Ordering::SeqCst);
        let (seq, secrets) = renewal.next(true)?;
        self.keys = Keys::new(seq, secrets, self.keys.limit)?;
        renewal.sent.fetch_add(1, Ordering::Relaxed);
        Ok(wire)
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
        let nonce = self.keys.next_nonce()?;
        let tag = self
            .keys
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
    /// Something that needs no action (a session ticket, a warning alert), or a KeyUpdate
    /// that was followed.
    Nothing,
}

/// The receiving direction.
pub struct Opener {
    keys: Keys,
    renewal: Option<Arc<Renewal>>,
}

impl Opener {
    /// An opener that cannot follow a KeyUpdate (it ends the stream with an error). For
    /// tests and the fuzz target.
    #[allow(dead_code)]
    pub fn new(seq: u64, secrets: ConnectionTrafficSecrets) -> Result<Self, RecordError> {
        // Receiving has no confidentiality limit of ours to keep; a wrap would be an error.
        Ok(Opener {
            keys: Keys::new(seq, secrets, u64::MAX)?,
            renewal: None,
        })
    }

    /// An opener that follows the peer's KeyUpdates through `renewal`.
    pub fn renewing(
        seq: u64,
        secrets: ConnectionTrafficSecrets,
        renewal: Arc<Renewal>,
    ) -> Result<Self, RecordError> {
        Ok(Opener {
            keys: Keys::new(seq, secrets, u64::MAX)?,
            renewal: Some(renewal),
        })
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
        let nonce = self.keys.next_nonce()?;
        let plain = self
            .keys
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
            HANDSHAKE => match handshake(&plain[..end])? {
                None => Opened::Nothing,
                Some(requested) => {
                    self.follow_key_update(requested)?;
                    Opened::Nothing
                }
            },
            other => return Err(RecordError::ContentType(other)),
        };
        Ok(Some((HEADER + len, opened)))
    }

    /// The peer switched its key after the KeyUpdate just opened: so do we, at sequence
    /// 0; if it asked, our sending direction renews before its next record.
    fn follow_key_update(&mut self, requested: bool) -> Result<(), RecordError> {
        let Some(renewal) = &self.renewal else {
            return Err(RecordError::KeyUpdate);
        };
        let (seq, secrets) = renewal.next(false)?;
        self.keys = Keys::new(seq, secrets, u64::MAX)?;
        renewal.received.fetch_add(1, Ordering::Relaxed);
        if requested {
            renewal.tx_requested.store(true, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// close_notify ends the direction, user_canceled is a warning; any other alert is fatal.
fn alert(body: &[u8]) -> Result<Opened, RecordError> {
    match body {
        [_, 0] => Ok(Opened::CloseNotify),
        [_, 90] => Ok(Opened::Nothing),
        [_, desc] => Err(RecordError::Alert(rustls::AlertDescription::from(*desc))),
        _ => Err(RecordError::MalformedAlert),
    }
}

/// Post-handshake messages. Tickets are ignored: no data connection resumes (servers send
/// none, clients keep none). A KeyUpdate must be the record's last message (RFC 8446
/// §5.1: handshake messages must not span a key change): `Some(update_requested)`.
/// Anything else is an error naming it.
fn handshake(mut body: &[u8]) -> Result<Option<bool>, RecordError> {
    while let Some(&kind) = body.first() {
        let [_, a, b, c, ref rest @ ..] = *body else {
            return Err(RecordError::TruncatedHandshake(kind));
        };
        let len = u32::from_be_bytes([0, a, b, c]) as usize;
        let Some(msg) = rest.get(..len) else {
            return Err(RecordError::TruncatedHandshake(kind));
        };
        match kind {
            NEW_SESSION_TICKET => {}
            KEY_UPDATE => {
                let requested = match *msg {
                    [UPDATE_NOT_REQUESTED] => false,
                    [UPDATE_REQUESTED] => true,
                    [other] => return Err(RecordError::KeyUpdateValue(other)),
                    _ => return Err(RecordError::MalformedKeyUpdate),
                };
                if rest.len() > len {
                    return Err(RecordError::AfterKeyUpdate);
                }
                return Ok(Some(requested));
            }
            other => return Err(RecordError::Handshake(other)),
        }
        body = &rest[len..];
    }
    Ok(None)
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

    /// Seals `body` as one handshake record and opens it with an opener that cannot
    /// renew keys.
    fn open_handshake(body: &[u8]) -> Result<Option<(usize, Opened)>, RecordError> {
        let mut s = Sealer::new(0, keys(), 10).expect("sealer");
        let mut o = Opener::new(0, keys()).expect("opener");
        let mut buf = vec![0u8; SLOT];
        buf[HEADER..HEADER + body.len()].copy_from_slice(body);
        let n = s.seal(&mut buf, body.len(), HANDSHAKE).expect("seal");
        o.open(&mut buf[..n])
    }

    #[test]
    fn post_handshake_messages_are_parsed_strictly() {
        assert!(matches!(
            open_handshake(&[24, 0, 0, 1, 2]),
            Err(RecordError::KeyUpdateValue(2))
        ));
        assert!(matches!(
            open_handshake(&[24, 0, 0, 2, 0, 0]),
            Err(RecordError::MalformedKeyUpdate)
        ));
        assert!(matches!(
            open_handshake(&[24, 0, 0, 1, 0, 4, 0, 0, 0]),
            Err(RecordError::AfterKeyUpdate)
        ));
        // A valid KeyUpdate, on a connection that cannot renew its keys.
        assert!(matches!(
            open_handshake(&[24, 0, 0, 1, 1]),
            Err(RecordError::KeyUpdate)
        ));
        assert!(matches!(
            open_handshake(&[4, 0, 0, 9, 1]),
            Err(RecordError::TruncatedHandshake(4))
        ));
        assert!(matches!(
            open_handshake(&[24, 0]),
            Err(RecordError::TruncatedHandshake(24))
        ));
        assert!(matches!(
            open_handshake(&[20, 0, 0, 0]),
            Err(RecordError::Handshake(20))
        ));
        // Session tickets are read past.
        assert!(matches!(
            open_handshake(&[4, 0, 0, 2, 0xaa, 0xbb, 4, 0, 0, 0]),
            Ok(Some((_, Opened::Nothing)))
        ));
    }

    #[test]
    fn a_key_update_record_fits_the_room_kept_for_it() {
        let mut s = Sealer::new(0, keys(), 10).expect("sealer");
        let mut buf = vec![0u8; KEY_UPDATE_WIRE];
        buf[HEADER..HEADER + KEY_UPDATE_MSG].copy_from_slice(&[24, 0, 0, 1, 0]);
        assert_eq!(
            s.seal(&mut buf, KEY_UPDATE_MSG, HANDSHAKE).expect("seal"),
            KEY_UPDATE_WIRE
        );
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
