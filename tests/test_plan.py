"""The planner (jpeft/plan.py, `jpeft plan`): counts and per-device bytes equal their closed forms
on the tiny LLaMA over 8 forced host devices (tests/conftest.py); flags are checked before
anything compiles."""

import json
import os
import subprocess
import sys

import jax
import pytest

from jpeft import cli
from jpeft import plan as pl

TINY = pl.model_config("tiny")
L, R = TINY.num_hidden_layers, 2
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def _needs_8():
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="module")
def lora_plan():
    _needs_8()
    return pl.plan("tiny", "lora", mesh="fsdp=4,tp=2", batch=8, seq=16, rank=R,
                   device_memory="16GB")


@pytest.fixture(scope="module")
def full_plan():
    _needs_8()
    return pl.plan("tiny", "full", mesh="fsdp=4,tp=2", batch=8, seq=16)


# --------------------------------------------------------------------------- parsing, no compile


def test_parse_mesh():
    assert pl.parse_mesh("fsdp=16,tp=4") == {"dp": 1, "fsdp": 16, "tp": 4}
    assert pl.parse_mesh("dp=8") == {"dp": 8, "fsdp": 1, "tp": 1}
    assert pl.mesh_size(pl.parse_mesh("dp=2, fsdp=2,tp=2")) == 8
    for bad in ("fsdp", "pp=2", "fsdp=0", "fsdp=x", "tp=2,tp=2", ""):
        with pytest.raises(pl.PlanError, match="^--mesh: "):
            pl.parse_mesh(bad)


def test_parse_bytes():
    assert pl.parse_bytes("80GB") == 80 * 10 ** 9
    assert pl.parse_bytes("141GB") == 141 * 10 ** 9
    assert pl.parse_bytes("24GiB") == 24 * 2 ** 30
    assert pl.parse_bytes("512") == 512 and pl.parse_bytes(None) is None
    with pytest.raises(pl.PlanError, match="^--device-memory: "):
        pl.parse_bytes("lots")


def test_named_and_file_configs(tmp_path):
    c8 = pl.model_config("llama-3-8b")
    assert (c8.hidden_size, c8.intermediate_size, c8.num_hidden_layers, c8.num_attention_heads,
            c8.num_key_value_heads, c8.vocab_size, c8.rope_theta) == (
        4096, 14336, 32, 32, 8, 128256, 500000.0)
    c70 = pl.model_config("llama-3-70b")
    assert (c70.hidden_size, c70.intermediate_size, c70.num_hidden_layers,
            c70.num_attention_heads) == (8192, 28672, 80, 64)
    assert pl.llama_param_count(c8) == 8_030_261_248           # Meta-Llama-3-8B's count
    assert pl.llama_param_count(c70) == 70_553_706_496         # Meta-Llama-3-70B's count
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llama", **pl.MODELS["tiny"]}))
    assert pl.model_config(str(path)) == TINY and pl.model_config(str(tmp_path)) == TINY
    assert TINY.scan_layers
    with pytest.raises(pl.PlanError, match="^--model: unknown model 'llama-9'"):
        pl.model_config("llama-9")


@pytest.mark.parametrize("kw, flag", [
    (dict(model="nope"), "--model"), (dict(method="dora"), "--method"),
    (dict(mesh="fsdp=3x"), "--mesh"), (dict(batch=6), "--batch"), (dict(seq=10 ** 6), "--seq"),
    (dict(remat="some"), "--remat"), (dict(device_memory="big"), "--device-memory"),
    (dict(dtype="int8"), "--dtype"), (dict(rank=0), "--rank")])
def test_check_names_the_flag(kw, flag):
    args = dict(model="tiny", method="lora", mesh="fsdp=4,tp=2", batch=8, seq=16, remat="none")
    args.update(kw)
    with pytest.raises(pl.PlanError, match=f"^{flag}: "):
        pl.check(**args)


def test_fits_is_peak_against_memory():
    assert pl.fits(100, 100) and not pl.fits(101, 100) and pl.fits(1, None) is None


# --------------------------------------------------------------------------- compiled plans


def _linear_entries(per):
    """``sum over the 7 maps of per(name, in, out)`` times ``L``."""
    return L * sum(per(n, i, o) for n, (i, o) in pl.linear_shapes(TINY).items())


def test_trainable_counts_are_the_closed_forms(lora_plan, full_plan):
    assert lora_plan.trainable == _linear_entries(lambda n, i, o: R * (i + o))
    assert lora_plan.trainable == pl.lora_param_count(TINY, R)
    assert full_plan.trainable == full_plan.base_params == pl.llama_param_count(TINY)
    assert lora_plan.base_params == pl.llama_param_count(TINY)


def test_bytes_per_device_are_the_closed_forms(lora_plan, full_plan):
    fsdp, tp = 4, 2
    # LoRA factors follow their weight's axes: A [L, in, r] the input axis, B [L, r, out] the
    # output axis; column-wise maps have in over fsdp, out over tp; row-wise the reverse.
    lora = _linear_entries(lambda n, i, o: R * (i / fsdp + o / tp) if n in COLUMN
                           else R * (i / tp + o / fsdp))
    assert lora_plan.delta_bytes == 4 * lora                      # float32 factors
    assert lora_plan.opt_bytes == 2 * lora_plan.delta_bytes + 4   # Adam mu, nu + int32 count
    h, v = TINY.hidden_size, TINY.vocab_size
    # bf16; the embedding [V, H] and the head [H, V] split over fsdp only (along H)
    base = 2 * (_linear_entries(lambda n, i, o: i * o) // (fsdp * tp) + 2 * v * h // fsdp)
    base += 2 * (2 * L + 1) * h                                   # the norms, replicated
    assert lora_plan.base_bytes == full_plan.base_bytes == base
    assert full_plan.delta_bytes == base and full_plan.opt_bytes == 2 * base + 4
    assert lora_plan.batch_bytes == 4 * 8 * 16 // fsdp           # ids over dp x fsdp
    for p in (lora_plan, full_plan):
        assert p.args_match and p.devices == 8 and p.temp_bytes > 0
        assert p.peak_bytes == (max(p.argument_bytes, p.base_bytes + p.delta_bytes + p.opt_bytes
                                    + p.batch_bytes) + p.output_bytes - p.alias_bytes
                                + p.temp_bytes)


def test_flops(lora_plan, full_plan):
    assert 0 < lora_plan.flops_per_device < full_plan.flops_per_device
    assert lora_plan.flops_total == 8 * lora_plan.flops_per_device
    assert 0 < lora_plan.matmul_flops_total < full_plan.matmul_flops_total
    # full fine-tuning: forward 2 N + backward 4 N per token for the N entries of the linear maps
    # and the head, plus attention (q k^T and P v: 4 T H per token and layer forward, 3x in all)
    tokens, t, h = 8 * 16, 16, TINY.hidden_size
    n = _linear_entries(lambda n, i, o: i * o) + TINY.vocab_size * h
    assert full_plan.matmul_flops_total == 6 * n * tokens + 3 * 4 * t * h * L * tokens


def test_fits_and_table(lora_plan, full_plan):
    assert lora_plan.fits is True and lora_plan.device_memory == 16 * 10 ** 9
    assert full_plan.fits is None
    small = pl.with_memory(lora_plan, lora_plan.peak_bytes - 1)
    assert small.fits is False and pl.with_memory(lora_plan, lora_plan.peak_bytes).fits
    table = pl.format_plan(small)
    assert "does NOT fit" in table and "optimizer state" in table and "FLOPs" in table


def test_remat_and_qlora_shrink_memory(lora_plan):
    full_remat = pl.plan("tiny", "lora", mesh="fsdp=4,tp=2", batch=8, seq=16, rank=R,
                         remat="full")
    assert full_remat.temp_bytes < lora_plan.temp_bytes
    assert full_remat.trainable == lora_plan.trainable
    q = pl.plan("tiny", "qlora", mesh="fsdp=8", batch=8, seq=16, rank=R)
    assert q.trainable == lora_plan.trainable and q.args_match
    assert q.base_bytes < lora_plan.base_bytes * 2              # NF4 linear maps
    assert q.flops_per_device > 0
    # the dequantized base adds at most its own bf16 copy to the temporaries (dequantizing's
    # outer "dots" remat around the model's own remat kept every product: 1.75x here, 8x at 8B)
    lo, ql = (pl.plan("tiny", m, mesh="fsdp=8", batch=8, seq=64, rank=R, remat="full")
              for m in ("lora", "qlora"))
    assert ql.temp_bytes <= lo.temp_bytes + lo.base_bytes
    assert ql.peak_bytes < lo.peak_bytes


#: Run in a process of its own (XLA logs the partitioner's warnings to that process's stderr):
#: LoRA and QLoRA plans on a 4x2 fsdp x tp mesh for each model named in argv, then a positive
#: control, a flat array chunked over the devices reshaped to a 2-D layout (what XLA cannot
#: reshard: it logs "Involuntary full rematerialization"), so the test knows the log reaches it.
_REMAT_CHILD = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jpeft import plan as pl
out = {}
for model in sys.argv[1:]:
    for method in ("lora", "qlora"):
        p = pl.plan(model, method, mesh="fsdp=4,tp=2", batch=8, seq=64, rank=2, remat="full")
        out[f"{model} {method}"] = [p.temp_bytes, p.base_bytes]
print("=== control", file=sys.stderr, flush=True)
mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("fsdp", "tp"))
x = jax.ShapeDtypeStruct((48,), jnp.float32, sharding=NamedSharding(mesh, P(("fsdp", "tp"))))
jax.jit(lambda x: jnp.sin(x).reshape(6, 8),
        out_shardings=NamedSharding(mesh, P(None, "fsdp"))).lower(x).compile()
print(json.dumps(out))
"""

#: A LLaMA whose every linear weight splits into whole NF4 blocks on the 4x2 mesh (hidden 512:
#: 8 blocks of 64 per row; the tiny one's 64-wide rows are one block: stored whole on the tp or
#: fsdp axis of their last dimension).
WIDE = dict(vocab_size=256, hidden_size=512, intermediate_size=1024, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            rms_norm_eps=1e-5, rope_theta=10000.0)


def test_qlora_compiles_with_no_involuntary_full_rematerialization(tmp_path):
    """The NF4 base stored in the weights' own layout (jpeft.ops.quantize) and sharded with each
    weight's spec: compiling the QLoRA step on fsdp=4,tp=2 logs no "[SPMD] Involuntary full
    rematerialization" (the flat layout did: each dequantized weight replicated on every device,
    289 GiB of temporaries against 65 GiB for LoRA on LLaMA-3-70B over 256 devices), and its
    temporaries exceed LoRA's by at most the bf16 base per device (the dequantized copy of the
    stacked weights, alive while the layers' scan runs)."""
    _needs_8()
    (tmp_path / "config.json").write_text(json.dumps(WIDE))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "0"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)      # compiled here: a loaded program logs nothing
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", _REMAT_CHILD, "tiny", str(tmp_path)], env=env,
                       cwd=root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    plans, control = r.stderr.split("=== control")
    assert "Involuntary full rematerialization" in control        # the log does reach us
    assert "Involuntary full rematerialization" not in plans, plans[-4000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for model in ("tiny", str(tmp_path)):
        (lora_temp, lora_base), (q_temp, q_base) = out[f"{model} lora"], out[f"{model} qlora"]
        assert q_base < lora_base
        assert q_temp <= lora_temp + lora_base, (model, out)


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv, flag", [
    (["--model", "llama-9"], "--model"), (["--mesh", "fsdp=two"], "--mesh"),
    (["--mesh", "dp=4", "--batch", "4", "--no-reexec"], "--mesh"),
    (["--method", "dora"], "--method"), (["--batch", "3"], "--batch"),
    (["--device-memory", "huge"], "--device-memory")])
def test_cli_errors_before_compiling(argv, flag, capsys, monkeypatch):
    _needs_8()
    monkeypatch.setattr(pl, "plan", lambda *a, **k: pytest.fail("compiled"))
    assert cli.main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"jpeft plan: error: {flag}: ")


def test_cli_prints_the_table(lora_plan, capsys, monkeypatch):
    monkeypatch.setattr(pl, "plan", lambda *a, **k: lora_plan)
    assert cli.main(["plan", "--model", "tiny", "--mesh", "fsdp=4,tp=2"]) == 0
    out = capsys.readouterr().out
    for row in ("base (frozen weights)", "delta (trainable)", "optimizer state", "temporaries",
                "peak", "FLOPs per step", "fits"):
        assert row in out


def test_cli_reruns_with_the_mesh_size_of_host_devices():
    """A mesh of 2 in a process of 8 (or any other count) devices: the command re-runs itself."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env.pop("JPEFT_PLAN_CHILD", None)
    out = subprocess.run([sys.executable, "-m", "jpeft.cli", "plan", "--model", "tiny",
                          "--mesh", "dp=2", "--batch", "2", "--seq", "8", "--rank", "1",
                          "--device-memory", "16GB"], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr
    assert "mesh dp=2 (2 devices)" in out.stdout and ": fits" in out.stdout
