//! The model the engine serves: ids, the factorization, trending counts, item attributes, the
//! redelivery window and the HNSW index, behind locks that let queries run while events apply.
//!
//! # Applying events
//! With [`Config::batch_apply`] (the default) a batch of records is applied as one group
//! ([`group`]): every record in order, but each touched user and item solved once, in
//! parallel; otherwise every event's user and item are solved right after it.
//!
//! # Locking
//! `state` (everything but the index) and `index` are separate `RwLock`s, always taken in that
//! order. Writers hold the write lock for one small chunk of events or one index update, never
//! for a whole batch, so a query waits at most for one chunk (a group's parallel solves run
//! under the shared lock, see [`group`]). The index trails the factorization by
//! the items in `dirty` (bounded staleness); queries re-score the index's candidates with the
//! current vectors, so a stale index can only miss an item, never misreport a score.
//!
//! No lock is held across a slow step: the index re-link keeps one write guard but hands it
//! over fairly between items (`RwLockWriteGuard::bump`), a batch of lists keeps one read guard
//! and hands it over the same way between users, the exact Gramian recomputation
//! runs on a copy of the matrices and is swapped in, and a snapshot copies the model under the
//! read locks and serialises the copy after releasing them. An item stays marked dirty until
//! its re-link is done, so a snapshot taken meanwhile still lists it. [`Model::stats`] reads
//! counters published after every change and takes no lock at all.
//!
//! # From candidates to a list
//! [`Model::recommend`] retrieves a candidate pool (the index or the exact scan for the
//! user's vector, the trending list for users without one; a batch of lists answered by the
//! exact scan shares one scan, see [`Model::recommend_many`]), then:
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

pub use crate::coldstart::ItemMeta;
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

pub mod group;
pub use group::{Batch, MAX_COALESCED, REPLAY_COALESCED};

/// Largest weight an event may carry; larger ones are almost certainly unit mistakes.
pub const MAX_WEIGHT: f32 = 1e6;
/// Default [`Config::max_clock_skew`]: producers' clocks are rarely minutes off, and a larger
/// allowance would only widen what a skewed producer can do before its events are clamped.
pub const DEFAULT_MAX_CLOCK_SKEW: f64 = 300.0;
/// Events applied under one write-lock acquisition: small enough that a query waits well
/// under a millisecond behind a writer (an online update costs ~10-20 µs at dim 64).
const APPLY_CHUNK: usize = 32;
/// Catalog size below which the exact scan answers queries (and a batch of lists shares one
/// scan, see [`Model::recommend_many`]). The scan scores eight rows per SIMD step, about two
/// cycles per item at the default dimension 32, and its lists are exact; the index's cost
/// grows slowly with the catalog. In the model (its filters, 4·k candidates at `ef_search`),
/// a list through the scan cost 35 µs against 50 µs through the index at 5k items and as
/// much as through it at 17.9k (74 µs each, alternating runs), while a batch's lists cost
/// 53 µs there (`python -m bench served --items N`: single lists and batches of 100).
/// Larger dimensions make the scan dearer in proportion: lower it for them.
pub const DEFAULT_EXACT_BELOW: usize = 20_000;

/// The exact scan answers while more than `1 / UNLINKED_SHARE` of the catalog (and more than
/// [`UNLINKED_MIN`] items) is missing from the graph (see [`Model::scans`]).
const UNLINKED_SHARE: usize = 100;
const UNLINKED_MIN: usize = 64;
/// Users whose candidates one shared scan retrieves: bounds how long the scan holds the read
/// lock without handing it over (32 users of an 18k-item catalog: ~0.6 ms).
const BATCH_SCAN_CHUNK: usize = 32;
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

/// The model's settings. [`Config::default`] is the one set of defaults: the Python
/// `ModelConfig` reads its defaults from it.
#[derive(Clone, Debug)]
pub struct Config {
    pub mf: MfConfig,
    pub hnsw: HnswConfig,
    /// Event type name to weight (confidence) of one such event.
    pub event_weights: Vec<(String, f32)>,
    /// Weight of an event that names neither a type nor a weight.
    pub default_weight: f32,
    pub trending_half_life: f64,
    /// Seconds an event's time may be ahead of the server's clock when it arrives; later
    /// times are refused. See [`Model::apply_at`] for why no event can move the model's
    /// clock past the server's.
    pub max_clock_skew: f64,
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
    /// Apply a group of records with coalesced, parallel vector solves (see [`group`]);
    /// false: solve after every event (the per-event online path).
    pub batch_apply: bool,
    /// With `batch_apply`, coalesce solves across the records (frames) of a group; false:
    /// solve at the end of every record, so the model depends on the records alone, not on
    /// how they were grouped on their way to it (replicas reading one log in different
    /// groups then compute the same vectors).
    pub coalesce_records: bool,
}

impl Default for Config {
    /// `neighbour_weight` 0.5, `cold_start_events` 1, `reg` 0.1, `c0` 256, `dim` 32 and `alpha` 0
    /// were chosen by `python -m bench quality --data <amazon grocery> --tune` on a validation
    /// split inside the warm-start part, never on the streamed part (README, "Model quality");
    /// the factorization's own defaults ([`MfConfig::default`]) are the paper's settings for the
    /// library used alone.
    fn default() -> Self {
        Config {
            mf: MfConfig { dim: 32, alpha: 0.0, reg: 0.1, c0: 256.0, seed: 42, ..MfConfig::default() },
            hnsw: HnswConfig { seed: 42, ..HnswConfig::default() },
            event_weights: default_event_weights(),
            default_weight: 1.0,
            trending_half_life: 86_400.0,
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            exact_below: DEFAULT_EXACT_BELOW,
            dedup_window: 1_000_000,
            auto_reindex: true,
            limits: Limits::default(),
            cold_start_events: 1.0,
            diversity: 1.0,
            exploration: 0.0,
            explore_max_events: 5,
            neighbour_weight: 0.5,
            neighbour_window: neighbours::DEFAULT_WINDOW,
            neighbour_cap: neighbours::DEFAULT_CAP,
            batch_apply: true,
            coalesce_records: true,
        }
    }
}

/// Weights of the common event types; a purchase says more than a view.
pub fn default_event_weights() -> Vec<(String, f32)> {
    [("view", 1.0), ("click", 2.0), ("like", 3.0), ("cart", 4.0), ("purchase", 8.0)]
        .into_iter()
        .map(|(n, w)| (n.to_string(), w))
        .collect()
}

impl Config {
    /// This configuration with the settings a restart may change taken from `wanted`:
    /// everything but the index's `m` and `ef_construction` and the trending half-life,
    /// which the stored state was built with (the factorization's own rules are
    /// [`Mf::reconfigure`]'s). Refuses with the first setting that cannot change.
    pub fn reconciled(&self, wanted: &Config) -> Result<Config, String> {
        let fixed = [
            ("hnsw_m", self.hnsw.m as f64, wanted.hnsw.m as f64),
            ("ef_construction", self.hnsw.ef_construction as f64, wanted.hnsw.ef_construction as f64),
            ("trending_half_life", self.trending_half_life, wanted.trending_half_life),
        ];
        for (name, was, now) in fixed {
            if was != now {
                return Err(format!("{name} is {was} in the snapshot and {now} in the configuration"));
            }
        }
        Ok(Config {
            hnsw: HnswConfig { ef_search: wanted.hnsw.ef_search, ..self.hnsw.clone() },
            ..wanted.clone()
        })
    }
}

/// Counters published after every change, so [`Model::stats`] never waits for a lock.
#[derive(Default)]
struct Published {
    events_applied: AtomicU64,
    duplicates: AtomicU64,
    rejected: AtomicU64,
    users: AtomicUsize,
    items: AtomicUsize,
    index_size: AtomicUsize,
    /// Nodes of the graph, deleted or not: every item the index has taken in.
    index_nodes: AtomicUsize,
    stale: AtomicUsize,
    newest_ts: AtomicU64,
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
    /// Users an erase record removed (users the model did not know are not listed).
    pub erased_users: Vec<ExtId>,
}

/// What [`Model::check_frame`] found in a frame.
#[derive(Clone, Debug, PartialEq)]
pub struct FrameCheck {
    /// Bytes the frame occupies at the start of the buffer.
    pub used: usize,
    pub entries: usize,
    pub rejected: Vec<(usize, String)>,
    /// Entries that erase a user or write an item's attributes: only an admin may send
    /// them, which the caller knows and the frame does not.
    pub admin: Vec<usize>,
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
    /// Why the item is in the list; meaningful when the query asked to explain.
    pub reason: Reason,
}

/// Why an item is in a list. Every explained item has one, so a list never leaves an item
/// unaccounted for; `because` adds the user's own items where there are some.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Its vector is close to items the user interacted with (those are in `because`).
    SimilarToHistory,
    /// The user's vector ranks it high, though no single item of theirs points at it:
    /// users who interacted with what they did also took this one (collaborative signal).
    SimilarUsers,
    /// Popular recently: the user is unknown or has no events, or is new enough that the
    /// cold-start blend weighs the item's popularity above its personal score.
    Trending,
    /// The item has no feedback yet; its vector comes from its category and tags.
    NewItem,
    /// An exploration slot: an item with little feedback, sampled to learn about it (it may
    /// still have supporting items in `because`).
    Exploration,
}

impl Reason {
    /// The name clients see (`"reason"` in the HTTP and websocket answers).
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::SimilarToHistory => "similar_to_history",
            Reason::SimilarUsers => "similar_users",
            Reason::Trending => "trending",
            Reason::NewItem => "new_item",
            Reason::Exploration => "exploration",
        }
    }
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

/// What admitting an interaction writes ([`Model::admit_ids`]): the ids, the redelivery
/// window and the clock.
pub(crate) struct Book<'a> {
    pub(crate) users: &'a mut IdMap,
    pub(crate) items: &'a mut IdMap,
    pub(crate) meta: &'a mut Vec<ItemMeta>,
    pub(crate) dedup: &'a mut Dedup,
    pub(crate) newest_ts: &'a mut f64,
}

/// An interaction [`Model::admit_ids`] let in.
pub(crate) struct Admitted {
    pub(crate) u: u32,
    pub(crate) i: u32,
    pub(crate) w: f32,
    /// The time it counts at.
    pub(crate) ts: f64,
    pub(crate) new_item: bool,
}

/// Dense id of `item` and whether it is new; a new item gets the default attributes.
fn item_id(items: &mut IdMap, meta: &mut Vec<ItemMeta>, item: &ExtId) -> (u32, bool) {
    let (i, new) = items.get_or_insert(item);
    if new {
        meta.push(ItemMeta { available: true, ..ItemMeta::default() });
    }
    (i, new)
}

/// User `u`'s seen items; a new user (dense ids are assigned in turn) gets an empty list.
fn seen_by(seen: &mut Vec<Vec<u32>>, u: u32) -> &mut Vec<u32> {
    let u = u as usize;
    if u >= seen.len() {
        seen.resize_with(u + 1, Vec::new);
    }
    &mut seen[u]
}

/// Puts item `i` in or out of the fresh set after its event count became `count`.
fn update_fresh(fresh: &mut SortedIds, i: u32, count: f64, fresh_below: u32) {
    if count < fresh_below as f64 {
        fresh.insert(i);
    } else {
        fresh.remove(i);
    }
}

/// Adds `i` to a user's sorted seen items.
fn mark_seen(seen: &mut Vec<u32>, i: u32) {
    if let Err(pos) = seen.binary_search(&i) {
        seen.insert(pos, i);
    }
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
///
/// A re-link works on the front of the queue without removing it ([`Dirty::start`]): the
/// items stay listed, so a snapshot taken before the re-link is done still has them, and are
/// removed by [`Dirty::finish`], except those that moved again meanwhile.
#[derive(Default)]
pub(crate) struct Dirty {
    queue: Vec<u32>,
    flagged: Vec<bool>,
    /// How many items at the front of `queue` are being re-linked now, and which.
    in_flight: usize,
    flying: HashSet<u32>,
    /// Items of the re-link in flight that moved again after their vector was read.
    again: HashSet<u32>,
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
        } else if self.flying.contains(&i) {
            self.again.insert(i);
        }
    }

    pub(crate) fn pending(&self) -> Vec<u32> {
        self.queue.clone()
    }

    pub(crate) fn len(&self) -> usize {
        self.queue.len()
    }

    /// The first `budget` items, left in the queue until [`Dirty::finish`]. One re-link at a
    /// time (the model serialises them).
    fn start(&mut self, budget: usize) -> Vec<u32> {
        self.in_flight = budget.min(self.queue.len());
        self.again.clear();
        let taken = self.queue[..self.in_flight].to_vec();
        self.flying = taken.iter().copied().collect();
        taken
    }

    /// Removes the re-linked items; those that moved again go to the back of the queue.
    fn finish(&mut self) {
        let done: Vec<u32> = self.queue.drain(..self.in_flight).collect();
        self.in_flight = 0;
        self.flying.clear();
        for i in done {
            if self.again.remove(&i) {
                self.queue.push(i);
            } else {
                self.flagged[i as usize] = false;
            }
        }
    }
}

/// Per-thread working memory of [`Model::recommend`]: the neighbourhood scores and the
/// candidate set of a list live in arrays reused from list to list instead of hash maps
/// built per call.
#[derive(Default)]
struct Scratch {
    near: rerank::TermSums,
    known: rerank::SparseScores,
    /// The user's seen items, when there are at most [`MARK_SEEN_MAX`]; emptied before the
    /// scratch is given back.
    seen: rerank::IdBits,
}

/// Largest catalog (in 64-bit words, one bit per item) whose rows a batched scan marks per
/// user as a bitmap of those it may keep (see [`Model::scan_batch`]): 8 KiB per user, 2^16
/// items.
const SEEN_BITMAP_WORDS: usize = 1024;
/// Longest seen list marked per list (see [`Scratch::seen`]); longer ones are binary-searched.
const MARK_SEEN_MAX: usize = 512;

thread_local! {
    static SCRATCH: std::cell::Cell<Option<Box<Scratch>>> = const { std::cell::Cell::new(None) };
}

impl Scratch {
    /// This thread's scratch (a new one if it is in use or was never made).
    fn take() -> Box<Scratch> {
        SCRATCH.with(|c| c.take()).unwrap_or_default()
    }

    /// Returns the scratch for the thread's next list.
    fn give_back(self: Box<Self>) {
        SCRATCH.with(|c| c.set(Some(self)));
    }
}

/// Candidates one shared scan retrieved for a list ([`Model::scan_batch`]): the `k` best
/// items for `user`'s vector under the query's filters, best first.
struct Found {
    user: u32,
    k: usize,
    hits: Vec<(u32, f32)>,
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
    /// Held by the one re-link running at a time (so `Dirty`'s in-flight items are its own).
    relinking: Mutex<()>,
    published: Published,
}

/// For each decoded record, the index of the frame entry it came from (the decoder drops
/// refused entries from `records`).
fn entry_indices(frame: &decode::Frame) -> Vec<usize> {
    let refused: HashSet<usize> = frame.rejected.iter().map(|r| r.0).collect();
    (0..frame.records.len() + frame.rejected.len()).filter(|e| !refused.contains(e)).collect()
}

/// `report` of applying `frame`'s records, with refusals numbered by frame entry (as the
/// decoder numbers them) and the decoder's own refusals added.
fn frame_report(frame: decode::Frame, mut report: ApplyReport) -> ApplyReport {
    let entries = entry_indices(&frame);
    let mut rejected = frame.rejected;
    rejected.extend(report.rejected.drain(..).map(|(n, reason)| (entries[n], reason)));
    rejected.sort();
    report.rejected = rejected;
    report
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
        let (i, new) = item_id(&mut self.items, &mut self.meta, item);
        if new && fresh_below > 0 {
            self.fresh.insert(i);
        }
        i
    }

    /// Puts item `i` in or out of the fresh set after its event count changed.
    fn update_fresh(&mut self, i: u32, fresh_below: u32) {
        update_fresh(&mut self.fresh, i, self.mf.item_count(i), fresh_below);
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

    fn has_seen(&self, u: u32, i: u32) -> bool {
        self.seen.get(u as usize).is_some_and(|s| s.binary_search(&i).is_ok())
    }

    /// Whether item `i` may be shown under `q` to user `u` (if known).
    fn admissible(&self, i: u32, u: Option<u32>, q: &Query, f: &Filters) -> bool {
        self.allowed(i, f)
            && match u {
                Some(u) if q.exclude_seen => !self.has_seen(u, i),
                _ => true,
            }
    }

    /// Whether item `i` passes the filters that do not depend on the user.
    fn allowed(&self, i: u32, f: &Filters) -> bool {
        let Some(m) = self.meta.get(i as usize) else { return false };
        // An empty exclude set is not hashed into (the common query has none).
        if !m.available || (!f.exclude.is_empty() && f.exclude.contains(&i)) {
            return false;
        }
        if let Some(c) = f.category {
            if m.category != Some(c) {
                return false;
            }
        }
        !m.category.is_some_and(|c| f.exclude_categories.contains(&c))
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
        Model::assemble(cfg, state, index, Dirty::default())
    }

    pub(crate) fn assemble(cfg: Config, state: State, index: Hnsw, mut dirty: Dirty) -> Self {
        // Every item the graph has not taken in waits for it: so a graph saved before
        // unavailable items went in as routing nodes (they were left out then, unmarked) still
        // comes to hold the whole catalog, and [`Model::scans`] to let the index answer.
        for i in 0..state.items.capacity() as u32 {
            if !index.has_node(i) {
                dirty.mark(i);
            }
        }
        let m = Model {
            cfg,
            state: RwLock::new(state),
            index: RwLock::new(index),
            dirty: Mutex::new(dirty),
            relinking: Mutex::new(()),
            published: Published::default(),
        };
        m.publish(&m.state.read());
        m.publish_index(&m.index.read());
        m.publish_stale(m.dirty.lock().len());
        m
    }

    /// Publishes the state's counters for [`Model::stats`] (call with a lock on `st` held).
    fn publish(&self, st: &State) {
        let p = &self.published;
        p.events_applied.store(st.events_applied, Ordering::Relaxed);
        p.duplicates.store(st.duplicates, Ordering::Relaxed);
        p.rejected.store(st.rejected, Ordering::Relaxed);
        p.users.store(st.users.len(), Ordering::Relaxed);
        p.items.store(st.items.len(), Ordering::Relaxed);
        p.newest_ts.store(st.newest_ts.to_bits(), Ordering::Relaxed);
    }

    /// Marks moved items for the index.
    fn mark_dirty(&self, moved: impl IntoIterator<Item = u32>) {
        let mut dirty = self.dirty.lock();
        for i in moved {
            dirty.mark(i);
        }
        self.publish_stale(dirty.len());
    }

    /// Publishes the index's sizes (call with a lock on `index` held).
    fn publish_index(&self, index: &Hnsw) {
        self.published.index_size.store(index.len(), Ordering::Relaxed);
        self.published.index_nodes.store(index.nodes(), Ordering::Relaxed);
    }

    /// Whether a catalog of `n_items` is small enough for the exact scan to answer every
    /// query (`exact_below`). The index of such a catalog is not kept up to date, as nothing
    /// reads it: moved items wait, still marked, and are linked once the catalog outgrows the
    /// scan.
    fn small(&self, n_items: usize) -> bool {
        n_items < self.cfg.exact_below
    }

    /// Whether queries on a catalog of `n_items` are answered by the exact scan rather than
    /// the index: when the catalog is [`small`](Model::small), and while the graph lacks more
    /// than `1 / UNLINKED_SHARE` of the items (and more than [`UNLINKED_MIN`]) — after a
    /// restart that replayed events the snapshot's graph has not seen, or when a catalog first
    /// outgrows the scan. An item missing from the graph can never be found through it, while
    /// an item whose links are merely stale still is (hits are re-scored with current
    /// vectors), so the lists stay exact while the graph is built in the background; the scan
    /// costs more per list on a large catalog.
    fn scans(&self, n_items: usize) -> bool {
        let nodes = self.published.index_nodes.load(Ordering::Relaxed);
        self.small(n_items) || n_items.saturating_sub(nodes) > (n_items / UNLINKED_SHARE).max(UNLINKED_MIN)
    }

    /// Publishes how many items wait for a re-link: none while the catalog is small.
    fn publish_stale(&self, dirty: usize) {
        let waiting = if self.small(self.published.items.load(Ordering::Relaxed)) { 0 } else { dirty };
        self.published.stale.store(waiting, Ordering::Relaxed);
    }

    /// The exact Gramian recomputation when due: the matrices are copied under the read
    /// lock, the sums computed without any lock, and the result installed under a short
    /// write lock unless the model changed meanwhile (then it is tried again later).
    fn refresh_gramians(&self) {
        let inputs = {
            let st = self.state.read();
            if !st.mf.gramians_due() {
                return;
            }
            st.mf.gramian_inputs()
        };
        let exact = inputs.compute();
        self.state.write().mf.install_gramians(exact);
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

    /// Checks an interaction's weight and time: its weight, and the time it counts at (never
    /// ahead of the server's clock, `accepted_at`).
    fn weigh(
        &self,
        kind: Option<&str>,
        weight: Option<f32>,
        ts: f64,
        accepted_at: f64,
    ) -> Result<(f32, f64), String> {
        let w = self.weight_of(kind, weight)?;
        self.check_time(ts, accepted_at)?;
        Ok((w, ts.min(accepted_at)))
    }

    /// Refuses an event time that is not a plausible date or is more than
    /// [`Config::max_clock_skew`] ahead of `clock` (the server's time when it arrived).
    fn check_time(&self, ts: f64, clock: f64) -> Result<(), String> {
        if !ts.is_finite() {
            return Err("time is not finite".into());
        }
        decode::check_time_range(ts)?;
        let skew = self.cfg.max_clock_skew;
        if ts > clock + skew {
            return Err(format!(
                "time {ts} is {:.0} s ahead of the server's clock; at most {skew} s is accepted \
                 (max_clock_skew); times are unix seconds",
                ts - clock
            ));
        }
        Ok(())
    }

    /// Checks every record against the server's clock now, changing nothing; the first
    /// refusal is returned.
    pub fn validate(&self, records: &[Record]) -> Result<(), ModelError> {
        let clock = now_secs();
        for (index, r) in records.iter().enumerate() {
            if let Record::Interaction { kind, weight, ts, .. } = r {
                self.weight_of(kind.as_deref(), *weight)
                    .map_err(|reason| ModelError::InvalidEvent { index, reason })?;
                self.check_time(*ts, clock).map_err(|reason| ModelError::InvalidEvent { index, reason })?;
            }
        }
        Ok(())
    }

    /// Applies records in order, as arriving now (see [`Model::apply_at`]).
    pub fn apply(&self, records: &[Record], producer: &str) -> ApplyReport {
        self.apply_at(records, producer, now_secs())
    }

    /// Applies records in order that the server accepted at `accepted_at` (unix seconds).
    /// Bad records are refused one by one with a reason and leave the model as it was;
    /// records whose `(producer, id)` is in the redelivery window are counted as duplicates
    /// and skipped.
    ///
    /// # The model's clock
    /// Recency decay and trending measure age from the model's "now", the newest event time
    /// applied. An event counts at `min(its time, accepted_at)`, so no producer can move that
    /// clock past the server's own: a time up to `max_clock_skew` ahead is accepted but
    /// counts as arriving at `accepted_at`, a time further ahead is refused, and an old event
    /// never moves the clock back. `accepted_at` is journaled with each frame, so replay
    /// after a restart applies every event exactly as it was applied live.
    pub fn apply_at(&self, records: &[Record], producer: &str, accepted_at: f64) -> ApplyReport {
        if self.cfg.batch_apply {
            let batch = Batch { records, producer, accepted_at };
            return self.apply_group(std::slice::from_ref(&batch)).pop().unwrap_or_default();
        }
        let mut report = ApplyReport::default();
        let mut touched = HashMap::new();
        for (chunk_no, chunk) in records.chunks(APPLY_CHUNK).enumerate() {
            let mut moved = Vec::with_capacity(chunk.len());
            {
                let mut st = self.state.write();
                let (applied, duplicates, rejected) =
                    (report.applied, report.duplicates, report.rejected.len());
                for (j, rec) in chunk.iter().enumerate() {
                    let index = chunk_no * APPLY_CHUNK + j;
                    match self.apply_one(
                        &mut st,
                        rec,
                        producer,
                        accepted_at,
                        &mut moved,
                        &mut touched,
                        &mut report.erased_users,
                    ) {
                        Ok(true) => report.applied += 1,
                        Ok(false) => report.duplicates += 1,
                        Err(reason) => report.rejected.push((index, reason)),
                    }
                }
                // This chunk's share only: the report's counts run over the whole batch.
                st.events_applied += (report.applied - applied) as u64;
                st.duplicates += (report.duplicates - duplicates) as u64;
                st.rejected += (report.rejected.len() - rejected) as u64;
                self.publish(&st);
            }
            self.mark_dirty(moved);
            self.refresh_gramians();
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
        accepted_at: f64,
        moved: &mut Vec<u32>,
        touched: &mut HashMap<ExtId, Option<ExtId>>,
        erased: &mut Vec<ExtId>,
    ) -> Result<bool, String> {
        match rec {
            Record::Interaction { user, id, .. } => {
                let Some((u, i, w, ts)) = self.admit(st, rec, producer, accepted_at, None)? else {
                    return Ok(false);
                };
                let was_member = st.attrs.is_member(i);
                // Only items with attributes feed attribute vectors: skip the copy otherwise.
                let m = &st.meta[i as usize];
                let tracked = was_member && (m.category.is_some() || !m.tags.is_empty());
                let old = if tracked { st.mf.item_vector(i).to_vec() } else { Vec::new() };
                st.mf.update(u, i, w, ts);
                if tracked {
                    let new = st.mf.item_vector(i).to_vec();
                    let State { attrs, meta, .. } = &mut *st;
                    attrs.moved(i, &meta[i as usize], &old, &new);
                } else if !was_member {
                    st.settle_item(i, None);
                }
                self.note_event(st, u, i, w, ts);
                moved.push(i);
                touched.insert(user.clone(), id.clone());
                Ok(true)
            }
            Record::ItemUpsert { item, tags, category, available, .. } => {
                self.upsert_item_locked(st, item, tags, category.as_deref(), *available, moved);
                Ok(true)
            }
            Record::EraseUser { user, .. } => {
                if let Some(m) = self.erase_user_locked(st, user) {
                    moved.extend(m);
                    erased.push(user.clone());
                }
                touched.insert(user.clone(), None);
                Ok(true)
            }
        }
    }

    /// The part of applying an interaction that comes before its vector updates: checks it,
    /// skips a redelivery (Ok(None)), assigns dense ids, moves the clock and pairs the item
    /// with the user's recent ones. Returns (user, item, weight, the time it counts at).
    /// With `pairs`, the item and the user's recent items are pushed there for a later
    /// [`Neighbours::add_all`] instead of being counted now.
    fn admit(
        &self,
        st: &mut State,
        rec: &Record,
        producer: &str,
        accepted_at: f64,
        pairs: Option<&mut crate::neighbours::Adds>,
    ) -> Result<Option<(u32, u32, f32, f64)>, String> {
        let State { users, items, meta, dedup, newest_ts, .. } = st;
        let mut book = Book { users, items, meta, dedup, newest_ts };
        let Some(Admitted { u, i, w, ts, new_item }) =
            self.admit_ids(&mut book, rec, producer, accepted_at)?
        else {
            return Ok(None);
        };
        seen_by(&mut st.seen, u);
        if new_item && self.cfg.explore_max_events > 0 {
            st.fresh.insert(i);
        }
        if self.cfg.neighbour_weight > 0.0 && !st.has_seen(u, i) {
            let window = self.cfg.neighbour_window;
            match pairs {
                Some(pairs) => pairs.push_with(i, |out| st.mf.extend_recent_items(u, window, out)),
                None => {
                    let recent = st.mf.recent_items(u, window);
                    st.neighbours.add(i, &recent);
                }
            }
        }
        Ok(Some((u, i, w, ts)))
    }

    /// The first part of [`Model::admit`]: checks the interaction, skips a redelivery
    /// (Ok(None)), assigns dense ids and moves the clock.
    fn admit_ids(
        &self,
        book: &mut Book<'_>,
        rec: &Record,
        producer: &str,
        accepted_at: f64,
    ) -> Result<Option<Admitted>, String> {
        let Record::Interaction { user, item, kind, weight, id, ts } = rec else {
            return Err("not an interaction".into());
        };
        let (w, ts) = self.weigh(kind.as_deref(), *weight, *ts, accepted_at)?;
        if let Some(id) = id {
            if !book.dedup.first_time(producer, id, Some(user)) {
                return Ok(None);
            }
        }
        let (u, _) = book.users.get_or_insert(user);
        let (i, new) = item_id(book.items, book.meta, item);
        *book.newest_ts = book.newest_ts.max(ts);
        Ok(Some(Admitted { u, i, w, ts, new_item: new }))
    }

    /// The part of applying an interaction that comes after its vector updates: trending
    /// counts, the fresh set, the user's seen items.
    fn note_event(&self, st: &mut State, u: u32, i: u32, w: f32, ts: f64) {
        st.trending.add(i, w, ts);
        st.update_fresh(i, self.cfg.explore_max_events);
        mark_seen(&mut st.seen[u as usize], i);
    }

    /// Decodes the first frame in `buf` and checks every record as `apply` would, changing
    /// nothing. Refusals are (entry index, reason).
    pub fn check_frame(&self, buf: &[u8]) -> Result<FrameCheck, DecodeError> {
        let (frame, used) = decode::decode_frame(buf, &self.cfg.limits)?;
        let mut rejected = frame.rejected.clone();
        let mut admin = Vec::new();
        let entries = entry_indices(&frame);
        for (n, r) in frame.records.iter().enumerate() {
            if let Err(ModelError::InvalidEvent { reason, .. }) = self.validate(std::slice::from_ref(r)) {
                rejected.push((entries[n], reason));
            }
            if matches!(r, Record::ItemUpsert { .. } | Record::EraseUser { .. }) {
                admin.push(entries[n]);
            }
        }
        rejected.sort();
        Ok(FrameCheck {
            used,
            entries: frame.records.len() + frame.rejected.len(),
            rejected,
            admin,
            chunk: frame.chunk,
            tag: frame.tag,
        })
    }

    /// Decodes one Forward frame (see [`decode::decode_frame`]) and applies its records.
    /// Event ids are de-duplicated per frame tag. Returns the report, the frame's `chunk`
    /// option and the bytes consumed.
    /// `accepted_at` is when the server accepted the frame (None: now).
    pub fn apply_frame(
        &self,
        buf: &[u8],
        accepted_at: Option<f64>,
    ) -> Result<(ApplyReport, Option<String>, usize), DecodeError> {
        let (frame, used) = decode::decode_frame(buf, &self.cfg.limits)?;
        let report = self.apply_at(&frame.records, &frame.tag, accepted_at.unwrap_or_else(now_secs));
        let chunk = frame.chunk.clone();
        Ok((frame_report(frame, report), chunk, used))
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
            self.publish(&st);
        }
        self.mark_dirty(moved);
        if self.cfg.auto_reindex {
            self.reindex(usize::MAX);
        }
    }

    /// Items left without feedback by the erasure lose their learned vectors (they were
    /// learned from the erased user) and fall back to their attributes: those are returned.
    /// The ids of the user's events leave the redelivery window too. None: unknown user.
    fn erase_user_locked(&self, st: &mut State, user: &ExtId) -> Option<Vec<u32>> {
        let u = st.users.erase(user)?;
        st.dedup.forget_user(user);
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
        let moved = {
            let mut st = self.state.write();
            let moved = self.erase_user_locked(&mut st, user);
            self.publish(&st);
            moved
        };
        let Some(moved) = moved else { return false };
        self.mark_dirty(moved);
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
        self.mark_dirty(0..n_items as u32);
        self.reindex(usize::MAX);
    }

    /// Brings up to `budget` moved items up to date in the index (oldest moves first).
    /// Returns how many are still waiting. The index write lock is handed over fairly after
    /// every item, so queries interleave with a long re-link; items stay marked dirty until
    /// their re-link is done.
    pub fn reindex(&self, budget: usize) -> usize {
        self.reindex_with(budget, || ())
    }

    /// [`Model::reindex`], calling `between` once the items are chosen and their vectors read,
    /// before the index changes (tests take a snapshot there).
    pub(crate) fn reindex_with(&self, budget: usize, between: impl FnOnce()) -> usize {
        let _one_at_a_time = self.relinking.lock();
        // Checked under the read lock first: most calls have nothing to refresh.
        let quiet = {
            let st = self.state.read();
            st.cold.is_empty() || (st.cold_cursor == 0 && st.attrs.version() == st.cold_pass_version)
        };
        let refreshed = if quiet { Vec::new() } else { self.state.write().refresh_cold(COLD_REFRESH_BUDGET) };
        if !refreshed.is_empty() {
            self.mark_dirty(refreshed);
        }
        if self.small(self.state.read().items.len()) {
            self.publish_stale(0);
            return 0;
        }
        let taken = self.dirty.lock().start(budget);
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
        between();
        if !taken.is_empty() {
            // Items new to the index are inserted last, in batches searched in parallel
            // under the shared lock (see `hnsw::batch`); the rest one by one, as are the new
            // items while the graph is small. An unavailable item new to the index goes in
            // too, deleted at once (a routing node): so the graph takes in every item of the
            // catalog, and its node count tells how much of the catalog it lacks (see
            // [`Model::scans`]).
            let mut fresh = Vec::new();
            let mut hidden = Vec::new();
            let mut index = self.index.write();
            for (n, &i) in taken.iter().enumerate() {
                let row = &vecs[n * dim..(n + 1) * dim];
                if !index.has_node(i) {
                    fresh.push((i, row));
                    if !live[n] {
                        hidden.push(i);
                    }
                    continue;
                }
                if live[n] {
                    index.upsert(i, row);
                } else {
                    index.delete(i);
                }
                // Waiting queries go first (then the re-link continues where it was).
                RwLockWriteGuard::bump(&mut index);
            }
            let mut rest = &fresh[..];
            while !rest.is_empty() {
                let (now, later) = rest.split_at(index.insert_batch_len().min(rest.len()));
                rest = later;
                if let [(i, row)] = now {
                    index.upsert(*i, row);
                    RwLockWriteGuard::bump(&mut index);
                    continue;
                }
                // No other writer meanwhile: re-links hold `relinking`.
                let shared = RwLockWriteGuard::downgrade(index);
                let plans = shared.plan_inserts(now);
                drop(shared);
                index = self.index.write();
                for (plan, (_, row)) in plans.iter().zip(now) {
                    index.link_planned(plan, row);
                    RwLockWriteGuard::bump(&mut index);
                }
            }
            for i in hidden {
                index.delete(i);
            }
            self.publish_index(&index);
        }
        let mut dirty = self.dirty.lock();
        dirty.finish();
        self.publish_stale(dirty.len());
        dirty.len()
    }

    pub fn stale(&self) -> usize {
        self.published.stale.load(Ordering::Relaxed)
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

    /// [`Model::recommend`] for each of `users` under one query. The state lock is handed
    /// over fairly between users (`bump`: released and re-taken only when a writer waits), so
    /// a long batch never holds back the writer applying events for longer than one list
    /// takes, and costs one acquisition when none does.
    ///
    /// Where the exact scan answers (catalogs under [`Config::exact_below`], `exact` queries),
    /// the candidates of every [`BATCH_SCAN_CHUNK`] users come from one shared scan
    /// ([`Model::scan_batch`]) taken before their lists; a list re-filters and re-scores them
    /// with the state it is computed in (the lock may have been handed over since), as it does
    /// an index's hits.
    pub fn recommend_many(&self, users: &[ExtId], q: &Query) -> Vec<Vec<Rec>> {
        let mut out = Vec::with_capacity(users.len());
        let mut st = self.state.read();
        // Chunks of equal size (at most `BATCH_SCAN_CHUNK`): no small remainder on its own.
        let size = users.len().div_ceil(users.len().div_ceil(BATCH_SCAN_CHUNK).max(1)).max(1);
        for (c, chunk) in users.chunks(size).enumerate() {
            if c > 0 {
                RwLockReadGuard::bump(&mut st);
            }
            let mut found = self.scan_batch(&st, chunk, q);
            for (n, user) in chunk.iter().enumerate() {
                if n > 0 {
                    RwLockReadGuard::bump(&mut st);
                }
                let u = st.users.get(user);
                let hits = found.get_mut(n).and_then(Option::take).filter(|f| Some(f.user) == u);
                out.push(self.recommend_found(&st, u, id_salt(user), q, hits));
            }
        }
        out
    }

    /// The search of each of `users`' lists (see [`Model::recommend_locked`]) as one exact scan
    /// of the item matrix, where the exact scan answers (see [`Model::top_k`]); empty
    /// otherwise, and None for users whose list needs no search. The shared scan finds what
    /// each user's own scan finds, so a list is the same in a batch of any size and alone.
    fn scan_batch(&self, st: &State, users: &[ExtId], q: &Query) -> Vec<Option<Found>> {
        let n_items = st.items.capacity();
        let explore = q.exploration.unwrap_or(self.cfg.exploration).clamp(0.0, 1.0);
        // Exploration picks are drawn per list and excluded from its search: such lists search
        // on their own.
        if !(q.exact || self.scans(n_items)) || (explore * q.k as f32).round() >= 0.5 {
            return Vec::new();
        }
        let Some(filters) = Self::resolve_filters(st, q) else { return Vec::new() };
        let rerank = q.diversity.unwrap_or(self.cfg.diversity).clamp(0.0, 1.0) < 1.0;
        let wanted: Vec<Option<(u32, usize)>> = users
            .iter()
            .map(|user| {
                let u = st.users.get(user).filter(|&u| !st.seen[u as usize].is_empty())?;
                Some((u, self.search_k(st, u, q.k, rerank)))
            })
            .collect();
        let searched: Vec<(u32, usize)> = wanted.iter().flatten().copied().collect();
        let queries: Vec<&[f32]> = searched.iter().map(|&(u, _)| st.mf.user_vector(u)).collect();
        let ks: Vec<usize> = searched.iter().map(|s| s.1).collect();
        // The rows each user may keep as a bitmap, one bit per row of the matrix the scan reads
        // (a block of the scan is one word): the items the filters allow, tested once for the
        // batch, less the user's seen items (a seen item without a row is never asked about).
        // The scan asks about every row that could still enter a list, and a user's
        // best-scored rows are often items it has taken, so a binary search of the seen list
        // per question cost more than the marking, and a filter call per question more than
        // one AND per block.
        let matrix = st.mf.item_matrix();
        let rows = matrix.len() / self.cfg.mf.dim.max(1);
        let words = rows.div_ceil(64);
        let mut hits = if (1..=SEEN_BITMAP_WORDS).contains(&words) {
            let mut allowed = vec![0u64; words];
            for (w, word) in allowed.iter_mut().enumerate() {
                for r in 0..64.min(rows - w * 64) {
                    *word |= (st.allowed((w * 64 + r) as u32, &filters) as u64) << r;
                }
            }
            let mut bits = allowed.repeat(searched.len());
            if q.exclude_seen {
                for (row, &(u, _)) in bits.chunks_exact_mut(words).zip(&searched) {
                    for &i in &st.seen[u as usize] {
                        if let Some(word) = row.get_mut(i as usize / 64) {
                            *word &= !(1 << (i % 64));
                        }
                    }
                }
            }
            scan::exact_top_k_batch_masked(matrix, self.cfg.mf.dim, &queries, &ks, |n, b, open| {
                open & bits[n * words + b]
            })
        } else {
            let keep = |n: usize, i: u32| {
                st.allowed(i, &filters) && !(q.exclude_seen && st.has_seen(searched[n].0, i))
            };
            scan::exact_top_k_batch(matrix, self.cfg.mf.dim, &queries, &ks, &keep)
        }
        .into_iter();
        wanted
            .into_iter()
            .map(|w| {
                let (user, k) = w?;
                Some(Found { user, k, hits: hits.next().expect("one result per query") })
            })
            .collect()
    }

    /// How many candidates the search for user `u`'s list asks for (see
    /// [`Model::recommend_locked`]), `k_main` being its slots left after exploration.
    fn search_k(&self, st: &State, u: u32, k_main: usize, rerank: bool) -> usize {
        let beta = self.cold_start_beta(st.mf.user_count(u));
        let gamma = self.cfg.neighbour_weight.clamp(0.0, 1.0);
        if ((beta >= MIN_BLEND || gamma > 0.0) && k_main > 0) || rerank {
            k_main * POOL_FACTOR
        } else {
            k_main
        }
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
        self.recommend_found(st, u, salt, q, None)
    }

    /// [`Model::recommend_locked`], the search of the user's vector replaced by `found` when
    /// it was taken for the same user and size: its hits are filtered and re-scored here, so
    /// a state that moved on since the scan can cost an item, never admit a filtered one or
    /// misreport a score.
    fn recommend_found(
        &self,
        st: &State,
        u: Option<u32>,
        salt: u64,
        q: &Query,
        mut found: Option<Found>,
    ) -> Vec<Rec> {
        let Some(filters) = Self::resolve_filters(st, q) else { return Vec::new() };
        let n_items = st.items.capacity();
        let mut scratch = Scratch::take();
        let Scratch { near, known, seen } = &mut *scratch;
        // A short seen list is marked in a bitmap: one lookup per candidate instead of a
        // binary search (the candidates of a search are tested by the hundred).
        let marked: &[u32] = match u {
            Some(u) if q.exclude_seen && st.seen[u as usize].len() <= MARK_SEEN_MAX => {
                seen.mark(&st.seen[u as usize]);
                &st.seen[u as usize]
            }
            _ => &[],
        };
        let marks = &*seen;
        let keep = |i: u32| {
            if !marked.is_empty() {
                !marks.contains(i) && st.allowed(i, &filters)
            } else {
                st.admissible(i, u, q, &filters)
            }
        };
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
        // The candidates of the user's vector: the shared scan's, when it searched the same
        // number for this user, or a search now.
        let mut search = |k: usize| match found.take().filter(|f| f.k == k && Some(f.user) == u) {
            Some(f) => {
                let pu = pu.expect("a scanned user has a vector");
                let mut hits = f.hits;
                hits.retain(|h| keep_main(h.0));
                hits.iter_mut().for_each(|h| h.1 = scan::dot(pu, st.mf.item_vector(h.0)));
                rerank::sort_desc(&mut hits);
                hits
            }
            None => {
                let sub = Query { k, exact: q.exact, ef: q.ef, ..Query::default() };
                self.top_k(st, pu.expect("a searched user has a vector"), &sub, &keep_main)
            }
        };
        let pool = if rerank { k_main * POOL_FACTOR } else { k_main };
        let now = st.newest_ts;

        // Items of a cold-start blend that are there mostly for being popular (for `reason`).
        let mut trend_led: HashSet<u32> = HashSet::new();
        let mut cands = match (u, pu) {
            (Some(u), Some(pu)) => {
                let beta = self.cold_start_beta(st.mf.user_count(u));
                let gamma = self.cfg.neighbour_weight.clamp(0.0, 1.0);
                if (beta >= MIN_BLEND || gamma > 0.0) && k_main > 0 {
                    // Candidates from every side, each scored on every side.
                    let m = k_main * POOL_FACTOR;
                    let hits = search(m);
                    // The search's hits come re-scored with the current vectors: their personal
                    // scores are known already.
                    let mut personal: Vec<f32> = hits.iter().map(|h| h.1).collect();
                    let mut ids: Vec<u32> = hits.into_iter().map(|h| h.0).collect();
                    known.reset(n_items);
                    // Sized for every id a neighbourhood term can name: its adder does not grow.
                    near.reset(n_items.max(st.neighbours.id_bound()));
                    ids.iter().for_each(|&i| {
                        known.insert(i);
                    });
                    if gamma > 0.0 {
                        let recent = st.mf.recent_items(u, self.cfg.neighbour_window);
                        near.fill(|sums| st.neighbours.each_term(&recent, |j, s| sums.add(j, s)));
                        let top = rerank::top_kept(near.entries(), m, &keep_main);
                        ids.extend(top.into_iter().map(|h| h.0).filter(|&i| known.insert(i)));
                    }
                    if beta >= MIN_BLEND {
                        ids.extend(
                            st.trending
                                .top(m, &keep_main)
                                .into_iter()
                                .map(|h| h.0)
                                .filter(|&i| known.insert(i)),
                        );
                    }
                    let rest = &ids[personal.len()..];
                    rest.iter().for_each(|&i| scan::prefetch_row(st.mf.item_vector(i)));
                    personal.extend(rest.iter().map(|&i| scan::dot(pu, st.mf.item_vector(i))));
                    if gamma > 0.0 {
                        let hood: Vec<f32> = ids.iter().map(|&i| near.get(i)).collect();
                        personal = rerank::blend(&personal, &hood, gamma);
                    }
                    let scores = if beta >= MIN_BLEND {
                        let trending = st.trending.scorer(now);
                        let trend: Vec<f32> = ids.iter().map(|&i| trending(i) as f32).collect();
                        if q.explain {
                            let led = rerank::trending_led(&personal, &trend, beta);
                            trend_led = ids.iter().zip(led).filter(|x| x.1).map(|x| *x.0).collect();
                        }
                        rerank::blend(&personal, &trend, beta)
                    } else {
                        personal
                    };
                    let mut hits: Vec<(u32, f32)> = ids.into_iter().zip(scores).collect();
                    rerank::top_sorted(&mut hits, pool);
                    hits
                } else {
                    search(pool)
                }
            }
            _ => st.trending.top(pool, &keep_main),
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
        let recs = out
            .into_iter()
            .filter_map(|(i, score, explore)| {
                let item = st.items.ext(i)?.clone();
                let because = match u {
                    Some(u) if q.explain => st.explain(u, i, &self.cfg),
                    _ => Vec::new(),
                };
                let reason = if explore {
                    Reason::Exploration
                } else if pu.is_none() || trend_led.contains(&i) {
                    Reason::Trending
                } else if !because.is_empty() {
                    Reason::SimilarToHistory
                } else if st.mf.item_count(i) <= 0.0 {
                    Reason::NewItem
                } else {
                    Reason::SimilarUsers
                };
                Some(Rec { item, score, because, explore, reason })
            })
            .collect();
        scratch.seen.clear(marked);
        scratch.give_back();
        recs
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
        if q.exact || self.scans(n_items) {
            return scan::exact_top_k(st.mf.item_matrix(), self.cfg.mf.dim, v, q.k, keep);
        }
        let ef = q.ef.unwrap_or(self.cfg.hnsw.ef_search).max(q.k);
        let mut hits = self.index.read().search(v, q.k, ef, keep);
        hits.iter().for_each(|h| scan::prefetch_row(st.mf.item_vector(h.0)));
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

    /// The model's counters as last published: never waits for a lock, so it may be called
    /// from an event loop.
    pub fn stats(&self) -> Stats {
        let p = &self.published;
        Stats {
            events_applied: p.events_applied.load(Ordering::Relaxed),
            duplicates: p.duplicates.load(Ordering::Relaxed),
            rejected: p.rejected.load(Ordering::Relaxed),
            users: p.users.load(Ordering::Relaxed),
            items: p.items.load(Ordering::Relaxed),
            index_size: p.index_size.load(Ordering::Relaxed),
            index_stale: p.stale.load(Ordering::Relaxed),
            newest_ts: f64::from_bits(p.newest_ts.load(Ordering::Relaxed)),
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

    /// A model without items answers a batch with empty lists (the scan has no rows to mark).
    #[test]
    fn an_empty_catalog_answers_a_batch_with_empty_lists() {
        let m = Model::new(Config::default());
        let q = Query { k: 5, exclude_seen: true, ..Query::default() };
        let lists = m.recommend_many(&[ExtId::Int(1), ExtId::Str("u".into())], &q);
        assert_eq!(lists.len(), 2);
        assert!(lists.iter().all(Vec::is_empty));
    }

    /// A batch's lists are its users' single lists, whatever the batch: where the exact scan
    /// answers, the batch shares one scan (exact queries too); elsewhere (`exact_below` 0, the
    /// index left empty here) each list searches the index. Under filters and re-ranking alike.
    #[test]
    fn batched_lists_are_the_single_lists() {
        // 60 users with events, then unknown ones (trending).
        let users: Vec<ExtId> = (0..70).map(ExtId::Int).collect();
        let queries = [
            Query { k: 5, exclude_seen: true, ..Query::default() },
            Query { k: 5, exclude_seen: true, category: Some("even".into()), ..Query::default() },
            Query {
                k: 4,
                exclude_seen: true,
                exclude: vec![ExtId::Int(2), ExtId::Int(3)],
                diversity: Some(0.5),
                ..Query::default()
            },
            Query { k: 6, exclude_seen: false, explain: true, ..Query::default() },
        ];
        let mut differs = false;
        for exact_below in [DEFAULT_EXACT_BELOW, 0] {
            let m = planted(Config { auto_reindex: false, exact_below, ..cfg() });
            for q in &queries {
                let mut lists = Vec::new();
                for q in [q.clone(), Query { exact: true, ..q.clone() }] {
                    let batch = m.recommend_many(&users, &q);
                    assert_eq!(batch.len(), users.len());
                    for (user, got) in users.iter().zip(&batch) {
                        assert!(!got.is_empty(), "user {user:?}");
                        assert_eq!(*got, m.recommend(user, &q), "user {user:?} under {q:?}");
                    }
                    for n in [1, 3] {
                        assert_eq!(m.recommend_many(&users[..n], &q), batch[..n].to_vec());
                    }
                    lists.push(batch);
                }
                if exact_below == 0 {
                    differs |= lists[0] != lists[1];
                } else {
                    assert_eq!(lists[0], lists[1], "the scan answers either way");
                }
            }
        }
        assert!(differs, "the index's lists differ from the exact ones");
    }

    #[test]
    fn no_event_moves_the_clock_past_the_server_or_back() {
        let m = Model::new(cfg());
        let accepted = T0 + 100.0;
        // Honest traffic sets the clock; one event milliseconds-as-seconds is refused.
        let r = m.apply_at(&[ev(1, 1, T0), ev(2, 2, 1_796_070_000_000.0)], "", accepted);
        assert_eq!(r.applied, 1);
        assert!(r.rejected[0].1.contains("after the year 9999"), "{:?}", r.rejected);
        // Far ahead of the server's clock: refused; within the skew: counts at acceptance.
        let ahead = accepted + cfg().max_clock_skew + 1.0;
        let r = m.apply_at(&[ev(3, 3, ahead), ev(4, 4, accepted + 10.0)], "", accepted);
        assert_eq!(r.applied, 1);
        assert!(r.rejected[0].1.contains("ahead of the server's clock"), "{:?}", r.rejected);
        assert_eq!(m.stats().newest_ts, accepted);
        assert_eq!(m.state.read().mf.now(), accepted);
        // An old event never moves it back.
        m.apply_at(&[ev(5, 5, T0 - 1e6)], "", accepted + 1.0);
        assert_eq!(m.stats().newest_ts, accepted);
        // Nor can a far-future event sent through the library entry points.
        let err = m.validate(&[ev(6, 6, now_secs() + 3600.0)]).unwrap_err();
        assert!(matches!(err, ModelError::InvalidEvent { index: 0, .. }));
        assert_eq!(m.apply(&[ev(6, 6, now_secs() + 3600.0)], "").rejected.len(), 1);
    }

    #[test]
    fn beta_follows_n0_over_n0_plus_events() {
        let m = Model::new(Config { cold_start_events: 5.0, ..cfg() });
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

    fn ev_id(user: i64, item: i64, id: i64) -> Record {
        Record::Interaction {
            user: ExtId::Int(user),
            item: ExtId::Int(item),
            kind: None,
            weight: Some(1.0),
            id: Some(ExtId::Int(id)),
            ts: T0,
        }
    }

    /// Erasure removes the user's event ids from the redelivery window, in memory and in
    /// the snapshot written after it; other users' ids stay.
    #[test]
    fn erasure_forgets_the_users_event_ids() {
        let m = Model::new(cfg());
        m.apply(&[ev_id(1, 10, 100), ev_id(1, 11, 101), ev_id(2, 10, 200)], "p");
        assert!(m.erase_user(&ExtId::Int(1)));
        let (loaded, _) = Model::from_snapshot_bytes(&m.snapshot_bytes(0).unwrap()).unwrap();
        for model in [&m, &loaded] {
            let st = model.state.read();
            let ids: Vec<ExtId> = st.dedup.entries().map(|((_, id), _)| id.clone()).collect();
            assert_eq!(ids, vec![ExtId::Int(200)]);
        }
        // A later event that reuses an erased id is new data, not a redelivery.
        let r = loaded.apply(&[ev_id(1, 12, 100), ev_id(2, 10, 200)], "p");
        assert_eq!((r.applied, r.duplicates), (1, 1));
    }

    /// An erase record names its user in the report only when the model knew the user.
    #[test]
    fn erase_records_report_known_users_only() {
        let m = Model::new(cfg());
        m.apply(&[ev(1, 10, T0)], "");
        let erase = |u: i64| Record::EraseUser { user: ExtId::Int(u), ts: T0 };
        let r = m.apply(&[erase(1), erase(99)], "");
        assert_eq!(r.erased_users, vec![ExtId::Int(1)]);
    }

    /// Refusals are counted once, however many chunks a batch spans.
    #[test]
    fn rejected_events_are_counted_once() {
        let m = Model::new(cfg());
        let mut recs: Vec<Record> = (0..100).map(|n| ev(n % 7, n % 11, T0)).collect();
        recs[3] = Record::Interaction {
            user: ExtId::Int(1),
            item: ExtId::Int(1),
            kind: Some("nope".into()),
            weight: None,
            id: None,
            ts: T0,
        };
        let r = m.apply(&recs, "");
        assert_eq!(r.rejected.len(), 1);
        let s = m.stats();
        assert_eq!((s.rejected, s.events_applied), (1, 99));
    }

    /// A snapshot taken while a re-link is under way still lists the items being re-linked:
    /// the loaded model re-links them instead of serving a stale index for them forever.
    #[test]
    fn dirty_marks_survive_a_snapshot_taken_mid_reindex() {
        let m = Model::new(Config { auto_reindex: false, exact_below: 0, ..cfg() });
        m.apply(&(0..50).map(|n| ev(n % 5, n, T0)).collect::<Vec<_>>(), "");
        let waiting = m.stale();
        assert!(waiting > 0);
        let mut mid = Vec::new();
        let left = m.reindex_with(usize::MAX, || mid = m.snapshot_bytes(0).unwrap());
        assert_eq!((left, m.stale()), (0, 0));
        let (loaded, _) = Model::from_snapshot_bytes(&mid).unwrap();
        assert_eq!(loaded.stale(), waiting);
        assert_eq!(loaded.reindex(usize::MAX), 0);
        assert_eq!(loaded.index.read().len(), m.index.read().len());
    }

    /// A catalog below `exact_below` is scanned: its moved items wait for the index, unlisted
    /// as stale, and are linked once the catalog outgrows the scan.
    #[test]
    fn a_scanned_catalog_is_linked_once_it_outgrows_the_scan() {
        let m = Model::new(Config { auto_reindex: false, exact_below: 30, ..cfg() });
        m.apply(&(0..100).map(|n| ev(n % 7, n % 20, T0)).collect::<Vec<_>>(), "");
        assert_eq!((m.stale(), m.reindex(usize::MAX)), (0, 0));
        assert_eq!(m.index.read().len(), 0);
        assert_eq!(m.dirty.lock().len(), 20);
        let q = Query { k: 5, ..Query::default() };
        assert!((0..7).all(|u| m.recommend(&ExtId::Int(u), &q).len() == 5));
        m.apply(&(0..40).map(|n| ev(n % 7, 20 + n % 20, T0 + 1.0)).collect::<Vec<_>>(), "");
        assert_eq!(m.stale(), 40);
        assert_eq!(m.reindex(usize::MAX), 0);
        assert_eq!(m.index.read().len(), 40);
    }

    /// While the graph lacks much of the catalog (a restart replayed events its snapshot's
    /// graph never saw, or the catalog just outgrew the scan) the exact scan answers, so the
    /// lists are the exact ones; the index answers once it holds the catalog, unavailable
    /// items included as deleted routing nodes, and reports what waits meanwhile.
    #[test]
    fn the_scan_answers_until_the_graph_holds_the_catalog() {
        let m = Model::new(Config { auto_reindex: false, exact_below: 0, ..cfg() });
        let n_items = 600i64;
        let hidden: Vec<i64> = (0..n_items).filter(|i| i % 10 == 3).collect();
        for &i in &hidden {
            m.upsert_item(&ExtId::Int(i), &[], None, Some(false));
        }
        let recs: Vec<Record> = (0..6000).map(|n| ev(n % 50, (n * 7 + n / 50) % n_items, T0)).collect();
        m.apply(&recs, "");
        let users: Vec<ExtId> = (0..50).map(ExtId::Int).collect();
        let q = Query { k: 10, exclude_seen: true, ..Query::default() };
        let exact = Query { exact: true, ..q.clone() };
        let n = n_items as usize;
        assert!(m.scans(n));
        assert_eq!(m.stale(), n, "every item waits for the graph");
        let scanned = m.recommend_many(&users, &q);
        assert!(scanned.iter().all(|l| l.len() == 10));
        assert_eq!(scanned, m.recommend_many(&users, &exact));
        // Half linked: still scanning.
        m.reindex(n / 2);
        assert!(m.scans(n));
        assert_eq!(m.recommend_many(&users, &q), m.recommend_many(&users, &exact));
        assert_eq!(m.reindex(usize::MAX), 0);
        assert!(!m.scans(n));
        let index = m.index.read();
        assert_eq!((index.nodes(), index.len()), (n, n - hidden.len()));
        drop(index);
        let lists = m.recommend_many(&users, &q);
        assert!(lists.iter().all(|l| l.len() == 10));
        let hidden_ext: Vec<ExtId> = hidden.iter().map(|&i| ExtId::Int(i)).collect();
        assert!(
            lists.iter().flatten().all(|r| !hidden_ext.contains(&r.item)),
            "an unavailable item was listed"
        );
    }

    /// A graph saved without the unavailable items (as graphs were before they went in as
    /// routing nodes) takes them in after a load, and the index answers again once it has.
    #[test]
    fn a_loaded_graph_lacking_items_takes_them_in() {
        let c = Config { auto_reindex: false, exact_below: 0, ..cfg() };
        let m = Model::new(c.clone());
        let n = 1000usize;
        for i in 0..n as i64 {
            m.upsert_item(&ExtId::Int(i), &[], None, Some(i % 10 != 3));
        }
        m.apply(&(0..3000).map(|k| ev(k % 40, (k * 13) % n as i64, T0)).collect::<Vec<_>>(), "");
        let st = m.state.into_inner();
        let mut index = Hnsw::new(c.mf.dim, c.hnsw.clone());
        for i in 0..n as u32 {
            if st.meta[i as usize].available {
                index.upsert(i, st.mf.item_vector(i));
            }
        }
        let loaded = Model::assemble(c, st, index, Dirty::default());
        assert!(loaded.scans(n), "a tenth of the catalog is missing from the graph");
        assert_eq!(loaded.stale(), n / 10);
        assert_eq!(loaded.reindex(usize::MAX), 0);
        assert!(!loaded.scans(n));
        assert_eq!((loaded.index.read().nodes(), loaded.index.read().len()), (n, n - n / 10));
    }

    /// An item that moves again while its re-link is under way stays dirty afterwards.
    #[test]
    fn items_moved_during_a_reindex_stay_dirty() {
        let m = Model::new(Config { auto_reindex: false, exact_below: 0, ..cfg() });
        m.apply(&[ev(1, 10, T0), ev(2, 11, T0)], "");
        m.reindex_with(usize::MAX, || {
            m.apply(&[ev(3, 10, T0 + 1.0)], "");
        });
        assert_eq!(m.dirty.lock().pending(), vec![0]);
        assert_eq!(m.reindex(usize::MAX), 0);
    }

    /// Loading with a new configuration applies what may change and refuses what may not.
    #[test]
    fn loading_applies_changed_settings_and_refuses_fixed_ones() {
        let m = planted(cfg());
        let bytes = m.snapshot_bytes(7).unwrap();
        let mut wanted = cfg();
        wanted.event_weights.push(("share".into(), 5.0));
        wanted.limits.max_frame_bytes = 1 << 10;
        wanted.mf.alpha = 0.5;
        wanted.dedup_window = 3;
        let (loaded, seq) = Model::from_snapshot_bytes_with(&bytes, Some(&wanted)).unwrap();
        assert_eq!(seq, 7);
        assert_eq!(loaded.config().limits.max_frame_bytes, 1 << 10);
        let share = Record::Interaction {
            user: ExtId::Int(1),
            item: ExtId::Int(2),
            kind: Some("share".into()),
            weight: None,
            id: None,
            ts: T0,
        };
        // The new alpha re-derived the missing-data Gramian: it is what an exact pass gives.
        let held = loaded.state.read().mf.gramian_q();
        loaded.state.write().mf.recompute_gramians();
        let exact = loaded.state.read().mf.gramian_q();
        assert!(held.iter().zip(&exact).all(|(a, b)| (a - b).abs() <= 1e-9 * (1.0 + b.abs())));
        assert_ne!(held, m.state.read().mf.gramian_q(), "alpha 0.5 weighs items differently");
        assert_eq!(loaded.state.read().dedup.capacity(), 3);
        assert_eq!(loaded.apply(&[share], "").applied, 1);
        for (name, change) in [
            ("dim", Box::new(|c: &mut Config| c.mf.dim = 16) as Box<dyn Fn(&mut Config)>),
            ("hnsw_m", Box::new(|c: &mut Config| c.hnsw.m = 8)),
            ("user_history_cap", Box::new(|c: &mut Config| c.mf.user_history_cap = 10)),
        ] {
            let mut bad = cfg();
            change(&mut bad);
            let err = Model::from_snapshot_bytes_with(&bytes, Some(&bad)).err().expect(name);
            assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }
}
