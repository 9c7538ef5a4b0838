//! The model the engine serves: ids, the factorization, trending counts, item attributes, the
//! redelivery window and the HNSW index, behind locks that let queries run while events apply.
//!
//! # Locking
//! `state` (everything but the index) and `index` are separate `RwLock`s, always taken in that
//! order. Writers hold a lock for one small chunk of events or one index update, never for a
//! whole batch, so a query waits at most for one chunk. The index trails the factorization by
//! the items in `dirty` (bounded staleness); queries re-score the index's candidates with the
//! current vectors, so a stale index can only miss an item, never misreport a score.
//!
//! # From candidates to a list
//! [`Model::recommend`] retrieves a candidate pool (the index or the exact scan for the
//! user's vector, the trending list for users without one), then:
//! 1. **cold-start blend** for users with few events: personal and trending scores, each
//!    min-max normalised over a pool of both, mixed as `(1 − β)·personal + β·trending` with
//!    `β = n0 / (n0 + events)` (`n0` = [`Config::cold_start_events`]), so a list moves
//!    smoothly from popular to personal as the user acts;
//! 2. **diversity** by maximal marginal relevance ([`rerank::mmr`]) when `λ < 1`;
//! 3. **exploration**: a share of the slots goes to items with little feedback, sampled per
//!    (user, hour of model time) with weights from their (attribute-based) score and flagged
//!    [`Rec::explore`].
//!
//! Filters (seen, exclude list, category include/exclude, availability) hold for every step.
//! New items get a vector from their attributes ([`crate::coldstart`]).

use std::collections::{HashMap, HashSet};

use parking_lot::{Mutex, RwLock};

use crate::coldstart::{AttrVectors, SortedIds};
use crate::decode::{self, DecodeError, Limits, Record};
use crate::dedup::Dedup;
use crate::hnsw::{Hnsw, HnswConfig};
use crate::ids::{ExtId, IdMap};
use crate::mf::{Mf, MfConfig};
use crate::neighbours::{self, Neighbours};
use crate::rerank;
use crate::rng::Rng;
use crate::scan;
use crate::trending::Trending;

/// Largest weight an event may carry; larger ones are almost certainly unit mistakes.
pub const MAX_WEIGHT: f32 = 1e6;
/// Events applied under one write-lock acquisition: small enough that a query waits well
/// under a millisecond behind a writer (an online update costs ~10-20 µs at dim 64).
const APPLY_CHUNK: usize = 32;
/// Catalog size below which the exact scan answers queries: `python -m bench crossover` puts
/// the point where the index (at recall@10 >= 0.95) overtakes the scan at 1k-2k items here.
pub const DEFAULT_EXACT_BELOW: usize = 2_000;
/// How many of a user's past items an explanation names.
const MAX_BECAUSE: usize = 3;
/// Candidate pool per list slot for the re-ranking steps (blend, MMR): enough for MMR to
/// find items unlike the top ones without scoring far down the list.
pub const POOL_FACTOR: usize = 4;
/// Below this β the cold-start blend is skipped: it could move an item by at most 1 % of the
/// score range, not worth a pass over the trending counts.
const MIN_BLEND: f32 = 0.01;
/// Fresh items scored per exploration draw: bounds the cost when most of a catalog is fresh.
const EXPLORE_SAMPLE: usize = 256;
/// Every fresh item keeps this much sampling weight over its normalised score, so an item the
/// user's vector rates lowest can still be explored.
const EXPLORE_FLOOR: f64 = 0.1;
/// Exploration picks stay the same for a user within one period of model time (seconds), so
/// a list does not reshuffle on every request, and change as time moves on.
pub const EXPLORE_PERIOD: f64 = 3600.0;
/// Cold items re-derived from their attributes per `reindex` call (bounds its write lock).
const COLD_REFRESH_BUDGET: usize = 256;
/// A cold item's vector is replaced only when its attribute mean moved by more than this
/// fraction of its length: re-linking in the index costs far more than the move.
const COLD_REFRESH_TOLERANCE: f32 = 0.01;

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
    /// `n0` of the cold-start blend `β = n0 / (n0 + events)`; 0 turns it off.
    pub cold_start_events: f32,
    /// Default MMR `λ` in [0, 1]: 1 ranks by relevance alone (off), lower trades relevance
    /// for variety.
    pub diversity: f32,
    /// Default share of list slots in [0, 1] given to exploration.
    pub exploration: f32,
    /// Items with fewer events than this are fresh: candidates for exploration slots.
    pub explore_max_events: u32,
    /// Share `γ` of the item-neighbourhood term in a user's personal score:
    /// `(1 − γ)·factorization + γ·neighbourhood`, each min-max normalised over the candidate
    /// pool (see [`crate::neighbours`]); 0 turns the term off.
    pub neighbour_weight: f32,
    /// A user's most recent items that a new item is paired with, and that score its list.
    pub neighbour_window: usize,
    /// Neighbours kept per item.
    pub neighbour_cap: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            mf: MfConfig::default(),
            hnsw: HnswConfig::default(),
            event_weights: Vec::new(),
            default_weight: 1.0,
            trending_half_life: 86_400.0,
            exact_below: DEFAULT_EXACT_BELOW,
            dedup_window: 1_000_000,
            auto_reindex: true,
            limits: Limits::default(),
            cold_start_events: 5.0,
            diversity: 1.0,
            exploration: 0.0,
            explore_max_events: 5,
            neighbour_weight: 0.5,
            neighbour_window: neighbours::DEFAULT_WINDOW,
            neighbour_cap: neighbours::DEFAULT_CAP,
        }
    }
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
    /// Categories whose items are never shown.
    pub exclude_category: Vec<String>,
    /// MMR `λ` for this request; None: [`Config::diversity`].
    pub diversity: Option<f32>,
    /// Exploration share for this request; None: [`Config::exploration`].
    pub exploration: Option<f32>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Rec {
    pub item: ExtId,
    pub score: f32,
    pub because: Vec<ExtId>,
    /// The item fills an exploration slot (little feedback yet), not a relevance slot.
    pub explore: bool,
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
    InvalidEvent {
        index: usize,
        reason: String,
    },
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
    /// Attribute vectors for cold items; derived state, rebuilt on load.
    pub(crate) attrs: AttrVectors,
    /// Items with attributes and no feedback: their vectors come from `attrs`. Derived.
    pub(crate) cold: SortedIds,
    /// Round-robin position of the cold-item refresh, and the `attrs` version its pass started at.
    pub(crate) cold_cursor: usize,
    pub(crate) cold_pass_version: u64,
    /// Items with fewer than `explore_max_events` events: exploration candidates. Derived.
    pub(crate) fresh: SortedIds,
    pub(crate) dedup: Dedup,
    pub(crate) events_applied: u64,
    pub(crate) duplicates: u64,
    pub(crate) rejected: u64,
    pub(crate) newest_ts: f64,
    /// Item-to-item co-occurrence; derived from the held histories, rebuilt on load.
    pub(crate) neighbours: Neighbours,
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

/// A query's filters in dense ids.
struct Filters {
    exclude: HashSet<u32>,
    category: Option<u32>,
    exclude_categories: Vec<u32>,
}

/// FNV-1a of an external id: a salt for per-user sampling that is stable across runs,
/// platforms and dense-id assignment (unlike `std`'s hasher, whose algorithm may change).
fn id_salt(id: &ExtId) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    match id {
        ExtId::Int(i) => {
            eat(b"i");
            eat(&i.to_le_bytes());
        }
        ExtId::Str(s) => {
            eat(b"s");
            eat(s.as_bytes());
        }
    }
    h
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
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
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
            attrs: AttrVectors::new(cfg.mf.dim),
            cold: SortedIds::default(),
            cold_cursor: 0,
            cold_pass_version: 0,
            fresh: SortedIds::default(),
            dedup: Dedup::new(cfg.dedup_window),
            events_applied: 0,
            duplicates: 0,
            rejected: 0,
            newest_ts: 0.0,
            neighbours: Neighbours::new(cfg.neighbour_cap, cfg.neighbour_window),
        }
    }

    fn item_dense(&mut self, item: &ExtId, fresh_below: u32) -> u32 {
        let (i, new) = self.items.get_or_insert(item);
        if new {
            self.meta.push(ItemMeta { available: true, ..ItemMeta::default() });
            if fresh_below > 0 {
                self.fresh.insert(i);
            }
        }
        i
    }

    /// Puts item `i` in or out of the fresh set after its event count changed.
    fn update_fresh(&mut self, i: u32, fresh_below: u32) {
        if self.mf.item_count(i) < fresh_below as f64 {
            self.fresh.insert(i);
        } else {
            self.fresh.remove(i);
        }
    }

    /// Re-derives the cold-start state of item `i` after its feedback or attributes changed:
    /// with feedback it is counted in its attributes' vectors; without, it is cold and (when
    /// its attributes have members) takes their mean as its vector. `old_meta` is what the
    /// item was counted with, if its attributes just changed. Returns whether `q_i` moved.
    fn settle_item(&mut self, i: u32, old_meta: Option<&ItemMeta>) -> bool {
        let meta = self.meta[i as usize].clone();
        let has_attrs = meta.category.is_some() || !meta.tags.is_empty();
        if self.mf.item_count(i) > 0.0 {
            self.cold.remove(i);
            let v = self.mf.item_vector(i).to_vec();
            if let Some(old) = old_meta {
                self.attrs.leave(i, old, &v);
            }
            self.attrs.join(i, &meta, &v);
            return false;
        }
        if self.attrs.is_member(i) {
            let v = self.mf.item_vector(i).to_vec();
            self.attrs.leave(i, old_meta.unwrap_or(&meta), &v);
        }
        if !has_attrs {
            self.cold.remove(i);
            return false;
        }
        self.cold.insert(i);
        match self.attrs.vector_for(&meta) {
            Some(v) => {
                self.mf.set_item_vector(i, &v);
                true
            }
            None => false,
        }
    }

    /// Recomputes the derived cold-start and exploration state from the factorization and the
    /// item attributes (after load and after a batch fit, which move every vector).
    pub(crate) fn rebuild_derived(&mut self, cfg: &Config) -> Vec<u32> {
        let n = self.meta.len() as u32;
        if cfg.neighbour_weight > 0.0 && self.neighbours.is_empty() {
            // Only after a load: online updates keep the counts otherwise.
            let histories: Vec<Vec<u32>> =
                (0..self.seen.len() as u32).map(|u| self.mf.recent_items(u, usize::MAX)).collect();
            self.neighbours.rebuild(histories.iter().map(Vec::as_slice));
        }
        let mut attrs = AttrVectors::new(cfg.mf.dim);
        attrs.rebuild(
            (0..n)
                .filter(|&i| self.mf.item_count(i) > 0.0)
                .map(|i| (i, &self.meta[i as usize], self.mf.item_vector(i), true)),
        );
        self.attrs = attrs;
        self.cold = SortedIds::default();
        self.fresh = SortedIds::default();
        self.cold_cursor = 0;
        self.cold_pass_version = self.attrs.version();
        let mut moved = Vec::new();
        for i in 0..n {
            if self.items.ext(i).is_none() {
                continue;
            }
            self.update_fresh(i, cfg.explore_max_events);
            let m = &self.meta[i as usize];
            if self.mf.item_count(i) == 0.0 && (m.category.is_some() || !m.tags.is_empty()) {
                self.cold.insert(i);
            }
        }
        moved.extend(
            self.cold
                .as_slice()
                .to_vec()
                .into_iter()
                .filter(|&i| self.refresh_cold_item(i, COLD_REFRESH_TOLERANCE)),
        );
        moved
    }

    /// Sets cold item `i` to its attributes' mean if that moved by more than `tolerance` of
    /// its length; returns whether it did.
    fn refresh_cold_item(&mut self, i: u32, tolerance: f32) -> bool {
        let Some(v) = self.attrs.vector_for(&self.meta[i as usize]) else { return false };
        let cur = self.mf.item_vector(i);
        let diff: f32 = v.iter().zip(cur).map(|(a, b)| (a - b) * (a - b)).sum::<f32>().sqrt();
        let len = scan::dot(&v, &v).sqrt();
        if cur.len() == v.len() && diff <= tolerance * len {
            return false;
        }
        self.mf.set_item_vector(i, &v);
        true
    }

    /// Moves up to `budget` cold items to their attributes' current mean, round robin; a
    /// pass starts only when the attribute vectors changed since the last one.
    fn refresh_cold(&mut self, budget: usize) -> Vec<u32> {
        let mut moved = Vec::new();
        if self.cold_cursor == 0 {
            if self.attrs.version() == self.cold_pass_version {
                return moved;
            }
            self.cold_pass_version = self.attrs.version();
        }
        let end = (self.cold_cursor + budget).min(self.cold.len());
        let ids: Vec<u32> = self.cold.as_slice()[self.cold_cursor.min(end)..end].to_vec();
        for i in ids {
            if self.refresh_cold_item(i, COLD_REFRESH_TOLERANCE) {
                moved.push(i);
            }
        }
        self.cold_cursor = if end >= self.cold.len() { 0 } else { end };
        moved
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
    fn admissible(&self, i: u32, u: Option<u32>, q: &Query, f: &Filters) -> bool {
        let Some(m) = self.meta.get(i as usize) else { return false };
        if !m.available || f.exclude.contains(&i) {
            return false;
        }
        if let Some(c) = f.category {
            if m.category != Some(c) {
                return false;
            }
        }
        if m.category.is_some_and(|c| f.exclude_categories.contains(&c)) {
            return false;
        }
        match u {
            Some(u) if q.exclude_seen => !self.has_seen(u, i),
            _ => true,
        }
    }

    /// The user's items that support `item`'s score most: each held item's share of the
    /// factorization term (`w_uh · q_h·q_i`, over the positive ones) and, with the
    /// neighbourhood term on, its share of that term (`sim(h, i)` over the recent window),
    /// mixed with the same `γ` as the score.
    fn explain(&self, u: u32, item: u32, cfg: &Config) -> Vec<ExtId> {
        let q = self.mf.item_vector(item);
        let mut contrib: Vec<(f32, u32)> = self
            .mf
            .user_items(u)
            .into_iter()
            .filter(|&(h, _)| h != item)
            .map(|(h, w)| (w * scan::dot(self.mf.item_vector(h), q), h))
            .filter(|&(c, _)| c > 0.0)
            .collect();
        let gamma = cfg.neighbour_weight.clamp(0.0, 1.0);
        if gamma > 0.0 {
            let total: f32 = contrib.iter().map(|c| c.0).sum();
            let mut share: HashMap<u32, f32> =
                contrib.iter().map(|&(c, h)| (h, (1.0 - gamma) * c / total.max(f32::MIN_POSITIVE))).collect();
            let recent = self.mf.recent_items(u, cfg.neighbour_window);
            let sims: Vec<(u32, f32)> = recent
                .iter()
                .filter(|&&h| h != item)
                .map(|&h| (h, self.neighbours.similarity(h, item)))
                .collect();
            let near: f32 = sims.iter().map(|s| s.1).sum();
            if near > 0.0 {
                for (h, s) in sims {
                    *share.entry(h).or_insert(0.0) += gamma * s / near;
                }
            }
            contrib = share.into_iter().map(|(h, c)| (c, h)).filter(|&(c, _)| c > 0.0).collect();
        }
        contrib.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        contrib.into_iter().take(MAX_BECAUSE).filter_map(|(_, h)| self.items.ext(h).cloned()).collect()
    }
}

impl Model {
    pub fn new(cfg: Config) -> Self {
        let state = State::new(&cfg);
        let index = Hnsw::new(cfg.mf.dim, cfg.hnsw.clone());
        Model {
            cfg,
            state: RwLock::new(state),
            index: RwLock::new(index),
            dirty: Mutex::new(Dirty::default()),
        }
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
                let i = st.item_dense(item, self.cfg.explore_max_events);
                st.newest_ts = st.newest_ts.max(*ts);
                let was_member = st.attrs.is_member(i);
                // Only items with attributes feed attribute vectors: skip the copy otherwise.
                let m = &st.meta[i as usize];
                let tracked = was_member && (m.category.is_some() || !m.tags.is_empty());
                let old = if tracked { st.mf.item_vector(i).to_vec() } else { Vec::new() };
                if self.cfg.neighbour_weight > 0.0 && !st.has_seen(u, i) {
                    let recent = st.mf.recent_items(u, self.cfg.neighbour_window);
                    st.neighbours.add(i, &recent);
                }
                st.mf.update(u, i, w, *ts);
                st.trending.add(i, w, *ts);
                if tracked {
                    let new = st.mf.item_vector(i).to_vec();
                    let State { attrs, meta, .. } = &mut *st;
                    attrs.moved(i, &meta[i as usize], &old, &new);
                } else if !was_member {
                    st.settle_item(i, None);
                }
                st.update_fresh(i, self.cfg.explore_max_events);
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
                moved.extend(self.erase_user_locked(st, user).unwrap_or_default());
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
        let i = st.item_dense(item, self.cfg.explore_max_events);
        let cat = category.and_then(|c| ExtId::from_str(c).ok()).map(|c| st.categories.get_or_insert(&c).0);
        let tag_ids: Vec<u32> = tags
            .iter()
            .filter_map(|t| ExtId::from_str(t).ok())
            .map(|t| st.tags.get_or_insert(&t).0)
            .collect();
        // Make sure the factorization has a row for the item even before any interaction.
        st.mf.ensure_item(i);
        let old_meta = st.meta[i as usize].clone();
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
        st.settle_item(i, Some(&old_meta));
        moved.push(i);
    }

    pub fn upsert_item(
        &self,
        item: &ExtId,
        tags: &[String],
        category: Option<&str>,
        available: Option<bool>,
    ) {
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

    /// Items left without feedback by the erasure lose their learned vectors (they were
    /// learned from the erased user) and fall back to their attributes: those are returned.
    fn erase_user_locked(&self, st: &mut State, user: &ExtId) -> Option<Vec<u32>> {
        let u = st.users.erase(user)?;
        if self.cfg.neighbour_weight > 0.0 {
            let history = st.mf.recent_items(u, usize::MAX);
            st.neighbours.remove_user(&history);
        }
        st.mf.erase_user(u);
        let seen = std::mem::take(&mut st.seen[u as usize]);
        let mut moved = Vec::new();
        for i in seen {
            st.update_fresh(i, self.cfg.explore_max_events);
            if st.mf.item_count(i) == 0.0 && st.settle_item(i, None) {
                moved.push(i);
            }
        }
        Some(moved)
    }

    /// Removes the user's vector, history and seen set. The dense slot stays a tombstone.
    pub fn erase_user(&self, user: &ExtId) -> bool {
        let Some(moved) = self.erase_user_locked(&mut self.state.write(), user) else { return false };
        let mut dirty = self.dirty.lock();
        for i in moved {
            dirty.mark(i);
        }
        true
    }

    /// Batch eALS sweeps over the held interactions, then re-links every item.
    pub fn fit(&self, iterations: usize) {
        let n_items;
        {
            let mut st = self.state.write();
            st.mf.fit(iterations);
            // The sweeps moved every vector (and solved cold items towards zero).
            st.rebuild_derived(&self.cfg);
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
        // Checked under the read lock first: most calls have nothing to refresh.
        let quiet = {
            let st = self.state.read();
            st.cold.is_empty() || (st.cold_cursor == 0 && st.attrs.version() == st.cold_pass_version)
        };
        let refreshed = if quiet { Vec::new() } else { self.state.write().refresh_cold(COLD_REFRESH_BUDGET) };
        if !refreshed.is_empty() {
            let mut dirty = self.dirty.lock();
            for i in refreshed {
                dirty.mark(i);
            }
        }
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

    /// The query's filters in dense ids; None when the category is one no item has (nothing
    /// can match). Excluded categories no item has are ignored.
    fn resolve_filters(st: &State, q: &Query) -> Option<Filters> {
        let exclude = q.exclude.iter().filter_map(|e| st.items.get(e)).collect();
        let category = match &q.category {
            None => None,
            Some(c) => Some(ExtId::from_str(c).ok().and_then(|c| st.categories.get(&c))?),
        };
        let exclude_categories = q
            .exclude_category
            .iter()
            .filter_map(|c| ExtId::from_str(c).ok().and_then(|c| st.categories.get(&c)))
            .collect();
        Some(Filters { exclude, category, exclude_categories })
    }

    /// Top-k for `user`: see the module docs for the steps. Unknown users (and users without
    /// events yet) get the trending list under the same filters.
    pub fn recommend(&self, user: &ExtId, q: &Query) -> Vec<Rec> {
        let st = self.state.read();
        let u = st.users.get(user);
        self.recommend_locked(&st, u, id_salt(user), q)
    }

    /// The trending list (decayed popularity) under the query's filters, without re-ranking
    /// or exploration.
    pub fn trending(&self, q: &Query) -> Vec<Rec> {
        let st = self.state.read();
        let plain = Query {
            k: q.k,
            exclude_seen: q.exclude_seen,
            exclude: q.exclude.clone(),
            category: q.category.clone(),
            exclude_category: q.exclude_category.clone(),
            diversity: Some(1.0),
            exploration: Some(0.0),
            ..Query::default()
        };
        self.recommend_locked(&st, None, 0, &plain)
    }

    /// The cold-start weight `β = n0 / (n0 + events)` of trending in user `u`'s list.
    pub fn cold_start_beta(&self, events: f64) -> f32 {
        let n0 = self.cfg.cold_start_events.max(0.0) as f64;
        if n0 == 0.0 {
            return 0.0;
        }
        (n0 / (n0 + events.max(0.0))) as f32
    }

    fn recommend_locked(&self, st: &State, u: Option<u32>, salt: u64, q: &Query) -> Vec<Rec> {
        let Some(filters) = Self::resolve_filters(st, q) else { return Vec::new() };
        let keep = |i: u32| st.admissible(i, u, q, &filters);
        let lambda = q.diversity.unwrap_or(self.cfg.diversity).clamp(0.0, 1.0);
        let share = q.exploration.unwrap_or(self.cfg.exploration).clamp(0.0, 1.0);
        let n_explore = ((share * q.k as f32).round() as usize).min(q.k);
        // A user with events has a personal vector; others are served from trending alone.
        let pu: Option<&[f32]> = u.filter(|&u| !st.seen[u as usize].is_empty()).map(|u| st.mf.user_vector(u));

        let explore =
            if n_explore > 0 { self.explore_picks(st, pu, salt, n_explore, &keep) } else { Vec::new() };
        let picked: HashSet<u32> = explore.iter().map(|e| e.0).collect();
        let keep_main = |i: u32| !picked.contains(&i) && keep(i);
        let k_main = q.k - explore.len();
        let rerank = lambda < 1.0;
        let pool = if rerank { k_main * POOL_FACTOR } else { k_main };
        let now = st.newest_ts;

        let mut cands = match (u, pu) {
            (Some(u), Some(pu)) => {
                let beta = self.cold_start_beta(st.mf.user_count(u));
                let gamma = self.cfg.neighbour_weight.clamp(0.0, 1.0);
                if (beta >= MIN_BLEND || gamma > 0.0) && k_main > 0 {
                    // Candidates from every side, each scored on every side.
                    let m = k_main * POOL_FACTOR;
                    let sub = Query { k: m, exact: q.exact, ef: q.ef, ..Query::default() };
                    let mut ids: Vec<u32> =
                        self.top_k(st, pu, &sub, &keep_main).into_iter().map(|h| h.0).collect();
                    let mut known: HashSet<u32> = ids.iter().copied().collect();
                    let near = if gamma > 0.0 {
                        let recent = st.mf.recent_items(u, self.cfg.neighbour_window);
                        let near = st.neighbours.scores(&recent);
                        let mut top: Vec<(u32, f32)> =
                            near.iter().map(|(&i, &s)| (i, s)).filter(|&(i, _)| keep_main(i)).collect();
                        rerank::sort_desc(&mut top);
                        ids.extend(top.into_iter().take(m).map(|h| h.0).filter(|&i| known.insert(i)));
                        near
                    } else {
                        HashMap::new()
                    };
                    if beta >= MIN_BLEND {
                        ids.extend(
                            st.trending
                                .top(m, now, &keep_main)
                                .into_iter()
                                .map(|h| h.0)
                                .filter(|&i| known.insert(i)),
                        );
                    }
                    let mut personal: Vec<f32> =
                        ids.iter().map(|&i| scan::dot(pu, st.mf.item_vector(i))).collect();
                    if gamma > 0.0 {
                        let hood: Vec<f32> =
                            ids.iter().map(|i| near.get(i).copied().unwrap_or(0.0)).collect();
                        personal = rerank::blend(&personal, &hood, gamma);
                    }
                    let scores = if beta >= MIN_BLEND {
                        let trend: Vec<f32> = ids.iter().map(|&i| st.trending.score(i, now) as f32).collect();
                        rerank::blend(&personal, &trend, beta)
                    } else {
                        personal
                    };
                    let mut hits: Vec<(u32, f32)> = ids.into_iter().zip(scores).collect();
                    rerank::sort_desc(&mut hits);
                    hits.truncate(pool);
                    hits
                } else {
                    let sub = Query { k: pool, exact: q.exact, ef: q.ef, ..Query::default() };
                    self.top_k(st, pu, &sub, &keep_main)
                }
            }
            _ => st.trending.top(pool, now, &keep_main),
        };
        if rerank {
            cands = rerank::mmr(&cands, |i| st.mf.item_vector(i), k_main, lambda);
        } else {
            cands.truncate(k_main);
        }

        // Exploration slots spread over the list; the main list fills the rest in order.
        let slots = rerank::explore_positions(q.k, explore.len());
        let mut main = cands.into_iter();
        let mut extra = explore.into_iter();
        let mut out: Vec<(u32, f32, bool)> = Vec::with_capacity(q.k);
        for pos in 0..q.k {
            let next = if slots.contains(&pos) {
                extra.next().map(|(i, s)| (i, s, true))
            } else {
                main.next().map(|(i, s)| (i, s, false))
            };
            match next {
                Some(x) => out.push(x),
                None => break,
            }
        }
        out.extend(extra.map(|(i, s)| (i, s, true)));
        out.into_iter()
            .filter_map(|(i, score, explore)| {
                let item = st.items.ext(i)?.clone();
                let because = match u {
                    Some(u) if q.explain => st.explain(u, i, &self.cfg),
                    _ => Vec::new(),
                };
                Some(Rec { item, score, because, explore })
            })
            .collect()
    }

    /// Up to `n` fresh items (fewer than `explore_max_events` events) for exploration slots:
    /// a weighted sample without replacement, the weight being the item's score for the user
    /// (attribute-based for items without feedback) min-max normalised plus a floor. The draw
    /// is seeded by (model seed, user, period of model time), so it is reproducible and
    /// stable within a period. When the fresh set is large, a uniform subset of
    /// `EXPLORE_SAMPLE` is scored. Returned as (item, score) in draw order.
    fn explore_picks(
        &self,
        st: &State,
        pu: Option<&[f32]>,
        salt: u64,
        n: usize,
        keep: &dyn Fn(u32) -> bool,
    ) -> Vec<(u32, f32)> {
        let fresh = st.fresh.as_slice();
        if fresh.is_empty() {
            return Vec::new();
        }
        let bucket =
            if st.newest_ts.is_finite() { (st.newest_ts / EXPLORE_PERIOD).floor() as i64 } else { 0 };
        let mut rng = Rng::new(
            self.cfg.mf.seed ^ salt.rotate_left(29) ^ (bucket as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let mut pool: Vec<u32> = if fresh.len() <= EXPLORE_SAMPLE {
            fresh.to_vec()
        } else {
            let mut p: Vec<u32> =
                (0..EXPLORE_SAMPLE).map(|_| fresh[rng.below(fresh.len() as u64) as usize]).collect();
            p.sort_unstable();
            p.dedup();
            p
        };
        pool.retain(|&i| keep(i));
        let now = st.newest_ts;
        let scores: Vec<f32> = pool
            .iter()
            .map(|&i| match pu {
                Some(pu) => scan::dot(pu, st.mf.item_vector(i)),
                None => st.trending.score(i, now) as f32,
            })
            .collect();
        let weights = rerank::minmax(&scores);
        let cands: Vec<(u32, f64)> =
            pool.iter().zip(&weights).map(|(&i, &w)| (i, w as f64 + EXPLORE_FLOOR)).collect();
        let score_of: HashMap<u32, f32> = pool.iter().copied().zip(scores).collect();
        rerank::weighted_sample(&cands, n, &mut rng).into_iter().map(|i| (i, score_of[&i])).collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    const T0: f64 = 1_700_000_000.0;

    fn cfg() -> Config {
        let mut c = Config::default();
        c.mf.dim = 8;
        c.mf.seed = 7;
        c.hnsw.seed = 7;
        c
    }

    fn ev(user: i64, item: i64, ts: f64) -> Record {
        Record::Interaction {
            user: ExtId::Int(user),
            item: ExtId::Int(item),
            kind: None,
            weight: Some(1.0),
            id: None,
            ts,
        }
    }

    /// Two planted groups over 40 items, categories "even"/"odd", tag "all" on every item.
    fn planted(c: Config) -> Model {
        let m = Model::new(c);
        for i in 0..40i64 {
            let cat = if i % 2 == 0 { "even" } else { "odd" };
            m.upsert_item(&ExtId::Int(i), &["all".to_string()], Some(cat), None);
        }
        let mut recs = Vec::new();
        for u in 0..60i64 {
            for j in 0..8i64 {
                recs.push(ev(u, (u % 2 + 2 * ((u * 7 + j * 3) % 20)) % 40, T0));
            }
        }
        m.apply(&recs, "");
        m
    }

    fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + x.abs()))
    }

    #[test]
    fn beta_follows_n0_over_n0_plus_events() {
        let m = Model::new(cfg());
        assert_eq!(m.cold_start_beta(0.0), 1.0);
        assert!((m.cold_start_beta(5.0) - 0.5).abs() < 1e-6);
        assert!((m.cold_start_beta(95.0) - 0.05).abs() < 1e-6);
        let off = Model::new(Config { cold_start_events: 0.0, ..cfg() });
        assert_eq!(off.cold_start_beta(1.0), 0.0);
    }

    /// The running attribute sums follow every online move of member vectors: they agree with
    /// sums rebuilt from scratch after a stream of events.
    #[test]
    fn attribute_sums_track_online_updates() {
        let m = planted(cfg());
        m.apply(&(0..200).map(|n| ev(n % 60, (n * 13) % 40, T0 + 1.0)).collect::<Vec<_>>(), "");
        let st = m.state.read();
        let mut rebuilt = AttrVectors::new(8);
        rebuilt.rebuild(
            (0..40u32).map(|i| (i, &st.meta[i as usize], st.mf.item_vector(i), st.mf.item_count(i) > 0.0)),
        );
        for i in 0..40u32 {
            let meta = &st.meta[i as usize];
            let (a, b) = (st.attrs.vector_for(meta).unwrap(), rebuilt.vector_for(meta).unwrap());
            assert!(close(&a, &b, 1e-4), "{a:?} vs {b:?}");
        }
    }

    /// A cold item takes its attributes' mean; erasing the only user who touched an item
    /// returns it to that mean (its learned vector came from the erased user).
    #[test]
    fn cold_items_take_attribute_vectors_and_return_to_them_on_erasure() {
        let m = planted(cfg());
        m.upsert_item(&ExtId::Int(100), &[], Some("even"), None);
        let expect = {
            let st = m.state.read();
            st.attrs.vector_for(&st.meta[st.items.get(&ExtId::Int(100)).unwrap() as usize]).unwrap()
        };
        assert!(close(&m.item_vector(&ExtId::Int(100)).unwrap(), &expect, 1e-6));
        m.apply(&[ev(999, 100, T0 + 1.0)], "");
        let learned = m.item_vector(&ExtId::Int(100)).unwrap();
        assert!(!close(&learned, &expect, 1e-3));
        assert!(m.erase_user(&ExtId::Int(999)));
        let st = m.state.read();
        let i = st.items.get(&ExtId::Int(100)).unwrap();
        assert!(st.cold.contains(i) && !st.attrs.is_member(i));
        let now = st.attrs.vector_for(&st.meta[i as usize]).unwrap();
        assert!(close(st.mf.item_vector(i), &now, 1e-6));
    }

    /// `reindex` re-derives cold items whose attribute mean moved, and marks them for the index.
    #[test]
    fn reindex_refreshes_cold_items() {
        let m = planted(Config { auto_reindex: false, ..cfg() });
        m.upsert_item(&ExtId::Int(100), &[], Some("odd"), None);
        m.reindex(usize::MAX);
        let before = m.item_vector(&ExtId::Int(100)).unwrap();
        // Odd items move a lot: a new user buys them all, many times.
        let recs: Vec<Record> = (0..400).map(|n| ev(500 + n % 5, 1 + 2 * (n % 20), T0 + 2.0)).collect();
        m.apply(&recs, "");
        m.reindex(usize::MAX);
        let after = m.item_vector(&ExtId::Int(100)).unwrap();
        let st = m.state.read();
        let mean = st.attrs.vector_for(&st.meta[st.items.get(&ExtId::Int(100)).unwrap() as usize]).unwrap();
        assert!(!close(&before, &after, 1e-3));
        assert!(close(&after, &mean, 0.02), "{after:?} vs {mean:?}");
        assert_eq!(m.stale(), 0);
    }

    /// A snapshot keeps the new settings and rebuilds the derived sets, so lists (with
    /// exploration, diversity and the blend) are the same after loading.
    #[test]
    fn snapshot_keeps_settings_and_lists() {
        let c = Config {
            diversity: 0.6,
            exploration: 0.3,
            explore_max_events: 3,
            cold_start_events: 4.0,
            ..cfg()
        };
        let m = planted(c);
        m.apply(&(0..10).map(|n| ev(700 + n, 200 + n, T0 + 5.0)).collect::<Vec<_>>(), "");
        let (loaded, _) = Model::from_snapshot_bytes(&m.snapshot_bytes(0).unwrap()).unwrap();
        let lc = loaded.config();
        assert_eq!(
            (lc.diversity, lc.exploration, lc.explore_max_events, lc.cold_start_events),
            (0.6, 0.3, 3, 4.0)
        );
        let q = Query { k: 10, exclude_seen: true, ..Query::default() };
        for u in [0i64, 1, 7, 700, 12345] {
            let a = m.recommend(&ExtId::Int(u), &q);
            assert_eq!(a, loaded.recommend(&ExtId::Int(u), &q));
            assert_eq!(a.iter().filter(|r| r.explore).count(), 3, "{a:?}");
        }
        assert_eq!(m.state.read().fresh.as_slice(), loaded.state.read().fresh.as_slice());
    }
}
