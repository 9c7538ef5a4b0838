//! SEARCH-LAYER and SELECT-NEIGHBORS-HEURISTIC (Malkov & Yashunin 2018, algorithms 2 and 4),
//! with the inner product as the similarity (larger is closer).

use std::cell::RefCell;
use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;

use super::Hnsw;
use crate::scan::dot;

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
/// a bitmap per search, and nothing is allocated per visited node.
pub(super) struct Visited {
    marks: Vec<u32>,
    gen: u32,
}

impl Visited {
    fn new() -> Self {
        Visited {
            marks: Vec::new(),
            gen: 0,
        }
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

impl Hnsw {
    /// SEARCH-LAYER: beam search on `layer` from the entry points `eps` (already scored
    /// against `q`), keeping the `ef` best nodes for which `accept` holds. The caller resets
    /// `vis` (and may pre-mark nodes to skip). The upper-layer descent calls it with `ef = 1`.
    ///
    /// Rejected nodes are still expanded, and the stopping bound only counts accepted nodes,
    /// so a filter that rejects most nodes widens the beam by itself until `ef` accepted nodes
    /// are found or the reachable graph is exhausted.
    ///
    /// Returns the accepted nodes, best first.
    pub(super) fn search_layer(
        &self,
        q: &[f32],
        eps: &[Cand],
        ef: usize,
        layer: usize,
        accept: Option<&dyn Fn(u32) -> bool>,
        vis: &mut Visited,
    ) -> Vec<Cand> {
        let ok = |id: u32| accept.is_none_or(|f| f(id));
        let mut cands: BinaryHeap<Cand> = BinaryHeap::with_capacity(ef * 2);
        let mut res: BinaryHeap<Reverse<Cand>> = BinaryHeap::with_capacity(ef + 1);
        for &e in eps {
            if !vis.insert(e.id) {
                continue;
            }
            cands.push(e);
            if ok(e.id) {
                res.push(Reverse(e));
                if res.len() > ef {
                    res.pop();
                }
            }
        }
        while let Some(c) = cands.pop() {
            if res.len() >= ef && c.s < res.peek().expect("non-empty").0.s {
                break;
            }
            let nbs = self.links(c.id, layer);
            for (j, &nb) in nbs.iter().enumerate() {
                if let Some(&next) = nbs.get(j + 1) {
                    self.prefetch(next);
                }
                if !vis.insert(nb) {
                    continue;
                }
                let s = dot(q, self.vec(nb));
                if res.len() < ef || s > res.peek().expect("non-empty").0.s {
                    let cand = Cand { s, id: nb };
                    cands.push(cand);
                    if ok(nb) {
                        res.push(Reverse(cand));
                        if res.len() > ef {
                            res.pop();
                        }
                    }
                }
            }
        }
        let mut out: Vec<Cand> = res.into_iter().map(|r| r.0).collect();
        out.sort_unstable_by(|a, b| b.cmp(a));
        out
    }

    /// Asks the CPU to start loading the vector of `id`, overlapping the memory latency of
    /// the next neighbour with the inner product of the current one.
    #[inline(always)]
    fn prefetch(&self, id: u32) {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let row = &self.vectors[id as usize * self.dim..(id as usize + 1) * self.dim];
            for line in row.chunks(16) {
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
        let mut sel: Vec<u32> = old
            .iter()
            .copied()
            .filter(|&c| self.parent0[c as usize] == owner)
            .collect();
        let fixed = sel.len();
        let rest: Vec<Cand> = cands
            .iter()
            .copied()
            .filter(|c| !sel.contains(&c.id))
            .collect();
        sel.extend(self.select_neighbors_heuristic(&rest, cap - fixed));
        sel
    }
}

/// See `select_neighbors_heuristic`.
const KEEP_PRUNED: bool = false;
