//! List-level steps after candidate retrieval: the cold-start blend of personal and trending
//! scores, maximal-marginal-relevance diversification and the weighted sample that fills
//! exploration slots. Plain functions over (dense id, score) lists, so the model decides where
//! the candidates come from.

use std::cmp::Ordering;

use crate::rng::Rng;
use crate::scan::{dot, from_rank_key, rank_key};

/// Min-max normalisation to [0, 1]. A constant list (a lone candidate among them) carries no
/// ranking signal and maps to ones: its best is as good as the pool gets, and a blend then
/// shifts every candidate alike, so rankings are the same as with any other constant.
pub fn minmax(scores: &[f32]) -> Vec<f32> {
    let norm = Normalise::over(scores);
    scores.iter().map(|&s| norm.apply(s)).collect()
}

/// The map of [`minmax`] over one list, applied a value at a time: a blend normalises both
/// of its inputs on the fly instead of allocating each normalised list first.
#[derive(Clone, Copy)]
struct Normalise {
    /// (low, range), or None for a constant list (every value maps to one).
    span: Option<(f32, f32)>,
}

impl Normalise {
    fn over(scores: &[f32]) -> Self {
        let (lo, hi) =
            scores.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &s| (lo.min(s), hi.max(s)));
        let range = hi - lo;
        Self { span: (range > 0.0 && range.is_finite()).then_some((lo, range)) }
    }

    #[inline]
    fn apply(self, s: f32) -> f32 {
        match self.span {
            Some((lo, range)) => (s - lo) / range,
            None => 1.0,
        }
    }
}

/// `(1 − β)·personal + β·trending`, each min-max normalised over the candidate pool.
pub fn blend(personal: &[f32], trending: &[f32], beta: f32) -> Vec<f32> {
    let (p, t) = (Normalise::over(personal), Normalise::over(trending));
    personal.iter().zip(trending).map(|(&a, &b)| (1.0 - beta) * p.apply(a) + beta * t.apply(b)).collect()
}

/// For each candidate of [`blend`], whether the trending term contributes more to its blended
/// score than the personal term: such an item is in the list mostly for being popular.
pub fn trending_led(personal: &[f32], trending: &[f32], beta: f32) -> Vec<bool> {
    let (p, t) = (Normalise::over(personal), Normalise::over(trending));
    personal.iter().zip(trending).map(|(&a, &b)| beta * t.apply(b) > (1.0 - beta) * p.apply(a)).collect()
}

/// Best first; equal scores by ascending id, so results never depend on hash or heap order.
pub fn sort_desc(hits: &mut [(u32, f32)]) {
    hits.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

/// Keeps the `n` best of `hits`, sorted as [`sort_desc`] sorts (the same as sorting all and
/// truncating, for distinct ids): the rest is cut off by a selection, never sorted.
pub fn top_sorted(hits: &mut Vec<(u32, f32)>, n: usize) {
    if n == 0 {
        hits.clear();
        return;
    }
    if hits.len() > n {
        hits.select_nth_unstable_by(n - 1, |a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        hits.truncate(n);
    }
    sort_desc(hits);
}

/// The `m` best of `cands` (by [`sort_desc`] order) among those `keep` accepts, best first:
/// the same as filtering every candidate, sorting and truncating. `keep` is asked only about
/// candidates near the top: each round selects the best few of those left (the shortfall plus
/// a margin), sorts just those and takes the kept ones in order, and a further round runs
/// only when too many of them were refused. A user's neighbourhood candidates are often items
/// it has seen (the items taken with its own), which the margin absorbs.
///
/// The candidates are packed into `u64` keys ordered like [`sort_desc`] (see [`crate::scan::rank_key`]),
/// so the selection compares integers: a heap of the best `m` so far, tried before, spent
/// most of a list's selection in mispredicted sift branches, one sift per candidate that beat
/// the worst held (for a neighbourhood of about a thousand ids, a few hundred of them).
pub fn top_kept(
    cands: impl IntoIterator<Item = (u32, f32)>,
    m: usize,
    keep: &dyn Fn(u32) -> bool,
) -> Vec<(u32, f32)> {
    let mut out = Vec::with_capacity(m);
    if m == 0 {
        return out;
    }
    let mut keys: Vec<u64> = cands.into_iter().map(|(id, s)| rank_key(id, s)).collect();
    // A long list is first split at a key that about `TOP_KEPT_SAMPLED` times the first
    // round's candidates exceed, read off a sample of every `TOP_KEPT_STRIDE`-th key: the
    // rounds then select among the few keys above it (all larger than any below), and reach
    // the rest only when too many of those were refused. A selection over a thousand keys
    // cost more than the sample's, the split's pass and the small one together.
    let first = m + m / 2 + TOP_KEPT_MARGIN;
    let wanted = TOP_KEPT_SAMPLED * first / TOP_KEPT_STRIDE;
    let split = if keys.len() >= 2 * TOP_KEPT_STRIDE * wanted {
        let mut sample: Vec<u64> = keys.iter().step_by(TOP_KEPT_STRIDE).copied().collect();
        let at = sample.len() - wanted;
        let bar = *sample.select_nth_unstable(at).1;
        // Keys not below the bar to the front, in one pass without a branch on the key.
        let mut front = 0;
        for i in 0..keys.len() {
            let k = keys[i];
            keys.swap(front, i);
            front += usize::from(k >= bar);
        }
        front
    } else {
        keys.len()
    };
    let (above, below) = keys.split_at_mut(split);
    kept_rounds(above, m, keep, &mut out);
    kept_rounds(below, m, keep, &mut out);
    out
}

/// The rounds of [`top_kept`] over `keys`, appending to `out` until it holds `m`.
fn kept_rounds(keys: &mut [u64], m: usize, keep: &dyn Fn(u32) -> bool, out: &mut Vec<(u32, f32)>) {
    let mut rest = keys;
    while out.len() < m && !rest.is_empty() {
        let want = (m - out.len()) + m / 2 + TOP_KEPT_MARGIN;
        let cut = rest.len().saturating_sub(want);
        if cut > 0 {
            // The `want` largest keys to the end, the rest (all smaller) before them.
            rest.select_nth_unstable(cut);
        }
        let (below, top) = rest.split_at_mut(cut);
        top.sort_unstable_by(|a, b| b.cmp(a));
        for &k in top.iter() {
            let (id, s) = from_rank_key(k);
            if keep(id) {
                out.push((id, s));
                if out.len() == m {
                    break;
                }
            }
        }
        rest = below;
    }
}

/// Every how many keys [`top_kept`] samples one to split a long list.
const TOP_KEPT_STRIDE: usize = 8;
/// How many times the candidates of its first round [`top_kept`] expects above the split.
const TOP_KEPT_SAMPLED: usize = 4;

/// Candidates a round of [`top_kept`] takes beyond its shortfall and half of `m`, for the
/// refused ones among them.
const TOP_KEPT_MARGIN: usize = 8;

/// Scores of a sparse set of dense ids, summed in place: a stamped array reused from list to
/// list, so gathering a few thousand terms allocates nothing and [`SparseScores::reset`] is
/// O(1) (the stamps of one generation mark the ids present). Also serves as a set of ids.
/// The scores are held densely in insertion order beside the ids, so reading them all
/// ([`SparseScores::entries`]) is a sequential pass, not a lookup per id.
#[derive(Debug, Default)]
pub struct SparseScores {
    /// Per id its (generation stamp, position in `ids` and `scores`): one cache line holds
    /// both.
    slots: Vec<(u32, u32)>,
    gen: u32,
    ids: Vec<u32>,
    scores: Vec<f32>,
}

impl SparseScores {
    /// Empties the set, ready for ids below `n` (larger ones grow it).
    pub fn reset(&mut self, n: usize) {
        self.ids.clear();
        self.scores.clear();
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            self.slots.iter_mut().for_each(|s| s.0 = 0);
            self.gen = 1;
        }
        if self.slots.len() < n {
            self.slots.resize(n, (0, 0));
        }
    }

    /// The position of `i`, and whether it was just inserted (with score 0).
    #[inline]
    fn slot(&mut self, i: u32) -> (usize, bool) {
        let iu = i as usize;
        if iu >= self.slots.len() {
            self.slots.resize(iu + 1, (0, 0));
        }
        let s = &mut self.slots[iu];
        if s.0 == self.gen {
            return (s.1 as usize, false);
        }
        *s = (self.gen, self.ids.len() as u32);
        self.ids.push(i);
        self.scores.push(0.0);
        (self.ids.len() - 1, true)
    }

    /// Puts `i` in the set with score 0 if it is not there; true if it was not.
    #[inline]
    pub fn insert(&mut self, i: u32) -> bool {
        self.slot(i).1
    }

    /// Adds `s` to the score of `i` (starting from 0).
    #[inline]
    pub fn add(&mut self, i: u32, s: f32) {
        let p = self.slot(i).0;
        self.scores[p] += s;
    }

    /// The score of `i`, or None when it is not in the set.
    #[inline]
    pub fn get(&self, i: u32) -> Option<f32> {
        self.slots.get(i as usize).filter(|s| s.0 == self.gen).map(|s| self.scores[s.1 as usize])
    }

    /// The ids in the set, in first-insertion order.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The ids in the set with their scores, in first-insertion order.
    pub fn entries(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        self.ids.iter().copied().zip(self.scores.iter().copied())
    }
}

/// A set of dense ids, one bit each, reused from list to list: marking and testing an id is
/// a shift and a mask, and emptying it clears only the words of the ids marked. For a user's
/// seen items (a few hundred, tested against every candidate of a list) it costs less than a
/// [`SparseScores`], whose insertions also append to its arrays.
#[derive(Debug, Default)]
pub struct IdBits {
    words: Vec<u64>,
}

impl IdBits {
    /// Adds `ids` to the set.
    pub fn mark(&mut self, ids: &[u32]) {
        for &i in ids {
            let w = i as usize / 64;
            if w >= self.words.len() {
                self.words.resize(w + 1, 0);
            }
            self.words[w] |= 1 << (i % 64);
        }
    }

    #[inline]
    pub fn contains(&self, i: u32) -> bool {
        self.words.get(i as usize / 64).is_some_and(|w| w >> (i % 64) & 1 == 1)
    }

    /// Empties the set, `ids` being every id [`IdBits::mark`]ed since it was last empty.
    pub fn clear(&mut self, ids: &[u32]) {
        for &i in ids {
            if let Some(w) = self.words.get_mut(i as usize / 64) {
                *w = 0;
            }
        }
    }
}

/// Sums of positive terms per dense id, added without a branch on whether the id is new: one
/// `f32` per id (zero: absent) and the ids in first-insertion order. A list's neighbourhood
/// terms are a few thousand additions over a catalog of a few thousand items, about half of
/// them to an id not seen before and in no predictable order, so a branch on it would be
/// mispredicted half the time.
///
/// Every term added must be positive (a sum of positive terms never returns to zero, so zero
/// marks exactly the absent ids); the sums equal [`SparseScores`]'s for the same additions.
#[derive(Debug, Default)]
pub struct TermSums {
    sums: Vec<f32>,
    /// The ids present in `ids[..len]`; always one slot longer than `sums`, so the next id
    /// can be written before it is known whether it is new.
    ids: Vec<u32>,
    len: usize,
}

impl TermSums {
    /// Empties the set, ready for ids below `n` (larger ones grow it).
    pub fn reset(&mut self, n: usize) {
        for &i in &self.ids[..self.len] {
            self.sums[i as usize] = 0.0;
        }
        self.len = 0;
        if self.sums.len() < n {
            self.grow(n);
        }
    }

    fn grow(&mut self, n: usize) {
        self.sums.resize(n, 0.0);
        self.ids.resize(n + 1, 0);
    }

    /// Adds `s` (positive) to the sum of `i`, growing the set for an `i` beyond its size.
    #[inline]
    pub fn add(&mut self, i: u32, s: f32) {
        if i as usize >= self.sums.len() {
            self.grow(i as usize + 1);
        }
        self.fill(|sums| sums.add(i, s));
    }

    /// Runs `fill` with an [`Adder`] over the set's arrays, for ids below the size the set
    /// was [`TermSums::reset`] for: the sums are those of [`TermSums::add`] of each term.
    pub fn fill(&mut self, fill: impl FnOnce(&mut Adder<'_>)) {
        let mut adder = Adder { sums: &mut self.sums, ids: &mut self.ids, len: self.len };
        fill(&mut adder);
        self.len = adder.len;
    }

    /// The sum of `i`, 0 when nothing was added to it.
    #[inline]
    pub fn get(&self, i: u32) -> f32 {
        self.sums.get(i as usize).copied().unwrap_or(0.0)
    }

    /// The ids present with their sums, in first-insertion order.
    pub fn entries(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        self.ids[..self.len].iter().map(|&i| (i, self.sums[i as usize]))
    }
}

/// [`TermSums::add`] for the span of a [`TermSums::fill`]: the length and the arrays are held
/// by a value of the caller's, which the compiler keeps in registers over a loop of
/// additions. Added through the set itself, they lived in its heap allocation, and the
/// length's store and reload lay on the path from one term to the next.
pub struct Adder<'a> {
    sums: &'a mut [f32],
    ids: &'a mut [u32],
    len: usize,
}

impl Adder<'_> {
    /// Adds `s` (positive) to the sum of `i`, which must be below the size the set was reset
    /// for.
    #[inline]
    pub fn add(&mut self, i: u32, s: f32) {
        debug_assert!(s > 0.0, "a term of {s}");
        let sum = self.sums[i as usize];
        self.ids[self.len] = i;
        self.len += usize::from(sum == 0.0);
        self.sums[i as usize] = sum + s;
    }
}

/// Maximal marginal relevance (Carbonell & Goldstein, "The use of MMR, diversity-based
/// reranking for reordering documents and producing summaries", SIGIR 1998): greedily picks
/// `argmax λ·rel(i) − (1 − λ)·max_{j selected} sim(i, j)` until `k` items are chosen.
///
/// `cands` must be sorted best first; `rel` is their min-max normalised score and `sim` the
/// cosine of item vectors (`vector(id)`). The first pick is always the top candidate, whatever
/// `λ` is. Each returned item keeps its original score. O(k · |cands| · dim): the running
/// maximum similarity of each candidate is updated once per pick.
pub fn mmr<'a>(
    cands: &[(u32, f32)],
    vector: impl Fn(u32) -> &'a [f32],
    k: usize,
    lambda: f32,
) -> Vec<(u32, f32)> {
    let n = cands.len();
    if n == 0 || k == 0 {
        return Vec::new();
    }
    let rel = minmax(&cands.iter().map(|c| c.1).collect::<Vec<_>>());
    let norms: Vec<f32> =
        cands.iter().map(|c| dot(vector(c.0), vector(c.0)).sqrt().max(f32::MIN_POSITIVE)).collect();
    let mut max_sim = vec![f32::NEG_INFINITY; n];
    let mut taken = vec![false; n];
    let mut out = Vec::with_capacity(k.min(n));
    let mut pick = 0usize; // the top candidate first
    loop {
        taken[pick] = true;
        out.push(cands[pick]);
        if out.len() == k.min(n) {
            return out;
        }
        let vp = vector(cands[pick].0);
        let mut best: Option<(f32, usize)> = None;
        for j in 0..n {
            if taken[j] {
                continue;
            }
            let sim = dot(vector(cands[j].0), vp) / (norms[j] * norms[pick]);
            max_sim[j] = max_sim[j].max(sim);
            let gain = lambda * rel[j] - (1.0 - lambda) * max_sim[j];
            // Strictly greater: ties go to the better-ranked candidate.
            if best.is_none_or(|(g, _)| gain > g) {
                best = Some((gain, j));
            }
        }
        pick = best.expect("an untaken candidate remains").1;
    }
}

/// `n` distinct entries of `cands` sampled without replacement with probability proportional
/// to their weight (Efraimidis & Spirakis, "Weighted random sampling with a reservoir", IPL
/// 2006, algorithm A: keep the `n` largest keys `u^(1/w)`, compared here as `ln(u)/w`).
/// Returned in key order, i.e. the order of a sequential draw. Non-positive weights never win.
pub fn weighted_sample(cands: &[(u32, f64)], n: usize, rng: &mut Rng) -> Vec<u32> {
    let mut keyed: Vec<(f64, u32)> = cands
        .iter()
        .filter(|c| c.1 > 0.0 && c.1.is_finite())
        .map(|&(i, w)| (rng.next_f64().max(f64::MIN_POSITIVE).ln() / w, i))
        .collect();
    keyed.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap_or(Ordering::Equal).then(a.1.cmp(&b.1)));
    keyed.into_iter().take(n).map(|(_, i)| i).collect()
}

/// Positions of `n` exploration slots spread evenly over a list of `k`: slot j at
/// `⌊(j + 1)·k / (n + 1)⌋`, so they are neither all at the top (costly) nor all at the bottom
/// (never seen).
pub fn explore_positions(k: usize, n: usize) -> Vec<usize> {
    (0..n).map(|j| (j + 1) * k / (n + 1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Marked ids test as present, others not (also past the last word ever marked), and
    /// clearing with the ids marked empties the set for the next use.
    #[test]
    fn id_bits_mark_test_and_clear() {
        let mut bits = IdBits::default();
        let ids = [3u32, 64, 65, 700, 0];
        bits.mark(&ids);
        for i in 0..1000 {
            assert_eq!(bits.contains(i), ids.contains(&i), "{i}");
        }
        bits.clear(&ids);
        assert!((0..1000).all(|i| !bits.contains(i)));
        bits.mark(&[5]);
        assert!(bits.contains(5) && !bits.contains(3));
    }

    #[test]
    fn minmax_and_blend() {
        assert_eq!(minmax(&[1.0, 3.0, 2.0]), vec![0.0, 1.0, 0.5]);
        assert_eq!(minmax(&[2.0, 2.0]), vec![1.0, 1.0]);
        let b = blend(&[0.0, 10.0], &[5.0, 0.0], 0.25);
        assert_eq!(b, vec![0.25, 0.75]);
    }

    /// Two tight clusters; the top candidates all come from the first. MMR with λ < 1 must
    /// bring the second cluster in while keeping the top item first; λ = 1 is plain ranking.
    #[test]
    fn mmr_diversifies_and_keeps_the_first_item() {
        let vecs: Vec<[f32; 2]> = vec![[1.0, 0.0], [0.99, 0.05], [0.98, 0.1], [0.0, 1.0], [0.05, 0.99]];
        let cands = vec![(0, 1.0), (1, 0.95), (2, 0.9), (3, 0.6), (4, 0.55)];
        let v = |i: u32| &vecs[i as usize][..];
        assert_eq!(mmr(&cands, v, 3, 1.0), cands[..3].to_vec());
        let d = mmr(&cands, v, 3, 0.5);
        assert_eq!(d[0], cands[0]);
        assert!(d.iter().any(|c| c.0 >= 3), "{d:?}");
        assert_eq!(mmr(&cands, v, 10, 0.5).len(), 5);
    }

    #[test]
    fn weighted_sample_is_deterministic_and_weight_biased() {
        let cands: Vec<(u32, f64)> = (0..10).map(|i| (i, if i == 7 { 50.0 } else { 1.0 })).collect();
        let a = weighted_sample(&cands, 3, &mut Rng::new(9));
        assert_eq!(a, weighted_sample(&cands, 3, &mut Rng::new(9)));
        assert_eq!(a.len(), 3);
        let mut wins = 0;
        for s in 0..200 {
            wins += weighted_sample(&cands, 1, &mut Rng::new(s)).contains(&7) as u32;
        }
        // P(7 first) = 50 / 59 ≈ 0.85.
        assert!(wins > 150, "{wins}");
        assert!(weighted_sample(&[(1, 0.0)], 1, &mut Rng::new(1)).is_empty());
    }

    /// `top_kept` is filtering everything, sorting and truncating, for every cut and filter.
    #[test]
    fn top_kept_matches_filter_sort_truncate() {
        let mut rng = Rng::new(3);
        for n in [0usize, 1, 7, 50, 400, 3000] {
            // Scores from a small set, so ties (broken by id) are common.
            let cands: Vec<(u32, f32)> =
                (0..n as u32).map(|i| (i * 7 % 1009, (rng.next_u64() % 13) as f32 / 4.0)).collect();
            let filters: [&dyn Fn(u32) -> bool; 4] =
                [&|_| true, &|i| i % 3 != 0, &|i| i % 10 == 1, &|_| false];
            for keep in filters {
                for m in [0usize, 1, 5, 40, 500] {
                    let mut want: Vec<(u32, f32)> = cands.iter().copied().filter(|c| keep(c.0)).collect();
                    sort_desc(&mut want);
                    want.truncate(m);
                    assert_eq!(top_kept(cands.iter().copied(), m, keep), want, "n {n}, m {m}");
                }
            }
        }
    }

    /// The keys of `top_kept` order as `sort_desc` does (reversed) and give back the very
    /// score bits, for every kind of float: signed zeros, infinities, NaNs, subnormals.
    #[test]
    fn rank_keys_order_like_sort_desc_and_round_trip() {
        let mut rng = Rng::new(11);
        let special = [
            0.0f32,
            -0.0,
            1.0,
            -1.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            f32::MIN_POSITIVE / 2.0,
            -f32::MIN_POSITIVE / 2.0,
            f32::MAX,
            f32::MIN,
        ];
        let mut hits: Vec<(u32, f32)> = special.iter().enumerate().map(|(n, &s)| (n as u32 % 4, s)).collect();
        hits.extend((0..300).map(|n| (n % 17, f32::from_bits(rng.next_u64() as u32))));
        hits.extend([(0, 2.5), (u32::MAX, 2.5), (u32::MAX, -2.5), (0, -2.5)]);
        for &(id, s) in &hits {
            let (back_id, back) = from_rank_key(rank_key(id, s));
            assert_eq!((back_id, back.to_bits()), (id, s.to_bits()));
        }
        let mut want = hits.clone();
        sort_desc(&mut want);
        let mut keys: Vec<u64> = hits.iter().map(|&(id, s)| rank_key(id, s)).collect();
        keys.sort_unstable_by(|a, b| b.cmp(a));
        let got: Vec<(u32, u32)> =
            keys.into_iter().map(from_rank_key).map(|(i, s)| (i, s.to_bits())).collect();
        assert_eq!(got, want.iter().map(|&(i, s)| (i, s.to_bits())).collect::<Vec<_>>());
    }

    /// The fused blend is, bit for bit, the blend of the two min-max normalised lists.
    #[test]
    fn blend_equals_blend_of_normalised_lists() {
        let mut rng = Rng::new(4);
        for n in [1usize, 2, 7, 80] {
            for constant in [false, true] {
                let p: Vec<f32> =
                    (0..n).map(|_| if constant { 0.3 } else { rng.next_f64() as f32 * 3.0 - 1.0 }).collect();
                let t: Vec<f32> = (0..n).map(|_| rng.next_f64() as f32).collect();
                for beta in [0.0f32, 0.25, 0.5, 1.0] {
                    let (pn, tn) = (minmax(&p), minmax(&t));
                    let want: Vec<u32> =
                        pn.iter().zip(&tn).map(|(&a, &b)| ((1.0 - beta) * a + beta * b).to_bits()).collect();
                    let got: Vec<u32> = blend(&p, &t, beta).iter().map(|s| s.to_bits()).collect();
                    assert_eq!(got, want, "n {n}, beta {beta}");
                    let led: Vec<bool> =
                        pn.iter().zip(&tn).map(|(&a, &b)| beta * b > (1.0 - beta) * a).collect();
                    assert_eq!(trending_led(&p, &t, beta), led);
                }
            }
        }
    }

    #[test]
    fn top_sorted_matches_sort_truncate() {
        let mut rng = Rng::new(8);
        for n in [0usize, 1, 9, 120] {
            // Few distinct scores: ties are broken by id.
            let hits: Vec<(u32, f32)> =
                (0..n as u32).map(|i| (i * 13 % 211, (rng.next_u64() % 7) as f32)).collect();
            for keep in [0usize, 1, 10, 40, 200] {
                let mut want = hits.clone();
                sort_desc(&mut want);
                want.truncate(keep);
                let mut got = hits.clone();
                top_sorted(&mut got, keep);
                assert_eq!(got, want, "n {n}, keep {keep}");
            }
        }
    }

    #[test]
    fn sparse_scores_sum_and_forget_on_reset() {
        let mut s = SparseScores::default();
        s.reset(4);
        s.add(2, 0.5);
        s.add(9, 1.0);
        s.add(2, 0.25);
        assert!(!s.insert(9) && s.insert(3));
        assert_eq!((s.get(2), s.get(9), s.get(3), s.get(0)), (Some(0.75), Some(1.0), Some(0.0), None));
        assert_eq!(s.ids(), &[2, 9, 3]);
        assert_eq!(s.entries().collect::<Vec<_>>(), vec![(2, 0.75), (9, 1.0), (3, 0.0)]);
        s.reset(4);
        assert!(s.ids().is_empty() && s.get(2).is_none() && s.get(100).is_none());
        s.add(2, 1.0);
        assert_eq!(s.get(2), Some(1.0));
        // The generation wraps: every stamp is cleared, nothing old comes back.
        s.gen = u32::MAX;
        s.slots[5].0 = 1;
        s.reset(0);
        assert!(s.get(5).is_none() && s.get(2).is_none());
    }

    #[test]
    fn term_sums_equal_sparse_scores_and_forget_on_reset() {
        let mut terms = TermSums::default();
        let mut sparse = SparseScores::default();
        let mut rng = Rng::new(7);
        for round in 0..5 {
            let n = 50 + 20 * round;
            terms.reset(n);
            sparse.reset(n);
            for _ in 0..400 {
                // Ids past `n` grow both.
                let i = (rng.next_u64() % (n as u64 + 10)) as u32;
                let s = (rng.next_u64() % 1000 + 1) as f32 / 997.0;
                terms.add(i, s);
                sparse.add(i, s);
            }
            assert_eq!(terms.entries().collect::<Vec<_>>(), sparse.entries().collect::<Vec<_>>());
            for i in 0..(n as u32 + 20) {
                assert_eq!(terms.get(i), sparse.get(i).unwrap_or(0.0));
            }
        }
        terms.reset(0);
        assert_eq!(terms.entries().count(), 0);
        assert!(terms.sums.iter().all(|&s| s == 0.0), "reset clears every sum it held");
    }

    /// Terms added through `fill`'s adder give the entries and sums of adding them one by
    /// one, in several fills between resets.
    #[test]
    fn term_sums_fill_equals_add() {
        let (mut filled, mut added) = (TermSums::default(), TermSums::default());
        let mut rng = Rng::new(8);
        for round in 0..4 {
            let n = 60 + 30 * round;
            filled.reset(n);
            added.reset(n);
            for _ in 0..3 {
                let terms: Vec<(u32, f32)> = (0..300)
                    .map(|_| ((rng.next_u64() % n as u64) as u32, (rng.next_u64() % 1000 + 1) as f32 / 991.0))
                    .collect();
                filled.fill(|sums| terms.iter().for_each(|&(i, s)| sums.add(i, s)));
                terms.iter().for_each(|&(i, s)| added.add(i, s));
                let key = |t: &TermSums| t.entries().map(|(i, s)| (i, s.to_bits())).collect::<Vec<_>>();
                assert_eq!(key(&filled), key(&added));
            }
        }
    }

    #[test]
    fn explore_positions_spread() {
        assert_eq!(explore_positions(10, 2), vec![3, 6]);
        assert_eq!(explore_positions(10, 1), vec![5]);
        assert_eq!(explore_positions(3, 3), vec![0, 1, 2]);
    }
}
