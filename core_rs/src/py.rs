//! The Python bindings: argument extraction, GIL release, error mapping. No algorithms here.
//!
//! Every method that does real work copies its arguments out of Python objects first, then
//! runs under `py.detach` so other Python threads (the trio event loop) keep running.

use std::fmt::Write as _;
use std::path::PathBuf;

use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::create_exception;
use pyo3::exceptions::{PyKeyError, PyOSError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBool, PyBytes, PyDict, PyList, PyString, PyTuple};

use crate::decode::{self, DecodeError, Record};
use crate::hnsw::HnswConfig;
use crate::ids::ExtId;
use crate::mf::MfConfig;
use crate::model::{self, ApplyReport, ModelError, Query};

create_exception!(
    _core,
    InvalidEvent,
    PyValueError,
    "An event was refused (bad id, weight, type or time). Raised by `Model.ingest`, which then applies none of the batch."
);
create_exception!(
    _core,
    InvalidFrame,
    PyValueError,
    "Bytes that can never become a valid Fluent Forward frame; the connection that sent them should be closed."
);
create_exception!(
    _core,
    IncompleteFrame,
    PyValueError,
    "A Forward frame was cut short: more bytes are needed. Raised by `Model.ingest_forward` given a partial frame."
);
create_exception!(_core, UnknownItem, PyKeyError, "The item id has never been seen by the model.");
create_exception!(
    _core,
    CorruptSnapshot,
    PyValueError,
    "A snapshot file is damaged, truncated or of another format version."
);

fn ext_from_py(obj: &Bound<'_, PyAny>) -> PyResult<ExtId> {
    if let Ok(s) = obj.cast::<PyString>() {
        return ExtId::from_str(s.to_str()?).map_err(InvalidEvent::new_err);
    }
    if obj.is_instance_of::<PyBool>() {
        return Err(PyTypeError::new_err("an id must be a str or an int, not a bool"));
    }
    match obj.extract::<i64>() {
        Ok(i) => Ok(ExtId::Int(i)),
        Err(_) if obj.hasattr("__index__")? => {
            Err(InvalidEvent::new_err("integer id does not fit in 64 bits"))
        }
        Err(_) => Err(PyTypeError::new_err(format!(
            "an id must be a str or an int, not {}",
            obj.get_type().name()?
        ))),
    }
}

fn ext_to_py(py: Python<'_>, e: &ExtId) -> PyResult<Py<PyAny>> {
    Ok(match e {
        ExtId::Int(i) => i.into_pyobject(py)?.into_any().unbind(),
        ExtId::Str(s) => PyString::new(py, s).into_any().unbind(),
    })
}

fn model_err(e: ModelError) -> PyErr {
    match e {
        ModelError::InvalidEvent { index, reason } => {
            InvalidEvent::new_err(format!("event {index}: {reason}"))
        }
        ModelError::UnknownItem(i) => UnknownItem::new_err(format!("unknown item {i}")),
        ModelError::Frame(f) => frame_err(f),
    }
}

fn frame_err(e: DecodeError) -> PyErr {
    match e {
        DecodeError::Incomplete => IncompleteFrame::new_err("the frame is incomplete"),
        DecodeError::Invalid(reason) => InvalidFrame::new_err(reason),
    }
}

/// A [`model::FrameCheck`] as the dict `check_frame` returns.
fn frame_check_to_py(py: Python<'_>, checked: model::FrameCheck) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("used", checked.used)?;
    d.set_item("entries", checked.entries)?;
    d.set_item("rejected", checked.rejected)?;
    d.set_item("admin", checked.admin)?;
    d.set_item("chunk", checked.chunk)?;
    d.set_item("tag", checked.tag)?;
    Ok(d)
}

fn snapshot_err(e: std::io::Error) -> PyErr {
    match e.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
            CorruptSnapshot::new_err(e.to_string())
        }
        // The snapshot is sound but the configuration asks for what it cannot become.
        std::io::ErrorKind::InvalidInput => PyValueError::new_err(e.to_string()),
        _ => PyOSError::new_err(e.to_string()),
    }
}

/// Reads `key` from the config dict, or `default` when absent or None.
fn opt<'py, T: for<'a> FromPyObjectOwned<'py>>(
    cfg: &Bound<'py, PyDict>,
    key: &str,
    default: T,
) -> PyResult<T> {
    match cfg.get_item(key)? {
        Some(v) if !v.is_none() => {
            v.extract().map_err(|e| PyTypeError::new_err(format!("config {key}: {}", Into::<PyErr>::into(e))))
        }
        _ => Ok(default),
    }
}

const KNOWN_KEYS: &[&str] = &[
    "dim",
    "c0",
    "alpha",
    "reg",
    "w_new",
    "online_iters",
    "user_history_cap",
    "item_history_cap",
    "decay_half_life",
    "init_std",
    "seed",
    "hnsw_m",
    "ef_construction",
    "ef_search",
    "event_weights",
    "default_weight",
    "trending_half_life",
    "max_clock_skew",
    "exact_below",
    "dedup_window",
    "auto_reindex",
    "max_frame_bytes",
    "cold_start_events",
    "diversity",
    "exploration",
    "explore_max_events",
    "neighbour_weight",
    "neighbour_window",
    "neighbour_cap",
    "batch_apply",
    "coalesce_records",
];

/// A share or weight that must lie in [0, 1].
fn unit_interval(name: &str, v: f32) -> PyResult<f32> {
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(PyValueError::new_err(format!("{name} must be in [0, 1], got {v}")))
    }
}

fn config_from_dict(cfg: &Bound<'_, PyDict>) -> PyResult<model::Config> {
    for k in cfg.keys() {
        let k: String = k.extract()?;
        if !KNOWN_KEYS.contains(&k.as_str()) {
            return Err(PyValueError::new_err(format!("unknown config key {k:?}")));
        }
    }
    let defaults = model::Config::default();
    let d = defaults.mf.clone();
    let seed: u64 = opt(cfg, "seed", d.seed)?;
    let mf = MfConfig {
        dim: opt(cfg, "dim", d.dim)?,
        c0: opt(cfg, "c0", d.c0)?,
        alpha: opt(cfg, "alpha", d.alpha)?,
        reg: opt(cfg, "reg", d.reg)?,
        w_new: opt(cfg, "w_new", d.w_new)?,
        online_iters: opt(cfg, "online_iters", d.online_iters)?,
        user_history_cap: opt(cfg, "user_history_cap", d.user_history_cap)?,
        item_history_cap: opt(cfg, "item_history_cap", d.item_history_cap)?,
        decay_half_life: match cfg.get_item("decay_half_life")? {
            Some(v) if !v.is_none() => Some(v.extract()?),
            _ => d.decay_half_life,
        },
        init_std: opt(cfg, "init_std", d.init_std)?,
        seed,
    };
    mf.validate().map_err(PyValueError::new_err)?;
    if mf.dim > 1024 {
        return Err(PyValueError::new_err("dim must be at most 1024"));
    }
    let h = defaults.hnsw.clone();
    let hnsw = HnswConfig {
        m: opt(cfg, "hnsw_m", h.m)?,
        ef_construction: opt(cfg, "ef_construction", h.ef_construction)?,
        ef_search: opt(cfg, "ef_search", h.ef_search)?,
        seed,
    };
    if hnsw.m < 2 || hnsw.m > 256 {
        return Err(PyValueError::new_err("hnsw_m must be in 2..=256"));
    }
    let event_weights: Vec<(String, f32)> = match cfg.get_item("event_weights")? {
        Some(v) if !v.is_none() => {
            let d = v.cast::<PyDict>().map_err(|_| PyTypeError::new_err("event_weights must be a dict"))?;
            let mut out = Vec::new();
            for (k, w) in d.iter() {
                out.push((k.extract()?, w.extract()?));
            }
            out
        }
        _ => defaults.event_weights.clone(),
    };
    for (name, w) in &event_weights {
        if !w.is_finite() || *w <= 0.0 || *w > model::MAX_WEIGHT {
            return Err(PyValueError::new_err(format!("event_weights[{name:?}] must be in (0, 1e6]")));
        }
    }
    let mut limits = defaults.limits.clone();
    limits.max_frame_bytes = opt(cfg, "max_frame_bytes", limits.max_frame_bytes)?;
    let d = defaults;
    let cold_start_events: f32 = opt(cfg, "cold_start_events", d.cold_start_events)?;
    if !(cold_start_events.is_finite() && cold_start_events >= 0.0) {
        return Err(PyValueError::new_err("cold_start_events must be a finite number ≥ 0"));
    }
    let max_clock_skew: f64 = opt(cfg, "max_clock_skew", d.max_clock_skew)?;
    if !(max_clock_skew.is_finite() && max_clock_skew >= 0.0) {
        return Err(PyValueError::new_err("max_clock_skew must be a finite number of seconds ≥ 0"));
    }
    for key in ["neighbour_window", "neighbour_cap"] {
        let v: usize = opt(cfg, key, 1usize)?;
        if !(1..=10_000).contains(&v) {
            return Err(PyValueError::new_err(format!("{key} must be in 1..=10000, got {v}")));
        }
    }
    Ok(model::Config {
        mf,
        hnsw,
        event_weights,
        default_weight: opt(cfg, "default_weight", d.default_weight)?,
        trending_half_life: opt(cfg, "trending_half_life", d.trending_half_life)?,
        max_clock_skew,
        exact_below: opt(cfg, "exact_below", d.exact_below)?,
        dedup_window: opt(cfg, "dedup_window", d.dedup_window)?,
        auto_reindex: opt(cfg, "auto_reindex", d.auto_reindex)?,
        limits,
        cold_start_events,
        diversity: unit_interval("diversity", opt(cfg, "diversity", d.diversity)?)?,
        exploration: unit_interval("exploration", opt(cfg, "exploration", d.exploration)?)?,
        explore_max_events: opt(cfg, "explore_max_events", d.explore_max_events)?,
        neighbour_weight: unit_interval(
            "neighbour_weight",
            opt(cfg, "neighbour_weight", d.neighbour_weight)?,
        )?,
        neighbour_window: opt(cfg, "neighbour_window", d.neighbour_window)?,
        neighbour_cap: opt(cfg, "neighbour_cap", d.neighbour_cap)?,
        batch_apply: opt(cfg, "batch_apply", d.batch_apply)?,
        coalesce_records: opt(cfg, "coalesce_records", d.coalesce_records)?,
    })
}

/// An `f32` setting as the Python float it was written as (0.01, not 0.009999999776…):
/// the shortest decimal that reads back as the same `f32`.
fn f32_setting(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(x as f64)
}

/// A configuration as a dict with the keys `config_from_dict` reads (`KNOWN_KEYS`).
fn config_to_dict<'py>(py: Python<'py>, c: &model::Config) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    let mf = &c.mf;
    d.set_item("dim", mf.dim)?;
    d.set_item("c0", f32_setting(mf.c0))?;
    d.set_item("alpha", f32_setting(mf.alpha))?;
    d.set_item("reg", f32_setting(mf.reg))?;
    d.set_item("w_new", f32_setting(mf.w_new))?;
    d.set_item("online_iters", mf.online_iters)?;
    d.set_item("user_history_cap", mf.user_history_cap)?;
    d.set_item("item_history_cap", mf.item_history_cap)?;
    d.set_item("decay_half_life", mf.decay_half_life)?;
    d.set_item("init_std", f32_setting(mf.init_std))?;
    d.set_item("seed", mf.seed)?;
    d.set_item("hnsw_m", c.hnsw.m)?;
    d.set_item("ef_construction", c.hnsw.ef_construction)?;
    d.set_item("ef_search", c.hnsw.ef_search)?;
    let weights = PyDict::new(py);
    for (name, w) in &c.event_weights {
        weights.set_item(name, f32_setting(*w))?;
    }
    d.set_item("event_weights", weights)?;
    d.set_item("default_weight", f32_setting(c.default_weight))?;
    d.set_item("trending_half_life", c.trending_half_life)?;
    d.set_item("max_clock_skew", c.max_clock_skew)?;
    d.set_item("exact_below", c.exact_below)?;
    d.set_item("dedup_window", c.dedup_window)?;
    d.set_item("auto_reindex", c.auto_reindex)?;
    d.set_item("max_frame_bytes", c.limits.max_frame_bytes)?;
    d.set_item("cold_start_events", f32_setting(c.cold_start_events))?;
    d.set_item("diversity", f32_setting(c.diversity))?;
    d.set_item("exploration", f32_setting(c.exploration))?;
    d.set_item("explore_max_events", c.explore_max_events)?;
    d.set_item("neighbour_weight", f32_setting(c.neighbour_weight))?;
    d.set_item("neighbour_window", c.neighbour_window)?;
    d.set_item("neighbour_cap", c.neighbour_cap)?;
    d.set_item("batch_apply", c.batch_apply)?;
    d.set_item("coalesce_records", c.coalesce_records)?;
    Ok(d)
}

/// Writes `text` as one websocket text frame to the non-blocking socket `fd` when it can go
/// whole at once (see `crate::wsframe`): 1 written, 0 declined (nothing written), 2 cut short
/// by the kernel (the connection was shut down). The caller keeps `fd` open for the call.
#[pyfunction]
fn write_text_frame(fd: i32, text: &str, limit: usize) -> PyResult<u8> {
    if fd < 0 {
        return Err(PyValueError::new_err("a socket's descriptor is not negative"));
    }
    // SAFETY: the caller holds `fd` open for the call (the contract above).
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    Ok(crate::wsframe::write_text_frame(fd, text.as_bytes(), limit) as u8)
}

/// The model's default settings, the one source `engine.ModelConfig` takes its defaults from.
#[pyfunction]
fn default_config(py: Python<'_>) -> PyResult<Bound<'_, PyDict>> {
    config_to_dict(py, &model::Config::default())
}

/// A config argument (`ModelConfig`, any attrs instance, dict or None) as a dict.
fn config_dict<'py>(py: Python<'py>, config: Option<&Bound<'py, PyAny>>) -> PyResult<Bound<'py, PyDict>> {
    Ok(match config {
        None => PyDict::new(py),
        Some(c) if c.is_none() => PyDict::new(py),
        Some(c) => match c.cast::<PyDict>() {
            Ok(d) => d.clone(),
            Err(_) => py.import("attrs")?.call_method1("asdict", (c,))?.cast_into::<PyDict>()?,
        },
    })
}

/// A sequence argument as a list of items (numpy int64 arrays take the fast path).
fn ids_from_py(obj: &Bound<'_, PyAny>) -> PyResult<Vec<ExtId>> {
    if let Ok(arr) = obj.extract::<PyReadonlyArray1<'_, i64>>() {
        return Ok(arr.as_array().iter().map(|&i| ExtId::Int(i)).collect());
    }
    obj.try_iter()?.map(|x| ext_from_py(&x?)).collect()
}

fn opt_f64s(obj: Option<&Bound<'_, PyAny>>, n: usize, what: &str) -> PyResult<Option<Vec<f64>>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else { return Ok(None) };
    let v: Vec<f64> = match obj.extract::<PyReadonlyArray1<'_, f64>>() {
        Ok(a) => a.as_array().to_vec(),
        Err(_) => obj.try_iter()?.map(|x| x?.extract::<f64>()).collect::<PyResult<_>>()?,
    };
    if v.len() != n {
        return Err(PyValueError::new_err(format!("{what} has {} entries, users has {n}", v.len())));
    }
    Ok(Some(v))
}

fn report_to_py<'py>(py: Python<'py>, r: &ApplyReport) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("applied", r.applied)?;
    d.set_item("duplicates", r.duplicates)?;
    d.set_item("rejected", r.rejected.clone())?;
    let users = PyList::empty(py);
    for (u, id) in &r.touched_users {
        let id = match id {
            Some(id) => ext_to_py(py, id)?,
            None => py.None(),
        };
        users.append((ext_to_py(py, u)?, id))?;
    }
    d.set_item("users", users)?;
    let erased = PyList::empty(py);
    for u in &r.erased_users {
        erased.append(ext_to_py(py, u)?)?;
    }
    d.set_item("erased", erased)?;
    Ok(d)
}

fn query(
    k: usize,
    exclude_seen: bool,
    exclude: Option<&Bound<'_, PyAny>>,
    category: Option<String>,
    exact: bool,
    explain: bool,
    ef: Option<usize>,
) -> PyResult<Query> {
    if k == 0 || k > 10_000 {
        return Err(PyValueError::new_err("k must be in 1..=10000"));
    }
    let exclude = match exclude {
        Some(e) if !e.is_none() => ids_from_py(e)?,
        _ => Vec::new(),
    };
    Ok(Query { k, exclude_seen, exclude, category, exact, explain, ef, ..Query::default() })
}

/// The re-ranking options of a recommendation query (see `Model.recommend`).
fn with_options(
    mut q: Query,
    exclude_category: Option<Vec<String>>,
    diversity: Option<f32>,
    exploration: Option<f32>,
) -> PyResult<Query> {
    q.exclude_category = exclude_category.unwrap_or_default();
    q.diversity = diversity.map(|d| unit_interval("diversity", d)).transpose()?;
    q.exploration = exploration.map(|e| unit_interval("exploration", e)).transpose()?;
    Ok(q)
}

/// Tuples `(item, score)` / `(item, score, because)`, or with `detail` dicts
/// `{"item", "score", "explore"}` plus `"because"` and `"reason"` when explaining.
fn recs_to_py(py: Python<'_>, recs: &[model::Rec], explain: bool, detail: bool) -> PyResult<Py<PyList>> {
    let out = PyList::empty(py);
    for r in recs {
        let item = ext_to_py(py, &r.item)?;
        if detail {
            let d = PyDict::new(py);
            d.set_item("item", item)?;
            d.set_item("score", r.score)?;
            if explain {
                let because = PyList::empty(py);
                for b in &r.because {
                    because.append(ext_to_py(py, b)?)?;
                }
                d.set_item("because", because)?;
                d.set_item("reason", r.reason.as_str())?;
            }
            d.set_item("explore", r.explore)?;
            out.append(d)?;
        } else if explain {
            let because = PyList::empty(py);
            for b in &r.because {
                because.append(ext_to_py(py, b)?)?;
            }
            out.append(PyTuple::new(
                py,
                [item, r.score.into_pyobject(py)?.into_any().unbind(), because.into_any().unbind()],
            )?)?;
        } else {
            out.append((item, r.score))?;
        }
    }
    Ok(out.unbind())
}

/// Appends a list as a JSON array of entries (see `Model.recommend_batch_json`) to `out`.
fn entries_json(out: &mut String, recs: &[model::Rec], explain: bool) {
    out.push('[');
    for (n, r) in recs.iter().enumerate() {
        if n > 0 {
            out.push(',');
        }
        out.push_str("{\"item\":");
        json_id(out, &r.item);
        out.push_str(",\"score\":");
        json_f32(out, r.score);
        if explain {
            out.push_str(",\"because\":[");
            for (m, b) in r.because.iter().enumerate() {
                if m > 0 {
                    out.push(',');
                }
                json_id(out, b);
            }
            out.push_str("],\"reason\":");
            json_str(out, r.reason.as_str());
        }
        if r.explore {
            out.push_str(",\"explore\":true");
        }
        out.push('}');
    }
    out.push(']');
}

fn json_id(out: &mut String, id: &ExtId) {
    match id {
        ExtId::Int(i) => _ = write!(out, "{i}"),
        ExtId::Str(s) => json_str(out, s),
    }
}

/// The score widened to f64 and written as its shortest round-trip decimal, the number
/// Python's `json.dumps` gives for the same float; `null` when not finite.
fn json_f32(out: &mut String, x: f32) {
    if x.is_finite() {
        _ = write!(out, "{}", x as f64);
    } else {
        out.push_str("null");
    }
}

/// A JSON string literal (RFC 8259 §7): quote, backslash and control characters escaped.
fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => _ = write!(out, "\\u{:04x}", c as u32),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// The model: see `engine.Model` for the documented Python face.
#[pyclass(frozen, module = "engine._core", name = "Model")]
pub struct PyModel {
    inner: model::Model,
    /// The journal position the model was loaded at (0 for a new model).
    #[pyo3(get)]
    loaded_wal_seq: u64,
    /// The shared log's position the model was loaded at (empty for a new model or one saved
    /// without it).
    loaded_log_position: Vec<u8>,
}

#[pymethods]
impl PyModel {
    #[new]
    /// `config`: an `engine.ModelConfig` (any attrs instance), a dict of its fields, or None.
    #[pyo3(signature = (config=None))]
    fn new(py: Python<'_>, config: Option<&Bound<'_, PyAny>>) -> PyResult<Self> {
        let cfg = config_from_dict(&config_dict(py, config)?)?;
        Ok(PyModel { inner: model::Model::new(cfg), loaded_wal_seq: 0, loaded_log_position: Vec::new() })
    }

    /// The settings the model runs with, as a dict of `ModelConfig` fields.
    fn config<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        config_to_dict(py, self.inner.config())
    }

    /// Applies interactions; validates the whole batch first and applies none on a refusal.
    #[pyo3(signature = (users, items, weights=None, types=None, ts=None, ids=None, producer=""))]
    fn ingest<'py>(
        &self,
        py: Python<'py>,
        users: &Bound<'py, PyAny>,
        items: &Bound<'py, PyAny>,
        weights: Option<&Bound<'py, PyAny>>,
        types: Option<&Bound<'py, PyAny>>,
        ts: Option<&Bound<'py, PyAny>>,
        ids: Option<&Bound<'py, PyAny>>,
        producer: &str,
    ) -> PyResult<Bound<'py, PyDict>> {
        let users = ids_from_py(users)?;
        let items = ids_from_py(items)?;
        let n = users.len();
        if items.len() != n {
            return Err(PyValueError::new_err(format!("items has {} entries, users has {n}", items.len())));
        }
        let weights = opt_f64s(weights, n, "weights")?;
        let ts = opt_f64s(ts, n, "ts")?;
        let types: Option<Vec<Option<String>>> = match types.filter(|t| !t.is_none()) {
            Some(t) => Some(t.try_iter()?.map(|x| x?.extract::<Option<String>>()).collect::<PyResult<_>>()?),
            None => None,
        };
        if types.as_ref().is_some_and(|t| t.len() != n) {
            return Err(PyValueError::new_err("types and users differ in length"));
        }
        let ids: Option<Vec<ExtId>> = match ids.filter(|t| !t.is_none()) {
            Some(t) => Some(ids_from_py(t)?),
            None => None,
        };
        if ids.as_ref().is_some_and(|t| t.len() != n) {
            return Err(PyValueError::new_err("ids and users differ in length"));
        }
        let now = model::Model::default_ts();
        let records: Vec<Record> = users
            .into_iter()
            .zip(items)
            .enumerate()
            .map(|(j, (user, item))| Record::Interaction {
                user,
                item,
                kind: types.as_ref().and_then(|t| t[j].clone()),
                weight: weights.as_ref().map(|w| w[j] as f32),
                id: ids.as_ref().map(|v| v[j].clone()),
                ts: ts.as_ref().map_or(now, |t| t[j]),
            })
            .collect();
        let producer = producer.to_owned();
        let report = py.detach(|| {
            self.inner.validate(&records)?;
            Ok::<_, ModelError>(self.inner.apply(&records, &producer))
        });
        report_to_py(py, &report.map_err(model_err)?)
    }

    /// Decodes one complete Forward frame and applies its records (bad records are refused
    /// one by one and listed under "rejected"); event ids are de-duplicated per frame tag.
    /// Adds "chunk" and "consumed" to the report.
    ///
    /// `accepted_at` is when the server accepted the frame (unix seconds; None: now): no
    /// event counts as later than that, and one more than `max_clock_skew` later is refused.
    #[pyo3(signature = (frame, accepted_at=None))]
    fn ingest_forward<'py>(
        &self,
        py: Python<'py>,
        frame: &[u8],
        accepted_at: Option<f64>,
    ) -> PyResult<Bound<'py, PyDict>> {
        if accepted_at.is_some_and(|t| !t.is_finite()) {
            return Err(PyValueError::new_err("accepted_at must be a finite number of seconds"));
        }
        let (report, chunk, used) =
            py.detach(|| self.inner.apply_frame(frame, accepted_at)).map_err(frame_err)?;
        let d = report_to_py(py, &report)?;
        d.set_item("chunk", chunk)?;
        d.set_item("consumed", used)?;
        Ok(d)
    }

    /// Applies journal records (`[accepted_at, frame]` as msgpack, the journal's payloads)
    /// in order as one group: the batched path coalesces the vector solves of the whole
    /// group (config `batch_apply`). Returns one entry per record: a string saying why it
    /// could not be read (it was skipped), else with `collect` the tuple
    /// `(accepted_at, applied, duplicates, rejected, users, erased)` with `rejected` as
    /// ((entry, reason), ...), `users` as ((user, newest event id or None), ...) and `erased`
    /// as (user, ...), and without `collect` None. Without `users` (and with `batch_apply`)
    /// `users` is always empty: a replay before anyone subscribes skips noting them. A
    /// `replay` (catching up at start-up) coalesces more events per solve.
    #[pyo3(signature = (payloads, collect=true, users=true, replay=false))]
    fn apply_journal<'py>(
        &self,
        py: Python<'py>,
        payloads: Vec<Vec<u8>>,
        collect: bool,
        users: bool,
        replay: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let results = py.detach(|| {
            let slices: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
            self.inner.apply_journal(&slices, collect && users, replay)
        });
        let out = PyList::empty(py);
        for r in results {
            match r {
                Err(why) => out.append(why)?,
                Ok(_) if !collect => out.append(py.None())?,
                Ok((at, report)) => {
                    let users = report
                        .touched_users
                        .iter()
                        .map(|(u, id)| {
                            let id = match id {
                                Some(id) => ext_to_py(py, id)?,
                                None => py.None(),
                            };
                            PyTuple::new(py, [ext_to_py(py, u)?, id])
                        })
                        .collect::<PyResult<Vec<_>>>()?;
                    let erased =
                        report.erased_users.iter().map(|u| ext_to_py(py, u)).collect::<PyResult<Vec<_>>>()?;
                    let rejected: Vec<(usize, String)> = report.rejected;
                    out.append((
                        at,
                        report.applied,
                        report.duplicates,
                        PyTuple::new(py, rejected)?,
                        PyTuple::new(py, users)?,
                        PyTuple::new(py, erased)?,
                    ))?;
                }
            }
        }
        Ok(out)
    }

    /// Checks the frame that starts at `offset` in `buf` as `ingest_forward` would, changing nothing.
    ///
    /// Returns None when `buf` holds only part of a frame, else a dict with "used" (bytes of
    /// the frame), "entries", "rejected" ([(entry index, reason)]), "chunk" and "tag".
    /// Raises InvalidFrame when the bytes can never become a frame.
    #[pyo3(signature = (buf, offset=0))]
    fn check_frame<'py>(
        &self,
        py: Python<'py>,
        buf: &[u8],
        offset: usize,
    ) -> PyResult<Option<Bound<'py, PyDict>>> {
        let buf = buf.get(offset..).ok_or_else(|| PyValueError::new_err("offset is past the end of buf"))?;
        match py.detach(|| self.inner.check_frame(buf)) {
            Ok(c) => frame_check_to_py(py, c).map(Some),
            Err(DecodeError::Incomplete) => Ok(None),
            Err(e) => Err(frame_err(e)),
        }
    }

    /// Checks every complete frame in `buf[offset:end]` as `check_frame` does, in one call
    /// that releases the GIL once: the way to check all the frames one read brought.
    ///
    /// Returns `(checks, error)`: a `check_frame` dict per complete frame, in order, and the
    /// reason the bytes after them can never be a frame, or None when they are a frame still
    /// arriving (or nothing). Frames before an invalid one are still returned.
    #[pyo3(signature = (buf, offset=0, end=None))]
    fn check_frames<'py>(
        &self,
        py: Python<'py>,
        buf: &[u8],
        offset: usize,
        end: Option<usize>,
    ) -> PyResult<(Bound<'py, PyList>, Option<String>)> {
        let end = end.unwrap_or(buf.len());
        let buf = buf
            .get(offset..end)
            .ok_or_else(|| PyValueError::new_err("offset and end must satisfy offset <= end <= len(buf)"))?;
        let (checks, _, error) = py.detach(|| {
            decode::split_frames(buf, |frame| {
                self.inner.check_frame(frame).map(|c| {
                    let used = c.used;
                    (c, used)
                })
            })
        });
        let out = PyList::empty(py);
        for c in checks {
            out.append(frame_check_to_py(py, c)?)?;
        }
        Ok((out, error))
    }

    #[pyo3(signature = (user, k=10, exclude_seen=true, exclude=None, category=None, exact=false, explain=false, ef=None, *, exclude_category=None, diversity=None, exploration=None, detail=false))]
    fn recommend(
        &self,
        py: Python<'_>,
        user: &Bound<'_, PyAny>,
        k: usize,
        exclude_seen: bool,
        exclude: Option<&Bound<'_, PyAny>>,
        category: Option<String>,
        exact: bool,
        explain: bool,
        ef: Option<usize>,
        exclude_category: Option<Vec<String>>,
        diversity: Option<f32>,
        exploration: Option<f32>,
        detail: bool,
    ) -> PyResult<Py<PyList>> {
        let user = ext_from_py(user)?;
        let q = query(k, exclude_seen, exclude, category, exact, explain, ef)?;
        let q = with_options(q, exclude_category, diversity, exploration)?;
        let recs = py.detach(|| self.inner.recommend(&user, &q));
        recs_to_py(py, &recs, explain, detail)
    }

    /// The trending list (decayed popularity), optionally within a category.
    #[pyo3(signature = (k=10, category=None))]
    fn trending(&self, py: Python<'_>, k: usize, category: Option<String>) -> PyResult<Py<PyList>> {
        let q = query(k, false, None, category, false, false, None)?;
        let recs = py.detach(|| self.inner.trending(&q));
        recs_to_py(py, &recs, false, false)
    }

    /// `recommend` for many users with the same options, the GIL released once for all.
    #[pyo3(signature = (users, k=10, exclude_seen=true, exclude=None, category=None, exact=false, explain=false, ef=None, *, exclude_category=None, diversity=None, exploration=None, detail=false))]
    fn recommend_batch(
        &self,
        py: Python<'_>,
        users: &Bound<'_, PyAny>,
        k: usize,
        exclude_seen: bool,
        exclude: Option<&Bound<'_, PyAny>>,
        category: Option<String>,
        exact: bool,
        explain: bool,
        ef: Option<usize>,
        exclude_category: Option<Vec<String>>,
        diversity: Option<f32>,
        exploration: Option<f32>,
        detail: bool,
    ) -> PyResult<Py<PyList>> {
        let users = ids_from_py(users)?;
        let q = query(k, exclude_seen, exclude, category, exact, explain, ef)?;
        let q = with_options(q, exclude_category, diversity, exploration)?;
        let all: Vec<Vec<model::Rec>> = py.detach(|| self.inner.recommend_many(&users, &q));
        let out = PyList::empty(py);
        for recs in &all {
            out.append(recs_to_py(py, recs, explain, detail)?)?;
        }
        Ok(out.unbind())
    }

    /// `recommend_batch` for pushes: per user a tuple `(items, entries)`, the item ids in
    /// order and the list already encoded as a JSON array of `{"item", "score"}` objects
    /// (plus `"because"` and `"reason"` when explaining, and `"explore": true` on exploration
    /// slots), so a message is serialised once, without Python objects per entry. Non-finite
    /// scores are encoded as `null`.
    #[pyo3(signature = (users, k=10, exclude_seen=true, exclude=None, category=None, exact=false, explain=false, ef=None, *, exclude_category=None, diversity=None, exploration=None))]
    fn recommend_batch_json(
        &self,
        py: Python<'_>,
        users: &Bound<'_, PyAny>,
        k: usize,
        exclude_seen: bool,
        exclude: Option<&Bound<'_, PyAny>>,
        category: Option<String>,
        exact: bool,
        explain: bool,
        ef: Option<usize>,
        exclude_category: Option<Vec<String>>,
        diversity: Option<f32>,
        exploration: Option<f32>,
    ) -> PyResult<Py<PyList>> {
        let users = ids_from_py(users)?;
        let q = query(k, exclude_seen, exclude, category, exact, explain, ef)?;
        let q = with_options(q, exclude_category, diversity, exploration)?;
        // Every list's text in one buffer, cut at `ends`; the GIL is released once for all.
        let (all, text, ends) = py.detach(|| {
            let all = self.inner.recommend_many(&users, &q);
            let mut text = String::with_capacity(all.iter().map(|r| 2 + 40 * r.len()).sum());
            let mut ends = Vec::with_capacity(all.len());
            for recs in &all {
                entries_json(&mut text, recs, explain);
                ends.push(text.len());
            }
            (all, text, ends)
        });
        let out = PyList::empty(py);
        let mut start = 0;
        for (recs, end) in all.iter().zip(ends) {
            let items =
                PyList::new(py, recs.iter().map(|r| ext_to_py(py, &r.item)).collect::<PyResult<Vec<_>>>()?)?;
            out.append((items, PyString::new(py, &text[start..end])))?;
            start = end;
        }
        Ok(out.unbind())
    }

    #[pyo3(signature = (item, k=10))]
    fn similar(&self, py: Python<'_>, item: &Bound<'_, PyAny>, k: usize) -> PyResult<Py<PyList>> {
        let item = ext_from_py(item)?;
        if k == 0 || k > 10_000 {
            return Err(PyValueError::new_err("k must be in 1..=10000"));
        }
        let hits = py.detach(|| self.inner.similar(&item, k)).map_err(model_err)?;
        let out = PyList::empty(py);
        for (i, s) in &hits {
            out.append((ext_to_py(py, i)?, *s))?;
        }
        Ok(out.unbind())
    }

    fn erase_user(&self, py: Python<'_>, user: &Bound<'_, PyAny>) -> PyResult<bool> {
        let user = ext_from_py(user)?;
        Ok(py.detach(|| self.inner.erase_user(&user)))
    }

    #[pyo3(signature = (item, tags=None, category=None, available=None))]
    fn upsert_item(
        &self,
        py: Python<'_>,
        item: &Bound<'_, PyAny>,
        tags: Option<Vec<String>>,
        category: Option<String>,
        available: Option<bool>,
    ) -> PyResult<()> {
        let item = ext_from_py(item)?;
        let tags = tags.unwrap_or_default();
        py.detach(|| self.inner.upsert_item(&item, &tags, category.as_deref(), available));
        Ok(())
    }

    fn fit(&self, py: Python<'_>, iterations: usize) {
        py.detach(|| self.inner.fit(iterations));
    }

    /// Re-links up to `budget` moved items in the index (all when None); returns how many wait.
    #[pyo3(signature = (budget=None))]
    fn reindex(&self, py: Python<'_>, budget: Option<usize>) -> usize {
        py.detach(|| self.inner.reindex(budget.unwrap_or(usize::MAX)))
    }

    fn user_vector<'py>(
        &self,
        py: Python<'py>,
        user: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
        let user = ext_from_py(user)?;
        Ok(py.detach(|| self.inner.user_vector(&user)).map(|v| PyArray1::from_vec(py, v)))
    }

    fn item_vector<'py>(
        &self,
        py: Python<'py>,
        item: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyArray1<f32>>>> {
        let item = ext_from_py(item)?;
        Ok(py.detach(|| self.inner.item_vector(&item)).map(|v| PyArray1::from_vec(py, v)))
    }

    fn seen(&self, py: Python<'_>, user: &Bound<'_, PyAny>) -> PyResult<Py<PyList>> {
        let user = ext_from_py(user)?;
        let out = PyList::empty(py);
        for i in py.detach(|| self.inner.seen(&user)) {
            out.append(ext_to_py(py, &i)?)?;
        }
        Ok(out.unbind())
    }

    /// Counters as last published by the writers: takes no lock (safe on an event loop).
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = self.inner.stats();
        let d = PyDict::new(py);
        d.set_item("events_applied", s.events_applied)?;
        d.set_item("duplicates", s.duplicates)?;
        d.set_item("rejected", s.rejected)?;
        d.set_item("users", s.users)?;
        d.set_item("items", s.items)?;
        d.set_item("index_size", s.index_size)?;
        d.set_item("index_stale", s.index_stale)?;
        d.set_item("newest_ts", s.newest_ts)?;
        Ok(d)
    }

    /// The shared log's position the model was loaded at, as bytes.
    #[getter]
    fn loaded_log_position<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.loaded_log_position)
    }

    /// Writes a snapshot atomically; `wal_seq` is the last journal record it reflects and
    /// `log_position` the shared log's position of it (opaque bytes, kept as given).
    #[pyo3(signature = (path, wal_seq=0, log_position=Vec::new()))]
    fn save(&self, py: Python<'_>, path: PathBuf, wal_seq: u64, log_position: Vec<u8>) -> PyResult<()> {
        py.detach(|| self.inner.save(&path, wal_seq, &log_position)).map_err(snapshot_err)
    }

    /// Loads a snapshot. With `config`, the settings a restart may change are taken from it
    /// (event types and weights, limits, decay, re-ranking, ...); one that cannot change
    /// (`dim`, `hnsw_m`, ...) raises ValueError naming it.
    #[staticmethod]
    #[pyo3(signature = (path, config=None))]
    fn load(py: Python<'_>, path: PathBuf, config: Option<&Bound<'_, PyAny>>) -> PyResult<PyModel> {
        let wanted = match config.filter(|c| !c.is_none()) {
            Some(c) => Some(config_from_dict(&config_dict(py, Some(c))?)?),
            None => None,
        };
        let (inner, at) = py.detach(|| model::Model::load(&path, wanted.as_ref())).map_err(snapshot_err)?;
        Ok(PyModel { inner, loaded_wal_seq: at.wal_seq, loaded_log_position: at.log_position })
    }
}

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("BUILD_PROFILE", if cfg!(debug_assertions) { "debug" } else { "release" })?;
    m.add_class::<PyModel>()?;
    m.add("InvalidEvent", py.get_type::<InvalidEvent>())?;
    m.add("InvalidFrame", py.get_type::<InvalidFrame>())?;
    m.add("IncompleteFrame", py.get_type::<IncompleteFrame>())?;
    m.add("UnknownItem", py.get_type::<UnknownItem>())?;
    m.add("CorruptSnapshot", py.get_type::<CorruptSnapshot>())?;
    m.add_function(wrap_pyfunction!(default_config, m)?)?;
    m.add_function(wrap_pyfunction!(write_text_frame, m)?)?;
    m.add_class::<crate::py_index::Index>()?;
    m.add_function(wrap_pyfunction!(crate::py_index::exact_search_batch, m)?)?;
    Ok(())
}
