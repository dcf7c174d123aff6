//! The compression filter: zstd over a migration stream's plaintext, between QEMU's socket
//! and the TLS layer (compress, then encrypt; decrypt, then decompress).
//!
//! One zstd frame per stream direction, flushed after every chunk read from the local
//! socket, so the receiver can always hand QEMU everything the sender has read: a
//! migration stream is a conversation (the return path answers), and a filter that held
//! bytes back would stall it.
//!
//! What this module must never do: let a peer make it allocate without bound. The
//! decoder's window is capped ([`MAX_WINDOW_LOG`]), and output is produced only up to the
//! room the caller offers, however far the input would expand (a zstd "bomb" of zeros
//! yields its output a chunk at a time as the local socket drains).
//!
//! Compression is off by default: guest RAM that is random or already compressed costs
//! CPU and gains nothing, and QEMU already sends zero pages as flags. It pays where the
//! network, not the CPU, is the bottleneck and memory compresses (text, page cache).

pub use vmferry_proto::cookie::{Compression, COMPRESSION_LEVELS};
use zstd::stream::raw::{Decoder, Encoder, InBuffer, Operation, OutBuffer};

/// The largest zstd window a decoder accepts: 2^23 = 8 MiB (levels up to 19 use ≤ 8 MiB).
pub const MAX_WINDOW_LOG: u32 = 23;

/// The filters a stream applies between the local socket and TLS; both ends of a stream
/// must use the same (the migration's cookie carries them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Filters {
    pub compress: Compression,
}

impl Filters {
    /// The receiving half of these filters, if they compress.
    pub fn decompressor(&self) -> Result<Option<Decompressor>, CompressError> {
        match self.compress {
            Compression::None => Ok(None),
            Compression::Zstd { .. } => Decompressor::new().map(Some),
        }
    }
}

/// Why a filter failed. Each message is a whole sentence, as before the type existed.
#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    #[error("cannot start zstd level {level}: {source}")]
    Start {
        level: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("zstd compression failed: {0}")]
    Compress(#[source] std::io::Error),
    #[error("cannot start zstd: {0}")]
    StartDecoder(#[source] std::io::Error),
    #[error("cannot limit zstd's window: {0}")]
    LimitWindow(#[source] std::io::Error),
    #[error("the peer's compressed stream cannot be decoded: {0}")]
    Corrupt(#[source] std::io::Error),
    #[error("the peer's compressed stream makes no progress")]
    NoProgress,
}

/// The sending side of a stream's filters, for pumps and tunnel alike: what to hand TLS
/// (or the mux) for what QEMU sent, and what ends the stream.
#[derive(Debug)]
pub struct Outgoing {
    compressor: Option<Compressor>,
    buf: Vec<u8>,
}

impl Outgoing {
    pub fn new(filters: &Filters) -> Result<Outgoing, CompressError> {
        let compressor = match filters.compress {
            Compression::None => None,
            Compression::Zstd { level } => Some(Compressor::new(level)?),
        };
        Ok(Outgoing {
            compressor,
            buf: Vec::new(),
        })
    }

    /// Whether [`Self::pass`] changes what it is given (else the caller may skip it).
    pub fn compresses(&self) -> bool {
        self.compressor.is_some()
    }

    /// The bytes to send for `input`: `input` itself, or its compressed, flushed form.
    pub fn pass<'a>(&'a mut self, input: &'a [u8]) -> Result<&'a [u8], CompressError> {
        match self.compressor.as_mut() {
            None => Ok(input),
            Some(c) => {
                self.buf.clear();
                c.compress(input, &mut self.buf)?;
                Ok(&self.buf)
            }
        }
    }

    /// The bytes that end the stream (the end of the frame), or none.
    pub fn finish(&mut self) -> Result<&[u8], CompressError> {
        self.buf.clear();
        if let Some(c) = self.compressor.as_mut() {
            c.finish(&mut self.buf)?;
        }
        Ok(&self.buf)
    }
}

/// The sending half: local plaintext in, compressed bytes out.
pub struct Compressor {
    enc: Encoder<'static>,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Compressor")
    }
}

impl Compressor {
    pub fn new(level: i32) -> Result<Compressor, CompressError> {
        Encoder::new(level)
            .map(|enc| Compressor { enc })
            .map_err(|source| CompressError::Start { level, source })
    }

    /// Compresses `input` and flushes, so everything in it can be decoded from what is
    /// appended to `out`.
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), CompressError> {
        let mut inb = InBuffer::around(input);
        while inb.pos < input.len() {
            self.step(out, |enc, o| enc.run(&mut inb, o).map(|_| ()))?;
        }
        loop {
            let mut left = 0;
            self.step(out, |enc, o| {
                left = enc.flush(o)?;
                Ok(())
            })?;
            if left == 0 {
                return Ok(());
            }
        }
    }

    /// Ends the frame: the receiver checks it saw the end, so a cut stream is noticed.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), CompressError> {
        loop {
            let mut left = 0;
            self.step(out, |enc, o| {
                left = enc.finish(o, true)?;
                Ok(())
            })?;
            if left == 0 {
                return Ok(());
            }
        }
    }

    /// Runs `f` with at least 64 KiB of room at the end of `out`; keeps what it wrote.
    fn step(
        &mut self,
        out: &mut Vec<u8>,
        f: impl FnOnce(&mut Encoder<'static>, &mut OutBuffer<'_, [u8]>) -> std::io::Result<()>,
    ) -> Result<usize, CompressError> {
        const ROOM: usize = 64 * 1024;
        let start = out.len();
        out.resize(start + ROOM, 0);
        let mut ob = OutBuffer::around(&mut out[start..]);
        let r = f(&mut self.enc, &mut ob);
        let n = ob.pos();
        out.truncate(start + n);
        r.map_err(CompressError::Compress)?;
        Ok(n)
    }
}

/// The receiving half: compressed bytes in, plaintext out, never more than asked for.
pub struct Decompressor {
    dec: Decoder<'static>,
    /// Whether the last call ended exactly at the end of a frame.
    at_frame_end: bool,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    pub fn new() -> Result<Decompressor, CompressError> {
        let mut dec = Decoder::new().map_err(CompressError::StartDecoder)?;
        dec.set_parameter(zstd::stream::raw::DParameter::WindowLogMax(MAX_WINDOW_LOG))
            .map_err(CompressError::LimitWindow)?;
        Ok(Decompressor {
            dec,
            at_frame_end: false,
        })
    }

    /// Decodes from `input`, appending at most `room` bytes to `out`; returns how much of
    /// `input` it used. Less than all of it means `out` took `room` bytes: call again once
    /// they are gone. A peer's corrupt or oversized frame is an error naming zstd's cause.
    pub fn decompress(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        room: usize,
    ) -> Result<usize, CompressError> {
        let start = out.len();
        out.resize(start + room, 0);
        let mut inb = InBuffer::around(input);
        let mut ob = OutBuffer::around(&mut out[start..]);
        let mut result = Ok(());
        while inb.pos < input.len() && ob.pos() < room {
            let before = (inb.pos, ob.pos());
            match self.dec.run(&mut inb, &mut ob) {
                Ok(hint) => self.note(hint, (inb.pos, ob.pos()) != before),
                Err(e) => {
                    result = Err(CompressError::Corrupt(e));
                    break;
                }
            }
            if (inb.pos, ob.pos()) == before {
                result = Err(CompressError::NoProgress);
                break;
            }
        }
        // zstd may hold decoded bytes back until asked again with room: drain them.
        while result.is_ok() && inb.pos == input.len() && ob.pos() < room {
            let before = ob.pos();
            match self.dec.run(&mut InBuffer::around(&[]), &mut ob) {
                Ok(hint) => self.note(hint, ob.pos() != before),
                Err(e) => result = Err(CompressError::Corrupt(e)),
            }
            if ob.pos() == before {
                break;
            }
        }
        let used = inb.pos;
        let n = ob.pos();
        out.truncate(start + n);
        result.map(|()| used)
    }

    /// After a frame's end zstd expects the next frame's header: asked again with nothing
    /// to do, it answers with that header's size. Only a call that moved bytes can leave
    /// the end of a frame.
    fn note(&mut self, hint: usize, moved: bool) {
        if hint == 0 {
            self.at_frame_end = true;
        } else if moved {
            self.at_frame_end = false;
        }
    }

    /// Whether everything decoded so far ends a whole frame: a stream that closes
    /// elsewhere was cut (or its sender never finished it).
    pub fn at_frame_end(&self) -> bool {
        self.at_frame_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(data: &[u8], level: i32, chunk: usize, room: usize) -> (Vec<u8>, usize) {
        let mut c = Compressor::new(level).expect("encoder");
        let mut wire = Vec::new();
        for piece in data.chunks(chunk) {
            c.compress(piece, &mut wire).expect("compress");
        }
        c.finish(&mut wire).expect("finish");
        let mut d = Decompressor::new().expect("decoder");
        let mut out = Vec::new();
        let mut at = 0;
        while at < wire.len() || !d.at_frame_end() {
            let before = out.len();
            at += d
                .decompress(&wire[at..], &mut out, room)
                .expect("decompress");
            assert!(out.len() - before <= room, "more output than room");
            if at == wire.len() && out.len() == before {
                break;
            }
        }
        assert!(d.at_frame_end(), "frame not ended");
        // Asked again with nothing left (as a pump does before it ends), still at the end.
        assert_eq!(d.decompress(&[], &mut out, room).expect("again"), 0);
        assert!(d.at_frame_end(), "an empty call left the end of the frame");
        (out, wire.len())
    }

    #[test]
    fn text_shrinks_and_comes_back_byte_exact() {
        let text: Vec<u8> = (0..4 << 20)
            .map(|i: u32| b"guest page cache, mostly text. "[(i % 31) as usize])
            .collect();
        let (out, wire) = roundtrip(&text, 1, 256 * 1024, 256 * 1024);
        assert_eq!(out, text);
        assert!(wire < text.len() / 20, "{wire} of {}", text.len());
    }

    #[test]
    fn every_flushed_chunk_decodes_without_waiting_for_the_next() {
        let mut c = Compressor::new(3).expect("encoder");
        let mut d = Decompressor::new().expect("decoder");
        for i in 0..50u8 {
            let msg = vec![i; 1000 + i as usize];
            let mut wire = Vec::new();
            c.compress(&msg, &mut wire).expect("compress");
            let mut out = Vec::new();
            let used = d.decompress(&wire, &mut out, 1 << 20).expect("decompress");
            assert_eq!(used, wire.len());
            assert_eq!(out, msg, "chunk {i} held back");
        }
    }

    #[test]
    fn a_bomb_expands_only_as_far_as_the_room_offered() {
        let zeros = vec![0u8; 64 << 20];
        let mut c = Compressor::new(19).expect("encoder");
        let mut wire = Vec::new();
        c.compress(&zeros, &mut wire).expect("compress");
        assert!(wire.len() < 64 << 10, "{}", wire.len());
        let mut d = Decompressor::new().expect("decoder");
        let mut out = Vec::new();
        let used = d.decompress(&wire, &mut out, 100_000).expect("decompress");
        assert_eq!(out.len(), 100_000);
        assert!(used <= wire.len());
    }

    #[test]
    fn random_bytes_pass_through_a_small_buffer() {
        let data = crate::testing::noise(0x1234_5678_9abc_def0, 1 << 20);
        let (out, wire) = roundtrip(&data, -3, 100_000, 4096);
        assert_eq!(out, data);
        assert!(wire < data.len() + data.len() / 50, "{wire}");
    }

    #[test]
    fn garbage_and_a_cut_frame_are_errors_not_panics() {
        let mut d = Decompressor::new().expect("decoder");
        let e = d
            .decompress(b"this is not zstd at all", &mut Vec::new(), 4096)
            .expect_err("garbage")
            .to_string();
        assert!(e.contains("cannot be decoded"), "{e}");

        let mut c = Compressor::new(1).expect("encoder");
        let mut wire = Vec::new();
        c.compress(b"hello hello hello", &mut wire)
            .expect("compress");
        let mut d = Decompressor::new().expect("decoder");
        let mut out = Vec::new();
        d.decompress(&wire, &mut out, 4096).expect("decompress");
        assert_eq!(out, b"hello hello hello");
        assert!(
            !d.at_frame_end(),
            "a flushed but unfinished frame is not an end"
        );
    }

    #[test]
    fn a_window_beyond_the_cap_is_refused() {
        let mut enc = Encoder::new(1).expect("encoder");
        enc.set_parameter(zstd::stream::raw::CParameter::WindowLog(27))
            .expect("window");
        enc.set_parameter(zstd::stream::raw::CParameter::EnableLongDistanceMatching(
            true,
        ))
        .expect("ldm");
        let data = vec![7u8; 1 << 20];
        let mut wire = vec![0u8; 1 << 20];
        let mut ob = OutBuffer::around(&mut wire[..]);
        enc.run(&mut InBuffer::around(&data), &mut ob).expect("run");
        enc.finish(&mut ob, true).expect("finish");
        let n = ob.pos();
        let mut d = Decompressor::new().expect("decoder");
        let e = d
            .decompress(&wire[..n], &mut Vec::new(), 4096)
            .expect_err("window too large")
            .to_string();
        assert!(e.contains("cannot be decoded"), "{e}");
    }

    #[test]
    fn levels_outside_zstds_range_are_refused_by_name() {
        assert!(Compression::Zstd { level: 3 }.check().is_ok());
        let e = Compression::Zstd { level: 40 }
            .check()
            .expect_err("40")
            .to_string();
        assert!(e.contains("level 40"), "{e}");
        assert_eq!(Compression::default(), Compression::None);
    }
}
