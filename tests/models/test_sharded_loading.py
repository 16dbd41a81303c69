"""Sharded loading of Hugging Face LLaMA safetensors (:mod:`jpeft.models.sharded_loading`)."""

import dataclasses
import json
import os
import subprocess
import sys
import time
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from conftest import unavailable
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

from jpeft.models.llama import LlamaConfig, hf_param_shapes, load_hf_llama
from jpeft.core.sharding import rule_sharding as rule_shardings
from jpeft.models.sharded_loading import (load_hf_llama_sharded, read_block,
                                          tensor_index)


def _random_state(config, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.uniform(0.5, 1.5, shape) if k.endswith("norm.weight")
                else rng.normal(0.0, 0.15, shape)).astype(dtype)
            for k, shape in hf_param_shapes(config).items()}


def _write(directory, state, config, files=1):
    """``state`` as ``model.safetensors`` (``files == 1``) or split round-robin into ``files``
    shards with a ``model.safetensors.index.json``, plus ``config.json``; returns ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    if files == 1:
        save_file(state, str(directory / "model.safetensors"))
        return directory
    names = [f"model-{i + 1:05d}-of-{files:05d}.safetensors" for i in range(files)]
    weight_map = {k: names[i % files] for i, k in enumerate(sorted(state))}
    for name in names:
        save_file({k: v for k, v in state.items() if weight_map[k] == name}, str(directory / name))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def _params(model):
    return {"/".join(map(str, p)): v[...]
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.fixture(scope="module")
def mesh8():
    if jax.device_count() < 8:
        unavailable("needs 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "model"))


def _rules(mesh, scanned):
    """2-D: kernels ``(data, model)``, embedding ``(model, None)``, norms over ``model``."""
    lead = (None,) if scanned else ()
    return rule_shardings(mesh, [
        (r"model/layers/.*kernel", P(*lead, "data", "model")),
        (r"lm_head/kernel", P("data", "model")),
        (r".*embedding", P("model", None)),
        (r"model/layers/.*scale", P(*lead, "model")),
    ])


# --------------------------------------------------------------------------- values and layouts


@pytest.mark.parametrize("files", [1, 3])
@pytest.mark.parametrize("scan_layers", [False, True])
def test_values_and_shardings_match_load_hf_llama(tmp_path, mesh8, files, scan_layers):
    config = LlamaConfig.tiny(attention_bias=True)
    state = _random_state(config)
    path = _write(tmp_path, state, config, files)
    expected = _params(load_hf_llama(state, config, scan_layers=scan_layers))
    shard_of = _rules(mesh8, scan_layers)
    # tiny bands (a few file rows) so that every block is read in several pieces
    model = load_hf_llama_sharded(path, shardings=shard_of, scan_layers=scan_layers,
                                  chunk_bytes=300)
    assert model.config.scan_layers == scan_layers
    got = _params(model)
    assert got.keys() == expected.keys()
    for name, x in got.items():
        assert x.dtype == jnp.float32, name
        assert x.sharding == shard_of(name, x.shape), name
        np.testing.assert_array_equal(np.asarray(x), np.asarray(expected[name]), err_msg=name)
    # a mapping {path: sharding} gives the same; one sharding for every parameter works too
    by_path = {name: shard_of(name, x.shape) for name, x in got.items()}
    again = _params(load_hf_llama_sharded(path, shardings=by_path, scan_layers=scan_layers))
    assert all(again[n].sharding == by_path[n] and np.array_equal(again[n], got[n]) for n in got)
    with pytest.raises(ValueError, match="no entry for parameter 'model/norm/scale'"):
        load_hf_llama_sharded(path, shardings={n: s for n, s in by_path.items()
                                               if n != "model/norm/scale"},
                              scan_layers=scan_layers)
    one = NamedSharding(mesh8, P())
    model = load_hf_llama_sharded(path / "model.safetensors.index.json" if files > 1
                                  else path / "model.safetensors", config, shardings=one)
    for name, x in _params(model).items():
        assert x.sharding == one
        np.testing.assert_array_equal(np.asarray(x), np.asarray(
            _params(load_hf_llama(state, config))[name]), err_msg=name)


def test_bf16_stays_bf16_unless_a_dtype_is_asked(tmp_path, mesh8):
    config = LlamaConfig.tiny()
    state = _random_state(config, ml_dtypes.bfloat16)
    state["model.norm.weight"] = state["model.norm.weight"].astype(np.float32)  # mixed file
    path = _write(tmp_path, state, config)
    model = load_hf_llama_sharded(path, shardings=_rules(mesh8, False))
    got = _params(model)
    assert model.param_dtype == jnp.bfloat16
    assert got["model/norm/scale"].dtype == jnp.float32
    assert all(x.dtype == jnp.bfloat16 for n, x in got.items() if n != "model/norm/scale")
    np.testing.assert_array_equal(np.asarray(got["model/layers/1/mlp/down_proj/kernel"]),
                                  state["model.layers.1.mlp.down_proj.weight"].T)
    cast = _params(load_hf_llama_sharded(path, shardings=_rules(mesh8, False),
                                         param_dtype=jnp.float32))
    assert all(x.dtype == jnp.float32 for x in cast.values())
    np.testing.assert_array_equal(np.asarray(cast["model/embed_tokens/embedding"]),
                                  state["model.embed_tokens.weight"].astype(np.float32))


def test_forward_of_the_sharded_model(tmp_path, mesh8):
    config = LlamaConfig.tiny()
    state = _random_state(config)
    model = load_hf_llama_sharded(_write(tmp_path, state, config), shardings=_rules(mesh8, False))
    ids = np.random.default_rng(0).integers(1, 128, (2, 5)).astype(np.int32)
    np.testing.assert_allclose(np.asarray(model(ids, np.ones_like(ids))),
                               np.asarray(load_hf_llama(state, config)(ids, np.ones_like(ids))),
                               rtol=1e-5, atol=1e-5)


def test_read_block_slices_the_file_layout(tmp_path):
    w = np.arange(7 * 5, dtype=np.float32).reshape(7, 5)        # weight [out 7, in 5]
    save_file({"w": w}, str(tmp_path / "a.safetensors"))
    info = tensor_index(tmp_path / "a.safetensors")["w"]
    out = read_block(info, "w", ((1, 4), (2, 6)), np.empty((3, 4), np.float32), transpose=True,
                     chunk_bytes=1)                             # one file row per band
    np.testing.assert_array_equal(out, w.T[1:4, 2:6])
    out = read_block(info, "w", ((2, 6), (1, 4)), np.empty((4, 3), np.float64))
    np.testing.assert_array_equal(out, w[2:6, 1:4])


# --------------------------------------------------------------------------- errors


@pytest.fixture
def tiny_dir(tmp_path):
    config = LlamaConfig.tiny()
    return config, _random_state(config), tmp_path / "ckpt"


def test_missing_tensor_names_it(tiny_dir, mesh8):
    config, state, path = tiny_dir
    del state["model.layers.1.mlp.up_proj.weight"]
    _write(path, state, config)
    with pytest.raises(ValueError, match=r"missing from the files \['model.layers.1.mlp.up_proj"
                                         r".weight'\].*config.json"):
        load_hf_llama_sharded(path, shardings=_rules(mesh8, False))
    del state["lm_head.weight"]
    _write(path, state, config)
    with pytest.raises(ValueError, match="tie_word_embeddings=True"):
        load_hf_llama_sharded(path, shardings=_rules(mesh8, False))


def test_index_naming_a_file_without_the_tensor(tiny_dir, mesh8):
    config, state, path = tiny_dir
    _write(path, state, config, files=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    key = "model.norm.weight"
    other = next(n for n in set(index["weight_map"].values()) if n != index["weight_map"][key])
    index["weight_map"][key] = other
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"maps '{key}' to {other}.*re-download"):
        load_hf_llama_sharded(path, shardings=_rules(mesh8, False))


def test_shape_mismatch_names_the_tensor(tiny_dir, mesh8):
    config, state, path = tiny_dir
    _write(path, state, dataclasses.replace(config, intermediate_size=96))
    with pytest.raises(ValueError, match=r"shape mismatch for 'model.layers.0.mlp.down_proj."
                                         r"weight'.*\(64, 128\).*\(64, 96\).*kernel = weight.T.*"
                                         r"config.json"):
        load_hf_llama_sharded(path, shardings=_rules(mesh8, False))


def test_sharding_that_does_not_divide_names_the_tensor(tiny_dir, mesh8):
    config, state, path = tiny_dir
    config = dataclasses.replace(config, vocab_size=130, tie_word_embeddings=True)
    _write(path, _random_state(config), config)
    # vocab 130 is not a multiple of the 4 "model" devices of the embedding's rule (checked
    # before anything is read)
    with pytest.raises(ValueError, match=r"model/embed_tokens/embedding \(130, \d+\): dimension"
                                         r" 0 \(size 130\).*'model'.*size 4.*replicate"):
        load_hf_llama_sharded(path, shardings=_rules(mesh8, False))
    whole = NamedSharding(mesh8, P("model"))        # one sharding for all: the loader's check
    with pytest.raises(ValueError, match=r"'model/embed_tokens/embedding' \(from 'model.embed_"
                                         r"tokens.weight'.*dimension 0 \(size 130\).*'model'.*"
                                         r"size 4.*replicate"):
        load_hf_llama_sharded(path, shardings=whole)
    with pytest.raises(ValueError, match="more entries than the parameter has dimensions"):
        load_hf_llama_sharded(path, shardings=NamedSharding(mesh8, P(None, None, "data")))


def test_tied_head_must_equal_the_embedding(tiny_dir, mesh8):
    config, state, path = tiny_dir
    config = dataclasses.replace(config, tie_word_embeddings=True)
    _write(path, state, config)         # lm_head.weight is random: differs from the embedding
    with pytest.raises(ValueError, match="differs from 'model.embed_tokens.weight'"):
        load_hf_llama_sharded(path, shardings=_rules(mesh8, False))
    state["lm_head.weight"] = state["model.embed_tokens.weight"]
    _write(path, state, config)
    model = load_hf_llama_sharded(path, shardings=_rules(mesh8, False))
    assert "lm_head/kernel" not in _params(model)


# --------------------------------------------------------------------------- host memory

BIG = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
           num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=256)
"""2 LLaMA-7B-sized layers and an untied 32000 x 4096 head: 1.23 GB in bfloat16; the largest
tensors (embedding and head) are 262 MB each."""

CHILD = r"""
import json, os, resource, sys, time
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open
from jpeft.core.sharding import rule_sharding as rule_shardings
from jpeft.models.sharded_loading import load_hf_llama_sharded, tensor_index

def status():
    out = {}
    for line in open("/proc/self/status"):
        key = line.split(":")[0]
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(line.split()[1]) * 1024
    return out

path = sys.argv[1]
mesh = Mesh(np.array(jax.devices()[:8]), ("fsdp",))
shardings = rule_shardings(mesh, [(r".*(kernel|embedding)", P("fsdp", None))])
jax.block_until_ready(jax.device_put(np.zeros(8, np.float32), NamedSharding(mesh, P("fsdp"))))
index = tensor_index(path)
try:                                  # reset the peak (VmHWM) to the current resident memory
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    reset = True
except OSError:
    reset = False
before = status()
maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
model = load_hf_llama_sharded(path, shardings=shardings)
load_s = time.perf_counter() - start
after = status()
maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

from flax import nnx
params = {"/".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
loaded = sum(s.data.nbytes for x in params.values() for s in x.addressable_shards)
bad_sharding = [n for n, x in params.items() if x.sharding != shardings(n, x.shape)]
checked = []
for name, key, transpose in [("model/embed_tokens/embedding", "model.embed_tokens.weight", False),
                             ("lm_head/kernel", "lm_head.weight", True),
                             ("model/layers/0/self_attn/k_proj/kernel",
                              "model.layers.0.self_attn.k_proj.weight", True),
                             ("model/layers/1/mlp/down_proj/kernel",
                              "model.layers.1.mlp.down_proj.weight", True),
                             ("model/layers/1/post_attention_layernorm/scale",
                              "model.layers.1.post_attention_layernorm.weight", False)]:
    x = params[name]
    for shard in x.addressable_shards[::3]:          # devices 0, 3, 6
        file_index = shard.index[::-1] if transpose else shard.index
        with safe_open(index[key].file, framework="numpy") as f:
            want = f.get_slice(key)[file_index]
        want = want.T if transpose else want
        got = np.asarray(shard.data)
        checked.append([name, str(shard.device), str(got.dtype), str(want.dtype),
                        bool(np.array_equal(got, want)),
                        bool(np.abs(got.astype(np.float32)).sum() > 0)])
print(json.dumps(dict(reset=reset, before=before, after=after, maxrss_before=maxrss_before,
                      maxrss_after=maxrss_after, loaded=loaded, bad_sharding=bad_sharding,
                      checked=checked, load_s=load_s)))
"""


def _write_big(directory, config):
    """A bfloat16 checkpoint of ``config`` in the sharded form (3 files: embedding and layer 0,
    layer 1, final norm and head). Values: a random pool of a prime number of bf16 values,
    repeated and shifted per tensor (fast to write, distinct in every row and block)."""
    rng = np.random.default_rng(0)
    pool = rng.standard_normal(1_000_003, dtype=np.float32).astype(ml_dtypes.bfloat16)
    shapes = hf_param_shapes(config)
    groups = [[k for k in shapes if k.startswith("model.embed") or ".layers.0." in k],
              [k for k in shapes if ".layers.1." in k],
              [k for k in shapes if k in ("model.norm.weight", "lm_head.weight")]]
    assert sum(map(len, groups)) == len(shapes)
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    weight_map = {}
    for i, keys in enumerate(groups):
        name = f"model-{i + 1:05d}-of-00003.safetensors"
        tensors = {}
        for k in keys:
            n = int(np.prod(shapes[k]))
            shift = (zlib.crc32(k.encode()) % 997) * 1009
            tensors[k] = np.resize(np.roll(pool, shift), n).reshape(shapes[k])
            weight_map[k] = name
        save_file(tensors, str(directory / name))
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return max(int(np.prod(s)) * 2 for s in shapes.values())


@pytest.mark.slow
def test_peak_host_memory_of_a_sharded_1gb_load(tmp_path, mesh8):
    """A 1.23 GB bfloat16 checkpoint (sharded form) onto 8 host devices with FSDP (every kernel
    and the embedding split over its first axis, norms replicated), loaded in a fresh process.

    The bound: peak resident memory during the load minus resident memory just before it is at
    most ``loaded + 1.3 * largest``: ``loaded`` is what the placed arrays occupy (the sum of the
    bytes of every device's shard: CPU "devices" share the host's memory, so the arrays count once
    each, replicas once per device), ``largest`` the largest tensor in the file. The loader's own
    working memory (one device block, one band of mapped file rows, bookkeeping) must stay under
    1.3 times one tensor, whatever the size of the model: no host copy of the model.
    """
    config = LlamaConfig(**BIG)
    start = time.perf_counter()
    largest = _write_big(tmp_path / "ckpt", config)
    written = time.perf_counter() - start
    file_bytes = sum(f.stat().st_size for f in (tmp_path / "ckpt").glob("*.safetensors"))
    assert file_bytes > 1e9
    env = dict(os.environ, JPEFT_HOST_MEMORY="release")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "ckpt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    loaded_s = time.perf_counter() - start
    base = r["before"]["VmRSS"]
    # ru_maxrss cannot be reset and survives exec: the child starts with the forked pytest
    # process's peak (the whole checkpoint was just written from it). Without a VmHWM reset,
    # ru_maxrss after the load is still an upper bound of the load's peak, so the check holds.
    peak = r["after"]["VmHWM"] if r["reset"] else r["maxrss_after"]
    increase = peak - base
    bound = r["loaded"] + 1.3 * largest
    mib = 1 << 20
    print(f"\nfile {file_bytes / mib:.0f} MiB, largest tensor {largest / mib:.0f} MiB, "
          f"loaded arrays {r['loaded'] / mib:.0f} MiB; resident before {base / mib:.0f} MiB, "
          f"peak {peak / mib:.0f} MiB (increase {increase / mib:.0f} MiB = loaded + "
          f"{(increase - r['loaded']) / largest:.2f} x largest; bound loaded + 1.3 x largest = "
          f"{bound / mib:.0f} MiB); ru_maxrss before/after {r['maxrss_before'] / mib:.0f}/"
          f"{r['maxrss_after'] / mib:.0f} MiB; VmHWM reset: {r['reset']}; "
          f"write {written:.1f} s, load {r['load_s']:.1f} s, child process {loaded_s:.1f} s")
    assert r["bad_sharding"] == []
    assert r["checked"] and all(c[2] == c[3] == "bfloat16" and c[4] and c[5]
                                for c in r["checked"]), r["checked"]
    assert r["loaded"] >= file_bytes - 1e6          # every tensor placed, norms replicated
    assert increase <= bound, (increase, bound)
