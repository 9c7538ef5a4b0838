//! The model the engine serves: ids, the factorization, trending counts, item attributes, the
//! redelivery window and the HNSW index, behind locks that let queries run while events apply.
//!
//! # Locking
//! `state` (everything but the index) and `index` are separate `RwLock`s, always taken in that
//! order. Writers hold a lock for one small chunk of events or one index update, never for a
//! whole batch, so a query waits at most for one chunk. The index trails the factorization by
//! the items in `dirty` (bounded staleness); queries re-score the index's candidates with the
//! current vectors, so a stale index can only miss an item, never misreport a score.

use std::collections::{HashMap, HashSet};

use parking_lot::{Mutex, RwLock};

use crate::decode::{self, DecodeError, Limits, Record};
use crate::dedup::Dedup;
use crate::hnsw::{Hnsw, HnswConfig};
use crate::ids::{ExtId, IdMap};
use crate::mf::{Mf, MfConfig};
use crate::scan;
use crate::trending::Trending;

/// Largest weight an event may carry; larger ones are almost certainly unit mistakes.
pub const MAX_WEIGHT: f32 = 1e6;
/// Events applied under one write-lock acquisition: small enough that a query waits well
/// under a millisecond behind a writer (an online update costs ~10-20 µs at dim 64).
const APPLY_CHUNK: usize = 32;
/// Catalog size below which the exact scan answers queries: `python -m bench crossover` puts
/// the point where the index (at recall@10 >= 0.95) overtakes the scan at 0.5k-2k items here.
pub const DEFAULT_EXACT_BELOW: usize = 2_000;
/// How many of a user's past items an explanation names.
const MAX_BECAUSE: usize = 3;

#[derive(Clone, Debug)]
pub struct Config {
    pub mf: MfConfig,
    pub hnsw: HnswConfig,
    /// Event type name to weight (confidence) of one such event.
    pub event_weights: Vec<(String, f32)>,
    /// Weight of an event that names neither a type nor a weight.
    pub default_weight: f32,
    pub trending_half_life: f64,
    /// Catalogs smaller than this are searched by the exact scan instead of the index.
    pub exact_below: usize,
    pub dedup_window: usize,
    /// Re-link moved items in the index at the end of every `apply` (the embedded library
    /// default); the engine turns it off and runs `reindex` from its index actor.
    pub auto_reindex: bool,
    pub limits: Limits,
}

#[derive(Clone, Debug, Default)]
pub struct ItemMeta {
    pub category: Option<u32>,
    pub tags: Vec<u32>,
    pub available: bool,
}

/// What `apply` did with a batch of records.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ApplyReport {
    pub applied: usize,
    pub duplicates: usize,
    /// (record index, reason) for every record refused.
    pub rejected: Vec<(usize, String)>,
    /// Users whose vectors or histories changed, each with the id of its newest applied
    /// event (when the producer gave ids), for the publisher's `cause`.
    pub touched_users: Vec<(ExtId, Option<ExtId>)>,
}

/// What [`Model::check_frame`] found in a frame.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameCheck {
    /// Bytes the frame occupies at the start of the buffer.
    pub used: usize,
    pub entries: usize,
    pub rejected: Vec<(usize, String)>,
    pub chunk: Option<String>,
    pub tag: String,
}

#[derive(Clone, Debug, Default)]
pub struct Query {
    pub k: usize,
    pub exclude_seen: bool,
    pub exclude: Vec<ExtId>,
    pub category: Option<String>,
    pub exact: bool,
    pub explain: bool,
    pub ef: Option<usize>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rec {
    pub item: ExtId,
    pub score: f32,
    pub because: Vec<ExtId>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    pub events_applied: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub users: usize,
    pub items: usize,
    pub index_size: usize,
    pub index_stale: usize,
    pub newest_ts: f64,
}

/// Errors a caller can act on; the bindings map each to a Python exception.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelError {
    /// A record was refused; nothing of the batch was applied.
    InvalidEvent { index: usize, reason: String },
    UnknownItem(ExtId),
    Frame(DecodeError),
}

pub(crate) struct State {
    pub(crate) users: IdMap,
    pub(crate) items: IdMap,
    pub(crate) mf: Mf,
    pub(crate) trending: Trending,
    pub(crate) meta: Vec<ItemMeta>,
    pub(crate) categories: IdMap,
    pub(crate) tags: IdMap,
    /// Per user, every item ever interacted with, sorted: exclusion must not depend on the
    /// capped history the factorization keeps.
    pub(crate) seen: Vec<Vec<u32>>,
    pub(crate) dedup: Dedup,
    pub(crate) events_applied: u64,
    pub(crate) duplicates: u64,
    pub(crate) rejected: u64,
    pub(crate) newest_ts: f64,
}

/// Items whose vectors moved since the index last saw them, in first-moved order.
#[derive(Default)]
pub(crate) struct Dirty {
    queue: Vec<u32>,
    flagged: Vec<bool>,
}

impl Dirty {
    pub(crate) fn mark(&mut self, i: u32) {
        let i_us = i as usize;
        if self.flagged.len() <= i_us {
            self.flagged.resize(i_us + 1, false);
        }
        if !self.flagged[i_us] {
            self.flagged[i_us] = true;
            self.queue.push(i);
        }
    }

    pub(crate) fn pending(&self) -> Vec<u32> {
        self.queue.clone()
    }

    fn take(&mut self, budget: usize) -> Vec<u32> {
        let n = budget.min(self.queue.len());
        let taken: Vec<u32> = self.queue.drain(..n).collect();
        for &i in &taken {
            self.flagged[i as usize] = false;
        }
        taken
    }
}

pub struct Model {
    pub(crate) cfg: Config,
    pub(crate) state: RwLock<State>,
    pub(crate) index: RwLock<Hnsw>,
    pub(crate) dirty: Mutex<Dirty>,
}

/// For each decoded record, the index of the frame entry it came from (the decoder drops
/// refused entries from `records`).
fn entry_indices(frame: &decode::Frame) -> Vec<usize> {
    let refused: HashSet<usize> = frame.rejected.iter().map(|r| r.0).collect();
    (0..frame.records.len() + frame.rejected.len()).filter(|e| !refused.contains(e)).collect()
}

fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl State {
    fn new(cfg: &Config) -> Self {
        State {
            users: IdMap::new(),
            items: IdMap::new(),
            mf: Mf::new(cfg.mf.clone()),
            trending: Trending::new(cfg.trending_half_life),
            meta: Vec::new(),
            categories: IdMap::new(),
            tags: IdMap::new(),
            seen: Vec::new(),
            dedup: Dedup::new(cfg.dedup_window),
            events_applied: 0,
            duplicates: 0,
            rejected: 0,
            newest_ts: 0.0,
        }
    }

    fn item_dense(&mut self, item: &ExtId) -> u32 {
        let (i, new) = self.items.get_or_insert(item);
        if new {
            self.meta.push(ItemMeta { available: true, ..ItemMeta::default() });
        }
        i
    }

    fn user_dense(&mut self, user: &ExtId) -> u32 {
        let (u, new) = self.users.get_or_insert(user);
        if new {
            self.seen.push(Vec::new());
        }
        u
    }

    fn has_seen(&self, u: u32, i: u32) -> bool {
        self.seen.get(u as usize).is_some_and(|s| s.binary_search(&i).is_ok())
    }

    /// Whether item `i` may be shown under `q` to user `u` (if known).
    fn admissible(&self, i: u32, u: Option<u32>, q: &Query, exclude: &HashSet<u32>, cat: Option<u32>) -> bool {
        let Some(m) = self.meta.get(i as usize) else { return false };
        if !m.available || exclude.contains(&i) {
            return false;
        }
        if let Some(c) = cat {
            if m.category != Some(c) {
                return false;
            }
        }
        match u {
            Some(u) if q.exclude_seen => !self.has_seen(u, i),
            _ => true,
        }
    }

    fn explain(&self, u: u32, item: u32) -> Vec<ExtId> {
        let q = self.mf.item_vector(item);
        let mut contrib: Vec<(f32, u32)> = self
            .mf
            .user_items(u)
            .into_iter()
            .filter(|&(h, _)| h != item)
            .map(|(h, w)| (w * scan::dot(self.mf.item_vector(h), q), h))
            .filter(|&(c, _)| c > 0.0)
            .collect();
        contrib.sort_by(|a, b| b.0.total_cmp(&a.0));
        contrib
            .into_iter()
            .take(MAX_BECAUSE)
            .filter_map(|(_, h)| self.items.ext(h).cloned())
            .collect()
    }
}

impl Model {
    pub fn new(cfg: Config) -> Self {
        let state = State::new(&cfg);
        let index = Hnsw::new(cfg.mf.dim, cfg.hnsw.clone());
        Model { cfg, state: RwLock::new(state), index: RwLock::new(index), dirty: Mutex::new(Dirty::default()) }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    fn weight_of(&self, kind: Option<&str>, weight: Option<f32>) -> Result<f32, String> {
        let w = match (weight, kind) {
            (Some(w), _) => w,
            (None, Some(k)) => match self.cfg.event_weights.iter().find(|(n, _)| n == k) {
                Some((_, w)) => *w,
                None => return Err(format!("unknown event type {k:?}")),
            },
            (None, None) => self.cfg.default_weight,
        };
        if !w.is_finite() || w <= 0.0 || w > MAX_WEIGHT {
            return Err(format!("weight {w} is not a finite number in (0, {MAX_WEIGHT}]"));
        }
        Ok(w)
    }

    /// Checks every record without changing anything; the first refusal is returned.
    pub fn validate(&self, records: &[Record]) -> Result<(), ModelError> {
        for (index, r) in records.iter().enumerate() {
            if let Record::Interaction { kind, weight, ts, .. } = r {
                self.weight_of(kind.as_deref(), *weight)
                    .map_err(|reason| ModelError::InvalidEvent { index, reason })?;
                if !ts.is_finite() {
                    return Err(ModelError::InvalidEvent { index, reason: "time is not finite".into() });
                }
            }
        }
        Ok(())
    }

    /// Applies records in order. Bad records are refused one by one with a reason and leave
    /// the model as it was; records whose `(producer, id)` is in the redelivery window are
    /// counted as duplicates and skipped.
    pub fn apply(&self, records: &[Record], producer: &str) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut touched = HashMap::new();
        for (chunk_no, chunk) in records.chunks(APPLY_CHUNK).enumerate() {
            let mut moved = Vec::with_capacity(chunk.len());
            {
                let mut st = self.state.write();
                for (j, rec) in chunk.iter().enumerate() {
                    let index = chunk_no * APPLY_CHUNK + j;
                    match self.apply_one(&mut st, rec, producer, &mut moved, &mut touched) {
                        Ok(true) => report.applied += 1,
                        Ok(false) => report.duplicates += 1,
                        Err(reason) => report.rejected.push((index, reason)),
                    }
                }
                st.rejected += report.rejected.len() as u64;
            }
            let mut dirty = self.dirty.lock();
            for i in moved {
                dirty.mark(i);
            }
        }
        {
            let mut st = self.state.write();
            st.events_applied += report.applied as u64;
            st.duplicates += report.duplicates as u64;
        }
        report.touched_users = touched.into_iter().collect();
        if self.cfg.auto_reindex {
            self.reindex(usize::MAX);
        }
        report
    }

    /// Ok(true) applied, Ok(false) duplicate, Err refused.
    fn apply_one(
        &self,
        st: &mut State,
        rec: &Record,
        producer: &str,
        moved: &mut Vec<u32>,
        touched: &mut HashMap<ExtId, Option<ExtId>>,
    ) -> Result<bool, String> {
        match rec {
            Record::Interaction { user, item, kind, weight, id, ts } => {
                let w = self.weight_of(kind.as_deref(), *weight)?;
                if !ts.is_finite() {
                    return Err("time is not finite".into());
                }
                if let Some(id) = id {
                    if !st.dedup.first_time(producer, id) {
                        return Ok(false);
                    }
                }
                let u = st.user_dense(user);
                let i = st.item_dense(item);
                st.newest_ts = st.newest_ts.max(*ts);
                st.mf.update(u, i, w, *ts);
                st.trending.add(i, w, *ts);
                let seen = &mut st.seen[u as usize];
                if let Err(pos) = seen.binary_search(&i) {
                    seen.insert(pos, i);
                }
                moved.push(i);
                touched.insert(user.clone(), id.clone());
                Ok(true)
            }
            Record::ItemUpsert { item, tags, category, available, .. } => {
                self.upsert_item_locked(st, item, tags, category.as_deref(), *available, moved);
                Ok(true)
            }
            Record::EraseUser { user, .. } => {
                Self::erase_user_locked(st, user);
                touched.insert(user.clone(), None);
                Ok(true)
            }
        }
    }

    /// Decodes the first frame in `buf` and checks every record as `apply` would, changing
    /// nothing. Refusals are (entry index, reason).
    pub fn check_frame(&self, buf: &[u8]) -> Result<FrameCheck, DecodeError> {
        let (frame, used) = decode::decode_frame(buf, &self.cfg.limits)?;
        let mut rejected = frame.rejected.clone();
        let entries = entry_indices(&frame);
        for (n, r) in frame.records.iter().enumerate() {
            if let Err(ModelError::InvalidEvent { reason, .. }) = self.validate(std::slice::from_ref(r)) {
                rejected.push((entries[n], reason));
            }
        }
        rejected.sort();
        Ok(FrameCheck {
            used,
            entries: frame.records.len() + frame.rejected.len(),
            rejected,
            chunk: frame.chunk,
            tag: frame.tag,
        })
    }

    /// Decodes one Forward frame (see [`decode::decode_frame`]) and applies its records.
    /// Event ids are de-duplicated per frame tag. Returns the report, the frame's `chunk`
    /// option and the bytes consumed.
    pub fn apply_frame(&self, buf: &[u8]) -> Result<(ApplyReport, Option<String>, usize), DecodeError> {
        let (frame, used) = decode::decode_frame(buf, &self.cfg.limits)?;
        let mut report = self.apply(&frame.records, &frame.tag);
        // apply() numbers records; report entries of the frame, as the decoder does.
        let entries = entry_indices(&frame);
        let mut rejected = frame.rejected;
        rejected.extend(report.rejected.drain(..).map(|(n, reason)| (entries[n], reason)));
        rejected.sort();
        report.rejected = rejected;
        Ok((report, frame.chunk, used))
    }

    fn upsert_item_locked(
        &self,
        st: &mut State,
        item: &ExtId,
        tags: &[String],
        category: Option<&str>,
        available: Option<bool>,
        moved: &mut Vec<u32>,
    ) {
        let i = st.item_dense(item);
        let cat = category.and_then(|c| ExtId::from_str(c).ok()).map(|c| st.categories.get_or_insert(&c).0);
        let tag_ids: Vec<u32> = tags
            .iter()
            .filter_map(|t| ExtId::from_str(t).ok())
            .map(|t| st.tags.get_or_insert(&t).0)
            .collect();
        // Make sure the factorization has a row for the item even before any interaction.
        st.mf.ensure_item(i);
        let m = &mut st.meta[i as usize];
        if category.is_some() {
            m.category = cat;
        }
        if !tags.is_empty() {
            m.tags = tag_ids;
        }
        if let Some(a) = available {
            m.available = a;
        }
        moved.push(i);
    }

    pub fn upsert_item(&self, item: &ExtId, tags: &[String], category: Option<&str>, available: Option<bool>) {
        let mut moved = Vec::new();
        {
            let mut st = self.state.write();
            self.upsert_item_locked(&mut st, item, tags, category, available, &mut moved);
        }
        let mut dirty = self.dirty.lock();
        for i in moved {
            dirty.mark(i);
        }
        drop(dirty);
        if self.cfg.auto_reindex {
            self.reindex(usize::MAX);
        }
    }

    fn erase_user_locked(st: &mut State, user: &ExtId) -> bool {
        let Some(u) = st.users.erase(user) else { return false };
        st.mf.erase_user(u);
        st.seen[u as usize] = Vec::new();
        true
    }

    /// Removes the user's vector, history and seen set. The dense slot stays a tombstone.
    pub fn erase_user(&self, user: &ExtId) -> bool {
        Self::erase_user_locked(&mut self.state.write(), user)
    }

    /// Batch eALS sweeps over the held interactions, then re-links every item.
    pub fn fit(&self, iterations: usize) {
        let n_items;
        {
            let mut st = self.state.write();
            st.mf.fit(iterations);
            n_items = st.items.capacity();
        }
        let mut dirty = self.dirty.lock();
        for i in 0..n_items as u32 {
            dirty.mark(i);
        }
        drop(dirty);
        self.reindex(usize::MAX);
    }

    /// Brings up to `budget` moved items up to date in the index (oldest moves first).
    /// Returns how many are still waiting. Each item takes the index write lock on its own.
    pub fn reindex(&self, budget: usize) -> usize {
        let taken = self.dirty.lock().take(budget);
        let dim = self.cfg.mf.dim;
        let mut vecs = Vec::with_capacity(taken.len() * dim);
        let mut live = Vec::with_capacity(taken.len());
        {
            let st = self.state.read();
            for &i in &taken {
                live.push(st.meta.get(i as usize).is_some_and(|m| m.available));
                vecs.extend_from_slice(st.mf.item_vector(i));
            }
        }
        for (n, &i) in taken.iter().enumerate() {
            let mut index = self.index.write();
            if live[n] {
                index.upsert(i, &vecs[n * dim..(n + 1) * dim]);
            } else {
                index.delete(i);
            }
        }
        self.dirty.lock().queue.len()
    }

    pub fn stale(&self) -> usize {
        self.dirty.lock().queue.len()
    }

    /// The exclude list and category in dense ids; None when the category is one no item has
    /// (nothing can match).
    fn resolve_filters(st: &State, q: &Query) -> Option<(HashSet<u32>, Option<u32>)> {
        let exclude = q.exclude.iter().filter_map(|e| st.items.get(e)).collect();
        let cat = match &q.category {
            None => None,
            Some(c) => Some(ExtId::from_str(c).ok().and_then(|c| st.categories.get(&c))?),
        };
        Some((exclude, cat))
    }

    /// Top-k for `user`. Unknown users (and users without events yet) get the trending list
    /// under the same filters.
    pub fn recommend(&self, user: &ExtId, q: &Query) -> Vec<Rec> {
        let st = self.state.read();
        let u = st.users.get(user);
        self.recommend_locked(&st, u, q)
    }

    /// The trending list (decayed popularity) under the query's filters.
    pub fn trending(&self, q: &Query) -> Vec<Rec> {
        let st = self.state.read();
        self.recommend_locked(&st, None, q)
    }

    fn recommend_locked(&self, st: &State, u: Option<u32>, q: &Query) -> Vec<Rec> {
        let Some((exclude, cat)) = Self::resolve_filters(st, q) else { return Vec::new() };
        let keep = |i: u32| st.admissible(i, u, q, &exclude, cat);
        let hits = match u {
            Some(u) if !st.seen[u as usize].is_empty() => {
                let pu = st.mf.user_vector(u).to_vec();
                self.top_k(st, &pu, q, &keep)
            }
            _ => st.trending.top(q.k, st.newest_ts, &keep),
        };
        hits.into_iter()
            .filter_map(|(i, score)| {
                let item = st.items.ext(i)?.clone();
                let because = match u {
                    Some(u) if q.explain => st.explain(u, i),
                    _ => Vec::new(),
                };
                Some(Rec { item, score, because })
            })
            .collect()
    }

    /// Top-k by inner product with `v`: exact scan for small catalogs or when asked, the index
    /// otherwise, its candidates re-scored with the current vectors.
    fn top_k(&self, st: &State, v: &[f32], q: &Query, keep: &dyn Fn(u32) -> bool) -> Vec<(u32, f32)> {
        let n_items = st.items.capacity();
        if q.exact || n_items < self.cfg.exact_below {
            return scan::exact_top_k(st.mf.item_matrix(), self.cfg.mf.dim, v, q.k, keep);
        }
        let ef = q.ef.unwrap_or(self.cfg.hnsw.ef_search).max(q.k);
        let mut hits = self.index.read().search(v, q.k, ef, keep);
        for h in &mut hits {
            h.1 = scan::dot(st.mf.item_vector(h.0), v);
        }
        hits.sort_by(|a, b| b.1.total_cmp(&a.1));
        hits
    }

    /// Items most similar to `item` by cosine of their vectors (candidates from the index).
    pub fn similar(&self, item: &ExtId, k: usize) -> Result<Vec<(ExtId, f32)>, ModelError> {
        let st = self.state.read();
        let i = st.items.get(item).ok_or_else(|| ModelError::UnknownItem(item.clone()))?;
        let v = st.mf.item_vector(i).to_vec();
        let norm = scan::dot(&v, &v).sqrt().max(f32::MIN_POSITIVE);
        let keep = |j: u32| j != i && st.meta.get(j as usize).is_some_and(|m| m.available);
        // Inner product favours long (popular) vectors; take a wider pool, rank by cosine.
        let pool = Query { k: (4 * k).max(50), ..Query::default() };
        let mut hits = self.top_k(&st, &v, &pool, &keep);
        for h in &mut hits {
            let w = st.mf.item_vector(h.0);
            h.1 /= norm * scan::dot(w, w).sqrt().max(f32::MIN_POSITIVE);
        }
        hits.sort_by(|a, b| b.1.total_cmp(&a.1));
        hits.truncate(k);
        Ok(hits.into_iter().filter_map(|(j, s)| Some((st.items.ext(j)?.clone(), s))).collect())
    }

    /// The user's vector, or None for unknown users.
    pub fn user_vector(&self, user: &ExtId) -> Option<Vec<f32>> {
        let st = self.state.read();
        st.users.get(user).map(|u| st.mf.user_vector(u).to_vec())
    }

    pub fn item_vector(&self, item: &ExtId) -> Option<Vec<f32>> {
        let st = self.state.read();
        st.items.get(item).map(|i| st.mf.item_vector(i).to_vec())
    }

    /// The user's seen items (all ever interacted with).
    pub fn seen(&self, user: &ExtId) -> Vec<ExtId> {
        let st = self.state.read();
        let Some(u) = st.users.get(user) else { return Vec::new() };
        st.seen[u as usize].iter().filter_map(|&i| st.items.ext(i).cloned()).collect()
    }

    pub fn stats(&self) -> Stats {
        let st = self.state.read();
        let index_size = self.index.read().len();
        Stats {
            events_applied: st.events_applied,
            duplicates: st.duplicates,
            rejected: st.rejected,
            users: st.users.len(),
            items: st.items.len(),
            index_size,
            index_stale: self.stale(),
            newest_ts: st.newest_ts,
        }
    }

    /// The time `ts` an event gets when its producer gave none.
    pub fn default_ts() -> f64 {
        now_secs()
    }
}
