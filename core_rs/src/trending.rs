//! Exponentially decayed interaction counts per item: the cold-start fallback.
//!
//! An item's score at time `now` is `Σ w · 0.5^((now - ts) / half_life)` over its events.
//! Decaying every count on every event would cost O(items); instead each event is stored
//! *inflated* to a reference time, `w · 2^((ts - t_ref) / half_life)`, so adding is O(1) and
//! all items share the same deflation factor `2^((t_ref - now) / half_life)` at query time
//! (which is also why ranking needs no decay at all). When the exponent grows past
//! [`RENORM_EXPONENT`] the stored values are rescaled to a new `t_ref` before they can
//! overflow — O(items), but only once every `RENORM_EXPONENT` half-lives.
//!
//! The [`LEADERS`] highest counts are kept ranked as events arrive (a count only grows, so an
//! event moves its item up the ranking or into it, O(rank change)), so the top-k of a query
//! is read off the ranking unless its filters leave fewer than `k` of the leaders; only then
//! are all items scanned.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};

/// Largest inflation exponent (in half-lives) before renormalising: 2^64 leaves f64 ample
/// headroom for sums of many events and keeps old values well above subnormals.
pub const RENORM_EXPONENT: f64 = 64.0;

const MAGIC: &[u8; 4] = b"RSTR";
const VERSION: u32 = 1;
const MAX_ITEMS: u64 = 1 << 32;
const CHUNK: usize = 1 << 14;
/// Items kept ranked by count: enough for a list of a few hundred after filters, small
/// enough that moving an item up costs little.
pub const LEADERS: usize = 1024;
/// `rank` of an item outside the leaders.
const UNRANKED: u32 = u32::MAX;

pub struct Trending {
    half_life: f64,
    /// Reference time of the inflated values; `None` until the first event.
    t_ref: Option<f64>,
    /// Per item `Σ w · 2^((ts - t_ref) / half_life)`.
    values: Vec<f64>,
    /// The `min(cap, items with a positive count)` best items, best first (higher value, then
    /// lower id): when shorter than `cap` it holds every item with a positive count.
    leaders: Vec<u32>,
    /// Per item its index in `leaders`, or [`UNRANKED`].
    rank: Vec<u32>,
    /// Length `leaders` is kept at ([`LEADERS`]; smaller in tests).
    cap: usize,
}

impl Trending {
    /// `half_life_secs` must be positive and finite; anything else is treated as one day.
    pub fn new(half_life_secs: f64) -> Self {
        let half_life =
            if half_life_secs.is_finite() && half_life_secs > 0.0 { half_life_secs } else { 86_400.0 };
        Trending {
            half_life,
            t_ref: None,
            values: Vec::new(),
            leaders: Vec::new(),
            rank: Vec::new(),
            cap: LEADERS,
        }
    }

    pub fn half_life(&self) -> f64 {
        self.half_life
    }

    /// Number of item slots (the largest item id seen + 1).
    pub fn len(&self) -> usize {
        self.values.len()
    }

    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Counts an event of weight `w` on `item` at `ts`. Non-finite or negative `w` and
    /// non-finite `ts` are ignored. Out-of-order events are fine.
    pub fn add(&mut self, item: u32, w: f32, ts: f64) {
        if !(w.is_finite() && w >= 0.0 && ts.is_finite()) {
            return;
        }
        let t_ref = *self.t_ref.get_or_insert(ts);
        let mut e = (ts - t_ref) / self.half_life;
        if e > RENORM_EXPONENT {
            self.renormalise(ts);
            e = 0.0;
        }
        let i = item as usize;
        if i >= self.values.len() {
            self.values.resize(i + 1, 0.0);
            self.rank.resize(i + 1, UNRANKED);
        }
        self.values[i] += w as f64 * e.exp2();
        self.promote(item);
    }

    fn cand(&self, item: u32) -> Cand {
        Cand { v: self.values[item as usize], id: item }
    }

    /// Restores the order of `leaders` after `item`'s count grew: moves it up, or in (pushing
    /// out the last leader when full) if it now beats the last one.
    fn promote(&mut self, item: u32) {
        let c = self.cand(item);
        if c.v <= 0.0 {
            return;
        }
        let mut p = match self.rank[item as usize] {
            UNRANKED => {
                if self.leaders.len() >= self.cap {
                    let Some(&last) = self.leaders.last() else { return };
                    if c >= self.cand(last) {
                        return;
                    }
                    self.leaders.pop();
                    self.rank[last as usize] = UNRANKED;
                }
                self.leaders.push(item);
                self.leaders.len() - 1
            }
            p => p as usize,
        };
        while p > 0 && c < self.cand(self.leaders[p - 1]) {
            let above = self.leaders[p - 1];
            self.leaders[p] = above;
            self.rank[above as usize] = p as u32;
            p -= 1;
        }
        self.leaders[p] = item;
        self.rank[item as usize] = p as u32;
    }

    /// Ranks `leaders` from scratch (after loading or renormalising): O(items · log cap).
    fn rebuild_leaders(&mut self) {
        self.rank = vec![UNRANKED; self.values.len()];
        self.leaders = self.scan_top(self.cap, &|_| true).into_iter().map(|c| c.id).collect();
        for (p, &i) in self.leaders.iter().enumerate() {
            self.rank[i as usize] = p as u32;
        }
    }

    /// Decayed count of `item` at `now`.
    pub fn score(&self, item: u32, now: f64) -> f64 {
        self.scorer(now)(item)
    }

    /// [`Trending::score`] at `now` for many items: the decay factor, common to all, is
    /// computed once.
    pub fn scorer(&self, now: f64) -> impl Fn(u32) -> f64 + '_ {
        let d = self.deflation(now);
        move |item| self.values.get(item as usize).map_or(0.0, |&v| v * d)
    }

    /// The `k` items with the highest decayed count, best first (ties: lower id first),
    /// among those with a positive count for which `keep(item)` holds. Read off the ranked
    /// leaders; all items are scanned (O(items · log k)) only when fewer than `k` leaders pass
    /// `keep`.
    ///
    /// Scores are relative: the decayed count divided by the highest decayed count of any item
    /// (filtered or not), so they lie in (0, 1] like personal scores, the most popular item
    /// scores 1, and a score does not depend on the filters of the query. The decay factor,
    /// common to every item, cancels, so no time is needed. Raw decayed counts are
    /// [`Trending::score`].
    pub fn top(&self, k: usize, keep: &dyn Fn(u32) -> bool) -> Vec<(u32, f32)> {
        let Some(&best) = self.leaders.first() else { return Vec::new() };
        if k == 0 {
            return Vec::new();
        }
        let highest = self.values[best as usize];
        let mut out: Vec<u32> = Vec::with_capacity(k.min(self.leaders.len()));
        for &i in &self.leaders {
            if out.len() == k {
                break;
            }
            if keep(i) {
                out.push(i);
            }
        }
        if out.len() < k && self.leaders.len() >= self.cap {
            // The filters left too few leaders: the rest may be anywhere below them.
            return self.scan_top(k, keep).into_iter().map(|c| (c.id, (c.v / highest) as f32)).collect();
        }
        out.into_iter().map(|i| (i, (self.values[i as usize] / highest) as f32)).collect()
    }

    /// The best `k` kept items by a scan of every count, best first. O(items · log k).
    fn scan_top(&self, k: usize, keep: &dyn Fn(u32) -> bool) -> Vec<Cand> {
        if k == 0 {
            return Vec::new();
        }
        // Min-heap on (value, reverse id) of the best k so far.
        let mut heap: BinaryHeap<Cand> = BinaryHeap::with_capacity(k + 1);
        for (i, &v) in self.values.iter().enumerate() {
            if v <= 0.0 {
                continue;
            }
            let c = Cand { v, id: i as u32 };
            if heap.len() == k {
                let worst = heap.peek().expect("heap holds k > 0 items");
                if c.cmp(worst) != Ordering::Less {
                    continue;
                }
            }
            if !keep(i as u32) {
                continue;
            }
            heap.push(c);
            if heap.len() > k {
                heap.pop();
            }
        }
        let mut out: Vec<Cand> = heap.into_vec();
        out.sort();
        out
    }

    pub fn save(&self, w: &mut dyn Write) -> io::Result<()> {
        w.write_all(MAGIC)?;
        w.write_all(&VERSION.to_le_bytes())?;
        w.write_all(&self.half_life.to_le_bytes())?;
        match self.t_ref {
            Some(t) => {
                w.write_all(&[1])?;
                w.write_all(&t.to_le_bytes())?;
            }
            None => {
                w.write_all(&[0])?;
                w.write_all(&0f64.to_le_bytes())?;
            }
        }
        w.write_all(&(self.values.len() as u64).to_le_bytes())?;
        let mut buf = Vec::with_capacity(CHUNK * 8);
        for c in self.values.chunks(CHUNK) {
            buf.clear();
            c.iter().for_each(|x| buf.extend_from_slice(&x.to_le_bytes()));
            w.write_all(&buf)?;
        }
        Ok(())
    }

    /// Reads what [`Trending::save`] wrote. Truncated input gives `UnexpectedEof`, bad values
    /// `InvalidData`; the item count is read in chunks so a corrupt length cannot allocate more
    /// than the bytes present.
    pub fn load(r: &mut dyn Read) -> io::Result<Trending> {
        let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, format!("trending snapshot: {m}"));
        let mut b4 = [0u8; 4];
        let mut b8 = [0u8; 8];
        r.read_exact(&mut b4)?;
        if &b4 != MAGIC {
            return Err(bad("bad magic"));
        }
        r.read_exact(&mut b4)?;
        if u32::from_le_bytes(b4) != VERSION {
            return Err(bad("unsupported version"));
        }
        r.read_exact(&mut b8)?;
        let half_life = f64::from_le_bytes(b8);
        if !(half_life.is_finite() && half_life > 0.0) {
            return Err(bad("bad half-life"));
        }
        let mut flag = [0u8; 1];
        r.read_exact(&mut flag)?;
        r.read_exact(&mut b8)?;
        let t = f64::from_le_bytes(b8);
        let t_ref = match flag[0] {
            0 => None,
            1 if t.is_finite() => Some(t),
            _ => return Err(bad("bad reference time")),
        };
        r.read_exact(&mut b8)?;
        let n = u64::from_le_bytes(b8);
        if n > MAX_ITEMS {
            return Err(bad("too many items"));
        }
        let n = n as usize;
        let mut values = Vec::with_capacity(n.min(CHUNK));
        let mut buf = vec![0u8; CHUNK * 8];
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK);
            r.read_exact(&mut buf[..k * 8])?;
            for c in buf[..k * 8].chunks_exact(8) {
                let v = f64::from_le_bytes(c.try_into().expect("8 bytes"));
                if !(v.is_finite() && v >= 0.0) {
                    return Err(bad("bad value"));
                }
                values.push(v);
            }
            left -= k;
        }
        let mut t =
            Trending { half_life, t_ref, values, leaders: Vec::new(), rank: Vec::new(), cap: LEADERS };
        t.rebuild_leaders();
        Ok(t)
    }

    /// `2^((t_ref - now) / half_life)`: turns stored values into decayed counts at `now`.
    fn deflation(&self, now: f64) -> f64 {
        match self.t_ref {
            Some(t) => ((t - now) / self.half_life).exp2(),
            None => 0.0,
        }
    }

    /// Moves the reference time to `t`, rescaling every stored value.
    fn renormalise(&mut self, t: f64) {
        if let Some(old) = self.t_ref {
            let s = ((old - t) / self.half_life).exp2();
            for v in &mut self.values {
                *v *= s;
            }
            // Rounding may have tied or underflowed counts: rank afresh.
            self.rebuild_leaders();
        }
        self.t_ref = Some(t);
    }
}

/// A top-k candidate ordered best-first: higher value, then lower id. `BinaryHeap` is a
/// max-heap, so under this order its top is the *worst* kept candidate.
#[derive(Clone, Copy, Debug)]
struct Cand {
    v: f64,
    id: u32,
}

impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        o.v.total_cmp(&self.v).then(self.id.cmp(&o.id))
    }
}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl PartialEq for Cand {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Cand {}

#[cfg(test)]
mod tests {
    use super::*;

    const H: f64 = 3600.0;

    #[test]
    fn score_halves_after_one_half_life() {
        let mut t = Trending::new(H);
        t.add(3, 2.0, 1000.0);
        let s0 = t.score(3, 1000.0);
        assert!((s0 - 2.0).abs() < 1e-12);
        let s1 = t.score(3, 1000.0 + H);
        assert!((s1 - 1.0).abs() < 1e-12, "{s1}");
        let s2 = t.score(3, 1000.0 + 2.0 * H);
        assert!((s2 - 0.5).abs() < 1e-12);
        assert_eq!(t.score(99, 1000.0), 0.0);
    }

    #[test]
    fn add_is_the_decayed_sum_of_events() {
        let mut t = Trending::new(H);
        t.add(0, 1.0, 0.0);
        t.add(0, 1.0, H);
        t.add(0, 4.0, 3.0 * H);
        // At 3H: 1/8 + 1/4 + 4.
        let s = t.score(0, 3.0 * H);
        assert!((s - 4.375).abs() < 1e-12, "{s}");
    }

    #[test]
    fn top_k_orders_by_decayed_count_and_filters() {
        let mut t = Trending::new(H);
        // Item 1: many old events; item 2: few fresh ones; item 0: middling.
        for _ in 0..8 {
            t.add(1, 1.0, 0.0);
        }
        t.add(2, 3.0, 4.0 * H);
        t.add(0, 1.0, 3.0 * H);
        t.add(0, 1.0, 3.0 * H);
        t.add(4, 1.0, 4.0 * H);
        let now = 4.0 * H;
        // Counts at 4H: item1 8/16 = 0.5, item2 3, item0 1, item4 1 (tie broken by id);
        // scores are relative to the highest count (item 2's).
        let top = t.top(3, &|_| true);
        let ids: Vec<u32> = top.iter().map(|x| x.0).collect();
        assert_eq!(ids, vec![2, 0, 4]);
        assert!((top[0].1 - 1.0).abs() < 1e-6 && (top[1].1 - 1.0 / 3.0).abs() < 1e-6);
        let all = t.top(10, &|_| true);
        assert_eq!(all.iter().map(|x| x.0).collect::<Vec<_>>(), vec![2, 0, 4, 1]);
        let relative = t.score(1, now) / t.score(2, now);
        assert!((all[3].1 as f64 - relative).abs() < 1e-6 && (relative - 0.5 / 3.0).abs() < 1e-9);
        let filtered = t.top(2, &|i| i != 2);
        assert_eq!(filtered.iter().map(|x| x.0).collect::<Vec<_>>(), vec![0, 4]);
        // A filtered-out leader still sets the scale: scores do not depend on the filters.
        assert!((filtered[0].1 - 1.0 / 3.0).abs() < 1e-6, "{filtered:?}");
        assert!(t.top(0, &|_| true).is_empty());
    }

    #[test]
    fn renormalisation_keeps_scores_and_ranking() {
        // Half-life 1 s over 500 s: the reference time moves several times.
        let mut t = Trending::new(1.0);
        let mut events = Vec::new();
        for step in 0..1000u32 {
            let (item, w, ts) = (step % 7, 1.0 + (step % 3) as f32, step as f64 * 0.5);
            t.add(item, w, ts);
            events.push((item, w, ts));
        }
        assert!(t.t_ref.unwrap() > 400.0, "renormalised: t_ref = {:?}", t.t_ref);
        let now = 499.5;
        // Brute-force decayed sums.
        let mut exact = [0.0f64; 7];
        for &(i, w, ts) in &events {
            exact[i as usize] += w as f64 * ((ts - now) / 1.0).exp2();
        }
        for i in 0..7u32 {
            let s = t.score(i, now);
            assert!((s - exact[i as usize]).abs() <= 1e-9 * exact[i as usize], "item {i}: {s}");
        }
        let mut want: Vec<u32> = (0..7).collect();
        want.sort_by(|&a, &b| exact[b as usize].total_cmp(&exact[a as usize]).then(a.cmp(&b)));
        let got: Vec<u32> = t.top(7, &|_| true).iter().map(|x| x.0).collect();
        assert_eq!(got, want);
        // Far-future jump: no overflow, the fresh event ranks first.
        t.add(3, 1.0, 1e9);
        assert!(t.score(3, 1e9).is_finite() && (t.score(3, 1e9) - 1.0).abs() < 1e-12);
        assert_eq!(t.top(1, &|_| true)[0].0, 3);
    }

    #[test]
    fn save_load_round_trip_and_truncation() {
        let mut t = Trending::new(H);
        for i in 0..50u32 {
            t.add(i % 13, (i % 5) as f32, i as f64 * 60.0);
        }
        let mut buf = Vec::new();
        t.save(&mut buf).unwrap();
        let u = Trending::load(&mut buf.as_slice()).unwrap();
        assert_eq!(u.values, t.values);
        assert_eq!(u.t_ref, t.t_ref);
        assert_eq!(u.top(5, &|_| true), t.top(5, &|_| true));
        for cut in [0, 3, 10, 20, 24, 32, buf.len() - 1] {
            let e = Trending::load(&mut &buf[..cut]).err().expect("truncated input must fail");
            assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "cut at {cut}");
        }
        // A huge declared length with no data behind it fails without allocating it.
        let mut bad = buf[..25].to_vec();
        bad.extend_from_slice(&(1u64 << 31).to_le_bytes());
        assert!(Trending::load(&mut bad.as_slice()).is_err());
    }

    /// Top-k by brute force: sort every kept item with a positive count.
    fn brute_top(t: &Trending, k: usize, keep: &dyn Fn(u32) -> bool) -> Vec<(u32, f32)> {
        let mut all: Vec<Cand> = (0..t.values.len() as u32)
            .filter(|&i| t.values[i as usize] > 0.0 && keep(i))
            .map(|i| t.cand(i))
            .collect();
        all.sort();
        let highest = t.values.iter().copied().fold(0.0, f64::max);
        all.into_iter().take(k).map(|c| (c.id, (c.v / highest) as f32)).collect()
    }

    #[test]
    fn ranked_leaders_answer_like_a_full_scan() {
        // A small cap, so items enter and leave the leaders and filters force the scan.
        let mut t = Trending::new(50.0);
        t.cap = 8;
        let mut rng = crate::rng::Rng::new(7);
        let filters: [&dyn Fn(u32) -> bool; 3] = [&|_| true, &|i| i % 3 != 0, &|i| i % 10 == 1];
        for step in 0..3000u32 {
            let item = (rng.next_u64() % 60) as u32;
            let w = (rng.next_u64() % 4) as f32; // zero weights too
            t.add(item, w, 2.0 * step as f64); // 120 half-lives: renormalises on the way
            if step % 97 == 0 {
                for k in [1, 5, 8, 9, 30, 100] {
                    for keep in filters {
                        assert_eq!(t.top(k, keep), brute_top(&t, k, keep), "step {step}, k {k}");
                    }
                }
                let mut p = 0;
                for (i, &r) in t.rank.iter().enumerate() {
                    if r != UNRANKED {
                        assert_eq!(t.leaders[r as usize], i as u32);
                        p += 1;
                    }
                }
                assert_eq!(p, t.leaders.len());
            }
        }
        let mut buf = Vec::new();
        t.save(&mut buf).unwrap();
        let u = Trending::load(&mut buf.as_slice()).unwrap();
        assert_eq!(u.top(40, &|_| true), brute_top(&t, 40, &|_| true));
    }

    #[test]
    fn ignores_invalid_events() {
        let mut t = Trending::new(H);
        t.add(1, f32::NAN, 0.0);
        t.add(1, -1.0, 0.0);
        t.add(1, 1.0, f64::INFINITY);
        assert_eq!(t.score(1, 0.0), 0.0);
        assert!(t.top(3, &|_| true).is_empty());
    }
}
