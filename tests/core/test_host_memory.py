"""retain_host_memory: freed XLA:CPU temporaries are reused, not faulted in again each call."""

import json
import os
import platform
import subprocess
import sys
import textwrap
import types

import pytest

from jpeft.core import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# A program whose temporaries are large (a [8192, 2048] float32 array, 64 MiB: a product that
# cannot fuse with the product that consumes it), called 30 times: the minor page faults of each
# call, against the pages of its temporaries.
PROGRAM = textwrap.dedent("""
    import json, resource, sys
    import jpeft
    applied = jpeft.retain_host_memory() if sys.argv[1] == "retain" else None
    import jax, jax.numpy as jnp
    u = jnp.ones((8192, 8)); v = jnp.ones((8, 2048)) / 8
    f = jax.jit(lambda u, v: jnp.tanh(u @ v) @ v.T)
    temp = f.lower(u, v).compile().memory_analysis().temp_size_in_bytes
    faults = []
    for _ in range(30):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(u, v).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "temp_pages": temp / 4096, "faults": faults}))
""")


def _run(mode: str) -> dict:
    # glibc's and XLA's defaults, not the suite's flags (8 host devices: more small buffers
    # between the large ones, so the heap takes longer to settle).
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                         check=True, env=dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_retained_memory_is_not_faulted_in_again_each_call():
    default, retained = _run("default"), _run("retain")
    pages = default["temp_pages"]
    assert pages > 10_000
    faulting = lambda run: sum(f > 0.5 * pages for f in run["faults"])
    # glibc's default: every call maps its temporaries afresh (one fault per page).
    assert faulting(default) >= 28, default
    # Retained: only the calls that grow the heap fault (it settles at a few times the
    # temporaries, where a call's buffers are freed after the next call's are allocated).
    assert retained["applied"] is True
    assert faulting(retained) <= 12, retained


def test_refuses_once_a_backend_has_started():
    import jax.numpy as jnp
    jnp.ones(()).block_until_ready()                      # the backend (and its threads) start
    assert host_memory.backend_started()
    with pytest.raises(RuntimeError, match="before the first JAX computation"):
        host_memory.retain_host_memory()


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "backend_started", lambda: False)
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert host_memory.retain_host_memory() is False


def test_a_refused_setting_is_an_error(monkeypatch):
    def mallopt(param, value):
        return 0 if param == host_memory.M_MMAP_MAX else 1
    monkeypatch.setattr(host_memory, "backend_started", lambda: False)
    monkeypatch.setattr(host_memory, "_glibc", lambda: types.SimpleNamespace(mallopt=mallopt))
    with pytest.raises(RuntimeError, match=r"mallopt\(-4, 0\) failed"):
        host_memory.retain_host_memory()
