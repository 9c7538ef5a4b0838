"""recstream: a real-time recommendation engine.

Layout: the public names are re-exported here; implementations live in ``_``-prefixed modules.
``engine._core`` is the Rust extension (online eALS, HNSW, Forward decoding, snapshots).
"""
