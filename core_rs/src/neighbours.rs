//! Item-to-item neighbourhood maintained online: capped co-occurrence counts normalised like
//! cosine, the scoring term that serves users with few events.
//!
//! A factorization learns a new user's vector from one or two items only after its update has
//! moved that vector away from noise, and then it ranks by a low-rank summary of those items.
//! An item-based neighbourhood answers the same user from direct evidence: the items other
//! users took together with the ones this user just took (Sarwar, Karypis, Konstan & Riedl,
//! "Item-based collaborative filtering recommendation algorithms", WWW 2001; Linden, Smith &
//! York, "Amazon.com recommendations: item-to-item collaborative filtering", IEEE Internet
//! Computing 2003). Its quality does not depend on how many events the user has, so it is
//! strongest exactly where the factorization is weakest.
//!
//! # Counts
//! When user `u` takes item `i` for the first time, `i` is paired with each of the `window`
//! items `u` touched most recently: `c(i, h)` and `c(h, i)` grow by one, and `n_i` (distinct
//! users of `i`) by one. The similarity is the cosine of the binary user columns,
//! `sim(i, h) = c(i, h) / sqrt(n_i · n_h)`.
//!
//! # Bounded cost
//! Each item keeps at most `cap` neighbours. A full list admits a new neighbour by the
//! Space-Saving rule (Metwally, Agrawal & El Abbadi, "Efficient computation of frequent and
//! top-k elements in data streams", ICDT 2005): the entry with the smallest count is replaced
//! and the newcomer inherits that count plus one, so every item that co-occurs more often than
//! `total / cap` is guaranteed to be held. Similarities use Space-Saving's own estimate (the
//! count with the inherited part): on a full list a fresh co-occurrence then ranks beside the
//! established ones, a bias towards what is bought together *now* that suits catalogs whose
//! items come and go. Scoring by the guaranteed part (`count − inherited`) instead was tried
//! and lost on the Amazon grocery stream with the same settings (HR@100 0.17 against 0.24,
//! `python -m bench quality --data ... --params ...`), while it won slightly on the synthetic
//! stream (0.240 against 0.229); the real data decided. An event costs O(window · cap) and a
//! user's neighbourhood scores O(window · cap), whatever the catalog size or item popularity.
//!
//! # Erasure and rebuild
//! The counts are derived from the users' held histories: [`Neighbours::rebuild`] replays them
//! (after a snapshot load), and [`Neighbours::remove_user`] subtracts one user's pairs by
//! replaying its held history, saturating at zero (a pair whose entry was evicted has nothing
//! left to subtract, and pairs with items beyond the held history are not found: erasure is
//! exact while the user's history is under its cap and no list evicted).

use std::collections::HashMap;

/// Default neighbours kept per item.
pub const DEFAULT_CAP: usize = 100;
/// Default number of a user's most recent items paired with a new one, and used to score.
pub const DEFAULT_WINDOW: usize = 20;

/// Most pairs [`Neighbours::rebuild`] collects before counting them (bounds its memory).
const REBUILD_BATCH: usize = 1 << 22;
/// Fewest additions [`Neighbours::add_all`] spreads over the thread pool (it passes over
/// every list); fewer are added one by one.
const ADD_ALL_PARALLEL_FROM: usize = 1024;

/// Fewest bumps of one list in one [`Neighbours::add_all`] that are counted through a
/// [`Positions`] index of the list, with its smallest count followed from one eviction to the
/// next, rather than a scan of it per bump. On the lists of a long replay, full and mostly
/// taking evictions, following the smallest count took a restart with 10M events behind a
/// snapshot from 123 and 113 s of replay CPU to 94 and 93 s (`bench recovery`'s data, runs
/// alternating); the index alone had changed nothing.
const INDEXED_BUMPS_FROM: usize = 16;

/// How many lists ahead of the one being scored [`Neighbours::each_term`] starts loading.
const LIST_PREFETCH_AHEAD: usize = 2;
/// Cache lines (eight entries each) of a list asked for ahead; the CPU's stream prefetcher
/// follows the rest of a list once its first lines are read.
const LIST_PREFETCH_LINES: usize = 4;

/// Asks the CPU to start loading the cache line holding `x`: a hint, it changes no result.
#[inline(always)]
pub(crate) fn prefetch<T>(x: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is only a hint and never faults; the address is a live reference.
        unsafe { _mm_prefetch::<_MM_HINT_T0>((x as *const T).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

/// One neighbour and its Space-Saving count (`repr(C)`: [`held_or_min`] reads a list as
/// pairs of 32-bit words, id then count).
#[derive(Clone, Copy, Debug)]
#[repr(C)]
struct Entry {
    id: u32,
    count: f32,
}

/// Additions for [`Neighbours::add_all`], held flat: each item with the recent items it is
/// paired with (no allocation per addition).
#[derive(Clone, Debug, Default)]
pub struct Adds {
    items: Vec<u32>,
    /// End of each addition's recent items in `recent`.
    ends: Vec<usize>,
    recent: Vec<u32>,
}

impl Adds {
    /// Adds `item` with the recent items `fill` appends (oldest first).
    pub fn push_with(&mut self, item: u32, fill: impl FnOnce(&mut Vec<u32>)) {
        fill(&mut self.recent);
        self.items.push(item);
        self.ends.push(self.recent.len());
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Each addition's item and recent items, in order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &[u32])> + '_ {
        let starts = std::iter::once(0).chain(self.ends.iter().copied());
        self.items.iter().zip(starts.zip(&self.ends)).map(|(&i, (a, &b))| (i, &self.recent[a..b]))
    }
}

#[derive(Clone, Debug)]
pub struct Neighbours {
    cap: usize,
    window: usize,
    /// Distinct users of each item (`n_i`).
    users: Vec<f32>,
    /// Per item: neighbours, unordered, at most `cap` long.
    lists: Vec<Vec<Entry>>,
}

/// Adds `delta` to the count of `b` in `list`; a positive delta on a full list uses the
/// Space-Saving rule.
fn bump_list(list: &mut Vec<Entry>, b: u32, delta: f32, cap: usize) {
    let (held, min_pos) = held_or_min(list, b);
    if let Some(p) = held {
        let e = &mut list[p];
        e.count = (e.count + delta).max(0.0);
        if e.count == 0.0 {
            list.retain(|e| e.count > 0.0);
        }
        return;
    }
    if delta <= 0.0 {
        return;
    }
    if list.len() < cap {
        list.push(Entry { id: b, count: delta });
        return;
    }
    let min = list[min_pos].count;
    list[min_pos] = Entry { id: b, count: min + delta };
}

/// Where each neighbour of one list sits in it, by neighbour id, while [`Positions::bump_all`]
/// takes that list's bumps: a bump of a held neighbour then finds it at once instead of
/// scanning the list. One per thread, as long as the catalog; an entry counts only if it
/// carries the current list's stamp, so moving on to the next list costs one increment, not a
/// clearing.
#[derive(Default)]
struct Positions {
    stamp: u32,
    /// Per neighbour id: (the stamp of the list it was recorded for, its position there).
    at: Vec<(u32, u32)>,
}

thread_local! {
    static POSITIONS: std::cell::RefCell<Positions> = std::cell::RefCell::new(Positions::default());
}

impl Positions {
    /// [`bump_list`] with `delta` 1 for each of `bumps` in order, with the same result: a held
    /// neighbour is found by its recorded position; a new one is pushed, or on a full list
    /// replaces the first entry with the smallest count, and its position is recorded.
    /// `items` bounds the ids of `list` and `bumps`.
    fn bump_all(&mut self, list: &mut Vec<Entry>, bumps: &[u32], cap: usize, items: usize) {
        if self.at.len() < items {
            self.at.resize(items, (0, 0));
        }
        self.stamp = self.stamp.wrapping_add(1);
        if self.stamp == 0 {
            // Stamps wrapped around: no recorded position may pass for a current one.
            self.at.iter_mut().for_each(|e| *e = (0, 0));
            self.stamp = 1;
        }
        let stamp = self.stamp;
        for (p, e) in list.iter().enumerate() {
            self.at[e.id as usize] = (stamp, p as u32);
        }
        // The first entry with the smallest count, once known. Counts only grow here, so when
        // that entry grows, the next one holding the same count (if any) lies after it: the
        // minimum is found by one scan per count level, not one per eviction.
        let mut first_min: Option<usize> = None;
        for &b in bumps {
            let (s, p) = self.at[b as usize];
            if s == stamp {
                let p = p as usize;
                let was = list[p].count;
                list[p].count += 1.0;
                if first_min == Some(p) {
                    first_min = first_min_after_growth(list, p, was);
                }
                continue;
            }
            // Not held: it enters at the end, or in place of the first smallest count (the
            // Space-Saving rule, as in `bump_list`).
            let pos = if list.len() < cap {
                list.push(Entry { id: b, count: 1.0 });
                first_min = None; // a count of 1 may now be the smallest
                list.len() - 1
            } else {
                let pos = first_min.unwrap_or_else(|| held_or_min(list, b).1);
                let min = list[pos].count;
                self.at[list[pos].id as usize] = (0, 0);
                list[pos] = Entry { id: b, count: min + 1.0 };
                first_min = first_min_after_growth(list, pos, min);
                pos
            };
            self.at[b as usize] = (stamp, pos as u32);
        }
    }
}

/// The first entry with the smallest count, after the entry at `pos`, which was that entry
/// with count `was`, grew: `pos` still if the count did not move (an `f32` past 2^24), else the
/// next entry holding `was` (bit for bit), if any; None when the smallest count is now larger
/// (a scan finds it).
fn first_min_after_growth(list: &[Entry], pos: usize, was: f32) -> Option<usize> {
    if list[pos].count.to_bits() == was.to_bits() {
        return Some(pos);
    }
    list[pos + 1..].iter().position(|e| e.count.to_bits() == was.to_bits()).map(|p| pos + 1 + p)
}

/// One pass over `list`: the position of `b` if held, else None and the position of the first
/// entry with the smallest count (0 for an empty list). This runs for each of the
/// `2 · window` pairs of every event, over lists of up to `cap` entries, most of them full.
fn held_or_min(list: &[Entry], b: u32) -> (Option<usize>, usize) {
    #[cfg(target_arch = "x86_64")]
    if list.len() >= 8 && is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU reported AVX2.
        return unsafe { held_or_min_avx2(list, b) };
    }
    held_or_min_scalar(list, b)
}

fn held_or_min_scalar(list: &[Entry], b: u32) -> (Option<usize>, usize) {
    let (mut pos, mut min) = (0, f32::INFINITY);
    for (p, e) in list.iter().enumerate() {
        if e.id == b {
            return (Some(p), pos);
        }
        if e.count < min {
            (pos, min) = (p, e.count);
        }
    }
    (None, pos)
}

/// [`held_or_min_scalar`], four entries (eight words: id, count, id, count...) at a time:
/// ids compared in the even lanes, the minimum count kept in the odd ones. Counts on a list
/// are positive, so their bit patterns order as the counts do and an unsigned integer minimum
/// finds the smallest; the even lanes are forced to all ones so no id takes part in it.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn held_or_min_avx2(list: &[Entry], b: u32) -> (Option<usize>, usize) {
    use std::arch::x86_64::*;
    let blocks = list.len() / 4;
    let words = list.as_ptr().cast::<__m256i>();
    let want = _mm256_set1_epi32(b as i32);
    let ids = _mm256_set_epi32(0, -1, 0, -1, 0, -1, 0, -1);
    let mut min = _mm256_set1_epi32(-1);
    for k in 0..blocks {
        // SAFETY: block `k` is four whole entries of `list` (32 bytes, `repr(C)` pairs of
        // 32-bit words), read unaligned.
        let v = unsafe { _mm256_loadu_si256(words.add(k)) };
        let hit = _mm256_and_si256(_mm256_cmpeq_epi32(v, want), ids);
        if _mm256_testz_si256(hit, hit) == 0 {
            let found = list[4 * k..].iter().position(|e| e.id == b).map(|p| 4 * k + p);
            return (found, 0);
        }
        min = _mm256_min_epu32(min, _mm256_or_si256(v, ids));
    }
    let mut lanes = [0u32; 8];
    // SAFETY: `lanes` is 32 writable bytes.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), min) };
    let mut min = lanes.iter().copied().min().unwrap_or(u32::MAX);
    for (p, e) in list.iter().enumerate().skip(4 * blocks) {
        if e.id == b {
            return (Some(p), 0);
        }
        min = min.min(e.count.to_bits());
    }
    // The first entry holding it, again four at a time (a mask bit per lane).
    let want = _mm256_andnot_si256(ids, _mm256_set1_epi32(min as i32));
    for k in 0..blocks {
        // SAFETY: as above.
        let v = unsafe { _mm256_loadu_si256(words.add(k)) };
        let lanes =
            _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_andnot_si256(ids, v), want)));
        // The id lanes (zeroed on both sides) always compare equal: keep the count lanes.
        let lanes = lanes & 0xaa;
        if lanes != 0 {
            return (None, 4 * k + lanes.trailing_zeros() as usize / 2);
        }
    }
    let pos =
        list.iter().skip(4 * blocks).position(|e| e.count.to_bits() == min).map_or(0, |p| 4 * blocks + p);
    (None, pos)
}

impl Neighbours {
    pub fn new(cap: usize, window: usize) -> Self {
        Neighbours { cap: cap.max(1), window, users: Vec::new(), lists: Vec::new() }
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// Whether nothing has been counted yet.
    pub fn is_empty(&self) -> bool {
        self.users.iter().all(|&n| n == 0.0)
    }

    fn grow(&mut self, i: u32) {
        let n = i as usize + 1;
        if self.users.len() < n {
            self.users.resize(n, 0.0);
            self.lists.resize(n, Vec::new());
        }
    }

    /// Adds `delta` to `c(a, b)`; a positive delta on a full list uses the Space-Saving rule.
    fn bump(&mut self, a: u32, b: u32, delta: f32) {
        bump_list(&mut self.lists[a as usize], b, delta, self.cap);
    }

    /// User took `item` for the first time; `recent` are its previously held items, oldest
    /// first (only the last `window` are paired).
    pub fn add(&mut self, item: u32, recent: &[u32]) {
        self.grow(item);
        self.users[item as usize] += 1.0;
        let from = recent.len().saturating_sub(self.window);
        for &h in &recent[from..] {
            if h == item {
                continue;
            }
            self.grow(h);
            self.bump(item, h, 1.0);
            self.bump(h, item, 1.0);
        }
    }

    /// [`Neighbours::add`] for each `(item, recent)` in order, with the same result: a list
    /// only ever changes by bumps of its own item, so each list takes its bumps in their
    /// order, and the lists are updated in parallel.
    pub fn add_all(&mut self, adds: &Adds) {
        use rayon::prelude::*;
        if adds.len() < ADD_ALL_PARALLEL_FROM {
            for (item, recent) in adds.iter() {
                self.add(item, recent);
            }
            return;
        }
        let Some(top) = adds.items.iter().chain(&adds.recent).copied().max() else { return };
        self.grow(top);
        // Bumps by list, in order (a counting sort on the list's item).
        let mut starts = vec![0usize; self.lists.len() + 1];
        let window = self.window;
        fn paired(window: usize, (item, recent): (u32, &[u32])) -> impl Iterator<Item = (u32, u32)> + '_ {
            recent[recent.len().saturating_sub(window)..]
                .iter()
                .copied()
                .filter(move |&h| h != item)
                .map(move |h| (item, h))
        }
        for (item, h) in adds.iter().flat_map(|a| paired(window, a)) {
            starts[item as usize + 1] += 1;
            starts[h as usize + 1] += 1;
        }
        for k in 1..starts.len() {
            starts[k] += starts[k - 1];
        }
        let mut next = starts.clone();
        let mut bumps = vec![0u32; starts[starts.len() - 1]];
        for (item, h) in adds.iter().flat_map(|a| paired(window, a)) {
            bumps[next[item as usize]] = h;
            next[item as usize] += 1;
            bumps[next[h as usize]] = item;
            next[h as usize] += 1;
        }
        for &item in &adds.items {
            self.users[item as usize] += 1.0;
        }
        let cap = self.cap;
        let items = self.lists.len();
        self.lists.par_iter_mut().enumerate().with_min_len(256).for_each(|(a, list)| {
            let bumps = &bumps[starts[a]..starts[a + 1]];
            if bumps.len() < INDEXED_BUMPS_FROM {
                for &b in bumps {
                    bump_list(list, b, 1.0, cap);
                }
            } else {
                POSITIONS.with_borrow_mut(|at| at.bump_all(list, bumps, cap, items));
            }
        });
    }

    /// Subtracts what [`Neighbours::add`] counted for a user whose held items were `history`
    /// (oldest first).
    pub fn remove_user(&mut self, history: &[u32]) {
        for (p, &i) in history.iter().enumerate() {
            self.grow(i);
            self.users[i as usize] = (self.users[i as usize] - 1.0).max(0.0);
            let from = p.saturating_sub(self.window);
            for &h in &history[from..p] {
                if h == i {
                    continue;
                }
                self.grow(h);
                self.bump(i, h, -1.0);
                self.bump(h, i, -1.0);
            }
        }
    }

    /// Recounts from every user's held items (each oldest first), as [`Neighbours::add`] of
    /// each item after the ones before it would, counted by [`Neighbours::add_all`] (in
    /// parallel) in batches of at most [`REBUILD_BATCH`] pairs.
    pub fn rebuild<'a>(&mut self, histories: impl Iterator<Item = &'a [u32]>) {
        self.rebuild_batched(histories, REBUILD_BATCH);
    }

    fn rebuild_batched<'a>(&mut self, histories: impl Iterator<Item = &'a [u32]>, batch: usize) {
        self.users.clear();
        self.lists.clear();
        let mut adds = Adds::default();
        for h in histories {
            for p in 0..h.len() {
                adds.push_with(h[p], |out| out.extend_from_slice(&h[p.saturating_sub(self.window)..p]));
            }
            if adds.recent.len() >= batch {
                self.add_all(&std::mem::take(&mut adds));
            }
        }
        self.add_all(&adds);
    }

    /// `sim(a, b)`: cosine of the two items' user sets as counted (0 if never together).
    pub fn similarity(&self, a: u32, b: u32) -> f32 {
        let Some(list) = self.lists.get(a as usize) else { return 0.0 };
        let c = list.iter().find(|e| e.id == b).map_or(0.0, |e| e.count);
        if c == 0.0 {
            return 0.0;
        }
        let (na, nb) = (self.users[a as usize], self.users.get(b as usize).copied().unwrap_or(0.0));
        if na <= 0.0 || nb <= 0.0 {
            return 0.0;
        }
        (c / (na * nb).sqrt()).min(1.0)
    }

    /// Neighbourhood scores `Σ_{h ∈ recent} sim(h, j)` of every item `j` reachable from the
    /// last `window` of `recent` (oldest first), unsorted.
    pub fn scores(&self, recent: &[u32]) -> HashMap<u32, f32> {
        let mut out: HashMap<u32, f32> = HashMap::new();
        self.each_term(recent, |j, s| *out.entry(j).or_insert(0.0) += s);
        out
    }

    /// Calls `add(j, sim(h, j))` for every positive term of [`Neighbours::scores`], in the
    /// order the sums are taken (by `h` oldest first), so a caller accumulating into its own
    /// storage gets the same sums bit for bit. Every term is positive.
    ///
    /// A list is taken in blocks: the user counts gathered, then every term of the block
    /// computed in one loop the compiler vectorises (IEEE square roots and quotients are
    /// correctly rounded in SIMD lanes too, so the terms are the scalar ones), then the
    /// positive ones handed over.
    pub fn each_term(&self, recent: &[u32], mut add: impl FnMut(u32, f32)) {
        const BLOCK: usize = 64;
        let mut nj = [0.0f32; BLOCK];
        let mut count = [0.0f32; BLOCK];
        let mut term = [0.0f32; BLOCK];
        let window = &recent[recent.len().saturating_sub(self.window)..];
        // The lists are scattered on the heap and each is a miss: their headers are asked for
        // all at once, and each list's entries two lists ahead of their turn.
        window.iter().filter_map(|&h| self.lists.get(h as usize)).for_each(prefetch);
        for (p, &h) in window.iter().enumerate() {
            if let Some(ahead) = window.get(p + LIST_PREFETCH_AHEAD).and_then(|&a| self.lists.get(a as usize))
            {
                ahead.chunks(8).take(LIST_PREFETCH_LINES).for_each(|line| prefetch(&line[0]));
            }
            let Some(list) = self.lists.get(h as usize) else { continue };
            let nh = self.users[h as usize];
            if nh <= 0.0 {
                continue;
            }
            for block in list.chunks(BLOCK) {
                let n = block.len();
                for ((x, c), e) in nj.iter_mut().zip(&mut count).zip(block) {
                    *x = self.users.get(e.id as usize).copied().unwrap_or(0.0);
                    *c = e.count;
                }
                for ((t, &c), &x) in term[..n].iter_mut().zip(&count[..n]).zip(&nj[..n]) {
                    *t = (c / (nh * x).sqrt()).min(1.0);
                }
                for (k, e) in block.iter().enumerate() {
                    if nj[k] > 0.0 && count[k] > 0.0 {
                        add(e.id, term[k]);
                    }
                }
            }
        }
    }

    /// Neighbourhood score of one item `j` for a user whose recent items are `recent`.
    pub fn score(&self, recent: &[u32], j: u32) -> f32 {
        let from = recent.len().saturating_sub(self.window);
        recent[from..].iter().map(|&h| self.similarity(h, j)).sum()
    }

    /// An id above every id [`Neighbours::each_term`] can call `add` with (those with users
    /// counted).
    pub fn id_bound(&self) -> usize {
        self.users.len()
    }

    /// Longest neighbour list (for tests of the bound).
    pub fn longest_list(&self) -> usize {
        self.lists.iter().map(Vec::len).max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The indexed count of one list's bumps equals bumping it one by one, also where an
    /// `f32` count no longer grows by one (past 2^24) and where counts tie.
    #[test]
    fn indexed_bumps_match_bumping_one_by_one_at_saturated_and_tied_counts() {
        let big = 16_777_216.0f32; // 2^24: adding 1 leaves it unchanged
        assert_eq!(big + 1.0, big);
        let tied = vec![
            Entry { id: 7, count: 5.0 },
            Entry { id: 3, count: 2.0 },
            Entry { id: 9, count: 5.0 },
            Entry { id: 4, count: 2.0 },
        ];
        let saturated: Vec<Entry> = (0..4).map(|id| Entry { id, count: big }).collect();
        let bumps = [11, 3, 12, 9, 13, 14, 4, 15, 11, 16, 7, 17, 18, 19, 20, 21, 2, 22];
        for start in [tied, saturated] {
            let mut one = start.clone();
            for &b in &bumps {
                bump_list(&mut one, b, 1.0, 4);
            }
            let mut indexed = start;
            Positions::default().bump_all(&mut indexed, &bumps, 4, 32);
            let key = |l: &[Entry]| l.iter().map(|e| (e.id, e.count.to_bits())).collect::<Vec<_>>();
            assert_eq!(key(&indexed), key(&one));
        }
    }

    /// Counting many additions at once (in parallel, by list) gives exactly the counts of
    /// adding them one by one, evictions included.
    #[test]
    fn add_all_matches_adding_one_by_one() {
        let mut rng = crate::rng::Rng::new(5);
        let adds: Vec<(u32, Vec<u32>)> = (0..3000)
            .map(|_| {
                let item = (rng.next_u64() % 400) as u32;
                let recent = (0..rng.next_u64() % 30).map(|_| (rng.next_u64() % 400) as u32).collect();
                (item, recent)
            })
            .collect();
        let (mut one, mut all) = (Neighbours::new(8, 5), Neighbours::new(8, 5));
        for (item, recent) in &adds {
            one.add(*item, recent);
        }
        let flat = |part: &[(u32, Vec<u32>)]| {
            let mut out = Adds::default();
            for (item, recent) in part {
                out.push_with(*item, |r| r.extend_from_slice(recent));
            }
            out
        };
        let (first, rest) = (flat(&adds[..1000]), flat(&adds[1000..]));
        assert_eq!(first.iter().map(|(i, r)| (i, r.to_vec())).collect::<Vec<_>>(), adds[..1000].to_vec());
        all.add_all(&first);
        all.add_all(&rest);
        assert_eq!(one.users, all.users);
        for (a, b) in one.lists.iter().zip(&all.lists) {
            let key = |l: &Vec<Entry>| l.iter().map(|e| (e.id, e.count.to_bits())).collect::<Vec<_>>();
            assert_eq!(key(a), key(b));
        }
        assert!(one.lists.iter().any(|l| l.len() == 8), "some list is full: evictions happened");
    }

    /// The blocked sums of `scores` are, bit for bit, the pairwise similarities summed in
    /// window order, over lists longer than a block.
    #[test]
    fn scores_are_the_summed_similarities_exactly() {
        let mut rng = crate::rng::Rng::new(11);
        let mut n = Neighbours::new(150, 20);
        for _ in 0..20_000 {
            let item = (rng.next_u64() % 300) as u32;
            let recent: Vec<u32> = (0..rng.next_u64() % 25).map(|_| (rng.next_u64() % 300) as u32).collect();
            n.add(item, &recent);
        }
        assert!(n.longest_list() > 64, "lists span several blocks");
        for r in 0..20 {
            let recent: Vec<u32> = (0..r * 2).map(|_| (rng.next_u64() % 320) as u32).collect();
            let got = n.scores(&recent);
            for j in 0..320u32 {
                let want = n.score(&recent, j);
                match got.get(&j) {
                    Some(s) => assert_eq!(s.to_bits(), want.to_bits(), "item {j}"),
                    None => assert_eq!(want, 0.0, "item {j}"),
                }
            }
        }
    }

    #[test]
    fn cosine_of_co_occurrence() {
        let mut n = Neighbours::new(10, 10);
        // Users: {0, 1}, {0, 1}, {0, 2}.
        for h in [[0u32, 1], [0, 1], [0, 2]] {
            n.add(h[0], &[]);
            n.add(h[1], &h[..1]);
        }
        let want = 2.0 / (3.0f32 * 2.0).sqrt();
        assert!((n.similarity(0, 1) - want).abs() < 1e-6);
        assert!((n.similarity(1, 0) - want).abs() < 1e-6);
        assert!((n.similarity(0, 2) - 1.0 / 3.0f32.sqrt()).abs() < 1e-6);
        assert_eq!(n.similarity(1, 2), 0.0);
        let s = n.scores(&[1]);
        assert!((s[&0] - want).abs() < 1e-6);
        assert!(!s.contains_key(&2));
        assert!((n.score(&[1, 2], 0) - want - 1.0 / 3.0f32.sqrt()).abs() < 1e-6);
    }

    /// The one-pass (and vector) bump does what the rule says step by step: bump the entry if held
    /// (dropping it at zero), else append while the list has room, else replace the first
    /// entry with the smallest count, the newcomer inheriting it.
    #[test]
    fn bump_follows_the_space_saving_rule_step_by_step() {
        fn by_the_rule(list: &mut Vec<Entry>, b: u32, delta: f32, cap: usize) {
            if let Some(e) = list.iter_mut().find(|e| e.id == b) {
                e.count = (e.count + delta).max(0.0);
                list.retain(|e| e.count > 0.0);
                return;
            }
            if delta <= 0.0 {
                return;
            }
            if list.len() < cap {
                list.push(Entry { id: b, count: delta });
                return;
            }
            let min = list.iter().map(|e| e.count).fold(f32::INFINITY, f32::min);
            let pos = list.iter().position(|e| e.count == min).expect("a full list has entries");
            list[pos] = Entry { id: b, count: min + delta };
        }
        let mut rng = crate::rng::Rng::new(11);
        let (mut fast, mut slow) = (Vec::new(), Vec::new());
        let mut evictions = 0;
        for _ in 0..20_000 {
            let b = (rng.next_u64() % 30) as u32;
            let delta = if rng.next_u64().is_multiple_of(5) { -1.0 } else { 1.0 };
            // 11: lists long enough for the vector scan, with a tail after its blocks.
            let full = fast.len() == 11 && !fast.iter().any(|e: &Entry| e.id == b);
            evictions += usize::from(full && delta > 0.0);
            bump_list(&mut fast, b, delta, 11);
            by_the_rule(&mut slow, b, delta, 11);
            let pairs = |l: &[Entry]| l.iter().map(|e| (e.id, e.count.to_bits())).collect::<Vec<_>>();
            assert_eq!(pairs(&fast), pairs(&slow));
        }
        assert!(evictions > 1000, "the run must exercise evictions ({evictions})");
    }

    #[test]
    fn lists_stay_capped_and_keep_heavy_hitters() {
        let mut n = Neighbours::new(4, 50);
        // Item 0 with 40 one-off partners and partner 99 many times, interleaved: users who
        // take 100 + k then 0, and users who take 99 then 0.
        for k in 0..40u32 {
            n.add(100 + k, &[]);
            n.add(0, &[100 + k]);
            n.add(99, &[]);
            n.add(0, &[99]);
        }
        assert!(n.longest_list() <= 4);
        // Space-Saving: a partner more frequent than total / cap is always held, with a count
        // at least its true one (40).
        assert!(n.similarity(0, 99) >= 40.0 / (80.0f32 * 40.0).sqrt() - 1e-6);
    }

    #[test]
    fn window_bounds_pairs() {
        let mut n = Neighbours::new(10, 2);
        let h = [1u32, 2, 3, 4];
        for p in 0..h.len() {
            n.add(h[p], &h[..p]);
        }
        assert!(n.similarity(4, 3) > 0.0 && n.similarity(4, 2) > 0.0);
        assert_eq!(n.similarity(4, 1), 0.0, "item 1 is outside the window of 2");
    }

    /// A rebuild (counted by list in parallel, batch after batch) gives exactly the counts
    /// of adding every user's items one by one, evictions included.
    #[test]
    fn rebuild_matches_adding_one_by_one() {
        let mut rng = crate::rng::Rng::new(7);
        let histories: Vec<Vec<u32>> = (0..300)
            .map(|_| {
                let mut h: Vec<u32> =
                    (0..rng.next_u64() % 40).map(|_| (rng.next_u64() % 200) as u32).collect();
                h.sort_unstable();
                h.dedup();
                h.reverse(); // any order of distinct items
                h
            })
            .collect();
        let mut one = Neighbours::new(6, 5);
        for h in &histories {
            for p in 0..h.len() {
                one.add(h[p], &h[..p]);
            }
        }
        for batch in [usize::MAX, 5000, 1] {
            let mut rebuilt = Neighbours::new(6, 5);
            rebuilt.rebuild_batched(histories.iter().map(Vec::as_slice), batch);
            assert_eq!(one.users, rebuilt.users, "batch {batch}");
            for (a, b) in one.lists.iter().zip(&rebuilt.lists) {
                let pairs = |l: &[Entry]| l.iter().map(|e| (e.id, e.count.to_bits())).collect::<Vec<_>>();
                assert_eq!(pairs(a), pairs(b), "batch {batch}");
            }
        }
        assert!(one.longest_list() == 6, "the lists must fill up and evict");
    }

    #[test]
    fn remove_user_undoes_add_and_rebuild_matches() {
        let mut n = Neighbours::new(10, 3);
        let a = [1u32, 2, 3, 4];
        let b = [2u32, 3, 5];
        for h in [&a[..], &b[..]] {
            for p in 0..h.len() {
                n.add(h[p], &h[..p]);
            }
        }
        let mut fresh = Neighbours::new(10, 3);
        fresh.rebuild([&a[..], &b[..]].into_iter());
        for x in 1..6 {
            for y in 1..6 {
                assert!((n.similarity(x, y) - fresh.similarity(x, y)).abs() < 1e-6);
            }
        }
        n.remove_user(&a);
        let mut only_b = Neighbours::new(10, 3);
        only_b.rebuild([&b[..]].into_iter());
        for x in 1..6 {
            for y in 1..6 {
                assert!((n.similarity(x, y) - only_b.similarity(x, y)).abs() < 1e-6, "{x} {y}");
            }
        }
        assert_eq!(n.similarity(1, 2), 0.0);
    }
}
