//! Little-endian binary reading and writing for snapshots and saved indexes.
//!
//! Every length read from a file is checked against a limit before anything is allocated, so a
//! damaged or hostile file gives an error, never a huge allocation or a panic.

use std::io::{self, Read, Write};

/// Largest collection length any reader accepts (elements, not bytes).
pub const MAX_LEN: u64 = 1 << 34;

pub fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub fn put_u8(w: &mut dyn Write, v: u8) -> io::Result<()> {
    w.write_all(&[v])
}
pub fn put_u32(w: &mut dyn Write, v: u32) -> io::Result<()> {
    w.write_all(&v.to_le_bytes())
}
pub fn put_u64(w: &mut dyn Write, v: u64) -> io::Result<()> {
    w.write_all(&v.to_le_bytes())
}
pub fn put_i64(w: &mut dyn Write, v: i64) -> io::Result<()> {
    w.write_all(&v.to_le_bytes())
}
pub fn put_f32(w: &mut dyn Write, v: f32) -> io::Result<()> {
    w.write_all(&v.to_le_bytes())
}
pub fn put_f64(w: &mut dyn Write, v: f64) -> io::Result<()> {
    w.write_all(&v.to_le_bytes())
}
pub fn put_len(w: &mut dyn Write, n: usize) -> io::Result<()> {
    put_u64(w, n as u64)
}
pub fn put_str(w: &mut dyn Write, s: &str) -> io::Result<()> {
    put_len(w, s.len())?;
    w.write_all(s.as_bytes())
}
pub fn put_f32s(w: &mut dyn Write, v: &[f32]) -> io::Result<()> {
    put_len(w, v.len())?;
    for x in v {
        w.write_all(&x.to_le_bytes())?;
    }
    Ok(())
}

fn take<const N: usize>(r: &mut dyn Read) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}
pub fn get_u8(r: &mut dyn Read) -> io::Result<u8> {
    Ok(take::<1>(r)?[0])
}
pub fn get_u32(r: &mut dyn Read) -> io::Result<u32> {
    Ok(u32::from_le_bytes(take(r)?))
}
pub fn get_u64(r: &mut dyn Read) -> io::Result<u64> {
    Ok(u64::from_le_bytes(take(r)?))
}
pub fn get_i64(r: &mut dyn Read) -> io::Result<i64> {
    Ok(i64::from_le_bytes(take(r)?))
}
pub fn get_f32(r: &mut dyn Read) -> io::Result<f32> {
    Ok(f32::from_le_bytes(take(r)?))
}
pub fn get_f64(r: &mut dyn Read) -> io::Result<f64> {
    Ok(f64::from_le_bytes(take(r)?))
}
/// A collection length, refused above `limit`.
pub fn get_len(r: &mut dyn Read, limit: u64) -> io::Result<usize> {
    let n = get_u64(r)?;
    if n > limit.min(MAX_LEN) {
        return Err(invalid(format!("length {n} over the limit {limit}")));
    }
    Ok(n as usize)
}
pub fn get_str(r: &mut dyn Read, limit: u64) -> io::Result<String> {
    let n = get_len(r, limit)?;
    let mut b = vec![0u8; n];
    r.read_exact(&mut b)?;
    String::from_utf8(b).map_err(|_| invalid("string is not UTF-8"))
}
/// Reads `get_len` f32s, growing the buffer as bytes actually arrive (a lying length on a
/// short file errors out at end of input instead of reserving memory up front).
pub fn get_f32s(r: &mut dyn Read, limit: u64) -> io::Result<Vec<f32>> {
    let n = get_len(r, limit)?;
    let mut v = Vec::with_capacity(n.min(1 << 20));
    for _ in 0..n {
        v.push(get_f32(r)?);
    }
    Ok(v)
}

/// A writer that keeps a running CRC32 of everything written through it.
pub struct CrcWriter<W: Write> {
    pub inner: W,
    pub hasher: crc32fast::Hasher,
}

impl<W: Write> CrcWriter<W> {
    pub fn new(inner: W) -> Self {
        CrcWriter { inner, hasher: crc32fast::Hasher::new() }
    }
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_limits() {
        let mut buf = Vec::new();
        put_u32(&mut buf, 7).unwrap();
        put_str(&mut buf, "héllo").unwrap();
        put_f32s(&mut buf, &[1.5, -2.0]).unwrap();
        put_f64(&mut buf, 0.25).unwrap();
        let mut r = &buf[..];
        assert_eq!(get_u32(&mut r).unwrap(), 7);
        assert_eq!(get_str(&mut r, 100).unwrap(), "héllo");
        assert_eq!(get_f32s(&mut r, 100).unwrap(), vec![1.5, -2.0]);
        assert_eq!(get_f64(&mut r).unwrap(), 0.25);

        let mut big = Vec::new();
        put_u64(&mut big, u64::MAX).unwrap();
        let e = get_f32s(&mut &big[..], 1000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);

        // A plausible length on a short input fails at end of input.
        let mut short = Vec::new();
        put_u64(&mut short, 500).unwrap();
        let e = get_f32s(&mut &short[..], 1000).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }
}
