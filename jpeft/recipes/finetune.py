"""The one fine-tuning recipe: any method preset (:mod:`jpeft.presets`) on any task, end to end.

:func:`run` reports dev accuracy before fine-tuning, runs the preset's stages (dev accuracy after
those that ask for it), then checks what a user relies on:

1. *reload*: the result is saved (:func:`jpeft.presets.save`: only the delta, with the method's
   config and data, such as FAR's kept columns or a sparse delta's indices, and the preset and its
   options as metadata, and the task's model record, :attr:`Task.model_record`, as ``"model"``:
   what :func:`jpeft.load` checks the base against, e.g. the pooling); the base weights are read
   again from their source, the method is rebuilt from the checkpoint alone
   (:func:`jpeft.presets.load`), the recorded model is checked against the task's
   (:func:`jpeft.saving.check_model`), and

   * the restored delta equals the saved one, leaf for leaf, and so does the method's data;
   * the rebuilt method has the trained method's config, and its ``init`` has the restored delta's
     layout;
   * its dev predictions are identical, bit for bit, to the trained model's;

2. *merge*: the merged model (``method.merge``) predicts the same class for every dev example as the
   unmerged one.

``quantize="nf4"`` or ``"int8"`` (the CLI's ``--quantize``) runs all of it on a quantized base
(QLoRA, :mod:`jpeft.recipes.quantization`): the base is quantized after loading
(:meth:`Task.quantized`) and everything above runs on it as on any base; the checkpoint records the
quantization (metadata ``"base"``), the reload check reads the weights again, quantizes them the
same way and loads the delta onto that quantized base (a checkpoint recorded with another
quantization is an error), and the merge goes into :func:`jpeft.dequantize_params` of the base,
the full-precision weights (a quantized weight cannot take a merge).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Protocol

import jax
import numpy as np

from jpeft import presets, quantized, saving
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.recipes import quantization as quant_lib


class Task(presets.Env, Protocol):
    """A preset's environment plus evaluation and reloading
    (:class:`jpeft.recipes.classification.ClassifierEnv` implements it)."""

    def evaluate(self, method: method_lib.Method | None, params: Any, delta: Any
                 ) -> tuple[np.ndarray, float]:
        """Dev outputs ``[N, C]`` and accuracy; ``method=None`` runs the plain model on
        ``params``."""

    def base_params(self) -> Any:
        """The base weights read again from their source (nothing shared with ``params``)."""

    def one_shape(self) -> "Task":
        """This task with batches of one padded length (:attr:`jpeft.presets.Preset.one_shape`)."""

    #: How ``params`` is stored: ``"none"`` (full precision), ``"nf4"`` or ``"int8"``.
    quantize: str

    #: The base model's record (:func:`jpeft.models.loading.model_record`), saved with the
    #: result; ``None``: not recorded.
    model_record: dict | None

    def quantized(self, scheme: str) -> "Task":
        """This task on its base stored as ``scheme`` (:func:`jpeft.recipes.quantization.prepare`;
        ``base_params`` quantizes the weights it reads the same way); ``"none"``: this task."""


class Outcome(NamedTuple):
    """What :func:`run` did: ``ok`` when every check held (``checks``: name -> held); the final
    ``state`` of the stages (``state["ran"]``: the stages run); the ``checkpoint`` written; dev
    accuracy ``before`` and ``after``."""
    ok: bool
    checks: dict[str, bool]
    state: dict
    checkpoint: Path
    before: float
    after: float


def _merged(task: Task, method: method_lib.Method, delta: Any) -> tuple[np.ndarray, float]:
    """Dev outputs of ``apply(merge(dequantize_params(params), delta))``, the merge jitted and done
    once: into the full-precision base (``params`` itself when nothing is quantized)."""
    merged = jax.jit(lambda p, d: method.merge(quantized.dequantize_params(p), d, task.sites))(
        task.params, delta)
    return task.evaluate(None, merged, None)


def _same_trees(a: Any, b: Any) -> bool:
    fa, fb = paths_lib.flatten(a), paths_lib.flatten(b)
    return fa.keys() == fb.keys() and all(
        np.asarray(fa[p]).dtype == np.asarray(fb[p]).dtype
        and np.array_equal(np.asarray(fa[p]), np.asarray(fb[p])) for p in fa)


def _layout(tree: Any) -> dict:
    return {p: (tuple(np.shape(x)), np.dtype(x.dtype)) for p, x in paths_lib.flatten(tree).items()}


def _normalised(config: Any) -> Any:
    return json.loads(json.dumps(config, default=str))


def check_reload(task: Task, trained: method_lib.Method, dev_logits: np.ndarray, saved: Any,
                 ckpt: Path, log: Callable[[str], None]) -> dict[str, bool]:
    """The reload checks of the module docstring (``saved``: the delta written to ``ckpt``)."""
    loaded = presets.load(ckpt)
    quant_lib.check_recorded(loaded.metadata.get("base"), task.quantize, ckpt)
    saving.check_model(loaded.metadata.get(saving.MODEL_KEY), task.model_record, ckpt)
    base = task.base_params()
    restored_same = (_same_trees(loaded.delta, saved)
                     and _same_trees(loaded.method.data, trained.data))
    same_config = _normalised(loaded.method.config) == _normalised(trained.config)
    fits = _layout(jax.eval_shape(lambda k, p: loaded.method.init(k, p, task.sites),
                                  jax.random.key(0), base)) == _layout(loaded.delta)
    log(f"rebuilt {loaded.preset.name!r} from the checkpoint alone: stored delta identical "
        f"{restored_same}, same method config {same_config}, delta fits the rebuilt method {fits}")
    reloaded, _ = task.evaluate(loaded.method, base, loaded.delta)
    same = bool(np.array_equal(reloaded, dev_logits))
    how = ("" if task.quantize == "none" else
           f" (base quantized {task.quantize} again, as the checkpoint records; the delta loaded "
           f"onto the quantized base)")
    log(f"reloaded base + delta from disk{how}: predictions identical to the trained model: "
        f"{same} (max |logit diff| {np.abs(reloaded - dev_logits).max():.2e})")
    return {"restored": restored_same, "config": same_config, "layout": fits, "reload": same}


def check_merge(task: Task, method: method_lib.Method, delta: Any, dev_logits: np.ndarray,
                log: Callable[[str], None]) -> dict[str, bool]:
    """The merge check of the module docstring (skipped for a method that cannot merge)."""
    if method.merge is None:
        log(f"merge check skipped: {method.name} cannot be merged into the base weights")
        return {}
    merged_logits, merged_acc = _merged(task, method, delta)
    agree = float(np.mean(np.argmax(merged_logits, -1) == np.argmax(dev_logits, -1)))
    into = ("" if task.quantize == "none" else
            f" (merged into jpeft.dequantize_params(params): the {task.quantize} base in full "
            f"precision; a quantized weight cannot take a merge)")
    log(f"merged model{into}: {100 * agree:.2f}% of dev predictions equal to the unmerged model "
        f"(max |logit diff| {np.abs(merged_logits - dev_logits).max():.2e}); "
        f"merged accuracy {100 * merged_acc:.2f}%")
    return {"merge": agree == 1.0}


def check_quantize(preset: presets.Preset | str, scheme: str) -> str:
    """``scheme`` if ``preset`` can train on a base stored that way; a ``ValueError`` naming the
    problem and the way out otherwise (an unknown scheme; a preset whose delta changes the stored
    weights themselves, :attr:`jpeft.presets.Preset.quantized_base`, on a quantized base)."""
    preset = presets.get(preset)
    if quant_lib.check(scheme) != "none" and not preset.quantized_base:
        able = [n for n in presets.names() if presets.get(n).quantized_base]
        raise ValueError(f"preset {preset.name!r} changes the base weights themselves "
                         f"({preset.summary}); a base stored {scheme} cannot take that. Train "
                         f"it on the full-precision base (--quantize none), or choose a preset "
                         f"that adds to the frozen weights: {', '.join(able)}")
    return scheme


def run(preset: presets.Preset | str, task: Task, options: Mapping[str, Any] | None = None, *,
        out: str | Path, quantize: str = "none") -> Outcome:
    """Fine-tune with ``preset`` (``options`` over its defaults) on ``task``, its base stored as
    ``quantize`` (``"none"``, ``"nf4"``, ``"int8"``); save the result under ``out/delta`` and run
    the checks of the module docstring.

    Raises:
      ValueError: an unknown preset, option or quantization scheme, or a preset that cannot train
        on a quantized base (:func:`check_quantize`), before anything runs.
    """
    preset = presets.get(preset)
    options = presets.resolve(preset, options)
    stages = preset.stages(options)
    check_quantize(preset, quantize)
    if preset.one_shape:
        task = task.one_shape()
    task = task.quantized(quantize)
    log = task.log
    log(f"preset {preset.name}: {preset.summary}; stages {', '.join(s.name for s in stages)}")
    log(f"options: {json.dumps(options)}")
    stored = quant_lib.num_bytes(task.params)
    log(stored.line(task.quantize))

    _, before = task.evaluate(None, task.params, None)
    log(f"dev accuracy before fine-tuning: {100 * before:.2f}%")

    def after(stage: presets.Stage, state: dict) -> None:
        if stage.name == stages[-1].name or not stage.evaluate:
            return
        merged = preset.merged_eval and state["method"].merge is not None
        evaluate = _merged if merged else (lambda t, m, d: t.evaluate(m, t.params, d))
        _, acc = evaluate(task, state["method"], state["delta"])
        log(f"[{stage.name}] dev accuracy{' (merged)' if merged else ''}: {100 * acc:.2f}%")

    state = presets.run_stages(preset, task, options, after=after)
    method, delta = state["method"], state["delta"]
    log(f"method config: {json.dumps(method.config, default=str)}")
    dev_logits, acc = task.evaluate(method, task.params, delta)
    trained = sum(s.steps for s in stages if isinstance(s, presets.Fit))
    log(f"dev accuracy after fine-tuning ({', '.join(state['ran'])}; {trained} steps): "
        f"{100 * acc:.2f}% (before: {100 * before:.2f}%); stages took "
        + ", ".join(f"{n} {t:.1f} s" for n, t in state["seconds"].items()))

    recorded = {} if task.model_record is None else {saving.MODEL_KEY: task.model_record}
    ckpt = presets.save(Path(out).absolute() / "delta", preset, options, state, task.sites,
                        extra={"base": quant_lib.config(task.quantize), **recorded})
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    log(f"saved the delta (only the delta: {size / 1e6:.2f} MB on disk; base weights "
        f"{stored.stored / 1e6:.1f} MB stored, quantize {task.quantize}) to {ckpt}")
    checks = check_reload(task, method, dev_logits, delta, ckpt, log)
    checks.update(check_merge(task, method, delta, dev_logits, log))
    ok = all(checks.values())
    if not ok:
        log(f"FAILED checks: {', '.join(k for k, v in checks.items() if not v)}")
    return Outcome(ok, checks, state, ckpt, before, acc)
