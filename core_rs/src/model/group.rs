//! Applying a group of records with coalesced, parallel vector solves.
//!
//! Every record is applied in order as on the per-event path — validation, the redelivery
//! window, histories, counts, trending, item neighbours, seen items and the per-batch reports —
//! except the factorization's solves: the events are recorded ([`crate::mf::Mf::record_event`])
//! and, at the end of the group, each touched user is solved once and then each touched item
//! once, in parallel (see `mf::batch`). A user with five events in the group is solved once
//! with all five in its history; a hot item once, not once per event.
//!
//! Erase and item-attribute records are barriers: the events before one are solved, then it
//! is applied, then the rest, so an erasure never lands between an event and its solve and
//! attribute changes see the vectors they would see per event. At most [`MAX_COALESCED`]
//! events are coalesced into one solve.
//!
//! # Locking
//! The group holds the state's upgradable read lock throughout, so no other writer runs
//! meanwhile, while queries do: the records are written under the write lock in chunks of
//! [`RECORD_CHUNK`] (readers get in between chunks), the parallel solves run under the shared
//! lock, and their results are installed under short write locks. The exact Gramian
//! recomputation, when due, is also computed under the shared lock and installed under a
//! short write lock.

use std::collections::{HashMap, HashSet};

use parking_lot::{RwLockUpgradableReadGuard, RwLockWriteGuard};

use super::{ApplyReport, Model, State};
use crate::decode::{self, Record};
use crate::ids::ExtId;

/// Most events whose solves are coalesced into one: bounds the memory of a solve and how far
/// the vectors may lag the histories within one group.
pub const MAX_COALESCED: usize = 1 << 16;
/// Records written under one write-lock acquisition while a group is recorded (~1 µs each).
const RECORD_CHUNK: usize = 256;

type Shared<'a> = RwLockUpgradableReadGuard<'a, State>;

/// Records one producer sent, accepted at one time (one frame, one journal record).
#[derive(Clone, Copy, Debug)]
pub struct Batch<'a> {
    pub records: &'a [Record],
    pub producer: &'a str,
    pub accepted_at: f64,
}

/// Users and items of recorded events whose solves are pending.
#[derive(Default)]
struct Pending {
    users: Vec<u32>,
    user_set: HashSet<u32>,
    /// Each item with the popularity weight it was held at in `S~` before its first event.
    items: Vec<(u32, f64)>,
    item_set: HashSet<u32>,
    events: usize,
}

impl Pending {
    fn add(&mut self, u: u32, i: u32, held: f64) {
        if self.user_set.insert(u) {
            self.users.push(u);
        }
        if self.item_set.insert(i) {
            self.items.push((i, held));
        }
        self.events += 1;
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
        let mut reports: Vec<ApplyReport> = vec![ApplyReport::default(); batches.len()];
        let mut touched: Vec<HashMap<ExtId, Option<ExtId>>> = vec![HashMap::new(); batches.len()];
        let mut moved = Vec::new();
        let mut pending = Pending::default();
        let mut g = self.state.upgradable_read();
        for (b, batch) in batches.iter().enumerate() {
            let (report, touched) = (&mut reports[b], &mut touched[b]);
            for (chunk_no, chunk) in batch.records.chunks(RECORD_CHUNK).enumerate() {
                let mut st = upgrade(g);
                let before = (report.applied, report.duplicates, report.rejected.len());
                for (j, rec) in chunk.iter().enumerate() {
                    let barrier = !matches!(rec, Record::Interaction { .. });
                    if (barrier && pending.events > 0) || pending.events >= MAX_COALESCED {
                        st = upgrade(self.solve_pending(downgrade(st), &mut pending, &mut moved));
                    }
                    let result = if barrier {
                        let erased = &mut report.erased_users;
                        self.apply_one(&mut st, rec, batch.producer, batch.accepted_at, &mut moved, touched, erased)
                    } else {
                        self.record(&mut st, rec, batch.producer, batch.accepted_at, &mut pending, touched)
                    };
                    match result {
                        Ok(true) => report.applied += 1,
                        Ok(false) => report.duplicates += 1,
                        Err(reason) => report.rejected.push((chunk_no * RECORD_CHUNK + j, reason)),
                    }
                }
                st.events_applied += (report.applied - before.0) as u64;
                st.duplicates += (report.duplicates - before.1) as u64;
                st.rejected += (report.rejected.len() - before.2) as u64;
                self.publish(&st);
                g = downgrade(st);
            }
        }
        if pending.events > 0 {
            g = self.solve_pending(g, &mut pending, &mut moved);
        }
        drop(g);
        self.mark_dirty(moved);
        for (report, t) in reports.iter_mut().zip(touched) {
            report.touched_users = t.into_iter().collect();
        }
        if self.cfg.auto_reindex {
            self.reindex(usize::MAX);
        }
        reports
    }

    /// Applies journal records (`[accepted_at, frame]`, see [`decode::decode_journal_record`])
    /// in order as one group; per record, its acceptance time and report (refusals numbered
    /// by frame entry), or why it could not be read (it is then skipped).
    pub fn apply_journal(&self, payloads: &[&[u8]]) -> Vec<Result<(f64, ApplyReport), String>> {
        use rayon::prelude::*;
        let decoded: Vec<Result<(f64, decode::Frame), String>> = payloads
            .par_iter()
            .map(|p| {
                let why = |e: decode::DecodeError| match e {
                    decode::DecodeError::Incomplete => "the frame is incomplete".to_string(),
                    decode::DecodeError::Invalid(reason) => reason,
                };
                let (at, bytes) = decode::decode_journal_record(p).map_err(why)?;
                let (frame, _) = decode::decode_frame(bytes, &self.cfg.limits).map_err(why)?;
                Ok((at, frame))
            })
            .collect();
        let batches: Vec<Batch<'_>> = decoded
            .iter()
            .filter_map(|d| d.as_ref().ok())
            .map(|(at, f)| Batch { records: &f.records, producer: &f.tag, accepted_at: *at })
            .collect();
        let reports = if self.cfg.batch_apply {
            self.apply_group(&batches)
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
        touched: &mut HashMap<ExtId, Option<ExtId>>,
    ) -> Result<bool, String> {
        let Some((u, i, w, ts)) = self.admit(st, rec, producer, accepted_at)? else {
            return Ok(false);
        };
        if let Some(held) = st.mf.record_event(u, i, w, ts) {
            pending.add(u, i, held);
        }
        self.note_event(st, u, i, w, ts);
        if let Record::Interaction { user, id, .. } = rec {
            touched.insert(user.clone(), id.clone());
        }
        Ok(true)
    }

    /// Solves the pending users, then items (`online_iters` times), and settles the items'
    /// attribute state as the per-event path does after each update.
    fn solve_pending<'a>(&'a self, mut g: Shared<'a>, pending: &mut Pending, moved: &mut Vec<u32>) -> Shared<'a> {
        let Pending { mut users, mut items, .. } = std::mem::take(pending);
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
        g = downgrade(st);
        for _ in 0..self.cfg.mf.online_iters {
            let solved = g.mf.solve_users(&users);
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
