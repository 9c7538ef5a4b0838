//! Online implicit matrix factorization: element-wise ALS with popularity-weighted missing data
//! (He, Zhang, Kan & Chua, "Fast Matrix Factorization for Online Recommendation with Implicit
//! Feedback", SIGIR 2016 — "eALS").

#[derive(Clone, Debug)]
pub struct MfConfig {
    pub dim: usize,
    pub c0: f32,
    pub alpha: f32,
    pub reg: f32,
    pub w_new: f32,
    pub online_iters: usize,
    pub user_history_cap: usize,
    pub item_history_cap: usize,
    /// Half-life of interaction weights in seconds; `None` = no recency decay.
    pub decay_half_life: Option<f64>,
    pub init_std: f32,
    pub seed: u64,
}

pub struct Mf {}

impl Mf {
    pub fn new(cfg: MfConfig) -> Self {
        todo!()
    }
    pub fn config(&self) -> &MfConfig {
        todo!()
    }
    pub fn dim(&self) -> usize {
        todo!()
    }
    pub fn n_users(&self) -> usize {
        todo!()
    }
    pub fn n_items(&self) -> usize {
        todo!()
    }
    /// Records an interaction without touching any vector (bulk load before `fit`).
    pub fn add(&mut self, u: u32, i: u32, w: f32, ts: f64) {
        todo!()
    }
    /// Records an interaction and updates p_u, then q_i (eALS incremental update).
    pub fn update(&mut self, u: u32, i: u32, w: f32, ts: f64) {
        todo!()
    }
    /// Batch eALS sweeps over all held interactions.
    pub fn fit(&mut self, iterations: usize) {
        todo!()
    }
    pub fn user_vector(&self, u: u32) -> &[f32] {
        todo!()
    }
    pub fn item_vector(&self, i: u32) -> &[f32] {
        todo!()
    }
    /// Row-major `n_items x dim`.
    pub fn item_matrix(&self) -> &[f32] {
        todo!()
    }
    /// The user's held history as (item, accumulated weight).
    pub fn user_items(&self, u: u32) -> Vec<(u32, f32)> {
        todo!()
    }
    pub fn set_item_vector(&mut self, i: u32, v: &[f32]) {
        todo!()
    }
    pub fn erase_user(&mut self, u: u32) {
        todo!()
    }
    pub fn save(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        todo!()
    }
    pub fn load(r: &mut dyn std::io::Read) -> std::io::Result<Mf> {
        todo!()
    }
}
impl Default for MfConfig { fn default() -> Self { todo!() } }
impl Mf { pub fn ensure_item(&mut self, i: u32) { todo!() } }
