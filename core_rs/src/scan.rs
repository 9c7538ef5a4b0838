//! Exact maximum-inner-product scan over a row-major matrix (the small-catalog path and the
//! brute-force oracle for recall tests). AVX2+FMA when the CPU has it, portable otherwise.

/// Inner product of two equal-length vectors.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    todo!("scan::dot")
}

/// The `k` rows of `matrix` (row-major, `dim` columns) with the largest inner product with `q`,
/// best first, skipping rows for which `keep(row)` is false.
pub fn exact_top_k(
    matrix: &[f32],
    dim: usize,
    q: &[f32],
    k: usize,
    keep: &dyn Fn(u32) -> bool,
) -> Vec<(u32, f32)> {
    todo!("scan::exact_top_k")
}
