//! Exponentially decayed interaction counts per item: the cold-start fallback.

pub struct Trending {}

impl Trending {
    pub fn new(half_life_secs: f64) -> Self {
        todo!()
    }
    pub fn add(&mut self, item: u32, w: f32, ts: f64) {
        todo!()
    }
    pub fn score(&self, item: u32, now: f64) -> f64 {
        todo!()
    }
    pub fn top(&self, k: usize, now: f64, keep: &dyn Fn(u32) -> bool) -> Vec<(u32, f32)> {
        todo!()
    }
    pub fn save(&self, w: &mut dyn std::io::Write) -> std::io::Result<()> {
        todo!()
    }
    pub fn load(r: &mut dyn std::io::Read) -> std::io::Result<Trending> {
        todo!()
    }
}
