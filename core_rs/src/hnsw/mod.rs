//! Hierarchical Navigable Small World graph for maximum inner product search
//! (Malkov & Yashunin, "Efficient and robust approximate nearest neighbor search using
//! Hierarchical Navigable Small World graphs", TPAMI 2018), with native inner product as the
//! similarity, in-place updates of moved vectors and deletion.
//!
//! # Layout
//! - this file: storage, INSERT, the in-place re-link of a moved vector, delete, search and
//!   `check_invariants`;
//! - `search`: SEARCH-LAYER, SELECT-NEIGHBORS-HEURISTIC and the thread-local visited set;
//! - `save`: the checksummed binary format;
//! - `batch`: inserting many new nodes with their searches in parallel.
//!
//! # Why native inner product
//! The classic reduction of MIPS to L2 (append `sqrt(M² - |x|²)` to every item) measured
//! recall@10 of 0.27 at ef=40 on MF-like vectors (lognormal norms): it pushes all items onto
//! one sphere shell where the appended coordinate dominates small-norm items. Here `<q, x>`
//! is the similarity both for building and for searching.
//!
//! # Keeping every node reachable
//! Pruning neighbour lists (the paper's shrink step) can leave a node without in-links; with
//! inner product this is common, because the same few large-norm hubs top everyone's
//! candidate lists and crowd small-norm nodes out. Layer 0 therefore carries a spanning tree
//! (`parent0`): one in-link per node is its tree edge and no selection ever drops it. The
//! parent is the neighbour with the fewest tree children among those that took the new node
//! in, so pinned edges spread over the graph instead of filling the lists of the large-norm
//! hubs that everyone links to (see `Hnsw::nchild` for what that costs otherwise).
//!
//! # Moving vectors
//! `upsert` of an existing id overwrites the vector and re-links the node only once it has
//! drifted by `RELINK_DRIFT` of its norm since its links were chosen; the re-link searches
//! from the old neighbours with a narrow beam (`UPDATE_EF`) on each layer the node is on.

mod batch;
mod save;
mod search;
#[cfg(test)]
mod tests;

use search::{with_visited, Cand};

use crate::rng::Rng;
use crate::scan::dot;

/// Construction and search parameters.
#[derive(Clone, Debug)]
pub struct HnswConfig {
    /// Links per node on upper layers; layer 0 gets `2 * m`.
    pub m: usize,
    pub ef_construction: usize,
    /// Default beam width for searches.
    pub ef_search: usize,
    pub seed: u64,
}

impl Default for HnswConfig {
    fn default() -> Self {
        HnswConfig { m: 16, ef_construction: 200, ef_search: 64, seed: 42 }
    }
}

/// Marks an id slot with no node in `levels`.
const ABSENT: u8 = u8::MAX;
/// Levels are capped well below `ABSENT`; with `m >= 2` a level above 30 has probability
/// below 2^-30 per node.
const MAX_LEVEL: usize = 30;
/// `parent0` of a node with no parent.
const NO_PARENT: u32 = u32::MAX;
/// Beam width of the re-link search after a vector moved. A moved vector's old neighbours
/// are already close to its new position, so a narrow beam started from them finds the new
/// neighbourhood. Measured on 20k×64 MF-like vectors after 50k Zipf-skewed 5% moves
/// (recall@10 at ef=40, fresh build 0.889): 16 → 0.847, 32 → 0.865, 64 → 0.880 when
/// re-linking on every move.
const UPDATE_EF: usize = 48;
/// Relative drift (sum of step lengths over the norm at the last re-link) that triggers a
/// re-link. Same measurement: 0 (every move) → 0.865 at 22k updates/s, 0.15 → 0.888 at
/// 58k/s, 0.25 → 0.900 at 100k/s. Fewer re-links are better as well as cheaper: each
/// re-link searches with a narrow beam and reshuffles neighbours' lists, while links chosen
/// a short distance away remain good routes.
const RELINK_DRIFT: f32 = 0.25;

/// The index. Searches take `&self` and may run from many threads at once (each thread
/// has its own visited set); updates take `&mut self`.
pub struct Hnsw {
    dim: usize,
    cfg: HnswConfig,
    /// Layer-0 capacity, `2 * m`.
    m0: usize,
    /// Level multiplier `1 / ln(m)`.
    ml: f64,
    /// Row `id` is `vectors[id * dim..(id + 1) * dim]`; slots without a node are zeros.
    vectors: Vec<f32>,
    /// Top layer of each slot, `ABSENT` for an unused id.
    levels: Vec<u8>,
    /// Deleted nodes stay in the graph as routing nodes but are never returned.
    deleted: Vec<bool>,
    /// Layer-0 lists, `m0 + 1` words per slot: the count, then the ids. Flat so the hot loop
    /// touches one cache line per node and no pointer is chased.
    links0: Vec<u32>,
    /// Upper layers of each slot, `m + 1` words per layer 1..=level (count, then ids).
    upper: Vec<Vec<u32>>,
    /// A spanning tree of layer 0: `parent0[x]` links to `x`, and neighbour selection never
    /// drops that link. A new node's first in-link becomes its parent; a new entry point
    /// links to the previous one. So every node stays reachable from the entry point however
    /// lists are pruned — plain pruning strands low-norm nodes in inner-product graphs,
    /// where large-norm hubs crowd them out of every list. `NO_PARENT` for the tree's root.
    parent0: Vec<u32>,
    /// Tree children of each node. Tree edges are pinned in their lists, and a node whose
    /// list fills with them routes nowhere useful, so parents are chosen to keep this low
    /// (always taking the first acceptor pinned whole lists: recall@10 at ef=40 on 100k×64
    /// MF-like vectors fell to 0.51, against 0.885 for the same graph without any tree).
    nchild: Vec<u32>,
    /// Sum of the step lengths of each node since its links were last chosen.
    drift: Vec<f32>,
    /// Norm of each node's vector when its links were last chosen.
    anchor_norm: Vec<f32>,
    entry: Option<u32>,
    max_level: usize,
    /// Nodes present, deleted or not.
    nodes: usize,
    /// Nodes present and not deleted.
    live: usize,
}

impl Hnsw {
    pub fn new(dim: usize, cfg: HnswConfig) -> Self {
        assert!(dim > 0, "dimension must be positive");
        assert!(cfg.m >= 2, "m must be at least 2");
        let m0 = 2 * cfg.m;
        let ml = 1.0 / (cfg.m as f64).ln();
        Hnsw {
            dim,
            cfg,
            m0,
            ml,
            vectors: Vec::new(),
            levels: Vec::new(),
            deleted: Vec::new(),
            links0: Vec::new(),
            upper: Vec::new(),
            parent0: Vec::new(),
            nchild: Vec::new(),
            drift: Vec::new(),
            anchor_norm: Vec::new(),
            entry: None,
            max_level: 0,
            nodes: 0,
            live: 0,
        }
    }
    pub fn dim(&self) -> usize {
        self.dim
    }
    pub fn config(&self) -> &HnswConfig {
        &self.cfg
    }
    /// Live (not deleted) nodes.
    pub fn len(&self) -> usize {
        self.live
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Nodes in the graph, deleted or not.
    pub fn nodes(&self) -> usize {
        self.nodes
    }
    /// Whether `id` is a node of the graph, deleted or not.
    pub fn has_node(&self, id: u32) -> bool {
        self.present(id)
    }
    pub fn contains(&self, id: u32) -> bool {
        self.present(id) && !self.deleted[id as usize]
    }
    /// Inserts `id` (dense, gaps allowed), or updates it in place if present; undeletes a deleted id.
    pub fn upsert(&mut self, id: u32, v: &[f32]) {
        assert_eq!(v.len(), self.dim, "vector length differs from the index dimension");
        assert!(id != u32::MAX, "id u32::MAX is reserved");
        if self.present(id) {
            let mut force = false;
            if self.deleted[id as usize] {
                self.deleted[id as usize] = false;
                self.live += 1;
                force = true;
            }
            self.update(id, v, force);
        } else {
            self.insert(id, v);
        }
    }
    pub fn delete(&mut self, id: u32) -> bool {
        if !self.contains(id) {
            return false;
        }
        self.deleted[id as usize] = true;
        self.live -= 1;
        if self.entry == Some(id) {
            // Keep the entry on the top layer (searches must start there); prefer a live node.
            let top = self.max_level as u8;
            if let Some(alt) = (0..self.levels.len()).find(|&i| self.levels[i] == top && !self.deleted[i]) {
                // The new entry must reach the old one, and through it the whole tree.
                self.entry = Some(alt as u32);
                if !self.force_link0(alt as u32, id) {
                    self.entry = Some(id);
                }
            }
        }
        true
    }
    /// Top `k` by inner product with `q`, best first; `keep(id)` false excludes an id from
    /// the results (the graph is still traversed through it). `ef` is clamped to at least `k`.
    pub fn search(&self, q: &[f32], k: usize, ef: usize, keep: &dyn Fn(u32) -> bool) -> Vec<(u32, f32)> {
        assert_eq!(q.len(), self.dim, "query length differs from the index dimension");
        let Some(entry) = self.entry else {
            return Vec::new();
        };
        if k == 0 || self.live == 0 {
            return Vec::new();
        }
        let ef = ef.max(k);
        let accept = |id: u32| !self.deleted[id as usize] && keep(id);
        with_visited(|vis| {
            let mut cur = [Cand { s: dot(q, self.vec(entry)), id: entry }];
            cur[0] = self.descend(q, cur[0], 0);
            vis.reset(self.levels.len());
            let mut res = self.search_layer(q, &cur, ef, 0, accept, vis);
            res.truncate(k);
            res.into_iter().map(|c| (c.id, c.s)).collect()
        })
    }
    /// The stored vector of a live node.
    pub fn vector(&self, id: u32) -> Option<&[f32]> {
        self.contains(id).then(|| self.vec(id))
    }
    pub fn check_invariants(&self) -> Result<(), String> {
        let slots = self.levels.len();
        if self.vectors.len() != slots * self.dim
            || self.deleted.len() != slots
            || self.links0.len() != slots * (self.m0 + 1)
            || self.upper.len() != slots
            || self.parent0.len() != slots
        {
            return Err(format!("storage sizes disagree with {slots} slots"));
        }
        let mut nodes = 0;
        let mut live = 0;
        let mut top = 0usize;
        for id in 0..slots as u32 {
            let lvl = self.levels[id as usize];
            if lvl == ABSENT {
                if self.links0[id as usize * (self.m0 + 1)] != 0 || !self.upper[id as usize].is_empty() {
                    return Err(format!("unused slot {id} has links"));
                }
                continue;
            }
            let lvl = lvl as usize;
            if lvl > MAX_LEVEL {
                return Err(format!("node {id} has level {lvl} > {MAX_LEVEL}"));
            }
            nodes += 1;
            live += usize::from(!self.deleted[id as usize]);
            top = top.max(lvl);
            if self.upper[id as usize].len() != lvl * (self.cfg.m + 1) {
                return Err(format!("node {id}: upper link storage does not match level {lvl}"));
            }
            for l in 0..=lvl {
                let cap = self.cap(l);
                let count = self.link_count(id, l);
                if count > cap {
                    return Err(format!("node {id} layer {l}: {count} links > {cap}"));
                }
                let list = self.links(id, l);
                for (i, &n) in list.iter().enumerate() {
                    if n == id {
                        return Err(format!("node {id} layer {l}: self-link"));
                    }
                    if !self.present(n) || (self.levels[n as usize] as usize) < l {
                        return Err(format!("node {id} layer {l}: link to {n} not on that layer"));
                    }
                    if list[..i].contains(&n) {
                        return Err(format!("node {id} layer {l}: duplicate link to {n}"));
                    }
                }
            }
        }
        if nodes != self.nodes || live != self.live {
            return Err(format!(
                "counts: {} nodes / {} live recorded, {nodes} / {live} found",
                self.nodes, self.live
            ));
        }
        let mut nchild = vec![0u32; slots];
        for &p in &self.parent0 {
            if p != NO_PARENT {
                nchild[p as usize] += 1;
            }
        }
        if nchild != self.nchild || self.nchild.len() != slots {
            return Err("recorded tree child counts are stale".into());
        }
        for id in 0..slots as u32 {
            let p = self.parent0[id as usize];
            // The entry needs no in-link (searches start there), so its tree edge is not
            // kept while it is the entry; a new entry re-links it (`force_link0`).
            if p != NO_PARENT
                && self.entry != Some(id)
                && (!self.present(p) || !self.links(p, 0).contains(&id))
            {
                return Err(format!("tree edge {p} -> {id} is missing on layer 0"));
            }
        }
        let Some(entry) = self.entry else {
            return if nodes == 0 { Ok(()) } else { Err("nodes but no entry point".into()) };
        };
        if !self.present(entry) {
            return Err(format!("entry point {entry} is not a node"));
        }
        if self.levels[entry as usize] as usize != self.max_level || top != self.max_level {
            return Err(format!(
                "entry point level {} / recorded max {} / actual max {top}",
                self.levels[entry as usize], self.max_level
            ));
        }
        let mut seen = vec![false; slots];
        let mut stack = vec![entry];
        seen[entry as usize] = true;
        while let Some(x) = stack.pop() {
            for &n in self.links(x, 0) {
                if !seen[n as usize] {
                    seen[n as usize] = true;
                    stack.push(n);
                }
            }
        }
        if let Some(lost) = (0..slots).find(|&i| self.levels[i] != ABSENT && !self.deleted[i] && !seen[i]) {
            return Err(format!("live node {lost} unreachable from the entry point on layer 0"));
        }
        Ok(())
    }
    pub fn save(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        save::save(self, w)
    }
    pub fn load(r: &mut dyn std::io::Read) -> std::io::Result<Hnsw> {
        save::load(r)
    }

    // ---- storage helpers ----

    #[inline]
    fn present(&self, id: u32) -> bool {
        (id as usize) < self.levels.len() && self.levels[id as usize] != ABSENT
    }

    #[inline]
    fn vec(&self, id: u32) -> &[f32] {
        let i = id as usize * self.dim;
        &self.vectors[i..i + self.dim]
    }

    #[inline]
    fn cap(&self, layer: usize) -> usize {
        if layer == 0 {
            self.m0
        } else {
            self.cfg.m
        }
    }

    #[inline]
    fn link_count(&self, id: u32, layer: usize) -> usize {
        if layer == 0 {
            self.links0[id as usize * (self.m0 + 1)] as usize
        } else {
            self.upper[id as usize][(layer - 1) * (self.cfg.m + 1)] as usize
        }
    }

    /// The out-links of `id` on `layer` (which `id` must be on).
    #[inline(always)]
    fn links(&self, id: u32, layer: usize) -> &[u32] {
        if layer == 0 {
            let base = id as usize * (self.m0 + 1);
            let n = self.links0[base] as usize;
            &self.links0[base + 1..base + 1 + n]
        } else {
            let base = (layer - 1) * (self.cfg.m + 1);
            let u = &self.upper[id as usize];
            let n = u[base] as usize;
            &u[base + 1..base + 1 + n]
        }
    }

    /// Replaces the out-links of `id` on `layer`, keeping the in-degree counts current.
    fn set_links(&mut self, id: u32, layer: usize, list: &[u32]) {
        debug_assert!(list.len() <= self.cap(layer));
        if layer == 0 {
            let base = id as usize * (self.m0 + 1);
            debug_assert!(
                self.links(id, 0).iter().all(|&c| !self.must_link(id, c) || list.contains(&c)),
                "tree edge from {id} dropped"
            );
            self.links0[base] = list.len() as u32;
            self.links0[base + 1..base + 1 + list.len()].copy_from_slice(list);
        } else {
            let base = (layer - 1) * (self.cfg.m + 1);
            let u = &mut self.upper[id as usize];
            u[base] = list.len() as u32;
            u[base + 1..base + 1 + list.len()].copy_from_slice(list);
        }
    }

    fn grow(&mut self, slots: usize) {
        if slots <= self.levels.len() {
            return;
        }
        reserve_huge(&mut self.vectors, slots * self.dim);
        self.vectors.resize(slots * self.dim, 0.0);
        self.levels.resize(slots, ABSENT);
        self.deleted.resize(slots, false);
        reserve_huge(&mut self.links0, slots * (self.m0 + 1));
        self.links0.resize(slots * (self.m0 + 1), 0);
        self.upper.resize_with(slots, Vec::new);
        self.parent0.resize(slots, NO_PARENT);
        self.nchild.resize(slots, 0);
        self.drift.resize(slots, 0.0);
        self.anchor_norm.resize(slots, 0.0);
    }

    /// The level of `id`: `floor(-ln(U) * mL)` with `U` drawn from a generator seeded by
    /// the index seed and the id, so the graph does not depend on how many ids came before
    /// and a saved index needs no generator state.
    fn random_level(&self, id: u32) -> usize {
        let mut r = Rng::new(self.cfg.seed ^ (u64::from(id) + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93));
        let u = 1.0 - r.next_f64(); // (0, 1]
        ((-u.ln() * self.ml).floor() as usize).min(MAX_LEVEL)
    }

    /// Greedy descent (SEARCH-LAYER with `ef = 1`) from the top layer down to `stop + 1`.
    fn descend(&self, q: &[f32], mut cur: Cand, stop: usize) -> Cand {
        for l in (stop + 1..=self.max_level).rev() {
            cur = self.greedy(q, cur, l);
        }
        cur
    }

    /// Stores a new node's vector and level, with no links yet (the start of an insert).
    fn place(&mut self, id: u32, v: &[f32], level: usize) {
        self.grow(id as usize + 1);
        let i = id as usize;
        self.vectors[i * self.dim..(i + 1) * self.dim].copy_from_slice(v);
        self.levels[i] = level as u8;
        self.deleted[i] = false;
        self.drift[i] = 0.0;
        self.anchor_norm[i] = dot(v, v).sqrt();
        self.upper[i] = vec![0; level * (self.cfg.m + 1)];
        self.nodes += 1;
        self.live += 1;
    }

    /// INSERT (algorithm 1) of a new node.
    fn insert(&mut self, id: u32, v: &[f32]) {
        let level = self.random_level(id);
        self.place(id, v, level);
        let Some(entry) = self.entry else {
            self.entry = Some(id);
            self.max_level = level;
            return;
        };
        let start = Cand { s: dot(v, self.vec(entry)), id: entry };
        let mut eps = vec![self.descend(v, start, level)];
        for l in (0..=level.min(self.max_level)).rev() {
            let w = with_visited(|vis| {
                vis.reset(self.levels.len());
                vis.insert(id);
                self.search_layer(v, &eps, self.cfg.ef_construction, l, |_| true, vis)
            });
            let sel = self.select_protected(&w, self.cap(l), l, id, &[]);
            self.set_links(id, l, &sel);
            for &n in &sel {
                self.add_link(n, id, l);
            }
            if l == 0 {
                self.adopt(id, &sel, &w);
            }
            eps = w;
        }
        if level > self.max_level {
            self.force_link0(id, entry);
            self.entry = Some(id);
            self.max_level = level;
        }
    }

    /// Chooses the tree parent of a new node: among the neighbours that took it into their
    /// lists, the one with the fewest tree children, so that pinned tree edges spread over
    /// the graph instead of filling the lists of the large-norm hubs everyone links to. If
    /// every neighbour's shrink rejected it, a link is forced from the candidate with the
    /// fewest children that has a non-tree slot to give up.
    fn adopt(&mut self, id: u32, sel: &[u32], w: &[Cand]) {
        let took = sel.iter().copied().filter(|&n| self.links(n, 0).contains(&id));
        if let Some(p) = took.min_by_key(|&n| self.nchild[n as usize]) {
            self.parent0[id as usize] = p;
            self.nchild[p as usize] += 1;
            return;
        }
        let mut order: Vec<u32> = sel.iter().copied().chain(w.iter().map(|c| c.id)).collect();
        order.sort_by_key(|&n| self.nchild[n as usize]); // stable: best ranked first
        for n in order {
            if self.force_link0(n, id) {
                return;
            }
        }
    }

    /// Whether the layer-0 list of `owner` must keep `id`: `owner` is its tree parent.
    #[inline]
    fn must_link(&self, owner: u32, id: u32) -> bool {
        let p = self.parent0[id as usize];
        p == owner && self.entry != Some(id)
    }

    /// Makes `owner -> target` a layer-0 tree edge, evicting the lowest-ranked unprotected
    /// link if the list is full. Used when the entry point changes, so the new entry reaches
    /// the old one and through it the whole tree.
    fn force_link0(&mut self, owner: u32, target: u32) -> bool {
        let mut list = self.links(owner, 0).to_vec();
        if !list.contains(&target) {
            if list.len() < self.m0 {
                list.push(target);
            } else if let Some(j) = (0..list.len()).rev().find(|&j| !self.must_link(owner, list[j])) {
                list[j] = target;
            } else {
                return false; // every link is a tree edge
            }
            self.set_links(owner, 0, &list);
        }
        let old = self.parent0[target as usize];
        if old != NO_PARENT {
            self.nchild[old as usize] -= 1;
        }
        self.parent0[target as usize] = owner;
        self.nchild[owner as usize] += 1;
        true
    }

    /// Adds the link `owner -> new` on `layer`; a full list is re-selected with the heuristic
    /// over its links plus `new` (the paper's shrink step).
    fn add_link(&mut self, owner: u32, new: u32, layer: usize) {
        let old = self.links(owner, layer);
        if old.contains(&new) {
            return;
        }
        let cap = self.cap(layer);
        if old.len() < cap {
            let mut list = old.to_vec();
            list.push(new);
            self.set_links(owner, layer, &list);
            return;
        }
        let old = old.to_vec();
        let vo = self.vec(owner);
        let mut cands: Vec<Cand> = old
            .iter()
            .chain(std::iter::once(&new))
            .map(|&c| Cand { s: dot(vo, self.vec(c)), id: c })
            .collect();
        cands.sort_unstable_by(|a, b| b.cmp(a));
        let sel = self.select_protected(&cands, cap, layer, owner, &old);
        self.set_links(owner, layer, &sel);
    }

    /// Overwrites the vector of an existing node and re-links it once it has drifted far
    /// enough from where its links were chosen. Links chosen for a nearby position are
    /// still good routes (the graph stays a valid search structure whatever the vectors),
    /// and online factorisation moves each vector by a few percent per event, so re-linking
    /// on every move would spend most of its work reproducing the same lists. The drift is
    /// bounded by the sum of step lengths since the last re-link, relative to the norm then.
    fn update(&mut self, id: u32, v: &[f32], force: bool) {
        let i = id as usize;
        let old = &self.vectors[i * self.dim..(i + 1) * self.dim];
        let step = old.iter().zip(v).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        self.drift[i] += step;
        self.vectors[i * self.dim..(i + 1) * self.dim].copy_from_slice(v);
        let calm = self.drift[i] <= RELINK_DRIFT * self.anchor_norm[i]; // false for NaN
        if force || !calm {
            self.relink(id, v);
        }
    }

    /// Re-links a node after its vector moved: re-search its neighbourhood on each of its
    /// layers with a narrow beam started from its old neighbours, re-select with the
    /// heuristic, and add itself to the lists of its new neighbours.
    /// In-links from nodes that no longer are its neighbours are kept: they still point to a
    /// valid, nearby node, and dropping them would need a reverse index.
    fn relink(&mut self, id: u32, v: &[f32]) {
        let i = id as usize;
        self.drift[i] = 0.0;
        self.anchor_norm[i] = dot(v, v).sqrt();
        let level = self.levels[i] as usize;
        for l in (0..=level).rev() {
            let old = self.links(id, l).to_vec();
            let eps: Vec<Cand> = if old.is_empty() {
                // A lone node on this layer, or one whose links were all pruned away.
                match self.entry {
                    Some(e) if e != id && self.levels[e as usize] as usize >= l => {
                        vec![Cand { s: dot(v, self.vec(e)), id: e }]
                    }
                    _ => continue,
                }
            } else {
                old.iter().map(|&n| Cand { s: dot(v, self.vec(n)), id: n }).collect()
            };
            let w = with_visited(|vis| {
                vis.reset(self.levels.len());
                vis.insert(id);
                self.search_layer(v, &eps, UPDATE_EF, l, |_| true, vis)
            });
            let sel = self.select_protected(&w, self.cap(l), l, id, &old);
            self.set_links(id, l, &sel);
            for &n in &sel {
                if !old.contains(&n) {
                    self.add_link(n, id, l);
                }
            }
        }
    }
}

/// Arrays from this size on are backed by transparent huge pages where the kernel offers
/// them on request (`madvise` mode, a common default).
const HUGE_FROM_BYTES: usize = 4 << 20;

/// Grows the capacity of `v` to hold `len` elements (at least doubling it, like `Vec`), and
/// asks the kernel to back large arrays with 2 MB pages. A search touches a few thousand
/// random rows of the vector and link arrays; with 4 KB pages nearly every one of them is
/// a TLB miss, and a page walk (two-dimensional under virtualisation) costs more than the
/// inner product itself. The advice is given before the new buffer is first written, so the
/// pages are huge from their first fault.
fn reserve_huge<T: Copy>(v: &mut Vec<T>, len: usize) {
    if len <= v.capacity() {
        return;
    }
    let cap = len.max(2 * v.capacity());
    let bytes = cap * std::mem::size_of::<T>();
    if bytes < HUGE_FROM_BYTES {
        v.reserve_exact(cap - v.len());
        return;
    }
    let mut fresh: Vec<T> = Vec::with_capacity(cap);
    advise_huge(fresh.as_mut_ptr().cast(), bytes);
    fresh.extend_from_slice(v);
    *v = fresh;
}

#[cfg(target_os = "linux")]
fn advise_huge(ptr: *mut u8, bytes: usize) {
    const MADV_HUGEPAGE: i32 = 14;
    const PAGE: usize = 4096;
    unsafe extern "C" {
        fn madvise(addr: *mut std::ffi::c_void, len: usize, advice: i32) -> i32;
    }
    // madvise wants a page-aligned start; the few bytes before it stay on normal pages.
    let start = (ptr as usize).next_multiple_of(PAGE);
    let end = (ptr as usize + bytes) / PAGE * PAGE;
    if end > start {
        // SAFETY: the range lies inside an allocation this process owns; MADV_HUGEPAGE only
        // changes how the kernel backs it, never its contents, and a failure (an old kernel,
        // huge pages disabled) merely leaves normal pages.
        unsafe { madvise(start as *mut std::ffi::c_void, end - start, MADV_HUGEPAGE) };
    }
}

#[cfg(not(target_os = "linux"))]
fn advise_huge(_ptr: *mut u8, _bytes: usize) {}
