//! Exact maximum-inner-product scan over a row-major matrix (the small-catalog path and the
//! brute-force oracle for recall tests). AVX2+FMA when the CPU has it, portable otherwise.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
#[cfg(target_arch = "x86_64")]
use std::sync::atomic::{AtomicU8, Ordering as AtomicOrdering};

/// 0 = not probed yet, 1 = portable, 2 = AVX2+FMA, 3 = AVX-512F. Probing once keeps the per-call cost of the
/// dispatch to one relaxed load, which matters because `dot` is the HNSW inner loop.
#[cfg(target_arch = "x86_64")]
static KERNEL: AtomicU8 = AtomicU8::new(0);

#[cfg(target_arch = "x86_64")]
#[inline]
fn kernel() -> u8 {
    match KERNEL.load(AtomicOrdering::Relaxed) {
        0 => {
            let k = detect();
            KERNEL.store(k, AtomicOrdering::Relaxed);
            k
        }
        k => k,
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> u8 {
    if is_x86_feature_detected!("avx512f") {
        3
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        2
    } else {
        1
    }
}

/// Inner product of two equal-length vectors.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot of vectors of different lengths");
    #[cfg(target_arch = "x86_64")]
    match kernel() {
        // SAFETY: `kernel()` returns 3 only after the CPU reported AVX-512F.
        3 => return unsafe { dot_avx512(a, b) },
        // SAFETY: `kernel()` returns 2 only after the CPU reported AVX2 and FMA.
        2 => return unsafe { dot_avx2(a, b) },
        _ => {}
    }
    dot_portable(a, b)
}

/// Asks the CPU to start loading `row` (its first four cache lines) ahead of the inner
/// products that will read it: a hint, it changes no result. For loops over rows scattered in
/// memory, prefetching them all first overlaps their cache misses.
#[inline(always)]
pub fn prefetch_row(row: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in row.chunks(16).take(4) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is only a hint and never faults; the address is in bounds.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// An inner-product kernel over the first `n` floats of two pointers.
///
/// # Safety
/// Both pointers must be valid for reads of `n` floats.
pub type DotKernel = unsafe fn(*const f32, *const f32, usize) -> f32;

/// The best inner-product kernel for this CPU, for loops that score many vectors: chosen
/// once, it spares each call the dispatch and the length check of `dot`.
pub fn dot_kernel() -> DotKernel {
    #[cfg(target_arch = "x86_64")]
    match kernel() {
        3 => return dot_avx512_raw,
        2 => return dot_avx2_raw,
        _ => {}
    }
    dot_portable_raw
}

/// # Safety
/// Both pointers valid for reads of `n` floats.
unsafe fn dot_portable_raw(a: *const f32, b: *const f32, n: usize) -> f32 {
    // SAFETY: the caller guarantees `n` readable floats behind each pointer.
    unsafe { dot_portable(std::slice::from_raw_parts(a, n), std::slice::from_raw_parts(b, n)) }
}

/// # Safety
/// The CPU has AVX2 and FMA; both pointers valid for reads of `n` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2_raw(a: *const f32, b: *const f32, n: usize) -> f32 {
    // SAFETY: the caller guarantees `n` readable floats behind each pointer.
    unsafe { dot_avx2(std::slice::from_raw_parts(a, n), std::slice::from_raw_parts(b, n)) }
}

/// # Safety
/// The CPU has AVX-512F; both pointers valid for reads of `n` floats.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512_raw(a: *const f32, b: *const f32, n: usize) -> f32 {
    // SAFETY: the caller guarantees `n` readable floats behind each pointer.
    unsafe { dot_avx512(std::slice::from_raw_parts(a, n), std::slice::from_raw_parts(b, n)) }
}

/// Two 16-lane FMA accumulators (32 floats per iteration); a masked load handles the tail,
/// so no scalar loop is needed for lengths that are not multiples of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    // SAFETY: full loads read 16 floats at offsets < n; the masked load reads only the
    // `n - i < 16` lanes that are in bounds (masked-off lanes are not accessed).
    unsafe {
        let mut s0 = _mm512_setzero_ps();
        let mut s1 = _mm512_setzero_ps();
        while i + 32 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
            s1 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i + 16)), _mm512_loadu_ps(pb.add(i + 16)), s1);
            i += 32;
        }
        if i + 16 <= n {
            s0 = _mm512_fmadd_ps(_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i)), s0);
            i += 16;
        }
        if i < n {
            let m: __mmask16 = (1u16 << (n - i)) - 1;
            s1 =
                _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, pa.add(i)), _mm512_maskz_loadu_ps(m, pb.add(i)), s1);
        }
        _mm512_reduce_add_ps(_mm512_add_ps(s0, s1))
    }
}

/// Eight independent accumulators so the compiler can keep them in one SIMD register (any
/// target) without reassociating a single serial sum, which it may not do for floats.
#[inline]
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + (acc[2] + acc[6]) + (acc[3] + acc[7]);
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

/// Four 8-lane FMA accumulators (32 floats per iteration) hide the FMA latency; then an
/// 8-lane step and a scalar tail for lengths that are not multiples of 8.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len().min(b.len());
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    let mut i = 0;
    // SAFETY: every load reads 8 floats at offsets < n from slices of length >= n.
    unsafe {
        let mut s0 = _mm256_setzero_ps();
        let mut s1 = _mm256_setzero_ps();
        let mut s2 = _mm256_setzero_ps();
        let mut s3 = _mm256_setzero_ps();
        while i + 32 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), s1);
            s2 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 16)), _mm256_loadu_ps(pb.add(i + 16)), s2);
            s3 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 24)), _mm256_loadu_ps(pb.add(i + 24)), s3);
            i += 32;
        }
        while i + 8 <= n {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), s0);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3));
        let lo = _mm256_castps256_ps128(s);
        let hi = _mm256_extractf128_ps(s, 1);
        let q = _mm_add_ps(lo, hi);
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        let mut sum = _mm_cvtss_f32(q);
        while i < n {
            sum += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        sum
    }
}

/// A scored row ordered by score, ties broken by the smaller id ranking higher, so results
/// are deterministic. Reversed so that `BinaryHeap` is a min-heap on the score.
#[derive(Clone, Copy, PartialEq)]
struct Worst(f32, u32);

impl Eq for Worst {}
impl PartialOrd for Worst {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Worst {
    fn cmp(&self, o: &Self) -> Ordering {
        // Greatest = worst: lowest score, then largest id.
        o.0.total_cmp(&self.0).then(self.1.cmp(&o.1))
    }
}

/// Rows scored per block: the block's scores stay in L1 while the heap is consulted, and the
/// threshold check against the current k-th best skips the heap for most rows.
const BLOCK: usize = 256;

/// The `k` rows of `matrix` (row-major, `dim` columns) with the largest inner product with `q`,
/// best first, skipping rows for which `keep(row)` is false.
pub fn exact_top_k(
    matrix: &[f32],
    dim: usize,
    q: &[f32],
    k: usize,
    keep: &dyn Fn(u32) -> bool,
) -> Vec<(u32, f32)> {
    assert_eq!(q.len(), dim, "query length differs from the matrix width");
    if k == 0 || dim == 0 {
        return Vec::new();
    }
    let rows = matrix.len() / dim;
    let mut heap: BinaryHeap<Worst> = BinaryHeap::with_capacity(k + 1);
    let mut scores = [0.0f32; BLOCK];
    let mut start = 0;
    while start < rows {
        let end = (start + BLOCK).min(rows);
        for r in start..end {
            scores[r - start] = dot(&matrix[r * dim..(r + 1) * dim], q);
        }
        for r in start..end {
            let cand = Worst(scores[r - start], r as u32);
            if heap.len() == k {
                // `cand` must rank strictly better than the current worst to enter.
                if cand >= *heap.peek().expect("heap is full") {
                    continue;
                }
                if !keep(r as u32) {
                    continue;
                }
                heap.pop();
                heap.push(cand);
            } else if keep(r as u32) {
                heap.push(cand);
            }
        }
        start = end;
    }
    let mut out: Vec<(u32, f32)> = heap.into_iter().map(|w| (w.1, w.0)).collect();
    out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn randv(r: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| r.normal() as f32).collect()
    }

    fn naive_dot(a: &[f32], b: &[f32]) -> f64 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
    }

    #[test]
    fn dot_matches_naive_for_all_lengths() {
        let mut r = Rng::new(3);
        for n in 0..100 {
            let a = randv(&mut r, n);
            let b = randv(&mut r, n);
            let want = naive_dot(&a, &b);
            let mut got_all = vec![dot(&a, &b), dot_portable(&a, &b)];
            // SAFETY: both slices hold `n` floats.
            got_all.push(unsafe { dot_kernel()(a.as_ptr(), b.as_ptr(), n) });
            #[cfg(target_arch = "x86_64")]
            {
                if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU reported AVX2 and FMA.
                    got_all.push(unsafe { dot_avx2(&a, &b) });
                }
                if is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU reported AVX-512F.
                    got_all.push(unsafe { dot_avx512(&a, &b) });
                }
            }
            for got in got_all {
                assert!((got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "n={n}: {got} vs {want}");
            }
        }
    }

    #[test]
    fn exact_top_k_matches_sorting_everything() {
        let mut r = Rng::new(5);
        for &(rows, dim, k) in &[(1000, 37, 10), (513, 8, 1), (300, 13, 300), (5, 3, 10)] {
            let m = randv(&mut r, rows * dim);
            let q = randv(&mut r, dim);
            let keep = |id: u32| id % 3 != 1;
            let got = exact_top_k(&m, dim, &q, k, &keep);
            let mut all: Vec<(u32, f32)> = (0..rows)
                .filter(|&i| keep(i as u32))
                .map(|i| (i as u32, dot(&m[i * dim..(i + 1) * dim], &q)))
                .collect();
            all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            all.truncate(k);
            assert_eq!(got, all, "rows={rows} dim={dim} k={k}");
            assert!(got.iter().all(|&(id, _)| keep(id)));
        }
    }

    #[test]
    fn exact_top_k_edge_cases() {
        let m = [1.0f32, 0.0, 0.0, 1.0, 2.0, 2.0];
        assert!(exact_top_k(&m, 2, &[1.0, 1.0], 0, &|_| true).is_empty());
        assert!(exact_top_k(&m, 2, &[1.0, 1.0], 3, &|_| false).is_empty());
        let got = exact_top_k(&m, 2, &[1.0, 0.5], 2, &|_| true);
        assert_eq!(got, vec![(2, 3.0), (0, 1.0)]);
    }
}
