//! recstream's core, built by maturin into the Python module `engine._core`.
//!
//! # Layout
//! - [`ids`]: external ids (str or int) to dense `u32` ids and back.
//! - [`mf`]: online eALS matrix factorization.
//! - [`trending`]: decayed popularity, the cold-start fallback.
//! - [`coldstart`]: attribute vectors that give new items a vector before any feedback.
//! - [`neighbours`]: item-to-item co-occurrence counts, the neighbourhood scoring term.
//! - [`rerank`]: cold-start blend, MMR diversity and the exploration sample over candidates.
//! - [`hnsw`]: the HNSW index for maximum inner product; [`scan`]: the exact scan.
//! - [`decode`]: Fluent Forward Protocol v1 frames into records.
//! - [`model`]: the composition the engine serves (locks, filters, explanations);
//!   [`snapshot`]: its checksummed, atomically written file; [`codec`]: binary helpers.
//! - [`dedup`]: the redelivery window of applied event ids.
//! - [`rng`]: the seeded generator everything random draws from.
//! - [`wsframe`]: pushed messages written straight to a subscriber's socket.
//! - [`py`], [`py_index`]: the Python bindings.
//!
//! Only `py*` touches pyo3; every other module is plain Rust with its own tests.

pub mod codec;
pub mod coldstart;
pub mod decode;
pub mod dedup;
pub mod hnsw;
pub mod ids;
pub mod mf;
pub mod model;
pub mod neighbours;
pub mod py;
pub mod py_index;
pub mod rerank;
pub mod rng;
pub mod scan;
pub mod snapshot;
pub mod trending;
pub mod wsframe;
