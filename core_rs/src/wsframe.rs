//! Websocket text messages written straight to a non-blocking socket.
//!
//! A pushed list is one complete text message. Writing it takes a `writev(2)` of a frame
//! header (RFC 6455 §5.2: final, unmasked, unfragmented, opcode 1) and the message's bytes,
//! after a look at what the socket still holds: the whole push is one call from the caller,
//! with no frame built in memory.
//!
//! A message is written only when it can go out whole at once: the bytes still queued on the
//! socket (unsent or unacknowledged, `SIOCOUTQ`) plus the frame must fit under the caller's
//! limit, a share of the socket's send buffer, so the kernel takes all of it. A socket that
//! is full or broken declines the message (nothing written). A write the kernel cuts short
//! anyway (global TCP memory pressure) leaves a broken frame on the stream: that connection
//! is shut down, in both directions, so its peer sees a closed connection rather than a
//! corrupt one.

use std::fs::File;
use std::io::{IoSlice, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, RawFd};

/// What became of one message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Outcome {
    /// Nothing was written: the socket had no room for the whole frame, or failed.
    Declined = 0,
    /// The whole frame was written.
    Written = 1,
    /// The kernel took part of the frame; the connection was shut down.
    CutShort = 2,
}

/// The header of a final, unmasked text frame carrying `len` bytes, and its length.
pub fn text_frame_header(len: usize) -> ([u8; 10], usize) {
    let mut h = [0u8; 10];
    h[0] = 0x81;
    if len < 126 {
        h[1] = len as u8;
        (h, 2)
    } else if len < 1 << 16 {
        h[1] = 126;
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        (h, 4)
    } else {
        h[1] = 127;
        h[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        (h, 10)
    }
}

/// Bytes queued on socket `fd` (unsent or unacknowledged); None where unknown.
fn queued(fd: RawFd) -> Option<usize> {
    #[cfg(target_os = "linux")]
    {
        use std::os::raw::{c_int, c_ulong};
        extern "C" {
            fn ioctl(fd: c_int, request: c_ulong, ...) -> c_int;
        }
        const SIOCOUTQ: c_ulong = 0x5411; // TIOCOUTQ
        let mut n: c_int = 0;
        // SAFETY: SIOCOUTQ writes one int through the pointer, which outlives the call.
        let rc = unsafe { ioctl(fd, SIOCOUTQ, &mut n as *mut c_int) };
        (rc == 0 && n >= 0).then_some(n as usize)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = fd;
        None
    }
}

/// Writes `text` as one text frame to the non-blocking socket behind `fd` when the frame and
/// what is queued on the socket fit under `limit` bytes (see the module).
pub fn write_text_frame(fd: BorrowedFd<'_>, text: &[u8], limit: usize) -> Outcome {
    let (header, n) = text_frame_header(text.len());
    let frame = n + text.len();
    let raw = fd.as_raw_fd();
    match queued(raw) {
        Some(q) if q + frame <= limit => {}
        Some(_) => return Outcome::Declined,
        None if frame <= limit => {}
        None => return Outcome::Declined,
    }
    // SAFETY: `raw` stays open for the borrow of `fd`; the File is turned back into a plain
    // number below instead of being dropped, so it never closes `fd`.
    let file = unsafe { File::from_raw_fd(raw) };
    let written = (&file).write_vectored(&[IoSlice::new(&header[..n]), IoSlice::new(text)]);
    let _ = file.into_raw_fd();
    match written {
        Ok(w) if w == frame => Outcome::Written,
        Ok(0) | Err(_) => Outcome::Declined,
        Ok(_) => {
            // SAFETY: as above; the stream only shuts the socket down and is not dropped.
            let stream = unsafe { TcpStream::from_raw_fd(raw) };
            let _ = stream.shutdown(Shutdown::Both);
            let _ = stream.into_raw_fd();
            Outcome::CutShort
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn headers_follow_rfc6455_length_forms() {
        assert_eq!(&text_frame_header(0).0[..2], &[0x81, 0]);
        assert_eq!(&text_frame_header(125).0[..2], &[0x81, 125]);
        assert_eq!(&text_frame_header(126).0[..4], &[0x81, 126, 0, 126]);
        assert_eq!(&text_frame_header(65_535).0[..4], &[0x81, 126, 0xff, 0xff]);
        let (h, n) = text_frame_header(65_536);
        assert_eq!(n, 10);
        assert_eq!(&h[..10], &[0x81, 127, 0, 0, 0, 0, 0, 1, 0, 0]);
    }

    #[test]
    fn a_frame_is_written_whole_or_declined_whole() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let fd = a.as_fd();
        assert_eq!(write_text_frame(fd, b"hello", 1 << 16), Outcome::Written);
        let mut got = [0u8; 7];
        b.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"\x81\x05hello");
        // Over the limit: nothing is written (SIOCOUTQ works on Unix sockets too, or the
        // frame alone is measured against the limit).
        assert_eq!(write_text_frame(fd, &[b'x'; 100], 50), Outcome::Declined);
        b.set_nonblocking(true).unwrap();
        assert!(b.read(&mut [0u8; 16]).is_err());
    }
}
