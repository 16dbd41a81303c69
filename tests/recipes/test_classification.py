"""The fine-tuning recipe behind `make demo`: batching, bucketing, exact resume, the CLI end to end."""

import jax
import numpy as np
import optax
import pytest

from conftest import random_split

import jpeft
from jpeft.recipes import classification as clf


def _split(n=40, t=16, seed=0):
    return random_split(n, t, seed)


def test_batches_cover_each_example_once_per_epoch():
    split = _split()
    seen = []
    for b in clf.batches(split, 8, seed=3, buckets=(4, 8, 16), group_by_length=True):
        assert b["input_ids"].shape[0] == 8
        width = b["input_ids"].shape[1]
        assert width in (4, 8, 16) and b["attention_mask"].sum(1).max() <= width
        # Cutting to the bucket only drops padding: pad back to the full length to compare.
        seen += [tuple(np.pad(r, (0, 16 - width))) for r in b["input_ids"]]
    assert sorted(seen) == sorted(tuple(r) for r in split.inputs["input_ids"])
    # Same seed, same batches.
    a = [b["labels"] for b in clf.batches(split, 8, seed=3)]
    b = [b["labels"] for b in clf.batches(split, 8, seed=3)]
    np.testing.assert_array_equal(np.stack(a), np.stack(b))


def test_bucketed_logits_equal_unbucketed(tiny_bert):
    model, params = tiny_bert
    split = _split(n=21)
    variables = {"params": params}
    predict = clf.make_predict(model.apply)
    full = clf.logits_of(predict, variables, None, split, batch_size=8)
    bucketed = clf.logits_of(predict, variables, None, split, batch_size=8, buckets=(4, 8, 16))
    assert full.shape == (21, 2)
    np.testing.assert_allclose(bucketed, full, atol=1e-5)


def test_resume_from_step_continues_exactly(tiny_bert, tiny_sites):
    model, params = tiny_bert
    variables = {"params": params}
    method = jpeft.compose(lora=jpeft.lora(("query", "value"), rank=2),
                           head=jpeft.full_finetune(("classifier",)))
    delta = method.init(jax.random.key(0), variables, tiny_sites)
    loss = clf.make_loss(model.apply, method, tiny_sites)
    opt = optax.adam(1e-2)
    split = _split()
    kw = dict(batch_size=8, seed=1, progress=False, buckets=(16,))    # one compile per call
    copy = lambda t: jax.tree.map(lambda x: x.copy(), t)   # train() donates the delta it is given
    straight = clf.train(variables, copy(delta), loss, opt, split, steps=7, **kw)
    first = clf.train(variables, copy(delta), loss, opt, split, steps=3, **kw)
    rest = clf.train(variables, first.delta, loss, opt, split, steps=4, opt_state=first.opt_state,
                     start_step=3, **kw)
    assert first.losses + rest.losses == straight.losses
    jax.tree.map(np.testing.assert_array_equal, rest.delta, straight.delta)


def test_batch_larger_than_data_is_an_error(tiny_bert):
    model, params = tiny_bert
    method = jpeft.bitfit()
    delta = method.init(jax.random.key(0), {"params": params})
    with pytest.raises(ValueError, match="larger than the 40 training examples"):
        clf.train({"params": params}, delta, clf.make_loss(model.apply, method), optax.sgd(0.1),
                  _split(), steps=1, batch_size=64, progress=False)


@pytest.mark.slow
def test_demo_runs_end_to_end(minilm, movie_data, tmp_path, capsys):
    from jpeft import checkpoint, cli
    rc = cli.main(["demo", "--steps", "3", "--batch", "8", "--seq", "16", "--dev-limit", "48",
                   "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "preset lora:" in out
    assert "trainable params: 74,498" in out
    assert "predictions identical to the trained model: True" in out
    assert "100.00% of dev predictions equal" in out
    meta = checkpoint.metadata(tmp_path / "delta")["metadata"]["user"]
    assert meta["preset"] == "lora" and meta["options"]["steps"] == 3
    # The saved adapter records mean pooling: on load_hf_bert's default (CLS) base it is refused
    # (it predicted about 0.5 for everything there), on the recorded base it loads.
    from jpeft.data.embedded import minilm_dir
    from jpeft.models.loading import load_hf_bert
    default = load_hf_bert(minilm_dir(), num_labels=2)
    with pytest.raises(checkpoint.CheckpointError, match="pooling: saved 'mean', found 'cls'"):
        jpeft.load(tmp_path / "delta", {"params": default.params}, model=default.record)
    assert meta["model"] == load_hf_bert(minilm_dir(), num_labels=2, pooling="mean").record


def test_cli_maps_flags_to_preset_options():
    from jpeft import cli, presets
    parse = lambda *argv: cli.build_parser().parse_args(["demo", *argv])
    options = cli.preset_options(parse("--method", "far", "--far-score", "magnitude", "--seed", "3",
                                       "--set", "budget=global", "--set", "fraction=0.1"))
    assert options == {**presets.get("far").defaults, "score": "magnitude", "budget": "global",
                       "fraction": 0.1, "seed": 3}
    assert cli.preset_options(parse("--method", "diff-pruning", "--structured"))["structured"]
    with pytest.raises(ValueError, match="--rank does not apply to --method far; its options: "):
        cli.preset_options(parse("--method", "far", "--rank", "4"))
    with pytest.raises(ValueError, match="--set takes KEY=VALUE"):
        cli.preset_options(parse("--set", "rank"))
    with pytest.raises(ValueError, match="'score' must be one of"):
        cli.preset_options(parse("--method", "far", "--set", "score=random"))


def test_cli_rejects_an_option_the_preset_lacks(capsys):
    from jpeft import cli
    with pytest.raises(SystemExit, match="2") as e:
        cli.main(["demo", "--method", "bitfit", "--set", "rank=4"])
    assert e.value.code == 2
    assert "preset 'bitfit' has no option 'rank'; its options: " in capsys.readouterr().err


def test_cli_demo_reaches_the_recipe_for_every_preset(monkeypatch, tmp_path, capsys):
    """``jpeft demo --method NAME`` for every preset: flags and defaults resolve, the stages build,
    and the recipe is called with them (the recipe itself: tests/test_presets.py; one real run on
    the MiniLM: test_demo_runs_end_to_end)."""
    import types

    from jpeft import cli, presets
    from jpeft.recipes import finetune, movies
    split = type("Split", (), {"labels": np.array([0, 1]), "__len__": lambda self: 2})()
    task = types.SimpleNamespace(model_dir="minilm", train=split, dev=split)
    calls = []
    monkeypatch.setattr(movies, "load_task", lambda **kw: task)
    monkeypatch.setattr(movies, "env", lambda t, **kw: ("env", t))
    monkeypatch.setattr(finetune, "run", lambda name, env, options, out, quantize: calls.append(
        (name, options, quantize)) or finetune.Outcome(True, {}, {}, tmp_path, 0.5, 0.9))
    for name in presets.names():
        assert cli.main(["demo", "--method", name, "--steps", "2", "--out", str(tmp_path)]) == 0
    assert [n for n, _, _ in calls] == list(presets.names())
    assert all(o == presets.resolve(n, {"steps": 2}) and q == "none" for n, o, q in calls)


@pytest.mark.parametrize("retained, flags, expected", [
    (True, (), []), (True, ("--release-host-memory",), ["rerun"]),
    (False, ("--release-host-memory",), [])])
def test_cli_release_host_memory_starts_a_released_process(monkeypatch, retained, flags,
                                                          expected):
    """``import jpeft`` keeps freed host memory on CPU (jpeft/core/host_memory.py); the command
    line's ``--release-host-memory`` then starts itself again with JPEFT_HOST_MEMORY=release."""
    from jpeft import cli
    from jpeft.core import host_memory
    calls = []
    monkeypatch.setattr(host_memory, "retained", lambda: retained)
    monkeypatch.setattr(host_memory, "rerun_released", lambda argv: calls.append("rerun"))
    monkeypatch.setattr(cli, "list_presets", lambda: 0)
    assert cli.main([*flags, "presets"]) == 0
    assert calls == expected

def test_the_recipe_saves_the_model_record_and_loading_checks_it(tiny_config, tmp_path):
    """A result trained with mean pooling records it; jpeft.load on a CLS-pooling base is an error
    naming the pooling, on the recorded base it loads (issue: silently wrong predictions)."""
    import dataclasses

    from conftest import tiny_classifier_env
    from jpeft import checkpoint
    from jpeft.models.bert import BertForSequenceClassification
    from jpeft.models.loading import model_record
    from jpeft.recipes import finetune
    one_layer = dataclasses.replace(tiny_config, num_hidden_layers=1)
    record = model_record(BertForSequenceClassification(one_layer))
    env = tiny_classifier_env(tiny_config)._replace(model_record=record)
    out = finetune.run("bitfit", env, {"steps": 1}, out=tmp_path)
    assert out.ok, out.checks
    cls = model_record(BertForSequenceClassification(dataclasses.replace(one_layer,
                                                                         pooling="cls")))
    with pytest.raises(checkpoint.CheckpointError, match=(
            r"pooling: saved 'mean', found 'cls'\nbuild the base as recorded: "
            r"jpeft\.models\.load_hf_bert\(model_dir, pooling='mean'\)")):
        jpeft.load(out.checkpoint, env.params, env.sites, model=cls)
    loaded = jpeft.load(out.checkpoint, env.params, env.sites, model=record)
    assert loaded.model == record
    # The recipe's own reload check compares the recorded model with the task's.
    with pytest.raises(checkpoint.CheckpointError, match="pooling: saved 'mean', found 'cls'"):
        finetune.check_reload(env._replace(model_record=cls), out.state["method"], None,
                              out.state["delta"], out.checkpoint, lambda _: None)
