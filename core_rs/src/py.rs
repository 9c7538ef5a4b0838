//! The Python bindings: argument extraction, GIL release, error mapping. No algorithms here.

use pyo3::prelude::*;

#[pymodule]
fn _core(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("BUILD_PROFILE", if cfg!(debug_assertions) { "debug" } else { "release" })?;
    m.add_class::<crate::py_index::Index>()?;
    Ok(())
}
