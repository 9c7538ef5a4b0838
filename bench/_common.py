"""What every benchmark shares: the release-build guard, the machine description, results."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def require_release() -> None:
    """Exits unless ``engine._core`` is a release build: debug figures are meaningless."""
    from engine import _core

    if getattr(_core, "BUILD_PROFILE", None) != "release":
        sys.exit(
            "refusing to benchmark a debug build of engine._core; "
            "rebuild with `maturin develop --release` (or `make dev`)"
        )


def machine() -> dict[str, Any]:
    """CPU model, core count and flags that matter for the kernels, from /proc/cpuinfo."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "logical_cpus": os.cpu_count(),
    }
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        info["cpu"] = platform.processor() or "unknown"
        return info
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in fields:
            fields[key.strip()] = value.strip()
    info["cpu"] = fields.get("model name", "unknown")
    flags = set(fields.get("flags", "").split())
    info["simd"] = sorted(flags & {"sse4_2", "avx", "avx2", "fma", "avx512f"})
    return info


def row(
    name: str,
    ours: float | None,
    peer: float | None,
    unit: str,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One result row; ``ratio`` is ours / peer when both are known."""
    ratio = ours / peer if ours is not None and peer not in (None, 0) else None
    return {
        "name": name,
        "ours": ours,
        "peer": peer,
        "ratio": ratio,
        "unit": unit,
        "params": params or {},
    }


def write_results(
    name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None
) -> Path:
    """Writes ``bench/results/NAME.json`` atomically (temporary file, then rename)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    doc: dict[str, Any] = {"name": name, "machine": machine(), "rows": rows}
    if extra:
        doc.update(extra)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
