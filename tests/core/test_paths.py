"""Target selection over key paths: regex, suffixes, layers, exclusions, and the errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jpeft.core import paths

TREE = {"params": {
    "encoder": {"layer": {str(i): {
        "attention": {"self": {n: {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}
                               for n in ("query", "key", "value")}},
        "intermediate": {"dense": {"kernel": jnp.zeros((4, 8)), "bias": jnp.zeros(8)}},
    } for i in range(3)}},
    "classifier": {"kernel": jnp.zeros((4, 2)), "bias": jnp.zeros(2)},
}}


def _strs(ps):
    return [paths.path_str(p) for p in ps]


def test_suffix_targets_match_whole_components():
    got = paths.select(TREE, paths.Selection(targets=("query", "self/value"), leaf_names=("kernel",)))
    assert len(got) == 6
    assert all(p[-2] in ("query", "value") for p in got)
    # "uery" is not a component suffix: nothing matches.
    with pytest.raises(ValueError, match=r"targets \['uery'\] matched none of the"):
        paths.select(TREE, paths.Selection(targets=("uery",), leaf_names=("kernel",)))


def test_regex_is_full_match_with_either_separator():
    sel = paths.Selection(targets=r"params\.encoder\.layer\.\d+\.attention\.self\.(query|key)",
                          leaf_names=("kernel",))
    assert len(paths.select(TREE, sel)) == 6
    sel = paths.Selection(targets=r".*/query", leaf_names=("bias",))
    assert len(paths.select(TREE, sel)) == 3
    # A partial match is not a match.
    with pytest.raises(ValueError, match="targets 'query' matched none of the"):
        paths.select(TREE, paths.Selection(targets=r"query", leaf_names=("kernel",)))


def test_layers_to_transform_and_exclude():
    sel = paths.Selection(targets=("query",), leaf_names=("kernel",), layers_to_transform=[0, 2])
    assert _strs(paths.select(TREE, sel)) == [
        "params/encoder/layer/0/attention/self/query/kernel",
        "params/encoder/layer/2/attention/self/query/kernel"]
    sel = paths.Selection(targets=None, leaf_names=("kernel",), exclude=("classifier", "key"))
    got = _strs(paths.select(TREE, sel))
    assert len(got) == 9 and not any("classifier" in p or "/key/" in p for p in got)


def test_layer_index_forms():
    assert paths.layer_index(("encoder", "layer", "3", "dense")) == 3
    assert paths.layer_index(("model", "layers_12", "mlp")) == 12
    assert paths.layer_index(("h", "7"), layers_pattern="h") == 7
    assert paths.layer_index(("blocks", "7"), layers_pattern="h") is None
    assert paths.layer_index(("classifier",)) is None


def test_no_match_lists_closest_paths():
    with pytest.raises(ValueError, match="Closest existing paths") as e:
        paths.select(TREE, paths.Selection(targets=("qurey",), leaf_names=("kernel",)), what="lora")
    msg = str(e.value)
    assert "lora" in msg and "qurey" in msg and "attention/self/query" in msg


def test_no_match_for_layers_names_present_indices():
    with pytest.raises(ValueError, match=r"layer indices present: \[0, 1, 2\]"):
        paths.select(TREE, paths.Selection(targets=("query",), leaf_names=("kernel",),
                                           layers_to_transform=7))


def test_no_candidate_leaf_names_what_exists():
    with pytest.raises(ValueError, match="leaf names present"):
        paths.select(TREE, paths.Selection(leaf_names=("weight",)))


def test_flatten_unflatten_round_trip():
    """Keys, order and values survive (each leaf distinct, so a mix-up of leaves shows)."""
    tree = jax.tree.map(lambda x: x, TREE)
    leaves, treedef = jax.tree.flatten(tree)
    tree = jax.tree.unflatten(treedef, [jnp.full(x.shape, i, jnp.float32)
                                        for i, x in enumerate(leaves)])
    flat = paths.flatten(tree)
    back = paths.unflatten(flat)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    jax.tree.map(np.testing.assert_array_equal, back, tree)
    assert list(paths.flatten(back)) == list(flat)


# Regular expressions are matched with RE2: linear time, whatever the pattern.

#: Module paths of TREE and of a deeper model, as "/"-joined strings.
MODULES = sorted({paths.path_str(p[:-1]) for p in paths.flatten(TREE)} | {
    "params/model/layers/11/self_attn/q_proj", "params/model/layers/11/mlp/down_proj",
    "params/bert/encoder/layer/10/attention/output/dense"})


@pytest.mark.parametrize("pattern", [
    r".*attention/self/(query|value)", r".*attention\.self\.query", r"(.*/)?(key|value|down_proj)",
    r".*layer/[0-9]+/.*", r".*layers_?\d+/mlp/.*", r"params/classifier", r"[a-z]+/encoder/.*",
    r"(?i).*Q_PROJ", r".*(?:self_attn|attention)/[qkv].*"])
def test_patterns_select_what_python_re_selects(pattern):
    import re
    for module in MODULES:
        comps = tuple(module.split("/"))
        want = bool(re.fullmatch(pattern, module) or re.fullmatch(pattern, ".".join(comps)))
        assert paths.matches(comps, pattern) == want, (pattern, module)


def test_a_pathological_pattern_is_matched_in_linear_time():
    from deadline import within
    module = tuple(f"layer{i}" for i in range(40))      # Python's re: hours on this
    assert within(2.0, paths.matches, module, "(.*.*)*Z") is False
    sel = paths.Selection(targets="(.*.*)*Z", leaf_names=("kernel",))
    with pytest.raises(ValueError, match="matched none of the"):
        within(2.0, paths.select, TREE, sel)


@pytest.mark.parametrize("pattern,why", [(r"(query)\1", r"invalid escape sequence: \\1"),
                                         (r"(?=q)query", r"invalid perl operator: \(\?=")])
def test_a_pattern_re2_cannot_compile_is_one_clear_error(pattern, why):
    import re
    with pytest.raises(ValueError, match=rf"the pattern {re.escape(repr(pattern))} is not RE2 "
                                         rf"syntax \({why}\)"
                                         rf".*no backreferences or lookaround"):
        paths.select(TREE, paths.Selection(targets=pattern, leaf_names=("kernel",)))
