//! Cold start for items: a vector for an item nobody has interacted with yet, learned from the
//! items that share its attributes (category and tags).
//!
//! Every attribute keeps the running sum and count of the vectors of its *member* items, the
//! items that carry it and have feedback. Its vector is the regularised mean
//! `sum / (count + ATTR_PRIOR)`: the ridge solution of `min_a Σ_members |q_i - a|² + prior·|a|²`,
//! which shrinks attributes seen on few items towards zero (an uninformed guess) instead of
//! trusting one item. A cold item's vector is the mean of its attributes' vectors; once the item
//! receives feedback the factorization's own updates take over from that starting point.
//!
//! The sums follow the item vectors incrementally (the model reports every move of a member's
//! vector as `old → new`), so they never need a pass over the catalog except after a batch
//! `fit`, which moves every vector and is followed by [`AttrVectors::rebuild`]. Sums are `f64`
//! so that millions of small shifts do not accumulate rounding.

/// An item's attributes (dense category and tag ids) and whether it may be recommended.
#[derive(Clone, Debug, Default)]
pub struct ItemMeta {
    pub category: Option<u32>,
    pub tags: Vec<u32>,
    pub available: bool,
}

/// Pseudo-count of the ridge prior on attribute vectors (see the module docs).
pub const ATTR_PRIOR: f64 = 1.0;

#[derive(Clone, Debug, Default)]
struct Acc {
    sum: Vec<f64>,
    n: u32,
}

/// Per-attribute running sums of member item vectors.
#[derive(Clone, Debug)]
pub struct AttrVectors {
    dim: usize,
    cats: Vec<Acc>,
    tags: Vec<Acc>,
    /// Whether item i's vector is counted in its attributes' sums (it has feedback).
    member: Vec<bool>,
    /// Bumped on every change of any sum, so cold-item refreshes can skip a quiet model.
    version: u64,
}

fn acc_at(v: &mut Vec<Acc>, a: u32, dim: usize) -> &mut Acc {
    let a = a as usize;
    if v.len() <= a {
        v.resize(a + 1, Acc::default());
    }
    let acc = &mut v[a];
    if acc.sum.len() != dim {
        acc.sum = vec![0.0; dim];
    }
    acc
}

impl AttrVectors {
    pub fn new(dim: usize) -> Self {
        AttrVectors { dim, cats: Vec::new(), tags: Vec::new(), member: Vec::new(), version: 0 }
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn is_member(&self, i: u32) -> bool {
        self.member.get(i as usize).copied().unwrap_or(false)
    }

    /// Adds `sign · v` to every attribute of `meta`, and `sign` to its counts.
    fn add(&mut self, meta: &ItemMeta, v: &[f32], sign: f64) {
        if meta.category.is_none() && meta.tags.is_empty() {
            return;
        }
        let dim = self.dim;
        let delta = if sign > 0.0 { 1i64 } else { -1 };
        let accs = meta.category.iter().map(|&c| (true, c)).chain(meta.tags.iter().map(|&t| (false, t)));
        for (is_cat, a) in accs {
            let acc = acc_at(if is_cat { &mut self.cats } else { &mut self.tags }, a, dim);
            for (s, &x) in acc.sum.iter_mut().zip(v) {
                *s += sign * x as f64;
            }
            acc.n = (acc.n as i64 + delta).max(0) as u32;
        }
        self.version += 1;
    }

    /// Counts item `i` (vector `v`) in its attributes, if it is not counted yet.
    pub fn join(&mut self, i: u32, meta: &ItemMeta, v: &[f32]) {
        let iu = i as usize;
        if self.member.len() <= iu {
            self.member.resize(iu + 1, false);
        }
        if !self.member[iu] {
            self.member[iu] = true;
            self.add(meta, v, 1.0);
        }
    }

    /// Stops counting item `i`, whose vector is `v` (the one it was last counted with).
    pub fn leave(&mut self, i: u32, meta: &ItemMeta, v: &[f32]) {
        if self.is_member(i) {
            self.member[i as usize] = false;
            self.add(meta, v, -1.0);
        }
    }

    /// A member's vector moved from `old` to `new`.
    pub fn moved(&mut self, i: u32, meta: &ItemMeta, old: &[f32], new: &[f32]) {
        if !self.is_member(i) || (meta.category.is_none() && meta.tags.is_empty()) {
            return;
        }
        let dim = self.dim;
        let accs = meta.category.iter().map(|&c| (true, c)).chain(meta.tags.iter().map(|&t| (false, t)));
        for (is_cat, a) in accs {
            let acc = acc_at(if is_cat { &mut self.cats } else { &mut self.tags }, a, dim);
            for ((s, &x), &y) in acc.sum.iter_mut().zip(new).zip(old) {
                *s += x as f64 - y as f64;
            }
        }
        self.version += 1;
    }

    /// Recomputes every sum from scratch: `items` yields (item, meta, vector, has feedback).
    pub fn rebuild<'a>(&mut self, items: impl Iterator<Item = (u32, &'a ItemMeta, &'a [f32], bool)>) {
        self.cats.clear();
        self.tags.clear();
        self.member.clear();
        for (i, meta, v, member) in items {
            if member {
                self.join(i, meta, v);
            }
        }
        self.version += 1;
    }

    /// The cold-start vector of an item with attributes `meta`: the mean of the regularised
    /// means of those of its attributes that have members. None when none has.
    pub fn vector_for(&self, meta: &ItemMeta) -> Option<Vec<f32>> {
        let mut out = vec![0.0f64; self.dim];
        let mut parts = 0usize;
        let cats = meta.category.iter().filter_map(|&c| self.cats.get(c as usize));
        let tags = meta.tags.iter().filter_map(|&t| self.tags.get(t as usize));
        for acc in cats.chain(tags) {
            if acc.n == 0 {
                continue;
            }
            let scale = 1.0 / (acc.n as f64 + ATTR_PRIOR);
            for (o, &s) in out.iter_mut().zip(&acc.sum) {
                *o += s * scale;
            }
            parts += 1;
        }
        if parts == 0 {
            return None;
        }
        Some(out.into_iter().map(|x| (x / parts as f64) as f32).collect())
    }
}

/// A set of dense ids kept sorted, so that iteration (and sampling by position) does not
/// depend on the order of insertions — a snapshot rebuilds it identically. New ids are
/// mostly the largest yet, so insertion is an append; removal is a memmove of `u32`s,
/// done once per item when it leaves.
#[derive(Clone, Debug, Default)]
pub struct SortedIds(Vec<u32>);

impl SortedIds {
    pub fn insert(&mut self, i: u32) {
        if self.0.last().is_none_or(|&l| l < i) {
            self.0.push(i);
        } else if let Err(pos) = self.0.binary_search(&i) {
            self.0.insert(pos, i);
        }
    }

    pub fn remove(&mut self, i: u32) {
        if let Ok(pos) = self.0.binary_search(&i) {
            self.0.remove(pos);
        }
    }

    pub fn contains(&self, i: u32) -> bool {
        self.0.binary_search(&i).is_ok()
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(cat: Option<u32>, tags: &[u32]) -> ItemMeta {
        ItemMeta { category: cat, tags: tags.to_vec(), available: true }
    }

    #[test]
    fn vector_is_regularised_mean_of_members() {
        let mut a = AttrVectors::new(2);
        let m = meta(Some(0), &[]);
        a.join(0, &m, &[2.0, 0.0]);
        a.join(1, &m, &[4.0, 2.0]);
        // Sum (6, 2) over 2 members + prior 1.
        let v = a.vector_for(&m).unwrap();
        assert!((v[0] - 2.0).abs() < 1e-6 && (v[1] - 2.0 / 3.0).abs() < 1e-6, "{v:?}");
        // Joining twice counts once.
        a.join(1, &m, &[4.0, 2.0]);
        assert_eq!(a.vector_for(&m).unwrap(), v);
    }

    #[test]
    fn moves_and_leaves_keep_sums_equal_to_a_rebuild() {
        let mut a = AttrVectors::new(3);
        let m0 = meta(Some(1), &[0, 2]);
        let m1 = meta(Some(1), &[2]);
        a.join(0, &m0, &[1.0, 0.0, 0.0]);
        a.join(1, &m1, &[0.0, 1.0, 0.0]);
        a.moved(0, &m0, &[1.0, 0.0, 0.0], &[1.0, 1.0, 1.0]);
        a.join(2, &m1, &[5.0, 5.0, 5.0]);
        a.leave(2, &m1, &[5.0, 5.0, 5.0]);
        let mut b = AttrVectors::new(3);
        let v0 = [1.0f32, 1.0, 1.0];
        let v1 = [0.0f32, 1.0, 0.0];
        b.rebuild([(0, &m0, &v0[..], true), (1, &m1, &v1[..], true)].into_iter());
        for probe in [meta(Some(1), &[]), meta(None, &[0]), meta(None, &[2]), meta(Some(1), &[0, 2])] {
            let (x, y) = (a.vector_for(&probe).unwrap(), b.vector_for(&probe).unwrap());
            for (p, q) in x.iter().zip(&y) {
                assert!((p - q).abs() < 1e-6, "{x:?} vs {y:?}");
            }
        }
        assert!(!a.is_member(2));
    }

    #[test]
    fn attributes_without_members_give_nothing() {
        let mut a = AttrVectors::new(2);
        assert!(a.vector_for(&meta(Some(0), &[1])).is_none());
        a.join(0, &meta(None, &[1]), &[3.0, 3.0]);
        // Category 0 has no member: only tag 1 contributes, shrunk by the prior.
        assert_eq!(a.vector_for(&meta(Some(0), &[1])).unwrap(), vec![1.5, 1.5]);
        assert!(a.vector_for(&meta(None, &[])).is_none());
    }

    #[test]
    fn sorted_ids_stay_sorted() {
        let mut s = SortedIds::default();
        for i in [5, 1, 9, 3, 9] {
            s.insert(i);
        }
        assert_eq!(s.as_slice(), &[1, 3, 5, 9]);
        s.remove(3);
        s.remove(7);
        assert_eq!(s.as_slice(), &[1, 5, 9]);
        assert!(s.contains(9) && !s.contains(3));
    }
}
