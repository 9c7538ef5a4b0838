//! Recording an event in two halves that touch disjoint state: the user's side (its history
//! and event count) and the item's side (its history, count, popularity weight and `Z`, the
//! clock). [`Mf::record`] runs one after the other; a replay runs the user halves of a run of
//! events on one thread and the item halves, in the same order, on another (see
//! `model::group`), with the same result: each half only reads and writes its own side, and
//! the item half of an event needs nothing from the user half but the [`UserStep`] it returns.

use std::collections::VecDeque;

use super::kernels::add_outer;
use super::{init_row, remove_id, Entry, Mf, MfConfig, SIDE_ITEM, SIDE_USER};
use crate::neighbours::prefetch;

/// The user half of [`Mf`], borrowed apart from the item half.
pub struct UserSide<'a> {
    cfg: &'a MfConfig,
    n_users: &'a mut usize,
    p: &'a mut Vec<f32>,
    sp: &'a mut Vec<f64>,
    user_hist: &'a mut Vec<VecDeque<Entry>>,
    user_counts: &'a mut Vec<f64>,
}

/// The item half of [`Mf`], borrowed apart from the user half.
pub struct ItemSide<'a> {
    cfg: &'a MfConfig,
    n_items: &'a mut usize,
    q: &'a mut Vec<f32>,
    item_hist: &'a mut Vec<VecDeque<Entry>>,
    counts: &'a mut Vec<f64>,
    pop_w: &'a mut Vec<f64>,
    z: &'a mut f64,
    now: &'a mut f64,
    updates_since_exact: &'a mut u64,
    epoch: &'a mut u64,
}

/// What the user half of an event hands the item half: the user's entry for the item after
/// the event, whether the user held the item before it, and the item the user's capped
/// history evicted, if any.
#[derive(Clone, Copy, Debug)]
pub struct UserStep {
    entry: Entry,
    held: bool,
    evicted: Option<u32>,
}

impl Mf {
    /// The configuration, and the user and item halves to record events with (see the
    /// module docs).
    pub fn sides(&mut self) -> (&MfConfig, UserSide<'_>, ItemSide<'_>) {
        let Mf { cfg, n_users, n_items, p, q, user_hist, item_hist, counts, pop_w, user_counts, sp, .. } =
            self;
        let users = UserSide { cfg, n_users, p, sp, user_hist, user_counts };
        let items = ItemSide {
            cfg,
            n_items,
            q,
            item_hist,
            counts,
            pop_w,
            z: &mut self.z,
            now: &mut self.now,
            updates_since_exact: &mut self.updates_since_exact,
            epoch: &mut self.epoch,
        };
        (cfg, users, items)
    }
}

/// `2^(-age / half_life)`: how much of a weight survives `age` seconds (1 without decay).
pub(super) fn decay_factor(cfg: &MfConfig, age: f64) -> f64 {
    match cfg.decay_half_life {
        Some(h) if h > 0.0 && age > 0.0 => (-age / h).exp2(),
        _ => 1.0,
    }
}

/// Sets `f_i` and its popularity weight, moving `Z`; returns the weights before and after.
pub(super) fn set_pop(
    alpha: f32,
    counts: &mut [f64],
    pop_w: &mut [f64],
    z: &mut f64,
    i: usize,
    f_new: f64,
) -> (f64, f64) {
    let a_old = pop_w[i];
    let a_new = Mf::pop_of(f_new, alpha);
    counts[i] = f_new;
    pop_w[i] = a_new;
    *z = (*z + (a_new - a_old)).max(0.0);
    (a_old, a_new)
}

impl UserSide<'_> {
    /// Grows the user rows to `n`, each new row drawn from the seeded generator.
    pub(super) fn grow(&mut self, n: usize) {
        let d = self.cfg.dim;
        let mut tmp = vec![0.0; d];
        while *self.n_users < n {
            let row = init_row(self.cfg.seed, SIDE_USER, *self.n_users as u64, d, self.cfg.init_std);
            add_outer(self.sp, d, 1.0, &row, &mut tmp);
            self.p.extend_from_slice(&row);
            self.user_hist.push(VecDeque::new());
            self.user_counts.push(0.0);
            *self.n_users += 1;
        }
    }

    /// Asks the CPU to start loading what recording an event of user `u` reads: its entry
    /// (`history` false), or the history that entry points to (`history` true; ask for the
    /// entry some events earlier). A hint: it changes nothing.
    pub fn prefetch(&self, u: u32, history: bool) {
        let Some(h) = self.user_hist.get(u as usize) else { return };
        if history {
            if let Some(e) = h.as_slices().0.first() {
                prefetch(e);
            }
        } else {
            prefetch(h);
            prefetch(&self.user_counts[u as usize]);
        }
    }

    /// [`Mf::extend_recent_items`].
    pub fn extend_recent_items(&self, u: u32, n: usize, out: &mut Vec<u32>) {
        if let Some(h) = self.user_hist.get(u as usize) {
            out.extend(h.iter().skip(h.len().saturating_sub(n)).map(|e| e.id));
        }
    }

    /// The user half of [`Mf::record_event`]; None when `w` or `ts` is not a valid event
    /// (nothing is recorded, and the item half is skipped).
    pub fn record_event(&mut self, u: u32, i: u32, w: f32, ts: f64) -> Option<UserStep> {
        let w = self.cfg.recorded_weight(w, ts)?;
        Some(self.record(u, i, w, ts))
    }

    /// Stores the event in the user's history (accumulating a repeat, evicting the oldest
    /// entry beyond the cap) and counts it.
    pub(super) fn record(&mut self, u: u32, i: u32, w: f32, ts: f64) -> UserStep {
        self.grow(u as usize + 1);
        let uu = u as usize;
        let hist = &mut self.user_hist[uu];
        let held = hist.iter().position(|e| e.id == i);
        let entry = match held {
            Some(pos) => {
                let old = hist.remove(pos).expect("position is in range");
                let t = old.ts.max(ts);
                let w = old.w as f64 * decay_factor(self.cfg, t - old.ts)
                    + w as f64 * decay_factor(self.cfg, t - ts);
                Entry { id: i, n: old.n.saturating_add(1), w: w as f32, ts: t }
            }
            None => Entry { id: i, n: 1, w, ts },
        };
        hist.push_back(entry);
        let evicted = (hist.len() > self.cfg.user_history_cap)
            .then(|| hist.pop_front().expect("history is not empty").id);
        self.user_counts[uu] += 1.0;
        UserStep { entry, held: held.is_some(), evicted }
    }
}

impl ItemSide<'_> {
    /// Grows the item rows to `n`; a new item adds nothing to `S~` or `Z` until its first event.
    pub(super) fn grow(&mut self, n: usize) {
        let d = self.cfg.dim;
        while *self.n_items < n {
            let row = init_row(self.cfg.seed, SIDE_ITEM, *self.n_items as u64, d, self.cfg.init_std);
            self.q.extend_from_slice(&row);
            self.item_hist.push(VecDeque::new());
            self.counts.push(0.0);
            self.pop_w.push(0.0);
            *self.n_items += 1;
        }
    }

    /// `f_i`, the item's event count.
    pub fn item_count(&self, i: u32) -> f64 {
        self.counts.get(i as usize).copied().unwrap_or(0.0)
    }

    /// The item half of [`Mf::record_event`] for the `step` the user half returned; returns
    /// the popularity weight `f_i^α` before the event.
    pub fn record_event(&mut self, u: u32, i: u32, ts: f64, step: UserStep) -> f64 {
        let (held, _) = self.record(u, i, ts, step);
        *self.updates_since_exact += 1;
        *self.epoch += 1;
        held
    }

    /// Mirrors the user's entry in the item's history (the evicted item forgets the user),
    /// bumps `f_i` and moves the clock. Returns the popularity weights before and after; the
    /// caller moves `q_i`'s term in `S~`.
    pub(super) fn record(&mut self, u: u32, i: u32, ts: f64, step: UserStep) -> (f64, f64) {
        self.grow(i as usize + 1);
        if ts > *self.now {
            *self.now = ts;
        }
        if let Some(evicted) = step.evicted {
            remove_id(&mut self.item_hist[evicted as usize], u);
        }
        let ii = i as usize;
        // The item's copy mirrors the user's entry, so both sides see the same w_ui.
        let ih = &mut self.item_hist[ii];
        // Only a pair the user's history held can be in the item's (see the module docs of
        // `mf`): a first interaction skips the scan of up to `item_history_cap` entries.
        if step.held {
            if let Some(pos) = ih.iter().position(|e| e.id == u) {
                ih.remove(pos);
            }
        }
        ih.push_back(Entry { id: u, ..step.entry });
        if ih.len() > self.cfg.item_history_cap {
            ih.pop_front();
        }
        let f = self.counts[ii] + 1.0;
        set_pop(self.cfg.alpha, self.counts, self.pop_w, self.z, ii, f)
    }
}
