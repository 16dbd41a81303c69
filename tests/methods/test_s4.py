"""S4 (Chen et al., 2023): spindle layer groups, per-group strategies (A, P, B, L) composed from the
existing methods, per-layer budget, rebuilding from the config, forward passes on BERT and the NNX
decoder."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jpeft
from jpeft.core import paths as paths_lib
from jpeft.methods import from_config
from jpeft.methods import s4 as s4_lib

L = 8
D, HEADS, HEAD_DIM, INTER = 32, 4, 8, 64       # BertConfig.tiny


@pytest.fixture(scope="module")
def bert():
    from jpeft.models.bert import BertConfig, BertForSequenceClassification
    model = BertForSequenceClassification(BertConfig.tiny(num_hidden_layers=L, num_labels=2,
                                                          pooling="mean"))
    ids = np.random.default_rng(0).integers(1, 100, (2, 6)).astype(np.int32)
    variables = model.init(jax.random.key(0), ids)
    args = (ids, np.ones_like(ids), np.zeros_like(ids))
    return model.apply, variables, args, jpeft.probe(model.apply, variables, *args)


@pytest.fixture(scope="module")
def paper(bert):
    """The S4-model with one size per strategy, and its initial delta."""
    _, variables, _, sites = bert
    method = s4_lib.s4(L, adapter_size=4, prefix_length=3, lora_rank=2)
    return method, method.init(jax.random.key(1), variables, sites)


def _strategies_by_layer(delta) -> dict[int, set]:
    """Layer index -> the strategies with delta leaves in it (part ``g1_lora`` -> ``lora``)."""
    out: dict[int, set] = {}
    for part, tree in delta.items():
        for path in paths_lib.flatten(tree):
            j = paths_lib.layer_index(path)
            assert j is not None, (part, path)
            out.setdefault(j, set()).add(part.split("_")[-1])
    return out


# --------------------------------------------------------------------------------------------
# grouping


@pytest.mark.parametrize("num_layers, sizes", [
    (6, (1, 2, 2, 1)), (8, (1, 3, 3, 1)), (10, (2, 3, 3, 2)), (12, (2, 4, 4, 2)),
    (24, (4, 8, 8, 4)), (48, (8, 16, 16, 8))])
def test_spindle_groups_follow_the_rule(num_layers, sizes):
    groups = s4_lib.spindle_groups(num_layers)
    assert tuple(len(g) for g in groups) == sizes
    assert sum(groups, ()) == tuple(range(num_layers))          # consecutive, every layer once


def test_spindle_groups_shape_for_every_depth_and_errors():
    for n in range(6, 200):
        s = [len(g) for g in s4_lib.spindle_groups(n)]
        assert sum(s) == n and s[0] < s[1] and s[3] < s[2], (n, s)
        assert abs(s[0] - n / 6) < 1 and abs(s[1] - n / 3) < 1, (n, s)
    assert [len(g) for g in s4_lib.spindle_groups(12, 3)] == [3, 6, 3]
    assert [len(g) for g in s4_lib.spindle_groups(10, weights=(1, 3, 3, 1))] == [1, 4, 4, 1]
    with pytest.raises(ValueError, match="too few.*at least 6"):
        s4_lib.spindle_groups(5)
    with pytest.raises(ValueError, match="at least 3 groups"):
        s4_lib.spindle_groups(12, 2)
    with pytest.raises(ValueError, match="not spindle-shaped"):
        s4_lib.spindle_groups(12, weights=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="too few"):
        s4_lib.s4(5)


def test_layer_regex_selects_exactly_the_layers():
    rx = s4_lib.layer_regex([1, 5])
    ok = ["bert/encoder/layer/5/attention/self", "model/layers/1/self_attn", "h_5/self_attn"]
    no = ["bert/encoder/layer/15/attention/self", "bert/encoder/layer/2/attention/self",
          "model/layers/5/mlp", "model/layers/51/self_attn"]
    assert all(re.fullmatch(rx, p) for p in ok)
    assert not any(re.fullmatch(rx, p) for p in no)
    rx = s4_lib.layer_regex([3], layers_pattern="layers")
    assert re.fullmatch(rx, "model/layers/3/self_attn")
    assert not re.fullmatch(rx, "block_0/model/layers/13/self_attn")


def test_argument_errors():
    with pytest.raises(ValueError, match="unknown strategy"):
        s4_lib.s4(8, strategies=(("adapter",), ("ia3",), (), ("lora",)))
    with pytest.raises(ValueError, match="one .*per group"):
        s4_lib.s4(8, strategies=(("adapter",),))
    with pytest.raises(ValueError, match="both G1 and G2"):
        s4_lib.s4(8, groups=((0, 1), (1, 2)), strategies=(("A",), ("L",)))
    with pytest.raises(ValueError, match="prefix_length is one int"):
        s4_lib.s4(8, prefix_length=(2, 2, 2, 2))
    with pytest.raises(ValueError, match="lora_rank of G4"):
        s4_lib.s4(8, lora_rank=(2, None, None, 0))
    with pytest.raises(ValueError, match="may not set"):
        s4_lib.s4(8, lora_kwargs={"rank": 3})
    with pytest.raises(ValueError, match="every group is frozen"):
        s4_lib.s4(8, strategies=((), (), (), ()))


# --------------------------------------------------------------------------------------------
# composition on BERT


def test_each_group_gets_exactly_its_strategies(bert, paper):
    _, variables, _, sites = bert
    method, delta = paper
    assert method.name == "adapter+prefix+bitfit+lora"
    groups = s4_lib.spindle_groups(L)
    assert tuple(len(g) for g in groups) == (1, 3, 3, 1)
    by_layer = _strategies_by_layer(delta)
    for g, ss in zip(groups, s4_lib.PAPER_STRATEGIES):
        for j in g:
            assert by_layer[j] == set(ss), (j, by_layer[j], ss)
    # what each part adapts, in the layers of its groups only
    flat = {part: {paths_lib.path_str(p) for p in paths_lib.flatten(t)}
            for part, t in delta.items()}
    layer_of = lambda p: int(re.search(r"layer/(\d+)/", p).group(1))
    assert {(layer_of(p), p.split("/", 5)[-1]) for p in flat["lora"]} == {
        (j, f"attention/self/{w}/kernel/lora_{f}") for j in (0, 7) for w in ("query", "value")
        for f in "AB"}
    assert {layer_of(p) for p in flat["adapter"]} == set(range(7))
    assert {p.split("/", 4)[-1].rsplit("/", 2)[0] for p in flat["adapter"]} == {
        "attention/output/dense", "output/dense"}                       # Houlsby's two
    assert {(layer_of(p), p.rsplit("/", 1)[-1]) for p in flat["prefix"]} == {
        (j, leaf) for j in range(1, 8) for leaf in ("prefix_keys", "prefix_values")}
    assert {layer_of(p) for p in flat["bitfit"]} == set(range(4, 8))
    assert all(p.endswith("/bias") for p in flat["bitfit"])
    # the same delta when the layer container is named
    named = s4_lib.s4(L, adapter_size=4, prefix_length=3, lora_rank=2, layers_pattern="layer")
    assert (jax.tree.map(jnp.shape, named.init(jax.random.key(1), variables, sites))
            == jax.tree.map(jnp.shape, delta))


def test_parts_are_disjoint_and_compose_checks_it(bert, paper):
    _, variables, _, sites = bert
    _, delta = paper
    base = set(paths_lib.flatten(variables))
    owner = {}
    for part, tree in delta.items():
        covered = {next((p[:n] for n in range(len(p), 0, -1) if p[:n] in base), None)
                   for p in paths_lib.flatten(tree)} - {None}     # the base leaves it adapts
        for w in covered:
            assert w not in owner, (w, owner[w], part)
            owner[w] = part
    assert {owner[p] for p in owner} == {"bitfit", "lora"}       # adapters, prefixes: new arrays
    # one bias trained twice is refused
    s4_parts = {n: from_config(c) for n, c in
                s4_lib.s4(L, adapter_size=4, prefix_length=3, lora_rank=2).config["compose"]
                .items()}
    twice = jpeft.compose(**s4_parts, extra=jpeft.bitfit(layers_to_transform=[7]))
    with pytest.raises(ValueError, match="both adapt"):
        twice.init(jax.random.key(0), variables, sites)


def test_per_layer_budget_with_shared_sizes(paper):
    """Per-layer cost (tiny BERT, d = 32, 4 heads of 8, intermediate 64): adapters (Houlsby's two)
    ``2 (2 d m + m + d)``; LoRA on q, v ``2 r (d + d)``; prefix ``2 l N D``; BitFit the layer's
    biases ``4 d + 2 d + I + d`` (q, k, v, attention output, two LayerNorms, FFN in and out)."""
    _, delta = paper
    m, l, r = 4, 3, 2
    cost = {"adapter": 2 * (2 * D * m + m + D), "lora": 2 * r * 2 * D,
            "prefix": 2 * l * HEADS * HEAD_DIM, "bitfit": 4 * D + 2 * D + INTER + D}
    rep = s4_lib.budget_report(delta)
    assert rep.outside == {}
    for g, ss in zip(s4_lib.spindle_groups(L), s4_lib.PAPER_STRATEGIES):
        for j in g:
            assert rep.per_layer[j] == {s: cost[s] for s in ss}
            assert rep.totals[j] == sum(cost[s] for s in ss)
    assert sum(rep.totals.values()) == jpeft.num_params(delta)


def test_uniform_allocation_equalises_layers_and_rebuilds(bert):
    apply, variables, args, sites = bert
    budget = 2000
    alloc = s4_lib.uniform_allocation(variables, sites, L, budget, prefix_length=3)
    assert alloc == {"adapter_size": (7, 13, 11, None), "lora_rank": (8, None, None, 12)}
    method = s4_lib.s4(L, prefix_length=3, **alloc)
    assert set(method.config["compose"]) == {"g1_adapter", "g2_adapter", "g3_adapter", "prefix",
                                             "bitfit", "g1_lora", "g4_lora"}
    delta = jax.eval_shape(lambda p: method.init(jax.random.key(0), p, sites), variables)
    rep = s4_lib.budget_report(delta)
    unit = {"adapter": 2 * (2 * D + 1), "lora": 2 * 2 * D}     # cost of one more m / r per layer
    for g, ss in zip(s4_lib.spindle_groups(L), s4_lib.PAPER_STRATEGIES):
        tol = sum(unit[s] for s in ss if s in unit) / 2
        for j in g:
            assert abs(rep.totals[j] - budget) <= tol, (j, rep.totals[j])
    assert _strategies_by_layer(delta) == {
        j: set(ss) for g, ss in zip(s4_lib.spindle_groups(L), s4_lib.PAPER_STRATEGIES) for j in g}
    spread = max(rep.totals.values()) - min(rep.totals.values())
    assert spread < 0.05 * budget
    with pytest.raises(ValueError, match="at least about"):
        s4_lib.uniform_allocation(variables, sites, L, 300, prefix_length=3)
    with pytest.raises(ValueError, match="do not pass"):
        s4_lib.uniform_allocation(variables, sites, L, 2000, lora_rank=2)
    # from_config rebuilds it, also after a JSON round trip
    rebuilt = from_config(json.loads(json.dumps(method.config)))
    assert rebuilt.name == method.name
    assert jax.tree.map(jnp.shape, rebuilt.init(jax.random.key(0), variables, sites)) == \
        jax.tree.map(jnp.shape, delta)


def test_jitted_forward_gradients_and_from_config(bert, paper):
    apply, variables, args, sites = bert
    method, delta = paper
    f = jpeft.wrap(apply, method, sites)

    def loss(d):
        out = f(variables, d, *args)
        return jnp.sum(out ** 2), out
    grads, out = jax.jit(jax.grad(loss, has_aux=True))(delta)
    base = jax.jit(apply)(variables, *args)
    assert out.shape == base.shape and bool(jnp.all(jnp.isfinite(out)))
    # the prefix changes the output at init (adapters, LoRA and BitFit start at zero)
    assert not np.allclose(out, base, atol=1e-4)
    # every part (so every group) is trained: each receives a gradient at init
    for part, g in grads.items():
        assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(g)), part
    # from_config rebuilds the same method: the same config and the same initial delta
    rebuilt = from_config(method.config)
    assert rebuilt.config == method.config and rebuilt.name == method.name
    jax.tree.map(np.testing.assert_array_equal,
                 rebuilt.init(jax.random.key(1), variables, sites), delta)


def test_zero_init_parts_leave_the_base_output(bert):
    """Without prefix (A, L / A / A, B / B, L) the model starts as the base model exactly."""
    apply, variables, args, sites = bert
    method = s4_lib.s4(L, strategies=("AL", "A", "AB", "BL"), adapter_size=4, lora_rank=2)
    assert tuple(method.config["compose"]) == ("adapter", "bitfit", "lora")
    delta = method.init(jax.random.key(2), variables, sites)
    got = jax.jit(jpeft.wrap(apply, method, sites))(variables, delta, *args)
    np.testing.assert_array_equal(got, jax.jit(apply)(variables, *args))


# --------------------------------------------------------------------------------------------
# the unrolled NNX decoder


def test_nnx_decoder():
    from jpeft.models.llama import LlamaConfig, LlamaForCausalLM
    n = 6
    config = LlamaConfig.tiny(vocab_size=64, hidden_size=32, intermediate_size=48,
                              num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                              scan_layers=False, num_hidden_layers=n)
    apply, params = jpeft.nnx.split(LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    ids = np.random.default_rng(0).integers(1, 64, (2, 6)).astype(np.int32)
    sites = jpeft.probe(apply, params, ids)
    groups = s4_lib.spindle_groups(n)
    assert tuple(len(g) for g in groups) == (1, 2, 2, 1)
    method = s4_lib.s4(n, adapter_size=4, prefix_length=2, lora_rank=2)
    delta = method.init(jax.random.key(0), params, sites)
    assert _strategies_by_layer(delta) == {
        j: set(ss) for g, ss in zip(groups, s4_lib.PAPER_STRATEGIES) for j in g}
    flat = {part: {paths_lib.path_str(p) for p in paths_lib.flatten(t)}
            for part, t in delta.items()}
    assert flat["lora"] == {f"model/layers/{j}/self_attn/{w}_proj/kernel/lora_{f}"
                            for j in (0, n - 1) for w in "qv" for f in "AB"}
    assert {p.split("/", 3)[-1].split("/")[0] for p in flat["adapter"]} == {"self_attn", "mlp"}
    assert all(re.fullmatch(r"model/layers/[1-5]/self_attn/prefix_(keys|values)", p)
               for p in flat["prefix"])
    assert all(re.fullmatch(r"model/layers/[3-5]/self_attn/[qkvo]_proj/bias", p)
               for p in flat["bitfit"]) and len(flat["bitfit"]) == 3 * 4
    logits = jax.jit(jpeft.wrap(apply, method, sites))(params, delta, ids)
    assert logits.shape == (2, 6, 64) and bool(jnp.all(jnp.isfinite(logits)))
    assert from_config(method.config).config == method.config
