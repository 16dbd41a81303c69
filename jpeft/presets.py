"""Named method presets: one registry read by the CLI, the demo recipe, tests and benchmarks.

A :class:`Preset` is a method with the training hyper-parameters that go with it (its ``defaults``,
e.g. rank, learning rate, FAR's kept fraction) and the *stages* that produce a trained delta from
them. Most methods are one :class:`Fit`; multi-stage methods declare the steps between fits as
:class:`Compute` stages, so one runner trains every method::

    preset  = presets.get("far")
    options = presets.resolve(preset, {"fraction": 0.1, "steps": 100})
    state   = presets.run_stages(preset, env, options)   # state["method"], state["delta"]
    presets.save("ckpt", preset, options, state, env.sites)
    loaded  = presets.load("ckpt")                       # the method rebuilt from disk alone

Stages read and return a *state* (a dict): ``"head"`` (the head modules trained alongside, from
the env) to start with; each :class:`Fit` writes the ``"method"`` it trained and the trained
``"delta"``; a :class:`Compute` stage adds what it computes (FAR's ``"columns"``, the sparse
methods' ``"indices"``). The last stage is always a :class:`Fit`. :func:`save` writes its method
and delta with :func:`jpeft.save` (the method's config and data, e.g. FAR's columns or a sparse
delta's indices, next to the delta) plus the preset, its options and the preset's extra
``metadata``; :func:`load` rebuilds the method from that checkpoint alone
(:func:`jpeft.methods.from_config`).

Stages reach the task only through an :class:`Env`: the base ``params`` and ``sites``, the ``head``
modules, ``fit`` (the training loop), labelled ``examples`` and their ``log_likelihood`` (for the
Fisher information) and ``log``. :mod:`jpeft.recipes.classification` implements it for a sequence
classifier (the CLI's default task, the tests' tiny BERT); ``benchmarks/step_cost.py`` implements it
on one synthetic batch.
"""

from __future__ import annotations

import json
import math
import time
import types
from pathlib import Path
from typing import Any, Callable, Mapping, NamedTuple, Protocol, Union

import jax
import numpy as np
import optax

from jpeft import saving
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib
from jpeft.core import sparse as sparse_lib
from jpeft.core import train as train_lib
from jpeft.core import tree as tree_lib
from jpeft.methods import adalora as adalora_lib
from jpeft.methods import diff_pruning as dp
from jpeft.methods import far as far_lib
from jpeft.methods import fishmask as fm
from jpeft.methods import intrinsic
from jpeft.methods.bitfit import bitfit
from jpeft.methods.full import full_finetune
from jpeft.methods.lora import lora

State = dict[str, Any]
Options = Mapping[str, Any]


# --------------------------------------------------------------------------------------------
# The environment a preset runs in


class Env(Protocol):
    """What the stages of a preset need from the task.

    Attributes:
      params: the frozen base tree (for linen, ``{"params": ...}``).
      sites: its contraction sites (:func:`jpeft.probe`).
      head: the head modules trained in full alongside the method (``("classifier",)``), excluded
        from what the method itself selects.
    """
    params: Any
    sites: Any
    head: tuple[str, ...]

    def fit(self, method: method_lib.Method, delta: Any, *, steps: int,
            optimizer: optax.GradientTransformation, mode: str, seed: int) -> Any:
        """Train ``delta`` for ``steps`` steps (the method's penalty and optimizer wrapper folded
        in, :func:`jpeft.make_train_step`); a result with ``.delta`` and ``.seconds``."""

    def examples(self, n: int, seed: int) -> Any:
        """``n`` labelled training examples, a pytree with a leading example axis (for the
        Fisher information)."""

    def log_likelihood(self, params: Any, example: Any) -> jax.Array:
        """``log p(y | x; params)`` of one example (no batch axis) under its true label,
        deterministic."""

    def log(self, message: str) -> None:
        """Report progress."""


# --------------------------------------------------------------------------------------------
# Stages


class Fit(NamedTuple):
    """A training stage: ``method(state)`` trained from ``start`` for ``steps`` steps.

    Afterwards the state holds ``"method"`` and the trained ``"delta"``. ``steps = 0`` trains
    nothing (the state gets the method and its starting delta).

    Attributes:
      name: the stage's name (unique within a preset).
      doc: one line: what the stage trains.
      method: ``state -> Method``, built from the state so far (and the options the stage was
        made with); for the last stage also the rebuild of a saved result (:func:`load`).
      steps, lr, head_lr: training length and peak learning rates (``head_lr`` for the ``head``
        part of a composed method; ``None`` when there is none).
      start: ``(state, method, env) -> delta`` to start from; ``None``:
        ``method.init(jax.random.key(seed), env.params, env.sites)``.
      optimizer: ``method -> optax transformation``; ``None``: :func:`default_optimizer`.
      mode: forward mode of training (``"factored"`` or ``"materialised"``, see
        :class:`jpeft.Context`).
      seed: data order and, by default, the initialisation key.
      evaluate: the recipe reports dev accuracy after this stage (the last stage always).
      report: ``(state, env) -> str`` logged after training (e.g. AdaLoRA's final ranks).
    """
    name: str
    doc: str
    method: Callable[[State], method_lib.Method]
    steps: int
    lr: float
    head_lr: float | None = None
    start: Callable[[State, method_lib.Method, Env], Any] | None = None
    optimizer: Callable[[method_lib.Method], optax.GradientTransformation] | None = None
    mode: str = "factored"
    seed: int = 0
    evaluate: bool = True
    report: Callable[[State, Env], str] | None = None


class Compute(NamedTuple):
    """A step between fits: ``run(state, env) -> updates``, merged into the state (FAR's column
    scoring and selection, FishMask's Fisher pass and mask, diff pruning's projection).

    ``evaluate``: the recipe reports dev accuracy after it (the stage then sets ``"method"`` and
    ``"delta"``)."""
    name: str
    doc: str
    run: Callable[[State, Env], State]
    evaluate: bool = False


Stage = Union[Fit, Compute]


def warmup_cosine(peak: float, steps: int) -> optax.Schedule:
    """10% linear warm-up from 0 to ``peak`` (at least one step), then cosine decay to 0 at
    ``steps``; a single step runs at ``peak``."""
    if steps < 2:
        return optax.constant_schedule(peak)
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, steps // 10), steps)


def default_optimizer(method: method_lib.Method, steps: int, lr: float,
                      head_lr: float | None = None) -> optax.GradientTransformation:
    """AdamW without weight decay on :func:`warmup_cosine`; the ``head`` part of a composed method
    gets ``head_lr`` (when given), every other part ``lr``."""
    adamw = lambda peak: optax.adamw(warmup_cosine(peak, steps), weight_decay=0.0)
    parts = method.config.get("compose", {})
    if not parts:
        return adamw(lr)
    return train_lib.partition(
        {n: adamw(head_lr if (n == "head" and head_lr) else lr) for n in parts}, method)


def start_delta(fit: Fit, state: State, method: method_lib.Method, env: Env) -> Any:
    """The delta ``fit`` starts from (``fit.start``, or ``method.init`` with key ``fit.seed``)."""
    if fit.start is not None:
        return fit.start(state, method, env)
    return method.init(jax.random.key(fit.seed), env.params, env.sites)


def run_stage(stage: Stage, state: State, env: Env) -> State:
    """One stage: the new state (``"ran"`` and ``"seconds"`` record the stages run)."""
    t0 = time.perf_counter()
    if isinstance(stage, Compute):
        env.log(f"[{stage.name}] {stage.doc}")
        updates = dict(stage.run(state, env))
    else:
        method = stage.method(state)
        delta = start_delta(stage, state, method, env)
        env.log(f"[{stage.name}] {stage.doc}: {tree_lib.param_report(env.params, delta, method)}")
        if stage.steps:
            opt = (stage.optimizer(method) if stage.optimizer is not None
                   else default_optimizer(method, stage.steps, stage.lr, stage.head_lr))
            result = env.fit(method, delta, steps=stage.steps, optimizer=opt, mode=stage.mode,
                             seed=stage.seed)
            delta = result.delta
            head = "" if stage.head_lr is None else f", head lr {stage.head_lr}"
            env.log(f"[{stage.name}] {stage.steps} steps (lr {stage.lr:.3g}{head}, {stage.mode}): "
                    f"{result.seconds:.1f} s ({result.seconds / stage.steps:.3f} s/step)")
        updates = {"method": method, "delta": delta}
        if stage.report is not None:
            env.log(f"[{stage.name}] {stage.report({**state, **updates}, env)}")
    return {**state, **updates, "ran": state.get("ran", ()) + (stage.name,),
            "seconds": {**state.get("seconds", {}), stage.name: time.perf_counter() - t0}}


def initial_state(env: Env) -> State:
    """The state the first stage sees: ``{"head": env.head}``."""
    return {"head": tuple(env.head), "ran": (), "seconds": {}}


def run_stages(preset: Preset | str, env: Env, options: Options | None = None, *,
               after: Callable[[Stage, State], None] | None = None) -> State:
    """Run every stage of ``preset`` (options resolved by :func:`resolve`); ``after(stage, state)``
    is called after each. Returns the final state (``"method"``, ``"delta"``, ...)."""
    preset = get(preset)
    state = initial_state(env)
    for stage in preset.stages(resolve(preset, options)):
        state = run_stage(stage, state, env)
        if after is not None:
            after(stage, state)
    return state


# --------------------------------------------------------------------------------------------
# Presets and the registry


def _no_metadata(state: State) -> dict:
    del state
    return {}


class Preset(NamedTuple):
    """A named method preset.

    Attributes:
      name: registry name (the CLI's ``--method``).
      summary: one line.
      defaults: option name -> default value; :func:`resolve` checks given options against it.
      stages: ``options -> tuple of Fit/Compute`` (the last one a :class:`Fit`).
      metadata: ``state -> dict`` of extra JSON metadata saved with the result (AdaLoRA's final
        rank pattern).
      main: the :class:`Fit` that trains the method proper (what the step-cost benchmark times).
      one_shape: train and evaluate with batches of one padded length (one compilation), worth it
        when recompiling per length bucket costs more than the padding (SAID/DID's projection).
      merged_eval: report intermediate dev accuracy on the merged model (faster where the
        factored form gathers or projects at every batch).
      quantized_base: the preset trains on a quantized base (QLoRA, the recipes' ``--quantize``):
        its method adds to the frozen weights or activations. ``False`` where the delta changes
        the stored weights themselves (full fine-tuning, FAR's columns, the sparse and intrinsic
        methods), which a quantized weight cannot take.
    """
    name: str
    summary: str
    defaults: Mapping[str, Any]
    stages: Callable[[Options], tuple[Stage, ...]]
    metadata: Callable[[State], dict] = _no_metadata
    main: str = "train"
    one_shape: bool = False
    merged_eval: bool = False
    quantized_base: bool = True


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    """Add ``preset`` to :data:`PRESETS` (its stages are built once from its defaults to check the
    declaration: unique stage names, a :class:`Fit` last, ``main`` among the fits)."""
    if preset.name in PRESETS:
        raise ValueError(f"presets: {preset.name!r} is already registered")
    preset = preset._replace(defaults=types.MappingProxyType(dict(preset.defaults)))
    stages = preset.stages(dict(preset.defaults))
    names = [s.name for s in stages]
    if not stages or not isinstance(stages[-1], Fit):
        raise ValueError(f"presets: {preset.name!r}: the last stage must be a Fit, got {names}")
    if len(set(names)) != len(names):
        raise ValueError(f"presets: {preset.name!r}: stage names repeat: {names}")
    if preset.main not in [s.name for s in stages if isinstance(s, Fit)]:
        raise ValueError(f"presets: {preset.name!r}: main stage {preset.main!r} is not one of its "
                         f"fits {names}")
    PRESETS[preset.name] = preset
    return preset


def names() -> tuple[str, ...]:
    """The registered preset names, in registration order."""
    return tuple(PRESETS)


def get(name: Preset | str) -> Preset:
    """The preset called ``name`` (a :class:`Preset` is returned as it is)."""
    if isinstance(name, Preset):
        return name
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def _typename(default: Any) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        type(default), type(default).__name__)


def _coerce(preset: Preset, key: str, value: Any) -> Any:
    default = preset.defaults[key]
    bad = ValueError(f"preset {preset.name!r}: option {key!r} takes {_typename(default)}, got "
                     f"{value!r}")
    if default is None:           # a number, or None for "derived from the other options"
        if value is not None and (isinstance(value, bool)
                                  or not isinstance(value, (int, float, np.integer, np.floating))):
            raise ValueError(f"preset {preset.name!r}: option {key!r} takes a number or None, got "
                             f"{value!r}")
        return value
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if not isinstance(value, (bool, np.bool_)):
            raise bad
        return bool(value)
    if isinstance(value, bool):
        raise bad
    if isinstance(default, int):
        if not isinstance(value, (int, np.integer)):
            raise bad
        return int(value)
    if isinstance(default, float):
        if not isinstance(value, (int, float, np.integer, np.floating)):
            raise bad
        return float(value)
    if isinstance(default, str) and not isinstance(value, str):
        raise bad
    return value


def resolve(preset: Preset | str, options: Options | None = None) -> dict[str, Any]:
    """``preset``'s defaults updated with ``options``, each value checked against its default's
    type (ints are accepted for floats, ``"true"``/``"false"`` for booleans; an option whose
    default is ``None`` takes a number or ``None``).

    Raises:
      ValueError: an option the preset does not have (naming its options), or a value of the
        wrong type.
    """
    preset = get(preset)
    options = dict(options or {})
    unknown = sorted(set(options) - set(preset.defaults))
    if unknown:
        raise ValueError(f"preset {preset.name!r} has no option {', '.join(map(repr, unknown))}; "
                         f"its options: {', '.join(preset.defaults)}")
    return {k: _coerce(preset, k, options[k]) if k in options else v
            for k, v in preset.defaults.items()}


def parse_value(text: str) -> Any:
    """A command-line value: ``none``/``null``, ``true``/``false``, an int, a float, else the
    string itself."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main_stage(preset: Preset | str, options: Options) -> Fit:
    """The :class:`Fit` named ``preset.main`` among the stages for ``options``."""
    preset = get(preset)
    return next(s for s in preset.stages(resolve(preset, options))
                if isinstance(s, Fit) and s.name == preset.main)


# --------------------------------------------------------------------------------------------
# Saving and rebuilding


def _json(x: Any) -> Any:
    return json.loads(json.dumps(x, default=str))


def save(directory: str | Path, preset: Preset | str, options: Options, state: State,
         sites: Any, *, extra: Mapping[str, Any] | None = None) -> Path:
    """Write the final ``state["method"]`` and ``state["delta"]`` to ``directory`` (replacing it)
    with :func:`jpeft.save`, plus ``preset``, ``options``, ``head``, ``sites``, the preset's
    extra metadata and the caller's ``extra`` (JSON; e.g. the recipe's base quantization,
    ``"base"``). Returns the checkpoint's path."""
    preset = get(preset)
    metadata = {"preset": preset.name, "options": _json(resolve(preset, options)),
                "head": list(state["head"]), "sites": None if sites is None else sites.to_json(),
                **_json(preset.metadata(state)), **_json(dict(extra or {}))}
    return saving.save(Path(directory).absolute(), state["method"], state["delta"],
                       metadata=metadata, overwrite=True)


class Loaded(NamedTuple):
    """A result read back by :func:`load`: the ``method`` rebuilt from the checkpoint alone, the
    ``delta`` it runs, and the saved ``metadata`` (preset, options, head, sites, extras)."""
    preset: Preset
    options: dict[str, Any]
    method: method_lib.Method
    delta: Any
    metadata: dict


def load(directory: str | Path) -> Loaded:
    """Read a checkpoint written by :func:`save`: the method rebuilt from its saved config and data
    (:func:`jpeft.saving.read`), the preset and options from its metadata.

    Raises:
      ValueError: the checkpoint was not written by :func:`save`, or names an unknown preset.
    """
    loaded = saving.read(directory)
    meta = loaded.metadata
    if "preset" not in meta:
        raise ValueError(f"{directory}: not a preset checkpoint (no 'preset' in its metadata; "
                         f"write it with jpeft.presets.save)")
    preset = get(meta["preset"])
    return Loaded(preset, resolve(preset, meta["options"]), loaded.method, loaded.delta, meta)


# --------------------------------------------------------------------------------------------
# Shared pieces of the presets below


def _head(state: State) -> method_lib.Method:
    return full_finetune(state["head"], name="head")


def _with_head(state: State, **parts: method_lib.Method) -> method_lib.Method:
    """``compose(**parts, head=full_finetune(state["head"]))``."""
    return method_lib.compose(**parts, head=_head(state))


def _continue(state: State, method: method_lib.Method, env: Env) -> Any:
    """Start from the state's delta (what the previous stage left)."""
    del method, env
    return state["delta"]


def _positive(options: Options, *keys: str, low: int = 1) -> None:
    for k in keys:
        if options[k] < low:
            raise ValueError(f"option {k!r} must be >= {low}, got {options[k]!r}")


def _mode(options: Options) -> str:
    if options["mode"] not in method_lib.MODES:
        raise ValueError(f"option 'mode' must be one of {method_lib.MODES}, got "
                         f"{options['mode']!r}")
    return options["mode"]


def _common(lr: float | None, *, head: bool = True) -> dict[str, Any]:
    """Options every preset has: ``steps``, ``lr``, ``seed`` and (with a head) ``head_lr``."""
    out: dict[str, Any] = {"steps": 250, "lr": lr}
    if head:
        out["head_lr"] = 1e-2
    out["seed"] = 0
    return out


def _train(o: Options, doc: str, method: Callable[[State], method_lib.Method], **kw) -> Fit:
    """The usual main stage: ``steps`` steps at ``lr`` (``head_lr`` for the head), key ``seed``."""
    _positive(o, "steps")
    return Fit("train", doc, method, o["steps"], o["lr"], o.get("head_lr"), seed=o["seed"], **kw)


def _head_size(params: Any, head: tuple[str, ...]) -> int:
    return tree_lib.num_params(jax.eval_shape(full_finetune(head).init, jax.random.key(0), params))


def _density_line(indices: Any, params: Any, head: tuple[str, ...]) -> str:
    k = sparse_lib.num_entries(indices)
    total = tree_lib.num_params(params)
    selected = total - _head_size(params, head)
    return (f"kept {k:,} entries in {len(jax.tree.leaves(indices))} tensors: density "
            f"{100 * k / selected:.4f}% of the {selected:,} selected entries (all but the head), "
            f"{100 * k / total:.4f}% of all {total:,} base parameters")


# --------------------------------------------------------------------------------------------
# LoRA, BitFit, AdaLoRA, full fine-tuning: one stage


def _lora_stages(o: Options, *, all_linear: bool) -> tuple[Stage, ...]:
    where = "every linear weight but the head's" if all_linear else "query and value"

    def method(state):
        part = (lora("all-linear", rank=o["rank"], alpha=o["alpha"], exclude=state["head"])
                if all_linear else lora(("query", "value"), rank=o["rank"], alpha=o["alpha"]))
        return _with_head(state, lora=part)
    return (_train(o, f"LoRA r={o['rank']} alpha={o['alpha']} on {where}, and the head", method),)


def _bitfit_stages(o: Options) -> tuple[Stage, ...]:
    return (_train(o, "BitFit: every bias but the head's, and the head",
                   lambda s: _with_head(s, bitfit=bitfit(exclude=s["head"]))),)


def _adalora_schedule(o: Options) -> dict[str, int]:
    steps = o["steps"]
    return {"total_steps": steps, "t_init": steps // 10 if o["t_init"] is None else o["t_init"],
            "t_final": steps // 5 if o["t_final"] is None else o["t_final"],
            "delta_t": o["delta_t"]}


def _adalora_stages(o: Options) -> tuple[Stage, ...]:
    """AdaLoRA's rank allocator and orthogonality penalty are part of the method (folded into the
    train step), so it is one stage; the allocator's schedule is sized from ``steps``."""
    sched = _adalora_schedule(o)
    _positive(o, "steps")
    adalora_lib.budget_schedule(1, init_r=o["init_r"], target_r=o["target_r"],
                                t_init=sched["t_init"], t_final=sched["t_final"],
                                delta_t=sched["delta_t"], total_steps=sched["total_steps"])

    def method(state):
        return _with_head(state, adalora=adalora_lib.adalora(
            ("query", "value"), init_r=o["init_r"], alpha=o["alpha"], target_r=o["target_r"],
            **sched))
    return (_train(o, f"AdaLoRA on query and value, rank {o['init_r']} -> {o['target_r']} "
                      f"(schedule {sched}), and the head", method,
                   report=lambda s, env: f"AdaLoRA final ranks: "
                                         f"{adalora_lib.rank_pattern(s['delta'])}"),)


def _head_stages(o: Options) -> tuple[Stage, ...]:
    return (_train(o, "the head alone (a linear probe of the frozen encoder)", _head),)


def _full_stages(o: Options) -> tuple[Stage, ...]:
    return (_train(o, "full fine-tuning of every parameter", lambda s: full_finetune()),)


# --------------------------------------------------------------------------------------------
# FAR: (warm-up) -> score and select columns -> train them

FAR_SCORES = ("change", "magnitude")


def _far_method(state: State) -> method_lib.Method:
    return _with_head(state, far=far_lib.far(state["columns"]))


def _far_select(o: Options, state: State, env: Env) -> State:
    """Score every output column of the targeted matrices (L1 change over the warm-up, or L1 norm)
    and keep ``fraction`` of them (:func:`jpeft.methods.far.far_select`)."""
    if o["score"] == "change":
        scores = far_lib.far_scores(env.params, state["delta"]["ffn"], o["targets"])
    else:
        scores = far_lib.far_magnitude_scores(env.params, o["targets"])
    columns = far_lib.far_select(scores, o["fraction"], budget=o["budget"])
    report = far_lib.far_report(env.params, columns)
    env.log(f"{report}; FAR alone is {100 * report.trainable / tree_lib.num_params(env.params):.4f}"
            f"% of the model")
    return {"columns": columns}


def _far_stages(o: Options) -> tuple[Stage, ...]:
    if o["score"] not in FAR_SCORES:
        raise ValueError(f"far: option 'score' must be one of {FAR_SCORES}, got {o['score']!r}")
    stages: list[Stage] = []
    if o["score"] == "change":
        _positive(o, "warmup_steps")
        stages.append(Fit(
            "warmup", "full fine-tuning of the targeted matrices and the head (their change ranks "
                      "the columns; training then restarts from the base model)",
            lambda s: method_lib.compose(ffn=full_finetune(o["targets"], name="ffn"),
                                         head=_head(s)),
            o["warmup_steps"], o["warmup_lr"], o["head_lr"], seed=o["seed"], evaluate=False))
    stages.append(Compute("select", f"score the output columns by {o['score']}; keep "
                                    f"{o['fraction']} of them ({o['budget']})",
                          lambda s, env: _far_select(o, s, env)))
    stages.append(_train(o, "FAR: the kept columns and their bias entries, and the head",
                         _far_method))
    return tuple(stages)


# --------------------------------------------------------------------------------------------
# Sparse methods: FishMask (Fisher -> mask -> train) and diff pruning (gates -> project -> refine)


def _sparse_method(state: State) -> method_lib.Method:
    return _with_head(state, sparse=sparse_lib.sparse_finetune(state["indices"]))


def _fishmask_method(state: State) -> method_lib.Method:
    return _with_head(state, sparse=fm.fishmask(state["indices"], name="sparse"))


def _fisher_mask(o: Options, state: State, env: Env) -> State:
    """The empirical Fisher over ``fisher_examples`` training examples (true labels, base model
    with its initial head, no dropout) and its global top ``density`` over every tensor but the
    head's."""
    examples = env.examples(o["fisher_examples"], o["seed"])
    t0 = time.perf_counter()
    fisher = fm.fisher_information(env.log_likelihood, env.params, examples,
                                   chunk_size=o["chunk_size"])
    jax.block_until_ready(fisher)
    env.log(f"empirical Fisher over {o['fisher_examples']} training examples (chunks of "
            f"{o['chunk_size']}): {time.perf_counter() - t0:.1f} s")
    indices = fm.fishmask_indices(fisher, density=o["density"], exclude=state["head"])
    env.log(f"mask: {_density_line(indices, env.params, state['head'])}")
    return {"indices": indices}


def _fishmask_stages(o: Options) -> tuple[Stage, ...]:
    _positive(o, "fisher_examples", "chunk_size")
    _mode(o)
    return (Compute("fisher", f"empirical Fisher over {o['fisher_examples']} examples, top "
                              f"{o['density']} mask", lambda s, env: _fisher_mask(o, s, env)),
            _train(o, "FishMask: the masked entries, and the head", _fishmask_method,
                   mode=o["mode"]))


def _diff_pruning_optimizer(o: Options, method: method_lib.Method) -> optax.GradientTransformation:
    """Guo et al.'s set-up: AdamW on ``w`` (``lr``) and on the head (``head_lr``), both
    :func:`warmup_cosine`; constant Adam at ``alpha_lr`` (the paper's 0.1) on the gate logits."""
    del method
    steps = o["steps"]
    labels = lambda d: {"diff_pruning": dp.labels(d["diff_pruning"]),     # "w" or "alpha"
                        "head": jax.tree.map(lambda _: "head", d["head"])}
    return optax.multi_transform(
        {"w": optax.adamw(warmup_cosine(o["lr"], steps), weight_decay=0.0),
         "alpha": optax.adam(o["alpha_lr"]),
         "head": optax.adamw(warmup_cosine(o["head_lr"], steps), weight_decay=0.0)}, labels)


def _gates_report(state: State, env: Env) -> str:
    delta = state["delta"]["diff_pruning"]
    gates = jax.tree.leaves(jax.jit(dp.gates)(delta))
    n = sum(int(g.size) for g in gates)
    open_ = sum(int(np.count_nonzero(np.asarray(g))) for g in gates)
    return (f"expected L0 {float(dp.expected_l0(delta)):,.0f} of {n:,}, deterministic gates "
            f"open {open_:,}")


def _project(o: Options, state: State, env: Env) -> State:
    """Magnitude projection (:func:`jpeft.methods.diff_pruning.project`): the ``density`` largest
    ``|z * w|`` as a sparse delta, the head kept as trained."""
    proj = dp.project(state["delta"]["diff_pruning"], o["density"])
    env.log(f"magnitude projection: {_density_line(proj.indices, env.params, state['head'])}")
    out = {"indices": proj.indices, "delta": {"sparse": proj.values,
                                              "head": state["delta"]["head"]}}
    return {**out, "method": _sparse_method({**state, **out})}


def _diff_pruning_stages(o: Options) -> tuple[Stage, ...]:
    _positive(o, "refine_steps", low=0)
    _mode(o)
    structured = " (structured: a gate per tensor too)" if o["structured"] else ""
    return (
        _train(o, f"diff pruning{structured} of every entry but the head's (w and gate logits "
                  f"alpha, alpha_init {dp.ALPHA_INIT}, lambda {o['lam']}), and the head",
               lambda s: _with_head(s, diff_pruning=dp.diff_pruning(
                   exclude=s["head"], structured=o["structured"], lam=o["lam"])),
               optimizer=lambda m: _diff_pruning_optimizer(o, m), report=_gates_report),
        Compute("project", f"keep the {o['density']} largest |z * w|",
                lambda s, env: _project(o, s, env), evaluate=True),
        Fit("refine", "re-fine-tune of the kept entries (mask fixed) and the head",
            _sparse_method, o["refine_steps"], o["refine_lr"], o["head_lr"], start=_continue,
            mode=o["mode"], seed=o["seed"] + 1))


# --------------------------------------------------------------------------------------------
# Intrinsic dimension: SAID / DID

#: Peak Adam learning rate of ``theta_d`` and ``lambda`` is ``LR_SCALE / sqrt(d)``: a unit of
#: ``theta_d`` moves every tensor by about unit norm, and Adam moves all ``d`` coordinates at once,
#: so a step moves each tensor by about ``lr sqrt(d)``. Tuned on the movie task (40 steps of batch
#: 16): at d = 1000, lr 1e-3 beat 3e-4, 3e-3 and 1e-2; at d = 10000, 3e-4 beat 1e-3; at d = 100,
#: 3e-3 and 1e-2 tied.
LR_SCALE = 0.03


def intrinsic_lr(d: int) -> float:
    """``LR_SCALE / sqrt(d)``."""
    return LR_SCALE / math.sqrt(d)


def _intrinsic_stages(o: Options, *, kind: str) -> tuple[Stage, ...]:
    _positive(o, "d")

    def method(state):
        part = (intrinsic.said if kind == "said" else intrinsic.did)(
            o["d"], seed=o["seed"], exclude=state["head"])
        return _with_head(state, **{kind: part})

    def report(state, env):
        if kind != "said":
            return f"seed {o['seed']}, d {o['d']}"
        lam = np.asarray(state["delta"]["said"]["lambda"])
        return f"SAID scalars after training: min {lam.min():.3f} max {lam.max():.3f}"

    lr = intrinsic_lr(o["d"]) if o["lr"] is None else o["lr"]
    return (_train({**o, "lr": lr}, f"{kind.upper()}: every weight but the head's in one random "
                                    f"{o['d']}-dimensional subspace, and the head", method,
                   report=report),)


# --------------------------------------------------------------------------------------------
# Additive and hybrid methods: adapters, IA3, prefix and prompt tuning, MAM, UniPELT, Compacter,
# SparseAdapter. One training stage each (prefix tuning: train through the reparametrisation
# MLP, then fold it away; SparseAdapter: prune at initialisation, then train). Their results are
# rebuilt from the saved method config like every preset's (masks included).


def _single(o: Options, doc: str, part: Callable[[State], method_lib.Method],
            name: str) -> tuple[Stage, ...]:
    return (_train(o, doc, lambda s: _with_head(s, **{name: part(s)})),)


def _adapter_stages(o: Options, kind: str) -> tuple[Stage, ...]:
    from jpeft.methods import adapters
    size = {"bottleneck_size": o["bottleneck_size"]} if o.get("bottleneck_size") else {}
    build = {
        "houlsby": lambda: adapters.houlsby(reduction_factor=o["reduction_factor"],
                                            activation=o["activation"], **size),
        "pfeiffer": lambda: adapters.pfeiffer(reduction_factor=o["reduction_factor"],
                                              activation=o["activation"], **size),
        "parallel": lambda: adapters.parallel(reduction_factor=o["reduction_factor"],
                                              activation=o["activation"], **size),
        "scaled-parallel": lambda: adapters.scaled_parallel(
            reduction_factor=o["reduction_factor"], activation=o["activation"], **size),
        "multihead-parallel": lambda: adapters.multihead_parallel(
            reduction_factor=o["reduction_factor"], activation=o["activation"], **size),
        "compacter": lambda: adapters.compacter(plus_plus=o["plus_plus"],
                                                reduction_factor=o["reduction_factor"],
                                                phm_dim=o["phm_dim"], activation=o["activation"]),
    }[kind]
    return _single(o, f"{kind} adapters (reduction factor {o['reduction_factor']}), and the head",
                   lambda s: build(), "adapter")


def _ia3_stages(o: Options) -> tuple[Stage, ...]:
    from jpeft.methods import ia3
    return _single(o, "IA3: rescaled keys, values and FFN inputs, and the head",
                   lambda s: ia3.ia3(), "ia3")


def _prefix_part(o: Options, reparametrize: bool) -> method_lib.Method:
    from jpeft.methods import prefix
    return prefix.prefix_tuning(o["length"], reparametrize=reparametrize,
                                hidden_size=o["hidden_size"])


def _prefix_stages(o: Options) -> tuple[Stage, ...]:
    """Train (through the reparametrisation MLP when ``reparametrize``), then fold: a 0-step
    stage whose method is the direct prefix and whose delta the folded prefixes."""
    from jpeft.methods import prefix
    _positive(o, "length")
    train = _single(o, f"prefix tuning, l = {o['length']}"
                       f"{' (reparametrised)' if o['reparametrize'] else ''}, and the head",
                    lambda s: _prefix_part(o, o["reparametrize"]), "prefix")
    if not o["reparametrize"]:
        return train

    def fold(state, method, env):
        return {"prefix": prefix.fold(_prefix_part(o, True), state["delta"]["prefix"], env.sites),
                "head": state["delta"]["head"]}
    return train + (Fit("fold", "fold the MLP away: only the prefixes are kept and served",
                        lambda s: _with_head(s, prefix=_prefix_part(o, False)),
                        0, 0.0, start=fold, evaluate=False),)


def _prompt_stages(o: Options) -> tuple[Stage, ...]:
    from jpeft.methods import prompt
    _positive(o, "length")
    return _single(o, f"prompt tuning, l = {o['length']} soft tokens, and the head",
                   lambda s: prompt.prompt_tuning(o["length"]), "prompt")


def _mam_stages(o: Options) -> tuple[Stage, ...]:
    from jpeft.methods import adapters
    return _single(o, f"MAM: prefix l = {o['prefix_length']} + scaled parallel FFN adapter "
                      f"(bottleneck {o['bottleneck_size']}, s = {o['scaling']}), and the head",
                   lambda s: adapters.mam(prefix_length=o["prefix_length"],
                                          bottleneck_size=o["bottleneck_size"],
                                          scaling=o["scaling"]), "mam")


def _unipelt_stages(o: Options) -> tuple[Stage, ...]:
    from jpeft.methods import unipelt
    return _single(o, f"UniPELT{'' if o['gate'] else ' (NoGate)'}: LoRA + prefix + adapter, "
                      f"and the head",
                   lambda s: unipelt.unipelt(gate=o["gate"], prefix_length=o["prefix_length"],
                                             reduction_factor=o["reduction_factor"]), "unipelt")


def _s4_layout(o: Options) -> tuple[tuple[int, ...] | None, tuple[str, ...]]:
    """The ``groups`` option (``"spindle"`` or group sizes ``"1,2,2,1"``) as group sizes (``None``:
    spindle) and the ``strategies`` option (``"AL,AP,APB,PBL"``) as one letter string per group."""
    strategies = tuple(x.strip().upper() for x in str(o["strategies"]).split(","))
    if not all(strategies) or any(c not in "APBL" for x in strategies for c in x):
        raise ValueError(f"s4: option 'strategies' takes one group of the letters A (adapter), P "
                         f"(prefix), B (BitFit), L (LoRA) per layer group, comma-separated "
                         f"(the paper's: AL,AP,APB,PBL), got {o['strategies']!r}")
    if str(o["groups"]) == "spindle":
        return None, strategies
    try:
        sizes = tuple(int(x) for x in str(o["groups"]).split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise ValueError(f"s4: option 'groups' is 'spindle' or the number of consecutive layers "
                         f"in each group, comma-separated ('1,2,2,1'), got {o['groups']!r}")
    if len(sizes) != len(strategies):
        raise ValueError(f"s4: {len(sizes)} groups but strategies for {len(strategies)}")
    return sizes, strategies


def _s4_allocate(o: Options, state: State, env: Env) -> State:
    """Layers, groups and the uniform per-layer budget on the env's model."""
    from jpeft.methods import s4
    sizes, strategies = _s4_layout(o)
    layers = {paths_lib.layer_index(p) for p in paths_lib.flatten(env.params)}
    layers.discard(None)
    if not layers:
        raise ValueError("s4: the model's parameter paths carry no layer index")
    num_layers = max(layers) + 1
    if sizes is None:
        groups = s4.spindle_groups(num_layers, len(strategies))
    else:
        if sum(sizes) != num_layers:
            raise ValueError(f"s4: groups {o['groups']!r} hold {sum(sizes)} layers; the model has "
                             f"{num_layers}")
        starts = np.cumsum((0,) + sizes)
        groups = tuple(tuple(range(a, b)) for a, b in zip(starts[:-1], starts[1:]))
    budget = max(1, round(o["budget"] * tree_lib.num_params(env.params) / num_layers))
    alloc = s4.uniform_allocation(env.params, env.sites, num_layers, budget, groups=groups,
                                  strategies=strategies, prefix_length=o["prefix_length"])
    env.log(f"S4: {num_layers} layers in groups {[len(g) for g in groups]} "
            f"({', '.join(f'G{i + 1} {x}' for i, x in enumerate(strategies))}); "
            f"{budget:,} trainable entries per layer ({o['budget']:.2%} of the model): adapter "
            f"bottlenecks {alloc['adapter_size']}, LoRA ranks {alloc['lora_rank']}")
    return {"s4": {"num_layers": num_layers, "groups": groups, "strategies": strategies, **alloc}}


def _s4_stages(o: Options) -> tuple[Stage, ...]:
    from jpeft.methods import s4
    _s4_layout(o)                              # option errors before anything runs
    _positive(o, "prefix_length")

    def build(state):
        a = state["s4"]
        return _with_head(state, s4=s4.s4(
            a["num_layers"], groups=a["groups"], strategies=a["strategies"],
            adapter_size=a["adapter_size"], lora_rank=a["lora_rank"],
            prefix_length=o["prefix_length"]))
    return (Compute("allocate", "group the layers and size each group's strategies for a uniform "
                                "per-layer budget", lambda s, env: _s4_allocate(o, s, env)),
            _train(o, "S4: adapter / prefix / BitFit / LoRA per layer group, and the head",
                   build))


def _sparse_adapter_prune(o: Options, state: State, env: Env) -> State:
    from jpeft.methods import adapters
    from jpeft.methods import sparse_adapter as sa
    dense = adapters.bottleneck((adapters.FFN_SEQUENTIAL,),
                                reduction_factor=o["reduction_factor"])
    scoring = sa.scoring_init(dense, jax.random.key(o["seed"]), env.params, env.sites)
    masks = sa.prune_masks(scoring, o["sparsity"], criterion=o["criterion"],
                           key=jax.random.key(o["seed"] + 1))
    kept = sum(int(m.sum()) for m in masks.values())
    env.log(f"pruned the adapters' projections to {o['sparsity']:.0%} sparsity by "
            f"{o['criterion']}: {kept:,} of {sum(m.size for m in masks.values()):,} entries kept")
    return {"masks": masks}


def _sparse_adapter_stages(o: Options) -> tuple[Stage, ...]:
    from jpeft.methods import sparse_adapter as sa
    if o["criterion"] not in ("magnitude", "random"):
        raise ValueError(f"sparse-adapter: option 'criterion' must be 'magnitude' or 'random' "
                         f"(SNIP needs a loss: jpeft.methods.sparse_adapter.snip_scores), got "
                         f"{o['criterion']!r}")
    return (Compute("prune", f"prune the adapters at initialisation ({o['criterion']}, sparsity "
                             f"{o['sparsity']})", lambda s, env: _sparse_adapter_prune(o, s, env)),
            _train(o, "SparseAdapter: the kept entries of the FFN adapters, and the head",
                   lambda s: _with_head(s, adapter=sa.sparse_adapter(
                       s["masks"], reduction_factor=o["reduction_factor"], name="adapter"))))


def _adapter_defaults(reduction_factor: int, activation: str = "relu") -> dict[str, Any]:
    return {**_common(2e-3), "reduction_factor": reduction_factor, "bottleneck_size": None,
            "activation": activation}


# --------------------------------------------------------------------------------------------
# The registry

register(Preset("lora", "LoRA on query and value + the head",
                {**_common(4e-3), "rank": 8, "alpha": 8.0},
                lambda o: _lora_stages(o, all_linear=False)))
register(Preset("lora-all-linear", "LoRA on every linear weight but the head's + the head",
                {**_common(4e-3), "rank": 8, "alpha": 8.0},
                lambda o: _lora_stages(o, all_linear=True)))
register(Preset("bitfit", "BitFit (every bias) + the head", _common(5e-3), _bitfit_stages))
register(Preset(
    "adalora", "AdaLoRA on query and value (rank allocator and orthogonality penalty) + the head",
    {**_common(4e-3), "init_r": 12, "target_r": 8, "alpha": 8.0, "t_init": None, "t_final": None,
     "delta_t": 5}, _adalora_stages,
    metadata=lambda s: {"rank_pattern": adalora_lib.rank_pattern(s["delta"])}))
register(Preset(
    "far", "FAR: score FFN columns (after a warm-up), train the kept ones + the head",
    {**_common(1e-3), "fraction": 0.2, "score": "change", "warmup_steps": 20, "warmup_lr": 5e-5,
     "budget": "per_matrix", "targets": far_lib.BERT_FFN},
    _far_stages, quantized_base=False))
register(Preset(
    "diff-pruning", "diff pruning: learn a sparse gated difference, project, re-fine-tune + head",
    {**_common(1e-4), "density": 0.005, "refine_steps": 50, "refine_lr": 1e-3, "alpha_lr": 0.1,
     "lam": dp.LAMBDA, "structured": False, "mode": "materialised"},
    _diff_pruning_stages, merged_eval=True, quantized_base=False))
register(Preset(
    "fishmask", "FishMask: Fisher top-k mask, train the masked entries + the head",
    {**_common(1e-3), "density": 0.005, "fisher_examples": 256, "chunk_size": 8,
     "mode": "materialised"}, _fishmask_stages, merged_eval=True, quantized_base=False))
for _kind in ("said", "did"):
    register(Preset(
        _kind, f"{_kind.upper()}: a d-dimensional random subspace of the whole model + the head",
        {**_common(None), "d": 1000}, lambda o, k=_kind: _intrinsic_stages(o, kind=k),
        one_shape=True, merged_eval=True, quantized_base=False))
register(Preset("full", "full fine-tuning of every parameter", _common(5e-5, head=False),
                _full_stages, quantized_base=False))
register(Preset("head", "the head alone: the encoder frozen (a linear probe)",
                _common(1e-2, head=False), _head_stages))
for _kind, _summary in (
        ("houlsby", "Houlsby adapters after the attention output and the FFN + the head"),
        ("pfeiffer", "Pfeiffer adapter after the FFN + the head"),
        ("parallel", "parallel adapter on the FFN (from its input) + the head"),
        ("scaled-parallel", "scaled parallel adapter (s = 4) on the FFN + the head"),
        ("multihead-parallel", "multi-head parallel adapter on each attention head + the head")):
    register(Preset(_kind, _summary, _adapter_defaults(16),
                    lambda o, k=_kind: _adapter_stages(o, k)))
register(Preset("compacter", "Compacter++ (PHM adapter after the FFN, shared rules) + the head",
                {**_common(3e-3), "reduction_factor": 32, "phm_dim": 4, "plus_plus": True,
                 "activation": "gelu"}, lambda o: _adapter_stages(o, "compacter")))
register(Preset("sparse-adapter", "SparseAdapter: a large FFN adapter pruned at init + the head",
                {**_common(2e-3), "reduction_factor": 4, "sparsity": 0.75,
                 "criterion": "magnitude"}, _sparse_adapter_stages))
register(Preset("ia3", "IA3: rescaled keys, values and FFN inputs + the head", _common(3e-3),
                _ia3_stages))
# Prefix lr on the MiniLM demo (reparametrised, l = 20): 5e-3 diverged (250 steps: 48.91% dev,
# below the untrained 50.33%); 120 steps: 1e-3 -> 78.33%, 1e-4 -> 76.25%.
register(Preset("prefix", "prefix tuning (reparametrised in training, folded after) + the head",
                {**_common(1e-3), "length": 20, "reparametrize": True, "hidden_size": 512},
                _prefix_stages))
register(Preset("prompt", "prompt tuning: soft tokens before the input + the head",
                {**_common(3e-2), "length": 20}, _prompt_stages))
register(Preset("mam", "MAM adapter: prefix (l = 30) + scaled parallel FFN adapter + the head",
                {**_common(2e-3), "prefix_length": 30, "bottleneck_size": 512, "scaling": 4.0},
                _mam_stages))
register(Preset("unipelt", "UniPELT: gated LoRA + prefix + adapter + the head",
                {**_common(2e-3), "gate": True, "prefix_length": 10, "reduction_factor": 16},
                _unipelt_stages))
register(Preset("s4", "S4: spindle layer groups, each with its adapter/prefix/BitFit/LoRA + the head",
                {**_common(2e-3), "budget": 0.005, "groups": "spindle",
                 "strategies": "AL,AP,APB,PBL", "prefix_length": 10},
                _s4_stages))
del _kind, _summary
