//! Hierarchical Navigable Small World graph for maximum inner product search
//! (Malkov & Yashunin, "Efficient and robust approximate nearest neighbor search using
//! Hierarchical Navigable Small World graphs", TPAMI 2018), with native inner product as the
//! similarity, in-place updates of moved vectors and deletion.

/// Construction and search parameters.
#[derive(Clone, Debug)]
pub struct HnswConfig {
    /// Links per node on upper layers; layer 0 gets `2 * m`.
    pub m: usize,
    pub ef_construction: usize,
    /// Default beam width for searches.
    pub ef_search: usize,
    pub seed: u64,
}

impl Default for HnswConfig {
    fn default() -> Self {
        HnswConfig { m: 16, ef_construction: 200, ef_search: 64, seed: 42 }
    }
}

pub struct Hnsw {}

impl Hnsw {
    pub fn new(dim: usize, cfg: HnswConfig) -> Self {
        todo!()
    }
    pub fn dim(&self) -> usize {
        todo!()
    }
    /// Live (not deleted) nodes.
    pub fn len(&self) -> usize {
        todo!()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    pub fn contains(&self, id: u32) -> bool {
        todo!()
    }
    /// Inserts `id` (dense, gaps allowed), or updates it in place if present; undeletes a deleted id.
    pub fn upsert(&mut self, id: u32, v: &[f32]) {
        todo!()
    }
    pub fn delete(&mut self, id: u32) -> bool {
        todo!()
    }
    /// Top `k` by inner product with `q`, best first; `keep(id)` false excludes an id from
    /// the results (the graph is still traversed through it). `ef` is clamped to at least `k`.
    pub fn search(&self, q: &[f32], k: usize, ef: usize, keep: &dyn Fn(u32) -> bool) -> Vec<(u32, f32)> {
        todo!()
    }
    pub fn vector(&self, id: u32) -> Option<&[f32]> {
        todo!()
    }
    pub fn check_invariants(&self) -> Result<(), String> {
        todo!()
    }
    pub fn save(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        todo!()
    }
    pub fn load(r: &mut dyn std::io::Read) -> std::io::Result<Hnsw> {
        todo!()
    }
}
