//! SEARCH-LAYER and SELECT-NEIGHBORS-HEURISTIC (Malkov & Yashunin 2018, algorithms 2 and 4),
//! with the inner product as the similarity (larger is closer).

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use super::Hnsw;
use crate::scan::{dot, dot_kernel};

/// A node with its similarity to the current query. Ordered by similarity, ties broken by the
/// smaller id ranking higher, so that every heap and sort in the index is deterministic.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(super) struct Cand {
    pub s: f32,
    pub id: u32,
}

impl Eq for Cand {}
impl PartialOrd for Cand {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Cand {
    fn cmp(&self, o: &Self) -> Ordering {
        self.s.total_cmp(&o.s).then(o.id.cmp(&self.id))
    }
}

/// Generation-stamped visited set: `reset` is O(1) (bump the generation) instead of clearing
/// a bitmap per search, and nothing is allocated per visited node. Stamps are 16-bit: half
/// the cache footprint of 32-bit stamps (200 KB for 100k nodes, which stays in L2), for one
/// full clear every 65535 searches.
pub(super) struct Visited {
    marks: Vec<u16>,
    gen: u16,
    /// Scratch for the unvisited neighbours of the node being expanded.
    fresh: Vec<u32>,
}

impl Visited {
    fn new() -> Self {
        Visited { marks: Vec::new(), gen: 0, fresh: Vec::new() }
    }

    /// Starts a new, empty set over ids `< n`.
    pub fn reset(&mut self, n: usize) {
        if self.marks.len() < n {
            self.marks.resize(n, 0);
        }
        self.gen = self.gen.wrapping_add(1);
        if self.gen == 0 {
            self.marks.iter_mut().for_each(|m| *m = 0);
            self.gen = 1;
        }
    }

    /// Marks `id`; true if it was not marked yet.
    #[inline]
    pub fn insert(&mut self, id: u32) -> bool {
        let m = &mut self.marks[id as usize];
        if *m == self.gen {
            false
        } else {
            *m = self.gen;
            true
        }
    }
}

thread_local! {
    /// One visited set per thread: `&self` searches from many threads never share state.
    static VISITED: RefCell<Visited> = RefCell::new(Visited::new());
}

/// Runs `f` with this thread's visited set (a fresh one if it is already in use, which only
/// happens if a `keep` callback itself searches an index).
pub(super) fn with_visited<R>(f: impl FnOnce(&mut Visited) -> R) -> R {
    VISITED.with(|cell| match cell.try_borrow_mut() {
        Ok(mut v) => f(&mut v),
        Err(_) => f(&mut Visited::new()),
    })
}

/// How many neighbours ahead of the one being scored the vector loads are started: far
/// enough to overlap the memory latency with a few inner products, near enough not to
/// exhaust the CPU's outstanding-miss slots (a prefetch that finds them all busy stalls like
/// a load). Measured on 100k×64 MF-like vectors at ef=80: 1 → 0.87, 2 → 0.95, 4 → 0.98 of
/// hnswlib's QPS; all unvisited neighbours at once → 0.94.
const PREFETCH_AHEAD: usize = 4;
/// Cache lines of each vector to prefetch. The CPU's adjacent-line prefetcher completes each
/// 128-byte pair by itself; asking for the whole 256-byte row of a 64-d vector measured
/// slower (0.92 against 0.98 at 4 ahead) because the extra requests hold miss slots.
const PREFETCH_LINES: usize = 2;

impl Hnsw {
    /// SEARCH-LAYER: beam search on `layer` from the entry points `eps` (already scored
    /// against `q`), keeping the `ef` best nodes for which `accept` holds. The caller resets
    /// `vis` (and may pre-mark nodes to skip). Generic over `accept` so that the unfiltered
    /// searches of construction compile without any per-candidate call.
    ///
    /// Rejected nodes are still expanded, and the stopping bound only counts accepted nodes,
    /// so a filter that rejects most nodes widens the beam by itself until `ef` accepted nodes
    /// are found or the reachable graph is exhausted.
    ///
    /// Returns the accepted nodes, best first.
    pub(super) fn search_layer<F: Fn(u32) -> bool>(
        &self,
        q: &[f32],
        eps: &[Cand],
        ef: usize,
        layer: usize,
        accept: F,
        vis: &mut Visited,
    ) -> Vec<Cand> {
        assert_eq!(q.len(), self.dim, "query length differs from the index dimension");
        let kernel = dot_kernel();
        let mut cands: BinaryHeap<Cand> = BinaryHeap::with_capacity(ef * 2);
        let mut res: BinaryHeap<Reverse<Cand>> = BinaryHeap::with_capacity(ef + 1);
        // Similarity of the worst kept result once `ef` are kept; -inf before.
        let mut bound = f32::NEG_INFINITY;
        let mut fresh = std::mem::take(&mut vis.fresh);
        for &e in eps {
            if !vis.insert(e.id) {
                continue;
            }
            cands.push(e);
            if accept(e.id) {
                res.push(Reverse(e));
                if res.len() > ef {
                    res.pop();
                }
                if res.len() >= ef {
                    bound = res.peek().expect("non-empty").0.s;
                }
            }
        }
        while let Some(c) = cands.pop() {
            if c.s < bound {
                break;
            }
            // The next node to expand is most likely the next best candidate: start loading
            // its link list while this one is expanded.
            if let Some(n) = cands.peek() {
                self.prefetch_links(n.id, layer);
            }
            // Mark first, score after: the vectors of visited neighbours are never touched,
            // and the loads of the unvisited ones are started ahead of their inner products.
            fresh.clear();
            for &nb in self.links(c.id, layer) {
                if vis.insert(nb) {
                    fresh.push(nb);
                }
            }
            for &nb in fresh.iter().take(PREFETCH_AHEAD) {
                self.prefetch(nb);
            }
            for (j, &nb) in fresh.iter().enumerate() {
                if let Some(&ahead) = fresh.get(j + PREFETCH_AHEAD) {
                    self.prefetch(ahead);
                }
                // SAFETY: `q` and every stored row hold `self.dim` floats (asserted above).
                let s = unsafe { kernel(q.as_ptr(), self.vec(nb).as_ptr(), self.dim) };
                if s > bound || res.len() < ef {
                    let cand = Cand { s, id: nb };
                    cands.push(cand);
                    if accept(nb) {
                        res.push(Reverse(cand));
                        if res.len() > ef {
                            res.pop();
                        }
                        if res.len() >= ef {
                            bound = res.peek().expect("non-empty").0.s;
                        }
                    }
                }
            }
        }
        vis.fresh = fresh;
        let mut out: Vec<Cand> = res.into_iter().map(|r| r.0).collect();
        out.sort_unstable_by(|a, b| b.cmp(a));
        out
    }

    /// Greedy descent on one upper layer (SEARCH-LAYER with `ef = 1`): move to the best
    /// neighbour while it beats the current node. Needs no visited set, since the current
    /// node strictly improves (in the total order of `Cand`) at every step.
    pub(super) fn greedy(&self, q: &[f32], mut cur: Cand, layer: usize) -> Cand {
        loop {
            let mut best = cur;
            for &nb in self.links(cur.id, layer) {
                let c = Cand { s: dot(q, self.vec(nb)), id: nb };
                if c > best {
                    best = c;
                }
            }
            if best == cur {
                return cur;
            }
            cur = best;
        }
    }

    /// Asks the CPU to start loading the start of the layer-0 link list of `id` (the count
    /// and the first links share its first cache line).
    #[inline(always)]
    fn prefetch_links(&self, id: u32, layer: usize) {
        #[cfg(target_arch = "x86_64")]
        if layer == 0 {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let p: *const u32 = &self.links0[id as usize * (self.m0 + 1)];
            // SAFETY: a prefetch is only a hint and never faults; the address is in bounds.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (id, layer);
    }

    /// Asks the CPU to start loading the vector of `id` (its first `PREFETCH_LINES` lines).
    #[inline(always)]
    fn prefetch(&self, id: u32) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let row = &self.vectors[id as usize * self.dim..(id as usize + 1) * self.dim];
            for line in row.chunks(16).take(PREFETCH_LINES) {
                // SAFETY: a prefetch is only a hint and never faults; the address is in bounds.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = id;
    }

    /// SELECT-NEIGHBORS-HEURISTIC for inner product. `cands` are scored against the base
    /// vector `q` and sorted best first. A candidate `e` is kept only if `<e, q> > <e, r>` for
    /// every already-kept `r`: the L2 rule "e is closer to q than to r" with the inner product
    /// as the similarity. The norm of `e` cancels out (the test is `<e, q - r> > 0`), so it
    /// asks whether `e` points more towards `q` than towards `r` — a direction test that
    /// large-norm candidates cannot win merely by being long, which keeps the list diverse.
    /// Pruned candidates then fill any free slots ("keepPrunedConnections" in the paper):
    /// inner-product graphs have strong hubs, which the rule alone would leave as the only
    /// links of many nodes.
    pub(super) fn select_neighbors_heuristic(&self, cands: &[Cand], cap: usize) -> Vec<u32> {
        let mut sel: Vec<u32> = Vec::with_capacity(cap);
        let mut pruned: Vec<u32> = Vec::new();
        for e in cands {
            if sel.len() >= cap {
                break;
            }
            let ve = self.vec(e.id);
            if sel.iter().all(|&r| dot(ve, self.vec(r)) < e.s) {
                sel.push(e.id);
            } else if KEEP_PRUNED {
                pruned.push(e.id);
            }
        }
        if KEEP_PRUNED {
            for p in pruned {
                if sel.len() >= cap {
                    break;
                }
                sel.push(p);
            }
        }
        sel
    }

    /// The heuristic, with the layer-0 spanning tree (see `Hnsw::parent0`) kept intact:
    /// `owner`'s tree children (all in its current list `old`, so they always fit) are kept
    /// even when the new search did not return them, and the heuristic fills the other
    /// slots.
    pub(super) fn select_protected(
        &self,
        cands: &[Cand],
        cap: usize,
        layer: usize,
        owner: u32,
        old: &[u32],
    ) -> Vec<u32> {
        if layer != 0 {
            return self.select_neighbors_heuristic(cands, cap);
        }
        let mut sel: Vec<u32> = old.iter().copied().filter(|&c| self.parent0[c as usize] == owner).collect();
        let fixed = sel.len();
        let rest: Vec<Cand> = cands.iter().copied().filter(|c| !sel.contains(&c.id)).collect();
        sel.extend(self.select_neighbors_heuristic(&rest, cap - fixed));
        sel
    }
}

/// See `select_neighbors_heuristic`.
const KEEP_PRUNED: bool = false;
