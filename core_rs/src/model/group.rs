//! Applying a group of records with coalesced, parallel vector solves.
//!
//! Every record is applied in order as on the per-event path — validation, the redelivery
//! window, histories, counts, trending, item neighbours, seen items and the per-batch reports —
//! except the factorization's solves and the neighbour counts (collected in order and counted
//! by list in parallel, with the same result: `Neighbours::add_all`): the events are recorded ([`crate::mf::Mf::record_event`])
//! and, at the end of the group, each touched user is solved once and then each touched item
//! once, in parallel (see `mf::batch`). A user with five events in the group is solved once
//! with all five in its history; a hot item once, not once per event.
//!
//! Erase and item-attribute records are barriers: the events before one are solved, then it
//! is applied, then the rest, so an erasure never lands between an event and its solve and
//! attribute changes see the vectors they would see per event. At most [`MAX_COALESCED`]
//! events are coalesced into one solve ([`REPLAY_COALESCED`] while replaying at start-up).
//!
//! # Locking
//! The group holds the state's upgradable read lock throughout, so no other writer runs
//! meanwhile, while queries do: the records are written under the write lock in chunks of
//! `RECORD_CHUNK` (readers get in between chunks), the parallel solves run under the shared
//! lock, and their results are installed under short write locks. The exact Gramian
//! recomputation, when due, is also computed under the shared lock and installed under a
//! short write lock.

use std::collections::HashMap;

use parking_lot::{RwLockUpgradableReadGuard, RwLockWriteGuard};

use super::{ApplyReport, Model, State};
use crate::decode::{self, Record};
use crate::ids::ExtId;
use crate::neighbours::Adds;

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
    /// By dense id: whether the user or item is pending (kept across takes, all false then).
    user_marks: Vec<bool>,
    /// Each item with the popularity weight it was held at in `S~` before its first event.
    items: Vec<(u32, f64)>,
    item_marks: Vec<bool>,
    events: usize,
    /// New (item, the user's recent items) pairs for the neighbour counts.
    pairs: Adds,
}

/// Marks `id`; true if it was not marked yet.
fn mark(marks: &mut Vec<bool>, id: u32) -> bool {
    let id = id as usize;
    if id >= marks.len() {
        marks.resize((id + 1).next_power_of_two(), false);
    }
    !std::mem::replace(&mut marks[id], true)
}

impl Pending {
    fn add(&mut self, u: u32, i: u32, held: f64) {
        if mark(&mut self.user_marks, u) {
            self.users.push(u);
        }
        if mark(&mut self.item_marks, i) {
            self.items.push((i, held));
        }
        self.events += 1;
    }

    fn is_empty(&self) -> bool {
        self.events == 0 && self.pairs.is_empty()
    }

    /// The pending users, items and pairs; leaves nothing pending.
    fn take(&mut self) -> (Vec<u32>, Vec<(u32, f64)>, Adds) {
        for &u in &self.users {
            self.user_marks[u as usize] = false;
        }
        for &(i, _) in &self.items {
            self.item_marks[i as usize] = false;
        }
        self.events = 0;
        (std::mem::take(&mut self.users), std::mem::take(&mut self.items), std::mem::take(&mut self.pairs))
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
    /// replay at start-up has nobody to tell, and skips noting every event's user). At most
    /// `max_coalesced` events are solved together.
    pub fn apply_group_reporting(
        &self,
        batches: &[Batch<'_>],
        users: bool,
        max_coalesced: usize,
    ) -> Vec<ApplyReport> {
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
                    if (barrier && !pending.is_empty()) || pending.events >= max_coalesced {
                        st = upgrade(self.solve_pending(downgrade(st), &mut pending, &mut moved));
                    }
                    let result = if barrier {
                        let erased = &mut report.erased_users;
                        self.apply_one(
                            &mut st,
                            rec,
                            batch.producer,
                            batch.accepted_at,
                            &mut moved,
                            touched,
                            erased,
                        )
                    } else {
                        let touched = users.then_some(&mut *touched);
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
            if !self.cfg.coalesce_records && !pending.is_empty() {
                g = self.solve_pending(g, &mut pending, &mut moved);
            }
        }
        if !pending.is_empty() {
            g = self.solve_pending(g, &mut pending, &mut moved);
        }
        drop(g);
        self.mark_dirty(moved);
        if users {
            for (report, t) in reports.iter_mut().zip(touched) {
                report.touched_users = t.into_iter().collect();
            }
        }
        if self.cfg.auto_reindex {
            self.reindex(usize::MAX);
        }
        reports
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
        let Some((u, i, w, ts)) = self.admit(st, rec, producer, accepted_at, Some(&mut pending.pairs))?
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
    /// attribute state as the per-event path does after each update.
    fn solve_pending<'a>(
        &'a self,
        mut g: Shared<'a>,
        pending: &mut Pending,
        moved: &mut Vec<u32>,
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
        st.neighbours.add_all(&pairs);
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

    /// Batches of one group report separately, each numbering its own refusals.
    #[test]
    fn one_report_per_batch() {
        let m = Model::new(cfg(true));
        let bad = Record::Interaction {
            user: ExtId::Int(1),
            item: ExtId::Int(1),
            kind: Some("nope".into()),
            weight: None,
            id: None,
            ts: T0,
        };
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
                (0..3000)
                    .map(|n| ev((n * 13 % 997) as i64, (n * n % 401) as i64, 10_000 * (g + 1) + n))
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
