//! Exact maximum-inner-product scan over a row-major matrix (the small-catalog path, one scan
//! shared by a batch of lists, and the brute-force oracle for recall tests). AVX2+FMA when the
//! CPU has it, portable otherwise.

use std::cmp::Ordering;
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

/// `(id, s)` as a key whose integer order is best-first order reversed (larger key: higher
/// score by `total_cmp`, then lower id, as [`crate::rerank::sort_desc`] ranks them): the
/// score's bits mapped to an order-preserving unsigned integer above the id's complement.
/// Selections over such keys compare integers instead of (score, id) pairs.
#[inline]
pub(crate) fn rank_key(id: u32, s: f32) -> u64 {
    let b = s.to_bits() as i32;
    // `total_cmp`'s signed key (negatives' magnitude bits flipped), then biased to unsigned.
    let ordered = (b ^ (((b >> 31) as u32) >> 1) as i32) as u32 ^ 0x8000_0000;
    (ordered as u64) << 32 | (u32::MAX - id) as u64
}

/// The `(id, score)` of a [`rank_key`].
#[inline]
pub(crate) fn from_rank_key(k: u64) -> (u32, f32) {
    let b = ((k >> 32) as u32 ^ 0x8000_0000) as i32;
    let bits = b ^ (((b >> 31) as u32) >> 1) as i32;
    (u32::MAX - k as u32, f32::from_bits(bits as u32))
}

/// The best `k` rows of one query of [`exact_top_k_batch`] so far, as [`rank_key`]s in no
/// order: rows are appended, and when the buffer is full a selection keeps its `k` best and
/// raises `bound` to the worst of them. A heap of the best `k` held its exact k-th best at
/// every step, but spent the scan's time in sift branches that mispredict (a row that beats
/// the k-th best lands anywhere in the heap); appending costs no branch on the score, and the
/// bound, a little looser between selections, only lets a few more rows be appended.
struct Best {
    k: usize,
    keys: Vec<u64>,
    /// No row scoring below it can be among the `k` best: `k` rows at least as good are held
    /// (NEG_INFINITY until then).
    bound: f32,
}

impl Best {
    fn new(k: usize) -> Self {
        Self { k, keys: Vec::with_capacity(Self::capacity(k)), bound: f32::NEG_INFINITY }
    }

    /// Rows held before a selection: about `k` rows appended per selection, so each costs O(1).
    fn capacity(k: usize) -> usize {
        2 * k + BATCH_BLOCK
    }

    #[inline]
    fn push(&mut self, key: u64) {
        self.keys.push(key);
        if self.keys.len() >= Self::capacity(self.k) {
            self.keep_best();
            self.bound = from_rank_key(self.keys[0]).1;
        }
    }

    /// Cuts the buffer to its `k` best, the worst of them at the front.
    fn keep_best(&mut self) {
        let cut = self.keys.len().saturating_sub(self.k);
        if cut > 0 {
            self.keys.select_nth_unstable(cut);
            self.keys.copy_within(cut.., 0);
            self.keys.truncate(self.k);
        }
    }
}

/// The `k` rows of `matrix` (row-major, `dim` columns) with the largest inner product with `q`,
/// best first, skipping rows for which `keep(row)` is false: [`exact_top_k_batch`] for one
/// query (its kernel scores eight rows per step, a query alone as well).
pub fn exact_top_k(
    matrix: &[f32],
    dim: usize,
    q: &[f32],
    k: usize,
    keep: &dyn Fn(u32) -> bool,
) -> Vec<(u32, f32)> {
    assert_eq!(q.len(), dim, "query length differs from the matrix width");
    exact_top_k_batch(matrix, dim, &[q], &[k], &|_, row| keep(row)).pop().unwrap_or_default()
}

/// Rows per block of [`exact_top_k_batch`]: a block (64 rows of a 32-d matrix is 8 KB) stays
/// in L1 while every query of the batch is scored against it, and a block's threshold test
/// fits one 64-bit mask (a block is one word of a bitmap over the rows).
const BATCH_BLOCK: usize = 64;

/// [`exact_top_k`] for many queries at once, each with its own `k` and filter
/// (`keep(query, row)`): the `ks[n]` rows with the largest inner product with `queries[n]`,
/// best first, scores as [`dot`] gives them.
///
/// One query at a time, a scan streams the whole matrix through the cache and spends much of
/// each row's inner product on its horizontal sum. Here the matrix is read in blocks of
/// [`BATCH_BLOCK`] rows, each scored against every query of the batch while it is in L1, and
/// the kernel scores eight rows at a time, summing their eight partial vectors with one
/// transpose-and-add instead of eight horizontal sums. A row is filtered and held (see
/// [`Best`]) only when its score is not below the query's bound (most rows are below, and the
/// test is a SIMD compare). The kernel rounds differently from [`dot`], so the `k` rows kept are re-scored
/// with [`dot`]: only a row within rounding of the k-th best can be kept or left out
/// otherwise than a selection by [`dot`] alone would.
pub fn exact_top_k_batch(
    matrix: &[f32],
    dim: usize,
    queries: &[&[f32]],
    ks: &[usize],
    keep: &dyn Fn(usize, u32) -> bool,
) -> Vec<Vec<(u32, f32)>> {
    exact_top_k_batch_masked(matrix, dim, queries, ks, |n, block, open| {
        let mut kept = open;
        let mut rest = open;
        while rest != 0 {
            let r = rest.trailing_zeros();
            rest &= rest - 1;
            if !keep(n, (block * BATCH_BLOCK) as u32 + r) {
                kept &= !(1 << r);
            }
        }
        kept
    })
}

/// [`exact_top_k_batch`] with the filter asked a block at a time: `kept(query, b, open)` is
/// the subset of `open` (bit `r`: row `64·b + r`) the query may keep. A caller holding its
/// filters as bitmaps, one bit per row, answers with one AND per block instead of a call
/// per row.
pub fn exact_top_k_batch_masked(
    matrix: &[f32],
    dim: usize,
    queries: &[&[f32]],
    ks: &[usize],
    kept: impl Fn(usize, usize, u64) -> u64,
) -> Vec<Vec<(u32, f32)>> {
    assert_eq!(queries.len(), ks.len(), "one k per query");
    assert!(queries.iter().all(|q| q.len() == dim), "query length differs from the matrix width");
    if dim == 0 {
        return vec![Vec::new(); queries.len()];
    }
    let rows = matrix.len() / dim;
    let mut best: Vec<Best> = ks.iter().map(|&k| Best::new(k)).collect();
    let mut scores = [0.0f32; BATCH_BLOCK];
    let score = block_scorer(dim);
    let mut start = 0;
    while start < rows {
        let n = BATCH_BLOCK.min(rows - start);
        let block = &matrix[start * dim..(start + n) * dim];
        for (qn, (q, b)) in queries.iter().zip(&mut best).enumerate() {
            if b.k == 0 {
                continue;
            }
            // Rows scoring below the bound cannot enter: only the others (ties and NaN
            // included) are kept. The bound only rises within the block.
            // SAFETY: `score` suits this CPU and `dim`; `block` holds `n` rows of `dim` floats
            // and `q` holds `dim` floats (asserted above).
            let open = unsafe { score(block, q, b.bound, &mut scores) };
            let mut open = if open == 0 { 0 } else { kept(qn, start / BATCH_BLOCK, open) };
            while open != 0 {
                let r = open.trailing_zeros() as usize;
                open &= open - 1;
                if not_below(scores[r], b.bound) {
                    b.push(rank_key((start + r) as u32, scores[r]));
                }
            }
        }
        start += n;
    }
    best.into_iter()
        .zip(queries)
        .map(|(mut b, q)| {
            b.keep_best();
            let mut out: Vec<(u32, f32)> = b
                .keys
                .into_iter()
                .map(|key| {
                    let id = from_rank_key(key).0 as usize;
                    (id as u32, dot(&matrix[id * dim..(id + 1) * dim], q))
                })
                .collect();
            out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            out
        })
        .collect()
}

/// Scores of a block of at most [`BATCH_BLOCK`] rows (row-major, `q.len()` columns) against
/// one query, written to the front of `out`, and the mask of the rows whose score is not
/// below `bound` (bit `r` for row `r`; no bit beyond the block's rows).
///
/// # Safety
/// The CPU supports the kernel's instructions and the kernel suits the width (see
/// [`block_scorer`]); `block.len()` is a multiple of `q.len()`, at most [`BATCH_BLOCK`] rows.
type BlockKernel = unsafe fn(&[f32], &[f32], f32, &mut [f32; BATCH_BLOCK]) -> u64;

/// Whether `s` is not below `bound`: NaN counts as not below, so the full comparison (which
/// ranks NaN first, as [`exact_top_k`] always has) decides.
#[inline(always)]
fn not_below(s: f32, bound: f32) -> bool {
    s.partial_cmp(&bound) != Some(Ordering::Less)
}

/// The block kernel for this CPU and matrix width.
fn block_scorer(dim: usize) -> BlockKernel {
    #[cfg(target_arch = "x86_64")]
    if kernel() >= 2 && dim.is_multiple_of(8) {
        return score_block_avx2;
    }
    let _ = dim;
    score_block_portable
}

/// Row by row with [`dot`].
///
/// # Safety
/// None beyond [`BlockKernel`]'s (this kernel needs no CPU feature and suits any width).
unsafe fn score_block_portable(block: &[f32], q: &[f32], bound: f32, out: &mut [f32; BATCH_BLOCK]) -> u64 {
    let mut open = 0u64;
    for (r, row) in block.chunks_exact(q.len()).enumerate() {
        out[r] = dot(row, q);
        open |= (not_below(out[r], bound) as u64) << r;
    }
    open
}

/// Eight rows at a time: eight 8-lane FMA accumulators (one per row) over the width, then one
/// transpose-and-add (`hadd` twice, then the two 128-bit halves added) gives the eight sums in
/// one register, compared with `bound` in one instruction. Rows past the last multiple of
/// eight go through [`dot`]. The model's usual width (32) has its own copy, with the query
/// held in four registers for the whole block.
///
/// # Safety
/// The CPU has AVX2 and FMA; `q.len()` is a multiple of 8; see [`BlockKernel`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn score_block_avx2(block: &[f32], q: &[f32], bound: f32, out: &mut [f32; BATCH_BLOCK]) -> u64 {
    // SAFETY: the caller's guarantees are this function's.
    unsafe {
        if q.len() == 32 {
            score_rows_avx2(block, q, 32, bound, out)
        } else {
            score_rows_avx2(block, q, q.len(), bound, out)
        }
    }
}

/// [`score_block_avx2`] for a width `dim` (= `q.len()`); always inlined into it, so that the
/// AVX2 instructions are compiled with its target features, and with a constant `dim` the
/// compiler unrolls the width loop and keeps the query in registers.
///
/// # Safety
/// As [`score_block_avx2`], and `dim == q.len()`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn score_rows_avx2(
    block: &[f32],
    q: &[f32],
    dim: usize,
    bound: f32,
    out: &mut [f32; BATCH_BLOCK],
) -> u64 {
    use std::arch::x86_64::*;
    let n = block.len() / dim;
    let mut open = 0u64;
    // SAFETY: the caller runs with AVX2 enabled.
    let bounds = unsafe { _mm256_set1_ps(bound) };
    let mut g = 0;
    // SAFETY: rows `g..g + 8` are in the block (`g + 8 <= n`), each `dim` floats long, and
    // every load reads 8 floats at an offset `d < dim` with `dim % 8 == 0`; the store writes
    // `out[g..g + 8]` with `g + 8 <= n <= BATCH_BLOCK`.
    unsafe {
        while g + 8 <= n {
            let base = block.as_ptr().add(g * dim);
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut d = 0;
            while d < dim {
                let qv = _mm256_loadu_ps(q.as_ptr().add(d));
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(_mm256_loadu_ps(base.add(j * dim + d)), qv, *a);
                }
                d += 8;
            }
            // hadd pairs lanes within each 128-bit half: after two rounds, half h of `u0`
            // holds the half-h sums of rows 0..4, and of `u1` those of rows 4..8.
            let t0 = _mm256_hadd_ps(acc[0], acc[1]);
            let t1 = _mm256_hadd_ps(acc[2], acc[3]);
            let t2 = _mm256_hadd_ps(acc[4], acc[5]);
            let t3 = _mm256_hadd_ps(acc[6], acc[7]);
            let u0 = _mm256_hadd_ps(t0, t1);
            let u1 = _mm256_hadd_ps(t2, t3);
            let lo = _mm256_permute2f128_ps::<0x20>(u0, u1);
            let hi = _mm256_permute2f128_ps::<0x31>(u0, u1);
            let s = _mm256_add_ps(lo, hi);
            _mm256_storeu_ps(out.as_mut_ptr().add(g), s);
            let m = _mm256_movemask_ps(_mm256_cmp_ps::<_CMP_NLT_UQ>(s, bounds)) as u32 as u64;
            open |= m << g;
            g += 8;
        }
    }
    for r in g..n {
        out[r] = dot(&block[r * dim..(r + 1) * dim], q);
        open |= (not_below(out[r], bound) as u64) << r;
    }
    open
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
    /// The batched scan keeps, per query, the rows that sorting every kept row gives, with
    /// [`dot`]'s scores: per-query `k` and filters, blocks cut mid-matrix, `k` beyond the kept
    /// rows, widths on and off the SIMD kernel's.
    #[test]
    fn exact_top_k_batch_matches_one_query_at_a_time() {
        let mut r = Rng::new(9);
        for &(rows, dim, n_queries) in &[(1000, 32, 7), (130, 37, 3), (64, 8, 1), (5, 3, 2), (0, 4, 2)] {
            let m = randv(&mut r, rows * dim);
            let qs: Vec<Vec<f32>> = (0..n_queries).map(|_| randv(&mut r, dim)).collect();
            let ks: Vec<usize> = (0..n_queries).map(|n| [10, 40, 1, 0, 300][n % 5]).collect();
            let keep = |n: usize, id: u32| (id as usize + n) % 4 != 1;
            let refs: Vec<&[f32]> = qs.iter().map(Vec::as_slice).collect();
            let got = exact_top_k_batch(&m, dim, &refs, &ks, &keep);
            assert_eq!(got.len(), n_queries);
            // The same filter as one bitmap per query, asked a block at a time.
            let words = rows.div_ceil(64);
            let bits: Vec<u64> = (0..n_queries * words)
                .map(|w| {
                    (0..64)
                        .fold(0u64, |b, r| b | (keep(w / words, ((w % words) * 64 + r) as u32) as u64) << r)
                })
                .collect();
            let masked =
                exact_top_k_batch_masked(&m, dim, &refs, &ks, |n, b, open| open & bits[n * words + b]);
            assert_eq!(masked, got, "rows={rows} dim={dim}");
            for n in 0..n_queries {
                let mut want: Vec<(u32, f32)> = (0..rows)
                    .filter(|&i| keep(n, i as u32))
                    .map(|i| (i as u32, dot(&m[i * dim..(i + 1) * dim], &qs[n])))
                    .collect();
                want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                want.truncate(ks[n]);
                assert_eq!(got[n], want, "rows={rows} dim={dim} query {n}");
                assert_eq!(exact_top_k(&m, dim, &qs[n], ks[n], &|id| keep(n, id)), want);
            }
        }
    }

    /// Every block kernel gives the plain sums (to rounding) and the mask of the rows not
    /// below the bound, for full and partial blocks.
    #[test]
    fn block_kernels_agree_with_dot() {
        let mut r = Rng::new(4);
        for &(dim, n) in &[(32, BATCH_BLOCK), (16, 13), (8, 7), (19, 30)] {
            let block = randv(&mut r, dim * n);
            let q = randv(&mut r, dim);
            let mut kernels: Vec<BlockKernel> = vec![score_block_portable, block_scorer(dim)];
            #[cfg(target_arch = "x86_64")]
            if dim.is_multiple_of(8) && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                kernels.push(score_block_avx2);
            }
            for score in kernels {
                let mut out = [0.0f32; BATCH_BLOCK];
                // SAFETY: the AVX2 kernel is only listed when the CPU has AVX2 and FMA and the
                // width is a multiple of 8.
                let open = unsafe { score(&block, &q, 0.5, &mut out) };
                for (i, row) in block.chunks_exact(dim).enumerate() {
                    let want = naive_dot(row, &q);
                    assert!((out[i] as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "dim {dim} row {i}");
                    assert_eq!(open >> i & 1 == 1, out[i] >= 0.5, "dim {dim} row {i}");
                }
                assert_eq!(open.checked_shr(n as u32).unwrap_or(0), 0, "no bit beyond the block");
                assert!(open != 0, "some row above the bound");
            }
        }
    }
}
