"""The recipes' ``--quantize`` option (QLoRA): the demo recipe end to end on a quantized tiny BERT
through the CLI (its reload and merge checks held on the quantized base), the checkpoint recording
the quantization and a mismatch refused, presets that change the weights refused up front."""

import types

import jax
import numpy as np
import pytest

from conftest import tiny_classifier_env

import jpeft
from jpeft import checkpoint, cli, presets
from jpeft.recipes import finetune, movies
from jpeft.recipes import quantization as quant


@pytest.fixture(scope="module")
def env(tiny_config):
    return tiny_classifier_env(tiny_config)


def test_demo_on_an_nf4_base_through_the_cli(env, monkeypatch, tmp_path, capsys):
    """``jpeft demo --quantize nf4`` (the MiniLM replaced by the tiny env): the recipe quantizes the
    base after loading, trains LoRA on it, prints the stored bytes, reloads the base quantized the
    same way with identical predictions, merges into the dequantized base, and records the
    quantization in the checkpoint."""
    task = types.SimpleNamespace(model_dir="tiny", train=env.train, dev=env.dev)
    monkeypatch.setattr(movies, "load_task", lambda **kw: task)
    monkeypatch.setattr(movies, "env", lambda t, **kw: env._replace(log=print))
    assert cli.main(["demo", "--quantize", "nf4", "--steps", "2", "--rank", "2",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "base stored nf4: its 6 linear weights take" in out
    assert ("reloaded base + delta from disk (base quantized nf4 again, as the checkpoint "
            "records; the delta loaded onto the quantized base): predictions identical to the "
            "trained model: True") in out
    assert "merged model (merged into jpeft.dequantize_params(params)" in out
    assert "100.00% of dev predictions equal" in out
    meta = checkpoint.metadata(tmp_path / "delta")["metadata"]["user"]
    assert meta["base"] == {"quantize": "nf4", "targets": "all-linear", "block_size": 64,
                            "double_quant": True} == quant.config("nf4")

    # The delta saved on the nf4 base is refused on a base stored otherwise (its factors would act
    # on other weights), and accepted on the nf4 base rebuilt from the full-precision weights.
    trained = presets.load(tmp_path / "delta")
    for other in (env, env.quantized("int8")):
        with pytest.raises(ValueError, match=r"trained on a base quantized as \{'quantize': "
                                             r"'nf4'.*--quantize nf4"):
            finetune.check_reload(other, trained.method, None, trained.delta,
                                  tmp_path / "delta", print)
    nf4 = env.quantized("nf4")
    logits, _ = nf4.evaluate(trained.method, nf4.params, trained.delta)
    checks = finetune.check_reload(nf4, trained.method, logits, trained.delta,
                                   tmp_path / "delta", lambda _: None)
    assert all(checks.values()), checks


def test_quantized_env_and_bytes(env):
    nf4 = env.quantized("nf4")
    assert nf4.quantize == "nf4" and env.quantized("none") is env
    assert len(quant.quantized_paths(nf4.params)) == 6       # q, k, v, o and the FFN's two
    assert not quant.quantized_paths(env.params)
    b = quant.num_bytes(nf4.params)
    assert b.full == jpeft.num_bytes(env.params) and b.stored == jpeft.num_bytes(nf4.params)
    # 32-wide rows: the per-row second-level constants (one float32 a row) cost a bit an entry
    assert 6.2 < b.weights_full / b.weights_stored < 6.3
    # The reload reads the weights again and quantizes them the same way, bit for bit.
    again = nf4.base_params()
    jax.tree.map(np.testing.assert_array_equal, again, nf4.params)
    with pytest.raises(ValueError, match="already stored nf4"):
        nf4.quantized("int8")
    with pytest.raises(ValueError, match="already holds 6 quantized weights"):
        quant.prepare(nf4.apply_fn, nf4.params, nf4.sites, (), "nf4")
    with pytest.raises(ValueError, match="scheme must be one of none, nf4, int8; got 'nf5'"):
        env.quantized("nf5")
    same = quant.prepare(env.apply_fn, env.params, env.sites, (), "none")
    assert same.apply is env.apply_fn and same.params is env.params and same.wrap(len) is len


def test_presets_that_change_the_weights_are_refused_on_a_quantized_base(capsys):
    refused = [n for n in presets.names() if not presets.get(n).quantized_base]
    assert refused == ["far", "diff-pruning", "fishmask", "said", "did", "full"]
    with pytest.raises(SystemExit) as e:
        cli.main(["demo", "--method", "full", "--quantize", "int8"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "preset 'full' changes the base weights themselves" in err
    assert "--quantize none" in err and "lora, lora-all-linear" in err
    assert finetune.check_quantize("full", "none") == "none"
