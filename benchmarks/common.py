"""Helpers shared by the benchmark scripts (run as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import datetime
import json
import os
import sys
import pathlib
import platform
import tempfile
from typing import Any


def write_jsonl(path: pathlib.Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON lines to ``path`` atomically (temporary file, then ``os.replace``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, default=str) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def append_jsonl(path: pathlib.Path, row: dict[str, Any]) -> None:
    """Append ``row`` as one JSON line to ``path`` (made with its folder if missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def cost(compiled) -> dict[str, float | None]:
    """flops / transcendentals / bytes accessed of a compiled executable (dict or list of dicts)."""
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else {}
    ca = ca or {}
    get = lambda k: (float(ca[k]) if k in ca and ca[k] is not None else None)
    return {"flops": get("flops"), "transcendentals": get("transcendentals"),
            "bytes_accessed": get("bytes accessed")}


def memory(compiled) -> dict[str, int | None]:
    """The byte counts of ``compiled.memory_analysis()`` (``None`` where the backend has none)."""
    try:
        ma = compiled.memory_analysis()
    except Exception:   # noqa: BLE001 - not every backend implements it
        ma = None
    fields = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
              "alias_size_in_bytes", "peak_memory_in_bytes")
    out = {}
    for f in fields:
        v = getattr(ma, f, None) if ma is not None else None
        out[f.replace("_size_in_bytes", "_bytes").replace("_in_bytes", "_bytes")] = (
            int(v) if v is not None else None)
    return out


def add_host_memory_flag(parser) -> None:
    """``--release-host-memory``: keep glibc's default (return freed memory to the OS)."""
    parser.add_argument(
        "--release-host-memory", action="store_true",
        help="keep glibc's default of returning freed memory to the OS (by default importing "
             "jpeft keeps it for reuse on CPU; the same as JPEFT_HOST_MEMORY=release)")


def host_memory(args) -> str:
    """The process's host-memory mode for the results, ``"retained"`` (``import jpeft``'s default
    on CPU) or ``"released"``; ``--release-host-memory`` starts the benchmark again with
    ``JPEFT_HOST_MEMORY=release`` when the import kept freed memory."""
    from jpeft.core import host_memory as host
    if args.release_host_memory and host.retained():
        host.rerun_released(sys.argv)
    return "retained" if host.retained() else "released"


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


#: SIMD extensions worth recording: the kernels XLA:CPU, oneDNN and MKL pick depend on them.
SIMD_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
              "amx_tile", "amx_bf16")


def cpu_info() -> dict[str, Any]:
    """The CPU's model name, vendor and SIMD flags (:data:`SIMD_FLAGS` present), from
    ``/proc/cpuinfo`` (empty where there is none): cross-framework CPU timings depend on them
    (MKL, which torch's CPU wheel uses, takes slower paths on non-Intel CPUs)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name"), "cpu_vendor": fields.get("vendor_id"),
            "cpu_simd": [f for f in SIMD_FLAGS if f in flags]}


def machine(**extra: Any) -> dict[str, Any]:
    """Versions, devices, CPUs (:func:`cpu_info`) and the load average now (plus ``extra``
    fields)."""
    import jax
    import optax

    import jpeft
    dev = jax.devices()[0]
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "jaxlib_version": getattr(__import__("jaxlib"), "__version__", None),
        "flax_version": __import__("flax").__version__,
        "optax_version": optax.__version__,
        "jpeft_version": jpeft.__version__,
        **extra,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        **cpu_info(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_start": loadavg(),
    }
