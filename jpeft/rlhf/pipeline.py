"""RLHF end to end on one base, in stages: ``sft``, ``reward``, ``ppo``, ``dpo`` (or ``all``).

``main(argv)`` is the command line (to be wired as ``jpeft rlhf --stage ...``)::

    python -m jpeft.rlhf.pipeline --stage all --out runs/rlhf
    python -m jpeft.rlhf.pipeline --stage ppo --out runs/rlhf --ppo-iterations 60

Every stage reads what the earlier ones wrote to the run folder ``--out`` and writes its own
(deltas with :func:`jpeft.save`, so each one is loaded back by name and checked against the base):

========  ========================================================  ================================
stage     does                                                       writes
========  ========================================================  ================================
sft       the base decoder (the decoder example's: trained in full   ``run.json``, ``base/``,
          on the negative movie-review sentences), then a LoRA on    ``sft/``
          it trained on the positive sentences (causal-LM loss)
reward    the sentiment classifier (MiniLM + LoRA, trained with      ``classifier/``, ``pairs.npz``,
          jpeft), preference pairs (two sampled continuations per    ``reward/lora/``,
          prompt, the higher-scored chosen), the reward model        ``reward/head/``
          (base + LoRA + scalar head, pairwise loss)
ppo       PPO: actor, critic, reference and reward on one base;      ``ppo/actor/``,
          held-out mean reward and KL before and after; the PPO      ``ppo/critic/...``
          step's memory against four full copies
dpo       DPO (``--dpo-loss sigmoid`` or ``ipo``) on the same pairs; ``dpo/``
          held-out mean reward and KL before and after
========  ========================================================  ================================

From ``reward`` on, *the base* is the decoder with the SFT LoRA merged (:func:`jpeft.rlhf.sft.
merged`): the reference of PPO and DPO, one copy. Each invocation appends one results line (JSON)
to ``--results`` (default ``<out>/results.jsonl``): per stage its numbers, and for ``ppo``/``dpo``
``reward_before``/``reward_after`` (classifier's positive probability), ``rm_before``/``rm_after``
(reward-model score), ``kl_after`` (per token, to the reference) and ``seconds_per_iteration``.

The model and data settings (``MODEL_KEYS``) are fixed by the first stage that runs (saved in
``run.json``); later stages take them from there. The defaults run all four stages in a few
minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

STAGES = ("sft", "reward", "ppo", "dpo")

#: Settings that define the base model and the data: fixed per run folder (``run.json``).
MODEL_KEYS = ("seed", "length", "prompt_length", "prompt_words", "new_tokens", "hidden_size",
              "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "rank", "alpha",
              "classifier_seq", "temperature", "reward_pooling")

DEFAULTS: dict[str, Any] = {
    # model and data (MODEL_KEYS)
    "seed": 0, "length": 48, "prompt_length": 16, "prompt_words": 3, "new_tokens": 24,
    "hidden_size": 64, "intermediate_size": 128, "num_layers": 2, "num_heads": 4,
    "num_kv_heads": 2, "rank": 8, "alpha": 16.0, "classifier_seq": 32, "temperature": 1.0,
    "reward_pooling": "mean",
    # sft
    "base_steps": 300, "base_lr": 3e-3, "sft_steps": 200, "sft_lr": 5e-3, "batch": 32,
    # reward
    "classifier_steps": 150, "classifier_train": 0, "classifier_dev": 512,
    "pair_prompts": 2048, "min_gap": 0.1, "reward_steps": 100, "reward_lr": 1e-3,
    "reward_eval": 0.1,
    # ppo
    "ppo_iterations": 40, "ppo_batch": 32, "ppo_epochs": 4, "ppo_minibatches": 1,
    "ppo_lr": 1e-3, "kl_coef": 0.05, "vf_coef": 0.1, "mixed": 0,
    # dpo
    "dpo_steps": 70, "dpo_beta": 0.1, "dpo_loss": "sigmoid", "dpo_lr": 1e-3,
    # evaluation
    "eval_prompts": 256,
}


# --------------------------------------------------------------------------------------------
# The run folder


class Run:
    """The run folder and its settings (``run.json``: the model keys fixed by the first stage)."""

    def __init__(self, out: str | os.PathLike, settings: dict, given: set[str],
                 log: Callable[[str], None] = print):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = log
        saved_path = self.out / "run.json"
        self.settings = dict(settings)
        if saved_path.is_file():
            saved = json.loads(saved_path.read_text())
            clash = {k: (saved[k], settings[k]) for k in MODEL_KEYS
                     if k in given and k in saved and saved[k] != settings[k]}
            if clash:
                raise SystemExit(f"rlhf: {self.out} was made with other model settings: "
                                 + ", ".join(f"--{k.replace('_', '-')} {a!r} (given {b!r})"
                                             for k, (a, b) in clash.items())
                                 + "; use another --out or leave them out")
            self.settings.update({k: saved[k] for k in MODEL_KEYS if k in saved})
        else:
            saved_path.write_text(json.dumps({k: self.settings[k] for k in MODEL_KEYS},
                                             indent=1))
        self._data = None

    def path(self, *parts: str) -> Path:
        return self.out.joinpath(*parts)

    def need(self, *parts: str, stage: str) -> Path:
        """``out/parts``, or a clear error naming the stage that writes it."""
        p = self.path(*parts)
        if not p.exists():
            raise SystemExit(f"rlhf: {p} is missing; run --stage {stage} first (same --out)")
        return p

    # ---- data -------------------------------------------------------------------------------

    def data(self) -> dict:
        """Sentences of the movie reviews (seeded 90/10 split): ``neg``, ``pos`` (training split)
        and ``pool`` (all training sentences, shuffled: the prompt pool), ``held_out`` (the dev
        split: held-out prompts)."""
        if self._data is None:
            import numpy as np
            from jpeft.data.movies import load_movie_reviews, train_dev_split
            seed = self.settings["seed"]
            (tr_x, tr_y), (dev_x, _) = train_dev_split(*load_movie_reviews(), 0.1, seed=seed)
            pool = [tr_x[i] for i in np.random.default_rng(seed + 7).permutation(len(tr_x))]
            self._data = {"neg": [t for t, y in zip(tr_x, tr_y) if y == 0],
                          "pos": [t for t, y in zip(tr_x, tr_y) if y == 1],
                          "pool": pool, "held_out": list(dev_x)}
        return self._data

    def prompts(self, sentences: Sequence[str]):
        from jpeft.rlhf import generate as gen_lib
        s = self.settings
        texts = gen_lib.prompts_of(sentences, words=s["prompt_words"], length=s["prompt_length"])
        return gen_lib.left_pad(texts, s["prompt_length"])

    def held_out_prompts(self):
        return self.prompts(self.data()["held_out"][:self.settings["eval_prompts"]])

    # ---- models -----------------------------------------------------------------------------

    def config(self):
        from jpeft.rlhf import models
        s = self.settings
        return models.decoder_config(
            max(s["length"], s["prompt_length"] + s["new_tokens"]) + 8,
            hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
            num_layers=s["num_layers"], num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"])

    def record(self) -> dict:
        """The decoder's model record, saved with every delta on it."""
        c = self.config()
        return {"loader": "jpeft.rlhf.models.decoder_config", "vocab_size": c.vocab_size,
                "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_hidden_layers,
                "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads,
                "max_position_embeddings": c.max_position_embeddings}

    def adapter(self):
        from jpeft.rlhf import models
        return models.adapter(self.settings["rank"], self.settings["alpha"])

    def save(self, name: str, method, delta) -> None:
        import jpeft
        jpeft.save(self.path(name), method, delta, model=self.record(), overwrite=True)

    def load(self, name: str, params, sites, stage: str):
        import jpeft
        return jpeft.load(self.need(name, stage=stage), params, sites, model=self.record()).delta

    def save_scalar(self, name: str, delta: dict) -> None:
        """A scalar model's delta: its LoRA (``name/lora``) and its head (``name/head``, as a
        ``full_finetune`` delta of the head tree)."""
        import jpeft
        self.save(f"{name}/lora", self.adapter(), delta["lora"])
        jpeft.save(self.path(name, "head"), jpeft.full_finetune(), delta["head"],
                   model=self.record(), overwrite=True)

    def load_scalar(self, name: str, base, stage: str) -> dict:
        import jax
        import jpeft
        from jpeft.rlhf import models
        template = models.init_head(jax.random.key(0), base.config.hidden_size)
        head = jpeft.load(self.need(name, "head", stage=stage), template,
                          model=self.record()).delta
        return {"lora": self.load(f"{name}/lora", base.params, base.sites, stage), "head": head}

    def raw_base(self):
        """The decoder base (trained in full; ``base/``)."""
        import jpeft
        from jpeft.rlhf import models
        fresh = models.build_base(self.config(), seed=self.settings["seed"])
        saved = jpeft.load(self.need("base", stage="sft"), fresh.params, model=self.record())
        return fresh._replace(params=saved.method.merge(fresh.params, saved.delta))

    def rlhf_base(self):
        """The base of the RLHF steps: the decoder with the SFT LoRA merged."""
        from jpeft.rlhf import sft
        base = self.raw_base()
        method = self.adapter()
        return sft.merged(base, method, self.load("sft", base.params, base.sites, "sft"))

    def classifier(self):
        from jpeft.rlhf import preferences
        return preferences.load_classifier(self.need("classifier", stage="reward"),
                                           seq=self.settings["classifier_seq"])


# --------------------------------------------------------------------------------------------
# Stages


def stage_sft(run: Run) -> dict:
    """The base decoder (trained in full on negative sentences) and the SFT LoRA (positive)."""
    import jax
    import jpeft
    from jpeft.recipes.decoder import encode
    from jpeft.rlhf import models, sft
    s, log = run.settings, run.log
    data = run.data()
    neg_ids, neg_mask = encode(data["neg"], s["length"])
    pos_ids, pos_mask = encode(data["pos"], s["length"])
    dev_ids, dev_mask = encode(data["held_out"][:256], s["length"])
    t0 = time.perf_counter()
    base = models.build_base(run.config(), seed=s["seed"])
    params, fit = sft.pretrain(base, neg_ids, neg_mask, steps=s["base_steps"], lr=s["base_lr"],
                               batch=s["batch"], seed=s["seed"])
    jpeft.save(run.path("base"), jpeft.full_finetune(), params, model=run.record(),
               overwrite=True)
    base = base._replace(params=params)
    log(f"base decoder: {jpeft.num_params(params):,} parameters trained in full for "
        f"{s['base_steps']} steps on {len(neg_ids)} negative sentences (loss "
        f"{fit.losses[0]:.3f} -> {fit.losses[-1]:.3f})")
    method = run.adapter()
    delta = method.init(jax.random.key(s["seed"] + 1), base.params, base.sites)
    fit = sft.train(base, method, delta, pos_ids, pos_mask, steps=s["sft_steps"],
                    lr=s["sft_lr"], batch=s["batch"], seed=s["seed"] + 1)
    run.save("sft", method, fit.delta)
    before = sft.eval_loss(base, None, None, dev_ids, dev_mask)
    after = sft.eval_loss(base, method, fit.delta, dev_ids, dev_mask)
    log(f"sft: LoRA r={s['rank']} ({jpeft.num_params(fit.delta):,} parameters), "
        f"{s['sft_steps']} steps on {len(pos_ids)} positive sentences; held-out loss per byte "
        f"{before:.3f} (base) -> {after:.3f} (SFT)")
    return {"base_params": jpeft.num_params(params), "sft_params": jpeft.num_params(fit.delta),
            "heldout_loss_base": before, "heldout_loss_sft": after,
            "seconds": time.perf_counter() - t0}


def stage_reward(run: Run) -> dict:
    """The classifier, the preference pairs and the reward model."""
    import jax
    import numpy as np
    import jpeft
    from jpeft.rlhf import generate as gen_lib
    from jpeft.rlhf import models, preferences, reward
    s, log = run.settings, run.log
    t0 = time.perf_counter()
    if run.path("classifier").exists():
        classifier = run.classifier()
        log(f"sentiment classifier: read from {run.path('classifier')} (dev accuracy "
            f"{classifier.accuracy:.3f})")
    else:
        classifier = preferences.train_classifier(
            steps=s["classifier_steps"], batch=s["batch"], seq=s["classifier_seq"],
            train_examples=s["classifier_train"] or None, dev_examples=s["classifier_dev"],
            seed=s["seed"], log=log)
        preferences.save_classifier(run.path("classifier"), classifier)
    base = run.rlhf_base()
    pool = run.data()["pool"]
    ids, mask = run.prompts(pool[:s["pair_prompts"]])
    gen = gen_lib.make_generator(base, None, new_tokens=s["new_tokens"],
                                 temperature=s["temperature"])
    pairs, summary = preferences.make_pairs(
        gen, base.params, ids, mask,
        lambda texts: preferences.positive_probability(classifier, texts),
        jax.random.key(s["seed"] + 11), min_gap=s["min_gap"], chunk=min(128, len(ids)))
    if len(pairs) < 4:
        raise SystemExit(f"rlhf: only {len(pairs)} preference pairs kept of {len(ids)} prompts "
                         f"(--min-gap {s['min_gap']}); lower it or raise --pair-prompts")
    preferences.save_pairs(run.path("pairs.npz"), pairs)
    log(f"pairs: {summary['kept']} of {summary['prompts']} prompts kept (score gap >= "
        f"{s['min_gap']}), mean positive probability {summary['mean_score']:.3f}, mean gap "
        f"{summary['mean_gap']:.3f}")
    n_eval = max(2, int(round(s["reward_eval"] * len(pairs))))
    train_pairs = pairs.take(np.arange(n_eval, len(pairs)))
    eval_pairs = pairs.take(np.arange(n_eval))
    method = run.adapter()
    delta = models.init_scalar(jax.random.key(s["seed"] + 2), base, method)
    pooling = s["reward_pooling"]
    before = reward.evaluate(base, method, delta, eval_pairs, pooling=pooling)
    fit = reward.train(base, method, delta, train_pairs, steps=s["reward_steps"],
                       batch=s["batch"], lr=s["reward_lr"], seed=s["seed"] + 2, pooling=pooling)
    after = reward.evaluate(base, method, fit.delta, eval_pairs, pooling=pooling)
    run.save_scalar("reward", fit.delta)
    log(f"reward model: base + LoRA + head ({jpeft.num_params(fit.delta):,} parameters), "
        f"{s['reward_steps']} steps on {len(train_pairs)} pairs; held-out pairs "
        f"({after['pairs']}): loss {before['loss']:.3f} -> {after['loss']:.3f}, accuracy "
        f"{before['accuracy']:.3f} -> {after['accuracy']:.3f}")
    return {"classifier_accuracy": classifier.accuracy, **{f"pairs_{k}": v for k, v in
                                                            summary.items()},
            "reward_loss_before": before["loss"], "reward_loss_after": after["loss"],
            "reward_accuracy_before": before["accuracy"],
            "reward_accuracy_after": after["accuracy"],
            "reward_loss_train_first": fit.losses[0], "reward_loss_train_last": fit.losses[-1],
            "seconds": time.perf_counter() - t0}


def _evaluate(run: Run, base, name: str, delta, reward_delta, classifier) -> dict:
    """Reference (= before) and ``name`` (= after) on the held-out prompts, generated together."""
    import jax
    from jpeft.rlhf import evaluate as eval_lib
    from jpeft.rlhf import preferences
    s = run.settings
    ids, mask = run.held_out_prompts()
    evaluator = eval_lib.Evaluator(base, run.adapter(), (name,), new_tokens=s["new_tokens"],
                                   temperature=s["temperature"],
                                   reward_pooling=s["reward_pooling"])
    res = eval_lib.evaluate(
        evaluator, base.params, {"reference": None, name: delta}, ids, mask,
        jax.random.key(s["seed"] + 99),
        classifier_score=lambda t: preferences.positive_probability(classifier, t),
        reward=reward_delta, chunk=min(64, len(ids)))
    ref, after = res["reference"], res[name]
    run.log(f"{name}: held-out prompts ({len(ids)}): classifier P(positive) "
            f"{ref['positive']:.3f} -> {after['positive']:.3f}, reward model "
            f"{ref['reward']:.3f} -> {after['reward']:.3f}, KL to the reference per token "
            f"{after['kl_per_token']:.4f}")
    for p, a in zip(ref["samples"], after["samples"]):
        run.log(f"  reference: {p!r}\n  {name + ':':10} {a!r}")
    return {"reward_before": ref["positive"], "reward_after": after["positive"],
            "rm_before": ref["reward"], "rm_after": after["reward"],
            "kl_before": ref["kl_per_token"], "kl_after": after["kl_per_token"],
            "eval_prompts": len(ids), "samples_after": after["samples"]}


def memory_report(ppo_obj, params, state, exp, reward_delta) -> dict:
    """The PPO step's compiled memory and the closed forms: one base + three deltas + the
    optimizer state against four full copies of the model."""
    import jpeft
    from jpeft.rlhf import ppo as ppo_lib
    mem = ppo_lib.step_memory(ppo_obj, params, state, exp)
    base_bytes = jpeft.num_bytes(params)
    deltas = {"actor": state.trainable["actor"], "critic": state.trainable["critic"],
              "reward": reward_delta}
    delta_bytes = {k: jpeft.num_bytes(v) for k, v in deltas.items()}
    opt_bytes = jpeft.num_bytes(state.opt_state)
    one_base = base_bytes + sum(delta_bytes.values()) + opt_bytes
    four = 4 * base_bytes
    return {"base_params": jpeft.num_params(params), "base_bytes": base_bytes,
            **{f"{k}_delta_params": jpeft.num_params(v) for k, v in deltas.items()},
            **{f"{k}_delta_bytes": v for k, v in delta_bytes.items()},
            "opt_state_bytes": opt_bytes, "one_base_total_bytes": one_base,
            "four_copies_bytes": four,
            # full RLHF as DeepSpeed-Chat without LoRA: four models + Adam's two moments of the
            # two trained ones (actor and critic)
            "four_copies_with_adam_bytes": four + 2 * 2 * base_bytes,
            "one_base_over_four_copies": one_base / four,
            **{f"step_{k}": v for k, v in mem.items()}}


def stage_ppo(run: Run) -> dict:
    """PPO on one base, evaluated before and after, with the step's memory."""
    import jax
    import numpy as np
    from jpeft.rlhf import ppo as ppo_lib
    s, log = run.settings, run.log
    t0 = time.perf_counter()
    base = run.rlhf_base()
    reward_delta = run.load_scalar("reward", base, "reward")
    classifier = run.classifier()
    method = run.adapter()
    config = ppo_lib.PPOConfig(new_tokens=s["new_tokens"], temperature=s["temperature"],
                               ppo_epochs=s["ppo_epochs"], minibatches=s["ppo_minibatches"],
                               lr=s["ppo_lr"], kl_coef=s["kl_coef"], vf_coef=s["vf_coef"],
                               mixed=bool(s["mixed"]), reward_pooling=s["reward_pooling"])
    ppo = ppo_lib.make_ppo(base, method, config)
    state = ppo_lib.init_state(ppo, jax.random.key(s["seed"] + 3), reward_delta)
    pool = run.data()["pool"]
    # PPO's prompts: the pool past the reward model's pair prompts (all of it if that is empty)
    ids, mask = run.prompts(pool[s["pair_prompts"]:] or pool)
    if len(ids) < s["ppo_batch"]:
        raise SystemExit(f"rlhf: {len(ids)} prompts for PPO batches of {s['ppo_batch']}")
    rng = np.random.default_rng(s["seed"] + 4)
    times, history, exp = [], [], None
    for it in range(s["ppo_iterations"]):
        rows = rng.choice(len(ids), s["ppo_batch"], replace=False)
        t = time.perf_counter()
        state, exp, m = ppo_lib.iteration(ppo, base.params, state, reward_delta, ids[rows],
                                          mask[rows], jax.random.key(1000 + it), seed=it)
        times.append(time.perf_counter() - t)
        history.append(m)
        if it % max(1, s["ppo_iterations"] // 8) == 0 or it == s["ppo_iterations"] - 1:
            log(f"ppo iteration {it + 1}/{s['ppo_iterations']}: reward-model score "
                f"{m['score']:.3f}, KL/token {m['kl']:.4f}, pg {m['pg_loss']:.4f}, vf "
                f"{m['vf_loss']:.4f}, clipfrac {m['pg_clipfrac']:.3f} ({times[-1]:.2f} s)")
    run.save("ppo/actor", method, state.trainable["actor"])
    run.save_scalar("ppo/critic", state.trainable["critic"])
    per_iteration = statistics.median(times[1:]) if len(times) > 1 else times[0]
    memory = memory_report(ppo, base.params, state, exp, reward_delta)
    deltas = sum(memory[f"{k}_delta_bytes"] for k in ("actor", "critic", "reward"))
    log(f"ppo memory: base {memory['base_bytes']:,} B + deltas {deltas:,} B + optimizer state "
        f"{memory['opt_state_bytes']:,} B = {memory['one_base_total_bytes']:,} B against four "
        f"full copies {memory['four_copies_bytes']:,} B "
        f"({memory['one_base_over_four_copies']:.2f}x); "
        f"compiled step: arguments {memory['step_argument_bytes']:,} B, temporaries "
        f"{memory['step_temp_bytes']:,} B")
    evaluation = _evaluate(run, base, "ppo", state.trainable["actor"], reward_delta, classifier)
    log(f"ppo: {s['ppo_iterations']} iterations of {s['ppo_batch']} rollouts, "
        f"{per_iteration:.3f} s per iteration (median after the first; the first, compiling: "
        f"{times[0]:.1f} s)")
    return {**evaluation, "seconds_per_iteration": per_iteration,
            "first_iteration_seconds": times[0], "iterations": s["ppo_iterations"],
            "score_first": history[0]["score"], "score_last": history[-1]["score"],
            "train_kl_last": history[-1]["kl"], "memory": memory,
            "seconds": time.perf_counter() - t0}


def stage_dpo(run: Run) -> dict:
    """DPO (or IPO) on the pairs, evaluated before and after."""
    import jax
    from jpeft.rlhf import dpo as dpo_lib
    from jpeft.rlhf import preferences
    s, log = run.settings, run.log
    t0 = time.perf_counter()
    base = run.rlhf_base()
    pairs = preferences.load_pairs(run.need("pairs.npz", stage="reward"))
    classifier = run.classifier()
    reward_delta = (run.load_scalar("reward", base, "reward")
                    if run.path("reward", "head").exists() else None)
    method = run.adapter()
    config = dpo_lib.DPOConfig(beta=s["dpo_beta"], loss_type=s["dpo_loss"], steps=s["dpo_steps"],
                               batch=s["batch"], lr=s["dpo_lr"], seed=s["seed"] + 5)
    delta = method.init(jax.random.key(s["seed"] + 6), base.params, base.sites)
    fit = dpo_lib.train(base, method, delta, pairs, config)
    run.save("dpo", method, fit.delta)
    log(f"dpo ({s['dpo_loss']}, beta {s['dpo_beta']}): {s['dpo_steps']} steps on {len(pairs)} "
        f"pairs, loss {fit.losses[0]:.4f} -> {fit.losses[-1]:.4f}, implicit-reward accuracy "
        f"{fit.accuracies[-1]:.3f}")
    evaluation = _evaluate(run, base, "dpo", fit.delta, reward_delta, classifier)
    return {**evaluation, "loss_type": s["dpo_loss"], "loss_first": fit.losses[0],
            "loss_last": fit.losses[-1], "seconds": time.perf_counter() - t0}


STAGE_FUNCTIONS = {"sft": stage_sft, "reward": stage_reward, "ppo": stage_ppo, "dpo": stage_dpo}


# --------------------------------------------------------------------------------------------
# Command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jpeft rlhf", description="RLHF on one base (SFT, reward model, PPO, DPO) with "
        "LoRA deltas on the byte-level decoder; the run folder keeps each stage's output.")
    p.add_argument("--stage", choices=STAGES + ("all",), default="all")
    p.add_argument("--out", default="runs/rlhf", help="the run folder (default runs/rlhf)")
    p.add_argument("--results", default=None,
                   help="append the results line here (default <out>/results.jsonl)")
    for key, default in DEFAULTS.items():
        kind = type(default)
        p.add_argument("--" + key.replace("_", "-"), type=kind, default=None,
                       choices={"dpo_loss": ("sigmoid", "ipo"),
                                "reward_pooling": ("last", "mean")}.get(key),
                       help=f"default {default}" + (" (fixed per run folder)"
                                                     if key in MODEL_KEYS else ""))
    return p


def run_stages(stages: Sequence[str], out: str | os.PathLike, settings: dict | None = None, *,
               results: str | os.PathLike | None = None,
               log: Callable[[str], None] = print) -> dict:
    """Run ``stages`` (in :data:`STAGES` order) in the run folder ``out`` with ``settings``
    (overrides of :data:`DEFAULTS`); append and return the results line."""
    given = set(settings or {})
    unknown = given - set(DEFAULTS)
    if unknown:
        raise ValueError(f"run_stages: unknown settings {sorted(unknown)}")
    run = Run(out, {**DEFAULTS, **(settings or {})}, given, log)
    line: dict[str, Any] = {"stages": list(stages), "out": str(run.out),
                            "settings": run.settings, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
                            "load_at_start": _loadavg()}
    t0 = time.perf_counter()
    for stage in STAGES:
        if stage in stages:
            log(f"== stage {stage}")
            line[stage] = STAGE_FUNCTIONS[stage](run)
    line["seconds"] = time.perf_counter() - t0
    line["load_at_end"] = _loadavg()
    for stage in ("ppo", "dpo"):
        if stage in line:
            r = line[stage]
            log(f"results {stage}: reward (P positive) {r['reward_before']:.3f} -> "
                f"{r['reward_after']:.3f}, reward model {r['rm_before']:.3f} -> "
                f"{r['rm_after']:.3f}, KL/token {r['kl_after']:.4f}"
                + (f", {r['seconds_per_iteration']:.3f} s per PPO iteration"
                   if stage == "ppo" else ""))
    path = Path(results) if results is not None else run.path("results.jsonl")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(line, default=str) + "\n")
    return line


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """``jpeft rlhf --stage sft|reward|ppo|dpo|all --out DIR [--results FILE] [settings]``."""
    args = parser().parse_args(argv)
    settings = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k) is not None}
    stages = STAGES if args.stage == "all" else (args.stage,)
    run_stages(stages, args.out, settings, results=args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
