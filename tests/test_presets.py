"""Every registered method preset, end to end through the one recipe on the tiny BERT.

Each preset runs every stage it declares with tiny step counts; the recipe's checks must hold
(the saved result restores leaf for leaf, the method rebuilt from the checkpoint alone predicts
bit for bit the same, the merged model agrees), and the saved metadata rebuilds the method.
"""

import json

import jax
import numpy as np
import pytest

from conftest import tiny_classifier_env

import jpeft
from jpeft import checkpoint, presets
from jpeft.core import paths
from jpeft.recipes import finetune

#: Tiny options per preset: 2 training steps, the stages before them as short as they go.
TINY = {
    "lora": {"rank": 2},
    "lora-all-linear": {"rank": 2},
    "bitfit": {},
    "adalora": {"init_r": 4, "target_r": 2},
    "far": {"warmup_steps": 1, "fraction": 0.25},
    "diff-pruning": {"refine_steps": 1, "density": 0.05},
    "fishmask": {"fisher_examples": 3, "chunk_size": 2, "density": 0.05},
    "said": {"d": 40},
    "did": {"d": 40},
    "full": {},
    "head": {},
    "houlsby": {"reduction_factor": 8},
    "pfeiffer": {"reduction_factor": 8},
    "parallel": {"reduction_factor": 8},
    "scaled-parallel": {"reduction_factor": 8},
    "multihead-parallel": {"reduction_factor": 4},
    "compacter": {"reduction_factor": 8},
    "sparse-adapter": {"reduction_factor": 4, "sparsity": 0.5},
    "ia3": {},
    "prefix": {"length": 2, "hidden_size": 8},
    "prompt": {"length": 2},
    "mam": {"prefix_length": 2, "bottleneck_size": 4},
    "unipelt": {"prefix_length": 2, "reduction_factor": 8},
    "s4": {"groups": "1", "strategies": "APBL", "prefix_length": 2, "budget": 0.1},
}


@pytest.fixture(scope="module")
def env(tiny_config):
    return tiny_classifier_env(tiny_config)


def test_every_preset_has_tiny_options():
    assert set(TINY) == set(presets.names())


#: Presets run end to end: every kind of stage list (single fit, warm-up + compute, compute + fit,
#: fit + compute + fit, fit + fold), methods defined by data (FAR's columns, sparse indices),
#: masks in the config, AdaLoRA's metadata, one-shape SAID, full fine-tuning without a head. The
#: others are single-fit presets: :func:`test_every_preset_builds_and_rebuilds` checks their
#: declaration and config, and the contract suite their methods.
END_TO_END = ("lora", "adalora", "far", "diff-pruning", "fishmask", "said", "full", "head",
              "prefix", "sparse-adapter", "s4")


def test_every_preset_builds_and_rebuilds(env):
    """Every registered preset: its stages for the tiny options, the final method built from a
    state, its init on the model, and the method rebuilt from its saved config alone (no
    training, no compile)."""
    from jpeft.methods import from_config
    for name in presets.names():
        preset = presets.get(name)
        options = presets.resolve(preset, {"steps": 2, **TINY[name]})
        stages = preset.stages(options)
        assert isinstance(stages[-1], presets.Fit) and preset.main in [s.name for s in stages]
        if any(isinstance(s, presets.Compute) for s in stages) or name in ("full",):
            continue            # needs data from earlier stages: run end to end
        method = stages[-1].method({"head": env.head})
        shapes = jax.eval_shape(lambda k: method.init(k, env.params, env.sites),
                                jax.random.key(0))
        assert jax.tree.leaves(shapes), name
        as_json = json.loads(json.dumps(method.config, default=str))
        rebuilt = from_config(as_json, method.data)
        assert json.loads(json.dumps(rebuilt.config, default=str)) == as_json


@pytest.mark.parametrize("name", END_TO_END)
def test_preset_runs_end_to_end(env, name, tmp_path):
    preset = presets.get(name)
    options = {"steps": 2, **TINY[name]}
    out = finetune.run(name, env, options, out=tmp_path)
    assert out.ok, out.checks
    merges = {"merge"} if out.state["method"].merge is not None else set()
    assert set(out.checks) == {"restored", "config", "layout", "reload"} | merges
    declared = tuple(s.name for s in preset.stages(presets.resolve(preset, options)))
    assert out.state["ran"] == declared
    assert preset.main in declared

    # The checkpoint alone rebuilds the trained method (config, data, preset and options).
    saved = checkpoint.metadata(out.checkpoint)["metadata"]
    meta = saved["user"]
    assert meta["preset"] == name and meta["options"] == presets.resolve(name, options)
    loaded = presets.load(out.checkpoint)
    as_json = lambda config: json.loads(json.dumps(config, default=str))
    assert as_json(loaded.method.config) == saved["config"] == as_json(out.state["method"].config)
    # Training moved the head (or, for full fine-tuning, the whole model) off the base values
    # (a full_finetune delta holds the trained values at the base's paths).
    delta, base = out.state["delta"], paths.flatten(env.params)
    trained = paths.flatten(delta.get("head", delta))
    assert any(np.any(np.asarray(x) != np.asarray(base[p])) for p, x in trained.items())


def test_recipe_reports_changed_predictions(env, tmp_path):
    """The reload check fails when the base weights read back differ from those trained on."""
    moved = lambda: jax.tree.map(lambda x: np.asarray(x) + np.float32(0.01), env.params)
    out = finetune.run("bitfit", env._replace(reload=moved), {"steps": 2}, out=tmp_path)
    assert not out.ok
    assert out.checks == {"restored": True, "config": True, "layout": True, "reload": False,
                          "merge": True}


def test_stages_follow_the_options():
    far = presets.get("far").stages(presets.resolve("far", {"score": "magnitude"}))
    assert [s.name for s in far] == ["select", "train"]          # no warm-up by magnitude
    dp = presets.get("diff-pruning").stages(presets.resolve("diff-pruning", {"refine_steps": 0}))
    assert [(s.name, getattr(s, "steps", None)) for s in dp] == [
        ("train", 250), ("project", None), ("refine", 0)]
    said = presets.main_stage("said", {"d": 100})
    assert said.lr == presets.LR_SCALE / 10                      # 0.03 / sqrt(d)
    adalora = presets.main_stage("adalora", {"steps": 100}).method({"head": ("classifier",)})
    assert {k: adalora.config["compose"]["adalora"][k] for k in
            ("total_steps", "t_init", "t_final", "delta_t")} == {
        "total_steps": 100, "t_init": 10, "t_final": 20, "delta_t": 5}


def test_unknown_preset_and_option_are_clear_errors():
    with pytest.raises(ValueError, match="unknown preset 'lora2'; choose from lora, "):
        presets.get("lora2")
    with pytest.raises(ValueError, match="no option 'rnk'; its options: steps, lr, head_lr, seed, rank, alpha"):
        presets.resolve("lora", {"rnk": 4})
    with pytest.raises(ValueError, match="option 'rank' takes an integer, got 2.5"):
        presets.resolve("lora", {"rank": 2.5})
    with pytest.raises(ValueError, match="'score' must be one of"):
        presets.get("far").stages(presets.resolve("far", {"score": "random"}))
    assert presets.resolve("lora", {"alpha": 4})["alpha"] == 4.0
    assert presets.resolve("diff-pruning", {"structured": "true"})["structured"] is True
    with pytest.raises(ValueError, match="'lora' is already registered"):
        presets.register(presets.get("lora"))


def test_s4_layout_options(env):
    """S4's groups follow the model's layers: the spindle on the MiniLM's 6 layers is checked in
    tests/methods/test_s4.py; here the option errors, each before anything trains."""
    s4 = presets.get("s4")
    with pytest.raises(ValueError, match="option 'strategies' takes one group of the letters"):
        s4.stages(presets.resolve(s4, {"strategies": "AL,XP"}))
    with pytest.raises(ValueError, match="option 'groups' is 'spindle' or the number"):
        s4.stages(presets.resolve(s4, {"groups": "two"}))
    with pytest.raises(ValueError, match="2 groups but strategies for 4"):
        s4.stages(presets.resolve(s4, {"groups": "1,1"}))
    allocate = s4.stages(presets.resolve(s4, {"groups": "1,1", "strategies": "A,L"}))[0]
    with pytest.raises(ValueError, match="groups '1,1' hold 2 layers; the model has 1"):
        allocate.run({}, env)
    allocate = s4.stages(presets.resolve(s4, {}))[0]
    with pytest.raises(ValueError, match="1 layers are too few for a 4-group spindle"):
        allocate.run({}, env)


def test_load_needs_a_preset_checkpoint(tmp_path):
    checkpoint.save(tmp_path / "plain", {"w": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="was not written by jpeft.save"):
        presets.load(tmp_path / "plain")
    method = jpeft.bitfit()
    jpeft.save(tmp_path / "method", method, {"params": {"b": {"bias": np.zeros(2, np.float32)}}})
    with pytest.raises(ValueError, match="not a preset checkpoint"):
        presets.load(tmp_path / "method")
