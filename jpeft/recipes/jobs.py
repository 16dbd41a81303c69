"""The command line's jobs on your own model and data: ``finetune``, ``eval``, ``predict``,
``merge``, ``export`` and ``report`` (:mod:`jpeft.cli` validates every value first, then calls
these).

Two tasks:

* ``seq-cls``: a Hugging Face BERT-style directory (``config.json``, ``model.safetensors``,
  ``tokenizer.json``; the embedded MiniLM by default) with a classification head of as many
  labels as the data has, trained by any method preset through the one recipe
  (:func:`jpeft.recipes.finetune.run`: dev accuracy before and after, reload and merge checks).
  Pooling ``auto``: mean pooling for a sentence-transformers directory (``1_Pooling``) or one
  without pooler weights, BERT's CLS pooler otherwise.
* ``causal-lm``: a LLaMA-style directory (``config.json``, ``model.safetensors``) trained on the
  texts with next-token cross-entropy, by one of :data:`DECODER_METHODS`. Tokenizer: the
  directory's ``tokenizer.json`` when the ``tokenizers`` library reads it offline, else byte-level
  (UTF-8 bytes as token ids, which needs a vocabulary of at least 256), as
  :mod:`jpeft.recipes.decoder` does; ``run.json`` records which.

A *run folder* holds the adapter (``delta/``: :func:`jpeft.save` with the model record), the
label map (``labels.json``), everything that rebuilds the run (``run.json``: model directory,
task, method preset, options and config, data paths and SHA-256, columns, sequence length, batch,
seed, quantization) and the metrics of training and of every evaluation (``metrics.jsonl``).
Folders are never written twice: the default is ``runs/<method>-<UTC time>`` (a suffix when
taken); an existing non-empty ``--out`` is refused unless ``--overwrite``. A run is written into
a temporary sibling folder and renamed into place only once it completed: an interrupted run
leaves nothing at ``--out``, and with ``--overwrite`` the previous folder is replaced only after
the new run succeeded.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np

from jpeft import presets
from jpeft.recipes import tabular

RUN_FILE = "run.json"
LABELS_FILE = "labels.json"
METRICS_FILE = "metrics.jsonl"
DELTA_DIR = "delta"
TASKS = ("seq-cls", "causal-lm")
#: Sequence-length buckets of the classifier's batches (as the demo's).
BUCKETS = (16, 24, 32, 48, 64, 96, 128)


class CommandError(Exception):
    """A value the command cannot use: ``flag`` (e.g. ``"--rank"``) and a one-line ``message``;
    the command line prints ``jpeft <cmd>: error: <flag>: <message>`` and exits with 2."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag
        self.message = message


# --------------------------------------------------------------------------------------------
# The model directory, read without loading weights


class ModelInfo(NamedTuple):
    """A model directory as read from its files, weights not loaded: ``config`` (config.json),
    the ``weights`` files, the classifier's resolved ``pooling`` (``None`` for a decoder) and its
    ``tokenizer`` file (``None``: none; a decoder is then byte-level)."""
    path: Path
    task: str
    config: dict
    weights: tuple[Path, ...]
    pooling: str | None
    tokenizer: Path | None

    @property
    def hidden_size(self) -> int:
        return int(self.config.get("hidden_size", 0))


def _weight_keys(weights: Sequence[Path]) -> set[str]:
    """Tensor names of safetensors files (headers only)."""
    from safetensors import safe_open
    keys: set[str] = set()
    for w in weights:
        with safe_open(str(w), framework="numpy") as f:
            keys.update(f.keys())
    return keys


def _auto_pooling(path: Path, weights: Sequence[Path]) -> str:
    pooling_config = path / "1_Pooling" / "config.json"
    if pooling_config.is_file():
        try:
            conf = json.loads(pooling_config.read_text())
        except (OSError, json.JSONDecodeError):
            conf = {}
        if conf.get("pooling_mode_mean_tokens"):
            return "mean"
        if conf.get("pooling_mode_cls_token"):
            return "cls"
    keys = _weight_keys(weights)
    return "cls" if any(k.endswith("pooler.dense.weight") for k in keys) else "mean"


def inspect_model(path: str | os.PathLike, task: str, pooling: str = "auto") -> ModelInfo:
    """Read a model directory's config and file list for ``task`` (no weights loaded).

    Raises:
      CommandError: (``--model``) a missing directory, config.json or weights, a config that is
        not JSON, a classifier without tokenizer.json, a decoder config jpeft's LLaMA cannot
        build (its reason), a byte-level decoder with a vocabulary under 256.
    """
    path = Path(path)
    flag = "--model"
    if not path.is_dir():
        raise CommandError(flag, f"{path} is not a directory")
    try:
        config = json.loads((path / "config.json").read_text())
    except FileNotFoundError:
        raise CommandError(flag, f"no config.json in {path}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CommandError(flag, f"{path / 'config.json'} is not readable JSON ({e})") from None
    if not isinstance(config, dict):
        raise CommandError(flag, f"{path / 'config.json'} is not a JSON object")
    if (path / "model.safetensors").is_file():
        weights: tuple[Path, ...] = (path / "model.safetensors",)
    elif (path / "model.safetensors.index.json").is_file():
        try:
            index = json.loads((path / "model.safetensors.index.json").read_text())
            weights = tuple(path / n for n in sorted(set(index["weight_map"].values())))
        except (OSError, json.JSONDecodeError, KeyError, AttributeError) as e:
            raise CommandError(flag, f"{path / 'model.safetensors.index.json'} is not a "
                                     f"safetensors index ({e})") from None
    else:
        raise CommandError(flag, f"no model.safetensors (or model.safetensors.index.json) in "
                                 f"{path}")
    tokenizer = path / "tokenizer.json"
    tokenizer = tokenizer if tokenizer.is_file() else None
    if task == "seq-cls":
        if "hidden_size" not in config or "num_attention_heads" not in config:
            raise CommandError(flag, f"{path / 'config.json'} is not a BERT-style config "
                                     f"(no hidden_size / num_attention_heads)")
        if tokenizer is None:
            raise CommandError(flag, f"no tokenizer.json in {path} (a classifier needs its "
                                     f"Hugging Face tokenizer)")
        if pooling == "auto":
            pooling = _auto_pooling(path, weights)
        return ModelInfo(path.absolute(), task, config, weights, pooling, tokenizer)
    from jpeft.models.llama import LlamaConfig
    try:
        LlamaConfig.from_dict(config)
    except (ValueError, TypeError) as e:
        raise CommandError(flag, f"{path / 'config.json'}: not a LLaMA config jpeft can build "
                                 f"({e})") from None
    if tokenizer is None and int(config.get("vocab_size", 0)) < 256:
        raise CommandError(flag, f"{path} has no tokenizer.json and a vocabulary of "
                                 f"{config.get('vocab_size')} tokens; byte-level tokens need "
                                 f"at least 256")
    return ModelInfo(path.absolute(), task, config, weights, None, tokenizer)


# --------------------------------------------------------------------------------------------
# Methods on a decoder


class DecoderMethod(NamedTuple):
    """A method on a LLaMA-style decoder: the preset options it reads and its factory."""
    options: tuple[str, ...]
    build: Callable[[dict], Any]


def _decoder_methods() -> dict[str, DecoderMethod]:
    import jpeft
    from jpeft.methods import ia3, prefix, prompt
    common = ("steps", "lr", "seed")
    return {
        "lora": DecoderMethod(common + ("rank", "alpha"), lambda o: jpeft.lora(
            ("q_proj", "v_proj"), rank=o["rank"], alpha=o["alpha"])),
        "lora-all-linear": DecoderMethod(common + ("rank", "alpha"), lambda o: jpeft.lora(
            "all-linear", rank=o["rank"], alpha=o["alpha"], exclude=("lm_head",))),
        "ia3": DecoderMethod(common, lambda o: ia3.ia3()),
        "prompt": DecoderMethod(common + ("length",),
                                lambda o: prompt.prompt_tuning(o["length"])),
        "prefix": DecoderMethod(common + ("length",),
                                lambda o: prefix.prefix_tuning(o["length"])),
    }


#: The presets ``--task causal-lm`` trains (LoRA on q_proj/v_proj or on every linear weight but
#: lm_head, IA3, prompt tuning, prefix tuning without reparametrisation); no head is trained.
DECODER_METHODS = ("lora", "lora-all-linear", "ia3", "prompt", "prefix")


def decoder_method(name: str, options: dict) -> Any:
    return _decoder_methods()[name].build(options)


def decoder_options(name: str) -> tuple[str, ...]:
    return _decoder_methods()[name].options


def decoder_lr(name: str, options: dict, given: Sequence[str]) -> float:
    """The decoder's peak learning rate: ``lr`` when given, else the decoder example's
    (:data:`jpeft.recipes.decoder.LR`)."""
    from jpeft.recipes.decoder import LR
    if "lr" in given and options.get("lr") is not None:
        return float(options["lr"])
    return LR["lora" if name.startswith("lora") else name]


def check_widths(info: ModelInfo, preset: str, options: dict, flags: dict[str, str],
                 seq: int | None = None) -> None:
    """Option values against the model's sizes from its config (no weights): a LoRA / AdaLoRA
    rank no larger than the adapted weights' smaller side, an adapter reduction factor no larger
    than the width, a classifier's sequence (plus prompt) within its position embeddings.
    ``flags`` maps option names to the flag that set them (blamed in the error).

    Raises:
      CommandError: naming the flag, the value and the limit from config.json.
    """
    c = info.config
    hidden = int(c.get("hidden_size", 0))
    if info.task == "causal-lm":
        heads = int(c.get("num_attention_heads", 1))
        kv = int(c.get("num_key_value_heads") or heads)
        head_dim = int(c.get("head_dim") or hidden // max(heads, 1))
        sides = [hidden, kv * head_dim, heads * head_dim]
        if preset == "lora-all-linear":
            sides.append(int(c.get("intermediate_size", hidden)))
        limit, what = min(sides), "the smaller side of the adapted projections"
    else:
        sides = [hidden] + ([int(c.get("intermediate_size", hidden))]
                            if preset == "lora-all-linear" else [])
        limit, what = min(sides), "the smaller side of the adapted weights"
    for key in ("rank", "init_r"):
        if key in options and isinstance(options[key], int) and options[key] > limit:
            raise CommandError(flags.get(key, "--set " + key),
                               f"{key} {options[key]} is larger than {what} ({limit}, from "
                               f"{info.path / 'config.json'}): a larger rank adds parameters "
                               f"and no expressiveness")
    if "reduction_factor" in options and options["reduction_factor"] > hidden > 0:
        raise CommandError(flags.get("reduction_factor", "--set reduction_factor"),
                           f"reduction_factor {options['reduction_factor']} is larger than the "
                           f"hidden size {hidden}: the adapter's bottleneck would be empty")
    if info.task == "seq-cls" and seq is not None:
        positions = int(c.get("max_position_embeddings", 0)) or None
        extra = options.get("length", 0) if preset == "prompt" else 0
        if positions is not None and seq + extra > positions:
            flag = "--seq" if seq > positions else flags.get("length", "--set length")
            raise CommandError(flag, f"sequence length {seq}"
                                     + (f" + {extra} prompt tokens" if extra else "")
                                     + f" exceeds the model's {positions} position embeddings "
                                       f"(max_position_embeddings in {info.path / 'config.json'})")


# --------------------------------------------------------------------------------------------
# Output folders


def utc_stamp(now: datetime.datetime | None = None) -> str:
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y%m%dT%H%M%SZ")


def reserve_run_dir(name: str, root: str | os.PathLike = "runs") -> Path:
    """A new folder ``root/<name>-<UTC time>`` (``-2``, ``-3``, ... when taken), created empty
    now so that no other run takes it."""
    base = Path(root) / f"{name}-{utc_stamp()}"
    Path(root).mkdir(parents=True, exist_ok=True)
    path, n = base, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def check_out_dir(path: str | os.PathLike, overwrite: bool, flag: str = "--out") -> bool:
    """An output folder may be written: absent, empty, or (with ``overwrite``) replaced.
    Returns whether it holds something (then replaced only once the new one is complete).

    Raises:
      CommandError: a file in the way, or a non-empty folder without ``overwrite``.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CommandError(flag, f"{path} exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise CommandError(flag, f"{path} exists and is not empty; choose another folder, "
                                     f"or pass --overwrite to replace it once the new one is "
                                     f"complete")
        return True
    return False


def check_out_file(path: str | os.PathLike, overwrite: bool, suffixes: Sequence[str],
                   flag: str = "--out") -> None:
    """An output file may be written: a known suffix, a folder to write it in, and absent or
    (with ``overwrite``) replaced."""
    path = Path(path)
    if path.suffix.lower() not in suffixes:
        raise CommandError(flag, f"{path}: expected a file ending in {' or '.join(suffixes)}")
    if path.is_dir():
        raise CommandError(flag, f"{path} is a folder")
    if path.exists() and not overwrite:
        raise CommandError(flag, f"{path} exists; choose another file or pass --overwrite")
    if not path.absolute().parent.is_dir():
        raise CommandError(flag, f"no folder {path.absolute().parent} to write {path.name} in")


class OutFolder:
    """A folder written all or nothing: into a temporary sibling (``tmp``), renamed to ``path``
    by :meth:`commit` (a previous folder there set aside first and deleted once the rename is
    done); :meth:`abort` removes the temporary folder and an empty ``path`` this run reserved."""

    def __init__(self, path: str | os.PathLike, reserved: bool = False):
        self.path = Path(path).absolute()
        self.reserved = reserved
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.partial-",
                                         dir=self.path.parent))

    def commit(self) -> Path:
        aside = None
        if self.path.is_dir() and any(self.path.iterdir()):
            aside = self.path.with_name(f".{self.path.name}.old-{uuid.uuid4().hex[:8]}")
            os.rename(self.path, aside)
        elif self.path.is_dir():
            self.path.rmdir()
        os.rename(self.tmp, self.path)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
        if self.reserved and self.path.is_dir() and not any(self.path.iterdir()):
            self.path.rmdir()


def write_file_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` then rename ``tmp`` to ``path``."""
    path = Path(path).absolute()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.partial-", suffix=path.suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunLog:
    """The run's log: prints each message (the temporary folder's path shown as the run's
    final path) and appends JSON records to ``metrics.jsonl`` (:meth:`metric`)."""

    def __init__(self, folder: OutFolder, echo: Callable[[str], None] = print):
        self.folder = folder
        self.echo = echo
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        self.echo(str(message).replace(str(self.folder.tmp), str(self.folder.path)))

    def metric(self, **record: Any) -> None:
        record = {"seconds": round(time.perf_counter() - self.t0, 3), **record}
        with open(self.folder.tmp / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _train_records(log: Any, name: str, losses: Sequence[float], batch: int, n_train: int
                   ) -> None:
    """``metrics.jsonl`` records of a training run: the mean loss over every interval of about
    a tenth of the steps and over every epoch."""
    metric = getattr(log, "metric", None)
    if metric is None or not losses:
        return
    from jpeft.recipes.progress import default_every
    every = default_every(len(losses))
    per_epoch = max(1, n_train // batch)
    for end in range(every, len(losses) + every, every):
        end = min(end, len(losses))
        metric(event="train", method=name, step=end, epoch=round(end / per_epoch, 4),
               loss=float(np.mean(losses[end - every:end])))
        if end == len(losses):
            break
    for e in range(0, len(losses), per_epoch):
        chunk = losses[e:e + per_epoch]
        metric(event="epoch", method=name, epoch=e // per_epoch + 1, steps=len(chunk),
               complete=len(chunk) == per_epoch, loss=float(np.mean(chunk)))


def cross_entropy(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy of ``logits [N, C]`` against integer ``labels``."""
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return float(-np.mean(logp[np.arange(len(labels)), labels]))


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


# --------------------------------------------------------------------------------------------
# Loading bases (the only places that read model weights)


class ClassifierBase(NamedTuple):
    """A BERT classifier loaded for a run: the module, its variables and sites, tokenizer,
    model record."""
    model_dir: Path
    model: Any
    variables: Any
    sites: Any
    tokenizer: Any
    record: dict
    seq: int

    def encode(self, texts: Sequence[str]) -> dict:
        from jpeft.models.tokenizer import encode
        return encode(self.tokenizer, list(texts))

    def example(self) -> tuple:
        x = self.encode(["a", "b"])
        return x["input_ids"], x["attention_mask"], x["token_type_ids"]


def load_classifier(model_dir: Path, num_labels: int, pooling: str, seq: int) -> ClassifierBase:
    """:func:`jpeft.models.loading.load_hf_bert` with a ``num_labels`` head and ``pooling``, its
    tokenizer cut/padded to ``seq``, and its sites."""
    from jpeft.core.sites import probe
    from jpeft.models import loading
    from jpeft.models.tokenizer import load_tokenizer
    loaded = loading.load_hf_bert(model_dir, num_labels=num_labels, pooling=pooling)
    tok = load_tokenizer(Path(model_dir) / "tokenizer.json", max_length=seq)
    variables = {"params": loaded.params}
    base = ClassifierBase(Path(model_dir), loaded.model, variables, None, tok,
                          loading.model_record(loaded.model), seq)
    sites = probe(loaded.model.apply, variables, *base.example())
    return base._replace(sites=sites)


class Codec(NamedTuple):
    """A decoder's text <-> token ids: a ``tokenizers`` tokenizer, or bytes (``tokenizer``
    ``None``). Padding is id 0 with mask 0."""
    tokenizer: Any
    description: str

    def encode(self, texts: Sequence[str], length: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.zeros((len(texts), length), np.int32)
        mask = np.zeros((len(texts), length), np.int32)
        if self.tokenizer is None:
            rows = [np.frombuffer(t.encode("utf-8", "replace"), np.uint8) for t in texts]
        else:
            rows = [np.asarray(e.ids, np.int32) for e in self.tokenizer.encode_batch(list(texts))]
        for i, r in enumerate(rows):
            r = r[:length]
            ids[i, :r.size], mask[i, :r.size] = r, 1
        return ids, mask

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.tokenizer is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", "replace")
        return self.tokenizer.decode(ids)


def load_codec(info_tokenizer: Path | None, log: Callable[[str], None] = print) -> Codec:
    """The directory's tokenizer.json through ``tokenizers`` (offline), else byte-level."""
    if info_tokenizer is not None:
        try:
            from tokenizers import Tokenizer
            tok = Tokenizer.from_file(str(info_tokenizer))
            tok.no_padding()
            tok.no_truncation()
            return Codec(tok, f"tokenizer {info_tokenizer}")
        except Exception as e:     # noqa: BLE001 - any unreadable tokenizer: bytes instead
            log(f"tokenizer {info_tokenizer} not loadable offline ({e}); using byte-level "
                f"tokens")
    return Codec(None, "byte-level (UTF-8 bytes as token ids)")


class DecoderBase(NamedTuple):
    """A LLaMA decoder loaded for a run: the module, ``apply`` and ``params``
    (:func:`jpeft.nnx.split`), sites, codec, model record."""
    model_dir: Path
    model: Any
    apply: Callable[..., Any]
    params: Any
    sites: Any
    codec: Codec
    record: dict
    seq: int

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.codec.encode(texts, self.seq)


def load_decoder(model_dir: Path, tokenizer: Path | None, seq: int,
                 log: Callable[[str], None] = print) -> DecoderBase:
    """:func:`jpeft.models.llama.load_hf_llama` split into ``apply`` / ``params``, its sites,
    its codec (:func:`load_codec`)."""
    import jpeft
    from jpeft.core.sites import probe
    from jpeft.models import llama
    from jpeft.models.loading import model_record
    model = llama.load_hf_llama(model_dir)
    apply, params = jpeft.nnx.split(model)
    codec = load_codec(tokenizer, log)
    ids, mask = codec.encode(["a", "b"], seq)
    sites = probe(apply, params, ids, mask)
    return DecoderBase(Path(model_dir), model, apply, params, sites, codec, model_record(model),
                       seq)


# --------------------------------------------------------------------------------------------
# Fine-tuning


class Data(NamedTuple):
    """Validated data of a fine-tuning run: train and dev texts (and label ids), and what
    run.json records about them."""
    train_texts: list[str]
    train_labels: np.ndarray | None
    dev_texts: list[str]
    dev_labels: np.ndarray | None
    labels: tabular.LabelMap | None
    record: dict


class FinetuneSpec(NamedTuple):
    """Everything ``jpeft finetune`` validated, before anything loads."""
    task: str
    model: ModelInfo
    preset: str
    options: dict
    given: tuple[str, ...]
    data: Data
    seq: int
    batch: int
    quantize: str
    out: Path
    reserved: bool
    progress: bool
    argv: list[str]


def _classifier_env_class():
    from jpeft.recipes import classification as clf

    class RunEnv(clf.ClassifierEnv):
        """:class:`ClassifierEnv` whose training and evaluations are also recorded in the run's
        ``metrics.jsonl`` (through its ``log``'s ``metric``)."""
        __slots__ = ()

        def fit(self, method, delta, *, steps, optimizer, mode="factored", seed=0):
            result = clf.ClassifierEnv.fit(self, method, delta, steps=steps, optimizer=optimizer,
                                           mode=mode, seed=seed)
            _train_records(self.log, method.name, result.losses, self.batch, len(self.train))
            return result

        def evaluate(self, method, params, delta):
            logits, acc = clf.ClassifierEnv.evaluate(self, method, params, delta)
            metric = getattr(self.log, "metric", None)
            if metric is not None:
                metric(event="eval", split="dev", model="plain" if method is None
                       else method.name, examples=len(self.dev), accuracy=acc,
                       loss=cross_entropy(logits, self.dev.labels))
            return logits, acc
    return RunEnv


def _header(log: Callable[[str], None]) -> None:
    import jax

    import jpeft
    log(f"jpeft {jpeft.__version__} | jax {jax.__version__} on {jax.devices()[0].platform}")


def finetune(spec: FinetuneSpec, echo: Callable[[str], None] = print) -> int:
    """Run ``jpeft finetune``: train, save, check; the run folder renamed into place at the
    end. Returns the exit status (1 when a check failed; the folder is kept)."""
    folder = OutFolder(spec.out, spec.reserved)
    log = RunLog(folder, echo)
    try:
        if spec.task == "seq-cls":
            summary = _finetune_classifier(spec, folder, log)
        else:
            summary = _finetune_decoder(spec, folder, log)
        _write_run(spec, folder, summary)
        path = folder.commit()
    except BaseException:
        folder.abort()
        raise
    echo(f"run folder: {path}")
    if not summary["ok"]:
        echo(f"ERROR: failed checks: {', '.join(k for k, v in summary['checks'].items() if not v)}")
    return 0 if summary["ok"] else 1


def _write_run(spec: FinetuneSpec, folder: OutFolder, summary: dict) -> None:
    import jpeft
    if spec.data.labels is not None:
        (folder.tmp / LABELS_FILE).write_text(json.dumps(
            {"labels": spec.data.labels.to_json()}, indent=2) + "\n")
    run = {
        "jpeft": jpeft.__version__,
        "created": utc_stamp(),
        "command": spec.argv,
        "task": spec.task,
        "model": {"dir": str(spec.model.path), "pooling": spec.model.pooling,
                  "tokenizer": summary.get("tokenizer"), "record": summary["record"]},
        "method": {"preset": spec.preset, "options": spec.options,
                   "given": list(spec.given), "config": summary["config"]},
        "data": spec.data.record,
        "labels": None if spec.data.labels is None else spec.data.labels.to_json(),
        "seq": spec.seq, "batch": spec.batch, "seed": spec.options.get("seed"),
        "quantize": spec.quantize,
        "delta": DELTA_DIR,
        "result": {k: summary[k] for k in ("ok", "checks", "before", "after", "metric")},
    }
    (folder.tmp / RUN_FILE).write_text(json.dumps(run, indent=2, default=_jsonable) + "\n")


def _finetune_classifier(spec: FinetuneSpec, folder: OutFolder, log: RunLog) -> dict:
    from jpeft.models import loading
    from jpeft.recipes import classification as clf
    from jpeft.recipes import finetune as finetune_lib
    _header(log)
    d = spec.data
    k = len(d.labels)
    base = load_classifier(spec.model.path, k, spec.model.pooling, spec.seq)
    log(f"model: {spec.model.path} (BERT classifier, {k} labels, pooling "
        f"{spec.model.pooling})")
    log(f"data: {len(d.train_texts)} train / {len(d.dev_texts)} dev examples, labels "
        f"{', '.join(map(repr, d.labels.labels))}; sequence length {spec.seq}, batch {spec.batch}")
    train = clf.Split(base.encode(d.train_texts), d.train_labels)
    dev = clf.Split(base.encode(d.dev_texts), d.dev_labels)
    pooling, model_dir = spec.model.pooling, spec.model.path

    def reload():
        return {"params": loading.load_hf_bert(model_dir, num_labels=k, pooling=pooling).params}
    env = _classifier_env_class()(
        base.model.apply, base.variables, base.sites, train, dev, batch=spec.batch,
        buckets=tuple(b for b in BUCKETS if b < spec.seq) + (spec.seq,), head=("classifier",),
        progress=spec.progress, log=log, reload=reload, model_record=base.record)
    outcome = finetune_lib.run(spec.preset, env, spec.options, out=folder.tmp,
                               quantize=spec.quantize)
    log.metric(event="result", before=outcome.before, after=outcome.after,
               checks=outcome.checks)
    return {"ok": outcome.ok, "checks": outcome.checks, "before": outcome.before,
            "after": outcome.after, "metric": "dev accuracy", "record": base.record,
            "config": outcome.state["method"].config}


def _token_nll(logits, ids, mask):
    """Summed next-token cross-entropy over real tokens and their count; ``logits`` may carry
    extra leading positions (prompt tuning): the last ``T`` are scored."""
    import jax.numpy as jnp
    import optax
    logits = logits[:, logits.shape[1] - ids.shape[1]:]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:])
    w = mask[:, 1:].astype(nll.dtype) * mask[:, :-1].astype(nll.dtype)
    return jnp.sum(nll * w), jnp.sum(w)


def decoder_loss(f: Callable, params: Any, delta: Any, ids: np.ndarray, mask: np.ndarray,
                 batch: int = 32) -> tuple[float, int]:
    """Mean per-token loss of ``f(params, delta, ids, mask)`` over ``ids`` (in fixed-size
    batches) and the number of tokens scored."""
    import jax
    score = jax.jit(lambda p, d, i, m: _token_nll(f(p, d, i, m), i, m))
    total, count = 0.0, 0.0
    for start in range(0, len(ids), batch):
        i, m = ids[start:start + batch], mask[start:start + batch]
        if len(i) < batch:              # one shape: pad with empty rows (mask 0)
            pad = batch - len(i)
            i = np.concatenate([i, np.zeros((pad, i.shape[1]), i.dtype)])
            m = np.concatenate([m, np.zeros((pad, m.shape[1]), m.dtype)])
        s, c = score(params, delta, i, m)
        total, count = total + float(s), count + float(c)
    return total / max(count, 1.0), int(count)


def _finetune_decoder(spec: FinetuneSpec, folder: OutFolder, log: RunLog) -> dict:
    import jax

    import jpeft
    from jpeft import saving
    from jpeft.core import train as train_lib
    from jpeft.core import tree as tree_lib
    from jpeft.recipes import quantization as quant_lib
    from jpeft.recipes.progress import Progress
    _header(log)
    d, o = spec.data, spec.options
    base = load_decoder(spec.model.path, spec.model.tokenizer, spec.seq, log)
    log(f"model: {spec.model.path} (LLaMA decoder, {tree_lib.num_params(base.params):,} "
        f"parameters); tokens: {base.codec.description}")
    log(f"data: {len(d.train_texts)} train / {len(d.dev_texts)} dev texts; sequence length "
        f"{spec.seq}, batch {spec.batch}")
    ids, mask = base.encode(d.train_texts)
    dev_ids, dev_mask = base.encode(d.dev_texts)
    q = quant_lib.prepare(base.apply, base.params, base.sites, (ids[:2], mask[:2]),
                          spec.quantize)
    if spec.quantize != "none":
        log(quant_lib.num_bytes(q.params).line(spec.quantize))
    method = decoder_method(spec.preset, o)
    lr = decoder_lr(spec.preset, o, spec.given)
    delta = method.init(jax.random.key(o["seed"]), q.params, q.sites)
    log(f"[train] {spec.preset} on the decoder: "
        f"{tree_lib.param_report(q.params, delta, method)}")
    f = jpeft.wrap(q.apply, method, q.sites)
    before, tokens = decoder_loss(f, q.params, delta, dev_ids, dev_mask)
    log(f"dev loss per token before fine-tuning: {before:.4f} ({tokens} tokens)")
    log.metric(event="eval", split="dev", model="base", loss=before, tokens=tokens)

    def loss_fn(p, dl, b, key):
        s, c = _token_nll(f(p, dl, b["ids"], b["mask"]), b["ids"], b["mask"])
        return s / jax.numpy.maximum(c, 1.0)
    opt = presets.default_optimizer(method, o["steps"], lr)
    step = train_lib.make_train_step(loss_fn, opt, method=method)
    opt_state = train_lib.init_opt_state(opt, delta, method=method)
    per_epoch = len(ids) // spec.batch
    key = jax.random.key(o["seed"])
    losses: list[float] = []
    t0 = time.perf_counter()
    bar = Progress(o["steps"], "fine-tuning") if spec.progress else None
    for i in range(o["steps"]):
        epoch, j = divmod(i, per_epoch)
        order = np.random.default_rng(o["seed"] + epoch).permutation(len(ids))
        idx = order[j * spec.batch:(j + 1) * spec.batch]
        delta, opt_state, m = step(q.params, delta, opt_state,
                                   {"ids": ids[idx], "mask": mask[idx]},
                                   jax.random.fold_in(key, i))
        losses.append(float(m["loss"]))
        if bar is not None:
            bar.update(1, loss=float(np.mean(losses[-20:])))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    log(f"[train] {o['steps']} steps (lr {lr:.3g}): {seconds:.1f} s "
        f"({seconds / max(o['steps'], 1):.3f} s/step)")
    _train_records(log, method.name, losses, spec.batch, len(ids))
    after, _ = decoder_loss(f, q.params, delta, dev_ids, dev_mask)
    log(f"dev loss per token after fine-tuning: {after:.4f} (before: {before:.4f})")
    log.metric(event="eval", split="dev", model=method.name, loss=after, tokens=tokens)

    ckpt = saving.save(folder.tmp / DELTA_DIR, method, delta, model=base.record,
                       metadata={"task": "causal-lm", "preset": spec.preset, "options": o,
                                 "base": quant_lib.config(spec.quantize)})
    loaded = saving.load(ckpt, q.params, q.sites, model=base.record)
    g = jpeft.wrap(q.apply, loaded.method, q.sites)
    reloaded, _ = decoder_loss(g, q.params, loaded.delta, dev_ids, dev_mask)
    same = reloaded == after
    log(f"saved the delta to {ckpt}; reloaded from disk: dev loss {reloaded:.6f}, identical to "
        f"the trained model's: {same}")
    checks = {"reload": bool(same)}
    log.metric(event="result", before=before, after=after, checks=checks)
    return {"ok": all(checks.values()), "checks": checks, "before": before, "after": after,
            "metric": "dev loss per token", "record": base.record, "config": method.config,
            "tokenizer": base.codec.description}


# --------------------------------------------------------------------------------------------
# A finished run


class Run(NamedTuple):
    """A run folder as read from ``run.json``."""
    path: Path
    info: dict
    labels: tabular.LabelMap | None

    @property
    def task(self) -> str:
        return self.info["task"]

    @property
    def checkpoint(self) -> Path:
        return self.path / self.info.get("delta", DELTA_DIR)

    @property
    def text_column(self) -> str | None:
        return self.info["data"].get("text_column")

    @property
    def label_column(self) -> str | None:
        return self.info["data"].get("label_column")


def read_run(path: str | os.PathLike, flag: str = "--run") -> Run:
    """The run folder at ``path`` (its run.json and checkpoint; no weights).

    Raises:
      CommandError: not a run folder (no run.json, no delta), a run.json that does not parse.
    """
    path = Path(path)
    if not path.is_dir():
        raise CommandError(flag, f"{path} is not a folder")
    try:
        info = json.loads((path / RUN_FILE).read_text())
    except FileNotFoundError:
        raise CommandError(flag, f"{path} is not a run folder (no {RUN_FILE}; runs are written "
                                 f"by jpeft finetune)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CommandError(flag, f"{path / RUN_FILE} is not readable JSON ({e})") from None
    if not isinstance(info, dict) or info.get("task") not in TASKS or "model" not in info:
        raise CommandError(flag, f"{path / RUN_FILE} is not a jpeft run record")
    run = Run(path.absolute(), info, None if info.get("labels") is None
              else tabular.LabelMap.from_json(info["labels"]))
    if not run.checkpoint.is_dir():
        raise CommandError(flag, f"{path} has no adapter ({run.checkpoint} is missing)")
    return run


def run_model(run: Run, model: str | os.PathLike | None = None) -> ModelInfo:
    """The run's model directory (``model`` overrides the recorded one), inspected."""
    where = Path(model) if model is not None else Path(run.info["model"]["dir"])
    flag = "--model" if model is not None else "--run"
    if not where.is_dir():
        raise CommandError(flag, f"the run's model directory {where} does not exist; pass "
                                 f"--model DIR")
    try:
        info = inspect_model(where, run.task, run.info["model"].get("pooling") or "auto")
    except CommandError as e:
        raise CommandError(flag, e.message) from None
    return info


def read_method(run: Run) -> Any:
    """The trained method and delta from the checkpoint (:func:`jpeft.saving.read`: no base)."""
    from jpeft import checkpoint, saving
    try:
        return saving.read(run.checkpoint)
    except (checkpoint.CheckpointError, FileNotFoundError, ValueError) as e:
        raise CommandError("--run", f"cannot read the adapter: {e}".splitlines()[0]) from None


class Trained(NamedTuple):
    """A run loaded onto its base: ``apply``/``params``/``sites`` of the base as trained on
    (quantized as recorded), the rebuilt ``method`` and ``delta``, and the loaded ``base``
    (full precision)."""
    run: Run
    base: Any
    apply: Callable[..., Any]
    params: Any
    sites: Any
    scheme: str
    method: Any
    delta: Any


def load_trained(run: Run, info: ModelInfo, seq: int | None = None,
                 log: Callable[[str], None] = print) -> Trained:
    """Load the run's base (as recorded: head, pooling, quantization) and its delta
    (:func:`jpeft.load`: the model record and the delta's fit are checked)."""
    from jpeft import checkpoint, saving
    from jpeft.recipes import quantization as quant_lib
    seq = seq or int(run.info["seq"])
    scheme = run.info.get("quantize", "none")
    if run.task == "seq-cls":
        base = load_classifier(info.path, len(run.labels), info.pooling, seq)
        q = quant_lib.prepare(base.model.apply, base.variables, base.sites, base.example(), scheme)
    else:
        base = load_decoder(info.path, info.tokenizer, seq, log)
        ids, mask = base.encode(["a", "b"])
        q = quant_lib.prepare(base.apply, base.params, base.sites, (ids, mask), scheme)
    try:
        loaded = saving.load(run.checkpoint, q.params, q.sites, model=base.record)
        quant_lib.check_recorded(loaded.metadata.get("base"), scheme, run.checkpoint)
    except (checkpoint.CheckpointError, ValueError) as e:
        raise CommandError("--run", " ".join(str(e).split())) from None
    return Trained(run, base, q.apply, q.params, q.sites, scheme, loaded.method, loaded.delta)


def classifier_logits(t: Trained, texts: Sequence[str], batch: int = 64) -> np.ndarray:
    from jpeft.recipes import classification as clf
    split = clf.Split(t.base.encode(texts), np.zeros(len(texts), np.int32))
    predict = clf.make_predict(t.apply, t.method, t.sites)
    buckets = tuple(b for b in BUCKETS if b < t.base.seq) + (t.base.seq,)
    return clf.logits_of(predict, t.params, t.delta, split, batch_size=batch, buckets=buckets)


def evaluate(t: Trained, texts: Sequence[str], labels: np.ndarray | None, batch: int = 64
             ) -> dict:
    """``jpeft eval``: accuracy and mean cross-entropy of a classifier run, or the per-token
    loss (and perplexity) of a decoder run, on ``texts``."""
    import jpeft
    if t.run.task == "seq-cls":
        logits = classifier_logits(t, texts, batch)
        return {"examples": len(texts),
                "accuracy": float(np.mean(np.argmax(logits, -1) == labels)),
                "loss": cross_entropy(logits, labels)}
    ids, mask = t.base.encode(texts)
    f = jpeft.wrap(t.apply, t.method, t.sites)
    loss, tokens = decoder_loss(f, t.params, t.delta, ids, mask, batch=min(batch, 32))
    return {"examples": len(texts), "tokens": tokens, "loss": loss,
            "perplexity": float(np.exp(min(loss, 50.0)))}


def predict(t: Trained, texts: Sequence[str], *, batch: int = 64,
            max_new_tokens: int = 32) -> list[dict]:
    """``jpeft predict``: per text, the predicted label and the probability of every label
    (classifier), or a greedy continuation of ``max_new_tokens`` tokens (decoder)."""
    if t.run.task == "seq-cls":
        probs = softmax(classifier_logits(t, texts, batch))
        names = t.run.labels.labels
        return [{"text": text, "label": names[int(np.argmax(p))],
                 **{f"p_{n}": round(float(x), 6) for n, x in zip(names, p)}}
                for text, p in zip(texts, probs)]
    return [{"text": text, "continuation": c}
            for text, c in zip(texts, _continuations(t, texts, max_new_tokens, batch))]


def _continuations(t: Trained, texts: Sequence[str], new_tokens: int, batch: int) -> list[str]:
    import jax

    import jpeft
    from jpeft.models.llama import LlamaForCausalLM, generate
    from jpeft.recipes import quantization as quant_lib
    from flax import nnx
    ids, mask = t.base.encode(texts)
    left, lmask = np.zeros_like(ids), np.zeros_like(mask)    # left-padded: each row continues
    for i, n in enumerate(mask.sum(1)):
        left[i, ids.shape[1] - n:], lmask[i, ids.shape[1] - n:] = ids[i, :n], 1
    config = t.base.model.config
    gen_apply, _ = jpeft.nnx.split(
        nnx.eval_shape(lambda: LlamaForCausalLM(config)),
        method=lambda m, x, k: generate(m, x, k, new_tokens, pad_token_id=0))
    if t.scheme != "none":
        gen_apply = quant_lib.Base(None, None, None, t.scheme).wrap(gen_apply)
    run = jax.jit(jpeft.wrap(gen_apply, t.method, t.sites))
    batch = min(batch, 16)
    out = []
    for start in range(0, len(texts), batch):
        x, m = left[start:start + batch], lmask[start:start + batch]
        n = len(x)
        if n < batch:
            x = np.concatenate([x, np.repeat(x[:1], batch - n, 0)])
            m = np.concatenate([m, np.repeat(m[:1], batch - n, 0)])
        rows = np.asarray(run(t.params, t.delta, x, m))[:n, -new_tokens:]
        out += [t.base.codec.decode(r) for r in rows]
    return out


def merge(t: Trained, out: OutFolder, log: Callable[[str], None] = print) -> Path:
    """``jpeft merge``: the base with the delta merged into its weights, written as
    ``model.safetensors`` with Hugging Face names and the base's config.json (a classifier's
    with its labels), plus its tokenizer files."""
    import jax
    from safetensors.numpy import save_file

    from jpeft import quantized
    merged = jax.jit(lambda p, d: t.method.merge(quantized.dequantize_params(p), d, t.sites))(
        t.params, t.delta)
    config = json.loads((t.base.model_dir / "config.json").read_text())
    if t.run.task == "seq-cls":
        from jpeft.models.loading import flax_to_hf_state
        state = flax_to_hf_state(merged["params"])
        names = t.run.labels.labels
        config.update(architectures=["BertForSequenceClassification"], num_labels=len(names),
                      id2label={str(i): str(n) for i, n in enumerate(names)},
                      label2id={str(n): i for i, n in enumerate(names)},
                      jpeft_pooling=t.base.model.config.pooling)
    else:
        from flax import nnx

        from jpeft.models.llama import llama_to_hf_state
        model = t.base.model
        state_ = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(state_, jax.tree.map(np.asarray, merged))
        nnx.update(model, state_)
        state = llama_to_hf_state(model)
    save_file({k: np.ascontiguousarray(np.asarray(v)) for k, v in state.items()},
              str(out.tmp / "model.safetensors"), metadata={"format": "pt"})
    (out.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.txt", "tokenizer.model"):
        if (t.base.model_dir / name).is_file():
            shutil.copy2(t.base.model_dir / name, out.tmp / name)
    (out.tmp / "jpeft_merge.json").write_text(json.dumps(
        {"run": str(t.run.path), "method": t.method.name, "base": str(t.base.model_dir),
         "quantize": t.scheme, "task": t.run.task,
         "pooling": getattr(t.base.model.config, "pooling", None)}, indent=2) + "\n")
    return out.commit()


#: What ``jpeft export --format hf-peft`` writes (:data:`jpeft.interop.hf_peft.BY_METHOD`).
def peft_kinds() -> tuple[str, ...]:
    from jpeft.interop import hf_peft
    return tuple(sorted(hf_peft.BY_METHOD))


def check_exportable(method: Any) -> None:
    """Refuse (``--run``) a method with a part Hugging Face PEFT has no format for, naming it,
    before any base loads."""
    config = method.config
    parts = config.get("compose", {method.name: config}) if isinstance(config, dict) else {}
    kinds = peft_kinds()
    bad = {n: c.get("method") for n, c in parts.items()
           if c.get("method") not in kinds and c.get("method") != "full"}
    if bad:
        shown = ", ".join(f"{n} ({k})" for n, k in bad.items())
        raise CommandError("--run", f"method {method.name!r} has parts Hugging Face PEFT has no "
                                    f"format for: {shown}; exportable: {', '.join(kinds)} "
                                    f"(plus a fully trained head as modules_to_save)")
    adapters = {c.get("method") for c in parts.values() if c.get("method") != "full"}
    if len(adapters) != 1:
        raise CommandError("--run", f"method {method.name!r} has {sorted(adapters) or 'no'} "
                                    f"adapter types; a PEFT file holds exactly one")


def export_hf_peft(t: Trained, out: Path, *, overwrite: bool, allow_function_change: bool
                   ) -> Path:
    """``jpeft export --format hf-peft``: adapter_config.json + adapter_model.safetensors
    (:func:`jpeft.interop.hf_peft.save`)."""
    from jpeft.interop import hf_peft
    base = t.base
    variables = base.variables if t.run.task == "seq-cls" else base.params
    try:
        return hf_peft.save(out, variables, t.method, t.delta, sites=base.sites,
                            base_model_name_or_path=str(base.model_dir),
                            task_type="SEQ_CLS" if t.run.task == "seq-cls" else "CAUSAL_LM",
                            model=base.record, allow_function_change=allow_function_change,
                            overwrite=overwrite)
    except ValueError as e:
        raise CommandError("--run", " ".join(str(e).split())) from None


# --------------------------------------------------------------------------------------------
# Report: parameter counts, FLOPs and memory of a method's train step, before training


class _DryEnv:
    """A preset environment that trains nothing: each fit records its method, starting delta,
    optimizer and mode and returns that delta (so every count is exact, e.g. FAR's kept
    columns, a sparse mask's entries)."""

    def __init__(self, env: Any):
        self.env = env
        self.fits: list[tuple] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def fit(self, method, delta, *, steps, optimizer, mode="factored", seed=0):
        self.fits.append((method, delta, optimizer, mode, steps))
        return _Fitted(delta, 0.0)


class _Fitted(NamedTuple):
    delta: Any
    seconds: float


def _compiled_cost(step: Any, args: tuple) -> dict:
    compiled = step.lower(*args).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    cost = cost or {}
    try:
        mem = compiled.memory_analysis()
    except Exception:          # noqa: BLE001 - not every backend has it
        mem = None
    get = lambda name: None if mem is None else getattr(mem, name, None)
    return {"flops": float(cost["flops"]) if cost.get("flops") is not None else None,
            "temp_bytes": get("temp_size_in_bytes"),
            "argument_bytes": get("argument_size_in_bytes")}


def report(info: ModelInfo, preset: str, options: dict, *, seq: int, batch: int,
           num_labels: int = 2, full: bool = True, given: Sequence[str] = ()) -> dict:
    """``jpeft report``: for each training stage of ``preset`` on the model (nothing trained:
    stages between fits run on a synthetic batch), the trainable entries and their share of the
    model, and XLA's FLOPs and temporary memory of the compiled train step for a batch of
    ``batch`` x ``seq`` (``jax.jit(...).lower(...).compile()``'s ``cost_analysis`` and
    ``memory_analysis``), with the same for full fine-tuning (``full``) as the reference."""
    import jax

    import jpeft
    from jpeft.core import train as train_lib
    from jpeft.core import tree as tree_lib
    rng = np.random.default_rng(0)
    rows = max(batch, 8)
    if info.task == "seq-cls":
        from jpeft.recipes import classification as clf
        base = load_classifier(info.path, num_labels, info.pooling, seq)
        vocab = int(info.config.get("vocab_size", 1000))
        inputs = {"input_ids": rng.integers(min(1000, vocab - 1), vocab, (rows, seq)
                                            ).astype(np.int32),
                  "attention_mask": np.ones((rows, seq), np.int32),
                  "token_type_ids": np.zeros((rows, seq), np.int32)}
        split = clf.Split(inputs, rng.integers(0, num_labels, rows).astype(np.int32))
        env = clf.ClassifierEnv(base.model.apply, base.variables, base.sites, split, split,
                                batch=batch, buckets=None, head=("classifier",),
                                progress=False, log=lambda m: None)
        params = base.variables
        dry = _DryEnv(env)
        state = presets.run_stages(preset, dry, options)
        fits = [(m, d, opt, mode) for m, d, opt, mode, steps in dry.fits if steps]
        batch_arrays = clf._take(split, np.arange(batch), batch, None)

        def loss_of(method, mode):
            return clf.make_loss(base.model.apply, method, base.sites, mode=mode)
        reference = lambda: presets.run_stages("full", _DryEnv(env), presets.resolve("full"))
        saved = tree_lib.num_params(state["delta"])
        full_method = jpeft.full_finetune()
    else:
        base = load_decoder(info.path, info.tokenizer, seq, lambda m: None)
        vocab = int(info.config.get("vocab_size", 256))
        ids = rng.integers(1, vocab, (batch, seq)).astype(np.int32)
        batch_arrays = {"ids": ids, "mask": np.ones_like(ids)}
        params = base.params
        method = decoder_method(preset, options)
        delta = method.init(jax.random.key(0), params, base.sites)
        steps = max(int(options.get("steps", 1)), 1)
        lr = decoder_lr(preset, options, given)
        fits = [(method, delta, presets.default_optimizer(method, steps, lr), "factored")]

        def loss_of(method, mode):
            f = jpeft.wrap(base.apply, method, base.sites, mode=mode)

            def loss(p, d, b, key):
                s, c = _token_nll(f(p, d, b["ids"], b["mask"]), b["ids"], b["mask"])
                return s / jax.numpy.maximum(c, 1.0)
            return loss
        saved = tree_lib.num_params(delta)
        full_method = jpeft.full_finetune()
        reference = None

    total = tree_lib.num_params(params)

    def row(name, method, delta, optimizer, mode):
        step = train_lib.make_train_step(loss_of(method, mode), optimizer, method=method,
                                         donate=False)
        opt_state = train_lib.init_opt_state(optimizer, delta, method=method)
        cost = _compiled_cost(step, (params, delta, opt_state, batch_arrays,
                                     jax.random.key(0)))
        trainable = tree_lib.trainable_count(delta, method)
        return {"stage": name, "method": method.name, "trainable": trainable,
                "delta_entries": tree_lib.num_params(delta),
                "percent": 100.0 * trainable / max(total, 1), **cost}

    stage_names = [s.name for s in presets.get(preset).stages(options)
                   if isinstance(s, presets.Fit) and s.steps] if info.task == "seq-cls" \
        else ["train"]
    out_rows = [row(n, *fit) for n, fit in zip(stage_names, fits)]
    full_row = None
    if full:
        if reference is not None:
            dry_full = _DryEnv(env)
            presets.run_stages("full", dry_full, presets.resolve("full"))
            m, d, opt, mode, _ = dry_full.fits[0]
        else:
            m = full_method
            d = m.init(jax.random.key(0), params)
            opt = presets.default_optimizer(m, 10, 1e-5)
            mode = "factored"
        full_row = row("full fine-tuning", m, d, opt, mode)
    for r in out_rows:
        for k in ("flops", "temp_bytes"):
            r[f"{k}_vs_full"] = (r[k] / full_row[k] if full_row and r[k] and full_row[k]
                                 else None)
    return {"model": str(info.path), "task": info.task, "method": preset, "options": options,
            "batch": batch, "seq": seq, "params": total, "device": jax.devices()[0].platform,
            "stages": out_rows, "full": full_row, "saved_delta_entries": saved}


def format_report(r: dict) -> str:
    """The report as a table."""
    def gflops(x):
        return "n/a" if x is None else f"{x / 1e9:.3g}"

    def mb(x):
        return "n/a" if x is None else f"{x / 1e6:.1f} MB"

    def ratio(x):
        return "" if x is None else f"{x:.2f}x"
    head = (f"report: {r['method']} on {r['model']} ({r['task']}, {r['params']:,} parameters); "
            f"train step for a batch of {r['batch']} x {r['seq']} tokens, compiled on "
            f"{r['device']}")
    lines = [head, f"{'stage':<18}{'trainable':>14}{'% of model':>12}{'step GFLOPs':>13}"
                   f"{'vs full':>9}{'temp memory':>14}{'vs full':>9}"]
    for x in r["stages"] + ([r["full"]] if r["full"] else []):
        lines.append(f"{x['stage']:<18}{x['trainable']:>14,}{x['percent']:>11.4f}%"
                     f"{gflops(x['flops']):>13}{ratio(x.get('flops_vs_full')):>9}"
                     f"{mb(x['temp_bytes']):>14}{ratio(x.get('temp_bytes_vs_full')):>9}")
    lines.append(f"saved delta: {r['saved_delta_entries']:,} entries")
    return "\n".join(lines)
