use std::io::Write;

use super::*;
use crate::rng::Rng;

/// A minimal msgpack writer for building larger frames. The per-mode fixtures below do not
/// use it: they are bytes written out by hand from the protocol's examples, so they do not
/// share any assumption with the reader.
#[derive(Default)]
struct W(Vec<u8>);

impl W {
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn array(&mut self, n: u32) -> &mut Self {
        match n {
            0..=15 => self.raw(&[0x90 | n as u8]),
            16..=0xffff => self.raw(&[0xdc]).raw(&(n as u16).to_be_bytes()),
            _ => self.raw(&[0xdd]).raw(&n.to_be_bytes()),
        }
    }
    fn map(&mut self, n: u32) -> &mut Self {
        match n {
            0..=15 => self.raw(&[0x80 | n as u8]),
            16..=0xffff => self.raw(&[0xde]).raw(&(n as u16).to_be_bytes()),
            _ => self.raw(&[0xdf]).raw(&n.to_be_bytes()),
        }
    }
    fn str(&mut self, s: &str) -> &mut Self {
        let n = s.len();
        match n {
            0..=31 => self.raw(&[0xa0 | n as u8]),
            32..=0xff => self.raw(&[0xd9, n as u8]),
            0x100..=0xffff => self.raw(&[0xda]).raw(&(n as u16).to_be_bytes()),
            _ => self.raw(&[0xdb]).raw(&(n as u32).to_be_bytes()),
        };
        self.raw(s.as_bytes())
    }
    fn bin(&mut self, b: &[u8]) -> &mut Self {
        self.raw(&[0xc6]).raw(&(b.len() as u32).to_be_bytes()).raw(b)
    }
    fn uint(&mut self, u: u64) -> &mut Self {
        self.raw(&[0xcf]).raw(&u.to_be_bytes())
    }
    fn int(&mut self, i: i64) -> &mut Self {
        self.raw(&[0xd3]).raw(&i.to_be_bytes())
    }
    fn f64(&mut self, f: f64) -> &mut Self {
        self.raw(&[0xcb]).raw(&f.to_bits().to_be_bytes())
    }
    fn event_time(&mut self, secs: u32, nanos: u32) -> &mut Self {
        self.raw(&[0xd7, 0x00]).raw(&secs.to_be_bytes()).raw(&nanos.to_be_bytes())
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn s(x: &str) -> ExtId {
    ExtId::from_str(x).unwrap()
}

fn lim() -> Limits {
    Limits::default()
}

fn is_invalid<T: std::fmt::Debug>(r: &Result<T, DecodeError>) -> bool {
    matches!(r, Err(DecodeError::Invalid(_)))
}

const T0: u32 = 1_441_588_984; // 0x55ece6f8, the time in the protocol's examples

// ---------------------------------------------------------------------------------------
// Hand-written fixtures, one per mode.

/// Message mode, integer time:
/// `["tag", 1441588984, {"user": "alice", "item": "i1", "type": "click"}]`
fn message_int_time() -> Vec<u8> {
    let mut f = vec![0x93, 0xa3, b't', b'a', b'g', 0xce, 0x55, 0xec, 0xe6, 0xf8, 0x83];
    f.extend_from_slice(b"\xa4user\xa5alice\xa4item\xa2i1\xa4type\xa5click");
    f
}

/// Message mode, EventTime and an option:
/// `["tag", EventTime(1441588984, 500000000), {"user": 7, "item": "i1", "weight": 2.5},
///   {"chunk": "p8n9"}]`
fn message_event_time() -> Vec<u8> {
    let mut f = vec![0x94, 0xa3, b't', b'a', b'g'];
    f.extend_from_slice(&[0xd7, 0x00, 0x55, 0xec, 0xe6, 0xf8, 0x1d, 0xcd, 0x65, 0x00]);
    f.extend_from_slice(b"\x83\xa4user\x07\xa4item\xa2i1\xa6weight");
    f.extend_from_slice(&[0xcb, 0x40, 0x04, 0, 0, 0, 0, 0, 0]); // f64 2.5
    f.extend_from_slice(b"\x81\xa5chunk\xa4p8n9");
    f
}

/// Forward mode:
/// `["tag", [[1441588984, {"user": "u", "item": "a"}],
///           [1441588985, {"item": "a", "tags": ["x"], "available": true}],
///           [EventTime(1441588986, 0), {"erase_user": "u"}]],
///   {"chunk": "c1", "size": 3}]`
fn forward() -> Vec<u8> {
    let mut f = vec![0x93, 0xa3, b't', b'a', b'g', 0x93];
    f.extend_from_slice(b"\x92\xce\x55\xec\xe6\xf8\x82\xa4user\xa1u\xa4item\xa1a");
    f.extend_from_slice(b"\x92\xce\x55\xec\xe6\xf9\x83\xa4item\xa1a\xa4tags\x91\xa1x");
    f.extend_from_slice(b"\xa9available\xc3");
    f.extend_from_slice(b"\x92\xd7\x00\x55\xec\xe6\xfa\x00\x00\x00\x00\x81\xaaerase_user\xa1u");
    f.extend_from_slice(b"\x82\xa5chunk\xa2c1\xa4size\x03");
    f
}

/// Two packed entries:
/// `[1441588984, {"user": "u", "item": "a"}]` and
/// `[EventTime(1441588984, 1), {"user": "v", "item": "b"}]`.
fn packed_entries() -> (Vec<u8>, Vec<u8>) {
    let e1 = b"\x92\xce\x55\xec\xe6\xf8\x82\xa4user\xa1u\xa4item\xa1a".to_vec();
    let e2 = b"\x92\xd7\x00\x55\xec\xe6\xf8\x00\x00\x00\x01\x82\xa4user\xa1v\xa4item\xa1b".to_vec();
    assert_eq!((e1.len(), e2.len()), (21, 26));
    (e1, e2)
}

/// PackedForward mode, entries in a bin8 (`0xc4 47`), with `{"chunk": "c2"}`.
fn packed_bin() -> Vec<u8> {
    let (e1, e2) = packed_entries();
    let mut f = vec![0x93, 0xa3, b't', b'a', b'g', 0xc4, 47];
    f.extend_from_slice(&e1);
    f.extend_from_slice(&e2);
    f.extend_from_slice(b"\x81\xa5chunk\xa2c2");
    f
}

/// PackedForward mode as older clients send it: entries in a str8 (`0xd9 47`), no option.
fn packed_str() -> Vec<u8> {
    let (e1, e2) = packed_entries();
    let mut f = vec![0x92, 0xa3, b't', b'a', b'g', 0xd9, 47];
    f.extend_from_slice(&e1);
    f.extend_from_slice(&e2);
    f
}

/// CompressedPackedForward: the entries gzipped into one member, or one member per entry
/// (concatenated members, as clients produce when they compress per flush).
fn compressed(members: usize) -> Vec<u8> {
    let (e1, e2) = packed_entries();
    let gz = if members == 1 { gzip(&[e1, e2].concat()) } else { [gzip(&e1), gzip(&e2)].concat() };
    assert!(gz.len() <= 0xff);
    let mut f = vec![0x93, 0xa3, b't', b'a', b'g', 0xc4, gz.len() as u8];
    f.extend_from_slice(&gz);
    f.extend_from_slice(b"\x82\xaacompressed\xa4gzip\xa5chunk\xa2c3");
    f
}

fn all_fixtures() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("message_int_time", message_int_time()),
        ("message_event_time", message_event_time()),
        ("forward", forward()),
        ("packed_bin", packed_bin()),
        ("packed_str", packed_str()),
        ("compressed_one_member", compressed(1)),
        ("compressed_two_members", compressed(2)),
    ]
}

fn packed_records() -> Vec<Record> {
    vec![
        Record::Interaction { user: s("u"), item: s("a"), kind: None, weight: None, id: None, ts: T0 as f64 },
        Record::Interaction {
            user: s("v"),
            item: s("b"),
            kind: None,
            weight: None,
            id: None,
            ts: T0 as f64 + 1e-9,
        },
    ]
}

// ---------------------------------------------------------------------------------------
// Every mode decodes.

#[test]
fn message_mode_with_integer_time() {
    let f = message_int_time();
    let (frame, used) = decode_frame(&f, &lim()).unwrap();
    assert_eq!(used, f.len());
    assert_eq!(frame.tag, "tag");
    assert_eq!(frame.chunk, None);
    assert!(frame.rejected.is_empty());
    assert_eq!(
        frame.records,
        vec![Record::Interaction {
            user: s("alice"),
            item: s("i1"),
            kind: Some("click".into()),
            weight: None,
            id: None,
            ts: T0 as f64,
        }]
    );
}

#[test]
fn message_mode_with_event_time_and_chunk() {
    let f = message_event_time();
    let (frame, used) = decode_frame(&f, &lim()).unwrap();
    assert_eq!(used, f.len());
    assert_eq!(frame.chunk.as_deref(), Some("p8n9"));
    assert_eq!(
        frame.records,
        vec![Record::Interaction {
            user: ExtId::Int(7),
            item: s("i1"),
            kind: None,
            weight: Some(2.5),
            id: None,
            ts: T0 as f64 + 0.5,
        }]
    );
}

#[test]
fn forward_mode_decodes_all_three_record_kinds() {
    let f = forward();
    let (frame, used) = decode_frame(&f, &lim()).unwrap();
    assert_eq!(used, f.len());
    assert_eq!(frame.chunk.as_deref(), Some("c1"));
    assert!(frame.rejected.is_empty());
    assert_eq!(
        frame.records,
        vec![
            Record::Interaction {
                user: s("u"),
                item: s("a"),
                kind: None,
                weight: None,
                id: None,
                ts: T0 as f64,
            },
            Record::ItemUpsert {
                item: s("a"),
                tags: vec!["x".into()],
                category: None,
                available: Some(true),
                ts: T0 as f64 + 1.0,
            },
            Record::EraseUser { user: s("u"), ts: T0 as f64 + 2.0 },
        ]
    );
}

#[test]
fn packed_forward_as_bin_and_as_str() {
    for (f, chunk) in [(packed_bin(), Some("c2")), (packed_str(), None)] {
        let (frame, used) = decode_frame(&f, &lim()).unwrap();
        assert_eq!(used, f.len());
        assert_eq!(frame.chunk.as_deref(), chunk);
        assert!(frame.rejected.is_empty());
        assert_eq!(frame.records, packed_records());
    }
}

#[test]
fn compressed_packed_forward_with_one_and_two_gzip_members() {
    for members in [1, 2] {
        let f = compressed(members);
        let (frame, used) = decode_frame(&f, &lim()).unwrap();
        assert_eq!(used, f.len());
        assert_eq!(frame.chunk.as_deref(), Some("c3"));
        assert_eq!(frame.records, packed_records(), "{members} member(s)");
    }
}

#[test]
fn fluent_bit_time_with_metadata_is_accepted() {
    // [[EventTime, {}], record] in a Forward frame.
    let mut f = vec![0x92, 0xa3, b't', b'a', b'g', 0x91, 0x92, 0x92];
    f.extend_from_slice(&[0xd7, 0x00, 0x55, 0xec, 0xe6, 0xf8, 0, 0, 0, 0, 0x80]);
    f.extend_from_slice(b"\x81\xaaerase_user\x05");
    let (frame, _) = decode_frame(&f, &lim()).unwrap();
    assert_eq!(frame.records, vec![Record::EraseUser { user: ExtId::Int(5), ts: T0 as f64 }]);
}

// ---------------------------------------------------------------------------------------
// Framing: prefixes, lengths, back-to-back frames.

#[test]
fn every_strict_prefix_is_incomplete_and_frame_len_is_exact() {
    for (name, f) in all_fixtures() {
        for cut in 0..f.len() {
            assert_eq!(
                decode_frame(&f[..cut], &lim()).map(|(_, n)| n),
                Err(DecodeError::Incomplete),
                "{name} cut at {cut}"
            );
            assert_eq!(frame_len(&f[..cut], &lim()), Err(DecodeError::Incomplete), "{name} cut at {cut}");
        }
        assert_eq!(frame_len(&f, &lim()), Ok(f.len()), "{name}");
        assert_eq!(decode_frame(&f, &lim()).unwrap().1, f.len(), "{name}");
    }
}

#[test]
fn back_to_back_frames_decode_one_at_a_time() {
    let fixtures = all_fixtures();
    let stream: Vec<u8> = fixtures.iter().flat_map(|(_, f)| f.clone()).collect();
    let mut rest = &stream[..];
    for (name, f) in &fixtures {
        assert_eq!(frame_len(rest, &lim()), Ok(f.len()), "{name}");
        let (frame, used) = decode_frame(rest, &lim()).unwrap();
        assert_eq!(used, f.len(), "{name}");
        assert_eq!(frame.records, decode_frame(f, &lim()).unwrap().0.records);
        rest = &rest[used..];
    }
    assert!(rest.is_empty());
    assert_eq!(decode_frame(rest, &lim()).map(|_| ()), Err(DecodeError::Incomplete));
}

#[test]
fn split_frames_takes_every_complete_frame_and_stops_at_a_partial_or_invalid_one() {
    let fixtures = all_fixtures();
    let stream: Vec<u8> = fixtures.iter().flat_map(|(_, f)| f.clone()).collect();
    let decode = |b: &[u8]| decode_frame(b, &lim()).map(|(f, n)| (f.records, n));
    let lens: Vec<usize> = fixtures.iter().map(|(_, f)| f.len()).collect();

    let (found, used, error) = split_frames(&stream, decode);
    assert_eq!(found.len(), fixtures.len());
    assert_eq!(used, stream.len());
    assert_eq!(error, None);
    for ((name, f), records) in fixtures.iter().zip(&found) {
        assert_eq!(records, &decode_frame(f, &lim()).unwrap().0.records, "{name}");
    }

    // Cut inside the third frame: two frames, their bytes, and no error (more may come).
    let cut = lens[0] + lens[1] + lens[2] / 2;
    let (found, used, error) = split_frames(&stream[..cut], decode);
    assert_eq!((found.len(), used, error), (2, lens[0] + lens[1], None));

    // Garbage after two frames: the two stand, and the reason comes back.
    let mut bad = stream[..lens[0] + lens[1]].to_vec();
    bad.extend_from_slice(&[0xc1, 0, 0, 0]);
    let (found, used, error) = split_frames(&bad, decode);
    assert_eq!((found.len(), used), (2, lens[0] + lens[1]));
    assert!(error.is_some());

    let (found, used, error) = split_frames(&[], decode);
    assert_eq!((found.len(), used, error), (0, 0, None));
}

// ---------------------------------------------------------------------------------------
// Garbage is Invalid, never Incomplete, and is refused from its length field alone.

#[test]
fn reserved_byte_at_any_marker_is_invalid() {
    let f = message_int_time();
    // Positions of markers: outer array, tag, time, record map, first key, first value.
    for pos in [0, 1, 5, 10, 11, 16] {
        let mut g = f.clone();
        g[pos] = 0xc1;
        assert!(is_invalid(&decode_frame(&g, &lim())), "0xc1 at {pos}");
        assert!(is_invalid(&frame_len(&g, &lim())), "0xc1 at {pos}");
    }
    // Inside a PackedForward payload, whose bytes are all present: Invalid too.
    let mut g = packed_bin();
    g[7] = 0xc1;
    assert!(is_invalid(&decode_frame(&g, &lim())));
}

#[test]
fn wrong_top_level_shapes_are_invalid() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("top-level int", vec![0x05]),
        ("top-level nil", vec![0xc0]),
        ("top-level map", b"\x81\xa3tag\x01".to_vec()),
        ("array of 1", b"\x91\xa3tag".to_vec()),
        ("array of 5", b"\x95\xa3tag".to_vec()),
        ("Message without record", b"\x92\xa3tag\x01".to_vec()),
        ("Forward with 4 elements", b"\x94\xa3tag\x90".to_vec()),
        ("Packed with 4 elements", b"\x94\xa3tag\xc4\x00".to_vec()),
        ("int tag", b"\x92\x01\x90".to_vec()),
        ("invalid UTF-8 tag", b"\x92\xa2\xff\xfe\x90".to_vec()),
        ("map as second element", b"\x92\xa3tag\x80".to_vec()),
        ("nil as second element", b"\x92\xa3tag\xc0".to_vec()),
        ("option not a map", b"\x93\xa3tag\x90\x01".to_vec()),
        ("chunk not a string", b"\x93\xa3tag\x90\x81\xa5chunk\x01".to_vec()),
        ("unsupported compression", b"\x93\xa3tag\xc4\x00\x81\xaacompressed\xa4zstd".to_vec()),
        ("damaged gzip", b"\x93\xa3tag\xc4\x03abc\x81\xaacompressed\xa4gzip".to_vec()),
        // A packed payload whose last entry is cut short can never be completed.
        ("truncated packed entry", b"\x92\xa3tag\xc4\x02\x92\x01".to_vec()),
    ];
    for (name, f) in cases {
        assert!(is_invalid(&decode_frame(&f, &lim())), "{name}");
        assert!(is_invalid(&frame_len(&f, &lim())), "{name}");
    }
}

#[test]
fn huge_declared_lengths_are_invalid_from_the_header_alone() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("top-level map32 of 2^31", vec![0xdf, 0x80, 0, 0, 0]),
        // Message mode whose record is a map32 of 2^31 pairs, and nothing after it.
        ("record map32 of 2^31", b"\x93\xa3tag\x01\xdf\x80\x00\x00\x00".to_vec()),
        ("str32 tag of 4 GB", vec![0x92, 0xdb, 0xff, 0xff, 0xff, 0xff]),
        ("str32 record value of 4 GB", b"\x93\xa3tag\x01\x81\xa1k\xdb\xff\xff\xff\xff".to_vec()),
        ("bin32 packed payload of 4 GB", b"\x92\xa3tag\xc6\xff\xff\xff\xff".to_vec()),
        ("array32 of 4G entries", b"\x92\xa3tag\xdd\xff\xff\xff\xff".to_vec()),
        ("array32 of 4G inside a record", b"\x93\xa3tag\x01\x81\xa1k\xdd\xff\xff\xff\xff".to_vec()),
    ];
    for (name, f) in cases {
        assert!(is_invalid(&decode_frame(&f, &lim())), "{name}");
        assert!(is_invalid(&frame_len(&f, &lim())), "{name}");
    }
    // Within the entry limit but more entries than the frame-size limit could ever hold.
    let small = Limits { max_frame_bytes: 1000, ..lim() };
    let f = b"\x92\xa3tag\xdc\x13\x88".to_vec(); // array16 of 5000
    assert!(is_invalid(&frame_len(&f, &small)));
    assert_eq!(frame_len(&f, &lim()), Err(DecodeError::Incomplete));
}

#[test]
fn frame_larger_than_the_limit_is_invalid_once_it_passes_the_limit() {
    let f = packed_bin();
    let tight = Limits { max_frame_bytes: f.len() - 1, ..lim() };
    assert!(is_invalid(&frame_len(&f, &tight)));
    let exact = Limits { max_frame_bytes: f.len(), ..lim() };
    assert_eq!(frame_len(&f, &exact), Ok(f.len()));
}

#[test]
fn gzip_bomb_over_the_decompressed_limit_is_invalid() {
    let limits = Limits { max_decompressed_bytes: 1 << 20, ..lim() };
    // 8 MiB of 0x00 (each a valid msgpack fixint) gzips to a few KiB.
    let bomb = gzip(&vec![0u8; 8 << 20]);
    assert!(bomb.len() < 64 << 10);
    let mut w = W::default();
    w.array(3).str("tag").bin(&bomb).map(1).str("compressed").str("gzip");
    let r = decode_frame(&w.0, &limits);
    assert!(is_invalid(&r), "{:?}", r.map(|(_, n)| n));
    // The same payload just under the limit is accepted (entries that are not
    // [time, record] are rejected one by one, not the frame).
    let ok = gzip(&vec![0u8; 1000]);
    let mut w = W::default();
    w.array(3).str("tag").bin(&ok).map(1).str("compressed").str("gzip");
    let (frame, _) = decode_frame(&w.0, &limits).unwrap();
    assert_eq!(frame.rejected.len(), 1000);
}

#[test]
fn gunzip_stops_at_the_limit_and_holds_no_more_than_it_produced() {
    // Not a power of two: a doubling buffer would overshoot it.
    let limit = 1_000_000;
    // A bomb: 64 MiB of zeros. Refused once the output passes the limit, without reading on.
    let bomb = gzip(&vec![0u8; 64 << 20]);
    let err = gunzip(&bomb, limit).unwrap_err();
    assert!(is_invalid(&Err::<(), _>(err)));
    // Exactly the limit is accepted, and the buffer never grew past limit + 1.
    let data: Vec<u8> = (0..limit).map(|i| (i % 251) as u8).collect();
    let out = gunzip(&gzip(&data), limit).unwrap();
    assert_eq!(out, data);
    assert!(out.capacity() <= limit + 1, "capacity {}", out.capacity());
    // A small payload gets a small buffer, not the limit up front.
    let out = gunzip(&gzip(b"hello"), limit).unwrap();
    assert_eq!(out, b"hello");
    assert!(out.capacity() < 64 << 10, "capacity {}", out.capacity());
    // Several members back to back, the last one cut short: damaged, not silently short.
    let two = [gzip(b"ab"), gzip(b"cd")].concat();
    assert_eq!(gunzip(&two, limit).unwrap(), b"abcd");
    assert!(gunzip(&two[..two.len() - 3], limit).is_err());
}

#[test]
fn too_many_packed_entries_is_invalid() {
    let limits = Limits { max_entries: 10, ..lim() };
    let mut w = W::default();
    w.array(2).str("tag").bin(&[0xc0; 11]);
    assert!(is_invalid(&decode_frame(&w.0, &limits)));
    let mut w = W::default();
    w.array(2).str("tag").bin(&[0xc0; 10]);
    assert_eq!(decode_frame(&w.0, &limits).unwrap().0.rejected.len(), 10);
}

// ---------------------------------------------------------------------------------------
// Record-level problems reject the entry, not the frame.

/// A Forward frame with these entry bodies (each written as a complete msgpack value).
fn forward_of(entries: &[Vec<u8>]) -> Vec<u8> {
    let mut w = W::default();
    w.array(2).str("tag").array(entries.len() as u32);
    for e in entries {
        w.raw(e);
    }
    w.0
}

fn entry(build: impl FnOnce(&mut W)) -> Vec<u8> {
    let mut w = W::default();
    w.array(2).uint(T0 as u64);
    build(&mut w);
    w.0
}

#[test]
fn bad_records_are_rejected_with_reasons_while_good_ones_decode() {
    let long_id = "x".repeat(300);
    let entries = vec![
        // 0: good
        entry(|w| {
            w.map(3).str("user").str("u").str("item").str("a").str("type").str("view");
        }),
        // 1: NaN weight
        entry(|w| {
            w.map(3).str("user").str("u").str("item").str("a").str("weight").f64(f64::NAN);
        }),
        // 2: negative weight
        entry(|w| {
            w.map(3).str("user").str("u").str("item").str("a").str("weight").f64(-1.0);
        }),
        // 3: 300-byte id
        entry(|w| {
            w.map(2).str("user").str(&long_id).str("item").str("a");
        }),
        // 4: u64::MAX id
        entry(|w| {
            w.map(2).str("user").str("u").str("item").uint(u64::MAX);
        }),
        // 5: tags not a list
        entry(|w| {
            w.map(2).str("item").str("a").str("tags").str("x");
        }),
        // 6: wrong-typed item
        entry(|w| {
            w.map(2).str("user").str("u").str("item").raw(&[0xc3]);
        }),
        // 7: good upsert with an unknown key (ignored) and a non-string key (ignored)
        entry(|w| {
            w.map(4).str("item").int(-3).str("category").str("books");
            w.str("future").map(1).str("k").array(2).uint(1).uint(2);
            w.uint(9).str("ignored");
        }),
        // 8: record is not a map
        entry(|w| {
            w.uint(1);
        }),
        // 9: entry is not [time, record]
        {
            let mut w = W::default();
            w.str("x");
            w.0
        },
        // 10: zero weight, 11: infinite weight, 12: weight over 1e6
        entry(|w| {
            w.map(3).str("user").str("u").str("item").str("a").str("weight").f64(0.0);
        }),
        entry(|w| {
            w.map(3).str("user").str("u").str("item").str("a").str("weight").f64(f64::INFINITY);
        }),
        entry(|w| {
            w.map(3).str("user").str("u").str("item").str("a").str("weight").f64(2e6);
        }),
        // 13: good, integer weight and both type and weight present, with an int event id
        entry(|w| {
            w.map(5).str("user").str("u").str("item").str("a").str("weight").uint(3);
            w.str("type").str("buy").str("id").uint(99);
        }),
        // 14: duplicate key
        entry(|w| {
            w.map(3).str("user").str("u").str("user").str("v").str("item").str("a");
        }),
        // 15: user without item
        entry(|w| {
            w.map(1).str("user").str("u");
        }),
        // 16: empty id
        entry(|w| {
            w.map(1).str("erase_user").str("");
        }),
        // 17: available not a bool
        entry(|w| {
            w.map(2).str("item").str("a").str("available").str("yes");
        }),
        // 18: tags with a non-string element
        entry(|w| {
            w.map(2).str("item").str("a").str("tags").array(2).str("x").uint(1);
        }),
        // 19: negative time
        {
            let mut w = W::default();
            w.array(2).int(-5).map(1).str("erase_user").str("u");
            w.0
        },
        // 20: EventTime with out-of-range nanoseconds
        {
            let mut w = W::default();
            w.array(2).event_time(T0, 1_000_000_000).map(1).str("erase_user").str("u");
            w.0
        },
        // 21: good erase
        entry(|w| {
            w.map(1).str("erase_user").str("u");
        }),
        // 22: a time before the epoch floor (a missing time sent as 0)
        {
            let mut w = W::default();
            w.array(2).uint(0).map(1).str("erase_user").str("u");
            w.0
        },
        // 23: milliseconds instead of seconds
        {
            let mut w = W::default();
            w.array(2).uint(1_796_070_000_000).map(2).str("user").str("evil").str("item").str("spam");
            w.0
        },
        // 24: a float time far beyond any date
        {
            let mut w = W::default();
            w.array(2).f64(2f64.powi(70)).map(2).str("user").str("evil").str("item").str("spam");
            w.0
        },
    ];
    let f = forward_of(&entries);
    let (frame, used) = decode_frame(&f, &lim()).unwrap();
    assert_eq!(used, f.len());

    let t = T0 as f64;
    assert_eq!(
        frame.records,
        vec![
            Record::Interaction {
                user: s("u"),
                item: s("a"),
                kind: Some("view".into()),
                weight: None,
                id: None,
                ts: t,
            },
            Record::ItemUpsert {
                item: ExtId::Int(-3),
                tags: vec![],
                category: Some("books".into()),
                available: None,
                ts: t,
            },
            Record::Interaction {
                user: s("u"),
                item: s("a"),
                kind: Some("buy".into()),
                weight: Some(3.0),
                id: Some(ExtId::Int(99)),
                ts: t,
            },
            Record::EraseUser { user: s("u"), ts: t },
        ]
    );
    let expect: Vec<(usize, &str)> = vec![
        (1, "\"weight\" NaN is not finite"),
        (2, "\"weight\" -1 must be greater than 0"),
        (3, "\"user\": id is 300 bytes"),
        (4, "\"item\" 18446744073709551615 does not fit"),
        (5, "\"tags\" must be an array of strings, found a string"),
        (6, "\"item\" must be a string or an integer, found a boolean"),
        (8, "a record must be a map, found an integer"),
        (9, "an entry must be a [time, record] array, found a string"),
        (10, "\"weight\" 0 must be greater than 0"),
        (11, "\"weight\" inf is not finite"),
        (12, "\"weight\" 2000000 exceeds the limit"),
        (14, "duplicate key \"user\""),
        (15, "has \"user\" but no \"item\""),
        (16, "\"erase_user\": id is an empty string"),
        (17, "\"available\" must be a boolean, found a string"),
        (18, "\"tags\" must be a string, found an integer"),
        (19, "time -5 is negative"),
        (20, "nanoseconds 1000000000 are out of range"),
        (22, "time 0 is before 1990-01-01"),
        (23, "time 1796070000000 is after the year 9999"),
        (24, "is after the year 9999"),
    ];
    assert_eq!(
        frame.rejected.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        expect.iter().map(|(i, _)| *i).collect::<Vec<_>>()
    );
    for ((i, why), (_, want)) in frame.rejected.iter().zip(&expect) {
        assert!(why.contains(want), "entry {i}: {why:?} should mention {want:?}");
    }
}

#[test]
fn message_mode_bad_record_is_rejected_not_invalid() {
    // ["tag", 1, "not a map"]
    let f = b"\x93\xa3tag\x01\xa9not a map".to_vec();
    let (frame, used) = decode_frame(&f, &lim()).unwrap();
    assert_eq!(used, f.len());
    assert!(frame.records.is_empty());
    assert_eq!(frame.rejected.len(), 1);
    assert_eq!(frame.rejected[0].0, 0);
}

// ---------------------------------------------------------------------------------------
// Mutations never panic, never overrun, and frame_len always agrees with decode_frame.

#[test]
fn random_mutations_never_panic_and_frame_len_agrees() {
    let fixtures: Vec<Vec<u8>> = all_fixtures().into_iter().map(|(_, f)| f).collect();
    // Tight limits so that limit paths are exercised too.
    let limits = Limits {
        max_frame_bytes: 4096,
        max_entries: 8,
        max_array: 16,
        max_map: 8,
        max_str: 64,
        max_decompressed_bytes: 1024,
    };
    let mut rng = Rng::new(0x5eed);
    let (mut ok, mut incomplete, mut invalid) = (0, 0, 0);
    for _ in 0..20_000 {
        let mut buf = fixtures[rng.below(fixtures.len() as u64) as usize].clone();
        for _ in 0..1 + rng.below(3) {
            match rng.below(4) {
                0 if !buf.is_empty() => {
                    let i = rng.below(buf.len() as u64) as usize;
                    buf[i] ^= 1 << rng.below(8);
                }
                1 if !buf.is_empty() => {
                    let i = rng.below(buf.len() as u64) as usize;
                    buf[i] = rng.next_u64() as u8;
                }
                2 => {
                    let i = rng.below(buf.len() as u64 + 1) as usize;
                    buf.insert(i, rng.next_u64() as u8);
                }
                _ => {
                    let n = rng.below(buf.len() as u64 + 1) as usize;
                    buf.truncate(n);
                }
            }
        }
        let decoded = decode_frame(&buf, &limits);
        let len = frame_len(&buf, &limits);
        assert_eq!(len, decoded.as_ref().map(|(_, n)| *n).map_err(Clone::clone));
        match decoded {
            Ok((frame, n)) => {
                ok += 1;
                assert!(n <= buf.len());
                // A frame is self-contained: its own bytes decode to the same thing.
                let (again, m) = decode_frame(&buf[..n], &limits).unwrap();
                assert_eq!(m, n);
                assert_eq!(again.records, frame.records);
                assert_eq!(again.rejected, frame.rejected);
                let idx: Vec<usize> = frame.rejected.iter().map(|(i, _)| *i).collect();
                assert!(idx.windows(2).all(|p| p[0] < p[1]));
            }
            Err(DecodeError::Incomplete) => incomplete += 1,
            Err(DecodeError::Invalid(_)) => invalid += 1,
        }
    }
    // The mutations must reach all three outcomes to mean anything.
    eprintln!("mutations: {ok} ok, {incomplete} incomplete, {invalid} invalid");
    assert!(ok > 500 && incomplete > 500 && invalid > 500, "{ok} {incomplete} {invalid}");
}

// ---------------------------------------------------------------------------------------
// Throughput: `cargo test --release -p core_rs decode_throughput -- --ignored --nocapture`

fn packed_interactions(n: usize) -> Vec<u8> {
    let mut entries = W::default();
    for i in 0..n {
        entries
            .array(2)
            .event_time(T0 + i as u32, 123_000_000)
            .map(3)
            .str("user")
            .str(&format!("user-{}", i % 997))
            .str("item")
            .str(&format!("item-{}", i % 5003))
            .str("type")
            .str("click");
    }
    let mut w = W::default();
    w.array(3).str("events").bin(&entries.0).map(1).str("chunk").str("abc");
    w.0
}

#[test]
#[ignore]
fn decode_throughput() {
    let f = packed_interactions(10_000);
    let limits = lim();
    let rounds = 200;
    let start = std::time::Instant::now();
    let mut total = 0;
    for _ in 0..rounds {
        let (frame, _) = decode_frame(std::hint::black_box(&f), &limits).unwrap();
        total += frame.records.len();
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(total, rounds * 10_000);
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        frame_len(std::hint::black_box(&f), &limits).unwrap();
    }
    let check_secs = start.elapsed().as_secs_f64();
    println!(
        "decode_frame: {:.2} M records/s ({:.1} MB/s); frame_len alone: {:.2} M records/s \
         ({} bytes per frame)",
        total as f64 / secs / 1e6,
        (f.len() * rounds) as f64 / secs / 1e6,
        total as f64 / check_secs / 1e6,
        f.len()
    );
}
