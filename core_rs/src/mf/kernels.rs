//! The numeric inner loops of eALS. Written as fixed-width chunks with independent
//! accumulators so that the compiler vectorises them without target-specific code; on x86-64
//! the hot kernels are compiled a second time with AVX2 + FMA and picked at run time (results
//! then differ from the portable path in the last bits, so bit-for-bit reproducibility holds on
//! one kind of CPU, not across them).

/// `a * b + c`, fused when the caller was compiled with FMA (`mul_add` without hardware FMA
/// is a slow library call, hence the switch).
#[inline(always)]
fn fma64<const FMA: bool>(a: f64, b: f64, c: f64) -> f64 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn fma32<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2_fma() -> bool {
    // Both macros cache their answer; this is two relaxed loads.
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// Asks the CPU to start loading `v` into cache: the rows of a history are scattered over the
/// matrix, and issuing all their loads before the gather overlaps the misses.
#[inline(always)]
pub(crate) fn prefetch(v: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for k in (0..v.len()).step_by(16) {
        // SAFETY: a prefetch is only a hint and never faults; the address lies within `v`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                v.as_ptr().add(k) as *const i8
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = v;
}

/// Inner product of two `f32` slices (the shorter length wins).
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Inner product of two `f64` slices (the shorter length wins).
#[inline(always)]
fn dot64<const FMA: bool>(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] = fma64::<FMA>(x[k], y[k], acc[k]);
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s = fma64::<FMA>(*x, *y, s);
    }
    s
}

/// `s += a_new * x x^T - a_old * y y^T` over a full `dim x dim` row-major matrix: the O(dim^2)
/// replacement of one row's contribution to a Gramian in a single pass.
pub(crate) fn replace_outer(s: &mut [f64], dim: usize, a_new: f64, x: &[f64], a_old: f64, y: &[f64]) {
    debug_assert!(s.len() == dim * dim);
    replace_outer_rows(s, 0, dim, a_new, x, a_old, y)
}

/// [`replace_outer`] on the rows `first, first + 1, ...` of the matrix that `s` holds (whole
/// rows of `dim`). Every element is computed by the same operations as in [`replace_outer`],
/// so splitting a matrix into row blocks never changes a result.
pub(crate) fn replace_outer_rows(
    s: &mut [f64],
    first: usize,
    dim: usize,
    a_new: f64,
    x: &[f64],
    a_old: f64,
    y: &[f64],
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { replace_outer_avx2(s, first, dim, a_new, x, a_old, y) };
        return;
    }
    replace_outer_impl::<false>(s, first, dim, a_new, x, a_old, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn replace_outer_avx2(
    s: &mut [f64],
    first: usize,
    dim: usize,
    a_new: f64,
    x: &[f64],
    a_old: f64,
    y: &[f64],
) {
    replace_outer_impl::<true>(s, first, dim, a_new, x, a_old, y)
}

#[inline(always)]
fn replace_outer_impl<const FMA: bool>(
    s: &mut [f64],
    first: usize,
    dim: usize,
    a_new: f64,
    x: &[f64],
    a_old: f64,
    y: &[f64],
) {
    debug_assert!(s.len().is_multiple_of(dim) && x.len() == dim && y.len() == dim);
    for (r, row) in s.chunks_exact_mut(dim).enumerate() {
        let xr = a_new * x[first + r];
        let yr = -a_old * y[first + r];
        for ((v, &xc), &yc) in row.iter_mut().zip(x).zip(y) {
            *v = fma64::<FMA>(xr, xc, fma64::<FMA>(yr, yc, *v));
        }
    }
}

/// `s += a * x x^T` with `x` in `f32` (exact Gramian accumulation).
pub(crate) fn add_outer(s: &mut [f64], dim: usize, a: f64, x: &[f32], tmp: &mut [f64]) {
    for (t, &v) in tmp.iter_mut().zip(x) {
        *t = v as f64;
    }
    replace_outer(s, dim, a, tmp, 0.0, tmp);
}

/// A rank-one term added to the Gramian for one sweep: `S + coef · v v^T`. It lets a user
/// update see an item's new popularity before the item's own update folds it into `S~`, which
/// saves one O(dim²) pass per event.
#[derive(Clone, Copy)]
pub(crate) struct Rank1<'a> {
    pub coef: f64,
    pub v: &'a [f64],
}

/// Scratch space for one coordinate sweep, kept in the model so the per-event path does not
/// allocate.
#[derive(Default, Clone)]
pub(crate) struct Scratch {
    /// The opposite side's vectors of the held history, transposed: `ot[f * n + j]`, so the
    /// per-coordinate loops over the history read contiguous memory.
    pub ot: Vec<f32>,
    /// Observation weight `w_j` of each history entry (decay applied).
    pub w: Vec<f32>,
    /// `w_j - c_j`: the observed weight minus the missing-data confidence it replaces.
    pub wc: Vec<f32>,
    /// Prediction cache `r̂_j`.
    pub rhat: Vec<f32>,
    /// The row being solved, in `f64`, for the Gramian products.
    pub x64: Vec<f64>,
    /// The row before the sweep, in `f64`, to replace its outer product.
    pub old64: Vec<f64>,
    /// The vector of a pending rank-one Gramian term.
    pub v64: Vec<f64>,
    /// `S x` for the coordinates not yet updated in a sweep.
    pub t64: Vec<f64>,
    /// Per-coordinate history sums fixed for a sweep: `(A_f, D_f, C_f)` interleaved.
    pub consts: Vec<f32>,
}

impl Scratch {
    /// Sizes the buffers for a history of `n` entries at `dim` dimensions.
    pub fn reset(&mut self, n: usize, dim: usize) {
        self.ot.clear();
        self.ot.resize(n * dim, 0.0);
        self.w.clear();
        self.wc.clear();
        self.rhat.clear();
        self.rhat.resize(n, 0.0);
        self.x64.resize(dim, 0.0);
        self.old64.resize(dim, 0.0);
        self.t64.resize(dim, 0.0);
    }

    /// Stores the `n` gathered vectors `row(0..n)` (the first `dim` values of each) in the
    /// transposed buffer, `ot[f * n + j] = row(j)[f]`, [`TRANSPOSE_BLOCK`] vectors at a time:
    /// each coordinate's run of a block is one contiguous write (a cache line), where a vector
    /// at a time writes to `dim` lines `n` floats apart, and a long history's buffer (64 KiB
    /// for 512 entries at dim 32) does not stay in L1 between them.
    pub fn put_all<'a>(&mut self, n: usize, dim: usize, row: impl Fn(usize) -> &'a [f32]) {
        let mut block: [&[f32]; TRANSPOSE_BLOCK] = [&[]; TRANSPOSE_BLOCK];
        for start in (0..n).step_by(TRANSPOSE_BLOCK) {
            let len = TRANSPOSE_BLOCK.min(n - start);
            for (b, slot) in block[..len].iter_mut().enumerate() {
                *slot = &row(start + b)[..dim];
            }
            for f in 0..dim {
                let run = &mut self.ot[f * n + start..f * n + start + len];
                for (out, v) in run.iter_mut().zip(&block[..len]) {
                    *out = v[f];
                }
            }
        }
    }
}

/// Vectors [`Scratch::put_all`] transposes at a time: 16 `f32` are one cache line.
const TRANSPOSE_BLOCK: usize = 16;

/// One eALS coordinate sweep over the row `x` (He et al. 2016, eqs. 12 and 13 — the user and
/// item forms are the same once the Gramian is scaled):
///
/// ```text
/// x_f = [ Σ_j (w_j - (w_j - c_j) r̂^f_j) o_jf  -  g Σ_{k≠f} x_k S_kf ]
///       / [ Σ_j (w_j - c_j) o_jf^2  +  g S_ff  +  λ ]
/// ```
///
/// where `o_j` are the gathered opposite-side vectors, `r̂^f_j = r̂_j - x_f o_jf` and the
/// cache `r̂_j` is updated after every coordinate. `g S` is the missing-data Gramian: for a user
/// `S = S~` with `g = c0 / Z`; for an item `S = S^p` with `g = c_i`. `extra` adds a rank-one
/// term to `S` (see [`Rank1`]).
///
/// `sc` must hold the gathered history (`ot`, `w`, `wc`) with `n` entries; `rhat` is computed
/// here. On return `sc.old64` holds the row before the sweep and `sc.x64` the row after it.
pub(crate) fn coord_sweep(
    x: &mut [f32],
    n: usize,
    sc: &mut Scratch,
    gram: &[f64],
    extra: Option<Rank1<'_>>,
    g: f64,
    reg: f64,
) {
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports AVX2 and FMA (checked just above).
        unsafe { coord_sweep_avx2(x, n, sc, gram, extra, g, reg) };
        return;
    }
    coord_sweep_impl::<false>(x, n, sc, gram, extra, g, reg)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn coord_sweep_avx2(
    x: &mut [f32],
    n: usize,
    sc: &mut Scratch,
    gram: &[f64],
    extra: Option<Rank1<'_>>,
    g: f64,
    reg: f64,
) {
    coord_sweep_impl::<true>(x, n, sc, gram, extra, g, reg)
}

#[inline(always)]
fn coord_sweep_impl<const FMA: bool>(
    x: &mut [f32],
    n: usize,
    sc: &mut Scratch,
    gram: &[f64],
    extra: Option<Rank1<'_>>,
    g: f64,
    reg: f64,
) {
    let dim = x.len();
    for (f, &v) in x.iter().enumerate() {
        sc.x64[f] = v as f64;
        sc.old64[f] = v as f64;
    }
    // t = S x, written as Σ_k x_k S_k· (S is symmetric) so that it is a run of axpys, which
    // vectorise without reductions. During the sweep only t_f for coordinates still ahead is
    // kept current: a change δ of x_f adds δ S_fk to t_k for k > f. That is 1.5·dim² fused
    // multiply-adds per sweep, and the sequential chain from one coordinate to the next holds
    // one division instead of a dim-long reduction.
    let t = &mut sc.t64;
    t.fill(0.0);
    for (k, srow) in gram.chunks_exact(dim).enumerate() {
        let xk = sc.x64[k];
        if xk != 0.0 {
            axpy::<FMA>(t, xk, srow);
        }
    }
    // v · x for the rank-one term, kept current as coordinates change.
    let mut vx = match extra {
        Some(e) => dot64::<FMA>(e.v, &sc.x64),
        None => 0.0,
    };
    // r̂_j = x · o_j, accumulated coordinate by coordinate over the transposed buffer.
    for r in sc.rhat.iter_mut() {
        *r = 0.0;
    }
    for f in 0..dim {
        let row = &sc.ot[f * n..(f + 1) * n];
        let xf = x[f];
        for (r, &o) in sc.rhat.iter_mut().zip(row) {
            *r = fma32::<FMA>(xf, o, *r);
        }
    }
    // Split the history sums so that little of them sits on the sequential chain:
    //   Σ_j (w_j - wc_j r̂^f_j) o_jf = A_f - B_f + x_f D_f,   den = D_f + ...
    // with A_f = Σ w_j o_jf and D_f = Σ wc_j o_jf² fixed for the sweep, and
    // B_f = Σ wc_j r̂_j o_jf. B_f is summed over a cache that lags one coordinate behind and
    // corrected by δ_{f-1} C_f, C_f = Σ wc_j o_j,f-1 o_jf (also fixed), so the long
    // reduction for coordinate f overlaps the division of coordinate f-1.
    let (wv, wcv) = (&sc.w[..n], &sc.wc[..n]);
    sc.consts.clear();
    for f in 0..dim {
        let row = &sc.ot[f * n..(f + 1) * n];
        let prev = if f > 0 { &sc.ot[(f - 1) * n..f * n] } else { row };
        sc.consts.push(dot2::<FMA>(wv, row));
        sc.consts.push(dot3::<FMA>(wcv, row, row));
        sc.consts.push(if f > 0 { dot3::<FMA>(wcv, prev, row) } else { 0.0 });
    }
    // The scalar chain runs in f64 end to end (no conversions on it); the row is rounded to
    // f32 as each coordinate is stored, and `x64` keeps exactly that rounded row for the
    // Gramian swap.
    let mut pending = 0.0f64;
    for f in 0..dim {
        let row = &sc.ot[f * n..(f + 1) * n];
        let (a_f, d_f, c_f) = (sc.consts[3 * f], sc.consts[3 * f + 1], sc.consts[3 * f + 2]);
        let b_f = fma64::<FMA>(pending, c_f as f64, dot3::<FMA>(wcv, &sc.rhat[..n], row) as f64);
        if pending != 0.0 {
            let p32 = pending as f32;
            let prev = &sc.ot[(f - 1) * n..f * n];
            for (r, &o) in sc.rhat.iter_mut().zip(prev) {
                *r = fma32::<FMA>(p32, o, *r);
            }
        }
        let srow = &gram[f * dim..(f + 1) * dim];
        let xf64 = sc.x64[f];
        let mut sff = srow[f];
        let mut sx = sc.t64[f];
        if let Some(e) = extra {
            sff += e.coef * e.v[f] * e.v[f];
            sx += e.coef * e.v[f] * vx;
        }
        let cross = sx - xf64 * sff;
        let num = fma64::<FMA>(xf64, d_f as f64, a_f as f64 - b_f) - g * cross;
        // The denominator is ≥ λ in exact arithmetic (g S_ff covers Σ_j c_j o_jf^2); the
        // floor only guards against float drift when λ is tiny.
        let den = (d_f as f64 + g * sff + reg).max(1e-12);
        let new = num / den;
        pending = new - xf64;
        let new32 = new as f32;
        x[f] = new32;
        sc.x64[f] = new32 as f64;
        if pending != 0.0 {
            axpy::<FMA>(&mut sc.t64[f + 1..], pending, &srow[f + 1..]);
        }
        if let Some(e) = extra {
            vx += e.v[f] * pending;
        }
    }
}

/// `Σ a_j b_j`, eight lanes at a time (float addition is not associative, so the compiler
/// only vectorises a reduction written with separate accumulators).
#[inline(always)]
fn dot2<const FMA: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (a, b) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] = fma32::<FMA>(a[k], b[k], acc[k]);
        }
    }
    let mut s = hsum8(&acc);
    for (a, b) in ra.iter().zip(rb) {
        s = fma32::<FMA>(*a, *b, s);
    }
    s
}

/// `Σ a_j b_j c_j`, eight lanes at a time.
#[inline(always)]
fn dot3<const FMA: bool>(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb, cc) = (a.chunks_exact(8), b.chunks_exact(8), c.chunks_exact(8));
    let (ra, rb, rc) = (ca.remainder(), cb.remainder(), cc.remainder());
    for ((a, b), c) in ca.zip(cb).zip(cc) {
        for k in 0..8 {
            acc[k] = fma32::<FMA>(a[k] * b[k], c[k], acc[k]);
        }
    }
    let mut s = hsum8(&acc);
    for ((a, b), c) in ra.iter().zip(rb).zip(rc) {
        s = fma32::<FMA>(a * b, *c, s);
    }
    s
}

/// Tree sum of eight lanes: three dependent adds instead of seven (this sits on the sweep's
/// sequential chain).
#[inline(always)]
fn hsum8(a: &[f32; 8]) -> f32 {
    ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]))
}

/// `y += a x`.
#[inline(always)]
fn axpy<const FMA: bool>(y: &mut [f64], a: f64, x: &[f64]) {
    for (yv, &xv) in y.iter_mut().zip(x) {
        *yv = fma64::<FMA>(a, xv, *yv);
    }
}
