"""The command line on your own data: ``jpeft finetune`` / ``eval`` / ``predict`` / ``merge`` /
``export`` / ``report`` on the embedded MiniLM and a small CSV written here, and on a tiny LLaMA
folder written here (``--task causal-lm``); every flag value checked before anything loads (one
line naming the flag, exit status 2); help on every flag; a closed pipe ends quietly; run
folders never written twice; progress bars only on a terminal."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import jpeft
from jpeft import cli
from jpeft.recipes import jobs, tabular

pytestmark = pytest.mark.slow


def _write_data(tmp, movie_data, n=40):
    texts, labels = movie_data
    rows = [(t, int(y)) for t, y in zip(texts[:n], labels[:n])]
    with open(tmp / "train.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        for i, (t, y) in enumerate(rows):
            w.writerow([i, t, "pos" if y else "neg"])
    with open(tmp / "eval.jsonl", "w", encoding="utf-8") as f:
        for t, y in rows:
            f.write(json.dumps({"sentence": t, "y": "pos" if y else "neg", "n": y}) + "\n")
    return tmp / "train.csv", tmp / "eval.jsonl"


def _main(*argv):
    """``cli.main`` with the exit status of a parse/validation error returned, not raised."""
    try:
        return cli.main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def run(tmp_path_factory, movie_data):
    """One LoRA run on the MiniLM (3 steps) through ``jpeft finetune``."""
    tmp = tmp_path_factory.mktemp("cli")
    train, evalf = _write_data(tmp, movie_data)
    out = tmp / "run"
    assert _main("finetune", "--data", train, "--steps", 3, "--seq", 16, "--batch", 8,
                 "--out", out, "--no-progress") == 0
    return tmp, out, train, evalf


def test_finetune_writes_a_complete_run_folder(run, capsys):
    tmp, out, train, _ = run
    assert sorted(p.name for p in out.iterdir()) == ["delta", "labels.json", "metrics.jsonl",
                                                     "run.json"]
    assert not [p for p in tmp.iterdir() if ".partial-" in p.name]
    info = json.loads((out / "run.json").read_text())
    assert info["task"] == "seq-cls" and info["model"]["pooling"] == "mean"
    assert info["method"]["preset"] == "lora" and info["method"]["options"]["steps"] == 3
    assert info["method"]["config"]["compose"]["lora"]["rank"] == 8
    assert info["data"]["train"]["sha256"] == tabular.sha256(train)
    assert info["data"]["text_column"] == "text" and info["data"]["label_column"] == "label"
    assert info["labels"] == ["neg", "pos"] == json.loads((out / "labels.json").read_text())[
        "labels"]
    assert info["result"]["ok"] and info["seq"] == 16 and info["batch"] == 8
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["event"] for r in records} >= {"train", "epoch", "eval", "result"}
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2, 3]
    loaded = jpeft.saving.read(out / "delta")
    assert loaded.model["pooling"] == "mean" and loaded.model["num_labels"] == 2


def test_eval_and_predict(run, capsys):
    tmp, out, train, evalf = run
    capsys.readouterr()
    assert _main("eval", "--run", out, "--data", evalf, "--text-column", "sentence",
                 "--label-column", "y", "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["examples"] == 40 and 0 <= result["accuracy"] <= 1 and result["loss"] > 0
    # labels spelled as integers are not the run's classes ('neg', 'pos'): one line, --data
    assert _main("eval", "--run", out, "--data", evalf, "--text-column", "sentence",
                 "--label-column", "n") == 2
    err = capsys.readouterr().err
    assert err.startswith("jpeft eval: error: --data: ") and "'neg', 'pos'" in err
    assert err.count("\n") == 1

    preds = tmp / "preds.jsonl"
    assert _main("predict", "--run", out, "--data", train, "--out", preds) == 0
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 40 and set(rows[0]) == {"text", "label", "p_neg", "p_pos"}
    for r in rows:
        assert abs(r["p_neg"] + r["p_pos"] - 1) < 1e-5
        assert r["label"] == ("pos" if r["p_pos"] > r["p_neg"] else "neg")
    assert _main("predict", "--run", out, "--data", train, "--out", preds) == 2
    assert "--out: " in capsys.readouterr().err
    assert _main("predict", "--run", out, "--data", train, "--out", tmp / "preds.csv") == 0
    with open(tmp / "preds.csv", newline="") as f:
        assert next(csv.reader(f)) == ["text", "label", "p_neg", "p_pos"]


def test_merge_predicts_as_the_unmerged_run(run):
    from jpeft.models.loading import load_hf_bert
    from jpeft.models.tokenizer import encode, load_tokenizer
    tmp, out, train, _ = run
    preds = tmp / "for_merge.jsonl"
    assert _main("predict", "--run", out, "--data", train, "--out", preds) == 0
    want = np.array([[r["p_neg"], r["p_pos"]]
                     for r in map(json.loads, preds.read_text().splitlines())])
    merged = tmp / "merged"
    assert _main("merge", "--run", out, "--out", merged) == 0
    config = json.loads((merged / "config.json").read_text())
    assert config["id2label"] == {"0": "neg", "1": "pos"}
    loaded = load_hf_bert(merged, num_labels=2, pooling="mean", strict=True)
    tok = load_tokenizer(merged / "tokenizer.json", max_length=16)
    x = encode(tok, tabular.read(train, "text").texts)
    logits = np.asarray(loaded.model.apply({"params": loaded.params}, x["input_ids"],
                                           x["attention_mask"], x["token_type_ids"]))
    np.testing.assert_allclose(jax.nn.softmax(logits, -1), want, atol=1e-4)
    # the folder exists now: refused without --overwrite
    assert _main("merge", "--run", out, "--out", merged) == 2


def test_export_hf_peft_round_trip(run, capsys):
    from jpeft.interop import hf_peft
    tmp, out, _, _ = run
    adapter = tmp / "adapter"
    # the run pools by mean; torch's BertForSequenceClassification pools CLS: refused first
    assert _main("export", "--run", out, "--format", "hf-peft", "--out", adapter) == 2
    err = capsys.readouterr().err
    assert err.startswith("jpeft export: error: --run: ") and "--allow-function-change" in err
    assert not adapter.exists()
    assert _main("export", "--run", out, "--format", "hf-peft", "--out", adapter,
                 "--allow-function-change") == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8
    assert config["modules_to_save"] == ["classifier"]
    assert (adapter / "adapter_model.safetensors").is_file()
    # read back with jpeft's importer: the same LoRA factors
    info = jobs.run_model(jobs.read_run(out))
    trained = jobs.load_trained(jobs.read_run(out), info)
    method, delta = hf_peft.load(adapter, trained.base.variables, sites=trained.base.sites)
    jax.tree.map(np.testing.assert_array_equal, delta["lora"], trained.delta["lora"])


def test_methods_without_a_form_are_refused_before_loading(run, monkeypatch, capsys):
    """merge and export name the method that cannot be merged or has no PEFT format, before
    any base loads (a prompt-tuning and a BitFit run stand in: their checkpoints alone)."""
    from jpeft.methods import prompt
    from jpeft.models import loading
    tmp, out, _, _ = run
    monkeypatch.setattr(loading, "load_hf_bert", _never)
    fake = jpeft.saving.Loaded(
        jpeft.compose(prompt=prompt.prompt_tuning(4), head=jpeft.full_finetune(("classifier",),
                                                                                name="head")),
        {}, None, {})
    monkeypatch.setattr(jobs, "read_method", lambda r: fake)
    assert _main("merge", "--run", out, "--out", tmp / "m2") == 2
    assert "cannot be merged" in capsys.readouterr().err
    fake = fake._replace(method=jpeft.compose(bitfit=jpeft.bitfit(), head=jpeft.full_finetune(
        ("classifier",), name="head")))
    monkeypatch.setattr(jobs, "read_method", lambda r: fake)
    assert _main("export", "--run", out, "--out", tmp / "x2", "--allow-function-change") == 2
    assert "bitfit (bitfit)" in capsys.readouterr().err


def test_report_counts_the_methods_delta(run, capsys):
    _, out, _, _ = run
    capsys.readouterr()
    assert _main("report", "--method", "lora", "--seq", 16, "--batch", 2, "--no-full",
                 "--json") == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    delta = jpeft.saving.read(out / "delta").delta
    assert r["stages"][0]["trainable"] == jpeft.num_params(delta) == r["saved_delta_entries"]
    assert r["params"] == 22_566_146
    assert r["stages"][0]["flops"] > 0 and r["stages"][0]["temp_bytes"] > 0


def _never(*a, **k):
    raise AssertionError("the model was loaded before the flags were checked")


@pytest.mark.parametrize("argv, flag", [
    (("--batch", "0"), "--batch"),
    (("--seq", "0"), "--seq"),
    (("--rank", "0"), "--rank"),
    (("--set", "rank=-1"), "--set rank"),
    (("--rank", "1000"), "--rank"),
    (("--set", "rank=1000"), "--set rank"),
    (("--steps", "-3"), "--steps"),
    (("--lr", "nan"), "--lr"),
    (("--text-column", "nope"), "--text-column"),
    (("--label-column", "nope"), "--label-column"),
    (("--method", "far", "--rank", "4"), "--rank"),
    (("--set", "nothing=1"), "--set nothing"),
    (("--set", "rank"), "--set"),
    (("--method", "nope"), "--method"),
    (("--batch", "64"), "--batch"),
    (("--dev-fraction", "0.001"), "--dev-fraction"),
    (("--seq", "600"), "--seq"),
    (("--method", "full", "--quantize", "nf4"), "--quantize"),
    (("--task", "causal-lm"), "--model"),
    (("--steps", "3", "--epochs", "1"), "--epochs"),
    (("--model", "/nonexistent"), "--model"),
])
def test_finetune_values_are_checked_before_loading(tmp_path, movie_data, monkeypatch, capsys,
                                                    argv, flag):
    from jpeft.models import llama, loading
    from jpeft.recipes import movies
    for module, name in ((loading, "load_hf_bert"), (llama, "load_hf_llama"),
                         (movies, "load_task"), (jobs, "load_classifier"),
                         (jobs, "load_decoder")):
        monkeypatch.setattr(module, name, _never)
    train, _ = _write_data(tmp_path, movie_data)
    assert _main("finetune", "--data", train, "--out", tmp_path / "out", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"jpeft finetune: error: {flag}"), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_other_commands_check_their_flags(tmp_path, monkeypatch, capsys):
    from jpeft.models import loading
    monkeypatch.setattr(loading, "load_hf_bert", _never)
    for argv, flag in ((("eval", "--run", tmp_path, "--data", tmp_path / "x.csv"), "--data"),
                       (("eval", "--run", tmp_path / "none", "--data", "x.csv"), "--run"),
                       (("merge", "--run", tmp_path, "--out", tmp_path / "m"), "--run"),
                       (("report", "--rank", "0"), "--rank"),
                       (("report", "--batch", "0"), "--batch"),
                       (("report", "--set", "rank=1000"), "--set rank"),
                       (("demo", "--rank", "1000"), "--rank"),
                       (("demo", "--batch", "0"), "--batch")):
        assert _main(*argv) == 2, argv
        err = capsys.readouterr().err
        assert f"error: {flag}" in err and err.count("\n") == 1, err


def test_every_flag_has_help():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {action.option_strings}" for name, p in sub.choices.items()
               for action in p._actions
               if action.option_strings and action.dest != "help" and not action.help]
    assert not missing


def test_presets_into_a_closed_pipe_ends_quietly(monkeypatch):
    proc = subprocess.Popen([sys.executable, "-m", "jpeft.cli", "presets"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                    # the reader is gone before anything is written
    err = proc.stderr.read().decode()
    assert proc.wait() == 0 and "Traceback" not in err and "BrokenPipe" not in err, err

    class Closed(io.StringIO):
        def write(self, s):
            raise BrokenPipeError(32, "Broken pipe")
    monkeypatch.setattr(sys, "stdout", Closed())
    assert cli.main(["presets"]) == 0


def test_demo_writes_a_new_folder_per_run(tmp_path, monkeypatch):
    """Without --out every demo gets a folder of its own; a non-empty --out is refused
    without --overwrite, and replaced with it."""
    import types

    from jpeft.recipes import finetune, movies
    split = type("Split", (), {"labels": np.array([0, 1]), "__len__": lambda self: 2})()
    monkeypatch.setattr(movies, "load_task", lambda **kw: types.SimpleNamespace(
        model_dir="minilm", train=split, dev=split))
    monkeypatch.setattr(movies, "env", lambda t, **kw: "env")

    def fake_run(name, env, options, out, quantize):
        (out / "delta").mkdir()
        (out / "delta" / "marker").write_text(name)
        return finetune.Outcome(True, {}, {}, out / "delta", 0.5, 0.9)
    monkeypatch.setattr(finetune, "run", fake_run)
    monkeypatch.chdir(tmp_path)
    assert _main("demo", "--steps", "2") == 0
    assert _main("demo", "--steps", "2") == 0
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("demo-lora-") for f in folders)
    assert _main("demo", "--out", folders[0], "--method", "bitfit") == 2
    assert (folders[0] / "delta" / "marker").read_text() == "lora"
    assert _main("demo", "--out", folders[0], "--method", "bitfit", "--overwrite") == 0
    assert (folders[0] / "delta" / "marker").read_text() == "bitfit"
    assert not [p for p in tmp_path.rglob("*") if ".partial-" in p.name or ".old-" in p.name]


def test_progress_is_a_bar_only_on_a_terminal():
    from jpeft.recipes.progress import Progress

    class Stream(io.StringIO):
        def __init__(self, tty):
            super().__init__()
            self.tty = tty

        def isatty(self):
            return self.tty
    plain = Stream(False)
    with Progress(100, "fine-tuning", stream=plain) as p:
        for _ in range(100):
            p.update(1, loss=0.5)
    lines = plain.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in plain.getvalue()
    assert lines[-1].startswith("fine-tuning: step 100/100, loss 0.5000")
    bar = Stream(True)
    with Progress(100, "fine-tuning", stream=bar) as p:
        for _ in range(100):
            p.update(1, loss=0.5)
    assert "\r" in bar.getvalue() and "100/100" in bar.getvalue()


# ------------------------------------------------------------------------------ causal-lm


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A tiny LLaMA folder (config.json + model.safetensors, no tokenizer: byte-level)."""
    from flax import nnx
    from safetensors.numpy import save_file

    from jpeft.models.llama import LlamaConfig, LlamaForCausalLM, llama_to_hf_state
    path = tmp_path_factory.mktemp("llama")
    config = LlamaConfig.tiny(vocab_size=260)
    save_file(llama_to_hf_state(LlamaForCausalLM(config, rngs=nnx.Rngs(0))),
              str(path / "model.safetensors"))
    fields = {k: v for k, v in dataclasses.asdict(config).items()
              if k not in ("scan_layers", "remat", "attention")}
    (path / "config.json").write_text(json.dumps({**fields, "model_type": "llama"}))
    return path


def test_causal_lm_finetune_eval_predict_merge_export_report(llama_dir, tmp_path, movie_data,
                                                            capsys):
    from jpeft.models.llama import load_hf_llama
    train, _ = _write_data(tmp_path, movie_data)
    out = tmp_path / "run"
    argv = ("finetune", "--task", "causal-lm", "--model", llama_dir, "--data", train,
            "--method", "lora", "--rank", 4, "--steps", 2, "--seq", 24, "--batch", 4,
            "--no-progress", "--out", out)
    assert _main(*argv) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["task"] == "causal-lm" and info["labels"] is None
    assert info["model"]["tokenizer"].startswith("byte-level")
    assert info["result"]["checks"] == {"reload": True}
    # the run folder is not written twice; --overwrite replaces it once the new run is complete
    assert _main(*argv) == 2
    assert "--out: " in capsys.readouterr().err
    assert _main(*argv, "--overwrite", "--seed", 1) == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 1

    capsys.readouterr()
    assert _main("eval", "--run", out, "--data", train, "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens"] > 0 and np.isfinite(result["loss"])
    assert result["perplexity"] == pytest.approx(np.exp(result["loss"]))

    preds = tmp_path / "gen.jsonl"
    assert _main("predict", "--run", out, "--data", train, "--out", preds,
                 "--max-new-tokens", 3) == 0
    rows = [json.loads(x) for x in preds.read_text().splitlines()]
    assert len(rows) == 40 and set(rows[0]) == {"text", "continuation"}

    merged = tmp_path / "merged"
    assert _main("merge", "--run", out, "--out", merged) == 0
    trained = jobs.load_trained(jobs.read_run(out), jobs.run_model(jobs.read_run(out)))
    ids, mask = trained.base.encode(["the film is good", "a dull movie"])
    want = jpeft.wrap(trained.apply, trained.method, trained.sites)(trained.params,
                                                                    trained.delta, ids, mask)
    apply, params = jpeft.nnx.split(load_hf_llama(merged))
    np.testing.assert_allclose(apply(params, ids, mask), want, atol=1e-4)

    adapter = tmp_path / "adapter"
    assert _main("export", "--run", out, "--out", adapter) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"

    capsys.readouterr()
    assert _main("report", "--task", "causal-lm", "--model", llama_dir, "--rank", 4,
                 "--seq", 16, "--batch", 2, "--json") == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["stages"][0]["trainable"] == jpeft.num_params(trained.delta)
    assert r["full"]["trainable"] == r["params"] == jpeft.num_params(trained.params)
    assert 0 < r["stages"][0]["flops_vs_full"] < 1


def test_causal_lm_flags(llama_dir, tmp_path, movie_data, monkeypatch, capsys):
    from jpeft.models import llama
    monkeypatch.setattr(llama, "load_hf_llama", _never)
    train, _ = _write_data(tmp_path, movie_data)
    base = ("finetune", "--task", "causal-lm", "--model", llama_dir, "--data", train)
    for argv, flag in ((("--method", "bitfit"), "--method"),
                       (("--head-lr", "0.1"), "--head-lr"),
                       (("--rank", "100"), "--rank"),
                       (("--label-column", "label"), "--label-column")):
        assert _main(*base, *argv) == 2
        assert capsys.readouterr().err.startswith(f"jpeft finetune: error: {flag}")


def test_rlhf_command_forwards_to_the_pipeline(monkeypatch):
    """``jpeft rlhf ...`` hands its flags to :func:`jpeft.rlhf.pipeline.main` unchanged."""
    from jpeft import cli as cli_lib
    from jpeft.rlhf import pipeline
    seen = []
    monkeypatch.setattr(pipeline, "main", lambda argv: seen.append(list(argv)) or 0)
    assert cli_lib.main(["rlhf", "--stage", "dpo", "--out", "x"]) == 0
    assert seen == [["--stage", "dpo", "--out", "x"]]
