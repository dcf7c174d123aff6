//! The pump's two buffers, each owned for the whole stream and reused: [`Outbound`] holds
//! the records going to the peer, [`Inbound`] the records that came from it.
//!
//! Outbound, QEMU's bytes are read (one `readv`) straight into the plaintext slots of up
//! to [`SLOTS`] records laid out back to back, sealed there, and written with one `write`.
//! When the key is due for renewal, a KeyUpdate record goes in the room kept before the
//! first slot, sealed before the records after it.
//! Inbound, one large TCP read lands whole records, which are opened where they lie; their
//! plaintext goes to QEMU with one `writev` over the pieces, headers and tags skipped.
//! For the tunnel, records are filled the same way with a frame header first
//! ([`Outbound::fill_framed_from`]), and their plaintext is taken piece by piece
//! ([`Inbound::front`]) by the lanes' parser.
//!
//! What this module must never do: hand QEMU any plaintext before every record read with
//! it has been authenticated, or grow without bound (a buffer is refilled only once it has
//! been emptied).

use super::record::{
    Opened, Opener, RecordError, Sealer, HEADER, KEY_UPDATE_WIRE, MAX_PLAIN, SLOT,
};
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::ops::Range;

/// Records per read from QEMU: 16 × 16 KiB = 256 KiB of plaintext per `readv`.
pub const SLOTS: usize = 16;
/// Room before the first slot for a KeyUpdate record.
const PREFIX: usize = KEY_UPDATE_WIRE;
/// Bytes asked of TCP per read (whole records, mostly).
const TCP_READ: usize = SLOTS * SLOT;
/// At most this many plaintext pieces per `writev` (below every IOV_MAX).
const MAX_IOV: usize = 512;
/// A tunnel frame's header in the plaintext: its lane, then its length (big-endian u16).
pub const FRAME_HEADER: usize = 3;

/// The header of a frame of `len` (< 64 KiB) bytes on `lane`.
pub fn frame_header(lane: u8, len: usize) -> [u8; FRAME_HEADER] {
    let [hi, lo] = (len as u16).to_be_bytes();
    [lane, hi, lo]
}

/// Sealed records waiting for the TCP socket.
pub struct Outbound {
    sealer: Sealer,
    buf: Vec<u8>,
    /// Sealed bytes in `buf`, and how many of them the kernel took.
    len: usize,
    sent: usize,
}

impl Outbound {
    pub fn new(sealer: Sealer) -> Outbound {
        Outbound {
            sealer,
            buf: vec![0u8; PREFIX + SLOTS * SLOT],
            len: 0,
            sent: 0,
        }
    }

    /// Whether every sealed record went to the kernel.
    pub fn is_empty(&self) -> bool {
        self.sent == self.len
    }

    /// Reads from `src` into the plaintext slots of the next records and seals them; the
    /// buffer must be empty. Returns the plaintext bytes read (0: end of stream).
    pub fn fill_from(&mut self, src: &mut impl Read) -> Result<usize, WireError> {
        self.fill(src, None, usize::MAX)
    }

    /// As [`Self::fill_from`], at most `max` bytes, each record's plaintext a frame of
    /// `lane` ([`FRAME_HEADER`] bytes before what `src` gave): the tunnel's bulk data.
    pub fn fill_framed_from(
        &mut self,
        src: &mut impl Read,
        lane: u8,
        max: usize,
    ) -> Result<usize, WireError> {
        self.fill(src, Some(lane), max)
    }

    fn fill(
        &mut self,
        src: &mut impl Read,
        lane: Option<u8>,
        max: usize,
    ) -> Result<usize, WireError> {
        debug_assert!(self.is_empty());
        self.len = 0;
        self.sent = 0;
        let pre = if lane.is_some() { FRAME_HEADER } else { 0 };
        let room = MAX_PLAIN - pre;
        let n = {
            let mut want = max;
            let mut iov: Vec<IoSliceMut<'_>> = Vec::with_capacity(SLOTS);
            for slot in self.buf[PREFIX..PREFIX + SLOTS * SLOT].chunks_exact_mut(SLOT) {
                if want == 0 {
                    break;
                }
                let take = want.min(room);
                want -= take;
                iov.push(IoSliceMut::new(
                    &mut slot[HEADER + pre..HEADER + pre + take],
                ));
            }
            if iov.is_empty() {
                return Err(WireError::Io(std::io::Error::other(
                    "nothing may be read: no room was given",
                )));
            }
            src.read_vectored(&mut iov).map_err(WireError::Io)?
        };
        if n == 0 {
            return Ok(0);
        }
        // The KeyUpdate ends the old key's records; the slots are sealed with the new one.
        // (`sent` and `len` change only once all is sealed: after an error the buffer
        // stays empty.)
        let start = if self.sealer.renewal_due() {
            self.sealer
                .seal_key_update(&mut self.buf[..PREFIX])
                .map_err(WireError::Record)?;
            0
        } else {
            PREFIX
        };
        let mut left = n;
        let mut at = PREFIX;
        while left > 0 {
            let len = left.min(room);
            if let Some(lane) = lane {
                self.buf[at + HEADER..at + HEADER + FRAME_HEADER]
                    .copy_from_slice(&frame_header(lane, len));
            }
            let wire = self
                .sealer
                .seal_data(&mut self.buf[at..at + SLOT], pre + len)
                .map_err(WireError::Record)?;
            // Only the last record may be short, so the records lie back to back.
            at += wire;
            left -= len;
        }
        self.sent = start;
        self.len = at;
        Ok(n)
    }

    /// Seals `data` (any length) as frames of `lane`, one per record, after the records
    /// already waiting.
    pub fn stage_framed(&mut self, lane: u8, data: &[u8]) -> Result<(), RecordError> {
        for chunk in data.chunks(MAX_PLAIN - FRAME_HEADER) {
            self.renew_if_due()?;
            let at = self.room_for_one();
            let body = at + HEADER;
            self.buf[body..body + FRAME_HEADER].copy_from_slice(&frame_header(lane, chunk.len()));
            self.buf[body + FRAME_HEADER..body + FRAME_HEADER + chunk.len()].copy_from_slice(chunk);
            self.len += self
                .sealer
                .seal_data(&mut self.buf[at..at + SLOT], FRAME_HEADER + chunk.len())?;
        }
        Ok(())
    }

    /// Seals `data` (any length) as records after those already waiting.
    pub fn stage(&mut self, data: &[u8]) -> Result<(), RecordError> {
        for chunk in data.chunks(MAX_PLAIN) {
            self.renew_if_due()?;
            let at = self.room_for_one();
            self.buf[at + HEADER..at + HEADER + chunk.len()].copy_from_slice(chunk);
            self.len += self
                .sealer
                .seal_data(&mut self.buf[at..at + SLOT], chunk.len())?;
        }
        Ok(())
    }

    /// Seals a KeyUpdate after the records already waiting, if the key is due for renewal.
    fn renew_if_due(&mut self) -> Result<(), RecordError> {
        if self.sealer.renewal_due() {
            let at = self.room_for_one();
            self.len += self.sealer.seal_key_update(&mut self.buf[at..at + SLOT])?;
        }
        Ok(())
    }

    /// The sealer, to force frequent key renewals in tests.
    #[cfg(test)]
    pub fn sealer_mut(&mut self) -> &mut Sealer {
        &mut self.sealer
    }

    /// Seals a close_notify after the records already waiting.
    pub fn stage_close_notify(&mut self) -> Result<(), RecordError> {
        let at = self.room_for_one();
        self.len += self
            .sealer
            .seal_close_notify(&mut self.buf[at..at + SLOT])?;
        Ok(())
    }

    /// Where the next record goes, with room for a full one.
    fn room_for_one(&mut self) -> usize {
        if self.is_empty() {
            self.len = 0;
            self.sent = 0;
        }
        if self.buf.len() < self.len + SLOT {
            self.buf.resize(self.len + SLOT, 0);
        }
        self.len
    }

    /// Writes what it can to `dst` (nonblocking): the bytes the kernel took.
    pub fn flush_to(&mut self, dst: &mut impl Write) -> std::io::Result<usize> {
        let n = dst.write(&self.buf[self.sent..self.len])?;
        self.sent += n;
        Ok(n)
    }
}

/// Records read from TCP, opened in place, and their plaintext on its way to QEMU.
pub struct Inbound {
    opener: Opener,
    buf: Vec<u8>,
    /// Bytes read into `buf`, and how far whole records were opened.
    filled: usize,
    opened: usize,
    /// Plaintext of the opened records not yet written to QEMU, in order; `ranges[next]`
    /// starts `skip` bytes late.
    ranges: Vec<Range<usize>>,
    next: usize,
    skip: usize,
}

/// What [`Inbound::read_from`] found.
pub struct Arrived {
    /// Bytes read from the socket: 0 is the end of the TCP stream.
    pub read: usize,
    /// Plaintext bytes in the records opened.
    pub plain: usize,
    /// The peer's close_notify came (nothing after it is looked at).
    pub closed: bool,
}

impl Inbound {
    pub fn new(opener: Opener) -> Inbound {
        Inbound {
            opener,
            buf: vec![0u8; TCP_READ + 2 * SLOT],
            filled: 0,
            opened: 0,
            ranges: Vec::with_capacity(SLOTS * 2),
            next: 0,
            skip: 0,
        }
    }

    /// As [`Self::new`], with `tls` (the start of a record that arrived with the handshake
    /// but was not processed by it) read already. Less than one record, normally: a
    /// handshake driver processes every whole record it holds.
    pub fn with_unread(opener: Opener, tls: &[u8]) -> Result<Inbound, RecordError> {
        let mut me = Inbound::new(opener);
        if tls.len() > TCP_READ {
            return Err(RecordError::Overflow(tls.len()));
        }
        me.buf[..tls.len()].copy_from_slice(tls);
        me.filled = tls.len();
        Ok(me)
    }

    /// Whether all plaintext went to QEMU (or to `copy_to`).
    pub fn is_empty(&self) -> bool {
        self.next == self.ranges.len()
    }

    /// Reads once from `src` and opens every whole record. With `copy_to`, plaintext is
    /// appended there (for the decompressor) instead of waiting in place for [`Self::deliver`].
    /// Must be called only when [`Self::is_empty`].
    pub fn read_from(
        &mut self,
        src: &mut impl Read,
        mut copy_to: Option<&mut Vec<u8>>,
    ) -> Result<Arrived, WireError> {
        debug_assert!(self.is_empty());
        // Keep only the partial record at the end, moved to the front.
        self.buf.copy_within(self.opened..self.filled, 0);
        self.filled -= self.opened;
        self.opened = 0;
        self.ranges.clear();
        self.next = 0;
        self.skip = 0;
        let n = src
            .read(&mut self.buf[self.filled..])
            .map_err(WireError::Io)?;
        self.filled += n;
        let mut arrived = Arrived {
            read: n,
            plain: 0,
            closed: false,
        };
        while let Some((used, opened)) = self
            .opener
            .open(&mut self.buf[self.opened..self.filled])
            .map_err(WireError::Record)?
        {
            let at = self.opened;
            self.opened += used;
            match opened {
                Opened::Data(r) if r.is_empty() => {}
                Opened::Data(r) => {
                    let r = at + r.start..at + r.end;
                    arrived.plain += r.len();
                    match copy_to.as_deref_mut() {
                        Some(v) => v.extend_from_slice(&self.buf[r]),
                        None => self.ranges.push(r),
                    }
                }
                Opened::CloseNotify => {
                    arrived.closed = true;
                    break;
                }
                Opened::Nothing => {}
            }
        }
        Ok(arrived)
    }

    /// Writes what it can of the opened plaintext to `dst` (nonblocking): the bytes taken.
    pub fn deliver(&mut self, dst: &mut impl Write) -> std::io::Result<usize> {
        let n = {
            let mut iov: Vec<IoSlice<'_>> =
                Vec::with_capacity((self.ranges.len() - self.next).min(MAX_IOV));
            for (i, r) in self.ranges[self.next..].iter().take(MAX_IOV).enumerate() {
                let start = if i == 0 { r.start + self.skip } else { r.start };
                iov.push(IoSlice::new(&self.buf[start..r.end]));
            }
            dst.write_vectored(&iov)?
        };
        let mut left = n;
        while left > 0 && self.next < self.ranges.len() {
            let r = &self.ranges[self.next];
            let here = r.len() - self.skip;
            if left >= here {
                left -= here;
                self.next += 1;
                self.skip = 0;
            } else {
                self.skip += left;
                left = 0;
            }
        }
        Ok(n)
    }
}

impl Inbound {
    /// The opened plaintext not yet taken, up to the end of its record, and where it
    /// lies in the buffer (see [`Self::slice`]).
    pub fn front(&self) -> Option<(usize, &[u8])> {
        let r = self.ranges.get(self.next)?;
        Some((r.start + self.skip, &self.buf[r.start + self.skip..r.end]))
    }

    /// Plaintext at `r` of the buffer (a place [`Self::front`] gave), until the next read.
    pub fn slice(&self, r: std::ops::Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// Takes `n` bytes (at most [`Self::front`]'s length) of the opened plaintext.
    pub fn consume(&mut self, n: usize) {
        let Some(r) = self.ranges.get(self.next) else {
            return;
        };
        if self.skip + n >= r.len() {
            self.next += 1;
            self.skip = 0;
        } else {
            self.skip += n;
        }
    }

    /// Copies opened plaintext into `dst` (for a reader that owns its buffer, as yamux
    /// does): the bytes copied.
    pub fn read_into(&mut self, dst: &mut [u8]) -> usize {
        let mut n = 0;
        while n < dst.len() && self.next < self.ranges.len() {
            let r = &self.ranges[self.next];
            let from = &self.buf[r.start + self.skip..r.end];
            let take = from.len().min(dst.len() - n);
            dst[n..n + take].copy_from_slice(&from[..take]);
            n += take;
            if take == from.len() {
                self.next += 1;
                self.skip = 0;
            } else {
                self.skip += take;
            }
        }
        n
    }
}

/// Why reading a socket into a buffer failed: the socket, or a record.
#[derive(Debug)]
pub enum WireError {
    Io(std::io::Error),
    Record(RecordError),
}
