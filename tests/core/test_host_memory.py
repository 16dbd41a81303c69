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
    from jpeft.core import host_memory
    if sys.argv[1] == "retain":
        jpeft.retain_host_memory()
    import jax, jax.numpy as jnp
    u = jnp.ones((8192, 8)); v = jnp.ones((8, 2048)) / 8
    f = jax.jit(lambda u, v: jnp.tanh(u @ v) @ v.T)
    temp = f.lower(u, v).compile().memory_analysis().temp_size_in_bytes
    faults = []
    for _ in range(30):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        f(u, v).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"retained": host_memory.retained(), "temp_pages": temp / 4096,
                      "faults": faults}))
""")


def _run(mode: str, **env) -> dict:
    # glibc's and XLA's defaults, not the suite's flags (8 host devices: more small buffers
    # between the large ones, so the heap takes longer to settle).
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV} | env
    out = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True,
                         check=True, env=dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS=""))
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_retained_memory_is_not_faulted_in_again_each_call():
    """By default (a user's own loop: ``import jpeft``, nothing else) freed temporaries are kept
    for reuse; ``JPEFT_HOST_MEMORY=release`` keeps glibc's default, every call faulting its
    temporaries in again."""
    released = _run("default", JPEFT_HOST_MEMORY="release")
    default, explicit = _run("default"), _run("retain")
    pages = released["temp_pages"]
    assert pages > 10_000
    faulting = lambda run: sum(f > 0.5 * pages for f in run["faults"])
    # glibc's default: every call maps its temporaries afresh (one fault per page).
    assert not released["retained"] and faulting(released) >= 28, released
    # Retained: only the calls that grow the heap fault (it settles at a few times the
    # temporaries, where a call's buffers are freed after the next call's are allocated).
    for run in (default, explicit):
        assert run["retained"] and faulting(run) <= 12, run


CHILD = textwrap.dedent("""
    import json, sys
    if sys.argv[1] == "jax-first":
        import jax.numpy as jnp
        jnp.ones(()).block_until_ready()            # a backend (and its threads) start first
    import jpeft
    from jpeft.core import host_memory
    out = {"retained": host_memory.retained(), "status": host_memory.status()}
    if sys.argv[1] == "jax-first":
        try:
            host_memory.retain_host_memory()
        except RuntimeError as e:
            out["error"] = str(e)
    print(json.dumps(out))
""")


def _child(mode: str, **env) -> dict:
    env = {k: v for k, v in os.environ.items() if k != host_memory.ENV} | env
    out = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True,
                         env=dict(env, XLA_FLAGS=""))
    if out.returncode:
        return {"stderr": out.stderr}
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting is glibc's")
def test_the_default_and_why_it_did_not_apply():
    """Applied at import on CPU; not when JAX computed first (then retain_host_memory refuses,
    saying so), not when an accelerator is configured unless asked; a wrong setting is an
    error naming the variable."""
    assert _child("plain", JAX_PLATFORMS="cpu")["retained"] is True
    late = _child("jax-first", JAX_PLATFORMS="cpu")
    assert late["retained"] is False and "JAX computed before jpeft" in late["status"]
    assert "before the first JAX computation" in late["error"]
    gpu = _child("plain", JAX_PLATFORMS="cuda,cpu")
    assert gpu["retained"] is False and "accelerator is configured" in gpu["status"]
    assert _child("plain", JAX_PLATFORMS="cuda,cpu", JPEFT_HOST_MEMORY="retain")["retained"]
    assert "JPEFT_HOST_MEMORY='keep'" in _child("plain", JPEFT_HOST_MEMORY="keep")["stderr"]


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory, "_RETAINED", [False])
    monkeypatch.setattr(host_memory, "_glibc", lambda: None)
    assert host_memory.retain_host_memory() is False
    assert host_memory.threads_hold_arenas() is False


def test_a_refused_setting_is_an_error(monkeypatch):
    def mallopt(param, value):
        return 0 if param == host_memory.M_MMAP_MAX else 1
    monkeypatch.setattr(host_memory, "_RETAINED", [False])
    monkeypatch.setattr(host_memory, "_arenas", lambda libc: 1)
    monkeypatch.setattr(host_memory, "_glibc", lambda: types.SimpleNamespace(mallopt=mallopt))
    with pytest.raises(RuntimeError, match=r"mallopt\(-4, 0\) failed"):
        host_memory.retain_host_memory()
