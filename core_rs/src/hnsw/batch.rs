//! Inserting many new nodes at once: the searches of a batch run in parallel against the
//! graph as it was before the batch, then the nodes are linked one by one.
//!
//! INSERT spends nearly all its time in SEARCH-LAYER (`ef_construction` candidates on each
//! layer); choosing and writing the links is a small part. The searches only read the graph,
//! so a batch of new nodes can search it from every core at once. What a node would have
//! found among the batch's earlier nodes, had they been inserted before it, is added by
//! scoring it against each of them directly: its candidates on a layer are the search's
//! results plus the earlier batch nodes on that layer, best `ef_construction` kept. The
//! links are then chosen and written in batch order exactly as [`Hnsw::insert`] does, so
//! every invariant (spanning tree, entry point, link caps) holds as after single inserts.
//!
//! A batch is at most an eighth of the nodes already in the graph (and at most
//! [`MAX_BATCH`]), so the graph a batch searches is never far from the one a single insert
//! would see. Plans depend only on the graph and the batch, never on how many threads
//! searched: the resulting graph is the same with one thread as with many.

use rayon::prelude::*;

use super::search::{with_visited, Cand};
use super::Hnsw;
use crate::scan::dot;

/// Most new nodes searched in one batch: bounds the plans held (`ef_construction`
/// candidates per layer and node) and the pairwise scoring within a batch.
pub const MAX_BATCH: usize = 512;
/// Batches smaller than this are inserted one at a time: too small to be worth the threads.
const MIN_BATCH: usize = 16;

/// The neighbourhood search of one new node, done before it is linked.
pub struct Planned {
    id: u32,
    level: usize,
    /// Candidates per layer `0..=level`, best first.
    layers: Vec<Vec<Cand>>,
}

impl Hnsw {
    /// How many new nodes the next batch may hold: an eighth of the graph, at most
    /// [`MAX_BATCH`]; 1 while the graph is small (insert those one at a time).
    pub fn insert_batch_len(&self) -> usize {
        let n = (self.nodes / 8).min(MAX_BATCH);
        if n < MIN_BATCH {
            1
        } else {
            n
        }
    }

    /// Searches, read-only and in parallel, the neighbourhoods of new nodes (ids not in the
    /// index yet, distinct, each with its vector) for [`Hnsw::link_planned`], which must
    /// then link them in the same order with no other change to the index in between.
    pub fn plan_inserts(&self, batch: &[(u32, &[f32])]) -> Vec<Planned> {
        let levels: Vec<usize> = batch.iter().map(|&(id, _)| self.random_level(id)).collect();
        (0..batch.len())
            .into_par_iter()
            .with_min_len(4)
            .map(|k| {
                let (id, v) = batch[k];
                assert_eq!(v.len(), self.dim, "vector length differs from the index dimension");
                debug_assert!(!self.present(id), "planned insert of a present node {id}");
                let level = levels[k];
                let mut layers: Vec<Vec<Cand>> = vec![Vec::new(); level + 1];
                if let Some(entry) = self.entry {
                    let start = Cand { s: dot(v, self.vec(entry)), id: entry };
                    let mut eps = vec![self.descend(v, start, level)];
                    for l in (0..=level.min(self.max_level)).rev() {
                        let w = with_visited(|vis| {
                            vis.reset(self.levels.len());
                            self.search_layer(v, &eps, self.cfg.ef_construction, l, |_| true, vis)
                        });
                        layers[l].clone_from(&w);
                        eps = w;
                    }
                }
                // The batch's earlier nodes: in the graph by the time this one is linked. A
                // full layer only takes those that beat its worst candidate.
                let ef = self.cfg.ef_construction;
                let floor: Vec<Option<Cand>> =
                    layers.iter().map(|w| if w.len() >= ef { w.last().copied() } else { None }).collect();
                for (j, &(mate, mv)) in batch[..k].iter().enumerate() {
                    let c = Cand { s: dot(v, mv), id: mate };
                    for (layer, worst) in layers.iter_mut().zip(&floor).take(level.min(levels[j]) + 1) {
                        if worst.is_none_or(|w| c > w) {
                            layer.push(c);
                        }
                    }
                }
                for layer in &mut layers {
                    layer.sort_unstable_by(|a, b| b.cmp(a));
                    layer.truncate(ef);
                }
                Planned { id, level, layers }
            })
            .collect()
    }

    /// Links one planned node (see [`Hnsw::plan_inserts`]): INSERT with the searches done.
    pub fn link_planned(&mut self, plan: &Planned, v: &[f32]) {
        let Planned { id, level, ref layers } = *plan;
        assert!(!self.present(id), "node {id} was inserted after its plan");
        self.place(id, v, level);
        let Some(entry) = self.entry else {
            self.entry = Some(id);
            self.max_level = level;
            return;
        };
        for l in (0..=level.min(self.max_level)).rev() {
            let w = &layers[l];
            let sel = self.select_protected(w, self.cap(l), l, id, &[]);
            self.set_links(id, l, &sel);
            for &n in &sel {
                self.add_link(n, id, l);
            }
            if l == 0 {
                self.adopt(id, &sel, w);
            }
        }
        if level > self.max_level {
            self.force_link0(id, entry);
            self.entry = Some(id);
            self.max_level = level;
        }
    }

    /// Inserts new nodes (ids not in the index, distinct) in batches of
    /// [`Hnsw::insert_batch_len`], searching each batch in parallel (`Model::reindex` does
    /// the same, handing the lock over between the steps).
    #[cfg(test)]
    pub fn insert_many(&mut self, batch: &[(u32, &[f32])]) {
        let mut rest = batch;
        while !rest.is_empty() {
            let n = self.insert_batch_len().min(rest.len());
            let (now, later) = rest.split_at(n);
            if n == 1 {
                self.upsert(now[0].0, now[0].1);
            } else {
                for (plan, &(_, v)) in self.plan_inserts(now).iter().zip(now) {
                    self.link_planned(plan, v);
                }
            }
            rest = later;
        }
    }
}
