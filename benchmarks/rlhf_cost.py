"""What RLHF on one base costs: memory of the PPO step, and rollout generation speed.

``python benchmarks/rlhf_cost.py [--parts bytes,generate,pipeline] [--models rlhf,decoder]
[--reps 3] [--batch 8] [--prompt 16] [--new-tokens 48] [--calls 5] [--out PATH]``

* ``bytes``: PPO's compiled step (:mod:`jpeft.rlhf.ppo`: actor LoRA + critic LoRA and value head
  trained; the reward delta and the reference are the same base) -- ``memory_analysis()`` of the
  compiled step (arguments, temporaries) and the closed forms from ``jpeft.num_params`` x
  itemsize: one base + the three deltas + the optimizer state, against four full copies of the
  model (and against four copies plus Adam's two moments of the two trained models, what full
  RLHF without PEFT holds).
* ``generate``: greedy cached generation of ``--new-tokens`` tokens after ``--prompt``-token
  prompts, ``--batch`` rows, tokens per second: jpeft's ``generate`` (one jitted program: prefill
  + ``lax.scan`` over a KV cache; the plain base, and the base + an actor LoRA through
  ``jpeft.wrap``) against ``transformers.LlamaForCausalLM.generate`` (``use_cache=True``,
  ``do_sample=False``, ``min_new_tokens = max_new_tokens``) on the same config, the same weights
  (exported with ``llama_to_hf_state``) and the same prompts (real review bytes for the byte-level
  model, random ids otherwise). Each runner in its own process (a torch process never imports JAX),
  alternated, ``--reps`` repetitions; a process warms up twice and reports the median of
  ``--calls`` calls. torch runs with each of ``--torch-threads`` (default 1 and the usable
  cores: on a loaded machine two OpenMP threads can be many times slower than one) and the
  comparison (``jpeft_over_torch_speed``: torch's time over jpeft's, the median of the
  per-repetition ratios) takes the thread count least favourable to jpeft. The jpeft process
  also times a **mixed-adapter batch** (actor + reference, ``2B`` rows, ``jpeft.multi.mixed``)
  against the two generations run one after the other, and PPO's scoring pass with the four
  models in one mixed forward of ``4B`` rows against four forwards of ``B`` rows. The greedy
  tokens of both frameworks are compared (``tokens_equal_fraction``).
* ``pipeline``: ``python -m jpeft.rlhf.pipeline --stage all`` with its defaults, its results line
  appended to ``benchmarks/results/rlhf.jsonl`` (reward before/after, KL, seconds per PPO
  iteration).

Models (``--models``): ``rlhf`` is the RLHF example's byte-level decoder (107K parameters: 64 wide,
2 layers, vocabulary 257); ``decoder`` the ~25M-parameter LLaMA of ``decoder_torch.py`` (512 wide, 8
layers, vocabulary 6000). Rows go to ``--out`` (default ``benchmarks/results/rlhf_cost.jsonl``),
each with the load average before and after (the benchmark's own processes raise it) and, with
``--note``, what the operator knows of the conditions: a timing taken on a loaded machine is not
final.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "rlhf_cost.jsonl"
PIPELINE_OUT = HERE / "results" / "rlhf.jsonl"
PARTS = ("bytes", "generate", "pipeline")
MODELS = ("rlhf", "decoder")


def model_config(name: str) -> dict:
    """The Hugging Face config fields of ``name`` (shared by both frameworks)."""
    if name == "rlhf":
        return dict(vocab_size=257, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                    tie_word_embeddings=False)
    sys.path.insert(0, str(HERE))
    import decoder_torch
    return dict(decoder_torch.MODEL)


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------------------------
# Children


def _time(fn, calls: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median_s": statistics.median(times), "min_s": min(times),
            "all_s": [round(t, 5) for t in times]}


def _jpeft_child(a) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jpeft
    from jpeft import multi
    from jpeft.models.llama import LlamaConfig, load_hf_llama
    from jpeft.rlhf import generate as gen_lib
    from jpeft.rlhf import models, ppo as ppo_lib

    data = np.load(a.data)
    cfg = LlamaConfig.from_dict(json.loads(str(data["config"])))
    module = load_hf_llama({k[3:]: data[k] for k in data.files if k.startswith("hf.")}, cfg)
    _, params = jpeft.nnx.split(module)
    params = jax.device_put(params, jax.devices()[0])
    base = models.build_base(cfg, params)
    ids = jnp.asarray(data["ids"])
    mask = jnp.ones_like(ids)
    b, n = ids.shape[0], a.new_tokens
    method = models.adapter(8, 16.0)
    actor = method.init(jax.random.key(1), base.params, base.sites)
    leaves, tree = jax.tree.flatten(actor)
    actor = jax.tree.unflatten(tree, [x + 0.02 * jax.random.normal(jax.random.key(i), x.shape)
                                      for i, x in enumerate(leaves)])
    actor = models.placed(actor, base.params)
    key = jax.random.key(0)
    plain = gen_lib.make_generator(base, None, new_tokens=n, temperature=0.0)
    lora = gen_lib.make_generator(base, method, new_tokens=n, temperature=0.0)
    mixed = gen_lib.make_generator(base, multi.mixed(actor=method), new_tokens=n,
                                   temperature=0.0)
    both_ids, both_mask = jnp.concatenate([ids, ids]), jnp.concatenate([mask, mask])
    index = jnp.repeat(jnp.array([0, -1], jnp.int32), b)
    run = {
        "plain": lambda: plain(base.params, None, ids, mask, key).tokens.block_until_ready(),
        "lora": lambda: lora(base.params, actor, ids, mask, key).tokens.block_until_ready(),
        "mixed_2b": lambda: mixed(base.params, {"actor": actor}, both_ids, both_mask, key,
                                  index).tokens.block_until_ready(),
        "separate_2b": lambda: (lora(base.params, actor, ids, mask, key).tokens,
                                plain(base.params, None, ids, mask, key).tokens
                                )[1].block_until_ready(),
    }
    out = {k: _time(f, a.calls) for k, f in run.items()}
    tokens = np.asarray(plain(base.params, None, ids, mask, key).tokens)[:, ids.shape[1]:]
    mixed_tokens = np.asarray(mixed(base.params, {"actor": actor}, both_ids, both_mask, key,
                                    index).tokens)
    out["mixed_equals_separate"] = bool(
        np.array_equal(mixed_tokens[:b], np.asarray(lora(base.params, actor, ids, mask,
                                                         key).tokens))
        and np.array_equal(mixed_tokens[b:, ids.shape[1]:], tokens))
    # PPO's scoring pass: four models in one mixed forward of 4B rows, or four of B rows.
    rollout = lora(base.params, actor, ids, mask, key)
    reward = models.placed(models.init_scalar(jax.random.key(2), base, method), base.params)
    deltas = {"actor": actor, "critic": reward, "reward": reward}
    for mixed_scoring in (True, False):
        f = jax.jit(lambda p, d, r, m=mixed_scoring: ppo_lib.score_rollout(
            base, method, p, d, r, mixed=m))
        out["score_mixed" if mixed_scoring else "score_separate"] = _time(
            lambda: jax.block_until_ready(f(base.params, deltas, rollout)), a.calls)
    out["tokens"] = tokens.tolist()
    out["base_params"] = jpeft.num_params(base.params)
    return out


def _torch_child(a) -> dict:
    import numpy as np
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(a.threads or len(os.sched_getaffinity(0)))
    data = np.load(a.data)
    cfg = json.loads(str(data["config"]))
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **cfg, rms_norm_eps=1e-6, attention_dropout=0.0))
    model.load_state_dict({k[3:]: torch.from_numpy(np.array(data[k]))
                           for k in data.files if k.startswith("hf.")}, strict=True)
    model.eval()
    ids = torch.from_numpy(np.array(data["ids"])).long()
    mask = torch.ones_like(ids)
    pad = int(data["pad"])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = pad

    def gen():
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=a.new_tokens,
                                  min_new_tokens=a.new_tokens, do_sample=False, use_cache=True,
                                  pad_token_id=pad)
    out = {"plain": _time(gen, a.calls)}
    out["tokens"] = gen()[:, ids.shape[1]:].numpy().tolist()
    out.update({"torch_version": torch.__version__,
                "transformers_version": transformers.__version__,
                "torch_threads": torch.get_num_threads(), "jax_imported": "jax" in sys.modules})
    return out


def child(a) -> None:
    out = _jpeft_child(a) if a.child == "jpeft" else _torch_child(a)
    print("RESULT " + json.dumps(out), flush=True)


def _run_child(runner: str, a, data: str) -> dict:
    which, _, threads = runner.partition(":")
    cmd = [sys.executable, __file__, "--child", which, "--data", data, "--new-tokens",
           str(a.new_tokens), "--calls", str(a.calls), "--threads", threads or "0"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode or not lines:
        raise RuntimeError(f"{which} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# --------------------------------------------------------------------------------------------
# Parts


def _write_data(path: str, name: str, a) -> None:
    """The model's weights (random init, seed 0, exported as a Hugging Face state), its config
    and the prompts, for both frameworks' processes."""
    import numpy as np
    from flax import nnx

    from jpeft.models.llama import LlamaConfig, LlamaForCausalLM, llama_to_hf_state
    cfg = model_config(name)
    module = LlamaForCausalLM(LlamaConfig.from_dict(cfg), rngs=nnx.Rngs(0))
    state = llama_to_hf_state(module)
    if name == "rlhf":
        from jpeft.data.movies import load_movie_reviews
        texts, _ = load_movie_reviews()
        rows = [t.lower().encode("utf-8", "replace") for t in texts if len(t) >= a.prompt]
        ids = np.array([list(r[:a.prompt]) for r in rows[:a.batch]], np.int32)
        pad = 256
    else:
        ids = np.random.default_rng(0).integers(1, cfg["vocab_size"], (a.batch, a.prompt),
                                                dtype=np.int32)
        pad = 0
    np.savez(path, config=json.dumps(cfg), ids=ids, pad=pad,
             **{"hf." + k: v for k, v in state.items()})


def part_generate(name: str, a) -> dict:
    torch_runners = [f"torch:{t}" for t in a.torch_threads.split(",")]
    runners = ["jpeft"] + torch_runners
    per = {r: [] for r in runners}
    with tempfile.TemporaryDirectory() as tmp:
        data = str(pathlib.Path(tmp) / "data.npz")
        _write_data(data, name, a)
        for rep in range(a.reps):
            order = runners[rep % len(runners):] + runners[:rep % len(runners)]
            for r in order:
                res = _run_child(r, a, data)
                per[r].append(res)
                print(f"  [{name}] rep {rep + 1}/{a.reps} {r}: plain "
                      f"{a.batch * a.new_tokens / res['plain']['median_s']:.0f} tokens/s",
                      flush=True)
    toks = a.batch * a.new_tokens
    row = {"part": "generate", "model": name, "batch": a.batch, "prompt": a.prompt,
           "new_tokens": a.new_tokens, "reps": a.reps, "calls": a.calls,
           "base_params": per["jpeft"][0]["base_params"]}
    med = lambda r, k: statistics.median(x[k]["median_s"] for x in per[r])
    row["jpeft_tokens_per_s"] = toks / med("jpeft", "plain")
    row["jpeft_lora_tokens_per_s"] = toks / med("jpeft", "lora")
    row["jpeft_tokens_per_s_per_process"] = [round(toks / x["plain"]["median_s"], 1)
                                             for x in per["jpeft"]]
    for r in torch_runners:
        t = r.partition(":")[2]
        row[f"torch_t{t}_tokens_per_s"] = toks / med(r, "plain")
        row[f"torch_t{t}_tokens_per_s_per_process"] = [
            round(toks / x["plain"]["median_s"], 1) for x in per[r]]
        row[f"jpeft_over_torch_t{t}_speed"] = statistics.median(
            y["plain"]["median_s"] / x["plain"]["median_s"] for x, y in zip(per["jpeft"],
                                                                             per[r]))
    # The comparison: torch at the thread count least favourable to jpeft (on a loaded machine
    # two OpenMP threads can be far slower than one): the smallest of the per-thread-count
    # medians of the per-repetition ratios.
    best = min(torch_runners, key=lambda r: row[f"jpeft_over_torch_t{r.partition(':')[2]}_speed"])
    row["torch_best_threads"] = int(best.partition(":")[2])
    row["torch_tokens_per_s"] = toks / med(best, "plain")
    row["jpeft_over_torch_speed"] = row[f"jpeft_over_torch_t{row['torch_best_threads']}_speed"]
    row["mixed_2b_s"] = med("jpeft", "mixed_2b")
    row["separate_2b_s"] = med("jpeft", "separate_2b")
    row["mixed_over_separate_time"] = row["mixed_2b_s"] / row["separate_2b_s"]
    row["mixed_equals_separate"] = all(x["mixed_equals_separate"] for x in per["jpeft"])
    row["score_mixed_4b_s"] = med("jpeft", "score_mixed")
    row["score_separate_4x_b_s"] = med("jpeft", "score_separate")
    jt, tt = per["jpeft"][0]["tokens"], per[best][0]["tokens"]
    row["tokens_equal_fraction"] = float(sum(a_ == b_ for ra, rb in zip(jt, tt)
                                             for a_, b_ in zip(ra, rb)) / toks)
    row["torch_version"] = per[best][0]["torch_version"]
    row["transformers_version"] = per[best][0]["transformers_version"]
    row["torch_process_imported_jax"] = any(x["jax_imported"] for r in torch_runners
                                            for x in per[r])
    row["target"] = {"check": "jpeft cached generation >= 1.0x transformers' tokens/s",
                     "value": row["jpeft_over_torch_speed"],
                     "passed": row["jpeft_over_torch_speed"] >= 1.0}
    return row


def part_bytes(name: str, a) -> dict:
    """The PPO step of ``name`` compiled from shapes (nothing run), its memory, closed forms."""
    import jax
    import jax.numpy as jnp

    import jpeft
    from jpeft.models.llama import LlamaConfig
    from jpeft.rlhf import generate as gen_lib
    from jpeft.rlhf import models, pipeline
    from jpeft.rlhf import ppo as ppo_lib
    cfg = LlamaConfig.from_dict(model_config(name))
    base = models.build_base(cfg, seed=0)
    method = models.adapter(8, 16.0)
    ppo = ppo_lib.make_ppo(base, method, ppo_lib.PPOConfig(new_tokens=a.new_tokens))
    reward = models.init_scalar(jax.random.key(2), base, method)
    state = ppo_lib.init_state(ppo, jax.random.key(3), reward)
    t = a.prompt + a.new_tokens
    rollout = gen_lib.Rollout(jax.ShapeDtypeStruct((a.batch, t), jnp.int32),
                              jax.ShapeDtypeStruct((a.batch, t), jnp.int32),
                              jax.ShapeDtypeStruct((a.batch, a.new_tokens), jnp.int32))
    exp = jax.eval_shape(ppo.experience, base.params, state.trainable, reward, rollout)
    report = pipeline.memory_report(ppo, base.params, state, exp, reward)
    itemsize = 4
    closed = jpeft.num_params(base.params) * itemsize
    assert closed == report["base_bytes"], (closed, report["base_bytes"])
    return {"part": "bytes", "model": name, "batch": a.batch, "prompt": a.prompt,
            "new_tokens": a.new_tokens, "lora_rank": 8, **report,
            "check_one_base_in_step_arguments": report["step_argument_bytes"]
            < 2 * report["base_bytes"]}


def part_pipeline(a) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "jpeft.rlhf.pipeline", "--stage", "all", "--out",
               str(pathlib.Path(tmp) / "run"), "--results", str(a.pipeline_out)]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT),
                                                           os.environ.get("PYTHONPATH", "")]))
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        print(p.stdout[-6000:], flush=True)
        if p.returncode:
            raise RuntimeError(f"pipeline failed:\n{p.stderr[-4000:]}")
    line = json.loads(pathlib.Path(a.pipeline_out).read_text().splitlines()[-1])
    return {"part": "pipeline", "results_file": str(a.pipeline_out),
            **{f"{s}_{k}": line[s][k] for s in ("ppo", "dpo")
               for k in ("reward_before", "reward_after", "rm_before", "rm_after", "kl_after")},
            "seconds_per_ppo_iteration": line["ppo"]["seconds_per_iteration"],
            "seconds": line["seconds"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--torch-threads", default=",".join(
        str(t) for t in sorted({1, len(os.sched_getaffinity(0))})),
        help="torch's intra-op thread counts, each in processes of its own (default 1 and the "
             "usable cores); the comparison uses the fastest")
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=pathlib.Path, default=OUT)
    ap.add_argument("--pipeline-out", type=pathlib.Path, default=PIPELINE_OUT)
    ap.add_argument("--note", default=None,
                    help="recorded on every row: the conditions of this run, e.g. 'other jobs "
                         "were running: not final' (the load averages are recorded anyway)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    sys.path.insert(0, str(HERE))
    import common
    rows = []
    for part in a.parts.split(","):
        todo = [None] if part == "pipeline" else a.models.split(",")
        for name in todo:
            load = _loadavg()
            t0 = time.perf_counter()
            row = (part_pipeline(a) if part == "pipeline" else
                   part_bytes(name, a) if part == "bytes" else part_generate(name, a))
            row.update({"seconds_part": round(time.perf_counter() - t0, 1),
                        "load_at_start": load, "load_at_end": _loadavg(),
                        **({"note": a.note} if a.note else {}), **common.machine()})
            common.append_jsonl(a.out, row)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if not isinstance(v, (list, dict))
                              or k == "target"}), flush=True)
    return rows


if __name__ == "__main__":
    main()
