"""The train step's default XLA compile options: what they are, when they stand aside."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jpeft
from jpeft.core import xla_options


def _step_and_args(compiler_options):
    loss = lambda p, d, b, k: jnp.mean(jnp.tanh(b @ (p["w"] + d["w"])) ** 2)
    params, delta = {"w": jnp.full((32, 48), 0.1)}, {"w": jnp.zeros((32, 48))}
    opt = optax.adam(1e-2)
    step = jpeft.make_train_step(loss, opt, donate=False, compiler_options=compiler_options)
    batch = jnp.asarray(np.random.default_rng(0).standard_normal((64, 32)), jnp.float32)
    return step, (params, delta, opt.init(delta), batch, jax.random.key(0))


def test_cpu_default_turns_ynnpack_fusions_off_and_computes_the_same():
    assert xla_options.train_step_options("cpu") == {xla_options.YNN_FUSION_TYPE: ""}
    ours, args = _step_and_args(None)
    xla, _ = _step_and_args({})
    ours_hlo = ours.lower(*args).compile().as_text()
    xla_hlo = xla.lower(*args).compile().as_text()
    assert "__ynn_fusion" not in ours_hlo
    if "__ynn_fusion" in xla_hlo:        # this jaxlib's default puts the products in YNNPACK
        assert ours_hlo != xla_hlo
    for a, b in zip(jax.tree.leaves(ours(*args)[:2]), jax.tree.leaves(xla(*args)[:2])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_retained_host_memory_gets_xlas_defaults(monkeypatch):
    """With freed memory kept for reuse YNNPACK's larger temporaries cost no page faults, and its
    fusions are the faster kernels (jpeft/core/xla_options.py): the step takes XLA's defaults."""
    monkeypatch.setattr(xla_options.host_memory, "retained", lambda: True)
    assert xla_options.train_step_options("cpu") == {}
    ours, args = _step_and_args(None)
    xla, _ = _step_and_args({})
    ynn_off, _ = _step_and_args({xla_options.YNN_FUSION_TYPE: ""})
    code = lambda step: re.sub(r", metadata=\{[^}]*\}", "", step.lower(*args).compile().as_text(
        ).split("FileNames")[0])
    assert code(ours) == code(xla)
    if "__ynn_fusion" in code(xla):       # this jaxlib's default puts the products in YNNPACK
        assert "__ynn_fusion" not in code(ynn_off)


def test_other_backends_get_no_options():
    assert xla_options.train_step_options("gpu") == {}
    assert xla_options.train_step_options("tpu") == {}


def test_the_users_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=+eltwise "
                                    "--xla_force_host_platform_device_count=1")
    assert xla_options.train_step_options("cpu") == {}
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    assert xla_options.train_step_options("cpu") == {xla_options.YNN_FUSION_TYPE: ""}


def test_an_option_this_jaxlib_does_not_know_is_left_out(monkeypatch):
    assert not xla_options.accepted("xla_cpu_no_such_option_in_any_jaxlib", True)
    monkeypatch.setitem(xla_options.TRAIN_STEP_OPTIONS, "cpu",
                        {"xla_cpu_no_such_option_in_any_jaxlib": True,
                         xla_options.YNN_FUSION_TYPE: ""})
    assert xla_options.train_step_options("cpu") == {xla_options.YNN_FUSION_TYPE: ""}
    step, args = _step_and_args(None)
    assert np.isfinite(float(step(*args)[2]["loss"]))


def test_a_step_called_inside_jit_runs_without_its_options():
    """Only a top-level jit takes compile options: traced, the step runs its ``nested`` form."""
    step, args = _step_and_args(None)
    inside = jax.jit(lambda *a: step(*a))(*args)
    outside = step(*args)
    for a, b in zip(jax.tree.leaves(inside[:2]), jax.tree.leaves(outside[:2])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert not bool(inside[2]["skipped"])
