//! Bounded little-endian readers shared by the decoders.

use crate::error::DecodeError;
use bytes::{Buf, Bytes};

/// A cursor over a frame body that never reads past its end.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Truncated {
                needed: n - self.remaining(),
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    /// A UTF-8 string prefixed by a `u8` length, at most `max` bytes.
    pub(crate) fn str8(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        let n = self.u8()? as usize;
        self.text(what, n, max)
    }

    /// A UTF-8 string prefixed by a `u16` length, at most `max` bytes.
    pub(crate) fn str16(&mut self, what: &'static str, max: usize) -> Result<String, DecodeError> {
        let n = self.u16()? as usize;
        self.text(what, n, max)
    }

    fn text(&mut self, what: &'static str, n: usize, max: usize) -> Result<String, DecodeError> {
        if n > max {
            return Err(DecodeError::TooLarge {
                what,
                got: n,
                limit: max,
            });
        }
        let b = self.take(n)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Utf8(what))
    }

    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Reads a little-endian `u32` at `off` of a slice known to be long enough.
#[inline]
pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

/// Reads a little-endian `u64` at `off` of a slice known to be long enough.
#[inline]
pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

/// Splits `n` bytes off the front of `buf`, or says how many are missing.
pub(crate) fn split_front(buf: &mut Bytes, n: usize) -> Result<Bytes, DecodeError> {
    if buf.remaining() < n {
        return Err(DecodeError::Truncated {
            needed: n - buf.remaining(),
        });
    }
    if n == buf.len() {
        // The whole buffer: no reference count to raise, and a buffer made
        // from a Vec is not promoted to a shared one (an allocation).
        return Ok(std::mem::take(buf));
    }
    Ok(buf.split_to(n))
}
