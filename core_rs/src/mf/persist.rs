//! `save` / `load`: little-endian fields, no framing (the snapshot file around it carries the
//! magic, version and checksum). `load` treats its input as untrusted: every length is bounded
//! by a sane limit and read in chunks, so a corrupt length can neither panic nor allocate more
//! than the bytes actually present.

use std::collections::VecDeque;
use std::io::{self, Read, Write};

use super::kernels::Scratch;
use super::{Entry, Mf, MfConfig};

const MAGIC: &[u8; 4] = b"RSMF";
const VERSION: u32 = 1;
/// Largest latent dimension accepted on load.
const MAX_DIM: u64 = 4096;
/// Largest history cap / row count accepted on load.
const MAX_CAP: u64 = 1 << 24;
const MAX_ROWS: u64 = 1 << 32;
const MAX_ONLINE_ITERS: u64 = 1 << 10;
/// Elements read per chunk when loading a vector.
const CHUNK: usize = 1 << 14;

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("mf snapshot: {msg}"))
}

struct Out<'a>(&'a mut dyn Write);

impl Out<'_> {
    fn u8(&mut self, v: u8) -> io::Result<()> {
        self.0.write_all(&[v])
    }
    fn u32(&mut self, v: u32) -> io::Result<()> {
        self.0.write_all(&v.to_le_bytes())
    }
    fn u64(&mut self, v: u64) -> io::Result<()> {
        self.0.write_all(&v.to_le_bytes())
    }
    fn f32(&mut self, v: f32) -> io::Result<()> {
        self.0.write_all(&v.to_le_bytes())
    }
    fn f64(&mut self, v: f64) -> io::Result<()> {
        self.0.write_all(&v.to_le_bytes())
    }
    fn f32s(&mut self, v: &[f32]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(CHUNK * 4);
        for c in v.chunks(CHUNK) {
            buf.clear();
            c.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
            self.0.write_all(&buf)?;
        }
        Ok(())
    }
    fn f64s(&mut self, v: &[f64]) -> io::Result<()> {
        let mut buf = Vec::with_capacity(CHUNK * 8);
        for c in v.chunks(CHUNK) {
            buf.clear();
            c.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
            self.0.write_all(&buf)?;
        }
        Ok(())
    }
    fn hist(&mut self, h: &VecDeque<Entry>) -> io::Result<()> {
        self.u32(h.len() as u32)?;
        for e in h {
            self.u32(e.id)?;
            self.u32(e.n)?;
            self.f32(e.w)?;
            self.f64(e.ts)?;
        }
        Ok(())
    }
}

struct In<'a>(&'a mut dyn Read);

impl In<'_> {
    fn bytes<const N: usize>(&mut self) -> io::Result<[u8; N]> {
        let mut b = [0u8; N];
        self.0.read_exact(&mut b)?;
        Ok(b)
    }
    fn u8(&mut self) -> io::Result<u8> {
        Ok(self.bytes::<1>()?[0])
    }
    fn u32(&mut self) -> io::Result<u32> {
        Ok(u32::from_le_bytes(self.bytes()?))
    }
    fn u64(&mut self) -> io::Result<u64> {
        Ok(u64::from_le_bytes(self.bytes()?))
    }
    fn f32(&mut self) -> io::Result<f32> {
        Ok(f32::from_le_bytes(self.bytes()?))
    }
    fn f64(&mut self) -> io::Result<f64> {
        Ok(f64::from_le_bytes(self.bytes()?))
    }
    /// A `u64` that must lie in `lo..=hi`.
    fn bounded(&mut self, lo: u64, hi: u64, what: &str) -> io::Result<u64> {
        let v = self.u64()?;
        if v < lo || v > hi {
            return Err(invalid(&format!("{what} = {v} is outside {lo}..={hi}")));
        }
        Ok(v)
    }
    fn finite_f32(&mut self, what: &str) -> io::Result<f32> {
        let v = self.f32()?;
        if !v.is_finite() {
            return Err(invalid(&format!("{what} is not finite")));
        }
        Ok(v)
    }
    /// `n` little-endian values of `W` bytes, read in chunks so that capacity only grows with
    /// the bytes actually read.
    fn vec<T, const W: usize>(&mut self, n: usize, conv: fn([u8; W]) -> T) -> io::Result<Vec<T>> {
        let mut out = Vec::with_capacity(n.min(CHUNK));
        let mut buf = vec![0u8; CHUNK.min(n.max(1)) * W];
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK);
            let b = &mut buf[..k * W];
            self.0.read_exact(b)?;
            out.extend(b.chunks_exact(W).map(|c| conv(c.try_into().expect("chunk has W bytes"))));
            left -= k;
        }
        Ok(out)
    }
    fn f32s(&mut self, n: usize) -> io::Result<Vec<f32>> {
        self.vec::<f32, 4>(n, f32::from_le_bytes)
    }
    fn f64s(&mut self, n: usize) -> io::Result<Vec<f64>> {
        self.vec::<f64, 8>(n, f64::from_le_bytes)
    }
    fn hist(&mut self, cap: usize, n_other: usize) -> io::Result<VecDeque<Entry>> {
        let len = self.u32()? as usize;
        if len > cap {
            return Err(invalid("history longer than its cap"));
        }
        let mut h = VecDeque::with_capacity(len);
        for _ in 0..len {
            let id = self.u32()?;
            let n = self.u32()?;
            let w = self.f32()?;
            let ts = self.f64()?;
            if id as usize >= n_other || n == 0 || !w.is_finite() || w < 0.0 || !ts.is_finite() {
                return Err(invalid("bad history entry"));
            }
            h.push_back(Entry { id, n, w, ts });
        }
        Ok(h)
    }
}

impl Mf {
    /// Writes the whole model: config, matrices, Gramians (so a loaded model continues
    /// bit-identically), counts and histories.
    pub fn save(&self, w: &mut dyn Write) -> io::Result<()> {
        let mut o = Out(w);
        let c = &self.cfg;
        o.0.write_all(MAGIC)?;
        o.u32(VERSION)?;
        o.u64(c.dim as u64)?;
        o.f32(c.c0)?;
        o.f32(c.alpha)?;
        o.f32(c.reg)?;
        o.f32(c.w_new)?;
        o.u64(c.online_iters as u64)?;
        o.u64(c.user_history_cap as u64)?;
        o.u64(c.item_history_cap as u64)?;
        match c.decay_half_life {
            Some(h) => {
                o.u8(1)?;
                o.f64(h)?;
            }
            None => {
                o.u8(0)?;
                o.f64(0.0)?;
            }
        }
        o.f32(c.init_std)?;
        o.u64(c.seed)?;
        o.u64(self.n_users as u64)?;
        o.u64(self.n_items as u64)?;
        o.f64(self.now)?;
        o.u64(self.updates_since_exact)?;
        o.f64(self.z)?;
        o.f32s(&self.p)?;
        o.f32s(&self.q)?;
        o.f64s(&self.counts)?;
        o.f64s(&self.user_counts)?;
        o.f64s(&self.sp)?;
        o.f64s(&self.st)?;
        for h in &self.user_hist {
            o.hist(h)?;
        }
        for h in &self.item_hist {
            o.hist(h)?;
        }
        Ok(())
    }

    /// Reads a model written by [`Mf::save`]. Truncated input gives `UnexpectedEof`; values
    /// out of range give `InvalidData`; nothing panics.
    pub fn load(r: &mut dyn Read) -> io::Result<Mf> {
        let mut i = In(r);
        if &i.bytes::<4>()? != MAGIC {
            return Err(invalid("bad magic"));
        }
        let version = i.u32()?;
        if version != VERSION {
            return Err(invalid(&format!("unsupported version {version}")));
        }
        let dim = i.bounded(1, MAX_DIM, "dim")? as usize;
        let c0 = i.finite_f32("c0")?;
        let alpha = i.finite_f32("alpha")?;
        let reg = i.finite_f32("reg")?;
        let w_new = i.finite_f32("w_new")?;
        let online_iters = i.bounded(0, MAX_ONLINE_ITERS, "online_iters")? as usize;
        let user_history_cap = i.bounded(1, MAX_CAP, "user_history_cap")? as usize;
        let item_history_cap = i.bounded(1, MAX_CAP, "item_history_cap")? as usize;
        let has_decay = i.u8()?;
        let half_life = i.f64()?;
        let decay_half_life = match has_decay {
            0 => None,
            1 if half_life.is_finite() && half_life > 0.0 => Some(half_life),
            _ => return Err(invalid("bad decay half-life")),
        };
        let init_std = i.finite_f32("init_std")?;
        let seed = i.u64()?;
        let cfg = MfConfig {
            dim,
            c0,
            alpha,
            reg,
            w_new,
            online_iters,
            user_history_cap,
            item_history_cap,
            decay_half_life,
            init_std,
            seed,
        };
        let n_users = i.bounded(0, MAX_ROWS, "n_users")? as usize;
        let n_items = i.bounded(0, MAX_ROWS, "n_items")? as usize;
        let now = i.f64()?;
        if now.is_nan() || now == f64::INFINITY {
            return Err(invalid("bad clock"));
        }
        let updates_since_exact = i.u64()?;
        let z = i.f64()?;
        let p_len = n_users.checked_mul(dim).ok_or_else(|| invalid("user matrix too large"))?;
        let q_len = n_items.checked_mul(dim).ok_or_else(|| invalid("item matrix too large"))?;
        let p = i.f32s(p_len)?;
        let q = i.f32s(q_len)?;
        let counts = i.f64s(n_items)?;
        if counts.iter().any(|c| !c.is_finite() || *c < 0.0) {
            return Err(invalid("bad item count"));
        }
        let user_counts = i.f64s(n_users)?;
        if user_counts.iter().any(|c| !c.is_finite() || *c < 0.0) {
            return Err(invalid("bad user count"));
        }
        let sp = i.f64s(dim * dim)?;
        let st = i.f64s(dim * dim)?;
        let mut user_hist = Vec::with_capacity(n_users.min(CHUNK));
        for _ in 0..n_users {
            user_hist.push(i.hist(user_history_cap, n_items)?);
        }
        let mut item_hist = Vec::with_capacity(n_items.min(CHUNK));
        for _ in 0..n_items {
            item_hist.push(i.hist(item_history_cap, n_users)?);
        }
        Ok(Mf {
            cfg,
            n_users,
            n_items,
            p,
            q,
            user_hist,
            item_hist,
            pop_w: counts.iter().map(|&f| Mf::pop_of(f, alpha)).collect(),
            counts,
            user_counts,
            sp,
            st,
            z,
            now,
            updates_since_exact,
            epoch: 0,
            scratch: Scratch::default(),
        })
    }
}
