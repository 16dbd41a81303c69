"""The hand-written JAX floor of ``benchmarks/floor.py`` computes what jpeft computes, so the
benchmark's jpeft/floor ratios compare the same math (tiny BERT, padded batch)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jpeft
from jpeft.core import paths as paths_lib

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import floor  # noqa: E402


def _floor_lora(delta):
    """jpeft's LoRA delta as the floor's ``{"<layer>/<module>": (A, B)}``."""
    out = {}
    for path, v in paths_lib.flatten(delta).items():
        key = f"{path[4]}/{'/'.join(path[5:-2])}"
        a, b = out.get(key, (None, None))
        out[key] = (v, b) if path[-1] == "lora_A" else (a, v)
    return out


@pytest.mark.parametrize("layout", floor.LAYOUTS)
def test_floor_equals_jpeft_logits_and_gradients(tiny_config, tiny_bert, tiny_batch, layout):
    model, params = tiny_bert
    variables = {"params": params}
    args = (tiny_batch["input_ids"], tiny_batch["attention_mask"])
    sites = jpeft.probe(model.apply, variables, *args)
    method = jpeft.lora("all-linear", rank=2, alpha=4.0, exclude=("classifier",))
    delta = jax.tree.map(lambda x: x + 0.05, method.init(jax.random.key(0), variables, sites))
    frozen, trainable = floor.init("lora_all_linear", params, rank=2)
    trainable = {"params": trainable["params"], "lora": _floor_lora(delta)}
    f = jax.jit(floor.logits_fn(heads=tiny_config.num_attention_heads, scale=2.0,
                                layout=layout))
    wrapped = jax.jit(jpeft.wrap(model.apply, method, sites))
    np.testing.assert_allclose(f(frozen, trainable, *args), wrapped(variables, delta, *args),
                               rtol=1e-5, atol=1e-6)
    g_floor = jax.jit(jax.grad(lambda t: jnp.sum(jnp.tanh(f(frozen, t, *args)))))(trainable)
    g_jpeft = jax.jit(jax.grad(lambda d: jnp.sum(jnp.tanh(wrapped(variables, d, *args)))))(delta)
    for key, (ga, gb) in _floor_lora(g_jpeft).items():
        np.testing.assert_allclose(g_floor["lora"][key][0], ga, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(g_floor["lora"][key][1], gb, rtol=1e-4, atol=1e-6)


def test_floor_trainable_sets():
    params = {"bert": {"encoder": {"layer": {"0": {"attention": {"self": {
        "query": {"kernel": np.ones((4, 4)), "bias": np.ones(4)}}}}}}},
        "classifier": {"kernel": np.ones((4, 2)), "bias": np.ones(2)}}
    _, full = floor.init("full", params)
    _, bitfit = floor.init("bitfit", params)
    count = lambda t: sum(np.size(x) for x in jax.tree.leaves(t))
    assert count(full) == 16 + 4 + 8 + 2 and count(bitfit) == 4 + 8 + 2
    with pytest.raises(ValueError, match="unknown floor config"):
        floor.init("lora", params)



@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # flax's, from qwix's own calls
def test_qlora_decoder_quick_runs_both_frameworks(tmp_path):
    """``benchmarks/qlora_decoder.py --quick`` in this process, on the int8 pair (qwix's eager NF4
    initialisation alone takes about 10 s even on the tiny decoder; jpeft's NF4 QLoRA is
    tests/test_quantized.py's): equal trainable counts, both bases stored in one byte per
    quantized entry plus per-channel scales, qwix's forward equal to jpeft's LoRA on qwix's
    dequantized weights (when qwix is installed), rows written."""
    import json

    import qlora_decoder
    out = tmp_path / "qlora.jsonl"
    assert qlora_decoder.main(["--quick", "--only", "qwix_int8_lora_qv", "--release-host-memory",
                               "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    summary = {r["config"]: r for r in rows if r["kind"] == "summary"}
    (checks,) = [r for r in rows if r["kind"] == "checks"]
    assert all(c["passed"] for c in checks["checks"])
    j = summary["jpeft_int8_lora_qv"]
    assert j["trainable_params"] == 2 * 8 * (64 + 64 + 64 + 32)     # layers x r x (q, v: in+out)
    assert j["quantized_weights"] == 14 and 0 < j["quant_rel_error_mean"] < 0.02
    assert j["base_bytes"]["logical"] == j["base_bytes"]["resident"] < j["base_bytes_f32"]
    if checks["setup"]["qwix_skipped"]:
        assert "qwix_int8_lora_qv" not in summary
        return
    q = summary["qwix_int8_lora_qv"]
    assert q["trainable_params"] == j["trainable_params"] and q["quantized_weights"] == 14
    assert q["base_bytes"]["logical"] == j["base_bytes"]["logical"]      # same int8 layout
    assert any("dequantized weights" in c["check"] for c in checks["checks"])


def test_isolated_movie_batches_are_real_padded_and_round_trip(tmp_path):
    """``isolated.py --data movies``: batches of real reviews (in the training split's order, with
    their labels), padded to the sequence length, written and read back unchanged; the feeder of
    the realistic loop cycles through them."""
    import isolated
    import step_cost
    from jpeft.data import load_movie_reviews, minilm_dir, train_dev_split

    batches = isolated.movie_batches(minilm_dir(), 3, 4, 16)
    (texts, labels), _ = train_dev_split(*load_movie_reviews())
    assert [b["input_ids"].shape for b in batches] == [(4, 16)] * 3
    np.testing.assert_array_equal(np.concatenate([b["labels"] for b in batches]), labels[:12])
    masks = np.stack([b["attention_mask"] for b in batches])
    assert 0 < masks.mean() < 1                       # real padding, not a full mask
    assert ((masks == 0) == (np.stack([b["input_ids"] for b in batches]) == 0)).all()
    path = str(tmp_path / "b.npz")
    isolated._write_batches(path, batches)
    back = isolated._load_batches(path)
    assert len(back) == 3
    for a, b in zip(batches, back):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    run, feed = step_cost._feeder("compiled", "jitted", "device batch", back)
    assert run == "jitted" and [feed()["labels"][0] for _ in range(4)] == [
        b["labels"][0] for b in back + back[:1]]
    assert step_cost._feeder("compiled", "jitted", "device batch", None)[0] == "compiled"
    with pytest.raises(SystemExit, match="training split has"):
        isolated.movie_batches(minilm_dir(), 10**6, 4, 16)


def test_isolated_targets_and_torch_categories():
    import isolated
    import torch_step
    rows = isolated.targets({"jpeft_over_torch": 0.98, "jpeft_over_floor": 1.07})
    assert [(r["check"], r["passed"]) for r in rows] == [
        ("jpeft step <= 1.0x Hugging Face PEFT", True),
        ("jpeft step <= 1.05x the JAX floor", False)]
    assert torch_step.op_category("aten::addmm") == "products"
    assert torch_step.op_category("aten::gelu_backward") == "GELU"
    assert torch_step.op_category("Optimizer.step#AdamW.step") == "optimizer"
    assert torch_step.op_category("aten::view") == "other"


def test_long_seq_policies_train_alike_and_remat_shrinks_temporaries(tmp_path):
    """``benchmarks/long_seq.py`` at a short sequence: every remat policy gives the same losses
    (the same math), which fall over the steps, and rematerialising keeps fewer temporaries."""
    import json

    import long_seq
    out = tmp_path / "long.jsonl"
    assert long_seq.main(["--seq", "256", "--batch", "1", "--steps", "3", "--out", str(out)]) == 0
    rows = {r["remat"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert set(rows) == {"none", "dots", "full"}
    for r in rows.values():
        np.testing.assert_allclose(r["losses"], rows["none"]["losses"], rtol=1e-5)
    assert rows["none"]["losses"][-1] < rows["none"]["losses"][0]
    assert rows["full"]["temp_bytes"] < rows["none"]["temp_bytes"]


def test_results_table_costs_a_method_whose_later_stage_donates_the_delta(tiny_config):
    """Diff pruning re-fine-tunes after its main fit, donating the main fit's delta: the cost
    columns measure the main fit's step on a copy (they once ran it on deleted buffers)."""
    import table
    from conftest import tiny_classifier_env
    env = tiny_classifier_env(tiny_config)
    args = table.parse(["--quick", "--methods", "full,diff-pruning", "--steps", "2",
                        "--batch", "4", "--time-steps", "1", "--time-reps", "2",
                        "--low-methods", "", "--low-tasks", "", "--low-k", ""])
    costs = table.cost_rows(args, env)
    assert list(costs) == ["full", "diff-pruning"]
    dp = costs["diff-pruning"]
    assert dp["flops"] > 0 and dp["step_seconds"] > 0 and dp["inference_time_vs_base"] > 0
    assert dp["step_time_vs_full"] > 0 and costs["full"]["step_time_vs_full"] == 1.0


@pytest.mark.slow
def test_results_table_quick_resumes_and_reports(tmp_path):
    """``benchmarks/table.py --quick`` (the CI mode) on two methods and two binary tasks: every
    cell is the mean of its seeds' runs, the learning rate is the grid's best on the tuning
    task's dev set, trainable % and FLOPs ratios follow from the model; a second command resumes
    (no run again), a run cut mid-write is run again with the same result, and runs made with
    other settings are refused."""
    import json

    import numpy as np

    import table
    from jpeft.data import tasks as tasks_lib
    try:
        tasks_lib.load("sms")
    except (ModuleNotFoundError, FileNotFoundError) as e:
        from conftest import unavailable
        unavailable(str(e))
    args = ["--quick", "--methods", "head,bitfit", "--tasks", "movies,sms", "--tune", "movies",
            "--low-methods", "head", "--low-tasks", "sms", "--low-k", "8", "--steps", "2",
            "--out", str(tmp_path), "--jax-cache", ""]      # the suite's own cache (conftest)
    result = table.main(args)
    runs_path = tmp_path / "table_runs.jsonl"
    lines = runs_path.read_text().splitlines()
    runs = [json.loads(line) for line in lines]
    # 2 methods x (2 grid runs on movies + 1 more seed on movies + 2 seeds on sms) + 2 low-data.
    assert len(runs) == 2 * (2 + 1 + 2) + 2
    rows = {r["method"]: r for r in result["rows"]}
    assert set(rows) == {"head", "bitfit"}
    for name, row in rows.items():
        grid = [r for r in runs if r["kind"] == "grid" and r["method"] == name]
        assert [r["lr"] for r in grid] == [table.base_lr(table.ROWS[name]) * f for f in (1, 2)]
        best = max(grid, key=lambda r: r["dev_accuracy"])
        for task in ("movies", "sms"):
            cell = row["tasks"][task]
            assert cell["lr"] == best["lr"]                        # tuned on movies only
            mine = [r for r in runs if r["method"] == name and r["task"] == task
                    and r["kind"] != "low" and r["lr"] == best["lr"]]
            accs = sorted((r["seed"], 100 * r["test_accuracy"]) for r in mine)
            assert [s for s, _ in accs] == [0, 1]
            assert np.isclose(cell["test_mean"], np.mean([a for _, a in accs]))
            assert np.isclose(cell["test_std"], np.std([a for _, a in accs]))
    costs = result["costs"]
    assert 0 < costs["head"]["flops"] < costs["bitfit"]["flops"]
    assert rows["head"]["flops_vs_full"] is None                    # no full row to divide by
    assert rows["head"]["trainable"] == 384 * 2 + 2                 # MiniLM width x 2 labels
    assert np.isclose(rows["head"]["trainable_percent"], 100 * 770 / 22_566_146)
    assert rows["head"]["inference_time_vs_base"] > 0
    low = result["low_data"]
    assert [(r["task"], r["method"], r["k"], len(r["test_runs"])) for r in low] == [
        ("sms", "head", 8, 2)]
    md = (tmp_path / "table.md").read_text()
    assert "| head | 0.00341 |" in md and "| bitfit |" in md and "K=8" in md
    assert json.loads((tmp_path / "table.json").read_text())["rows"] == result["rows"]

    # Resume: nothing runs again. A record cut by a kill is skipped (its run runs again) and the
    # next record starts on a line of its own; the file is never rewritten.
    again = table.main(args)
    assert runs_path.read_text().splitlines() == lines
    assert [r["tasks"] for r in again["rows"]] == [r["tasks"] for r in result["rows"]]
    settings = {"fingerprint": "of these runs"}
    cut = tmp_path / "cut.jsonl"
    cut.write_text(lines[0] + "\n" + lines[1][:40])
    with pytest.raises(ValueError, match="other settings"):
        table.Runs(cut, settings)                        # another fingerprint: refused
    first, second = json.loads(lines[0]), json.loads(lines[1])
    body = lambda rec: {k: v for k, v in rec.items() if k not in ("key", "settings")}
    mine = table.Runs(tmp_path / "mine.jsonl", settings)
    mine.add(first["key"], body(first))
    good = (tmp_path / "mine.jsonl").read_text()
    cut.write_text(good + good[:30])                     # killed while appending a second record
    runs = table.Runs(cut, settings)
    assert list(runs.done) == [first["key"]] and runs.get(second["key"]) is None
    runs.add(second["key"], body(second))
    again = table.Runs(cut, settings)
    assert list(again.done) == [first["key"], second["key"]] and again.dropped == 1
    assert cut.read_text().startswith(good + good[:30] + "\n")
    other = table.Runs(cut, settings)                    # a second process sharing the file
    third = json.loads(lines[2])
    runs.add(third["key"], body(third))
    assert other.get(third["key"])["test_accuracy"] == third["test_accuracy"]

    # A command on a subset of the methods reuses the runs (a table split over processes).
    assert table.main([*args, "--methods", "head", "--low-methods", "head", "--runs-only"]) == {}
    assert runs_path.read_text().splitlines() == lines
    with pytest.raises(ValueError, match="other settings"):
        table.main([*args, "--steps", "3"])
