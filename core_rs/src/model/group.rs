//! Applying a group of records with coalesced, parallel vector solves.
//!
//! Every record is applied in order as on the per-event path — validation, the redelivery
//! window, histories, counts, trending, item neighbours, seen items and the per-batch reports —
//! except the factorization's solves and the neighbour counts (collected in order and counted
//! by list in parallel, with the same result: `Neighbours::add_all`): the events are
//! recorded ([`crate::mf::Mf::record_event`]) and, at the end of the group, each touched
//! user is solved once and then each touched item once, in parallel (see `mf::batch`). A user with five events in the group is solved once
//! with all five in its history; a hot item once, not once per event.
//!
//! Erase and item-attribute records are barriers: the events before one are solved, then it
//! is applied, then the rest, so an erasure never lands between an event and its solve and
//! attribute changes see the vectors they would see per event. At most [`MAX_COALESCED`]
//! events are coalesced into one solve ([`REPLAY_COALESCED`] while replaying at start-up).
//!
//! # Pipelined recording
//! A replay at start-up, and a live group of [`PIPELINE_FROM`] records or more
//! ([`Recording::Pipelined`]), records each run of interactions between two solves or
//! barriers in three stages, each taking every event in order: admission
//! (validation, the redelivery window, ids, the clock, the reports), the user's side (the
//! neighbour pairs, the user's history and count — `UserSide` of the factorization — and
//! seen items), the item's side (the item's history, count and popularity weight, `Z`,
//! trending, the fresh set — `ItemSide`). In step `k`, one thread admits the records of
//! step `k` and then takes the item's side of step `k - 2`'s, while the other takes the
//! user's side of step `k - 1`'s (`rayon::join`; the user's side, with a miss or two per
//! event on a large user base, weighs about as much as the two others together). Each
//! stage writes only its own fields, the user's side of an event needs only the ids
//! admission assigned and the item's side only the `UserStep` the user's side returned, so
//! every event is applied exactly as the serial recording applies it, in the same order on
//! each side: the model is the same bit for bit. Two differences that leave no trace: a
//! new user's seen list is made by the user's stage, and a new item joins the fresh set
//! when the item's stage takes its event (the serial path adds it when its id is assigned,
//! and the same event then settles its membership). In a replay, the neighbour counts of the
//! run are counted beside the first users' solve (they do not depend on the factorization);
//! a live group counts them first, as the serial path does, so that its users are solved
//! under the shared lock.
//!
//! # Locking
//! The group holds the state's upgradable read lock throughout, so no other writer runs
//! meanwhile, while queries do: the records are written under the write lock in chunks of
//! `RECORD_CHUNK` (readers get in between chunks), the parallel solves run under the shared
//! lock, and their results are installed under short write locks. The exact Gramian
//! recomputation, when due, is also computed under the shared lock and installed under a
//! short write lock. A pipelined recording of a live group holds the write lock for
//! [`LIVE_STEPS_PER_LOCK`] steps, then lets the stages drain (they are in between steps at
//! every step's end, so only a drained pipeline leaves the state as serial recording would)
//! and lets queries in. A replay at start-up, which nobody queries, holds it for a whole run
//! (up to [`REPLAY_COALESCED`] events) and for the neighbour counts beside the first users'
//! solve.

use std::collections::HashMap;

use parking_lot::{RwLockUpgradableReadGuard, RwLockWriteGuard};

use super::{mark_seen, seen_by, update_fresh, Admitted, ApplyReport, Book, Model, State};
use crate::coldstart::SortedIds;
use crate::decode::{self, Record};
use crate::ids::ExtId;
use crate::mf::{ItemSide, MfConfig, UserSide, UserStep};
use crate::neighbours::{prefetch, Adds};
use crate::trending::Trending;

/// Most events whose solves are coalesced into one: bounds the memory of a solve and how far
/// the vectors may lag the histories within one group.
pub const MAX_COALESCED: usize = 1 << 16;
/// [`MAX_COALESCED`] for a replay at start-up ([`Model::apply_journal`] with `replay`): its
/// groups (up to `REPLAY_MERGE_BYTES` of journal, a few hundred thousand events) are solved
/// once each, which halves a replay's solve work against solving every 65,536 events. It bounds
/// the pending neighbour pairs (up to `neighbour_window` per event) held meanwhile.
pub const REPLAY_COALESCED: usize = 1 << 20;
/// Records written under one write-lock acquisition while a group is recorded (~1 µs each).
const RECORD_CHUNK: usize = 256;
/// Records each stage of a pipelined recording takes per step: a step is one hand-over
/// between the stages and between the two threads.
const PIPELINE_STEP: usize = 2048;
/// How many events ahead the user stage asks for what the next events' users read.
const USER_PREFETCH_AHEAD: usize = 8;
/// Fewest records of a live group (one whose reports name their users) that are recorded
/// pipelined: two steps, the least that keeps both threads busy for a step. Smaller groups,
/// the common case while the model keeps up, are recorded serially, without the hand-overs.
/// On `bench mf`'s stream at dim 64 (1M events in ingest calls of 10,000), recording its
/// groups pipelined took the updates from 87.5k to 98.8k events/s on two cores (means of four
/// runs each, alternating; every pair won).
const PIPELINE_FROM: usize = 2 * PIPELINE_STEP;
/// Steps a pipelined recording of a live group takes under one write lock (8,192 records, a
/// few milliseconds), after which queries get in, as between the chunks of a serial
/// recording. A replay at start-up, which nobody queries, holds the lock for a whole run.
const LIVE_STEPS_PER_LOCK: usize = 4;

/// Fewest bytes of journal records [`Model::apply_journal`] decodes on the thread pool; less
/// (a live stream's groups, a few kilobytes) is decoded on the calling thread. Handing a small
/// group's decode to the pool cost more than the decode: each hand-over wakes the pool's
/// threads, which then spin (`sched_yield`) looking for more work, taking the cores from the
/// threads computing lists.
const DECODE_PARALLEL_FROM: usize = 1 << 20;

/// How the interactions of a group are recorded (the solves are the same either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recording {
    /// Each record whole, one after another, on the calling thread.
    Serial,
    /// In three stages on two threads: admission, the user's side and the item's side of
    /// each event (see the module docs); the same model as [`Recording::Serial`]. The write
    /// lock is held for `steps_per_lock` steps at most: the stages are then drained and the
    /// lock let go before the next records (`usize::MAX`: for a whole run).
    Pipelined { steps_per_lock: usize },
}

type Shared<'a> = RwLockUpgradableReadGuard<'a, State>;

/// Records one producer sent, accepted at one time (one frame, one journal record).
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub records: &'a [Record],
    pub producer: &'a str,
    pub accepted_at: f64,
}

/// Users of recorded events whose solves are pending, and the neighbour pairs to count.
#[derive(Default)]
struct PendingUsers {
    ids: Vec<u32>,
    /// By dense id: whether the user is pending (kept across takes, all false then).
    marks: Vec<bool>,
    /// New (item, the user's recent items) pairs for the neighbour counts.
    pairs: Adds,
}

/// Items of recorded events whose solves are pending.
#[derive(Default)]
struct PendingItems {
    /// Each item with the popularity weight it was held at in `S~` before its first event.
    ids: Vec<(u32, f64)>,
    marks: Vec<bool>,
}

/// What is recorded and not solved yet.
#[derive(Default)]
struct Pending {
    /// Events recorded for the factorization.
    events: usize,
    users: PendingUsers,
    items: PendingItems,
}

/// Marks `id`; true if it was not marked yet.
fn mark(marks: &mut Vec<bool>, id: u32) -> bool {
    let id = id as usize;
    if id >= marks.len() {
        marks.resize((id + 1).next_power_of_two(), false);
    }
    !std::mem::replace(&mut marks[id], true)
}

impl PendingUsers {
    fn add(&mut self, u: u32) {
        if mark(&mut self.marks, u) {
            self.ids.push(u);
        }
    }
}

impl PendingItems {
    fn add(&mut self, i: u32, held: f64) {
        if mark(&mut self.marks, i) {
            self.ids.push((i, held));
        }
    }
}

impl Pending {
    fn add(&mut self, u: u32, i: u32, held: f64) {
        self.users.add(u);
        self.items.add(i, held);
        self.events += 1;
    }

    fn is_empty(&self) -> bool {
        self.events == 0 && self.users.pairs.is_empty()
    }

    /// The pending users, items and pairs; leaves nothing pending.
    fn take(&mut self) -> (Vec<u32>, Vec<(u32, f64)>, Adds) {
        for &u in &self.users.ids {
            self.users.marks[u as usize] = false;
        }
        for &(i, _) in &self.items.ids {
            self.items.marks[i as usize] = false;
        }
        self.events = 0;
        (
            std::mem::take(&mut self.users.ids),
            std::mem::take(&mut self.items.ids),
            std::mem::take(&mut self.users.pairs),
        )
    }
}

/// What the first stage of a pipelined recording writes: admission.
struct IdStage<'a> {
    book: Book<'a>,
    /// The model's counts of applied, duplicate and refused records.
    totals: [&'a mut u64; 3],
    mf: &'a MfConfig,
    /// [`Pending::events`]: the first stage knows which events the factorization records.
    events: &'a mut usize,
    /// Records admitted since the last solve.
    admitted: usize,
}

/// What the second stage writes: the user's side.
struct UserStage<'a> {
    seen: &'a mut Vec<Vec<u32>>,
    mf: UserSide<'a>,
    pending: &'a mut PendingUsers,
}

/// What the third stage writes: the item's side.
struct ItemStage<'a> {
    mf: ItemSide<'a>,
    trending: &'a mut Trending,
    fresh: &'a mut SortedIds,
    pending: &'a mut PendingItems,
}

/// An interaction admitted by the first stage, and the user's side of it from the second
/// (None: its weight or time is not a valid event for the factorization; only trending
/// and the fresh set take it, as on the serial path).
struct Step {
    u: u32,
    i: u32,
    w: f32,
    ts: f64,
    user: Option<UserStep>,
}

/// A group being applied: what applying its batches has produced so far.
struct Applying {
    /// Whether the reports name the users each batch touched.
    users: bool,
    /// Most events solved together.
    most: usize,
    reports: Vec<ApplyReport>,
    touched: Vec<HashMap<ExtId, Option<ExtId>>>,
    /// Items whose vectors moved, for the index.
    moved: Vec<u32>,
    pending: Pending,
}

/// Why the first stage of a pipelined recording stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stop {
    /// It took its [`PIPELINE_STEP`] records; more follow.
    Step,
    /// The next record is an erasure or an item upsert.
    Barrier,
    /// The pending events reached the coalescing bound.
    Full,
    /// A batch ended and the model solves after each (`coalesce_records` off).
    BatchEnd,
    /// It took its steps under this write lock; the rest follow under the next.
    Pause,
    /// The group is recorded.
    End,
}

fn stages<'a>(st: &'a mut State, pending: &'a mut Pending) -> (IdStage<'a>, UserStage<'a>, ItemStage<'a>) {
    let State {
        users,
        items,
        meta,
        seen,
        dedup,
        newest_ts,
        events_applied,
        duplicates,
        rejected,
        mf,
        trending,
        fresh,
        ..
    } = st;
    let (cfg, user_side, item_side) = mf.sides();
    let first = IdStage {
        book: Book { users, items, meta, dedup, newest_ts },
        totals: [events_applied, duplicates, rejected],
        mf: cfg,
        events: &mut pending.events,
        admitted: 0,
    };
    let second = UserStage { seen, mf: user_side, pending: &mut pending.users };
    (first, second, ItemStage { mf: item_side, trending, fresh, pending: &mut pending.items })
}

/// Counts a record's outcome in its batch's report (`j`: its place in the batch); returns
/// which of the model's totals it adds to (applied, duplicates, refused).
fn tally(report: &mut ApplyReport, j: usize, result: Result<bool, String>) -> usize {
    match result {
        Ok(true) => {
            report.applied += 1;
            0
        }
        Ok(false) => {
            report.duplicates += 1;
            1
        }
        Err(reason) => {
            report.rejected.push((j, reason));
            2
        }
    }
}

fn upgrade(g: Shared<'_>) -> RwLockWriteGuard<'_, State> {
    RwLockUpgradableReadGuard::upgrade(g)
}

fn downgrade(w: RwLockWriteGuard<'_, State>) -> Shared<'_> {
    RwLockWriteGuard::downgrade_to_upgradable(w)
}

impl Model {
    /// Applies batches in order as one group (see the module docs); one report per batch,
    /// numbering refusals by record within the batch.
    pub fn apply_group(&self, batches: &[Batch<'_>]) -> Vec<ApplyReport> {
        self.apply_group_reporting(batches, true, MAX_COALESCED)
    }

    /// [`Model::apply_group`]; without `users` the reports leave `touched_users` empty (a
    /// replay at start-up has nobody to tell, and skips noting every event's user) and the
    /// group is recorded pipelined ([`Recording::Pipelined`]) under one write lock per run;
    /// with `users`, a group of [`PIPELINE_FROM`] records or more is recorded pipelined
    /// [`LIVE_STEPS_PER_LOCK`] steps per write lock, a smaller one serially. At most
    /// `max_coalesced` events are solved together.
    pub fn apply_group_reporting(
        &self,
        batches: &[Batch<'_>],
        users: bool,
        max_coalesced: usize,
    ) -> Vec<ApplyReport> {
        let records: usize = batches.iter().map(|b| b.records.len()).sum();
        let recording = if !users {
            Recording::Pipelined { steps_per_lock: usize::MAX }
        } else if records >= PIPELINE_FROM {
            Recording::Pipelined { steps_per_lock: LIVE_STEPS_PER_LOCK }
        } else {
            Recording::Serial
        };
        self.apply_group_recording(batches, users, max_coalesced, recording)
    }

    /// [`Model::apply_group_reporting`], recording as `recording` says.
    pub fn apply_group_recording(
        &self,
        batches: &[Batch<'_>],
        users: bool,
        max_coalesced: usize,
        recording: Recording,
    ) -> Vec<ApplyReport> {
        let mut a = Applying {
            users,
            most: max_coalesced,
            reports: vec![ApplyReport::default(); batches.len()],
            touched: vec![HashMap::new(); batches.len()],
            moved: Vec::new(),
            pending: Pending::default(),
        };
        let g = self.state.upgradable_read();
        let mut g = match recording {
            Recording::Serial => self.record_serial(g, batches, &mut a),
            Recording::Pipelined { steps_per_lock } => {
                self.record_pipelined(g, batches, &mut a, steps_per_lock)
            }
        };
        if !a.pending.is_empty() {
            g = self.solve_pending(g, &mut a.pending, &mut a.moved, !users);
        }
        drop(g);
        self.mark_dirty(a.moved);
        let mut reports = a.reports;
        if users {
            for (report, t) in reports.iter_mut().zip(a.touched) {
                report.touched_users = t.into_iter().collect();
            }
        }
        if self.cfg.auto_reindex {
            self.reindex(usize::MAX);
        }
        reports
    }

    /// Applies the group's records one after another under write locks of [`RECORD_CHUNK`]
    /// records, solving where a barrier, the coalescing bound or (`coalesce_records` off) a
    /// batch's end says.
    fn record_serial<'s>(&'s self, mut g: Shared<'s>, batches: &[Batch<'_>], a: &mut Applying) -> Shared<'s> {
        for (b, batch) in batches.iter().enumerate() {
            for (chunk_no, chunk) in batch.records.chunks(RECORD_CHUNK).enumerate() {
                let mut st = upgrade(g);
                let mut counts = [0u64; 3];
                for (j, rec) in chunk.iter().enumerate() {
                    let barrier = !matches!(rec, Record::Interaction { .. });
                    if (barrier && !a.pending.is_empty()) || a.pending.events >= a.most {
                        st = upgrade(self.solve_pending(downgrade(st), &mut a.pending, &mut a.moved, false));
                    }
                    let touched = &mut a.touched[b];
                    let result = if barrier {
                        let erased = &mut a.reports[b].erased_users;
                        self.apply_one(
                            &mut st,
                            rec,
                            batch.producer,
                            batch.accepted_at,
                            &mut a.moved,
                            touched,
                            erased,
                        )
                    } else {
                        let touched = a.users.then_some(touched);
                        self.record(&mut st, rec, batch.producer, batch.accepted_at, &mut a.pending, touched)
                    };
                    counts[tally(&mut a.reports[b], chunk_no * RECORD_CHUNK + j, result)] += 1;
                }
                st.events_applied += counts[0];
                st.duplicates += counts[1];
                st.rejected += counts[2];
                self.publish(&st);
                g = downgrade(st);
            }
            if !self.cfg.coalesce_records && !a.pending.is_empty() {
                g = self.solve_pending(g, &mut a.pending, &mut a.moved, false);
            }
        }
        g
    }

    /// Applies the group's records as [`Model::record_serial`] does, each run of interactions
    /// between two solves or barriers in three stages on two threads (see the module docs),
    /// under one write lock per `steps_per_lock` steps of the run.
    fn record_pipelined<'s>(
        &'s self,
        mut g: Shared<'s>,
        batches: &[Batch<'_>],
        a: &mut Applying,
        steps_per_lock: usize,
    ) -> Shared<'s> {
        // The next record: (batch, place in it).
        let mut at = (0usize, 0usize);
        // Records admitted since the last solve, carried from one write lock to the next.
        let mut admitted_since_solve = 0;
        let mut admitted: Vec<Step> = Vec::with_capacity(PIPELINE_STEP);
        let mut for_users: Vec<Step> = Vec::with_capacity(PIPELINE_STEP);
        let mut for_items: Vec<Step> = Vec::with_capacity(PIPELINE_STEP);
        loop {
            let mut st = upgrade(g);
            let mut stop = Stop::Step;
            {
                let (mut first, mut second, mut third) = stages(&mut st, &mut a.pending);
                first.admitted = admitted_since_solve;
                let mut steps = 0;
                let mut touched = a.users.then_some(&mut a.touched[..]);
                let reports = &mut a.reports[..];
                // Step k: the first stage takes records while the second stage takes the
                // user's side of step k - 1's and then the third the item's side of step
                // k - 2's; after the first stage stops, two more steps drain the others.
                loop {
                    let running = stop == Stop::Step;
                    (stop, ()) = rayon::join(
                        || {
                            let stop = if running {
                                let touched = touched.as_deref_mut();
                                self.admit_run(
                                    &mut first,
                                    batches,
                                    &mut at,
                                    reports,
                                    touched,
                                    a.most,
                                    &mut admitted,
                                )
                            } else {
                                stop
                            };
                            self.record_items(&mut third, &for_items);
                            stop
                        },
                        || self.record_users(&mut second, &mut for_users),
                    );
                    for_items.clear();
                    std::mem::swap(&mut for_items, &mut for_users);
                    std::mem::swap(&mut for_users, &mut admitted);
                    if stop == Stop::Step {
                        steps += 1;
                        if steps == steps_per_lock {
                            stop = Stop::Pause; // the stages drain, then queries get in
                        }
                    }
                    if stop != Stop::Step && for_users.is_empty() && for_items.is_empty() {
                        break;
                    }
                }
                admitted_since_solve = if stop == Stop::Pause { first.admitted } else { 0 };
            }
            self.publish(&st);
            g = downgrade(st);
            match stop {
                Stop::Step => unreachable!("the run ends at a stop"),
                Stop::Pause => {}
                Stop::Full | Stop::BatchEnd => {
                    if !a.pending.is_empty() {
                        g = self.solve_pending(g, &mut a.pending, &mut a.moved, !a.users);
                    }
                }
                Stop::Barrier => {
                    if !a.pending.is_empty() {
                        g = self.solve_pending(g, &mut a.pending, &mut a.moved, !a.users);
                    }
                    let (b, j) = at;
                    let batch = &batches[b];
                    let mut st = upgrade(g);
                    let report = &mut a.reports[b];
                    let result = self.apply_one(
                        &mut st,
                        &batch.records[j],
                        batch.producer,
                        batch.accepted_at,
                        &mut a.moved,
                        &mut a.touched[b],
                        &mut report.erased_users,
                    );
                    let total = tally(report, j, result);
                    let State { events_applied, duplicates, rejected, .. } = &mut *st;
                    *[events_applied, duplicates, rejected][total] += 1;
                    self.publish(&st);
                    g = downgrade(st);
                    at = (b, j + 1);
                }
                Stop::End => return g,
            }
        }
    }

    /// The first stage: admits records from `at` on ([`Model::admit_ids`]), pushing the
    /// admitted interactions to `out`, until [`PIPELINE_STEP`] records are taken or a solve
    /// or a barrier is due (see [`Stop`]); `at` is left at the next record.
    #[allow(clippy::too_many_arguments)]
    fn admit_run(
        &self,
        s: &mut IdStage<'_>,
        batches: &[Batch<'_>],
        at: &mut (usize, usize),
        reports: &mut [ApplyReport],
        mut touched: Option<&mut [HashMap<ExtId, Option<ExtId>>]>,
        most: usize,
        out: &mut Vec<Step>,
    ) -> Stop {
        let mut taken = 0;
        loop {
            let (b, j) = *at;
            let Some(batch) = batches.get(b) else { return Stop::End };
            if j == batch.records.len() {
                *at = (b + 1, 0);
                // Nothing admitted since the last solve: nothing is pending.
                if !self.cfg.coalesce_records && s.admitted > 0 {
                    return Stop::BatchEnd;
                }
                continue;
            }
            let rec = &batch.records[j];
            let Record::Interaction { user, id, .. } = rec else { return Stop::Barrier };
            if *s.events >= most {
                return Stop::Full;
            }
            if taken == PIPELINE_STEP {
                return Stop::Step;
            }
            taken += 1;
            *at = (b, j + 1);
            let result =
                self.admit_ids(&mut s.book, rec, batch.producer, batch.accepted_at).map(|admitted| {
                    let Some(Admitted { u, i, w, ts, .. }) = admitted else { return false };
                    s.admitted += 1;
                    if s.mf.recorded_weight(w, ts).is_some() {
                        *s.events += 1;
                    }
                    out.push(Step { u, i, w, ts, user: None });
                    if let Some(touched) = touched.as_deref_mut() {
                        touched[b].insert(user.clone(), id.clone());
                    }
                    true
                });
            *s.totals[tally(&mut reports[b], j, result)] += 1;
        }
    }

    /// The second stage: the user's side of each admitted interaction, in order (the
    /// neighbour pairs, the user's history, count and seen items), as [`Model::record`].
    fn record_users(&self, s: &mut UserStage<'_>, steps: &mut [Step]) {
        let window = self.cfg.neighbour_window;
        for k in 0..steps.len() {
            // The users are scattered over memory and each is a miss or two: their entries
            // are asked for two distances ahead, what the entries point to one distance ahead.
            if let Some(ahead) = steps.get(k + 2 * USER_PREFETCH_AHEAD) {
                if let Some(seen) = s.seen.get(ahead.u as usize) {
                    prefetch(seen);
                }
                s.mf.prefetch(ahead.u, false);
            }
            if let Some(ahead) = steps.get(k + USER_PREFETCH_AHEAD) {
                if let Some(first) = s.seen.get(ahead.u as usize).and_then(|seen| seen.first()) {
                    prefetch(first);
                }
                s.mf.prefetch(ahead.u, true);
            }
            let step = &mut steps[k];
            let (u, i) = (step.u, step.i);
            let seen = seen_by(s.seen, u);
            if self.cfg.neighbour_weight > 0.0 && seen.binary_search(&i).is_err() {
                let mf = &s.mf;
                s.pending.pairs.push_with(i, |out| mf.extend_recent_items(u, window, out));
            }
            step.user = s.mf.record_event(u, i, step.w, step.ts);
            if step.user.is_some() {
                s.pending.add(u);
            }
            mark_seen(seen, i);
        }
    }

    /// The third stage: the item's side of each interaction, in order (the item's history,
    /// count and popularity, trending, the fresh set), as [`Model::record`].
    fn record_items(&self, s: &mut ItemStage<'_>, steps: &[Step]) {
        for step in steps {
            if let Some(user_step) = step.user {
                let held = s.mf.record_event(step.u, step.i, step.ts, user_step);
                s.pending.add(step.i, held);
            }
            s.trending.add(step.i, step.w, step.ts);
            update_fresh(s.fresh, step.i, s.mf.item_count(step.i), self.cfg.explore_max_events);
        }
    }

    /// Applies journal records (`[accepted_at, frame]`, see [`decode::decode_journal_record`])
    /// in order as one group; per record, its acceptance time and report (refusals numbered
    /// by frame entry), or why it could not be read (it is then skipped). Without `users`,
    /// the batched path leaves the reports' `touched_users` empty. A `replay` (the engine
    /// catching up at start-up) coalesces up to [`REPLAY_COALESCED`] events per solve.
    pub fn apply_journal(
        &self,
        payloads: &[&[u8]],
        users: bool,
        replay: bool,
    ) -> Vec<Result<(f64, ApplyReport), String>> {
        use rayon::prelude::*;
        let decode = |p: &&[u8]| {
            let why = |e: decode::DecodeError| match e {
                decode::DecodeError::Incomplete => "the frame is incomplete".to_string(),
                decode::DecodeError::Invalid(reason) => reason,
            };
            let (at, bytes) = decode::decode_journal_record(p).map_err(why)?;
            let (frame, _) = decode::decode_frame(bytes, &self.cfg.limits).map_err(why)?;
            Ok((at, frame))
        };
        let decoded: Vec<Result<(f64, decode::Frame), String>> =
            if payloads.iter().map(|p| p.len()).sum::<usize>() < DECODE_PARALLEL_FROM {
                payloads.iter().map(decode).collect()
            } else {
                payloads.par_iter().map(decode).collect()
            };
        let batches: Vec<Batch<'_>> = decoded
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .map(|(at, f)| Batch { records: &f.records, producer: &f.tag, accepted_at: *at })
            .collect();
        let reports = if self.cfg.batch_apply {
            let most = if replay { REPLAY_COALESCED } else { MAX_COALESCED };
            self.apply_group_reporting(&batches, users, most)
        } else {
            batches.iter().map(|b| self.apply_at(b.records, b.producer, b.accepted_at)).collect()
        };
        let mut reports = reports.into_iter();
        decoded
            .into_iter()
            .map(|d| {
                let (at, frame) = d?;
                Ok((at, super::frame_report(frame, reports.next().unwrap_or_default())))
            })
            .collect()
    }

    /// Applies an interaction without solving: the solves are left to [`Model::solve_pending`].
    /// Ok(true) applied, Ok(false) duplicate, Err refused.
    fn record(
        &self,
        st: &mut State,
        rec: &Record,
        producer: &str,
        accepted_at: f64,
        pending: &mut Pending,
        touched: Option<&mut HashMap<ExtId, Option<ExtId>>>,
    ) -> Result<bool, String> {
        let Some((u, i, w, ts)) =
            self.admit(st, rec, producer, accepted_at, Some(&mut pending.users.pairs))?
        else {
            return Ok(false);
        };
        if let Some(held) = st.mf.record_event(u, i, w, ts) {
            pending.add(u, i, held);
        }
        self.note_event(st, u, i, w, ts);
        if let (Record::Interaction { user, id, .. }, Some(touched)) = (rec, touched) {
            touched.insert(user.clone(), id.clone());
        }
        Ok(true)
    }

    /// Solves the pending users, then items (`online_iters` times), and settles the items'
    /// attribute state as the per-event path does after each update. With `beside`, the
    /// neighbour counts (independent of the factorization) are counted beside the first
    /// users' solve, under the write lock (a replay: nobody is waiting to read); else first.
    fn solve_pending<'a>(
        &'a self,
        mut g: Shared<'a>,
        pending: &mut Pending,
        moved: &mut Vec<u32>,
        beside: bool,
    ) -> Shared<'a> {
        let (mut users, mut items, pairs) = pending.take();
        // Ascending ids: neighbouring rows, and one fixed order for the installs.
        users.sort_unstable();
        items.sort_unstable_by_key(|x| x.0);
        let ids: Vec<u32> = items.iter().map(|x| x.0).collect();
        // Per item: whether it counted in its attributes' vectors, and if so (with attributes)
        // its vector before the group, to move the sums from.
        let before: Vec<(bool, Option<Vec<f32>>)> = ids
            .iter()
            .map(|&i| {
                let member = g.attrs.is_member(i);
                let m = &g.meta[i as usize];
                let tracked = member && (m.category.is_some() || !m.tags.is_empty());
                (member, tracked.then(|| g.mf.item_vector(i).to_vec()))
            })
            .collect();
        let mut st = upgrade(g);
        st.mf.fold_popularity(&items);
        let mut users_solved = None;
        if beside && self.cfg.mf.online_iters > 0 {
            let State { mf, neighbours, .. } = &mut *st;
            let ((), solved) = rayon::join(|| neighbours.add_all(&pairs), || mf.solve_users(&users));
            users_solved = Some(solved);
        } else {
            st.neighbours.add_all(&pairs);
        }
        g = downgrade(st);
        for _ in 0..self.cfg.mf.online_iters {
            let solved = users_solved.take().unwrap_or_else(|| g.mf.solve_users(&users));
            let mut st = upgrade(g);
            let installed = st.mf.install(solved);
            debug_assert!(installed, "no other writer runs while a group holds the lock");
            g = downgrade(st);
            let solved = g.mf.solve_items(&ids);
            let mut st = upgrade(g);
            let installed = st.mf.install(solved);
            debug_assert!(installed, "no other writer runs while a group holds the lock");
            g = downgrade(st);
        }
        let mut st = upgrade(g);
        for (&i, (member, old)) in ids.iter().zip(&before) {
            match old {
                Some(old) => {
                    let new = st.mf.item_vector(i).to_vec();
                    let State { attrs, meta, .. } = &mut *st;
                    attrs.moved(i, &meta[i as usize], old, &new);
                }
                None if !member => {
                    st.settle_item(i, None);
                }
                None => {}
            }
        }
        moved.extend_from_slice(&ids);
        g = downgrade(st);
        if g.mf.gramians_due() {
            // Read-only, so under the shared lock: queries go on meanwhile.
            let exact = g.mf.exact_gramians();
            let mut st = upgrade(g);
            st.mf.install_gramians(exact);
            g = downgrade(st);
        }
        g
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Config;

    const T0: f64 = 1_700_000_000.0;

    fn cfg(batch_apply: bool) -> Config {
        let mut c = Config { batch_apply, auto_reindex: false, ..Config::default() };
        c.mf.dim = 16;
        c.mf.seed = 3;
        c.hnsw.seed = 3;
        c
    }

    fn ev(user: i64, item: i64, n: usize) -> Record {
        Record::Interaction {
            user: ExtId::Int(user),
            item: ExtId::Int(item),
            kind: None,
            weight: Some(1.0 + (n % 3) as f32),
            id: Some(ExtId::Int(n as i64)),
            ts: T0 + n as f64,
        }
    }

    /// A warm-up stream: 40 users over 30 items, applied per event to both models compared.
    fn warm() -> Vec<Record> {
        (0..600).map(|n| ev((n * 7 % 40) as i64, (n * n % 30) as i64, n)).collect()
    }

    fn model_after(batch_apply: bool, groups: &[Vec<Record>]) -> (Model, Vec<ApplyReport>) {
        let m = Model::new(cfg(false));
        m.apply_at(&warm(), "p", T0 + 1e4);
        let m = Model { cfg: cfg(batch_apply), ..m };
        let reports = groups.iter().map(|g| m.apply_at(g, "p", T0 + 1e4)).collect();
        (m, reports)
    }

    /// Everything but the vectors, which must agree exactly between the two paths.
    fn non_vector_state(m: &Model) -> String {
        let st = m.state.read();
        let mut out = String::new();
        for u in 0..st.mf.n_users() as u32 {
            out += &format!(
                "u{u} {:?} {:?} {}\n",
                st.mf.user_items(u),
                st.seen[u as usize],
                st.mf.user_count(u)
            );
        }
        for i in 0..st.mf.n_items() as u32 {
            let sims: Vec<f32> =
                (0..st.mf.n_items() as u32).map(|j| st.neighbours.similarity(i, j)).collect();
            out += &format!(
                "i{i} {:?} {} {} {:?}\n",
                st.mf.item_users(i),
                st.mf.item_count(i),
                st.trending.score(i, st.newest_ts),
                sims
            );
        }
        let s = m.stats();
        out += &format!(
            "{} {} {} {:?} {}",
            s.events_applied,
            s.duplicates,
            s.rejected,
            st.fresh.as_slice(),
            st.dedup.len()
        );
        out
    }

    fn vectors(m: &Model) -> (Vec<f32>, Vec<f32>) {
        let st = m.state.read();
        (st.mf.user_matrix().to_vec(), st.mf.item_matrix().to_vec())
    }

    /// Largest difference between two matrices relative to the largest entry of the first.
    fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
        let scale = a.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
    }

    fn sorted_users(r: &ApplyReport) -> Vec<(ExtId, Option<ExtId>)> {
        let mut v = r.touched_users.clone();
        v.sort_by_key(|(u, _)| format!("{u:?}"));
        v
    }

    /// A group of one event solves the same equations as the per-event path: the two differ
    /// only by rounding.
    #[test]
    fn one_event_group_matches_per_event() {
        let group = vec![ev(7, 11, 1000)];
        let (per, _) = model_after(false, std::slice::from_ref(&group));
        let (bat, _) = model_after(true, std::slice::from_ref(&group));
        assert_eq!(non_vector_state(&per), non_vector_state(&bat));
        let ((pu, pi), (bu, bi)) = (vectors(&per), vectors(&bat));
        assert!(max_rel_diff(&pu, &bu) < 1e-5, "users {}", max_rel_diff(&pu, &bu));
        assert!(max_rel_diff(&pi, &bi) < 1e-5, "items {}", max_rel_diff(&pi, &bi));
    }

    /// A group in which no user and no item repeats: every event of it is applied exactly as
    /// per event (histories, counts, trending, neighbours, seen, reports), and the vectors
    /// differ only through the Gramians (each solve does not see the group's other moves).
    #[test]
    fn group_without_repeats_matches_per_event() {
        let group: Vec<Record> = (0..10).map(|n| ev(100 + n as i64, n as i64 * 3, 1000 + n)).collect();
        let (per, rp) = model_after(false, std::slice::from_ref(&group));
        let (bat, rb) = model_after(true, std::slice::from_ref(&group));
        assert_eq!(non_vector_state(&per), non_vector_state(&bat));
        assert_eq!((rp[0].applied, rp[0].duplicates), (rb[0].applied, rb[0].duplicates));
        assert_eq!(sorted_users(&rp[0]), sorted_users(&rb[0]));
        let ((pu, pi), (bu, bi)) = (vectors(&per), vectors(&bat));
        assert!(max_rel_diff(&pu, &bu) < 0.05, "users {}", max_rel_diff(&pu, &bu));
        assert!(max_rel_diff(&pi, &bi) < 0.05, "items {}", max_rel_diff(&pi, &bi));
    }

    /// With repeats, a user's or item's events are solved together once: the non-vector
    /// state is still exact, and the vectors rank alike (one sweep per user instead of one
    /// per event moves them less far: with 17 events per user here, entries differ by up to
    /// half the largest one, while the users' top items agree).
    #[test]
    fn group_with_repeats_is_close_to_per_event() {
        let group: Vec<Record> =
            (0..200).map(|n| ev((n % 12) as i64, (n * 7 % 9) as i64, 2000 + n)).collect();
        let (per, _) = model_after(false, std::slice::from_ref(&group));
        let (bat, _) = model_after(true, std::slice::from_ref(&group));
        assert_eq!(non_vector_state(&per), non_vector_state(&bat));
        // Each user's top items agree with the per-event model's.
        let q = crate::model::Query { k: 5, exact: true, ..Default::default() };
        let mut same = 0;
        for u in 0..12 {
            let top =
                |m: &Model| m.recommend(&ExtId::Int(u), &q).into_iter().map(|r| r.item).collect::<Vec<_>>();
            let (a, b) = (top(&per), top(&bat));
            same += a.iter().filter(|x| b.contains(x)).count();
        }
        assert!(same >= 12 * 4, "{same} of 60 top-5 items shared");
    }

    /// An erase record inside a group is a barrier: the user's events before it are applied
    /// and then erased, those after it start a new history; as per event.
    #[test]
    fn erase_inside_a_group_is_a_barrier() {
        let erase = Record::EraseUser { user: ExtId::Int(5), ts: T0 };
        let mut group: Vec<Record> = (0..30).map(|n| ev((n % 6) as i64, (n % 10) as i64, 3000 + n)).collect();
        group.push(erase);
        group.extend((0..30).map(|n| ev((n % 6) as i64, (10 + n % 10) as i64, 4000 + n)));
        let (per, rp) = model_after(false, std::slice::from_ref(&group));
        let (bat, rb) = model_after(true, std::slice::from_ref(&group));
        assert_eq!(rb[0].erased_users, vec![ExtId::Int(5)]);
        assert_eq!(rp[0].erased_users, rb[0].erased_users);
        assert_eq!(non_vector_state(&per), non_vector_state(&bat));
        // The user's seen items are those after the erasure only.
        let mut seen: Vec<ExtId> = bat.seen(&ExtId::Int(5));
        seen.sort_by_key(|i| format!("{i:?}"));
        assert_eq!(seen, [11, 13, 15, 17, 19].map(ExtId::Int).to_vec());
    }

    /// A redelivery inside one group counts once, and the second copy is a duplicate.
    #[test]
    fn dedup_inside_one_group() {
        let group = vec![ev(1, 2, 5000), ev(3, 4, 5001), ev(1, 2, 5000), ev(3, 4, 5001), ev(1, 4, 5002)];
        let (bat, rb) = model_after(true, std::slice::from_ref(&group));
        let (per, _) = model_after(false, std::slice::from_ref(&group));
        assert_eq!((rb[0].applied, rb[0].duplicates), (3, 2));
        assert_eq!(non_vector_state(&per), non_vector_state(&bat));
    }

    /// An interaction of an unknown type: refused.
    fn refused() -> Record {
        Record::Interaction {
            user: ExtId::Int(1),
            item: ExtId::Int(1),
            kind: Some("nope".into()),
            weight: None,
            id: None,
            ts: T0,
        }
    }

    /// Batches of one group report separately, each numbering its own refusals.
    #[test]
    fn one_report_per_batch() {
        let m = Model::new(cfg(true));
        let bad = refused();
        let (a, b) = (vec![ev(1, 1, 1), bad.clone()], vec![bad, ev(2, 1, 2), ev(1, 1, 1)]);
        let r = m.apply_group(&[
            Batch { records: &a, producer: "p", accepted_at: T0 + 10.0 },
            Batch { records: &b, producer: "p", accepted_at: T0 + 10.0 },
        ]);
        assert_eq!((r[0].applied, r[0].duplicates, r[0].rejected.len()), (1, 0, 1));
        assert_eq!(r[0].rejected[0].0, 1);
        assert_eq!((r[1].applied, r[1].duplicates, r[1].rejected[0].0), (1, 1, 0));
        assert_eq!(m.stats().events_applied, 2);
    }

    /// The vectors do not depend on how many threads solve them: bit for bit the same with
    /// one thread as with four (the groups are large enough for every parallel step).
    #[test]
    fn thread_count_does_not_change_the_model() {
        let groups: Vec<Vec<Record>> = (0..4)
            .map(|g| {
                // 1,999 users and 1,027 items (the squares modulo 2,053) a group: enough for
                // the thread pool to solve both sides.
                (0..3000)
                    .map(|n| ev((n * 13 % 1999) as i64, (n * n % 2053) as i64, 10_000 * (g + 1) + n))
                    .collect()
            })
            .collect();
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            pool.install(|| {
                let (m, _) = model_after(true, &groups);
                let st = m.state.read();
                (vectors(&m), st.mf.gramian_p().to_vec(), st.mf.gramian_q())
            })
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let bits64 = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let (one, four) = (run(1), run(4));
        assert_eq!(bits(&one.0 .0), bits(&four.0 .0));
        assert_eq!(bits(&one.0 .1), bits(&four.0 .1));
        assert_eq!(bits64(&one.1), bits64(&four.1));
        assert_eq!(bits64(&one.2), bits64(&four.2));
    }

    /// The coalescing bound changes only how often a group stops to solve: with a bound of
    /// 7 events instead of the whole group, every report and all the non-vector state are the
    /// same, the vectors are not (one solve per user for the group against several); a group
    /// under both bounds gives the same model bit for bit.
    #[test]
    fn the_coalescing_bound_changes_only_the_vectors() {
        let group: Vec<Record> =
            (0..300).map(|n| ev((n % 20) as i64, (n * 7 % 23) as i64, 6000 + n)).collect();
        let run = |most: usize, records: &[Record]| {
            let m = Model::new(cfg(true));
            m.apply_at(&warm(), "p", T0 + 1e4);
            let batch = Batch { records, producer: "p", accepted_at: T0 + 1e4 };
            let reports = m.apply_group_reporting(&[batch], true, most);
            (m, reports)
        };
        let (small, rs) = run(7, &group);
        let (whole, rw) = run(REPLAY_COALESCED, &group);
        assert_eq!(non_vector_state(&small), non_vector_state(&whole));
        assert_eq!((rs[0].applied, rs[0].duplicates), (rw[0].applied, rw[0].duplicates));
        assert_eq!(sorted_users(&rs[0]), sorted_users(&rw[0]));
        assert_ne!(vectors(&small), vectors(&whole));
        let (live, _) = run(MAX_COALESCED, &group);
        assert_eq!(vectors(&live), vectors(&whole));
    }

    /// The whole model, vectors and Gramians bit for bit, and the ids' dense slots.
    fn whole_state(m: &Model) -> String {
        let st = m.state.read();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let bits64 = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        format!(
            "{}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
            non_vector_state(m),
            bits(st.mf.user_matrix()),
            bits(st.mf.item_matrix()),
            bits64(st.mf.gramian_p()),
            bits64(&st.mf.gramian_q()),
            st.users.slots(),
            st.items.slots(),
            st.meta.len(),
            (st.newest_ts, st.trending.top(20, &|_| true)),
        )
    }

    /// The pipelined recording applies a group exactly as the serial one: the same reports
    /// and the same model bit for bit, through several batches, redeliveries, refusals, new
    /// users and items, histories past their caps, an erasure and an item upsert (barriers),
    /// with the coalescing bound reached inside the group or not, and without coalescing
    /// across batches; runs long enough for many pipeline steps, under one write lock or
    /// letting it go after every step.
    #[test]
    fn pipelined_recording_equals_serial() {
        let small = || {
            let mut c = cfg(true);
            (c.mf.user_history_cap, c.mf.item_history_cap) = (8, 16);
            c
        };
        // Event `n` has the id `n` and a time within the server's clock.
        let event = |n: usize| match ev((n * 13 % 701) as i64, (n * n % 257) as i64, n) {
            Record::Interaction { user, item, kind, weight, id, .. } => {
                Record::Interaction { user, item, kind, weight, id, ts: T0 + (n % 5000) as f64 }
            }
            _ => unreachable!("ev builds interactions"),
        };
        let mut records: Vec<Record> = (0..9000).map(event).collect();
        // Redeliveries of earlier events, refusals, an erasure and an item upsert among them.
        for n in (0..60).rev() {
            records.insert(150 * n + 7, event(n));
        }
        records.insert(2500, refused());
        records.insert(4100, Record::EraseUser { user: ExtId::Int(13), ts: T0 });
        records.insert(4101, Record::EraseUser { user: ExtId::Int(26), ts: T0 });
        let upsert = Record::ItemUpsert {
            item: ExtId::Int(5),
            tags: vec!["t".into()],
            category: Some("c".into()),
            available: Some(true),
            ts: T0,
        };
        records.insert(6000, upsert);
        records.insert(8999, refused());
        let sizes = [100, 1, 2900, 37, 5000, 413, 600];
        let mut batches = Vec::new();
        let mut rest = &records[..];
        for (k, n) in sizes.iter().cycle().enumerate() {
            // Each batch accepted a second after the one before.
            let (head, tail) = rest.split_at((*n).min(rest.len()));
            batches.push((head.to_vec(), k));
            rest = tail;
            if rest.is_empty() {
                break;
            }
        }
        for (users, most, coalesce) in [
            (false, REPLAY_COALESCED, true),
            (false, 1000, true),
            (true, 3000, true),
            (false, 5000, false),
            (true, MAX_COALESCED, true),
            (true, 5000, false),
        ] {
            let run = |recording: Recording| {
                let mut c = small();
                c.coalesce_records = coalesce;
                let m = Model::new(small());
                m.apply_at(&warm(), "p0", T0 + 1e4);
                let m = Model { cfg: c, ..m };
                let group: Vec<Batch<'_>> = batches
                    .iter()
                    .map(|(r, k)| Batch { records: r, producer: "q", accepted_at: T0 + 1e4 + *k as f64 })
                    .collect();
                let reports = m.apply_group_recording(&group, users, most, recording);
                let reports: Vec<_> = reports
                    .iter()
                    .map(|r| {
                        (r.applied, r.duplicates, r.rejected.clone(), r.erased_users.clone(), sorted_users(r))
                    })
                    .collect();
                (whole_state(&m), reports)
            };
            let serial = run(Recording::Serial);
            let pipelined = run(Recording::Pipelined { steps_per_lock: usize::MAX });
            // The write lock let go after every step: the stages drained in between.
            let paused = run(Recording::Pipelined { steps_per_lock: 1 });
            let counts = serial
                .1
                .iter()
                .fold((0, 0, 0, 0), |(a, d, r, e), x| (a + x.0, d + x.1, r + x.2.len(), e + x.3.len()));
            assert_eq!(counts, (9003, 60, 2, 2), "users {users} most {most}");
            for (name, other) in [("pipelined", pipelined), ("paused", paused)] {
                assert_eq!(serial.1, other.1, "{name}: users {users} most {most} coalesce {coalesce}");
                assert!(serial.0 == other.0, "{name}: users {users} most {most} coalesce {coalesce}");
            }
        }
    }

    /// Without coalescing across batches, a batch that ends just where a pipelined recording
    /// lets the write lock go is still solved on its own: what was admitted before the pause
    /// counts after it.
    #[test]
    fn a_batch_ending_at_a_pause_is_solved_on_its_own() {
        let event = |n: usize| ev((n % 97) as i64, (n % 31) as i64, n);
        // Batches of a step of events, then redeliveries of a few of them (admitting nothing):
        // a pause falls after the step, and the batch ends with nothing admitted since.
        let batches: Vec<Vec<Record>> = (0..3)
            .map(|b| {
                let fresh = b * PIPELINE_STEP..(b + 1) * PIPELINE_STEP;
                fresh.clone().chain(fresh.take(5)).map(event).collect()
            })
            .collect();
        let run = |recording: Recording, coalesce: bool| {
            let mut c = cfg(true);
            c.coalesce_records = coalesce;
            let m = Model::new(c);
            m.apply_at(&warm(), "p0", T0 + 1e4);
            let group: Vec<Batch<'_>> =
                batches.iter().map(|r| Batch { records: r, producer: "q", accepted_at: T0 + 1e4 }).collect();
            let reports = m.apply_group_recording(&group, true, MAX_COALESCED, recording);
            (whole_state(&m), reports.iter().map(sorted_users).collect::<Vec<_>>())
        };
        let serial = run(Recording::Serial, false);
        assert!(serial == run(Recording::Pipelined { steps_per_lock: 1 }, false));
        // Solving the batches together would make another model.
        assert!(serial.0 != run(Recording::Serial, true).0);
    }

    /// Journal records are decoded in Rust; an unreadable one is reported and skipped while
    /// the rest of the group applies.
    #[test]
    fn journal_records_apply_and_unreadable_ones_are_skipped() {
        // [1700000000.5, bin(frame)] where the frame is ["t", [[T, {"user": 1, "item": 2}]]].
        let frame: Vec<u8> = [
            &[0x92, 0xa1, b't', 0x91, 0x92, 0xcb][..],
            &T0.to_be_bytes(),
            &[0x82, 0xa4, b'u', b's', b'e', b'r', 0x01, 0xa4, b'i', b't', b'e', b'm', 0x02],
        ]
        .concat();
        let mut good = vec![0x92, 0xcb];
        good.extend_from_slice(&(T0 + 0.5).to_be_bytes());
        good.extend_from_slice(&[0xc4, frame.len() as u8]);
        good.extend_from_slice(&frame);
        let m = Model::new(cfg(true));
        let out = m.apply_journal(&[&good, b"\x92\x01", &good], true, false);
        let (at, r) = out[0].as_ref().unwrap();
        assert_eq!((*at, r.applied, r.touched_users.clone()), (T0 + 0.5, 1, vec![(ExtId::Int(1), None)]));
        assert!(out[1].as_ref().unwrap_err().contains("journal record"), "{:?}", out[1]);
        assert_eq!(out[2].as_ref().unwrap().1.applied, 1);
        assert_eq!(m.stats().events_applied, 2);
        // Without users: the same counts and model, no users noted.
        let quiet = Model::new(cfg(true));
        let out = quiet.apply_journal(&[&good, b"\x92\x01", &good], false, true);
        let (at, r) = out[0].as_ref().unwrap();
        assert_eq!((*at, r.applied, r.touched_users.len()), (T0 + 0.5, 1, 0));
        assert!(out[1].is_err());
        assert_eq!(non_vector_state(&quiet), non_vector_state(&m));
        assert_eq!(vectors(&quiet), vectors(&m));
    }
}
