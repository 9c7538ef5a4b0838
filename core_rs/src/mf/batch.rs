//! Coalesced, parallel application of a group of events.
//!
//! The online path ([`Mf::update`]) solves `p_u`, then `q_i`, after every event. Over a group
//! of events the batched path instead records every event first ([`Mf::record_event`]:
//! histories, counts, the clock), then solves each touched user once and each touched item
//! once ([`Mf::solve_users`], [`Mf::solve_items`]), so a hot item with a thousand events in
//! the group costs one solve instead of a thousand, and a user with five events is solved once
//! with all five in its history.
//!
//! Given the other side's vectors and the Gramians, the users' solves are independent of one
//! another (eALS is a block coordinate method: `p_u` depends on `Q` and `S^q` only), and so
//! are the items' given `P` and `S^p`. The solves therefore run in parallel (rayon) on a
//! read-only model — callers hold only a shared lock meanwhile — and their results are
//! written afterwards by [`Mf::install`] in a fixed order. The Gramian change of a side,
//! `Σ_k a_k (new_k new_kᵀ − old_k old_kᵀ)`, is summed per output row over the rows in id
//! order, so the result is bit for bit the same whatever the number of threads and however
//! they are scheduled.
//!
//! Against the per-event path this is Jacobi over the group instead of Gauss-Seidel over its
//! events: every user of the group sees the item vectors as they were before the group, and
//! the items see the users' new vectors. With one event per group the two paths solve the
//! same equations (they round differently in the last bits: the popularity change is folded
//! into `S~` before the sweep instead of entering it as a rank-one term).

use rayon::prelude::*;

use super::kernels::{coord_sweep, replace_outer_rows, Scratch};
use super::Mf;

/// Fewest rows solved on the thread pool; fewer are solved on the calling thread (a live
/// stream's small groups neither wait for the pool nor keep its threads busy). Each hand-over
/// to the pool wakes its threads, which then spin (`sched_yield`) looking for more work: at
/// 10,000 events/s with 1,000 subscribers (groups of about 150 events, as many users and
/// items) that spinning took the cores from the threads computing lists, and with 128 here
/// an own event's push waited 141 ms at the median against 107 ms with 1,024 (`bench
/// latency`, three runs each, alternating).
pub(super) const PARALLEL_FROM: usize = 1024;
/// Gramian rows per task when a side's Gramian change is summed: a block stays in L1 while
/// every solved row streams past it once.
const DELTA_ROWS: usize = 8;

/// Which side of the factorization a [`Solved`] holds rows of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Users,
    Items,
}

/// New rows for some users or items, solved on a read-only model, with the change they make
/// to their side's Gramian. Install it with [`Mf::install`] before the model changes.
pub struct Solved {
    side: Side,
    dim: usize,
    ids: Vec<u32>,
    /// `ids.len() x dim`, row-major.
    rows: Vec<f32>,
    /// The Gramian change (`S^p` for users, `S~` for items), `dim x dim`.
    delta: Vec<f64>,
    /// The model's epoch the rows were solved at.
    epoch: u64,
}

impl Solved {
    /// The solved ids, in the order their rows are held.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The new row of the `k`-th id.
    pub fn row(&self, k: usize) -> &[f32] {
        &self.rows[k * self.dim..(k + 1) * self.dim]
    }
}

impl Mf {
    /// Records an event for a batched solve: both histories, the counts and the clock, as
    /// [`Mf::update`] does, but no vector moves. The popularity change of `q_i` in `S~` is
    /// deferred to [`Mf::fold_popularity`]. Returns the popularity weight `f_i^α` before the
    /// event, or None when `w` or `ts` is not a valid event (nothing is recorded).
    pub fn record_event(&mut self, u: u32, i: u32, w: f32, ts: f64) -> Option<f64> {
        let w = self.cfg.recorded_weight(w, ts)?;
        let held = self.record(u, i, w, ts, true);
        self.updates_since_exact += 1;
        self.epoch += 1;
        Some(held)
    }

    /// Moves each item's share of `S~` from the popularity weight it was held at (`held`,
    /// from [`Mf::record_event`] before the item's first event of the group) to its current
    /// one. Call once the group is recorded, before [`Mf::solve_users`].
    ///
    /// The matrix is split into blocks of rows for the threads, each block taking the items'
    /// terms in order: every element gets the same operations in the same order as one
    /// `replace_outer` per item would give it, whatever the number of threads.
    pub fn fold_popularity(&mut self, items: &[(u32, f64)]) {
        let d = self.cfg.dim;
        let mut coefs = Vec::new();
        let mut xs: Vec<f64> = Vec::new();
        for &(i, held) in items {
            let a = self.pop_w[i as usize];
            if a != held {
                coefs.push(a - held);
                xs.extend(self.item_vector(i).iter().map(|&v| v as f64));
            }
        }
        let fold = |(block, out): (usize, &mut [f64])| {
            for (k, &c) in coefs.iter().enumerate() {
                let x = &xs[k * d..(k + 1) * d];
                replace_outer_rows(out, block * DELTA_ROWS, d, c, x, 0.0, x);
            }
        };
        if coefs.len() < PARALLEL_FROM {
            self.st.chunks_mut(d * DELTA_ROWS).enumerate().for_each(fold);
        } else {
            self.st.par_chunks_mut(d * DELTA_ROWS).enumerate().for_each(fold);
        }
        self.epoch += 1;
    }

    /// One coordinate sweep for each of `users` (ids must be distinct and known) against the
    /// current `S^q`, in parallel; changes nothing.
    pub fn solve_users(&self, users: &[u32]) -> Solved {
        let reg = self.cfg.reg as f64;
        self.solve(Side::Users, users, |u, sc, row| {
            let (n, g) = self.gather_user(u as usize, sc);
            coord_sweep(row, n, sc, &self.st, None, g, reg);
            1.0
        })
    }

    /// One coordinate sweep for each of `items` (ids must be distinct and known) against the
    /// current `S^p`, in parallel; changes nothing. Fold the group's popularity changes first
    /// ([`Mf::fold_popularity`]).
    pub fn solve_items(&self, items: &[u32]) -> Solved {
        let reg = self.cfg.reg as f64;
        self.solve(Side::Items, items, |i, sc, row| {
            let (n, c) = self.gather_item(i as usize, sc);
            coord_sweep(row, n, sc, &self.sp, None, c, reg);
            self.pop_w[i as usize]
        })
    }

    /// Solves each id's row with `sweep` (which returns the row's weight in its Gramian) and
    /// sums the Gramian change.
    fn solve(
        &self,
        side: Side,
        ids: &[u32],
        sweep: impl Fn(u32, &mut Scratch, &mut [f32]) -> f64 + Sync,
    ) -> Solved {
        let d = self.cfg.dim;
        let current = |id: u32| match side {
            Side::Users => self.user_vector(id),
            Side::Items => self.item_vector(id),
        };
        let mut rows = vec![0.0f32; ids.len() * d];
        let mut coefs = vec![0.0f64; ids.len()];
        let solve_one = |sc: &mut Scratch, ((row, coef), &id): ((&mut [f32], &mut f64), &u32)| {
            row.copy_from_slice(current(id));
            *coef = sweep(id, sc, row);
        };
        if ids.len() < PARALLEL_FROM {
            let mut sc = Scratch::default();
            for item in rows.chunks_mut(d).zip(coefs.iter_mut()).zip(ids.iter()) {
                solve_one(&mut sc, item);
            }
        } else {
            rows.par_chunks_mut(d)
                .zip(coefs.par_iter_mut())
                .zip(ids.par_iter())
                // Each task's scratch grows to its longest history: few, long tasks.
                .with_min_len(32)
                .for_each_init(Scratch::default, solve_one);
        }
        // Σ_k a_k (new_k new_kᵀ − old_k old_kᵀ), summed over k in order for every element:
        // the matrix is split into blocks of rows for the threads, which never changes a sum.
        // The rows widened to f64, new and old (on the pool for a large group: tens of MB).
        let mut new64 = vec![0.0f64; rows.len()];
        let mut old64 = vec![0.0f64; rows.len()];
        type Widen<'a> = ((&'a mut [f64], &'a mut [f64]), (&'a [f32], &'a u32));
        let widen = |((new, old), (row, &id)): Widen<'_>| {
            for ((n, o), (&x, &y)) in new.iter_mut().zip(old.iter_mut()).zip(row.iter().zip(current(id))) {
                *n = x as f64;
                *o = y as f64;
            }
        };
        if ids.len() < PARALLEL_FROM {
            new64.chunks_mut(d).zip(old64.chunks_mut(d)).zip(rows.chunks(d).zip(ids)).for_each(widen);
        } else {
            new64
                .par_chunks_mut(d)
                .zip(old64.par_chunks_mut(d))
                .zip(rows.par_chunks(d).zip(ids.par_iter()))
                .with_min_len(256)
                .for_each(widen);
        }
        let delta_rows = |(block, out): (usize, &mut [f64])| {
            for (k, &a) in coefs.iter().enumerate() {
                let (x, y) = (&new64[k * d..(k + 1) * d], &old64[k * d..(k + 1) * d]);
                replace_outer_rows(out, block * DELTA_ROWS, d, a, x, a, y);
            }
        };
        let mut delta = vec![0.0f64; d * d];
        // Both branches compute the same thing in the same order.
        if ids.len() < PARALLEL_FROM {
            delta.chunks_mut(d * DELTA_ROWS).enumerate().for_each(delta_rows);
        } else {
            delta.par_chunks_mut(d * DELTA_ROWS).enumerate().for_each(delta_rows);
        }
        Solved { side, dim: d, ids: ids.to_vec(), rows, delta, epoch: self.epoch }
    }

    /// Writes solved rows and their Gramian change. Refuses (returns false) rows solved
    /// before the model last changed: they would not match the Gramian they update.
    pub fn install(&mut self, solved: Solved) -> bool {
        if solved.epoch != self.epoch {
            return false;
        }
        let d = self.cfg.dim;
        let (matrix, gram) = match solved.side {
            Side::Users => (&mut self.p, &mut self.sp),
            Side::Items => (&mut self.q, &mut self.st),
        };
        for (k, &id) in solved.ids.iter().enumerate() {
            let id = id as usize;
            matrix[id * d..(id + 1) * d].copy_from_slice(&solved.rows[k * d..(k + 1) * d]);
        }
        for (g, x) in gram.iter_mut().zip(&solved.delta) {
            *g += x;
        }
        self.epoch += 1;
        true
    }
}
