"""``jpeft`` command line: fine-tune, evaluate, predict, merge, export and size PEFT methods.

``jpeft finetune --data FILE.csv --text-column text --label-column label --method lora
--set rank=16`` fine-tunes a sequence classifier (a Hugging Face BERT-style directory, ``--model``;
the embedded MiniLM by default) or, with ``--task causal-lm --model DIR``, a LLaMA-style decoder,
on your data, and writes a run folder (``--out``; default ``runs/<method>-<UTC time>``) with the
adapter, the label map, ``run.json`` (everything that rebuilds the run) and ``metrics.jsonl``.
On that folder: ``jpeft eval --run DIR --data FILE`` (accuracy and loss, or a decoder's per-token
loss), ``jpeft predict --run DIR --data FILE --out preds.jsonl`` (label and probabilities per
row, or a decoder's continuations), ``jpeft merge --run DIR --out DIR`` (merged safetensors),
``jpeft export --run DIR --format hf-peft --out DIR`` (Hugging Face PEFT adapter files).
``jpeft report --method M`` prints a method's trainable parameters and its train step's FLOPs and
memory, relative to full fine-tuning, before any training.

``jpeft demo`` fine-tunes the embedded MiniLM on movie-review sentiment with any method preset
(:mod:`jpeft.presets`); ``jpeft presets`` lists the presets, their stages and options; ``jpeft
decoder`` runs the small decoder example (:mod:`jpeft.recipes.decoder`); ``jpeft plan --model
llama-3-8b --mesh fsdp=16,tp=4 --batch 256 --seq 4096`` sizes a sharded run (:mod:`jpeft.plan`).

Every value is checked before anything loads; an error is one line naming the flag
(``jpeft finetune: error: --batch: ...``) and exit status 2. Progress bars are drawn only on a
terminal; elsewhere (a log file) training prints a plain line about every tenth of its steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from jpeft import presets
from jpeft.core import host_memory

#: Flags that set a preset option (flag destination -> option name); each applies to the presets
#: that have the option.
OPTION_FLAGS = {"steps": "steps", "lr": "lr", "head_lr": "head_lr", "seed": "seed", "rank": "rank",
                "alpha": "alpha", "fraction": "fraction", "warmup_steps": "warmup_steps",
                "far_score": "score", "density": "density", "refine_steps": "refine_steps",
                "structured": "structured", "d": "d", "fisher_examples": "fisher_examples"}

#: The subcommands that train or load a model from the flags (their options validated first).
COMMANDS = ("demo", "finetune", "eval", "predict", "merge", "export", "report")


class OptionError(ValueError):
    """A method option the command cannot use; ``flag`` is the flag that set it (``--rank``,
    ``--set rank``), blamed in the one-line error."""

    def __init__(self, flag: str, message: str):
        super().__init__(message)
        self.flag = flag


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``<prog>: error: --flag: message`` and exit status 2 (no
    usage block; ``--help`` shows it)."""

    def error(self, message: str):      # noqa: D102 - argparse's hook
        if message.startswith("argument "):
            message = message[len("argument "):]
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")

    def fail(self, flag: str, message: str):
        """The one-line error blaming ``flag``."""
        message = " ".join(str(message).split())
        self.error(message if message.startswith(flag) else f"{flag}: {message}")


# --------------------------------------------------------------------------------------------
# Value types: checked while the command line is parsed


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a non-negative integer, got {value}")
    return value


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value:g}")
    return value


def nonnegative_float(text: str) -> float:
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or positive, got {value:g}")
    return value


def byte_top_k(text: str) -> int:
    """A top-k over the byte-level decoder's 257 tokens."""
    value = positive_int(text)
    if value > 257:
        raise argparse.ArgumentTypeError(f"must be at most 257 (256 bytes and padding), got "
                                         f"{value}")
    return value


def open_fraction(text: str) -> float:
    """A number strictly between 0 and 1."""
    value = _float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {value:g}")
    return value


def unit_fraction(text: str) -> float:
    """A number in (0, 1]."""
    value = _float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value:g}")
    return value


def existing_dir(text: str) -> str:
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"no such folder: {text}")
    return text


def data_file(text: str) -> str:
    """An existing .csv or .jsonl file whose header reads."""
    from jpeft.recipes import tabular
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    try:
        tabular.columns(text)
    except (tabular.DataError, OSError, UnicodeDecodeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# --------------------------------------------------------------------------------------------
# Method options


def _given_options(args: argparse.Namespace, preset: presets.Preset
                   ) -> list[tuple[str, str, object]]:
    """``(flag, option, value)`` for each option flag set and each ``--set`` pair."""
    given = []
    for dest, name in OPTION_FLAGS.items():
        value = getattr(args, dest, None)
        if value is None or (dest == "seed" and name not in preset.defaults):
            continue
        flag = "--" + dest.replace("_", "-")
        if name not in preset.defaults:
            raise OptionError(flag, f"{flag} does not apply to --method {preset.name}; its "
                                    f"options: {', '.join(preset.defaults)}")
        given.append((flag, name, value))
    for item in getattr(args, "set", None) or ():
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise OptionError("--set", f"--set takes KEY=VALUE, got {item!r}")
        given.append((f"--set {key.strip()}", key.strip(), presets.parse_value(text)))
    return given


def _check_built(preset: presets.Preset, options: dict) -> None:
    """The preset's stages for ``options`` (they check values), and each training stage's method
    built where it needs nothing computed from the model (its factory checks e.g. a rank)."""
    for stage in preset.stages(options):
        if isinstance(stage, presets.Fit):
            try:
                stage.method({"head": ("classifier",)})
            except ValueError:
                raise
            except Exception:       # noqa: BLE001 - needs what a stage computes on the model
                pass


def preset_options(args: argparse.Namespace, extra: dict | None = None) -> dict:
    """The method options given on the command line: the flags that were set, then ``--set``
    pairs (then ``extra``), over the preset's defaults, checked: each value on its own (so the
    error names the flag that set it), then all together.

    Raises:
      OptionError (a ``ValueError``): a flag or ``--set`` key the preset has no option for
        (naming its options), a value of the wrong type or out of range, a ``--set`` item that
        is not ``KEY=VALUE``; its ``flag`` is the flag to blame.
    """
    preset = presets.get(args.method)
    given = _given_options(args, preset)
    given += [(flag, key, value) for key, (flag, value) in (extra or {}).items()]
    for flag, key, value in given:
        try:
            one = presets.resolve(preset, {key: value})
            _check_built(preset, one)
        except OptionError:
            raise
        except ValueError as e:
            raise OptionError(flag, str(e)) from None
    options = {key: value for _, key, value in given}
    try:
        options = presets.resolve(preset, options)
        _check_built(preset, options)          # the values together (e.g. AdaLoRA's ranks)
    except ValueError as e:
        flags = sorted({flag for flag, _, _ in given}) or ["--method"]
        raise OptionError(", ".join(flags), str(e)) from None
    return options


def _option_flags(args: argparse.Namespace) -> dict[str, str]:
    """Option name -> the flag that set it."""
    out = {name: "--" + dest.replace("_", "-") for dest, name in OPTION_FLAGS.items()
           if getattr(args, dest, None) is not None}
    for item in getattr(args, "set", None) or ():
        key = item.partition("=")[0].strip()
        out[key] = f"--set {key}"
    return out


# --------------------------------------------------------------------------------------------
# Commands


def _out_folder(args: argparse.Namespace, default_name: str):
    """The run folder for ``--out`` (refused when non-empty without ``--overwrite``) or a new
    ``runs/<default_name>-<UTC time>``: ``(path, reserved)``."""
    from jpeft.recipes import jobs
    if args.out is None:
        return jobs.reserve_run_dir(default_name), True
    jobs.check_out_dir(args.out, args.overwrite)
    reserved = not os.path.exists(args.out)
    if reserved:
        os.makedirs(args.out)          # taken now; removed again if the run fails
    return args.out, reserved


def demo(args: argparse.Namespace, options: dict) -> int:
    import jax

    import jpeft
    from jpeft.recipes import finetune, jobs, movies

    t0 = time.perf_counter()
    path, reserved = _out_folder(args, f"demo-{args.method}")
    folder = jobs.OutFolder(path, reserved)
    log = jobs.RunLog(folder)
    try:
        task = movies.load_task(seq=args.seq, seed=args.seed, dev_limit=args.dev_limit)
        print(f"jpeft {jpeft.__version__} | jax {jax.__version__} on "
              f"{jax.devices()[0].platform} | model: {task.model_dir}")
        print(f"data: movie-review sentences, {len(task.train)} train / {len(task.dev)} dev, "
              f"{100 * task.train.labels.mean():.1f}% positive in train; sequence length "
              f"{args.seq}, batch {args.batch}")
        env = movies.env(task, batch=args.batch, progress=not args.no_progress, log=log)
        outcome = finetune.run(args.method, env, options, out=folder.tmp, quantize=args.quantize)
        out = folder.commit()
    except BaseException:
        folder.abort()
        raise
    print(f"saved to {out}")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    if not outcome.ok:
        print("ERROR: reload or merge changed the predictions", file=sys.stderr)
    return 0 if outcome.ok else 1


def decoder_example(args: argparse.Namespace) -> int:
    from jpeft.recipes import decoder
    results = decoder.run(args.method.split(","), base_steps=args.base_steps, steps=args.steps,
                          lr=args.lr, seed=args.seed, quantize=args.quantize,
                          temperature=args.temperature, top_k=args.top_k)
    return 0 if all(np.isfinite(r.adapted_loss) for r in results.values()) else 1


def list_presets() -> int:
    for name in presets.names():
        preset = presets.get(name)
        stages = preset.stages(presets.resolve(preset))
        print(f"{name}: {preset.summary}\n  stages: "
              + ", ".join(f"{s.name} ({type(s).__name__.lower()})" for s in stages)
              + f"\n  options: {json.dumps(dict(preset.defaults))}"
              + "\n  on a quantized base (--quantize nf4/int8): "
              + ("yes" if preset.quantized_base else "no (its delta changes the weights)"))
    return 0


def _default_model(args: argparse.Namespace, parser: Parser) -> str:
    if args.model is not None:
        return args.model
    if args.task == "causal-lm":
        parser.fail("--model", "--task causal-lm needs a LLaMA-style model folder (config.json "
                               "+ model.safetensors); no decoder is embedded")
    from jpeft.data.embedded import minilm_dir
    return str(minilm_dir())


def _method_for_task(args: argparse.Namespace, parser: Parser, extra: dict | None = None
                     ) -> tuple[dict, tuple[str, ...]]:
    """Validated options of ``--method`` for ``--task``, and the option names given."""
    from jpeft.recipes import jobs
    try:
        options = preset_options(args, extra)
    except OptionError as e:
        parser.fail(e.flag, str(e))
    flags = _option_flags(args)
    flags.update({k: f for k, (f, _) in (extra or {}).items()})
    given = tuple(flags)
    if args.task == "causal-lm":
        if args.method not in jobs.DECODER_METHODS:
            parser.fail("--method", f"--task causal-lm trains {', '.join(jobs.DECODER_METHODS)}"
                                    f"; got {args.method!r}")
        allowed = jobs.decoder_options(args.method)
        for key, flag in flags.items():
            if key not in allowed:
                parser.fail(flag, f"--method {args.method} with --task causal-lm takes only "
                                  f"{', '.join(allowed)} (no head is trained; prefix tuning "
                                  f"is not reparametrised)")
        try:
            jobs.decoder_method(args.method, options)
        except ValueError as e:
            parser.fail(", ".join(sorted(set(flags.values()))) or "--method", str(e))
    return options, given


def _check_quantize(args: argparse.Namespace, parser: Parser) -> None:
    from jpeft.recipes import finetune
    try:
        finetune.check_quantize(args.method, args.quantize)
    except ValueError as e:
        parser.fail("--quantize", str(e))


def finetune_command(args: argparse.Namespace, parser: Parser, argv: list[str]) -> int:
    """``jpeft finetune``: every value checked (flags, model folder's config, data header and
    rows, method options, sizes), then :func:`jpeft.recipes.jobs.finetune`."""
    from jpeft.recipes import jobs, tabular
    model = _default_model(args, parser)
    try:
        info = jobs.inspect_model(model, args.task, args.pooling)
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)
    classify = args.task == "seq-cls"
    if not classify and args.label_column is not None:
        parser.fail("--label-column", "--task causal-lm trains on the texts alone")
    if not classify and args.pooling != "auto":
        parser.fail("--pooling", "applies to --task seq-cls only")
    label_column = (args.label_column or "label") if classify else None
    data = _read_data(args, parser, args.data, "--data", args.text_column, label_column)
    labels = tabular.LabelMap.from_values(data.labels) if classify else None
    if classify and len(labels) < 2:
        parser.fail("--label-column", f"column {label_column!r} of {args.data} holds one class "
                                      f"({labels.labels[0]!r}); a classifier needs at least two")
    train_ids = labels.ids(data.labels) if classify else None
    record = {"train": {"path": os.path.abspath(args.data), "sha256": tabular.sha256(args.data),
                        "rows": len(data)},
              "text_column": args.text_column, "label_column": label_column}
    if args.dev_data is not None:
        dev = _read_data(args, parser, args.dev_data, "--dev-data", args.text_column,
                         label_column)
        try:
            dev_ids = labels.ids(dev.labels, f"{args.dev_data}: ") if classify else None
        except tabular.DataError as e:
            parser.fail("--dev-data", str(e))
        train_texts, dev_texts = data.texts, dev.texts
        record["dev"] = {"path": os.path.abspath(args.dev_data),
                         "sha256": tabular.sha256(args.dev_data), "rows": len(dev)}
    else:
        n = len(data)
        n_dev = int(round(args.dev_fraction * n))
        if not 0 < n_dev < n:
            parser.fail("--dev-fraction", f"{args.dev_fraction:g} of {n} rows gives {n_dev} dev "
                                          f"examples; pass a fraction that leaves both sides "
                                          f"non-empty, or --dev-data FILE")
        seed = 0 if args.seed is None else args.seed
        perm = np.random.default_rng(seed).permutation(n)
        dev_idx, train_idx = perm[:n_dev], perm[n_dev:]
        train_texts = [data.texts[i] for i in train_idx]
        dev_texts = [data.texts[i] for i in dev_idx]
        if classify:
            train_ids, dev_ids = train_ids[train_idx], train_ids[dev_idx]
        else:
            dev_ids = None
        record["dev"] = {"fraction": args.dev_fraction, "split_seed": seed, "rows": n_dev}
    n_train = len(train_texts)
    if args.batch > n_train:
        parser.fail("--batch", f"{args.batch} is larger than the {n_train} training examples")
    extra = {}
    if args.epochs is not None:
        if args.steps is not None or any(s.partition("=")[0].strip() == "steps"
                                         for s in args.set or ()):
            parser.fail("--epochs", "give --epochs or --steps, not both")
        extra["steps"] = ("--epochs", max(1, math.ceil(args.epochs * n_train / args.batch)))
    options, given = _method_for_task(args, parser, extra)
    _check_quantize(args, parser)
    try:
        jobs.check_widths(info, args.method, options, {**_option_flags(args)}, args.seq)
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)
    record["train"]["examples"], record["dev"]["examples"] = n_train, len(dev_texts)
    path, reserved = _out_folder_checked(args, parser, args.method)
    spec = jobs.FinetuneSpec(
        args.task, info, args.method, options, given,
        jobs.Data(train_texts, train_ids, dev_texts, dev_ids, labels, record),
        args.seq, args.batch, args.quantize, path, reserved, not args.no_progress,
        ["jpeft", *argv])
    return jobs.finetune(spec)


def _out_folder_checked(args, parser, name):
    from jpeft.recipes import jobs
    try:
        return _out_folder(args, name)
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)


def _read_data(args, parser, path, flag, text_column, label_column):
    """The rows of a data file, its columns checked (blaming ``--text-column`` /
    ``--label-column``) and read (blaming ``flag``)."""
    from jpeft.recipes import tabular
    try:
        tabular.check_columns(path, {"--text-column": text_column,
                                     "--label-column": label_column})
    except tabular.DataError as e:
        parser.fail(getattr(e, "key", flag), str(e))
    try:
        return tabular.read(path, text_column, label_column)
    except (tabular.DataError, OSError, UnicodeDecodeError) as e:
        parser.fail(flag, str(e))


def _load_run(args, parser):
    """The run folder of ``--run`` and its model folder (``--model`` overrides), no weights."""
    from jpeft.recipes import jobs
    try:
        run = jobs.read_run(args.run)
        info = jobs.run_model(run, getattr(args, "model", None))
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)
    return run, info


def _load_trained(run, info, parser, seq=None):
    from jpeft.recipes import jobs
    try:
        return jobs.load_trained(run, info, seq)
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)


def eval_command(args: argparse.Namespace, parser: Parser) -> int:
    """``jpeft eval``: accuracy and loss of a classifier run on a labelled file, or a decoder
    run's per-token loss on a file of texts."""
    from jpeft.recipes import tabular
    run, info = _load_run(args, parser)
    text_column = args.text_column or run.text_column
    label_column = (args.label_column or run.label_column) if run.task == "seq-cls" else None
    data = _read_data(args, parser, args.data, "--data", text_column, label_column)
    labels = None
    if label_column is not None:
        try:
            labels = run.labels.ids(data.labels, f"{args.data}: ")
        except tabular.DataError as e:
            parser.fail("--data", str(e))
    trained = _load_trained(run, info, parser)
    from jpeft.recipes import jobs
    result = {"run": str(run.path), "data": os.path.abspath(args.data),
              **jobs.evaluate(trained, data.texts, labels, batch=args.batch)}
    if args.json:
        print(json.dumps(result))
    elif run.task == "seq-cls":
        print(f"eval: {result['examples']} examples of {args.data}: accuracy "
              f"{100 * result['accuracy']:.2f}%, loss {result['loss']:.4f}")
    else:
        print(f"eval: {result['examples']} texts ({result['tokens']} tokens) of {args.data}: "
              f"loss per token {result['loss']:.4f}, perplexity {result['perplexity']:.2f}")
    return 0


def predict_command(args: argparse.Namespace, parser: Parser) -> int:
    """``jpeft predict``: a row per input row, written as JSON Lines or CSV by ``--out``'s
    suffix."""
    from jpeft.recipes import jobs, tabular
    run, info = _load_run(args, parser)
    try:
        jobs.check_out_file(args.out, args.overwrite, (".jsonl", ".csv"))
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)
    data = _read_data(args, parser, args.data, "--data", args.text_column or run.text_column,
                      None)
    trained = _load_trained(run, info, parser)
    rows = jobs.predict(trained, data.texts, batch=args.batch,
                        max_new_tokens=args.max_new_tokens)
    jobs.write_file_atomically(args.out, lambda tmp: tabular.write_rows(tmp, rows))
    print(f"predict: {len(rows)} rows of {args.data} -> {args.out}")
    return 0


def merge_command(args: argparse.Namespace, parser: Parser) -> int:
    """``jpeft merge``: the delta merged into the base weights, written as a model folder."""
    from jpeft.recipes import jobs
    run, info = _load_run(args, parser)
    method = jobs.read_method(run).method
    if method.merge is None:
        parser.fail("--run", f"method {method.name!r} of {run.path} cannot be merged into the "
                             f"base weights (it adds computation, not a weight change); use the "
                             f"run as it is (jpeft predict) or export it (jpeft export)")
    try:
        jobs.check_out_dir(args.out, args.overwrite)
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)
    trained = _load_trained(run, info, parser)
    out = jobs.merge(trained, jobs.OutFolder(args.out))
    print(f"merge: {method.name} merged into {info.path} -> {out} (model.safetensors with "
          f"Hugging Face names, config.json)")
    return 0


def export_command(args: argparse.Namespace, parser: Parser) -> int:
    """``jpeft export --format hf-peft``: the adapter as Hugging Face PEFT files."""
    from jpeft.interop import hf_peft
    from jpeft.recipes import jobs
    run, info = _load_run(args, parser)
    loaded = jobs.read_method(run)
    try:
        jobs.check_exportable(loaded.method)
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)
    if not args.allow_function_change:
        try:
            hf_peft.check_same_function({}, loaded.model)
        except ValueError as e:
            parser.fail("--run", f"{e} (on the command line: --allow-function-change)")
    try:
        existed = jobs.check_out_dir(args.out, args.overwrite)
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)
    trained = _load_trained(run, info, parser)
    if os.path.isdir(args.out) and not existed:
        os.rmdir(args.out)                  # an empty folder: written in its place
    try:
        out = jobs.export_hf_peft(trained, args.out, overwrite=existed,
                                  allow_function_change=args.allow_function_change)
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)
    print(f"export: {loaded.method.name} as a Hugging Face PEFT adapter -> {out}")
    return 0


def report_command(args: argparse.Namespace, parser: Parser) -> int:
    """``jpeft report``: parameter counts, FLOPs and memory of a method's train step, before
    training."""
    from jpeft.recipes import jobs
    model = _default_model(args, parser)
    try:
        info = jobs.inspect_model(model, args.task, args.pooling)
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)
    options, given = _method_for_task(args, parser)
    try:
        jobs.check_widths(info, args.method, options, _option_flags(args), args.seq)
    except jobs.CommandError as e:
        parser.fail(e.flag, e.message)
    result = jobs.report(info, args.method, options, seq=args.seq, batch=args.batch,
                         num_labels=args.num_labels, full=not args.no_full, given=given)
    print(json.dumps(result, default=str) if args.json else jobs.format_report(result))
    return 0


# --------------------------------------------------------------------------------------------
# Parsers


def add_quantize_flag(parser: argparse.ArgumentParser) -> None:
    """``--quantize {none,nf4,int8}`` (:mod:`jpeft.recipes.quantization`)."""
    from jpeft.recipes.quantization import CHOICES
    parser.add_argument(
        "--quantize", choices=CHOICES, default="none",
        help="store the base's linear weights quantized after loading (QLoRA: NF4 in blocks of "
             "64 with double-quantized scales, or int8 per output channel; embeddings and the "
             "head stay in full precision) and train on top; the merge check merges into the "
             "dequantized base (default: none)")


def add_method_flags(p: argparse.ArgumentParser, *, seed_default: int | None = 0) -> None:
    """``--method``, ``--set`` and the flags of common preset options."""
    p.add_argument("--method", choices=presets.names(), default="lora", metavar="METHOD",
                   help=f"the method preset (default: lora): {', '.join(presets.names())}; "
                        f"see `jpeft presets`")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set any option of the preset (repeatable; see `jpeft presets`)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="training steps (preset default: 250)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate (default per preset)")
    p.add_argument("--head-lr", type=positive_float, default=None,
                   help="peak learning rate of the head (preset default: 1e-2)")
    p.add_argument("--seed", type=nonnegative_int, default=seed_default,
                   help="data split, initialisation, data order (default: 0)")
    p.add_argument("--rank", type=positive_int, default=None, help="LoRA rank (8)")
    p.add_argument("--alpha", type=positive_float, default=None, help="LoRA/AdaLoRA alpha (8)")
    p.add_argument("--fraction", type=unit_fraction, default=None,
                   help="FAR: kept fraction of FFN columns (0.2)")
    p.add_argument("--warmup-steps", type=positive_int, default=None,
                   help="FAR: warm-up steps for scoring (20)")
    p.add_argument("--far-score", choices=presets.FAR_SCORES, default=None,
                   help="FAR: rank columns by their change over the warm-up or by magnitude "
                        "(change)")
    p.add_argument("--density", type=unit_fraction, default=None,
                   help="diff pruning / FishMask: kept fraction of all entries but the head's "
                        "(0.005)")
    p.add_argument("--refine-steps", type=nonnegative_int, default=None,
                   help="diff pruning: re-fine-tune steps with the mask fixed (50)")
    p.add_argument("--structured", action="store_true", default=None,
                   help="diff pruning: one gate per tensor too")
    p.add_argument("--d", type=positive_int, default=None,
                   help="SAID/DID: intrinsic dimension (1000)")
    p.add_argument("--fisher-examples", type=positive_int, default=None,
                   help="FishMask: examples for the empirical Fisher (256; paper: 1024)")


def _add_out(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", default=None, metavar="DIR",
                   help=f"the folder to write {what} (default: a new runs/<method>-<UTC time>); "
                        f"an existing non-empty folder is refused unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder, only once the new one is complete")


def _add_task(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=("seq-cls", "causal-lm"), default="seq-cls",
                   help="seq-cls: a BERT-style sequence classifier (default); causal-lm: a "
                        "LLaMA-style decoder trained on the texts (next-token loss)")
    p.add_argument("--model", type=existing_dir, default=None, metavar="DIR",
                   help="Hugging Face model folder (config.json + model.safetensors; a "
                        "classifier's tokenizer.json); default for seq-cls: the embedded MiniLM")
    p.add_argument("--pooling", choices=("auto", "mean", "cls"), default="auto",
                   help="seq-cls: sentence pooling of the classifier: mean of the tokens, or "
                        "BERT's CLS pooler; auto: mean for a sentence-transformers folder or one "
                        "without pooler weights, else cls (default: auto)")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", type=existing_dir, required=True, metavar="DIR",
                   help="a run folder written by jpeft finetune")
    p.add_argument("--model", type=existing_dir, default=None, metavar="DIR",
                   help="the base model folder, if it moved (default: the one run.json records)")


def _add_data_columns(p: argparse.ArgumentParser, labels: bool, default: str | None) -> None:
    p.add_argument("--text-column", default=default, metavar="NAME",
                   help="the column holding the text" + (f" (default: {default})" if default
                                                         else " (default: the run's)"))
    if labels:
        p.add_argument("--label-column", default=None, metavar="NAME",
                       help="the column holding the label (default: " +
                            ("label; not used with --task causal-lm)" if default else
                             "the run's)"))


def _add_batch_seq(p: argparse.ArgumentParser, batch: int, seq: int | None,
                   batch_help: str = "examples per training step") -> None:
    p.add_argument("--batch", type=positive_int, default=batch,
                   help=f"{batch_help} (default: {batch})")
    if seq is not None:
        p.add_argument("--seq", type=positive_int, default=seq,
                       help=f"tokens per example: longer texts are cut, shorter ones padded "
                            f"(default: {seq})")


def build_parser() -> argparse.ArgumentParser:
    """The ``jpeft`` argument parser and its subcommands."""
    parser = Parser(prog="jpeft", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--release-host-memory", action="store_true",
        help="keep glibc's default of returning freed memory to the OS (by default importing "
             "jpeft keeps it for reuse on CPU: XLA:CPU's temporaries are reused, not faulted in "
             "again every step); the same as JPEFT_HOST_MEMORY=release")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser("finetune", help="fine-tune on your own data (CSV/JSONL) and model")
    _add_task(f)
    f.add_argument("--data", type=data_file, required=True, metavar="FILE",
                   help="training data: a .csv (header row) or .jsonl (an object per line)")
    _add_data_columns(f, True, "text")
    f.add_argument("--dev-data", type=data_file, default=None, metavar="FILE",
                   help="held-out data (same columns) for the dev accuracy/loss; default: a "
                        "seeded --dev-fraction of --data")
    f.add_argument("--dev-fraction", type=open_fraction, default=0.1,
                   help="fraction of --data held out as dev set when --dev-data is not given, "
                        "split by --seed (default: 0.1)")
    add_method_flags(f, seed_default=None)
    f.add_argument("--epochs", type=positive_float, default=None,
                   help="train for this many passes over the training data (instead of "
                        "--steps)")
    _add_batch_seq(f, 32, 128)
    add_quantize_flag(f)
    _add_out(f, "the run (adapter, labels.json, run.json, metrics.jsonl)")
    f.add_argument("--no-progress", action="store_true",
                   help="no progress display while training (by default a bar on a terminal, a "
                        "plain line every tenth of the steps otherwise)")

    e = sub.add_parser("eval", help="accuracy and loss of a run on a labelled file (a "
                                    "decoder: per-token loss)")
    _add_run_flags(e)
    e.add_argument("--data", type=data_file, required=True, metavar="FILE",
                   help="a .csv or .jsonl file with the run's text and label columns")
    _add_data_columns(e, True, None)
    _add_batch_seq(e, 64, None, "examples per evaluation batch")
    e.add_argument("--json", action="store_true", help="print the result as one JSON object")

    p = sub.add_parser("predict", help="predictions of a run for every row of a file")
    _add_run_flags(p)
    p.add_argument("--data", type=data_file, required=True, metavar="FILE",
                   help="a .csv or .jsonl file with the run's text column")
    _add_data_columns(p, False, None)
    p.add_argument("--out", required=True, metavar="FILE",
                   help="predictions file, .jsonl or .csv: per row the text, the predicted "
                        "label and the probability of each label (p_<label>); a decoder: the "
                        "text and its greedy continuation")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    _add_batch_seq(p, 64, None, "examples per prediction batch")
    p.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="causal-lm: tokens to generate per text (default: 32)")

    m = sub.add_parser("merge", help="write the base with the adapter merged into its weights "
                                     "(safetensors, Hugging Face names)")
    _add_run_flags(m)
    m.add_argument("--out", required=True, metavar="DIR",
                   help="the model folder to write (model.safetensors, config.json, tokenizer "
                        "files); an existing non-empty folder is refused unless --overwrite")
    m.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder, only once the new one is complete")

    x = sub.add_parser("export", help="write a run's adapter in another library's format")
    _add_run_flags(x)
    x.add_argument("--format", choices=("hf-peft",), default="hf-peft",
                   help="hf-peft: Hugging Face PEFT's adapter_config.json + "
                        "adapter_model.safetensors (LoRA, AdaLoRA, IA3, prompt and prefix "
                        "tuning; a trained head as modules_to_save) (default: hf-peft)")
    x.add_argument("--out", required=True, metavar="DIR",
                   help="the adapter folder to write; an existing non-empty folder is refused "
                        "unless --overwrite")
    x.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder, only once the new one is complete")
    x.add_argument("--allow-function-change", action="store_true",
                   help="write the adapter of a mean-pooled classifier although torch's "
                        "BertForSequenceClassification (CLS pooler) will predict otherwise")

    r = sub.add_parser("report", help="trainable parameters, train-step FLOPs and memory of a "
                                      "method on a model, relative to full fine-tuning (no "
                                      "training)")
    _add_task(r)
    add_method_flags(r)
    _add_batch_seq(r, 8, 128, "examples per train step compiled")
    r.add_argument("--num-labels", type=positive_int, default=2,
                   help="seq-cls: labels of the classification head (default: 2)")
    r.add_argument("--no-full", action="store_true",
                   help="skip compiling full fine-tuning as the reference")
    r.add_argument("--json", action="store_true", help="print the report as one JSON object")

    sub.add_parser("rlhf", add_help=False,
                   help="RLHF on one frozen base: --stage sft|reward|ppo|dpo|all --out DIR "
                        "(jpeft.rlhf.pipeline; `jpeft rlhf --help` for its flags)")
    sub.add_parser("presets", help="list the method presets, their stages and options")
    d = sub.add_parser("demo", help="fine-tune the embedded MiniLM on movie-review sentiment")
    add_method_flags(d)
    _add_batch_seq(d, 32, 64)
    d.add_argument("--dev-limit", type=nonnegative_int, default=0,
                   help="evaluate on the first N dev examples (default: 0, all)")
    add_quantize_flag(d)
    _add_out(d, "the run's adapter")
    d.add_argument("--no-progress", action="store_true",
                   help="no progress display while training (by default a bar on a terminal, a "
                        "plain line every tenth of the steps otherwise)")
    from jpeft.recipes.decoder import LR
    g = sub.add_parser("decoder", help="a tiny byte-level decoder: base trained on negative "
                                       "reviews, an adapter on positive ones; generations before "
                                       "and after")
    g.add_argument("--method", default="lora",
                   help=f"one or several (comma-separated) of {', '.join(sorted(LR))}")
    g.add_argument("--steps", type=positive_int, default=200,
                   help="adapter training steps (default: 200)")
    g.add_argument("--base-steps", type=positive_int, default=300,
                   help="base model training steps (default: 300)")
    g.add_argument("--lr", type=positive_float, default=None,
                   help="adapter peak learning rate (default per method)")
    g.add_argument("--seed", type=nonnegative_int, default=0,
                   help="initialisation and data order (default: 0)")
    g.add_argument("--temperature", type=nonnegative_float, default=0.8,
                   help="sampling temperature of the continuations, 0 for greedy (default: 0.8; "
                        "the same random draws before and after training)")
    g.add_argument("--top-k", type=byte_top_k, default=20,
                   help="sample from the k most likely bytes (default: 20)")
    add_quantize_flag(g)
    add_plan_parser(sub)
    return parser


PLAN_FLAGS = ("model", "method", "targets", "mesh", "batch", "seq", "remat", "rank", "alpha",
              "device_memory", "dtype")


def add_plan_parser(sub) -> None:
    """``jpeft plan``: size a sharded run by compiling its train step (:mod:`jpeft.plan`)."""
    from jpeft import plan as plan_lib
    p = sub.add_parser(
        "plan", help="size a sharded fine-tuning run: compile its train step for a mesh of "
                     "forced host devices (no weights) and print per-device memory and FLOPs")
    p.add_argument("--model", default="tiny",
                   help=f"{', '.join(plan_lib.MODELS)}, or a path to a Hugging Face LLaMA "
                        f"config.json (default: tiny)")
    p.add_argument("--method", default="lora", help=f"{', '.join(plan_lib.METHODS)} (qlora: NF4 "
                                                    f"base, LoRA on top; default: lora)")
    p.add_argument("--targets", default="all-linear",
                   help="LoRA targets: all-linear or comma-separated module names, e.g. "
                        "q_proj,v_proj (default: all-linear)")
    p.add_argument("--mesh", default="fsdp=8",
                   help="mesh axes and sizes, e.g. fsdp=16,tp=4 or dp=8 (axes dp, fsdp, tp; "
                        "default: fsdp=8)")
    p.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    p.add_argument("--seq", type=int, default=16, help="sequence length")
    p.add_argument("--remat", default="none", help=f"{', '.join(plan_lib.REMAT)} (default: none)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default: 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 2 x rank)")
    p.add_argument("--device-memory", default=None,
                   help=f"memory per device to check against: {', '.join(plan_lib.DEVICE_MEMORY)}"
                        f" (decimal GB), or any size such as 24GiB")
    p.add_argument("--dtype", default="bfloat16", help=f"base weights and computation: "
                                                       f"{', '.join(plan_lib.DTYPES)}")
    p.add_argument("--no-reexec", action="store_true",
                   help="fail when this process's device count differs from the mesh size "
                        "instead of re-running with XLA_FLAGS=--xla_force_host_platform_device_"
                        "count=N JAX_PLATFORMS=cpu")


def plan_command(args: argparse.Namespace) -> int:
    """``jpeft plan``: validate the flags (a one-line error naming the flag, exit 2), make sure
    the process has exactly as many devices as the mesh (else re-run itself with that many forced
    host devices, unless ``--no-reexec``), then compile and print :func:`jpeft.plan.format_plan`."""
    from jpeft import plan as plan_lib
    targets = args.targets if args.targets == "all-linear" else tuple(
        t.strip() for t in args.targets.split(",") if t.strip())
    kw = dict(targets=targets, mesh=args.mesh, batch=args.batch, seq=args.seq, remat=args.remat,
              rank=args.rank, alpha=args.alpha, device_memory=args.device_memory,
              dtype=args.dtype)
    try:
        _, sizes, _ = plan_lib.check(args.model, args.method, args.mesh, args.batch, args.seq,
                                     args.remat, args.device_memory, args.dtype, args.rank)
        n = plan_lib.mesh_size(sizes)
        import jax
        have = jax.device_count()
        if have != n:
            if args.no_reexec or os.environ.get("JPEFT_PLAN_CHILD"):
                raise plan_lib.PlanError(
                    "--mesh", f"the mesh has {n} devices, this process has {have} (run without "
                              f"--no-reexec, or set XLA_FLAGS=--xla_force_host_platform_device_"
                              f"count={n} JAX_PLATFORMS=cpu)")
            return _rerun_plan(args, n)
        result = plan_lib.plan(args.model, args.method, **kw)
    except plan_lib.PlanError as e:
        print(f"jpeft plan: error: {e}", file=sys.stderr)
        return 2
    print(plan_lib.format_plan(result))
    return 0


def _rerun_plan(args: argparse.Namespace, n: int) -> int:
    """Run ``jpeft plan`` with the same flags in a new process with ``n`` forced host devices."""
    import subprocess
    argv = [sys.executable, "-m", "jpeft.cli", "plan"]
    for name in PLAN_FLAGS:
        value = getattr(args, name)
        if value is not None:
            argv += ["--" + name.replace("_", "-"), str(value)]
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JPEFT_PLAN_CHILD": "1",
           "XLA_FLAGS": " ".join(flags + [f"--xla_force_host_platform_device_count={n}"])}
    sys.stdout.flush()
    return subprocess.run(argv, env=env).returncode


def _silence_stdout() -> None:
    """After a closed pipe (``jpeft presets | head``): point stdout at /dev/null so that the
    interpreter's last flush does not fail again (Python's documented recipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        sys.stdout = open(os.devnull, "w")


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors in the flags exit with 2). A
    reader that closes the pipe early (``jpeft presets | head``) ends it quietly with 0."""
    try:
        status = _main(argv)
        sys.stdout.flush()
        return status
    except BrokenPipeError:
        _silence_stdout()
        return 0


def _subparser(parser: argparse.ArgumentParser, command: str) -> Parser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[command]
    raise KeyError(command)


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["rlhf"]:                      # its own parser: jpeft.rlhf.pipeline
        from jpeft.rlhf import pipeline
        return pipeline.main(argv[1:])
    args = parser.parse_args(argv)
    if args.release_host_memory and host_memory.retained():
        # importing jpeft kept freed host memory (the default); only a fresh process undoes it
        host_memory.rerun_released(["-m", "jpeft.cli", *argv])
    if args.command == "presets":
        return list_presets()
    if args.command == "decoder":
        return decoder_example(args)
    if args.command == "plan":
        return plan_command(args)
    sub = _subparser(parser, args.command)
    if args.command == "finetune":
        return finetune_command(args, sub, argv)
    if args.command == "eval":
        return eval_command(args, sub)
    if args.command == "predict":
        return predict_command(args, sub)
    if args.command == "merge":
        return merge_command(args, sub)
    if args.command == "export":
        return export_command(args, sub)
    if args.command == "report":
        return report_command(args, sub)
    try:
        options = preset_options(args)
    except OptionError as e:
        sub.fail(e.flag, str(e))
    _check_quantize(args, sub)
    from jpeft.recipes import jobs
    from jpeft.data.embedded import minilm_dir
    try:
        info = jobs.inspect_model(minilm_dir(), "seq-cls")
        jobs.check_widths(info, args.method, options, _option_flags(args), args.seq)
    except jobs.CommandError as e:
        sub.fail(e.flag, e.message)
    try:
        if args.out is not None:
            jobs.check_out_dir(args.out, args.overwrite)
    except jobs.CommandError as e:
        sub.fail(e.flag, e.message)
    return demo(args, options)


if __name__ == "__main__":
    sys.exit(main())
