//! A bounds-checked msgpack reader over a byte slice.
//!
//! Nothing here allocates: values are read as [`Head`]s (the marker and its length fields) and
//! payloads are borrowed from the input. Every length is compared with the bytes that can still
//! follow before the reader moves, so a hostile length can only ever produce an error.
//!
//! Running out of input means one of two things, chosen when the reader is built:
//! - on a network stream ([`Reader::stream`]) more bytes may still arrive, so it is
//!   [`DecodeError::Incomplete`] — unless the value could not fit within the frame-size limit
//!   anyway, which is [`DecodeError::Invalid`];
//! - on a slice known to be whole ([`Reader::whole`], e.g. the payload of a PackedForward
//!   `bin`), nothing more will come, so it is always [`DecodeError::Invalid`].

use super::{DecodeError, Limits};

/// The marker of one msgpack value, with its length fields read but its payload not.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Head {
    Nil,
    Bool(bool),
    /// Any non-negative integer (positive fixint and uint 8-64).
    Uint(u64),
    /// A negative integer (negative fixint and int 8-64 below zero).
    Int(i64),
    F32(f32),
    F64(f64),
    /// Byte length of the UTF-8 payload that follows.
    Str(usize),
    Bin(usize),
    /// Number of elements that follow.
    Array(usize),
    /// Number of key/value pairs that follow.
    Map(usize),
    /// Extension type and payload length.
    Ext(i8, usize),
}

#[derive(Clone)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// No value may extend past this offset: the frame-size limit on a stream, the slice
    /// length on a whole slice.
    bound: usize,
    /// Whether `buf` is all there will ever be (so running out is Invalid, not Incomplete).
    whole: bool,
}

impl<'a> Reader<'a> {
    /// A reader over the start of a stream; at most `max_frame_bytes` will be read.
    pub(crate) fn stream(buf: &'a [u8], max_frame_bytes: usize) -> Self {
        Reader { buf, pos: 0, bound: max_frame_bytes, whole: false }
    }

    /// A reader over a slice that is complete by construction.
    pub(crate) fn whole(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0, bound: buf.len(), whole: true }
    }

    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    /// Checks that `n` more bytes can be read from the current position.
    #[inline]
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        // `pos <= bound` always holds: the reader only moves after this check passed.
        if n > self.bound - self.pos {
            return Err(DecodeError::Invalid(if self.whole {
                "a msgpack value runs past the end of its enclosing bytes".into()
            } else {
                format!("frame is larger than the {}-byte limit", self.bound)
            }));
        }
        if n > self.buf.len().saturating_sub(self.pos) {
            return Err(if self.whole {
                DecodeError::Invalid("a msgpack value runs past the end of its enclosing bytes".into())
            } else {
                DecodeError::Incomplete
            });
        }
        Ok(())
    }

    /// Consumes `n` bytes and returns them.
    #[inline]
    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        self.need(n)?;
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    #[inline]
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    #[inline]
    fn be<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    #[inline]
    fn len8(&mut self) -> Result<usize, DecodeError> {
        Ok(self.u8()? as usize)
    }

    #[inline]
    fn len16(&mut self) -> Result<usize, DecodeError> {
        Ok(u16::from_be_bytes(self.be()?) as usize)
    }

    #[inline]
    fn len32(&mut self) -> Result<usize, DecodeError> {
        Ok(u32::from_be_bytes(self.be()?) as usize)
    }

    /// Reads one marker and its length fields, leaving the payload (string bytes, elements,
    /// ext data) unread. The one byte msgpack reserves (0xc1) is Invalid.
    #[inline]
    pub(crate) fn head(&mut self) -> Result<Head, DecodeError> {
        let m = self.u8()?;
        Ok(match m {
            0x00..=0x7f => Head::Uint(m as u64),
            0x80..=0x8f => Head::Map((m & 0x0f) as usize),
            0x90..=0x9f => Head::Array((m & 0x0f) as usize),
            0xa0..=0xbf => Head::Str((m & 0x1f) as usize),
            0xc0 => Head::Nil,
            0xc1 => return Err(DecodeError::Invalid("reserved msgpack byte 0xc1".into())),
            0xc2 => Head::Bool(false),
            0xc3 => Head::Bool(true),
            0xc4 => Head::Bin(self.len8()?),
            0xc5 => Head::Bin(self.len16()?),
            0xc6 => Head::Bin(self.len32()?),
            0xc7 => {
                let n = self.len8()?;
                Head::Ext(self.u8()? as i8, n)
            }
            0xc8 => {
                let n = self.len16()?;
                Head::Ext(self.u8()? as i8, n)
            }
            0xc9 => {
                let n = self.len32()?;
                Head::Ext(self.u8()? as i8, n)
            }
            0xca => Head::F32(f32::from_be_bytes(self.be()?)),
            0xcb => Head::F64(f64::from_be_bytes(self.be()?)),
            0xcc => Head::Uint(self.u8()? as u64),
            0xcd => Head::Uint(u16::from_be_bytes(self.be()?) as u64),
            0xce => Head::Uint(u32::from_be_bytes(self.be()?) as u64),
            0xcf => Head::Uint(u64::from_be_bytes(self.be()?)),
            0xd0 => int(self.u8()? as i8 as i64),
            0xd1 => int(i16::from_be_bytes(self.be()?) as i64),
            0xd2 => int(i32::from_be_bytes(self.be()?) as i64),
            0xd3 => int(i64::from_be_bytes(self.be()?)),
            0xd4 => Head::Ext(self.u8()? as i8, 1),
            0xd5 => Head::Ext(self.u8()? as i8, 2),
            0xd6 => Head::Ext(self.u8()? as i8, 4),
            0xd7 => Head::Ext(self.u8()? as i8, 8),
            0xd8 => Head::Ext(self.u8()? as i8, 16),
            0xd9 => Head::Str(self.len8()?),
            0xda => Head::Str(self.len16()?),
            0xdb => Head::Str(self.len32()?),
            0xdc => Head::Array(self.len16()?),
            0xdd => Head::Array(self.len32()?),
            0xde => Head::Map(self.len16()?),
            0xdf => Head::Map(self.len32()?),
            0xe0..=0xff => Head::Int(m as i8 as i64),
        })
    }

    /// Checks that `pending` more values (each at least one byte) can still fit; a container
    /// header that claims more elements than could ever arrive is rejected before anything
    /// is sized from it.
    #[inline]
    fn room_for(&self, pending: usize) -> Result<(), DecodeError> {
        if pending > self.bound - self.pos {
            return Err(DecodeError::Invalid(if self.whole {
                "a msgpack container declares more elements than its bytes can hold".into()
            } else {
                format!(
                    "a msgpack container declares more elements than fit in the {}-byte frame limit",
                    self.bound
                )
            }));
        }
        Ok(())
    }

    /// Checks a container's element count against the frame (`count` more values of at least
    /// one byte each must fit).
    pub(crate) fn check_count(&self, count: usize) -> Result<(), DecodeError> {
        self.room_for(count)
    }

    /// Skips one complete value of any shape, checking every length against `limits`.
    ///
    /// Iterative, with a single counter of values still owed, so hostile nesting depth costs
    /// no stack.
    pub(crate) fn skip(&mut self, limits: &Limits) -> Result<(), DecodeError> {
        let mut pending: usize = 1;
        while pending > 0 {
            pending -= 1;
            match self.head()? {
                Head::Str(n) => {
                    check_len("string", n, limits.max_str)?;
                    self.take(n)?;
                }
                Head::Bin(n) => {
                    check_len("binary", n, limits.max_str)?;
                    self.take(n)?;
                }
                Head::Ext(_, n) => {
                    check_len("extension", n, limits.max_str)?;
                    self.take(n)?;
                }
                Head::Array(n) => {
                    check_len("array", n, limits.max_array)?;
                    pending += n;
                    self.room_for(pending)?;
                }
                Head::Map(n) => {
                    check_len("map", n, limits.max_map)?;
                    pending += 2 * n;
                    self.room_for(pending)?;
                }
                Head::Nil | Head::Bool(_) | Head::Uint(_) | Head::Int(_) | Head::F32(_) | Head::F64(_) => {}
            }
        }
        Ok(())
    }
}

fn int(i: i64) -> Head {
    if i >= 0 {
        Head::Uint(i as u64)
    } else {
        Head::Int(i)
    }
}

/// Rejects a declared length over its limit.
pub(crate) fn check_len(what: &str, n: usize, limit: usize) -> Result<(), DecodeError> {
    if n > limit {
        return Err(DecodeError::Invalid(format!(
            "msgpack {what} of length {n} exceeds the limit of {limit}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn heads(bytes: &[u8]) -> Vec<Head> {
        let mut r = Reader::whole(bytes);
        let mut out = Vec::new();
        while !r.at_end() {
            let h = r.head().unwrap();
            match h {
                Head::Str(n) | Head::Bin(n) | Head::Ext(_, n) => {
                    r.take(n).unwrap();
                }
                _ => {}
            }
            out.push(h);
        }
        out
    }

    #[test]
    fn every_marker_family_reads_its_length_fields() {
        let bytes = [
            0x05, // positive fixint
            0xff, // negative fixint -1
            0xc0, 0xc2, 0xc3, // nil false true
            0xcc, 0xfe, // uint8 254
            0xcd, 0x01, 0x00, // uint16 256
            0xce, 0x00, 0x01, 0x00, 0x00, // uint32 65536
            0xcf, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // uint64 max
            0xd0, 0x80, // int8 -128
            0xd1, 0xff, 0x00, // int16 -256
            0xd2, 0x00, 0x00, 0x00, 0x07, // int32 7 (non-negative normalises to Uint)
            0xd3, 0x80, 0, 0, 0, 0, 0, 0, 0, // int64 min
            0xca, 0x3f, 0x80, 0x00, 0x00, // f32 1.0
            0xcb, 0x40, 0x00, 0, 0, 0, 0, 0, 0, // f64 2.0
            0xa2, b'h', b'i', // fixstr
            0xd9, 0x01, b'x', // str8
            0xda, 0x00, 0x01, b'y', // str16
            0xdb, 0x00, 0x00, 0x00, 0x01, b'z', // str32
            0xc4, 0x01, 0xaa, // bin8
            0xc5, 0x00, 0x00, // bin16 empty
            0xc6, 0x00, 0x00, 0x00, 0x02, 1, 2, // bin32
            0x92, 0xdc, 0x00, 0x03, 0xdd, 0x00, 0x00, 0x00, 0x04, // array headers
            0x81, 0xde, 0x00, 0x05, 0xdf, 0x00, 0x00, 0x00, 0x06, // map headers
            0xd4, 0x01, 0xaa, // fixext1 type 1
            0xd5, 0x02, 0, 0, // fixext2
            0xd6, 0x03, 0, 0, 0, 0, // fixext4
            0xd7, 0x00, 0, 0, 0, 0, 0, 0, 0, 0, // fixext8 type 0
            0xd8, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, // fixext16 type -1
            0xc7, 0x01, 0x05, 0xbb, // ext8
            0xc8, 0x00, 0x00, 0x06, // ext16 empty
            0xc9, 0x00, 0x00, 0x00, 0x01, 0x07, 0xcc, // ext32
        ];
        use Head::*;
        assert_eq!(
            heads(&bytes),
            vec![
                Uint(5),
                Int(-1),
                Nil,
                Bool(false),
                Bool(true),
                Uint(254),
                Uint(256),
                Uint(65536),
                Uint(u64::MAX),
                Int(-128),
                Int(-256),
                Uint(7),
                Int(i64::MIN),
                F32(1.0),
                F64(2.0),
                Str(2),
                Str(1),
                Str(1),
                Str(1),
                Bin(1),
                Bin(0),
                Bin(2),
                Array(2),
                Array(3),
                Array(4),
                Map(1),
                Map(5),
                Map(6),
                Ext(1, 1),
                Ext(2, 2),
                Ext(3, 4),
                Ext(0, 8),
                Ext(-1, 16),
                Ext(5, 1),
                Ext(6, 0),
                Ext(7, 1),
            ]
        );
    }

    #[test]
    fn reserved_byte_is_invalid() {
        assert!(matches!(Reader::whole(&[0xc1]).head(), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn stream_running_out_is_incomplete_whole_slice_is_invalid() {
        let bytes = [0xcd, 0x01];
        assert_eq!(Reader::stream(&bytes, 1 << 20).head(), Err(DecodeError::Incomplete));
        assert!(matches!(Reader::whole(&bytes).head(), Err(DecodeError::Invalid(_))));
    }

    #[test]
    fn skip_is_iterative_and_checks_container_counts() {
        let limits = Limits::default();
        // 100k nested one-element arrays around a nil: deep enough to overflow a recursive
        // skipper's stack, fine for the counter.
        let mut deep = vec![0x91u8; 100_000];
        deep.push(0xc0);
        let mut r = Reader::whole(&deep);
        r.skip(&limits).unwrap();
        assert!(r.at_end());
        // An array32 header claiming 50k elements followed by 3 bytes: on a stream within the
        // frame limit that is just "wait for more", on a whole slice it can never complete.
        let claim = [0xdd, 0x00, 0x00, 0xc3, 0x50, 0xc0, 0xc0, 0xc0];
        assert_eq!(Reader::stream(&claim, 1 << 20).skip(&limits), Err(DecodeError::Incomplete));
        assert!(matches!(Reader::whole(&claim).skip(&limits), Err(DecodeError::Invalid(_))));
        // ... and past the frame limit it is Invalid on a stream too.
        assert!(matches!(Reader::stream(&claim, 1000).skip(&limits), Err(DecodeError::Invalid(_))));
    }
}
