//! The saved form of an index.
//!
//! ```text
//! magic     8 bytes  b"RSHNSW\0\0"
//! version   u32      FORMAT_VERSION
//! body_len  u64
//! body      dim u32, m u32, ef_construction u32, ef_search u32, seed u64,
//!           slots u32, entry u32 (u32::MAX = none), max_level u32,
//!           per slot: level u8 (255 = unused); for a node: deleted u8,
//!           tree parent u32 (u32::MAX = none), drift f32, anchor norm f32, dim × f32,
//!           then for each layer 0..=level: count u32, count × u32 ids
//! crc32     u32      over the body
//! ```
//! All integers and floats are little-endian. In-degrees and counts are derived on load, and
//! the loaded graph must pass `check_invariants`, so a file that checksums but is
//! inconsistent is still rejected instead of panicking later in a search.

use std::io::{self, Read, Write};

use super::{Hnsw, HnswConfig, ABSENT, MAX_LEVEL};

const MAGIC: &[u8; 8] = b"RSHNSW\0\0";
const FORMAT_VERSION: u32 = 1;

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

pub(super) fn save(h: &Hnsw, w: &mut dyn Write) -> io::Result<()> {
    let mut b: Vec<u8> = Vec::with_capacity(h.vectors.len() * 4 + h.links0.len() * 4 + 64);
    let put32 = |b: &mut Vec<u8>, x: u32| b.extend_from_slice(&x.to_le_bytes());
    put32(&mut b, h.dim as u32);
    put32(&mut b, h.cfg.m as u32);
    put32(&mut b, h.cfg.ef_construction as u32);
    put32(&mut b, h.cfg.ef_search as u32);
    b.extend_from_slice(&h.cfg.seed.to_le_bytes());
    put32(&mut b, h.levels.len() as u32);
    put32(&mut b, h.entry.unwrap_or(u32::MAX));
    put32(&mut b, h.max_level as u32);
    for id in 0..h.levels.len() as u32 {
        let lvl = h.levels[id as usize];
        b.push(lvl);
        if lvl == ABSENT {
            continue;
        }
        b.push(u8::from(h.deleted[id as usize]));
        put32(&mut b, h.parent0[id as usize]);
        b.extend_from_slice(&h.drift[id as usize].to_le_bytes());
        b.extend_from_slice(&h.anchor_norm[id as usize].to_le_bytes());
        for &x in h.vec(id) {
            b.extend_from_slice(&x.to_le_bytes());
        }
        for l in 0..=lvl as usize {
            let list = h.links(id, l);
            put32(&mut b, list.len() as u32);
            for &n in list {
                put32(&mut b, n);
            }
        }
    }
    w.write_all(MAGIC)?;
    w.write_all(&FORMAT_VERSION.to_le_bytes())?;
    w.write_all(&(b.len() as u64).to_le_bytes())?;
    w.write_all(&b)?;
    w.write_all(&crc32fast::hash(&b).to_le_bytes())?;
    w.flush()
}

/// Bounds-checked little-endian reader over the verified body.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, n: usize) -> io::Result<&[u8]> {
        if self.b.len() - self.at < n {
            return Err(invalid("HNSW file body ends early"));
        }
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
}

pub(super) fn load(r: &mut dyn Read) -> io::Result<Hnsw> {
    let mut all = Vec::new();
    r.read_to_end(&mut all)?;
    if all.len() < 8 || &all[..8] != MAGIC {
        return Err(invalid("not an HNSW index file (bad magic bytes)"));
    }
    if all.len() < 20 {
        return Err(invalid("HNSW file truncated in its header"));
    }
    let version = u32::from_le_bytes(all[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(invalid(format!(
            "HNSW file format version {version} is not supported (expected {FORMAT_VERSION})"
        )));
    }
    let body_len = u64::from_le_bytes(all[12..20].try_into().expect("8 bytes"));
    if (all.len() - 20) as u64 != body_len.saturating_add(4) {
        return Err(invalid(format!(
            "HNSW file is {} bytes, its header announces {}",
            all.len(),
            body_len.saturating_add(24)
        )));
    }
    let body = &all[20..all.len() - 4];
    let want = u32::from_le_bytes(all[all.len() - 4..].try_into().expect("4 bytes"));
    if crc32fast::hash(body) != want {
        return Err(invalid("HNSW file checksum mismatch (corrupted file)"));
    }
    let mut c = Cursor { b: body, at: 0 };
    let dim = c.u32()? as usize;
    let m = c.u32()? as usize;
    let ef_construction = c.u32()? as usize;
    let ef_search = c.u32()? as usize;
    let seed = c.u64()?;
    if dim == 0 || m < 2 {
        return Err(invalid(format!("HNSW file has invalid parameters dim={dim} m={m}")));
    }
    let mut h = Hnsw::new(dim, HnswConfig { m, ef_construction, ef_search, seed });
    let slots = c.u32()? as usize;
    // Each slot takes at least one byte, so this bounds the allocation by the file size.
    if slots > body.len() {
        return Err(invalid("HNSW file announces more slots than it holds"));
    }
    let entry = c.u32()?;
    h.entry = (entry != u32::MAX).then_some(entry);
    h.max_level = c.u32()? as usize;
    h.grow(slots);
    let mut parents = vec![super::NO_PARENT; slots];
    for id in 0..slots as u32 {
        let lvl = c.u8()?;
        if lvl == ABSENT {
            continue;
        }
        if lvl as usize > MAX_LEVEL {
            return Err(invalid(format!("HNSW file: node {id} has level {lvl}")));
        }
        let i = id as usize;
        h.levels[i] = lvl;
        h.deleted[i] = c.u8()? != 0;
        parents[i] = c.u32()?;
        if parents[i] != super::NO_PARENT && parents[i] as usize >= slots {
            return Err(invalid(format!("HNSW file: node {id} has parent {}", parents[i])));
        }
        h.drift[i] = f32::from_bits(c.u32()?);
        h.anchor_norm[i] = f32::from_bits(c.u32()?);
        h.nodes += 1;
        h.live += usize::from(!h.deleted[i]);
        let raw = c.take(dim * 4)?;
        for (d, x) in raw.chunks_exact(4).enumerate() {
            h.vectors[i * dim + d] = f32::from_le_bytes(x.try_into().expect("4 bytes"));
        }
        h.upper[i] = vec![0; lvl as usize * (m + 1)];
        for l in 0..=lvl as usize {
            let n = c.u32()? as usize;
            if n > h.cap(l) {
                return Err(invalid(format!("HNSW file: node {id} has {n} links on layer {l}")));
            }
            let mut list = Vec::with_capacity(n);
            for _ in 0..n {
                let t = c.u32()?;
                if t as usize >= slots {
                    return Err(invalid(format!("HNSW file: node {id} links to unknown {t}")));
                }
                list.push(t);
            }
            h.set_links(id, l, &list);
        }
    }
    // The saved tree is the authority; child counts are derived from it.
    h.nchild = vec![0; slots];
    for &p in &parents {
        if p != super::NO_PARENT {
            h.nchild[p as usize] += 1;
        }
    }
    h.parent0 = parents;
    if c.at != body.len() {
        return Err(invalid("HNSW file has trailing bytes in its body"));
    }
    if let Some(e) = h.entry {
        if e as usize >= slots {
            return Err(invalid("HNSW file: entry point out of range"));
        }
    }
    h.check_invariants().map_err(|e| invalid(format!("HNSW file is inconsistent: {e}")))?;
    Ok(h)
}
