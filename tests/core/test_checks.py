"""Invalid hyper-parameters are errors at construction, for every method, naming the argument."""

import math

import numpy as np
import pytest

import jpeft
from jpeft.methods import adalora, adapters, diff_pruning, far, fishmask, intrinsic, prefix
from jpeft.methods import prompt, sparse_adapter, unipelt

NAN, INF = math.nan, math.inf

BAD = [
    (lambda: jpeft.lora(alpha=0), "lora: alpha must be a finite number > 0, got 0"),
    (lambda: jpeft.lora(alpha=-1.0), "lora: alpha must be a finite number > 0, got -1.0"),
    (lambda: jpeft.lora(alpha=NAN), "lora: alpha must be a finite number > 0, got nan"),
    (lambda: jpeft.lora(alpha=INF), "lora: alpha must be a finite number > 0, got inf"),
    (lambda: jpeft.lora(rank=0), "lora: rank must be a positive integer, got 0"),
    (lambda: jpeft.lora(rank=2.5), "lora: rank must be a positive integer, got 2.5"),
    (lambda: jpeft.lora(dropout=1.0), r"lora: dropout must be in \[0, 1\), got 1.0"),
    (lambda: jpeft.lora(dropout=NAN), r"lora: dropout must be in \[0, 1\), got nan"),
    (lambda: adalora.adalora(alpha=0.0), "adalora: alpha must be a finite number > 0"),
    (lambda: adalora.adalora(init_r=4, target_r=8, total_steps=100),
     "adalora: target_r 8 is above init_r 4"),
    (lambda: adalora.adalora(beta1=1.0), r"adalora: beta1 must be in \[0, 1\), got 1.0"),
    (lambda: adalora.adalora(orth_reg_weight=-1.0),
     "adalora: orth_reg_weight must be a finite number >= 0"),
    (lambda: adalora.adalora(init_std=NAN), "adalora: init_std must be a finite number > 0"),
    (lambda: diff_pruning.diff_pruning(lam=-1.0),
     "diff_pruning: lam must be a finite number >= 0, got -1.0"),
    (lambda: diff_pruning.diff_pruning(alpha_init=INF),
     "diff_pruning: alpha_init must be a finite number, got inf"),
    (lambda: far.far_select({"a": np.ones((3, 4))}, 0.0), r"far: fraction must be in \(0, 1\]"),
    (lambda: fishmask.fishmask_indices({"a": np.ones(4)}, density=1.5),
     r"fishmask: density must be a number in \(0, 1\]"),
    (lambda: intrinsic.said(0), "said: d must be a positive integer"),
    (lambda: prefix.prefix_tuning(0), "prefix: num_virtual_tokens must be a positive integer"),
    (lambda: prefix.prefix_tuning(4, scale=NAN), "prefix: scale must be a finite number > 0"),
    (lambda: prompt.prompt_tuning(0), "prompt: num_virtual_tokens must be a positive int"),
    (lambda: adapters.houlsby(bottleneck_size=0),
     "adapter: bottleneck_size must be a positive integer, got 0"),
    (lambda: adapters.houlsby(reduction_factor=0),
     "adapter: reduction_factor must be a positive integer, got 0"),
    (lambda: adapters.scaled_parallel(scaling=0.0),
     r"adapter: scaling \(a number or 'learned'\) must be a finite number > 0, got 0.0"),
    (lambda: adapters.scaled_parallel(scaling="big"),
     r"adapter: scaling \(a number or 'learned'\) must be a finite number > 0, got 'big'"),
    (lambda: adapters.compacter(phm_dim=0), "adapter: phm_dim and phm_rank must be positive"),
    (lambda: unipelt.unipelt(lora_alpha=0.0), "lora: alpha must be a finite number > 0"),
    (lambda: sparse_adapter.prune_masks({"x": {"down": np.ones((4, 4))}}, 1.0),
     r"sparse_adapter: sparsity must be in \[0, 1\), got 1.0"),
]


@pytest.mark.parametrize("build,message", BAD, ids=[m.split(",")[0][:48] for _, m in BAD])
def test_bad_hyper_parameter_is_an_error_at_construction(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_numpy_numbers_are_accepted():
    config = jpeft.lora(alpha=np.float32(16), rank=8).config
    assert config["alpha"] == 16.0 and type(config["alpha"]) is float   # JSON-serialisable
