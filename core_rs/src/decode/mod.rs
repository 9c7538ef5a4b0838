//! Fluent Forward Protocol v1 decoding, straight from msgpack bytes into records.
//!
//! The protocol (the one Fluentd and Fluent Bit speak, "Forward Protocol Specification v1")
//! sends each frame as one msgpack array; its second element tells the mode apart:
//!
//! | mode                    | frame                                              |
//! |-------------------------|----------------------------------------------------|
//! | Message                 | `[tag, time, record, option?]`                     |
//! | Forward                 | `[tag, [[time, record], ...], option?]`            |
//! | PackedForward           | `[tag, bin/str of concatenated [time, record], option?]` |
//! | CompressedPackedForward | PackedForward with option `{"compressed": "gzip"}` |
//!
//! `time` is integer unix seconds or EventTime (msgpack ext type 0, 8 bytes: big-endian u32
//! seconds then u32 nanoseconds). The option map may carry `"chunk"` (echoed back in the ack),
//! `"size"` (informational, ignored) and `"compressed"`.
//!
//! # Check, then parse
//! Decoding runs in two passes. The first ([`frame_len`]) walks the whole frame's msgpack
//! structure without building anything, and decides between three outcomes: the buffer ends
//! before the frame does ([`DecodeError::Incomplete`]: read more), the bytes can never be a
//! valid frame ([`DecodeError::Invalid`]: close the connection), or the frame is complete and
//! well-formed. Only then does [`decode_frame`] build records, over bytes already known to be
//! whole. Every length is checked against [`Limits`] and against the bytes that can still
//! follow before the reader moves past it or sizes anything from it.
//!
//! Problems are graded. Damaged msgpack, or a frame whose shape is not one of the four modes,
//! is frame-level `Invalid`. A well-formed entry whose record does not make sense (a NaN
//! weight, an over-long id, a record that is not a map) only rejects that entry: it is listed
//! in [`Frame::rejected`] and its neighbours still decode, because one bad producer-side value
//! should not cost the good events sent with it.
//!
//! Not handled here: the shared-key handshake (`["PING", ...]` has six elements, so it is
//! Invalid as an event frame; the server reads it before any event frame), and bare non-array
//! values, which this decoder treats as Invalid rather than silently skipping.
//!
//! # Layout
//! - `msgpack`: the bounds-checked, allocation-free msgpack reader both passes use.

mod msgpack;
#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::io::Read;

use msgpack::{check_len, Head, Reader};

use crate::ids::ExtId;

#[derive(Clone, Debug, PartialEq)]
pub enum DecodeError {
    /// The buffer ends before the frame does: read more bytes and try again.
    Incomplete,
    /// The bytes can never become a valid frame: close the connection with this reason.
    Invalid(String),
}

/// Bounds on everything a producer can make the decoder read or allocate. A frame that
/// exceeds one is `Invalid`, decided from the length field alone, before the bytes arrive.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest frame on the wire, PackedForward payload included.
    pub max_frame_bytes: usize,
    /// Most entries in one frame (Forward array or PackedForward stream).
    pub max_entries: usize,
    /// Longest array anywhere inside a record.
    pub max_array: usize,
    /// Most key/value pairs in a record, the option map or any map nested in a record.
    pub max_map: usize,
    /// Longest string, binary or extension payload (the PackedForward payload excepted).
    pub max_str: usize,
    /// Largest CompressedPackedForward payload after gunzip; guards against gzip bombs.
    pub max_decompressed_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 << 20,
            max_entries: 100_000,
            max_array: 100_000,
            max_map: 64,
            max_str: 64 << 10,
            max_decompressed_bytes: 64 << 20,
        }
    }
}

/// A producer's event id for de-duplication (`"id"` in the record).
pub type EventId = ExtId;

#[derive(Clone, Debug, PartialEq)]
pub enum Record {
    /// `{"user", "item", "type"?, "weight"?, "id"?}`. Both `kind` and `weight` may be absent
    /// (the model then applies its default weight); when both are present the weight wins
    /// and the kind is kept for the record.
    Interaction {
        user: ExtId,
        item: ExtId,
        kind: Option<String>,
        weight: Option<f32>,
        id: Option<EventId>,
        ts: f64,
    },
    /// `{"item", "tags"?, "category"?, "available"?}` with no `"user"`.
    ItemUpsert { item: ExtId, tags: Vec<String>, category: Option<String>, available: Option<bool>, ts: f64 },
    /// `{"erase_user": id}`.
    EraseUser { user: ExtId, ts: f64 },
}

/// One decoded frame. Entries are numbered from 0 in frame order across `records` and
/// `rejected`, so a caller can tell which of a producer's events were refused.
#[derive(Clone, Debug, Default)]
pub struct Frame {
    /// The producer's routing tag; recorded, not interpreted.
    pub tag: String,
    pub records: Vec<Record>,
    /// Per-entry rejections: (entry index, reason). The frame itself stays valid.
    pub rejected: Vec<(usize, String)>,
    /// The `chunk` option: when present the producer waits for `{"ack": chunk}`, to be sent
    /// only once the frame's events are durable.
    pub chunk: Option<String>,
}

/// Longest `"type"` string, in bytes.
pub const MAX_KIND_BYTES: usize = 64;
/// Most tags on one item.
pub const MAX_TAGS: usize = 64;
/// Longest tag or category, in bytes.
pub const MAX_TAG_BYTES: usize = 128;
/// Earliest accepted event time (1990-01-01T00:00:00Z, unix seconds). Interaction logs worth
/// replaying start later than this; a time before it is a unit or clock mistake (a missing
/// time sent as 0, a duration instead of a date) and would distort recency decay.
pub const MIN_TIME: f64 = 631_152_000.0;
/// Latest accepted event time (10000-01-01T00:00:00Z), a bound independent of any clock so
/// that every time the decoder lets through is an exact, ordinary number of seconds. How far
/// ahead of the server's clock an event may be is a model setting (`max_clock_skew`).
pub const MAX_TIME: f64 = 253_402_300_800.0;

/// Largest accepted `"weight"`: a single event worth more than this is a producer bug, and
/// letting it through would swamp every other signal for that user.
pub const MAX_WEIGHT: f64 = 1e6;

/// Decodes one frame from the start of `buf`; returns it and the bytes it used.
///
/// Bytes after the frame are left alone: call again on `&buf[used..]` for the next one.
pub fn decode_frame(buf: &[u8], limits: &Limits) -> Result<(Frame, usize), DecodeError> {
    let layout = check_frame(buf, limits)?;
    let mut frame = Frame {
        tag: layout.tag.to_owned(),
        records: Vec::new(),
        rejected: Vec::new(),
        chunk: layout.chunk.map(str::to_owned),
    };
    match &layout.entries {
        Entries::Message { start, end } => {
            let mut r = Reader::whole(&buf[*start..*end]);
            match parse_pair(&mut r, limits) {
                Ok(rec) => frame.records.push(rec),
                Err(why) => frame.rejected.push((0, why)),
            }
        }
        Entries::Forward { start, count } => {
            decode_entries(&buf[*start..layout.len], *count, limits, &mut frame)?
        }
        Entries::Packed { bytes, count } => decode_entries(bytes, *count, limits, &mut frame)?,
    }
    Ok((frame, layout.len))
}

/// Runs `check` on each frame in turn from the start of `buf`, where `check` returns what it
/// found and the bytes the frame used (as [`decode_frame`] does).
///
/// Stops at the end of `buf`, at a frame that is still incomplete, or at bytes that can
/// never be a frame. Returns the results of the complete frames in order, the bytes they
/// used together, and the reason the bytes after them are invalid (None when they are only
/// incomplete, or when nothing follows). Frames before an invalid one stand: a listener
/// acknowledges them and then closes the connection.
pub fn split_frames<T>(
    buf: &[u8],
    mut check: impl FnMut(&[u8]) -> Result<(T, usize), DecodeError>,
) -> (Vec<T>, usize, Option<String>) {
    let mut found = Vec::new();
    let mut used = 0;
    while used < buf.len() {
        match check(&buf[used..]) {
            Ok((t, n)) => {
                debug_assert!(n > 0, "a complete frame uses at least one byte");
                found.push(t);
                used += n;
            }
            Err(DecodeError::Incomplete) => break,
            Err(DecodeError::Invalid(why)) => return (found, used, Some(why)),
        }
    }
    (found, used, None)
}

/// Reads a journal record, `[accepted_at, frame]` (msgpack: a number of unix seconds and
/// the frame's bytes as `bin`): the time the server accepted the frame, and the frame.
pub fn decode_journal_record(payload: &[u8]) -> Result<(f64, &[u8]), DecodeError> {
    let read = || {
        let mut r = Reader::whole(payload);
        if r.head()? != Head::Array(2) {
            return Err(DecodeError::Invalid("not a two-element array".into()));
        }
        let at = match r.head()? {
            Head::F64(x) => x,
            Head::F32(x) => x as f64,
            Head::Uint(x) => x as f64,
            Head::Int(x) => x as f64,
            _ => return Err(DecodeError::Invalid("the acceptance time is not a number".into())),
        };
        if !at.is_finite() {
            return Err(DecodeError::Invalid("the acceptance time is not finite".into()));
        }
        let frame = match r.head()? {
            Head::Bin(n) => r.take(n)?,
            _ => return Err(DecodeError::Invalid("the frame is not binary".into())),
        };
        if !r.at_end() {
            return Err(DecodeError::Invalid("bytes after the frame".into()));
        }
        Ok((at, frame))
    };
    read().map_err(|e| match e {
        DecodeError::Invalid(why) => DecodeError::Invalid(format!("journal record: {why}")),
        incomplete => incomplete,
    })
}

/// Length of the first complete frame in `buf`, without building any record.
///
/// It runs exactly the checks [`decode_frame`] runs before that builds records, so
/// `frame_len(buf) == Ok(n)` exactly when `decode_frame(buf)` is `Ok((_, n))`, and they fail
/// alike otherwise: a frame journaled on the strength of `frame_len` will decode on replay.
/// For CompressedPackedForward that means the payload is gunzipped here too (and again by
/// `decode_frame`); a caller that decodes anyway can use `decode_frame`'s length instead.
pub fn frame_len(buf: &[u8], limits: &Limits) -> Result<usize, DecodeError> {
    check_frame(buf, limits).map(|layout| layout.len)
}

/// Where a checked frame keeps its parts.
struct Layout<'a> {
    /// Bytes the frame occupies in the input.
    len: usize,
    tag: &'a str,
    chunk: Option<&'a str>,
    entries: Entries<'a>,
}

enum Entries<'a> {
    /// The time value starts at `start`, the record ends at `end` (offsets in the input).
    Message { start: usize, end: usize },
    /// `count` entry values start at offset `start` of the input.
    Forward { start: usize, count: usize },
    /// `count` entry values fill `bytes` exactly; owned when they had to be gunzipped.
    Packed { bytes: Cow<'a, [u8]>, count: usize },
}

/// The check pass's view of the second element: entries located in the input, or a packed
/// payload still to be (gunzipped and) validated once the option is known.
enum Body<'a> {
    Ready(Entries<'a>),
    Packed(&'a [u8]),
}

fn invalid(why: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(why.into())
}

/// A head's type, for error messages.
fn describe(h: Head) -> &'static str {
    match h {
        Head::Nil => "nil",
        Head::Bool(_) => "a boolean",
        Head::Uint(_) | Head::Int(_) => "an integer",
        Head::F32(_) | Head::F64(_) => "a float",
        Head::Str(_) => "a string",
        Head::Bin(_) => "binary data",
        Head::Array(_) => "an array",
        Head::Map(_) => "a map",
        Head::Ext(..) => "an extension",
    }
}

/// The check pass: walks the frame's structure, validating shape and every length, and
/// locates its parts. Builds nothing but the gunzipped payload of a compressed frame.
fn check_frame<'a>(buf: &'a [u8], limits: &Limits) -> Result<Layout<'a>, DecodeError> {
    let mut r = Reader::stream(buf, limits.max_frame_bytes);
    let arity = match r.head()? {
        Head::Array(n) => n,
        other => return Err(invalid(format!("a frame must be a msgpack array, found {}", describe(other)))),
    };
    if !(2..=4).contains(&arity) {
        return Err(invalid(format!("a frame is an array of 2 to 4 elements, found {arity}")));
    }
    let tag = match r.head()? {
        Head::Str(n) => {
            check_len("tag string", n, limits.max_str)?;
            std::str::from_utf8(r.take(n)?).map_err(|_| invalid("the tag is not valid UTF-8"))?
        }
        other => return Err(invalid(format!("the tag must be a string, found {}", describe(other)))),
    };

    // The second element decides the mode (peeked, so Message mode can skip the time whole).
    let mut peek = r.clone();
    let (body, has_option) = match peek.head()? {
        Head::Uint(_) | Head::Int(_) | Head::F32(_) | Head::F64(_) | Head::Ext(..) => {
            if arity < 3 {
                return Err(invalid("Message mode is [tag, time, record, option?]; the record is missing"));
            }
            let start = r.pos();
            r.skip(limits)?; // time
            r.skip(limits)?; // record
            let end = r.pos();
            (Body::Ready(Entries::Message { start, end }), arity == 4)
        }
        Head::Array(count) => {
            if arity > 3 {
                return Err(invalid("Forward mode is [tag, entries, option?]; found 4 elements"));
            }
            r = peek;
            if count > limits.max_entries {
                return Err(invalid(format!("{count} entries exceed the limit of {}", limits.max_entries)));
            }
            r.check_count(count)?;
            let start = r.pos();
            for _ in 0..count {
                r.skip(limits)?;
            }
            (Body::Ready(Entries::Forward { start, count }), arity == 3)
        }
        Head::Str(n) | Head::Bin(n) => {
            if arity > 3 {
                return Err(invalid("PackedForward mode is [tag, entries, option?]; found 4 elements"));
            }
            r = peek;
            // The payload is bounded by the frame limit, not by `max_str`.
            (Body::Packed(r.take(n)?), arity == 3)
        }
        other => {
            return Err(invalid(format!(
                "the second element must be a time (Message mode), an array of entries \
                 (Forward mode) or packed entries (PackedForward mode), found {}",
                describe(other)
            )))
        }
    };

    let mut chunk = None;
    let mut gzip = false;
    if has_option {
        (chunk, gzip) = check_option(&mut r, limits)?;
    }
    let len = r.pos();

    // Only a complete frame gets here, so from now on nothing can be Incomplete.
    let entries = match body {
        Body::Ready(entries) => entries,
        Body::Packed(raw) => {
            let bytes = if gzip {
                Cow::Owned(gunzip(raw, limits.max_decompressed_bytes)?)
            } else {
                Cow::Borrowed(raw)
            };
            let count = count_packed(&bytes, limits)?;
            Entries::Packed { bytes, count }
        }
    };
    Ok(Layout { len, tag, chunk, entries })
}

/// Checks the option element (a map, or nil) and extracts `chunk` and whether the payload
/// is gzip. Unknown keys are skipped; a known key with the wrong type is frame-level
/// Invalid, since the ack or the payload cannot be handled without it.
fn check_option<'a>(r: &mut Reader<'a>, limits: &Limits) -> Result<(Option<&'a str>, bool), DecodeError> {
    let pairs = match r.head()? {
        Head::Nil => return Ok((None, false)),
        Head::Map(n) => n,
        other => return Err(invalid(format!("the option must be a map, found {}", describe(other)))),
    };
    check_len("option map", pairs, limits.max_map)?;
    r.check_count(2 * pairs)?;
    let mut chunk = None;
    let mut gzip = false;
    for _ in 0..pairs {
        let mut peek = r.clone();
        let key = match peek.head()? {
            Head::Str(n) => {
                check_len("option key", n, limits.max_str)?;
                *r = peek;
                r.take(n)?
            }
            _ => {
                r.skip(limits)?;
                r.skip(limits)?;
                continue;
            }
        };
        match key {
            b"chunk" => {
                let s = option_str(r, "chunk", limits)?;
                chunk = Some(
                    std::str::from_utf8(s).map_err(|_| invalid("the \"chunk\" option is not valid UTF-8"))?,
                );
            }
            b"compressed" => {
                gzip = match option_str(r, "compressed", limits)? {
                    b"gzip" => true,
                    b"text" => false,
                    other => {
                        return Err(invalid(format!(
                            "unsupported compression {:?}; only \"gzip\" is supported",
                            String::from_utf8_lossy(other)
                        )))
                    }
                }
            }
            _ => r.skip(limits)?,
        }
    }
    Ok((chunk, gzip))
}

fn option_str<'a>(r: &mut Reader<'a>, key: &str, limits: &Limits) -> Result<&'a [u8], DecodeError> {
    match r.head()? {
        Head::Str(n) => {
            check_len("option string", n, limits.max_str)?;
            r.take(n)
        }
        other => Err(invalid(format!("the {key:?} option must be a string, found {}", describe(other)))),
    }
}

/// Gunzips a CompressedPackedForward payload, which may be several gzip members back to
/// back (clients append a member per flush).
///
/// Incremental: output is read in `GUNZIP_STEP` pieces and the buffer grows with what was
/// produced (doubling, but never past `limit + 1` bytes), so a bomb is refused as soon as
/// its output passes the limit and holds at most `limit + 1` bytes until then -- not the
/// twice as much a doubling `read_to_end` may reserve, nor the limit up front.
pub(crate) fn gunzip(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let cap = limit.saturating_add(1);
    let mut out: Vec<u8> = Vec::new();
    let mut dec = flate2::read::MultiGzDecoder::new(data);
    let mut step = [0u8; GUNZIP_STEP];
    loop {
        let n = dec.read(&mut step).map_err(|e| invalid(format!("the gzip payload is damaged: {e}")))?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() + n > limit {
            return Err(invalid(format!("the gzip payload decompresses past the {limit}-byte limit")));
        }
        if out.capacity() - out.len() < n {
            let want = (out.len() + n).max(out.capacity().saturating_mul(2)).min(cap);
            out.reserve_exact(want - out.len());
        }
        out.extend_from_slice(&step[..n]);
    }
}

/// Bytes gunzipped per read: large enough to amortise the call, small enough for the stack.
const GUNZIP_STEP: usize = 32 * 1024;

/// Counts the entries packed in a PackedForward payload, validating each one's msgpack.
/// The payload is whole, so a value cut short by its end is Invalid.
fn count_packed(bytes: &[u8], limits: &Limits) -> Result<usize, DecodeError> {
    let mut r = Reader::whole(bytes);
    let mut count = 0;
    while !r.at_end() {
        r.skip(limits)?;
        count += 1;
        if count > limits.max_entries {
            return Err(invalid(format!("packed entries exceed the limit of {}", limits.max_entries)));
        }
    }
    Ok(count)
}

/// The parse pass over `count` checked entry values at the start of `bytes`.
fn decode_entries(bytes: &[u8], count: usize, limits: &Limits, frame: &mut Frame) -> Result<(), DecodeError> {
    frame.records.reserve(count);
    let mut r = Reader::whole(bytes);
    for index in 0..count {
        // A record that parses has consumed exactly its entry; one that is rejected may
        // stop anywhere inside it, so the entry is then skipped again from its start.
        let start = r.clone();
        match parse_entry(&mut r, limits) {
            Ok(rec) => frame.records.push(rec),
            Err(why) => {
                frame.rejected.push((index, why));
                r = start;
                r.skip(limits)?;
            }
        }
    }
    Ok(())
}

/// Record-level failures are reasons, not [`DecodeError`]s. The check pass has already
/// validated these bytes, so a reader error here would be a bug; it still only rejects the
/// entry rather than panicking.
fn internal(e: DecodeError) -> String {
    match e {
        DecodeError::Incomplete => "entry ends early".into(),
        DecodeError::Invalid(why) => why,
    }
}

/// One Forward/PackedForward entry: `[time, record]`.
fn parse_entry(r: &mut Reader<'_>, limits: &Limits) -> Result<Record, String> {
    match r.head().map_err(internal)? {
        Head::Array(2) => parse_pair(r, limits),
        Head::Array(n) => Err(format!("an entry must be a [time, record] array, found an array of {n}")),
        other => Err(format!("an entry must be a [time, record] array, found {}", describe(other))),
    }
}

/// A time value followed by a record value.
fn parse_pair(r: &mut Reader<'_>, limits: &Limits) -> Result<Record, String> {
    let ts = check_time_range(parse_time(r, limits, true)?)?;
    parse_record(r, ts, limits)
}

/// Refuses times outside [`MIN_TIME`, `MAX_TIME`): such a time is never a real event's, and
/// letting one in would let a single event steer recency decay.
pub fn check_time_range(ts: f64) -> Result<f64, String> {
    if ts < MIN_TIME {
        return Err(format!("time {ts} is before 1990-01-01 ({MIN_TIME} s); times are unix seconds"));
    }
    if ts >= MAX_TIME {
        return Err(format!("time {ts} is after the year 9999; times are unix seconds, not milliseconds"));
    }
    Ok(ts)
}

/// Entry time as f64 unix seconds.
///
/// Accepts integer seconds, EventTime, and, leniently, a finite non-negative float. With
/// `nested`, also Fluent Bit's `[time, metadata]` pair (its event format v2), whose metadata
/// is skipped.
fn parse_time(r: &mut Reader<'_>, limits: &Limits, nested: bool) -> Result<f64, String> {
    let float = |f: f64| {
        if f.is_finite() && f >= 0.0 {
            Ok(f)
        } else {
            Err(format!("time {f} is not a finite non-negative number"))
        }
    };
    match r.head().map_err(internal)? {
        Head::Uint(s) => Ok(s as f64),
        Head::Int(s) => Err(format!("time {s} is negative")),
        Head::F32(f) => float(f as f64),
        Head::F64(f) => float(f),
        Head::Ext(0, 8) => {
            let b = r.take(8).map_err(internal)?;
            let secs = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
            let nanos = u32::from_be_bytes([b[4], b[5], b[6], b[7]]);
            if nanos >= 1_000_000_000 {
                return Err(format!("EventTime nanoseconds {nanos} are out of range"));
            }
            Ok(secs as f64 + nanos as f64 * 1e-9)
        }
        Head::Ext(t, n) => {
            Err(format!("time is an extension of type {t} with {n} bytes; EventTime is type 0 with 8"))
        }
        Head::Array(2) if nested => {
            let ts = parse_time(r, limits, false)?;
            r.skip(limits).map_err(internal)?;
            Ok(ts)
        }
        other => Err(format!("time must be an integer or an EventTime, found {}", describe(other))),
    }
}

/// Known record keys, each validated as it is met, whatever kind of record it turns out
/// to be.
#[derive(Default)]
struct Fields {
    user: Option<ExtId>,
    item: Option<ExtId>,
    kind: Option<String>,
    weight: Option<f32>,
    id: Option<EventId>,
    tags: Option<Vec<String>>,
    category: Option<String>,
    available: Option<bool>,
    erase_user: Option<ExtId>,
}

fn set<T>(slot: &mut Option<T>, key: &str, value: T) -> Result<(), String> {
    if slot.is_some() {
        return Err(format!("duplicate key {key:?}"));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_record(r: &mut Reader<'_>, ts: f64, limits: &Limits) -> Result<Record, String> {
    let pairs = match r.head().map_err(internal)? {
        Head::Map(n) => n,
        other => return Err(format!("a record must be a map, found {}", describe(other))),
    };
    let mut f = Fields::default();
    for _ in 0..pairs {
        let mut peek = r.clone();
        let key = match peek.head().map_err(internal)? {
            Head::Str(n) => {
                *r = peek;
                r.take(n).map_err(internal)?
            }
            // Non-string keys cannot be ours: skip the pair, like any unknown key.
            _ => {
                r.skip(limits).map_err(internal)?;
                r.skip(limits).map_err(internal)?;
                continue;
            }
        };
        match key {
            b"user" => set(&mut f.user, "user", parse_id(r, "user")?)?,
            b"item" => set(&mut f.item, "item", parse_id(r, "item")?)?,
            b"erase_user" => set(&mut f.erase_user, "erase_user", parse_id(r, "erase_user")?)?,
            b"id" => set(&mut f.id, "id", parse_id(r, "id")?)?,
            b"type" => {
                let kind = parse_str(r, "type", MAX_KIND_BYTES)?;
                if kind.is_empty() {
                    return Err("\"type\" is an empty string".into());
                }
                set(&mut f.kind, "type", kind)?
            }
            b"weight" => set(&mut f.weight, "weight", parse_weight(r)?)?,
            b"tags" => set(&mut f.tags, "tags", parse_tags(r)?)?,
            b"category" => set(&mut f.category, "category", parse_str(r, "category", MAX_TAG_BYTES)?)?,
            b"available" => match r.head().map_err(internal)? {
                Head::Bool(b) => set(&mut f.available, "available", b)?,
                other => return Err(format!("\"available\" must be a boolean, found {}", describe(other))),
            },
            // Unknown keys are ignored so producers can send fields a newer engine uses.
            _ => r.skip(limits).map_err(internal)?,
        }
    }

    if let Some(user) = f.erase_user {
        if f.user.is_some() || f.item.is_some() {
            return Err("\"erase_user\" cannot be combined with \"user\" or \"item\"".into());
        }
        Ok(Record::EraseUser { user, ts })
    } else if let Some(user) = f.user {
        let item = f.item.ok_or_else(|| "an interaction has \"user\" but no \"item\"".to_string())?;
        Ok(Record::Interaction { user, item, kind: f.kind, weight: f.weight, id: f.id, ts })
    } else if let Some(item) = f.item {
        Ok(Record::ItemUpsert {
            item,
            tags: f.tags.unwrap_or_default(),
            category: f.category,
            available: f.available,
            ts,
        })
    } else {
        Err("the record has none of \"user\", \"item\" or \"erase_user\"".into())
    }
}

/// A string or integer id. Integers must fit i64 so they survive every layer unchanged.
fn parse_id(r: &mut Reader<'_>, key: &str) -> Result<ExtId, String> {
    match r.head().map_err(internal)? {
        Head::Str(n) => {
            let s = std::str::from_utf8(r.take(n).map_err(internal)?)
                .map_err(|_| format!("{key:?} is not valid UTF-8"))?;
            ExtId::from_str(s).map_err(|e| format!("{key:?}: {e}"))
        }
        Head::Uint(u) => i64::try_from(u)
            .map(ExtId::Int)
            .map_err(|_| format!("{key:?} {u} does not fit a signed 64-bit integer")),
        Head::Int(i) => Ok(ExtId::Int(i)),
        other => Err(format!("{key:?} must be a string or an integer, found {}", describe(other))),
    }
}

fn parse_str(r: &mut Reader<'_>, key: &str, max: usize) -> Result<String, String> {
    match r.head().map_err(internal)? {
        Head::Str(n) => {
            if n > max {
                return Err(format!("{key:?} is {n} bytes, the limit is {max}"));
            }
            let s = std::str::from_utf8(r.take(n).map_err(internal)?)
                .map_err(|_| format!("{key:?} is not valid UTF-8"))?;
            Ok(s.to_owned())
        }
        other => Err(format!("{key:?} must be a string, found {}", describe(other))),
    }
}

fn parse_weight(r: &mut Reader<'_>) -> Result<f32, String> {
    let w = match r.head().map_err(internal)? {
        Head::F32(f) => f as f64,
        Head::F64(f) => f,
        Head::Uint(u) => u as f64,
        Head::Int(i) => i as f64,
        other => return Err(format!("\"weight\" must be a number, found {}", describe(other))),
    };
    if !w.is_finite() {
        return Err(format!("\"weight\" {w} is not finite"));
    }
    if w <= 0.0 {
        return Err(format!("\"weight\" {w} must be greater than 0"));
    }
    if w > MAX_WEIGHT {
        return Err(format!("\"weight\" {w} exceeds the limit of {MAX_WEIGHT}"));
    }
    let w32 = w as f32;
    if w32 <= 0.0 {
        return Err(format!("\"weight\" {w} is too small to represent"));
    }
    Ok(w32)
}

fn parse_tags(r: &mut Reader<'_>) -> Result<Vec<String>, String> {
    let n = match r.head().map_err(internal)? {
        Head::Array(n) => n,
        other => return Err(format!("\"tags\" must be an array of strings, found {}", describe(other))),
    };
    if n > MAX_TAGS {
        return Err(format!("\"tags\" has {n} entries, the limit is {MAX_TAGS}"));
    }
    let mut tags = Vec::with_capacity(n);
    for _ in 0..n {
        tags.push(parse_str(r, "tags", MAX_TAG_BYTES)?);
    }
    Ok(tags)
}
