//! Python class `engine._core.Index`: the HNSW index behind a reader-writer lock.
//!
//! Every method that does real work copies its numpy arguments into Rust vectors first and
//! then releases the GIL, so searches from several Python threads, and a writer thread
//! applying updates, run truly in parallel. Writers take the write lock per vector, never
//! across a batch, so queries are delayed by at most one update.

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray1, PyArray2, PyReadonlyArray1, PyReadonlyArray2};
use parking_lot::{RwLock, RwLockWriteGuard};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::hnsw::{Hnsw, HnswConfig};

/// `(ids, scores)` of one query.
type Hits1<'py> = (Bound<'py, PyArray1<u32>>, Bound<'py, PyArray1<f32>>);
/// `(ids, scores)` of a batch, one row per query.
type Hits2<'py> = (Bound<'py, PyArray2<u32>>, Bound<'py, PyArray2<f32>>);

/// Id used to pad `search_batch` rows that found fewer than `k` results.
const PAD_ID: u32 = u32::MAX;

/// Approximate maximum-inner-product index over float32 vectors with dense uint32 ids.
///
/// Ids need not be contiguous (storage grows to the largest id). `add` with an existing id
/// moves its vector in place; deleted ids are never returned and come back on `add`.
#[pyclass(frozen, module = "engine._core")]
pub struct Index {
    inner: RwLock<Hnsw>,
    dim: usize,
}

fn value_error(msg: impl Into<String>) -> PyErr {
    PyValueError::new_err(msg.into())
}

impl Index {
    fn query_vec(&self, q: &PyReadonlyArray1<'_, f32>) -> PyResult<Vec<f32>> {
        let q = q.as_array();
        if q.len() != self.dim {
            return Err(value_error(format!(
                "query has {} components, the index has dimension {}",
                q.len(),
                self.dim
            )));
        }
        Ok(q.iter().copied().collect())
    }

    fn ef_or_default(&self, ef: Option<usize>) -> usize {
        ef.unwrap_or_else(|| self.inner.read().config().ef_search)
    }
}

fn check_finite(v: &[f32], what: &str) -> PyResult<()> {
    if v.iter().all(|x| x.is_finite()) {
        Ok(())
    } else {
        Err(value_error(format!("{what} contains NaN or infinite values")))
    }
}

fn wrap(h: Hnsw) -> Index {
    let dim = h.dim();
    Index { inner: RwLock::new(h), dim }
}

#[pymethods]
impl Index {
    /// Args:
    ///     dim: vector dimension.
    ///     m: links per node on upper layers (layer 0 gets 2*m); 16 suits 32-128 dims.
    ///     ef_construction: beam width while inserting; higher builds slower, searches better.
    ///     ef_search: default beam width of `search`; raise it for recall, lower for speed.
    ///     seed: makes the graph reproducible.
    #[new]
    #[pyo3(signature = (dim, m = 16, ef_construction = 200, ef_search = 64, seed = 42))]
    fn new(dim: usize, m: usize, ef_construction: usize, ef_search: usize, seed: u64) -> PyResult<Self> {
        if dim == 0 {
            return Err(value_error("dim must be positive"));
        }
        if m < 2 {
            return Err(value_error("m must be at least 2"));
        }
        let cfg =
            HnswConfig { m, ef_construction: ef_construction.max(1), ef_search: ef_search.max(1), seed };
        Ok(wrap(Hnsw::new(dim, cfg)))
    }

    /// The vector dimension.
    #[getter]
    fn dim(&self) -> usize {
        self.dim
    }

    /// Inserts or moves the vectors `vectors[i]` under the ids `ids[i]`.
    ///
    /// Args:
    ///     ids: uint32 array of shape (n,); u32::MAX (4294967295) is reserved.
    ///     vectors: float32 array of shape (n, dim) (any memory layout).
    ///
    /// Raises:
    ///     ValueError: shapes disagree, a reserved id, or non-finite values.
    fn add(
        &self,
        py: Python<'_>,
        ids: PyReadonlyArray1<'_, u32>,
        vectors: PyReadonlyArray2<'_, f32>,
    ) -> PyResult<()> {
        let (n, d) = vectors.as_array().dim();
        if d != self.dim {
            return Err(value_error(format!(
                "vectors have {d} columns, the index has dimension {}",
                self.dim
            )));
        }
        let ids: Vec<u32> = ids.as_array().iter().copied().collect();
        if ids.len() != n {
            return Err(value_error(format!("{} ids for {n} vectors", ids.len())));
        }
        if ids.contains(&PAD_ID) {
            return Err(value_error("id 4294967295 (u32::MAX) is reserved"));
        }
        // Logical (row-major) order whatever the memory layout, so Fortran-ordered or
        // strided arrays are read correctly too.
        let flat: Vec<f32> = vectors.as_array().iter().copied().collect();
        check_finite(&flat, "vectors")?;
        py.detach(|| {
            for (i, &id) in ids.iter().enumerate() {
                let mut w = self.inner.write();
                w.upsert(id, &flat[i * d..(i + 1) * d]);
                // Hand the lock to waiting readers: a plain unlock lets this loop re-take it
                // at once and starve queries until parking_lot's fairness timeout.
                RwLockWriteGuard::unlock_fair(w);
            }
        });
        Ok(())
    }

    /// Marks `id` deleted; returns False if it was not a live id.
    fn delete(&self, py: Python<'_>, id: u32) -> bool {
        py.detach(|| self.inner.write().delete(id))
    }

    /// The `k` ids with the largest inner product with `query`, best first.
    ///
    /// Returns:
    ///     (ids uint32 (<= k,), scores float32 (<= k,)); fewer than k only if the index holds
    ///     fewer live ids.
    #[pyo3(signature = (query, k, ef = None))]
    fn search<'py>(
        &self,
        py: Python<'py>,
        query: PyReadonlyArray1<'py, f32>,
        k: usize,
        ef: Option<usize>,
    ) -> PyResult<Hits1<'py>> {
        let q = self.query_vec(&query)?;
        check_finite(&q, "query")?;
        let ef = self.ef_or_default(ef);
        let res = py.detach(|| self.inner.read().search(&q, k, ef, &|_| true));
        let (ids, scores): (Vec<u32>, Vec<f32>) = res.into_iter().unzip();
        Ok((ids.into_pyarray(py), scores.into_pyarray(py)))
    }

    /// `search` for each row of `queries` (float32, shape (n, dim)).
    ///
    /// Returns:
    ///     (ids uint32 (n, k), scores float32 (n, k)); rows with fewer than k results are
    ///     padded with id 4294967295 (u32::MAX) and score -inf.
    #[pyo3(signature = (queries, k, ef = None))]
    fn search_batch<'py>(
        &self,
        py: Python<'py>,
        queries: PyReadonlyArray2<'py, f32>,
        k: usize,
        ef: Option<usize>,
    ) -> PyResult<Hits2<'py>> {
        let (n, d) = queries.as_array().dim();
        if d != self.dim {
            return Err(value_error(format!(
                "queries have {d} columns, the index has dimension {}",
                self.dim
            )));
        }
        let flat: Vec<f32> = queries.as_array().iter().copied().collect();
        check_finite(&flat, "queries")?;
        let ef = self.ef_or_default(ef);
        // The read lock is taken per query so a writer waits at most one query.
        Ok(batch_hits(py, n, k, |r| self.inner.read().search(&flat[r * d..(r + 1) * d], k, ef, &|_| true)))
    }

    fn __len__(&self) -> usize {
        self.inner.read().len()
    }

    fn __contains__(&self, id: u32) -> bool {
        self.inner.read().contains(id)
    }

    /// Verifies the graph's structural invariants (a test and debugging aid; O(n)).
    ///
    /// Raises:
    ///     ValueError: naming the first broken invariant.
    fn check_invariants(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.inner.read().check_invariants()).map_err(value_error)
    }

    /// Writes the index to `path` (a checksummed binary file).
    fn save(&self, py: Python<'_>, path: std::path::PathBuf) -> PyResult<()> {
        py.detach(|| -> std::io::Result<()> {
            let tmp = path.with_extension("tmp");
            {
                let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
                self.inner.read().save(&mut f)?;
                f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            }
            // Write-then-rename: a crash never leaves a half-written index under `path`.
            std::fs::rename(&tmp, &path)
        })?;
        Ok(())
    }

    /// Reads an index written by `save`.
    ///
    /// Raises:
    ///     ValueError: the file is not an index, has an unknown format version, or is
    ///         corrupted (checksum mismatch, truncation).
    ///     OSError: the file cannot be read.
    #[staticmethod]
    fn load(py: Python<'_>, path: std::path::PathBuf) -> PyResult<Self> {
        let h = py
            .detach(|| {
                let mut f = std::io::BufReader::new(std::fs::File::open(&path)?);
                Hnsw::load(&mut f)
            })
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::InvalidData => value_error(format!("{}: {e}", path.display())),
                _ => PyErr::from(e),
            })?;
        Ok(wrap(h))
    }

    fn __repr__(&self) -> String {
        let h = self.inner.read();
        format!("Index(dim={}, len={}, m={})", self.dim, h.len(), h.config().m)
    }
}

/// Exact top-`k` by inner product of each query against every row of `matrix` (the scan that
/// serves small catalogs): the oracle for recall and the other side of the crossover.
#[pyfunction]
pub fn exact_search_batch<'py>(
    py: Python<'py>,
    matrix: PyReadonlyArray2<'py, f32>,
    queries: PyReadonlyArray2<'py, f32>,
    k: usize,
) -> PyResult<Hits2<'py>> {
    let (_, dim) = matrix.as_array().dim();
    let (n, d) = queries.as_array().dim();
    if d != dim {
        return Err(value_error(format!("queries have {d} columns, the matrix has {dim}")));
    }
    let rows: Vec<f32> = matrix.as_array().iter().copied().collect();
    let flat: Vec<f32> = queries.as_array().iter().copied().collect();
    Ok(batch_hits(py, n, k, |r| {
        crate::scan::exact_top_k(&rows, dim, &flat[r * d..(r + 1) * d], k, &|_| true)
    }))
}

/// Runs `query(row)` for rows `0..n` with the GIL released and packs the hits into `(n, k)`
/// arrays, padding short rows with `PAD_ID` and `-inf`.
fn batch_hits<'py>(
    py: Python<'py>,
    n: usize,
    k: usize,
    query: impl Fn(usize) -> Vec<(u32, f32)> + Send + Sync,
) -> Hits2<'py> {
    let (ids, scores) = py.detach(|| {
        let mut ids = vec![PAD_ID; n * k];
        let mut scores = vec![f32::NEG_INFINITY; n * k];
        for r in 0..n {
            for (j, (id, s)) in query(r).into_iter().enumerate() {
                ids[r * k + j] = id;
                scores[r * k + j] = s;
            }
        }
        (ids, scores)
    });
    let ids = Array2::from_shape_vec((n, k), ids).expect("n*k elements");
    let scores = Array2::from_shape_vec((n, k), scores).expect("n*k elements");
    (ids.into_pyarray(py), scores.into_pyarray(py))
}
